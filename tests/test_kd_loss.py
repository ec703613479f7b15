"""kd_loss / DistillationLoss against the float64 reference of tests/reference_kd.py."""

import contextlib
import math
import warnings

import pytest
import torch

import pyfinetune
from pyfinetune.losses import DistillationLoss, kd_loss
from conftest import device_params, same_layout_input
from reference_kd import (assert_grad_close, assert_loss_close, divergence_rounding_atol, kd_reference,
                          kd_reference_rows, reduce_rows)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "sum", "none"]


def make_case(shape, device, dtype=torch.float32, scale=3.0, labels="with", seed=0, close=False):
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    s = torch.randn(shape, generator=g) * scale
    t = s + torch.randn(shape, generator=g) * 0.1 * scale if close else torch.randn(shape, generator=g) * scale
    lab = None
    if labels != "none":
        lab = torch.randint(0, V, shape[:-1], generator=g)
        if labels == "ignored":
            flat = lab.view(-1)
            flat[:: 3] = -100
    s, t = s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)
    return s, t, (lab.to(device) if lab is not None else None)


def run_ours(s, t, lab, grad_output=None, **kw):
    x = same_layout_input(s)
    loss = kd_loss(x, t, lab, **kw)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss) if grad_output is None else grad_output)
    return loss.detach(), grad


def check(s, t, lab, dtype=torch.float32, grad_output=None, torch_lowp=False, cond_atol=0.0, **kw):
    loss, grad = run_ours(s, t, lab, grad_output=grad_output, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == s.dtype and grad.shape == s.shape
    ref_loss, ref_grad = kd_reference(s, t, lab, grad_output=grad_output, **kw)
    torch_loss, lowp = None, None
    if dtype != torch.float64 and (torch_lowp or dtype == torch.float32):
        # PyTorch's composition in the input dtype, for the "2x PyTorch's own error" bounds.
        torch_loss, lowp = kd_reference(s, t, lab, grad_output=grad_output, compute_dtype=dtype, **kw)
    atol = 0.0
    if dtype != torch.float64:
        reduction = kw.get("reduction", "batchmean")
        rows = 1 if reduction in ("none", "batchmean") else s.numel() // s.shape[-1]
        atol = rows * divergence_rounding_atol(s, t, kw.get("temperature", 1.0),
                                               kw.get("alpha", 0.5) if lab is not None else 1.0)
    assert_loss_close(loss, ref_loss, dtype, torch_same_dtype=torch_loss, msg=str(kw), atol=atol)
    assert_grad_close(grad, ref_grad, dtype, torch_lowp=lowp if (torch_lowp or dtype == torch.float32) else None,
                      msg=str(kw), cond_atol=cond_atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("labels", ["none", "with", "ignored"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(1, 257), (3, 17, 257)])
def test_matches_reference(device, divergence, labels, reduction, shape):
    s, t, lab = make_case(shape, device, labels=labels)
    check(s, t, lab, divergence=divergence, reduction=reduction, temperature=2.0, alpha=0.3, beta=0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
# 2, 3 and 4 take the kernels' integer-temperature path (the CE exponential as a power of the one at T)
@pytest.mark.parametrize("temperature", [0.05, 0.5, 1.0, 2.0, 3.0, 4.0, 100.0])
def test_temperatures(device, divergence, temperature):
    s, t, lab = make_case((6, 1000), device, labels="ignored", seed=1)
    check(s, t, lab, divergence=divergence, temperature=temperature, alpha=0.7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 2.0, 4.0, 100.0])
@pytest.mark.parametrize("close", [False, True])
def test_large_logits(device, divergence, temperature, close):
    # |logits| in the thousands, student either independent of or close to the teacher (small D:
    # the case where a formula that cancels large numbers would fail).
    s, t, lab = make_case((4, 3001), device, scale=2000.0, seed=2, close=close)
    # reverse_kl's gradient is q times differences of log-ratios ((s - t) / T, up to thousands here)
    # and their q-weighted mean: float32 holds those to u32 * max|s - t| / T, times the divergence's
    # weight alpha T (over the rows of the batch mean); 8 such units. At T = 4 ours and PyTorch's
    # float32 errors both range over 1e-6 .. 1e-4 between seeds (3e-5 and 1e-6 on one draw), far
    # below this allowance; the other divergences need none (errors 1e-14 .. 1e-6).
    w = 0.5 * temperature / s.shape[0]
    cond = 0.0
    if divergence == "reverse_kl":
        cond = 8 * 2.0**-24 * (s.double() - t.double()).abs().max().item() / temperature * w
    check(s, t, lab, divergence=divergence, temperature=temperature, alpha=0.5, cond_atol=cond)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_odd_vocab(device, divergence):
    s, t, lab = make_case((2, 50257), device, seed=3)
    check(s, t, lab, divergence=divergence, temperature=1.5)


@pytest.mark.cuda
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("student_dtype,teacher_dtype,V", [(torch.float32, torch.float32, 6100),
                                                           (torch.bfloat16, torch.float32, 8192),
                                                           (torch.bfloat16, torch.bfloat16, 12000)])
def test_cuda_shared_memory_boundary(divergence, student_dtype, teacher_dtype, V):
    # 256 rows (one block per row) with a gradient: the kernel caches the row in just under 48 KB
    # of dynamic shared memory, above the default limit (48 KB minus the static shared memory).
    s, t, lab = make_case((256, V), "cuda", dtype=student_dtype, seed=12)
    same = teacher_dtype == student_dtype
    check(s, t.to(teacher_dtype), lab, dtype=student_dtype, torch_lowp=same and student_dtype != torch.float32,
          divergence=divergence, temperature=1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("need_grad", [True, False])
def test_cuda_cluster_split(divergence, need_grad):
    # 2 rows of 50257: each row is split over a cluster of blocks on sm_90 (one block elsewhere).
    s, t, lab = make_case((2, 50257), "cuda", labels="with", seed=13)
    if need_grad:
        check(s, t, lab, divergence=divergence, temperature=1.3, alpha=0.6)
        return
    with torch.no_grad():
        loss = kd_loss(s, t, lab, divergence=divergence, temperature=1.3, alpha=0.6)
    ref_loss, _ = kd_reference(s, t, lab, divergence=divergence, temperature=1.3, alpha=0.6)
    assert_loss_close(loss, ref_loss, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset,V", [(1, 1003), (2, 1003), (3, 50257)])
def test_sliced_student(device, divergence, dtype, offset, V):
    # A student sliced out of a wider buffer: its rows are aligned differently from the teacher and
    # from its own (contiguous) gradient, row by row (odd row stride).
    g = torch.Generator().manual_seed(14 + offset)
    N = 5 if V < 5000 else 2
    big = (torch.randn(N, V + 5, generator=g) * 3).to(device=device, dtype=dtype)
    s = big[:, offset:offset + V]
    t = (torch.randn(N, V, generator=g) * 3).to(device=device, dtype=dtype)
    lab = torch.randint(0, V, (N,), generator=g).to(device)
    assert s.data_ptr() % 16 != 0 and s.stride(0) == V + 5
    check(s, t, lab, dtype=dtype, torch_lowp=dtype != torch.float32, divergence=divergence, temperature=1.7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("teacher_dtype", ["same", torch.float32])
def test_low_precision(device, dtype, divergence, teacher_dtype):
    s, t, lab = make_case((3, 7, 515), device, dtype=dtype, labels="ignored", seed=4)
    if teacher_dtype != "same":
        t = t.to(teacher_dtype)
    check(s, t, lab, dtype=dtype, torch_lowp=teacher_dtype == "same", divergence=divergence, temperature=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_fp32_student_bf16_teacher(device):
    s, t, lab = make_case((5, 300), device, seed=5)
    check(s, t.to(torch.bfloat16), lab, divergence="jsd", temperature=3.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_contiguous(device, divergence):
    g = torch.Generator().manual_seed(6)
    big = (torch.randn(4, 9, 600, generator=g) * 2).to(device)
    s = big[:, ::2, 50:550]                                # row stride != V: read in place
    t = (torch.randn(500, 4, 5, generator=g) * 2).to(device).permute(1, 2, 0)  # stride along V != 1
    lab = torch.randint(0, 500, (5, 4), generator=g).to(device).t()  # non-contiguous labels
    assert not s.is_contiguous() and t.stride(-1) != 1 and not lab.is_contiguous()
    check(s, t, lab, divergence=divergence, temperature=1.7, reduction="none",
          grad_output=torch.rand(20, generator=g).to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_grad_output_not_one(device, reduction):
    s, t, lab = make_case((3, 5, 200), device, labels="ignored", seed=7)
    go = torch.rand(15) * 3 if reduction == "none" else torch.tensor(2.5)
    check(s, t, lab, grad_output=go.to(device), reduction=reduction, divergence="reverse_kl", temperature=0.7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leaf", [True, False])
def test_retain_graph_second_backward(device, leaf):
    # The backward scales the kept gradient in place; a retained graph must still give the
    # right gradient on later calls, with another grad_output each time.
    s, t, lab = make_case((4, 6, 130), device, labels="ignored", seed=17)
    x = s.detach().clone().requires_grad_(True)
    src = x if leaf else x * 1.0
    loss = kd_loss(src, t, lab, reduction="none", temperature=1.7)
    cpu = (s.cpu(), t.cpu(), lab.cpu())
    _, ref1 = kd_reference(*cpu, reduction="none", temperature=1.7, grad_output=torch.full((24,), 0.5))
    _, ref2 = kd_reference(*cpu, reduction="none", temperature=1.7, grad_output=torch.arange(1.0, 25.0))
    (g1,) = torch.autograd.grad(loss, x, torch.full_like(loss, 0.5), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.arange(1.0, 25.0, device=device), retain_graph=True)
    (g3,) = torch.autograd.grad(loss, x, torch.full_like(loss, 0.5))
    assert_grad_close(g1, ref1.to(device), torch.float32)
    assert_grad_close(g2, ref2.to(device), torch.float32)
    assert_grad_close(g3, ref1.to(device), torch.float32)


def test_retain_graph_with_zero_grad_output_first():
    # A first grad_output with a zero row leaves the kept gradient untouched (scaling by 0 could
    # not be undone), so later calls are still exact.
    s, t, lab = make_case((3, 40), "cpu", seed=18)
    x = s.clone().requires_grad_(True)
    loss = kd_loss(x, t, lab, reduction="none")
    (g1,) = torch.autograd.grad(loss, x, torch.tensor([1.0, 0.0, 1.0]), retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.ones(3))
    _, ref = kd_reference(s, t, lab, reduction="none")
    assert torch.all(g1[1] == 0)
    assert_grad_close(g2, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_ignored_gives_zero(device):
    s, t, _ = make_case((4, 100), device)
    lab = torch.full((4,), -100, device=device)
    x = s.clone().requires_grad_(True)
    loss = kd_loss(x, t, lab)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index(device):
    s, t, lab = make_case((6, 50), device, seed=8)
    lab[2] = 7
    check(s, t, lab, ignore_index=7, divergence="forward_kl")


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_gets_no_gradient_and_inference_skips_grad(device):
    s, t, lab = make_case((4, 64), device)
    x = s.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    kd_loss(x, tt, lab).backward()
    assert tt.grad is None and x.grad is not None
    with torch.no_grad():
        a = kd_loss(x, t, lab, reduction="none")
    _, grad = torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, temperature=1.0, alpha=0.5, divergence="forward_kl",
                                                beta=0.5, ignore_index=-100, need_grad=False)
    assert grad.numel() == 0
    torch.testing.assert_close(a, kd_loss(s, t, lab, reduction="none"))


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_functional(device):
    s, t, lab = make_case((2, 3, 40), device)
    mod = DistillationLoss(temperature=2.0, alpha=0.25, divergence="jsd", beta=0.2)
    assert "jsd" in repr(mod)
    torch.testing.assert_close(mod(s, t, lab), kd_loss(s, t, lab, temperature=2.0, alpha=0.25, divergence="jsd",
                                                       beta=0.2))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("labels", [False, True])
def test_gradcheck_double(divergence, labels):
    g = torch.Generator().manual_seed(9)
    s = torch.randn(3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 11, generator=g, dtype=torch.float64)
    lab = torch.tensor([1, -100, 4]) if labels else None
    for reduction in ("none", "batchmean"):
        fn = lambda x: kd_loss(x, t, lab, temperature=1.3, alpha=0.4, divergence=divergence, beta=0.3,
                               reduction=reduction)
        assert torch.autograd.gradcheck(fn, (s,))


def test_opcheck():
    g = torch.Generator().manual_seed(10)
    s = torch.randn(4, 33, generator=g, requires_grad=True)
    t = torch.randn(4, 33, generator=g)
    lab = torch.tensor([0, 5, -100, 32])
    for div in DIVERGENCES:
        kw = dict(temperature=2.0, alpha=0.5, divergence=div, beta=0.5, ignore_index=-100, need_grad=True)
        torch.library.opcheck(torch.ops.pyfinetune.kd_loss_fwd.default, (s, t, lab), kw)
        torch.library.opcheck(torch.ops.pyfinetune.kd_loss_fwd.default, (s.detach(), t, None),
                              dict(kw, need_grad=False))
        torch.library.opcheck(torch.ops.pyfinetune.kd_loss_fwd.default, (s, t, lab), dict(kw, grad_scale=0.3))
    v, i = torch.topk(t, 5)
    kw = dict(temperature=2.0, alpha=0.5, divergence="jsd", beta=0.5, ignore_index=-100, need_grad=True)
    torch.library.opcheck(torch.ops.pyfinetune.kd_loss_topk_fwd.default, (s, v, i, lab), kw)
    torch.library.opcheck(torch.ops.pyfinetune.kd_loss_topk_fwd.default, (s, v, i, lab), dict(kw, grad_scale=4.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
def test_grad_scale_scales_the_kept_gradient(device, dtype, divergence, topk, seed):
    # grad_scale = c: the kept gradient is c * d(row loss)/d(student) (rounded once), the loss is
    # unchanged, and the op's autograd divides c out again.
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU only")
    if topk and divergence == "reverse_kl":
        pytest.skip("reverse_kl is not defined with a top-k teacher")
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(6, 301, generator=g) * 4).to(device, dtype)
    t = (torch.randn(6, 301, generator=g) * 4).to(device, dtype)
    lab = torch.tensor([0, 5, -100, 300, 7, 1], device=device)
    op = torch.ops.pyfinetune.kd_loss_topk_fwd if topk else torch.ops.pyfinetune.kd_loss_fwd
    inputs = (s, *torch.topk(t, 9)) if topk else (s, t)
    kw = dict(temperature=1.7, alpha=0.4, divergence=divergence, beta=0.3, ignore_index=-100, need_grad=True)
    c = 1.0 / 3.0
    loss1, g1 = op(*inputs, lab, **kw)
    loss_c, g_c = op(*inputs, lab, **kw, grad_scale=c)
    assert torch.equal(loss1, loss_c)
    assert g_c.dtype == dtype
    # g1 is rounded once too: two roundings of the dtype apart (2 eps relative), plus the kernel's
    # own arithmetic (float32, float64 for float64) on terms of size up to alpha T + (1 - alpha)
    # that may cancel: 16 units of it absolute.
    exact = g1.double() * c
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    atol = 16 * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps * (0.4 * 1.7 + 1) + tiny
    err = (g_c.double() - exact).abs()
    assert (err <= 2 * eps * exact.abs() + atol).all(), err.max()
    assert torch.equal(g_c[2], torch.zeros_like(g_c[2])), "an ignored row's gradient is 0"
    # the op's autograd: d(sum of rows)/d(student) = kept / grad_scale
    x = s.detach().clone().requires_grad_(True)
    rows, _ = op(x, *inputs[1:], lab, **kw, grad_scale=c)
    (dx,) = torch.autograd.grad(rows.sum(), x)
    torch.testing.assert_close(dx.double(), g1.double(), rtol=4 * eps, atol=atol / c)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    s = torch.randn(2, 5, 64, generator=g)
    t = torch.randn(2, 5, 64, generator=g)
    lab = torch.randint(0, 64, (2, 5), generator=g)
    lab[0, 0] = -100

    def f(x, y, z):
        return kd_loss(x * 1.5, y, z, temperature=2.0, divergence="jsd") * 3.0

    compiled = torch.compile(f, fullgraph=True)
    x1 = s.clone().requires_grad_(True)
    x2 = s.clone().requires_grad_(True)
    a, b = f(x1, t, lab), compiled(x2, t, lab)
    a.backward()
    b.backward()
    torch.testing.assert_close(b, a)
    torch.testing.assert_close(x2.grad, x1.grad)


def test_registered_in_info():
    kernels = pyfinetune.kernel_devices()
    assert "cpu" in kernels["kd_loss_fwd"] and "cpu" in kernels["kd_loss_topk_fwd"]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.7])
def test_leading_minus_inf_tiles_with_very_negative_logits(divergence, temperature):
    # Whole tiles of -inf logits (a masked vocabulary) before logits around -1000: the CPU kernel's
    # cached exponentials of those tiles are 0 and their factors must be 0 too (they were
    # exp(+1000 / T) = inf, and inf * 0 gave NaN gradients). The row must give the gradient of the
    # row without the masked part, and exactly 0 on it.
    g = torch.Generator().manual_seed(23)
    n, v, masked = 3, 2048, 1024
    s = torch.randn(n, v, generator=g) * 3 - 1000.0
    t = torch.randn(n, v, generator=g) * 3 - 1000.0
    s[:, :masked] = float("-inf")
    t[:, :masked] = float("-inf")
    lab = torch.randint(masked, v, (n,), generator=g)
    kw = dict(temperature=temperature, alpha=0.4, divergence=divergence)
    x = s.clone().requires_grad_(True)
    loss = kd_loss(x, t, lab, **kw)
    loss.backward()
    xr = s[:, masked:].clone().requires_grad_(True)
    ref = kd_loss(xr, t[:, masked:], lab - masked, **kw)
    ref.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[:, :masked] == 0).all()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad[:, masked:], xr.grad, rtol=1e-5, atol=1e-7)


def test_kept_gradient_from_the_pool_is_seen_by_memory_profiling(monkeypatch):
    # From 1 MiB the CPU kernel takes its kept gradient from the block pool (reused without page
    # faults); the pool reports it to the profiler as torch's CPU allocator would, so a memory
    # measurement still sees the logits-sized buffer held between forward and backward.
    from pyfinetune.benchmarks.common import CpuAllocations

    g = torch.Generator().manual_seed(29)
    s = torch.randn(256, 2048, generator=g).requires_grad_(True)
    t = torch.randn(256, 2048, generator=g)
    nbytes = s.numel() * 4
    for limit in ("1024", "0"):  # 0: no idle block kept, a fresh one per call
        monkeypatch.setenv("PYFINETUNE_DENSE_POOL_MB", limit)
        with CpuAllocations() as mem:
            loss = kd_loss(s, t, temperature=2.0)
            mem.mark("forward")
            loss.backward()
        assert mem.live_at("forward") >= 0.99 * nbytes, (limit, mem.live_at("forward"))  # (small frees)
        grad = s.grad.clone()
        s.grad = None
        x = s.detach().clone().requires_grad_(True)
        kd_loss(x, t, temperature=2.0).backward()
        assert torch.equal(x.grad, grad)  # a reused block gives the same values
    monkeypatch.setenv("PYFINETUNE_DENSE_POOL_MB", "lots")
    with pytest.raises(ValueError, match="PYFINETUNE_DENSE_POOL_MB must be a number of megabytes"):
        kd_loss(s, t, temperature=2.0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 2.5])
@pytest.mark.parametrize("V", [37, 6151])
def test_a_row_with_an_undefined_loss_gets_a_nan_gradient(device, dtype, divergence, labels, temperature, V):
    # A row whose loss is NaN (a student or teacher row of only -inf, a +inf or NaN logit) must
    # get a NaN gradient, as torch's composition gives: the kernels wrote a finite, made-up
    # gradient there (GradScaler and anomaly checks look at gradients, not at the loss). Rows with
    # an infinite but well-defined loss (the teacher puts mass where the student has -inf) keep a
    # finite gradient, and the other rows are unaffected. V = 6151: rows split over blocks on CUDA
    # and past the CPU kernel's tile.
    g = torch.Generator().manual_seed(7)
    n = 6
    s = torch.randn(n, V, generator=g) * 3
    t = torch.randn(n, V, generator=g) * 3
    s[0] = float("-inf")           # the student's softmax is undefined
    t[1] = float("-inf")           # the teacher's
    s[2, V // 2] = float("nan")
    s[3, 3] = float("inf")
    s[4, : V // 2] = float("-inf")  # a masked half: finite loss (inf for forward_kl), finite gradient
    lab = torch.randint(V // 2, V, (n,), generator=g) if labels else None
    s, t = s.to(device, dtype), t.to(device, dtype)
    lab = lab.to(device) if lab is not None else None
    x = s.clone().requires_grad_()
    loss = kd_loss(x, t, lab, divergence=divergence, temperature=temperature, alpha=0.4, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    ref_loss = kd_reference(s, t, lab, divergence=divergence, temperature=temperature, alpha=0.4, reduction="none")[0]
    for r in range(n):
        if torch.isnan(ref_loss[r]):
            assert torch.isnan(loss[r]), (r, loss[r])
            assert torch.isnan(grad[r].float()).all(), (r, grad[r])
        else:
            assert not torch.isnan(loss[r]), (r, loss[r])
            assert torch.isfinite(grad[r].float()).all(), (r, grad[r])
    assert torch.isnan(loss[:4]).all() and torch.isfinite(grad[5].float()).all()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_a_topk_row_with_an_undefined_loss_gets_a_nan_gradient(device, divergence):
    g = torch.Generator().manual_seed(8)
    s = torch.randn(3, 301, generator=g)
    t = torch.randn(3, 301, generator=g)
    s[0] = float("-inf")
    vals, idx = t.topk(16, dim=-1)
    vals[2] = float("-inf")
    x = s.to(device).requires_grad_()
    loss = pyfinetune.losses.kd_loss_topk(x, vals.to(device), idx.to(device), divergence=divergence,
                                          temperature=2.0, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isnan(loss[[0, 2]]).all() and torch.isnan(grad[[0, 2]]).all()
    assert torch.isfinite(loss[1]) and torch.isfinite(grad[1]).all()


class _NoOpMode(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("path", ["eager", "registered"])
def test_float16_gradient_survives_a_grad_scaler(device, divergence, labels, path):
    # A float16 student keeps its gradient in float16: written already divided by the batch, its
    # entries (~1e-5 / N) were flushed to 0 or left subnormal before a GradScaler's x65536 reached
    # them in the backward (a third of them 0 at 512 x 32000, 3e-2 relative error). Now scaled into
    # float16's normal range (forward_kl, jsd) or at least not divided by the batch (reverse_kl),
    # and compared with torch's composition, which rounds 65536 * gradient once.
    g = torch.Generator().manual_seed(11)
    n, v = 256, 8000
    s = (torch.randn(n, v, generator=g) * 3).half().to(device)
    t = (torch.randn(n, v, generator=g) * 3).to(device)
    lab = torch.randint(0, v, (n,), generator=g).to(device) if labels else None
    kw = dict(temperature=2.0, alpha=0.5, divergence=divergence)
    x = s.clone().requires_grad_()
    ctx = _NoOpMode() if path == "registered" else contextlib.nullcontext()
    with ctx:
        loss = kd_loss(x, t, lab, **kw)
    (loss * 65536).backward()
    ref = kd_reference(s, t, lab, grad_output=torch.tensor(65536.0, dtype=torch.float64), **kw)[1]
    xt = s.clone().requires_grad_()  # torch's composition in float32 from the float16 leaf
    rows = kd_reference_rows(xt, t, lab, compute_dtype=torch.float32, **kw)
    (reduce_rows(rows, lab, -100, "batchmean") * 65536).backward()

    def rel(a):
        return ((a.double() - ref).norm() / ref.norm()).item()

    zeros, torch_zeros = (x.grad == 0).float().mean().item(), (xt.grad == 0).float().mean().item()
    assert zeros <= torch_zeros + 1e-3, (zeros, torch_zeros)
    assert rel(x.grad) <= 2 * rel(xt.grad) + 1e-4, (rel(x.grad), rel(xt.grad))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("path", ["eager", "registered"])
def test_float16_reverse_kl_gradient_survives_a_grad_scaler(device, labels, path):
    # reverse_kl's gradient entries (q times log-ratio differences) have no bound a fixed scale
    # could keep in float16's range: kept in float16 unscaled, 2,800-7,600 of these 18,000 entries
    # (sharp student rows at T = 0.5) fell below float16's smallest subnormal and came back 0 after
    # a x65536 upstream gradient, where torch's composition (65536 * gradient rounded once) keeps
    # them. kd_loss now keeps a float32 gradient for such a student: the same zeros as torch's
    # composition and its error against float64, the student's gradient still float16.
    n, v = 6, 3000
    lab_gen = torch.Generator().manual_seed(29)
    for seed in range(3):
        g = torch.Generator().manual_seed(1000 + seed)
        s = (torch.randn(n, v, generator=g) * 4).half().to(device)
        t = (torch.randn(n, v, generator=g) * 4).to(device)
        lab = torch.randint(0, v, (n,), generator=lab_gen).to(device) if labels else None
        kw = dict(temperature=0.5, alpha=0.7, divergence="reverse_kl")
        x = s.clone().requires_grad_()
        ctx = _NoOpMode() if path == "registered" else contextlib.nullcontext()
        with ctx:
            loss = kd_loss(x, t, lab, **kw)
        (loss * 65536).backward()
        assert x.grad.dtype == torch.float16
        ref_loss, ref = kd_reference(s, t, lab, grad_output=torch.tensor(65536.0, dtype=torch.float64), **kw)
        assert_loss_close(loss * 65536, ref_loss * 65536, torch.float16)
        xt = s.clone().requires_grad_()
        rows = kd_reference_rows(xt, t, lab, compute_dtype=torch.float32, **kw)
        (reduce_rows(rows, lab, -100, "batchmean") * 65536).backward()
        ours_zero, torch_zero = x.grad == 0, xt.grad == 0
        # The cases hold entries below float16's smallest subnormal before the factor and in its
        # range after it: the ones the old code lost.
        assert int(((ref.abs() < 2.0 ** -24 * 65536) & (ref.abs() > 2.0 ** -23)).sum()) > 100
        assert int((ours_zero & ~torch_zero).sum()) == 0, int((ours_zero & ~torch_zero).sum())
        err = (x.grad.double() - ref).abs().max().item()
        torch_err = (xt.grad.double() - ref).abs().max().item()
        assert err <= torch_err * 1.01 + 1e-6, (err, torch_err)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1e17, 1e18])
def test_float16_kept_gradient_scale_leaves_temperature_squared_finite(device, divergence, temperature):
    # The float16 kept gradient's power-of-two scale is chosen from alpha * T + (1 - alpha); with
    # alpha ~ 0 it was 8192 whatever T, and T^2 * 8192 overflowed float32 above T ~ 2e17: the kernel
    # refused (accepted temperatures reach 1e18). Now the scale leaves T^2 * scale finite.
    g = torch.Generator().manual_seed(13)
    s = torch.randn(6, 40, generator=g).half().to(device)
    t = torch.randn(6, 40, generator=g).half().to(device)
    lab = torch.randint(0, 40, (6,), generator=g).to(device)
    kw = dict(temperature=temperature, alpha=1e-40, divergence=divergence)
    x = s.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the large-temperature float32 warning
        loss = kd_loss(x, t, lab, **kw)
        loss.backward()
    ref_loss, ref_grad = kd_reference(s, t, lab, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)  # alpha ~ 0: the CE
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-2, atol=1e-4)  # float16 rounding


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("masked", [1000, 1024, 2048, 3000])
def test_mixed_mask_conventions_do_not_depend_on_the_vocabulary_order(device, divergence, masked):
    # Masked classes given as -inf in one input and a huge finite negative in the other (finfo.min,
    # -1e9): both are zero probabilities. The CPU kernel's running-maximum rescale multiplied an
    # infinite cross term by 0 when such classes filled a whole 1024-wide tile before the maximum
    # grew: NaN in that order, a finite loss with the classes at the end of the row.
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 4096, generator=g) * 3
    t = torch.randn(2, 4096, generator=g) * 3
    ninf = float("-inf")
    s[:, :masked], t[:, :masked] = ninf, -1e9
    if divergence == "reverse_kl":  # the mirror: the teacher's -inf against the student's finite
        s[:, :masked], t[:, :masked] = -1e9, ninf
    clean_s, clean_t = s.clone(), t.clone()
    clean_s[:, :masked] = clean_t[:, :masked] = ninf  # the same distributions, one convention
    kw = dict(temperature=2.0, divergence=divergence, reduction="none")
    ref = kd_loss(clean_s.to(device), clean_t.to(device), **kw)
    for flip in (False, True):
        ss, tt = (s.flip(-1), t.flip(-1)) if flip else (s, t)
        x = ss.to(device).requires_grad_()
        loss = kd_loss(x, tt.to(device), **kw)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_alpha_zero_with_an_infinite_divergence_under_torch_func(divergence):
    # alpha = 0 leaves only the cross-entropy; the torch.func composition multiplied an infinite
    # divergence (the student's -inf where the teacher has mass) by 0: NaN, where eager gives CE.
    s = torch.tensor([[0.0, float("-inf"), 1.0, 0.5], [0.3, 0.1, -0.2, 0.0]])
    t = torch.tensor([[0.0, 2.0, 1.0, 0.5], [float("-inf"), 1.0, 0.0, 0.0]])
    lab = torch.tensor([2, 1])
    kw = dict(alpha=0.0, divergence=divergence, temperature=2.0)
    x = s.clone().requires_grad_()
    eager = kd_loss(x, t, lab, **kw)
    eager.backward()
    grad, loss = torch.func.grad_and_value(lambda a: kd_loss(a, t, lab, **kw))(s)
    torch.testing.assert_close(loss, eager.detach())
    torch.testing.assert_close(grad, x.grad)
    torch.testing.assert_close(eager.detach(), torch.nn.functional.cross_entropy(s, lab))


@pytest.mark.parametrize("fn", ["kd_loss", "kd_loss_topk"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_retained_graph_of_an_nd_leaf_student_backwards_many_times(fn, reduction):
    # A leaf of more than two dimensions got the kept buffer (through the flattening view) as its
    # .grad: autograd accumulated the next backward into it in place, and a third backward through
    # the retained graph failed (the buffer it reads had changed); zeroing .grad in place between
    # two backwards failed the same way. Such a leaf now gets a copy.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 50, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 50, generator=g)
    if fn == "kd_loss":
        loss = kd_loss(x, t, temperature=2.0, reduction=reduction)
    else:
        v, i = t.topk(5, dim=-1)
        loss = pyfinetune.losses.kd_loss_topk(x, v, i, temperature=2.0, reduction=reduction)
    loss = loss.sum()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 3 * first)
    x.grad.zero_()
    loss.backward()
    torch.testing.assert_close(x.grad, first)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [3.0, 4.0, 10.0, 100.0])
@pytest.mark.parametrize("vocab", [1000, 32003])
def test_nearly_equal_distributions_at_high_temperature_keep_float32_precision(divergence, temperature, vocab):
    # A student 0.3 logits from its teacher: D is O(0.05 / T^2) and the loss T^2 D; the difference of
    # the two log-partitions (each O(log V)) lost it in float32 (0.16 relative at T = 100 before the
    # CPU kernels took the gap form, kd_loss_cpu.cpp). Per row, against float64 inputs: T >= 4 (the
    # gap form) within 1e-3, T = 3 (the log-partitions, where the error is smaller) within 1e-3 too.
    g = torch.Generator().manual_seed(7)
    s = torch.randn(6, vocab, generator=g) * 3
    t = s + torch.randn(6, vocab, generator=g) * 0.3
    t[0, : vocab // 2] = float("-inf")  # a masked half of the teacher's vocabulary: zero probabilities
    if divergence == "reverse_kl":
        t[0] = t[0].clamp_min(-1e4)  # reverse_kl needs the teacher's support to cover the student's
    kw = dict(temperature=temperature, divergence=divergence, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = kd_loss(s, t, **kw)
        ref = kd_loss(s.double(), t.double(), **kw)
    err = ((got.double() - ref).abs() / ref.abs()).max().item()
    assert err < 1e-3, err


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [4.0, 10.0, 100.0])
def test_high_temperature_form_counts_zero_probabilities_offsets_and_late_maxima(divergence, temperature):
    # Cases a review found the first version of the CPU gap form wrong on: a teacher probability of
    # 0 (a -inf logit, or one ~1000 below the row maximum, whose float32 exponential underflows) where
    # the student still has mass, and a teacher a constant far above the student (forward_kl; below
    # for reverse_kl), where a gap sum near -1 amplified rounding; plus row maxima in the last
    # 1024-element tile (the sums rescaled late). Per row against float64 inputs, within 1e-3.
    inf = float("inf")
    two = torch.tensor([[0.0, 0.0]])
    for other in (torch.tensor([[0.0, -inf]]), torch.tensor([[0.0, -1000.0]])):
        s, t = (two, other) if divergence == "forward_kl" else (other, two)
        kw = dict(temperature=temperature, alpha=1.0, divergence=divergence, reduction="none")
        got, ref = kd_loss(s, t, **kw), kd_loss(s.double(), t.double(), **kw)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5)
        if other[0, 1] == -inf:
            assert ref.item() == pytest.approx(temperature**2 * math.log(2), rel=1e-12)  # T^2 KL((1, 0) || (1/2, 1/2))
    g = torch.Generator().manual_seed(11)
    sign = 1.0 if divergence == "forward_kl" else -1.0
    for offset in (0.0, 24.0, 10.0 * temperature):
        s = torch.randn(6, 3000, generator=g) * 3
        t = s + sign * offset + torch.randn(6, 3000, generator=g) * 0.3
        s[::2, -1] += 20
        t[::2, -1] += 20
        if divergence == "forward_kl":
            t[1, ::7] = -inf  # zero teacher probabilities among the others
        kw = dict(temperature=temperature, divergence=divergence, reduction="none")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got, ref = kd_loss(s, t, **kw), kd_loss(s.double(), t.double(), **kw)
        err = ((got.double() - ref).abs() / ref.abs()).max().item()
        assert err < 1e-3, (offset, err)
