"""The CUDA tensor-core sparse products with PYFINETUNE_TILED_CUDA_ASYNC=1 (experimental): the tile
bounds read a step ahead and each tile's entries copied into shared memory (cp.async) two steps
before their scatter, instead of register loads one step before (csrc/cuda/tiled_csr_cuda.cu,
tile_pipeline_async).

Checked against the float64 reference (tolerances of test_tiled_csr: eps |ref| + eps sqrt(length),
eps one ulp of the dtype) on every path the change touches: pipelines of 1, 2, 3, 4 and many steps
(the prologue copies three tiles' entries), empty tiles among full ones, tiles denser than the
kEntryCap (1032) entries a stage holds (the rest read from global memory at the scatter), tiles
whose entries start at every offset within a 16-byte chunk, the last tile's chunk cut at the end of
the arrays, and values or tile_loc not 16-byte aligned (the host falls back to the register
pipeline). Both pipelines build the same tiles and multiply them in the same order, so the results
are also compared bit for bit with the default pipeline, the forward's split over K pinned to none
(PYFINETUNE_TILED_CUDA_SPLIT_K=1: auto's parts depend on the blocks an SM holds, which differ). Bad values of the variable are refused
before anything is written. GPU only (the variable means nothing on the CPU).
"""

import re

import pytest
import torch

from pyfinetune import ops
from test_tiled_csr import SHAPES, assert_close, dtype_id, make_case, run_dx, run_op

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ENV = "PYFINETUNE_TILED_CUDA_ASYNC"
DTYPES = [torch.bfloat16, torch.float16]


ASYNC_KERNEL = re.compile(r"tiled_csr_(linear|dx)_kernel<[^<>]*, (true|false), true>")


def async_kernels_run(fn):
    """The names of the asynchronous-pipeline kernels (template argument kAsync = true) that fn()
    launched, from the profiler: an equality with the default pipeline proves nothing if the host
    fell back to it. None where the profiler saw none of our kernels at all (no CUPTI, or under
    compute-sanitizer, which gpu_check.sh runs these tests under too): nothing to check then."""
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = {e.name for e in prof.events()}
    except (RuntimeError, AssertionError):  # a profiler that cannot trace CUDA here
        return None
    if not any("tiled_csr_" in n for n in names):
        return None
    return {n for n in names if ASYNC_KERNEL.search(n)}


def both_pipelines(monkeypatch, fn, expect_async=("linear",)):
    """fn() under the default pipeline, then with the variable set: (default, async). Asserts, where
    the profiler sees kernels, that the second run launched the asynchronous kernels of
    `expect_async` ("linear": the forward, "dx": the input gradient) and the first none. The
    forward's split over K pinned to none: "auto" (the default) sizes the parts by the blocks an SM
    holds, which differ between the two pipelines, so their sums could run in another order."""
    monkeypatch.setenv("PYFINETUNE_TILED_CUDA_SPLIT_K", "1")
    monkeypatch.delenv(ENV, raising=False)
    assert not async_kernels_run(fn)
    base = fn()
    monkeypatch.setenv(ENV, "1")
    names = async_kernels_run(fn)
    for kind in expect_async if names is not None else ():
        assert any(f"tiled_csr_{kind}_kernel" in n for n in names), (kind, names)
    fast = fn()
    torch.cuda.synchronize()
    return base, fast


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES + [(3, 130, 40), (70, 200, 260), (9, 100, 600), (66, 1000, 300)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_forward_and_input_gradient_matches_dense_reference(monkeypatch, dtype, shape, sparsity):
    # The forward takes a step per 64 columns of K, the input gradient one per 128 rows of M: K of
    # 1-64 / 100 / 129-130 / 200 / 1000-1024: 1 / 2 / 3 / 4 / 16 steps; M of 1-128 / 129-257 / 260-300 /
    # 600: 1 / 2-3 / 3 / 5 steps (the prologue copies three tiles' entries, the loop the rest).
    n, k, m = shape
    c, ref = make_case(n, k, m, dtype, "cuda", sparsity)
    dy = torch.randn(n, m).to(dtype)
    wm = torch.where(c["mask"], c["w"].double(), 0.0)
    base, fast = both_pipelines(monkeypatch, lambda: (run_op(c), run_dx(c, dy.cuda())), ("linear", "dx"))
    assert_close(fast[0], ref, dtype, k, f"forward {shape} sparsity {sparsity}")
    assert_close(fast[1], dy.double() @ wm, dtype, m, f"dx {shape} sparsity {sparsity}")
    assert torch.equal(base[0], fast[0]) and torch.equal(base[1], fast[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_empty_tiles_between_full_ones(monkeypatch, dtype):
    # Whole 64-column bands and 128-row bands pruned: empty tiles at the start, middle and end of
    # every pipeline (skipped multiplies; their bounds still rotate through the registers).
    n, k, m = 40, 64 * 7, 128 * 3
    c, _ = make_case(n, k, m, dtype, "cuda", 0.6)
    keep = c["mask"].clone()
    keep[:, 0:64] = False
    keep[:, 192:320] = False
    keep[:, 384:] = False
    keep[128:256] = False
    c2, _ = make_case(n, k, m, dtype, "cuda", 0.0)
    w = c2["w"]
    p = ops.compressed_pattern(keep)
    t = ops.tiled_pattern(p.crow_indices, p.col_indices, k)
    c2.update(values=w[keep].cuda(), mask=keep, pattern=ops.CompressedPattern(*(q.cuda() for q in p)),
              tiled=ops.TiledPattern(*(q.cuda() for q in t)))
    dy = torch.randn(n, m).to(dtype)
    wm = torch.where(keep, w.double(), 0.0)
    base, fast = both_pipelines(monkeypatch, lambda: (run_op(c2), run_dx(c2, dy.cuda())), ("linear", "dx"))
    ref = c2["x"].double().cpu() @ wm.t() + c2["bias"].double().cpu()
    assert_close(fast[0], ref, dtype, k, "forward")
    assert_close(fast[1], dy.double() @ wm, dtype, m, "dx")
    assert torch.equal(base[0], fast[0]) and torch.equal(base[1], fast[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.85])
def test_dense_tiles_overflow_the_entry_stage(monkeypatch, dtype, sparsity):
    # A full 128 x 64 tile has 8192 entries (1032 staged): 0% and 30% read most of each tile from
    # global memory at the scatter; 85% (~1229 entries) just over the stage.
    c, ref = make_case(70, 64 * 5 + 9, 128 * 2 + 3, dtype, "cuda", sparsity)
    base, fast = both_pipelines(monkeypatch, lambda: run_op(c))
    assert_close(fast, ref, dtype, 64 * 5 + 9, f"sparsity {sparsity}")
    assert torch.equal(base, fast)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shift", range(8))
def test_entries_starting_anywhere_in_a_chunk(monkeypatch, dtype, shift):
    # Pruning `shift` kept weights of the first row that has eight (make_case leaves row 0 empty)
    # moves every later tile's first entry by `shift` places within its 16-byte chunk; the copies
    # start at the chunk.
    n, k, m = 33, 64 * 4, 128 * 2
    c, _ = make_case(n, k, m, dtype, "cuda", 0.9)
    keep = c["mask"].clone()
    row = int((keep.sum(1) >= 8).nonzero()[0])
    first_row = keep[row].nonzero().flatten()
    before = int(keep.sum())
    keep[row, first_row[:shift]] = False
    assert before - int(keep.sum()) == shift
    w = c["w"]
    p = ops.compressed_pattern(keep)
    t = ops.tiled_pattern(p.crow_indices, p.col_indices, k)
    c.update(values=w[keep].cuda(), mask=keep, pattern=ops.CompressedPattern(*(q.cuda() for q in p)),
             tiled=ops.TiledPattern(*(q.cuda() for q in t)))
    ref = c["x"].double().cpu() @ torch.where(keep, w.double(), 0.0).t() + c["bias"].double().cpu()
    base, fast = both_pipelines(monkeypatch, lambda: run_op(c))
    assert_close(fast, ref, dtype, k, f"shift {shift}")
    assert torch.equal(base, fast)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("what", ["values", "tile_loc"])
def test_misaligned_entries_fall_back(monkeypatch, dtype, what):
    # Values or tile_loc starting 2 bytes into a 16-byte word: the host runs the register pipeline.
    n, k, m = 20, 300, 200
    c, ref = make_case(n, k, m, dtype, "cuda", 0.8)
    tv = c["values"].index_select(0, c["tiled"].tile_src)
    loc = c["tiled"].tile_loc
    if what == "values":
        buf = torch.zeros(tv.numel() + 1, dtype=dtype, device="cuda")
        buf[1:] = tv
        tv = buf[1:]
        assert tv.data_ptr() % 16 != 0
    else:
        buf = torch.zeros(loc.numel() + 1, dtype=loc.dtype, device="cuda")
        buf[1:] = loc
        loc = buf[1:]
        assert loc.data_ptr() % 16 != 0

    def call():
        return torch.ops.pyfinetune.tiled_csr_linear(c["x"], tv, c["tiled"].tile_ptr, loc, m, c["bias"])

    base, fast = both_pipelines(monkeypatch, call, expect_async=())
    assert not async_kernels_run(call)  # the variable is still set: the host fell back
    assert_close(fast, ref, dtype, k, what)
    assert torch.equal(base, fast)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_entries_at_the_end_of_the_arrays(monkeypatch, dtype):
    # nnz not a multiple of 8 and the last tile holding the last entries: its last chunk is cut at
    # nnz (zero-filled). A read past the arrays would not fault under the caching allocator, but
    # gpu_check.sh runs these tests under compute-sanitizer memcheck with caching off, where it is
    # an error; here, the results.
    for nnz_extra in range(1, 8):
        c, _ = make_case(5, 64 * 3, 130, dtype, "cuda", 0.95)
        keep = c["mask"].clone()
        keep[128:] = False
        keep[129, 128:128 + nnz_extra] = True  # tiles (1, 0), (1, 1) empty; (1, 2), the last: the last entries
        surplus = (int(keep.sum()) - nnz_extra) % 8  # drop as many earlier weights: nnz = nnz_extra (mod 8)
        for r, col in keep[:128].nonzero()[:surplus].tolist():
            keep[r, col] = False
        assert int(keep.sum()) % 8 == nnz_extra
        w = c["w"]
        p = ops.compressed_pattern(keep)
        t = ops.tiled_pattern(p.crow_indices, p.col_indices, 64 * 3)
        c.update(values=w[keep].cuda(), mask=keep, pattern=ops.CompressedPattern(*(q.cuda() for q in p)),
                 tiled=ops.TiledPattern(*(q.cuda() for q in t)))
        ref = c["x"].double().cpu() @ torch.where(keep, w.double(), 0.0).t() + c["bias"].double().cpu()
        base, fast = both_pipelines(monkeypatch, lambda: run_op(c))
        assert_close(fast, ref, dtype, 64 * 3, f"{nnz_extra} entries in the last tile")
        assert torch.equal(base, fast)


@pytest.mark.parametrize("value", ["2", "yes", "on", " 1"])
def test_bad_values_are_refused_before_any_write(monkeypatch, value):
    c, _ = make_case(4, 70, 130, torch.float16, "cuda", 0.5)
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=ENV):
        run_op(c)
    with pytest.raises(ValueError, match=ENV):
        run_dx(c, torch.randn(4, 130, dtype=torch.float16, device="cuda"))


def test_sparse_linear_training_step_with_async(monkeypatch):
    # SparseLinear's tensor-core path (PYFINETUNE_CSR_CUDA_KERNEL=tensor_cores) forward and backward
    # under the variable: the same bits as without it.
    from pyfinetune.prune import SparseLinear

    monkeypatch.setenv("PYFINETUNE_CSR_CUDA_KERNEL", "tensor_cores")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 260, generator=g)
    mask = torch.rand(300, 260, generator=g) > 0.9
    x = torch.randn(2, 70, 260, generator=g).half().cuda()
    dy = torch.randn(2, 70, 300, generator=g).half().cuda()

    def step():
        layer = SparseLinear.from_dense(w.half().cuda(), mask.cuda(), kernel="sparse")
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(dy)
        return y, xi.grad, layer.values.grad

    base, fast = both_pipelines(monkeypatch, step)
    for a, b in zip(base, fast):
        assert torch.equal(a, b)
