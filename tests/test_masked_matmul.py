"""The pruning ops against float64 math: pyfinetune.ops.masked_matmul (dense masked path) and
pyfinetune.ops.csr_linear (sparse path), forward and every gradient, over sparsities, shapes,
dtypes and layouts; gradcheck, opcheck, torch.compile; argument errors.

Error bounds: reference_masked_matmul.assert_product_close (float32 accumulation, one rounding).
On CUDA the dense masked path runs through cuBLAS (at::addmm / at::mm, as F.linear does), which by
PyTorch's default may round split-K partial sums to bf16 / fp16
(``torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_precision_reduction``); this module turns
that off (``full_precision_cublas``). With a bias, cuBLAS (PyTorch 2.11, H100) also rounds the
product to bf16 / fp16 before adding the bias, as F.linear does there: the bound of the masked path's
forward on CUDA in 16 bits with a bias allows that one extra rounding (``rounded_before``)."""

from __future__ import annotations

import pytest
import torch

from conftest import device_dtype_params, device_params, same_layout_input
from pyfinetune import ops
from reference_masked_matmul import assert_product_close, make_mask, random_inputs, reference, two_four_mask

IMPLS = ["masked", "csr"]


@pytest.fixture(autouse=True)
def full_precision_cublas():
    """float32 accumulation in cuBLAS for the whole test (see the module docstring)."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction)
    m.allow_bf16_reduced_precision_reduction = False
    m.allow_fp16_reduced_precision_reduction = False
    yield
    m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction = saved
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def run_impl(impl, x, weight, mask, bias, *, dense_grad=False):
    """y from the public function of `impl`, with weight (masked) or the kept values (csr) as leaf."""
    if impl == "masked":
        return ops.masked_matmul(x, weight, mask, bias, dense_grad=dense_grad)
    pattern = ops.compressed_pattern(mask.to(weight.device))
    return ops.csr_linear(x, weight, *pattern, bias=bias)


def forward_backward(impl, x, weight, mask, bias, grad_out, *, dense_grad=False):
    """Leaves x, weight (or values), bias; returns y and their gradients under grad_out."""
    x = same_layout_input(x)  # a sliced x stays sliced (clone would compact it)
    x.retain_grad()
    leaf = (weight[mask.to(weight.device)] if impl == "csr" else weight).detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    y = run_impl(impl, x, leaf, mask.to(weight.device), b, dense_grad=dense_grad)
    y.backward(grad_out)
    return y, x.grad, leaf.grad, None if b is None else b.grad


def check_against_reference(impl, x, weight, mask, bias, grad_out, dtype, *, batch_shape=None):
    """Forward and gradients of impl against float64. x may be [..., K] (batch_shape)."""
    y, dx, dleaf, dbias = forward_backward(impl, x, weight, mask, bias, grad_out)
    k = x.shape[-1]
    x2, g2 = x.reshape(-1, k), grad_out.reshape(-1, weight.shape[0])
    ref = reference(x2, weight, mask, bias, g2)
    n, m = x2.shape[0], weight.shape[0]
    # cuBLAS's bias epilogue in 16 bits adds the bias to the product rounded to dtype (module docstring)
    cublas_bias = (impl == "masked" and bias is not None and x.device.type == "cuda"
                   and dtype in (torch.bfloat16, torch.float16))
    assert_product_close(y.reshape(n, m), ref["y"], ref["y_terms"], k, dtype, f"{impl} y",
                         rounded_before=ref["y_product"] if cublas_bias else None)
    assert_product_close(dx.reshape(n, k), ref["dx"], ref["dx_terms"], m, dtype, f"{impl} dx")
    if impl == "masked":
        dw_exact = torch.where(mask, ref["dweight"], 0.0)
        assert_product_close(dleaf, dw_exact, ref["dweight_terms"], n, dtype, "masked dweight")
        assert (dleaf.cpu()[~mask] == 0).all(), "gradient reached pruned weights"
    else:
        assert_product_close(dleaf, ref["dweight"][mask], ref["dweight_terms"][mask], n, dtype, "csr dvalues")
    if bias is not None:
        assert_product_close(dbias, ref["dbias"], ref["dbias_terms"], n, dtype, f"{impl} dbias")


# ------------------------------------------------------------------------------- against float64
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_sparsities_against_float64(impl, sparsity, device, dtype):
    # K = 300 > 128 and M = 130 > 128: the csr kernels walk both patterns in L1 tiles when dense
    # enough (sparsity 0 and 0.5), in one go when sparse (0.9, 0.99).
    n, k, m = 33, 300, 130
    x, w, b, g = random_inputs(n, k, m, dtype, device, bias=True)
    mask = make_mask(m, k, sparsity, empty_rows=3)
    check_against_reference(impl, x, w, mask, b, g, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 37, 19), (17, 5, 3), (64, 129, 257), (9, 16, 512)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.bfloat16]))
def test_odd_shapes(impl, shape, bias, device, dtype):
    n, k, m = shape
    x, w, b, g = random_inputs(n, k, m, dtype, device, bias=bias)
    check_against_reference(impl, x, w, make_mask(m, k, 0.7), b, g, dtype)


# Batch rows around the CPU kernels' panel widths: 64 floats (AVX2 builds), 128 floats or 64
# doubles (AVX-512 builds), 16-float vectors, and several panels with a ragged last one.
PANEL_EDGE_ROWS = [1, 15, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", PANEL_EDGE_ROWS)
@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.float64, torch.bfloat16]))
def test_batch_rows_span_several_panels(impl, n, device, dtype):
    # The CPU kernels work on the batch in panels; every row of every panel, the partial last one
    # included, must be computed (an AVX-512 build once computed only the first 64 of every 128
    # rows: its panel was wider than its kernels).
    k, m = 70, 90
    x, w, b, g = random_inputs(n, k, m, dtype, device, bias=True)
    check_against_reference(impl, x, w, make_mask(m, k, 0.6), b, g, dtype)


# Batches of up to 32 rows take the CPU's small-batch kernel (x transposed into 1, 4, 8, 16 or 32
# lanes, or whole vectors of the accumulation type in the portable kernel): rows around each lane
# count, and 33 (the panel kernel again).
SMALL_BATCH_ROWS = [1, 2, 3, 4, 5, 8, 9, 16, 17, 31, 32, 33]


@pytest.mark.parametrize("n", SMALL_BATCH_ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_csr_linear_small_batches(n, dtype):
    gen = torch.Generator().manual_seed(1000 + n)
    m = 70
    for sparsity, k, bias in ((0.0, 37, True), (0.6, 300, False), (0.99, 1100, True), (1.0, 20, True)):
        x, w, b, g = random_inputs(n, k, m, dtype, "cpu", bias=bias, generator=gen)
        mask = make_mask(m, k, sparsity, empty_rows=3, generator=gen)
        check_against_reference("csr", x, w, mask, b, g, dtype)


@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_csr_linear_few_rows_every_row_length(n, dtype):
    # One row of x: the AVX-512 kernel takes a row's kept weights 32 at a time, then 16 at a time
    # with the last ones masked; three and four rows: four chains, then the rest one by one (and
    # the index check 16 at a time, masked). Rows of every length from 0 to 70 (whole steps, every
    # tail), in a random order, columns 0 and K - 1 among them, unsorted within the rows.
    gen = torch.Generator().manual_seed(4242)
    k, m = 101, 71
    lengths = torch.randperm(m, generator=gen)
    mask = torch.zeros(m, k, dtype=torch.bool)
    cols, vals = [], []
    w = torch.randn(m, k, generator=gen).to(dtype)
    for r in range(m):
        c = torch.randperm(k, generator=gen)[: int(lengths[r])]
        if r == 0:
            c = torch.tensor([k - 1, 0] + [i for i in range(1, k - 1)][: max(int(lengths[r]) - 2, 0)])[: int(lengths[r])]
        mask[r, c] = True
        cols.append(c)
        vals.append(w[r, c])
    crow = torch.zeros(m + 1, dtype=torch.int32)
    crow[1:] = torch.tensor([len(c) for c in cols]).cumsum(0)
    col = torch.cat(cols).to(torch.int32)
    values = torch.cat(vals)
    wm = torch.where(mask, w, 0).double()
    b = torch.randn(m, generator=gen).to(dtype)
    x = torch.randn(n, k, generator=gen).to(dtype)
    y = torch.ops.pyfinetune.csr_linear(x, values, crow, col, torch.arange(m, dtype=torch.int32), b)
    exact = x.double() @ wm.t() + b.double()
    terms = x.double().abs() @ wm.abs().t() + b.double().abs()
    assert_product_close(y, exact, terms, k, dtype, f"csr_linear y, {n} row(s) of x")


@pytest.mark.parametrize("n", [1, 3, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_csr_linear_small_batches_any_layout(n, dtype):
    # x of non-unit column stride (a copy for one row, the transpose for several) and kept weights
    # whose columns are not sorted within their rows (the small-batch kernel's gather order).
    gen = torch.Generator().manual_seed(7 + n)
    k, m = 150, 40
    _, w, b, _ = random_inputs(n, k, m, dtype, "cpu", bias=True, generator=gen)
    mask = make_mask(m, k, 0.8, empty_rows=2, generator=gen)
    crow = torch.zeros(m + 1, dtype=torch.int32)
    crow[1:] = mask.sum(1).cumsum(0)
    cols, vals = [], []
    for r in range(m):  # each row's kept columns in a random order
        c = mask[r].nonzero().flatten()[torch.randperm(int(mask[r].sum()), generator=gen)]
        cols.append(c)
        vals.append(w[r, c])
    col = torch.cat(cols).to(torch.int32)
    values = torch.cat(vals)
    row_order = torch.arange(m, dtype=torch.int32)
    wm = torch.where(mask, w, 0).double()
    for x in (torch.randn(n, 2 * k, generator=gen).to(dtype)[:, ::2], torch.randn(k, n + 1, generator=gen).to(dtype)[:, :n].t()):
        assert x.stride(1) != 1
        y = torch.ops.pyfinetune.csr_linear(x, values, crow, col, row_order, b)
        exact = x.double() @ wm.t() + b.double()
        terms = x.double().abs() @ wm.abs().t() + b.double().abs()
        assert_product_close(y, exact, terms, k, dtype, f"csr_linear y, x strides {x.stride()}")


@pytest.mark.parametrize("sparsity,k", [(0.5, 300), (0.9, 700), (0.95, 1100), (0.99, 3000)])
@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.float64]))
def test_csr_tiles_of_every_size(sparsity, k, device, dtype):
    # The CPU kernels walk the operand in tiles that grow with the sparsity (64 to 512 rows for a
    # 128-float panel): enough columns for several tiles at each size, and a batch of two panels
    # with a ragged second one.
    n, m = 150, 96
    x, w, b, g = random_inputs(n, k, m, dtype, device, bias=True)
    check_against_reference("csr", x, w, make_mask(m, k, sparsity), b, g, dtype)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.bfloat16, torch.float64]))
def test_csr_tiles_with_empty_and_late_rows(device, dtype, sparsity):
    # Tiled patterns with rows that skip tiles: rows with no kept weight, rows whose kept weights
    # all lie in the last tile or only in the first, in both products (the forward over the rows,
    # dx over the columns): the CPU kernels' tile-major copies (CPUs without AVX-512) hold
    # segments of every (tile, row), most of them empty here. dx's copy reads the values through
    # the column view's permutation at 50% and from a gathered copy at 90% (below 15% density).
    n, k, m = 70, 520, 300  # dx's pattern tiled at 90% too (tiles of 256 rows of grad_out^T)
    x, w, b, g = random_inputs(n, k, m, dtype, device, bias=True)
    mask = make_mask(m, k, sparsity)
    mask[3] = False
    mask[17] = False
    mask[5, :400] = False
    mask[9, 100:] = False
    mask[:, 7] = False
    mask[:, 200:230] = False
    check_against_reference("csr", x, w, mask, b, g, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_csr_cpu_scratch_allocated_per_call(monkeypatch, dtype):
    # PYFINETUNE_CPU_SCRATCH_MB=0: every temporary of the CPU kernels (the transposed operands,
    # dx's gathered values, the tile-major copies and the weight gradient's sums) is a tensor of
    # the call instead of a buffer its thread keeps, the branch that row ranges above the default
    # limit (64 MB) take; its tensors must live as long as the kernels read them.
    monkeypatch.setenv("PYFINETUNE_CPU_SCRATCH_MB", "0")
    k, m = 520, 300
    for n in (70, 48):  # two 64-float panels (tile-major copies on AVX2), one panel (the walk)
        x, w, b, g = random_inputs(n, k, m, dtype, "cpu", bias=True)
        mask = make_mask(m, k, 0.5)  # dx's copy reads through the permutation
        mask[:, 200:230] = False
        check_against_reference("csr", x, w, mask, b, g, dtype)
        check_against_reference("csr", x, w, make_mask(m, k, 0.9), b, g, dtype)  # a gathered copy
    x, w, b, _ = random_inputs(70, k, m, torch.float32, "cpu", bias=True)
    mask = make_mask(m, k, 0.5)
    for bad in ("lots", "-1", ""):
        monkeypatch.setenv("PYFINETUNE_CPU_SCRATCH_MB", bad)
        with pytest.raises(ValueError, match="PYFINETUNE_CPU_SCRATCH_MB must be a number of megabytes between 0"):
            run_impl("csr", x, w[mask], mask, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.float16]))
def test_two_four_mask(impl, device, dtype):
    n, k, m = 40, 256, 96
    x, w, b, g = random_inputs(n, k, m, dtype, device, bias=True)
    check_against_reference(impl, x, w, two_four_mask(m, k), b, g, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.bfloat16, torch.float64]))
def test_batched_input(impl, device, dtype):
    bsz, seq, k, m = 3, 5, 48, 24
    x, w, b, _ = random_inputs(bsz * seq, k, m, dtype, device, bias=True)
    x = x.reshape(bsz, seq, k)
    g = torch.randn(bsz, seq, m).to(dtype=dtype, device=device)
    mask = make_mask(m, k, 0.6)
    check_against_reference(impl, x, w, mask, b, g, dtype)
    y = run_impl(impl, x, w if impl == "masked" else w[mask.to(device)], mask.to(device), b)
    assert y.shape == (bsz, seq, m)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.bfloat16]))
def test_noncontiguous_x_and_grad(impl, layout, device, dtype):
    n, k, m = 21, 70, 45
    _, w, b, _ = random_inputs(n, k, m, dtype, device, bias=True)
    if layout == "transposed":
        x = torch.randn(k, n).to(dtype=dtype, device=device).t()
        g = torch.randn(m, n).to(dtype=dtype, device=device).t()
    else:
        x = torch.randn(n, 2 * k + 1).to(dtype=dtype, device=device)[:, 1::2]
        g = torch.randn(n, 3 * m).to(dtype=dtype, device=device)[:, ::3]
    assert not x.is_contiguous() and not g.is_contiguous()
    check_against_reference(impl, x, w, make_mask(m, k, 0.5), b, g, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", device_params())
def test_empty_batch_and_empty_pattern(impl, device):
    k, m = 12, 8
    w = torch.randn(m, k, device=device)
    b = torch.randn(m, device=device)
    for n, sparsity in ((0, 0.5), (5, 1.0), (0, 1.0)):
        x = torch.randn(n, k, device=device)
        g = torch.randn(n, m, device=device)
        mask = make_mask(m, k, sparsity)
        y, dx, dleaf, db = forward_backward(impl, x, w, mask, b, g)
        torch.testing.assert_close(y, (x @ (w * mask.to(device)).t() + b))
        assert dx.shape == (n, k) and db.shape == (m,)
        torch.testing.assert_close(db, g.sum(0))
        assert dleaf.shape == ((m, k) if impl == "masked" else (int(mask.sum()),))
        if n == 0:
            assert (dleaf == 0).all()


# ------------------------------------------------------------------------- gradient semantics
@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.float64]))
def test_dense_grad_is_the_full_product(monkeypatch, device, dtype):
    # The default's weight gradient from the dense product (on the CPU at 80% sparsity it would be
    # the sampled one, whose sums run in another order): the kept entries then match bit for bit.
    monkeypatch.setenv("PYFINETUNE_MASKED_GRAD", "dense")
    n, k, m = 16, 40, 24
    x, w, b, g = random_inputs(n, k, m, dtype, device, bias=True)
    mask = make_mask(m, k, 0.8)
    y, dx, dw, db = forward_backward("masked", x, w, mask, b, g, dense_grad=True)
    ref = reference(x, w, mask, b, g)
    assert_product_close(dw, ref["dweight"], ref["dweight_terms"], n, dtype, "dense_grad dweight")
    assert (dw.cpu()[~mask] != 0).any(), "dense_grad must reach pruned weights"
    # everything else is the default path's
    y0, dx0, dw0, db0 = forward_backward("masked", x, w, mask, b, g)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx0, rtol=0, atol=0)
    torch.testing.assert_close(db, db0, rtol=0, atol=0)
    torch.testing.assert_close(dw[mask.to(device)], dw0[mask.to(device)], rtol=0, atol=0)


@pytest.mark.parametrize("device", device_params())
def test_pruned_entries_holding_nan_do_not_leak(device):
    # Pruned positions contribute exactly 0 (a select, not a product with the mask).
    n, k, m = 6, 10, 7
    x, w, b, g = random_inputs(n, k, m, torch.float32, device, bias=True)
    mask = make_mask(m, k, 0.5)
    w[~mask.to(device)] = float("nan")
    y, dx, dw, db = forward_backward("masked", x, w, mask, b, g)
    for t in (y, dx, dw, db):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    n, k, m = 5, 11, 7
    x, w, b, _ = random_inputs(n, k, m, torch.float64, "cpu", bias=True)
    mask = make_mask(m, k, 0.5, empty_rows=1)
    leaf = w[mask] if impl == "csr" else w
    args = [t.clone().requires_grad_(True) for t in (x.reshape(1, n, k), leaf, b)]
    assert torch.autograd.gradcheck(lambda x, v, b: run_impl(impl, x, v, mask, b), args)


def test_gradcheck_dense_grad_float64():
    # With dense_grad the weight's gradient is not the derivative at pruned positions (it is the
    # movement-pruning score), so gradcheck runs over x and bias and compares the weight's by hand.
    n, k, m = 5, 9, 6
    x, w, b, _ = random_inputs(n, k, m, torch.float64, "cpu", bias=True)
    mask = make_mask(m, k, 0.5)
    args = [t.clone().requires_grad_(True) for t in (x, b)]
    assert torch.autograd.gradcheck(lambda x, b: ops.masked_matmul(x, w, mask, b, dense_grad=True), args)


def test_raw_ops_are_differentiable():
    # The raw ops have their own autograd (csr_linear derives the compressed columns itself).
    n, k, m = 6, 13, 9
    x, w, b, _ = random_inputs(n, k, m, torch.float64, "cpu", bias=True)
    mask = make_mask(m, k, 0.6)
    p = ops.compressed_pattern(mask)
    args = [t.clone().requires_grad_(True) for t in (x, w[mask], b)]
    assert torch.autograd.gradcheck(
        lambda x, v, b: torch.ops.pyfinetune.csr_linear(x, v, p.crow_indices, p.col_indices, p.row_order, b), args)
    args = [t.clone().requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: torch.ops.pyfinetune.masked_matmul(x, w, mask, b), args)


# ------------------------------------------------------------------------------ compressed pattern
def test_compressed_pattern_views_agree():
    m, k = 9, 14
    mask = make_mask(m, k, 0.6, empty_rows=2)
    mask[:, 3] = False  # an empty column
    p = ops.compressed_pattern(mask)
    for t in p:
        assert t.dtype == torch.int32
    nz = mask.nonzero()
    assert torch.equal(p.col_indices.long(), nz[:, 1])
    assert torch.equal(p.crow_indices.long()[1:], mask.sum(1).cumsum(0))
    assert torch.equal(p.ccol_indices.long()[1:], mask.sum(0).cumsum(0))
    lengths = p.crow_indices[1:] - p.crow_indices[:-1]
    assert (lengths[p.row_order.long()].diff() <= 0).all()
    # entry p of the compressed columns is entry csc_to_csr[p] of the rows, (row_indices[p], its column)
    col_of_csc = torch.repeat_interleave(torch.arange(k), mask.sum(0))
    rows_of_csr = nz[:, 0]
    assert torch.equal(rows_of_csr[p.csc_to_csr.long()], p.row_indices.long())
    assert torch.equal(p.col_indices.long()[p.csc_to_csr.long()], col_of_csc)


# ------------------------------------------------------------------------------- opcheck / compile
def _op_cases(device):
    n, k, m = 6, 10, 7
    x, w, b, g = random_inputs(n, k, m, torch.float32, device, bias=True)
    mask = make_mask(m, k, 0.5, empty_rows=1).to(device)
    p = ops.compressed_pattern(mask)
    v = w[mask]
    op = torch.ops.pyfinetune
    req = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return [
        ("masked_matmul", op.masked_matmul, (req(x), req(w), mask, req(b))),
        ("masked_matmul-nobias", op.masked_matmul, (x, w, mask, None)),
        ("masked_matmul_backward", op.masked_matmul_backward, (g, x, w, mask, [True, True, True], False)),
        ("masked_matmul_backward-dense-grad", op.masked_matmul_backward, (g, x, w, mask, [False, True, False], True)),
        ("csr_linear", op.csr_linear, (req(x), req(v), p.crow_indices, p.col_indices, p.row_order, req(b))),
        ("csr_linear-nobias", op.csr_linear, (x, v, p.crow_indices, p.col_indices, p.row_order, None)),
        ("csr_linear_backward", op.csr_linear_backward, (g, x, v, *p, [True, True, True])),
        ("csr_linear_backward-dvalues", op.csr_linear_backward, (g, x, v, *p, [False, True, False])),
    ]


@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in _op_cases("cpu")])
@pytest.mark.parametrize("device", device_params())
def test_opcheck(case, device):
    _, fn, args = _op_cases(device)[case]
    torch.library.opcheck(fn, args)


@pytest.mark.parametrize("impl", IMPLS + ["masked-dense-grad"])
@pytest.mark.parametrize("device", device_params())
def test_torch_compile_fullgraph(impl, device):
    torch._dynamo.reset()
    n, k, m = 12, 20, 10
    x, w, b, g = random_inputs(n, k, m, torch.float32, device, bias=True)
    mask = make_mask(m, k, 0.6).to(device)
    p = ops.compressed_pattern(mask)

    def fn(x, leaf, b):
        if impl == "csr":
            y = ops.csr_linear(x, leaf, *p, bias=b)
        else:
            y = ops.masked_matmul(x, leaf, mask, b, dense_grad=impl == "masked-dense-grad")
        return torch.relu(y) * 2.0

    def leaves():
        leaf = w[mask] if impl == "csr" else w
        return [t.detach().clone().requires_grad_(True) for t in (x, leaf, b)]

    eager_in, comp_in = leaves(), leaves()
    y_eager = fn(*eager_in)
    y_comp = torch.compile(fn, fullgraph=True)(*comp_in)
    torch.testing.assert_close(y_comp, y_eager)
    y_eager.backward(g)
    y_comp.backward(g)
    for a, c in zip(eager_in, comp_in):
        torch.testing.assert_close(c.grad, a.grad)


# ------------------------------------------------- masked_matmul's weight gradient, sampled (CPU)
# PYFINETUNE_MASKED_GRAD: the CPU backward computes dweight at the kept positions only (the mask's
# compressed rows and csr_linear's SDDMM) where the mask keeps at most 30%, else the dense product
# and its mask; the variable forces either path (read at each call).
GRAD_PATHS = ["sampled", "dense"]


@pytest.mark.parametrize("path", GRAD_PATHS)
@pytest.mark.parametrize("n", [1, 5, 32, 33, 70])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_weight_grad_paths_against_float64(monkeypatch, path, n, sparsity, dtype):
    # Both paths at every density (the default picks one by density), small batches (n <= 32: the
    # SDDMM's few-row kernels) and panels of rows; empty rows; K = 300 spans tiles of the walk.
    monkeypatch.setenv("PYFINETUNE_MASKED_GRAD", path)
    k, m = 300, 131
    x, w, b, g = random_inputs(n, k, m, dtype, "cpu", bias=True)
    mask = make_mask(m, k, sparsity, empty_rows=4)
    check_against_reference("masked", x, w, mask, b, g, dtype)


@pytest.mark.parametrize("path", GRAD_PATHS)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_weight_grad_paths_take_any_layout(monkeypatch, path, layout):
    # Non-contiguous x, grad_out and mask (a transposed mask; a column slice of a wider mask).
    monkeypatch.setenv("PYFINETUNE_MASKED_GRAD", path)
    n, k, m = 40, 90, 70
    gen = torch.Generator().manual_seed(11)
    x, w, b, g = random_inputs(n, k, m, torch.float32, "cpu", bias=False, generator=gen)
    full = make_mask(k, m, 0.85, generator=gen).t() if layout == "transposed" else make_mask(m, 2 * k, 0.85, generator=gen)[:, ::2]
    assert not full.is_contiguous()
    if layout == "transposed":
        x, g = x.t().contiguous().t(), g.t().contiguous().t()
    else:
        x, g = torch.randn(n, 2 * k, generator=gen)[:, ::2], torch.randn(n, 2 * m, generator=gen)[:, ::2]
    check_against_reference("masked", x, w, full, b, g, torch.float32)


def test_weight_grad_default_picks_by_density(monkeypatch):
    # Unset means: the sampled path at <= 30% kept, the dense one above (seen through the bits: the
    # two sum in different orders at this size), both within the float64 bound.
    n, k, m = 300, 257, 120
    gen = torch.Generator().manual_seed(5)
    x, w, _, g = random_inputs(n, k, m, torch.float32, "cpu", bias=False, generator=gen)

    def dweight(mask, path):
        if path is None:
            monkeypatch.delenv("PYFINETUNE_MASKED_GRAD", raising=False)
        else:
            monkeypatch.setenv("PYFINETUNE_MASKED_GRAD", path)
        return torch.ops.pyfinetune.masked_matmul_backward(g, x, w, mask, [False, True, False], False)[1]

    for sparsity, chosen, other in ((0.9, "sampled", "dense"), (0.5, "dense", "sampled")):
        mask = make_mask(m, k, sparsity, generator=gen)
        auto, want, alt = dweight(mask, None), dweight(mask, chosen), dweight(mask, other)
        assert not torch.equal(want, alt), "the two paths gave the same bits: this test cannot tell them apart"
        assert torch.equal(auto, want), f"at sparsity {sparsity} the default did not take the {chosen} path"
    monkeypatch.setenv("PYFINETUNE_MASKED_GRAD", "fast")
    with pytest.raises(RuntimeError, match=r"PYFINETUNE_MASKED_GRAD must be auto, dense or sampled, got 'fast'"):
        dweight(mask, "fast")


def test_weight_grad_sampled_counts_nonzero_mask_bytes(monkeypatch):
    # A bool mask viewed from bytes other than 0 / 1 (torch does not forbid it): each position kept
    # once, as the dense path's mask keeps it, never a write past a row's slots.
    monkeypatch.setenv("PYFINETUNE_MASKED_GRAD", "sampled")
    n, k, m = 8, 50, 20
    raw = (torch.rand(m, k, generator=torch.Generator().manual_seed(2)) < 0.2).to(torch.uint8) * 2
    mask = raw.view(torch.bool)
    x, w, _, g = random_inputs(n, k, m, torch.float64, "cpu", bias=False)
    got = torch.ops.pyfinetune.masked_matmul_backward(g, x, w, mask, [False, True, False], False)[1]
    torch.testing.assert_close(got, torch.where(raw != 0, g.t() @ x, 0.0))


# ----------------------------------------------------------------------------------------- errors
def _masked_args(**override):
    args = dict(x=torch.randn(4, 6), weight=torch.randn(5, 6), mask=torch.rand(5, 6) > 0.5, bias=torch.randn(5))
    args.update(override)
    return args


@pytest.mark.parametrize("override,pattern", [
    (dict(mask=torch.ones(5, 7, dtype=torch.bool)), r"masked_matmul: mask must have the shape of weight"),
    (dict(mask=torch.ones(5, 6)), r"masked_matmul: mask must be a bool tensor, got Float"),
    (dict(weight=torch.randn(5, 7), mask=torch.ones(5, 7, dtype=torch.bool)),
     r"masked_matmul: weight must be \[M, K\] with K = x.size\(1\) = 6"),
    (dict(bias=torch.randn(4)), r"masked_matmul: bias must be None or a 1-D tensor \[M\] with M = 5"),
    (dict(weight=torch.randn(5, 6, dtype=torch.float64)), r"masked_matmul: weight must have the dtype of x"),
    (dict(bias=torch.randn(5, dtype=torch.bfloat16)), r"masked_matmul: bias must have the dtype of x"),
    (dict(x=torch.randn(4, 6).int(), weight=torch.randn(5, 6).int()), r"masked_matmul: x must be float32"),
    (dict(weight=torch.randn(5, 6, device="meta")), r"masked_matmul: weight must be on the device of x"),
    (dict(mask=torch.ones(5, 6, dtype=torch.bool, device="meta")), r"masked_matmul: mask must be on the device"),
    (dict(bias=torch.randn(5, device="meta")), r"masked_matmul: bias must be on the device of x"),
], ids=["mask-shape", "mask-dtype", "inner-dim", "bias-size", "mixed-dtype", "bias-dtype", "int-x",
        "weight-device", "mask-device", "bias-device"])
def test_masked_matmul_errors_name_the_argument(override, pattern):
    a = _masked_args(**override)
    with pytest.raises(RuntimeError, match=pattern):
        ops.masked_matmul(a["x"], a["weight"], a["mask"], a["bias"])
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.pyfinetune.masked_matmul(a["x"], a["weight"], a["mask"], a["bias"])


def test_python_entry_points_refuse_non_tensors_and_non_bool_flags():
    # A NumPy array or a list where a tensor belongs, a string for dense_grad: a TypeError naming the
    # argument (not an AttributeError from inside, nor a truthy string taken as True).
    a = _masked_args()
    for name in ("x", "weight", "mask"):
        bad = dict(a, **{name: a[name].numpy()})
        with pytest.raises(TypeError, match=rf"pyfinetune.masked_matmul: {name} must be a tensor, got ndarray"):
            ops.masked_matmul(bad["x"], bad["weight"], bad["mask"], bad["bias"])
    with pytest.raises(TypeError, match=r"pyfinetune.masked_matmul: bias must be a tensor or None, got list"):
        ops.masked_matmul(a["x"], a["weight"], a["mask"], [0.0] * 5)
    x = a["x"].requires_grad_(True)
    for flag in ("no", 1, None):
        with pytest.raises(TypeError, match=r"pyfinetune.masked_matmul: dense_grad must be a bool, got"):
            ops.masked_matmul(x, a["weight"], a["mask"], dense_grad=flag)
    np = pytest.importorskip("numpy")
    w = a["weight"].clone().requires_grad_(True)
    ops.masked_matmul(x, w, a["mask"], dense_grad=np.bool_(True)).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(5, 4) @ x.detach())  # the dense gradient: no mask
    c = _csr_args()
    p = ops.compressed_pattern(torch.zeros(5, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"pyfinetune.csr_linear: x must be a tensor, got list"):
        ops.csr_linear([[0.0] * 6], c["values"][:0], *p)
    with pytest.raises(TypeError, match=r"pyfinetune.csr_linear: crow_indices must be a tensor, got ndarray"):
        ops.csr_linear(c["x"], c["values"][:0], p.crow_indices.numpy(), *p[1:])
    tiled = ops.tiled_pattern(p.crow_indices, p.col_indices, 6)
    with pytest.raises(TypeError, match=r"pyfinetune.tiled_csr_linear: bias must be a tensor or None, got float"):
        ops.tiled_csr_linear(c["x"], c["values"][:0], p, tiled, bias=0.0)


def test_masked_matmul_backward_errors():
    x, w, m = torch.randn(4, 6), torch.randn(5, 6), torch.rand(5, 6) > 0.5
    with pytest.raises(RuntimeError, match=r"masked_matmul_backward: grad_out must be \[N, M\] = \[4, 5\]"):
        torch.ops.pyfinetune.masked_matmul_backward(torch.randn(4, 6), x, w, m, [True, True, True], False)
    with pytest.raises(RuntimeError, match=r"masked_matmul_backward: grad_out must have the dtype of x"):
        torch.ops.pyfinetune.masked_matmul_backward(torch.randn(4, 5).double(), x, w, m, [True, True, True], False)


def _csr_args(**override):
    mask = make_mask(5, 6, 0.5, empty_rows=1)
    mask[1, :3] = True
    p = ops.compressed_pattern(mask)
    args = dict(x=torch.randn(4, 6), values=torch.randn(int(mask.sum())), crow_indices=p.crow_indices,
                col_indices=p.col_indices, row_order=p.row_order, bias=torch.randn(5))
    args.update(override)
    return args


@pytest.mark.parametrize("override,pattern", [
    (lambda a: dict(values=a["values"][:-1]), r"csr_linear: col_indices must be a 1-D tensor with nnz"),
    (lambda a: dict(values=a["values"].double()), r"csr_linear: values must have the dtype of x"),
    (lambda a: dict(crow_indices=a["crow_indices"].long()), r"csr_linear: crow_indices must be int32, got Long"),
    (lambda a: dict(col_indices=a["col_indices"].long()), r"csr_linear: col_indices must be int32"),
    (lambda a: dict(row_order=a["row_order"][:-1]), r"csr_linear: row_order must be a 1-D tensor with M"),
    (lambda a: dict(bias=torch.randn(6)), r"csr_linear: bias must be None or a 1-D tensor \[M\] with M = 5"),
    (lambda a: dict(col_indices=a["col_indices"] + 6), r"csr_linear: col_indices\[0\] = 6 is out of range"),
    (lambda a: dict(crow_indices=a["crow_indices"].flip(0)), r"csr_linear: crow_indices\[0\] must be 0"),
    (lambda a: dict(crow_indices=torch.tensor([0, 2, 1, 3, 4, a["values"].numel()], dtype=torch.int32)),
     r"csr_linear: crow_indices must be non-decreasing"),
    (lambda a: dict(values=a["values"].to("meta")), r"csr_linear: values must be on the device of x"),
    (lambda a: dict(x=torch.randn(4, 6, 1)), r"csr_linear: x must be a 2-D tensor \[N, K\]"),
    (lambda a: dict(values=torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0), (a["values"].numel(),),
                                                            check_invariants=False)),
     r"csr_linear: values must be a dense \(strided\) tensor"),
], ids=["nnz", "values-dtype", "crow-int64", "col-int64", "row-order-size", "bias-size", "col-range",
        "crow-start", "crow-order", "values-device", "x-3d", "sparse-values"])
def test_csr_linear_errors_name_the_argument(override, pattern):
    a = _csr_args()
    a.update(override(a))
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.pyfinetune.csr_linear(a["x"], a["values"], a["crow_indices"], a["col_indices"], a["row_order"],
                                        a["bias"])


def test_csr_linear_refuses_an_x_wider_than_the_pattern():
    # The forward op reads the columns the pattern names only; ccol_indices fixes K.
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) > 0.5
    w = torch.randn(4, 6)
    p = ops.compressed_pattern(mask)
    for x in (torch.randn(5, 7), torch.randn(2, 3, 5)):
        with pytest.raises(ValueError, match=r"csr_linear: x must have K = 6 columns \(the pattern's"):
            ops.csr_linear(x, w[mask], *p)
    # K = 0 with several leading dimensions: zeros (+ bias), as F.linear gives.
    empty = ops.compressed_pattern(torch.zeros(4, 0, dtype=torch.bool))
    b = torch.randn(4)
    y = ops.csr_linear(torch.randn(2, 3, 0), torch.zeros(0), *empty, bias=b)
    assert torch.equal(y, b.expand(2, 3, 4))
    assert torch.equal(ops.masked_matmul(torch.randn(2, 3, 0), torch.randn(4, 0), torch.zeros(4, 0, dtype=torch.bool)),
                       torch.zeros(2, 3, 4))


def test_csr_linear_backward_errors():
    a = _csr_args()
    nnz = a["values"].numel()
    p = ops.compressed_pattern(make_mask(5, 6, 0.0))  # the compressed columns of a pattern with another nnz
    base = (torch.randn(4, 5), a["x"], a["values"], a["crow_indices"], a["col_indices"], a["row_order"])
    with pytest.raises(RuntimeError, match=r"csr_linear_backward: row_indices must be a 1-D tensor with nnz"):
        torch.ops.pyfinetune.csr_linear_backward(*base, p.ccol_indices, p.row_indices, p.csc_to_csr,
                                                 [True, True, True])
    with pytest.raises(RuntimeError, match=r"csr_linear_backward: ccol_indices must be a 1-D tensor with K \+ 1"):
        torch.ops.pyfinetune.csr_linear_backward(*base, p.ccol_indices[:6], p.row_indices[:nnz],
                                                 p.csc_to_csr[:nnz], [True, True, True])
    with pytest.raises(RuntimeError, match=r"csr_linear_backward: grad_out must be \[N, M\] = \[4, 5\]"):
        torch.ops.pyfinetune.csr_linear_backward(torch.randn(4, 6), *base[1:], *_csc_of(a), [True, True, True])
    ccol, rows, perm = _csc_of(a)
    with pytest.raises(RuntimeError, match=r"csr_linear_backward: csc_to_csr\[0\] = \d+ is out of range"):
        torch.ops.pyfinetune.csr_linear_backward(*base, ccol, rows, perm + nnz, [True, False, False])
    with pytest.raises(RuntimeError, match=r"csr_linear_backward: row_indices\[0\] = \d+ is out of range: entries must lie in \[0, 5\)"):
        torch.ops.pyfinetune.csr_linear_backward(*base, ccol, rows + 5, perm, [True, False, False])


def _csc_of(a):
    p = ops.pattern_from_csr(a["crow_indices"], a["col_indices"], a["x"].shape[1])
    return p.ccol_indices, p.row_indices, p.csc_to_csr


def test_public_functions_refuse_a_0d_x():
    with pytest.raises(ValueError, match=r"masked_matmul: x must be a tensor \[\.\.\., K\]"):
        ops.masked_matmul(torch.tensor(1.0), torch.randn(2, 1), torch.ones(2, 1, dtype=torch.bool))


def test_portable_kernels_when_avx512_is_off():
    # On an AVX-512 CPU the float32 kernels run the AVX-512 code; PYFINETUNE_CPU_AVX512=0 (read
    # once per process) selects the portable ones, checked here in a fresh process.
    import os
    import subprocess
    import sys

    code = (
        "import torch, pyfinetune\n"
        "from pyfinetune import ops\n"
        "torch.manual_seed(0)\n"
        f"for n in {sorted(set(PANEL_EDGE_ROWS + SMALL_BATCH_ROWS))}:\n"
        "  for k, p in ((300, 0.5), (1100, 0.95)):\n"
        "    x = torch.randn(n, k); w = torch.randn(150, k); b = torch.randn(150)\n"
        "    mask = torch.rand(150, k) > p\n"
        "    v = w[mask].clone().requires_grad_(True); xr = x.clone().requires_grad_(True)\n"
        "    y = ops.csr_linear(xr, v, *ops.compressed_pattern(mask), bias=b)\n"
        "    g = torch.randn_like(y); y.backward(g)\n"
        "    wm = (w * mask).double()\n"
        "    assert torch.allclose(y.double(), x.double() @ wm.t() + b.double(), atol=1e-3), n\n"
        "    assert torch.allclose(xr.grad.double(), g.double() @ wm, atol=1e-3), n\n"
        "    assert torch.allclose(v.grad.double(), (g.double().t() @ x.double())[mask], atol=1e-3), n\n"
        "    # 16-bit values (read as such by the small-batch kernels): within half a bfloat16 ulp of the\n"
        "    # float64 product of the same rounded inputs, plus float32 accumulation\n"
        "    xb, wb = x.bfloat16(), (w * mask).bfloat16()\n"
        "    yb = ops.csr_linear(xb, wb[mask], *ops.compressed_pattern(mask))\n"
        "    exact = xb.double() @ wb.double().t()\n"
        "    bound = 2.0 ** -8 * exact.abs() + 1e-5 * (xb.double().abs() @ wb.double().abs().t())\n"
        "    assert ((yb.double() - exact).abs() <= bound).all(), n\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYFINETUNE_CPU_AVX512="0", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_transposes_round_like_c10(dtype, tmp_path):
    # The AVX-512 transposes convert 16-bit x to float32 and round the float32 output block to
    # 16 bits in registers; the portable code converts element by element with c10's casts. With
    # one kept weight per row every output is a single product (exact in float32) plus the bias
    # (one float32 rounding), so both must give the same bits: round to nearest even (ties
    # included: ~1/256 of the outputs), overflow to inf, and NaN and inf from x.
    import os
    import subprocess
    import sys

    code = (
        "import sys, torch, pyfinetune\n"
        "from pyfinetune import ops\n"
        "torch.manual_seed(0)\n"
        f"dt = {dtype}\n"
        "M, K, N = 67, 50, 300\n"
        "mask = torch.zeros(M, K, dtype=torch.bool)\n"
        "mask[torch.arange(M), torch.randint(0, K, (M,))] = True\n"
        "w = (torch.randn(M, K) * 3).to(dt)\n"
        "w[0, mask[0].nonzero()[0, 0]] = torch.finfo(dt).max\n"
        "x = (torch.randn(N, K) * 3).to(dt)\n"
        "x[1, :] = float('inf'); x[2, :] = float('nan'); x[3, :] = -0.0\n"
        "x[4, :] = torch.finfo(dt).max\n"
        "b = torch.randn(M).to(dt)\n"
        "y = ops.csr_linear(x, w[mask].clone(), *ops.compressed_pattern(mask), bias=b)\n"
        "torch.save(y, sys.argv[1])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = []
    for avx512 in ("1", "0"):
        path = str(tmp_path / f"y{avx512}.pt")
        env = dict(os.environ, PYFINETUNE_CPU_AVX512=avx512,
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(torch.load(path))
    fast, portable = outs
    assert torch.isinf(portable).any() and torch.isnan(portable).any()
    assert torch.equal(torch.isnan(fast), torch.isnan(portable))
    finite = ~torch.isnan(portable)
    assert torch.equal(fast[finite].view(torch.int16), portable[finite].view(torch.int16))


def test_csr_linear_without_gradients_calls_the_op_alone():
    # No input needs a gradient (or grad mode is off): csr_linear skips its autograd Function
    # (~30 us a call) and calls the op; the values are the same bits, and nothing is recorded.
    torch.manual_seed(0)
    mask = torch.rand(37, 50) > 0.7
    w, x, b = torch.randn(37, 50), torch.randn(3, 4, 50), torch.randn(37)
    pattern = ops.compressed_pattern(mask)
    values = w[mask].clone().requires_grad_(True)
    with_grad = ops.csr_linear(x, values, *pattern, bias=b)
    assert with_grad.grad_fn is not None
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            y = ops.csr_linear(x, values, *pattern, bias=b)
        assert y.grad_fn is None and not y.requires_grad and y.shape == (3, 4, 37)
        assert torch.equal(y, with_grad.detach())
    y = ops.csr_linear(x, values.detach(), *pattern, bias=b)   # grad mode on, nothing requires grad
    assert y.grad_fn is None and torch.equal(y, with_grad.detach())


@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("device", device_params())
def test_masked_matmul_twice_differentiable(dense_grad, device):
    # A gradient penalty (create_graph=True) through the masked product: masked_matmul_backward has
    # no autograd formula, so the backward must be composed of differentiable ops there (it was not:
    # the weight's second-order gradient came out wrong at the kept positions).
    gen = torch.Generator().manual_seed(31)
    n, k, m = 5, 12, 8
    x, w, b, _ = random_inputs(n, k, m, torch.float64, device, bias=True, generator=gen)
    mask = make_mask(m, k, 0.5, empty_rows=1, generator=gen).to(device)
    w.requires_grad_(True)
    b.requires_grad_(True)

    def penalty(product):
        xx = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(product(xx).square().sum(), xx, create_graph=True)
        return torch.autograd.grad(g.square().sum(), (w, b))

    ours = penalty(lambda xx: ops.masked_matmul(xx, w, mask, b, dense_grad=dense_grad))
    if dense_grad:  # the full gradient of the effective weight, straight through the mask
        effective = lambda: w + (torch.where(mask, w, 0) - w).detach()
    else:
        effective = lambda: torch.where(mask, w, 0)
    ref = penalty(lambda xx: torch.nn.functional.linear(xx, effective(), b))
    for a, r, name in zip(ours, ref, ("weight", "bias")):
        assert r.abs().max() > 0
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12, msg=f"second-order gradient of {name}")
    if not dense_grad:  # (dense_grad's straight-through gradient is not the numerical derivative)
        fn = lambda xx, ww, bb: ops.masked_matmul(xx, ww, mask, bb)
        assert torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(True), w, b))


@pytest.mark.parametrize("dense_grad", [False, True])
def test_twice_differentiable_with_inf_at_pruned_positions(dense_grad):
    # A pruned weight may hold anything (inf, NaN: the product never reads it); the composed
    # backward of a gradient penalty must not turn it into NaN (dense_grad's straight-through once
    # computed inf - inf there). Finite and equal to the penalty of the same weight with zeros there.
    gen = torch.Generator().manual_seed(33)
    x, w, b, _ = random_inputs(4, 9, 6, torch.float64, "cpu", bias=True, generator=gen)
    mask = make_mask(6, 9, 0.5, generator=gen)
    clean = torch.where(mask, w, 0)
    dirty = clean.clone()
    dirty[~mask] = float("inf")
    dirty.view(-1)[(~mask).view(-1).nonzero()[0]] = float("nan")
    grads = []
    for weight in (clean, dirty):
        ww = weight.clone().requires_grad_(True)
        xx = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(ops.masked_matmul(xx, ww, mask, b, dense_grad=dense_grad).square().sum(), xx,
                                 create_graph=True)
        assert torch.isfinite(g).all()
        gw, = torch.autograd.grad(g.square().sum(), ww)
        grads.append(gw)
    assert torch.isfinite(grads[1][mask]).all()
    torch.testing.assert_close(grads[1][mask], grads[0][mask], rtol=0, atol=0)


@pytest.mark.parametrize("dense_grad", [False, True])
def test_masked_matmul_under_torch_func(dense_grad):
    # torch.func refuses the op's registered autograd (an old-style Function): the same product of
    # torch ops runs there, with the same gradients (dense_grad: the full gradient at pruned places).
    gen = torch.Generator().manual_seed(32)
    n, k, m = 4, 10, 6
    x, w, b, _ = random_inputs(n, k, m, torch.float64, "cpu", bias=True, generator=gen)
    mask = make_mask(m, k, 0.6, generator=gen)
    loss = lambda ww, bb, xx: ops.masked_matmul(xx, ww, mask, bb, dense_grad=dense_grad).pow(3).sum()
    gw, gb = torch.func.grad(loss, argnums=(0, 1))(w, b, x)
    w2 = w.clone().requires_grad_(True)
    b2 = b.clone().requires_grad_(True)
    loss(w2, b2, x).backward()
    torch.testing.assert_close(gw, w2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, b2.grad, rtol=1e-12, atol=1e-12)
    assert (gw[~mask] != 0).any() == dense_grad
    per_row = torch.func.vmap(lambda xx: ops.masked_matmul(xx, w, mask, b))(x.unsqueeze(1))
    torch.testing.assert_close(per_row.squeeze(1), x @ torch.where(mask, w, 0).t() + b, rtol=1e-12, atol=1e-12)
    hess = torch.func.hessian(lambda xx: ops.masked_matmul(xx, w, mask, b).pow(3).sum())(x)
    ref = torch.func.hessian(lambda xx: (xx @ torch.where(mask, w, 0).t() + b).pow(3).sum())(x)
    torch.testing.assert_close(hess, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="mask must be a bool tensor"):
        torch.func.grad(lambda ww: ops.masked_matmul(x, ww, mask.double(), b).sum())(w)


@pytest.mark.parametrize("n", [1, 3, 20, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_csr_linear_column_out_of_range_at_every_batch_size(n, dtype):
    # Batches of up to 32 rows check the column indices inside their kernels (no separate pass):
    # an index out of range anywhere (a whole step of 32 or 16, or a masked tail; negative, K, or
    # huge) still raises the same error naming the first offending position, and nothing is read
    # out of bounds.
    gen = torch.Generator().manual_seed(77 + n)
    k, m = 90, 9
    mask = make_mask(m, k, 0.3, empty_rows=1, generator=gen)
    p = ops.compressed_pattern(mask)
    nnz = int(mask.sum())
    values = torch.randn(nnz, generator=gen).to(dtype)
    x = torch.randn(n, k, generator=gen).to(dtype)
    torch.ops.pyfinetune.csr_linear(x, values, p.crow_indices, p.col_indices, p.row_order, None)
    for position in (0, 40, nnz - 1):
        for bad in (-1, k, 2**31 - 1):
            col = p.col_indices.clone()
            col[position] = bad
            with pytest.raises(RuntimeError, match=rf"csr_linear: col_indices\[{position}\] = {bad} is out of range"):
                torch.ops.pyfinetune.csr_linear(x, values, p.crow_indices, col, p.row_order, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_csr_linear_kept_weights_with_no_columns(dtype):
    # K = 0 with a kept weight: its column is out of range; x has no data to read (a null pointer
    # on the portable kernels, which read column 0 in place of a bad index): the full check
    # reports it before any kernel runs.
    x = torch.randn(1, 0, dtype=dtype)
    one = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"csr_linear: col_indices\[0\] = 0 is out of range"):
        torch.ops.pyfinetune.csr_linear(x, torch.ones(1, dtype=dtype), one, torch.zeros(1, dtype=torch.int32),
                                        torch.zeros(1, dtype=torch.int32), None)


def test_pattern_from_csr_refuses_unsorted_or_repeated_columns():
    # Documented "columns sorted within each row", checked for CPU patterns: repeated or unsorted
    # columns made the sparse kernel add a weight twice while to_dense / the dense path refused.
    with pytest.raises(ValueError, match=r"col_indices must increase strictly within each row, got 1 then 1 in row 0"):
        ops.pattern_from_csr(torch.tensor([0, 2]), torch.tensor([1, 1]), 3)
    with pytest.raises(ValueError, match=r"got 2 then 0 in row 1"):
        ops.pattern_from_csr(torch.tensor([0, 1, 3]), torch.tensor([2, 2, 0]), 3)
    p = ops.pattern_from_csr(torch.tensor([0, 1, 3]), torch.tensor([2, 0, 2]), 3)  # rows may restart
    assert p.col_indices.tolist() == [2, 0, 2]
