"""pyfinetune.Finetuner and ``pyfinetune finetune`` under torch.distributed: 2 gloo ranks (CPU).

The Python API runs in the ranks of distributed_harness.py's launcher (the scenarios are in
finetune_ranks.py); the command runs under ``python -m torch.distributed.run --nproc_per_node 2``.

What is checked:

* the ranks end with bit-identical models, masks, histories and evaluations (every rank applies
  the same all-reduced gradient to the same weights, and computes the masks from them);
* l2sp, prune and distill on 2 ranks equal one process that sees the same global batches (the
  ranks' ``DistributedSampler`` order, through finetune_ranks.GlobalOrder, batches of 2 x 8);
* Ctrl-C reaching one rank stops both after the same step, rank 0 saves the checkpoint, and the
  resumed run ends bit-identical to an uninterrupted one (per-rank RNG states restored);
* evaluation counts every validation example once (37, not the 38 of a padded sampler).

Tolerance against one process: each rank's gradient is the mean over its 8 rows and DDP averages
the two, where one process averages 16 rows at once: the same sum in another order, a few float32
ulps (~1e-7 relative) apart. AdamW's m / sqrt(v) carries that through 12 steps; we see at most
6e-8 absolute on parameters of size ~0.3. rtol 2e-5 / atol 1e-6 is ~15x that. The losses of the
history (float64 sums of float32 losses) differ by ~1e-7 relative: rtol 1e-6. Accuracies and
masks are compared exactly: a difference of 1e-7 changes an argmax or a magnitude ranking only at
a near-tie, and the data and seeds are fixed, so a run that passes once passes always here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import types

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

import distributed_harness as harness
import finetune_ranks
from pyfinetune import _distributed
from pyfinetune.finetuning import Finetuner

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.usefixtures("one_thread")]

TOL = dict(rtol=2e-5, atol=1e-6)
LOSS_TOL = dict(rel=1e-6)
METHODS = ["l2sp", "prune", "distill"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every scenario of finetune_ranks.py on each rank: ``[rank0, rank1]``."""
    return harness.run_ranks(os.path.join(harness.TESTS, "finetune_ranks.py"), tmp_path_factory.mktemp("ranks"),
                             world=finetune_ranks.WORLD, timeout_s=180)


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


# ------------------------------------------------------------------------------ Python API
@pytest.mark.parametrize("method", METHODS)
def test_ranks_end_bit_identical(ranks, method):
    r0, r1 = ranks[0][method], ranks[1][method]
    _assert_equal(r0["params"], r1["params"], "rank 0 vs rank 1")  # prune: weight_mask buffers included
    assert r0["history"] == r1["history"] and r0["evaluate"] == r1["evaluate"]
    assert r0["step"] == 2 * 6  # 46 examples per rank (91 padded to 92), batches of 8
    assert r0["evaluate"]["n"] == finetune_ranks.VAL  # each validation example once
    if method == "prune":
        assert any(k.endswith("weight_mask") for k in r0["params"])
        assert r0["history"][-1]["sparsity"] == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process_on_the_same_global_batches(ranks, method):
    dist_run = ranks[0][method]
    ref = finetune_ranks.SCENARIOS[method](harness.Run())
    assert dist_run["params"].keys() == ref["params"].keys() and dist_run["step"] == ref["step"]
    for k, v in ref["params"].items():
        if v.dtype == torch.bool:  # the pruner chose the same weights
            assert torch.equal(dist_run["params"][k], v), k
        else:
            torch.testing.assert_close(dist_run["params"][k], v, **TOL, msg=lambda m: f"{k}: {m}")
    for got, want in zip(dist_run["history"], ref["history"]):
        for key in ("train_loss", "val_loss"):
            assert got[key] == pytest.approx(want[key], **LOSS_TOL), key
        for key in ("epoch", "train_accuracy", "val_accuracy", "lr", "sparsity"):
            assert got[key] == want[key], key
    assert dist_run["evaluate"]["n"] == ref["evaluate"]["n"] == finetune_ranks.VAL
    assert dist_run["evaluate"]["loss"] == pytest.approx(ref["evaluate"]["loss"], **LOSS_TOL)


def test_distill_teacher_is_rank_0s_and_gets_no_gradients(ranks):
    r0, r1 = ranks[0]["distill"], ranks[1]["distill"]
    _assert_equal(r0["teacher"], r1["teacher"], "teacher")  # rank 1 built its own from another seed
    torch.manual_seed(100)
    expected = finetune_ranks.method_kwargs("distill", 0)["teacher"].state_dict()
    _assert_equal(r0["teacher"], dict(expected), "teacher vs rank 0's")
    assert all(g is None for g in r0["teacher_grads"] + r1["teacher_grads"])


def test_ctrl_c_on_one_rank_stops_both_and_resume_equals_an_uninterrupted_run(ranks):
    r0, r1 = ranks[0]["resume"], ranks[1]["resume"]
    assert r0["stopped"][:2] == r1["stopped"][:2] == (1, 6 + 3)  # both after step 3 of epoch 2
    assert r0["files"] == ["epoch-001.pt", "last.pt"]
    for r in (r0, r1):
        _assert_equal(r["resumed"]["params"], r["full"]["params"], "resumed vs uninterrupted")
        assert r["resumed"]["history"] == r["full"]["history"]
    _assert_equal(r0["full"]["params"], r1["full"]["params"], "rank 0 vs rank 1")


# ------------------------------------------------------------------------------ loader splitting
def test_ranks_draw_different_dropout_masks_and_stay_identical(ranks):
    # torch starts every process from one default seed: unless the Finetuner seeds each rank
    # apart, both ranks drop the same units at every step (their batches share their noise).
    for name in ("seeded", "unseeded"):
        r0, r1 = ranks[0]["dropout"][name], ranks[1]["dropout"][name]
        assert r0["first_mask"].shape == r1["first_mask"].shape
        assert not torch.equal(r0["first_mask"], r1["first_mask"]), f"{name}: both ranks drew one dropout mask"
        _assert_equal(r0["params"], r1["params"], f"{name}: weights after training")


def _group(rank=1, world=2):
    return types.SimpleNamespace(rank=rank, world=world)


def test_train_loader_split_and_its_refusals():
    data = TensorDataset(torch.arange(11.0), torch.zeros(11, dtype=torch.long))
    split = _distributed.shard_train_loader(DataLoader(data, batch_size=2, shuffle=False), _group(), seed=0)
    assert [int(i) for x, _ in split for i in x] == [1, 3, 5, 7, 9, 0]  # padded with the first example
    shuffled = _distributed.shard_train_loader(DataLoader(data, batch_size=2, shuffle=True), _group(), seed=0)
    assert shuffled.sampler.shuffle and len(shuffled) == 3
    weighted = DataLoader(data, batch_size=2, sampler=WeightedRandomSampler(torch.ones(11), 11))
    with pytest.raises(ValueError, match="sampler WeightedRandomSampler cannot be split over 2 processes"):
        _distributed.shard_train_loader(weighted, _group(), seed=0)
    other = DataLoader(data, batch_size=2, sampler=torch.utils.data.DistributedSampler(data, num_replicas=4, rank=0))
    with pytest.raises(ValueError, match="sampler is for num_replicas=4, but 2 processes train"):
        _distributed.shard_train_loader(other, _group(), seed=0)
    batches = [(torch.zeros(2), torch.zeros(2, dtype=torch.long))]
    assert _distributed.shard_train_loader(batches, _group(), seed=0) is batches  # the user's own split
    # DataLoader(batch_sampler=BatchSampler(...)): split like batch_size= (every rank went through
    # the whole dataset); one over a distributed sampler is kept; another batch sampler is refused.
    from torch.utils.data import BatchSampler, SequentialSampler

    by_batches = DataLoader(data, batch_sampler=BatchSampler(SequentialSampler(data), 2, drop_last=False))
    split = _distributed.shard_train_loader(by_batches, _group(), seed=0)
    assert [int(i) for x, _ in split for i in x] == [1, 3, 5, 7, 9, 0]
    kept = DataLoader(data, batch_sampler=BatchSampler(torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1),
                                                       2, drop_last=True))
    assert _distributed.shard_train_loader(kept, _group(), seed=0) is kept
    unbatched = DataLoader(data, batch_size=None, sampler=torch.utils.data.DistributedSampler(data, num_replicas=2,
                                                                                               rank=1))
    assert _distributed.shard_train_loader(unbatched, _group(), seed=0) is unbatched  # as before: used as it is
    plain = DataLoader(data, batch_size=None)
    assert _distributed.shard_train_loader(plain, _group(), seed=0) is plain
    custom = DataLoader(data, batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="batch_sampler list .*cannot be split over 2 processes"):
        _distributed.shard_train_loader(custom, _group(), seed=0)


def test_eval_loader_split_has_no_padding():
    data = TensorDataset(torch.arange(5.0), torch.zeros(5, dtype=torch.long))
    parts = [_distributed.shard_eval_loader(DataLoader(data, batch_size=2), _group(r)) for r in (0, 1)]
    assert [[int(i) for x, _ in p for i in x] for p in parts] == [[0, 2, 4], [1, 3]]


def test_a_ddp_model_is_refused():
    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self):  # no process group needed to check the type
            nn.Module.__init__(self)

    with pytest.raises(TypeError, match="model must be the module itself, not DistributedDataParallel"):
        Finetuner(FakeDDP())


# ------------------------------------------------------------------------------ the command
_HAS_VISION = all(importlib.util.find_spec(m) is not None for m in ("torchvision", "PIL"))


def interrupting_cnn(num_classes=10):
    """test_finetune_cli.tiny_cnn whose rank (``RANK``) ``PYFT_TEST_INTERRUPT_RANK`` presses Ctrl-C
    at its ``PYFT_TEST_INTERRUPT_AT``-th training forward, when both are set: a SIGINT to its
    process group, which holds torchrun and both ranks, as a terminal's Ctrl-C does (torchrun then
    forwards it to the ranks a second time)."""
    import test_finetune_cli

    model = test_finetune_cli.tiny_cnn(num_classes)
    at = int(os.environ.get("PYFT_TEST_INTERRUPT_AT", "0"))
    if not at or os.environ.get("RANK") != os.environ.get("PYFT_TEST_INTERRUPT_RANK"):
        return model
    calls = {"n": 0}

    def count(module, inputs):
        if module.training:
            calls["n"] += 1
            if calls["n"] == at:
                os.killpg(os.getpgid(0), signal.SIGINT)

    model.register_forward_pre_hook(count)
    return model


def _torchrun_options():
    import test_finetune_cli

    return ["--model", "test_finetune_distributed:interrupting_cnn", "--image-size", test_finetune_cli.SIZE,
            "--epochs", 2, "--batch-size", 4, "--lr", 1e-2, "--workers", 0, "--no-progress", "--method", "prune",
            "--sparsity", 0.5, "--device", "cpu"]  # gloo ranks on the CPU, also where a GPU is visible


def _torchrun(data, out, *extra, env=None):
    """``python -m torch.distributed.run --nproc_per_node 2 -m pyfinetune finetune ...`` (prune)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
            "pyfinetune", "finetune", "--data", data, "--out", out, *_torchrun_options(), *extra]
    environ = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}),
                   PYTHONPATH=os.pathsep.join([harness.ROOT, harness.TESTS] +
                                              [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([str(a) for a in argv], env=environ, capture_output=True, text=True, timeout=180,
                          cwd=str(out.parent), start_new_session=True)  # its own process group for Ctrl-C


def _history(out):
    return [{k: v for k, v in h.items() if k != "seconds"}
            for h in json.loads((out / "metrics.json").read_text())["history"]]


@pytest.mark.skipif(not _HAS_VISION, reason="needs torchvision and pillow")
def test_finetune_command_under_torchrun_interrupted_and_resumed(tmp_path, capsys):
    import test_finetune_cli  # its image writer and tiny model

    data = tmp_path / "images"
    test_finetune_cli._write_images(data)  # 3 classes x 8: 18 training images (9 per rank), 6 for validation
    full = _torchrun(data, tmp_path / "full")
    assert full.returncode == 0, full.stdout + full.stderr
    assert full.stdout.count("done: 2 epochs") == 1  # rank 0 alone reports
    assert "batch: 4 images per process x 2 processes = 8 per step" in full.stdout
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert (metrics["processes"], metrics["global_batch_size"]) == (2, 8)
    assert metrics["history"][-1]["sparsity"] == pytest.approx(0.5, abs=0.01)

    run = tmp_path / "run"  # Ctrl-C at rank 1's 5th step (epoch 2, batch 2 of 3)
    stopped = _torchrun(data, run, env={"PYFT_TEST_INTERRUPT_AT": "5", "PYFT_TEST_INTERRUPT_RANK": "1"})
    assert stopped.returncode != 0 and "checkpoint saved to" in stopped.stderr, stopped.stdout + stopped.stderr
    assert json.loads((run / "metrics.json").read_text())["interrupted"] is True
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"], len(state["ranks"])) == (1, 5, 2)
    assert not (run / "model.pt").exists()

    resumed = _torchrun(data, run, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    expected = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    got = torch.load(run / "model.pt", weights_only=True)
    _assert_equal(got, expected, "resumed vs uninterrupted model.pt")
    assert _history(run) == _history(tmp_path / "full")

    # one process cannot continue a run of two
    code = test_finetune_cli.cli.main([str(a) for a in ["finetune", "--data", data, "--out", tmp_path / "full",
                                                        "--resume"] + _torchrun_options()])
    assert code == 2 and "2 processes then (torchrun --nproc_per_node), 1 now" in capsys.readouterr().err


@pytest.mark.skipif(not _HAS_VISION, reason="needs torchvision and pillow")
def test_finetune_command_outside_torchrun_with_world_size_2_says_how_to_launch(tmp_path, monkeypatch, capsys):
    from pyfinetune import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    code = cli.main([str(a) for a in ["finetune", "--data", tmp_path, "--out", tmp_path / "out", "--device", "cpu"]])
    err = capsys.readouterr().err
    assert code == 2 and "could not join the process group of WORLD_SIZE=2 (gloo)" in err, err
    assert "launch with torchrun --nproc_per_node N" in err and not dist.is_initialized()
