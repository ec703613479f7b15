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


def _source_root():
    """The source tree this package is imported from (setup.py and csrc/ beside it), else None."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc")):
        return root
    return None


def _rebuild_command() -> str:
    """The pip command that rebuilds this copy of pyfinetune from its sources."""
    root = _source_root()
    if root is not None:  # a clone: build in place
        return f"pip install --no-build-isolation --force-reinstall --no-deps -e {root}"
    try:  # an installed copy: rebuild from where pip installed it (PEP 610 direct_url.json)
        import json
        import os
        from importlib import metadata
        from urllib.parse import unquote, urlparse

        dist = metadata.distribution("pyfinetune")
        if os.path.samefile(os.path.dirname(os.path.abspath(__file__)),
                            os.path.dirname(str(dist.locate_file("pyfinetune/__init__.py")))):
            direct = json.loads(dist.read_text("direct_url.json") or "{}")
            url = direct.get("url", "")
            source = unquote(urlparse(url).path) if url.startswith("file://") else ""
            if source and not source.endswith(".whl") and os.path.exists(source):
                editable = "-e " if direct.get("dir_info", {}).get("editable") else ""
                return f"pip install --no-build-isolation --force-reinstall --no-deps {editable}{source}"
    except Exception:  # pragma: no cover - metadata missing or unreadable: the generic command
        pass
    return "pip install --no-build-isolation --force-reinstall --no-deps <pyfinetune source folder or sdist>"


def _load_extension() -> None:
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from . import _build_info
    except ImportError as e:  # pragma: no cover - only without a build
        root = _source_root()
        if root is not None:
            raise ImportError(
                f"pyfinetune is imported from its source tree {root}, which has not been built "
                f"(no pyfinetune/_build_info.py): build it in place with "
                f"`pip install --no-build-isolation -e {root}` after installing torch, or import "
                "pyfinetune from another folder to use an installed copy"
            ) from e
        raise ImportError(
            "pyfinetune's compiled extension is missing (no pyfinetune/_build_info.py): install with "
            "`pip install --no-build-isolation <pyfinetune source folder>` after installing torch"
        ) from e
    built, running = _build_info.TORCH_VERSION, torch.__version__
    if _torch_release(built) != _torch_release(running):
        raise ImportError(
            f"pyfinetune was built against torch {built} but torch {running} is running; "
            f"rebuild it: {_rebuild_command()}"
        )
    built_cuda, running_cuda = _build_info.TORCH_CUDA_VERSION, torch.version.cuda
    if _build_info.WITH_CUDA and built_cuda != running_cuda:
        raise ImportError(
            f"pyfinetune's CUDA kernels were built against torch {built} with CUDA {built_cuda}, but torch "
            f"{running} with CUDA {running_cuda} is running; rebuild it: {_rebuild_command()}"
        )
    _check_cpu_isa(_build_info.CPU_ISA)
    try:
        from . import _C  # noqa: F401  (loading the library registers torch.ops.pyfinetune.*)
    except (ImportError, OSError) as e:
        import importlib.util

        if importlib.util.find_spec(__name__ + "._C") is None:
            root = _source_root()
            if root is not None:
                raise ImportError(
                    f"pyfinetune is imported from its source tree {root}, which holds no built pyfinetune/_C "
                    "(a non-editable `pip install .` builds into site-packages, not into the tree): build in "
                    f"place with `pip install --no-build-isolation -e {root}`, or import pyfinetune from "
                    "another folder to use the installed copy"
                ) from None
            raise ImportError(
                f"pyfinetune's compiled extension pyfinetune/_C is missing from {here}; reinstall it: "
                f"{_rebuild_command()}"
            ) from None
        raise ImportError(
            f"could not load pyfinetune._C (built for torch {built}, CUDA {_build_info.CUDA_VERSION}; "
            f"running torch {running}, CUDA {torch.version.cuda}): {e}; rebuild it: {_rebuild_command()}"
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
