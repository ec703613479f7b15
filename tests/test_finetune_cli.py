"""``pyfinetune finetune`` on a tiny ImageFolder written by the test (PIL PNGs, three classes of
distinct colors and stripes): outputs, each method, Ctrl-C and --resume (bit-identical final
weights), and every bad input refused with exit code 2 and a one-line message before training."""

from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

from pyfinetune import _finetune_cli, cli  # noqa: E402
from pyfinetune.prune import SparseLinear, load_pruned_state_dict, sparsify  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

SIZE = 32
COLORS = {"circle": (210, 40, 40), "square": (40, 190, 60), "stripes": (40, 60, 210)}


def tiny_cnn(num_classes=10):
    """The user's model of the tests: ``module.path:factory`` is ``test_finetune_cli:tiny_cnn``."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, num_classes))


def flat_mlp(num_classes=10):
    """A model for 32x32 images only."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, num_classes))


def five_outputs():
    """A teacher that ignores the number of classes."""
    return tiny_cnn(5)


def _write_images(root, classes=COLORS, per_class=8, seed=0):
    rng = random.Random(seed)
    for c, rgb in classes.items():
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            im = Image.new("RGB", (SIZE, SIZE), tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in rgb))
            for x in range(0, SIZE, 4 + list(classes).index(c) * 2):  # class-specific stripes
                for y in range(SIZE):
                    im.putpixel((x, y), (255, 255, 255))
            im.save(root / c / f"{i}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _write_images(root)
    (root / "circle" / "broken.png").write_bytes(b"this is not a png")
    good = (root / "square" / "0.png").read_bytes()
    (root / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def _main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _args(data, out, *extra, epochs=2):
    return ["finetune", "--data", data, "--out", out, "--model", "test_finetune_cli:tiny_cnn", "--image-size", SIZE,
            "--epochs", epochs, "--batch-size", 4, "--lr", 1e-2, "--workers", 0, "--no-progress", *extra]


# ------------------------------------------------------------------------------ training
def test_finetune_writes_checkpoints_model_metrics_and_plot(data, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _main(_args(data, out, epochs=3), capsys)
    assert code == 0, err
    assert sorted(os.listdir(out / "checkpoints")) == ["epoch-001.pt", "epoch-002.pt", "epoch-003.pt", "last.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["circle", "square", "stripes"]
    assert (metrics["train_images"], metrics["val_images"]) == (18, 6)  # 24 readable images, 2 of 8 per class held out
    assert sorted(os.path.basename(s["path"]) for s in metrics["skipped_images"]) == ["broken.png", "truncated.png"]
    assert "skipped unreadable image" in err and "broken.png" in err and "truncated.png" in err
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3] and metrics["interrupted"] is False
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert metrics["final"]["val_accuracy"] >= 2 / 3
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = tiny_cnn(3)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert "done: 3 epochs" in stdout and "validation accuracy" in stdout


def test_prune_l2sp_and_distill(data, tmp_path, capsys):
    code, _, err = _main(_args(data, tmp_path / "prune", "--method", "prune", "--sparsity", 0.5), capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "prune" / "metrics.json").read_text())
    assert metrics["history"][-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "load_pruned_state_dict" in metrics["model_format"]
    state = torch.load(tmp_path / "prune" / "model.pt", weights_only=True)
    assert "7.weight_mask" in state and "9.weight_mask" not in state  # the head is not pruned
    model = tiny_cnn(3)
    load_pruned_state_dict(model, state)
    assert isinstance(sparsify(model)[7], SparseLinear)

    code, _, err = _main(_args(data, tmp_path / "l2sp", "--method", "l2sp", "--l2sp", 0.1), capsys)
    assert code == 0, err

    code, _, err = _main(_args(data, tmp_path / "distill", "--method", "distill", "--teacher",
                               "test_finetune_cli:tiny_cnn", "--teacher-weights", tmp_path / "l2sp" / "model.pt"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "distill" / "metrics.json").read_text())["method"] == "distill"


def test_torchvision_model_with_weights_gets_a_new_head(data, tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # stands for ImageNet weights
    code, stdout, err = _main(["finetune", "--data", data, "--out", tmp_path / "run", "--model", "torchvision:resnet18",
                               "--weights", weights, "--image-size", SIZE, "--epochs", 1, "--batch-size", 8,
                               "--workers", 0, "--val-split", 0, "--no-progress"], capsys)
    assert code == 0, err
    assert f"weights from {weights}" in stdout and "new head fc: 1000 -> 3 classes" in stdout
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert state["fc.weight"].shape == (3, 512)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val_images"] == 0


def test_ctrl_c_saves_a_checkpoint_and_resume_ends_where_an_uninterrupted_run_does(data, tmp_path, capsys,
                                                                                   monkeypatch):
    code, _, err = _main(_args(data, tmp_path / "full", "--method", "l2sp", epochs=3), capsys)
    assert code == 0, err

    reads = {"n": 0}
    get = _finetune_cli._Samples.__getitem__

    def interrupting(self, i):
        reads["n"] += 1
        if reads["n"] == 18 + 6 + 5:  # epoch 2 (after 18 training and 6 validation images), second batch
            os.kill(os.getpid(), signal.SIGINT)
        return get(self, i)

    monkeypatch.setattr(_finetune_cli._Samples, "__getitem__", interrupting)
    run = tmp_path / "interrupted"
    code, _, err = _main(_args(data, run, "--method", "l2sp", epochs=3), capsys)
    assert code == 130
    assert f"checkpoint saved to {run / 'checkpoints' / 'last.pt'}" in err and "--resume" in err
    assert json.loads((run / "metrics.json").read_text())["interrupted"] is True
    assert not (run / "model.pt").exists()
    monkeypatch.setattr(_finetune_cli._Samples, "__getitem__", get)

    code, _, err = _main(_args(data, run, "--method", "l2sp", epochs=3), capsys)
    assert code == 2 and "already holds a run; add --resume" in err
    code, _, err = _main(_args(data, run, "--method", "l2sp", "--resume", epochs=4), capsys)
    assert code == 2 and "--epochs 3 then, 4 now" in err
    code, _, err = _main(_args(data, run, "--method", "l2sp", "--resume", epochs=3), capsys)
    assert code == 0, err
    resumed = torch.load(run / "model.pt", weights_only=True)
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    for name, value in full.items():
        assert torch.equal(resumed[name], value), name
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in history] == \
           [h["train_loss"] for h in json.loads((tmp_path / "full" / "metrics.json").read_text())["history"]]


# ------------------------------------------------------------------------------ bad inputs
def _bad_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    (no_images / "a").mkdir(parents=True)
    (no_images / "b").mkdir()
    (no_images / "a" / "notes.txt").write_text("not an image")
    one_class = tmp_path / "one_class"
    _write_images(one_class, {"only": (1, 2, 3)}, per_class=2)
    unreadable_class = tmp_path / "unreadable_class"
    _write_images(unreadable_class, {"a": (1, 2, 3)}, per_class=2)
    (unreadable_class / "b").mkdir()
    (unreadable_class / "b" / "x.png").write_bytes(b"broken")
    return {"empty": empty, "no_images": no_images, "one_class": one_class, "unreadable_class": unreadable_class}


@pytest.mark.parametrize("case, message", [
    ("missing data", "--data {tmp}/nowhere does not exist"),
    ("empty data", "has no class subfolders"),
    ("no images", "has no images (.jpg"),
    ("one class", "has one class (only); fine-tuning a classifier needs two or more"),
    ("unreadable class", "class folders without a readable image: b"),
    ("unknown torchvision model", "unknown torchvision classification model 'resnet19'; did you mean resnet18"),
    ("model without kind", "--model must be torchvision:NAME or module.path:factory, got 'resnet18'"),
    ("model module missing", "--model: cannot import 'no_such_module': ModuleNotFoundError"),
    ("model factory missing", "--model: test_finetune_cli has no callable 'nothing'"),
    ("weights missing", "--weights {tmp}/nowhere.pt does not exist"),
    ("weights not a torch file", "is not a readable state_dict"),
    ("weights of another model", "do not match test_finetune_cli:tiny_cnn: missing keys: 0.weight, 0.bias, 1.weight"),
    ("distill without teacher", "--method distill needs --teacher SPEC"),
    ("teacher with other classes", "--teacher test_finetune_cli:five_outputs outputs (1, 5) for one image, expected (1, 3)"),
    ("teacher for baseline", "--teacher is an option of --method distill, not of --method baseline"),
    ("sparsity for l2sp", "--sparsity is an option of --method prune, not of --method l2sp"),
    ("sparsity out of range", "sparsity must be a finite number in [0.0, 1.0), got 1.5"),
    ("model for other image sizes", "--model test_finetune_cli:flat_mlp fails on a 16x16 image: RuntimeError"),
    ("resume without a run", "--resume: no checkpoint at"),
    ("batch size", "--batch-size 0 is out of range"),
    ("temperature for l2sp", "--temperature is an option of --method distill, not of --method l2sp"),
    # Equal to the default, these used to be accepted and go unused.
    ("temperature 2 for l2sp", "--temperature is an option of --method distill, not of --method l2sp"),
    ("alpha for prune", "--alpha is an option of --method distill, not of --method prune"),
    ("val split beside val", "--val-split 0.2 splits --data when --val is not given"),
    ("unreadable checkpoint", "cannot read the checkpoint {tmp}/garbage.pt"),
    ("seed too large", "--seed 99999999999999999999 is out of range"),
    ("negative seed", "--seed -1 is out of range"),
    ("meta device", "--device 'meta': a device with memory is needed"),
    ("truncated run.json", "--resume: cannot read {tmp}/broken/run.json (JSONDecodeError"),
    ("run.json of a list", "--resume: {tmp}/listed/run.json does not hold the run's options (a JSON object), got list"),
])
def test_bad_input_is_refused_before_training(case, message, data, tmp_path, capsys):
    folders = _bad_folders(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage")
    other_weights = tmp_path / "other.pt"
    torch.save(nn.Linear(2, 2).state_dict(), other_weights)
    for name, text in (("broken", '{"method": "base'), ("listed", "[1, 2]")):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "last.pt").write_bytes(b"x")
        (tmp_path / name / "run.json").write_text(text)
    argv = {
        "missing data": _args(tmp_path / "nowhere", tmp_path / "out"),
        "empty data": _args(folders["empty"], tmp_path / "out"),
        "no images": _args(folders["no_images"], tmp_path / "out"),
        "one class": _args(folders["one_class"], tmp_path / "out"),
        "unreadable class": _args(folders["unreadable_class"], tmp_path / "out"),
        "unknown torchvision model": _args(data, tmp_path / "out", "--model", "torchvision:resnet19"),
        "model without kind": _args(data, tmp_path / "out", "--model", "resnet18"),
        "model module missing": _args(data, tmp_path / "out", "--model", "no_such_module:f"),
        "model factory missing": _args(data, tmp_path / "out", "--model", "test_finetune_cli:nothing"),
        "weights missing": _args(data, tmp_path / "out", "--weights", tmp_path / "nowhere.pt"),
        "weights not a torch file": _args(data, tmp_path / "out", "--weights", garbage),
        "weights of another model": _args(data, tmp_path / "out", "--weights", other_weights),
        "distill without teacher": _args(data, tmp_path / "out", "--method", "distill"),
        "teacher with other classes": _args(data, tmp_path / "out", "--method", "distill", "--teacher",
                                            "test_finetune_cli:five_outputs"),
        "teacher for baseline": _args(data, tmp_path / "out", "--teacher", "test_finetune_cli:tiny_cnn"),
        "sparsity for l2sp": _args(data, tmp_path / "out", "--method", "l2sp", "--sparsity", 0.5),
        "sparsity out of range": _args(data, tmp_path / "out", "--method", "prune", "--sparsity", 1.5),
        "model for other image sizes": _args(data, tmp_path / "out", "--model", "test_finetune_cli:flat_mlp")
        + ["--image-size", "16"],
        "resume without a run": _args(data, tmp_path / "out", "--resume"),
        "batch size": _args(data, tmp_path / "out") + ["--batch-size", "0"],
        "temperature for l2sp": _args(data, tmp_path / "out", "--method", "l2sp", "--temperature", 4),
        "temperature 2 for l2sp": _args(data, tmp_path / "out", "--method", "l2sp", "--temperature", 2),
        "alpha for prune": _args(data, tmp_path / "out", "--method", "prune", "--alpha", 0.5),
        "val split beside val": _args(data, tmp_path / "out", "--val", data, "--val-split", 0.2),
        "unreadable checkpoint": _args(data, tmp_path / "out", "--resume", garbage),
        "seed too large": _args(data, tmp_path / "out") + ["--seed", "99999999999999999999"],
        "negative seed": _args(data, tmp_path / "out") + ["--seed", "-1"],
        "meta device": _args(data, tmp_path / "out") + ["--device", "meta"],
        "truncated run.json": _args(data, tmp_path / "broken", "--resume"),
        "run.json of a list": _args(data, tmp_path / "listed", "--resume"),
    }[case]
    code, stdout, err = _main(argv, capsys)
    assert code == 2
    assert message.format(tmp=tmp_path) in err
    assert err.splitlines()[-1].startswith("pyfinetune finetune: error: ") and "Traceback" not in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_unknown_method_is_an_argparse_error(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in _args(data, tmp_path / "out", "--method", "magic")])
    assert e.value.code == 2
    assert "argument --method: invalid choice: 'magic'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_device_without_a_gpu(data, tmp_path, capsys):
    code, _, err = _main(_args(data, tmp_path / "out", "--device", "cuda"), capsys)
    assert code == 2 and "--device cuda: no CUDA device is visible" in err


@pytest.mark.parametrize("name", [None, "cuda"])
def test_torchrun_rank_without_a_gpu_of_its_own_is_a_usage_error(monkeypatch, name):
    # Two ranks on a machine with one GPU: rank 1 has no cuda:1. With --device cuda or the default
    # (a GPU when one is visible), the command stops with a message, not a CUDA "invalid device
    # ordinal" from deep inside the first allocation.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(_finetune_cli.UsageError, match=r"LOCAL_RANK=1 has no GPU of its own \(1 visible\).*--device cpu"):
        _finetune_cli._device(name)
    assert _finetune_cli._device("cpu") == torch.device("cpu")


def test_run_stopped_before_its_first_checkpoint_starts_over(data, tmp_path, capsys):
    # A crash in epoch 1 leaves run.json and no checkpoint: --resume says so, and the same
    # command without it starts the run again.
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    code, _, err = _main(_args(data, out, "--resume"), capsys)
    assert code == 2 and "stopped before its first checkpoint" in err and "without --resume" in err
    code, _, err = _main(_args(data, out, epochs=1), capsys)
    assert code == 0, err
    assert (out / "checkpoints" / "last.pt").exists()
    code, _, err = _main(_args(data, out, epochs=1), capsys)
    assert code == 2 and "already holds a run" in err


def test_weights_whose_head_has_the_data_classes_load_whole(data, tmp_path, capsys):
    # Continuing from a previous run's model.pt: its head already has the folder's 3 classes and is
    # loaded with the rest, not replaced by a new layer.
    torchvision = pytest.importorskip("torchvision")
    previous = torchvision.models.resnet18(num_classes=3)
    torch.nn.init.constant_(previous.fc.weight, 0.125)
    weights = tmp_path / "model.pt"
    torch.save(previous.state_dict(), weights)
    code, stdout, err = _main(["finetune", "--data", data, "--out", tmp_path / "run", "--model", "torchvision:resnet18",
                               "--weights", weights, "--image-size", SIZE, "--epochs", 1, "--batch-size", 8,
                               "--workers", 0, "--val-split", 0, "--no-progress", "--lr", 1e-9], capsys)
    assert code == 0, err
    assert "head fc included: 3 classes" in stdout and "new head" not in stdout
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    torch.testing.assert_close(state["fc.weight"], previous.fc.weight.detach(), atol=1e-6, rtol=0)
