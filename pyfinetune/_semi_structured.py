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

import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SemiStructuredLinear", "check_two_four"]

_DTYPES = (torch.float16, torch.bfloat16)
# cuSPARSELt's algorithm ids are 0 .. max for a given product, max depending on the cuSPARSELt
# version, the GPU, the dtype and the layout (torch.backends.cusparselt.get_max_alg_id() knows it for
# some versions only: 37 for 0.6.2, None for 0.8); an id past the last is refused by cuSPARSELt,
# which ends the search. _MAX_ALG_IDS bounds it where torch names no count.
_MAX_ALG_IDS = 64
# A faster id replaces the default only when its median is at least this much below id 0's: the
# ids of one product differ by a few percent at most where they differ by little, and a choice by
# timing noise would then be worse than PyTorch's default.
_TUNE_MARGIN = 0.03
# Samples of at least this many milliseconds (back-to-back calls): one call of a small product is
# shorter than the host's dispatch of it, which a single-call sample would time instead.
_TUNE_SAMPLE_MS = 1.0


def _alg_id_count() -> int:
    """How many algorithm ids tune() may try: torch's count for this cuSPARSELt plus one, else
    _MAX_ALG_IDS (the search stops at the first id cuSPARSELt refuses either way)."""
    try:
        top = torch.backends.cusparselt.get_max_alg_id()
    except (AttributeError, RuntimeError):
        top = None
    return top + 1 if isinstance(top, int) and top >= 0 else _MAX_ALG_IDS


def _is_refused_id(err: BaseException) -> bool:
    """Whether ``err`` is taken for cuSPARSELt refusing an algorithm id: an error naming a
    cuSPARSE(Lt) call or status (so a cuSPARSELt failure of another kind at an id past 0 also ends
    the search there), not an out-of-memory or a CUDA fault, which propagate."""
    if not isinstance(err, RuntimeError) or isinstance(err, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return False
    return "cusparse" in str(err).lower()


def _pick_fastest(set_alg: Callable[[int], None], get_alg: Callable[[], int], run: Callable[[], Any],
                  time_sample: Callable[[Callable[[], Any], int], float], *, max_ids: int, reps: int,
                  warmup: int) -> Dict[str, Any]:
    """The search of SemiStructuredLinear.tune. Runs ``run`` under ``set_alg(i)`` for i = 0, 1, ...
    (``warmup`` calls each, at least one) until cuSPARSELt refuses an id (_is_refused_id) or
    ``max_ids``; id 0 (the default) must run and any other error propagates. Then ``reps`` rounds,
    each timing every id in turn (``time_sample(run, calls)``: ms per call over ``calls``
    back-to-back calls, ``calls`` sized so that a sample lasts about _TUNE_SAMPLE_MS), and leaves
    set the id of the smallest median if it beats id 0's by _TUNE_MARGIN, else id 0. On an error
    the id set before is restored. Returns {"alg_id": chosen, "ms": {id: median ms}}."""
    from .benchmarks import common

    before = get_alg()
    chosen = None
    try:
        ids = []
        for alg in range(max_ids):
            set_alg(alg)
            try:
                for _ in range(max(warmup, 1)):
                    run()
            except RuntimeError as e:
                if alg == 0 or not _is_refused_id(e):
                    raise
                break
            ids.append(alg)
        set_alg(0)
        once = time_sample(run, 1)
        calls = max(1, min(1000, math.ceil(_TUNE_SAMPLE_MS / once) if once > 0 else 1000))
        samples: Dict[int, list] = {alg: [] for alg in ids}
        for r in range(reps):  # interleaved, each round from another id: a drift falls on every id alike
            for j in range(len(ids)):
                alg = ids[(r + j) % len(ids)]
                set_alg(alg)
                samples[alg].append(time_sample(run, calls))
        ms = {alg: common.percentile(samples[alg], 50) for alg in ids}
        best = min(ms, key=ms.__getitem__)
        chosen = best if ms[best] < (1.0 - _TUNE_MARGIN) * ms[0] else 0
        return {"alg_id": chosen, "ms": ms}
    finally:
        set_alg(before if chosen is None else chosen)


def _keep_alg(w: Tensor, source: Tensor) -> Tensor:
    """``w`` (a detached copy of ``source``) with ``source``'s cuSPARSELt algorithm id: torch 2.4's
    detach of a semi-structured tensor (in state_dict(), nn.Parameter) dropped it, so a tuned
    layer saved or loaded there came back with the default algorithm."""
    alg = getattr(source, "alg_id_cusparselt", None)
    if alg is not None and getattr(w, "alg_id_cusparselt", None) != alg:
        w.alg_id_cusparselt = alg
    return w


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
        self.weight = _keep_alg(nn.Parameter(weight, requires_grad=False), weight)
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

    def tune(self, rows: int, *, reps: int = 10, warmup: int = 2) -> Dict[str, Any]:
        """Pick the fastest cuSPARSELt algorithm for inputs of ``rows`` rows (the flattened batch the
        layer will see) by timing this layer's forward with each of them on this GPU, interleaved
        over ``reps`` rounds (samples of back-to-back calls, at least ~1 ms each); an algorithm
        replaces the default (0) only when its median is at least 3% faster. The choice stays with
        the weight (``weight.alg_id_cusparselt``, saved in the state dict) and PyTorch uses it for
        every product of the weight. PyTorch uses algorithm 0 unless told otherwise, whatever the
        shapes. Returns {"backend", "alg_id", "ms": {algorithm id: median ms}}; with the CUTLASS
        backend (no algorithm to choose, ``torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS``)
        nothing is timed and "alg_id" is None. Every algorithm computes the same product up to the
        order of its float32 sums. On an error (out of memory, say) the algorithm set before stays.

        Algorithm ids are not portable: their number and order depend on the cuSPARSELt version
        and the GPU; tune again after loading a tuned state dict elsewhere."""
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise ValueError(f"SemiStructuredLinear.tune: rows must be a positive int, got {rows!r}")
        if not isinstance(reps, int) or isinstance(reps, bool) or reps < 1:
            raise ValueError(f"SemiStructuredLinear.tune: reps must be a positive int, got {reps!r}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"SemiStructuredLinear.tune: warmup must be an int >= 0, got {warmup!r}")
        w = self.weight
        if not isinstance(w, torch.sparse.SparseSemiStructuredTensorCUSPARSELT):
            return {"backend": type(w).__name__, "alg_id": None, "ms": {}}
        from .benchmarks import common

        x = torch.randn(rows, self.in_features, device=w.device, dtype=w.dtype)

        def set_alg(alg: int) -> None:
            w.alg_id_cusparselt = alg

        with torch.no_grad(), torch.cuda.device(w.device):
            result = _pick_fastest(set_alg, lambda: w.alg_id_cusparselt, lambda: self(x),
                                   lambda fn, calls: common._time_one(fn, w.device, calls),
                                   max_ids=_alg_id_count(), reps=reps, warmup=warmup)
        return {"backend": "cusparselt", **result}

    def to_dense(self) -> Tensor:
        """The dense weight [out_features, in_features], zeros at pruned positions."""
        w = self.weight
        alg = getattr(w, "alg_id_cusparselt", 0)
        if not alg:
            return w.to_dense()
        # PyTorch's to_dense multiplies the weight by an identity with the weight's algorithm; a
        # tuned id (chosen for the forward's product) need not exist for that one: the default.
        w.alg_id_cusparselt = 0
        try:
            return w.to_dense()
        finally:
            w.alg_id_cusparselt = alg

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # PyTorch's semi-structured tensors have no copy_: the loaded weight (a semi-structured
        # tensor of this layer's shape, dtype and device, such as state_dict() gives) replaces the
        # parameter's tensor, keeping its algorithm choice (load_state_dict(sd, assign=True) did
        # this already; without it loading failed in copy_). Everything else (the bias, load
        # pre-hooks, which see the whole dict, unexpected keys) is torch's: the weight is out of
        # the parameters while it runs.
        key = prefix + "weight"
        current = self._parameters.pop("weight")
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            others = list(self._parameters.items())
            self._parameters.clear()
            self._parameters["weight"] = current  # first again: the state dict's key order
            self._parameters.update(others)
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        w = state_dict[key]
        if not isinstance(w, torch.sparse.SparseSemiStructuredTensor) or tuple(w.shape) != (
                self.out_features, self.in_features) or w.dtype != current.dtype or w.device != current.device:
            got = (f"{type(w).__name__} {w.dtype} of shape {tuple(w.shape)} on {w.device}" if isinstance(w, Tensor)
                   else type(w).__name__)
            error_msgs.append(f"SemiStructuredLinear: {key} must be a 2:4 semi-structured sparse tensor "
                              f"{current.dtype} of shape ({self.out_features}, {self.in_features}) on "
                              f"{current.device} (as state_dict() gives; torch.load with map_location to this "
                              f"device), got {got}; for a dense weight use from_dense(weight, mask)")
            return
        self.weight = _keep_alg(nn.Parameter(w.detach(), requires_grad=False), w)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        key = prefix + "weight"
        if key in destination:
            _keep_alg(destination[key], self.weight)

    def dense_mask(self) -> Tensor:
        """The nonzero positions of the weight, bool [out_features, in_features] (a kept weight that is
        exactly 0 reads as pruned)."""
        return self.to_dense() != 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, 2:4"
