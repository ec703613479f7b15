"""The eager path of kd_loss / kd_loss_topk against the registered op's path.

In plain eager mode the losses call the op below autograd inside one ``autograd.Function``
(``pyfinetune.losses._EagerKdLoss``); under tracing they call ``torch.ops.pyfinetune.kd_loss_fwd``
with its ``torch.library`` autograd. Both must give the same bits: losses, gradients, gradients of
a retained graph called again with other upstream gradients; except the gradients of
``reduction="batchmean"``, which the eager path has the kernel divide by the row count
(``grad_scale``: one rounding) where the registered path divides the rounded gradient in the
backward (two): those agree within two roundings of the dtype (``assert_batchmean_close``), and the
eager ones are the kernel's bits exactly (``test_batchmean_gradient_is_the_kernels``). The
registered path is forced here by patching the eager test (``pyfinetune.ops._is_plain_eager``).
"""

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import pyfinetune.ops
from pyfinetune.losses import DistillationLoss, _EagerKdLoss, kd_loss, kd_loss_topk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def registered(monkeypatch):
    """A context in which the losses take the registered op's path."""
    def enter():
        monkeypatch.setattr(pyfinetune.ops, "_is_plain_eager", lambda *tensors: False)
    return enter


def make(shape, device, s_dtype=torch.float32, t_dtype=None, labels="ignored", seed=0):
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    s = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=s_dtype)
    t = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=t_dtype or s_dtype)
    lab = None
    if labels != "none":
        lab = torch.randint(0, V, shape[:-1], generator=g)
        if labels == "ignored":
            lab.view(-1)[::3] = -100
        lab = lab.to(device)
    return s, t, lab


def upstream(loss, seed=1):
    """A non-uniform upstream gradient: per-row values for reduction="none", 2.5 otherwise."""
    if loss.dim() == 0:
        return torch.tensor(2.5, dtype=loss.dtype, device=loss.device)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=g, dtype=torch.float64) * 3 - 1).to(loss.device, loss.dtype)


def loss_and_grad(fn, s):
    x = s.clone().requires_grad_(True)
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x, upstream(loss))
    return loss, grad, type(loss.grad_fn)


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b), (a - b).abs().max()


def assert_batchmean_close(a, b):
    """Gradients of one rounding and of two (module docstring): within 2 eps of the dtype relative,
    plus a few units of the kernel's arithmetic (float32; float64 for float64) absolute for entries
    where the divergence and CE terms cancel."""
    assert a.dtype == b.dtype and a.shape == b.shape
    eps = torch.finfo(a.dtype).eps
    math_eps = torch.finfo(torch.float64 if a.dtype == torch.float64 else torch.float32).eps
    torch.testing.assert_close(a, b, rtol=2 * eps, atol=16 * math_eps + torch.finfo(a.dtype).tiny)


def assert_grad_same(a, b, reduction):
    (assert_batchmean_close if reduction == "batchmean" else assert_same)(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                    (torch.float16, None), (torch.float64, None), (torch.float32, torch.float64)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("labels", ["none", "with", "ignored"])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_same_values_and_gradients(registered, device, dtypes, reduction, labels, divergence):
    if device == "cuda" and torch.float64 in dtypes:
        pytest.skip("float64 is CPU only")
    s, t, lab = make((2, 7, 37), device, *dtypes, labels=labels)
    kw = dict(temperature=1.7, alpha=0.3, divergence=divergence, beta=0.4, reduction=reduction)
    loss, grad, node = loss_and_grad(lambda x: kd_loss(x, t, lab, **kw), s)
    assert node is _EagerKdLoss._backward_cls
    registered()
    ref_loss, ref_grad, ref_node = loss_and_grad(lambda x: kd_loss(x, t, lab, **kw), s)
    assert ref_node is not _EagerKdLoss._backward_cls
    assert_same(loss, ref_loss)
    assert_grad_same(grad, ref_grad, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_topk_and_module_same(registered, device, reduction):
    s, t, lab = make((5, 40), device, labels="ignored", seed=3)
    v, i = torch.topk(t, 7)
    mod = DistillationLoss(temperature=2.0, alpha=0.6, divergence="jsd", reduction=reduction)
    fns = [lambda x: kd_loss_topk(x, v, i, lab, temperature=1.3, reduction=reduction), lambda x: mod(x, t, lab)]
    eager = [loss_and_grad(fn, s) for fn in fns]
    registered()
    for (loss, grad, node), (ref_loss, ref_grad, ref_node) in zip(eager, [loss_and_grad(fn, s) for fn in fns]):
        assert node is _EagerKdLoss._backward_cls and ref_node is not node
        assert_same(loss, ref_loss)
        assert_grad_same(grad, ref_grad, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_retained_graph_same(registered, device, reduction):
    # The backward scales the kept gradient in place and undoes it on the next call through a
    # retained graph; the sequence of upstream gradients includes a zero (no in-place scaling).
    s, t, lab = make((5, 3, 29), device, labels="ignored", seed=5)

    def grads():
        x = s.clone().requires_grad_(True)
        src = x * 1.0  # a non-leaf student: the gradient flows through another node
        loss = kd_loss(src, t, lab, temperature=0.8, reduction=reduction)
        if reduction == "none":
            gos = [torch.full_like(loss, 0.5), torch.arange(1.0, 16.0, device=device) - 4.0,
                   torch.zeros_like(loss).index_fill_(0, torch.tensor([2], device=device), 3.0), torch.ones_like(loss)]
        else:
            gos = [torch.tensor(v, device=device) for v in (0.5, -3.0, 0.0, 1.0, 2.0)]
        out = [torch.autograd.grad(loss, x, go, retain_graph=True)[0] for go in gos]
        out.append(torch.autograd.grad(loss, x, gos[0])[0])
        return loss, out

    loss, out = grads()
    registered()
    ref_loss, ref_out = grads()
    assert_same(loss, ref_loss)
    for a, b in zip(out, ref_out):
        assert_grad_same(a, b, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("labels", ["none", "ignored"])
def test_batchmean_gradient_is_the_kernels(device, dtype, labels, monkeypatch):
    # loss.backward() of a batch mean hands on the kernel's gradient computed with grad_scale =
    # 1 / counted rows: the same bits, no further product. On a GPU the count needs a host look,
    # taken only for large gradients: the threshold is patched to 0 here.
    monkeypatch.setattr(pyfinetune.ops, "_SYNC_SCALE_MIN_BYTES", 0)
    s, t, lab = make((3, 5, 41), device, dtype, labels=labels, seed=11)
    x = s.clone().requires_grad_(True)
    kd_loss(x, t, lab, temperature=1.5, alpha=0.25).backward()
    rows = s.reshape(-1, 41)
    lab2 = None if lab is None else lab.reshape(-1)
    count = rows.shape[0] if lab is None else int((lab2 != -100).sum())
    _, kept = torch.ops.pyfinetune.kd_loss_fwd(rows, t.reshape(-1, 41), lab2, temperature=1.5, alpha=0.25,
                                               divergence="forward_kl", beta=0.5, ignore_index=-100, need_grad=True,
                                               grad_scale=1.0 / count)
    assert_same(x.grad.reshape(-1, 41), kept)


@pytest.mark.parametrize("device", DEVICES)
def test_registered_op_output_is_not_changed_by_backward(device):
    # The registered op's kept gradient is its second output: its backward must not scale it in place.
    s, t, lab = make((4, 33), device, labels="ignored", seed=13)
    x = s.clone().requires_grad_(True)
    rows, kept = torch.ops.pyfinetune.kd_loss_fwd(x, t, lab, temperature=1.0, alpha=0.5, divergence="forward_kl",
                                                  beta=0.5, ignore_index=-100, need_grad=True)
    before = kept.clone()
    (rows * 3.0).sum().backward()
    assert_same(kept, before)
    assert_same(x.grad, before * 3.0)


@pytest.mark.parametrize("device", DEVICES)
def test_without_gradient_same(registered, device):
    s, t, lab = make((3, 4, 50), device, labels="ignored", seed=7)
    x = s.clone().requires_grad_(True)
    calls = [lambda: kd_loss(s, t, lab), lambda: kd_loss(s, t, lab, reduction="none")]
    with torch.no_grad():
        calls.append(lambda: kd_loss(x, t, lab, reduction="sum"))
        eager = [c() for c in calls]
        registered()
        ref = [c() for c in calls]
    for a, b in zip(eager, ref):
        assert a.grad_fn is None and not a.requires_grad
        assert_same(a, b)


def test_teacher_requiring_grad_gets_none():
    s, t, lab = make((4, 9), "cpu", seed=8)
    x, tt = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = kd_loss(x, tt, lab)
    assert loss.grad_fn is not None and type(loss.grad_fn) is _EagerKdLoss._backward_cls
    loss.backward()
    assert tt.grad is None and x.grad is not None


def test_tracing_uses_the_registered_op():
    s, t, lab = make((3, 11), "cpu", labels="with", seed=9)

    def f(x, y, z):
        return kd_loss(x, y, z, temperature=2.0, reduction="sum")

    # make_fx (a dispatch mode): the op is in the graph, not hidden inside the eager Function.
    gm = make_fx(f)(s, t, lab)
    assert any(n.target is torch.ops.pyfinetune.kd_loss_fwd.default for n in gm.graph.nodes)

    # torch.compile(fullgraph=True): Dynamo's graph calls the op.
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    x = s.clone().requires_grad_(True)
    out = torch.compile(f, backend=backend, fullgraph=True)(x, t, lab)
    out.backward()
    targets = [str(n.target) for g in graphs for n in g.graph.nodes]
    assert any("pyfinetune.kd_loss_fwd" in name for name in targets), targets
    assert not any("EagerKdLoss" in name for name in targets), targets
    x2 = s.clone().requires_grad_(True)
    ref = f(x2, t, lab)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_create_graph_keeps_the_upstream_gradient_in_the_graph(reduction):
    # autograd.grad(..., create_graph=True) with an upstream gradient that itself requires grad:
    # the student's gradient is linear in it, so d(sum of that gradient)/d(weight) must equal the
    # sum of the gradient at weight 1 (the in-place scaling once cut this edge).
    torch.manual_seed(0)
    s = torch.randn(6, 11, requires_grad=True)
    t = torch.randn(6, 11)
    labels = torch.randint(0, 11, (6,))
    weight = torch.tensor(1.7, requires_grad=True)
    loss = kd_loss(s, t, labels, temperature=2.0, alpha=0.3, reduction=reduction)
    (g,) = torch.autograd.grad(loss.sum() * weight, s, create_graph=True)
    (dw,) = torch.autograd.grad(g.sum(), weight)
    (g1,) = torch.autograd.grad(kd_loss(s, t, labels, temperature=2.0, alpha=0.3, reduction=reduction).sum(), s)
    torch.testing.assert_close(dw, g1.sum(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, weight.detach() * g1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_retained_graph_with_copying_saved_tensor_hooks(reduction):
    # Saved-tensor hooks that hand out copies (save_on_cpu, checkpointing): the first backward then
    # scales a copy in place, and later backwards must not divide the unscaled copies by that scale.
    s, t, lab = make((4, 50), "cpu", labels="ignored", seed=17)

    def grads(hooks):
        x = s.clone().requires_grad_(True)
        if hooks:
            with torch.autograd.graph.saved_tensors_hooks(lambda v: v.clone(), lambda v: v.clone()):
                loss = kd_loss(x, t, lab, temperature=1.3, reduction=reduction)
        else:
            loss = kd_loss(x, t, lab, temperature=1.3, reduction=reduction)
        out = []
        for v in (3.0, 1.0, 0.5):
            go = torch.full_like(loss, v)
            out.append(torch.autograd.grad(loss, x, go, retain_graph=True)[0])
        return out

    # (not bit for bit: the plain graph's later products are (g * 3) * (v / 3), the hooked one's g * v)
    plain, hooked = grads(False), grads(True)
    for a, b in zip(plain, hooked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(plain[0], 6 * plain[2], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
def test_at_most_one_logits_sized_buffer_is_kept_for_the_backward(divergence, reduction, dtype, with_labels):
    # Issue #3: between forward and backward the loss holds one gradient-sized buffer and nothing
    # else of the logits' size (no softmax, no log-softmax): every tensor autograd saves is seen by
    # saved_tensors_hooks; exactly one has N x V elements (in the student's dtype, or float32 for a
    # float16 reverse_kl student, whose kept gradient is float32), the others at most N.
    from pyfinetune.losses import kd_loss

    n, v = 37, 301
    s = (torch.randn(n, v) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(n, v) * 3).to(dtype)
    labels = torch.randint(0, v, (n,)) if with_labels else None
    saved = []

    def pack(x):
        saved.append((x.numel(), x.dtype))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = kd_loss(s, t, labels, temperature=2.0, divergence=divergence, reduction=reduction)
    big = [(numel, dt) for numel, dt in saved if numel > n]
    want = torch.float32 if (dtype == torch.float16 and divergence == "reverse_kl") else dtype
    assert big == [(n * v, want)], f"saved for the backward: {saved}"
    loss.sum().backward()
    assert s.grad is not None and s.grad.shape == s.shape


def test_fused_linear_keeps_no_logits_sized_buffer():
    # fused_linear_kd_loss keeps the gradients of the hidden states and the weight ([N, H], [V, H]),
    # never an [N, V] one (the logits exist one chunk at a time).
    from pyfinetune.losses import fused_linear_kd_loss

    n, h, v = 300, 16, 257
    hs = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h, requires_grad=True)
    saved = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fused_linear_kd_loss(hs, w, torch.randn(n, h), torch.randn(v, h), torch.randint(0, v, (n,)),
                                    chunk_size=64)
    assert saved and all(math.prod(shape) < n * v for shape in saved), saved
    loss.backward()
    assert hs.grad.shape == hs.shape and w.grad.shape == w.shape
