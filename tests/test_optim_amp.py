"""torch.amp.GradScaler with pyfinetune's optimizers (they take grad_scale / found_inf instead of
unscaled gradients), and the ops' grad_scale / found_inf arguments called directly."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_bitwise_equal, assert_close, bits, device_dtype_params, snapshot
from pyfinetune.optim import SGD, AdamW

KINDS = ["adamw", "sgd"]
SHAPES = [(7,), (5, 3), (2, 3, 4)]
SCALE = 2.0**10  # a power of two: scaling and unscaling are exact, so the runs agree bit for bit


def _model(device, dtype):
    params = [torch.nn.Parameter((0.3 * torch.randn(s, device=device)).to(dtype)) for s in SHAPES]
    weights = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
    return params, weights


def _loss(params, weights):
    # grad = w + p: depends on the parameter, so a wrong update shows up in later gradients.
    return sum((w * p).sum() + 0.5 * (p * p).sum() for p, w in zip(params, weights))


def _skip_where_torch_scaler_cannot(device, dtype):
    """torch.amp.GradScaler checks the gradients for inf/NaN with its own kernel before calling our
    step; on CUDA that kernel has no bfloat16 version (NotImplementedError inside GradScaler.step,
    torch's fused AdamW hits the same). bf16 has float32's exponent range and needs no loss scaling;
    the op-level tests below still run grad_scale / found_inf with bf16 on CUDA."""
    if device == "cuda" and dtype == torch.bfloat16:
        pytest.skip("torch's CUDA GradScaler has no bfloat16 inf check (_amp_foreach_non_finite_check_and_unscale_)")


def _opt(kind, params, **kw):
    groups = [dict(params=params[:2]), dict(params=params[2:], lr=3e-3)]
    if kind == "adamw":
        return AdamW(groups, lr=1e-2, weight_decay=0.05, amsgrad=True, **kw)
    return SGD(groups, lr=1e-2, momentum=0.9, weight_decay=0.05, **kw)


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
def test_scaled_steps_equal_unscaled_steps(device, dtype, kind):
    _skip_where_torch_scaler_cannot(device, dtype)
    params, weights = _model(device, dtype)
    plain = _clone(params)
    initial = [p.detach().clone() for p in params]
    opt = _opt(kind, params)
    opt_plain = _opt(kind, plain)
    scaler = torch.amp.GradScaler(device, init_scale=SCALE)
    for _ in range(10):
        scaler.scale(_loss(params, weights)).backward()
        assert params[0].grad.abs().max() > 100, "the gradients must be scaled"
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        _loss(plain, weights).backward()
        opt_plain.step()
        opt_plain.zero_grad()
    assert scaler.get_scale() == SCALE
    assert_bitwise_equal(snapshot(opt), snapshot(opt_plain))
    for p, p0 in zip(params, initial):
        assert not torch.equal(p, p0), "the parameters must have moved"


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_inf_in_one_gradient_skips_the_step(device, dtype, kind, bad):
    _skip_where_torch_scaler_cannot(device, dtype)
    params, weights = _model(device, dtype)
    opt = _opt(kind, params, l2sp=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=SCALE)
    for _ in range(3):
        scaler.scale(_loss(params, weights)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    before = snapshot(opt)
    keys = {k[2] for k in before}
    assert keys >= ({"param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"} if kind == "adamw"
                    else {"param", "momentum_buffer"})
    scaler.scale(_loss(params, weights)).backward()
    params[2].grad.view(-1)[5] = bad  # one entry of one gradient, in the last group
    scaler.step(opt)
    assert_bitwise_equal(snapshot(opt), before)
    scaler.update()
    assert scaler.get_scale() == SCALE / 2, "GradScaler must have seen the inf and backed off"
    opt.zero_grad()
    # The next finite step goes through, and the step counters count it once.
    scaler.scale(_loss(params, weights)).backward()
    scaler.step(opt)
    after = snapshot(opt)
    for k, v in before.items():
        if k[2] != "anchor":
            assert not torch.equal(bits(after[k]), bits(v)), f"{k} must change on a finite step"
    if kind == "adamw":
        assert all(float(opt.state[p]["step"]) == 4.0 for p in params)


@pytest.mark.parametrize("device, dtype", device_dtype_params([torch.float32]))
@pytest.mark.parametrize("kind, dampening", [
    ("adamw", None),
    ("sgd", 0.0),
    ("sgd", 0.3),  # a fresh buffer whose first step is skipped must restart from the gradient
])
def test_skipped_first_step_matches_torch(device, dtype, kind, dampening):
    # GradScaler often skips the very first steps (the initial scale overflows fp16): the state
    # must then be as if nothing had happened, as with torch's optimizers.
    params, weights = _model(device, dtype)
    theirs = _clone(params)
    if kind == "adamw":
        opt = AdamW(params, lr=1e-2, weight_decay=0.05)
        ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.05)
    else:
        opt = SGD(params, lr=1e-2, momentum=0.9, dampening=dampening, weight_decay=0.05)
        ref = torch.optim.SGD(theirs, lr=1e-2, momentum=0.9, dampening=dampening, weight_decay=0.05)
    scalers = [torch.amp.GradScaler(device, init_scale=SCALE) for _ in range(2)]
    for k in range(5):
        for ps, o, sc in ((params, opt, scalers[0]), (theirs, ref, scalers[1])):
            sc.scale(_loss(ps, weights)).backward()
            if k == 0:
                ps[1].grad.view(-1)[0] = float("inf")
            sc.step(o)
            sc.update()
            o.zero_grad()
    for p, t in zip(params, theirs):
        assert_close(p, t, dtype)


# ------------------------------------------------------------------------------ direct op calls
def _adamw_args(device, dtype, n=3, amsgrad=True):
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(7,), (5, 3), (33,)][:n]
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    exp_avgs = [torch.rand(s, device=device, dtype=state_dtype) for s in shapes]
    exp_avg_sqs = [torch.rand(s, device=device, dtype=state_dtype) for s in shapes]
    max_sqs = [v + 0.1 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(3.0, device=device) for _ in shapes]
    return [params, grads, exp_avgs, exp_avg_sqs, max_sqs, [], [], steps, [1e-2] * n, [], [0.9] * n,
            [0.99] * n, [1e-8] * n, [0.01] * n, [0.0] * n, [0.0] * n]


def _sgd_args(device, dtype, n=3):
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(7,), (5, 3), (33,)][:n]
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    bufs = [torch.randn(s, device=device, dtype=state_dtype) for s in shapes]
    return [params, grads, bufs, [], [], [1e-2] * n, [], [0.9] * n, [0.1] * n, [0.01] * n, [0.0] * n, [0.0] * n]


def _call(kind, args, **kw):
    if kind == "adamw":
        torch.ops.pyfinetune.fused_adamw_(*args, amsgrad=True, maximize=False, decoupled_l2sp=False, **kw)
    else:
        torch.ops.pyfinetune.fused_sgd_(*args, nesterov=False, maximize=False, decoupled_l2sp=False, **kw)


def _copy(args):
    return [[t.clone() if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list) else a for a in args]


def _mutated(kind, args):
    """The lists the op writes: params and state."""
    return [args[0], args[2], args[3], args[4]] if kind == "adamw" else [args[0], args[2]]


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
def test_op_found_inf_skips_everything(device, dtype, kind):
    args = _adamw_args(device, dtype) if kind == "adamw" else _sgd_args(device, dtype)
    before = _copy(args)
    one = torch.tensor(1.0, device=device)
    _call(kind, args, grad_scale=torch.tensor(4.0, device=device), found_inf=one)
    for a, b in zip(_mutated(kind, args), _mutated(kind, before)):
        for x, y in zip(a, b):
            assert torch.equal(bits(x), bits(y))
    # found_inf = 0 runs the step.
    _call(kind, args, grad_scale=torch.tensor(4.0, device=device), found_inf=torch.zeros((), device=device))
    assert not torch.equal(args[0][0], before[0][0])


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [8.0, 3.0])
def test_op_grad_scale_divides_gradients(device, dtype, kind, scale):
    # grad_scale=s on grads g*s equals no grad_scale on g. The gradients are small multiples of
    # 1/16, so g*s is exact in every dtype; the kernel multiplies by 1/s: exact (bit for bit) when
    # s is a power of two, one float32 rounding of 1/s otherwise.
    args = _adamw_args(device, dtype) if kind == "adamw" else _sgd_args(device, dtype)
    args[1] = [(torch.randint(-64, 65, g.shape, device=device) / 16).to(dtype) for g in args[1]]
    scaled = _copy(args)
    scaled[1] = [(g * scale).to(dtype) for g in args[1]]
    assert all(torch.equal(a.double() * scale, b.double()) for a, b in zip(args[1], scaled[1]))
    _call(kind, args)
    _call(kind, scaled, grad_scale=torch.tensor(scale, device=device), found_inf=torch.zeros((), device=device))
    for a, b in zip(_mutated(kind, scaled), _mutated(kind, args)):
        for x, y in zip(a, b):
            if scale == 8.0:
                assert torch.equal(bits(x), bits(y))
            else:
                assert_close(x, y, x.dtype)
