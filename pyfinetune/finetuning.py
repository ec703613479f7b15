"""Fine-tune a classifier with pyfinetune's methods: :class:`Finetuner` and :func:`finetune`.

Four methods, one training loop (forward, loss, backward, clip, step, LR schedule, pruning):

==============  ===========================================================  =========================
method          optimizer                                                    loss
==============  ===========================================================  =========================
``"baseline"``  ``torch.optim.AdamW``                                        ``F.cross_entropy``
``"l2sp"``      :class:`pyfinetune.optim.AdamW`, the body pulled toward its  ``F.cross_entropy``
                starting weights (L2-SP)
``"distill"``   :class:`pyfinetune.optim.AdamW`                              :func:`pyfinetune.losses.kd_loss`
                                                                             against a frozen teacher
``"prune"``     :class:`pyfinetune.optim.AdamW` with the pruning masks       ``F.cross_entropy``
                (:class:`pyfinetune.prune.GradualPruner` to ``sparsity``)
==============  ===========================================================  =========================

Every method puts biases and norm weights in a param group without weight decay. Batches are
``(inputs, labels)`` pairs (what ``torchvision.datasets.ImageFolder`` and ``TensorDataset``
loaders yield), labels are class indices; the model's output is its logits (a tensor, or an
object with ``.logits``, or a tuple whose first item is the logits).

Example::

    tuner = pyfinetune.Finetuner(model, "l2sp", lr=1e-3, l2sp=1e-2, epochs=5)
    history = tuner.fit(train_loader, val_loader, checkpoint_dir="runs/ckpt")
    print(history[-1]["val_accuracy"], tuner.evaluate(test_loader))
"""

from __future__ import annotations

import copy
import fnmatch
import math
import numbers
import os
import random
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _distributed
from . import optim as _optim
from . import prune as _prune
from ._param_groups import shares_trained_parameters, split_parameters
from .losses import DIVERGENCES, kd_loss

__all__ = ["Finetuner", "finetune", "find_head", "METHODS", "SCHEDULERS"]

METHODS = ("baseline", "l2sp", "distill", "prune")
SCHEDULERS = ("cosine", "linear", "constant")
_FORMAT = "pyfinetune.Finetuner/1"
# Each of these arguments belongs to one method; given to another one it is a mistake.
_METHOD_ONLY = {"l2sp": "l2sp", "teacher": "distill", "sparsity": "prune"}
_DEFAULTS = {"l2sp": 1e-2, "sparsity": 0.5}
_PER_RANK = ("rng", "epoch_rng", "epoch_totals")  # the parts of a checkpoint that differ between ranks


def state_differences(own: Dict[str, Any], saved: Dict[str, Any], skip: Callable[[str], bool] = lambda k: False
                      ) -> Tuple[List[str], List[str], List[str]]:
    """What keeps the state dict ``saved`` from loading strictly into a module whose state dict is
    ``own`` (keys for which ``skip`` is true left out): its missing keys, unexpected keys, and the
    keys whose tensors differ in shape (non-tensor extra state is not compared)."""
    missing = [k for k in own if not skip(k) and k not in saved]
    unexpected = [k for k in saved if not skip(k) and k not in own]
    shapes = [k for k in own if not skip(k) and k in saved and isinstance(saved[k], Tensor)
              and isinstance(own[k], Tensor) and tuple(saved[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shapes


def describe_differences(missing: List[str], unexpected: List[str], shapes: List[str],
                         more: Sequence[Tuple[str, List[str]]] = ()) -> str:
    """The message part of :func:`state_differences`' lists (``shapes`` already worded), plus
    ``more`` (title, items) parts: at most five items each."""
    def few(items: List[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
    parts = [("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes), *more]
    return "; ".join(f"{title}: {few(items)}" for title, items in parts if items)


def _fail(cls, name: str, expected: str, value: Any):
    plain = isinstance(value, (str, int, float, bool, type(None)))
    shown = repr(value) if plain and cls is ValueError else type(value).__name__ + (f" {value!r}" if plain else "")
    return cls(f"Finetuner: {name} must be {expected}, got {shown}")


def _real(name: str, value: Any, *, low: float = 0.0, high: float = math.inf, low_open: bool = False,
          high_open: bool = False) -> float:
    """``value`` as a float after checking that it is a finite number in the interval."""
    # numbers.Real: NumPy scalars too (np.float32 is no float subclass); np.bool_ is not Real
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(TypeError, name, "a number", value)
    if not isinstance(value, (int, float)):
        value = float(value)
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        bound = f"in {lo}{low}, {high}{hi}" if math.isfinite(high) else f"{'>' if low_open else '>='} {low}"
        raise _fail(ValueError, name, f"a finite number {bound}", value)
    return float(value)


def _count(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # np.int64 too
        raise _fail(TypeError, name, "an int", value)
    value = int(value)
    if value < low:
        raise _fail(ValueError, name, f"an int >= {low}", value)
    return value


def find_head(model: nn.Module) -> str:
    """The name of ``model``'s classification head: its last ``nn.Linear`` in registration order
    (``fc`` of a ResNet, ``heads.head`` of a ViT, ``classifier.1`` of an EfficientNet).

    Raises:
        ValueError: the model has no ``nn.Linear`` (pass ``head=[...]`` to :class:`Finetuner`).
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"Finetuner: could not find the head of {type(model).__name__} (it has no nn.Linear); "
                         "pass head=[<module names>], or head=[] for none")
    return names[-1]


def _logits(output: Any, who: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"Finetuner: the {who}'s output must be logits (a Tensor, an object with .logits or a tuple "
                    f"starting with them), got {type(output).__name__}")


def _check_same_plan(planned: Tuple[int, int], given: Tuple[int, int], whose: str, note: str = "") -> None:
    """ValueError unless a run planned for (batches per epoch, epochs) ``planned`` is given the same."""
    if tuple(given) != tuple(planned):
        raise ValueError(f"Finetuner: {whose} was planned for {planned[1]} epochs of {planned[0]} batches, got "
                         f"{given[1]} epochs of {given[0]} batches{note} (same epochs and train loader to resume; "
                         "a new Finetuner for another run)")


def _check_batch(logits: Tensor, labels: Any) -> Tensor:
    """Logits [batch, classes] and labels [batch] of class indices (cheap: shapes and dtypes, no
    synchronization); returns the labels as int64. A float label tensor would otherwise reach
    F.cross_entropy as class probabilities (a [batch] float tensor against [batch] logits trains
    as one sample), and one-hot labels make the accuracy meaningless. Other integer dtypes (int32
    from NumPy arrays, ...) are widened: F.cross_entropy takes int64 (and uint8) only."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        what = f"{labels.dtype} tensor" if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"Finetuner: labels must be class indices (an integer tensor [batch]), got a {what}; "
                        "one-hot or soft labels are not supported (labels.argmax(-1) gives the indices)")
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"Finetuner: the model's logits must be [batch, classes] and the labels [batch], got logits "
                         f"of shape {tuple(logits.shape)} and labels of shape {tuple(labels.shape)}")
    return labels.long()


def _unpack(batch: Any) -> Tuple[Any, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"Finetuner: a batch must be an (inputs, labels) pair, got {type(batch).__name__}")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _batches(loader: Any, name: str) -> int:
    if isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):
        # a str has a length: it was taken, and failed only when the first epoch's evaluation ran
        raise TypeError(f"Finetuner: {name} must be an iterable of batches (a DataLoader), got "
                        f"{type(loader).__name__}")
    try:
        n = len(loader)
    except TypeError:
        raise TypeError(f"Finetuner: {name} must have a length (a DataLoader over a map-style dataset), "
                        f"got {type(loader).__name__}") from None
    if n == 0:
        raise ValueError(f"Finetuner: {name} is empty (0 batches)")
    return n


# ------------------------------------------------------------------------------ RNG state
def _get_rng(device: torch.device) -> Dict[str, Any]:
    """Every global RNG a training step on ``device`` may draw from, in types
    ``torch.load(weights_only=True)`` reads. On CUDA, the generator of ``device`` only: under
    torchrun each rank draws from its own GPU, and a resumed run may see another number of GPUs."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


def _set_rng(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


class _StopRequest:
    """Ctrl-C during :meth:`Finetuner.fit`: the first SIGINT only sets ``requested`` (the loop stops
    after the running step, so that the checkpoint holds a whole step); a second one interrupts."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def _deferred_sigint(distributed: bool = False) -> Iterator[_StopRequest]:
    """Defer SIGINT (see :class:`_StopRequest`). ``distributed``: SIGTERM too, and every later
    signal is also deferred: under torchrun a Ctrl-C reaches each rank twice (from the terminal and
    forwarded by the launcher), and a rank interrupted inside a collective would leave the others
    waiting in it; the launcher's SIGKILL after its grace period is the hard stop."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals reach the main thread only
        return
    signals = (signal.SIGINT, signal.SIGTERM) if distributed else (signal.SIGINT,)
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):
        stop.requested = True
        if not distributed:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])  # a second Ctrl-C interrupts at once

    for s in signals:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _progress_bar(enabled: bool, **kwargs: Any):
    """A tqdm bar (``tqdm.auto``: a widget in notebooks), or a silent stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            warnings.warn("Finetuner: progress=True needs tqdm (pip install tqdm); training without progress bars",
                          stacklevel=3)
        else:
            return tqdm(dynamic_ncols=True, **kwargs)
    from types import SimpleNamespace

    return SimpleNamespace(update=lambda n=1: None, set_postfix=lambda *a, **k: None, close=lambda: None)


# ------------------------------------------------------------------------------ Finetuner
class Finetuner:
    """Fine-tunes a classifier with one of :data:`METHODS`; keeps the optimizer, LR schedule,
    pruner and history, and checkpoints them so that a resumed run equals an uninterrupted one.

    Args:
        model: the model to train (in place), with its pretrained weights loaded and its head
            sized for the task. Moved to ``device``.
        method: ``"baseline"``, ``"l2sp"``, ``"distill"`` or ``"prune"`` (see the module docs).
        lr: peak learning rate (> 0).
        weight_decay: AdamW's decoupled weight decay of the weight matrices (biases and norm
            weights get none).
        l2sp: ``"l2sp"`` only (default 1e-2): strength of the pull of the body's weights toward
            their values at construction, ``l2sp/2 ||w - w0||^2``; the head and the biases and
            norm weights are not pulled.
        head: module or parameter names of the new head (not pulled by L2-SP, not pruned).
            Default: :func:`find_head`, the last ``nn.Linear``.
        teacher: ``"distill"`` only, required: the teacher model; it runs in eval mode under
            ``no_grad`` and must output logits of the student's shape.
        temperature, alpha, divergence: ``"distill"``: :func:`~pyfinetune.losses.kd_loss`'s
            (loss per example ``alpha T^2 D + (1 - alpha) CE``).
        sparsity: ``"prune"`` only (default 0.5): the fraction of the weights of every pruned
            layer that is zero at the end.
        prune_start, prune_end: ``"prune"``: the fractions of the training steps where the
            cubic schedule of :class:`~pyfinetune.prune.GradualPruner` starts and reaches
            ``sparsity``; the steps after ``prune_end`` fine-tune the final masks.
        prune_every: steps between mask updates (default: 10 updates over the schedule).
        prune_include, prune_exclude: module-name globs of the layers to prune (``nn.Linear``
            and ``nn.Conv2d``); ``prune_exclude`` defaults to the head and the layers that
            :func:`pyfinetune.prune.default_exclusions` keeps dense (the stem convolution and
            the classifier); pass ``prune_exclude=[]`` to prune every layer but the head.
        epochs: training epochs of :meth:`fit`.
        scheduler: LR schedule over all steps: ``"cosine"`` (to 0), ``"linear"`` (to 0) or
            ``"constant"``.
        device: where to train (default: the model's device).
        amp: None, ``torch.bfloat16`` or ``torch.float16``: run forward and loss under
            ``torch.autocast`` with that dtype (float16 adds a ``GradScaler``).
        grad_clip: None or the max norm of the gradients (``clip_grad_norm_``).
        seed: None, or an int to seed torch, ``random`` and numpy when a run starts (not when it
            resumes: the checkpoint restores the RNG states). Under torch.distributed rank r is
            seeded with ``seed + r`` (with None: a fresh seed per rank), so that the ranks' dropout
            masks and random augmentations differ.
        progress: show tqdm progress bars for training and evaluation (on rank 0 only under
            ``torch.distributed``).
        find_unused_parameters: passed to ``DistributedDataParallel`` under torch.distributed:
            True for models whose training loss leaves some parameters without a gradient (e.g.
            torchvision's GoogLeNet / Inception v3, whose auxiliary heads the loss ignores);
            DDP then fails on the second step without it.

    Distributed: built while a process group of two or more processes is initialized (e.g. by
    ``torchrun``), every rank builds its Finetuner alike and calls the same methods; then

    * rank 0's starting weights (and teacher) are broadcast to all ranks at construction, before
      L2-SP anchors them; :meth:`fit` wraps :attr:`model` in ``DistributedDataParallel`` (the
      teacher is not wrapped) and :attr:`model` stays the plain module, identical on all ranks;
    * ``train_loader`` is split over the ranks (see ``pyfinetune/_distributed.py``): its
      ``batch_size`` is per rank, so one step sees ``batch_size x world`` examples and the
      gradients are averaged over them; the sampler gets ``set_epoch`` every epoch (shuffled with
      ``seed``, 0 when None), so resuming mid-epoch replays the same order;
    * the pruner computes the same masks on every rank (from identical weights);
    * the history's metrics and :meth:`evaluate` are global (sums all-reduced; evaluation splits a
      map-style loader's dataset over the ranks without padding, each example once);
    * :meth:`save_checkpoint` is collective: rank 0 writes the file, with every rank's RNG states
      and running totals; every rank loads it on resume. Ctrl-C (SIGINT or SIGTERM, on any rank)
      stops all ranks after the same step and rank 0 saves ``last.pt``;
    * BatchNorm layers normalize each rank's batch (convert them with
      ``nn.SyncBatchNorm.convert_sync_batchnorm`` on GPUs for statistics of the global batch).

    Raises:
        TypeError, ValueError: an invalid argument, named in the message.
    """

    def __init__(self, model: nn.Module, method: str = "baseline", *, lr: float = 1e-3, weight_decay: float = 1e-2,
                 l2sp: Optional[float] = None, head: Optional[Sequence[str]] = None,
                 teacher: Optional[nn.Module] = None, temperature: float = 2.0, alpha: float = 0.5,
                 divergence: str = "forward_kl", sparsity: Optional[float] = None, prune_start: float = 0.0,
                 prune_end: float = 0.7, prune_every: Optional[int] = None, prune_include: Any = None,
                 prune_exclude: Any = None, epochs: int = 10, scheduler: str = "cosine",
                 device: Union[None, str, torch.device] = None, amp: Optional[torch.dtype] = None,
                 grad_clip: Optional[float] = None, seed: Optional[int] = None, progress: bool = True,
                 find_unused_parameters: bool = False):
        if not isinstance(model, nn.Module):
            raise _fail(TypeError, "model", "an nn.Module", model)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("Finetuner: model must be the module itself, not DistributedDataParallel: "
                            "under torch.distributed Finetuner wraps it")
        if method not in METHODS:
            raise _fail(ValueError, "method", f"one of {METHODS}", method)
        given = {"l2sp": l2sp, "teacher": teacher, "sparsity": sparsity}
        for arg, owner in _METHOD_ONLY.items():
            if given[arg] is not None and method != owner:
                raise ValueError(f"Finetuner: {arg} is an argument of method={owner!r}, not of method={method!r}")
        if method == "distill" and teacher is None:
            raise ValueError("Finetuner: method='distill' needs teacher=<the teacher nn.Module>")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise _fail(TypeError, "teacher", "an nn.Module", teacher)
        if teacher is not None and isinstance(model, nn.Module):
            if shares_trained_parameters(teacher, model):
                raise ValueError("Finetuner: teacher shares parameters that model trains (the same module, or layers "
                                 "of it): the teacher must be a separate, frozen model (copy.deepcopy(model) for a "
                                 "snapshot)")
        self.method = method
        self.lr = _real("lr", lr, low_open=True)
        self.weight_decay = _real("weight_decay", weight_decay)
        self.l2sp = _real("l2sp", _DEFAULTS["l2sp"] if l2sp is None else l2sp)
        self.temperature = _real("temperature", temperature, low_open=True)
        self.alpha = _real("alpha", alpha, high=1.0)
        if divergence not in DIVERGENCES:
            raise _fail(ValueError, "divergence", f"one of {DIVERGENCES}", divergence)
        self.divergence = divergence
        self.sparsity = _real("sparsity", _DEFAULTS["sparsity"] if sparsity is None else sparsity, high=1.0,
                              high_open=True)
        self.prune_start = _real("prune_start", prune_start, high=1.0)
        self.prune_end = _real("prune_end", prune_end, high=1.0)
        if self.prune_end <= self.prune_start:
            raise ValueError(f"Finetuner: prune_end must be > prune_start, got prune_end={prune_end}, "
                             f"prune_start={prune_start}")
        self.prune_every = None if prune_every is None else _count("prune_every", prune_every)
        self.epochs = _count("epochs", epochs)
        if scheduler not in SCHEDULERS:
            raise _fail(ValueError, "scheduler", f"one of {SCHEDULERS}", scheduler)
        self.scheduler_name = scheduler
        if amp is not None and amp not in (torch.bfloat16, torch.float16):
            raise _fail(TypeError, "amp", "None, torch.bfloat16 or torch.float16", amp)
        self.amp = amp
        self.grad_clip = None if grad_clip is None else _real("grad_clip", grad_clip, low_open=True)
        if seed is not None:
            seed = _count("seed", seed, low=0)
            if seed >= 2**63:  # torch.manual_seed(seed + rank) must take it
                raise _fail(ValueError, "seed", "an int in [0, 2**63)", seed)
        self.seed = seed
        if not isinstance(progress, bool):
            raise _fail(TypeError, "progress", "a bool", progress)
        self.progress = progress
        self.device = self._device(model, device)

        self._dist = _distributed.Group.current()
        self._bars = progress and (self._dist is None or self._dist.main)
        self.model = model.to(self.device)
        self.teacher = None if teacher is None else teacher.to(self.device).eval()
        if self._dist is not None:  # before L2-SP anchors the weights: the same start on every rank
            self._dist.broadcast_module(self.model)
            if self.teacher is not None:
                self._dist.broadcast_module(self.teacher)
        self._net: nn.Module = self.model  # what training runs: DistributedDataParallel(model) once fit() wraps it
        self.head = self._heads(head)
        # Options of another method with a value other than their default: refused, not ignored.
        others = {"temperature": (temperature, 2.0, "distill"), "alpha": (alpha, 0.5, "distill"),
                  "divergence": (divergence, "forward_kl", "distill"), "prune_start": (prune_start, 0.0, "prune"),
                  "prune_end": (prune_end, 0.7, "prune"), "prune_every": (prune_every, None, "prune"),
                  "prune_include": (prune_include, None, "prune"), "prune_exclude": (prune_exclude, None, "prune")}
        for arg, (value, default, owner) in others.items():
            same = value is default or (isinstance(value, (numbers.Real, str)) and not isinstance(value, bool)
                                        and value == default)
            if method != owner and not same:
                raise ValueError(f"Finetuner: {arg} is an argument of method={owner!r}, not of method={method!r} "
                                 f"(got {arg}={value!r})")
        self.prune_include = prune_include
        if not isinstance(find_unused_parameters, bool):
            raise _fail(TypeError, "find_unused_parameters", "a bool", find_unused_parameters)
        self.find_unused_parameters = find_unused_parameters
        self.prune_exclude = self._prune_exclude(prune_exclude)
        self.optimizer = self._make_optimizer()
        if method == "prune":
            # Masks appear when fit() builds the pruner; the hooks follow every change from then on.
            _prune.mask_optimizer(self.optimizer, self.model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == torch.float16)
        self.scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
        self.pruner: Optional[_prune.GradualPruner] = None
        self.history: List[Dict[str, Any]] = []
        self.epoch = 0  # completed epochs
        self.step = 0  # completed optimizer steps
        self._plan_shape: Optional[Tuple[int, int]] = None  # (steps per epoch, epochs) of the schedules
        self._batch_in_epoch = 0
        # loss sum, correct, examples of the running epoch (float32 on MPS, which has no float64)
        self._epoch_totals = torch.zeros(3, dtype=torch.float32 if self.device.type == "mps" else torch.float64)
        self._epoch_rng: Optional[Dict[str, Any]] = None
        self._rng_mark: Optional[Dict[str, Any]] = None  # RNG at the last step boundary, inside fit()
        self._last_step_lr: Optional[float] = None  # the lr of the last step taken (an epoch's record)
        self._epoch_seconds = 0.0
        self.interrupted_checkpoint: Optional[str] = None  # where fit() saved the state at Ctrl-C

    # ---------------------------------------------------------------------------- setup
    @staticmethod
    def _device(model: nn.Module, device: Any) -> torch.device:
        if device is None:
            first = next(iter(model.parameters()), None)
            return first.device if first is not None else torch.device("cpu")
        if not isinstance(device, (str, torch.device)):
            raise _fail(TypeError, "device", "None, a str or a torch.device", device)
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise _fail(ValueError, "device", 'a device such as "cpu" or "cuda:0"', device) from None
        if resolved.type == "meta":  # the model would be moved there, its weights gone
            raise _fail(ValueError, "device", 'a device with memory such as "cpu" or "cuda:0", not "meta"', device)
        try:  # a device this machine lacks: torch's error would come from model.to(), not naming device
            torch.empty(0, device=resolved)
        except (RuntimeError, AssertionError, NotImplementedError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"Finetuner: device {str(resolved)!r} is not usable here ({first})") from None
        return resolved

    def _heads(self, head: Optional[Sequence[str]]) -> List[str]:
        if head is None:
            return [find_head(self.model)] if self.method in ("l2sp", "prune") else []
        if isinstance(head, str) or not isinstance(head, (list, tuple)) or not all(isinstance(h, str) for h in head):
            raise _fail(TypeError, "head", "a list of module or parameter names", head)
        names = set(dict(self.model.named_parameters())) | set(dict(self.model.named_modules()))
        unknown = [h for h in head if h not in names]
        if unknown:
            raise ValueError(f"Finetuner: head names {unknown} are not modules or parameters of "
                             f"{type(self.model).__name__}")
        return list(head)

    def _head_globs(self) -> List[str]:
        """Module-name globs of the head: a module and everything in it; a parameter name stands for
        the module that holds it, that module alone (the pruners select modules: the head's layer
        stays dense, not the other layers of a container that holds a head parameter such as a
        position embedding)."""
        params, modules = dict(self.model.named_parameters()), dict(self.model.named_modules())
        globs: List[str] = []
        for h in self.head:
            found = [h.rpartition(".")[0]] if h in params and h not in modules else [h, h + ".*"]
            globs += [g for g in found if g not in globs]
        return globs

    def _prune_exclude(self, exclude: Any) -> Any:
        """What the pruner leaves dense: the head always, plus ``exclude`` (None or "default":
        what the pruners leave dense by default, the stem and the classifier)."""
        head = self._head_globs()
        if exclude is None or (isinstance(exclude, str) and exclude == "default"):
            return head + [n for n in _prune.default_exclusions(self.model) if n not in head]
        if callable(exclude):
            return lambda name, module: any(fnmatch.fnmatchcase(name, g) for g in head) or exclude(name, module)
        extra = [exclude] if isinstance(exclude, str) else list(exclude) if isinstance(exclude, (list, tuple)) else None
        if extra is None or not all(isinstance(g, str) for g in extra):
            raise TypeError(f"Finetuner: prune_exclude must be a module-name glob, a list of globs or a callable "
                            f"(name, module) -> bool, got {type(exclude).__name__}")
        return head + [g for g in extra if g not in head]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        named, _ = split_parameters(self.model, self.head)
        groups = []
        for key, members in named.items():
            if not members:
                continue
            group = {"params": [p for _, p in members], "name": key,
                     "weight_decay": 0.0 if key.endswith("_no_decay") else self.weight_decay}
            if self.method == "l2sp":
                group["l2sp"] = self.l2sp if key == "body" else 0.0
            groups.append(group)
        if not groups:
            raise ValueError(f"Finetuner: {type(self.model).__name__} has no trainable parameter")
        if self.method == "baseline":
            # fused on CUDA: one launch per step, and GradScaler hands it the scale and the
            # overflow flag without a host sync
            return torch.optim.AdamW(groups, lr=self.lr, fused=self.device.type == "cuda" or None)
        # l2sp: anchor="init" holds the weights as they are now, the pretrained ones.
        return _optim.AdamW(groups, lr=self.lr)

    def _seed_run(self) -> None:
        """Seeds a fresh run: with ``seed``, and under torch.distributed every rank differently
        (``seed + rank``; a fresh random seed per process when ``seed`` is None). torch starts
        every process from the same default seed, so without this each rank would draw the same
        dropout masks and random augmentations: the ranks' batches would share their noise. The
        weights stay identical (rank 0's, broadcast) and the sampler's order uses ``seed`` alone."""
        rank = self._dist.rank if self._dist is not None else 0
        if self.seed is not None:
            _seed_everything(self.seed + rank)
        elif self._dist is not None:
            _seed_everything(torch.seed())

    def _plan(self, steps_per_epoch: int, epochs: int) -> None:
        """Build the LR schedule and the pruner for ``epochs`` epochs of ``steps_per_epoch`` steps
        (once; a run keeps its schedules)."""
        shape = (steps_per_epoch, epochs)
        if self._plan_shape is not None:
            _check_same_plan(self._plan_shape, shape, "this run")
            return
        total = steps_per_epoch * epochs
        if self.method == "prune":
            start, end, every = self._prune_schedule(total)  # checks total >= 2
        if self.scheduler_name == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
        elif self.scheduler_name == "linear":
            self.scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, 1.0, 0.0, total_iters=total)
        if self.method == "prune":
            self.pruner = _prune.GradualPruner(self.model, self.sparsity, start, end, every,
                                               include=self.prune_include, exclude=self.prune_exclude)
        self._plan_shape = shape

    def _prune_schedule(self, total: int) -> Tuple[int, int, int]:
        """(start_step, end_step, every) of the pruner of a run of ``total`` steps."""
        if total < 2:
            raise ValueError(f"Finetuner: method='prune' needs at least 2 training steps, got {total}")
        last = total - 1
        start = min(round(self.prune_start * last), last - 1)
        end = max(round(self.prune_end * last), start + 1)
        every = self.prune_every or max(1, (end - start) // 10)
        return start, end, every

    def _check_resumable(self, state: Dict[str, Any], expected_plan: Optional[Tuple[int, int]]) -> None:
        """What load_state_dict would refuse only after changing things: the plan (batches per
        epoch, epochs) against this run's, the pruning schedule the plan gives here against the
        checkpoint pruner's, and the optimizer's parameter groups (count and sizes). ValueError."""
        plan = state.get("plan")
        if plan is not None:
            plan = tuple(int(v) for v in plan)
            for here, what in ((self._plan_shape, " (this Finetuner's run)"), (expected_plan, "")):
                if here is not None:
                    _check_same_plan(plan, tuple(here), "the checkpoint's run", what)
            if self.method == "prune":
                pruner_state = state.get("pruner")
                if not isinstance(pruner_state, dict) or not all(
                        k in pruner_state for k in ("step_count", "last_sparsity", "config")):
                    raise ValueError("Finetuner: the checkpoint's pruner state is missing or incomplete")
                _prune._checked_progress("GradualPruner", pruner_state)
                start, end, every = self._prune_schedule(plan[0] * plan[1])
                saved = pruner_state.get("config", {})
                layers = [name for name, _ in _prune._select_layers(self.model, self.prune_include,
                                                                    self.prune_exclude)]
                here = dict(start_step=start, end_step=end, every=every, final_sparsity=self.sparsity,
                            layers=saved.get("layers") if self.pruner is not None else layers)
                differ = {k: (saved.get(k), v) for k, v in here.items() if saved.get(k) != v}
                if differ:
                    raise ValueError(
                        "Finetuner: the checkpoint's pruning schedule differs from this Finetuner's ("
                        + ", ".join(f"{k}: checkpoint {a}, here {b}" for k, (a, b) in differ.items())
                        + f"; from prune_start={self.prune_start}, prune_end={self.prune_end}, "
                        f"prune_every={self.prune_every}): build the Finetuner with the checkpoint's")
        if self.scaler.is_enabled() and not state.get("scaler"):
            raise ValueError("Finetuner: the checkpoint has no grad scaler state but this run scales its loss (amp)")
        saved_groups = state["optimizer"].get("param_groups", []) if isinstance(state.get("optimizer"), dict) else []
        sizes_saved = [len(g.get("params", ())) for g in saved_groups]
        sizes_here = [len(g["params"]) for g in self.optimizer.param_groups]
        if sizes_saved != sizes_here:
            raise ValueError(
                f"Finetuner: the checkpoint's optimizer has parameter groups of sizes {sizes_saved}, this one "
                f"{sizes_here} (parameters frozen or unfrozen between the runs? the head or method differ?)")

    # ---------------------------------------------------------------------------- one step
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def _wrap(self) -> None:
        """Under torch.distributed, wrap the model in DDP (after ``_plan``: the pruner's mask
        buffers must exist when DDP lists the buffers it broadcasts)."""
        if self._dist is None or self._net is not self.model:
            return
        ids = [self.device] if self.device.type == "cuda" else None
        self._net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                        find_unused_parameters=self.find_unused_parameters)

    def _loss(self, inputs: Any, labels: Tensor) -> Tuple[Tensor, Tensor]:
        logits = _logits(self._net(inputs), "model")
        labels = _check_batch(logits, labels)
        if self.method != "distill":
            return F.cross_entropy(logits, labels), logits
        with torch.no_grad():
            teacher_logits = _logits(self.teacher(inputs), "teacher")
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"Finetuner: the teacher's logits {tuple(teacher_logits.shape)} must have the shape of "
                             f"the student's {tuple(logits.shape)} (same classes)")
        loss = kd_loss(logits, teacher_logits, labels, temperature=self.temperature, alpha=self.alpha,
                       divergence=self.divergence)
        return loss, logits

    def _train_step(self, inputs: Any, labels: Tensor) -> Tuple[Tensor, Tensor]:
        with self._autocast():
            loss, logits = self._loss(inputs, labels)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.pruner is not None:
            self.pruner.step()
        return loss.detach(), (logits.detach().argmax(-1) == labels).sum()

    def _sparsity(self) -> Optional[float]:
        if self.pruner is None:
            return None
        masks = [m.weight_mask for _, m in self.pruner.layers]
        return 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    # ---------------------------------------------------------------------------- fit
    def fit(self, train_loader: Any, val_loader: Any = None, *, epochs: Optional[int] = None,
            checkpoint_dir: Union[None, str, os.PathLike] = None, resume: Union[None, str, os.PathLike] = None,
            callback: Optional[Callable[["Finetuner", Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
        """Train until ``epochs`` epochs are done (counting those of a resumed checkpoint).

        Args:
            train_loader: a sized iterable of ``(inputs, labels)`` batches (a ``DataLoader``).
            val_loader: optional; evaluated after every epoch (see :meth:`evaluate`).
            epochs: default the constructor's. The LR schedule and the pruning schedule span
                all epochs; they are fixed by the first ``fit`` of a run.
            checkpoint_dir: write ``epoch-NNN.pt`` and ``last.pt`` there after every epoch,
                and ``last.pt`` when interrupted.
            resume: a checkpoint to continue from (:meth:`load_checkpoint`); the resumed run
                ends with the same weights as an uninterrupted one (on the CPU, and given the
                same data order: the loader's shuffling draws from the restored RNG state).
            callback: called as ``callback(finetuner, record)`` after every epoch (on every rank
                under ``torch.distributed``, with the same global record).

        Returns:
            :attr:`history`: one dict per epoch with ``epoch`` (1-based), ``train_loss`` (the
            method's loss), ``train_accuracy``, ``val_loss`` and ``val_accuracy`` (cross-entropy
            and accuracy, None without ``val_loader``), ``lr`` (of the epoch's last step),
            ``sparsity`` (of the pruned layers; None unless ``"prune"``) and ``seconds``.

        Ctrl-C (SIGINT) stops after the running step; with ``checkpoint_dir`` that state is
        saved to ``last.pt`` (see :attr:`interrupted_checkpoint`), then KeyboardInterrupt is raised.
        """
        epochs = self.epochs if epochs is None else _count("epochs", epochs)
        if self._dist is not None:
            train_loader = _distributed.shard_train_loader(train_loader, self._dist, self.seed or 0)
        steps = _batches(train_loader, "train_loader")
        if self._dist is not None and not self._dist.same(steps):
            raise ValueError(f"Finetuner: train_loader must yield the same number of batches on every rank "
                             f"(DDP steps together), got {steps} on rank {self._dist.rank} and another number elsewhere")
        if val_loader is not None:
            _batches(val_loader, "val_loader")
        if callback is not None and not callable(callback):
            raise _fail(TypeError, "callback", "callable", callback)
        for name, path in (("checkpoint_dir", checkpoint_dir), ("resume", resume)):
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise _fail(TypeError, name, "None, a str or an os.PathLike", path)
        if checkpoint_dir is not None and os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise ValueError(f"Finetuner: checkpoint_dir {os.fspath(checkpoint_dir)} is a file, not a folder")
        if checkpoint_dir is not None and (self._dist is None or self._dist.main):
            # Made now, not after the first epoch's training (a parent that is a file, no permission).
            try:
                os.makedirs(checkpoint_dir, exist_ok=True)
            except OSError as e:
                raise ValueError(f"Finetuner: checkpoint_dir {os.fspath(checkpoint_dir)} cannot be created "
                                 f"({type(e).__name__}: {e})") from None
            if not os.access(checkpoint_dir, os.W_OK):
                raise ValueError(f"Finetuner: checkpoint_dir {os.fspath(checkpoint_dir)} is not writable")
        if resume is not None:
            self.load_checkpoint(resume, _plan=(steps, epochs))
        elif self.step == 0 and self._batch_in_epoch == 0:
            self._seed_run()
        self._plan(steps, epochs)
        self._wrap()
        self.interrupted_checkpoint = None
        was_training = self.model.training
        self._rng_mark = _get_rng(self.device)
        failed = False
        try:
            with _deferred_sigint(self._dist is not None) as stop:
                while self.epoch < epochs:
                    record = self._fit_epoch(train_loader, val_loader, steps, epochs, stop)
                    if checkpoint_dir is not None:
                        path = os.path.join(checkpoint_dir, f"epoch-{self.epoch:03d}.pt")
                        self.save_checkpoint(path)
                        self.save_checkpoint(os.path.join(checkpoint_dir, "last.pt"))
                    if callback is not None:
                        callback(self, record)
                    # A Ctrl-C during validation, the checkpoint or the callback: stop here, between
                    # epochs (the loop only looks at it after each step).
                    if stop.requested if self._dist is None else self._dist.any(stop.requested):
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if checkpoint_dir is not None:
                self.interrupted_checkpoint = os.path.join(checkpoint_dir, "last.pt")
                self.save_checkpoint(self.interrupted_checkpoint)
            failed = True
            raise
        except BaseException:
            failed = True
            raise
        finally:
            if failed and self._rng_mark is not None:
                # Interrupted or failed mid-step: put the random generators back where the last
                # whole step left them (the shuffle and dropout draws of the step that did not
                # finish are undone), so that fit() again continues as a resume of the checkpoint
                # does, not from generators that ran ahead.
                _set_rng(self._rng_mark, self.device)
            self._rng_mark = None
            self.model.train(was_training)
        return self.history

    def _fit_epoch(self, loader: Any, val_loader: Any, steps: int, epochs: int, stop: _StopRequest) -> Dict[str, Any]:
        skip = self._batch_in_epoch
        if skip == 0:
            self._epoch_rng = _get_rng(self.device)
            self._epoch_totals.zero_()
            self._epoch_seconds = 0.0
        else:  # resumed mid-epoch: replay the loader's draws, skip the batches done, then go on
            _set_rng(self._epoch_rng, self.device)
        started = time.perf_counter()
        _distributed.set_epoch(loader, self.epoch)
        batches = iter(loader)
        for _ in range(skip):
            next(batches)
        if skip:
            _set_rng(self._rng_mark, self.device)
        self.model.train()
        bar = _progress_bar(self._bars, total=steps, initial=skip, desc=f"epoch {self.epoch + 1}/{epochs}",
                            unit="batch")
        totals = self._epoch_totals = self._epoch_totals.to(self.device)
        # Resumed after the epoch's last step (interrupted before its record): no step runs here,
        # and the optimizer's lr is already the next step's.
        lr = self._last_step_lr if skip and self._last_step_lr is not None else self.optimizer.param_groups[0]["lr"]
        try:
            for batch in batches:
                inputs, labels = _unpack(batch)
                inputs, labels = _to(inputs, self.device), _to(labels, self.device)
                lr = self.optimizer.param_groups[0]["lr"]
                loss, correct = self._train_step(inputs, labels)
                n = labels.shape[0]
                totals[0] += loss.to(totals.dtype) * n  # on the device: no host sync per step
                totals[1] += correct
                totals[2] += n
                self.step += 1
                self._batch_in_epoch += 1
                self._last_step_lr = float(lr)
                self._rng_mark = _get_rng(self.device)
                bar.update(1)
                if self._bars and (self._batch_in_epoch % 10 == 0 or self._batch_in_epoch == steps):
                    # formatting reads the device totals: a host sync, so only where a bar shows it
                    bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}", acc=f"{totals[1] / totals[2]:.3f}")
                if stop.requested if self._dist is None else self._dist.any(stop.requested):
                    raise KeyboardInterrupt  # on every rank after the same step
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the epoch's time includes its queued GPU work
            seconds = self._epoch_seconds + time.perf_counter() - started
            if self._dist is not None:
                totals = self._dist.sum(totals)  # the epoch's global numbers; the running ones stay per rank
            val = self.evaluate(val_loader) if val_loader is not None else None
            if val is not None:
                bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}", acc=f"{totals[1] / totals[2]:.3f}",
                                val_loss=f"{val['loss']:.4f}", val_acc=f"{val['accuracy']:.3f}")
        except BaseException:
            self._epoch_seconds += time.perf_counter() - started
            raise
        finally:
            bar.close()
        record = {"epoch": self.epoch + 1, "train_loss": float(totals[0] / totals[2]),
                  "train_accuracy": float(totals[1] / totals[2]),
                  "val_loss": None if val is None else val["loss"],
                  "val_accuracy": None if val is None else val["accuracy"],
                  "lr": float(lr), "sparsity": self._sparsity(), "seconds": seconds}
        self.history.append(record)
        self.epoch += 1
        self._batch_in_epoch = 0
        self._rng_mark = _get_rng(self.device)
        return record

    # ---------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, loader: Any) -> Dict[str, float]:
        """Mean cross-entropy and accuracy of the model over ``loader``'s ``(inputs, labels)``
        batches, in eval mode (the model's mode is restored after).

        Under ``torch.distributed`` every rank must call it: a ``DataLoader`` over a map-style
        dataset is split over the ranks (each example once, no padding) and the sums are
        all-reduced; any other loader is evaluated whole on every rank. Every rank returns the
        global numbers.

        Returns:
            ``{"loss": float, "accuracy": float, "n": int}`` (n: examples seen).
        """
        steps = _batches(loader, "loader")
        part = None if self._dist is None else _distributed.shard_eval_loader(loader, self._dist)
        if part is not None:
            loader, steps = part, len(part)
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        n = 0
        bar = _progress_bar(self._bars, total=steps, desc="evaluate", unit="batch", leave=False)
        try:
            for batch in loader:
                inputs, labels = _unpack(batch)
                inputs, labels = _to(inputs, self.device), _to(labels, self.device)
                with self._autocast():
                    logits = _logits(self.model(inputs), "model")
                labels = _check_batch(logits, labels)
                loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
                correct += (logits.argmax(-1) == labels).sum()
                n += labels.shape[0]
                bar.update(1)
        finally:
            bar.close()
            self.model.train(was_training)
        if part is not None:
            loss_sum, correct, n = self._dist.sum(torch.stack([loss_sum, correct.to(loss_sum.dtype),
                                                               torch.tensor(float(n), dtype=loss_sum.dtype,
                                                                            device=self.device)])).tolist()
            correct, n = int(correct), int(n)
        if n == 0:
            raise ValueError("Finetuner.evaluate: the loader yielded no example")
        return {"loss": float(loss_sum) / n, "accuracy": int(correct) / n, "n": n}

    # ---------------------------------------------------------------------------- export
    def export(self) -> nn.Module:
        """The trained model, ready for inference (in eval mode). ``"prune"``: a copy whose masked
        ``nn.Linear`` layers are :class:`~pyfinetune.prune.SparseLinear` (only the kept weights;
        masked ``nn.Conv2d`` layers stay masked); the other methods: :attr:`model` itself, put in
        eval mode (:meth:`fit` puts it back in training mode)."""
        if self.method != "prune":
            return self.model.eval()
        return _prune.sparsify(copy.deepcopy(self.model)).eval()

    # ---------------------------------------------------------------------------- state
    def _config(self) -> Dict[str, Any]:
        return {"method": self.method, "head": list(self.head), "sparsity": self.sparsity,
                "scheduler": self.scheduler_name, "amp": str(self.amp)}

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs: model, optimizer (L2-SP anchors and masks included),
        LR scheduler, pruner, grad scaler, epoch and step, history, the RNG states (torch, CUDA,
        ``random``, numpy) and the running epoch's totals. Only tensors, numbers, strings,
        lists and dicts: ``torch.load(weights_only=True)`` reads it.

        Under ``torch.distributed`` it is collective: ``"ranks"`` holds every rank's RNG states
        and running totals (the rest is rank 0's, the same on every rank)."""
        state = {
            "format": _FORMAT, "config": self._config(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "pruner": None if self.pruner is None else self.pruner.state_dict(),
            "scaler": self.scaler.state_dict(),
            "plan": None if self._plan_shape is None else list(self._plan_shape),
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self._batch_in_epoch,
            "epoch_totals": self._epoch_totals.cpu().clone(), "epoch_seconds": self._epoch_seconds,
            "epoch_rng": self._epoch_rng, "rng": self._rng_mark if self._rng_mark is not None else _get_rng(self.device),
            "history": copy.deepcopy(self.history), "last_lr": self._last_step_lr,
        }
        if self._dist is not None:
            state["ranks"] = self._dist.gather({k: state[k] for k in _PER_RANK})
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (into a Finetuner built with the same method and model
        architecture; also sets the global RNG states, so that training continues identically).

        The run continues the checkpoint's optimizer and schedules: its learning rate, weight decay
        and L2-SP strength are the checkpoint's, whatever this Finetuner was given; the other
        options (``grad_clip``, the distillation loss's ``temperature`` / ``alpha`` /
        ``divergence``, ``progress``) are this Finetuner's.

        Raises:
            ValueError: the state is not a Finetuner checkpoint, or comes from another method,
                head, sparsity, schedule or an incompatible model (keys, shapes or pruned layers
                named); checked before anything is changed.
        """
        self._load_state(state, None)

    def _load_state(self, state: Dict[str, Any], expected_plan: Optional[Tuple[int, int]]) -> None:
        """load_state_dict, with fit's (batches per epoch, epochs) when it resumes."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"Finetuner: not a Finetuner checkpoint (expected format {_FORMAT!r})")
        differ = [k for k, v in self._config().items() if state["config"].get(k) != v]
        if differ:
            details = ", ".join(f"{k}: checkpoint {state['config'].get(k)!r}, here {self._config()[k]!r}" for k in differ)
            raise ValueError(f"Finetuner: the checkpoint is from another run ({details})")
        self._check_model_state(state["model"], will_plan=state["plan"] is not None and self._plan_shape is None)
        self._check_resumable(state, expected_plan)
        mine = self._own_part(state)
        # The optimizer first: it checks its state against the parameters and, refusing it, is left
        # as it was (pyfinetune's optimizers restore themselves; torch's refuse before changing),
        # before the model or the schedules change. What follows was checked above.
        opt = self.optimizer
        snapshot = getattr(opt, "_state_snapshot", None)
        before = snapshot() if snapshot is not None else (opt.state, opt.param_groups)
        opt.load_state_dict(state["optimizer"])
        try:
            if state["plan"] is not None:
                self._plan(*state["plan"])  # schedules and pruner (masks) must exist before their states load
            self.model.load_state_dict(state["model"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.pruner is not None:
                self.pruner.load_state_dict(state["pruner"])
            self.scaler.load_state_dict(state["scaler"])
        except BaseException:
            if snapshot is not None:
                opt._restore_state(before)
            else:  # torch's optimizers: load_state_dict replaced both objects
                opt.state, opt.param_groups = before
            raise
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._batch_in_epoch = int(state["batch_in_epoch"])
        self._epoch_totals = mine["epoch_totals"].to(self.device, self._epoch_totals.dtype).clone()
        self._epoch_seconds = float(state["epoch_seconds"])
        self._epoch_rng = mine["epoch_rng"]
        self.history = copy.deepcopy(state["history"])
        last_lr = state.get("last_lr")  # absent from older checkpoints
        self._last_step_lr = None if last_lr is None else float(last_lr)
        _set_rng(mine["rng"], self.device)

    def _check_model_state(self, saved: Dict[str, Any], will_plan: bool) -> None:
        """A ValueError naming what does not fit, before load_state_dict changes anything: the
        checkpoint's model keys and shapes against this model's, and its pruned layers (mask
        buffers) against those this run prunes (``will_plan``: the pruner is not built yet)."""
        own = self.model.state_dict()
        is_mask = lambda k: k.endswith(".weight_mask")  # noqa: E731
        masks_here = {k for k in own if is_mask(k)}
        if will_plan and self.method == "prune":
            masks_here |= {f"{name}.weight_mask" if name else "weight_mask"
                           for name, _ in _prune._select_layers(self.model, self.prune_include, self.prune_exclude)}
        masks_saved = {k for k in saved if is_mask(k)}
        missing, unexpected, shapes = state_differences(own, saved, skip=is_mask)
        pruned = sorted(masks_saved ^ masks_here)
        if missing or unexpected or shapes or pruned:
            raise ValueError("Finetuner: the checkpoint's model does not fit this model: " + describe_differences(
                missing, unexpected, [f"{k} {tuple(saved[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
                                      for k in shapes], [("pruned layers differ (prune_include / prune_exclude)",
                                                          pruned)]))

    def _own_part(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """This rank's RNG states and running totals in ``state``. In the middle of an epoch they
        must come from a run with as many processes (each rank continues its own draws and sums)."""
        ranks = state.get("ranks") or [state]
        world, rank = (1, 0) if self._dist is None else (self._dist.world, self._dist.rank)
        if len(ranks) == world:
            return ranks[rank]
        if self._batch_in_epoch:
            raise ValueError(f"Finetuner: the checkpoint was saved by {len(ranks)} process(es) in the middle of an "
                             f"epoch; resume it with {len(ranks)}, not {world}")
        return state

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> str:
        """Write :meth:`state_dict` to ``path`` with ``torch.save`` (through a temporary file, so
        an interrupted write never leaves a broken checkpoint). Returns the path.

        Under ``torch.distributed`` every rank calls it and rank 0 writes; it returns once the
        file is there (or raises on every rank when rank 0 could not write it)."""
        path = os.fspath(path)
        state = self.state_dict()
        error: Optional[BaseException] = None
        if self._dist is None or self._dist.main:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                tmp = path + ".tmp"
                torch.save(state, tmp)
                os.replace(tmp, path)
            except Exception as e:  # told to every rank below, then raised here
                if self._dist is None:
                    raise
                error = e
        if self._dist is not None and self._dist.any(error is not None):
            raise error or RuntimeError(f"Finetuner: rank 0 could not write the checkpoint {path}")
        return path

    def load_checkpoint(self, path: Union[str, os.PathLike], *, _plan: Optional[Tuple[int, int]] = None) -> None:
        """Load a checkpoint of :meth:`save_checkpoint` (``torch.load(weights_only=True)``)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Finetuner: no checkpoint at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: pickle, zip or torch errors of many kinds
            first = str(e).splitlines()[0] if str(e) else ""
            raise ValueError(f"Finetuner: cannot read the checkpoint {path} ({type(e).__name__}: {first}); "
                             "a file of save_checkpoint is expected") from e
        self._load_state(state, _plan)


def finetune(model: nn.Module, train_loader: Any, method: str = "baseline", val_loader: Any = None, *,
             checkpoint_dir: Union[None, str, os.PathLike] = None, resume: Union[None, str, os.PathLike] = None,
             **kwargs: Any) -> Tuple[nn.Module, List[Dict[str, Any]]]:
    """Fine-tune ``model`` on ``train_loader`` in one call: ``Finetuner(model, method, **kwargs)``,
    then :meth:`Finetuner.fit` (with ``val_loader``, ``checkpoint_dir``, ``resume``).

    Returns:
        ``(model, history)``: :meth:`Finetuner.export`'s model (for ``"prune"`` a copy with
        :class:`~pyfinetune.prune.SparseLinear` layers) and the per-epoch history.
    """
    tuner = Finetuner(model, method, **kwargs)
    history = tuner.fit(train_loader, val_loader, checkpoint_dir=checkpoint_dir, resume=resume)
    return tuner.export(), history
