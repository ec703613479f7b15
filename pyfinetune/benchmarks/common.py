"""Timing and reporting helpers shared by pyfinetune's benchmarks (the ``benchmarks/bench_*.py``
scripts of a clone and ``pyfinetune bench``).

A benchmark builds a list of :class:`Contender` (a name and a zero-argument callable doing one
unit of work, e.g. one optimizer step on the contender's own tensors) and hands it to
:func:`time_interleaved`, which

* warms every contender up (round-robin, so all of them see the same allocator and cache history),
* times ``reps`` rounds; in each round every contender runs once, and the starting contender
  rotates from round to round, so slow drift (clock, thermals, noisy neighbours) and "who ran just
  before me" affect every contender alike,
* times with ``time.perf_counter_ns`` on CPU and with CUDA events after a synchronize on GPU,
* reports the median and the 20th / 80th percentiles (at least 10 rounds).

:func:`machine_info` describes the machine and the code measured (CPU, threads, torch, CUDA, GPU,
pyfinetune commit and whether the tree had uncommitted changes); :func:`write_results` stores a
JSON record and a Markdown summary under ``<results>/<bench>-<device>-YYYYMMDD-HHMM.*``, where
``<results>`` is :data:`RESULTS_DIR`: ``benchmarks/results`` of the clone this package was loaded
from, or ``./pyfinetune-bench`` for an installed package.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch


def _clone_root() -> Optional[str]:
    """The repository this package was loaded from, or None for an installed package.

    A clone has ``setup.py`` and ``benchmarks/`` beside ``pyfinetune/``; site-packages has not.
    Without a clone no git command runs (the current folder may be another project's repository,
    whose commit is not pyfinetune's).
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    is_clone = os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "benchmarks"))
    return root if is_clone else None


REPO_ROOT = _clone_root()
RESULTS_DIR = (os.path.join(REPO_ROOT, "benchmarks", "results") if REPO_ROOT is not None
               else os.path.join(os.getcwd(), "pyfinetune-bench"))
MIN_REPS = 10


# ------------------------------------------------------------------------------------ contenders
@dataclass
class Contender:
    """One competitor: ``fn()`` does one unit of work (mutating only the contender's own tensors).

    ``bytes`` is the memory traffic an ideal implementation of that unit needs (each operand read
    or written once), used for the effective bandwidth; ``info`` holds extra columns for the report.
    """

    name: str
    fn: Callable[[], Any]
    bytes: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Timing:
    """Per-call times of one contender, in milliseconds, with summary statistics."""

    name: str
    times_ms: List[float]
    peak_extra_bytes: Optional[int] = None

    @property
    def median(self) -> float:
        return percentile(self.times_ms, 50)

    @property
    def p20(self) -> float:
        return percentile(self.times_ms, 20)

    @property
    def p80(self) -> float:
        return percentile(self.times_ms, 80)

    def gbps(self, nbytes: Optional[int]) -> Optional[float]:
        """Effective bandwidth in GB/s (1e9 bytes) at the median time."""
        if nbytes is None or self.median <= 0:
            return None
        return nbytes / (self.median * 1e-3) / 1e9

    def summary(self) -> Dict[str, Any]:
        return {"median_ms": self.median, "mean_ms": sum(self.times_ms) / len(self.times_ms), "p20_ms": self.p20, "p80_ms": self.p80, "n": len(self.times_ms),
                "times_ms": self.times_ms, "peak_extra_bytes": self.peak_extra_bytes}


def ratio_crossover(points: Sequence[Tuple[float, float]]) -> Tuple[Optional[float], Optional[float]]:
    """From ``(x, ratio)`` points (a time ratio other / ours at each sparsity x): the lowest x from
    which the ratio is >= 1 at every higher x (None: not at the highest), and the x where the ratio
    crosses 1, interpolated linearly between that x and the one below it (None when it is the
    lowest measured)."""
    pts = sorted(points)
    measured = None
    for i in range(len(pts) - 1, -1, -1):
        if pts[i][1] >= 1.0:
            measured = i
        else:
            break
    if measured is None:
        return None, None
    if measured == 0:
        return pts[0][0], None
    (s0, r0), (s1, r1) = pts[measured - 1], pts[measured]
    return s1, s0 + (1.0 - r0) * (s1 - s0) / (r1 - r0)


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not xs:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:  # outside, the interpolation extrapolated past the extreme samples
        raise ValueError(f"percentile: q must be in [0, 100], got {q!r}")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def paired_ratio(num: Timing, den: Timing) -> Dict[str, float]:
    """num/den of the medians, and the 20/80 percentiles of the per-round ratios (same round)."""
    per_round = [a / b for a, b in zip(num.times_ms, den.times_ms)]
    return {"value": num.median / den.median, "p20": percentile(per_round, 20), "p80": percentile(per_round, 80)}


# ---------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_one(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Milliseconds per call of ``calls`` back-to-back calls of ``fn``."""
    if device.type == "cuda":
        # Drain earlier work first so that it is not billed to this contender.
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - t0) / 1e6 / calls


def time_interleaved(contenders: Sequence[Contender], *, reps: int, warmup: int = 3, device: torch.device,
                     calls_per_rep: int = 1, progress: Optional[Callable[[str], None]] = None) -> Dict[str, Timing]:
    """Time the contenders round-robin; returns ``{name: Timing}`` with ``reps`` samples each.

    Every contender runs ``warmup + reps * calls_per_rep`` calls in total, the same for all, so
    their tensors age alike (optimizer step counts, allocator state). Round ``r`` starts with
    contender ``r mod n``. The garbage collector is paused while timing (a collection would land
    on an arbitrary contender).
    """
    if reps < MIN_REPS:
        raise ValueError(f"reps must be >= {MIN_REPS} (percentiles of fewer runs are noise), got {reps}")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique, got {names}")
    n = len(contenders)
    times: Dict[str, List[float]] = {c.name: [] for c in contenders}
    for _ in range(warmup):
        for c in contenders:
            c.fn()
    synchronize(device)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            for k in range(n):
                c = contenders[(r + k) % n]
                times[c.name].append(_time_one(c.fn, device, calls_per_rep))
            if progress is not None and (r + 1) % max(1, reps // 5) == 0:
                progress(f"round {r + 1}/{reps}")
    finally:
        if gc_was_enabled:
            gc.enable()
    return {c.name: Timing(c.name, times[c.name]) for c in contenders}


class CpuContention:
    """Context manager: how much of the machine's CPU time *other* processes used meanwhile.

    On a shared or virtual machine another process (or the hypervisor, "steal") taking a core
    wrecks multi-threaded timings: a parallel region waits for its slowest thread. Results
    measured with a large ``other_share`` should not be trusted. Linux only (``/proc/stat``);
    elsewhere the fields are None.
    """

    def __enter__(self) -> "CpuContention":
        self._start = (time.monotonic(), _proc_stat(), _own_cpu_seconds())
        self.result: Dict[str, Optional[float]] = {}
        return self

    def __exit__(self, *exc) -> None:
        wall0, stat0, own0 = self._start
        wall, stat, own = time.monotonic() - wall0, _proc_stat(), _own_cpu_seconds() - own0
        if stat0 is None or stat is None or wall <= 0:
            self.result = {"other_share": None, "steal_share": None, "wall_s": wall}
            return
        hz = os.sysconf("SC_CLK_TCK")
        ncpu = stat[2]
        busy = (stat[0] - stat0[0]) / hz
        steal = (stat[1] - stat0[1]) / hz
        self.result = {
            "other_share": max(0.0, busy - own) / (wall * ncpu),
            "steal_share": steal / (wall * ncpu),
            "wall_s": wall,
            "loadavg_end": os.getloadavg()[0],
        }


BUSY_LIMIT = 0.05  # share of the CPUs other processes may take before a measurement is flagged


def is_contended(result: Dict[str, Optional[float]], limit: float = BUSY_LIMIT) -> bool:
    """True when a :class:`CpuContention` result says other processes took more than ``limit``."""
    if result.get("other_share") is None:
        return False
    return result["other_share"] + (result.get("steal_share") or 0.0) > limit


@dataclass
class Speedup:
    """One row of ``pyfinetune bench``: ours against the fastest torch baseline of the same rounds.

    Times are medians in milliseconds; ``speedup`` is baseline median / ours median (> 1: ours
    faster) with ``p20`` / ``p80`` the percentiles of the same-round ratios; ``baselines`` maps
    every torch contender that ran to its median; ``other_cpu_share`` is the share of the CPUs
    other processes took meanwhile (None off Linux).
    """

    op: str
    case: str
    ours: str
    ours_ms: float
    baseline: str
    baseline_ms: float
    speedup: float
    p20: float
    p80: float
    baselines: Dict[str, float]
    other_cpu_share: Optional[float] = None
    note: str = ""


def measure_speedup(op: str, case: str, contenders: Sequence[Contender], ours: str, *, device: torch.device,
                    reps: int, warmup: int, calls_per_rep: int = 1, note: str = "") -> Speedup:
    """Time the contenders interleaved (:func:`time_interleaved`) and compare the one named ``ours``
    with the fastest of the others (the baselines); a busy machine is said in the note."""
    with CpuContention() as load:
        timings = time_interleaved(contenders, reps=reps, warmup=warmup, device=device, calls_per_rep=calls_per_rep)
    baselines = {c.name: timings[c.name].median for c in contenders if c.name != ours}
    best = min(baselines, key=baselines.get)
    ratio = paired_ratio(timings[best], timings[ours])
    notes = [note] if note else []
    if is_contended(load.result):
        notes.append(f"busy: others took {100 * load.result['other_share']:.0f}% of the CPUs")
    return Speedup(op=op, case=case, ours=ours, ours_ms=timings[ours].median, baseline=best,
                   baseline_ms=baselines[best], speedup=ratio["value"], p20=ratio["p20"], p80=ratio["p80"],
                   baselines=baselines, other_cpu_share=load.result.get("other_share"), note="; ".join(notes))


# Warnings torch logs while compiling a baseline that say nothing about the measurement: the
# profiler ranges inside torch's optimizers that dynamo drops, and, on a machine without a GPU,
# where cpp_extension guesses CUDA_HOME.
_COMPILE_NOISE = ("torch._dynamo.variables.ctx_manager", "torch.utils.cpp_extension")


def with_env(name: str, value: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn run with the environment variable ``name`` set to ``value`` (the extension reads its
    experimental PYFINETUNE_* switches at each call), restored afterwards, so that the other
    contenders of an A/B run under the environment the script was started in."""
    def run(*args: Any) -> Any:
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(*args)
        finally:
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before

    return run


@contextlib.contextmanager
def quiet_compile_logs():
    """Raise the loggers of ``_COMPILE_NOISE`` to ERROR while compiling a contender."""
    loggers = [logging.getLogger(name) for name in _COMPILE_NOISE]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def wait_for_quiet(max_wait_s: float = 120.0, window_s: float = 3.0, limit: float = BUSY_LIMIT) -> bool:
    """Wait until the whole machine was idle (< ``limit`` busy) for ``window_s``; False on timeout.

    Call it before a measurement, with nothing of our own running. Without /proc/stat it returns
    True at once.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        a = _proc_stat()
        if a is None:
            return True
        time.sleep(window_s)
        b = _proc_stat()
        if b is None:
            return True
        share = ((b[0] - a[0]) + (b[1] - a[1])) / os.sysconf("SC_CLK_TCK") / (window_s * b[2])
        if share < limit:
            return True
        if time.monotonic() > deadline:
            return False


def _proc_stat() -> Optional[Tuple[int, int, int]]:
    """(busy jiffies, steal jiffies, number of CPUs) of the whole machine."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    ncpu = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return user + nice + system + irq + softirq, steal, ncpu


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def peak_extra_memory(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Bytes allocated by one call of ``fn`` above what was allocated before it (CUDA only).

    This is the transient memory of a step (temporaries of an unfused composition, for example).
    The CPU allocator keeps no such statistics, so CPU returns None.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base)


class CpuAllocations:
    """Live bytes of torch's CPU allocator, from the profiler's memory events.

    Resident-memory deltas (RSS, VmHWM) depend on what glibc kept from earlier calls and vary by
    100s of MiB between identical runs; the allocator's own record does not. Use as::

        with CpuAllocations() as mem:
            loss = fn()
            mem.mark("forward")
            loss.backward()
        mem.live_at("forward"), mem.peak()   # bytes above what was allocated before the block

    Memory that kernels allocate outside torch's allocator (small per-thread scratch) is not seen.
    """

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> "CpuAllocations":
        self._prof.__enter__()
        return self

    def mark(self, name: str) -> None:
        # A named event on the profiler's own clock.
        with torch.profiler.record_function(f"pyfinetune-mark:{name}"):
            pass

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = self._prof.profiler.kineto_results.events()
        self._mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        self._mark_ns = {e.name().split(":", 1)[1]: e.start_ns() for e in events
                         if e.name().startswith("pyfinetune-mark:")}

    def _live(self, until_ns: Optional[int] = None) -> Tuple[int, int]:
        live = peak = 0
        for t, n in self._mem:
            if until_ns is not None and t > until_ns:
                break
            live += n
            peak = max(peak, live)
        return live, peak

    def live_at(self, name: str) -> int:
        """Bytes allocated in the block and still live at ``mark(name)``."""
        return max(0, self._live(self._mark_ns[name])[0])

    def peak(self) -> int:
        """Peak of the bytes allocated in the block above the start."""
        return max(0, self._live()[1])


def add_run_options(ap, *, default_reps: int, repeat_what: str = "a case") -> None:
    """The options every benchmark script shares (``gpu_check.sh`` passes --device and --out)."""
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--reps", type=int, default=None,
                    help=f"timed rounds (>= {MIN_REPS}; default {default_reps}, 10 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3, 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds: a smoke test, not a record")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--attempts", type=int, default=3,
                    help=f"CPU: run {repeat_what} again, up to this many times, while other processes disturb it "
                         "(default 3)")
    ap.add_argument("--out", default=RESULTS_DIR, help=f"results folder (default {RESULTS_DIR})")


def resolve_run_options(ap, args, *, default_reps: int) -> Tuple[torch.device, int, int]:
    """(device, reps, warmup) from ``add_run_options``' arguments; applies --threads."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    reps = args.reps if args.reps is not None else (10 if args.quick else default_reps)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    if reps < MIN_REPS:
        ap.error(f"--reps must be >= {MIN_REPS}")
    if warmup < 0:
        ap.error(f"--warmup must be >= 0, got {warmup}")
    if args.attempts < 1:  # 0 measured nothing and ended the run in a TypeError on the missing result
        ap.error(f"--attempts must be >= 1, got {args.attempts}")
    # Before the timing, not after it: an --out that cannot be written once ended a whole run in a
    # traceback, and a bad --threads in torch's RuntimeError or a crash of its thread pool.
    error = threads_error(args.threads) or (out_dir_error(args.out) if args.out else None)
    if error:
        ap.error(error)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return device, reps, warmup


def threads_error(threads: Optional[int]) -> Optional[str]:
    """Why ``--threads`` cannot be used here (None: it can, or it is not set): it must be at least
    1 and at most the machine's logical CPUs (more only oversubscribes the cores, and a huge count
    crashed torch's thread pool with a segmentation fault)."""
    if threads is None:
        return None
    if threads < 1:
        return f"--threads must be >= 1, got {threads}"
    cpus = os.cpu_count() or 1
    if threads > cpus:
        return f"--threads must be at most this machine's {cpus} logical CPUs, got {threads}"
    return None


def out_dir_error(out_dir: str, what: str = "--out") -> Optional[str]:
    """Why results cannot be written to the folder ``out_dir`` (None: they can; the folder is
    created), naming it as ``what``: checked before a benchmark (or the demo) runs, so that a bad
    ``--out`` does not end it after the timing."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        return f"{what} {out_dir} cannot be created ({type(e).__name__}: {e})"
    if not os.access(out_dir, os.W_OK):
        return f"{what} {out_dir} is not writable"
    return None


# ---------------------------------------------------------------------------------- machine info
def _run(cmd: List[str], strip: bool = True) -> Optional[str]:
    if REPO_ROOT is None:
        return None
    try:
        out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() if strip else out.stdout


def git_state() -> Dict[str, Any]:
    """Commit, branch and dirtiness of the clone pyfinetune was loaded from (all None when installed).

    "dirty" counts changes to tracked files only: result files written by earlier runs are
    untracked and do not change what is measured.
    """
    commit = _run(["git", "rev-parse", "HEAD"])
    # NUL-separated "XY path" entries, not stripped: stripping the text took the first entry's
    # leading status blank, and with it the first letter of its path.
    status = _run(["git", "status", "--porcelain", "-z", "--untracked-files=no"], strip=False)
    return {
        "commit": commit,
        "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]),
        "dirty": None if status is None else bool(status),
        "dirty_files": [] if not status else [entry[3:] for entry in status.split("\0") if len(entry) > 3],
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_sizes() -> Dict[str, str]:
    # Matters for reading the results: a working set that fits the last-level cache is not a
    # memory-bandwidth measurement.
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            d = os.path.join(base, idx)
            with open(os.path.join(d, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip()
            out[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = size
    except OSError:
        pass
    return out


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What ran the benchmark: hardware, threads, library versions, and the code's git state."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    info: Dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_caches": _cache_sizes(),
        "mem_total_gib": _mem_total_gib(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        # the library's settings in force (CPU prefetch, experimental CUDA layouts, crossovers ...)
        "pyfinetune_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("PYFINETUNE_")},
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "gpu": None,
        "git": git_state(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    try:
        import pyfinetune

        info["pyfinetune_file"] = pyfinetune.__file__
        info["pyfinetune_build"] = pyfinetune.build_info()
    except Exception as e:  # the machine description must not fail because the library does not load
        info["pyfinetune_error"] = repr(e)
    return info


def machine_summary(info: Dict[str, Any]) -> str:
    """One Markdown paragraph describing the machine and the code."""
    git = info.get("git", {})
    commit = (git.get("commit") or "unknown")[:12]
    dirty = {True: " (dirty: " + ", ".join(git.get("dirty_files", [])) + ")", False: "", None: " (state unknown)"}
    parts = [
        f"CPU: {info['cpu_model']}, {info['cpu_count']} cores ({info['cpu_affinity']} usable), "
        f"torch threads {info['torch_threads']}, ISA {info['cpu_capability']}, "
        f"caches {', '.join(f'{k} {v}' for k, v in info.get('cpu_caches', {}).items())}, "
        f"RAM {info['mem_total_gib']} GiB",
        f"torch {info['torch']}, CUDA {info['cuda_runtime']}, GPU {info.get('gpu')}",
        f"pyfinetune {commit}{dirty[git.get('dirty')]} on branch {git.get('branch')}",
    ]
    if info.get("pyfinetune_env"):
        parts.append("settings " + ", ".join(f"{k}={v}" for k, v in info["pyfinetune_env"].items()))
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------------------- results
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; None cells print as an empty string, numbers as given."""
    def cell(x: Any) -> str:
        return "" if x is None else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: Optional[float], digits: int = 3) -> Optional[str]:
    """Format a number with ``digits`` significant digits (None stays None)."""
    if x is None:
        return None
    text = f"{x:.{digits}g}"
    # Rounding can carry into one more digit (999.7 at 3 digits): "g" then switches to an exponent
    # ("1e+03"); a number of 1 or more prints whole instead.
    return f"{x:.0f}" if abs(x) >= 1 and "e" in text else text


def timestamp() -> Tuple[str, str]:
    """(``YYYYMMDD-HHMM`` for file names, ISO 8601 with the UTC offset for the record), local time."""
    now = _dt.datetime.now().astimezone()
    return now.strftime("%Y%m%d-%H%M"), now.isoformat(timespec="seconds")


def results_prefix(bench: str, device: torch.device, out_dir: Optional[str] = None, stamp: Optional[str] = None,
                   exts: Sequence[str] = (".json", ".md")) -> str:
    """``<out_dir>/<bench>-<device>-<stamp>``, the folder created, with a suffix ``-2``, ``-3`` ...
    when a file of that name with one of ``exts`` exists (two runs in one minute)."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{bench}-{device.type}-{stamp or timestamp()[0]}")
    candidate, k = base, 1
    while any(os.path.exists(candidate + ext) for ext in exts):
        k += 1
        candidate = f"{base}-{k}"
    return candidate


def write_results(bench: str, device: torch.device, record: Dict[str, Any], markdown: str,
                  out_dir: Optional[str] = None, stamp: Optional[str] = None) -> Tuple[str, str]:
    """Write ``<out_dir>/<bench>-<device>-<stamp>.json`` and ``.md``; returns both paths.

    An existing file of the same name (two runs in one minute) is not overwritten: a suffix
    ``-2``, ``-3`` ... is added.
    """
    prefix = results_prefix(bench, device, out_dir, stamp)
    json_path, md_path = prefix + ".json", prefix + ".md"
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1, default=str)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(markdown.rstrip() + "\n")
    return json_path, md_path


def publish(bench: str, device: torch.device, record: Dict[str, Any], markdown: str, out_dir: Optional[str],
            stamp: Optional[str] = None) -> None:
    """Print a benchmark's Markdown report and, when ``out_dir`` is set, write the record and the
    report there (:func:`write_results`), saying where on stderr."""
    print(markdown)
    if out_dir:
        json_path, md_path = write_results(bench, device, record, markdown, out_dir, stamp)
        print(f"\nwrote {os.path.relpath(json_path)} and {os.path.relpath(md_path)}", file=sys.stderr)
