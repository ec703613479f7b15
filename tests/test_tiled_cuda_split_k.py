"""The CUDA tensor-core sparse forward with its K split in parts (PYFINETUNE_TILED_CUDA_SPLIT_K;
unset = auto, the default since the H200 check of 2026-11-29; 1 = no split): each part's blocks multiply a range of K tiles into float32 sums, and a second
kernel adds the parts in order and the bias (csrc/cuda/tiled_csr_cuda.cu, split_k_parts,
tiled_csr_sum_parts_kernel).

Checked against the float64 reference (tolerances of test_tiled_csr) on what the split touches:
parts of one tile and of several, a last part shorter than the others, K not a multiple of 64, M
not a multiple of 4 (the sum kernel's element path) or of 128, N over several 64-row blocks and a
single row, bias or none, empty tiles and a whole part without entries; "auto" against the
unsplit product; unset is "auto" (the same bits); the same bits on every run (the parts are added in order); the variable means
nothing to the input gradient; a CUDA graph replays it; bad values are refused before anything
is written. GPU only (the variable means nothing on the CPU).
"""

import re

import pytest
import torch

from pyfinetune import ops
from conftest import needs_caching_allocator
from test_tiled_csr import assert_close, dtype_id, make_case, run_dx, run_op, with_mask

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ENV = "PYFINETUNE_TILED_CUDA_SPLIT_K"
DTYPES = [torch.bfloat16, torch.float16]


def kernels_run(fn):
    """Names of our tiled kernels fn() launched, from the profiler; None where it sees none of our
    kernels (no CUPTI, or under compute-sanitizer): nothing to check then."""
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = {e.name for e in prof.events()}
    except (RuntimeError, AssertionError):
        return None
    ours = {n for n in names if "tiled_csr_" in n}
    return ours or None


def split_and_plain(monkeypatch, fn, parts):
    """fn() with the variable at 1 (no split), then with it set to `parts`: (plain, split). Where the
    profiler sees kernels, the split run launched the sum kernel and the plain one did not."""
    monkeypatch.setenv(ENV, "1")
    names = kernels_run(fn)
    assert names is None or not any("sum_parts" in n for n in names), names
    plain = fn()
    monkeypatch.setenv(ENV, str(parts))
    names = kernels_run(fn)
    split = fn()
    torch.cuda.synchronize()
    return plain, split, names


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 64 * 8, 128), (5, 200, 300), (70, 1000, 130), (130, 64 * 9 + 5, 257),
                                   (3, 64, 40), (66, 129, 4 * 33)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("parts", [2, 3, 7, 64, "auto"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_split_forward_matches_dense_reference(monkeypatch, dtype, shape, parts, bias):
    # K of 512 / 200 / 1000 / 581 / 64 / 129: 8 / 4 / 16 / 10 / 1 / 3 tiles. P parts are parts of
    # ceil(tiles / P) tiles: 7 give 4 x 2 / 4 x 1 / 5 x 3 + 1 / 5 x 2 tiles, 3 give 3 + 3 + 2 / 2 x 2 /
    # 6 + 6 + 4 / 4 + 4 + 2 (shorter last parts), 64 one tile each (clamped to the tile count), and a
    # single tile nothing to split; M of 130 / 257 / 300 / 40 is not a multiple of 4 (the sum
    # kernel's element path), 128 / 132 is.
    n, k, m = shape
    c, ref = make_case(n, k, m, dtype, "cuda", 0.9, bias=bias)
    plain, split, names = split_and_plain(monkeypatch, lambda: run_op(c), parts)
    assert_close(split, ref, dtype, k, f"split {parts} {shape}")
    assert_close(plain, ref, dtype, k, f"plain {shape}")
    k_tiles = -(-k // ops.TILE_COLS)
    if names is not None and parts != "auto" and k_tiles > 1:
        assert any("sum_parts" in n for n in names), names
    if k_tiles == 1:
        assert torch.equal(plain, split)  # one part: the unsplit kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 64 * 16, 256), (16, 64 * 64, 512), (256, 64 * 16 + 3, 130)],
                         ids=lambda s: "x".join(map(str, s)))
def test_unset_means_auto(monkeypatch, dtype, shape):
    # The default: the same parts as "auto", so the same bits; where the profiler sees kernels, a
    # grid of a few blocks (2 or 4 blocks of 128 rows of W, 16 or 64 tiles of K) was split (the sum
    # kernel ran).
    n, k, m = shape
    c, ref = make_case(n, k, m, dtype, "cuda", 0.9)
    monkeypatch.setenv(ENV, "auto")
    auto = run_op(c)
    monkeypatch.delenv(ENV, raising=False)
    names = kernels_run(lambda: run_op(c))
    unset = run_op(c)
    assert_close(unset, ref, dtype, k, f"unset {shape}")
    assert torch.equal(unset, auto)
    if names is not None and n <= 16:
        assert any("sum_parts" in name for name in names), names


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
def test_split_forward_at_every_sparsity(monkeypatch, dtype, sparsity):
    c, ref = make_case(40, 64 * 6 + 17, 200, dtype, "cuda", sparsity)
    _, split, _ = split_and_plain(monkeypatch, lambda: run_op(c), 3)
    assert_close(split, ref, dtype, 64 * 6 + 17, f"sparsity {sparsity}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_a_part_without_entries(monkeypatch, dtype):
    # K columns [128, 256) pruned in every row: with 3 parts of 2 tiles, the middle part (tiles 2-3)
    # has only empty tiles (its multiplies skipped) and must still write its zeros for the sum.
    n, k, m = 20, 64 * 6, 256
    c, _ = make_case(n, k, m, dtype, "cuda", 0.0)
    keep = c["mask"].clone()
    keep[:, 128:256] = False
    ref = with_mask(c, keep, k)
    tv = c["values"].index_select(0, c["tiled"].tile_src)
    monkeypatch.setenv(ENV, "3")
    # The parts' float32 sums [3, n, m] come from the caching allocator, whose fresh segments the
    # driver hands out zeroed (the right value for an empty part): the cache emptied, then blocks
    # of that size poisoned just before the call (several: the remainders of live segments, which
    # best fit serves first, and the output, which may take one, are covered), so that sums left
    # unwritten would most likely show as NaN.
    torch.cuda.empty_cache()
    junk = [torch.full((3, n, m), float("nan"), device="cuda") for _ in range(8)]
    del junk
    split = torch.ops.pyfinetune.tiled_csr_linear(c["x"], tv, c["tiled"].tile_ptr, c["tiled"].tile_loc, m, c["bias"])
    assert_close(split, ref, dtype, k, "a part without entries")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_split_is_deterministic_and_leaves_the_input_gradient_alone(monkeypatch, dtype):
    n, k, m = 70, 64 * 12, 300
    c, _ = make_case(n, k, m, dtype, "cuda", 0.8)
    dy = torch.randn(n, m, device="cuda").to(dtype)
    monkeypatch.delenv(ENV, raising=False)
    dx_plain = run_dx(c, dy)
    monkeypatch.setenv(ENV, "5")
    first = run_op(c)
    for _ in range(3):
        assert torch.equal(run_op(c), first)  # parts added in order: the same bits every run
    assert torch.equal(run_dx(c, dy), dx_plain)


@needs_caching_allocator
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_split_forward_in_a_cuda_graph(monkeypatch, dtype):
    # The parts' buffer comes from the caching allocator inside the capture; a replay computes the
    # product of the new x.
    monkeypatch.setenv(ENV, "4")
    n, k, m = 16, 64 * 8, 256
    c, _ = make_case(n, k, m, dtype, "cuda", 0.9)
    x_static = c["x"].clone()
    tv = c["values"].index_select(0, c["tiled"].tile_src)

    def call():
        return torch.ops.pyfinetune.tiled_csr_linear(x_static, tv, c["tiled"].tile_ptr, c["tiled"].tile_loc, m,
                                                     c["bias"])

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call()  # warm up (shared memory opt-in, allocator) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_static = call()
    x_new = torch.randn(n, k, device="cuda").to(dtype)
    x_static.copy_(x_new)
    g.replay()
    torch.cuda.synchronize()
    wm = torch.where(c["mask"], c["w"].double(), 0.0)
    ref = x_new.double().cpu() @ wm.t() + c["bias"].double().cpu()
    assert_close(y_static, ref, dtype, k, "graph replay")


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "65536", " 2", "AUTO"])
def test_bad_values_are_refused(monkeypatch, value):
    c, _ = make_case(4, 128, 130, torch.float16, "cuda", 0.5)
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=re.escape(f"{ENV} must be auto or an integer in [1, 65535]")):
        run_op(c)
