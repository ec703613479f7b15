"""L2-SP (coupled and decoupled), L1, anchors, masks and learning-rate handling of
pyfinetune.optim.AdamW / SGD against the float64 reference (tests/reference_optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import bits, device_dtype_params
from optim_harness import TRANSPOSED, Pair
from reference_optim import STATE_KEYS

KINDS = ["adamw", "sgd"]
STEPS = 30
# Hyper-parameters with every term active; lr is large enough to move bf16 values.
DEFAULTS = {
    "adamw": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05),
    "sgd": dict(lr=2e-2, momentum=0.9, dampening=0.1, weight_decay=0.05),
}


def _anchors(pair_shapes, device, dtype, offset=0.5):
    """Anchors far from the initial values (|p - p0| ~ offset), so the pull is visible from the
    first step; shapes follow the parameters, in param-group order."""
    out = []
    for spec in pair_shapes:
        shape = (7, 5) if spec == TRANSPOSED else spec
        out.append((offset * torch.randn(shape, device=device)).to(dtype))
    return out


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_l2sp(device, dtype, kind, mode):
    groups = [
        ([(7,), (33, 17), TRANSPOSED], dict(l2sp=0.5)),
        ([(5,)], dict(l2sp=0.0, lr=5e-3)),          # the new head: no anchor
        ([(3, 5, 7), (1,)], dict(l2sp=2.0, weight_decay=0.0)),
    ]
    shapes = [s for specs, _ in groups for s in specs]
    anchor = _anchors(shapes, device, dtype)
    pair = Pair(kind, device, dtype, groups, anchor=anchor, penalty_mode=mode, **DEFAULTS[kind])
    pair.step(STEPS)
    pair.check()
    assert pair.opt.anchor_of(pair.params[1][0]) is None
    for p in pair.params[0] + pair.params[2]:
        assert pair.opt.anchor_of(p) is not None


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_l2sp_anchor_init(device, dtype, kind, mode):
    # anchor="init": the anchors are the parameters' values at construction, stored in their dtype.
    groups = [([(7,), (4, 6)], dict(l2sp=1.0)), ([(3,)], dict(l2sp=0.0))]
    pair = Pair(kind, device, dtype, groups, penalty_mode=mode, **DEFAULTS[kind])
    for j, p in enumerate(pair.params[0]):
        a = pair.opt.anchor_of(p)
        assert a is not None and a.dtype == dtype and a.data_ptr() != p.data_ptr()
        assert torch.equal(bits(a), bits(pair.initial[0][j]))
    assert pair.opt.anchor_of(pair.params[1][0]) is None
    pair.step(STEPS)
    pair.check()
    # The anchor is a copy: the steps did not move it.
    for j, p in enumerate(pair.params[0]):
        assert torch.equal(bits(pair.opt.anchor_of(p)), bits(pair.initial[0][j]))


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
def test_l2sp_pull_changes_the_result(device, dtype, kind):
    # Guard against a kernel that ignores the anchor: one step with l2sp differs from one without
    # by lr * l2sp * (p - p0) (decoupled), which is large here.
    torch.manual_seed(1234)
    with_pull = Pair(kind, device, dtype, [([(64,)], dict(l2sp=1.0))],
                     anchor=[torch.full((64,), 10.0, device=device, dtype=dtype)], penalty_mode="decoupled",
                     **DEFAULTS[kind])
    torch.manual_seed(1234)
    without = Pair(kind, device, dtype, [([(64,)], dict(l2sp=0.0))], penalty_mode="decoupled", **DEFAULTS[kind])
    torch.manual_seed(99)
    with_pull.step(1)
    torch.manual_seed(99)
    without.step(1)
    with_pull.check()
    without.check()
    lr = DEFAULTS[kind]["lr"]
    diff = with_pull.params[0][0].double() - without.params[0][0].double()
    # decoupled: p -= lr * l2sp * (p' - p0), p' = the parameter after weight decay (AdamW step 4)
    decayed = without.initial[0][0].double() * ((1 - lr * 0.05) if kind == "adamw" else 1.0)
    expected = lr * 1.0 * (10.0 - decayed)
    assert (diff > 0).all(), "the pull toward p0 = 10 must raise every entry"
    # atol: both results are rounded to the parameter dtype (bf16: up to 2^-8 * 1.2 each).
    torch.testing.assert_close(diff, expected, rtol=0.02, atol=0.012)


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
def test_l1_produces_exact_zeros(device, dtype, kind):
    # The threshold lr * l1 = 0.02 per step, above the typical update, against values ~0.3: many
    # entries reach exact zero and stay there.
    groups = [([(7,), (33, 17)], dict(l1=2.0 if kind == "adamw" else 1.0)), ([(3, 5, 7)], dict(l1=0.0))]
    pair = Pair(kind, device, dtype, groups, grad_std=0.1, **DEFAULTS[kind])
    pair.step(STEPS)
    pair.check()
    for j, p in enumerate(pair.params[0]):
        ref = pair.ref.params[0][j]
        zeros = p == 0
        assert zeros.sum() >= max(1, p.numel() // 4), f"l1 left only {int(zeros.sum())} exact zeros in {p.numel()}"
        assert torch.equal(zeros, ref == 0), "the exact zeros must be where the reference has them"
    # Without l1 nothing is exactly zero.
    assert (pair.params[1][0] != 0).all()


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_all_penalties_together(device, dtype, kind, mode):
    groups = [([(9,), (6, 11)], dict(l2sp=0.3, l1=0.2)), ([TRANSPOSED], dict(l2sp=0.0, l1=0.5, lr=5e-3))]
    extra = dict(amsgrad=True, maximize=True) if kind == "adamw" else dict(nesterov=True, dampening=0.0,
                                                                          maximize=True)
    pair = Pair(kind, device, dtype, groups, anchor=_anchors([(9,), (6, 11), TRANSPOSED], device, dtype),
                penalty_mode=mode, **dict(DEFAULTS[kind], **extra))
    pair.step(STEPS)
    pair.check()


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
def test_explicit_anchors(device, dtype, kind):
    # One anchor per parameter in param-group order, as a generator; the parameters of the l2sp=0
    # group consume their entry but hold no anchor.
    shapes = [(7,), (4, 5), (3,), (2, 3)]
    groups = [([(7,), (4, 5)], dict(l2sp=0.7)), ([(3,)], dict(l2sp=0.0)), ([(2, 3)], dict(l2sp=0.2))]
    anchor = _anchors(shapes, device, torch.float64)  # another dtype: cast to the anchor dtype
    pair = Pair(kind, device, dtype, groups, anchor=anchor, penalty_mode="coupled", **DEFAULTS[kind])
    flat = [p for ps in pair.params for p in ps]
    for p, a in zip(flat, anchor):
        stored = pair.opt.anchor_of(p)
        if p is pair.params[1][0]:
            assert stored is None
            continue
        assert stored.dtype == dtype and torch.equal(stored, a.to(dtype))
    pair.step(STEPS)
    pair.check()


@pytest.mark.parametrize("kind", KINDS)
def test_anchor_as_mapping_or_list_with_placeholders(kind):
    # The same pretrained anchors as a list, as a list with None for the l2sp = 0 group (a new head),
    # and as a mapping {param: tensor} that leaves the head out: the same anchors, the same steps.
    # A dict must be looked up by parameter: iterating it would give the parameters themselves.
    from pyfinetune.optim import SGD, AdamW

    make = {"adamw": AdamW, "sgd": lambda ps, **kw: SGD(ps, momentum=0.9, **kw)}[kind]
    gen = torch.Generator().manual_seed(4)
    shapes = [(5, 3), (7,), (4,)]
    pretrained = [torch.randn(s, generator=gen) for s in shapes]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    runs = []
    for form in ("list", "placeholders", "mapping"):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        if form == "list":
            anchor = pretrained
        elif form == "placeholders":
            anchor = pretrained[:2] + [None]
        else:
            anchor = {ps[1]: pretrained[1], ps[0]: pretrained[0]}  # any order
        groups = [dict(params=ps[:2], l2sp=0.5), dict(params=ps[2:], l2sp=0.0)]
        opt = make(groups, lr=0.05, anchor=anchor)
        for p, a in zip(ps[:2], pretrained):
            assert torch.equal(opt.anchor_of(p), a)
        assert opt.anchor_of(ps[2]) is None
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        runs.append([p.detach().clone() for p in ps])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    # A param group's own "anchor" entry may be a mapping too.
    ps = [torch.nn.Parameter(t.clone()) for t in start[:2]]
    opt = make([dict(params=ps, l2sp=0.5, anchor={ps[0]: pretrained[0], ps[1]: pretrained[1]})], lr=0.05)
    assert all(torch.equal(opt.anchor_of(p), a) for p, a in zip(ps, pretrained))


@pytest.mark.parametrize("device, dtype", device_dtype_params())
def test_group_anchor_entry(device, dtype):
    # A param group may carry its own "anchor" list (e.g. added later with add_param_group).
    a0 = _anchors([(5,), (2, 2)], device, dtype)
    groups = [([(5,), (2, 2)], dict(l2sp=0.4, anchor=a0))]
    pair = Pair("adamw", device, dtype, groups, **DEFAULTS["adamw"])
    for p, a in zip(pair.params[0], a0):
        assert torch.equal(pair.opt.anchor_of(p), a)
    pair.step(STEPS)
    pair.check()
    # add_param_group with an anchor entry, then more steps.
    new = torch.nn.Parameter(torch.randn(4, device=device).to(dtype))
    a_new = torch.randn(4, device=device).to(dtype)
    pair.opt.add_param_group(dict(params=[new], l2sp=0.3, anchor=[a_new]))
    assert torch.equal(pair.opt.anchor_of(new), a_new)


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_anchor_dtype_bfloat16(device, dtype, kind, mode):
    shapes = [(37,), (6, 9), TRANSPOSED]
    anchor = _anchors(shapes, device, torch.float32)
    pair = Pair(kind, device, dtype, [(shapes, dict(l2sp=0.8))], anchor=anchor, anchor_dtype=torch.bfloat16,
                penalty_mode=mode, **DEFAULTS[kind])
    for p, a in zip(pair.params[0], anchor):
        stored = pair.opt.anchor_of(p)
        assert stored.dtype == torch.bfloat16 and stored.stride() == p.stride()
        assert torch.equal(stored, a.to(torch.bfloat16).reshape(p.shape))
    pair.step(STEPS)
    pair.check()


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
def test_masks_keep_entries_and_state_zero(device, dtype, kind):
    # 100 steps with momentum, weight decay, amsgrad and an anchor pulling masked entries away
    # from zero: masked entries of the parameter and of every state tensor stay exactly zero.
    groups = [([(40,), (9, 13), TRANSPOSED], dict(l2sp=0.5)), ([(3, 5, 7)], dict(l2sp=0.0))]
    shapes = [(40,), (9, 13), TRANSPOSED, (3, 5, 7)]
    anchor = [a + 1.0 for a in _anchors(shapes, device, dtype)]
    masks = {(0, 0): torch.rand(40, device=device) > 0.5, (0, 2): torch.rand(5, 7, device=device).t() > 0.3,
             (1, 0): torch.rand(3, 5, 7, device=device) > 0.5}
    extra = dict(amsgrad=True) if kind == "adamw" else dict(nesterov=True, dampening=0.0)
    pair = Pair(kind, device, dtype, groups, anchor=anchor, masks=masks, **dict(DEFAULTS[kind], **extra))
    for (g, j), m in masks.items():
        p = pair.params[g][j]
        assert (p[~m] == 0).all() and (pair.initial[g][j][~m] != 0).all()
        assert pair.opt.get_mask(p).dtype == torch.bool and torch.equal(pair.opt.get_mask(p), m)
    pair.step(50, check_every_step=False)
    # A mask set after some steps also clears the existing state (here: the unmasked (9, 13)).
    late = torch.rand(9, 13, device=device) > 0.5
    st = pair.opt.state[pair.params[0][1]]
    assert all((st[key][~late] != 0).all() for key in STATE_KEYS[kind])
    pair.opt.set_mask(pair.params[0][1], late)
    # zeroed immediately, before the next step
    assert (pair.params[0][1][~late] == 0).all()
    assert all((st[key][~late] == 0).all() and (st[key][late] != 0).all() for key in STATE_KEYS[kind])
    pair.ref.set_mask((0, 1), late)
    masks[(0, 1)] = late
    pair.step(50, check_every_step=False)
    pair.check()
    for (g, j), m in masks.items():
        p = pair.params[g][j]
        assert (p[~m] == 0).all(), "masked parameter entries must stay exactly 0"
        assert (p[m] != 0).float().mean() > 0.9, "unmasked entries must keep moving"
        for key in STATE_KEYS[kind]:
            s = pair.opt.state[p][key]
            assert (s[~m] == 0).all(), f"masked entries of {key} must stay exactly 0"
            assert (s[m] != 0).any(), key


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
def test_lr_tensor(device, dtype, kind):
    # lr as a scalar tensor (float32 or float64), changed in place between steps as a CUDA graph
    # would; the value the kernel reads is the tensor's, to its last bit.
    lr32 = torch.tensor(1e-2, device=device, dtype=torch.float32)
    lr64 = torch.tensor(7e-3, device=device, dtype=torch.float64)
    groups = [([(7,), (5, 3)], dict(lr=lr32, l2sp=0.2)), ([(3, 5, 7)], dict(lr=lr64)), ([(6,)], dict(lr=4e-3))]
    pair = Pair(kind, device, dtype, groups, **DEFAULTS[kind])
    pair.step(10)
    lr32.fill_(3e-2)
    lr64.fill_(1e-3)
    pair.ref.groups[0]["lr"] = float(lr32)
    pair.ref.groups[1]["lr"] = float(lr64)
    pair.step(10)
    pair.check()


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheduler", ["StepLR", "CosineAnnealingLR"])
@pytest.mark.parametrize("lr_type", ["float", "tensor"])
def test_lr_scheduler(device, dtype, kind, scheduler, lr_type):
    lr0 = DEFAULTS[kind]["lr"]
    lr = lr0 if lr_type == "float" else torch.tensor(lr0, device=device, dtype=torch.float64)
    groups = [([(7,), (5, 3)], dict(l2sp=0.3, lr=lr)), ([(4,)], dict(lr=lr0 / 2))]
    pair = Pair(kind, device, dtype, groups, **dict(DEFAULTS[kind], lr=lr0))
    if scheduler == "StepLR":
        sched = torch.optim.lr_scheduler.StepLR(pair.opt, step_size=5, gamma=0.5)
        expected = lambda base, t: base * 0.5 ** (t // 5)  # noqa: E731
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(pair.opt, T_max=20, eta_min=1e-4)
        expected = None

    def after_step():
        sched.step()
        for g, group in enumerate(pair.opt.param_groups):
            pair.ref.groups[g]["lr"] = float(group["lr"])

    pair.step(STEPS, after_step=after_step)
    pair.check()
    lrs = [float(g["lr"]) for g in pair.opt.param_groups]
    assert isinstance(pair.opt.param_groups[0]["lr"], torch.Tensor) == (lr_type == "tensor")
    if expected is not None:
        assert lrs == pytest.approx([expected(lr0, STEPS), expected(lr0 / 2, STEPS)], rel=1e-6)
    else:
        # cosine with T_max=20 after 30 steps: eta_min + (base - eta_min) * (1 + cos(pi * 30/20)) / 2
        want = [1e-4 + (b - 1e-4) * (1 + math.cos(math.pi * STEPS / 20)) / 2 for b in (lr0, lr0 / 2)]
        assert lrs == pytest.approx(want, rel=1e-4)

