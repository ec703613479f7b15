"""pyfinetune.ops.csr_to_dense and csr_gather (SparseLinear's dense path): the dense weight of a
compressed-row pattern and the kept positions of a dense tensor, against the mask's own
``torch.where(mask, w, 0)`` / ``dense[mask]``; gradients (each op is the other's adjoint),
gradcheck and gradgradcheck in float64, opcheck, torch.compile, argument and pattern errors.

Both ops copy values without arithmetic, so every comparison is exact (torch.equal), in every
dtype; a NaN or inf value is copied like any other (compared with equal_nan)."""

from __future__ import annotations

import pytest
import torch

from conftest import device_dtype_params, device_params
from pyfinetune import ops
from reference_masked_matmul import make_mask

SHAPES = [(1, 1), (7, 13), (33, 200), (130, 257)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


def pattern(mask: torch.Tensor):
    p = ops.compressed_pattern(mask)
    return p.crow_indices, p.col_indices


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_to_dense_and_gather_match_the_mask(shape, sparsity, device, dtype):
    m, k = shape
    mask = make_mask(m, k, sparsity, empty_rows=min(1, m - 1)).to(device)
    w = torch.randn(m, k, device=device).to(dtype)
    crow, col = pattern(mask)
    dense = ops.csr_to_dense(w[mask], crow, col, k)
    assert dense.shape == (m, k) and dense.dtype == dtype and dense.device == w.device
    assert torch.equal(dense, torch.where(mask, w, torch.zeros((), dtype=dtype, device=device)))
    assert not torch.signbit(dense[~mask]).any()  # +0.0 at the pruned positions
    assert torch.equal(ops.csr_gather(w, crow, col), w[mask])


@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.bfloat16]))
def test_gather_reads_any_strides(device, dtype):
    m, k = 19, 23
    mask = make_mask(m, k, 0.6).to(device)
    crow, col = pattern(mask)
    base = torch.randn(k, 3 * m, device=device).to(dtype)
    w = base[:, ::3].t()  # [m, k] with strides (3, 3m)
    assert not w.is_contiguous()
    assert torch.equal(ops.csr_gather(w, crow, col), w[mask])
    assert torch.equal(ops.csr_gather(w.contiguous(), crow, col), w[mask])


@pytest.mark.parametrize("device", device_params())
def test_nan_and_inf_values_are_copied(device):
    mask = torch.tensor([[True, False, True], [False, True, False]], device=device)
    crow, col = pattern(mask)
    values = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
    dense = ops.csr_to_dense(values, crow, col, 3)
    expected = torch.tensor([[float("nan"), 0.0, float("inf")], [0.0, -float("inf"), 0.0]], device=device)
    assert torch.equal(dense.isnan(), expected.isnan())
    assert torch.equal(dense.nan_to_num(0.0), expected.nan_to_num(0.0))
    back = ops.csr_gather(dense, crow, col)
    assert torch.allclose(back, values, equal_nan=True)


@pytest.mark.parametrize("device", device_params())
def test_empty_patterns(device):
    kw = dict(dtype=torch.int32, device=device)
    # No rows.
    out = ops.csr_to_dense(torch.zeros(0, device=device), torch.zeros(1, **kw), torch.zeros(0, **kw), 5)
    assert out.shape == (0, 5)
    assert ops.csr_gather(torch.zeros(0, 5, device=device), torch.zeros(1, **kw), torch.zeros(0, **kw)).shape == (0,)
    # No columns: every row empty.
    out = ops.csr_to_dense(torch.zeros(0, device=device), torch.zeros(4, **kw), torch.zeros(0, **kw), 0)
    assert out.shape == (3, 0)
    # Rows but no kept weight: all zeros.
    out = ops.csr_to_dense(torch.zeros(0, device=device), torch.zeros(4, **kw), torch.zeros(0, **kw), 6)
    assert torch.equal(out, torch.zeros(3, 6, device=device))
    assert ops.csr_gather(torch.randn(3, 6, device=device), torch.zeros(4, **kw), torch.zeros(0, **kw)).shape == (0,)


@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.float16]))
def test_gradients_are_each_others_adjoint(device, dtype):
    m, k = 17, 29
    mask = make_mask(m, k, 0.7, empty_rows=2).to(device)
    crow, col = pattern(mask)
    values = torch.randn(int(mask.sum()), device=device).to(dtype).requires_grad_(True)
    grad = torch.randn(m, k, device=device).to(dtype)
    ops.csr_to_dense(values, crow, col, k).backward(grad)
    assert torch.equal(values.grad, grad[mask])

    dense = torch.randn(m, k, device=device).to(dtype).requires_grad_(True)
    g = torch.randn(int(mask.sum()), device=device).to(dtype)
    ops.csr_gather(dense, crow, col).backward(g)
    expected = torch.zeros(m, k, device=device, dtype=dtype)
    expected[mask] = g
    assert torch.equal(dense.grad, expected)


@pytest.mark.parametrize("device", device_params())
def test_gradcheck_and_gradgradcheck(device):
    m, k = 6, 9
    mask = make_mask(m, k, 0.5, empty_rows=1).to(device)
    crow, col = pattern(mask)
    values = torch.randn(int(mask.sum()), dtype=torch.float64, device=device, requires_grad=True)
    dense = torch.randn(m, k, dtype=torch.float64, device=device, requires_grad=True)
    to_dense = lambda v: ops.csr_to_dense(v, crow, col, k)  # noqa: E731
    gather = lambda d: ops.csr_gather(d, crow, col)  # noqa: E731
    assert torch.autograd.gradcheck(to_dense, (values,))
    assert torch.autograd.gradgradcheck(to_dense, (values,))
    assert torch.autograd.gradcheck(gather, (dense,))
    assert torch.autograd.gradgradcheck(gather, (dense,))


def _op_cases(device):
    m, k = 7, 10
    mask = make_mask(m, k, 0.5, empty_rows=1).to(device)
    crow, col = pattern(mask)
    w = torch.randn(m, k, device=device)
    op = torch.ops.pyfinetune
    return [
        ("csr_to_dense", op.csr_to_dense, (w[mask].clone().requires_grad_(True), crow, col, k)),
        ("csr_to_dense-bf16", op.csr_to_dense, (w[mask].bfloat16(), crow, col, k)),
        ("csr_gather", op.csr_gather, (w.clone().requires_grad_(True), crow, col)),
        ("csr_gather-strided", op.csr_gather, (w.t().contiguous().t(), crow, col)),
    ]


@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in _op_cases("cpu")])
@pytest.mark.parametrize("device", device_params())
def test_opcheck(case, device):
    _, fn, args = _op_cases(device)[case]
    torch.library.opcheck(fn, args)


@pytest.mark.parametrize("device", device_params())
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    m, k = 12, 20
    mask = make_mask(m, k, 0.6).to(device)
    crow, col = pattern(mask)
    x = torch.randn(5, k, device=device)

    def fn(values, x):
        w = ops.csr_to_dense(values, crow, col, k)
        return (x @ w.t()).relu().sum() + ops.csr_gather(w * 2.0, crow, col).sum()

    v_eager = torch.randn(int(mask.sum()), device=device, requires_grad=True)
    v_comp = v_eager.detach().clone().requires_grad_(True)
    out_eager = fn(v_eager, x)
    out_comp = torch.compile(fn, fullgraph=True)(v_comp, x)
    torch.testing.assert_close(out_comp, out_eager)
    out_eager.backward()
    out_comp.backward()
    torch.testing.assert_close(v_comp.grad, v_eager.grad)


# ----------------------------------------------------------------------------------------- errors
def _good(device="cpu"):
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, True]], device=device)
    crow, col = pattern(mask)
    return torch.randn(4, device=device), crow, col


def _replaced(t: torch.Tensor, index: int, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _i32(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _overlapping_out(a):
    out = torch.empty(3, 3)
    return dict(out=out, values=out.view(-1)[:4])


# (op, the arguments changed from _good's, the message): every argument error, each naming the
# op and the argument. csr_to_dense(values, crow, col, cols), csr_gather(dense, crow, col),
# csr_to_dense_into(out, values, crow, col).
ERRORS = [
    ("csr_to_dense", lambda a: dict(values=a["values"].long()),
     r"csr_to_dense: values must be float32, bfloat16, float16 or float64, got Long"),
    ("csr_to_dense", lambda a: dict(values=a["values"].view(2, 2)),
     r"csr_to_dense: values must be a 1-D tensor \[nnz\]"),
    ("csr_to_dense", lambda a: dict(crow=a["crow"].long()), r"csr_to_dense: crow_indices must be int32, got Long"),
    ("csr_to_dense", lambda a: dict(col=a["col"][:3]),
     r"csr_to_dense: col_indices must be a 1-D tensor with nnz = 4 entries, got shape \[3\]"),
    ("csr_to_dense", lambda a: dict(cols=-1), r"csr_to_dense: cols must be >= 0"),
    ("csr_to_dense", lambda a: dict(col=_replaced(a["col"], -1, 3)),
     r"csr_to_dense: col_indices\[\d\] = 3 is out of range: entries must lie in \[0, 3\)"),
    ("csr_to_dense", lambda a: dict(crow=_replaced(a["crow"], -1, 3)),
     r"csr_to_dense: crow_indices\[-1\] must be nnz = 4"),
    ("csr_to_dense", lambda a: dict(crow=_i32(0, 3, 2, 4)), r"csr_to_dense: crow_indices must be non-decreasing"),
    ("csr_to_dense", lambda a: dict(col=_i32(2, 0, 1, 2)),  # unsorted
     r"csr_to_dense: col_indices must increase strictly within each row"),
    ("csr_to_dense", lambda a: dict(col=_i32(0, 0, 1, 2)),  # a repeated column
     r"csr_to_dense: col_indices must increase strictly within each row"),
    ("csr_to_dense", lambda a: dict(values=a["values"].to_sparse()),
     r"csr_to_dense: values must be a dense \(strided\) tensor"),
    ("csr_gather", lambda a: dict(dense=a["dense"].flatten()), r"csr_gather: dense must be a 2-D tensor \[M, K\]"),
    ("csr_gather", lambda a: dict(dense=torch.randn(4, 3)),
     r"csr_gather: dense must have M = crow_indices.numel\(\) - 1 = 3 rows, got shape \[4, 3\]"),
    ("csr_gather", lambda a: dict(dense=a["dense"].int()),
     r"csr_gather: dense must be float32, bfloat16, float16 or float64, got Int"),
    ("csr_gather", lambda a: dict(col=a["col"].long()), r"csr_gather: col_indices must be int32, got Long"),
    ("csr_gather", lambda a: dict(col=_replaced(a["col"], -1, 5)),
     r"csr_gather: col_indices\[\d\] = 5 is out of range: entries must lie in \[0, 3\)"),
    ("csr_gather", lambda a: dict(dense=torch.randn(3, 0)),
     r"csr_gather: a dense tensor of no columns has no kept entries, got nnz = 4"),
    ("csr_gather", lambda a: dict(col=a["col"].to("meta")),
     r"csr_gather: col_indices must be on the device of dense \(cpu\), got meta"),
    ("csr_to_dense_into", lambda a: dict(out=torch.empty(9)),
     r"csr_to_dense_into: out must be a 2-D tensor \[M, cols\]"),
    ("csr_to_dense_into", lambda a: dict(out=torch.empty(4, 3)),
     r"csr_to_dense_into: out must have M = crow_indices.numel\(\) - 1 = 3 rows"),
    ("csr_to_dense_into", lambda a: dict(out=a["out"].double()),
     r"csr_to_dense_into: out must have the dtype of values \(Float\), got Double"),
    ("csr_to_dense_into", lambda a: dict(out=torch.empty(3, 6)[:, ::2]), r"csr_to_dense_into: out must be contiguous"),
    ("csr_to_dense_into", _overlapping_out, r"csr_to_dense_into: out must not share memory with values"),
    ("csr_to_dense_into", lambda a: dict(out=torch.empty(3, 2)),
     r"csr_to_dense_into: col_indices\[\d\] = 2 is out of range: entries must lie in \[0, 2\)"),
]
_CALLS = {
    "csr_to_dense": lambda a: ops.csr_to_dense(a["values"], a["crow"], a["col"], a["cols"]),
    "csr_gather": lambda a: ops.csr_gather(a["dense"], a["crow"], a["col"]),
    "csr_to_dense_into": lambda a: torch.ops.pyfinetune.csr_to_dense_into(a["out"], a["values"], a["crow"], a["col"]),
}


@pytest.mark.parametrize("op,change,pattern_", ERRORS, ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(ERRORS)])
def test_argument_errors(op, change, pattern_):
    values, crow, col = _good()
    args = dict(values=values, crow=crow, col=col, cols=3, dense=torch.randn(3, 3), out=torch.empty(3, 3))
    args.update(change(args))
    with pytest.raises(RuntimeError, match=pattern_):
        _CALLS[op](args)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_refuses_more_entries_than_int32_indices_address(device):
    # The C++ checks (on the CPU kernels' path; CUDA's use the same) and the meta kernels: 2^31 kept
    # entries, as expanded (stride-0) tensors, so that no 8 GB index tensor is needed. On CUDA such
    # a pattern reached csr_gather's device assertion.
    n = 2**31

    def big(dtype, size):
        return torch.zeros(1, dtype=dtype, device=device).expand(size)

    crow = torch.zeros(2, dtype=torch.int32, device=device)
    dense = torch.zeros(1, 1, device=device).expand(1, n + 8)
    message = r"int32 indices address at most 2\^31 - 1 kept weights"
    with pytest.raises(RuntimeError, match=rf"csr_gather: col_indices has {n} entries; {message}"):
        torch.ops.pyfinetune.csr_gather(dense, crow, big(torch.int32, n))
    with pytest.raises(RuntimeError, match=rf"csr_to_dense: values has {n} entries; {message}"):
        torch.ops.pyfinetune.csr_to_dense(big(torch.float32, n), crow, big(torch.int32, n), n + 8)


@pytest.mark.cuda
def test_cuda_device_mismatch():
    values, crow, col = _good("cuda")
    with pytest.raises(RuntimeError, match=r"csr_to_dense: col_indices must be on the device of values"):
        ops.csr_to_dense(values, crow, col.cpu(), 3)
    with pytest.raises(RuntimeError, match=r"csr_gather: crow_indices must be on the device of dense"):
        ops.csr_gather(torch.randn(3, 3, device="cuda"), crow.cpu(), col)


@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.bfloat16]))
def test_to_dense_into_writes_every_element(device, dtype):
    m, k = 9, 14
    mask = make_mask(m, k, 0.6, empty_rows=2).to(device)
    crow, col = pattern(mask)
    w = torch.randn(m, k, device=device).to(dtype)
    out = torch.full((m, k), float("nan"), device=device, dtype=dtype)
    assert torch.ops.pyfinetune.csr_to_dense_into(out, w[mask], crow, col) is None
    assert torch.equal(out, torch.where(mask, w, torch.zeros((), dtype=dtype, device=device)))


@pytest.mark.parametrize("device", device_params())
def test_to_dense_into_autograd_rules(device):
    # As torch's in-place ops: an `out` that requires grad is refused in grad mode (untouched), and
    # the version of `out` moves with each write.
    mask = make_mask(5, 7, 0.5).to(device)
    crow, col = pattern(mask)
    values = torch.randn(int(mask.sum()), device=device)
    out = torch.zeros(5, 7, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="csr_to_dense_into: out requires grad: the op writes to it in place"):
        torch.ops.pyfinetune.csr_to_dense_into(out, values, crow, col)
    assert (out == 0).all()
    buf = torch.zeros(5, 7, device=device)
    v = buf._version
    torch.ops.pyfinetune.csr_to_dense_into(buf, values, crow, col)
    assert buf._version > v


@pytest.mark.parametrize("case", ["values-int", "cols-zero", "no-crow", "into-strided", "gather-no-crow"])
def test_fake_kernels_refuse_what_the_kernels_refuse(case):
    # A call the real kernel refuses must fail while tracing too (not only when the compiled
    # code runs): the same inputs through the CPU kernel and under FakeTensorMode.
    from torch._subclasses.fake_tensor import FakeTensorMode

    values, crow, col = _good()
    op = torch.ops.pyfinetune
    calls = {
        "values-int": lambda v, c, k: op.csr_to_dense(v.long(), c, k, 3),
        "cols-zero": lambda v, c, k: op.csr_to_dense(v, c, k, 0),
        "no-crow": lambda v, c, k: op.csr_to_dense(v[:0], c[:0], k[:0], 3),
        "into-strided": lambda v, c, k: op.csr_to_dense_into(torch.empty(3, 6)[:, ::2], v, c, k),
        "gather-no-crow": lambda v, c, k: op.csr_gather(torch.empty(0, 3), c[:0], k[:0]),
    }
    with pytest.raises(RuntimeError):
        calls[case](values, crow, col)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(RuntimeError):
        calls[case](*(mode.from_tensor(t) for t in (values, crow, col)))
