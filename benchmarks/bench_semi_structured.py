"""Benchmark of 2:4 sparse tensor cores against the dense product (GPU only).

The command line of :mod:`pyfinetune.benchmarks.semi_structured` (see its docstring for the options and the
method). Run from the repository root: this checkout's pyfinetune is measured, not an installed one.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyfinetune.benchmarks.semi_structured import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
