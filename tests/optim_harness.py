"""Runs a pyfinetune optimizer and the float64 reference side by side on the same gradients."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from conftest import LOW_DTYPES, assert_close, state_tol
from pyfinetune.optim import SGD, AdamW
from reference_optim import STATE_KEYS, Reference

TRANSPOSED = "transposed"  # a dense, non-contiguous parameter: randn(5, 7).t()


def make_param(spec, dtype, device, scale=0.3) -> torch.nn.Parameter:
    """A parameter of shape ``spec`` (or TRANSPOSED) with values ~``scale``."""
    if spec == TRANSPOSED:
        return torch.nn.Parameter((scale * torch.randn(5, 7, device=device)).t().to(dtype))
    return torch.nn.Parameter((scale * torch.randn(spec, device=device)).to(dtype))


class Pair:
    """Our optimizer and the reference, built from the same initial values.

    Args:
        kind: "adamw" or "sgd".
        groups: list of ``(specs, opts)``; ``specs`` are shapes (or TRANSPOSED), ``opts`` the
            group's keywords (may include ``"anchor"``: a list of tensors, one per parameter).
        anchor: the optimizer's ``anchor`` argument (a flat list) or None for "init".
        masks: ``{(group, index): bool tensor}`` passed as the optimizer's ``masks`` argument.
        grad_std: standard deviation of the random gradients.
        **defaults: keyword arguments of both optimizers.

    Low-precision parameters are compared after every step and then copied into the reference
    (see ``conftest.TOL``): the bound is one ulp per step, not a drift.
    """

    def __init__(self, kind: str, device, dtype, groups: List[Tuple[list, Dict[str, Any]]],
                 anchor: Optional[List[torch.Tensor]] = None, masks: Optional[Dict[tuple, torch.Tensor]] = None,
                 grad_std: float = 1.0, **defaults):
        self.kind, self.device, self.dtype, self.grad_std = kind, device, dtype, grad_std
        self.params: List[List[torch.nn.Parameter]] = []
        ours_groups, ref_groups = [], []
        for specs, opts in groups:
            ps = [make_param(s, dtype, device) for s in specs]
            self.params.append(ps)
            ours_groups.append(dict(opts, params=ps))
            ref_groups.append(dict(opts, params=[p.detach().clone() for p in ps]))
        self.initial = [[p.detach().clone() for p in ps] for ps in self.params]
        # The reference is built first: the optimizer zeroes masked entries in place.
        self.ref = Reference(kind, ref_groups, anchor=anchor, masks=masks, **defaults)
        cls = AdamW if kind == "adamw" else SGD
        opt_masks = None if masks is None else {self.params[g][j]: m for (g, j), m in masks.items()}
        self.opt = cls(ours_groups, anchor="init" if anchor is None else iter(anchor), masks=opt_masks, **defaults)
        self.moved = [[False] * len(ps) for ps in self.params]

    def all_params(self):
        return [(g, j, p) for g, ps in enumerate(self.params) for j, p in enumerate(ps)]

    def grads(self) -> List[List[torch.Tensor]]:
        return [[(self.grad_std * torch.randn(p.shape, device=self.device)).to(self.dtype) for p in ps]
                for ps in self.params]

    def step(self, n: int = 1, check_every_step: bool = True, after_step=None) -> None:
        for _ in range(n):
            grads = self.grads()
            for g, j, p in self.all_params():
                p.grad = grads[g][j]
            before = [[p.detach().clone() for p in ps] for ps in self.params]
            self.opt.step()
            self.ref.step(grads)
            if after_step is not None:
                after_step()
            for g, j, p in self.all_params():
                self.moved[g][j] |= not torch.equal(before[g][j], p)
            if check_every_step or self.dtype in LOW_DTYPES:
                self.check_params()
            if self.dtype in LOW_DTYPES:
                for g, j, p in self.all_params():
                    self.ref.params[g][j] = p.detach().double()

    def check_params(self) -> None:
        for g, j, p in self.all_params():
            assert_close(p, self.ref.params[g][j], self.dtype, msg=f"param {j} of group {g}")

    def check(self, must_move: bool = True) -> None:
        """Parameters and state equal the reference; every parameter with elements moved."""
        self.check_params()
        state_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        for g, j, p in self.all_params():
            st, rst = self.opt.state[p], self.ref.state[g][j]
            if must_move and p.numel() > 0:
                assert self.moved[g][j], f"param {j} of group {g} never changed"
            if self.kind == "adamw":
                assert float(st["step"]) == rst["step"]
            for key in STATE_KEYS[self.kind]:
                if key not in rst:
                    assert st.get(key) is None, f"{key} of param {j} of group {g} should not exist"
                    continue
                assert st[key].dtype == state_dtype and st[key].stride() == p.stride(), key
                torch.testing.assert_close(st[key].double(), rst[key], **state_tol(self.dtype),
                                           msg=lambda m: f"{key} of param {j} of group {g}\n{m}")
