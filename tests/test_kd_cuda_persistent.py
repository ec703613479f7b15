"""The CUDA distillation kernels with PYFINETUNE_KD_CUDA_PERSISTENT=1: a grid of only the rows that can
be resident at once, each block (or cluster of blocks on sm_90) looping over every R-th row, and with
PYFINETUNE_KD_CUDA_L2_PREFETCH (on by default with it) each block prefetching its slice of its next
row to L2 before the current one.

Like PYFINETUNE_KD_CUDA_CAP_REGISTERS, only the bfloat16 student and teacher kernels without a top-k
teacher have the variant (the benchmark's case); other dtypes and the top-k teacher ignore it. The
arithmetic and the order of every sum are those of one block (cluster) per row, so the results must
be the same bits: compared bit for bit with the variable off on every path the loop touches (rows
split over a cluster, one block per row, many more rows than can be resident so that every block
takes several, ignored rows that return early inside the loop, the loss without a gradient, the
capped and uncapped kernels, the gradient written over the student, a student misaligned against
its teacher (the per-line prefetch instead of the bulk one), all three divergences), and once
against the float64 reference. The profiler confirms the smaller grid, and that the other dtypes
keep one block per row. Bad values of either variable are refused before anything is written.
GPU only.
"""

import pytest
import torch

from conftest import cuda_kernel_grids
from pyfinetune.losses import kd_loss
from reference_kd import assert_refused_before_write
from test_kd_loss import check

pytestmark = pytest.mark.cuda

ENV = "PYFINETUNE_KD_CUDA_PERSISTENT"
L2_ENV = "PYFINETUNE_KD_CUDA_L2_PREFETCH"
CAP_ENV = "PYFINETUNE_KD_CUDA_CAP_REGISTERS"
BF16 = torch.bfloat16
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]


def _case(n, v, dtype=BF16, t_dtype=None, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * scale).to("cuda", dtype)
    t = (torch.randn(n, v, generator=g) * scale).to("cuda", t_dtype or dtype)
    lab = torch.randint(0, v, (n,), generator=g)
    lab[::7] = -100  # ignored rows spread over the blocks' row sequences
    lab[-1] = v - 1
    return s, t, lab.to("cuda")


def _run(monkeypatch, setting, l2, fn):
    if setting is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, setting)
    if l2 is None:
        monkeypatch.delenv(L2_ENV, raising=False)
    else:
        monkeypatch.setenv(L2_ENV, l2)
    out = fn()
    torch.cuda.synchronize()
    return out


def _fwd(s, t, lab, need_grad, **kw):
    args = dict(temperature=1.3, alpha=0.6, divergence="forward_kl", beta=0.4, ignore_index=-100, grad_scale=0.5)
    args.update(kw)
    return torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, need_grad=need_grad, **args)


def _poison_cached_blocks(like):
    """Fill blocks of the caching allocator the size of ``like``'s tensors with NaN and free them, so
    that the next outputs of those sizes (most likely those very blocks) start as NaN: rows or
    slices a kernel skipped cannot then hold an earlier run's right bits."""
    blocks = [torch.full_like(x, float("nan")) for x in like if x.is_floating_point() and x.numel() > 0]
    del blocks


def _assert_same_bits(monkeypatch, fn):
    base = _run(monkeypatch, "0", None, fn)
    for l2 in (None, "0", "1"):
        got = None  # the previous run's outputs back to the cache, then poisoned
        _poison_cached_blocks(base)
        got = _run(monkeypatch, "1", l2, fn)
        for a, b in zip(got, base):
            assert torch.equal(a, b), f"{ENV}=1 {L2_ENV}={l2}: not the bits of one block (cluster) per row"
        a = b = None  # noqa: F841 (the loop's last output must not outlive got, else it is not poisoned)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("need_grad", [True, False], ids=["grad", "loss-only"])
@pytest.mark.parametrize("capped", ["0", "1"], ids=["uncapped", "capped"])
def test_many_rows_one_block_each(monkeypatch, divergence, need_grad, capped):
    # 9000 short rows: more than the resident blocks of any current GPU, so each block loops.
    monkeypatch.setenv(CAP_ENV, capped)
    s, t, lab = _case(9000, 301, seed=1)
    _assert_same_bits(monkeypatch, lambda: _fwd(s, t, lab, need_grad, divergence=divergence))


@pytest.mark.parametrize("capped", ["0", "1"], ids=["uncapped", "capped"])
def test_block_size_is_the_default_kernels(monkeypatch, capped):
    # Rows of 8192 (a 32 KB cache, several blocks per SM): the block size comes from the occupancy
    # of the one-row-per-block kernel, not of the persistent one (more registers), else another
    # block size and another order of the row sums (seen in review for an A100 at this size).
    monkeypatch.setenv(CAP_ENV, capped)
    s, t, lab = _case(2000, 8192, seed=12)
    _assert_same_bits(monkeypatch, lambda: _fwd(s, t, lab, True, divergence="jsd"))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_rows_split_over_clusters(monkeypatch, divergence):
    # The 128256-column bf16 rows of the benchmark (8 blocks per row on sm_90, ~50 rows in flight on
    # an H100): 150 rows, three or four per cluster, with the default (auto) prefetch and registers.
    s, t, lab = _case(150, 128256, seed=2)
    fn = lambda: _fwd(s, t, lab, True, divergence=divergence, temperature=2.0)  # noqa: E731
    _assert_same_bits(monkeypatch, fn)
    # That the clusters did loop: a grid of fewer rows than N, whole clusters.
    off = _run(monkeypatch, "0", None, lambda: cuda_kernel_grids(fn, "kd_loss_kernel"))
    on = _run(monkeypatch, "1", None, lambda: cuda_kernel_grids(fn, "kd_loss_kernel"))
    if on is None or off is None:
        pytest.skip("the profiler recorded no kernel grid here (no CUPTI, or under compute-sanitizer)")
    if torch.cuda.get_device_capability()[0] < 9:  # no clusters: one block per row, ~200 resident
        pytest.skip("rows split over clusters on sm_90+ only (the bits were compared above)")
    n_split = off[0][0] // 150
    assert off == [(150 * n_split, 1, 1)] and n_split > 1, off
    assert len(on) == 1 and on[0][0] % n_split == 0 and 0 < on[0][0] < 150 * n_split, on


@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_student(monkeypatch, offset):
    # Not 16-byte aligned: the slice is prefetched line by line instead of in one bulk prefetch.
    v = 50257
    s, t, lab = _case(300, v, seed=4)
    buf = torch.zeros(300, v + 5, device="cuda", dtype=BF16)
    buf[:, offset:offset + v] = s
    s = buf[:, offset:offset + v]
    assert s.data_ptr() % 16 != 0
    _assert_same_bits(monkeypatch, lambda: _fwd(s, t, lab, True, divergence="reverse_kl"))


@pytest.mark.parametrize("v", [301, 128256], ids=["block", "cluster"])
def test_inplace_gradient(monkeypatch, v):
    # The gradient written over the student while the block's next row is prefetched.
    n = 9000 if v == 301 else 120
    s, t, lab = _case(n, v, seed=6)
    kw = dict(temperature=2.0, alpha=0.3, divergence="forward_kl", beta=0.5, ignore_index=-100, grad_scale=0.25)
    rows, grad = _run(monkeypatch, "0", None, lambda: torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, need_grad=True, **kw))
    x = s.clone()
    out = _run(monkeypatch, "1", None, lambda: torch.ops.pyfinetune.kd_loss_fwd_inplace(x, t, lab, **kw))
    assert torch.equal(out, rows)
    assert torch.equal(x, grad)


def test_matches_reference_and_autograd(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    s, t, lab = _case(2000, 1031, seed=7)
    check(s, t, lab, dtype=BF16, torch_lowp=True, divergence="forward_kl", temperature=0.7, alpha=0.5)
    x = s.clone().requires_grad_(True)
    kd_loss(x, t, lab, temperature=2.0, alpha=0.5).backward()
    monkeypatch.setenv(ENV, "0")
    y = s.clone().requires_grad_(True)
    kd_loss(y, t, lab, temperature=2.0, alpha=0.5).backward()
    assert torch.equal(x.grad, y.grad)


def test_fewer_rows_than_resident(monkeypatch):
    s, t, lab = _case(3, 50257, seed=8)
    _assert_same_bits(monkeypatch, lambda: _fwd(s, t, lab, True))


def test_grid_holds_only_resident_rows(monkeypatch):
    s, t, lab = _case(9000, 301, seed=9)
    on = _run(monkeypatch, "1", None, lambda: cuda_kernel_grids(lambda: _fwd(s, t, lab, True), "kd_loss_kernel"))
    off = _run(monkeypatch, "0", None, lambda: cuda_kernel_grids(lambda: _fwd(s, t, lab, True), "kd_loss_kernel"))
    if on is None or off is None:
        pytest.skip("the profiler recorded no kernel grid here (no CUPTI, or under compute-sanitizer)")
    assert off == [(9000, 1, 1)]
    assert len(on) == 1 and 0 < on[0][0] < 9000, on


@pytest.mark.parametrize("case", ["fp32", "fp16-fp32", "bf16-fp32", "topk"])
def test_other_kernels_ignore_it(monkeypatch, case):
    # No persistent instantiation: one block per row and the same bits, with the variable on.
    n, v = 9000, 301
    if case == "topk":
        s, t, lab = _case(n, v, seed=11)
        vals, idx = torch.topk(t.float(), 16, dim=-1)

        def fn():
            return torch.ops.pyfinetune.kd_loss_topk_fwd(s, vals.to(BF16), idx, lab, temperature=1.7, alpha=0.4,
                                                         divergence="forward_kl", beta=0.5, ignore_index=-100,
                                                         need_grad=True, grad_scale=1.0)
    else:
        st, tt = {"fp32": (torch.float32, None), "fp16-fp32": (torch.float16, torch.float32),
                  "bf16-fp32": (BF16, torch.float32)}[case]
        s, t, lab = _case(n, v, dtype=st, t_dtype=tt, seed=11)

        def fn():
            return _fwd(s, t, lab, True, divergence="jsd")

    _assert_same_bits(monkeypatch, fn)
    grids = _run(monkeypatch, "1", None, lambda: cuda_kernel_grids(fn, "kd_loss_kernel"))
    if grids is not None:
        assert grids == [(n, 1, 1)]


@pytest.mark.parametrize("name", [ENV, L2_ENV])
@pytest.mark.parametrize("bad", ["2", "yes", " 1"])
def test_bad_setting_is_refused_before_any_write(monkeypatch, name, bad):
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setenv(name, bad)
    s, t, lab = _case(3, 301, seed=10)
    assert_refused_before_write(s, t, lab, f"{name} must be 0 or 1")
