"""Benchmark of the pruned linear layer (SparseLinear, csr_linear) against dense and torch CSR products.

The command line of :mod:`pyfinetune.benchmarks.prune` (see its docstring for the options and the
method). Run from the repository root: this checkout's pyfinetune is measured, not an installed one.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyfinetune.benchmarks.prune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
