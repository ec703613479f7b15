"""pyfinetune: fast fine-tuning for PyTorch.

Compiled, fused CPU and CUDA kernels behind a thin PyTorch API:

* ``pyfinetune.optim``: AdamW and SGD with L2-SP, L1 and masks, one fused multi-tensor update.
* ``pyfinetune.losses``: fused knowledge-distillation losses (KL, reverse KL, JSD; top-k teacher;
  fused linear head).
* ``pyfinetune.prune``: magnitude, gradual and movement pruning of Linear / Conv2d layers.
* ``pyfinetune.Finetuner`` / ``pyfinetune.finetune``: a training loop for each method (baseline,
  L2-SP, distillation, pruning) with checkpoints and resume (``pyfinetune.finetuning``).
* ``torch.ops.pyfinetune.*``: the raw ops (``pyfinetune.ops`` documents them).
"""

from __future__ import annotations

import torch

__version__ = "0.1.0"


def _torch_release(version: str) -> str:
    # "2.14.1+cu130" -> "2.14.1": the local tag only says which wheel, not which ABI.
    return version.split("+")[0]



def _check_cpu_isa(isa):
    """Refuse, with a message, a CPU that lacks the vector ISA the kernels were compiled for."""
    if isa not in ("avx2", "avx512"):
        return
    checks = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported"}
    probe = getattr(torch.cpu, checks[isa], None)
    if probe is not None:
        ok = bool(probe())
    else:
        cap = torch.backends.cpu.get_cpu_capability()
        ok = cap.startswith("AVX512") or cap == "AMX" or (isa == "avx2" and cap == "AVX2")
    if not ok:
        raise ImportError(
            f"pyfinetune's CPU kernels were compiled for {isa.upper()}, which this CPU does not support; "
            "rebuild with PYFINETUNE_CPU_ISA=avx2 or PYFINETUNE_CPU_ISA=generic"
        )


def _load_extension() -> None:
    try:
        from . import _build_info
    except ImportError as e:  # pragma: no cover - only without a build
        raise ImportError(
            "pyfinetune's compiled extension is missing (no pyfinetune/_build_info.py): install with "
            "`pip install --no-build-isolation .` after installing torch"
        ) from e
    built, running = _build_info.TORCH_VERSION, torch.__version__
    if _torch_release(built) != _torch_release(running):
        raise ImportError(
            f"pyfinetune was built against torch {built} but torch {running} is running; "
            "rebuild it: pip install --no-build-isolation --force-reinstall --no-deps pyfinetune"
        )
    built_cuda, running_cuda = _build_info.TORCH_CUDA_VERSION, torch.version.cuda
    if _build_info.WITH_CUDA and built_cuda != running_cuda:
        raise ImportError(
            f"pyfinetune's CUDA kernels were built against torch {built} with CUDA {built_cuda}, but torch "
            f"{running} with CUDA {running_cuda} is running; rebuild it: "
            "pip install --no-build-isolation --force-reinstall --no-deps pyfinetune"
        )
    _check_cpu_isa(_build_info.CPU_ISA)
    try:
        from . import _C  # noqa: F401  (loading the library registers torch.ops.pyfinetune.*)
    except (ImportError, OSError) as e:
        raise ImportError(
            f"could not load pyfinetune._C (built for torch {built}, CUDA {_build_info.CUDA_VERSION}; "
            f"running torch {running}, CUDA {torch.version.cuda}): {e}"
        ) from e


_load_extension()

from . import ops  # noqa: E402,F401  (fake kernels: must be registered before any compile)
from . import losses  # noqa: E402,F401
from . import optim  # noqa: E402,F401
from . import prune  # noqa: E402,F401
from ._info import build_info, kernel_devices  # noqa: E402,F401

__all__ = ["ops", "losses", "optim", "prune", "build_info", "kernel_devices", "Finetuner", "finetune", "__version__"]


def __getattr__(name: str):
    # The fine-tuning loop is imported on first use, so that `import pyfinetune` stays light.
    if name in ("Finetuner", "finetune"):
        from . import finetuning

        return getattr(finetuning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
