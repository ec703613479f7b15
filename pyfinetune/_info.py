"""What this build of pyfinetune contains: versions, architectures, and kernels per device."""

from __future__ import annotations

from typing import Dict, List

import torch

from . import _build_info

# Every op of the library; `kernel_devices` reports where each has a compiled kernel.
OPS = ("fused_adamw_", "fused_sgd_", "kd_loss_fwd", "kd_loss_fwd_inplace", "kd_loss_topk_fwd", "masked_matmul",
       "masked_matmul_backward", "csr_linear", "csr_linear_backward", "csr_to_dense", "csr_to_dense_into", "csr_gather",
       "tiled_csr_linear", "tiled_csr_linear_backward_input",
       "tiled_csr_linear_backward_values")
_DISPATCH_KEYS = ("CPU", "CUDA")


def kernel_devices() -> Dict[str, List[str]]:
    """Map each ``torch.ops.pyfinetune`` op to the devices it has compiled kernels for."""
    out = {}
    for op in OPS:
        name = f"pyfinetune::{op}"
        out[op] = [
            key.lower() for key in _DISPATCH_KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
        ]
    return out


def build_info() -> Dict[str, object]:
    """Versions and capabilities recorded when the extension was built, and what is running now."""
    from . import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "pyfinetune": __version__,
        "torch_built": _build_info.TORCH_VERSION,
        "torch_running": torch.__version__,
        "cuda_built": _build_info.WITH_CUDA,
        "nvcc_version": _build_info.CUDA_VERSION,
        "cuda_archs": list(_build_info.CUDA_ARCHS),
        "optimizer_launch_arg_bytes": getattr(_build_info, "MTA_ARG_BYTES", None),
        "cpu_isa": _build_info.CPU_ISA,
        "gpu": gpu,
        "cpu_threads": torch.get_num_threads(),
        "optimizer_cpu_prefetch": optimizer_cpu_prefetch(),
        "kernels": kernel_devices(),
        "sparse_linear_crossover": sparse_linear_crossover(),
        "sparse_crossover_env": sparse_crossover_env(),
        "dense_pool": dense_pool(),
    }


def optimizer_cpu_prefetch() -> object:
    """Whether the CPU optimizer kernels prefetch their streams in software: PYFINETUNE_CPU_PREFETCH
    (1 / 0), else on Intel CPUs only (measured faster there, slower on AMD EPYC); the variable's error
    message when it holds something else."""
    try:
        return bool(torch.ops.pyfinetune._optim_cpu_prefetch())
    except ValueError as e:
        return str(e)


# The kernels' settings with a fixed vocabulary, as the extension reads them (at each call): a bad
# value is refused there with a ValueError naming the variable; settings_errors() finds it first.
_ON_OFF = ("PYFINETUNE_CPU_PREFETCH", "PYFINETUNE_KD_CUDA_PREFETCH", "PYFINETUNE_KD_CUDA_CAP_REGISTERS",
           "PYFINETUNE_TILED_CUDA_ASYNC", "PYFINETUNE_CSR_CUDA_SMALL_N", "PYFINETUNE_OPTIM_NATIVE_PLAN",
           "PYFINETUNE_KD_CUDA_PERSISTENT", "PYFINETUNE_KD_CUDA_L2_PREFETCH", "PYFINETUNE_KD_DEVICE_SCALE")
_CHOICES = {"PYFINETUNE_OPTIM_CUDA_LAYOUT": ("classic", "wide", "flat"),
            "PYFINETUNE_CSR_CUDA_KERNEL": ("warp", "tiled", "tensor_cores"),
            "PYFINETUNE_KD_CUDA_SPLIT": ("1", "2", "4", "8", "16")}


def settings_errors() -> List[str]:
    """One message per PYFINETUNE_* variable set to a value the kernels refuse (empty: all valid),
    so that a command can stop before it starts work (``pyfinetune bench``, ``calibrate``)."""
    import os

    errors = []
    for name in _ON_OFF:
        raw = os.environ.get(name, "")
        if raw not in ("", "0", "1"):
            errors.append(f"{name} must be 0 or 1 (or unset), got {raw!r}")
    for name, choices in _CHOICES.items():
        raw = os.environ.get(name, "")
        if raw and raw not in choices:
            errors.append(f"{name} must be one of {', '.join(choices)} (or unset), got {raw!r}")
    # Read loosely by the kernels, so a wrong value silently did something else, under a record that
    # named it: PYFINETUNE_CPU_AVX512 is off for a value starting with "0" and on otherwise ("off",
    # "false", "no": on); PYFINETUNE_KD_CUDA_THREADS is ignored unless a multiple of 32 in [32, 512].
    raw = os.environ.get("PYFINETUNE_CPU_AVX512", "")
    if raw not in ("", "0", "1"):
        errors.append(f"PYFINETUNE_CPU_AVX512 must be 0 or 1 (or unset), got {raw!r}")
    raw = os.environ.get("PYFINETUNE_KD_CUDA_THREADS", "")
    if raw and not (raw.isascii() and raw.isdigit() and 32 <= int(raw) <= 512 and int(raw) % 32 == 0):
        errors.append(f"PYFINETUNE_KD_CUDA_THREADS must be a multiple of 32 in [32, 512] (or unset), got {raw!r}")
    raw = os.environ.get("PYFINETUNE_TILED_CUDA_SPLIT_K", "")
    if raw and raw != "auto" and not (raw.isascii() and raw.isdigit() and len(raw) <= 5 and 1 <= int(raw) <= 65535):
        errors.append(f"PYFINETUNE_TILED_CUDA_SPLIT_K must be auto or an integer in [1, 65535] (or unset: "
                      f"auto), got {raw!r}")
    pool = dense_pool()
    if "error" in pool:
        errors.append(str(pool["error"]))
    crossover = sparse_linear_crossover()
    if "error" in crossover:
        errors.append(str(crossover["error"]))
    return errors


def dense_pool() -> Dict[str, object]:
    """The CPU buffer pool (SparseLinear's dense path, the distillation kernel's kept gradients): the
    idle bytes it may keep (PYFINETUNE_DENSE_POOL_MB;
    None with the variable's error when it is not a valid size) and those it holds now."""
    from ._sparse_linear import _pool_limit_bytes

    out: Dict[str, object] = {"idle_bytes": int(torch.ops.pyfinetune._pool_idle_bytes_cpu())}
    try:
        out["idle_limit_bytes"] = _pool_limit_bytes()
    except ValueError as e:
        out["idle_limit_bytes"], out["error"] = None, str(e)
    return out


def sparse_crossover_env() -> Dict[str, float]:
    """The CROSSOVER_SPARSITY entries PYFINETUNE_SPARSE_CROSSOVER set at import ({} when unset or
    invalid)."""
    from . import _sparse_linear

    return dict(_sparse_linear._env_entries)


def sparse_linear_crossover() -> Dict[str, Dict[str, float]]:
    """The sparsity from which SparseLinear(kernel="auto") runs the sparse kernel, per device with a
    sparse kernel in this build (the CPU; CUDA when built) and dtype, on this machine."""
    from ._sparse_linear import crossover_sparsity

    devices = [d for d in ("cpu", "cuda") if d in kernel_devices()["csr_linear"]]
    try:
        return {d: {str(t).replace("torch.", ""): crossover_sparsity(d, t)
                    for t in (torch.float32, torch.bfloat16, torch.float16)} for d in devices}
    except ValueError as e:  # a malformed PYFINETUNE_SPARSE_CROSSOVER
        return {"error": str(e)}
