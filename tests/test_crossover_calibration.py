"""pyfinetune.prune.calibrate_crossover: measuring SparseLinear's kernel="auto" threshold on this
machine (the crossover rule itself, the entry it sets, what it times, and its argument errors)."""

from __future__ import annotations

import pytest
import torch

from pyfinetune import _sparse_linear, prune
from pyfinetune._crossover import _crossover_of
from pyfinetune._sparse_linear import SparseLinear

# A busy machine (another test process, a CI neighbour) makes calibrate_crossover warn; these tests
# check what it measures and sets, not the machine's quiet (test_calibrate_reports_and_warns_... does).
pytestmark = pytest.mark.filterwarnings("ignore:calibrate_crossover. other processes took")

SMALL = dict(batch=8, in_features=48, out_features=40, sparsities=(0.2, 0.6, 0.95), reps=10, warmup=1)


@pytest.fixture
def crossover_table(monkeypatch):
    """CROSSOVER_SPARSITY restored after the test (calibrate_crossover writes into it)."""
    saved = dict(_sparse_linear.CROSSOVER_SPARSITY)
    yield _sparse_linear.CROSSOVER_SPARSITY
    _sparse_linear.CROSSOVER_SPARSITY.clear()
    _sparse_linear.CROSSOVER_SPARSITY.update(saved)


@pytest.mark.parametrize("points, expected", [
    # (sparsity, dense ms, sparse ms): ratio dense / sparse crosses 1 between 0.4 (0.8) and 0.6 (1.2)
    ([(0.2, 10, 20), (0.4, 10, 12.5), (0.6, 12, 10), (0.8, 10, 5)], 0.5),
    ([(0.3, 10, 9), (0.6, 10, 5)], 0.3),                    # faster everywhere: the lowest measured
    ([(0.3, 10, 20), (0.9, 10, 11)], 2.0),                  # never faster: never
    ([(0.5, 10, 9), (0.6, 10, 11), (0.7, 10, 10), (0.9, 10, 2)], 0.7),  # the last crossing counts
    ([(0.6, 10, 12.5), (0.4, 10, 20), (0.8, 12, 10)], 0.7),  # unsorted input; 0.8 -> 1.2 at 0.6 / 0.8
])
def test_crossover_rule(points, expected):
    assert _crossover_of(points) == pytest.approx(expected, abs=1e-4)


def test_calibrate_sets_the_entry_auto_reads(crossover_table):
    crossover_table["cpu"] = 0.123
    cal = prune.calibrate_crossover("cpu", **SMALL)
    assert isinstance(cal, prune.CrossoverCalibration)
    assert cal.key == "cpu" and cal.previous == 0.123 and cal.applied
    assert [s for s, _, _ in cal.points] == [0.2, 0.6, 0.95]
    assert all(d > 0 and sp > 0 for _, d, sp in cal.points)
    assert cal.crossover == _crossover_of(cal.points)
    assert crossover_table["cpu"] == cal.crossover
    assert prune.CROSSOVER_SPARSITY is crossover_table
    # kernel="auto" follows the new entry at the next call
    w, mask = torch.randn(40, 48), torch.rand(40, 48) > 0.5
    layer = SparseLinear.from_dense(w, mask)
    crossover_table["cpu"] = 0.4
    assert layer.kernel_for() == "sparse"
    crossover_table["cpu"] = 0.6
    assert layer.kernel_for() == "dense"
    text = str(cal)
    assert "forward + backward, x [8, 48], weight [40, 48] float32" in text and "previous 0.123; applied" in text


def test_calibrate_without_apply_and_inference_mode(crossover_table):
    before = dict(crossover_table)
    cal = prune.calibrate_crossover("cpu", torch.bfloat16, mode="inference", apply=False, **SMALL)
    assert not cal.applied and dict(crossover_table) == before
    assert cal.mode == "inference" and cal.dtype == torch.bfloat16
    assert cal.key == ("cpu-16bit" if _sparse_linear._cpu_has_amx() else "cpu")
    assert "forward, x [8, 48]" in str(cal) and "not applied" in str(cal)


def test_calibrate_16bit_key_follows_amx(monkeypatch, crossover_table):
    monkeypatch.setattr(_sparse_linear, "_AMX", True)
    assert _sparse_linear.crossover_key("cpu", torch.bfloat16) == "cpu-16bit"
    assert _sparse_linear.crossover_key("cpu", torch.float32) == "cpu"
    cal = prune.calibrate_crossover("cpu", torch.float16, **SMALL)
    assert cal.key == "cpu-16bit" and crossover_table["cpu-16bit"] == cal.crossover
    monkeypatch.setattr(_sparse_linear, "_AMX", False)
    assert _sparse_linear.crossover_key("cpu", torch.bfloat16) == "cpu"
    assert _sparse_linear.crossover_key("cuda", torch.bfloat16) == "cuda-16bit"


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="eval"), 'mode must be "train" or "inference"'),
    (dict(dtype=torch.int32), "dtype must be one of"),
    (dict(sparsities=(0.5,)), "sparsities must hold at least two fractions in"),
    (dict(sparsities=(0.5, 1.0)), "sparsities must hold at least two fractions in"),
    (dict(sparsities="0.5"), "sparsities must hold at least two fractions in"),
    (dict(reps=5), "reps must be >= 10"),
    (dict(reps=1.5), "reps must be a positive int"),
    (dict(batch=0), "batch must be a positive int"),
    (dict(in_features=True), "in_features must be a positive int"),
    (dict(warmup=-1), "warmup must be an int >= 0"),
    (dict(device="meta"), "this build has no meta kernel for csr_linear"),
])
def test_calibrate_errors(kwargs, match, crossover_table):
    before = dict(crossover_table)
    args = {**SMALL, **kwargs}
    device = args.pop("device", "cpu")
    dtype = args.pop("dtype", torch.float32)
    with pytest.raises(ValueError, match=match):
        prune.calibrate_crossover(device, dtype, **args)
    assert dict(crossover_table) == before


def test_calibrate_warns_when_16bit_shares_the_float32_entry(monkeypatch, crossover_table):
    monkeypatch.setattr(_sparse_linear, "_AMX", False)
    with pytest.warns(UserWarning, match="bfloat16 layers read the same entry 'cpu' as float32 layers"):
        cal = prune.calibrate_crossover("cpu", torch.bfloat16, **SMALL)
    assert crossover_table["cpu"] == cal.crossover
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prune.calibrate_crossover("cpu", torch.bfloat16, apply=False, **SMALL)   # nothing applied: no warning
    assert not [w for w in caught if "same entry" in str(w.message)]


def test_calibrate_reports_and_warns_about_a_busy_machine(monkeypatch, crossover_table):
    from pyfinetune.benchmarks import common

    monkeypatch.setattr(common, "is_contended", lambda result, limit=common.BUSY_LIMIT: True)
    with pytest.warns(UserWarning, match="other processes took .* the crossover may be off"):
        cal = prune.calibrate_crossover("cpu", **SMALL)
    if cal.other_cpu_share is not None:  # Linux
        assert 0.0 <= cal.other_cpu_share <= 1.0 and "other processes took" in str(cal)


# ------------------------------------------------------------ PYFINETUNE_SPARSE_CROSSOVER, the CLI
@pytest.mark.parametrize("text, expected", [
    ("cpu=0.37", {"cpu": 0.37}),
    (" cpu = 0.4 , cuda-16bit=0.95,", {"cpu": 0.4, "cuda-16bit": 0.95}),
    ("cuda=2", {"cuda": 2.0}),
    ("", {}),
])
def test_crossover_setting_parses(text, expected):
    assert _sparse_linear.parse_crossover_setting(text) == expected


@pytest.mark.parametrize("text, match", [
    ("gpu=0.5", r"KEY one of .*got 'gpu=0.5'"),
    ("cpu", r"KEY=SPARSITY .*got 'cpu'"),
    ("cpu=abc", r"sparsity of 'cpu' must be a number >= 0 .*got 'abc'"),
    ("cpu=-0.1", r"must be a number >= 0"),
    ("cpu=nan", r"must be a number >= 0"),
    ("cpu=inf", r"must be a number >= 0"),
])
def test_crossover_setting_errors(text, match):
    with pytest.raises(ValueError, match="PYFINETUNE_SPARSE_CROSSOVER: .*" + match):
        _sparse_linear.parse_crossover_setting(text)


def test_crossover_env_is_applied_at_import_and_code_wins(monkeypatch, crossover_table):
    # _apply_crossover_env runs when pyfinetune._sparse_linear is imported; called again here as
    # an import with the variable set would.
    monkeypatch.setattr(_sparse_linear, "_env_error", _sparse_linear._env_error)
    monkeypatch.setenv("PYFINETUNE_SPARSE_CROSSOVER", "cpu=0.31")
    assert _sparse_linear._apply_crossover_env() == {"cpu": 0.31}
    assert _sparse_linear.crossover_sparsity("cpu") == 0.31
    crossover_table["cpu"] = 0.44          # set in code afterwards: wins
    assert _sparse_linear.crossover_sparsity("cpu") == 0.44
    monkeypatch.setenv("PYFINETUNE_SPARSE_CROSSOVER", "cpu=x")
    assert _sparse_linear._apply_crossover_env() == {}
    assert crossover_table["cpu"] == 0.44
    layer = SparseLinear.from_dense(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool))
    for call in (lambda: layer(torch.randn(2, 4)), lambda: layer(torch.randn(100, 4))):
        for grad in (True, False):     # every kernel choice refuses it, small inference batches too
            with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="PYFINETUNE_SPARSE_CROSSOVER"):
                call()
    from pyfinetune import _info

    assert "PYFINETUNE_SPARSE_CROSSOVER" in _info.sparse_linear_crossover()["error"]
    assert _info.sparse_crossover_env() == {}
    monkeypatch.delenv("PYFINETUNE_SPARSE_CROSSOVER")
    assert _sparse_linear._apply_crossover_env() == {} and _sparse_linear._env_error is None
    layer(torch.randn(2, 4))           # mended


def test_calibrate_command(capsys, crossover_table):
    from pyfinetune import cli

    before = dict(crossover_table)
    assert cli.main(["calibrate", "--device", "cpu", "--batch", "8", "--in-features", "48", "--out-features", "40",
                     "--sparsity", "0.2", "0.6", "0.95", "--mode", "inference"]) == 0
    out = capsys.readouterr().out
    assert "SparseLinear crossover on cpu (cpu), forward, x [8, 48]" in out and "not applied" in out
    assert "PYFINETUNE_SPARSE_CROSSOVER=cpu=" in out
    assert dict(crossover_table) == before, "the command only reports"
    assert cli.main(["calibrate", "--device", "cpu", "--reps", "3"]) == 2
    assert "reps must be >= 10" in capsys.readouterr().err
    # A layer too large for this machine: the allocator's error in one line, exit status 2.
    # (10**12 rows of 4096 features: x alone is 16 EB, beyond any address space, whatever the
    # overcommit policy; more than 2^31 - 2 features is refused before, as SparseLinear's limit.)
    assert cli.main(["calibrate", "--device", "cpu", "--batch", str(10**12)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyfinetune calibrate: ") and "--batch 1000000000000" in err and "Traceback" not in err


@pytest.mark.parametrize("kwargs, match", [
    # Once torch's TypeError ("Overflow when unpacking long") or RuntimeError ("Storage size calculation
    # overflowed") from the first randn, not the ValueError (exit status 2) the command reports.
    (dict(batch=10**22), "must each fit in 2"),
    (dict(batch=2**62, in_features=1, out_features=1), "must each fit in 2"),
    (dict(in_features=2**31 - 2, out_features=2**31 - 2, batch=1), "must each fit in 2"),
    (dict(in_features=2**31), "in_features must be at most 2"),
    (dict(out_features=10**22), "out_features must be at most 2"),
])
def test_calibrate_refuses_shapes_past_int64(kwargs, match, crossover_table):
    with pytest.raises(ValueError, match=match):
        prune.calibrate_crossover("cpu", **{**SMALL, **kwargs})


def test_calibrate_command_says_small_inference_batches_ignore_the_crossover(capsys, crossover_table):
    # kernel="auto" runs CPU inference calls of up to SMALL_BATCH_ROWS rows sparse at any sparsity: a
    # crossover measured at such a batch decides none of them, which the command did not say.
    from pyfinetune import cli

    small = _sparse_linear.SMALL_BATCH_ROWS[("cpu", True)]
    shape = ["--in-features", "48", "--out-features", "40", "--sparsity", "0.2", "0.95"]
    assert cli.main(["calibrate", "--device", "cpu", "--batch", str(small), "--mode", "inference"] + shape) == 0
    assert f"note: SparseLinear(kernel='auto') runs inference calls of up to {small} rows" in capsys.readouterr().out
    assert cli.main(["calibrate", "--device", "cpu", "--batch", str(small + 1), "--mode", "inference"] + shape) == 0
    assert "runs inference calls of up to" not in capsys.readouterr().out
    assert cli.main(["calibrate", "--device", "cpu", "--batch", "8", "--mode", "train"] + shape) == 0
    assert "runs inference calls of up to" not in capsys.readouterr().out
