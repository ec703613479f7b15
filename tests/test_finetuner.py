"""pyfinetune.Finetuner / pyfinetune.finetune: every method learns a small synthetic task, a run
interrupted (at an epoch boundary, or by Ctrl-C in the middle of an epoch) and resumed from its
checkpoint ends with bit-identical weights, and bad arguments are refused with a message that
names them."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import pyfinetune
from pyfinetune.finetuning import Finetuner, find_head
from pyfinetune.prune import MaskedLinear, SparseLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread

D_IN, HIDDEN, CLASSES = 16, 32, 4
_W = torch.randn(D_IN, CLASSES, generator=torch.Generator().manual_seed(7))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    return x, (x @ _W).argmax(1)


def _loader(n=128, seed=0, batch_size=16, shuffle=True):
    return DataLoader(TensorDataset(*_data(n, seed)), batch_size=batch_size, shuffle=shuffle)


def _mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.LayerNorm(HIDDEN), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def _teacher():
    torch.manual_seed(100)
    teacher = nn.Sequential(nn.Linear(D_IN, 64), nn.ReLU(), nn.Linear(64, CLASSES))
    Finetuner(teacher, lr=1e-2, epochs=6, progress=False).fit(_loader(512, seed=5))
    return teacher


@pytest.fixture(scope="module")
def teacher(one_thread):
    return _teacher()


def _method_kwargs(method, teacher):
    return {"baseline": {}, "l2sp": {"l2sp": 1e-2}, "distill": {"teacher": teacher},
            "prune": {"sparsity": 0.75}}[method]


# ------------------------------------------------------------------------------ learning
@pytest.mark.parametrize("method", ["baseline", "l2sp", "distill", "prune"])
def test_each_method_learns(method, teacher):
    model = _mlp()
    tuner = Finetuner(model, method, lr=1e-2, epochs=4, seed=0, progress=False, **_method_kwargs(method, teacher))
    val = _loader(256, seed=1, shuffle=False)
    before = tuner.evaluate(val)
    history = tuner.fit(_loader(), val)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert set(history[0]) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                               "sparsity", "seconds"}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > max(before["accuracy"] + 0.2, 0.6)
    assert history[-1]["val_loss"] < before["loss"]
    assert history[-1]["lr"] < 1e-2 * 0.2  # cosine schedule
    optimizer_class = torch.optim.AdamW if method == "baseline" else pyfinetune.optim.AdamW
    assert type(tuner.optimizer) is optimizer_class
    no_decay = [g for g in tuner.optimizer.param_groups if g["name"].endswith("_no_decay")]
    assert no_decay and all(g["weight_decay"] == 0 for g in no_decay)
    assert all(p.ndim == 1 for g in no_decay for p in g["params"])
    if method != "prune":
        assert all(h["sparsity"] is None for h in history)
        assert tuner.export() is model


def test_l2sp_pulls_the_body_toward_its_start_and_leaves_the_head_free():
    def run(method, **kw):
        model = _mlp()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        tuner = Finetuner(model, method, lr=1e-2, epochs=2, seed=0, progress=False, **kw)
        tuner.fit(_loader())
        return tuner, {k: float((v - start[k]).norm()) for k, v in model.state_dict().items()}

    tuner, moved = run("l2sp", l2sp=10.0)
    _, moved_baseline = run("baseline")
    assert tuner.head == ["6"]
    groups = {g["name"]: g for g in tuner.optimizer.param_groups}
    assert groups["body"]["l2sp"] == 10.0 and groups["head"]["l2sp"] == 0.0
    assert all(tuner.optimizer.anchor_of(p) is not None for p in groups["body"]["params"])
    assert all(tuner.optimizer.anchor_of(p) is None for g in ("head", "head_no_decay", "body_no_decay")
               for p in groups[g]["params"])
    assert moved["0.weight"] < 0.5 * moved_baseline["0.weight"]
    assert moved["6.weight"] > 0.5 * moved_baseline["6.weight"]


def test_distill_follows_the_teacher_and_leaves_it_alone(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()
    student = _mlp()
    x, _ = _data(256, seed=3)

    def agreement():
        with torch.no_grad():
            return float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())

    start = agreement()
    Finetuner(student, "distill", teacher=teacher, lr=1e-2, alpha=1.0, epochs=6, seed=0, progress=False).fit(_loader(256))
    assert not teacher.training
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert agreement() > max(start, 0.8)


def test_prune_reaches_the_sparsity_and_exports_sparse_linear_layers():
    model = _mlp()
    tuner = Finetuner(model, "prune", sparsity=0.8, lr=1e-2, epochs=3, seed=0, progress=False)
    history = tuner.fit(_loader())
    assert history[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert 0 < history[0]["sparsity"] < 0.8  # the cubic schedule is under way after the first epoch
    assert isinstance(model[0], MaskedLinear) and isinstance(model[4], MaskedLinear)
    assert type(model[6]) is nn.Linear  # the head is not pruned
    assert (model[0].weight[~model[0].weight_mask] == 0).all()
    exported = tuner.export()
    assert exported is not model and not exported.training
    assert isinstance(exported[0], SparseLinear) and isinstance(exported[4], SparseLinear)
    x, _ = _data(32, seed=4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_prune_keeps_the_stem_convolution_and_a_named_head_dense_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    x = torch.randn(64, 1, 4, 4)
    loader = DataLoader(TensorDataset(x, x.flatten(1)[:, :CLASSES].argmax(1)), batch_size=16)
    tuner = Finetuner(model, "prune", sparsity=0.5, epochs=1, seed=0, progress=False)
    tuner.fit(loader)
    assert [type(m).__name__ for m in model if not isinstance(m, (nn.ReLU, nn.Flatten))] == [
        "Conv2d", "MaskedConv2d", "MaskedLinear", "Linear"]
    # an explicit prune_exclude replaces the default: here the stem is pruned too
    torch.manual_seed(0)
    model2 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                           nn.Linear(32, CLASSES))
    Finetuner(model2, "prune", sparsity=0.5, epochs=1, seed=0, progress=False, prune_exclude=["5"]).fit(loader)
    assert [type(m).__name__ for m in model2 if not isinstance(m, (nn.ReLU, nn.Flatten))] == [
        "MaskedConv2d", "MaskedLinear", "Linear"]


@pytest.mark.parametrize("exclude", [[], "nothing-matches", lambda name, module: False])
def test_prune_exclude_never_prunes_the_head(exclude):
    model = _mlp()
    Finetuner(model, "prune", sparsity=0.5, epochs=1, seed=0, progress=False, prune_exclude=exclude).fit(_loader())
    assert isinstance(model[0], MaskedLinear) and isinstance(model[4], MaskedLinear)
    assert type(model[6]) is nn.Linear


def test_prune_exclude_and_find_unused_parameters_are_checked():
    with pytest.raises(TypeError, match="prune_exclude"):
        Finetuner(_mlp(), "prune", sparsity=0.5, prune_exclude=3)
    with pytest.raises(TypeError, match="find_unused_parameters"):
        Finetuner(_mlp(), find_unused_parameters="yes")


def test_amp_bfloat16_and_grad_clip_train():
    tuner = Finetuner(_mlp(), "l2sp", lr=1e-2, epochs=2, amp=torch.bfloat16, grad_clip=1.0, progress=False)
    history = tuner.fit(_loader())
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_finetune_returns_the_exported_model_and_history():
    model, history = pyfinetune.finetune(_mlp(), _loader(), "prune", sparsity=0.5, epochs=2, progress=False)
    assert isinstance(model[0], SparseLinear) and len(history) == 2 and history[-1]["val_loss"] is None


def test_progress_bars_can_be_turned_off(capsys):
    Finetuner(_mlp(), epochs=1, progress=True).fit(_loader(32), _loader(32))
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "evaluate" in err
    Finetuner(_mlp(), epochs=1, progress=False).fit(_loader(32), _loader(32))
    assert capsys.readouterr().err == ""


def test_import_pyfinetune_does_not_import_the_training_loop():
    code = "import sys, pyfinetune; assert 'pyfinetune.finetuning' not in sys.modules; pyfinetune.Finetuner; " \
           "assert 'pyfinetune.finetuning' in sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ------------------------------------------------------------------------------ resume
class _InterruptingData(Dataset):
    """The synthetic data set; with ``interrupt_at`` it sends this process a SIGINT (Ctrl-C)
    while loading that item, the ``n``-th time it is read."""

    def __init__(self, interrupt_at=None, n=96):
        self.x, self.y = _data(n, seed=0)
        self.interrupt_at, self.reads = interrupt_at, 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.x[i], self.y[i]


def _tuner(method, teacher, seed):
    return Finetuner(_mlp(seed, dropout=0.2), method, lr=1e-2, epochs=3, seed=11, progress=False,
                     **_method_kwargs(method, teacher))


def _without_seconds(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _assert_same_run(a, b):
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert _without_seconds(a.history) == _without_seconds(b.history)
    assert a.step == b.step and a.epoch == b.epoch


@pytest.mark.parametrize("method", ["baseline", "l2sp", "distill", "prune"])
def test_ctrl_c_mid_epoch_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(
        method, teacher, tmp_path):
    reference = _tuner(method, teacher, seed=0)
    reference.fit(DataLoader(_InterruptingData(), batch_size=16, shuffle=True))

    handler = signal.getsignal(signal.SIGINT)
    tuner = _tuner(method, teacher, seed=0)
    interrupting = _InterruptingData(interrupt_at=96 + 40)  # epoch 2, batch 3
    with pytest.raises(KeyboardInterrupt):
        tuner.fit(DataLoader(interrupting, batch_size=16, shuffle=True), checkpoint_dir=tmp_path)
    assert signal.getsignal(signal.SIGINT) is handler
    assert tuner.interrupted_checkpoint == str(tmp_path / "last.pt")
    assert (tuner.epoch, tuner.step) == (1, 6 + 3)  # the running step finished, then it stopped
    assert sorted(os.listdir(tmp_path)) == ["epoch-001.pt", "last.pt"]

    resumed = _tuner(method, teacher, seed=1)  # other starting weights: everything must come from the file
    resumed.fit(DataLoader(_InterruptingData(), batch_size=16, shuffle=True), resume=tmp_path / "last.pt")
    _assert_same_run(resumed, reference)
    if method == "l2sp":  # the anchors are the first run's starting weights, not the second's
        anchors = [resumed.optimizer.anchor_of(p) for p in resumed.optimizer.param_groups[0]["params"]]
        assert torch.equal(anchors[0], _mlp(0)[0].weight)


def test_resume_from_an_epoch_checkpoint_with_load_checkpoint(tmp_path):
    reference = _tuner("prune", None, seed=0)
    reference.fit(_loader(), checkpoint_dir=tmp_path / "full")
    assert sorted(os.listdir(tmp_path / "full")) == ["epoch-001.pt", "epoch-002.pt", "epoch-003.pt", "last.pt"]
    resumed = _tuner("prune", None, seed=1)
    resumed.load_checkpoint(tmp_path / "full" / "epoch-001.pt")
    assert resumed.epoch == 1 and len(resumed.history) == 1
    resumed.fit(_loader())
    _assert_same_run(resumed, reference)
    assert _without_seconds(resumed.fit(_loader())) == _without_seconds(reference.history)  # done already


def test_keyboard_interrupt_raised_in_the_loop_saves_the_last_whole_step(tmp_path):
    def stop(tuner, record):
        raise KeyboardInterrupt

    tuner = _tuner("l2sp", None, seed=0)
    with pytest.raises(KeyboardInterrupt):
        tuner.fit(_loader(), checkpoint_dir=tmp_path, callback=stop)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 8 and state["batch_in_epoch"] == 0


@pytest.mark.parametrize("epochs", [1, 3])
def test_ctrl_c_between_steps_stops_after_the_epoch(tmp_path, epochs):
    # A Ctrl-C that lands outside the batch loop (here in the callback, after validation and the
    # checkpoint) stops fit after that epoch, also after the last one, with no further step.
    def ctrl_c(tuner, record):
        os.kill(os.getpid(), signal.SIGINT)

    tuner = _tuner("l2sp", None, seed=0)
    with pytest.raises(KeyboardInterrupt):
        tuner.fit(_loader(), _loader(32, seed=1), epochs=epochs, checkpoint_dir=tmp_path, callback=ctrl_c)
    assert (tuner.epoch, tuner.step) == (1, 8)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 8 and state["batch_in_epoch"] == 0


def test_resume_refuses_another_run(tmp_path):
    tuner = _tuner("l2sp", None, seed=0)
    tuner.fit(_loader(), epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="planned for 1 epochs of 8 batches, got 3 epochs"):
        tuner.fit(_loader())
    with pytest.raises(ValueError, match="another run.*method: checkpoint 'l2sp', here 'baseline'"):
        Finetuner(_mlp(), "baseline", progress=False).load_checkpoint(tmp_path / "last.pt")
    with pytest.raises(ValueError, match="planned for 1 epochs of 8 batches, got 1 epochs of 4 batches"):
        _tuner("l2sp", None, seed=0).fit(_loader(batch_size=32), epochs=1, resume=tmp_path / "last.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        _tuner("l2sp", None, seed=0).load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a Finetuner checkpoint"):
        _tuner("l2sp", None, seed=0).load_state_dict({"model": {}})


@pytest.mark.parametrize("case", ["prune_every", "prune_end", "frozen", "epochs", "float64_anchor"])
def test_a_refused_resume_changes_nothing(tmp_path, case):
    # Each refusal comes before the model, its masks, the optimizer or the counters change: the
    # Finetuner can still train from where it was.
    method = "l2sp" if case == "float64_anchor" else "prune"
    saved_model = _mlp(3).double() if case == "float64_anchor" else _mlp(3)
    data = _loader(n=64)
    if case == "float64_anchor":
        x, y = _data(64, 0)
        data64 = DataLoader(TensorDataset(x.double(), y), batch_size=16)
        Finetuner(saved_model, method, epochs=2, progress=False).fit(data64, checkpoint_dir=tmp_path)
    else:
        Finetuner(saved_model, method, epochs=2, progress=False).fit(data, checkpoint_dir=tmp_path)
    model = _mlp(4)
    kwargs = dict(epochs=2, progress=False)
    if case == "prune_every":
        kwargs["prune_every"] = 3
    elif case == "prune_end":
        kwargs["prune_end"] = 0.5
    elif case == "epochs":
        kwargs["epochs"] = 5
    elif case == "frozen":
        model[0].weight.requires_grad_(False)
    tuner = Finetuner(model, method, **kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    match = {"prune_every": r"pruning schedule differs .*every: checkpoint 1, here 3",
             "prune_end": r"pruning schedule differs .*end_step",
             "epochs": r"planned for 2 epochs of 4 batches, got 5 epochs of 4 batches",
             "frozen": r"optimizer has parameter groups of sizes",
             "float64_anchor": r"its anchor is torch.float64"}[case]
    with pytest.raises(ValueError, match=match):
        tuner.fit(data, resume=tmp_path / "epoch-001.pt")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert [type(m) for m in model.modules()] == kinds
    assert tuner.step == 0 and tuner.epoch == 0 and tuner.history == []
    assert all(not st for st in tuner.optimizer.state.values()) or method == "l2sp"
    tuner.fit(data)  # still a fresh run


def test_teacher_sharing_the_students_parameters_is_refused():
    student = _mlp()
    for teacher in (student, nn.Sequential(student[0], nn.Linear(HIDDEN, CLASSES))):
        with pytest.raises(ValueError, match="teacher shares parameters that model trains"):
            Finetuner(student, "distill", teacher=teacher, progress=False)
    # A frozen layer shared by both (an embedding) is fine.
    student[0].requires_grad_(False)
    Finetuner(student, "distill", teacher=nn.Sequential(student[0], nn.Linear(HIDDEN, CLASSES)), progress=False)


def test_an_unusable_checkpoint_dir_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    tuner = Finetuner(_mlp(), epochs=1, progress=False)
    before = {k: v.clone() for k, v in tuner.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint_dir .*file/ck cannot be created \((NotADirectoryError|FileExistsError)"):
        tuner.fit(_loader(n=32), checkpoint_dir=tmp_path / "file" / "ck")
    assert tuner.step == 0 and all(torch.equal(v, before[k]) for k, v in tuner.model.state_dict().items())


@pytest.mark.parametrize("labels, model, error, match", [
    ("float", "one_output", TypeError, r"labels must be class indices \(an integer tensor \[batch\]\), got a torch.float32"),
    ("bool", "mlp", TypeError, r"got a torch.bool tensor"),
    ("one_hot", "mlp", ValueError, r"logits must be \[batch, classes\] and the labels \[batch\], got logits of shape "
                                   r"\(16, 4\) and labels of shape \(16, 4\)"),
])
def test_labels_that_are_not_class_indices_are_refused(labels, model, error, match):
    # A float label tensor would reach F.cross_entropy as class probabilities (a one-output model's
    # [16] logits against [16] float labels trains as one sample over 16 classes), one-hot labels
    # would give a meaningless accuracy. Refused before any parameter changes, in fit and evaluate.
    x = torch.randn(16, D_IN)
    y = torch.randint(0, CLASSES, (16,))
    lab = {"float": y.float(), "bool": y > 0, "one_hot": torch.nn.functional.one_hot(y, CLASSES)}[labels]
    net = nn.Sequential(nn.Linear(D_IN, 1), nn.Flatten(0)) if model == "one_output" else _mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tuner = Finetuner(net, epochs=1, progress=False)
    with pytest.raises(error, match=match):
        tuner.fit([(x, lab)])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(error, match=match):
        tuner.evaluate([(x, lab)])


# ------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("kwargs, error, match", [
    ({"method": "sgd"}, ValueError, r"method must be one of \('baseline', 'l2sp', 'distill', 'prune'\), got 'sgd'"),
    ({"method": "distill"}, ValueError, "method='distill' needs teacher="),
    ({"teacher": nn.Linear(2, 2)}, ValueError, "teacher is an argument of method='distill', not of method='baseline'"),
    ({"method": "l2sp", "teacher": "resnet"}, ValueError, "teacher is an argument of method='distill'"),
    ({"method": "distill", "teacher": "resnet"}, TypeError, "teacher must be an nn.Module, got str 'resnet'"),
    ({"l2sp": 0.1}, ValueError, "l2sp is an argument of method='l2sp'"),
    ({"sparsity": 0.5}, ValueError, "sparsity is an argument of method='prune'"),
    ({"method": "prune", "sparsity": 1.0}, ValueError, r"sparsity must be a finite number in \[0.0, 1.0\), got 1.0"),
    ({"method": "l2sp", "l2sp": -1.0}, ValueError, "l2sp must be a finite number >= 0.0, got -1.0"),
    ({"lr": 0}, ValueError, "lr must be a finite number > 0.0, got 0"),
    ({"lr": "1e-3"}, TypeError, "lr must be a number, got str '1e-3'"),
    ({"lr": float("nan")}, ValueError, "lr must be a finite number"),
    ({"alpha": 1.5}, ValueError, r"alpha must be a finite number in \[0.0, 1.0\]"),
    ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0.0"),
    ({"divergence": "kl"}, ValueError, "divergence must be one of"),
    ({"epochs": 0}, ValueError, "epochs must be an int >= 1, got 0"),
    ({"epochs": 2.0}, TypeError, "epochs must be an int, got float 2.0"),
    ({"scheduler": "step"}, ValueError, r"scheduler must be one of \('cosine', 'linear', 'constant'\)"),
    ({"amp": "bf16"}, TypeError, "amp must be None, torch.bfloat16 or torch.float16, got str 'bf16'"),
    ({"grad_clip": 0.0}, ValueError, "grad_clip must be a finite number > 0.0"),
    ({"device": "gpu7"}, ValueError, "device must be a device such as"),
    ({"device": "meta"}, ValueError, 'device must be a device with memory such as "cpu" or "cuda:0", not "meta"'),
    ({"seed": 2**64}, ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
    ({"progress": 1}, TypeError, "progress must be a bool, got int 1"),
    ({"method": "prune", "prune_start": 0.8, "prune_end": 0.5}, ValueError, "prune_end must be > prune_start"),
    ({"method": "prune", "prune_every": 0}, ValueError, "prune_every must be an int >= 1"),
    ({"method": "l2sp", "head": "6"}, TypeError, "head must be a list of module or parameter names"),
    ({"method": "l2sp", "head": ["fc"]}, ValueError, r"head names \['fc'\] are not modules or parameters of Sequential"),
    ({"method": "l2sp", "head": (h for h in ["6"])}, TypeError, "head must be a list of module or parameter names"),
    ({"method": "l2sp", "head": 5}, TypeError, "head must be a list of module or parameter names, got int 5"),
    ({"method": "l2sp", "temperature": 4.0}, ValueError, "temperature is an argument of method='distill', not of "
                                                         "method='l2sp'"),
    ({"alpha": 0.9}, ValueError, "alpha is an argument of method='distill'"),
    ({"divergence": "jsd"}, ValueError, "divergence is an argument of method='distill'"),
    ({"method": "l2sp", "prune_end": 0.5}, ValueError, "prune_end is an argument of method='prune'"),
    ({"prune_exclude": []}, ValueError, "prune_exclude is an argument of method='prune'"),
    # A device this machine lacks: torch's error used to come from model.to(), not naming device.
    ({"device": "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"}, ValueError,
     "device 'cuda(:[0-9]+)?' is not usable here"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        Finetuner(_mlp(), **kwargs)


def test_numpy_scalars_are_numbers():
    # np.float32 is no float subclass and np.int64 no int: they used to be refused ("lr must be
    # a number, got float32"), as arguments read from a NumPy array or a config are.
    np = pytest.importorskip("numpy")
    runs = []
    for cast_real, cast_int in ((float, int), (np.float32, np.int64)):
        tuner = Finetuner(_mlp(), "l2sp", lr=cast_real(1e-2), l2sp=cast_real(0.5), weight_decay=cast_real(0.0),
                          epochs=cast_int(2), seed=cast_int(3), grad_clip=cast_real(1.0), progress=False)
        tuner.fit(_loader(32, batch_size=8), epochs=cast_int(2))
        runs.append(tuner.model.state_dict())
        assert type(tuner.seed) is int and type(tuner.epochs) is int and type(tuner.lr) is float
    # the float32 values differ from the float ones in their last bits: equal to rounding
    for k, v in runs[0].items():
        torch.testing.assert_close(runs[1][k], v, msg=k)
    with pytest.raises(TypeError, match="epochs must be an int, got bool"):
        Finetuner(_mlp(), epochs=np.bool_(True))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
@pytest.mark.parametrize("method", ["baseline", "distill"])
def test_integer_labels_of_any_width_train_like_int64(dtype, method):
    # int32 labels (from NumPy int32 arrays, ...) reached F.cross_entropy / kd_loss, which take
    # int64 (and uint8) only: RuntimeError on the first step, and in evaluate.
    x, y = _data(40, seed=3)
    teacher = nn.Linear(D_IN, CLASSES)
    runs = []
    for labels in (y, y.to(dtype)):
        kwargs = {"teacher": teacher} if method == "distill" else {}
        tuner = Finetuner(_mlp(), method, lr=1e-2, epochs=1, seed=0, progress=False, **kwargs)
        history = tuner.fit(DataLoader(TensorDataset(x, labels), batch_size=8))
        runs.append((tuner.model.state_dict(), history[-1]["train_loss"],
                     tuner.evaluate(DataLoader(TensorDataset(x, labels), batch_size=16))))
    for k, v in runs[0][0].items():
        assert torch.equal(runs[1][0][k], v), k
    assert runs[1][1:] == runs[0][1:]


def test_fit_paths_must_be_paths():
    tuner = Finetuner(_mlp(), progress=False)
    for name in ("checkpoint_dir", "resume"):
        with pytest.raises(TypeError, match=f"{name} must be None, a str or an os.PathLike, got int 5"):
            tuner.fit(_loader(), **{name: 5})


def test_bad_model_loader_and_outputs():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str 'resnet18'"):
        Finetuner("resnet18")
    with pytest.raises(ValueError, match="could not find the head of Conv2d"):
        Finetuner(nn.Conv2d(3, 4, 1), "l2sp")
    Finetuner(nn.Conv2d(3, 4, 1), "l2sp", head=[])  # no head: everything is body
    tuner = Finetuner(_mlp(), progress=False)
    with pytest.raises(TypeError, match="train_loader must have a length"):
        tuner.fit(iter([]))
    with pytest.raises(ValueError, match="train_loader is empty"):
        tuner.fit([])
    batch = [(torch.randn(4, D_IN), torch.randint(0, 3, (4,)))]
    for bad in ("val.pt", b"val", 5):  # a str has a length: it failed only after the first epoch's training
        with pytest.raises(TypeError, match=f"val_loader must be an iterable of batches .*got {type(bad).__name__}"):
            tuner.fit(batch, val_loader=bad)
    with pytest.raises(TypeError, match=r"a batch must be an \(inputs, labels\) pair, got Tensor"):
        tuner.fit([torch.randn(4, D_IN)])
    with pytest.raises(TypeError, match="callback must be callable"):
        tuner.fit(_loader(), callback="print")
    with pytest.raises(ValueError, match="method='prune' needs at least 2 training steps, got 1"):
        Finetuner(_mlp(), "prune", epochs=1, progress=False).fit(_loader(16))


def test_teacher_with_other_classes_fails_on_the_first_step_before_any_update():
    student = _mlp()
    start = [p.clone() for p in student.parameters()]
    tuner = Finetuner(student, "distill", teacher=nn.Linear(D_IN, CLASSES + 1), progress=False)
    with pytest.raises(ValueError, match=r"teacher's logits \(16, 5\) must have the shape of the student's \(16, 4\)"):
        tuner.fit(_loader())
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), start))


def test_find_head():
    assert find_head(_mlp()) == "6"
    model = nn.Module()
    model.body, model.fc = nn.Linear(3, 3), nn.Linear(3, 2)
    assert find_head(model) == "fc"


def test_checkpoint_that_does_not_fit_is_refused_before_anything_changes(tmp_path):
    # A wider model, or a pruned run whose pruned layers differ: a ValueError naming the keys,
    # shapes or layers, and the Finetuner is left as it was (it can still run its own fit).
    tuner = _tuner("prune", None, seed=0)
    tuner.fit(_loader(), epochs=1, checkpoint_dir=tmp_path)
    wide = nn.Sequential(nn.Linear(D_IN, HIDDEN + 8), nn.LayerNorm(HIDDEN + 8), nn.ReLU(), nn.Dropout(0.0),
                         nn.Linear(HIDDEN + 8, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    other = Finetuner(wide, "prune", sparsity=0.75, epochs=2, progress=False)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit this model: shape mismatches: 0.weight \(32, 16\) in the "
                                         r"checkpoint, \(40, 16\) here"):
        other.load_checkpoint(tmp_path / "last.pt")
    assert all(torch.equal(v, wide.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, MaskedLinear) for m in wide.modules())
    other.fit(_loader(), epochs=2)  # its own plan, not the checkpoint's
    narrower = Finetuner(_mlp(), "prune", sparsity=0.75, epochs=1, prune_exclude=["4"], progress=False)
    with pytest.raises(ValueError, match=r"pruned layers differ \(prune_include / prune_exclude\): 4.weight_mask"):
        narrower.load_checkpoint(tmp_path / "last.pt")
    assert not any(isinstance(m, MaskedLinear) for m in narrower.model.modules())
    broken = tmp_path / "broken.pt"
    broken.write_bytes((tmp_path / "last.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read the checkpoint .*broken.pt"):
        _tuner("prune", None, seed=0).load_checkpoint(broken)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir .*afile is a file, not a folder"):
        _tuner("l2sp", None, seed=0).fit(_loader(), epochs=1, checkpoint_dir=tmp_path / "afile")


def test_head_by_parameter_names_is_not_pruned_and_sparse_layers_are_pulled():
    model = _mlp()
    tuner = Finetuner(model, "prune", sparsity=0.5, head=["6.weight", "6.bias"], prune_exclude=[], epochs=1,
                      progress=False)
    tuner.fit(_loader(32), epochs=1)
    assert [name for name, _ in tuner.pruner.layers] == ["0", "4"]
    # The exported sparse layers' kept weights are weights: pulled by L2-SP and decayed.
    sparse = tuner.export()
    l2sp = Finetuner(sparse, "l2sp", l2sp=0.5, head=["6"], progress=False)
    groups = {g["name"]: g for g in l2sp.optimizer.param_groups}
    values = [m.values for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert len(values) == 2
    assert all(any(v is p for p in groups["body"]["params"]) for v in values)
    assert groups["body"]["l2sp"] == 0.5 and groups["body"]["weight_decay"] > 0


def test_export_is_in_eval_mode_for_every_method(teacher):
    for method in ("baseline", "l2sp", "distill", "prune"):
        tuner = Finetuner(_mlp(dropout=0.5), method, epochs=1, progress=False, **_method_kwargs(method, teacher))
        tuner.fit(_loader(32), epochs=1)
        model = tuner.export()
        assert not model.training and not any(m.training for m in model.modules())
        x = torch.randn(4, D_IN)
        torch.testing.assert_close(model(x), model(x))


def test_head_parameter_of_a_container_leaves_the_container_prunable_and_extra_state_loads(tmp_path):
    # A head parameter held by a container (a position embedding in an encoder): the container's
    # layers are still pruned; a module with non-tensor extra state saves and loads.
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(HIDDEN))
            self.l1, self.l2 = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x):
            return self.l2(torch.relu(self.l1(x + self.pos)))

    class Extra(nn.Module):
        def get_extra_state(self):
            return {"version": 3}

        def set_extra_state(self, state):
            assert state == {"version": 3}

        def forward(self, x):
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), Encoder(), Extra(), nn.Linear(HIDDEN, CLASSES))
    tuner = Finetuner(model, "prune", sparsity=0.5, head=["3", "1.pos"], prune_exclude=[], epochs=1, progress=False)
    tuner.fit(_loader(32), epochs=1, checkpoint_dir=tmp_path)
    assert [name for name, _ in tuner.pruner.layers] == ["0", "1.l1", "1.l2"]
    again = Finetuner(copy.deepcopy(model), "prune", sparsity=0.5, head=["3", "1.pos"], prune_exclude=[], epochs=1,
                      progress=False)
    again.load_checkpoint(tmp_path / "last.pt")


def _interrupt_at_forward(model, k, how):
    """A forward pre-hook interrupting the k-th training forward: "sigint" (a Ctrl-C, deferred to
    the end of the step) or "raise" (a KeyboardInterrupt inside the step, a second Ctrl-C)."""
    calls = [0]

    def hook(module, inputs):
        if module.training:
            calls[0] += 1
            if calls[0] == k:
                if how == "sigint":
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    raise KeyboardInterrupt

    return model.register_forward_pre_hook(hook)


def test_resume_after_an_epochs_last_step_records_that_steps_lr(tmp_path):
    # Ctrl-C during an epoch's last step: the checkpoint holds the whole epoch but not its record;
    # the resumed run wrote the record with the optimizer's lr, already the next step's.
    def tuner():
        return Finetuner(_mlp(0), "baseline", epochs=2, scheduler="linear", seed=3, progress=False)

    reference = tuner()
    reference.fit(_loader(n=64))
    steps = 64 // 16
    first = tuner()
    handle = _interrupt_at_forward(first.model, steps, "sigint")
    with pytest.raises(KeyboardInterrupt):
        first.fit(_loader(n=64), checkpoint_dir=tmp_path)
    handle.remove()
    assert first.history == [] and first.step == steps
    resumed = tuner()
    resumed.fit(_loader(n=64), resume=tmp_path / "last.pt")
    _assert_same_run(resumed, reference)


@pytest.mark.parametrize("at", [3, 5], ids=["mid-epoch", "epoch-start"])
def test_fit_again_after_an_exception_in_a_step_continues_the_run(tmp_path, at):
    # An exception inside a step (a second Ctrl-C, an error in forward) left the random generators
    # past the last whole step (the shuffle of the epoch, dropout): fit() again on the same object
    # drew other batches and masks than a resume from its checkpoint, which equals the run.
    def tuner():
        return Finetuner(_mlp(0, dropout=0.2), "baseline", epochs=2, seed=3, progress=False)

    reference = tuner()
    reference.fit(_loader(n=64))
    again = tuner()
    handle = _interrupt_at_forward(again.model, at, "raise")
    with pytest.raises(KeyboardInterrupt):
        again.fit(_loader(n=64), checkpoint_dir=tmp_path)
    handle.remove()
    again.fit(_loader(n=64))
    _assert_same_run(again, reference)


def test_a_successful_fit_inside_an_except_block_keeps_the_generators():
    # The restore on failure looked at sys.exc_info(), which inside a caller's except block names
    # the caller's exception: a successful fit() rewound the generators to its last step.
    def run():
        tuner = Finetuner(_mlp(0), "baseline", epochs=1, seed=3, progress=False)
        tuner.fit(_loader(n=32), callback=lambda t, r: torch.rand(3))
        return torch.rand(2)

    plain = run()
    try:
        raise RuntimeError("the caller's")
    except RuntimeError:
        inside = run()
    assert torch.equal(plain, inside)
