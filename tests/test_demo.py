"""``pyfinetune demo --quick``: the expected outcome and every file written.

One quick demo runs for the module (through the command line, in-process; ~30 s on two idle
cores). The demo seeds everything itself (data split, initializations, data order), so its
accuracies do not depend on the suite's per-test seed; the only noisy numbers are timings, and
the timing check asks only for what holds on a loaded machine (pruned faster than dense, both
medians of interleaved runs).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from pyfinetune import cli  # noqa: E402
from pyfinetune.demo import METHOD_KINDS, outcome_checks  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = cli.main(["demo", "--quick", "--out", str(out)])
    assert code == 0
    with open(out / "results.json", encoding="utf-8") as f:
        return out, json.load(f)


def by_method(results):
    return {m["method"]: m for m in results["methods"]}


def test_results_json_schema(demo):
    _, results = demo
    assert "digits" in results["dataset"] and results["device"] == "cpu"
    assert results["quick"] is True and isinstance(results["seed"], int)
    assert sorted(m["method"] for m in results["methods"]) == sorted(METHOD_KINDS)
    for m in results["methods"]:
        for key, kind in (("name", str), ("method", str), ("test_accuracy", float), ("params", int),
                          ("nonzero_params", int), ("train_seconds", float), ("inference_ms_per_batch", float)):
            assert isinstance(m[key], kind), (m["name"], key)
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert 0 < m["nonzero_params"] <= m["params"]
        assert m["train_seconds"] > 0 and m["inference_ms_per_batch"] > 0
        assert len(m["history"]) == results["config"]["epochs"]
    assert [k["speedup"] > 0 for k in results["kernel_speedups"]] == [True] * 3


def test_every_method_above_90_percent(demo):
    _, results = demo
    low = {m["name"]: m["test_accuracy"] for m in results["methods"] if m["test_accuracy"] <= 0.9}
    assert not low, f"test accuracy <= 90%: {low}"


def test_pruned_model_is_sparse_and_close(demo):
    # Whether it is also faster is the demo's timed outcome (its report), not a unit test's: a CI
    # machine shared with other work once timed it at 0.89x the dense model.
    _, results = demo
    m = by_method(results)
    pruned, dense = m["prune"], m["baseline"]
    assert pruned["params"] == dense["params"]
    # 90% of the two wide layers, which hold nearly all weights
    assert pruned["nonzero_params"] < 0.15 * dense["params"]
    assert pruned["test_accuracy"] >= dense["test_accuracy"] - 0.02
    assert pruned["inference_ms_per_batch"] > 0 and dense["inference_ms_per_batch"] > 0
    assert pruned["history"][-1]["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_distilled_student_at_least_as_accurate_as_alone(demo):
    _, results = demo
    m = by_method(results)
    assert m["distill"]["test_accuracy"] >= m["student_alone"]["test_accuracy"]
    assert m["distill"]["params"] == m["student_alone"]["params"] < m["baseline"]["params"] / 10


TIMED_OUTCOMES = {"pruned model faster at inference than the dense one"}


def test_outcome_recorded_as_met(demo):
    # The accuracy outcomes must hold; the timed one is recorded (its pass depends on the machine's load).
    _, results = demo
    assert results["outcome"] == outcome_checks(results["methods"])
    assert TIMED_OUTCOMES <= set(results["outcome"])
    untimed = {k: v for k, v in results["outcome"].items() if k not in TIMED_OUTCOMES}
    assert all(v["passed"] for v in untimed.values()), results["outcome"]


def test_files_written(demo):
    out, results = demo
    assert results["files"] == ["results.json", "report.md", "training_curves.png", "accuracy_vs_sparsity.png",
                                "kernel_speedups.png"]
    for name in results["files"]:
        assert (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    report = (out / "report.md").read_text(encoding="utf-8")
    for m in results["methods"]:
        assert m["name"] in report
    assert f"Seed: {results['seed']}" in report


def test_cuda_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["demo", "--quick", "--device", "cuda", "--out", "unused"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_record_names_the_commit_and_the_settings(demo):
    # The record named the machine and versions only: not the code measured, nor the PYFINETUNE_*
    # settings it ran under (the benchmarks' records name both).
    import os

    out, results = demo
    assert results["git"]["commit"] and isinstance(results["git"]["dirty"], bool)
    assert results["settings"] == {k: v for k, v in sorted(os.environ.items()) if k.startswith("PYFINETUNE_")}
    assert f"at commit {results['git']['commit'][:12]}" in (out / "report.md").read_text(encoding="utf-8")


def test_unusable_out_and_bad_timing_config_stop_before_training(tmp_path, capsys, monkeypatch):
    # Both ended a run of minutes in a traceback once the training was done: an --out that is a file
    # (os.makedirs' FileExistsError) and timing_reps below the timer's 10 (time_interleaved's ValueError).
    from pyfinetune import demo as demo_module

    monkeypatch.setattr(demo_module, "_Demo", lambda *a, **k: pytest.fail("training started"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", "--quick", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"the output folder {blocker} cannot be created" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="timing_reps must be >= 10"):
        demo_module.run_demo(str(tmp_path / "out"), config=demo_module.demo_config(True, timing_reps=3), log=str)
