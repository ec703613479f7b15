"""pyfinetune.ops.tiled_pattern and the tiled_csr_linear op (SparseLinear's tensor-core forward on
CUDA), against a float64 dense reference.

* ``tiled_pattern``: against a brute-force regrouping of the mask's entries (every tile's entries,
  their places and their source positions), odd shapes crossing every tile edge.
* the ops on every device: forward against ``x @ W^T + b``, the input gradient
  (``tiled_csr_linear_backward_input``) against ``dy @ W`` and the values' gradient
  (``tiled_csr_linear_backward_values``) against ``(dy^T @ x)[mask]`` in float64 for fp32/fp64/bf16/fp16 (CPU)
  and fp16/bf16 (CUDA: tensor cores), strided inputs, empty shapes; their own autograd formulas
  (gradcheck and gradgradcheck in float64); ``ops.tiled_csr_linear``'s backward; opcheck; argument
  and tile-data errors.
* SparseLinear with ``PYFINETUNE_CSR_CUDA_KERNEL=tensor_cores`` (CUDA): forward and gradients, and
  the inference cache of the tile-ordered values following an optimizer step.

Tolerances: the inputs are drawn in the tested dtype and the reference uses exactly those values in
float64; the kernels accumulate in float32 (float64 for float64) and round once, so
|y - ref| <= eps * |ref| + eps * sqrt(K) with eps one ulp of the dtype for bf16 (2^-7) and fp16
(2^-10), twice the half-ulp rounding of the result (sqrt(K): float32 accumulation and results that
cancel to near zero), 1e-5 for float32 and 1e-12 for float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DEVICES
from pyfinetune import ops
from pyfinetune.prune import SparseLinear
from reference_masked_matmul import make_mask

HAS_CUDA = torch.cuda.is_available()
EPS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# (N, K, M): a single element; K and M inside one tile; M past one 128-row tile and K past several
# 64-column tiles with partial ones; N past one 64-row block of the CUDA kernel; K not a multiple of 8
# (the CUDA kernel's plain-load path for x).
SHAPES = [(1, 1, 1), (5, 64, 128), (7, 200, 300), (130, 129, 257), (65, 1024, 129), (3, 13, 1)]


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def brute_force_tiles(mask: torch.Tensor):
    """{tile index: [(loc, row-major position), ...]} from the mask, by a Python loop."""
    m, k = mask.shape
    kt = -(-k // ops.TILE_COLS)
    tiles = {}
    for pos, (r, c) in enumerate(mask.nonzero().tolist()):
        t = (r // ops.TILE_ROWS) * kt + c // ops.TILE_COLS
        tiles.setdefault(t, []).append(((r % ops.TILE_ROWS) * ops.TILE_COLS + c % ops.TILE_COLS, pos))
    return tiles


@pytest.mark.parametrize("shape", [(1, 1), (128, 64), (129, 65), (300, 200), (7, 1000)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_tiled_pattern_regroups_every_entry(shape, sparsity):
    m, k = shape
    mask = make_mask(m, k, sparsity, empty_rows=min(1, m - 1))
    p = ops.compressed_pattern(mask)
    t = ops.tiled_pattern(p.crow_indices, p.col_indices, k)
    n_tiles = -(-m // ops.TILE_ROWS) * -(-k // ops.TILE_COLS)
    assert t.tile_ptr.dtype == torch.int32 and t.tile_ptr.shape == (n_tiles + 1,)
    assert t.tile_loc.dtype == torch.int16 and t.tile_src.dtype == torch.int32
    assert t.tile_loc.shape == t.tile_src.shape == (int(mask.sum()),)
    want = brute_force_tiles(mask)
    ptr = t.tile_ptr.tolist()
    assert ptr[0] == 0 and ptr[-1] == int(mask.sum())
    for i in range(n_tiles):
        got = list(zip(t.tile_loc[ptr[i]:ptr[i + 1]].tolist(), t.tile_src[ptr[i]:ptr[i + 1]].tolist()))
        assert got == want.get(i, []), f"tile {i}"
    # every kept value appears once
    assert torch.equal(torch.sort(t.tile_src).values, torch.arange(int(mask.sum()), dtype=torch.int32))


def test_tiled_pattern_argument_errors():
    p = ops.compressed_pattern(make_mask(4, 5, 0.5))
    with pytest.raises(ValueError, match="num_cols must be an int >= 0"):
        ops.tiled_pattern(p.crow_indices, p.col_indices, -1)
    with pytest.raises(ValueError, match="crow_indices must be"):
        ops.tiled_pattern(p.crow_indices.view(1, -1), p.col_indices, 5)


def make_case(n, k, m, dtype, device, sparsity=0.9, bias=True, x_stride=1):
    mask = make_mask(m, k, sparsity, empty_rows=min(1, m - 1))
    w = torch.randn(m, k).to(dtype)
    x = torch.randn(n, k * x_stride).to(dtype)[:, ::x_stride] if x_stride > 1 else torch.randn(n, k).to(dtype)
    b = torch.randn(m).to(dtype) if bias else None
    wm = torch.where(mask, w.double(), 0.0)
    ref = x.double() @ wm.t() + (b.double() if bias else 0.0)
    p = ops.compressed_pattern(mask)
    t = ops.tiled_pattern(p.crow_indices, p.col_indices, k)
    vals = w[mask]
    to = dict(device=device)
    case = dict(x=x.to(**to), values=vals.to(**to), pattern=ops.CompressedPattern(*(q.to(**to) for q in p)),
                tiled=ops.TiledPattern(*(q.to(**to) for q in t)), bias=None if b is None else b.to(**to),
                mask=mask, w=w)
    return case, ref


def with_mask(c, keep, k):
    """Case c (make_case's, on CUDA) with its kept weights replaced by `keep` (a [M, K] bool mask):
    the values, patterns and tiles rebuilt; returns the float64 reference of the forward."""
    w = c["w"]
    p = ops.compressed_pattern(keep)
    t = ops.tiled_pattern(p.crow_indices, p.col_indices, k)
    c.update(values=w[keep].cuda(), mask=keep, pattern=ops.CompressedPattern(*(q.cuda() for q in p)),
             tiled=ops.TiledPattern(*(q.cuda() for q in t)))
    bias = 0.0 if c["bias"] is None else c["bias"].double().cpu()
    return c["x"].double().cpu() @ torch.where(keep, w.double(), 0.0).t() + bias


def assert_close(y, ref, dtype, k, what):
    assert y.dtype == dtype, what
    err = (y.double().cpu() - ref).abs()
    bound = EPS[dtype] * ref.abs() + EPS[dtype] * math.sqrt(max(k, 1))
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"{what}: max error {err.max().item():.3g} exceeds the bound by {worst:.3g}"


def run_op(c):
    tv = c["values"].index_select(0, c["tiled"].tile_src)
    return torch.ops.pyfinetune.tiled_csr_linear(c["x"], tv, c["tiled"].tile_ptr, c["tiled"].tile_loc,
                                                 c["pattern"].crow_indices.shape[0] - 1, c["bias"])


def op_params():
    out = [pytest.param("cpu", d, id=f"cpu-{dtype_id(d)}")
           for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)]
    if HAS_CUDA:
        out += [pytest.param("cuda", d, id=f"cuda-{dtype_id(d)}", marks=pytest.mark.cuda)
                for d in (torch.bfloat16, torch.float16)]
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("device,dtype", op_params())
def test_forward_matches_dense_reference(shape, sparsity, device, dtype):
    n, k, m = shape
    for bias in (True, False):
        c, ref = make_case(n, k, m, dtype, device, sparsity, bias=bias)
        assert_close(run_op(c), ref, dtype, k, f"{shape} sparsity {sparsity} bias {bias}")


@pytest.mark.parametrize("device,dtype", op_params())
def test_forward_strided_and_large_batch(device, dtype):
    # x with every other column (no unit column stride: the kernel makes it contiguous) and with a
    # row stride that is not K (a column slice); N over several 64-row blocks.
    for n, k, m, stride in ((300, 96, 200, 1), (70, 64, 130, 2)):
        c, ref = make_case(n, k, m, dtype, device, 0.9, x_stride=stride)
        assert_close(run_op(c), ref, dtype, k, f"stride {stride}")
    big = torch.randn(40, 2 * 96).to(dtype)
    c, _ = make_case(40, 96, 200, dtype, device, 0.8)
    c["x"] = big[:, :96].to(device)  # row stride 192: a view, not contiguous
    ref = big[:, :96].double() @ torch.where(c["mask"], c["w"].double(), 0.0).t() + c["bias"].double().cpu()
    assert_close(run_op(c), ref, dtype, 96, "row-sliced x")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_shapes(device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    for n, k, m in ((0, 5, 3), (4, 0, 3), (4, 5, 0)):
        c, ref = make_case(n, k, m, dtype, device, 0.5)
        y = run_op(c)
        assert y.shape == (n, m)
        assert_close(y, ref, dtype, k, f"{n}x{k}x{m}")
    # K = 0 with one row: the output is the bias's values in a tensor of its own, not the bias
    c, _ = make_case(1, 0, 3, dtype, device, 0.5)
    y = run_op(c)
    assert torch.equal(y[0], c["bias"]) and y.untyped_storage().data_ptr() != c["bias"].untyped_storage().data_ptr()
    y2 = ops.csr_linear(c["x"], c["values"], *c["pattern"], bias=c["bias"])
    assert y2.untyped_storage().data_ptr() != c["bias"].untyped_storage().data_ptr()


def test_gradcheck_of_the_op_formula():
    # M = 130 crosses a 128-row tile, K = 70 a 64-column one; small enough for gradgradcheck
    c, _ = make_case(3, 70, 130, torch.float64, "cpu", 0.95)
    tv = c["values"].index_select(0, c["tiled"].tile_src).requires_grad_()
    x = c["x"].clone().requires_grad_()
    b = c["bias"].clone().requires_grad_()

    def f(x, tv, b):
        return torch.ops.pyfinetune.tiled_csr_linear(x, tv, c["tiled"].tile_ptr, c["tiled"].tile_loc, 130, b)

    assert torch.autograd.gradcheck(f, (x, tv, b))
    assert torch.autograd.gradgradcheck(f, (x, tv, b))


@pytest.mark.parametrize("device,dtype", op_params())
def test_tiled_csr_linear_gradients_are_csr_linears(device, dtype):
    c, _ = make_case(33, 130, 150, dtype, device, 0.9)
    x = torch.randn(3, 11, 130).to(dtype).to(device)
    g = torch.randn(3, 11, 150).to(dtype).to(device)
    outs = []
    for tiled in (True, False):
        xs = x.clone().requires_grad_()
        v = c["values"].clone().requires_grad_()
        b = c["bias"].clone().requires_grad_()
        y = ops.tiled_csr_linear(xs, v, c["pattern"], c["tiled"], b) if tiled else ops.csr_linear(
            xs, v, *c["pattern"], bias=b)
        y.backward(g)
        outs.append((y.detach(), xs.grad, v.grad, b.grad))
    assert outs[0][0].shape == (3, 11, 150)
    # on the CPU the backward is csr_linear's: identical gradients; on CUDA the input and values
    # gradients come from the tiles (tensor cores, their own sums), the bias's is the same sum
    wm = torch.where(c["mask"], c["w"].double(), 0.0)
    assert torch.equal(outs[0][3], outs[1][3])
    if device == "cpu":
        assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])
    else:
        g64, x64 = g.double().cpu().reshape(33, 150), x.double().cpu().reshape(33, 130)
        assert_close(outs[0][1].reshape(33, 130), g64 @ wm, dtype, 150, "dx")
        assert_close(outs[0][2], (g64.t() @ x64)[c["mask"]], dtype, 33, "dvalues")
    ref = x.double().cpu() @ wm.t() + c["bias"].double().cpu()
    assert_close(outs[0][0].reshape(33, 150), ref.reshape(33, 150), dtype, 130, "batched forward")


def run_dx(c, dy):
    tv = c["values"].index_select(0, c["tiled"].tile_src)
    return torch.ops.pyfinetune.tiled_csr_linear_backward_input(dy, tv, c["tiled"].tile_ptr, c["tiled"].tile_loc,
                                                                c["w"].shape[1])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("device,dtype", op_params())
def test_backward_input_matches_dense_reference(shape, sparsity, device, dtype):
    """grad_out @ W from the tiles: M (the reduction) past one 128-row tile, not a multiple of 8
    (the CUDA kernel's plain loads), K past several 64-column tiles; a strided grad_out too."""
    n, k, m = shape
    c, _ = make_case(n, k, m, dtype, device, sparsity, bias=False)
    dy = torch.randn(n, m).to(dtype)
    wm = torch.where(c["mask"], c["w"].double(), 0.0)
    assert_close(run_dx(c, dy.to(device)), dy.double() @ wm, dtype, m, f"{shape} sparsity {sparsity}")
    wide = torch.randn(n, m + 8).to(dtype)
    assert_close(run_dx(c, wide.to(device)[:, 8:]), wide[:, 8:].double() @ wm, dtype, m, "row-sliced grad_out")


def test_backward_input_gradcheck_and_opcheck():
    c, _ = make_case(3, 70, 130, torch.float64, "cpu", 0.95)
    tv = c["values"].index_select(0, c["tiled"].tile_src).requires_grad_()
    dy = torch.randn(3, 130, dtype=torch.float64, requires_grad=True)

    def f(dy, tv):
        t = c["tiled"]
        return torch.ops.pyfinetune.tiled_csr_linear_backward_input(dy, tv, t.tile_ptr, t.tile_loc, 70)

    assert torch.autograd.gradcheck(f, (dy, tv))
    assert torch.autograd.gradgradcheck(f, (dy, tv))
    torch.library.opcheck(torch.ops.pyfinetune.tiled_csr_linear_backward_input.default,
                          (dy, tv, c["tiled"].tile_ptr, c["tiled"].tile_loc, 70))
    torch.library.opcheck(torch.ops.pyfinetune.tiled_csr_linear_backward_input.default,
                          (dy.detach().float(), tv.detach().float(), c["tiled"].tile_ptr, c["tiled"].tile_loc, 70))
    assert tv.numel() > 100  # the tiles are not empty


DX_ERRORS = [
    ("grad_out 1-D", dict(dy=lambda d: d[0]), "grad_out must be a 2-D tensor"),
    ("grad_out dtype", dict(dy=lambda d: d.double()), "tile_values must have the dtype of grad_out"),
    ("in_features", dict(k=lambda k: -1), r"in_features must be in \[0, 2\^31 - 1\]"),
    ("in_features tiles", dict(k=lambda k: k + 64), r"tile_ptr must be a 1-D tensor with ceil"),
    ("loc range", dict(loc=lambda l: l.clone().fill_(9000)),
     r"tiled_csr_linear_backward_input: tile_loc\[0\] = 9000 is out of range"),
]


@pytest.mark.parametrize("what,change,message", DX_ERRORS, ids=[e[0] for e in DX_ERRORS])
def test_backward_input_errors(what, change, message):
    c, _ = make_case(3, 70, 130, torch.float32, "cpu", 0.5)
    tv = c["values"].index_select(0, c["tiled"].tile_src)
    dy, k, loc = torch.randn(3, 130), 70, c["tiled"].tile_loc
    dy = change.get("dy", lambda d: d)(dy)
    k = change.get("k", lambda k: k)(k)
    loc = change.get("loc", lambda l: l)(loc)
    with pytest.raises((RuntimeError, ValueError), match=message):
        torch.ops.pyfinetune.tiled_csr_linear_backward_input(dy, tv, c["tiled"].tile_ptr, loc, k)


@pytest.mark.parametrize("device,dtype", op_params())
def test_opcheck(device, dtype):
    c, _ = make_case(9, 70, 130, dtype, device, 0.8)
    tv = c["values"].index_select(0, c["tiled"].tile_src)
    args = (c["x"], tv, c["tiled"].tile_ptr, c["tiled"].tile_loc, 130, c["bias"])
    torch.library.opcheck(torch.ops.pyfinetune.tiled_csr_linear.default, args)
    if dtype in (torch.float32, torch.float64):
        args = (c["x"].requires_grad_(), tv.requires_grad_(), c["tiled"].tile_ptr, c["tiled"].tile_loc, 130,
                c["bias"].requires_grad_())
        torch.library.opcheck(torch.ops.pyfinetune.tiled_csr_linear.default, args)


def _error_case():
    c, _ = make_case(3, 70, 130, torch.float32, "cpu", 0.5)
    tv = c["values"].index_select(0, c["tiled"].tile_src)
    return c, dict(x=c["x"], tile_values=tv, tile_ptr=c["tiled"].tile_ptr, tile_loc=c["tiled"].tile_loc,
                   out_features=130, bias=c["bias"])


def _call(a):
    return torch.ops.pyfinetune.tiled_csr_linear(a["x"], a["tile_values"], a["tile_ptr"], a["tile_loc"],
                                                 a["out_features"], a["bias"])


ERRORS = [
    ("x 1-D", lambda a: a.update(x=a["x"][0]), "x must be a 2-D tensor"),
    ("int x", lambda a: a.update(x=a["x"].int()), "x must be float32"),
    ("values dtype", lambda a: a.update(tile_values=a["tile_values"].double()), "tile_values must have the dtype of x"),
    ("values 2-D", lambda a: a.update(tile_values=a["tile_values"].view(1, -1)), "tile_values must be a 1-D"),
    ("ptr length", lambda a: a.update(tile_ptr=a["tile_ptr"][:-1]), r"tile_ptr must be a 1-D tensor with ceil"),
    ("ptr dtype", lambda a: a.update(tile_ptr=a["tile_ptr"].long()), "tile_ptr must be int32"),
    ("loc dtype", lambda a: a.update(tile_loc=a["tile_loc"].int()), "tile_loc must be int16"),
    ("loc length", lambda a: a.update(tile_loc=a["tile_loc"][1:]), "tile_loc must be a 1-D tensor with nnz"),
    ("out_features", lambda a: a.update(out_features=-1), r"out_features must be in \[0, 2\^31 - 1\]"),
    ("bias size", lambda a: a.update(bias=a["bias"][1:]), "bias must be None or a 1-D tensor"),
    ("ptr start", lambda a: a["tile_ptr"].__setitem__(0, 1), r"tile_ptr\[0\] must be 0"),
    ("ptr end", lambda a: a["tile_ptr"].__setitem__(-1, 3), r"tile_ptr\[-1\] must be nnz"),
    ("ptr order", lambda a: a["tile_ptr"].__setitem__(1, a["tile_ptr"][2] + 1), "tile_ptr must be non-decreasing"),
    ("loc range", lambda a: a["tile_loc"].__setitem__(0, 8192), r"tile_loc\[0\] = 8192 is out of range"),
    ("loc negative", lambda a: a["tile_loc"].__setitem__(0, -2), r"tile_loc\[0\] = -2 is out of range"),
    ("loc past K", lambda a: a["tile_loc"].__setitem__(a["tile_ptr"][1].item(), 63),
     r"outside the weight \[out_features, K\] = \[130, 70\]"),
    ("loc repeated", lambda a: a["tile_loc"].__setitem__(1, a["tile_loc"][0]), "repeats the position"),
]


@pytest.mark.parametrize("what,change,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_argument_and_tile_errors(what, change, message):
    _, a = _error_case()
    a = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    change(a)
    with pytest.raises((RuntimeError, ValueError), match=message):
        _call(a)


# ---------------------------------------------------------------------------------------- CUDA
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_cuda_dense_tiles_take_the_overflow_path(dtype):
    """More than 1024 entries in a 128 x 64 tile (below 75% sparsity: 8192 places, 1024 staged in
    registers) are read at the scatter: 0% and 50% sparsity over several tiles, partial ones too."""
    for s in (0.0, 0.5):
        c, ref = make_case(100, 200, 260, dtype, "cuda", s)
        assert_close(run_op(c), ref, dtype, 200, f"sparsity {s}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_cuda_refuses_float32_and_float64(dtype):
    c, _ = make_case(3, 70, 130, dtype, "cuda", 0.5)
    with pytest.raises(RuntimeError, match="x must be float16 or bfloat16"):
        run_op(c)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_sparse_linear_tensor_core_forward(dtype, monkeypatch):
    """SparseLinear(kernel="sparse") on CUDA with PYFINETUNE_CSR_CUDA_KERNEL=tensor_cores: forward
    and gradients against the warp kernel's; the inference cache of the tile-ordered values follows
    an optimizer step and a pattern change."""
    mask = make_mask(300, 200, 0.9)
    w = torch.randn(300, 200).to(dtype)
    b = torch.randn(300).to(dtype)
    x = torch.randn(2, 70, 200).to(dtype).cuda()
    g = torch.randn(2, 70, 300).to(dtype).cuda()
    layers = {}
    for kernel in ("warp", "tensor_cores"):
        monkeypatch.setenv("PYFINETUNE_CSR_CUDA_KERNEL", kernel)
        layer = SparseLinear.from_dense(w.cuda(), mask.cuda(), b.cuda(), kernel="sparse")
        xs = x.clone().requires_grad_()
        y = layer(xs)
        y.backward(g)
        layers[kernel] = (layer, y.detach(), xs.grad, layer.values.grad, layer.bias.grad)
    ref = x.double().cpu() @ torch.where(mask, w.double(), 0.0).t() + b.double()
    assert_close(layers["tensor_cores"][1].reshape(140, 300), ref.reshape(140, 300), dtype, 200, "forward")
    # bias: the same sum as the warp path; x and values: the tensor-core gradients
    assert torch.equal(layers["tensor_cores"][4], layers["warp"][4])
    g64, x64 = g.double().cpu().reshape(140, 300), x.double().cpu().reshape(140, 200)
    assert_close(layers["tensor_cores"][2].reshape(140, 200), g64 @ torch.where(mask, w.double(), 0.0), dtype, 300,
                 "dx")
    assert_close(layers["tensor_cores"][3], (g64.t() @ x64)[mask], dtype, 140, "dvalues")
    layer = layers["tensor_cores"][0]
    with torch.no_grad():
        y0 = layer(x)
        assert torch.equal(layer(x), y0)  # cached tile values
        layer.values.mul_(2)  # an optimizer step: the values' version moves
        y1 = layer(x)
    assert_close(y1.reshape(140, 300), (2 * (ref - b.double()) + b.double()).reshape(140, 300), dtype, 200,
                 "after the values changed")


def test_sparse_linear_tiled_path_on_cpu(monkeypatch):
    """SparseLinear's tiled forward (on CUDA behind PYFINETUNE_CSR_CUDA_KERNEL=tensor_cores) forced
    on the CPU: forward and gradients as csr_linear's; the cached tile layout follows a pattern
    change (load_state_dict of another nnz) and the cached tile values follow in-place changes of
    the values (an optimizer step) and a reassignment of their data."""
    import pyfinetune._sparse_linear as sl

    calls = []
    monkeypatch.setattr(sl, "_use_tensor_cores", lambda x, v: calls.append(1) or True)
    mask = make_mask(150, 90, 0.8)
    w, b = torch.randn(150, 90, dtype=torch.float64), torch.randn(150, dtype=torch.float64)
    layer = SparseLinear.from_dense(w, mask, b, kernel="sparse")
    ref_layer = SparseLinear.from_dense(w, mask, b, kernel="sparse")
    x = torch.randn(4, 90, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert calls, "the tiled path did not run"
    y.sum().backward()
    xr = x.detach().clone().requires_grad_()
    monkeypatch.setattr(sl, "_use_tensor_cores", lambda x, v: False)
    yr = ref_layer(xr)
    yr.sum().backward()
    monkeypatch.setattr(sl, "_use_tensor_cores", lambda x, v: True)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    assert torch.equal(x.grad, xr.grad) and torch.equal(layer.values.grad, ref_layer.values.grad)
    assert torch.equal(layer.bias.grad, ref_layer.bias.grad)

    def dense_ref(layer_):
        return x.detach() @ layer_.to_dense().detach().t() + layer_.bias.detach()

    with torch.no_grad():
        y0 = layer(x)
        torch.testing.assert_close(y0, dense_ref(layer))
        layer.values.mul_(3)  # in place: the version moves
        torch.testing.assert_close(layer(x), dense_ref(layer))
        layer.values.data = layer.values.data * 0.5  # new storage, version of a fresh tensor
        torch.testing.assert_close(layer(x), dense_ref(layer))
    other = SparseLinear.from_dense(w, make_mask(150, 90, 0.5), b, kernel="sparse")
    layer.load_state_dict(other.state_dict())
    assert layer.nnz == other.nnz
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_ref(other))


def test_tiled_dx_falls_back_where_its_shared_memory_does_not_fit(monkeypatch):
    """tiled_csr_linear_backward_input's CUDA kernel takes 107520 bytes of shared memory per block:
    an A100 (163 KB) or H100 (227 KB) runs it, a GPU of compute capability 8.6 / 8.9 (99 KB) takes
    csr_linear's input gradient instead (decided once per device from its properties)."""
    from types import SimpleNamespace

    optin = {0: 232448, 1: 101376, 2: 167936}
    calls = []

    def props(index):
        calls.append(index)
        return SimpleNamespace(shared_memory_per_block_optin=optin[index])

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(ops, "_TILED_DX_FITS", {})
    assert ops._tiled_dx_fits(torch.device("cuda", 0)) is True
    assert ops._tiled_dx_fits(torch.device("cuda", 1)) is False
    assert ops._tiled_dx_fits(torch.device("cuda", 2)) is True
    assert ops._tiled_dx_fits(torch.device("cuda", 1)) is False
    assert calls == [0, 1, 2]
    assert ops.TILED_DX_SMEM_BYTES == 3 * (64 * (128 + 8) + 128 * (64 + 8)) * 2  # the kernel's three stages


def run_dv(c, dy, x=None):
    x = c["x"] if x is None else x
    return torch.ops.pyfinetune.tiled_csr_linear_backward_values(dy, x, c["tiled"].tile_ptr, c["tiled"].tile_loc,
                                                                 c["tiled"].tile_src)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("device,dtype", op_params())
def test_backward_values_matches_dense_reference(shape, sparsity, device, dtype):
    """(grad_out^T @ x) at the kept positions, in compressed-row order (the order of values): N (the
    reduction) past one 64-row step, M past one 128-row tile, K past 64-column tiles, sizes that are
    not multiples of 8 (the CUDA kernel's plain loads); strided operands."""
    n, k, m = shape
    c, _ = make_case(n, k, m, dtype, device, sparsity, bias=False)
    dy = torch.randn(n, m).to(dtype)
    ref = (dy.double().t() @ c["x"].double().cpu())[c["mask"]]
    dv = run_dv(c, dy.to(device))
    assert dv.shape == (int(c["mask"].sum()),)
    assert_close(dv, ref, dtype, n, f"{shape} sparsity {sparsity}")
    wide = torch.randn(n, m + 8).to(dtype)
    ref = (wide[:, 8:].double().t() @ c["x"].double().cpu())[c["mask"]]
    assert_close(run_dv(c, wide.to(device)[:, 8:]), ref, dtype, n, "row-sliced grad_out")


def test_backward_values_gradcheck_and_opcheck():
    c, _ = make_case(3, 70, 130, torch.float64, "cpu", 0.95)
    x = c["x"].clone().requires_grad_()
    dy = torch.randn(3, 130, dtype=torch.float64, requires_grad=True)

    def f(dy, x):
        return torch.ops.pyfinetune.tiled_csr_linear_backward_values(dy, x, c["tiled"].tile_ptr, c["tiled"].tile_loc,
                                                                     c["tiled"].tile_src)

    assert torch.autograd.gradcheck(f, (dy, x))
    assert torch.autograd.gradgradcheck(f, (dy, x))
    args = (dy, x, c["tiled"].tile_ptr, c["tiled"].tile_loc, c["tiled"].tile_src)
    torch.library.opcheck(torch.ops.pyfinetune.tiled_csr_linear_backward_values.default, args)


DV_ERRORS = [
    ("x 1-D", dict(x=lambda t: t[0]), "x must be a 2-D tensor"),
    ("grad_out rows", dict(dy=lambda t: t[1:]), r"grad_out must be \[N, M\]"),
    ("grad_out dtype", dict(dy=lambda t: t.double()), "grad_out must have the dtype of x"),
    ("src dtype", dict(src=lambda t: t.long()), "tile_src must be int32"),
    ("src length", dict(src=lambda t: t[1:]), "tile_src must be a 1-D tensor with nnz"),
    ("src range", dict(src=lambda t: t.clone().fill_(-1)), r"tile_src\[0\] = -1 is out of range"),
    ("src repeated", dict(src=lambda t: torch.zeros_like(t)), "tile_src must be a permutation"),
    ("loc dtype", dict(loc=lambda t: t.int()), "tile_loc must be a 1-D int16 tensor"),
    ("ptr length", dict(ptr=lambda t: t[:-1]), r"tile_ptr must be a 1-D tensor with ceil"),
    ("loc range", dict(loc=lambda t: t.clone().fill_(9000)),
     r"tiled_csr_linear_backward_values: tile_loc\[0\] = 9000 is out of range"),
]


@pytest.mark.parametrize("what,change,message", DV_ERRORS, ids=[e[0] for e in DV_ERRORS])
def test_backward_values_errors(what, change, message):
    c, _ = make_case(3, 70, 130, torch.float32, "cpu", 0.5)
    t = c["tiled"]
    args = dict(dy=torch.randn(3, 130), x=c["x"], ptr=t.tile_ptr, loc=t.tile_loc, src=t.tile_src)
    args = {k: change.get(k, lambda v: v)(v) for k, v in args.items()}
    with pytest.raises((RuntimeError, ValueError), match=message):
        torch.ops.pyfinetune.tiled_csr_linear_backward_values(args["dy"], args["x"], args["ptr"], args["loc"],
                                                              args["src"])


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backward_values_refuses_more_entries_than_int32_offsets_address(device):
    # The C++ check and the meta kernel, with expanded (stride-0) index tensors of 2^31 entries: on
    # CUDA the entries past 2^31 - 1 were left unwritten (garbage gradients) by the int32 offsets.
    n = 2**31
    dy, x = torch.zeros(1, 8, device=device), torch.zeros(1, 8, device=device)
    ptr = torch.zeros(2, dtype=torch.int32, device=device)
    loc = torch.zeros(1, dtype=torch.int16, device=device).expand(n)
    src = torch.zeros(1, dtype=torch.int32, device=device).expand(n)
    with pytest.raises(RuntimeError, match=rf"tiled_csr_linear_backward_values: tile_loc has {n} entries; "
                                           r"int32 tile offsets address at most 2\^31 - 1 kept weights"):
        torch.ops.pyfinetune.tiled_csr_linear_backward_values(dy, x, ptr, loc, src)


def test_tiled_path_cache_follows_inference_mode_fused_optimizers_and_moves(monkeypatch):
    """The tiled path's cache of the tile layout (forced on the CPU): a first call under
    torch.inference_mode() does not stop later training; values written by a torch fused
    optimizer (which does not move the version counter) or through .data are seen at the next
    call; .to() drops the cache; it is neither in state_dict nor pickled."""
    import copy
    import pickle

    import pyfinetune._sparse_linear as sl

    monkeypatch.setattr(sl, "_use_tensor_cores", lambda x, v: True)
    mask, w = make_mask(140, 80, 0.8), torch.randn(140, 80)
    layer = SparseLinear.from_dense(w, mask, torch.randn(140), kernel="sparse")
    x = torch.randn(6, 80)

    def dense_ref():
        return x @ layer.to_dense().detach().t() + layer.bias.detach()

    with torch.inference_mode():
        torch.testing.assert_close(layer(x), dense_ref())
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    layer(x.clone().requires_grad_()).square().sum().backward()  # trains after the inference pass
    with torch.no_grad():
        before = layer(x)
    opt.step()
    with torch.no_grad():
        after = layer(x)
        assert not torch.equal(before, after)
        torch.testing.assert_close(after, dense_ref())
        layer.values.data.mul_(2)
        torch.testing.assert_close(layer(x), dense_ref())
    assert "_tiled_cache" in layer.__dict__
    assert not any("tiled" in k for k in layer.state_dict())
    assert "_tiled_cache" not in pickle.loads(pickle.dumps(layer)).__dict__
    assert "_tiled_cache" not in copy.deepcopy(layer).__dict__
    layer.double()
    assert "_tiled_cache" not in layer.__dict__
    with torch.no_grad():
        torch.testing.assert_close(layer(x.double()), x.double() @ layer.to_dense().t() + layer.bias)


def test_tiled_pattern_on_meta_tensors_and_numpy_sizes():
    import numpy as np

    p = ops.compressed_pattern(make_mask(130, 70, 0.5))
    t = ops.tiled_pattern(p.crow_indices.to("meta"), p.col_indices.to("meta"), np.int64(70))
    assert t.tile_ptr.device.type == "meta" and t.tile_ptr.shape == (2 * 2 + 1,)
    assert t.tile_loc.dtype == torch.int16 and t.tile_src.shape == p.col_indices.shape


@pytest.mark.parametrize("case", ["bias shape", "int x", "int grad_out", "int x (values)"])
def test_fake_kernels_refuse_what_the_kernels_refuse(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    c, _ = make_case(3, 70, 130, torch.float32, "cpu", 0.5)
    t = c["tiled"]
    tv = c["values"].index_select(0, t.tile_src)
    calls = {
        "bias shape": lambda: torch.ops.pyfinetune.tiled_csr_linear(c["x"], tv, t.tile_ptr, t.tile_loc, 130,
                                                                    c["bias"][1:]),
        "int x": lambda: torch.ops.pyfinetune.tiled_csr_linear(c["x"].int(), tv.int(), t.tile_ptr, t.tile_loc, 130,
                                                               None),
        "int grad_out": lambda: torch.ops.pyfinetune.tiled_csr_linear_backward_input(
            torch.ones(3, 130, dtype=torch.int32), tv.int(), t.tile_ptr, t.tile_loc, 70),
        "int x (values)": lambda: torch.ops.pyfinetune.tiled_csr_linear_backward_values(
            torch.ones(3, 130, dtype=torch.int32), c["x"].int(), t.tile_ptr, t.tile_loc, t.tile_src),
    }
    with pytest.raises(RuntimeError):
        calls[case]()  # the real kernel
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises((RuntimeError, ValueError)):
        calls[case]()  # the fake kernel


@pytest.mark.parametrize("fn", ["csr_linear", "tiled_csr_linear"])
def test_double_backward_through_the_sparse_functions(fn):
    """Under create_graph the backward of ops.csr_linear / ops.tiled_csr_linear is composed of
    differentiable ops (csr_to_dense, csr_gather): gradgradcheck in float64, with a bias."""
    c, _ = make_case(3, 70, 130, torch.float64, "cpu", 0.95)
    x = c["x"].clone().requires_grad_()
    v = c["values"].clone().requires_grad_()
    b = c["bias"].clone().requires_grad_()

    def f(x, v, b):
        if fn == "csr_linear":
            return ops.csr_linear(x, v, *c["pattern"], bias=b)
        return ops.tiled_csr_linear(x, v, c["pattern"], c["tiled"], b)

    assert torch.autograd.gradcheck(f, (x, v, b))
    assert torch.autograd.gradgradcheck(f, (x, v, b))


def test_raw_csr_linear_op_is_twice_differentiable():
    # The op's own registered autograd (torch.ops.pyfinetune.csr_linear called directly) ran the
    # kernel backward under create_graph too: its results carried no graph, second derivatives were
    # silently 0 (only a UserWarning). Now composed of differentiable ops there.
    c, _ = make_case(3, 70, 130, torch.float64, "cpu", 0.9)
    p = c["pattern"]
    x = c["x"].clone().requires_grad_()
    v = c["values"].clone().requires_grad_()
    b = c["bias"].clone().requires_grad_()

    def f(x, v, b):
        return torch.ops.pyfinetune.csr_linear(x, v, p.crow_indices, p.col_indices, p.row_order, b)

    assert torch.autograd.gradgradcheck(f, (x, v, b))


def test_tiled_csr_linear_under_forward_mode_and_transforms():
    # The op's registered autograd does not run under torch.func / forward-mode AD: the tangent was
    # 0 (jvp) or None (forward AD) and vmap raised. Now csr_linear's composition, as csr_linear does.
    from torch.func import jacrev, jvp, vmap
    c, _ = make_case(4, 70, 130, torch.float64, "cpu", 0.9)
    pat, tiled = c["pattern"], c["tiled"]
    x, v, b = c["x"], c["values"], c["bias"]
    t = torch.randn_like(x)

    def tiled_f(x):
        return ops.tiled_csr_linear(x, v, pat, tiled, b)

    def ref_f(x):
        return ops.csr_linear(x, v, *pat, bias=b)

    y, tan = jvp(tiled_f, (x,), (t,))
    y_ref, tan_ref = jvp(ref_f, (x,), (t,))
    assert torch.allclose(tan, tan_ref) and tan.abs().sum() > 0
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        out = tiled_f(fwAD.make_dual(x, t))
        assert torch.allclose(fwAD.unpack_dual(out).tangent, tan_ref)
    assert torch.allclose(vmap(tiled_f)(x.unsqueeze(1)).squeeze(1), y_ref)
    assert torch.allclose(jacrev(tiled_f)(x[0]), jacrev(ref_f)(x[0]))


def test_tiled_csr_linear_checks_x_and_values_against_the_pattern():
    c, _ = make_case(3, 70, 130, torch.float32, "cpu", 0.9)
    pat, tiled, v = c["pattern"], c["tiled"], c["values"]
    for x in (torch.randn(3, 71), torch.randn(3, 69), torch.randn(2, 3, 64)):
        with pytest.raises(ValueError, match=r"tiled_csr_linear: x must have K = 70 columns"):
            ops.tiled_csr_linear(x, v, pat, tiled)
    with pytest.raises(ValueError, match=r"tiled_csr_linear: values must be \[nnz\] = \[\d+\]"):
        ops.tiled_csr_linear(c["x"], v[:-1], pat, tiled)
    other = ops.tiled_pattern(*ops.compressed_pattern(make_mask(130, 70, 0.5))[:2], 70)
    with pytest.raises(ValueError, match=r"tiled must be tiled_pattern of the same pattern"):
        ops.tiled_csr_linear(c["x"], v, pat, other)
