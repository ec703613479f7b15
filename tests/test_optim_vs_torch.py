"""With L2-SP, L1 and masks off, pyfinetune.optim.AdamW / SGD follow torch.optim.AdamW / SGD.

float32 and float64 parameters are compared with torch directly, after all steps. For bf16/fp16
parameters the kernel keeps float32 state and does float32 math, so the comparison is torch's
optimizer on a float32 master copy whose values are rounded to the low dtype after every step
(torch's own bf16 AdamW keeps bf16 state, a different algorithm). Those are compared after every
step, to one ulp of the low dtype; then the master takes our values, so that a rare rounding flip
(a float32 difference of 1e-7 that lands on the other side of a bf16 rounding boundary) does not
persist and add up over the steps.
"""

from __future__ import annotations

import pytest
import torch

from conftest import LOW_DTYPES, assert_close, bits, device_dtype_params, state_tol
from pyfinetune.optim import SGD, AdamW

STEPS = 30
TRANSPOSED = "transposed"  # nn.Parameter(randn(5, 7).t()): dense, not contiguous
NO_GRAD = "no_grad"        # a parameter whose grad stays None


def _make_param(spec, dtype, device):
    # Values ~0.3 so that a step of lr >= 5e-3 moves a bf16 value (ulp 2^-8 relative).
    if spec == TRANSPOSED:
        return torch.nn.Parameter((0.3 * torch.randn(5, 7, device=device)).t().to(dtype))
    shape = (4, 3) if spec == NO_GRAD else spec
    return torch.nn.Parameter((0.3 * torch.randn(shape, device=device)).to(dtype))


def _make_grad(p, k):
    """A gradient for ``p`` whose layout differs from the parameter's where possible (a transposed
    grad for a contiguous matrix, a contiguous grad for the transposed parameter), with a scale
    that differs per parameter (0.5 to 7.5, repeating) so Adam sees different magnitudes."""
    scale = 0.5 + k % 8
    if p.dim() == 2 and p.is_contiguous() and p.numel() > 1:
        g = torch.randn(p.shape[1], p.shape[0], device=p.device).t()
    else:
        g = torch.randn(p.shape, device=p.device)
    return (g * scale).to(p.dtype)


def _run(ours_cls, torch_cls, device, dtype, groups, defaults, steps=STEPS):
    """Run our optimizer and torch's side by side on the same gradients; return both and the
    lists of (our param, torch param, spec, initial value)."""
    low = dtype in LOW_DTYPES
    master_dtype = torch.float32 if low else dtype
    ours_groups, torch_groups, triples = [], [], []
    for specs, opts in groups:
        ps, ts = [], []
        for spec in specs:
            p = _make_param(spec, dtype, device)
            t = torch.nn.Parameter(p.detach().to(master_dtype).clone(memory_format=torch.preserve_format))
            ps.append(p)
            ts.append(t)
            triples.append((p, t, spec, p.detach().clone()))
        ours_groups.append(dict(params=ps, **opts))
        torch_groups.append(dict(params=ts, **opts))
    opt = ours_cls(ours_groups, **defaults)
    ref = torch_cls(torch_groups, **defaults)
    moved = [False] * len(triples)
    for step in range(1, steps + 1):
        for k, (p, t, spec, _) in enumerate(triples):
            if spec == NO_GRAD:
                continue
            g = _make_grad(p, k)
            p.grad = g
            t.grad = g.to(master_dtype)
        before = [p.detach().clone() for p, _, _, _ in triples]
        opt.step()
        ref.step()
        # A single element may come back to its start after a random walk: count moves per step.
        moved = [m or not torch.equal(b, p) for m, b, (p, _, _, _) in zip(moved, before, triples)]
        if low:
            with torch.no_grad():
                for i, (p, t, spec, _) in enumerate(triples):
                    t.copy_(t.to(dtype))
                    assert_close(p, t, dtype, msg=f"parameter {i} {spec} at step {step}")
                    t.copy_(p)
    for ok, (p, _, spec, _) in zip(moved, triples):
        assert ok or spec == NO_GRAD or p.numel() == 0, f"parameter {spec} never changed"
    return opt, ref, triples


def _check(opt, ref, triples, dtype, state_keys):
    for i, (p, t, spec, p_init) in enumerate(triples):
        if spec == NO_GRAD:
            assert p.grad is None
            assert torch.equal(bits(p), bits(p_init)), "a parameter without grad must not move"
            assert len(opt.state.get(p, {})) == 0, "a parameter without grad must have no state"
            continue
        assert p.dtype == dtype and p.stride() == p_init.stride()
        assert_close(p, t, dtype, msg=f"parameter {i} {spec}")
        ours_state, torch_state = opt.state[p], ref.state[t]
        assert float(ours_state.get("step", torch_state.get("step", 0))) == float(torch_state.get("step", 0))
        for key in state_keys:
            if torch_state.get(key) is None:
                assert ours_state.get(key) is None, key
                continue
            s = ours_state[key]
            assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), key
            assert s.stride() == p.stride(), f"{key} must be laid out like the parameter"
            torch.testing.assert_close(s.double(), torch_state[key].double(), **state_tol(dtype),
                                       msg=lambda m: f"{key} of parameter {i} {spec}\n{m}")


ADAMW_GROUPS = [
    ([(7,), (33, 17)], dict(lr=1e-2, weight_decay=0.1)),
    ([(1,), (3, 5, 7), (0,), ()], dict(lr=5e-3, weight_decay=0.0, betas=(0.8, 0.99), eps=1e-6)),
    ([TRANSPOSED, NO_GRAD], dict(lr=5e-3, weight_decay=0.05, betas=(0.95, 0.9))),
]


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("amsgrad", [False, True, "mixed"])
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_matches_torch(device, dtype, amsgrad, maximize):
    groups = [(specs, dict(opts)) for specs, opts in ADAMW_GROUPS]
    if amsgrad == "mixed":  # groups with different flags go to separate launches
        groups[0][1]["amsgrad"] = True
        groups[2][1]["maximize"] = not maximize
        amsgrad = False
    defaults = dict(lr=1e-3, amsgrad=amsgrad, maximize=maximize)
    opt, ref, triples = _run(AdamW, torch.optim.AdamW, device, dtype, groups, defaults)
    _check(opt, ref, triples, dtype, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


SGD_CONFIGS = {
    "plain": [dict(momentum=0.0, weight_decay=0.0)] * 3,
    "momentum": [dict(momentum=0.9, weight_decay=1e-2)] * 3,
    "dampening": [dict(momentum=0.9, dampening=0.3, weight_decay=1e-2)] * 3,
    "nesterov": [dict(momentum=0.8, nesterov=True, weight_decay=5e-2)] * 3,
    # one call with a different setting per group: momentum/dampening/lr are per-tensor values
    "mixed": [dict(momentum=0.9, nesterov=True, weight_decay=1e-2, lr=2e-2),
              dict(momentum=0.5, dampening=0.5, weight_decay=0.0, lr=5e-3),
              dict(momentum=0.0, weight_decay=0.1, lr=1e-2)],
}
SGD_SHAPES = [[(7,), (33, 17)], [(1,), (3, 5, 7), (0,), ()], [TRANSPOSED, NO_GRAD]]


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_matches_torch(device, dtype, config, maximize):
    lrs = [1e-2, 5e-3, 5e-3]
    groups = [(shapes, dict(dict(lr=lr), **opts)) for shapes, opts, lr in zip(SGD_SHAPES, SGD_CONFIGS[config], lrs)]
    opt, ref, triples = _run(SGD, torch.optim.SGD, device, dtype, groups, dict(lr=1e-3, maximize=maximize))
    _check(opt, ref, triples, dtype, ("momentum_buffer",))


@pytest.mark.parametrize("device, dtype", device_dtype_params([torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_large_tensor_spans_parallel_chunks(device, dtype, kind):
    # The CPU kernel cuts the concatenated elements of all tensors into chunks of 32768 elements:
    # 70001 elements after a small tensor put chunk borders inside tensors, off vector alignment.
    groups = [([(3,), (70001,), (129, 5)], dict(lr=1e-2, weight_decay=1e-2))]
    if kind == "adamw":
        opt, ref, triples = _run(AdamW, torch.optim.AdamW, device, dtype, groups, dict(amsgrad=True), steps=5)
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    else:
        opt, ref, triples = _run(SGD, torch.optim.SGD, device, dtype, groups, dict(momentum=0.9), steps=5)
        keys = ("momentum_buffer",)
    _check(opt, ref, triples, dtype, keys)


@pytest.mark.parametrize("device, dtype", device_dtype_params([torch.float32]))
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_list_beyond_one_launch(device, dtype, kind):
    # The CUDA kernels pack a list into launches of at most 36 / 48 tensors and ~220 / 280 blocks of
    # 65536 elements (4 KB kernel arguments) or 192 / 224 tensors and ~3600 / 4300 blocks (32 KB), and
    # 4 param groups: 260 tensors in 5 groups, one of 240 * 65536 + 3 elements, cross every limit of
    # both builds but the 32 KB block table, and put a launch cut inside the big tensor.
    small = [(7,), (65537,), (3, 5)] * 50
    groups = [(small[i::5] + ([(240 * 65536 + 3,)] if i == 2 else []), dict(lr=1e-2 * (i + 1), weight_decay=1e-2))
              for i in range(5)]
    groups[0][0].extend([(2,)] * 109)
    if kind == "adamw":
        opt, ref, triples = _run(AdamW, torch.optim.AdamW, device, dtype, groups, {}, steps=3)
        keys = ("exp_avg", "exp_avg_sq")
    else:
        opt, ref, triples = _run(SGD, torch.optim.SGD, device, dtype, groups, dict(momentum=0.9), steps=3)
        keys = ("momentum_buffer",)
    assert len(triples) == 260
    _check(opt, ref, triples, dtype, keys)


@pytest.mark.parametrize("device, dtype", device_dtype_params([torch.float32]))
def test_grad_none_parameter_is_skipped_after_steps(device, dtype):
    # A parameter whose grad is None on some steps (frozen for a while) keeps its state and
    # its value exactly on those steps, and resumes afterwards; torch does the same.
    p = torch.nn.Parameter(torch.randn(6, device=device, dtype=dtype))
    q = torch.nn.Parameter(torch.randn(4, device=device, dtype=dtype))
    tp, tq = (torch.nn.Parameter(x.detach().clone()) for x in (p, q))
    opt = AdamW([p, q], lr=1e-2)
    ref = torch.optim.AdamW([tp, tq], lr=1e-2)
    for k in range(12):
        gp = torch.randn(6, device=device, dtype=dtype)
        p.grad, tp.grad = gp, gp.clone()
        if k < 4 or k >= 8:
            gq = torch.randn(4, device=device, dtype=dtype)
            q.grad, tq.grad = gq, gq.clone()
        else:
            q.grad = tq.grad = None
        before = {k2: v.clone() for k2, v in opt.state[q].items()}, q.detach().clone()
        opt.step()
        ref.step()
        if q.grad is None:
            assert torch.equal(q, before[1])
            for key, v in before[0].items():
                assert torch.equal(opt.state[q][key], v), key
    assert float(opt.state[q]["step"]) == 8.0 and float(opt.state[p]["step"]) == 12.0
    assert_close(p, tp, dtype)
    assert_close(q, tq, dtype)


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_broadcast_gradient(device, dtype, kind):
    # A gradient with zero strides (p.grad = g.expand(...)), as a user may set it: it is read
    # through its strides, like torch does.
    ours = [torch.nn.Parameter(torch.randn(4, 6, device=device).to(dtype)) for _ in range(2)]
    master_dtype = torch.float32 if dtype in LOW_DTYPES else dtype
    theirs = [torch.nn.Parameter(p.detach().to(master_dtype).clone()) for p in ours]
    if kind == "adamw":
        opt, ref = AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    else:
        opt, ref = SGD(ours, lr=1e-2, momentum=0.9), torch.optim.SGD(theirs, lr=1e-2, momentum=0.9)
    for _ in range(3):
        rows = torch.randn(6, device=device).to(dtype)
        grads = [rows.expand(4, 6), torch.randn(4, 1, device=device).to(dtype).expand(4, 6)]
        for p, t, g in zip(ours, theirs, grads):
            assert 0 in g.stride()
            p.grad, t.grad = g, g.to(master_dtype)
        opt.step()
        ref.step()
        if dtype in LOW_DTYPES:
            with torch.no_grad():
                for p, t in zip(ours, theirs):
                    t.copy_(t.to(dtype))
                    assert_close(p, t, dtype)
                    t.copy_(p)
    for p, t in zip(ours, theirs):
        assert_close(p, t, dtype)
        assert p.is_contiguous()
