"""The CUDA distillation kernels with PYFINETUNE_KD_CUDA_SPLIT=P: P blocks (a cluster on sm_90) per
row instead of the launch's choice (experimental, for A/B timing).

Every split against the float64 reference (bfloat16 rows of the benchmark's length, whose slices
then fit the shared-memory cache or not, float32 rows, every divergence, ignored rows, the gradient
written over the student), the same bits with and without the persistent grid at a split of 16 (a
non-portable cluster size), and bad values refused before anything is written. sm_90 only for the
splits themselves (elsewhere the variable is ignored: checked to give the default's bits).
"""

import pytest
import torch

from conftest import cuda_kernel_grids
from pyfinetune.losses import kd_loss
from reference_kd import assert_inplace_matches, assert_refused_before_write
from test_kd_loss import check

pytestmark = pytest.mark.cuda

ENV = "PYFINETUNE_KD_CUDA_SPLIT"
SPLITS = ["1", "2", "4", "8", "16"]


def _sm90():
    return torch.cuda.get_device_capability()[0] >= 9


def _case(n, v, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 3).to("cuda", dtype)
    t = (torch.randn(n, v, generator=g) * 3).to("cuda", dtype)
    lab = torch.randint(0, v, (n,), generator=g)
    lab[1] = -100
    lab[-1] = v - 1
    return s, t, lab.to("cuda")


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_bf16_rows_match_reference(monkeypatch, split, divergence):
    monkeypatch.setenv(ENV, split)
    s, t, lab = _case(5, 128256, seed=1)
    check(s, t, lab, dtype=torch.bfloat16, torch_lowp=True, divergence=divergence, temperature=2.0, alpha=0.5)


@pytest.mark.parametrize("split", ["2", "16"])
def test_the_split_is_the_launch(monkeypatch, split):
    # The grid holds split blocks per row (sm_90), not a silent fallback to one block per row.
    if not _sm90():
        pytest.skip("splits are cluster launches: sm_90 only")
    monkeypatch.setenv(ENV, split)
    s, t, lab = _case(5, 128256, seed=7)
    grids = cuda_kernel_grids(lambda: torch.ops.pyfinetune.kd_loss_fwd(
        s, t, lab, temperature=2.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100, need_grad=True,
        grad_scale=1.0), "kd_loss_kernel")
    if grids is None:
        pytest.skip("the profiler recorded no kernel grid here (no CUPTI, or under compute-sanitizer)")
    assert grids == [(5 * int(split), 1, 1)], f"{ENV}={split}: grid {grids} (a refused cluster size falls back to 1)"


@pytest.mark.parametrize("split", SPLITS)
def test_float32_rows_match_reference(monkeypatch, split):
    monkeypatch.setenv(ENV, split)
    s, t, lab = _case(4, 50257, dtype=torch.float32, seed=2)
    check(s, t, lab, divergence="forward_kl", temperature=1.3, alpha=0.6)


@pytest.mark.parametrize("split", ["2", "16"])
def test_inplace_gradient(monkeypatch, split):
    monkeypatch.setenv(ENV, split)
    s, t, lab = _case(6, 128256, seed=3)
    assert_inplace_matches(s, t, lab, temperature=2.0, alpha=0.3, divergence="jsd", beta=0.4, ignore_index=-100,
                           grad_scale=0.25)


def test_persistent_grid_at_split_16_gives_the_same_bits(monkeypatch):
    monkeypatch.setenv(ENV, "16")
    s, t, lab = _case(200, 128256, seed=4)
    out = {}
    for persistent in ("0", "1"):
        monkeypatch.setenv("PYFINETUNE_KD_CUDA_PERSISTENT", persistent)
        out[persistent] = torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, temperature=2.0, alpha=0.5,
                                                           divergence="forward_kl", beta=0.5, ignore_index=-100,
                                                           need_grad=True, grad_scale=1.0)
    assert torch.equal(out["0"][0], out["1"][0]) and torch.equal(out["0"][1], out["1"][1])


def test_ignored_before_sm90(monkeypatch):
    if _sm90():
        pytest.skip("sm_90: the split applies (the tests above)")
    s, t, lab = _case(3, 50257, seed=5)
    base = kd_loss(s, t, lab, reduction="none")
    monkeypatch.setenv(ENV, "16")
    assert torch.equal(kd_loss(s, t, lab, reduction="none"), base)


@pytest.mark.parametrize("bad", ["3", "32", "0", "08", "auto"])
def test_bad_setting_is_refused_before_any_write(monkeypatch, bad):
    monkeypatch.setenv(ENV, bad)
    s, t, lab = _case(3, 301, seed=6)
    assert_refused_before_write(s, t, lab, f"{ENV} must be one of 1, 2, 4, 8, 16")
