"""The raw ops torch.ops.pyfinetune.fused_adamw_ / fused_sgd_: torch.library.opcheck (schema,
fake kernel, functionalization), torch.compile(fullgraph=True) of the ops, and a compiled
training step with the optimizers."""

from __future__ import annotations

import pytest
import torch

import pyfinetune.optim
from conftest import assert_close, bits, device_dtype_params, device_params, needs_compiled_step, state_tol
from pyfinetune.optim import SGD, AdamW

SHAPES = [(5,), (3, 4), (2, 3, 2)]


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def adamw_inputs(device, dtype, *, anchors=False, masks=False, amsgrad=False, lr_tensors=False, amp=None,
                 anchor_dtype=None, maximize=False, decoupled=False, shapes=SHAPES):
    """Fresh arguments of fused_adamw_ (every call makes new tensors: the op mutates them) for three
    parameters of ``shapes``."""
    sd = _state_dtype(dtype)
    n = len(shapes)
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    args = [
        params,
        [torch.randn(s, device=device).to(dtype) for s in shapes],
        [0.1 * torch.randn(s, device=device, dtype=sd) for s in shapes],
        [torch.rand(s, device=device, dtype=sd) for s in shapes],
        [torch.rand(s, device=device, dtype=sd) + 0.5 for s in shapes] if amsgrad else [],
        # one anchor missing (a parameter of an l2sp=0 group)
        [torch.randn(s, device=device).to(anchor_dtype or dtype) for s in shapes[:-1]] + [None] if anchors else [],
        [None] + [torch.rand(s, device=device) > 0.4 for s in shapes[1:]] if masks else [],
        [torch.tensor(float(k + 2), device=device) for k in range(n)],
        [1e-2, 2e-2, 5e-3],
        [torch.tensor(3e-2, device=device), None, torch.tensor(1e-3, device=device, dtype=torch.float64)]
        if lr_tensors else [],
        [0.9, 0.8, 0.95], [0.999, 0.99, 0.9], [1e-8, 1e-6, 1e-8], [0.01, 0.0, 0.1],
        [0.5, 0.1, 0.0] if anchors else [0.0] * n, [0.01, 0.0, 0.02],
    ]
    kwargs = dict(amsgrad=amsgrad, maximize=maximize, decoupled_l2sp=decoupled)
    if amp is not None:
        kwargs.update(grad_scale=torch.tensor(4.0, device=device), found_inf=torch.tensor(amp, device=device))
    return args, kwargs


def sgd_inputs(device, dtype, *, momentum=True, anchors=False, masks=False, lr_tensors=False, amp=None,
               nesterov=False, maximize=False, decoupled=False, shapes=SHAPES):
    sd = _state_dtype(dtype)
    n = len(shapes)
    args = [
        [torch.randn(s, device=device).to(dtype) for s in shapes],
        [torch.randn(s, device=device).to(dtype) for s in shapes],
        [torch.randn(s, device=device, dtype=sd) for s in shapes] if momentum else [],
        [None] + [torch.randn(s, device=device).to(dtype) for s in shapes[1:]] if anchors else [],
        [torch.rand(s, device=device) > 0.4 for s in shapes[:-1]] + [None] if masks else [],
        [1e-2, 2e-2, 5e-3],
        [None, torch.tensor(3e-2, device=device), None] if lr_tensors else [],
        [0.9, 0.5, 0.8] if momentum else [0.0] * n,
        [0.0] * n if nesterov or not momentum else [0.1, 0.0, 0.5],
        [0.01, 0.0, 0.1], [0.0, 0.5, 0.2] if anchors else [0.0] * n, [0.01, 0.0, 0.02],
    ]
    kwargs = dict(nesterov=nesterov, maximize=maximize, decoupled_l2sp=decoupled)
    if amp is not None:
        kwargs.update(grad_scale=torch.tensor(4.0, device=device), found_inf=torch.tensor(amp, device=device))
    return args, kwargs


ADAMW_CASES = {
    "plain": dict(),
    "everything": dict(anchors=True, masks=True, amsgrad=True, lr_tensors=True, amp=0.0, decoupled=True),
    "coupled-bf16-anchors-maximize": dict(anchors=True, anchor_dtype=torch.bfloat16, maximize=True, masks=True),
    "found-inf": dict(amsgrad=True, amp=1.0, lr_tensors=True),
}
SGD_CASES = {
    "plain": dict(momentum=False),
    "everything": dict(anchors=True, masks=True, lr_tensors=True, amp=0.0, decoupled=True),
    "nesterov-maximize": dict(nesterov=True, maximize=True, anchors=True),
    "found-inf": dict(amp=1.0, masks=True),
}


@needs_compiled_step
@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("case", list(ADAMW_CASES))
def test_opcheck_fused_adamw(device, dtype, case):
    args, kwargs = adamw_inputs(device, dtype, **ADAMW_CASES[case])
    torch.library.opcheck(torch.ops.pyfinetune.fused_adamw_.default, args, kwargs)


@needs_compiled_step
@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_opcheck_fused_sgd(device, dtype, case):
    args, kwargs = sgd_inputs(device, dtype, **SGD_CASES[case])
    torch.library.opcheck(torch.ops.pyfinetune.fused_sgd_.default, args, kwargs)


def _clone_args(args):
    return [[t.clone() if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list) else a
            for a in args]


def _adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_sqs, anchors, masks, steps, lrs, lr_tensors, *rest,
                **kwargs):
    # As the optimizer does: count the step on the device, then update (no host sync in between).
    torch._foreach_add_(steps, 1.0)
    torch.ops.pyfinetune.fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_sqs, anchors, masks, steps, lrs,
                                      lr_tensors, *rest, **kwargs)


def _sgd_step(*args, **kwargs):
    torch.ops.pyfinetune.fused_sgd_(*args, **kwargs)


def test_compiled_steps_are_traced_from_torch_2_5():
    # Where torch cannot trace the optimizer ops (2.4) the steps run eagerly inside compiled
    # functions, and the fullgraph / opcheck tests skip: a probe that failed on a torch that can
    # would skip them silently, so it must hold from 2.5 (checked on 2.4, 2.5, 2.6, 2.8 and 2.14).
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 5):
        assert pyfinetune.optim.COMPILE_TRACES_STEP
    else:
        assert not pyfinetune.optim.COMPILE_TRACES_STEP
        assert SGD.step.__wrapped__ is not None  # torch.compiler.disable's wrapper


@needs_compiled_step
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_compile_fullgraph_op_matches_eager(device, kind):
    torch._dynamo.reset()
    if kind == "adamw":
        args, kwargs = adamw_inputs(device, torch.float32, anchors=True, masks=True, amsgrad=True, lr_tensors=True,
                                    amp=0.0)
        fn = _adamw_step
        written, lr_index = [0, 2, 3, 4, 7], 9
    else:
        args, kwargs = sgd_inputs(device, torch.float32, anchors=True, masks=True, lr_tensors=True, amp=0.0)
        fn = _sgd_step
        written, lr_index = [0, 2], 6
    eager_args = _clone_args(args)
    initial = _clone_args(args)
    compiled = torch.compile(fn, fullgraph=True)
    for k in range(3):
        if k == 2:  # a new lr in the same tensor: no recompile, the new value is used
            for a in (args, eager_args):
                next(t for t in a[lr_index] if t is not None).fill_(0.05)
        compiled(*args, **kwargs)
        fn(*eager_args, **kwargs)
    for i in written:
        for x, y in zip(args[i], eager_args[i]):
            assert torch.equal(bits(x), bits(y)), f"argument {i} differs between compiled and eager"
    assert not torch.equal(args[0][0], initial[0][0])


def _mlp(device, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(device)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_compiled_training_step_matches_eager(device, kind, seed):
    torch._dynamo.reset()

    def make():
        model = _mlp(device, seed)
        groups = [dict(params=model[0].parameters(), l2sp=0.1), dict(params=model[2].parameters(), lr=5e-3)]
        if kind == "adamw":
            opt = AdamW(groups, lr=1e-2, amsgrad=True, l1=1e-3)
        else:
            opt = SGD(groups, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-2)
        opt.set_mask(model[0].weight, torch.rand(16, 8, device=device) > 0.3)
        return model, opt

    x, y = torch.randn(32, 8, device=device), torch.randn(32, 1, device=device)

    def train_step(model, opt):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    (m1, o1), (m2, o2) = make(), make()
    initial = [p.detach().clone() for p in m1.parameters()]
    compiled = torch.compile(train_step)
    for _ in range(5):
        l1, l2 = compiled(m1, o1), train_step(m2, o2)
        assert_close(l1, l2, torch.float32)
    # The compiled forward/backward round differently from eager (fused kernels): compare to the
    # float32 tolerance, not bit for bit.
    for p, q, p0 in zip(m1.parameters(), m2.parameters(), initial):
        assert not torch.equal(p, p0)
        assert_close(p, q, torch.float32)
        for key, v in o2.state[q].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                torch.testing.assert_close(o1.state[p][key], v, **state_tol(torch.float32))
    mask = o1.get_mask(m1[0].weight)
    assert (m1[0].weight[~mask] == 0).all()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_written_tensors_autograd_rules(device, kind):
    # As torch's in-place ops: a parameter that requires grad is refused in grad mode (untouched),
    # allowed under no_grad; every written tensor's version moves, so a graph that saved a
    # parameter before the step refuses a later backward instead of computing a wrong gradient.
    make, op = (adamw_inputs, torch.ops.pyfinetune.fused_adamw_) if kind == "adamw" else \
        (sgd_inputs, torch.ops.pyfinetune.fused_sgd_)
    args, kwargs = make(device, torch.float32)
    params = args[0]
    params[1].requires_grad_(True)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=rf"fused_{kind}_: params\[1\] requires grad: the op writes to it in place"):
        op(*args, **kwargs)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    written = [t for a in (args[0], args[2], args[3] if kind == "adamw" else []) for t in a]
    versions = [t._version for t in written]
    with torch.no_grad():
        op(*args, **kwargs)
    assert all(t._version > v for t, v in zip(written, versions))
    assert not torch.equal(params[1].detach(), before[1])
    # a retained graph that saved the parameter (for x's gradient), then a step
    args, kwargs = make(device, torch.float32)
    p = args[0][0].requires_grad_(True)
    x = torch.randn(p.shape, device=device, requires_grad=True)
    loss = (p * x).sum()
    loss.backward(retain_graph=True)
    with torch.no_grad():
        op(*args, **kwargs)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------ CPU software prefetch setting
def _assert_settings_give_the_same_bits(monkeypatch, var, settings, args, kwargs, step, copy=None):
    """Three steps on fresh copies of args (``copy`` per tensor, default clone) under each value of the
    environment variable ``var``: every step changes the parameters, and every written tensor ends
    with the same bits under every setting."""
    copy = copy or (lambda t: t.clone() if isinstance(t, torch.Tensor) else t)
    results = []
    for setting in settings:
        monkeypatch.setenv(var, setting)
        a = [[copy(t) for t in group] if isinstance(group, list) else group for group in args]
        if copy is _misaligned:
            assert all(t.data_ptr() % 16 != 0 for t in a[0])
        before = [t.clone() for t in a[0]]
        for _ in range(3):
            step(*a, **kwargs)
        assert any(not torch.equal(p, q) for p, q in zip(a[0], before)), "the step changed nothing"
        results.append([t for group in a if isinstance(group, list) for t in group if isinstance(t, torch.Tensor)])
    for r in results[1:]:
        for first, other in zip(results[0], r):
            assert torch.equal(bits(first), bits(other))


def _fused_op_with_anchors(kind, device, shapes):
    """(op, its name, args, kwargs): a float32 fused_adamw_ / fused_sgd_ call with anchors."""
    if kind == "adamw":
        args, kwargs = adamw_inputs(device, torch.float32, anchors=True, shapes=shapes)
        return torch.ops.pyfinetune.fused_adamw_, "fused_adamw_", args, kwargs
    args, kwargs = sgd_inputs(device, torch.float32, anchors=True, shapes=shapes)
    return torch.ops.pyfinetune.fused_sgd_, "fused_sgd_", args, kwargs


def _assert_refused_before_any_write(op, args, kwargs, match):
    """op(*args, **kwargs) raises ValueError matching `match` and leaves every tensor argument as it was."""
    before = _clone_args(args)
    with pytest.raises(ValueError, match=match):
        op(*args, **kwargs)
    for group, saved in zip(args, before):
        if isinstance(group, list):
            for t, u in zip(group, saved):
                if isinstance(t, torch.Tensor):
                    assert torch.equal(t, u)


# Three parameters long enough for the kernels' prefetch branch (it prefetches 512 elements ahead),
# with vector tails, one of them a single element.
PREFETCH_SHAPES = [(3001,), (37, 41), (1,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_cpu_prefetch_setting_changes_no_result(monkeypatch, kind, dtype):
    """PYFINETUNE_CPU_PREFETCH=0 and =1 run different instantiations of the CPU kernels (with and
    without software prefetch): both give the same bits, for every anchor / mask / state variant."""
    torch.manual_seed(1234)
    if kind == "adamw":
        args, kwargs = adamw_inputs("cpu", dtype, anchors=True, masks=True, amsgrad=True, lr_tensors=True,
                                    decoupled=False, shapes=PREFETCH_SHAPES)
        step = _adamw_step
    else:
        args, kwargs = sgd_inputs("cpu", dtype, anchors=True, masks=True, lr_tensors=True, nesterov=True,
                                  shapes=PREFETCH_SHAPES)
        step = _sgd_step
    for setting in ("0", "1"):
        monkeypatch.setenv("PYFINETUNE_CPU_PREFETCH", setting)
        assert torch.ops.pyfinetune._optim_cpu_prefetch() is (setting == "1")
    _assert_settings_give_the_same_bits(monkeypatch, "PYFINETUNE_CPU_PREFETCH", ("0", "1"), args, kwargs, step)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("bad", ["2", "yes", "00", " 1", "true"])
def test_cpu_prefetch_bad_setting_is_refused_before_any_write(monkeypatch, kind, bad):
    monkeypatch.setenv("PYFINETUNE_CPU_PREFETCH", bad)
    op, name, args, kwargs = _fused_op_with_anchors(kind, "cpu", PREFETCH_SHAPES)
    _assert_refused_before_any_write(op, args, kwargs, f"pyfinetune.{name}: PYFINETUNE_CPU_PREFETCH must be 0 or 1")
    with pytest.raises(ValueError, match="PYFINETUNE_CPU_PREFETCH must be 0 or 1"):
        torch.ops.pyfinetune._optim_cpu_prefetch()


def test_cpu_prefetch_default_follows_the_cpu_vendor(monkeypatch):
    monkeypatch.delenv("PYFINETUNE_CPU_PREFETCH", raising=False)
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), None)
    except OSError:
        vendor = None
    if vendor is None:
        pytest.skip("no vendor_id in /proc/cpuinfo")
    assert torch.ops.pyfinetune._optim_cpu_prefetch() is (vendor == "GenuineIntel")
    monkeypatch.setenv("PYFINETUNE_CPU_PREFETCH", "")
    assert torch.ops.pyfinetune._optim_cpu_prefetch() is (vendor == "GenuineIntel")


# The CUDA kernels' wide layout walks a chunk (65536 elements) 16 elements per thread at a time in
# blocks of 256 threads: 70001 elements take full and partial rounds in two chunks; 3001 elements
# end with a partial vector; the single element is all tail.
LAYOUT_SHAPES = [(70001,), (3001,), (1,)]


def _misaligned(t):
    """A copy of t starting one element past a 16-byte boundary (the kernels' element-wise path)."""
    if not isinstance(t, torch.Tensor):
        return t
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind, case", [("adamw", "plain"), ("adamw", "everything"), ("adamw", "coupled-bf16-anchors-maximize"),
                                        ("sgd", "plain"), ("sgd", "everything"), ("sgd", "nesterov-maximize")])
def test_cuda_layouts_give_the_same_bits(monkeypatch, kind, case, dtype, misaligned):
    """PYFINETUNE_OPTIM_CUDA_LAYOUT=classic, =wide and =flat launch different kernels (one vector per
    thread at a time in blocks of 512; 16 elements per thread in blocks of 256; resident blocks of 256
    over 2048-element pieces of the tensors end to end): the same bits for every state / anchor /
    mask variant, aligned or not (float64 has no wide kernel: classic there)."""
    if kind == "adamw":
        args, kwargs = adamw_inputs("cuda", dtype, shapes=LAYOUT_SHAPES, **ADAMW_CASES[case])
        step = _adamw_step
    else:
        args, kwargs = sgd_inputs("cuda", dtype, shapes=LAYOUT_SHAPES, **SGD_CASES[case])
        step = _sgd_step
    _assert_settings_give_the_same_bits(monkeypatch, "PYFINETUNE_OPTIM_CUDA_LAYOUT", ("classic", "wide", "flat"),
                                        args, kwargs, step, copy=_misaligned if misaligned else None)


# The flat layout's grid-stride walk: 40 tensors of these sizes hold 2785 pieces of FLAT_PIECE
# elements (csrc/cuda/fused_optim_cuda.cu: kFlatPiece), more than the resident blocks of a launch
# (2-4 per SM: 264-528 on an H100), so blocks take several pieces and switch tensors and
# hyperparameters mid-walk (neighbouring tensors are in different groups); the other layout tests
# stay below the resident blocks.
FLAT_PIECE = 2048
FLAT_STRIDE_SIZES = [2047, 2049, 1, (1 << 20) + 3, 9000, 65537, 2048, 3]
FLAT_STRIDE_TENSORS = 40


def _flat_stride_adamw_inputs(dtype, found_inf):
    """fused_adamw_ arguments (CUDA) for FLAT_STRIDE_TENSORS tensors in 4 interleaved groups, with
    amsgrad, anchors (none in the l2sp = 0 group), masks, lr tensors, and a GradScaler's scale."""
    gen = torch.Generator().manual_seed(11)
    sd = _state_dtype(dtype)
    n = FLAT_STRIDE_TENSORS
    grp = [i % 4 for i in range(n)]

    def t(i, dt, fn=torch.randn, post=lambda x: x):
        return post(fn(FLAT_STRIDE_SIZES[i % len(FLAT_STRIDE_SIZES)], generator=gen)).to(device="cuda", dtype=dt)

    args = [
        [t(i, dtype) for i in range(n)],
        [t(i, dtype) for i in range(n)],
        [t(i, sd, post=lambda x: 0.1 * x) for i in range(n)],
        [t(i, sd, torch.rand) for i in range(n)],
        [t(i, sd, torch.rand, lambda x: x + 0.5) for i in range(n)],
        [t(i, dtype) if grp[i] != 0 else None for i in range(n)],
        [t(i, torch.bool, torch.rand, lambda x: x > 0.4) if i % 3 == 1 else None for i in range(n)],
        [torch.tensor(float(2 + i % 5), device="cuda") for i in range(n)],
        [1e-2 * (1 + grp[i]) for i in range(n)],
        [torch.tensor(3e-2, device="cuda") if grp[i] == 3 else None for i in range(n)],
        [0.9 - 0.05 * grp[i] for i in range(n)], [0.999] * n, [1e-8] * n,
        [0.01 * grp[i] for i in range(n)], [0.1 * grp[i] for i in range(n)], [0.01 if grp[i] == 2 else 0.0 for i in range(n)],
    ]
    kwargs = dict(amsgrad=True, maximize=False, decoupled_l2sp=False,
                  grad_scale=torch.tensor(4.0, device="cuda"), found_inf=torch.tensor(found_inf, device="cuda"))
    return args, kwargs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_flat_layout_blocks_take_several_pieces(monkeypatch, dtype, misaligned):
    from conftest import cuda_kernel_grids

    args, kwargs = _flat_stride_adamw_inputs(dtype, 0.0)
    _assert_settings_give_the_same_bits(monkeypatch, "PYFINETUNE_OPTIM_CUDA_LAYOUT", ("classic", "flat"), args, kwargs,
                                        _adamw_step, copy=_misaligned if misaligned else None)
    pieces = sum(-(-FLAT_STRIDE_SIZES[i % len(FLAT_STRIDE_SIZES)] // FLAT_PIECE) for i in range(FLAT_STRIDE_TENSORS))
    monkeypatch.setenv("PYFINETUNE_OPTIM_CUDA_LAYOUT", "flat")
    grids = cuda_kernel_grids(lambda: _adamw_step(*args, **kwargs), "flat")
    if grids is not None:  # every launch's grid is at most its resident blocks: fewer blocks than pieces
        assert sum(g[0] for g in grids) < pieces, (grids, pieces)
    # found_inf = 1 (an overflowing GradScaler step): nothing written, whatever block holds a piece
    args, kwargs = _flat_stride_adamw_inputs(dtype, 1.0)
    before = [[t.clone() if isinstance(t, torch.Tensor) else t for t in a] for a in args[:7]]
    _adamw_step(*args, **kwargs)
    for got, want in zip(args[:7], before):
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(bits(a), bits(b))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_flat_layout_over_many_tensors_and_groups(monkeypatch, kind, dtype):
    """PYFINETUNE_OPTIM_CUDA_LAYOUT=flat packs a launch's tensors end to end in 2048-element pieces:
    300 tensors (more than one launch holds), of sizes around the piece (2047, 2048, 2049, 1, 9000)
    in 7 param groups (more than the 4 distinct groups a launch holds) step to the classic layout's
    bits."""
    sizes = [2047, 2048, 2049, 1, 9000, 17, 8192, 4095]
    gen = torch.Generator().manual_seed(3)
    master = [torch.randn(sizes[i % len(sizes)], generator=gen).to(dtype) for i in range(300)]
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in master] for _ in range(3)]
    out = {}
    for layout in ("classic", "flat"):
        monkeypatch.setenv("PYFINETUNE_OPTIM_CUDA_LAYOUT", layout)
        ps = [torch.nn.Parameter(p.clone().cuda()) for p in master]
        groups = [{"params": ps[g::7], "lr": 1e-3 * (g + 1), "l2sp": 0.01 * g} for g in range(7)]
        opt = (AdamW(groups, weight_decay=0.01) if kind == "adamw"
               else SGD(groups, momentum=0.9, weight_decay=0.01))
        for step_grads in grads:
            for p, g in zip(ps, step_grads):
                p.grad = g.cuda()
            opt.step()
        out[layout] = [p.detach().cpu() for p in ps]
    for a, b in zip(out["classic"], out["flat"]):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("bad", ["Wide", "1", " wide", "narrow"])
def test_cuda_layout_bad_setting_is_refused_before_any_write(monkeypatch, kind, bad):
    monkeypatch.setenv("PYFINETUNE_OPTIM_CUDA_LAYOUT", bad)
    op, name, args, kwargs = _fused_op_with_anchors(kind, "cuda", LAYOUT_SHAPES)
    _assert_refused_before_any_write(op, args, kwargs,
                                     f"pyfinetune.{name}: PYFINETUNE_OPTIM_CUDA_LAYOUT must be classic, wide or flat")
