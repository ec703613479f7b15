"""A float64 reference of pyfinetune's fused AdamW and SGD, written from the docstrings of
:mod:`pyfinetune.optim` with plain torch float64 ops (no kernel code, no torch.optim).

The math runs in float64. To compare with a kernel that stores bf16/fp16 parameters and float32
state, :class:`Reference` rounds what the kernel stores after each step: the parameters to their
own dtype, the state to float32 (float64 for float64 parameters), the anchors to their dtype. The
remaining difference is the kernel's float32 arithmetic alone.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

F64 = torch.float64


def round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` (float64) rounded to ``dtype`` and back: the value a ``dtype`` tensor would store."""
    return x.to(dtype).to(F64)


def state_dtype_of(param_dtype: torch.dtype) -> torch.dtype:
    return F64 if param_dtype == F64 else torch.float32


def _f32(value: float) -> float:
    """``value`` rounded to float32 (what a kernel reading it as a float32 scalar sees)."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def l1_prox(p: Tensor, threshold: float) -> Tensor:
    """``sign(p) * max(|p| - threshold, 0)``."""
    return torch.sign(p) * torch.clamp(p.abs() - threshold, min=0.0)


def adamw_update(p: Tensor, g: Tensor, state: Dict[str, Any], *, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, amsgrad: bool, maximize: bool, l2sp: float, l1: float,
                 anchor: Optional[Tensor], decoupled: bool, grad_scale: float = 1.0) -> Tensor:
    """One AdamW step (docstring steps 1-7) in float64; updates ``state`` and returns the new ``p``."""
    step = state.get("step", 0) + 1
    state["step"] = step
    m = state.get("exp_avg", torch.zeros_like(p))
    v = state.get("exp_avg_sq", torch.zeros_like(p))
    g = g / grad_scale
    if maximize:                                                     # 1
        g = -g
    if l2sp > 0 and not decoupled:                                   # 2
        g = g + l2sp * (p - anchor)
    m = beta1 * m + (1 - beta1) * g                                  # 3
    v = beta2 * v + (1 - beta2) * g * g
    second = v
    if amsgrad:
        vmax = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(p)), v)
        state["max_exp_avg_sq"] = vmax
        second = vmax
    p = p * (1 - lr * weight_decay)                                  # 4
    if l2sp > 0 and decoupled:                                       # 5
        p = p - lr * l2sp * (p - anchor)
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    p = p - lr / bc1 * m / (torch.sqrt(second / bc2) + eps)          # 6
    if l1 > 0:                                                       # 7
        p = l1_prox(p, lr * l1)
    state["exp_avg"], state["exp_avg_sq"] = m, v
    return p


def sgd_update(p: Tensor, g: Tensor, state: Dict[str, Any], *, lr: float, momentum: float, dampening: float,
               nesterov: bool, weight_decay: float, maximize: bool, l2sp: float, l1: float,
               anchor: Optional[Tensor], decoupled: bool, grad_scale: float = 1.0) -> Tensor:
    """One SGD step in float64 (torch.optim.SGD plus the penalties); updates ``state``."""
    g = g / grad_scale
    if maximize:
        g = -g
    g = g + weight_decay * p
    if l2sp > 0 and not decoupled:
        g = g + l2sp * (p - anchor)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        buf = g.clone() if buf is None else momentum * buf + (1 - dampening) * g
        state["momentum_buffer"] = buf
        g = g + momentum * buf if nesterov else buf
    if l2sp > 0 and decoupled:
        p = p - lr * l2sp * (p - anchor)
    p = p - lr * g
    if l1 > 0:
        p = l1_prox(p, lr * l1)
    return p


ADAMW_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
                      l2sp=0.0, l1=0.0, penalty_mode="coupled", anchor_dtype=None)
SGD_DEFAULTS = dict(lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
                    l2sp=0.0, l1=0.0, penalty_mode="coupled", anchor_dtype=None)
STATE_KEYS = {"adamw": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "sgd": ("momentum_buffer",)}


class Reference:
    """The reference optimizer over param groups, mirroring ``pyfinetune.optim.AdamW`` / ``SGD``.

    Args:
        kind: "adamw" or "sgd".
        groups: list of dicts with ``"params"`` (the initial parameter tensors; their dtype is the
            storage dtype) and per-group overrides of the keyword arguments.
        anchor: None (anchor at the initial values) or a flat list, one tensor per parameter in
            param-group order (as the optimizer's ``anchor`` argument).
        masks: ``{(group, index): bool tensor}``.
        **defaults: hyper-parameters (as the optimizer's keywords).

    ``groups[i]`` values may be changed between steps (e.g. ``lr``), like ``param_groups``.
    """

    def __init__(self, kind: str, groups: List[Dict[str, Any]], anchor: Optional[List[Tensor]] = None,
                 masks: Optional[Dict[tuple, Tensor]] = None, **defaults):
        self.kind = kind
        base = dict(ADAMW_DEFAULTS if kind == "adamw" else SGD_DEFAULTS)
        base.update(defaults)
        self.groups, self.params, self.dtypes, self.anchors, self.state = [], [], [], [], []
        self.masks: Dict[tuple, Tensor] = {}
        flat = 0
        for gi, group in enumerate(groups):
            hyper = dict(base)
            hyper.update({k: v for k, v in group.items() if k not in ("params", "anchor")})
            self.groups.append(hyper)
            ps, dts, anc, st = [], [], [], []
            for j, p in enumerate(group["params"]):
                p64 = p.detach().to(F64).clone()
                src = p64
                if "anchor" in group:
                    src = group["anchor"][j].detach().to(F64)
                elif anchor is not None:
                    src = anchor[flat].detach().to(F64)
                flat += 1
                if hyper["l2sp"] > 0:
                    # The optimizer stores the anchor in anchor_dtype (default: the param's dtype).
                    anc.append(round_to(src, hyper["anchor_dtype"] or p.dtype))
                else:
                    anc.append(None)
                ps.append(p64)
                dts.append(p.dtype)
                st.append({})
            self.params.append(ps)
            self.dtypes.append(dts)
            self.anchors.append(anc)
            self.state.append(st)
        for key, m in (masks or {}).items():
            self.set_mask(key, m)

    def set_mask(self, key: tuple, mask: Tensor) -> None:
        gi, j = key
        self.masks[key] = mask.clone()
        self.params[gi][j] = torch.where(mask, self.params[gi][j], 0.0)
        st = self.state[gi][j]
        for k in STATE_KEYS[self.kind]:
            if k in st:
                st[k] = torch.where(mask, st[k], 0.0)

    def step(self, grads: List[List[Optional[Tensor]]], grad_scale: float = 1.0) -> None:
        """One step; ``grads[g][j]`` is the gradient of parameter j of group g (None: skipped)."""
        for gi, hyper in enumerate(self.groups):
            lr = float(hyper["lr"])
            for j, g in enumerate(grads[gi]):
                if g is None:
                    continue
                p, st, anchor = self.params[gi][j], self.state[gi][j], self.anchors[gi][j]
                g = g.detach().to(F64)
                decoupled = hyper["penalty_mode"] == "decoupled"
                # The kernels read lr, weight_decay, l2sp, l1 and eps as float32 for float32 / 16-bit
                # parameters (the optimizer's _FLOAT32_KEYS): the reference takes the same values, or
                # a gradient that the L2-SP pull cancels (maximize: -g + l2sp * (p - anchor) = 0 in
                # float64 with l2sp = 0.3, a 3e-9 residue with float32's 0.3) differs at Adam's first
                # step by a whole lr-sized move (m / (sqrt(v) + eps) of a 3e-9 gradient is 0.23).
                h = {k: (hyper[k] if self.dtypes[gi][j] == F64 else _f32(hyper[k]))
                     for k in ("weight_decay", "l2sp", "l1") + (("eps",) if self.kind == "adamw" else ())}
                lr_j = lr if self.dtypes[gi][j] == F64 else _f32(lr)
                if self.kind == "adamw":
                    p = adamw_update(p, g, st, lr=lr_j, beta1=hyper["betas"][0], beta2=hyper["betas"][1],
                                     eps=h["eps"], weight_decay=h["weight_decay"], amsgrad=hyper["amsgrad"],
                                     maximize=hyper["maximize"], l2sp=h["l2sp"], l1=h["l1"], anchor=anchor,
                                     decoupled=decoupled, grad_scale=grad_scale)
                else:
                    p = sgd_update(p, g, st, lr=lr_j, momentum=hyper["momentum"], dampening=hyper["dampening"],
                                   nesterov=hyper["nesterov"], weight_decay=h["weight_decay"],
                                   maximize=hyper["maximize"], l2sp=h["l2sp"], l1=h["l1"], anchor=anchor,
                                   decoupled=decoupled, grad_scale=grad_scale)
                mask = self.masks.get((gi, j))
                if mask is not None:
                    p = torch.where(mask, p, 0.0)
                # What the kernel stores: the parameter in its dtype, the state in float32/64.
                dt = self.dtypes[gi][j]
                self.params[gi][j] = round_to(p, dt)
                for k in STATE_KEYS[self.kind]:
                    if k in st:
                        s = st[k] if mask is None else torch.where(mask, st[k], 0.0)
                        st[k] = round_to(s, state_dtype_of(dt))
