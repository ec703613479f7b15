"""Fused, regularized optimizers for fine-tuning: :class:`AdamW` and :class:`SGD`.

Both are drop-in subclasses of :class:`torch.optim.Optimizer` (param groups, ``state_dict`` /
``load_state_dict``, LR schedulers, ``torch.amp.GradScaler``) whose update runs in one fused,
multi-tensor kernel (CPU and CUDA) and adds the penalties that fine-tuning needs:

* **L2-SP** (Li et al. 2018), the pull toward the pretrained weights ``p0``: ``l2sp/2 * ||p - p0||^2``.
  ``penalty_mode="coupled"`` adds its gradient ``l2sp * (p - p0)`` to the gradient (it then goes
  through the Adam moments); ``"decoupled"`` pulls the weights directly, ``p -= lr * l2sp * (p - p0)``,
  as AdamW does for weight decay.
* **L1**: a proximal step ``p = sign(p) * max(|p| - lr * l1, 0)`` after the update, which produces
  exact zeros.
* **masks**: per-parameter bool masks (pruning); masked entries and their optimizer state stay
  exactly zero, whatever the momentum or the weight decay.

With ``l2sp = l1 = 0`` and no masks the updates equal ``torch.optim.AdamW`` / ``torch.optim.SGD``
to float rounding. Parameters may be float32, bfloat16, float16 or float64; the optimizer state is
kept in float32 (float64 for float64 parameters) and all arithmetic runs in float32.

Example::

    model = torchvision.models.resnet18()
    model.load_state_dict(pretrained)
    head = list(model.fc.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    opt = pyfinetune.optim.AdamW(
        [{"params": body, "l2sp": 1e-2}, {"params": head, "l2sp": 0.0}],   # the new head has no anchor
        lr=1e-3, weight_decay=0.0)

Distributed: with DDP nothing changes. With FSDP2 (``fully_shard``) the parameters and gradients
are DTensors: the kernels update each rank's local shards, and the state (moments, anchors, masks)
is stored as DTensors laid out like the parameters (``state_dict()`` per rank and
``torch.distributed.checkpoint`` work). Full anchors, masks and state dicts given as plain tensors
are cut to each rank's shard. See README "Distributed (DDP, FSDP2)".

Hyper-parameters that are numbers (``lr``, ``betas``, ``eps``, ``weight_decay``, ``l2sp``, ``l1``,
``momentum``, ``dampening``) may differ between param groups without adding kernel launches; the
flags (``amsgrad``, ``maximize``, ``nesterov``, ``penalty_mode``) split the launch when groups differ.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from . import ops as _ops  # also registers the fake kernels
from ._C import _changed_lrs, _groups_hold, _state_holds

_layout_signature = torch.ops.pyfinetune._layout_signature


def _layouts(tensors: List[Tensor]) -> List[Tuple]:
    return [(t.dtype, t.shape, t.device, t.layout, t.stride()) for t in tensors]

__all__ = ["AdamW", "SGD"]

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ANCHOR_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16, torch.float64)
_PENALTY_MODES = ("coupled", "decoupled")


# An anchor entry that a mapping leaves out or a list gives as None (allowed where l2sp = 0).
_NO_ANCHOR = object()


def _anchor_mapping(anchor: Mapping, name: str) -> Dict[int, Tensor]:
    """{id(param): tensor} of an anchor given as a mapping from parameters to tensors."""
    out: Dict[int, Tensor] = {}
    for i, (key, value) in enumerate(anchor.items()):
        if not isinstance(key, Tensor):
            raise TypeError(f"{name} as a mapping must be keyed by the parameters (tensors), got a "
                            f"{type(key).__name__} key (entry {i})")
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}'s value for entry {i} must be a Tensor, got {type(value).__name__}")
        out[id(key)] = value
    return out


def _check_anchor_keys(mapping: Dict[int, Tensor], params: Iterable[Tensor], owner: str, where: str = "") -> None:
    """ValueError when a key of an anchor mapping (by id) is not one of ``params``."""
    ids = {id(p) for p in params}
    stray = [i for i, key in enumerate(mapping) if key not in ids]
    if stray:
        raise ValueError(f"{owner} has {len(stray)} entries whose key is not a parameter of {where} (entry "
                         f"{stray[0]} in its order); key the mapping by the parameters themselves")


def _check_flag(group: Dict[str, Any], key: str, where: str) -> None:
    """A boolean hyper-parameter: a bool, or a NumPy bool (stored as a bool; configs and sweeps
    built with NumPy give those); anything else (0 / 1, a tensor, a string) is refused."""
    value = group[key]
    if isinstance(value, bool):
        return
    if _ops._is_numpy_bool(value):
        group[key] = bool(value)
        return
    raise TypeError(f"{key}{where} must be a bool, got {type(value).__name__}")


def _anchor_dtype_of(value: Any, where: str = "") -> Optional[torch.dtype]:
    """An anchor_dtype setting as a torch.dtype (or None): a dtype of _ANCHOR_DTYPES or its name
    ("bfloat16" or "torch.bfloat16": what state_dict() stores, and what a config file can hold)."""
    if isinstance(value, str):
        name = value[len("torch."):] if value.startswith("torch.") else value
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype) and dtype in _ANCHOR_DTYPES:
            return dtype
    elif value is None or (isinstance(value, torch.dtype) and value in _ANCHOR_DTYPES):
        return value
    raise ValueError(
        f"anchor_dtype{where} must be None (the parameter's dtype), torch.float32, torch.bfloat16, "
        f"torch.float16 or torch.float64 (or its name, e.g. 'bfloat16'), got {value!r}"
    )


_state_dtype = _ops._state_dtype  # float64 state for float64 parameters, else float32


def _is_dense(t: Tensor) -> bool:
    """True when ``t`` covers its memory exactly once (any order of dims): flat-indexable."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# ------------------------------------------------------------------------------ sharded (DTensor)
# Parameters sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`) or other DTensor layouts: the
# update is element-wise, so the kernels run on each rank's local shards. The state (moments,
# anchors, masks) is stored as DTensors laid out like the parameter, so `state_dict()` works per rank
# and with torch.distributed.checkpoint.


def _dtensor_type() -> Optional[type]:
    """DTensor's class when ``torch.distributed.tensor`` has been imported, else None: no DTensor
    can exist before, and ``import pyfinetune`` does not import torch.distributed."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _is_sharded(t: Optional[Tensor]) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _check_placements(p: Tensor, name: str) -> None:
    """A DTensor parameter's placements must give each element to one rank (Shard) or the same
    value to several (Replicate): a Partial parameter holds summands, not values."""
    if any(pl.is_partial() for pl in p.placements):
        raise TypeError(
            f"{name} is a DTensor with placements {tuple(p.placements)}; pyfinetune.optim updates DTensors "
            "element-wise on their local shards, which needs Shard or Replicate placements (FSDP2, HSDP), "
            "not Partial"
        )


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.device_mesh == b.device_mesh and tuple(a.placements) == tuple(b.placements)


@functools.lru_cache(maxsize=None)
def _distribute_has_src_data_rank() -> bool:
    from torch.distributed.tensor import distribute_tensor

    return "src_data_rank" in inspect.signature(distribute_tensor).parameters


def _this_ranks_piece(full: Tensor, p: Tensor) -> Tensor:
    """The piece of ``full`` (the full tensor, alike on every rank) that this rank holds of the
    DTensor ``p``'s layout, without communication."""
    from torch.distributed.tensor import distribute_tensor

    if _distribute_has_src_data_rank():
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
    # torch 2.6 and older: distribute_tensor has no src_data_rank and scatters rank 0's tensor (a
    # collective, which this rank's caller need not be in step with): cut the piece directly.
    return _cut_piece(full, p)


def _cut_piece(full: Tensor, p: Tensor) -> Tensor:
    """_this_ranks_piece by slicing (Shard and Replicate placements)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))].contiguous()


def _local_like(p: Tensor, t: Tensor, name: str) -> Tensor:
    """The local shard of ``t`` that lines up with the local shard of the DTensor parameter ``p``.

    ``t`` is a DTensor laid out like ``p`` (same mesh and placements), or a plain tensor of ``p``'s
    full shape, which every rank is expected to hold alike (the pretrained weights, a full mask):
    each rank keeps its own piece, without communication."""
    if _is_sharded(t):
        if not _same_layout(t, p):
            raise ValueError(
                f"{name} is a DTensor with placements {tuple(t.placements)} on {t.device_mesh}, but the "
                f"parameter's are {tuple(p.placements)} on {p.device_mesh}; give it the parameter's layout "
                "(DTensor.redistribute) or pass the full tensor"
            )
        local = t.to_local()
    else:
        if t.shape != p.shape:
            raise ValueError(
                f"{name} must be a DTensor laid out like the parameter or a tensor of the parameter's full "
                f"shape {tuple(p.shape)}, got shape {tuple(t.shape)}"
            )
        local = _this_ranks_piece(t.detach().to(p.device), p)
    if local.shape != p.to_local().shape:
        raise ValueError(
            f"{name}: its local shard has shape {tuple(local.shape)} but the parameter's has "
            f"{tuple(p.to_local().shape)}"
        )
    return local


def _wrap_like(p: Tensor, local: Tensor) -> Tensor:
    """``local`` (a tensor shaped like ``p``'s local shard) as a DTensor laid out like ``p``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _local(t: Optional[Tensor]) -> Optional[Tensor]:
    """The local shard of a DTensor (what the kernels update in place); other values as they are."""
    return t.to_local() if _is_sharded(t) else t


def _check_number(name: str, value: Any, *, low: float = 0.0, high: Optional[float] = None,
                  high_inclusive: bool = False, where: str = "") -> None:
    # numbers.Real: also NumPy scalars (an LR scheduler's lambda may return np.float32); the kernels
    # get float(value).
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}{where} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{name}{where} must be a finite number >= {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        bound = "<=" if high_inclusive else "<"
        raise ValueError(f"{name}{where} must be {bound} {high}, got {value}")


def _check_lr(lr: Any, where: str = "") -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr{where} as a tensor must hold exactly one value, got shape {tuple(lr.shape)}")
        if lr.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"lr{where} as a tensor must be float32 or float64, got {lr.dtype}")
        if lr.device.type == "cpu" and not (math.isfinite(lr.item()) and lr.item() >= 0):
            raise ValueError(f"lr{where} must be a finite number >= 0, got {lr.item()}")
        return
    _check_number("lr", lr, where=where)


def _freeze(value: Any) -> Any:
    """A snapshot of a hyper-parameter that compares equal to a later snapshot only when the
    value would validate and compute the same: numbers by type and value (so ``True`` never passes
    for ``1``, and NaN never equals itself), lists and tuples element-wise (copied, so a list
    changed in place does not compare equal), anything else (dtypes, tensors) by identity."""
    t = type(value)
    if t is float or t is int or t is bool or t is str or value is None:
        return (t, value)
    if t is tuple or t is list:
        return (t, tuple(_freeze(v) for v in value))
    return (t, id(value), value)  # holding `value` keeps its id from being reused


NATIVE_PLAN_ENV = "PYFINETUNE_OPTIM_NATIVE_PLAN"


def _native_plan_enabled() -> bool:
    """PYFINETUNE_OPTIM_NATIVE_PLAN: 1 or unset (default) runs a cached step plan from C++, 0 from
    Python (the same launches, each step passing every argument list again: an A/B switch for the
    benchmarks). Read when a plan is built."""
    raw = os.environ.get(NATIVE_PLAN_ENV, "")
    if raw not in ("", "0", "1"):
        raise ValueError(f"{NATIVE_PLAN_ENV} must be 0 or 1 (or unset), got {raw!r}")
    return raw != "0"


def _laid_out_like(p: Tensor, value: Tensor) -> Tensor:
    """``value`` (p's shape), or a copy of it with p's strides where they differ (size-1 dimensions
    aside): state tensors must be laid out like their parameter. p is dense (checked)."""
    if value.stride() == p.stride():  # the usual case, first: this runs per parameter per uncached step
        return value
    if p.numel() <= 1 or value.shape != p.shape or _is_sharded(p) or _is_sharded(value) or all(
            vs == ps for vs, ps, n in zip(value.stride(), p.stride(), p.shape) if n > 1):
        return value
    return torch.empty_like(p, dtype=value.dtype, memory_format=torch.preserve_format).copy_(value)


class _StepPlan:
    """What an eager step built from the param groups and the state (buckets of parameters,
    state tensors and per-parameter hyper-parameters), reused by the next steps while nothing it
    was built from changed (see `_FusedPenalizedOptimizer._plan_grads`)."""

    __slots__ = ("version", "param_groups", "groups", "params", "hypers", "lrs", "lr_groups", "f32_params", "state",
                 "state_keys", "state_dicts", "state_values", "absent", "meta", "buckets", "native")


class _FusedPenalizedOptimizer(torch.optim.Optimizer):
    """Shared machinery: anchors, masks, validation, GradScaler, state_dict, bucketing."""

    # torch.amp.GradScaler hands us `grad_scale` and `found_inf` instead of unscaling the grads.
    _step_supports_amp_scaling = True
    # Optimizer-state keys holding per-element tensors in the state dtype (float32 / float64).
    _STATE_KEYS: Tuple[str, ...] = ()
    # torch's LR schedulers replace `opt.step` by a wrapper, defined in torch/optim/lr_scheduler.py,
    # that sets `opt._opt_called` (to warn when the scheduler steps first). torch.compile never
    # traces that file, so the wrapper would break a compiled training step in two (an error with
    # fullgraph=True). Our steps record their calls themselves and their functions carry the
    # scheduler's "already wrapped" mark (`_mark_scheduler_aware` below), so no wrapper is added.
    # The record is a list: inside a compiled step Dynamo drops attribute stores on an optimizer
    # but keeps the mutation of a container.
    @property
    def _opt_called(self) -> bool:
        return self._step_called[0]

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._step_called[0] = bool(value)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # torch.optim.Optimizer pickles only defaults, state and param_groups.
        super().__setstate__(state)
        for p, st in self.state.items():
            step = st.get("step") if isinstance(st, dict) else None
            if isinstance(step, numbers.Real) and not isinstance(step, bool) and isinstance(p, Tensor):
                st["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)  # an old pickle
        self._step_called = [False]
        self._anchor_source = None  # constructor-only (add_param_group reads them)
        self._anchor_map = None
        self._anchor_index = 0
        self._invalidate_plan()

    # Hyper-parameters that a step validates and passes to the kernels.
    # The hyper-parameters a cached step plan was validated with (see `_plan_holds`); "lr" is not
    # among them: an LR scheduler changes it every step, and the plan follows it (`_follow_lrs`).
    _HYPER_KEYS: Tuple[str, ...] = ("weight_decay", "l2sp", "l1", "penalty_mode", "anchor_dtype", "maximize")

    def _invalidate_plan(self) -> None:
        """Forget the cached step plan: the param groups, masks or state changed."""
        self._plan = None
        self._plan_version = getattr(self, "_plan_version", 0) + 1

    def _state_snapshot(self) -> Tuple[Any, ...]:
        """What ``_restore_state`` needs to undo a later ``load_state_dict`` (for a caller that loads
        more after this optimizer and must roll back when a later part is refused): load_state_dict
        replaces ``state`` and ``param_groups`` with new objects, so holding the old ones suffices."""
        return (self.state, self.param_groups)

    def _restore_state(self, snapshot: Tuple[Any, ...]) -> None:
        self.state, self.param_groups = snapshot[0], snapshot[1]
        self._invalidate_plan()

    def __init__(self, params, defaults: Dict[str, Any], anchor: Union[str, Iterable[Tensor]],
                 masks: Optional[Mapping[Tensor, Tensor]]):
        self._anchor_map = None
        if isinstance(anchor, str):
            if anchor != "init":
                raise ValueError(f'anchor must be "init" or an iterable of tensors, got {anchor!r}')
            self._anchor_source = None
        elif isinstance(anchor, Tensor):
            raise TypeError("anchor must be \"init\" or an iterable of tensors (one per parameter), got a single Tensor")
        elif isinstance(anchor, Mapping):
            # {param: pretrained tensor}, like masks: looked up by the parameter itself (a dict's
            # iteration would give its keys, the parameters, as anchors).
            self._anchor_source = None
            self._anchor_map = _anchor_mapping(anchor, "anchor")
        else:
            try:
                self._anchor_source = list(anchor)
            except TypeError:
                raise TypeError(f'anchor must be "init" or an iterable of tensors, got {type(anchor).__name__}') from None
            for i, a in enumerate(self._anchor_source):
                # None: a placeholder for a parameter whose group has l2sp = 0 (no anchor)
                if a is not None and not isinstance(a, Tensor):
                    raise TypeError(f"anchor[{i}] must be a Tensor (or None for a parameter whose group has l2sp=0), "
                                    f"got {type(a).__name__}")
        self._anchor_index = 0
        self._step_called = [False]
        self._plan: Optional[_StepPlan] = None
        self._plan_version = 0
        super().__init__(params, defaults)
        if self._anchor_source is not None and self._anchor_index != len(self._anchor_source):
            raise ValueError(
                f"anchor has {len(self._anchor_source)} tensors but the optimizer has {self._anchor_index} "
                "parameters; pass one anchor per parameter, in param-group order"
            )
        if self._anchor_map is not None:
            _check_anchor_keys(self._anchor_map, (p for g in self.param_groups for p in g["params"]), "anchor",
                               "this optimizer")
        self._anchor_source = None
        self._anchor_map = None
        if masks is not None:
            if not isinstance(masks, Mapping):
                raise TypeError(f"masks must be a mapping from parameter to bool mask, got {type(masks).__name__}")
            for p, m in masks.items():
                self.set_mask(p, m)

    # ------------------------------------------------------------------ param groups and anchors
    def _validate_group(self, group: Dict[str, Any], where: str) -> None:
        _check_lr(group["lr"], where)
        _check_number("weight_decay", group["weight_decay"], where=where)
        _check_number("l2sp", group["l2sp"], where=where)
        _check_number("l1", group["l1"], where=where)
        if group["penalty_mode"] not in _PENALTY_MODES:
            raise ValueError(f"penalty_mode{where} must be 'coupled' or 'decoupled', got {group['penalty_mode']!r}")
        group["anchor_dtype"] = _anchor_dtype_of(group["anchor_dtype"], where)
        _check_flag(group, "maximize", where)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group; with ``l2sp > 0`` its parameters are anchored at their current values
        (or at the group's ``"anchor"`` entry: an iterable of tensors, one per parameter)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group_anchor = param_group.pop("anchor", None)
        at_init = False
        if isinstance(group_anchor, str):
            if group_anchor != "init":
                raise ValueError(f'a param group\'s anchor must be "init" or an iterable of tensors, got {group_anchor!r}')
            group_anchor, at_init = None, True  # the parameters' current values, not the constructor's list
        elif isinstance(group_anchor, Tensor):
            raise TypeError("a param group's anchor must be an iterable of tensors (one per parameter), got a single "
                            "Tensor")
        group_map = _anchor_mapping(group_anchor, "a param group's anchor") if isinstance(group_anchor, Mapping) else None
        self._invalidate_plan()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f" (param group {len(self.param_groups) - 1})"
        try:
            self._validate_group(group, where)
            seen: Dict[int, int] = {}
            for j, p in enumerate(group["params"]):
                if id(p) in seen:
                    # torch's optimizers warn and update such a parameter once per listing; the
                    # fused step would apply its update twice from one state.
                    raise ValueError(f"parameter {j}{where} is the same tensor as parameter {seen[id(p)]}: list each "
                                     "parameter once")
                seen[id(p)] = j
                if p.dtype not in _PARAM_DTYPES:
                    raise TypeError(f"parameters must be float32, bfloat16, float16 or float64, got {p.dtype}{where}")
                if p.layout != torch.strided:
                    raise TypeError(f"parameters must be dense (strided) tensors, got layout {p.layout}{where}")
                if _is_sharded(p):
                    _check_placements(p, f"parameter {j}{where}")
            self._check_params_disjoint()
            # _NO_ANCHOR: a parameter that a mapping leaves out, or a None placeholder of a list:
            # refused below where the group has l2sp > 0.
            if group_map is not None:
                _check_anchor_keys(group_map, group["params"], "the group's anchor", f"the group{where}")
                anchors = [group_map.get(id(p), _NO_ANCHOR) for p in group["params"]]
            elif self._anchor_map is not None and not at_init:
                anchors = [self._anchor_map.get(id(p), _NO_ANCHOR) for p in group["params"]]
            elif group_anchor is not None:
                anchors = list(group_anchor)
                if len(anchors) != len(group["params"]):
                    raise ValueError(
                        f"the group's anchor has {len(anchors)} tensors for {len(group['params'])} parameters{where}"
                    )
            elif self._anchor_source is not None and not at_init:
                start = self._anchor_index
                anchors = [_NO_ANCHOR if a is None else a
                           for a in self._anchor_source[start:start + len(group["params"])]]
                self._anchor_index += len(group["params"])
                if len(anchors) != len(group["params"]):
                    raise ValueError(
                        f"anchor has {len(self._anchor_source)} tensors but the optimizer has at least "
                        f"{self._anchor_index} parameters; pass one anchor per parameter, in param-group order"
                    )
            else:
                anchors = [None] * len(group["params"])
            # All of a group's anchors are made before any is stored: a refused group leaves no state
            # behind. A group with l2sp = 0 takes none (its entries of a constructor list may be
            # placeholders, e.g. for a resized head).
            if group["l2sp"] > 0:
                missing = [j for j, a in enumerate(anchors) if a is _NO_ANCHOR]
                if missing:
                    raise ValueError(
                        f"anchor gives no tensor for parameter {missing[0]}{where}, whose group has l2sp = "
                        f"{group['l2sp']} > 0: give its pretrained values, or set the group's l2sp=0")
                made = [self._make_anchor(p, a, group["anchor_dtype"], f"anchor for parameter {j}{where}")
                        for j, (p, a) in enumerate(zip(group["params"], anchors))]
                for p, anchor in zip(group["params"], made):
                    self.state[p]["anchor"] = anchor
        except Exception:
            self.param_groups.pop()
            raise
        if any(_is_sharded(p) for p in group["params"]):
            # torch.distributed.checkpoint builds the template it loads a checkpoint into from
            # state_dict(), and fills an empty optimizer state by a step at lr 0 first; ours holds
            # the anchors already, so that step is skipped and the moments would be missing from
            # the template (silently not loaded). Sharded parameters get their whole state now.
            self._init_group_state(group)

    def init_state(self) -> None:
        """Create the optimizer state (step, moments / momentum buffers) of every parameter that
        requires a gradient and has none yet, as zeros, as the first step would.

        Needed before ``torch.distributed.checkpoint`` loads into this optimizer
        (``get_optimizer_state_dict`` / ``dcp.load`` / ``set_optimizer_state_dict``): its template
        is ``state_dict()``, which holds only the anchors and masks before the first step. Done at
        construction for DTensor (FSDP2) parameters. SGD's first step still starts such a zero
        momentum buffer from the gradient (no ``dampening``), as it starts a buffer it creates,
        unless a loaded state dict filled it."""
        self._invalidate_plan()
        for group in self.param_groups:
            self._init_group_state(group)

    def _init_group_state(self, group: Dict[str, Any]) -> None:
        with torch.no_grad():
            for p in group["params"]:
                if p.requires_grad:
                    self._init_state(p, group)

    @staticmethod
    def _check_anchor(p: Tensor, a: Any, name: str) -> None:
        if not isinstance(a, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(a).__name__}")
        if a.shape != p.shape:
            raise ValueError(f"{name} must have the parameter's shape {tuple(p.shape)}, got {tuple(a.shape)}")
        if not a.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {a.dtype}")
        if a.device.type == "meta" and p.device.type != "meta":
            raise ValueError(f"{name} is a meta tensor (shape only, no values): pass the pretrained values")

    @staticmethod
    def _make_anchor(p: Tensor, a: Optional[Tensor], anchor_dtype: Optional[torch.dtype], name: str) -> Tensor:
        src = p if a is None else a
        if a is not None:
            _FusedPenalizedOptimizer._check_anchor(p, a, name)
        dtype = anchor_dtype or p.dtype
        if dtype not in (p.dtype, torch.float32, torch.bfloat16):
            raise ValueError(f"anchor_dtype {dtype} is not available for {p.dtype} parameters; use float32 or bfloat16")
        with torch.no_grad():
            if _is_sharded(p):
                # Sharded like the parameter: each rank stores the anchor of its own shard.
                local = p.to_local()
                anchor = torch.empty_like(local, dtype=dtype, memory_format=torch.preserve_format)
                anchor.copy_(local if a is None else _local_like(p, a, name))
                return _wrap_like(p, anchor)
            if _is_sharded(a):
                raise TypeError(f"{name} is a DTensor but the parameter is a plain tensor; pass a plain tensor")
            anchor = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
            anchor.copy_(src.detach())
        return anchor

    # ----------------------------------------------------------------------------------- masks
    @torch.no_grad()
    def set_mask(self, param: Tensor, mask: Optional[Tensor]) -> None:
        """Keep ``param`` zero where ``mask`` is False, now and after every step.

        The masked entries of the parameter and of its optimizer state are zeroed immediately.
        ``mask=None`` removes the mask. ``mask`` is a bool tensor of the parameter's shape; for a
        DTensor parameter (FSDP2), a DTensor laid out like it or the full mask, which each rank
        then cuts to its own shard (every rank must pass the same full mask).
        """
        if not any(param is p for g in self.param_groups for p in g["params"]):
            raise ValueError("set_mask: param is not one of this optimizer's parameters")
        self._invalidate_plan()
        state = self.state[param]
        if mask is None:
            state.pop("mask", None)
            return
        if not isinstance(mask, Tensor):
            raise TypeError(f"set_mask: mask must be a bool Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"set_mask: mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != param.shape:
            raise ValueError(f"set_mask: mask must have the parameter's shape {tuple(param.shape)}, got {tuple(mask.shape)}")
        if mask.device.type == "meta" and param.device.type != "meta":
            raise ValueError("set_mask: mask is a meta tensor (shape only, no values): pass the mask's values")
        sharded = _is_sharded(param)
        if sharded:
            source = _local_like(param, mask, "set_mask: mask")
        elif _is_sharded(mask):
            raise TypeError("set_mask: mask is a DTensor but the parameter is a plain tensor; pass a plain tensor")
        else:
            source = mask
        target = _local(param)
        m = torch.empty_like(target, dtype=torch.bool, memory_format=torch.preserve_format)
        m.copy_(source)
        state["mask"] = _wrap_like(param, m) if sharded else m
        target.masked_fill_(~m, 0)
        for key in self._STATE_KEYS:
            if key in state and isinstance(state[key], Tensor):
                _local(state[key]).masked_fill_(~m, 0)

    def get_mask(self, param: Tensor) -> Optional[Tensor]:
        """The bool mask of ``param``, or None."""
        return self.state[param].get("mask") if param in self.state else None

    def anchor_of(self, param: Tensor) -> Optional[Tensor]:
        """The L2-SP anchor of ``param``, or None when its group has ``l2sp == 0``."""
        return self.state[param].get("anchor") if param in self.state else None

    # ------------------------------------------------------------------------------ state_dict
    def state_dict(self) -> Dict[str, Any]:
        """torch's optimizer state dict, with each group's ``anchor_dtype`` stored by name
        (``"bfloat16"``, or None): torch.distributed.checkpoint's state-dict functions
        (``get_optimizer_state_dict``, full or sharded) accept tensors, numbers and strings only.
        ``load_state_dict`` reads either form."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            dtype = group.get("anchor_dtype")
            if isinstance(dtype, torch.dtype):
                group["anchor_dtype"] = str(dtype)[len("torch."):]
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state produced by ``state_dict()`` (also torch's AdamW/SGD state).

        Unlike torch's default, optimizer state keeps its float32 precision for bf16/fp16
        parameters, anchors keep their dtype and masks stay bool.

        For DTensor (FSDP2-sharded) parameters the state may be sharded (a rank's own
        ``state_dict()``, or torch.distributed.checkpoint's sharded state dict) or full (gathered,
        e.g. ``get_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True))``):
        each rank keeps the piece of its own shard.

        What the loaded state lacks is kept from this optimizer: a parameter's L2-SP anchor and its
        mask (a torch optimizer's state dict has neither; the kept mask is applied again to the
        parameter and its loaded moments), and a group's keys that torch's groups do not have
        (``l2sp``, ``l1``, ``penalty_mode``, ...: this optimizer's value for that group, else the
        default).
        """
        saved_state = state_dict.get("state", {})
        saved_groups = state_dict.get("param_groups", [])
        self._invalidate_plan()
        own_keys = {p: {k: v for k, v in self.state[p].items() if k in ("anchor", "mask")}
                    for g in self.param_groups for p in g["params"] if p in self.state}
        own_groups = [{k: g[k] for k in self.defaults if k in g and k != "params"} for g in self.param_groups]
        # torch's load_state_dict replaces self.state and self.param_groups with new objects (the old
        # ones are not modified): a state dict refused below, by the groups' or the state tensors'
        # checks, leaves the optimizer as it was.
        before = self._state_snapshot()
        try:
            self._load_state_dict_checked(state_dict, saved_state, saved_groups, own_groups)
        except BaseException:
            self._restore_state(before)
            raise
        with torch.no_grad():
            for gi, group in enumerate(self.param_groups):
                for p in group["params"]:
                    kept = own_keys.get(p, {})
                    st = self.state[p]
                    if "anchor" in kept and "anchor" not in st and group["l2sp"] > 0:
                        st["anchor"] = kept["anchor"]
                    if "mask" in kept and "mask" not in st:
                        self.set_mask(p, kept["mask"])  # zeroes the parameter and its loaded moments
                    elif "mask" in st:
                        self.set_mask(p, st["mask"])  # a loaded mask holds at once, as set_mask's does
        self._invalidate_plan()

    def _load_state_dict_checked(self, state_dict, saved_state, saved_groups, own_groups) -> None:
        """load_state_dict's loading and checks, which write nothing but the new state and groups."""
        super().load_state_dict(state_dict)
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(ids, params))
        with torch.no_grad():
            for pid, saved in saved_state.items():
                p = id_to_param.get(pid)
                if p is None:
                    continue
                st = self.state[p]
                for key, value in saved.items():
                    if key == "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                        # Older checkpoints (and torch before 1.12) keep the step as a number.
                        st[key] = torch.tensor(float(value), dtype=torch.float32, device=p.device)
                        continue
                    if not isinstance(value, Tensor):
                        continue
                    if key == "step":
                        if value.numel() != 1:
                            raise ValueError(f"{type(self).__name__}.load_state_dict: state 'step' of parameter {pid} "
                                             f"must hold one value, got shape {tuple(value.shape)}")
                        st[key] = value.detach().to(device=p.device, dtype=torch.float32).reshape(())
                    elif key == "anchor":
                        st[key] = self._load_like(p, value, None, f"state {key!r} of parameter {pid}")
                    elif key == "mask":
                        st[key] = self._load_like(p, value, torch.bool, f"state {key!r} of parameter {pid}")
                    elif key in self._STATE_KEYS:
                        st[key] = self._load_like(p, value, _state_dtype(p), f"state {key!r} of parameter {pid}")
        for gi, group in enumerate(self.param_groups):
            # torch.optim's groups lack our keys (l2sp, l1, penalty_mode, anchor_dtype ...).
            for key, value in own_groups[gi].items():
                group.setdefault(key, value)
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self._validate_group(group, f" (param group {gi})")
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                try:
                    # A state saved for another parameter (shape, dtype): refused now, not at the next step.
                    self._check_state(p, f"parameter {j} (param group {gi})",
                                      hint=" (was the state dict saved for other parameters?)")
                except RuntimeError as e:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: the loaded state does not fit {e}") from None

    @staticmethod
    def _load_like(p: Tensor, value: Tensor, dtype: Optional[torch.dtype], name: str) -> Tensor:
        """A loaded state tensor on ``p``'s device, in ``dtype`` (None: its own), laid out like ``p``."""
        value = value.detach()
        if _is_sharded(p):
            return _wrap_like(p, _local_like(p, value, name).to(device=p.device, dtype=dtype or value.dtype))
        if _is_sharded(value):
            raise TypeError(
                f"{name} is a DTensor but the parameter is a plain tensor; load a full state dict "
                "(torch.distributed.checkpoint.state_dict.get_optimizer_state_dict with full_state_dict=True)"
            )
        return _laid_out_like(p, value.to(device=p.device, dtype=dtype or value.dtype))

    def _follow_param_layout(self, p: Tensor) -> None:
        """Lay out p's state tensors like p (the kernels need equal strides) where p's layout changed
        behind the optimizer's back (``model.to(memory_format=torch.channels_last)`` after its
        creation): copies with the same values, as torch's optimizers keep working there."""
        state = self.state.get(p)
        if not state or _is_sharded(p):
            return
        stride = p.stride()
        for key, value in state.items():
            if (key != "step" and isinstance(value, Tensor) and value.stride() != stride and value.shape == p.shape
                    and value.device == p.device):
                state[key] = _laid_out_like(p, value)

    # ------------------------------------------------------------------------------------ step
    def _amp_tensors(self, device: torch.device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
        if found_inf is not None:
            # GradScaler sums the per-device flags: clamp so a skipped step is undone exactly once.
            found_inf = found_inf.to(device=device, dtype=torch.float32, non_blocking=True).reshape(()).clamp(max=1.0)
        return grad_scale, found_inf

    def _collect(self) -> List[Tuple[Dict[str, Any], Tensor, Tensor]]:
        """Validate every group and gradient before any tensor is written."""
        items = []
        dtensor = _dtensor_type()
        for gi, group in enumerate(self.param_groups):
            where = f" (param group {gi})"
            if not torch.compiler.is_compiling():
                # A compiled step does not check the groups again: a CPU tensor lr would be read on
                # the host, and a float that changes between steps (an LR scheduler) reaches the
                # trace as a symbolic value; either breaks the graph. Construction,
                # add_param_group and eager steps check them.
                self._validate_group(group, where)
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (parameter {j}{where}); "
                        "use torch.optim.SparseAdam for sparse embeddings"
                    )
                if dtensor is not None and (isinstance(p, dtensor) or isinstance(g, dtensor)):
                    self._check_sharded_grad(p, g, f"parameter {j}{where}")
                if g.dtype != p.dtype:
                    raise RuntimeError(
                        f"the gradient of parameter {j}{where} is {g.dtype} but the parameter is {p.dtype}"
                    )
                if g.device != p.device:
                    raise RuntimeError(f"the gradient of parameter {j}{where} is on {g.device}, the parameter on {p.device}")
                if g.shape != p.shape:
                    raise RuntimeError(f"the gradient of parameter {j}{where} has shape {tuple(g.shape)}, expected {tuple(p.shape)}")
                if not _is_dense(_local(p)):
                    raise RuntimeError(
                        f"parameter {j}{where} is not dense (strides {p.stride()}); fused optimizers need "
                        "non-overlapping dense parameters"
                    )
                if group["l2sp"] > 0 and "anchor" not in self.state[p]:
                    raise RuntimeError(
                        f"parameter {j}{where} has no L2-SP anchor but its group has l2sp={group['l2sp']}; "
                        "anchors are taken when a group with l2sp > 0 is added: give the group l2sp > 0 from "
                        "the start (or pass anchors), or load a state dict whose groups set l2sp > 0 only "
                        "where it holds the anchors"
                    )
                self._check_state(p, f"parameter {j}{where}")
                if not torch.compiler.is_compiling():
                    self._follow_param_layout(p)
                items.append((group, p, g))
        if not torch.compiler.is_compiling():
            # The kernels check this too, but per launch: a step launches once per dtype / device /
            # flags bucket, so a later bucket's refusal would leave the earlier ones' parameters
            # updated. Checked here, before any launch, for the whole step (parameters sharing
            # memory: when groups are added, _check_params_disjoint).
            self._check_float32_range(items)
        return items

    # Hyper-parameters the kernels take as float32 for float32 / bfloat16 / float16 parameters.
    _FLOAT32_KEYS: Tuple[str, ...] = ("lr", "weight_decay", "l2sp", "l1")

    def _check_float32_range(self, items) -> None:
        """A group with a float32, bfloat16 or float16 parameter must keep its hyper-parameters within
        float32's range (a larger lr would become inf in the kernel: a NaN step)."""
        big = _ops._F32_MAX
        seen = set()
        for group, p, _ in items:
            if p.dtype == torch.float64 or id(group) in seen:
                continue
            seen.add(id(group))
            gi = next(i for i, g in enumerate(self.param_groups) if g is group)
            for key in self._FLOAT32_KEYS:
                value = group[key]
                if isinstance(value, Tensor) and value.device.type == "cpu" and value.numel() == 1:
                    value = value.item()  # a CPU tensor lr is read on the host anyway (_check_lr)
                # float(): a NumPy float16 compared with float32's largest would overflow (a warning).
                if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value) > big:
                    raise ValueError(f"{key} (param group {gi}) must be at most {big:.6g} (float32's largest) for "
                                     f"{p.dtype} parameters, got {value}")

    def _check_params_disjoint(self) -> None:
        """No two parameters of the optimizer share memory (a buffer listed as two parameters, in one
        group or two): a step would update it twice, and where the two fall in different launches
        (dtype, device or flags) the kernels' own checks, per launch, would refuse it only after the
        first launch wrote. Checked when a group is added (construction included), not per step.
        Dense, non-overlapping tensors cover [data_ptr, data_ptr + nbytes); meta tensors are skipped."""
        spans = []
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                t = _local(p)
                n = t.numel() * t.element_size()
                if n and t.device.type != "meta" and t.layout == torch.strided and _is_dense(t):
                    spans.append((str(t.device), t.data_ptr(), t.data_ptr() + n, f"parameter {j} (param group {gi})"))
        spans.sort(key=lambda sp: (sp[0], sp[1]))
        widest = None
        for sp in spans:
            if widest is not None and sp[0] == widest[0] and sp[1] < widest[2]:
                raise ValueError(f"{sp[3]} shares memory with {widest[3]}: every parameter must be a tensor of its "
                                 "own (views of one buffer that do not overlap are fine)")
            if widest is None or sp[0] != widest[0] or sp[2] > widest[2]:
                widest = sp

    # ------------------------------------------------------------------------ cached step plan
    def _save_plan(self, buckets: List[Tuple[Tuple, Dict[str, list]]]) -> None:
        """Remember the buckets of an eager step that `_collect` validated, with what they were
        built from, so that the next steps skip the Python work while nothing changed. Groups with
        a tensor lr are not cached (their lr is moved to the parameters' device every step)."""
        if torch.compiler.is_compiling():
            return
        self._plan = None
        if any(isinstance(g["lr"], Tensor) for g in self.param_groups):
            return
        for _, b in buckets:
            self._pack_steps(b)
        plan = _StepPlan()
        plan.version = self._plan_version
        plan.param_groups = self.param_groups
        plan.groups = list(self.param_groups)
        plan.params = [tuple(g["params"]) for g in self.param_groups]
        plan.hypers = [self._snapshot(g) for g in self.param_groups]
        plan.lrs = [_freeze(g["lr"]) for g in self.param_groups]
        group_of = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        # per launch, each parameter's group (its lr); per group, a planned parameter that is not
        # float64 (whose lr must fit float32), or None
        plan.lr_groups = [[group_of[id(p)] for p in b.get("sources", b["params"])] for _, b in buckets]
        plan.f32_params = [None] * len(self.param_groups)
        for _, b in buckets:
            for p in b.get("sources", b["params"]):
                gi = group_of[id(p)]
                if plan.f32_params[gi] is None and p.dtype != torch.float64:
                    plan.f32_params[gi] = p
        plan.state = self.state
        plan.state_keys = list(self.state)
        plan.state_dicts = list(self.state.values())
        plan.state_values = [v for d in plan.state_dicts for v in d.values()]
        present = {id(p) for _, b in buckets for p in b["params"]}
        plan.absent = [p for g in self.param_groups for p in g["params"] if id(p) not in present]
        # What the gradients (and the parameters themselves: `p.data = ...` changes them behind
        # the optimizer's back) must still look like for the plan to hold: the parameters' layouts
        # as validated, the gradients laid out like them. Plain buckets keep it as one signature
        # computed in C++ (two lists of tuples of five attributes cost 100 us a step for 161
        # parameters); sharded buckets, whose gradients are read through their DTensors, as tuples.
        plan.meta = [_layouts(b["params"]) if "sources" in b else _layout_signature(b["params"] * 2)
                     for _, b in buckets]
        plan.buckets = [(key, {k: v for k, v in b.items() if k != "grads"}) for key, b in buckets]
        plan.native = self._native_plan(plan)
        self._plan = plan

    def _native_plan(self, plan: _StepPlan):
        """The plan's launches held in C++ (csrc/step_plan.cpp), which a step runs with one call
        while `_plan_holds`: it reads the gradients and checks their layouts itself, so no tensor
        list crosses from Python. None for sharded (DTensor) buckets, whose gradients are read
        through their DTensors in Python."""
        if not plan.buckets or any("sources" in b for _, b in plan.buckets) or not _native_plan_enabled():
            return None
        native = torch.classes.pyfinetune.StepPlan(plan.absent)
        for key, b in plan.buckets:
            self._add_native_launch(native, key, b)
        return native

    def _add_native_launch(self, native, key: Tuple, b: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _run_native_plan(self) -> bool:
        """One step through the cached C++ plan, or False (nothing written) when there is none or
        it does not hold: then the step takes `_plan_grads` / the full path."""
        if torch.compiler.is_compiling():  # first: Dynamo is not to trace the plan's C++ object
            return False
        plan = self._plan
        if plan is None or plan.native is None or not self._plan_holds(plan):
            return False
        return plan.native.run(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))

    def _pack_steps(self, b: Dict[str, Any]) -> None:
        """Makes the step counts of a cached bucket views of one tensor (``b["step_base"]``), so
        that a step increments them with one ``add_`` instead of ``_foreach_add_``, which on the
        CPU dispatches one add per parameter (178 us for resnet50's 161 parameters, a third of a
        step of them at 64 elements each). The values are kept, and ``state[p]["step"]`` stays a
        0-dim float32 tensor (a view) as torch's optimizers keep it; a state loaded or replaced
        later invalidates the plan, and the next plan packs again (a new tensor each time a plan
        is built). Sharded (DTensor) buckets keep their counts as they are."""
        steps = b.get("steps")
        if not steps or len(steps) < 2 or "sources" in b:
            return
        base = torch.stack([t.detach() for t in steps])
        b["steps"] = list(base.unbind(0))
        for p, view in zip(b["params"], b["steps"]):
            self.state[p]["step"] = view
        b["step_base"] = base

    def _snapshot(self, group: Dict[str, Any]) -> Tuple:
        return tuple(_freeze(group[k]) for k in self._HYPER_KEYS)

    def _plan_grads(self) -> Optional[List[Tuple[Tuple, Dict[str, list]]]]:
        """The buckets of the cached plan with this step's gradients, or None when the plan does
        not hold (then `_collect` validates everything and a new plan is built).

        The plan holds while: no param group was added or changed (the same group dicts holding
        the same parameters, hyper-parameters that compare equal to the validated ones), no mask
        was set and no state was loaded, the state holds the same tensors, the same parameters
        have gradients, and every gradient and parameter has the dtype, shape, device, layout and
        strides that were validated. Anything else takes the full path, which raises the same
        errors as before any tensor is written."""
        plan = self._plan
        if plan is None or not self._plan_holds(plan):
            return None
        for p in plan.absent:
            if p.grad is not None:
                return None
        out = []
        for (key, cached_b), meta in zip(plan.buckets, plan.meta):
            params = cached_b["params"]
            sources = cached_b.get("sources")
            if sources is None:
                grads = [p.grad for p in params]
                if _layout_signature(params + grads) != meta:  # a None gradient differs too
                    return None
            else:
                grads = _local_grads(sources, params)
                if grads is None:
                    return None
                try:
                    if _layouts(grads) != meta:
                        return None
                except AttributeError:  # a gradient was removed (None)
                    return None
                if _layouts(params) != meta:
                    return None
            b = dict(cached_b)
            b["grads"] = grads
            out.append((key, b))
        return out

    def _plan_holds(self, plan: _StepPlan) -> bool:
        """The Python half of `_plan_grads`'s conditions: the param groups, hyper-parameters and
        state are those the plan was built from (the gradients are checked by the caller)."""
        if torch.compiler.is_compiling() or plan.version != self._plan_version:
            return False
        groups = self.param_groups
        # The same group dicts holding the same parameters (by identity: `!=` on tuples would compare
        # a replaced one with Tensor.__eq__) and hyper-parameters equal to their `_freeze` snapshots;
        # in C (csrc/pyfinetune.cpp), ~3.5 us a group in Python (100 groups of layer-wise lrs: 0.35 ms).
        if groups is not plan.param_groups or not _groups_hold(groups, plan.groups, plan.params, self._HYPER_KEYS,
                                                                plan.hypers):
            return False
        if not self._follow_lrs(plan):
            return False
        # the same state dicts holding the same tensors, by identity (in C: csrc/pyfinetune.cpp)
        state = self.state
        return state is plan.state and _state_holds(state, plan.state_keys, plan.state_dicts, plan.state_values)

    def _follow_lrs(self, plan: _StepPlan) -> bool:
        """Brings the plan's learning rates up to date with the groups' (an LR scheduler changes them
        every step): each changed lr is validated as the full path would (the same errors, raised
        before anything is written) and written into the launches' lists. False when an lr became a
        tensor (plans hold float lrs only: the full path then runs)."""
        groups = self.param_groups
        changed = _changed_lrs(groups, plan.lrs)  # in C: ~0.3 us a group in Python
        if not changed:
            return True
        for gi in changed:
            group = groups[gi]
            lr = group["lr"]
            if isinstance(lr, Tensor):
                return False
            _check_lr(lr, f" (param group {gi})")
            if plan.f32_params[gi] is not None:
                self._check_float32_range([(group, plan.f32_params[gi], None)])
        lrs = [float(g["lr"]) if isinstance(g["lr"], numbers.Real) else None for g in groups]
        touched = set(changed)
        for k, ((_, b), members) in enumerate(zip(plan.buckets, plan.lr_groups)):
            if touched.isdisjoint(members):
                continue
            b["lrs"] = [lrs[gi] for gi in members]
            if plan.native is not None:
                plan.native.set_lrs(k, b["lrs"])
        for gi in changed:
            plan.lrs[gi] = _freeze(groups[gi]["lr"])
        return True

    @staticmethod
    def _check_sharded_grad(p: Tensor, g: Tensor, name: str) -> None:
        """A DTensor parameter needs a DTensor gradient laid out like it (FSDP2 reduce-scatters the
        gradients into the parameters' layout), and a plain parameter a plain gradient."""
        if not (_is_sharded(p) and _is_sharded(g)):
            raise RuntimeError(
                f"the gradient of {name} is a {type(g).__name__} but the parameter is a {type(p).__name__}; "
                "a DTensor parameter needs a DTensor gradient laid out like it, a plain parameter a plain gradient"
            )
        if not _same_layout(p, g):
            raise RuntimeError(
                f"the gradient of {name} has placements {tuple(g.placements)} on {g.device_mesh}, but the parameter "
                f"has {tuple(p.placements)} on {p.device_mesh}; a Partial gradient is not reduced yet, any other "
                "must be redistributed to the parameter's placements before the step"
            )

    def _check_state(self, p: Tensor, name: str, hint: Optional[str] = None) -> None:
        """The state a step will pass to the kernel still fits the parameter (it may not after
        `model.double()` / `.to(device)` behind the optimizer's back): checked before any write."""
        state = self.state.get(p)
        if not state:
            return
        if hint is None:
            hint = ("; was the model converted or moved after the optimizer was created? Create the optimizer "
                    "afterwards, or load a state_dict")
        sharded = _is_sharded(p)
        for key, value in state.items():
            if not isinstance(value, Tensor):
                continue
            if key == "step":
                if value.device != p.device or value.numel() != 1:
                    raise RuntimeError(f"{name}: its optimizer state 'step' is on {value.device}, the parameter on {p.device}{hint}")
                continue
            if sharded != _is_sharded(value) or (sharded and not _same_layout(value, p)):
                layout = (lambda t: f"a DTensor with placements {tuple(t.placements)}" if _is_sharded(t) else "a plain tensor")
                raise RuntimeError(
                    f"{name}: its optimizer state '{key}' is {layout(value)} but the parameter is {layout(p)}; the "
                    "state of a DTensor parameter must be laid out like it (load_state_dict shards full tensors)"
                )
            if value.shape != p.shape or value.device != p.device:
                raise RuntimeError(
                    f"{name}: its optimizer state '{key}' has shape {tuple(value.shape)} on {value.device}, but the "
                    f"parameter has shape {tuple(p.shape)} on {p.device}{hint}"
                )
            if key in self._STATE_KEYS and value.dtype != _state_dtype(p):
                raise RuntimeError(
                    f"{name}: its optimizer state '{key}' is {value.dtype} but a {p.dtype} parameter needs "
                    f"{_state_dtype(p)} state{hint}"
                )
            if key == "anchor" and value.dtype not in (p.dtype, torch.float32, torch.bfloat16):
                raise RuntimeError(f"{name}: its anchor is {value.dtype}, not usable with a {p.dtype} parameter{hint}")
            if key == "mask" and value.dtype != torch.bool:
                raise RuntimeError(f"{name}: its mask is {value.dtype}, expected torch.bool")

    @staticmethod
    def _grad_like_param(p: Tensor, g: Tensor) -> Tensor:
        return _laid_out_like(p, g)  # DTensors: their local shards, after _local (_finish_bucket)

    @staticmethod
    def _lr_entry(group: Dict[str, Any], device: torch.device,
                  cache: Dict[Tuple[int, torch.device], Tensor]) -> Tuple[float, Optional[Tensor]]:
        """(lr as float, lr as a scalar tensor on `device` or None). A tensor lr is moved to the
        device once per tensor and step, so all parameters of a group (and groups sharing the lr
        tensor) share one tensor. Keyed by the tensor's id, not the group's: torch.compile
        (Dynamo of torch 2.11) traces id() of a tensor but not of a dict."""
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            return float(lr), None
        key = (id(lr), device)
        if key not in cache:
            cache[key] = lr.detach().to(device=device).reshape(())
        return 0.0, cache[key]


class AdamW(_FusedPenalizedOptimizer):
    r"""AdamW with L2-SP, L1 and masks, fused into one multi-tensor update.

    Per parameter ``p`` with gradient ``g`` and anchor ``p0`` (the weights at construction, or
    ``anchor``):

    1. ``g = -g`` if ``maximize``
    2. ``penalty_mode="coupled"``: ``g = g + l2sp * (p - p0)``
    3. ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2`` (``amsgrad``: ``vmax = max(vmax, v)``)
    4. ``p = p * (1 - lr * weight_decay)``
    5. ``penalty_mode="decoupled"``: ``p = p - lr * l2sp * (p - p0)``
    6. ``p = p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)``
    7. ``l1 > 0``: ``p = sign(p) * max(|p| - lr * l1, 0)``

    Args:
        params: parameters or param groups (dicts; each may override any keyword below and may
            carry ``"anchor"``: one tensor per parameter of the group).
        lr: learning rate, a float or a scalar tensor (a tensor on the parameters' device keeps
            the step capturable in a CUDA graph).
        betas, eps, weight_decay, amsgrad, maximize: as :class:`torch.optim.AdamW`.
        l2sp: strength of the pull toward the anchor. Groups with ``l2sp == 0`` hold no anchor
            (give the new classifier head ``l2sp=0``).
        l1: strength of the L1 penalty (proximal; produces exact zeros).
        anchor: ``"init"`` (copy the parameters now), an iterable with one tensor per parameter,
            in param-group order (the pretrained weights; None for a parameter whose group has
            ``l2sp == 0``), or a mapping ``{param: tensor}`` (parameters of groups with
            ``l2sp == 0`` may be left out).
        anchor_dtype: dtype of the stored anchors; ``torch.bfloat16`` halves their memory for
            float32 parameters. Default: the parameter's dtype. Its name (``"bfloat16"``) works
            too, and is how ``state_dict()`` stores it (torch.distributed.checkpoint's state-dict
            functions take no dtype objects).
        penalty_mode: ``"coupled"`` (L2-SP gradient through the moments) or ``"decoupled"``.
        masks: optional mapping ``param -> bool mask``; see :meth:`set_mask`.
    """

    _STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _FLOAT32_KEYS = ("lr", "weight_decay", "l2sp", "l1", "eps")
    _HYPER_KEYS = _FusedPenalizedOptimizer._HYPER_KEYS + ("betas", "eps", "amsgrad")

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, l2sp: float = 0.0,
                 l1: float = 0.0, anchor: Union[str, Iterable[Tensor]] = "init",
                 anchor_dtype: Union[torch.dtype, str, None] = None, penalty_mode: str = "coupled",
                 maximize: bool = False, masks: Optional[Mapping[Tensor, Tensor]] = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, l2sp=l2sp, l1=l1,
                        anchor_dtype=anchor_dtype, penalty_mode=penalty_mode, maximize=maximize)
        self._validate_group(defaults, "")
        super().__init__(params, defaults, anchor, masks)

    def _validate_group(self, group: Dict[str, Any], where: str) -> None:
        super()._validate_group(group, where)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas{where} must be a pair (beta1, beta2), got {betas!r}")
        _check_number("betas[0]", betas[0], high=1.0, where=where)
        _check_number("betas[1]", betas[1], high=1.0, where=where)
        _check_number("eps", group["eps"], where=where)
        _check_flag(group, "amsgrad", where)

    def _init_state(self, p: Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            dt = _state_dtype(p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dt, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        self._step_called[0] = True  # see _FusedPenalizedOptimizer._opt_called
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._run_native_plan():
            return loss
        planned = self._plan_grads()
        if planned is None:
            planned = self._build_buckets(self._collect())
            self._save_plan(planned)
        for (device, _dtype, amsgrad, maximize, decoupled, _sharded), b in planned:
            grad_scale, found_inf = self._amp_tensors(device)
            base = b.get("step_base")
            if base is not None:
                base.add_(1.0)
            else:
                torch._foreach_add_(b["steps"], 1.0)
            try:
                torch.ops.pyfinetune.fused_adamw_(
                    b["params"], b["grads"], b["exp_avgs"], b["exp_avg_sqs"], b["max_exp_avg_sqs"], b["anchors"],
                    b["masks"], b["steps"], b["lrs"], b["lr_tensors"], b["beta1s"], b["beta2s"], b["epss"],
                    b["weight_decays"], b["l2sps"], b["l1s"], amsgrad=amsgrad, maximize=maximize,
                    decoupled_l2sp=decoupled, grad_scale=grad_scale, found_inf=found_inf)
            except BaseException:
                # The op checks everything before it writes: of this launch only the step counts
                # moved. Take them back, so that a step that raised leaves no trace on these
                # parameters (earlier launches of this step did update theirs, counts included).
                if base is not None:
                    base.sub_(1.0)
                else:
                    torch._foreach_sub_(b["steps"], 1.0)
                raise
            if found_inf is not None:
                # A skipped step does not count (as torch's fused optimizers).
                if base is not None:
                    base.sub_(found_inf)
                else:
                    torch._foreach_sub_(b["steps"], [found_inf] * len(b["steps"]))
        return loss

    def _add_native_launch(self, native, key: Tuple, b: Dict[str, Any]) -> None:
        _device, _dtype, amsgrad, maximize, decoupled, _sharded = key
        native.add_adamw(b["params"], b["exp_avgs"], b["exp_avg_sqs"], b["max_exp_avg_sqs"], b["anchors"], b["masks"],
                         b["steps"], b.get("step_base"), b["lrs"], b["beta1s"], b["beta2s"], b["epss"],
                         b["weight_decays"], b["l2sps"], b["l1s"], amsgrad, maximize, decoupled)

    def _build_buckets(self, items) -> List[Tuple[Tuple, Dict[str, list]]]:
        """The kernel launches of a step: (flags, argument lists) per bucket; creates missing state."""
        buckets: Dict[Tuple, Dict[str, list]] = {}  # plain dicts: Dynamo 2.6 asserts on nested defaultdicts
        lr_cache: Dict[Tuple[int, torch.device], Tensor] = {}
        for group, p, g in items:
            state = self._init_state(p, group)
            key = (p.device, p.dtype, group["amsgrad"], group["maximize"], group["penalty_mode"] == "decoupled",
                   _is_sharded(p))
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = {name: [] for name in _ADAMW_LISTS}
            b["params"].append(p)
            b["grads"].append(self._grad_like_param(p, g))
            b["exp_avgs"].append(state["exp_avg"])
            b["exp_avg_sqs"].append(state["exp_avg_sq"])
            if group["amsgrad"]:
                b["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
            b["anchors"].append(state.get("anchor") if group["l2sp"] > 0 else None)
            b["masks"].append(state.get("mask"))
            b["steps"].append(state["step"])
            lr, lr_t = self._lr_entry(group, p.device, lr_cache)
            b["lrs"].append(lr)
            b["lr_tensors"].append(lr_t)
            b["beta1s"].append(float(group["betas"][0]))
            b["beta2s"].append(float(group["betas"][1]))
            b["epss"].append(float(group["eps"]))
            b["weight_decays"].append(float(group["weight_decay"]))
            b["l2sps"].append(float(group["l2sp"]))
            b["l1s"].append(float(group["l1"]))
        return [(key, _finish_bucket(b, sharded=key[-1])) for key, b in buckets.items()]


class SGD(_FusedPenalizedOptimizer):
    r"""SGD (momentum, dampening, Nesterov) with L2-SP, L1 and masks, fused into one update.

    Per parameter: ``g = (maximize ? -g : g) + weight_decay * p`` (+ ``l2sp * (p - p0)`` when
    coupled); torch's momentum update ``buf = momentum * buf + (1 - dampening) * g`` (``buf = g`` on
    the first step), ``g = g + momentum * buf`` with Nesterov else ``g = buf``; ``p -= lr * l2sp *
    (p - p0)`` when decoupled; ``p -= lr * g``; then the L1 proximal step.

    Arguments as :class:`torch.optim.SGD` plus ``l2sp``, ``l1``, ``anchor``, ``anchor_dtype``,
    ``penalty_mode`` and ``masks`` as in :class:`AdamW`.
    """

    _STATE_KEYS = ("momentum_buffer",)
    _FLOAT32_KEYS = ("lr", "weight_decay", "l2sp", "l1", "momentum")
    _HYPER_KEYS = _FusedPenalizedOptimizer._HYPER_KEYS + ("momentum", "dampening", "nesterov")

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, *, l2sp: float = 0.0, l1: float = 0.0,
                 anchor: Union[str, Iterable[Tensor]] = "init", anchor_dtype: Union[torch.dtype, str, None] = None,
                 penalty_mode: str = "coupled", maximize: bool = False,
                 masks: Optional[Mapping[Tensor, Tensor]] = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
                        l2sp=l2sp, l1=l1, anchor_dtype=anchor_dtype, penalty_mode=penalty_mode, maximize=maximize)
        try:
            self._validate_group(defaults, "")
        except TypeError as e:
            # torch.optim.SGD's positional order is (lr, momentum, dampening, weight_decay,
            # nesterov); this one's is the (..., nesterov, weight_decay): a number for
            # nesterov or a bool for weight_decay is likely torch's order.
            if str(e).startswith(("nesterov must be a bool", "weight_decay must be a number, got bool")):
                raise TypeError(f"{e} (pyfinetune.optim.SGD takes nesterov before weight_decay when they are given by "
                                "position; torch.optim.SGD takes weight_decay first: pass them by keyword)") from None
            raise
        # Made here, not at the first step: torch.compile (Dynamo of torch 2.11) refuses to add an
        # attribute to an optimizer inside a compiled step.
        self._unstarted_buffers: set = set()
        super().__init__(params, defaults, anchor, masks)

    def _validate_group(self, group: Dict[str, Any], where: str) -> None:
        super()._validate_group(group, where)
        _check_number("momentum", group["momentum"], where=where)
        _check_number("dampening", group["dampening"], high=1.0, high_inclusive=True, where=where)
        _check_flag(group, "nesterov", where)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"nesterov=True{where} requires momentum > 0 and dampening = 0")

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step. ``closure`` re-evaluates the model and returns the loss."""
        self._step_called[0] = True  # see _FusedPenalizedOptimizer._opt_called
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._run_native_plan():
            return loss
        planned = self._plan_grads()
        fresh_dampened: List[Tensor] = []
        created: List[Tensor] = []
        if planned is None:
            planned = self._build_buckets(self._collect(), created, fresh_dampened)
            unstarted = self._unstarted()
            for p in created:  # not difference_update(list): Dynamo 2.11 compares tensors with == there
                unstarted.discard(p)
            if not created:
                self._save_plan(planned)
            elif not torch.compiler.is_compiling():
                self._plan = None  # this step starts momentum buffers with dampening 0; the next differs
        for i, ((device, _dtype, _has_momentum, nesterov, maximize, decoupled, _sharded), b) in enumerate(planned):
            grad_scale, found_inf = self._amp_tensors(device)
            try:
                torch.ops.pyfinetune.fused_sgd_(
                    b["params"], b["grads"], b["momentum_buffers"], b["anchors"], b["masks"], b["lrs"],
                    b["lr_tensors"], b["momentums"], b["dampenings"], b["weight_decays"], b["l2sps"], b["l1s"],
                    nesterov=nesterov, maximize=maximize, decoupled_l2sp=decoupled, grad_scale=grad_scale,
                    found_inf=found_inf)
            except BaseException:
                # The op checks everything before it writes: the buffers created for this launch
                # and the later ones were not started; the next step must still start them from
                # the gradient (no dampening).
                if created:
                    not_run = {id(p) for _, later in planned[i:] for p in later.get("sources", later["params"])}
                    self._unstarted().update(p for p in created if id(p) in not_run)
                raise
        if fresh_dampened and getattr(self, "found_inf", None) is not None and bool(self.found_inf.item() != 0):
            # The first step of these buffers was skipped (GradScaler found inf/NaN): drop them so
            # the next step starts them from the gradient again, as torch does. Only this rare
            # case (dampening != 0, first step, AMP) reads found_inf on the host.
            for p in fresh_dampened:
                del self.state[p]["momentum_buffer"]
        return loss

    def _init_state(self, p: Tensor, group: Dict[str, Any]) -> Dict[str, Any]:
        state = self.state[p]
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=_state_dtype(p), memory_format=torch.preserve_format)
            # Not started: its first step starts it from the gradient (no dampening), as a buffer
            # created by that step would be; a loaded state replaces it. Kept beside the state, not
            # in it: torch.distributed.checkpoint loads into the keys of a fresh optimizer's
            # state_dict and refuses a key the checkpoint lacks. Pickling and deepcopy carry it; a
            # state_dict does not (a checkpoint taken before the first gradient resumes with its
            # buffers counted as started: with dampening, the first update is dampened).
            self._unstarted().add(p)
        return state

    def _unstarted(self) -> set:
        """Parameters whose momentum buffer is still the zeros of init_state (FSDP2 parameters
        get theirs at construction)."""
        return self._unstarted_buffers

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        unstarted = self._unstarted()
        state["_unstarted_positions"] = [(gi, j) for gi, g in enumerate(self.param_groups)
                                         for j, p in enumerate(g["params"]) if p in unstarted]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        positions = state.pop("_unstarted_positions", [])
        super().__setstate__(state)
        self._unstarted_buffers = {self.param_groups[gi]["params"][j] for gi, j in positions}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._unstarted().clear()  # the loaded buffers are started; missing ones are created by a step

    def _state_snapshot(self) -> Tuple[Any, ...]:
        # Also which zero momentum buffers are still to be started from the gradient (a rolled-back
        # load must not leave init_state's buffers counted as started: with dampening they differ).
        return super()._state_snapshot() + (set(self._unstarted()),)

    def _restore_state(self, snapshot: Tuple[Any, ...]) -> None:
        super()._restore_state(snapshot)
        self._unstarted_buffers = set(snapshot[2])

    def _add_native_launch(self, native, key: Tuple, b: Dict[str, Any]) -> None:
        _device, _dtype, _has_momentum, nesterov, maximize, decoupled, _sharded = key
        native.add_sgd(b["params"], b["momentum_buffers"], b["anchors"], b["masks"], b["lrs"], b["momentums"],
                       b["dampenings"], b["weight_decays"], b["l2sps"], b["l1s"], nesterov, maximize, decoupled)

    def _build_buckets(self, items, created: List[Tensor],
                       fresh_dampened: List[Tensor]) -> List[Tuple[Tuple, Dict[str, list]]]:
        """The kernel launches of a step: (flags, argument lists) per bucket; creates missing
        momentum buffers (listed in `created`, and in `fresh_dampened` where dampening != 0)."""
        buckets: Dict[Tuple, Dict[str, list]] = {}  # plain dicts: Dynamo 2.6 asserts on nested defaultdicts
        lr_cache: Dict[Tuple[int, torch.device], Tensor] = {}
        for group, p, g in items:
            state = self.state[p]
            has_momentum = group["momentum"] != 0
            dampening = float(group["dampening"])
            if has_momentum and (state.get("momentum_buffer") is None or p in self._unstarted()):
                # torch.optim.SGD starts the buffer at the gradient; with a zero buffer and no
                # dampening, momentum * 0 + 1 * g == g exactly.
                self._init_state(p, group)
                created.append(p)
                if dampening != 0.0:
                    fresh_dampened.append(p)
                dampening = 0.0
            key = (p.device, p.dtype, has_momentum, group["nesterov"], group["maximize"],
                   group["penalty_mode"] == "decoupled", _is_sharded(p))
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = {name: [] for name in _SGD_LISTS}
            b["params"].append(p)
            b["grads"].append(self._grad_like_param(p, g))
            if has_momentum:
                b["momentum_buffers"].append(state["momentum_buffer"])
            b["anchors"].append(state.get("anchor") if group["l2sp"] > 0 else None)
            b["masks"].append(state.get("mask"))
            lr, lr_t = self._lr_entry(group, p.device, lr_cache)
            b["lrs"].append(lr)
            b["lr_tensors"].append(lr_t)
            b["momentums"].append(float(group["momentum"]))
            b["dampenings"].append(dampening)
            b["weight_decays"].append(float(group["weight_decay"]))
            b["l2sps"].append(float(group["l2sp"]))
            b["l1s"].append(float(group["l1"]))
        return [(key, _finish_bucket(b, sharded=key[-1])) for key, b in buckets.items()]


def _local_grads(sources: List[Tensor], params: List[Tensor]) -> Optional[List[Optional[Tensor]]]:
    """The local shards of the gradients of the DTensor parameters ``sources``, or None when a
    parameter's local shard is no longer ``params``' (FSDP2 may replace it, e.g. after
    ``model.to()``) or a gradient is not laid out like its parameter. A missing gradient gives None."""
    dtensor = _dtensor_type()
    grads = []
    for p, local in zip(sources, params):
        if p.to_local() is not local:
            return None
        g = p.grad
        if g is not None:
            if not isinstance(g, dtensor) or not _same_layout(g, p):
                return None
            g = g.to_local()
        grads.append(g)
    return grads


# The per-parameter tensor lists of a bucket (those a step passes to the kernel).
_TENSOR_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "momentum_buffers", "anchors",
                 "masks")


# The argument lists of one launch bucket, all created up front (plain dicts: Dynamo 2.6 fails
# on nested defaultdicts); `_finish_bucket` empties the optional ones that hold only None.
_ADAMW_LISTS = ('params', 'grads', 'exp_avgs', 'exp_avg_sqs', 'max_exp_avg_sqs', 'anchors', 'masks', 'steps',
                'lrs', 'lr_tensors', 'beta1s', 'beta2s', 'epss', 'weight_decays', 'l2sps', 'l1s')
_SGD_LISTS = ('params', 'grads', 'momentum_buffers', 'anchors', 'masks', 'lrs', 'lr_tensors', 'momentums',
              'dampenings', 'weight_decays', 'l2sps', 'l1s')


def _finish_bucket(b: Dict[str, list], sharded: bool) -> Dict[str, list]:
    """Optional per-parameter lists (lr tensors, anchors, masks) that hold only None go to the
    kernel empty; a plain dict, so that a missing list reads as an error.

    A ``sharded`` bucket (DTensor parameters) hands the kernel the local shards, which it updates
    in place, and keeps the DTensor parameters as ``"sources"``, where the next steps find their
    gradients."""
    for key in ("lr_tensors", "anchors", "masks"):
        if not any(t is not None for t in b[key]):
            b[key] = []
    out = dict(b)
    if sharded:
        out["sources"] = out["params"]
        for key in _TENSOR_LISTS:
            if key in out:
                out[key] = [_local(t) for t in out[key]]
        out["grads"] = [_FusedPenalizedOptimizer._grad_like_param(p, g) for p, g in zip(out["params"], out["grads"])]
    return out


def _mark_scheduler_aware(cls) -> None:
    # See `_FusedPenalizedOptimizer._opt_called`. functools.wraps (torch's profiling hook around
    # `step`) copies the mark to the wrappers it makes.
    cls.step._wrapped_by_lr_sched = True


_mark_scheduler_aware(AdamW)
_mark_scheduler_aware(SGD)


def _compile_can_trace_the_ops() -> bool:
    """Whether torch.compile can put fused_adamw_ / fused_sgd_ (custom ops that mutate lists of
    tensors) into a graph: torch's auto-functionalization covers them from torch 2.6 (2.5 not
    tested); torch 2.4's refused them ("Found a custom (non-ATen) operator whose output has alias
    annotations"), which failed every compiled function that called our step."""
    try:
        from torch._higher_order_ops.auto_functionalize import can_auto_functionalize
    except ImportError:
        return False
    return all(can_auto_functionalize(op) for op in (torch.ops.pyfinetune.fused_adamw_.default,
                                                     torch.ops.pyfinetune.fused_sgd_.default))


COMPILE_TRACES_STEP = _compile_can_trace_the_ops()
if not COMPILE_TRACES_STEP:
    # There the step runs eagerly, outside the compiled graph (a graph break); under
    # torch.compile(fullgraph=True) torch refuses it as a disabled function.
    for _cls in (AdamW, SGD):
        _cls.step = torch.compiler.disable(_cls.step)
    del _cls
