"""SparseLinear: a linear layer that stores only its kept weights.

``pyfinetune.prune`` re-exports :class:`SparseLinear`; it lives here so that the layer and the
pruning workflow can change independently.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["SparseLinear", "CROSSOVER_SPARSITY", "SMALL_BATCH_ROWS", "crossover_sparsity", "release_dense_buffers"]

# Sparsity (fraction of pruned weights) from which kernel="auto" runs the sparse kernel
# (csr_linear) instead of the dense masked product (masked_matmul on a weight rebuilt from the
# kept values), per device type, for float32 and float64 layers; 16-bit layers (bfloat16,
# float16) use the "<device>-16bit" entry where the dense product has matrix units, and the
# float32 entry elsewhere. See SparseLinear's docstring for how the values were measured.
CROSSOVER_SPARSITY: Dict[str, float] = {
    # benchmarks/results/prune-cpu-20261126-1214 (two threads, the dense path through csr_to_dense
    # and pooled buffers): the training step's time ratio of our dense path to the sparse kernel
    # crosses 1 at ~59% (0.90x at 55%, 1.02x at 60%); the sparse forward is faster from 40% on.
    # (Before the pooled dense path, -0749: the step crossed at ~43%.) On the AVX2-only AMD EPYC
    # (tile-major kernels, no AVX-512), calibrate_crossover("cpu") measured 0.602 and 0.560 (two
    # runs, 45-75% in steps of 5%, 2026-11-29): the same entry.
    "cpu": 0.58,
    # CPUs with AMX tile units (amx_bf16: Xeon Sapphire Rapids and later), whose bfloat16/float16
    # GEMMs run ~5x faster than the float32 ones: benchmarks/results/prune-bfloat16-cpu-20261126-1213
    # (the CI machine, two threads, pooled dense path): our dense path's training step is 4.2x
    # faster than the sparse kernel's at 50% and the ratio crosses 1 at ~92%, the forward's at ~92%
    # (at 90%: step 24.4 vs 28.9 ms, forward 7.4 vs 8.5 ms; at 95% the sparse kernel wins both).
    "cpu-16bit": 0.92,
    # benchmarks/results/gpu-check-20261126-0605/prune-cuda-20261126-0612 (H100, N=256,
    # K=M=4096, 10 rounds): the forward's time ratio of our dense path to the sparse kernel crosses 1
    # at ~85%; the training step only reaches parity at 95% (sparse 0.910 ms vs dense path 0.899 ms)
    # and does not cross in the measured range (99%: 0.814 vs 0.748 ms); 0.9 favours the forward.
    "cuda": 0.9,
    # benchmarks/results/gpu-check-20261126-1338/prune-float16-cuda-20261126-1345 (H100, float16,
    # N=256, K=M=4096, 10 rounds): on tensor cores cuBLAS runs 16-bit products many times faster
    # than float32 ones while the sparse kernel computes in float32 either way: the forward's ratio
    # of our dense path to the sparse kernel crosses 1 at ~92%, the training step's not below 99%
    # (there 0.846 ms sparse vs 0.827 ms dense path, both launch-bound): 0.99.
    "cuda-16bit": 0.99,
}

# Inference calls (no autograd) with at most this many rows of x run the sparse kernel whatever
# the sparsity, per (device type, 4-byte-or-wider values): the dense path rebuilds the whole
# weight at each call (a write and a read of [out, in]) for a product that, with a few rows, is
# bound by reading the weight, while the sparse kernel reads the kept values and their indices once.
# Measured on the CPU (the AMD EPYC CI machine, x [rows, 4096], weight [4096, 4096], forward, ad hoc
# interleaved runs): float32 sparse / dense path 3.4 / 9.5 ms at 1 row, 9.2 / 18.1 ms at 8 and 15.6 /
# 22.7 ms at 32 with nothing pruned (2.2 / 8.1, 8.8 / 15.9 ms at 50%), 29.9 / 28.1 ms at 64; bfloat16
# (fast 16-bit GEMM here) 3.8 / 6.6 ms at 1, 7.6 / 8.3 ms at 8, 8.7 / 8.7 ms at 16, 14.0 / 9.1 ms at
# 32 with nothing pruned. Training calls keep the crossover (the backward's trade-off differs: at
# 1-8 rows and 0-50% the dense path won some). CUDA: not measured, so the crossover decides.
# The choice thus depends on the grad mode: the same layer may run the dense path in training and
# the sparse kernel under torch.no_grad(), which differ by float rounding, and where x holds inf or
# NaN meeting a pruned weight (the dense product multiplies it by the stored zero: NaN; the sparse
# kernel never reads it).
SMALL_BATCH_ROWS: Dict[Tuple[str, bool], int] = {("cpu", True): 32, ("cpu", False): 8}

# Dynamo before torch 2.8 tells the code it traces that a symbolic size is an int (type() and
# isinstance both), so the small-batch rule put a guard rows <= 32 into the graph and
# torch.export refused a dynamic batch (seen on 2.4, 2.5 and 2.6; 2.8 and newer show the SymInt).
# There every compiled call leaves the choice to the crossover: the program does not depend on
# the batch size, at the price of the small-batch speed-up inside torch.compile.
_DYNAMO_HIDES_SYMBOLIC_SIZES = torch.torch_version.TorchVersion(torch.__version__) < (2, 8)


def _concrete(rows: object) -> bool:
    """Whether ``rows`` is a plain int, not a symbolic size of a trace (see above)."""
    if type(rows) is not int:
        return False
    return not (_DYNAMO_HIDES_SYMBOLIC_SIZES and torch.compiler.is_compiling())

_CROSSOVER_KEYS = ("cpu", "cpu-16bit", "cuda", "cuda-16bit")

# ------------------------------------------------------------------- the dense path's buffers
# On the CPU a fresh tensor of tens of MB is a fresh mmap: its first writes page-fault, one 4 KiB
# page at a time. On the CI machine a [4096, 4096] bfloat16 weight (32 MB) costs ~7 ms of faults,
# more than the GEMM that reads it (4 ms with AMX); the dense path made two such tensors per step
# (the rebuilt weight, and the weight gradient of F.linear's backward). So the dense path takes
# both from a pool of memory blocks (csrc/cpu/dense_pool.cpp): a block returns to the pool only
# when its storage is destroyed (no tensor, view, storage object or autograd saved variable left),
# so a block in use is never handed out again. The pool keeps at most PYFINETUNE_DENSE_POOL_MB
# (default 1024) of idle blocks; release_dense_buffers() frees them. CUDA tensors do not need it
# (the caching allocator reuses blocks without faults).


def _pool_limit_bytes() -> int:
    """The pool's idle-bytes limit from PYFINETUNE_DENSE_POOL_MB (ValueError when invalid), parsed by
    the C++ side, which the distillation kernel's kept gradients also use: one rule for both."""
    return int(torch.ops.pyfinetune._pool_env_limit_cpu())


def _pooled_empty(shape: Tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.ops.pyfinetune._pool_empty_cpu(list(shape), dtype, _pool_limit_bytes())


def release_dense_buffers() -> int:
    """Free the idle CPU memory blocks SparseLinear's dense path keeps for its rebuilt weights and
    weight gradients; returns the bytes freed. Blocks in use stay with their tensors (they return
    to the pool when those are freed). ``PYFINETUNE_DENSE_POOL_MB`` (default 1024, 0 to disable)
    bounds the idle blocks."""
    return int(torch.ops.pyfinetune._pool_release_cpu())


_transforms_active = ops._transforms_active


def _plain(*tensors: Optional[Tensor]) -> bool:
    """Only plain tensors (or Parameters), no dispatch mode and no transform (_transforms_active):
    the pooled path allocates real memory (which a FakeTensorMode or a tensor subclass must not see)
    and is an autograd.Function with a backward only; elsewhere the dense path is the composition."""
    if (ops._in_dispatch_mode() or _transforms_active()
            or torch._C._get_tracing_state() is not None):  # torch.jit.trace records ops, not a pool
        return False
    return all(t is None or type(t) in (Tensor, nn.Parameter) for t in tensors)


class _DenseLinear(torch.autograd.Function):
    """``F.linear(x, csr_to_dense(values), bias)`` with the rebuilt weight and the weight gradient
    in pooled CPU memory. Under ``create_graph`` the backward is the differentiable composition
    (csr_to_dense / csr_gather), so double backward works as on the plain path."""

    @staticmethod
    def forward(ctx, x, values, crow, col, bias, cols):
        w = _pooled_empty((crow.shape[0] - 1, cols), values.dtype)
        torch.ops.pyfinetune.csr_to_dense_into(w, values, crow, col)
        ctx.save_for_backward(x, w, values, crow, col)  # w stays busy until the backward is done
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        x, w, values, crow, col = ctx.saved_tensors
        need_x, need_v, _, _, need_b, _ = ctx.needs_input_grad
        g2 = ops._flatten_batch(grad, "SparseLinear")  # by the leading dims: M or K may be 0
        x2 = ops._flatten_batch(x, "SparseLinear")
        dx = dv = db = None
        if torch.is_grad_enabled():  # create_graph: a differentiable backward
            if need_x:
                dx = grad @ ops.csr_to_dense(values, crow, col, w.shape[1])
            if need_v:
                dv = ops.csr_gather(g2.t() @ x2, crow, col)
        else:
            if need_x:
                dx = grad @ w
            if need_v:
                dw = _pooled_empty(tuple(w.shape), w.dtype)
                torch.mm(g2.t(), x2, out=dw)
                dv = ops.csr_gather(dw, crow, col)
        if need_b and ctx.has_bias:
            db = g2.sum(0)
        return dx, dv, None, None, db, None


_KERNELS = ("auto", "sparse", "dense")
_PATTERN = ("crow_indices", "col_indices", "row_order", "ccol_indices", "row_indices", "csc_to_csr")
_NNZ_SIZED = ("values", "col_indices", "row_indices", "csc_to_csr")


def _amx_in_cpuinfo(path: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU flags in ``path`` (Linux's /proc/cpuinfo) include amx_bf16; False without
    the file (other systems: the float32 crossover applies to every dtype)."""
    try:
        with open(path) as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split(":", 1)[-1].split() for line in f)
    except OSError:
        return False


def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX tile units for bfloat16 (read once)."""
    global _AMX
    if _AMX is None:
        _AMX = _amx_in_cpuinfo()
    return _AMX


_AMX: Optional[bool] = None


def crossover_key(device: Union[str, torch.device], dtype: torch.dtype = torch.float32) -> str:
    """The :data:`CROSSOVER_SPARSITY` entry for a layer of ``dtype`` on ``device``: the device
    type, with ``-16bit`` for bfloat16 / float16 where the dense product has matrix units (CUDA,
    CPUs with AMX)."""
    kind = torch.device(device).type
    if dtype in (torch.bfloat16, torch.float16) and (kind == "cuda" or (kind == "cpu" and _cpu_has_amx())):
        return f"{kind}-16bit"
    return kind


CROSSOVER_ENV = "PYFINETUNE_SPARSE_CROSSOVER"
_env_error: Optional[ValueError] = None
_env_entries: Dict[str, float] = {}  # what the variable set (pyfinetune info shows it)


def parse_crossover_setting(text: str) -> Dict[str, float]:
    """``"cpu=0.37,cuda-16bit=0.99"`` -> ``{"cpu": 0.37, "cuda-16bit": 0.99}``: entries of
    :data:`CROSSOVER_SPARSITY` (keys among its four), each a number >= 0 (above 1: never sparse).
    ValueError naming :data:`CROSSOVER_ENV` and the entry otherwise."""
    out: Dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in _CROSSOVER_KEYS:
            raise ValueError(f"{CROSSOVER_ENV}: each entry must be KEY=SPARSITY with KEY one of {list(_CROSSOVER_KEYS)}, "
                             f"got {item.strip()!r} (e.g. {CROSSOVER_ENV}=cpu=0.37,cuda=0.9)")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not (0.0 <= number < float("inf")):
            raise ValueError(f"{CROSSOVER_ENV}: the sparsity of {key!r} must be a number >= 0 (above 1: never sparse), "
                             f"got {value!r}")
        out[key] = number
    return out


def _apply_crossover_env() -> Dict[str, float]:
    """Apply PYFINETUNE_SPARSE_CROSSOVER to CROSSOVER_SPARSITY (at import: values set in code
    afterwards win, and no thread races it); returns the entries applied. A malformed value is
    kept as an error that every kernel choice of kernel="auto" raises (``_check_crossover_env``),
    rather than failing ``import pyfinetune``."""
    global _env_error, _env_entries
    _env_error, _env_entries = None, {}
    try:
        entries = parse_crossover_setting(os.environ.get(CROSSOVER_ENV, ""))
    except ValueError as e:
        _env_error = e
        return {}
    CROSSOVER_SPARSITY.update(entries)
    _env_entries = entries
    return entries


def _check_crossover_env() -> None:
    if _env_error is not None:
        raise ValueError(str(_env_error))


def crossover_sparsity(device: Union[str, torch.device], dtype: torch.dtype = torch.float32) -> float:
    """The sparsity from which ``kernel="auto"`` picks the sparse kernel for a layer of ``dtype`` on
    ``device`` (above 1: never, for devices without a sparse kernel). Measure it on your machine
    with :func:`pyfinetune.prune.calibrate_crossover` (or ``pyfinetune calibrate``); set it with
    :data:`CROSSOVER_SPARSITY` or the environment variable ``PYFINETUNE_SPARSE_CROSSOVER``
    (``cpu=0.37,cuda=0.9``, read when pyfinetune's sparse layer is imported)."""
    _check_crossover_env()
    return CROSSOVER_SPARSITY.get(crossover_key(device, dtype), 2.0)


def _check_kernel(kernel: str) -> str:
    if kernel not in _KERNELS:
        raise ValueError(f"SparseLinear: kernel must be one of {_KERNELS}, got {kernel!r}")
    return kernel


def _use_tensor_cores(x: Tensor, values: Tensor) -> bool:
    """Whether the sparse forward runs tiled_csr_linear (CUDA tensor cores) instead of csr_linear:
    opt-in with PYFINETUNE_CSR_CUDA_KERNEL=tensor_cores (correct on its first GPU run, slower than
    cuBLAS dense there: see the README's GPU results); float16 / bfloat16 CUDA layers on plain
    tensors, not under torch.compile."""
    # is_compiling first: Dynamo before torch 2.5 cannot trace os.environ.get of an unset variable.
    return (not torch.compiler.is_compiling() and os.environ.get("PYFINETUNE_CSR_CUDA_KERNEL") == "tensor_cores"
            and values.is_cuda and values.dtype in (torch.float16, torch.bfloat16) and x.dtype == values.dtype
            and _plain(x, values))


def _version_of(t: Tensor) -> Optional[int]:
    """The version counter, or None for an inference tensor (which has none)."""
    return None if t.is_inference() else t._version


def _state_of(tensors) -> tuple:
    return tuple((t.detach(), t.data_ptr(), _version_of(t)) for t in tensors)


def _same_state(state: tuple, tensors) -> bool:
    """Whether the tensors are those of `state`, unchanged; never for inference tensors (their
    writes cannot be seen)."""
    return len(state) == len(tensors) and all(
        version is not None and t.data_ptr() == ptr and _version_of(t) == version
        for (_, ptr, version), t in zip(state, tensors))


class SparseLinear(nn.Module):
    """A linear layer ``y = x @ W^T + b`` whose weight W [out_features, in_features] is pruned and
    stored as its kept values only, in compressed rows (plus the compressed-column view the
    backward needs).

    State (all in ``state_dict``):

    * ``values``: ``nn.Parameter`` [nnz], the kept weights in row-major order: a plain dense
      parameter, so any optimizer (``torch.optim.AdamW``, ``pyfinetune.optim.AdamW``) trains it and
      pruned weights cannot become nonzero;
    * ``crow_indices`` [out + 1], ``col_indices`` [nnz], ``row_order`` [out], ``ccol_indices``
      [in + 1], ``row_indices`` [nnz], ``csc_to_csr`` [nnz]: int32 buffers, see
      :class:`pyfinetune.ops.CompressedPattern`;
    * ``bias``: ``nn.Parameter`` [out] or None.

    Memory: besides its value, each kept weight costs 12 bytes of int32 indices (compressed rows
    and columns), so the layer is smaller than its dense weight from 75% sparsity in float32 and
    from ~86% in bfloat16 / float16 (at 50% float32 it is 2x the dense weight).

    Build one with :meth:`from_dense`; ``SparseLinear(in_features, out_features)`` is an empty
    (fully pruned) layer, e.g. to :meth:`load_state_dict` a saved one into, whatever its nnz.

    Kernels: ``kernel="sparse"`` runs ``csr_linear`` (work proportional to nnz); ``"dense"`` runs
    the dense masked product on the weight rebuilt from the values at each call (work
    proportional to in * out: the dense GEMM plus the rebuild, one write of the weight, which on
    a CPU with AMX costs about as much as a bfloat16 GEMM; for inference below the crossover,
    ``pyfinetune.prune.densify(model, keep_masks=False)`` gives plain ``nn.Linear`` layers);
    ``"auto"`` (default) picks sparse from the device's
    :data:`CROSSOVER_SPARSITY` on. On CPU that is 0.58, measured with ``benchmarks/bench_prune.py``
    on the 2-core Xeon (AVX-512, torch 2.14.1, two threads) of ``benchmarks/results/prune-cpu-20261126-1214``:
    x [256, 4096], weight [4096, 4096] float32, median times of a training step (forward, backward,
    AdamW on the values) and of the forward alone:

    ========  =========================  ==========================
    sparsity  step: sparse / dense path  forward: sparse / dense path
    ========  =========================  ==========================
    40%       141 / 106 ms               30.2 / 34.6 ms
    50%       125 / 103 ms               28.5 / 35.0 ms
    55%       108 / 98 ms                25.2 / 34.6 ms
    60%       92 / 94 ms                 23.4 / 34.6 ms
    ========  =========================  ==========================

    so the sparse kernel wins the step from ~59% on (the ratio interpolated between 55% and 60%)
    and the forward at every measured sparsity (``kernel="sparse"`` for inference). On the CPU
    the dense path takes the rebuilt weight and its gradient from a pool of memory blocks kept
    between calls (a fresh tensor of tens of MB costs page faults): up to
    ``PYFINETUNE_DENSE_POOL_MB`` (default 1024) of idle blocks, freed by
    :func:`pyfinetune.prune.release_dense_buffers`. The crossover moves with the shapes (a small batch
    favours the sparse kernel: on the CPU, batches of up to 32 rows run kernels of their own, and at
    one row of x and at 16 the sparse training step beat the dense path from 50% and the forward
    at every measured sparsity, ``benchmarks/results/prune-n1-cpu-20261127-0125``, ``-n16-...-0126``;
    so ``"auto"`` runs the sparse kernel at any sparsity for CPU inference calls, no autograd, of
    up to 32 rows of x, 8 for 16-bit layers: :data:`SMALL_BATCH_ROWS`)
    and the dtype: bfloat16 and float16 layers on a CPU with AMX (whose
    16-bit GEMMs are ~5x faster than float32 ones) switch at 0.92, and on CUDA (tensor cores) at 0.99
    (see :data:`CROSSOVER_SPARSITY`); set ``kernel`` to override it (``"sparse"`` for inference
    below it), or measure this machine's with :func:`pyfinetune.prune.calibrate_crossover` (a
    2-core AMD EPYC, whose float32 GEMM is half the Xeon's speed, crossed at ~37%).

    On CUDA, float16 and bfloat16 layers can run the sparse forward on the tensor cores
    (:func:`pyfinetune.ops.tiled_csr_linear`: the kept weights regrouped in 128 x 64 tiles, each
    expanded in shared memory and multiplied densely; the input and values' gradients from the
    same tiles) with
    ``PYFINETUNE_CSR_CUDA_KERNEL=tensor_cores``: experimental and opt-in (correct on an H200, but
    slower there than cuBLAS dense and than the dense path). The
    tile layout is built at the first such call and kept until the pattern changes (not in
    ``state_dict``, not pickled, dropped by ``.to()``).

    Args:
        in_features, out_features: the weight's shape is [out_features, in_features].
        bias: whether the layer has a bias (zero-initialized here; from_dense copies one).
        kernel: "auto", "sparse" or "dense".
        device, dtype: of the parameters (float32, bfloat16, float16 or float64).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, kernel: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n + 1 > 2**31 - 1:
                raise ValueError(f"SparseLinear: {name} must be an int in [0, 2^31 - 2], got {n!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = _check_kernel(kernel)
        factory = dict(device=device, dtype=dtype)
        self.values = nn.Parameter(torch.empty(0, **factory))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        i32 = dict(device=device, dtype=torch.int32)
        empty = ops.CompressedPattern(
            crow_indices=torch.zeros(out_features + 1, **i32), col_indices=torch.empty(0, **i32),
            row_order=torch.arange(out_features, **i32), ccol_indices=torch.zeros(in_features + 1, **i32),
            row_indices=torch.empty(0, **i32), csc_to_csr=torch.empty(0, **i32))
        for name in _PATTERN:
            self.register_buffer(name, getattr(empty, name))

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None, *,
                   kernel: str = "auto") -> "SparseLinear":
        """A SparseLinear keeping ``weight[mask]``.

        Args:
            weight: [out, in] float tensor (its dtype and device become the layer's).
            mask: [out, in] bool, True = kept.
            bias: None or [out], weight's dtype and device.
        """
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"SparseLinear.from_dense: weight must be a 2-D float tensor [out, in], got "
                             f"{_describe(weight)}")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"SparseLinear.from_dense: mask must be a bool tensor, got {_describe(mask)}")
        if mask.shape != weight.shape:
            raise ValueError(f"SparseLinear.from_dense: mask must have the shape of weight {tuple(weight.shape)}, "
                             f"got {tuple(mask.shape)}")
        if mask.device != weight.device:
            raise ValueError(f"SparseLinear.from_dense: mask must be on weight's device {weight.device}, got "
                             f"{mask.device}")
        out_features, in_features = weight.shape
        if bias is not None:
            if not isinstance(bias, Tensor) or bias.shape != (out_features,):
                raise ValueError(f"SparseLinear.from_dense: bias must be None or [out] = [{out_features}], got "
                                 f"{_describe(bias)}")
            if bias.dtype != weight.dtype or bias.device != weight.device:
                raise ValueError(f"SparseLinear.from_dense: bias must have weight's dtype {weight.dtype} and device "
                                 f"{weight.device}, got {bias.dtype} on {bias.device}")
        layer = cls(in_features, out_features, bias=bias is not None, kernel=kernel, device=weight.device,
                    dtype=weight.dtype)
        layer._set_pattern(ops.compressed_pattern(mask))
        with torch.no_grad():
            layer.values.data = weight.detach()[mask].clone()
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    # ------------------------------------------------------------------------------- properties
    @property
    def nnz(self) -> int:
        """Number of kept weights."""
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's entries that are pruned (0 for an empty shape)."""
        total = self.in_features * self.out_features
        return 1.0 - self.nnz / total if total else 0.0

    def pattern(self) -> ops.CompressedPattern:
        """The int32 index tensors of the kept positions."""
        buffers = self._buffers  # not getattr: nn.Module.__getattr__ costs ~0.5 us a name, per forward
        return ops.CompressedPattern(*(buffers[name] for name in _PATTERN))

    def _set_pattern(self, pattern: ops.CompressedPattern) -> None:
        for name in _PATTERN:
            setattr(self, name, getattr(pattern, name))

    def to_dense(self) -> Tensor:
        """The dense weight [out, in]: the kept values, zeros at pruned positions. Differentiable
        with respect to ``values``."""
        # One pass writing each element once (ops.csr_to_dense), its gradient gathered at the kept
        # positions (ops.csr_gather): on the CPU at 50% of 4096 x 4096, float32, to_dense took
        # 21 ms as torch.zeros + index_copy_ (the fastest of torch's scatters; a fresh 64 MB
        # page-faulted per 4 KiB) and the gather 13 ms as index_select. Under torch.func transforms
        # and forward-mode AD, which our ops' autograd rules do not support, ops.csr_to_dense is
        # composed of plain torch ops.
        return ops.csr_to_dense(self.values, self.crow_indices, self.col_indices, self.in_features)

    @property
    def weight(self) -> Tensor:
        """The dense weight [out, in] (:meth:`to_dense`), for parents that read ``layer.weight``
        instead of calling the layer (torchvision's Swin attention: ``F.linear(x, qkv.weight)``):
        they compute with the kept values, at dense speed; the gradient reaches ``values``. Not a
        parameter and not in ``state_dict``; a fresh tensor at each access."""
        return self.to_dense()

    def dense_mask(self) -> Tensor:
        """The bool mask [out, in] of the kept positions."""
        ones = torch.ones(self.col_indices.numel(), dtype=torch.float16, device=self.col_indices.device)
        return ops.csr_to_dense(ones, self.crow_indices, self.col_indices, self.in_features) != 0

    def kernel_for(self, device: Union[str, torch.device, None] = None, *, rows: Optional[int] = None,
                   needs_grad: bool = True, dtype: Optional[torch.dtype] = None) -> str:
        """The kernel forward runs on ``device`` (default: the values' device): "sparse" or "dense".

        ``rows`` (the rows of x, its leading dimensions multiplied), ``needs_grad`` (whether
        autograd will differentiate the call) and ``dtype`` (the dtype the product computes in,
        autocast's; default the values') describe a call; by default a training call with many
        rows, which the crossover decides. A CPU inference call with few rows runs the sparse
        kernel at any sparsity (see :data:`SMALL_BATCH_ROWS`); a symbolic row count (while
        ``torch.export`` or ``torch.compile`` traces with dynamic shapes; before torch 2.8, any
        compiled call) or a ``torch.jit.trace`` is left to the crossover, so that the traced
        program does not depend on the batch size.
        """
        if self.kernel != "auto":
            return self.kernel
        _check_crossover_env()
        device = self.values.device if device is None else device
        dtype = self.values.dtype if dtype is None else dtype
        limit = SMALL_BATCH_ROWS.get((torch.device(device).type, dtype.itemsize >= 4))
        if (limit is not None and _concrete(rows) and not needs_grad and rows <= limit
                and torch._C._get_tracing_state() is None):
            return "sparse"
        # Half a weight of slack: a layer pruned "to 90%" keeps round(0.1 * n) weights (magnitude_prune),
        # which can be a fraction of a weight more than 10% and must not fall back to the dense path.
        total = self.in_features * self.out_features
        kept_limit = (1.0 - crossover_sparsity(device, dtype)) * total + 0.5  # the computing dtype (autocast's)
        return "sparse" if total and self.nnz <= kept_limit else "dense"

    # ---------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """x [..., in_features] -> [..., out_features], in x's dtype (values' dtype)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"SparseLinear: x must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: x must be [..., in_features] with in_features = {self.in_features}, got "
                             f"shape {tuple(x.shape)}")
        autocast = ops._autocast_enabled(x.device.type)
        if not autocast and x.dtype != self.values.dtype:
            # Either kernel would refuse it too, in the words of an internal op (csr_linear) or of
            # torch's matmul; this names the layer and the ways out.
            raise ValueError(f"SparseLinear: x must have the layer's dtype {self.values.dtype} (its values), got "
                             f"{x.dtype}; cast x or the layer (layer.to(dtype)), or run under torch.autocast")
        kernel = self.kernel
        if kernel == "auto":  # the call's rows, grad need and compute dtype decide (kernel_for)
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.values.requires_grad
                                                      or (self.bias is not None and self.bias.requires_grad))
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            dtype = (torch.get_autocast_dtype(x.device.type) if autocast and self.values.dtype != torch.float64
                     else self.values.dtype)
            kernel = self.kernel_for(rows=rows, needs_grad=needs_grad, dtype=dtype)
        if kernel == "sparse":
            values, bias = self.values, self.bias
            if autocast:
                # csr_linear has no autocast rule and wants one dtype: cast as autocast casts
                # F.linear's operands (floating, not float64), so a float32 layer fed the bf16
                # output of an autocast layer computes in bf16 like the dense path does.
                dtype = torch.get_autocast_dtype(x.device.type)
                x, values, bias = (t if t is None or not t.is_floating_point() or t.dtype == torch.float64
                                   else t.to(dtype) for t in (x, values, bias))
            if _use_tensor_cores(x, values) and not _transforms_active():
                return self._tiled_forward(x, values, bias)
            return ops.csr_linear(x, values, *self.pattern(), bias=bias)
        # The rebuilt weight already holds exact zeros at the pruned positions, so the plain dense
        # product is the masked one: masked_matmul would add a mask and a masked copy of [out, in]
        # (1.5x the time of this path on CPU) to reach the same numbers; and the gradient of the
        # pruned positions is dropped by to_dense's backward, which gathers the kept ones. On the
        # CPU (plain tensors, no autocast, not compiling) the weight and its gradient live in pooled
        # memory (_pooled_empty); elsewhere the same product from a fresh weight.
        if (x.device.type == "cpu" and self.values.device.type == "cpu" and not ops._autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and x.dtype == self.values.dtype
                and _plain(x, self.values, self.bias, self.crow_indices, self.col_indices)):
            return _DenseLinear.apply(x, self.values, self.crow_indices, self.col_indices, self.bias,
                                      self.in_features)
        return torch.nn.functional.linear(x, self.to_dense(), self.bias)

    def _tiled_forward(self, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        # The tile layout of the pattern is derived once per pattern (a sort of the nonzeros) and
        # kept until the pattern tensors change: the cache holds the tensors it was built from (so
        # that their memory cannot be reused by a new tensor at the same address) and compares
        # addresses and version counters. It is built outside inference mode, so that a layer first
        # called under torch.inference_mode() (a validation pass) can train afterwards. The values
        # in tile order are gathered at every call (one gather of nnz elements): a cache of them
        # would go stale where a write does not move the version counter (torch's fused optimizers,
        # writes through .data).
        pattern = self.pattern()
        key = (pattern.crow_indices, pattern.col_indices)
        cache = self.__dict__.get("_tiled_cache")
        if cache is None or not _same_state(cache[0], key):
            with torch.inference_mode(False), torch.no_grad():
                tiled = ops.tiled_pattern(pattern.crow_indices, pattern.col_indices, self.in_features)
            cache = (_state_of(key), tiled)
            self.__dict__["_tiled_cache"] = cache
        return ops.tiled_csr_linear(x, values, pattern, cache[1], bias)

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() ...: drop the tile layout (rebuilt at the next tiled call) rather
        # than keep the old tensors alive on their device.
        self.__dict__.pop("_tiled_cache", None)
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_tiled_cache", None)  # derived data: not pickled (torch.save(module), deepcopy)
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.1%}, bias={self.bias is not None}, kernel={self.kernel!r}")

    # ------------------------------------------------------------------------------- state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A saved layer may keep a different number of weights: resize the nnz-sized tensors
        # (in place for values, so optimizers holding it keep the same Parameter), after checking
        # that the saved pattern is for a weight of this layer's shape.
        crow = state_dict.get(prefix + "crow_indices")
        ccol = state_dict.get(prefix + "ccol_indices")
        if crow is not None and ccol is not None:
            shape = (crow.numel() - 1, ccol.numel() - 1)
            if shape != (self.out_features, self.in_features):
                error_msgs.append(
                    f"SparseLinear: the saved pattern is for a weight [out, in] = {list(shape)}, this layer's is "
                    f"[{self.out_features}, {self.in_features}]")
                return
        sizes = {name: state_dict[prefix + name].numel() for name in _NNZ_SIZED if prefix + name in state_dict}
        if len(set(sizes.values())) > 1:
            error_msgs.append(f"SparseLinear: the saved values and index tensors disagree on nnz: {sizes}")
            return
        if not self._check_saved_pattern(state_dict, prefix, sizes, error_msgs):
            return  # before anything changes: a refused load leaves the layer as it was
        for name, n in sizes.items():
            current = getattr(self, name)
            if current.numel() != n:
                resized = torch.empty(n, dtype=current.dtype, device=current.device)
                if name == "values":
                    self.values.data = resized
                else:
                    setattr(self, name, resized)
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) == n_errors and (prefix + "crow_indices" in state_dict or prefix + "col_indices" in state_dict):
            # The column-major pattern (ccol_indices, row_indices, csc_to_csr: the input gradient's
            # kernel for more than 32 rows) and row_order are derived from the row pattern: rebuilt
            # from the loaded one rather than trusted, so that a checkpoint whose copies disagree (a
            # hand-edited one) cannot give the forward one pattern and the backward another.
            with torch.no_grad():
                derived = ops.pattern_from_csr(self.crow_indices, self.col_indices, self.in_features)
                for name in ("row_order", "ccol_indices", "row_indices", "csc_to_csr"):
                    setattr(self, name, getattr(derived, name))  # new tensors: sized by the loaded pattern

    def _check_saved_pattern(self, state_dict, prefix, sizes, error_msgs) -> bool:
        """Whether the row pattern the load leaves (the saved crow_indices / col_indices, else this
        layer's) is a valid pattern of this layer's weight with as many entries as the values; else
        an entry in ``error_msgs``. Checked before anything is copied: a load that fails half-way
        would leave the layer with a new row pattern and the column-major copies of the old one, on
        which the forward and the input gradient would read two different weights."""
        crow = state_dict.get(prefix + "crow_indices", self.crow_indices)
        col = state_dict.get(prefix + "col_indices", self.col_indices)
        if not (isinstance(crow, Tensor) and isinstance(col, Tensor)) or crow.dim() != 1 or col.dim() != 1:
            return True  # torch's own checks (size mismatch, not a tensor) report it
        nnz = sizes.get("values", self.values.numel())
        if col.numel() != nnz:
            error_msgs.append(f"SparseLinear: loading would leave {nnz} values and {col.numel()} col_indices: load "
                              "values, crow_indices and col_indices together")
            return False
        if (crow is self.crow_indices and col is self.col_indices) or crow.numel() != self.out_features + 1:
            return True  # the pattern is not loaded, or torch's size check names the mismatch
        try:
            with torch.no_grad():
                ops.pattern_from_csr(crow.to(self.crow_indices.device, torch.int32),
                                     col.to(self.col_indices.device, torch.int32), self.in_features)
        except (ValueError, RuntimeError) as e:
            error_msgs.append(f"SparseLinear: the saved pattern is not valid: {e}")
            return False
        return True


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


_apply_crossover_env()  # after CROSSOVER_SPARSITY, before any layer: see _apply_crossover_env
