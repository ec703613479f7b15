"""The outputs of ``pyfinetune demo``: the results table, ``results.json``, ``report.md`` and the PNG
plots (training curves, accuracy against sparsity, kernel speed-ups). matplotlib is imported when
the plots are drawn."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

_COLUMNS = ("method", "test accuracy", "params", "nonzero params", "train s", "inference ms / batch",
            "speed-up vs dense")
PLOTS = ("training_curves.png", "accuracy_vs_sparsity.png", "kernel_speedups.png")


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def table_rows(results: Dict[str, Any]) -> List[List[str]]:
    """One row of strings per method, in the order of :data:`_COLUMNS`."""
    return [[m["name"], f"{m['test_accuracy']:.1%}", _count(m["params"]), _count(m["nonzero_params"]),
             f"{m['train_seconds']:.1f}", f"{m['inference_ms_per_batch']:.2f}", f"{m['speedup_vs_dense']:.2f}x"]
            for m in results["methods"]]


def format_table(results: Dict[str, Any]) -> str:
    """The methods table as aligned plain text (what ``pyfinetune demo`` prints)."""
    rows = [list(_COLUMNS)] + table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def methods_markdown(results: Dict[str, Any]) -> str:
    """The methods table in Markdown (report.md; the README's Demo section copies it)."""
    return "\n".join(_markdown(_COLUMNS, table_rows(results)))


def kernels_markdown(results: Dict[str, Any]) -> str:
    """The kernel speed-up table in Markdown."""
    rows = [[k["op"], k["shape"], f"{k['ours_ms']:.3f}", f"{k['torch_ms']:.3f}", f"{k['speedup']:.2f}x", k["torch"]]
            for k in results["kernel_speedups"]]
    return "\n".join(_markdown(("op", "shape", "ours ms", "torch ms", "speed-up", "torch baseline"), rows))


def _commit(results: Dict[str, Any]) -> str:
    """" at commit <hash>" (+ " with uncommitted changes") when run from a git clone, else ""."""
    git = results.get("git") or {}
    if not git.get("commit"):
        return ""
    return f" at commit {git['commit'][:12]}" + (" with uncommitted changes" if git.get("dirty") else "")


def _report(results: Dict[str, Any], plots: Sequence[str]) -> str:
    c, s, src = results["config"], results["splits"], results["source_model"]
    by = {m["method"]: m for m in results["methods"]}
    lines = [
        "# pyfinetune demo", "",
        f"Dataset: {results['dataset']}, bundled with scikit-learn (nothing downloaded).  ",
        f"Device: {results['device']}; machine: {results['machine']}; {results['threads']} torch threads; "
        f"torch {results['torch']}, pyfinetune {results['pyfinetune']}{_commit(results)}, Python {results['python']}"
        + "".join(f", {k}={v}" for k, v in (results.get("settings") or {}).items()) + ".  ",
        f"Seed: {results['seed']} (data split, model initializations, data order); "
        f"{'quick' if results['quick'] else 'full'} configuration; wall time {results['wall_seconds']:.0f} s.", "",
        "## Tasks", "",
        f"* Test split: {c['test_fraction']:.0%} of all images, stratified by digit, drawn first. No step trains on "
        f"it and no choice looks at it; it is read once per model, at the end, for the table below "
        f"(source test {s['source_test']} images, target test {s['target_test']}).",
        f"* Source task, digits 0-4: {s['source_train']} training and {s['source_val']} validation images. "
        f"The source model reached {src['test_accuracy']:.1%} on the source test images "
        f"({src['train_seconds']:.1f} s, {c['source_epochs']} epochs).",
        f"* Target task, digits 5-9, few labels: {c['labels_per_class']} labelled images per class "
        f"({s['target_labelled']}), {s['target_val']} validation images, {s['target_unlabelled']} unlabelled "
        "training images (only the distilled student sees them, without their labels).",
        f"* Models: source / fine-tuned models: conv stem {tuple(c['channels'])} channels + MLP "
        f"{c['hidden']}-{c['hidden']} ({_count(by['baseline']['params'])} parameters); student: the same design "
        f"with {tuple(c['student_channels'])} channels and an MLP {c['student_hidden']}-{c['student_hidden']} "
        f"({_count(by['student_alone']['params'])} parameters), trained from scratch.",
        f"* Budget, every target run: {c['epochs']} epochs over the {s['target_labelled']} labelled images, batches "
        f"of {c['batch_size']}, cosine learning rate, AdamW (weight decay {c['weight_decay']}), random 1-pixel "
        f"shifts; lr {c['lr']} (fine-tuned models), {c['student_lr']} (students).",
        "",
        "## Methods", "",
        "* **fine-tuning**: `pyfinetune.Finetuner(method=\"baseline\")`: `torch.optim.AdamW`, "
        "`torch.nn.functional.cross_entropy`.",
        f"* **L2-SP**: `method=\"l2sp\"`, `pyfinetune.optim.AdamW` pulling the body toward the pretrained "
        f"weights (l2sp = {c['l2sp']}).",
        f"* **distillation**: `method=\"distill\"`, `pyfinetune.losses.kd_loss` (T = {c['temperature']}, "
        f"alpha = {c['alpha']}) from the teacher, {results['teacher']} (the dense fine-tuned model with the better "
        f"validation accuracy), into the student. Each batch holds the {c['batch_size']} labelled images and "
        f"{c['unlabelled_per_labelled']} unlabelled target training images per labelled one; an unlabelled image's "
        "hard label is the teacher's predicted class. The **student alone** is the same student, same "
        "initialization, trained on the labelled images with `method=\"baseline\"` and the same epochs, batches "
        "and learning rate.",
        f"* **pruning**: `method=\"prune\"`: `GradualPruner` (cubic schedule over the first 70% of the steps) to "
        f"{c['sparsity']:.0%} of the weights of the two wide `nn.Linear` layers (`hidden.*`; the conv stem and "
        "the head are not pruned), then `Finetuner.export()`: `pyfinetune.prune.sparsify` turns them into "
        "`SparseLinear` layers (only the kept weights are stored).",
        "",
        "## Results", "",
        "Target test accuracy; inference: one forward of a batch of "
        f"{c['inference_batch']} images, eval mode, median of {c['timing_reps']} interleaved runs after "
        f"{c['warmup']} warm-up runs; speed-up against the dense fine-tuned model. Training seconds exclude the "
        "per-epoch validation.", "",
        methods_markdown(results), "",
        "Outcome:", "",
    ]
    lines += [f"* {'met' if v['passed'] else 'NOT met'}: {k} ({v['detail']})" for k, v in results["outcome"].items()]
    lines += [
        "",
        "## pyfinetune's kernels against torch, at the demo's shapes", "",
        f"Median of {c['timing_reps']} interleaved runs (kd_loss: {5 * c['timing_reps']}) after warm-up; "
        "speed-up = torch ms / ours ms.", "",
        kernels_markdown(results), "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p[:-4].replace('_', ' ')}]({p})" for p in plots] + [""]
        lines.append("Accuracy against sparsity: the gradual pruning run's validation accuracy at each epoch's "
                     "sparsity, and the dense fine-tuned model magnitude-pruned at once, without retraining "
                     "(validation accuracy).")
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: str, plt: Any) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_training(results: Dict[str, Any], path: str, plt: Any) -> None:
    runs = [results["source_model"]] + results["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        epochs = [h["epoch"] for h in run["history"]]
        style = "--" if run is results["source_model"] else "-"
        axes[0].plot(epochs, [h["train_loss"] for h in run["history"]], style, label=run["name"])
        axes[1].plot(epochs, [h["val_accuracy"] for h in run["history"]], style, label=run["name"])
    axes[0].set(title="training loss (each method's own loss)", xlabel="epoch", yscale="log")
    axes[1].set(title="validation accuracy", xlabel="epoch", ylim=(0.5, 1.0))
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    _save(fig, path, plt)


def _plot_sparsity(results: Dict[str, Any], path: str, plt: Any) -> None:
    curve = results["accuracy_vs_sparsity"]
    fig, ax = plt.subplots(figsize=(6, 4))
    gradual = curve["gradual"]
    ax.plot([p["sparsity"] for p in gradual], [p["val_accuracy"] for p in gradual], "o-", markersize=3,
            label="gradual pruning while fine-tuning (per epoch)")
    one_shot = curve["one_shot"]
    ax.plot([p["sparsity"] for p in one_shot], [p["val_accuracy"] for p in one_shot], "s--",
            label="dense fine-tuned model, pruned at once")
    ax.set(xlabel="sparsity of the pruned layers", ylabel="validation accuracy", title="accuracy against sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, plt)


def _plot_kernels(results: Dict[str, Any], path: str, plt: Any) -> None:
    kernels = results["kernel_speedups"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [k["op"] for k in kernels]
    speedups = [k["speedup"] for k in kernels]
    bars = ax.barh(names, speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.axvline(1.0, color="black", linewidth=1)
    for bar, s in zip(bars, speedups):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {s:.2f}x", va="center")
    ax.set(xlabel="speed-up against torch (torch time / pyfinetune time)",
           title=f"pyfinetune kernels vs torch on {results['device']}, demo shapes")
    ax.invert_yaxis()
    ax.set_xlim(0, max(speedups) * 1.25)
    _save(fig, path, plt)


def write_outputs(results: Dict[str, Any], out_dir: str) -> List[str]:
    """Write ``results.json``, ``report.md`` and the PNG plots of :data:`PLOTS` into ``out_dir``
    (created if needed; the plots are skipped, and said so in the report, without matplotlib).

    Returns:
        the names of the files written.
    """
    os.makedirs(out_dir, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plots: Sequence[str] = ()
    else:
        plots = PLOTS
        for name, draw in zip(PLOTS, (_plot_training, _plot_sparsity, _plot_kernels)):
            draw(results, os.path.join(out_dir, name), plt)
    files = ["results.json", "report.md", *plots]
    results["files"] = files
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(_report(results, plots))
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return files
