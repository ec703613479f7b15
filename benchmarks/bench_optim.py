"""Benchmark of fused AdamW / SGD steps (with and without L2-SP) against torch.

The command line of :mod:`pyfinetune.benchmarks.optim` (see its docstring for the options and the
method). Run from the repository root: this checkout's pyfinetune is measured, not an installed one.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyfinetune.benchmarks.optim import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
