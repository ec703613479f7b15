"""``pyfinetune demo``: a complete transfer-learning run on the handwritten digits bundled with
scikit-learn (``sklearn.datasets.load_digits``: 1797 8x8 grayscale images, 10 classes; nothing is
downloaded).

The story, all through :class:`pyfinetune.Finetuner`:

1. Split the images once, stratified and seeded: a test split (never trained on, never used
   for a choice) and the rest. The **source task** is digits 0-4 (all their training images);
   the **target task** is digits 5-9 with few labels: ``labels_per_class`` labelled images per
   class, ``val_per_class`` validation images per class, the other target training images kept
   as unlabelled images.
2. Pretrain the source model, a small conv stem followed by a wide MLP (the wide ``nn.Linear``
   layers dominate inference, so pruning them shows up in the timings).
3. Fine-tune on the target with the same budget (epochs, batch, labelled images) four ways:
   plain fine-tuning (``torch.optim.AdamW``), L2-SP (:class:`pyfinetune.optim.AdamW`),
   distillation of the fine-tuned model into a smaller network (:func:`pyfinetune.losses.kd_loss`,
   compared with the same student trained alone), and gradual pruning to 90% sparsity followed
   by :func:`pyfinetune.prune.sparsify`.
4. Measure test accuracy, parameters, training time and inference time, time pyfinetune's
   kernels against their torch counterparts at the demo's own shapes, and write
   ``results.json``, ``report.md`` and PNG plots.

Use :func:`run_demo` from Python; the command line is ``pyfinetune demo [--out DIR] [--quick]
[--device cpu|cuda]``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from . import prune as _prune
from .finetuning import Finetuner

__all__ = ["DemoConfig", "demo_config", "DigitTasks", "load_digit_tasks", "DigitNet", "run_demo",
           "parameter_counts", "inference_ms", "measure_kernel_speedups", "METHOD_KINDS"]

DATASET = "scikit-learn digits (sklearn.datasets.load_digits: 1797 8x8 grayscale images, 10 classes)"
METHOD_KINDS = ("baseline", "l2sp", "distill", "student_alone", "prune")


# ------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class DemoConfig:
    """Every number of a demo run (``demo_config(quick)`` gives the two standard ones).

    Data: ``test_fraction`` of all images is the stratified test split; the target task gets
    ``labels_per_class`` labelled and ``val_per_class`` validation images per class.
    Training: ``source_epochs`` of pretraining; ``epochs`` for every target fine-tuning run, on
    batches of ``batch_size`` labelled images (the distilled student's batches also hold
    ``unlabelled_per_labelled`` unlabelled images per labelled one). Timing: the median of
    ``timing_reps`` runs after ``warmup`` runs, at ``inference_batch`` images.
    """

    seed: int = 0
    test_fraction: float = 0.3
    labels_per_class: int = 20
    val_per_class: int = 20
    max_shift: int = 1
    channels: Tuple[int, int] = (32, 64)
    hidden: int = 1024
    student_channels: Tuple[int, int] = (16, 32)
    student_hidden: int = 128
    source_epochs: int = 40
    source_batch_size: int = 64
    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    source_lr: float = 1e-3
    student_lr: float = 3e-3
    weight_decay: float = 1e-2
    l2sp: float = 1e-2
    temperature: float = 2.0
    alpha: float = 0.5
    unlabelled_per_labelled: int = 3
    sparsity: float = 0.9
    prune_end: float = 0.5
    inference_batch: int = 256
    timing_reps: int = 40
    warmup: int = 5


def demo_config(quick: bool = False, **overrides: Any) -> DemoConfig:
    """The default demo's configuration, or the ``quick`` one (fewer epochs and timing runs, same
    data, models and methods); ``overrides`` replace single fields."""
    base = DemoConfig()
    if quick:
        base = dataclasses.replace(base, source_epochs=30, epochs=40, timing_reps=15, warmup=3)
    return dataclasses.replace(base, **overrides)


# ------------------------------------------------------------------------------ data
@dataclass
class DigitTasks:
    """The demo's splits as ``(images, labels)`` pairs: images float32 ``[N, 1, 8, 8]`` in [0, 1],
    labels int64 ``[N]``. Source labels are the digits 0-4; target labels are ``digit - 5``.
    ``target_unlabelled`` carries its true labels only so that nothing is lost: the demo never
    trains on them."""

    source_train: Tuple[Tensor, Tensor]
    source_val: Tuple[Tensor, Tensor]
    source_test: Tuple[Tensor, Tensor]
    target_labelled: Tuple[Tensor, Tensor]
    target_val: Tuple[Tensor, Tensor]
    target_unlabelled: Tuple[Tensor, Tensor]
    target_test: Tuple[Tensor, Tensor]

    def sizes(self) -> Dict[str, int]:
        """The number of images of each split."""
        return {f.name: int(getattr(self, f.name)[1].numel()) for f in dataclasses.fields(self)}


SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)


def load_digit_tasks(config: DemoConfig) -> DigitTasks:
    """Split scikit-learn's bundled digits into the demo's source and target tasks (see
    :class:`DigitTasks`), deterministically from ``config.seed``.

    The test split is drawn first, stratified over the 10 digits, and every later split is made
    from the remaining images only; the source validation split is 15% of the source training
    images, stratified.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - the demo extra installs it
        raise ImportError('pyfinetune demo needs scikit-learn: pip install "pyfinetune[demo]"') from e
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    index = list(range(len(labels)))
    train, test = train_test_split(index, test_size=config.test_fraction, stratify=digits.target,
                                   random_state=config.seed)
    train, test = torch.tensor(sorted(train)), torch.tensor(sorted(test))
    gen = torch.Generator().manual_seed(config.seed)

    def pick(idx: Tensor, digits_: Sequence[int]) -> Tensor:
        return idx[torch.isin(labels[idx], torch.tensor(digits_))]

    def pair(idx: Tensor, offset: int) -> Tuple[Tensor, Tensor]:
        return images[idx].clone(), labels[idx] - offset

    src = pick(train, SOURCE_DIGITS)
    src_train, src_val = train_test_split(src.tolist(), test_size=0.15, stratify=labels[src].numpy(),
                                          random_state=config.seed)
    lab, val, unl = [], [], []
    for digit in TARGET_DIGITS:
        idx = pick(train, (digit,))
        idx = idx[torch.randperm(len(idx), generator=gen)]
        need = config.labels_per_class + config.val_per_class
        if len(idx) <= need:
            raise ValueError(f"demo: digit {digit} has {len(idx)} training images, fewer than labels_per_class + "
                             f"val_per_class + 1 = {need + 1}")
        lab.append(idx[:config.labels_per_class])
        val.append(idx[config.labels_per_class:need])
        unl.append(idx[need:])
    offset = TARGET_DIGITS[0]
    return DigitTasks(
        source_train=pair(torch.tensor(sorted(src_train)), 0), source_val=pair(torch.tensor(sorted(src_val)), 0),
        source_test=pair(pick(test, SOURCE_DIGITS), 0),
        target_labelled=pair(torch.cat(lab), offset), target_val=pair(torch.cat(val), offset),
        target_unlabelled=pair(torch.cat(unl), offset), target_test=pair(pick(test, TARGET_DIGITS), offset))


def _shift(image: Tensor, max_shift: int) -> Tensor:
    """``image`` [C, H, W] moved by a random whole-pixel offset in [-max_shift, max_shift]^2 (zeros
    come in at the border)."""
    if max_shift == 0:
        return image
    h, w = image.shape[-2:]
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,)).tolist()
    padded = F.pad(image, (max_shift,) * 4)
    return padded[..., dy:dy + h, dx:dx + w]


class ShiftedImages(Dataset):
    """``(image, label)`` pairs, each image moved by a random offset of up to ``max_shift`` pixels
    every time it is read (draws from torch's global RNG, which :class:`Finetuner` seeds)."""

    def __init__(self, images: Tensor, labels: Tensor, max_shift: int):
        self.images, self.labels, self.max_shift = images, labels, max_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        return _shift(self.images[i], self.max_shift), self.labels[i]


class WithUnlabelled(Dataset):
    """The distilled student's data: item ``i`` is labelled image ``i`` followed by ``ratio``
    unlabelled images drawn at random (torch's global RNG), all shifted like
    :class:`ShiftedImages`. Use :func:`concat_rows` as the loader's ``collate_fn``; an epoch has
    as many batches as one over the labelled images alone.

    The unlabelled images' label slot holds the teacher's predicted class (``pseudo_labels``),
    the hard label of ``kd_loss``'s cross-entropy term; their true labels are never used.
    """

    def __init__(self, images: Tensor, labels: Tensor, unlabelled: Tensor, pseudo_labels: Tensor, ratio: int,
                 max_shift: int):
        self.labelled = ShiftedImages(images, labels, max_shift)
        self.unlabelled = ShiftedImages(unlabelled, pseudo_labels, max_shift)
        self.ratio = ratio

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        picks = torch.randint(0, len(self.unlabelled), (self.ratio,)).tolist()
        items = [self.labelled[i]] + [self.unlabelled[j] for j in picks]
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def concat_rows(batch: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """Collate :class:`WithUnlabelled` items into one batch of all their rows."""
    return torch.cat([x for x, _ in batch]), torch.cat([y for _, y in batch])


def _loader(images: Tensor, labels: Tensor, batch_size: int, *, train: bool, max_shift: int = 0) -> DataLoader:
    data = ShiftedImages(images, labels, max_shift if train else 0)
    return DataLoader(data, batch_size=batch_size, shuffle=train)


# ------------------------------------------------------------------------------ models
class DigitNet(nn.Module):
    """The source / fine-tuned models (and, smaller, the student): conv stem (two 3x3 convolutions
    with ReLU, the second with stride 2) ->
    ``hidden`` -> ``hidden`` MLP -> ``classifier`` (``num_classes`` logits). Input ``[N, 1, 8, 8]``.

    With the default sizes the two wide ``nn.Linear`` layers (``hidden.0``, ``hidden.2``) hold
    99% of the weights and most of the inference time: the layers that pruning sparsifies.
    """

    def __init__(self, num_classes: int, channels: Tuple[int, int] = (32, 64), hidden: int = 2048):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of images ``x`` ``[N, 1, 8, 8]``."""
        return self.classifier(self.hidden(self.features(x)))


# ------------------------------------------------------------------------------ measurements
def parameter_counts(model: nn.Module) -> Tuple[int, int]:
    """``(params, nonzero)``: the weights and biases of ``model``'s architecture (a
    :class:`~pyfinetune.prune.SparseLinear` counts as the dense ``in x out`` layer it replaces) and
    how many of them are nonzero (a masked layer's pruned weights count as zero)."""
    sparse_cls = _prune.SparseLinear
    total = nonzero = 0
    for module in model.modules():
        if isinstance(module, sparse_cls):
            total += module.in_features * module.out_features
            nonzero += int(module.values.count_nonzero())
            if module.bias is not None:
                total += module.bias.numel()
                nonzero += int(module.bias.count_nonzero())
            continue
        for name, p in module.named_parameters(recurse=False):
            value = _prune.effective_weight(module) if name == "weight" and hasattr(module, "weight_mask") else p
            total += p.numel()
            nonzero += int(value.count_nonzero())
    return total, nonzero


def _median_ms(fns: Sequence[Callable[[], Any]], reps: int, warmup: int, device: torch.device) -> List[float]:
    """Median milliseconds of each of ``fns``, timed in interleaved rounds after ``warmup`` rounds
    with the benchmarks' timer (:func:`pyfinetune.benchmarks.common.time_interleaved`:
    interleaving spreads the machine's load over all contenders alike)."""
    from .benchmarks import common

    contenders = [common.Contender(f"contender {i}", fn) for i, fn in enumerate(fns)]
    timings = common.time_interleaved(contenders, reps=reps, warmup=warmup, device=device)
    return [timings[c.name].median for c in contenders]


def inference_ms(models: Sequence[nn.Module], x: Tensor, reps: int = 40, warmup: int = 5) -> List[float]:
    """Median milliseconds of one ``model(x)`` forward (eval mode, ``no_grad``) for each model, timed
    in interleaved rounds on ``x``'s device."""
    for m in models:
        m.eval()

    def forward(m: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return m(x)
        return run

    return _median_ms([forward(m) for m in models], reps, warmup, x.device)


def measure_kernel_speedups(model: nn.Module, sparse_layer: nn.Module, dense_layer: nn.Linear, kd_rows: int,
                            num_classes: int, config: DemoConfig, device: torch.device) -> List[Dict[str, Any]]:
    """Time pyfinetune's three ops against their torch counterparts at the demo's shapes.

    * optimizer: one :class:`pyfinetune.optim.AdamW` step with L2-SP over ``model``'s parameters
      against ``torch.optim.AdamW`` (``fused=True`` where torch has it for the device, else
      ``foreach``) after adding the L2-SP gradient ``l2sp * (p - p0)`` with ``torch._foreach_*``;
    * distillation: :func:`pyfinetune.losses.kd_loss` forward + backward on ``[kd_rows,
      num_classes]`` logits against the eager composition (``log_softmax``, ``kl_div``,
      ``cross_entropy``);
    * sparse layer: ``sparse_layer`` (a :class:`~pyfinetune.prune.SparseLinear`) against
      ``dense_layer`` (the same weights, zeros included, as ``nn.Linear``), inference at
      ``config.inference_batch`` rows.

    Returns:
        one dict per op: ``op``, ``shape``, ``ours``, ``torch``, ``ours_ms``, ``torch_ms`` and
        ``speedup`` (``torch_ms / ours_ms``; > 1: ours is faster).
    """
    from . import optim as _optim
    from .losses import kd_loss

    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    rows = []

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    # optimizer step
    params = [p.detach().clone() for p in model.parameters()]
    ours_p = [p.clone().requires_grad_() for p in params]
    ref_p = [p.clone().requires_grad_() for p in params]
    for a, b in zip(ours_p, ref_p):
        a.grad = randn(*a.shape) * 1e-3
        b.grad = a.grad.clone()
    ours_opt = _optim.AdamW(ours_p, lr=1e-4, weight_decay=config.weight_decay, l2sp=config.l2sp)
    fused = device.type in ("cpu", "cuda")
    ref_opt = torch.optim.AdamW(ref_p, lr=1e-4, weight_decay=config.weight_decay, fused=fused or None,
                                foreach=None if fused else True)
    anchors = [p.detach().clone() for p in ref_p]
    ref_grads = [p.grad for p in ref_p]
    with torch.no_grad():
        def torch_step() -> None:
            torch._foreach_add_(ref_grads, torch._foreach_sub([p.detach() for p in ref_p], anchors), alpha=config.l2sp)
            ref_opt.step()

        ours_ms, torch_ms = _median_ms([ours_opt.step, torch_step], config.timing_reps, config.warmup, device)
    n = sum(p.numel() for p in params)
    rows.append({"op": "L2-SP AdamW step", "shape": f"{len(params)} tensors, {n / 1e6:.2f}M parameters",
                 "ours": "pyfinetune.optim.AdamW(l2sp=...)",
                 "torch": f"torch.optim.AdamW({'fused' if fused else 'foreach'}) + L2-SP gradient (torch._foreach_*)",
                 "ours_ms": ours_ms, "torch_ms": torch_ms, "speedup": torch_ms / ours_ms})

    # distillation loss, forward + backward
    student = randn(kd_rows, num_classes).requires_grad_()
    teacher = randn(kd_rows, num_classes)
    labels = torch.randint(0, num_classes, (kd_rows,), generator=gen).to(device)
    t, alpha = config.temperature, config.alpha

    def ours_kd() -> None:
        kd_loss(student, teacher, labels, temperature=t, alpha=alpha).backward()

    def torch_kd() -> None:
        kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                      log_target=True)
        (alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, labels)).backward()

    ours_ms, torch_ms = _median_ms([ours_kd, torch_kd], config.timing_reps * 5, config.warmup, device)
    rows.append({"op": "kd_loss forward + backward", "shape": f"[{kd_rows}, {num_classes}] logits",
                 "ours": "pyfinetune.losses.kd_loss", "torch": "eager log_softmax + kl_div + cross_entropy",
                 "ours_ms": ours_ms, "torch_ms": torch_ms, "speedup": torch_ms / ours_ms})

    # sparse layer inference
    x = randn(config.inference_batch, dense_layer.in_features)
    ours_ms, torch_ms = inference_ms([sparse_layer, dense_layer], x, config.timing_reps, config.warmup)
    sparsity = 1.0 - sparse_layer.nnz / (dense_layer.in_features * dense_layer.out_features)
    rows.append({"op": f"SparseLinear at {sparsity:.0%} sparsity",
                 "shape": f"x [{config.inference_batch}, {dense_layer.in_features}], weight "
                          f"[{dense_layer.out_features}, {dense_layer.in_features}]",
                 "ours": "pyfinetune.prune.SparseLinear", "torch": "nn.Linear (dense weight with the zeros)",
                 "ours_ms": ours_ms, "torch_ms": torch_ms, "speedup": torch_ms / ours_ms})
    return rows


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Fraction of ``images`` (``[N, 1, 8, 8]``) that ``model`` (eval mode) classifies as ``labels``,
    on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += int((logits.argmax(-1).cpu() == labels[start:start + batch_size]).sum())
    return correct / len(labels)


# ------------------------------------------------------------------------------ the run
def _resolve_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"demo: device must be 'cpu' or 'cuda', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"demo: device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("demo: --device cuda was asked for but no CUDA device is visible "
                         f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not built'})")
    return dev


@dataclass
class _Run:
    """One trained model (:meth:`Finetuner.export`'s), its per-epoch history and training seconds."""

    name: str
    method: str
    model: nn.Module
    history: List[Dict[str, Any]]
    train_seconds: float


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return build()


class _Demo:
    """The steps of :func:`run_demo`, sharing the configuration, data and device."""

    def __init__(self, config: DemoConfig, device: torch.device, progress: bool, log: Callable[[str], None]):
        self.config, self.device, self.progress, self.log = config, device, progress, log
        self.tasks = load_digit_tasks(config)
        c = config
        self.val_loader = _loader(*self.tasks.target_val, 256, train=False)
        self.labelled_loader = _loader(*self.tasks.target_labelled, c.batch_size, train=True, max_shift=c.max_shift)
        self.teacher_name = ""

    def fit(self, name: str, method: str, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, *,
            epochs: int, lr: float, **options: Any) -> _Run:
        """Train ``model`` with :class:`Finetuner` (seeded: the same data order for every run of a
        loader) and record its history and training time (the sum of the epochs' training
        seconds, validation excluded)."""
        self.log(f"[{name}] {method}: {epochs} epochs of {len(train_loader)} batches, lr {lr:g}")
        tuner = Finetuner(model, method, lr=lr, weight_decay=self.config.weight_decay, epochs=epochs,
                          device=self.device, seed=self.config.seed, progress=self.progress, **options)
        history = tuner.fit(train_loader, val_loader)
        seconds = sum(h["seconds"] for h in history)
        self.log(f"[{name}] val accuracy {history[-1]['val_accuracy']:.1%}, {seconds:.1f} s")
        return _Run(name, method, tuner.export(), history, seconds)

    def pretrain(self) -> Tuple[_Run, Dict[str, Tensor]]:
        """Train the source model on digits 0-4; returns it and its body's weights (no head)."""
        c = self.config
        model = _seeded(c.seed, lambda: DigitNet(len(SOURCE_DIGITS), c.channels, c.hidden))
        train = _loader(*self.tasks.source_train, c.source_batch_size, train=True, max_shift=c.max_shift)
        val = _loader(*self.tasks.source_val, 256, train=False)
        run = self.fit("source model (digits 0-4)", "baseline", model, train, val, epochs=c.source_epochs,
                          lr=c.source_lr)
        body = {k: v.detach().clone() for k, v in run.model.state_dict().items() if not k.startswith("classifier.")}
        return run, body

    def from_source(self, body: Dict[str, Tensor]) -> nn.Module:
        """A target model: the source model's body and a new, seeded 5-class head."""
        c = self.config
        model = _seeded(c.seed + 1, lambda: DigitNet(len(TARGET_DIGITS), c.channels, c.hidden))
        missing, unexpected = model.load_state_dict(body, strict=False)
        assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)
        return model

    def student(self) -> nn.Module:
        """The student, initialized identically for every call."""
        c = self.config
        return _seeded(c.seed + 2, lambda: DigitNet(len(TARGET_DIGITS), c.student_channels, c.student_hidden))

    def finetune_all(self, body: Dict[str, Tensor]) -> List[_Run]:
        """The four methods (five runs) on the target task, each with ``config.epochs`` epochs over
        the same labelled images."""
        c = self.config
        common = dict(epochs=c.epochs, lr=c.lr)
        baseline = self.fit("fine-tuning", "baseline", self.from_source(body), self.labelled_loader,
                               self.val_loader, **common)
        l2sp = self.fit("L2-SP", "l2sp", self.from_source(body), self.labelled_loader, self.val_loader,
                           l2sp=c.l2sp, **common)
        pruned = self.fit(f"pruned {c.sparsity:.0%}", "prune", self.from_source(body), self.labelled_loader,
                             self.val_loader, sparsity=c.sparsity, prune_end=c.prune_end, prune_include=["hidden.*"],
                             **common)
        # The teacher: whichever dense fine-tuned model validates better (a choice on validation data).
        teacher = max((baseline, l2sp), key=lambda r: r.history[-1]["val_accuracy"])
        self.teacher_name = teacher.name
        alone = self.fit("student alone", "baseline", self.student(), self.labelled_loader, self.val_loader,
                            epochs=c.epochs, lr=c.student_lr)
        alone.method = "student_alone"
        unlabelled = self.tasks.target_unlabelled[0]
        teacher.model.eval()
        with torch.no_grad():
            pseudo = teacher.model(unlabelled.to(self.device)).argmax(-1).cpu()
        images, labels = self.tasks.target_labelled
        mixed = WithUnlabelled(images, labels, unlabelled, pseudo, c.unlabelled_per_labelled, c.max_shift)
        distill_loader = DataLoader(mixed, batch_size=c.batch_size, shuffle=True, collate_fn=concat_rows)
        distilled = self.fit(f"student distilled from {teacher.name}", "distill", self.student(), distill_loader,
                                self.val_loader, epochs=c.epochs, lr=c.student_lr, teacher=teacher.model,
                                temperature=c.temperature, alpha=c.alpha)
        return [baseline, l2sp, distilled, alone, pruned]

    def one_shot_pruning(self, model: nn.Module, sparsities: Sequence[float]) -> List[Dict[str, float]]:
        """Validation accuracy of ``model`` magnitude-pruned (the same layers, no retraining) at
        each sparsity: what the gradual schedule's training recovers."""
        points = []
        for s in sparsities:
            pruned = copy.deepcopy(model)
            if s > 0:
                _prune.magnitude_prune(pruned, s, include=["hidden.*"])
            points.append({"sparsity": s, "val_accuracy": accuracy(pruned, *self.tasks.target_val)})
        return points


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def _row(run: _Run, test: Tuple[Tensor, Tensor], ms: float, dense_ms: float) -> Dict[str, Any]:
    params, nonzero = parameter_counts(run.model)
    return {"name": run.name, "method": run.method, "test_accuracy": accuracy(run.model, *test), "params": params,
            "nonzero_params": nonzero, "train_seconds": run.train_seconds, "inference_ms_per_batch": ms,
            "speedup_vs_dense": dense_ms / ms, "val_accuracy": run.history[-1]["val_accuracy"],
            "history": run.history}


def outcome_checks(methods: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The demo's expected outcome, checked on its ``methods`` rows: every method above 90% test
    accuracy; the pruned model within 2 points of the dense fine-tuned one and faster at
    inference; the distilled student at least as accurate as the student alone.

    Returns:
        ``{check: {"passed": bool, "detail": str}}``.
    """
    by = {m["method"]: m for m in methods}
    worst = min(methods, key=lambda m: m["test_accuracy"])
    base, pruned = by["baseline"], by["prune"]
    gap = (base["test_accuracy"] - pruned["test_accuracy"]) * 100
    alone, distilled = by["student_alone"], by["distill"]
    return {
        "every method above 90% test accuracy": {
            "passed": worst["test_accuracy"] > 0.9, "detail": f"lowest: {worst['name']} {worst['test_accuracy']:.1%}"},
        "pruned within 2 points of the dense fine-tuned model": {
            "passed": gap <= 2.0, "detail": f"{pruned['test_accuracy']:.1%} vs {base['test_accuracy']:.1%} "
                                            + (f"({gap:.1f} points lower)" if gap >= 0.05 else f"({-gap:.1f} points higher)" if gap <= -0.05
                                               else "(the same)")},
        "pruned model faster at inference than the dense one": {
            "passed": pruned["inference_ms_per_batch"] < base["inference_ms_per_batch"],
            "detail": f"{pruned['inference_ms_per_batch']:.2f} ms vs {base['inference_ms_per_batch']:.2f} ms "
                      f"({pruned['speedup_vs_dense']:.2f}x)"},
        "distilled student at least as accurate as the student alone": {
            "passed": distilled["test_accuracy"] >= alone["test_accuracy"],
            "detail": f"{distilled['test_accuracy']:.1%} vs {alone['test_accuracy']:.1%}"},
    }


def run_demo(out_dir: str = "pyfinetune-demo", *, quick: bool = False, device: Any = "cpu",
             config: Optional[DemoConfig] = None, progress: bool = True,
             log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the whole demo (see the module docs) and write ``results.json``, ``report.md`` and the
    PNG plots to ``out_dir`` (created if needed).

    Args:
        out_dir: the output folder.
        quick: the small configuration (:func:`demo_config`); ignored when ``config`` is given.
        device: ``"cpu"`` or ``"cuda"`` (ValueError when no CUDA device is visible).
        config: a :class:`DemoConfig` instead of :func:`demo_config`'s.
        progress: tqdm progress bars (stderr) on every training loop.
        log: called with each progress line (default ``print``).

    Returns:
        the content of ``results.json``: ``dataset``, ``device``, ``seed``, ``config``, ``splits``,
        ``source_model``, ``teacher``, ``methods`` (one dict per run: ``name``, ``method`` (one of
        :data:`METHOD_KINDS`), ``test_accuracy``, ``params``, ``nonzero_params``,
        ``train_seconds``, ``inference_ms_per_batch``, ``speedup_vs_dense``, ``val_accuracy``,
        ``history``), ``kernel_speedups``, ``accuracy_vs_sparsity``, ``outcome``,
        ``wall_seconds``, ``files``.
    """
    from . import __version__
    from ._demo_report import write_outputs

    from .benchmarks import common

    started = time.perf_counter()
    c = config if config is not None else demo_config(quick)
    dev = _resolve_device(device)
    # Before the training, not after it: these once ended a run of minutes in a traceback.
    if c.timing_reps < common.MIN_REPS or c.warmup < 0:
        raise ValueError(f"demo: config.timing_reps must be >= {common.MIN_REPS} and config.warmup >= 0, got "
                         f"{c.timing_reps} and {c.warmup}")
    error = common.out_dir_error(out_dir, "the output folder")
    if error:
        raise ValueError(f"demo: {error}")
    log(f"pyfinetune demo ({'quick' if quick and config is None else 'full'}): seed {c.seed} (torch, random, numpy "
        f"and the data split), device {dev}, {torch.get_num_threads()} CPU threads")
    demo = _Demo(c, dev, progress, log)
    log("splits: " + ", ".join(f"{k} {v}" for k, v in demo.tasks.sizes().items()))

    source, body = demo.pretrain()
    runs = demo.finetune_all(body)
    by_method = {r.method: r for r in runs}
    tests = demo.tasks.target_test
    timing_x = torch.cat([demo.tasks.target_test[0], demo.tasks.source_test[0]])[:c.inference_batch].to(dev)
    log(f"timing inference: batch {len(timing_x)}, median of {c.timing_reps} interleaved runs")
    ms = inference_ms([r.model for r in runs], timing_x, c.timing_reps, c.warmup)
    dense_ms = ms[runs.index(by_method["baseline"])]
    methods = [_row(r, tests, m, dense_ms) for r, m in zip(runs, ms)]

    log("timing pyfinetune's kernels against torch at the demo's shapes")
    sparse_layer = by_method["prune"].model.hidden[2]
    dense_layer = nn.Linear(sparse_layer.in_features, sparse_layer.out_features).to(dev)
    with torch.no_grad():
        dense_layer.weight.copy_(sparse_layer.to_dense())
        dense_layer.bias.copy_(sparse_layer.bias)
    kernels = measure_kernel_speedups(by_method["baseline"].model, sparse_layer, dense_layer,
                                      c.batch_size * (1 + c.unlabelled_per_labelled), len(TARGET_DIGITS), c, dev)
    sparsity_curve = {
        "gradual": [{"epoch": h["epoch"], "sparsity": h["sparsity"], "val_accuracy": h["val_accuracy"]}
                    for h in by_method["prune"].history],
        "one_shot": demo.one_shot_pruning(by_method["baseline"].model, [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98]),
    }
    src_params, _ = parameter_counts(source.model)
    results = {
        "dataset": DATASET, "device": str(dev), "seed": c.seed, "quick": bool(quick and config is None),
        "config": dataclasses.asdict(c), "splits": demo.tasks.sizes(),
        "machine": _machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "pyfinetune": __version__, "python": sys.version.split()[0],
        # the code and the library's settings measured (the machine string alone named neither)
        "git": common.git_state(),
        "settings": {k: v for k, v in sorted(os.environ.items()) if k.startswith("PYFINETUNE_")},
        "source_model": {"name": source.name, "test_accuracy": accuracy(source.model, *demo.tasks.source_test),
                         "params": src_params, "train_seconds": source.train_seconds, "history": source.history},
        "teacher": demo.teacher_name, "methods": methods, "kernel_speedups": kernels,
        "accuracy_vs_sparsity": sparsity_curve, "outcome": outcome_checks(methods),
    }
    results["wall_seconds"] = time.perf_counter() - started
    results["files"] = write_outputs(results, out_dir)
    return results
