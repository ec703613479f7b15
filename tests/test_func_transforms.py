"""The distillation losses and the compressed-pattern ops under torch.func transforms (grad, jvp,
jacfwd, hessian, vmap) and forward-mode AD (torch.autograd.forward_ad).

The ops' autograd rules are backward-only (torch.library style); under forward-mode AD an op with
no forward rule hands on no tangent, silently: a zero derivative. There the library composes the
same computation of torch ops. Every derivative here is compared with the same transform applied
to the float64 reference (tests/reference_kd.py, the masked dense product), and the first-order
ones also with the eager kernels' gradient. Tolerances: float64 inputs 1e-10 (the composition is
float64 throughout); float32 inputs (the composition computes in float32) 1e-5 relative to the
largest entry, the float32 rounding of sums over at most a few hundred terms.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from conftest import device_params
from pyfinetune import ops
from pyfinetune.losses import fused_linear_kd_loss, kd_loss, kd_loss_topk
from pyfinetune.prune import SparseLinear
from reference_kd import kd_reference_rows, reduce_rows, topk_to_full
from reference_masked_matmul import make_mask

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "sum", "none"]

# torch.func's forward AD warns about torch.jit.script internally on some torch versions.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def close(actual, expected, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol, atol=tol * scale)


def labels_for(kind, n, vocab, device):
    if kind == "none":
        return None
    lab = torch.randint(0, vocab, (n,), device=device)
    if kind == "ignored":
        lab[::3] = -100
    return lab


def reference_loss(s, t, lab, reduction, **kw):
    rows = kd_reference_rows(s, t, lab, **kw)
    return reduce_rows(rows, lab, kw.get("ignore_index", -100), reduction)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("labels", ["none", "with", "ignored"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kd_loss_forward_mode_and_hessian(device, divergence, labels, reduction):
    n, vocab = 5, 37
    s = torch.randn(n, vocab, dtype=torch.float64, device=device) * 3
    t = torch.randn(n, vocab, dtype=torch.float64, device=device) * 3
    v = torch.randn_like(s)
    lab = labels_for(labels, n, vocab, device)
    kw = dict(temperature=2.0, alpha=0.3, divergence=divergence, beta=0.4)
    ours = lambda x: kd_loss(x, t, lab, reduction=reduction, **kw)  # noqa: E731
    ref = lambda x: reference_loss(x, t, lab, reduction, **kw)  # noqa: E731
    value, tangent = torch.func.jvp(ours, (s,), (v,))
    ref_value, ref_tangent = torch.func.jvp(ref, (s,), (v,))
    close(value, ref_value, torch.float64)
    close(tangent, ref_tangent, torch.float64)
    assert ref_tangent.abs().max() > 1e-9  # so that a dropped (zero) tangent fails the comparison above
    # The same through the forward_ad API, and the eager kernels' backward as a third witness.
    with fwAD.dual_level():
        dual_tangent = fwAD.unpack_dual(ours(fwAD.make_dual(s, v))).tangent
    assert dual_tangent is not None
    close(dual_tangent, ref_tangent, torch.float64)
    # The CUDA kernels have no float64 (they refuse it): their witness runs in float32 there.
    kdtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
    x = s.to(kdtype).requires_grad_(True)
    eager = kd_loss(x, t.to(kdtype), lab, reduction=reduction, **kw)
    (g,) = torch.autograd.grad(eager, x, torch.ones_like(eager))
    close((g.double() * v).sum(), ref_tangent.sum(), kdtype)
    if reduction != "none":
        close(torch.func.hessian(ours)(s), torch.func.hessian(ref)(s), torch.float64)
        close(torch.func.grad(ours)(s), g.double(), kdtype)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_loss_jacfwd_in_low_precision_matches_the_float32_composition(device, dtype):
    # The composition computes in float32 from the rounded inputs, as the kernels do.
    s = (torch.randn(4, 33, device=device) * 2).to(dtype)
    t = (torch.randn(4, 33, device=device) * 2).to(dtype)
    lab = labels_for("ignored", 4, 33, device)
    jac = torch.func.jacfwd(lambda x: kd_loss(x, t, lab, temperature=1.5))(s)
    ref = torch.func.jacfwd(lambda x: reference_loss(x, t.double(), lab, "batchmean", temperature=1.5))(s.double())
    assert jac.dtype == torch.float32
    close(jac, ref.float(), torch.float32)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_kd_loss_topk_under_transforms(device, divergence):
    n, vocab, k = 6, 41, 5
    s = torch.randn(n, vocab, dtype=torch.float64, device=device) * 3
    tv, ti = torch.topk(torch.randn(n, vocab, dtype=torch.float64, device=device) * 3, k, dim=-1)
    lab = labels_for("ignored", n, vocab, device)
    kw = dict(temperature=2.0, alpha=0.6, divergence=divergence)
    ours = lambda x: kd_loss_topk(x, tv, ti, lab, **kw)  # noqa: E731
    full = topk_to_full(tv, ti, vocab)
    ref = lambda x: reference_loss(x, full, lab, "batchmean", **kw)  # noqa: E731
    v = torch.randn_like(s)
    close(torch.func.jvp(ours, (s,), (v,))[1], torch.func.jvp(ref, (s,), (v,))[1], torch.float64)
    close(torch.func.grad(ours)(s), torch.func.grad(ref)(s), torch.float64)
    bad = ti.clone()
    bad[2, 1] = vocab
    with pytest.raises(RuntimeError, match=r"teacher_topk_indices\[2, 1\] = 41 is outside \[0, V = 41\)"):
        torch.func.jvp(lambda x: kd_loss_topk(x, tv, bad, lab, **kw), (s,), (v,))
    if device == "cpu":
        repeated = ti.clone()
        repeated[1, 1] = repeated[1, 0]
        with pytest.raises(ValueError, match="row 1 repeats an index"):
            torch.func.grad(lambda x: kd_loss_topk(x, tv, repeated, lab, **kw))(s)


@pytest.mark.parametrize("device", device_params())
def test_fused_linear_kd_loss_under_transforms(device):
    n, h, ht, vocab = 7, 6, 5, 23
    d = dict(dtype=torch.float64, device=device)
    hs, ws, bs = torch.randn(n, h, **d), torch.randn(vocab, h, **d), torch.randn(vocab, **d)
    hts, wt, bt = torch.randn(n, ht, **d), torch.randn(vocab, ht, **d), torch.randn(vocab, **d)
    lab = labels_for("ignored", n, vocab, device)
    ours = lambda w: fused_linear_kd_loss(hs, w, hts, wt, lab, student_bias=bs, teacher_bias=bt,  # noqa: E731
                                          temperature=2.0, divergence="jsd")
    ref = lambda w: reference_loss(hs @ w.t() + bs, hts @ wt.t() + bt, lab, "batchmean",  # noqa: E731
                                   temperature=2.0, divergence="jsd")
    v = torch.randn_like(ws)
    close(torch.func.jvp(ours, (ws,), (v,))[1], torch.func.jvp(ref, (ws,), (v,))[1], torch.float64)
    close(torch.func.grad(ours)(ws), torch.func.grad(ref)(ws), torch.float64)


@pytest.mark.parametrize("device", device_params())
def test_kd_loss_vmap_over_batched_labels_and_bad_labels(device):
    # Under vmap the labels are batched tensors whose contents cannot steer Python control flow:
    # the composed path checks what it can read and leaves batched labels to torch's own checks.
    s = torch.randn(3, 4, 11, dtype=torch.float64, device=device)
    t = torch.randn(3, 4, 11, dtype=torch.float64, device=device)
    lab = torch.randint(0, 11, (3, 4), device=device)
    lab[1, 2] = -100
    per = torch.func.vmap(lambda a, b, c: kd_loss(a, b, c, temperature=3.0))(s, t, lab)
    ref = torch.stack([reference_loss(s[i], t[i], lab[i], "batchmean", temperature=3.0) for i in range(3)])
    close(per, ref, torch.float64)
    bad = lab[0].clone()
    bad[3] = 11
    with pytest.raises(RuntimeError, match=r"labels\[3\] = 11 is outside \[0, V = 11\)"):
        torch.func.grad(lambda a: kd_loss(a, t[0], bad))(s[0])


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_csr_ops_forward_mode(device, sparsity):
    m, k = 9, 14
    mask = make_mask(m, k, sparsity, empty_rows=1).to(device)
    p = ops.compressed_pattern(mask)
    w = torch.randn(m, k, dtype=torch.float64, device=device)
    values = w[mask]
    x, b = torch.randn(5, k, dtype=torch.float64, device=device), torch.randn(m, dtype=torch.float64, device=device)
    tx, tv, tb = torch.randn_like(x), torch.randn_like(values), torch.randn_like(b)
    dense, dense_t = torch.where(mask, w, 0.0), torch.zeros_like(w).masked_scatter(mask, tv)

    def linear(x, vals, b):
        return ops.csr_linear(x, vals, *p, bias=b)

    y, ty = torch.func.jvp(linear, (x, values, b), (tx, tv, tb))
    close(y, x @ dense.t() + b, torch.float64)
    close(ty, tx @ dense.t() + x @ dense_t.t() + tb, torch.float64)
    # Nothing requires grad (the op-only fast path in plain eager mode): the tangent still comes.
    with fwAD.dual_level():
        out = ops.csr_linear(fwAD.make_dual(x, tx), values, *p)
        close(fwAD.unpack_dual(out).tangent, tx @ dense.t(), torch.float64)
    to_dense = lambda vals: ops.csr_to_dense(vals, p.crow_indices, p.col_indices, k)  # noqa: E731
    close(torch.func.jvp(to_dense, (values,), (tv,))[1], dense_t, torch.float64)
    gather = lambda d: ops.csr_gather(d, p.crow_indices, p.col_indices)  # noqa: E731
    td = torch.randn_like(w)
    close(torch.func.jvp(gather, (w,), (td,))[1], td[mask], torch.float64)
    close(torch.func.grad(lambda vals: (linear(x, vals, b) ** 3).sum())(values),
          (3 * (x @ dense.t() + b) ** 2).t().matmul(x)[mask], torch.float64)


@pytest.mark.parametrize("device", device_params())
def test_csr_ops_composed_path_checks_the_pattern(device):
    mask = make_mask(6, 8, 0.5).to(device)
    p = ops.compressed_pattern(mask)
    values = torch.randn(int(mask.sum()), dtype=torch.float64, device=device)
    col = p.col_indices.clone()
    col[0] = 8  # would land in the next row of the flat weight
    with pytest.raises(RuntimeError, match=r"csr_to_dense: col_indices\[0\] = 8 is out of range"):
        torch.func.jvp(lambda v: ops.csr_to_dense(v, p.crow_indices, col, 8), (values,), (values,))
    crow = p.crow_indices.clone()
    crow[-1] += 1
    with pytest.raises(RuntimeError, match=r"crow_indices\[-1\] must be nnz"):
        torch.func.jvp(lambda v: ops.csr_to_dense(v, crow, p.col_indices, 8), (values,), (values,))
    x = torch.randn(3, 7, dtype=torch.float64, device=device)  # K = 7: the pattern's column 7 is out of range
    with pytest.raises(ValueError, match=r"csr_linear: x must have K = 8 columns"):  # ccol_indices says K = 8
        torch.func.jvp(lambda x: ops.csr_linear(x, values, *p), (x,), (x,))
    no_ccol = p._replace(ccol_indices=torch.zeros(0, dtype=torch.int32, device=device))  # the row pattern alone
    if bool((p.col_indices == 7).any()):
        with pytest.raises(RuntimeError, match=r"csr_linear: col_indices\[\d+\] = 7 is out of range"):
            torch.func.jvp(lambda x: ops.csr_linear(x, values, *no_ccol), (x,), (x,))
    with pytest.raises(RuntimeError, match="csr_linear: values must have the dtype of x"):
        torch.func.jvp(lambda x: ops.csr_linear(x, values.float(), *no_ccol), (x,), (x,))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_frozen_sparse_linear_under_jvp(device, kernel):
    # A frozen layer (values without requires_grad) took the op-only path and dropped the tangent.
    w = torch.randn(6, 10, device=device)
    mask = make_mask(6, 10, 0.7).to(device)
    layer = SparseLinear.from_dense(w, mask, torch.randn(6, device=device), kernel=kernel).requires_grad_(False)
    x, tx = torch.randn(4, 10, device=device), torch.randn(4, 10, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        # torch's own deprecation notices (torch 2.11 scripts its jvp decompositions on first use,
        # warning that torch.jit.script is deprecated: the H200 check of 2026-11-27) are not ours.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
        y, ty = torch.func.jvp(layer, (x,), (tx,))
    close(y, layer(x), torch.float32)
    close(ty, tx @ torch.where(mask, w, 0.0).t(), torch.float32)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_composed_kd_matches_the_kernels_at_infinities_and_ignored_rows(divergence):
    # Ignored rows with a NaN / -inf teacher (padding of a cached teacher) get a zero gradient; a
    # -inf student logit at the label with alpha = 1 (labels as a row mask) adds no 0 * inf; jsd
    # where student and teacher are both -inf (a masked vocabulary) keeps a finite gradient.
    s = torch.randn(3, 6, dtype=torch.float64)
    t = torch.randn(3, 6, dtype=torch.float64)
    s[:, 5] = t[:, 5] = float("-inf")
    s[0, 2] = float("-inf")
    t[1] = float("nan")
    lab = torch.tensor([2, -100, 0])
    for alpha in (1.0, 0.4):
        kw = dict(temperature=2.0, alpha=alpha, divergence=divergence)
        if divergence == "forward_kl" and alpha < 1:
            kw["alpha"] = 1.0  # CE at a -inf label logit is infinite for every path: not this test's subject
        x = s.clone().requires_grad_(True)
        loss = kd_loss(x, t, lab, **kw)
        (g,) = torch.autograd.grad(loss, x)
        grad, value = torch.func.grad_and_value(lambda a: kd_loss(a, t, lab, **kw))(s)
        if torch.isfinite(loss):
            close(value, loss, torch.float64)
            assert torch.isfinite(grad).all()
            close(grad, g, torch.float64)
        assert torch.equal(grad[1], torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_composed_kd_with_mixed_mask_conventions(divergence, dtype):
    # Masked classes as -inf in one input and -1e9 in the other are zero probabilities in both: the
    # composition gave NaN (exp(-5e8) * (-5e8 - -inf) = 0 * inf) where the kernels drop the term.
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(3, 40, generator=g) * 3).to(dtype)
    t = (torch.randn(3, 40, generator=g) * 3).to(dtype)
    for student_inf in (True, False):
        a, b = s.clone(), t.clone()
        a[:, :9], b[:, :9] = (float("-inf"), -1e9) if student_inf else (-1e9, float("-inf"))
        kw = dict(temperature=2.0, divergence=divergence, reduction="none")
        x = a.clone().requires_grad_(True)
        loss = kd_loss(x, b, **kw)
        (gx,) = torch.autograd.grad(loss.sum(), x)
        value = torch.func.vmap(lambda r, q: kd_loss(r[None], q[None], **kw)[0])(a, b)
        grad = torch.func.grad(lambda r: kd_loss(r, b, **kw).sum())(a)
        assert torch.isfinite(loss).all() and torch.isfinite(value).all(), (loss, value)
        close(value, loss, dtype)
        close(grad, gx, dtype)


def test_composed_kd_topk_jsd_with_minus_inf_students_outside_the_top_k():
    s = torch.randn(2, 9, dtype=torch.float64)
    s[:, 7:] = float("-inf")
    tv = torch.randn(2, 3, dtype=torch.float64)
    ti = torch.stack([torch.randperm(7)[:3] for _ in range(2)])  # the teacher's support: finite students
    kw = dict(temperature=1.5, divergence="jsd")
    x = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kd_loss_topk(x, tv, ti, **kw), x)
    grad = torch.func.grad(lambda a: kd_loss_topk(a, tv, ti, **kw))(s)
    assert torch.isfinite(grad).all()
    close(grad, g, torch.float64)


def test_composed_csr_ops_refuse_repeated_columns_and_the_product_adds_them():
    crow = torch.tensor([0, 2, 3], dtype=torch.int32)
    col = torch.tensor([1, 1, 0], dtype=torch.int32)  # row 0 repeats column 1
    values = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"csr_to_dense: col_indices must increase strictly within each row"):
        torch.func.jvp(lambda v: ops.csr_to_dense(v, crow, col, 3), (values,), (values,))
    with pytest.raises(RuntimeError, match=r"csr_gather: col_indices must increase strictly within each row"):
        torch.func.jvp(lambda d: ops.csr_gather(d, crow, col), (torch.ones(2, 3, dtype=torch.float64),),
                       (torch.ones(2, 3, dtype=torch.float64),))
    # csr_linear's kernels accept such a row and add its values: so does the composition.
    p = ops.CompressedPattern(crow, col, torch.tensor([0, 1], dtype=torch.int32), *[torch.zeros(0, dtype=torch.int32)] * 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    expected = torch.ops.pyfinetune.csr_linear(x, values, crow, col, p.row_order, None)
    close(torch.func.jvp(lambda a: ops.csr_linear(a, values, *p), (x,), (x,))[0], expected, torch.float64)


def test_composed_fused_linear_kd_loss_keeps_the_students_dtype():
    # The kernels compute in float32 unless the student is float64: a float64 teacher does not
    # make the loss float64.
    hs, ws = torch.randn(5, 4), torch.randn(7, 4)
    ht, wt = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    eager = fused_linear_kd_loss(hs, ws, ht, wt)
    value = torch.func.grad_and_value(lambda w: fused_linear_kd_loss(hs, w, ht, wt))(ws)[1]
    assert eager.dtype == value.dtype == torch.float32
    close(value, eager, torch.float32)
