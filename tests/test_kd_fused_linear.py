"""fused_linear_kd_loss against the unfused composition (logits, then the float64 reference)."""

import pytest
import torch

from pyfinetune.losses import fused_linear_kd_loss
from reference_kd import kd_reference_rows, reduce_rows

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(device, dtype, N=37, H=24, Ht=16, V=301, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g)
    ws = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    bs = torch.randn(V, generator=g) if bias else None
    ht = torch.randn(N, Ht, generator=g)
    wt = torch.randn(V, Ht, generator=g) / Ht ** 0.5 * 3
    bt = torch.randn(V, generator=g) if bias else None
    lab = torch.randint(0, V, (N,), generator=g)
    lab[::5] = -100
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)
    return cast(hs), cast(ws), cast(bs), cast(ht), cast(wt), cast(bt), lab.to(device)


def unfused(hs, ws, bs, ht, wt, bt, lab, reduction, go, **kw):
    """The composition in float64: logits, reference loss, autograd."""
    leaves = [x.detach().double().requires_grad_(True) for x in (hs, ws, bs) if x is not None]
    h, w = leaves[0], leaves[1]
    b = leaves[2] if bs is not None else None
    logits = h @ w.t() + (b if b is not None else 0)
    tl = ht.double() @ wt.double().t() + (bt.double() if bt is not None else 0)
    loss = reduce_rows(kd_reference_rows(logits, tl, lab, **kw), lab, -100, reduction)
    grads = torch.autograd.grad(loss, leaves, go.double())
    return loss.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_matches_unfused_fp32(device, reduction, divergence, chunk_size):
    hs, ws, bs, ht, wt, bt, lab = make(device, torch.float32)
    kw = dict(temperature=2.0, alpha=0.6, divergence=divergence, beta=0.4)
    xs = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    loss = fused_linear_kd_loss(xs[0], xs[1], ht, wt, lab, student_bias=xs[2], teacher_bias=bt, chunk_size=chunk_size,
                                reduction=reduction, **kw)
    go = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(2)) + 0.5).to(device)
    loss.backward(go)
    ref_loss, ref_grads = unfused(hs, ws, bs, ht, wt, bt, lab, reduction, go, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-5)
    for x, r, name in zip(xs, ref_grads, ("hidden", "weight", "bias")):
        assert x.grad.dtype == x.dtype
        err = (x.grad.double() - r).abs().max().item()
        assert err <= 1e-4 * r.abs().max().item() + 1e-7, f"{name}: {err:.3e}"


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_weights_float32_logits(device):
    # bf16 inputs: logits computed in float32 from the bf16 values, so the error against the
    # float64 composition of the same bf16 values is only the final rounding of the gradients.
    hs, ws, bs, ht, wt, bt, lab = make(device, torch.bfloat16, seed=3, bias=False)
    xs = [x.clone().requires_grad_(True) for x in (hs, ws)]
    loss = fused_linear_kd_loss(xs[0], xs[1], ht, wt, lab, chunk_size=10, temperature=1.5)
    loss.backward()
    ref_loss, ref_grads = unfused(hs, ws, None, ht, wt, None, lab, "batchmean", torch.tensor(1.0, device=device),
                                  temperature=1.5)
    # The teacher logits are computed in bf16 (as the teacher model would): a small loss shift.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-2, atol=1e-3)
    for x, r in zip(xs, ref_grads):
        assert x.grad.dtype == torch.bfloat16
        err = (x.grad.double() - r).abs().max().item()
        assert err <= 3e-2 * r.abs().max().item(), err


def test_no_labels_and_leading_dims():
    hs, ws, bs, ht, wt, bt, _ = make("cpu", torch.float32, N=12)
    x = hs.reshape(3, 4, -1).clone().requires_grad_(True)
    loss = fused_linear_kd_loss(x, ws, ht.reshape(3, 4, -1), wt, None, chunk_size=5, divergence="jsd")
    ref = reduce_rows(kd_reference_rows(hs.double() @ ws.double().t(), ht.double() @ wt.double().t(), None,
                                        divergence="jsd"), None, -100, "batchmean")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=1e-6)
    loss.backward()
    assert x.grad.shape == x.shape


def test_no_grad_inference():
    hs, ws, bs, ht, wt, bt, lab = make("cpu", torch.float32)
    with torch.no_grad():
        a = fused_linear_kd_loss(hs, ws, ht, wt, lab, student_bias=bs, teacher_bias=bt, reduction="none")
    b = kd_reference_rows(hs.double() @ ws.double().t() + bs.double(), ht.double() @ wt.double().t() + bt.double(), lab)
    torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-6)


def _loss_and_grads(hs, ws, bs, ht, wt, bt, lab, reduction, **kw):
    xs = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    loss = fused_linear_kd_loss(xs[0], xs[1], ht, wt, lab, student_bias=xs[2], teacher_bias=bt, chunk_size=8,
                                reduction=reduction, temperature=2.0, **kw)
    loss.sum().backward()
    return loss.detach(), [x.grad for x in xs]


AUTOCAST = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")] + (
    [pytest.param("cuda", torch.float16, id="cuda-fp16")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device,amp_dtype", AUTOCAST)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_autocast_has_no_effect(device, amp_dtype, reduction):
    # Under autocast the chunk matmuls used to run in low precision and the float32 `out=` of
    # the hidden-state gradient raised. The function turns autocast off: the same bits as without.
    inputs = make(device, torch.float32, seed=5)
    ref_loss, ref_grads = _loss_and_grads(*inputs, reduction)
    with torch.autocast(device, dtype=amp_dtype):
        loss, grads = _loss_and_grads(*inputs, reduction)
    assert loss.dtype == torch.float32 and torch.equal(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and torch.equal(g, r)


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_hidden_and_weight_dtypes_differ(device):
    # A teacher run under autocast gives bf16 hidden states next to a float32 head: the teacher's
    # logits are computed in the promoted dtype (float32), as if its hidden states were float32.
    hs, ws, bs, ht, wt, bt, lab = make(device, torch.float32, seed=6)
    ht16 = ht.to(torch.bfloat16)
    loss, grads = _loss_and_grads(hs, ws, bs, ht16, wt, bt, lab, "batchmean")
    ref_loss, ref_grads = _loss_and_grads(hs, ws, bs, ht16.float(), wt, bt, lab, "batchmean")
    assert torch.equal(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first", [0.5, 0.0])
def test_retain_graph_second_backward(device, first):
    # The backward scales the kept gradients in place when it can undo it (a finite, nonzero
    # scale); later backwards through a retained graph must still be exact.
    hs, ws, bs, ht, wt, bt, lab = make(device, torch.float32, seed=11)
    leaves = [x.detach().clone().requires_grad_(True) for x in (hs, ws, bs)]
    loss = fused_linear_kd_loss(leaves[0], leaves[1], ht, wt, lab, student_bias=leaves[2], teacher_bias=bt,
                                temperature=1.5)
    g1 = torch.autograd.grad(loss, leaves, torch.tensor(first, device=device), retain_graph=True)
    g2 = torch.autograd.grad(loss, leaves, torch.tensor(2.0, device=device), retain_graph=True)
    g3 = torch.autograd.grad(loss, leaves, torch.tensor(first, device=device))
    fresh = [x.detach().clone().requires_grad_(True) for x in (hs, ws, bs)]
    ref_loss = fused_linear_kd_loss(fresh[0], fresh[1], ht, wt, lab, student_bias=fresh[2], teacher_bias=bt,
                                    temperature=1.5)
    ref = torch.autograd.grad(ref_loss, fresh)
    for a, b, c, r in zip(g1, g2, g3, ref):
        torch.testing.assert_close(a, r * first, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b, r * 2.0, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c, r * first, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float32])
def test_bf16_tensor_core_path(device, bias, reduction, teacher_dtype, monkeypatch):
    # On CUDA a bfloat16 head takes the tensor-core path (products with float32 results, the chunk
    # gradient rounded to bfloat16 for the gradient products); forced here on the CPU too, where
    # the same steps run through float32 copies. Against the float64 composition of the same
    # bfloat16 values: the rounding of the chunk gradient and of the returned gradients.
    import pyfinetune.losses as losses

    monkeypatch.setattr(losses, "_tensor_core_head", lambda h, w: h.dtype == w.dtype == torch.bfloat16)
    hs, ws, bs, ht, wt, bt, lab = make(device, torch.bfloat16, seed=4, bias=bias)
    ht, wt, bt = (None if x is None else x.to(teacher_dtype) for x in (ht, wt, bt))
    xs = [x.clone().requires_grad_(True) for x in (hs, ws, bs) if x is not None]
    loss = fused_linear_kd_loss(xs[0], xs[1], ht, wt, lab, student_bias=xs[2] if bias else None, teacher_bias=bt,
                                chunk_size=10, temperature=2.0, reduction=reduction)
    go = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(5)) + 0.5).to(device)
    loss.backward(go)
    ref_loss, ref_grads = unfused(hs, ws, bs, ht, wt, bt, lab, reduction, go, temperature=2.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-2, atol=1e-3)
    for x, r in zip(xs, ref_grads):
        assert x.grad.dtype == torch.bfloat16
        err = (x.grad.double() - r).abs().max().item()
        assert err <= 3e-2 * r.abs().max().item(), err
    # and close to the float32-product path (the chunk gradient's bf16 rounding: ~2^-9 relative)
    monkeypatch.setattr(losses, "_tensor_core_head", lambda h, w: False)
    ys = [x.detach().clone().requires_grad_(True) for x in xs]
    fused_linear_kd_loss(ys[0], ys[1], ht, wt, lab, student_bias=ys[2] if bias else None, teacher_bias=bt,
                         chunk_size=10, temperature=2.0, reduction=reduction).backward(go)
    for x, y in zip(xs, ys):
        err = (x.grad.double() - y.grad.double()).abs().max().item()
        assert err <= 2e-2 * y.grad.double().abs().max().item(), err


def test_tensor_core_path_choice(monkeypatch):
    # Taken for a CUDA bf16 hidden state and weight when the device passed the probe, and not under
    # torch.compile (torch 2.11 mis-traces addmm with out_dtype). Fake CUDA tensors: no GPU needed.
    from torch._subclasses.fake_tensor import FakeTensorMode

    import pyfinetune.losses as losses

    monkeypatch.setattr(losses, "_tensor_core_ok", lambda device: True)
    with FakeTensorMode():
        bf = torch.empty(4, 4, dtype=torch.bfloat16, device="cuda")
        assert losses._tensor_core_head(bf, bf) == losses._HAS_OUT_DTYPE_MM
        assert not losses._tensor_core_head(bf.half(), bf.half())
        assert not losses._tensor_core_head(bf, bf.float())
    cpu_bf = torch.empty(4, 4, dtype=torch.bfloat16)
    assert not losses._tensor_core_head(cpu_bf, cpu_bf)  # CPU: float32 products
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with FakeTensorMode():
        bf = torch.empty(4, 4, dtype=torch.bfloat16, device="cuda")
        assert not losses._tensor_core_head(bf, bf)
    monkeypatch.setattr(losses, "_tensor_core_ok", lambda device: False)  # a failed probe
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with FakeTensorMode():
        bf = torch.empty(4, 4, dtype=torch.bfloat16, device="cuda")
        assert not losses._tensor_core_head(bf, bf)


@pytest.mark.skipif(not __import__("pyfinetune.losses").losses._HAS_OUT_DTYPE_MM,
                    reason="this torch has no mm / addmm out_dtype overloads")
@pytest.mark.skipif(not torch.backends.cuda.is_built(),
                    reason="a CPU-only build of torch cannot trace CUDA products, even on fake tensors")
@pytest.mark.parametrize("teacher_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_tensor_core_products_trace_on_fake_cuda_tensors(teacher_dtype, bias):
    # The CUDA branch of the products (torch.mm / torch.addmm with out_dtype and out=) on fake CUDA
    # tensors: the overloads, dtypes and shapes torch accepts, with no GPU.
    from torch._subclasses.fake_tensor import FakeTensorMode

    import pyfinetune.losses as losses

    n, hdim, v = 37, 24, 301
    with FakeTensorMode():
        o = torch.empty(3, 3, device="cuda")
        a = torch.empty(3, 2, dtype=torch.bfloat16, device="cuda")
        try:
            torch.addmm(o, a, a.t(), out_dtype=torch.float32, out=o)
        except TypeError as e:  # torch 2.11 (the H200 check of 2026-11-27): "torch.dtype * FakeTensor"
            pytest.skip(f"this torch's fake addmm(out_dtype=) passes out_dtype on as beta ({e}); eager CUDA "
                        "runs its kernel, and compiled code takes the plain float32 products")
    with FakeTensorMode():
        dev = "cuda"
        h = torch.empty(n, hdim, dtype=torch.bfloat16, device=dev)
        w = torch.empty(v, hdim, dtype=torch.bfloat16, device=dev)
        b = torch.empty(v, dtype=torch.float32, device=dev) if bias else None
        ht = torch.empty(n, 16, dtype=teacher_dtype, device=dev)
        wt = torch.empty(v, 16, dtype=teacher_dtype, device=dev)
        lab = torch.zeros(n, dtype=torch.long, device=dev)
        opts = dict(temperature=2.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100)
        rows, gh, gw, gb = losses._linear_kd_chunks(h, w, b, ht, wt, None, lab, opts, 10, (True, True, bias))
        assert rows.shape == (n,) and rows.dtype == torch.float32
        assert gh.shape == (n, hdim) and gh.dtype == torch.float32
        assert gw.shape == (v, hdim) and gw.dtype == torch.float32
        assert (gb is not None) == bias


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_create_graph(reduction):
    # batchmean / sum: the gradients are differentiable in the upstream gradient (linear in it);
    # none: a clear error instead of torch's "out= ... automatic differentiation" from inside.
    hs, ws, bs, ht, wt, bt, lab = make("cpu", torch.float32, seed=6, bias=False)
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    weight = torch.tensor(1.7, requires_grad=True)
    loss = fused_linear_kd_loss(h, w, ht, wt, lab, chunk_size=8, temperature=2.0, reduction=reduction)
    if reduction == "none":
        with pytest.raises(RuntimeError, match='reduction="none" does not support create_graph=True'):
            torch.autograd.grad(loss.sum() * weight, (h,), create_graph=True)
        return
    (gh,) = torch.autograd.grad(loss * weight, (h,), create_graph=True)
    (dw,) = torch.autograd.grad(gh.sum(), weight)
    (g1,) = torch.autograd.grad(fused_linear_kd_loss(h, w, ht, wt, lab, chunk_size=8, temperature=2.0,
                                                     reduction=reduction), (h,))
    torch.testing.assert_close(dw, g1.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_float64_student_computes_in_float64(reduction, divergence):
    # A float64 student (as kd_loss: for gradcheck and references) is computed in float64 (it was
    # computed in float32 and returned a float32 loss: errors of 1e-7 .. 2e-5 and a failing gradcheck).
    hs, ws, bs, ht, wt, bt, lab = make("cpu", torch.float64, N=11, H=6, Ht=5, V=13)
    kw = dict(temperature=2.0, alpha=0.6, divergence=divergence, beta=0.4)
    xs = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    loss = fused_linear_kd_loss(xs[0], xs[1], ht, wt, lab, student_bias=xs[2], teacher_bias=bt, chunk_size=4,
                                reduction=reduction, **kw)
    assert loss.dtype == torch.float64
    go = torch.rand(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    loss.backward(go)
    ref_loss, ref_grads = unfused(hs, ws, bs, ht, wt, bt, lab, reduction, go, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-13)
    for x, r in zip(xs, ref_grads):
        assert x.grad.dtype == torch.float64
        torch.testing.assert_close(x.grad, r, rtol=1e-11, atol=1e-13)
    fn = lambda h, w, b: fused_linear_kd_loss(h, w, ht, wt, lab, student_bias=b, teacher_bias=bt, chunk_size=4,
                                              reduction=reduction, **kw)
    assert torch.autograd.gradcheck(fn, tuple(x.detach().requires_grad_(True) for x in (hs, ws, bs)))


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["2d", "3d"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_retained_graph_after_grads_zeroed_in_place(lead, reduction):
    # The kept gradient buffers are handed on as copies: zeroing .grad in place (zero_grad with
    # set_to_none=False, clipping, GradScaler.unscale_) leaves what the retained graph reads intact
    # (the hidden states reach the function through a reshape, whose view autograd would otherwise
    # store as .grad without a copy).
    g = torch.Generator().manual_seed(11)
    h = torch.randn(*lead, 5, generator=g).requires_grad_(True)
    w = torch.randn(9, 5, generator=g).requires_grad_(True)
    b = torch.randn(9, generator=g).requires_grad_(True)
    ht, wt = torch.randn(*lead, 4, generator=g), torch.randn(9, 4, generator=g)
    lab = torch.randint(0, 9, lead, generator=g)
    loss = fused_linear_kd_loss(h, w, ht, wt, lab, student_bias=b, temperature=2.0, reduction=reduction)
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad.zero_()
    loss.backward()
    for x, want in zip((h, w, b), first):
        torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


def test_hidden_size_zero():
    # H = 0: the logits are the bias (or zeros); the loss of those, gradients of the right (empty)
    # shapes and the bias's gradient as for any H.
    g = torch.Generator().manual_seed(12)
    for bias in (True, False):
        h = torch.randn(2, 3, 0, generator=g).requires_grad_(True)
        w = torch.randn(9, 0, generator=g).requires_grad_(True)
        b = torch.randn(9, generator=g).requires_grad_(True) if bias else None
        ht, wt = torch.randn(2, 3, 4, generator=g), torch.randn(9, 4, generator=g)
        lab = torch.randint(0, 9, (2, 3), generator=g)
        loss = fused_linear_kd_loss(h, w, ht, wt, lab, student_bias=b, temperature=1.5)
        loss.backward()
        logits = (b.detach() if bias else torch.zeros(9)).expand(2, 3, 9).double()
        ref = reduce_rows(kd_reference_rows(logits, (ht @ wt.t()).double(), lab, temperature=1.5), lab, -100,
                          "batchmean")
        torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
        assert h.grad.shape == (2, 3, 0) and w.grad.shape == (9, 0)
        if bias:
            assert b.grad.shape == (9,) and bool(torch.isfinite(b.grad).all())
