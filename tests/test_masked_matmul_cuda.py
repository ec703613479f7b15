"""The CUDA kernels of the pruning ops against a float64 dense reference computed on the CPU.

* ``masked_matmul`` / ``masked_matmul_backward``: the dense masked path (cuBLAS).
* ``csr_linear`` / ``csr_linear_backward``: the sparse path (SpMM over the compressed rows for y,
  over the compressed columns for dx, SDDMM for dvalues).

GPU-only: every test is skipped without a CUDA device. The index tensors are built here from a dense
bool mask (``sparse_pattern``), and the reference weight is rebuilt from values / crow / col
(``dense_weight``), so the test also checks that the kernels read the compressed formats as the
schema documents them.

Tolerances. The inputs are drawn in the tested dtype and the reference uses exactly those values in
float64, so the only errors are the kernels' accumulation (float32 for bf16/fp16/fp32, double for
double) and the rounding of the result to the dtype. With unit-normal inputs a sum of L terms has a
magnitude of about sqrt(L), so every comparison is
    |out - ref| <= eps * |ref| + eps * sqrt(L)        (L: the length of the reduction)
with eps = one unit in the last place of the dtype for the low precisions: 2^-7 (bf16) and 2^-10
(fp16), twice the half-ulp rounding of the result; the sqrt(L) term covers results that cancel to
near zero and cuBLAS's low-precision reduction of split-K partial sums (allow_bf16/fp16_reduced_
precision_reduction), an error of up to an ulp of partial sums of size ~sqrt(L). eps = 1e-4 for
float32 (float32 accumulation errors are ~sqrt(L) * 6e-8, far below) and 1e-10 for float64.
With a bias in bf16 / fp16, cuBLAS (PyTorch 2.11, H100) rounds the product x @ W^T to the dtype before
adding the bias, as F.linear does there: y's bound then also holds half an ulp of the product,
eps / 2 * |x @ W^T| (``rounded_before``), which the sqrt(L) term does not always cover when the bias
cancels a large product.
"""

from __future__ import annotations

import math

import pytest
import torch

import pyfinetune  # noqa: F401  (registers torch.ops.pyfinetune)
from conftest import cuda_kernel_names

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ops = torch.ops.pyfinetune
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
# (N, K, M): odd sizes everywhere, a single element, M and K past one 32 x 32 transpose tile, N past
# one SpMM tile of every dtype (64 fp64, 128 fp32, 256 bf16/fp16 columns).
SHAPES = [(1, 1, 1), (7, 33, 5), (33, 7, 1023), (1023, 33, 7), (300, 1023, 33)]
EPS = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def assert_close(actual, expected, dtype, length, what, rounded_before=None):
    """``actual`` (the kernel's, on the GPU) against the float64 reference ``expected`` (on the CPU)
    with the tolerance of the module docstring for a reduction of ``length`` terms; ``rounded_before``:
    the exact intermediate that cuBLAS rounds to dtype before the bias is added."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    eps = EPS[dtype]
    if rounded_before is not None:
        a = actual.detach().cpu().double()
        bound = eps * expected.abs() + eps * math.sqrt(max(length, 1)) + eps / 2 * rounded_before.abs()
        bad = ~((a - expected).abs() <= bound)
        assert not bad.any(), (
            f"{what}: {int(bad.sum())} of {a.numel()} entries outside the bound; max error / bound "
            f"{((a - expected).abs() / bound).max().item():.3g}")
        return
    torch.testing.assert_close(actual.detach().cpu().double(), expected, rtol=eps,
                               atol=eps * math.sqrt(max(length, 1)), msg=lambda m: f"{what}: {m}")


def assert_empty(t, what):
    assert t.numel() == 0, f"{what} was not asked for and must be an empty tensor, got shape {tuple(t.shape)}"


# ----------------------------------------------------------------------------- patterns and reference
def sparse_pattern(mask: torch.Tensor) -> dict:
    """The compressed-row and compressed-column index tensors (int32, on the CPU) of a bool mask [M, K].

    crow_indices [M + 1]: cumulative row lengths; col_indices [nnz]: the kept columns in row-major
    order (sorted within a row); row_order [M]: the rows by decreasing length; ccol_indices [K + 1]:
    cumulative column lengths; csc_to_csr [nnz]: the CSR positions in (column, row) order, a stable
    sort of the entries by column; row_indices [nnz]: the row of each compressed-column entry.
    """
    mask = mask.cpu()
    M, K = mask.shape
    row_len = mask.sum(1)
    crow = torch.zeros(M + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(row_len, 0)
    rows, cols = mask.nonzero(as_tuple=True)
    row_order = torch.argsort(row_len, descending=True, stable=True)
    csc_to_csr = torch.argsort(cols, stable=True)
    ccol = torch.zeros(K + 1, dtype=torch.int64)
    ccol[1:] = torch.cumsum(mask.sum(0), 0)
    i32 = torch.int32
    return dict(crow_indices=crow.to(i32), col_indices=cols.to(i32), row_order=row_order.to(i32),
                ccol_indices=ccol.to(i32), row_indices=rows[csc_to_csr].to(i32), csc_to_csr=csc_to_csr.to(i32))


def dense_weight(values, crow_indices, col_indices, M, K):
    """W [M, K] in float64 on the CPU, rebuilt from the CSR arrays."""
    crow = crow_indices.cpu().long()
    rows = torch.repeat_interleave(torch.arange(M), crow[1:] - crow[:-1])
    W = torch.zeros(M, K, dtype=torch.float64)
    W[rows, col_indices.cpu().long()] = values.detach().cpu().double()
    return W


def random_mask(M, K, sparsity):
    return torch.rand(M, K) >= sparsity  # sparsity 0: all kept, 1: none


def skewed_mask(M, K):
    """Rows of every length from 0 to K - 1 in a shuffled order, every 3rd column empty: row_order is
    far from the identity, and the columns (dx's rows) have very different lengths too."""
    lengths = (torch.arange(M) * K) // max(M, 1)
    mask = torch.arange(K)[None, :] < lengths[:, None]
    mask = mask[torch.randperm(M)]
    mask[:, ::3] = False
    return mask


def csr_case(N, K, M, dtype, mask, bias=True):
    """CUDA arguments of csr_linear(_backward) and the float64 CPU reference values."""
    pattern = sparse_pattern(mask)
    nnz = int(pattern["col_indices"].numel())
    values = torch.randn(nnz, dtype=dtype)
    x = torch.randn(N, K, dtype=dtype)
    grad_out = torch.randn(N, M, dtype=dtype)
    b = torch.randn(M, dtype=dtype) if bias else None
    W = dense_weight(values, pattern["crow_indices"], pattern["col_indices"], M, K)
    rows = torch.repeat_interleave(torch.arange(M), mask.sum(1))
    ref = dict(
        y=x.double() @ W.t() + (b.double() if bias else 0.0),
        dx=grad_out.double() @ W,
        dvalues=(grad_out.double().t() @ x.double())[rows, pattern["col_indices"].long()],
        dbias=grad_out.double().sum(0),
    )
    cuda = {k: v.cuda() for k, v in pattern.items()}
    cuda.update(x=x.cuda(), values=values.cuda(), grad_out=grad_out.cuda(), bias=b.cuda() if bias else None)
    return cuda, ref


def run_csr_forward(c):
    return ops.csr_linear(c["x"], c["values"], c["crow_indices"], c["col_indices"], c["row_order"], c["bias"])


def run_csr_backward(c, output_mask=(True, True, True)):
    return ops.csr_linear_backward(c["grad_out"], c["x"], c["values"], c["crow_indices"], c["col_indices"],
                                   c["row_order"], c["ccol_indices"], c["row_indices"], c["csc_to_csr"],
                                   list(output_mask))


def check_csr(c, ref, dtype, N, K, M, output_mask=(True, True, True), what=""):
    y = run_csr_forward(c)
    assert y.is_contiguous()
    assert_close(y, ref["y"], dtype, K, f"y {what}")
    dx, dvalues, dbias = run_csr_backward(c, output_mask)
    for need, got, name, length in ((output_mask[0], dx, "dx", M), (output_mask[1], dvalues, "dvalues", N),
                                    (output_mask[2], dbias, "dbias", N)):
        if need:
            assert_close(got, ref[name], dtype, length, f"{name} {what}")
        else:
            assert_empty(got, name)


# ------------------------------------------------------------------------------------- csr_linear
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_csr_linear_matches_dense_reference(shape, sparsity, dtype):
    N, K, M = shape
    for bias in (True, False):
        c, ref = csr_case(N, K, M, dtype, random_mask(M, K, sparsity), bias=bias)
        check_csr(c, ref, dtype, N, K, M, what=f"bias={bias}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_csr_linear_tiled_spmm_kernel(dtype, monkeypatch):
    """PYFINETUNE_CSR_CUDA_KERNEL=tiled (experimental: operand tiles of 128 rows, 64 rows for
    float64, in shared memory, 32 sparse rows and 64 columns per block) computes the SpMM of y and
    of dx. Shapes cross every tile edge with a partial tile: K and M past several K tiles, M past
    the 32-row blocks, N past the 64-column tiles; dense rows need several 32-entry rounds inside
    one K tile, skewed masks have empty rows and columns."""
    monkeypatch.setenv("PYFINETUNE_CSR_CUDA_KERNEL", "tiled")
    cases = [(1, 1, 1, random_mask(1, 1, 0.0)), (7, 33, 5, random_mask(5, 33, 0.5)),
             (200, 300, 70, random_mask(70, 300, 0.0)), (130, 517, 97, random_mask(97, 517, 0.9)),
             (65, 200, 129, skewed_mask(129, 200)), (3, 1023, 33, random_mask(33, 1023, 0.99))]
    for N, K, M, mask in cases:
        c, ref = csr_case(N, K, M, dtype, mask)
        check_csr(c, ref, dtype, N, K, M, what=f"tiled {N}x{K}x{M}")
    monkeypatch.setenv("PYFINETUNE_CSR_CUDA_KERNEL", "bogus")
    c, _ = csr_case(4, 5, 3, dtype, random_mask(3, 5, 0.5))
    with pytest.raises(RuntimeError, match='PYFINETUNE_CSR_CUDA_KERNEL must be "warp", "tiled" or "tensor_cores", got "bogus"'):
        run_csr_forward(c)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_csr_linear_small_n_kernel(dtype, monkeypatch):
    """PYFINETUNE_CSR_CUDA_SMALL_N=1 (experimental): at most 16 rows of x run the kernel whose lanes
    take a row's nonzeros (accumulators for 1, 2, 4, 8 or 16 rows). Every accumulator count and the
    edges around it (N = 1..17: 17 takes the warp kernel again), rows longer than a warp's 32 lanes
    and empty ones (skewed mask), sparsity 0 and 1, with and without bias, a strided x (row stride
    past K, and column-major: copied); the backward is the warp kernels' either way."""
    monkeypatch.setenv("PYFINETUNE_CSR_CUDA_SMALL_N", "1")
    for N in range(1, 18):
        for K, M, mask in ((33, 70, random_mask(70, 33, 0.5)), (300, 129, skewed_mask(129, 300)),
                           (1023, 5, random_mask(5, 1023, 0.0)), (40, 9, random_mask(9, 40, 1.0))):
            for bias in (True, False):
                c, ref = csr_case(N, K, M, dtype, mask, bias=bias)
                check_csr(c, ref, dtype, N, K, M, what=f"small-N {N}x{K}x{M} bias={bias}")
    for N in (1, 5, 16):
        c, ref = csr_case(N, 70, 40, dtype, random_mask(40, 70, 0.7))
        wide = torch.zeros(N, 75, dtype=dtype, device="cuda")
        wide[:, 2:72] = c["x"]
        c["x"] = wide[:, 2:72]  # row stride 75, an offset start
        check_csr(c, ref, dtype, N, 70, 40, what=f"small-N row-strided {N}")
        c["x"] = c["x"].t().contiguous().t()  # column-major
        check_csr(c, ref, dtype, N, 70, 40, what=f"small-N column-major {N}")
    # The kernel that ran, where the profiler sees kernels: small-N for each accumulator count, the
    # warp kernel past 16 rows (the numbers above would pass with either).
    for N, expected in ((1, True), (2, True), (3, True), (5, True), (9, True), (16, True), (17, False)):
        c, _ = csr_case(N, 40, 30, dtype, random_mask(30, 40, 0.5))
        names = cuda_kernel_names(lambda: run_csr_forward(c), "csr_")
        if names is not None:
            assert any("csr_spmv_kernel" in n for n in names) == expected, (N, names)
    monkeypatch.setenv("PYFINETUNE_CSR_CUDA_SMALL_N", "yes")
    c, _ = csr_case(2, 5, 3, dtype, random_mask(3, 5, 0.5))
    with pytest.raises(ValueError, match="pyfinetune.csr_linear: PYFINETUNE_CSR_CUDA_SMALL_N must be 0 or 1"):
        run_csr_forward(c)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_csr_linear_empty_and_skewed_rows(dtype):
    for N, K, M in [(37, 65, 70), (300, 200, 129), (5, 1023, 40)]:
        mask = skewed_mask(M, K)
        assert (mask.sum(1) == 0).any() and (mask.sum(0) == 0).any()
        c, ref = csr_case(N, K, M, dtype, mask)
        check_csr(c, ref, dtype, N, K, M, what=f"{N}x{K}x{M}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_csr_linear_many_rows_of_x(dtype):
    """N = 70000: hundreds of N tiles in grid.y, and an SDDMM whose nonzeros alone fill the GPU."""
    N, K, M = 70000, 96, 80
    c, ref = csr_case(N, K, M, dtype, random_mask(M, K, 0.9))
    check_csr(c, ref, dtype, N, K, M)
    # Few nonzeros and a long N: the SDDMM cuts N into slabs summed afterwards.
    c, ref = csr_case(N, K, M, dtype, random_mask(M, K, 0.999))
    check_csr(c, ref, dtype, N, K, M, what="slabs")


def test_csr_linear_more_n_tiles_than_grid_y():
    """More than 65535 N tiles (65535 * 128 float32 columns) and transpose row tiles: the kernels loop
    over grid.y."""
    N, K, M = 65535 * 128 + 1000, 3, 5
    c, ref = csr_case(N, K, M, torch.float32, random_mask(M, K, 0.3))
    check_csr(c, ref, torch.float32, N, K, M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_csr_linear_output_mask(dtype):
    N, K, M = 45, 37, 29
    c, ref = csr_case(N, K, M, dtype, random_mask(M, K, 0.7))
    for need in [(a, b, d) for a in (False, True) for b in (False, True) for d in (False, True)]:
        check_csr(c, ref, dtype, N, K, M, output_mask=need, what=f"output_mask={need}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_csr_linear_non_contiguous_inputs(dtype):
    """x, grad_out and values as strided views (the transposes read any strides; values are copied)."""
    N, K, M = 70, 45, 33
    c, ref = csr_case(N, K, M, dtype, random_mask(M, K, 0.6))
    c["x"] = c["x"].t().contiguous().t()  # column-major x
    c["grad_out"] = torch.stack([c["grad_out"], torch.zeros_like(c["grad_out"])], dim=-1)[..., 0]
    c["values"] = torch.stack([c["values"], torch.zeros_like(c["values"])], dim=-1)[:, 0]
    assert not (c["x"].is_contiguous() or c["grad_out"].is_contiguous() or c["values"].is_contiguous())
    check_csr(c, ref, dtype, N, K, M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_csr_linear_empty_dimensions(dtype):
    cases = [(0, 5, 4, 0.5), (6, 0, 4, 0.0), (6, 5, 0, 0.0), (0, 0, 0, 0.0)]
    for N, K, M, sparsity in cases:
        c, ref = csr_case(N, K, M, dtype, random_mask(M, K, sparsity))
        check_csr(c, ref, dtype, N, K, M, what=f"{N}x{K}x{M}")


@pytest.mark.parametrize("small_n", ["0", "1"], ids=["warp", "small-N"])
def test_csr_linear_inf_in_x_stays_in_its_columns(small_n, monkeypatch):
    """An inf in x reaches only the outputs its column feeds; no padding or staging slot multiplies it
    by a zero weight (which would spread NaN); the same with the small-N kernel, which multiplies
    kept entries only."""
    monkeypatch.setenv("PYFINETUNE_CSR_CUDA_SMALL_N", small_n)
    N, K, M = 9, 12, 6
    mask = torch.zeros(M, K, dtype=torch.bool)
    mask[0, 3] = True
    mask[2, [0, 1, 2, 4, 5]] = True
    c, _ = csr_case(N, K, M, torch.float32, mask, bias=False)
    c["x"][4, 3] = float("inf")
    y = run_csr_forward(c).cpu()
    assert torch.isinf(y[4, 0]) and torch.isfinite(y[:, 1:]).all() and torch.isfinite(y[:4]).all()


# ---------------------------------------------------------------------------------- masked_matmul
def masked_case(N, K, M, dtype, sparsity, bias=True, nan_pruned=True):
    x = torch.randn(N, K, dtype=dtype)
    weight = torch.randn(M, K, dtype=dtype)
    mask = random_mask(M, K, sparsity)
    if nan_pruned:
        weight[~mask] = float("nan")  # a pruned position never contributes, whatever it holds
    grad_out = torch.randn(N, M, dtype=dtype)
    b = torch.randn(M, dtype=dtype) if bias else None
    Wm = torch.where(mask, weight.double(), 0.0)
    dense_dw = grad_out.double().t() @ x.double()
    ref = dict(y_product=x.double() @ Wm.t(), y=x.double() @ Wm.t() + (b.double() if bias else 0.0), dx=grad_out.double() @ Wm,
               dweight=torch.where(mask, dense_dw, 0.0), dweight_dense=dense_dw, dbias=grad_out.double().sum(0))
    cuda = dict(x=x.cuda(), weight=weight.cuda(), mask=mask.cuda(), grad_out=grad_out.cuda(),
                bias=b.cuda() if bias else None)
    return cuda, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES + [(0, 7, 5), (6, 0, 5)], ids=lambda s: "x".join(map(str, s)))
def test_masked_matmul_matches_dense_reference(shape, sparsity, dtype):
    N, K, M = shape
    for bias in (True, False):
        c, ref = masked_case(N, K, M, dtype, sparsity, bias=bias)
        y = ops.masked_matmul(c["x"], c["weight"], c["mask"], c["bias"])
        assert_close(y, ref["y"], dtype, K, f"y bias={bias}",
                     ref["y_product"] if bias and dtype in (torch.bfloat16, torch.float16) else None)
    for dense_grad in (False, True):
        dx, dw, db = ops.masked_matmul_backward(c["grad_out"], c["x"], c["weight"], c["mask"], [True, True, True],
                                                dense_grad)
        assert_close(dx, ref["dx"], dtype, M, "dx")
        assert_close(dw, ref["dweight_dense" if dense_grad else "dweight"], dtype, N,
                     f"dweight dense_grad={dense_grad}")
        assert_close(db, ref["dbias"], dtype, N, "dbias")
        if not dense_grad:
            assert (dw.cpu()[~c["mask"].cpu()] == 0).all(), "dweight must be exactly 0 at pruned positions"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_masked_matmul_output_mask_and_many_rows(dtype):
    N, K, M = 70000, 64, 48
    c, ref = masked_case(N, K, M, dtype, 0.5)
    for need in [(a, b, d) for a in (False, True) for b in (False, True) for d in (False, True)]:
        out = ops.masked_matmul_backward(c["grad_out"], c["x"], c["weight"], c["mask"], list(need), False)
        for want, got, name, length in zip(need, out, ("dx", "dweight", "dbias"), (M, N, N)):
            if want:
                assert_close(got, ref[name], dtype, length, f"{name} output_mask={need}")
            else:
                assert_empty(got, name)


# ---------------------------------------------------------------------------------------- opcheck
def _opcheck_utils(qualname, differentiable):
    """The opcheck tests that apply. The fake (Meta) kernels and the autograd formulas are registered
    in Python (pyfinetune/ops.py); where they are missing, the checks that need them are left out.
    test_autograd_registration needs an input that requires grad: it runs on the forward ops, whose
    inputs require grad below (without a registered formula it checks that the kernel's outputs do
    not require grad by themselves); the backward ops are not differentiated again."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    utils = ["test_schema"]
    if differentiable:
        utils.append("test_autograd_registration")
    if has(qualname, "Meta"):
        utils.append("test_faketensor")
        if not differentiable or has(qualname, "Autograd"):
            utils.append("test_aot_dispatch_dynamic")
    return utils


def _requiring_grad(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_opcheck(dtype):
    N, K, M = 19, 37, 23
    c, _ = csr_case(N, K, M, dtype, random_mask(M, K, 0.8))
    idx = [c["crow_indices"], c["col_indices"], c["row_order"]]
    csc = [c["ccol_indices"], c["row_indices"], c["csc_to_csr"]]
    x, values, bias = (_requiring_grad(c[k]) for k in ("x", "values", "bias"))
    utils = _opcheck_utils("pyfinetune::csr_linear", differentiable=True)
    torch.library.opcheck(ops.csr_linear.default, (x, values, *idx, bias), test_utils=utils)
    torch.library.opcheck(ops.csr_linear.default, (x, values, *idx, None), test_utils=utils)
    utils = _opcheck_utils("pyfinetune::csr_linear_backward", differentiable=False)
    for need in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(ops.csr_linear_backward.default, (c["grad_out"], c["x"], c["values"], *idx, *csc, need),
                              test_utils=utils)

    m, _ = masked_case(N, K, M, dtype, 0.5, nan_pruned=False)
    x, weight, bias = (_requiring_grad(m[k]) for k in ("x", "weight", "bias"))
    torch.library.opcheck(ops.masked_matmul.default, (x, weight, m["mask"], bias),
                          test_utils=_opcheck_utils("pyfinetune::masked_matmul", differentiable=True))
    utils = _opcheck_utils("pyfinetune::masked_matmul_backward", differentiable=False)
    for need, dense_grad in (([True, True, True], False), ([False, True, False], True)):
        torch.library.opcheck(ops.masked_matmul_backward.default,
                              (m["grad_out"], m["x"], m["weight"], m["mask"], need, dense_grad), test_utils=utils)


# ------------------------------------------------------------------- streams and synchronization
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("small_n", ["0", "1"], ids=["warp", "small-N"])
def test_ops_run_on_the_current_stream_without_synchronizing(dtype, small_n, monkeypatch):
    # Every pruning op on a side stream, under set_sync_debug_mode("error") (a host synchronization
    # raises), with inputs that the side stream itself writes after a 20 ms sleep: an op launched on
    # any other stream would read them before they exist, and give wrong numbers.
    monkeypatch.setenv("PYFINETUNE_CSR_CUDA_SMALL_N", small_n)
    N, K, M = (8 if small_n == "1" else 70), 45, 33
    c, ref = csr_case(N, K, M, dtype, random_mask(M, K, 0.8))
    mc, mref = masked_case(N, K, M, dtype, 0.8, bias=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())

    def run_all(src, msrc):
        y = run_csr_forward(src)
        grads = run_csr_backward(src)
        my = ops.masked_matmul(msrc["x"], msrc["weight"], msrc["mask"], None)
        mgrads = ops.masked_matmul_backward(msrc["grad_out"], msrc["x"], msrc["weight"], msrc["mask"],
                                            [True, True, True], False)
        dense = ops.csr_to_dense(src["values"], src["crow_indices"], src["col_indices"], K)
        gathered = ops.csr_gather(dense, src["crow_indices"], src["col_indices"])
        return y, grads, my, mgrads, dense, gathered

    with torch.cuda.stream(side):
        run_all(c, mc)  # first calls outside the check: allocator, cuBLAS handle, kernel attributes
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            torch.cuda._sleep(40_000_000)
            fresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
            mfresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in mc.items()}
            out = run_all(fresh, mfresh)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    y, (dx, dvalues, dbias), my, (mdx, mdw, mdb), dense, gathered = out
    assert_close(y, ref["y"], dtype, K, "csr y")
    assert_close(dx, ref["dx"], dtype, M, "csr dx")
    assert_close(dvalues, ref["dvalues"], dtype, N, "csr dvalues")
    assert_close(dbias, ref["dbias"], dtype, N, "csr dbias")
    assert_close(my, mref["y"], dtype, K, "masked y")
    assert_close(mdx, mref["dx"], dtype, M, "masked dx")
    assert_close(mdw, mref["dweight"], dtype, N, "masked dweight")
    assert_close(mdb, mref["dbias"], dtype, N, "masked dbias")
    want = dense_weight(c["values"], c["crow_indices"], c["col_indices"], M, K)
    assert torch.equal(dense.cpu().double(), want), "csr_to_dense on the side stream"
    assert torch.equal(gathered, c["values"]), "csr_gather on the side stream"


# ----------------------------------------------------------------------------------------- errors
def test_argument_errors_name_the_argument():
    N, K, M = 4, 6, 5
    c, _ = csr_case(N, K, M, torch.float32, random_mask(M, K, 0.5))
    idx = dict(crow_indices=c["crow_indices"], col_indices=c["col_indices"], row_order=c["row_order"])

    def fwd(**over):
        a = dict(x=c["x"], values=c["values"], **idx, bias=c["bias"])
        a.update(over)
        return ops.csr_linear(a["x"], a["values"], a["crow_indices"], a["col_indices"], a["row_order"], a["bias"])

    with pytest.raises(RuntimeError, match=r"pyfinetune.csr_linear: col_indices must be int32, got Long"):
        fwd(col_indices=c["col_indices"].long())
    with pytest.raises(RuntimeError, match=r"pyfinetune.csr_linear: values must have the dtype of x \(Float\), got Half"):
        fwd(values=c["values"].half())
    with pytest.raises(RuntimeError, match=r"pyfinetune.csr_linear: bias must be None or a 1-D tensor \[M\] with M = 5"):
        fwd(bias=torch.zeros(M + 1, device="cuda"))
    with pytest.raises(RuntimeError, match=r"pyfinetune.csr_linear: row_order must be a 1-D tensor with M = crow_indices.numel\(\) - 1 = 5 entries"):
        fwd(row_order=c["row_order"][:-1])
    with pytest.raises(RuntimeError, match=r"pyfinetune.csr_linear: crow_indices must be on the device of x \(cuda:0\), got cpu"):
        fwd(crow_indices=c["crow_indices"].cpu())
    with pytest.raises(RuntimeError, match=r"pyfinetune.csr_linear: x must be a 2-D tensor \[N, K\], got shape \[1, 4, 6\]"):
        fwd(x=c["x"][None])
    with pytest.raises(RuntimeError, match=r"pyfinetune.csr_linear: x must be float32, bfloat16, float16 or float64, got Int"):
        fwd(x=c["x"].int(), values=c["values"].int())
    with pytest.raises(RuntimeError, match=r"pyfinetune.csr_linear_backward: csc_to_csr must be a 1-D tensor with nnz = values.numel\(\) = \d+ entries"):
        ops.csr_linear_backward(c["grad_out"], c["x"], c["values"], *idx.values(), c["ccol_indices"],
                                c["row_indices"], c["csc_to_csr"][:-1], [True, True, True])
    m, _ = masked_case(N, K, M, torch.float32, 0.5)
    with pytest.raises(RuntimeError, match=r"pyfinetune.masked_matmul: mask must be a bool tensor, got Float"):
        ops.masked_matmul(m["x"], m["weight"], m["mask"].float(), None)
    with pytest.raises(RuntimeError, match=r"pyfinetune.masked_matmul_backward: grad_out must be \[N, M\] = \[4, 5\]"):
        ops.masked_matmul_backward(m["grad_out"].t(), m["x"], m["weight"], m["mask"], [True, True, True], False)
