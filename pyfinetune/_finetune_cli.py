"""``pyfinetune finetune``: fine-tune a torchvision (or the user's own) classifier on an image
folder with :class:`pyfinetune.Finetuner`.

Every input is checked before the first training step (data folder, images, model, weights,
teacher, method options, output folder, checkpoint to resume); a bad one is a :class:`UsageError`,
which the command prints as one line on stderr with exit code 2. Unreadable images are skipped,
listed, and recorded in ``metrics.json``. Ctrl-C saves a checkpoint and exits with code 130.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the command joins the process group
itself (NCCL on GPUs, one per rank: ``cuda:LOCAL_RANK``; gloo on the CPU) and trains with DDP:
``--batch-size`` is per process, every rank checks the inputs, and rank 0 alone prints and writes
the outputs.

torchvision, PIL and matplotlib are imported when the command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import importlib
import inspect
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import _distributed
from .finetuning import METHODS, Finetuner, describe_differences, find_head, state_differences

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The options a resumed run must share with the run it continues (they shape data, model or schedule).
_RUN_OPTIONS = ("data", "val", "val_split", "model", "weights", "method", "teacher", "teacher_weights", "sparsity",
                "l2sp", "temperature", "alpha", "epochs", "batch_size", "lr", "weight_decay", "image_size",
                "augment", "seed", "amp")
_PRUNED_FORMAT = ("masked state_dict: pruned weights are zero and each pruned layer has a bool "
                  "'<layer>.weight_mask'; load with pyfinetune.prune.load_pruned_state_dict(model, state_dict), "
                  "then pyfinetune.prune.sparsify(model) for SparseLinear layers")


class UsageError(Exception):
    """A bad input of ``pyfinetune finetune``, found before training."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    """The number of training processes: torchrun's ``WORLD_SIZE`` (1 without it)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
        int(os.environ.get("WORLD_SIZE", "1"))


def _say(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (every rank runs the command under torchrun)."""
    if _rank() == 0:
        print(*args, **kwargs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``pyfinetune finetune``."""
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, metavar="DIR",
                   help="training images, one subfolder per class (torchvision ImageFolder layout)")
    d.add_argument("--val", metavar="DIR", help="validation images, same classes (default: split from --data)")
    # None until resolved (_resolve_defaults): a --val-split beside --val, which would go unused, is refused
    d.add_argument("--val-split", type=float, metavar="FRACTION",
                   help="fraction of each class held out for validation when --val is not given; 0: none "
                        "(default 0.2)")
    d.add_argument("--image-size", type=int, default=224, metavar="PIXELS",
                   help="images are resized and center-cropped to this square (default 224)")
    d.add_argument("--augment", action="store_true", help="random resized crops and horizontal flips for training")
    d.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading worker processes (default: min(8, CPUs))")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="torchvision:resnet18", metavar="SPEC",
                   help="torchvision:NAME (a torchvision classification model, built without downloading) or "
                        "module.path:factory (called with num_classes=N when it takes it); default "
                        "torchvision:resnet18")
    m.add_argument("--weights", metavar="FILE",
                   help="a local state_dict for the model as built (e.g. ImageNet weights); its classification "
                        "head is then replaced when the number of classes differs")
    m.add_argument("--method", default="baseline", choices=METHODS, help="fine-tuning method (default baseline)")
    m.add_argument("--teacher", metavar="SPEC", help="distill: the teacher model, same forms as --model, "
                                                     "with N outputs")
    m.add_argument("--teacher-weights", metavar="FILE", help="distill: the teacher's state_dict")
    m.add_argument("--l2sp", type=float, help="l2sp: strength of the pull toward the starting weights (1e-2)")
    m.add_argument("--temperature", type=float, help="distill: temperature (default 2)")
    m.add_argument("--alpha", type=float, help="distill: weight of the teacher term (default 0.5)")
    m.add_argument("--sparsity", type=float, help="prune: final fraction of pruned weights (default 0.5)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=5, help="default 5")
    t.add_argument("--batch-size", type=int, default=32,
                   help="images per step and per process: under torchrun --nproc_per_node N an optimizer step "
                        "averages the gradients of N x BATCH_SIZE images (default 32)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, cosine schedule (default 1e-3)")
    t.add_argument("--weight-decay", type=float, default=1e-2, help="default 1e-2")
    t.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (default none)")
    t.add_argument("--device", help="default: cuda when a GPU is visible, else cpu; under torchrun cuda means "
                                     "cuda:LOCAL_RANK, one GPU per process")
    t.add_argument("--seed", type=int, default=0, help="seed of the split, the head and the training (default 0)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoints/epoch-NNN.pt and last.pt, model.pt, metrics.json, training.png")
    o.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                   help="continue the run in --out (from DIR/checkpoints/last.pt, or this checkpoint); "
                        "pass the same options as the first time")


# ------------------------------------------------------------------------------ data
def _scan_image(path: str) -> Optional[str]:
    """None when PIL reads the whole image, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums
        with Image.open(path) as im:
            im.convert("RGB").load()  # the pixels: truncated files fail here
    except Exception as e:  # PIL raises many types for broken files
        return f"{type(e).__name__}: {e}"
    return None


def _image_folder(root: str, what: str, workers: int, progress: bool) -> Tuple[List[str], List[Tuple[str, int]],
                                                                            List[Dict[str, str]]]:
    """The classes and readable ``(path, class index)`` samples of an ImageFolder tree, and the
    unreadable images (``[{"path", "error"}]``), after reading every image once."""
    from torchvision.datasets import folder

    if not os.path.exists(root):
        raise UsageError(f"{what} {root} does not exist")
    if not os.path.isdir(root):
        raise UsageError(f"{what} {root} is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UsageError(f"{what} {root} has no class subfolders (expected {root}/<class>/<image>)")
    index = {c: i for i, c in enumerate(classes)}
    samples = folder.make_dataset(root, index, extensions=folder.IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise UsageError(f"{what} {root} has no images ({', '.join(folder.IMG_EXTENSIONS)}) in its class subfolders")
    from .finetuning import _progress_bar

    bar = _progress_bar(progress, total=len(samples), desc=f"checking {what} images", unit="img", leave=False)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        errors = []
        for error in pool.map(_scan_image, [path for path, _ in samples]):
            errors.append(error)
            bar.update(1)
    bar.close()
    bad = [{"path": path, "error": e} for (path, _), e in zip(samples, errors) if e is not None]
    good = [s for s, e in zip(samples, errors) if e is None]
    present = {c for _, c in good}
    empty = [c for c in classes if index[c] not in present]
    if empty:
        raise UsageError(f"{what} {root}: class folders without a readable image: {', '.join(empty)}")
    return classes, good, bad


def _split(samples: List[Tuple[str, int]], fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Indices of a seeded split that holds out ``fraction`` of each class (at least one image of
    each class with two or more, at least one left for training)."""
    g = torch.Generator().manual_seed(seed)
    by_class: Dict[int, List[int]] = {}
    for i, (_, c) in enumerate(samples):
        by_class.setdefault(c, []).append(i)
    train, val = [], []
    for c in sorted(by_class):
        idx = by_class[c]
        order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if fraction > 0 else 0
        val += order[:k]
        train += order[k:]
    return sorted(train), sorted(val)


class _Samples(torch.utils.data.Dataset):
    """``(image tensor, class index)`` of a list of ``(path, class index)``."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Any):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.datasets.folder import pil_loader

        path, target = self.samples[i]
        return self.transform(pil_loader(path)), target


def _transforms(size: int, augment: bool):
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    plain = T.Compose([T.Resize(size), T.CenterCrop(size)] + tail)
    if not augment:
        return plain, plain
    return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.RandomHorizontalFlip()] + tail), plain


# ------------------------------------------------------------------------------ models
def _build(spec: str, num_classes: int, what: str, for_weights: bool) -> nn.Module:
    """``torchvision:NAME`` (default number of classes when ``for_weights``, so that pretrained
    weights load; never downloads) or ``module.path:factory``."""
    kind, sep, name = spec.partition(":")
    if not sep or not kind or not name:
        raise UsageError(f"{what} must be torchvision:NAME or module.path:factory, got {spec!r}")
    if kind == "torchvision":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            near = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else f"; one of {', '.join(known)}"
            raise UsageError(f"{what}: unknown torchvision classification model {name!r}{hint}")
        kwargs = {} if for_weights else {"num_classes": num_classes}
        return torchvision.models.get_model(name, weights=None, **kwargs)
    try:
        module = importlib.import_module(kind)
    except Exception as e:  # the user's module may fail in any way while importing
        raise UsageError(f"{what}: cannot import {kind!r}: {type(e).__name__}: {e}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UsageError(f"{what}: {kind} has no callable {name!r}")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "num_classes" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        model = factory(num_classes=num_classes) if takes else factory()
    except Exception as e:
        raise UsageError(f"{what}: {spec}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{what}: {spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _read_state_dict(path: str, what: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, pickled objects, truncated ...
        raise UsageError(f"{what} {path} is not a readable state_dict: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{what} {path} is not a state_dict (a mapping from names to tensors)")
    return state


def _load_weights(model: nn.Module, path: str, spec: str, what: str, new_head: Optional[str],
                  state: Optional[Dict[str, Any]] = None) -> List[str]:
    """Load ``path`` (or its already read ``state``) into ``model`` strictly, except that the
    parameters of ``new_head`` (about to be replaced) may differ in shape. Returns the head keys left
    out."""
    if state is None:
        state = _read_state_dict(path, what)
    own = model.state_dict()
    missing, unexpected, shapes = state_differences(own, state)
    in_head = [k for k in shapes if new_head is not None and k.startswith(new_head + ".")]
    shapes = [k for k in shapes if k not in in_head]
    if missing or unexpected or shapes:
        raise UsageError(f"{what} {path} do not match {spec}: " + describe_differences(
            missing, unexpected, [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                                  for k in shapes]))
    model.load_state_dict({k: v for k, v in state.items() if k not in in_head}, strict=False)
    return in_head


def _replace_head(model: nn.Module, head: str, num_classes: int) -> Optional[Tuple[int, int]]:
    """Give the head ``nn.Linear`` ``num_classes`` outputs (a new, initialized layer) when it has
    another number; returns (old, new) outputs when replaced."""
    layer = model.get_submodule(head)
    if layer.out_features == num_classes:
        return None
    parent, _, child = head.rpartition(".")
    new = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None,
                    device=layer.weight.device, dtype=layer.weight.dtype)
    setattr(model.get_submodule(parent), child, new)
    return layer.out_features, num_classes


def _check_outputs(model: nn.Module, size: int, num_classes: int, what: str) -> None:
    """One forward of a blank image: the model must run at this size and give N logits."""
    from .finetuning import _logits

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _logits(model(torch.zeros(1, 3, size, size)), what)
    except Exception as e:  # too small an image for the architecture, a broken user model ...
        raise UsageError(f"{what} fails on a {size}x{size} image: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (1, num_classes):
        raise UsageError(f"{what} outputs {tuple(out.shape)} for one image, expected (1, {num_classes}): "
                         f"one logit per class of the data")


def _student(args: argparse.Namespace, num_classes: int) -> Tuple[nn.Module, str, List[str]]:
    """The model with ``--weights`` loaded and its head sized for the data; its head's name and
    what was done, for the report."""
    model = _build(args.model, num_classes, "--model", for_weights=args.weights is not None)
    try:
        head = find_head(model)
    except ValueError:
        raise UsageError(f"--model {args.model}: no classification head found (no nn.Linear) to size for "
                         f"{num_classes} classes") from None
    notes = []
    if args.weights:
        state = _read_state_dict(args.weights, "--weights")
        file_head = state.get(head + ".weight")
        if file_head is not None and file_head.dim() == 2 and file_head.shape[0] == num_classes:
            # The file's head already has the data's classes (a previous run's model.pt): sized
            # first, so that it loads with the rest.
            _replace_head(model, head, num_classes)
        left_out = _load_weights(model, args.weights, args.model, "--weights", head, state)
        notes.append(f"weights from {args.weights}" + (f" (head {head} left out: other classes)" if left_out else
                                                       f" (head {head} included: {num_classes} classes)"
                                                       if file_head is not None and file_head.shape[0] == num_classes
                                                       else ""))
    replaced = _replace_head(model, head, num_classes)
    if replaced:
        notes.append(f"new head {head}: {replaced[0]} -> {replaced[1]} classes")
    _check_outputs(model, args.image_size, num_classes, f"--model {args.model}")
    return model, head, notes


def _teacher(args: argparse.Namespace, num_classes: int) -> Optional[nn.Module]:
    if args.method != "distill":
        for flag, value in (("--teacher", args.teacher), ("--teacher-weights", args.teacher_weights)):
            if value is not None:
                raise UsageError(f"{flag} is an option of --method distill, not of --method {args.method}")
        return None
    if not args.teacher:
        raise UsageError("--method distill needs --teacher SPEC (and --teacher-weights FILE)")
    teacher = _build(args.teacher, num_classes, "--teacher", for_weights=False)
    if args.teacher_weights:
        _load_weights(teacher, args.teacher_weights, args.teacher, "--teacher-weights", None)
    else:
        _say("warning: no --teacher-weights: distilling from the teacher's initial weights", file=sys.stderr)
    _check_outputs(teacher, args.image_size, num_classes, f"--teacher {args.teacher}")
    return teacher


# ------------------------------------------------------------------------------ outputs
def _write_json(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _plot(history: List[Dict[str, Any]], path: str) -> bool:
    """Loss, accuracy (and sparsity) per epoch into ``path``; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = [h["epoch"] for h in history]
    panels = [("loss", "train_loss", "val_loss"), ("accuracy", "train_accuracy", "val_accuracy")]
    if history and history[0]["sparsity"] is not None:
        panels.append(("sparsity", "sparsity", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for ax, (title, train, val) in zip(axes, panels):
        ax.plot(epochs, [h[train] for h in history], "o-", label=train.replace("_", " "))
        if val is not None and history[0][val] is not None:
            ax.plot(epochs, [h[val] for h in history], "o-", label=val.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _run_options(args: argparse.Namespace) -> Dict[str, Any]:
    return dict({k: getattr(args, k) for k in _RUN_OPTIONS}, processes=_world())


def _prepare_out(args: argparse.Namespace) -> Optional[str]:
    """Check ``--out`` and ``--resume``; returns the checkpoint to resume from, if any."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder")
    run_file = os.path.join(out, "run.json")
    last = os.path.join(out, "checkpoints", "last.pt")
    # A run that stopped in its first epoch left run.json and no checkpoint (nor a model): nothing to
    # continue, so a new run may start there.
    started = os.path.exists(last) or os.path.exists(os.path.join(out, "model.pt"))
    if args.resume is None:
        if started:
            raise UsageError(f"--out {out} already holds a run; add --resume to continue it, or choose another --out")
        return None
    checkpoint = args.resume or last
    if not os.path.isfile(checkpoint):
        hint = ""
        if not args.resume and os.path.exists(run_file) and not started:
            hint = " (the run there stopped before its first checkpoint, at the end of epoch 1: run the command " \
                   "again without --resume to start it over)"
        raise UsageError(f"--resume: no checkpoint at {checkpoint}{hint}")
    if os.path.exists(run_file):
        try:
            with open(run_file, encoding="utf-8") as f:
                first = json.load(f)
        except (OSError, ValueError) as e:  # unreadable, truncated, not JSON
            raise UsageError(f"--resume: cannot read {run_file} ({type(e).__name__}: {e}); it holds the options the "
                             "run was started with") from None
        if not isinstance(first, dict):
            raise UsageError(f"--resume: {run_file} does not hold the run's options (a JSON object), got "
                             f"{type(first).__name__}")
        now = _run_options(args)
        first.setdefault("processes", 1)  # runs from before torchrun support
        differ = [k for k in now if first.get(k) != now[k]]
        if differ:
            raise UsageError("--resume: the run in {} was started with other options: {}".format(
                out, "; ".join(f"{first.get(k)} processes then (torchrun --nproc_per_node), {now[k]} now"
                               if k == "processes" else f"--{k.replace('_', '-')} {first.get(k)} then, {now[k]} now"
                               for k in differ)))
    return checkpoint


# Options whose default is applied after checking that they belong to this command line (None in
# the parser, so that one given where it would go unused is refused rather than ignored); run.json
# records the resolved values.
_LATE_DEFAULTS = {"val_split": 0.2, "temperature": 2.0, "alpha": 0.5}


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Refuse ``--val-split`` beside ``--val`` and ``--temperature`` / ``--alpha`` without
    ``--method distill``, then fill in the defaults of those not given."""
    if args.val and args.val_split is not None:
        raise UsageError(f"--val-split {args.val_split} splits --data when --val is not given; with --val {args.val} "
                         "it would go unused (pass one of them)")
    for flag, value in (("--temperature", args.temperature), ("--alpha", args.alpha)):
        if value is not None and args.method != "distill":
            raise UsageError(f"{flag} is an option of --method distill, not of --method {args.method}")
    for name, default in _LATE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, ok in (("--epochs", args.epochs, args.epochs >= 1), ("--batch-size", args.batch_size, args.batch_size >= 1),
                            ("--image-size", args.image_size, args.image_size >= 8),
                            ("--val-split", args.val_split, 0 <= args.val_split < 1),
                            ("--workers", args.workers, args.workers >= 0),
                            ("--seed", args.seed, 0 <= args.seed < 2**63)):
        if not ok:
            raise UsageError(f"{flag} {value} is out of range")


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"  # the default: a GPU when one is visible
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (cpu, cuda, cuda:1 ...)") from None
    if device.type == "meta":
        raise UsageError(f"--device {name!r}: a device with memory is needed (cpu, cuda, mps ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible")
    if device.type == "cuda" and _world() > 1:
        if device.index is not None:
            raise UsageError(f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UsageError(f"--device cuda: process LOCAL_RANK={local} has no GPU of its own "
                             f"({torch.cuda.device_count()} visible); use --nproc_per_node <= the GPUs, "
                             "or --device cpu")
    return device


# ------------------------------------------------------------------------------ the command
def run(args: argparse.Namespace) -> int:
    """Run ``pyfinetune finetune``; returns the exit code (0 done, 2 bad input, 130 interrupted).
    Under torchrun it joins (and at the end leaves) the process group the environment describes."""
    joined = None
    try:
        _resolve_defaults(args)
        _check_numbers(args)
        device = _device(args.device)
        try:
            joined = _distributed.init_from_env(device)
        except RuntimeError as e:
            raise UsageError(str(e)) from None
        return _run(args, joined or device)
    except UsageError as e:
        where = f" (rank {_rank()})" if _world() > 1 else ""
        print(f"pyfinetune finetune: error{where}: {e}", file=sys.stderr)
        return 2
    finally:
        if joined is not None:
            _distributed.leave()


def _run(args: argparse.Namespace, device: torch.device) -> int:
    try:
        import torchvision  # noqa: F401
        import PIL  # noqa: F401
    except ImportError as e:
        raise UsageError(f"needs torchvision and pillow ({e}): pip install \"pyfinetune[vision]\"") from None
    main = _rank() == 0
    progress = not args.no_progress
    resume = _prepare_out(args)

    classes, samples, skipped = _image_folder(args.data, "--data", args.workers, progress and main)
    if len(classes) < 2:
        raise UsageError(f"--data {args.data} has one class ({classes[0]}); fine-tuning a classifier needs two or more")
    if args.val:
        val_classes, val_samples, val_skipped = _image_folder(args.val, "--val", args.workers, progress and main)
        if val_classes != classes:
            raise UsageError(f"--val {args.val} has the classes {val_classes}, --data has {classes}")
        skipped += val_skipped
        train_samples = samples
    else:
        train_idx, val_idx = _split(samples, args.val_split, args.seed)
        train_samples, val_samples = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
    _say(f"data: {len(classes)} classes ({', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}); "
          f"{len(train_samples)} training and {len(val_samples)} validation images")
    for bad in skipped:
        _say(f"skipped unreadable image {bad['path']}: {bad['error']}", file=sys.stderr)
    if skipped:
        _say(f"skipped {len(skipped)} unreadable image(s); listed in metrics.json", file=sys.stderr)

    torch.manual_seed(args.seed)  # the new head's initialization
    model, head, notes = _student(args, len(classes))
    teacher = _teacher(args, len(classes))
    _say(f"model: {args.model}" + (f"; {'; '.join(notes)}" if notes else ""))
    if _world() > 1:
        _say(f"batch: {args.batch_size} images per process x {_world()} processes = "
             f"{args.batch_size * _world()} per step")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    method_options = {"l2sp": {"l2sp": args.l2sp}, "distill": {"teacher": teacher},
                      "prune": {"sparsity": args.sparsity}}.get(args.method, {})
    for flag, value, method in (("--l2sp", args.l2sp, "l2sp"), ("--sparsity", args.sparsity, "prune")):
        if value is not None and args.method != method:
            raise UsageError(f"{flag} is an option of --method {method}, not of --method {args.method}")
    try:
        tuner = Finetuner(model, args.method, lr=args.lr, weight_decay=args.weight_decay, head=[head],
                          temperature=args.temperature, alpha=args.alpha, epochs=args.epochs, device=device,
                          amp=amp, seed=args.seed, progress=progress,
                          # torchvision's GoogLeNet / Inception v3: the loss ignores the aux heads
                          find_unused_parameters=bool(getattr(model, "aux_logits", False)),
                          **{k: v for k, v in method_options.items() if v is not None})
        if resume:
            tuner.load_checkpoint(resume)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e).replace("Finetuner: ", "")) from None

    train_tf, val_tf = _transforms(args.image_size, args.augment)
    loader_options = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(_Samples(train_samples, train_tf), shuffle=True, **loader_options)
    val_loader = torch.utils.data.DataLoader(_Samples(val_samples, val_tf), **loader_options) if val_samples else None

    if _world() > 1:
        dist.barrier()  # every rank has checked --out before rank 0 writes there
    if main:
        os.makedirs(args.out, exist_ok=True)
        _write_json(os.path.join(args.out, "run.json"), _run_options(args))
    metrics_path, plot_path = os.path.join(args.out, "metrics.json"), os.path.join(args.out, "training.png")
    metrics = {"model": args.model, "method": args.method, "classes": classes, "head": head,
               "train_images": len(train_samples), "val_images": len(val_samples), "skipped_images": skipped,
               "processes": _world(), "global_batch_size": args.batch_size * _world(),
               "options": _run_options(args), "history": tuner.history}

    def after_epoch(t: Finetuner, record: Dict[str, Any]) -> None:
        if main:
            _write_json(metrics_path, metrics)
            _plot(t.history, plot_path)

    step_before = tuner.step
    try:
        tuner.fit(train_loader, val_loader, checkpoint_dir=os.path.join(args.out, "checkpoints"), callback=after_epoch)
    except KeyboardInterrupt:
        if main:
            metrics["interrupted"] = True
            _write_json(metrics_path, metrics)
            where = tuner.interrupted_checkpoint or "nowhere"
            print(f"\ninterrupted: checkpoint saved to {where}; continue with the same command and --resume",
                  file=sys.stderr)
        if _world() > 1:
            # torchrun stops the other ranks (SIGTERM) as soon as one exits with an error code: leave together
            dist.barrier()
        return 130
    except (TypeError, ValueError) as e:
        if tuner.step != step_before:
            raise  # not an input problem: a failure during training
        raise UsageError(str(e).replace("Finetuner: ", "")) from None

    if not main:
        return 0
    model_path = os.path.join(args.out, "model.pt")
    # CPU tensors: the file loads with a plain torch.load on a machine without the training GPU
    torch.save({k: v.detach().cpu() for k, v in tuner.model.state_dict().items()}, model_path)
    metrics.update(interrupted=False, model_file="model.pt",
                   model_format=_PRUNED_FORMAT if args.method == "prune" else "state_dict of the model with its new head",
                   final=tuner.history[-1] if tuner.history else None)
    _write_json(metrics_path, metrics)
    plotted = _plot(tuner.history, plot_path)
    last = tuner.history[-1]
    summary = f"done: {len(tuner.history)} epochs, train accuracy {last['train_accuracy']:.3f}"
    if last["val_accuracy"] is not None:
        summary += f", validation accuracy {last['val_accuracy']:.3f}"
    if last["sparsity"] is not None:
        summary += f", sparsity of the pruned layers {last['sparsity']:.3f}"
    print(summary)
    print(f"model: {model_path}; metrics: {metrics_path}" + (f"; plot: {plot_path}" if plotted else
                                                             " (no plot: matplotlib is not installed)"))
    return 0
