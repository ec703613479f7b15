"""kd_loss_fwd_inplace: the distillation kernel with its gradient written over the student.

It must give exactly kd_loss_fwd's loss rows and gradient (same kernel, same launch) when the
gradient kd_loss_fwd writes has the student's 16-byte alignment (as here: fresh tensors; on CUDA a
student starting mid-word is split into vector head and body differently in place, so the two then
agree to rounding, not bit for bit), on every
path of the kernels: each divergence, with and without labels and ignored rows, T = 1, an integer
T (the power path) and another T, grad_scale, mixed dtypes, and rows long enough that the CUDA
kernel splits a row over a cluster of blocks (where the label's logit is read before any block
writes). fused_linear_kd_loss uses it for its chunks; its memory test is here too.
"""

import pytest
import torch

from conftest import device_params
from pyfinetune.benchmarks.common import CpuAllocations
from pyfinetune.losses import fused_linear_kd_loss

OP = torch.ops.pyfinetune.kd_loss_fwd_inplace
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


def _inputs(n, v, device, s_dtype, t_dtype, labels, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 4).to(device, s_dtype)
    t = (torch.randn(n, v, generator=g) * 4).to(device, t_dtype)
    lab = None
    if labels != "none":
        lab = torch.randint(0, v, (n,), generator=g)
        lab[-1] = v - 1  # the last column, in a scalar tail of the vector loop
        if labels == "ignored":
            lab[::3] = -100
        lab = lab.to(device)
    return s, t, lab


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float64, torch.float32)],
                         ids=["fp32", "bf16", "fp16-fp32", "fp32-bf16", "fp64-fp32"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("labels", ["with", "ignored", "none"])
def test_matches_kd_loss_fwd_exactly(device, dtypes, divergence, temperature, labels, seed):
    s_dtype, t_dtype = dtypes
    if device == "cuda" and torch.float64 in dtypes:
        pytest.skip("float64 is CPU only")
    for n, v in ((7, 301), (3, 50257)):  # 50257: a row split over several blocks on CUDA
        s, t, lab = _inputs(n, v, device, s_dtype, t_dtype, labels, seed)
        kw = dict(temperature=temperature, alpha=0.3, divergence=divergence, beta=0.4, ignore_index=-100,
                  grad_scale=0.25)
        rows, grad = torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, need_grad=True, **kw)
        x = s.clone()
        t_before = t.clone()
        out = OP(x, t, lab, **kw)
        assert out.dtype == rows.dtype and out.shape == (n,)
        assert torch.equal(out, rows), (n, v, (out - rows).abs().max())
        assert torch.equal(x, grad), (n, v, (x.double() - grad.double()).abs().max())
        assert torch.equal(t, t_before)


@pytest.mark.parametrize("device", device_params())
def test_rows_of_a_larger_buffer(device):
    # fused_linear_kd_loss's last chunk: the first rows of its chunk buffer; the rows after them
    # are not touched.
    s, t, lab = _inputs(9, 257, device, torch.float32, torch.float32, "ignored", 3)
    buf = torch.full((12, 257), 7.0, device=device)
    buf[:9] = s
    kw = dict(temperature=2.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100)
    rows, grad = torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, need_grad=True, **kw)
    torch.testing.assert_close(OP(buf[:9], t, lab, **kw), rows, rtol=0, atol=0)
    assert torch.equal(buf[:9], grad)
    assert torch.equal(buf[9:], torch.full((3, 257), 7.0, device=device))
    assert (buf[0:9:3] == 0).all()  # ignored rows: zero gradient


@pytest.mark.parametrize("device", device_params())
def test_strided_teacher_and_labels_of_other_storage(device):
    # Not dense, so the overlap test alone cannot tell; another storage cannot overlap the student.
    s, t, lab = _inputs(6, 97, device, torch.float32, torch.float32, "ignored", 4)
    padded = torch.zeros(6, 128, device=device)
    padded[:, :97] = t
    pairs = torch.stack([lab, torch.zeros_like(lab)], 1)
    kw = dict(temperature=1.5, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100)
    rows, grad = torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, need_grad=True, **kw)
    x = s.clone()
    assert torch.equal(OP(x, padded[:, :97], pairs[:, 0], **kw), rows)
    assert torch.equal(x, grad)


@pytest.mark.parametrize("device", device_params())
def test_fused_linear_with_strided_labels(device):
    g = torch.Generator().manual_seed(14)
    h = torch.randn(10, 8, generator=g).to(device).requires_grad_(True)
    w = torch.randn(33, 8, generator=g).to(device).requires_grad_(True)
    ht, wt = torch.randn(10, 6, generator=g).to(device), torch.randn(33, 6, generator=g).to(device)
    lab2 = torch.randint(0, 33, (10, 2), generator=g).to(device)
    out = fused_linear_kd_loss(h, w, ht, wt, lab2[:, 0], temperature=2.0, chunk_size=4)
    ref = fused_linear_kd_loss(h, w, ht, wt, lab2[:, 0].contiguous(), temperature=2.0, chunk_size=4)
    ga = torch.autograd.grad(out, (h, w))
    gb = torch.autograd.grad(ref, (h, w))
    assert torch.equal(out, ref) and all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_autograd_tracked_student_is_refused_and_versions_bump():
    g = torch.Generator().manual_seed(15)
    t = torch.randn(3, 20, generator=g)
    kw = dict(temperature=2.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100)
    leaf = torch.randn(3, 20, generator=g, requires_grad=True)
    before = leaf.detach().clone()
    for x in (leaf, leaf * 1.0):  # a leaf and a tensor with history
        with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace: student requires grad: the op writes to it in place"):
            OP(x, t, None, **kw)
    assert torch.equal(leaf.detach(), before)
    with torch.no_grad():  # as torch's own in-place ops: allowed outside grad mode
        x = leaf.detach().clone().requires_grad_(True)
        v = x._version
        rows = OP(x, t, None, **kw)
    assert x._version > v and not rows.requires_grad
    # A tensor that autograd saved, then overwritten: the backward says so (the version moved).
    w = torch.randn(3, 1, generator=g, requires_grad=True)
    y = torch.randn(3, 20, generator=g)
    out = (w * y).sum()  # saves y for w's gradient
    OP(y, t, None, **kw)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_inference_mode_versions_and_inference_tensors():
    # Inside torch.inference_mode() the Autograd layer is skipped, but a normal tensor's version
    # still moves (as with torch's own in-place ops); an inference tensor written outside inference
    # mode is refused, as torch refuses it.
    kw = dict(temperature=2.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100)
    t = torch.randn(3, 20)
    w = torch.randn(3, 1, requires_grad=True)
    y = torch.randn(3, 20)
    out = (w * y).sum()
    with torch.inference_mode():
        OP(y, t, None, **kw)
        inf = torch.randn(3, 20)
        OP(inf, t, None, **kw)  # inside: allowed
    assert y._version == 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()
    with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace: student is an inference tensor"):
        OP(inf, t, None, **kw)


def test_opcheck():
    g = torch.Generator().manual_seed(11)
    t = torch.randn(5, 37, generator=g)
    lab = torch.tensor([0, 5, -100, 36, 2])
    for div in DIVERGENCES:
        kw = dict(temperature=2.0, alpha=0.5, divergence=div, beta=0.5, ignore_index=-100)
        torch.library.opcheck(OP.default, (torch.randn(5, 37, generator=g), t, lab), kw)
        torch.library.opcheck(OP.default, (torch.randn(5, 37, generator=g), t, None), dict(kw, grad_scale=0.5))


def test_compiled_caller_matches_eager():
    g = torch.Generator().manual_seed(12)
    s, t = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    lab = torch.tensor([1, -100, 49, 0])
    kw = dict(temperature=3.0, alpha=0.5, divergence="jsd", beta=0.5, ignore_index=-100)

    def fn(s, t, lab):
        x = s * 1.0  # a buffer of the function's own
        rows = OP(x, t, lab, **kw)
        return rows, x

    ref_rows, ref_x = fn(s, t, lab)
    rows, x = torch.compile(fn, fullgraph=True, backend="aot_eager")(s, t, lab)
    assert torch.equal(rows, ref_rows) and torch.equal(x, ref_x)


@pytest.mark.parametrize("device", device_params())
def test_errors_name_the_argument(device):
    s, t, lab = _inputs(4, 64, device, torch.float32, torch.float32, "with", 5)
    kw = dict(temperature=2.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100)
    wide = torch.randn(4, 128, device=device)
    with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace.*student must have unit stride along V"):
        OP(torch.randn(64, 4, device=device).t(), t, lab, **kw)
    with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace.*student must be contiguous"):
        OP(wide[:, :64], t, lab, **kw)  # a row stride of 128
    with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace.*teacher must not share memory with student"):
        OP(s, s, lab, **kw)
    with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace.*teacher must not share memory with student"):
        OP(s, s.view(-1)[:256].view(4, 64), lab, **kw)
    with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace.*teacher must have the shape of student"):
        OP(s, t[:, :63], lab, **kw)
    with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace.*temperature must be"):
        OP(s, t, lab, **dict(kw, temperature=0.0))
    with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace.*divergence must be"):
        OP(s, t, lab, **dict(kw, divergence="kl"))
    with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace.*grad_scale"):
        OP(s, t, lab, **dict(kw, grad_scale=0.0))
    with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace.*labels must be int64"):
        OP(s, t, lab.float(), **kw)
    if device == "cpu":  # CUDA checks label values in the kernel (no host synchronization)
        with pytest.raises(RuntimeError, match="kd_loss_fwd_inplace.*labels"):
            OP(s, t, torch.tensor([0, 1, 64, 2]), **kw)
    s_before = s.clone()
    with pytest.raises(RuntimeError):
        OP(s, t[:, :63], lab, **kw)
    assert torch.equal(s, s_before)  # a rejected call writes nothing


def test_fused_linear_holds_two_chunk_buffers():
    # Peak memory of fused_linear_kd_loss's forward + backward: the float32 gradients it returns
    # ([V, H] and [N, H]) and two chunk-sized buffers (student logits, which become the chunk's
    # gradient, and teacher logits), plus small change. A third chunk buffer (a separate gradient,
    # or the previous chunk's gradient alive while the next is computed) fails this.
    n, hdim, v, chunk = 1000, 64, 4096, 256  # 4 chunks, the last one partial
    g = torch.Generator().manual_seed(13)
    h = torch.randn(n, hdim, generator=g, requires_grad=True)
    w = (torch.randn(v, hdim, generator=g) * 0.1).requires_grad_(True)
    ht, wt = torch.randn(n, 32, generator=g), torch.randn(v, 32, generator=g) * 0.1
    lab = torch.randint(0, v, (n,), generator=g)
    buf = -(-chunk * v * 4 // 2**21) * 2**21  # the CPU block pool rounds from 2 MiB up to 2 MiB pages
    grads = (v * hdim + n * hdim) * 4
    with CpuAllocations() as mem:
        loss = fused_linear_kd_loss(h, w, ht, wt, lab, temperature=2.0, chunk_size=chunk)
        mem.mark("forward")
        loss.backward()
    assert mem.live_at("forward") <= grads + 64 * 1024
    assert grads + 2 * buf <= mem.peak() < grads + 2.5 * buf, (mem.peak(), grads, buf)
