"""SemiStructuredLinear: a linear layer with a 2:4-sparse weight on NVIDIA sparse tensor cores.

The 2:4 pattern (at most 2 kept weights in every group of 4 consecutive input weights) is what
the sparse tensor cores of Ampere (sm80) and later GPUs multiply at up to twice the dense rate.
This layer stores its weight through PyTorch's semi-structured sparse tensors
(``torch.sparse.to_sparse_semi_structured``: the kept half of the values plus the 2-bit metadata)
and runs ``F.linear`` on it, which PyTorch dispatches to cuSPARSELt / CUTLASS.

Scope, as PyTorch supports it: CUDA with compute capability >= 8.0, float16 or bfloat16 weights,
shapes that the sparse kernels accept (both dimensions multiples of 64 for 16-bit types, checked
by PyTorch when converting). The sparse weight is frozen: gradients flow to the input (and the
bias), so the layer trains the layers around it and serves inference; fine-tune pruned weights
with a masked layer (``pyfinetune.prune.magnitude_prune``) or :class:`SparseLinear` and convert
at the end with ``pyfinetune.prune.sparsify(model, layout="2:4")``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SemiStructuredLinear", "check_two_four"]

_DTYPES = (torch.float16, torch.bfloat16)
# cuSPARSELt's algorithm ids are 0 .. max - 1 for a given product (max depends on the GPU and the
# shapes, a handful on an H100); an id past the last is refused, which ends the search.
_MAX_ALG_IDS = 32


def _pick_fastest(set_alg: Callable[[int], None], run: Callable[[], Any], time_ms: Callable[[Callable[[], Any]], float],
                  max_ids: int = _MAX_ALG_IDS) -> Dict[str, Any]:
    """Times ``run`` under ``set_alg(i)`` for i = 0, 1, ... until an id is refused (RuntimeError or
    ValueError) or ``max_ids``, and leaves the fastest id set. Id 0 (the default) must run: its
    error propagates. Returns {"alg_id": fastest, "ms": {id: median ms}}."""
    ms: Dict[int, float] = {}
    for alg in range(max_ids):
        set_alg(alg)
        try:
            ms[alg] = time_ms(run)
        except (RuntimeError, ValueError):
            if alg == 0:
                raise
            break
    best = min(ms, key=ms.__getitem__)
    set_alg(best)
    return {"alg_id": best, "ms": ms}


def _cuda_time_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> float:
    """The median of ``reps`` CUDA-event timings of fn() after ``warmup`` calls (the benchmarks'
    timer, one call per sample)."""
    from .benchmarks import common

    for _ in range(warmup):
        fn()
    return common.percentile([common._time_one(fn, device, 1) for _ in range(reps)], 50)


def check_two_four(mask: Tensor, name: str = "mask") -> None:
    """Raise ValueError unless ``mask`` [out, in] (bool) keeps at most 2 of every 4 consecutive
    entries along ``in`` (the 2:4 pattern), with ``in`` a multiple of 4."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"SemiStructuredLinear: {name} must be a 2-D bool tensor [out, in], got {got}")
    if mask.shape[1] % 4 != 0:
        raise ValueError(f"SemiStructuredLinear: {name} must have in_features divisible by 4 for 2:4, got {mask.shape[1]}")
    kept = mask.reshape(mask.shape[0], -1, 4).sum(-1)
    if bool((kept > 2).any()):
        row, group = (kept > 2).nonzero()[0].tolist()
        raise ValueError(
            f"SemiStructuredLinear: {name} is not 2:4: row {row}, inputs {4 * group}..{4 * group + 3} keep "
            f"{int(kept[row, group])} of 4 (at most 2); prune to 50% with pattern=\"2:4\" "
            f"(magnitude_prune(model, 0.5, pattern=\"2:4\"): at a lower sparsity some groups keep 3 or 4)"
        )


class SemiStructuredLinear(nn.Module):
    """``y = x @ W^T + b`` with W [out_features, in_features] stored 2:4-sparse (see the module
    docstring for where it runs). Build it with :meth:`from_dense`; :meth:`to_dense` gives the
    dense weight back (zeros at pruned positions) for export.

    Attributes: ``weight`` (a frozen ``nn.Parameter`` holding torch's semi-structured sparse
    tensor), ``bias`` (``nn.Parameter`` [out] or None), ``in_features``, ``out_features``.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None) -> "SemiStructuredLinear":
        """From a dense ``weight`` [out, in] (float16 / bfloat16, CUDA, sm80+), its 2:4 ``mask``
        [out, in] bool (True = kept) and an optional ``bias`` [out]. Pruned positions become exact
        zeros whatever ``weight`` holds there."""
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"SemiStructuredLinear: weight must be a 2-D tensor [out, in], got "
                             f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
        if isinstance(mask, Tensor) and mask.shape != weight.shape:
            raise ValueError(f"SemiStructuredLinear: mask must have the shape of weight {tuple(weight.shape)}, "
                             f"got {tuple(mask.shape)}")
        check_two_four(mask)
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
            raise ValueError(f"SemiStructuredLinear: bias must be None or [out] = [{weight.shape[0]}], "
                             f"got {tuple(bias.shape)}")
        if weight.dtype not in _DTYPES:
            raise TypeError(f"SemiStructuredLinear: weight must be float16 or bfloat16 (2:4 sparse tensor cores), "
                            f"got {weight.dtype}")
        if weight.device.type != "cuda":
            raise ValueError(f"SemiStructuredLinear: weight must be on a CUDA device (2:4 sparse tensor cores), "
                             f"got {weight.device}; on the CPU use SparseLinear")
        major, minor = torch.cuda.get_device_capability(weight.device)
        if major < 8:
            raise ValueError(f"SemiStructuredLinear: needs a GPU of compute capability >= 8.0 (Ampere), "
                             f"{torch.cuda.get_device_name(weight.device)} has {major}.{minor}")
        if mask.device != weight.device:
            mask = mask.to(weight.device)
        dense = torch.where(mask, weight.detach(), torch.zeros((), dtype=weight.dtype, device=weight.device))
        try:
            sparse = torch.sparse.to_sparse_semi_structured(dense.contiguous())
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"SemiStructuredLinear: PyTorch cannot store a weight of shape {tuple(weight.shape)} "
                             f"{weight.dtype} as 2:4 sparse: {e}") from e
        b = None if bias is None else bias.detach().to(device=weight.device, dtype=weight.dtype).clone()
        return cls(sparse, b, weight.shape[1], weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in_features] (the weight's dtype and device) -> [..., out_features]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SemiStructuredLinear: x must have {self.in_features} features in its last "
                             f"dimension, got shape {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features)
        y = F.linear(x2, self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def tune(self, rows: int, *, reps: int = 5, warmup: int = 2) -> Dict[str, Any]:
        """Pick the fastest cuSPARSELt algorithm for inputs of ``rows`` rows (the flattened batch the
        layer will see) by timing this layer's forward with each of them on this GPU; the choice
        stays with the weight (``weight.alg_id_cusparselt``, part of its state). PyTorch uses
        algorithm 0 unless told otherwise, whatever the shapes. Returns {"backend", "alg_id",
        "ms": {algorithm id: median ms}}; with the CUTLASS backend (no algorithm to choose,
        ``torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS``) nothing is timed and
        "alg_id" is None. Every algorithm computes the same product up to the order of its float32
        sums."""
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ValueError(f"SemiStructuredLinear.tune: rows must be a positive int, got {rows!r}")
        if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
            raise ValueError(f"SemiStructuredLinear.tune: reps must be a positive int, got {reps!r}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"SemiStructuredLinear.tune: warmup must be an int >= 0, got {warmup!r}")
        w = self.weight
        if not isinstance(w, torch.sparse.SparseSemiStructuredTensorCUSPARSELT):
            return {"backend": type(w).__name__, "alg_id": None, "ms": {}}
        x = torch.randn(rows, self.in_features, device=w.device, dtype=w.dtype)

        def set_alg(alg: int) -> None:
            w.alg_id_cusparselt = alg

        with torch.no_grad(), torch.cuda.device(w.device):
            result = _pick_fastest(set_alg, lambda: self(x), lambda fn: _cuda_time_ms(fn, w.device, reps, warmup))
        return {"backend": "cusparselt", **result}

    def to_dense(self) -> Tensor:
        """The dense weight [out_features, in_features], zeros at pruned positions."""
        return self.weight.to_dense()

    def dense_mask(self) -> Tensor:
        """The nonzero positions of the weight, bool [out_features, in_features] (a kept weight that is
        exactly 0 reads as pruned)."""
        return self.to_dense() != 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4"
