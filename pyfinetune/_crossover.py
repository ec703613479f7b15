"""Measuring SparseLinear's crossover on this machine (pyfinetune.prune.calibrate_crossover).

The sparsity from which ``SparseLinear(kernel="auto")`` runs the sparse kernel instead of the
dense path is a property of the machine: it is where the sparse kernel's time, which falls with
the kept weights, meets the dense GEMM's, which does not. The defaults of
:data:`pyfinetune._sparse_linear.CROSSOVER_SPARSITY` were measured on the CI machines and an H100;
another CPU can differ a lot (the same benchmark crossed at ~59% on a 2-core Xeon and below 50% on a
2-core AMD EPYC, whose float32 GEMM is half as fast). This times both kernels at the user's
shape, here, and sets the entry.
"""

from __future__ import annotations

import contextlib
import gc
import numbers
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import _sparse_linear
from ._sparse_linear import SparseLinear

DEFAULT_SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
_MODES = ("train", "inference")
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_MAX_FEATURES = 2**31 - 2  # SparseLinear's in_features / out_features (int32 indices)


@dataclass
class CrossoverCalibration:
    """What :func:`calibrate_crossover` measured.

    Attributes:
        key: the :data:`CROSSOVER_SPARSITY` entry it concerns (``"cpu"``, ``"cpu-16bit"``,
            ``"cuda"``, ``"cuda-16bit"``).
        crossover: the sparsity from which the sparse kernel was faster at every higher measured
            sparsity, interpolated linearly between the two measured sparsities around the time
            ratio 1; the lowest measured sparsity when it was faster at all of them; 2.0 (never)
            when it was slower at the highest.
        previous: the entry's value before (whether or not it was replaced).
        applied: whether the entry now holds ``crossover``.
        points: ``(sparsity, dense path ms, sparse ms)`` per measured sparsity (medians).
        mode, shape, dtype, device: what was timed (``shape`` = (batch, in_features, out_features)).
        other_cpu_share: on a Linux CPU, the share of the machine's CPU time other processes
            (and the hypervisor) took during the measurement (None elsewhere); above 5% the
            timings are suspect and a warning said so.
    """

    key: str
    crossover: float
    previous: float
    applied: bool
    points: List[Tuple[float, float, float]] = field(default_factory=list)
    mode: str = "train"
    shape: Tuple[int, int, int] = (0, 0, 0)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    other_cpu_share: Optional[float] = None

    def __str__(self) -> str:
        what = "forward + backward" if self.mode == "train" else "forward"
        b, k, m = self.shape
        lines = [f"SparseLinear crossover on {self.device} ({self.key}), {what}, x [{b}, {k}], weight [{m}, {k}] "
                 f"{str(self.dtype).replace('torch.', '')}:",
                 "  sparsity  dense path ms  sparse ms  dense / sparse"]
        for s, d, sp in self.points:
            lines.append(f"  {s:8.0%}  {d:13.3f}  {sp:9.3f}  {d / sp:14.2f}")
        value = "never (sparse slower at every measured sparsity)" if self.crossover > 1 else f"{self.crossover:.3f}"
        lines.append(f"  crossover: {value}; previous {self.previous:.3f}"
                     + ("; applied" if self.applied else "; not applied"))
        if self.other_cpu_share is not None:
            lines.append(f"  other processes took {self.other_cpu_share:.1%} of the CPUs meanwhile")
        return "\n".join(lines)


def _crossover_of(points: Sequence[Tuple[float, float, float]]) -> float:
    """The crossover of ``(sparsity, dense ms, sparse ms)`` points (see CrossoverCalibration)."""
    from .benchmarks import common

    measured, interpolated = common.ratio_crossover([(s, d / sp) for s, d, sp in points])
    if measured is None:
        return 2.0
    return measured if interpolated is None else round(interpolated, 4)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"calibrate_crossover: {name} must be a positive int, got {value!r}")
    return int(value)


def calibrate_crossover(device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.float32, *,
                        batch: int = 256, in_features: int = 4096, out_features: int = 4096, mode: str = "train",
                        sparsities: Sequence[float] = DEFAULT_SPARSITIES, reps: int = 10, warmup: int = 2,
                        apply: bool = True, seed: int = 0) -> CrossoverCalibration:
    """Measure on this machine the sparsity from which ``SparseLinear(kernel="auto")`` should run
    the sparse kernel, and (``apply``) set it in :data:`pyfinetune.prune.CROSSOVER_SPARSITY`.

    At each of ``sparsities`` a random weight [out_features, in_features] pruned at random is run
    by both kernels (``kernel="dense"``: the dense product on the rebuilt weight; ``"sparse"``:
    ``csr_linear``) on x [batch, in_features], interleaved, ``reps`` rounds after ``warmup``; the
    optimizer step is left out (it updates the same kept values either way). Takes seconds to a
    minute at the default shape on a CPU; pass the shape of your model's large layers (the
    crossover moves with the shape, and small batches favour the sparse kernel).

    The entry set is the one ``auto`` reads for ``dtype`` on ``device``: ``"cpu"`` / ``"cuda"``
    for float32 and float64 layers (and 16-bit layers on a CPU without AMX), ``"cpu-16bit"`` /
    ``"cuda-16bit"`` for bfloat16 / float16 where the dense product has matrix units. It holds for
    the process; to keep it, set ``pyfinetune.prune.CROSSOVER_SPARSITY[key]`` at start-up. A
    16-bit measurement on a CPU without AMX concerns the entry float32 layers read too (a warning
    says so when it is applied). On the CPU, the share of CPU time other processes took meanwhile
    is measured; above 5% a warning says the result is suspect (it is applied all the same when
    ``apply``).

    Args:
        device: where to measure (default: CUDA when available, else the CPU).
        dtype: of x and the weight: float32, float64, bfloat16 or float16.
        batch, in_features, out_features: the shape timed (rows of x, the layer's in / out).
        mode: ``"train"`` (forward + backward: gradients of x and of the kept values) or
            ``"inference"`` (forward, no autograd).
        sparsities: fractions in [0, 1) to measure (at least two).
        reps, warmup: timed rounds (>= 10) and untimed ones per sparsity.
        apply: set the entry to the measured crossover.
        seed: of the random weights, masks and inputs.

    Returns:
        a :class:`CrossoverCalibration` (``print`` it for a table).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype not in _DTYPES:
        raise ValueError(f"calibrate_crossover: dtype must be one of {[str(d) for d in _DTYPES]}, got {dtype!r}")
    if mode not in _MODES:
        raise ValueError(f'calibrate_crossover: mode must be "train" or "inference", got {mode!r}')
    batch, in_features, out_features = (_positive_int(n, v) for n, v in (
        ("batch", batch), ("in_features", in_features), ("out_features", out_features)))
    for name, n in (("in_features", in_features), ("out_features", out_features)):
        if n > _MAX_FEATURES:
            raise ValueError(f"calibrate_crossover: {name} must be at most 2^31 - 2 (SparseLinear's limit), got {n}")
    # x, the gradient and the weight are drawn in float32, then cast: past 2^63 bytes torch refused the
    # shape with a TypeError or a RuntimeError (storage size overflow) instead of a failed allocation.
    largest = max(batch * in_features, batch * out_features, out_features * in_features)
    if largest * max(4, dtype.itemsize) >= 2**63:
        raise ValueError(f"calibrate_crossover: x [batch, in_features], the gradient [batch, out_features] and the "
                         f"weight [out_features, in_features] must each fit in 2^63 bytes, got batch {batch}, "
                         f"in_features {in_features}, out_features {out_features}")
    reps = _positive_int("reps", reps)
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
        raise ValueError(f"calibrate_crossover: warmup must be an int >= 0, got {warmup!r}")
    from .benchmarks import common

    if reps < common.MIN_REPS:
        raise ValueError(f"calibrate_crossover: reps must be >= {common.MIN_REPS}, got {reps}")
    sparsities = sorted({float(s) for s in sparsities}) if not isinstance(sparsities, (str, bytes)) else []
    if len(sparsities) < 2 or not all(0.0 <= s < 1.0 for s in sparsities):
        raise ValueError(f"calibrate_crossover: sparsities must hold at least two fractions in [0, 1), got {sparsities}")
    import pyfinetune

    if device.type not in pyfinetune.kernel_devices().get("csr_linear", ()):
        raise ValueError(f"calibrate_crossover: this build has no {device.type} kernel for csr_linear (see "
                         "`pyfinetune info`)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("calibrate_crossover: device cuda, but torch sees no CUDA device")
    key = _sparse_linear.crossover_key(device, dtype)
    previous = _sparse_linear.crossover_sparsity(device, dtype)  # after PYFINETUNE_SPARSE_CROSSOVER

    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, in_features, generator=gen).to(device, dtype)
    grad = torch.randn(batch, out_features, generator=gen).to(device, dtype)
    points = []
    # On the CPU, how much other processes took meanwhile (a warning below when too much).
    with common.CpuContention() if device.type == "cpu" else contextlib.nullcontext() as load:
        for s in sparsities:
            w = (torch.randn(out_features, in_features, generator=gen) * in_features ** -0.5).to(device, dtype)
            mask = (torch.rand(out_features, in_features, generator=gen) >= s).to(device)
            contenders = []
            for kernel in ("dense", "sparse"):
                layer = SparseLinear.from_dense(w, mask, kernel=kernel)
                if mode == "train":
                    x = x0.clone().requires_grad_(True)

                    def run(layer=layer, x=x):
                        x.grad = None
                        layer.values.grad = None
                        layer(x).backward(grad)
                else:
                    def run(layer=layer):
                        with torch.no_grad():
                            layer(x0)
                contenders.append(common.Contender(kernel, run))
            with torch.enable_grad():
                # The first sparsity also warms the process (allocator, pooled buffers, thread pool):
                # measured cold, the dense path took 1.5x its later time there.
                t = common.time_interleaved(contenders, reps=reps, device=device,
                                            warmup=warmup + (3 if not points else 0))
            points.append((s, t["dense"].median, t["sparse"].median))
            del contenders, w, mask
            gc.collect()
    other = None
    if load is not None and load.result.get("other_share") is not None:
        other = load.result["other_share"] + (load.result.get("steal_share") or 0.0)
        if common.is_contended(load.result):
            warnings.warn(f"calibrate_crossover: other processes took {other:.1%} of the CPUs during the "
                          "measurement; the crossover may be off (measure on a quiet machine)", stacklevel=2)
    crossover = _crossover_of(points)
    if apply:
        if dtype in (torch.bfloat16, torch.float16) and key == device.type:
            warnings.warn(f"calibrate_crossover: on this {device.type} {str(dtype).replace('torch.', '')} layers read "
                          f"the same entry {key!r} as float32 layers (the dense product has no 16-bit matrix units "
                          "here): the value measured in 16 bits now applies to float32 layers too", stacklevel=2)
        _sparse_linear.CROSSOVER_SPARSITY[key] = crossover
    return CrossoverCalibration(key=key, crossover=crossover, previous=previous, applied=apply, points=points,
                                mode=mode, shape=(batch, in_features, out_features), dtype=dtype, device=str(device),
                                other_cpu_share=other)
