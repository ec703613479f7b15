"""``pyfinetune bench``: every op's representative cases against its strongest torch baseline.

Per op, the module of that op (:mod:`.optim`, :mod:`.distill`, :mod:`.prune`) builds its cases and
contenders with the same code as its ``benchmarks/bench_*.py`` script and times pyfinetune and the
torch baselines interleaved in the same rounds (:func:`.common.measure_speedup`). This module puts
the rows into one table headed by the machine (CPU, threads, torch, CUDA, GPU, pyfinetune commit)
and writes ``<out>/bench-<device>-<stamp>.csv``, ``.json`` (machine and rows) and ``.png`` (a bar
chart of the speed-ups; needs matplotlib).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import pyfinetune

from . import common

OPS = ("optim", "distill", "prune")
# The CSV's columns, in order: keys of :class:`.common.Speedup` (its ``baselines`` go to the JSON).
CSV_COLUMNS = ("op", "case", "ours", "ours_ms", "baseline", "baseline_ms", "speedup", "p20", "p80",
               "other_cpu_share", "note")
_OP_COLORS = {"optim": "tab:blue", "distill": "tab:orange", "prune": "tab:green"}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(ops: Sequence[str], device: torch.device, *, quick: bool,
        progress: Callable[[str], None] = _stderr) -> Dict[str, Any]:
    """Measure ``ops`` (names from :data:`OPS`) on ``device``; returns the record: machine, config,
    ``rows`` (one dict per :class:`.common.Speedup`) and ``skipped`` (ops without a kernel here).

    ``quick``: small shapes, 10 rounds after 2 warm-up rounds, no ``torch.compile``, no waiting for
    a quiet machine. Otherwise each op's full-size cases with the round count of its script, after
    waiting (up to a minute, on CPU) for other processes to calm down.
    """
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {OPS}")
    stamp, when = common.timestamp()
    record: Dict[str, Any] = {"benchmark": "bench", "device": device.type, "when": when, "stamp": stamp,
                              "quick": quick, "ops": list(ops), "machine": common.machine_info(device),
                              "rows": [], "skipped": []}
    kernels = pyfinetune.kernel_devices()
    for op in ops:
        module = importlib.import_module(f".{op}", __package__)
        if device.type not in kernels[module.KERNEL]:
            reason = f"no {device.type} kernel of torch.ops.pyfinetune.{module.KERNEL} in this build"
            record["skipped"].append({"op": op, "reason": reason})
            progress(f"[{op}] skipped: {reason}")
            continue
        reps, warmup = (common.MIN_REPS, 2) if quick else (module.DEFAULT_REPS, 3)
        if not quick and device.type == "cpu" and not common.wait_for_quiet(max_wait_s=60):
            progress(f"[{op}] the machine stayed busy; measuring anyway")
        progress(f"[{op}] {reps} rounds after {warmup} warm-up rounds ...")
        t0 = time.monotonic()
        for row in module.speedup_rows(device, quick=quick, reps=reps, warmup=warmup):
            record["rows"].append(dataclasses.asdict(row))
            progress(f"[{op}] {row.case}: {row.speedup:.2f}x ({time.monotonic() - t0:.1f} s)")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str) -> str:
    """A plain-text table with a rule under the headers; ``align`` has one "l" or "r" per column."""
    cells = [[str(h) for h in headers]] + [["" if x is None else str(x) for x in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _threads(machine: Dict[str, Any]) -> str:
    n = machine["torch_threads"]
    return f"{n} torch thread{'' if n == 1 else 's'}"


def header_lines(record: Dict[str, Any]) -> List[str]:
    """The machine and the code measured, one ``name  value`` line each."""
    m = record["machine"]
    git = m.get("git") or {}
    commit = "unknown (not run from a git clone)" if not git.get("commit") else (
        git["commit"][:12] + (" (uncommitted changes)" if git.get("dirty") else "") + f" on {git.get('branch')}")
    build = m.get("pyfinetune_build") or {}
    cuda = f"built for CUDA {m['cuda_runtime']}" if m.get("cuda_runtime") else "CPU-only build"
    pairs = [
        ("machine", f"{m['cpu_model']}, {m['cpu_count']} cores ({m['cpu_affinity']} usable), "
                    f"ISA {m['cpu_capability']}, RAM {m['mem_total_gib']} GiB"),
        ("threads", _threads(m)),
        ("torch", f"{m['torch']} ({cuda}); GPU: {m.get('gpu') or 'none'}"),
        ("pyfinetune", f"{build.get('pyfinetune', '?')}, commit {commit}, kernels ISA {build.get('cpu_isa', '?')}, "
                       f"CUDA kernels {'yes' if build.get('cuda_built') else 'no'}"),
        ("loaded from", m.get("pyfinetune_file", "?")),
    ]
    return [f"{name:<11} {value}" for name, value in pairs]


def format_report(record: Dict[str, Any]) -> str:
    """The table ``pyfinetune bench`` prints: the machine, then one row per case."""
    f = common.fmt
    mode = "quick: 10 rounds, smaller optim and distill cases; not a record" if record["quick"] else "full"
    out = [f"pyfinetune bench on {record['device']} ({mode}), {record['when']}", ""] + header_lines(record) + [""]
    rows = [[r["op"], r["case"], f(r["ours_ms"]), r["baseline"], f(r["baseline_ms"]), f"{r['speedup']:.2f}x",
             f"{r['p20']:.2f} .. {r['p80']:.2f}", r["note"]] for r in record["rows"]]
    out.append(text_table(["op", "case", "pyfinetune ms", "best torch baseline", "torch ms", "speed-up",
                           "p20 .. p80", "note"], rows, align="llrlrrrl"))
    out += ["", "Times: medians of interleaved rounds. Speed-up: torch ms / pyfinetune ms (> 1: pyfinetune faster)",
            "against the fastest torch baseline of the same rounds; p20 .. p80: of the same-round ratios."]
    out += [f"Skipped {s['op']}: {s['reason']}." for s in record["skipped"]]
    return "\n".join(out)


def plot_speedups(record: Dict[str, Any], path: str) -> Optional[str]:
    """Write a horizontal bar chart of the speed-ups to ``path`` (PNG, matplotlib's Agg canvas, so no
    display and no change to pyplot's backend); returns why not when it cannot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed, so no chart (pip install matplotlib)"
    rows = record["rows"][::-1]  # barh draws bottom-up: keep the table's order top-down
    if not rows:
        return "no rows to plot"
    fig = Figure(figsize=(10, 1.6 + 0.5 * len(rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = range(len(rows))
    values = [r["speedup"] for r in rows]
    err = [[max(0.0, r["speedup"] - r["p20"]) for r in rows], [max(0.0, r["p80"] - r["speedup"]) for r in rows]]
    ax.barh(ys, values, xerr=err, color=[_OP_COLORS.get(r["op"], "tab:gray") for r in rows], capsize=3)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    for y, r in zip(ys, rows):  # right of the bar and of its error bar
        ax.text(max(r["speedup"], r["p80"]), y, f"  {r['speedup']:.2f}x", va="center")
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{r['op']}: {r['case']}\nvs {r['baseline']}" for r in rows], fontsize=8)
    ax.set_xlim(0, max([r["p80"] for r in rows] + values + [1.0]) * 1.2)
    ax.set_xlabel("speed-up over the fastest torch baseline (time ratio; > 1: pyfinetune faster)")
    m = record["machine"]
    where = m.get("gpu") if record["device"] == "cuda" else f"{m['cpu_model']}, {_threads(m)}"
    ax.set_title(f"pyfinetune bench ({record['device']}{', quick' if record['quick'] else ''}): {where}, "
                 f"torch {m['torch']}", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return None


def write_outputs(record: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    """Write ``<out_dir>/bench-<device>-<stamp>.csv``, ``.json`` and ``.png``; returns the paths
    written by kind ("csv", "json", "png") and, without a chart, "png_error" with the reason."""
    device = torch.device(record["device"])
    prefix = common.results_prefix("bench", device, out_dir, record["stamp"], exts=(".csv", ".json", ".png"))
    paths = {"csv": prefix + ".csv", "json": prefix + ".json"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(record["rows"])
    with open(paths["json"], "w") as f:
        json.dump(record, f, indent=1, default=str)
        f.write("\n")
    error = plot_speedups(record, prefix + ".png")
    if error is None:
        paths["png"] = prefix + ".png"
    else:
        paths["png_error"] = error
    return paths


def main(*, op: str = "all", quick: bool = False, device: Optional[str] = None, threads: Optional[int] = None,
         out: Optional[str] = None) -> int:
    """``pyfinetune bench``: check the options, run, print the table, write the files; the exit status.

    ``device`` None: CUDA when torch sees a GPU, else the CPU. ``out`` None: ``benchmarks/results``
    in a clone, ``./pyfinetune-bench`` for an installed package.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        _stderr(f"pyfinetune bench: --device cuda, but torch {torch.__version__} ({why}) sees no CUDA device; "
                "use --device cpu")
        return 2
    error = common.threads_error(threads)  # a huge count crashed torch's thread pool
    if error is None and out is not None and not out.strip():  # "" once meant the default folder, silently
        error = "--out must name a folder, got an empty string"
    if error:
        _stderr(f"pyfinetune bench: {error}")
        return 2
    from .._info import settings_errors

    errors = settings_errors()
    if errors:
        _stderr(f"pyfinetune bench: {'; '.join(errors)}")
        return 2
    out_dir = out or common.RESULTS_DIR
    error = common.out_dir_error(out_dir)  # before the timing, not after it
    if error:
        _stderr(f"pyfinetune bench: {error}")
        return 2
    if threads is not None:
        torch.set_num_threads(threads)
    ops = OPS if op == "all" else (op,)
    record = run(ops, torch.device(device), quick=quick)
    print(format_report(record), flush=True)
    paths = write_outputs(record, out_dir)
    shown = {k: os.path.relpath(v) if not os.path.relpath(v).startswith("..") else v for k, v in paths.items()}
    written = ", ".join(shown[k] for k in ("csv", "json", "png") if k in shown)
    print(f"\nwrote {written}")
    if "png_error" in paths:
        _stderr(f"pyfinetune bench: {paths['png_error']}; the CSV and JSON are written")
    return 0 if record["rows"] else 1
