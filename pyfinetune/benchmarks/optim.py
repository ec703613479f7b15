"""Benchmark of pyfinetune's fused optimizer steps (AdamW / SGD with L2-SP) against torch.

    python benchmarks/bench_optim.py                      # CPU, all CPU cases, 30 rounds
    python benchmarks/bench_optim.py --device cuda        # GPU, adds the 100M+ parameter case
    python benchmarks/bench_optim.py --quick --case flat  # smoke run

Every contender owns its parameters, gradients and optimizer state (cloned from one random
master copy) and does the same number of steps; the contenders run round-robin in one process
(see ``common.time_interleaved``). The bandwidth reference, a large ``dst.copy_(src)``, runs in
the same rounds. Results go to ``benchmarks/results/optim-<device>-YYYYMMDD-HHMM.{json,md}``;
benchmarks/README.md explains the contenders and how to read the tables.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import pyfinetune

from . import common
from .common import Contender
from .model_shapes import resnet50_param_shapes

KERNEL = "fused_adamw_"  # the op whose kernels `pyfinetune bench` needs on its device
DEFAULT_REPS = 30

# Hyper-parameters: typical fine-tuning values. They do not change the work done per element.
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 1e-2
L2SP = 1e-2
SGD_LR = 1e-2
MOMENTUM = 0.9

# Minimum bytes per fp32 element: every operand read once, every result written once.
ADAMW_BYTES = 28  # read p, g, m, v; write p, m, v
SGD_BYTES = 20    # read p, g, buf; write p, buf
ANCHOR_BYTES = {torch.float32: 4, torch.bfloat16: 2}

# Names the ratios refer to.
COPY = "copy (torch threads)"
TORCH_FUSED = "torch AdamW fused"
OURS_L2SP = "ours AdamW L2-SP"
OURS_L2SP_PY_PLAN = "ours AdamW L2-SP, step plan in Python"
OURS_L2SP_NEW_LR = "ours AdamW L2-SP, new lr each step"
TORCH_FUSED_NEW_LR = "torch AdamW fused, new lr each step"
NATIVE_PLAN_ENV = "PYFINETUNE_OPTIM_NATIVE_PLAN"
TORCH_L2SP_PREFIX = "torch AdamW + L2-SP"
TORCH_SGD_L2SP_PREFIX = "torch SGD + L2-SP"
OURS_SGD_L2SP = "ours SGD L2-SP"
COMPILED_SUFFIX = "(torch.compile, foreach)"
DS_ADAM = "deepspeed CPUAdam"
DS_L2SP = "deepspeed CPUAdam + L2-SP (add+add)"

TARGETS = [
    # (key, description, CPU target)
    ("speedup_vs_best_torch_l2sp", "ours L2-SP vs best torch L2-SP (time ratio, >1 = ours faster)", 1.6),
    ("speed_vs_torch_fused_no_penalty", "ours L2-SP vs torch fused AdamW without penalty (time ratio)", 0.9),
    ("fraction_of_copy_bandwidth", "ours L2-SP effective GB/s / copy GB/s", 0.8),
]
# On a GPU issue #2 sets one target: 85% of the measured device bandwidth at 100M+ parameters.
CUDA_BANDWIDTH_TARGET = 0.85
CUDA_TARGET_MIN_PARAMS = 100_000_000


def targets_for(device: torch.device, elements: int) -> List[Optional[float]]:
    """The targets of TARGETS' three ratios on ``device`` for a case of ``elements`` parameters
    (None: reported without a target)."""
    if device.type == "cuda":
        return [None, None, CUDA_BANDWIDTH_TARGET if elements >= CUDA_TARGET_MIN_PARAMS else None]
    return [t[2] for t in TARGETS]


# ------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    name: str
    title: str
    shapes: List[Tuple[int, ...]]
    calls_per_rep: int = 1
    bandwidth_bound: bool = True  # False: a probe of fixed per-step costs, targets do not apply

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def make_case(name: str) -> Case:
    """The parameter list of a named case: flat, resnet50, tiny, large / large-steps (GPU) or small."""
    if name == "flat":
        return Case("flat", "(a) 64 tensors x 2^18 fp32 (64 MiB of parameters)", [(2**18,)] * 64)
    if name == "resnet50":
        shapes, source = resnet50_param_shapes()
        return Case("resnet50", f"(b) resnet50 parameter shapes, {len(shapes)} tensors ({source})", shapes)
    if name == "tiny":
        # resnet50's tensor count at a negligible size: what a step costs besides moving bytes
        # (Python, argument checks, dispatch, thread wake-up).
        shapes, _ = resnet50_param_shapes()
        return Case("tiny", f"{len(shapes)} tensors x 64 fp32 (per-step fixed cost probe)", [(64,)] * len(shapes),
                    calls_per_rep=20, bandwidth_bound=False)
    if name == "large":
        return Case("large", "(c) 128 tensors x 2^20 fp32 (134M parameters)", [(2**20,)] * 128)
    if name == "large-steps":
        # The same, 5 steps per timed sample: after the first, each step's host work (Python, the
        # plan's checks, launches) runs while the previous step's kernels do, as in a training loop
        # whose host runs ahead of the GPU; one step per sample (`large`) also bills the host's work
        # before the first launch to the GPU's time (an H200 measured 0.82x / 0.92x copy for ours at
        # 268M parameters, one / five steps per sample: gpu-check-20261129-2137).
        return Case("large-steps", "(c) 128 tensors x 2^20 fp32 (134M parameters), 5 steps per timed sample",
                    [(2**20,)] * 128, calls_per_rep=5)
    if name == "small":
        # Larger than the last-level cache of most machines, small enough for `pyfinetune bench --quick`.
        return Case("small", "32 tensors x 2^15 fp32 (1M parameters, a quick run)", [(2**15,)] * 32)
    raise ValueError(f"unknown case {name!r}")


@dataclass
class Master:
    """The random values every contender starts from (each contender gets its own clones)."""

    params: List[torch.Tensor]
    grads: List[torch.Tensor]
    anchors: List[torch.Tensor]


def make_master(case: Case, device: torch.device, seed: int = 0) -> Master:
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(shape, std):
        return torch.randn(shape, generator=gen, device=device).mul_(std)

    params = [randn(s, 0.05) for s in case.shapes]
    grads = [randn(s, 1e-3) for s in case.shapes]
    # The anchor is the pretrained point; fine-tuning has already moved away from it.
    anchors = [p + randn(p.shape, 1e-3) for p in params]
    return Master(params, grads, anchors)


def own_params(master: Master) -> List[torch.Tensor]:
    params = []
    for p, g in zip(master.params, master.grads):
        q = p.clone().requires_grad_(True)
        q.grad = g.clone()
        params.append(q)
    return params


def state_bytes(opt: Optional[torch.optim.Optimizer], extra: Sequence[torch.Tensor] = ()) -> int:
    """Persistent memory besides parameters and gradients: optimizer state, anchors."""
    seen, total = set(), 0
    tensors = list(extra)
    if opt is not None:
        for st in opt.state.values():
            tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------ contenders
@dataclass
class Entry:
    contender: Contender
    opt: Optional[torch.optim.Optimizer] = None
    extra_state: Sequence[torch.Tensor] = ()


def l2sp_composition(kind: str, params: List[torch.Tensor], anchors: List[torch.Tensor], l2sp: float,
                     step: Callable[[], Any]) -> Callable[[], None]:
    """p.grad += l2sp * (p - p0), done with torch ops, then torch's optimizer step.

    ``sub+add``: the issue's composition, ``_foreach_add_(grads, _foreach_sub(params, anchors))``
    (allocates p - p0 every step); ``add+add``: ``g += l2sp p; g -= l2sp p0`` (no temporary).
    """
    grads = [p.grad for p in params]

    if kind == "sub+add":
        def fn():
            with torch.no_grad():
                torch._foreach_add_(grads, torch._foreach_sub(params, anchors), alpha=l2sp)
            step()
    elif kind == "add+add":
        def fn():
            with torch.no_grad():
                torch._foreach_add_(grads, params, alpha=l2sp)
                torch._foreach_add_(grads, anchors, alpha=-l2sp)
            step()
    else:
        raise ValueError(kind)
    return fn


def torch_adamw(params: List[torch.Tensor], impl: str) -> torch.optim.AdamW:
    """torch's AdamW with the benchmark's hyper-parameters; ``impl`` is "fused" or "foreach"."""
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **{impl: True})


def torch_sgd(params: List[torch.Tensor], impl: str) -> torch.optim.SGD:
    """torch's SGD with momentum and the benchmark's hyper-parameters; ``impl``: "fused" or "foreach"."""
    return torch.optim.SGD(params, lr=SGD_LR, momentum=MOMENTUM, **{impl: True})


def torch_plain_entries(master: Master, n: int, make_opt: Callable[[List[torch.Tensor], str], torch.optim.Optimizer],
                        prefix: str, step_bytes: int, note: str) -> List[Entry]:
    """torch's optimizer without a penalty, fused and foreach."""
    entries = []
    for impl in ("fused", "foreach"):
        opt = make_opt(own_params(master), impl)
        entries.append(Entry(Contender(f"{prefix} {impl}", opt.step, step_bytes * n,
                                       {"B/elem": step_bytes, "note": note}), opt))
    return entries


def torch_l2sp_entries(master: Master, n: int, make_opt: Callable[[List[torch.Tensor], str], torch.optim.Optimizer],
                       prefix: str, step_bytes: int) -> List[Entry]:
    """The four torch L2-SP compositions of one optimizer: (sub+add | add+add) x (fused | foreach)."""
    entries = []
    for kind in ("sub+add", "add+add"):
        for impl in ("fused", "foreach"):
            params = own_params(master)
            anchors = [a.clone() for a in master.anchors]
            opt = make_opt(params, impl)
            fn = l2sp_composition(kind, params, anchors, L2SP, opt.step)
            entries.append(Entry(Contender(f"{prefix} ({kind}, {impl})", fn, step_bytes * n,
                                           {"B/elem": step_bytes, "note": "2 extra passes: +24 B/elem moved"}),
                                 opt, anchors))
    return entries


def torch_compiled_l2sp_entry(master: Master, n: int,
                               make_opt: Callable[[List[torch.Tensor], str], torch.optim.Optimizer],
                               prefix: str, step_bytes: int) -> Tuple[Optional[Entry], Optional[str]]:
    """The L2-SP composition (``p.grad += l2sp (p - p0)``, then torch's foreach step) under
    ``torch.compile``, as a user writes it: two graphs (torch's ``Optimizer.step`` breaks the graph),
    the penalty and the update, each compiled by inductor (a one-graph variant through the functional
    ``torch.optim.adamw.adamw(..., capturable=True)`` measured the same, see benchmarks/README.md).

    Compiled here, with one step (two for SGD, which compiles again once its momentum buffers exist;
    the compilation takes from seconds to about a minute), so that the timed rounds see only
    compiled steps; torch's compile-time warnings that say nothing about the measurement are muted. Returns ``(entry, None)``, or ``(None, reason)`` when the
    compilation fails (no C++ compiler for inductor, an unsupported torch).
    """
    params = own_params(master)
    anchors = [a.clone() for a in master.anchors]
    opt = make_opt(params, "foreach")
    step = torch.compile(l2sp_composition("sub+add", params, anchors, L2SP, opt.step))
    try:
        with common.quiet_compile_logs():
            step()
            if opt.__class__ is torch.optim.SGD:
                step()  # SGD compiles again at its second step, when its momentum buffers exist
    except Exception as e:  # an inductor / toolchain failure: compare without it
        return None, f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return Entry(Contender(f"{prefix} {COMPILED_SUFFIX}", step, step_bytes * n,
                           {"B/elem": step_bytes, "note": "penalty + torch's step, compiled (2 graphs)"}),
                 opt, anchors), None


def deepspeed_entries(master: Master, n: int) -> Tuple[List[Entry], Optional[str]]:
    """DeepSpeed's CPU Adam (its own AVX + OpenMP kernel, AdamW mode), without a penalty and with
    the L2-SP penalty added to the gradients in torch first (it has no L2-SP of its own).

    Returns ``(entries, None)``, or ``([], reason)`` when DeepSpeed is not installed or its CPU op
    does not build (DeepSpeed compiles it with ninja on first use, about two minutes, then caches it).
    """
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as e:  # ImportError, or DeepSpeed failing to set itself up
        return [], f"deepspeed not importable ({type(e).__name__}: {e})"
    entries = []
    try:
        for name, l2sp in ((DS_ADAM, 0.0), (DS_L2SP, L2SP)):
            params = own_params(master)
            opt = DeepSpeedCPUAdam(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, adamw_mode=True)
            if l2sp:
                anchors = [a.clone() for a in master.anchors]
                fn = l2sp_composition("add+add", params, anchors, l2sp, opt.step)
                entries.append(Entry(Contender(name, fn, (ADAMW_BYTES + 4) * n,
                                               {"B/elem": ADAMW_BYTES + 4, "note": "penalty in torch, then its step"}),
                                     opt, anchors))
            else:
                entries.append(Entry(Contender(name, opt.step, ADAMW_BYTES * n,
                                               {"B/elem": ADAMW_BYTES, "note": "no penalty"}), opt))
    except Exception as e:  # the JIT build of its CPU op failed
        return [], f"deepspeed CPUAdam unavailable ({type(e).__name__}: {e})"
    return entries, None


# (name, AdamW keyword arguments, anchor bytes per element, note)
OURS_ADAMW_VARIANTS = [
    ("ours AdamW", dict(l2sp=0.0), 0, "l2sp=0"),
    (OURS_L2SP, dict(l2sp=L2SP), 4, "coupled, fp32 anchor"),
    ("ours AdamW L2-SP decoupled", dict(l2sp=L2SP, penalty_mode="decoupled"), 4, "decoupled, fp32 anchor"),
    ("ours AdamW L2-SP bf16 anchor", dict(l2sp=L2SP, anchor_dtype=torch.bfloat16), 2, "coupled, bf16 anchor"),
]


def new_lr_each_step(opt: torch.optim.Optimizer) -> Callable[[], Any]:
    """opt.step with every group's lr set anew before each step (alternating between two values
    around LR, as a scheduler moves it), the way a training loop with an LR scheduler steps."""
    flip = [False]

    def step():
        flip[0] = not flip[0]
        for g in opt.param_groups:
            g["lr"] = LR * (1.0 + 1e-3) if flip[0] else LR
        opt.step()

    return step


def ours_adamw_entries(master: Master, n: int, variants: Sequence[Tuple[str, Dict[str, Any], int, str]]) -> List[Entry]:
    """``pyfinetune.optim.AdamW`` contenders, one per ``(name, kwargs, anchor bytes, note)`` variant."""
    entries = []
    for name, kw, anchor_b, note in variants:
        params = own_params(master)
        anchor = [a.clone() for a in master.anchors] if kw["l2sp"] > 0 else "init"
        opt = pyfinetune.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                     anchor=anchor, **kw)
        b = ADAMW_BYTES + anchor_b
        entries.append(Entry(Contender(name, opt.step, b * n, {"B/elem": b, "note": note}), opt))
    return entries


def build_contenders(case: Case, master: Master, device: torch.device, ours_ok: bool,
                     rivals: bool = False, compiled: bool = False) -> List[Entry]:
    """Every contender of the full benchmark: copy references, AdamW and SGD, torch's and ours, with
    ``compiled`` torch's L2-SP compositions under ``torch.compile`` too, and with ``rivals`` on the
    CPU DeepSpeed's CPU Adam when it is installed."""
    n = case.numel
    entries: List[Entry] = []

    def add_compiled(make_opt, prefix, step_bytes):
        entry, why_not = torch_compiled_l2sp_entry(master, n, make_opt, prefix, step_bytes)
        if entry is not None:
            entries.append(entry)
        else:
            print(f"[{case.name}] {prefix}: {why_not}; not compared", file=sys.stderr, flush=True)

    # Bandwidth reference: a copy whose source and destination together are as large as p, g, m, v.
    src = torch.randn(2 * n, device=device)
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * src.element_size()
    entries.append(Entry(Contender(COPY, lambda: dst.copy_(src), copy_bytes,
                                   {"B/elem": None, "note": f"dst.copy_(src), {2 * n / 1e6:.1f}M fp32, read+write"})))
    if device.type == "cpu":
        def copy_1t():
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                dst.copy_(src)
            finally:
                torch.set_num_threads(threads)
        entries.append(Entry(Contender("copy (1 thread)", copy_1t, copy_bytes,
                                       {"B/elem": None, "note": "reference: what one core moves"})))

    # ---- AdamW
    entries += torch_plain_entries(master, n, torch_adamw, "torch AdamW", ADAMW_BYTES, "no penalty")
    entries += torch_l2sp_entries(master, n, torch_adamw, TORCH_L2SP_PREFIX, ADAMW_BYTES + 4)
    if compiled:
        add_compiled(torch_adamw, TORCH_L2SP_PREFIX, ADAMW_BYTES + 4)
    if ours_ok:
        entries += ours_adamw_entries(master, n, OURS_ADAMW_VARIANTS)
        # The same step with its cached plan run from Python (each step passes every argument list
        # again): what the C++ plan saves per step, in host time, on this case's tensor count.
        params = own_params(master)
        opt = pyfinetune.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                     anchor=[a.clone() for a in master.anchors], l2sp=L2SP)
        entries.append(Entry(Contender(OURS_L2SP_PY_PLAN, common.with_env(NATIVE_PLAN_ENV, "0", opt.step),
                                       (ADAMW_BYTES + 4) * n,
                                       {"B/elem": ADAMW_BYTES + 4, "note": f"{NATIVE_PLAN_ENV}=0"}), opt))
        # An LR scheduler's training loop: a new lr before every step (ours and torch's fused AdamW).
        params = own_params(master)
        opt = pyfinetune.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                     anchor=[a.clone() for a in master.anchors], l2sp=L2SP)
        entries.append(Entry(Contender(OURS_L2SP_NEW_LR, new_lr_each_step(opt), (ADAMW_BYTES + 4) * n,
                                       {"B/elem": ADAMW_BYTES + 4, "note": "group lr changed before each step"}), opt))
        opt = torch_adamw(own_params(master), "fused")
        entries.append(Entry(Contender(TORCH_FUSED_NEW_LR, new_lr_each_step(opt), ADAMW_BYTES * n,
                                       {"B/elem": ADAMW_BYTES, "note": "no penalty; group lr changed before each step"}),
                             opt))
    if rivals and device.type == "cpu":
        ds, why_not = deepspeed_entries(master, n)
        entries += ds
        if why_not:
            print(f"[{case.name}] no DeepSpeed rival: {why_not}", file=sys.stderr, flush=True)

    # ---- SGD with momentum
    entries += torch_plain_entries(master, n, torch_sgd, "torch SGD", SGD_BYTES, "momentum, no penalty")
    entries += torch_l2sp_entries(master, n, torch_sgd, TORCH_SGD_L2SP_PREFIX, SGD_BYTES + 4)
    if compiled:
        add_compiled(torch_sgd, TORCH_SGD_L2SP_PREFIX, SGD_BYTES + 4)
    if ours_ok:
        for name, l2sp, anchor_b in (("ours SGD", 0.0, 0), (OURS_SGD_L2SP, L2SP, 4)):
            params = own_params(master)
            anchor = [a.clone() for a in master.anchors] if l2sp > 0 else "init"
            opt = pyfinetune.optim.SGD(params, lr=SGD_LR, momentum=MOMENTUM, l2sp=l2sp, anchor=anchor)
            b = SGD_BYTES + anchor_b
            entries.append(Entry(Contender(name, opt.step, b * n,
                                           {"B/elem": b, "note": "coupled, fp32 anchor" if l2sp else "l2sp=0"}), opt))
    return entries


# --------------------------------------------------------------------------------------- analysis
def best_of(timings: Dict[str, common.Timing], prefix: str) -> Optional[str]:
    names = [k for k in timings if k.startswith(prefix)]
    return min(names, key=lambda k: timings[k].median) if names else None


def analyse(case: Case, entries: List[Entry], timings: Dict[str, common.Timing],
            device: torch.device) -> Dict[str, Any]:
    by_name = {e.contender.name: e.contender for e in entries}
    copy_gbps = timings[COPY].gbps(by_name[COPY].bytes)
    ratios: List[Dict[str, Any]] = []

    def add(key, desc, value, target=None, best=None):
        row = {"key": key, "description": desc, **value, "target": target, "best_torch": best}
        if target is not None and case.bandwidth_bound:
            row["status"] = "MET" if value["value"] >= target else "NOT MET"
        else:
            row["status"] = "n/a" if target is not None else ""
        ratios.append(row)

    best = best_of(timings, TORCH_L2SP_PREFIX)
    targets = targets_for(device, case.numel)
    if OURS_L2SP in timings:
        ours = timings[OURS_L2SP]
        add(TARGETS[0][0], f"{TARGETS[0][1]}; best torch = {best}", common.paired_ratio(timings[best], ours),
            targets[0], best)
        add(TARGETS[1][0], TARGETS[1][1], common.paired_ratio(timings[TORCH_FUSED], ours), targets[1])
        frac = ours.gbps(by_name[OURS_L2SP].bytes) / copy_gbps
        per_round = [(by_name[OURS_L2SP].bytes / o) / (by_name[COPY].bytes / c)
                     for o, c in zip(ours.times_ms, timings[COPY].times_ms)]
        add(TARGETS[2][0], TARGETS[2][1], {"value": frac, "p20": common.percentile(per_round, 20),
                                           "p80": common.percentile(per_round, 80)}, targets[2])
        if device.type == "cpu":
            # A CPU store to a line not in cache first reads it (write-allocate), so a copy moves
            # 3 bytes per 2 counted, whereas AdamW reads everything it writes. Counting that read
            # gives the bandwidth the memory system really delivered to the copy.
            add("fraction_of_copy_bandwidth_with_write_allocate",
                "ours L2-SP effective GB/s / copy GB/s counting the write-allocate read (x1.5), stricter",
                {k: v / 1.5 for k, v in ratios[-1].items() if k in ("value", "p20", "p80")}, targets[2])
        if OURS_L2SP_NEW_LR in timings and TORCH_FUSED_NEW_LR in timings:
            add("ours_new_lr_vs_torch_fused_new_lr", "ours L2-SP vs torch fused AdamW without penalty, both with a new "
                "lr before each step (an LR scheduler's loop; time ratio)",
                common.paired_ratio(timings[TORCH_FUSED_NEW_LR], timings[OURS_L2SP_NEW_LR]))
        if OURS_L2SP_PY_PLAN in timings:
            add("native_plan_vs_python_plan", "ours L2-SP, step plan in C++ (default) vs in Python (time ratio)",
                common.paired_ratio(timings[OURS_L2SP_PY_PLAN], ours))
        add("ours_no_penalty_vs_torch_fused", "ours AdamW (l2sp=0) vs torch fused AdamW (time ratio)",
            common.paired_ratio(timings[TORCH_FUSED], timings["ours AdamW"]))
        add("ours_bf16_anchor_vs_torch_fused", "ours L2-SP bf16 anchor vs torch fused AdamW without penalty",
            common.paired_ratio(timings[TORCH_FUSED], timings["ours AdamW L2-SP bf16 anchor"]))
        compiled_name = f"{TORCH_L2SP_PREFIX} {COMPILED_SUFFIX}"
        if compiled_name in timings:
            add("speedup_vs_torch_compile_l2sp", "ours L2-SP vs torch.compile of the L2-SP composition (time ratio)",
                common.paired_ratio(timings[compiled_name], ours))
        if DS_ADAM in timings:
            add("ours_no_penalty_vs_deepspeed_cpu_adam", "ours AdamW (l2sp=0) vs DeepSpeed CPUAdam (time ratio)",
                common.paired_ratio(timings[DS_ADAM], timings["ours AdamW"]))
            add("speedup_vs_deepspeed_l2sp", "ours L2-SP vs DeepSpeed CPUAdam + L2-SP in torch (time ratio)",
                common.paired_ratio(timings[DS_L2SP], ours))
        best_sgd = best_of(timings, TORCH_SGD_L2SP_PREFIX)
        add("sgd_speedup_vs_best_torch_l2sp", f"ours SGD L2-SP vs best torch SGD L2-SP; best torch = {best_sgd}",
            common.paired_ratio(timings[best_sgd], timings[OURS_SGD_L2SP]), None, best_sgd)
    rows = []
    for e in entries:
        c, t = e.contender, timings[e.contender.name]
        gbps = t.gbps(c.bytes)
        rows.append({
            "name": c.name, "median_ms": t.median, "p20_ms": t.p20, "p80_ms": t.p80,
            "mean_ms": sum(t.times_ms) / len(t.times_ms), "bytes": c.bytes,
            "bytes_per_elem": c.info.get("B/elem"), "gbps": gbps,
            "fraction_of_copy": (gbps / copy_gbps) if (gbps and copy_gbps) else None,
            "state_mib": state_bytes(e.opt, e.extra_state) / 2**20 if e.opt is not None else None,
            "peak_extra_mib": None if t.peak_extra_bytes is None else t.peak_extra_bytes / 2**20,
            "note": c.info.get("note"), "times_ms": t.times_ms,
        })
    return {"case": case.name, "title": case.title, "numel": case.numel, "tensors": len(case.shapes),
            "calls_per_rep": case.calls_per_rep, "copy_gbps": copy_gbps, "rows": rows, "ratios": ratios}


def case_markdown(res: Dict[str, Any], device: torch.device) -> str:
    f = common.fmt
    headers = ["contender", "median ms", "p20 ms", "p80 ms", "B/elem", "GB/s", "% of copy", "state MiB"]
    if device.type == "cuda":
        headers.append("peak extra MiB")
    headers.append("note")
    rows = []
    for r in res["rows"]:
        row = [r["name"], f(r["median_ms"]), f(r["p20_ms"]), f(r["p80_ms"]), r["bytes_per_elem"], f(r["gbps"]),
               None if r["fraction_of_copy"] is None else f"{100 * r['fraction_of_copy']:.0f}%",
               f(r["state_mib"])]
        if device.type == "cuda":
            row.append(f(r["peak_extra_mib"]))
        row.append(r["note"])
        rows.append(row)
    out = [f"### {res['case']}: {res['title']}",
           f"{res['numel'] / 1e6:.2f}M elements in {res['tensors']} tensors; "
           f"{res['calls_per_rep']} step(s) per timed sample; GB/s counts the minimum bytes (B/elem).", "",
           common.markdown_table(headers, rows), ""]
    if res.get("note"):
        out += [f"Note: {res['note']}.", ""]
    load = res.get("cpu_contention") or {}
    if load.get("other_share") is not None:
        line = (f"Other processes used {100 * load['other_share']:.1f}% of the CPUs during this case "
                f"(hypervisor steal {100 * load['steal_share']:.1f}%).")
        if res.get("attempts", 1) > 1:
            line += f" Best of {res['attempts']} attempts."
        if common.is_contended(load):
            line = "**Warning: the machine was not quiet; do not trust these numbers.** " + line
        out += [line, ""]
    if res["ratios"]:
        rrows = [[r["description"], f"{r['value']:.3f}", f"{r['p20']:.3f} .. {r['p80']:.3f}",
                  "" if r["target"] is None else f">= {r['target']}", r["status"]] for r in res["ratios"]]
        out += [common.markdown_table(["ratio", "value", "per-round p20 .. p80", "target", "status"], rrows), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------- pyfinetune bench
def speedup_rows(device: torch.device, *, quick: bool, reps: int, warmup: int) -> List[common.Speedup]:
    """``pyfinetune bench``'s optimizer rows: one AdamW step with L2-SP, ``ours AdamW L2-SP`` against
    the fastest of torch's four L2-SP compositions and (not with ``quick``) the compiled one,
    interleaved in the same rounds. Cases: ``small`` with ``quick``; else ``resnet50`` (a real
    parameter list), and ``large`` on CUDA."""
    names = ["small"] if quick else ["resnet50"] + (["large"] if device.type == "cuda" else [])
    ours_variant = [v for v in OURS_ADAMW_VARIANTS if v[0] == OURS_L2SP]
    rows = []
    for name in names:
        case = make_case(name)
        master = make_master(case, device)
        entries = torch_l2sp_entries(master, case.numel, torch_adamw, TORCH_L2SP_PREFIX, ADAMW_BYTES + 4)
        note = "torch.compile skipped (--quick)"
        if not quick:
            entry, why_not = torch_compiled_l2sp_entry(master, case.numel, torch_adamw, TORCH_L2SP_PREFIX,
                                                       ADAMW_BYTES + 4)
            entries += [entry] if entry is not None else []
            note = f"{why_not}: not compared" if why_not else ""
        entries += ours_adamw_entries(master, case.numel, ours_variant)
        del master
        label = f"AdamW L2-SP step, {case.name} ({len(case.shapes)} tensors, {case.numel / 1e6:.1f}M fp32)"
        rows.append(common.measure_speedup("optim", label, [e.contender for e in entries], OURS_L2SP, device=device,
                                           reps=reps, warmup=warmup, calls_per_rep=case.calls_per_rep, note=note))
        del entries
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------- main
def run_case_quietly(case: Case, device: torch.device, reps: int, warmup: int, attempts: int,
                     rivals: bool = False, compiled: bool = False) -> Dict[str, Any]:
    """Run the case, again (up to ``attempts`` times) while other processes disturbed it on CPU;
    keep the least disturbed run and record how many were made."""
    best = None
    for attempt in range(1, attempts + 1):
        if device.type == "cpu" and not common.wait_for_quiet():
            print(f"[{case.name}] the machine stayed busy; measuring anyway", file=sys.stderr, flush=True)
        res = run_case(case, device, reps, warmup, rivals, compiled)
        share = res["cpu_contention"].get("other_share")
        if best is None or (share or 0.0) < (best["cpu_contention"].get("other_share") or 0.0):
            best = res
        best["attempts"] = attempt
        if device.type != "cpu" or not common.is_contended(res["cpu_contention"]):
            break
        print(f"[{case.name}] other processes took {100 * share:.1f}% of the CPUs: "
              + ("running the case again" if attempt < attempts else "giving up"), file=sys.stderr, flush=True)
        gc.collect()
    return best


def run_case(case: Case, device: torch.device, reps: int, warmup: int, rivals: bool = False,
             compiled: bool = False) -> Dict[str, Any]:
    ours_ok = device.type in pyfinetune.kernel_devices()["fused_adamw_"]
    master = make_master(case, device)
    entries = build_contenders(case, master, device, ours_ok, rivals, compiled)
    del master
    gc.collect()
    contenders = [e.contender for e in entries]
    print(f"[{case.name}] {len(contenders)} contenders, {case.numel / 1e6:.2f}M elements, {reps} rounds",
          file=sys.stderr, flush=True)
    with common.CpuContention() as load:
        timings = common.time_interleaved(contenders, reps=reps, warmup=warmup, device=device,
                                          calls_per_rep=case.calls_per_rep,
                                          progress=lambda s: print(f"[{case.name}] {s}", file=sys.stderr, flush=True))
    for c in contenders:  # one more step each, outside the timed rounds
        timings[c.name].peak_extra_bytes = common.peak_extra_memory(c.fn, device)
    res = analyse(case, entries, timings, device)
    res["cpu_contention"] = load.result
    if not ours_ok:
        res["note"] = f"pyfinetune has no {device.type} kernel in this build: only torch rows"
    return res


def cpu_prefetch_setting() -> str:
    """"on" / "off": whether our CPU kernels prefetch in software in this run (part of the record:
    it changes the CPU results by 7-19%); why not, for a bad PYFINETUNE_CPU_PREFETCH."""
    from pyfinetune._info import optimizer_cpu_prefetch

    setting = optimizer_cpu_prefetch()  # True, False, or the ValueError's message for a bad setting
    return {True: "on", False: "off"}.get(setting, f"unknown (ValueError: {setting})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", nargs="+", choices=("flat", "resnet50", "tiny", "large", "large-steps", "small"),
                    help="default: flat resnet50 tiny (+ large large-steps on cuda; large-steps without "
                         "torch.compile)")
    common.add_run_options(ap, default_reps=DEFAULT_REPS, repeat_what="a case")
    ap.add_argument("--no-rivals", dest="rivals", action="store_false",
                    help="CPU: leave out DeepSpeed's CPU Adam (included when deepspeed is installed)")
    ap.add_argument("--no-compile", dest="compiled", action="store_false",
                    help="leave out torch.compile of the L2-SP compositions (compiling takes up to a minute "
                         "per case; always left out with --quick)")
    args = ap.parse_args(argv)
    compiled = args.compiled and not args.quick
    device, reps, warmup = common.resolve_run_options(ap, args, default_reps=DEFAULT_REPS)
    cases = args.case or (["flat", "resnet50", "tiny"] + (["large", "large-steps"] if device.type == "cuda" else []))
    for big in ("large", "large-steps"):
        if big in cases and device.type != "cuda":
            ap.error(f"the '{big}' case (134M parameters, ~20 contenders with their own state) is for GPUs")

    stamp, when = common.timestamp()
    machine = common.machine_info(device)
    results = []
    for name in cases:
        # large-steps: the compiled compositions were timed by `large` (a minute of compiling each)
        results.append(run_case_quietly(make_case(name), device, reps, warmup, args.attempts, args.rivals,
                                        compiled and not (name == "large-steps" and "large" in cases)))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    config = {"reps": reps, "warmup": warmup, "quick": args.quick, "cases": cases, "lr": LR, "betas": BETAS,
              "eps": EPS, "weight_decay": WEIGHT_DECAY, "l2sp": L2SP, "sgd_lr": SGD_LR, "momentum": MOMENTUM,
              "rivals": args.rivals, "compiled": compiled, "cpu_prefetch": cpu_prefetch_setting()}
    md = [f"# pyfinetune fused optimizer benchmark ({device.type}, {when})", "",
          common.machine_summary(machine), "",
          f"{reps} timed rounds after {warmup} warm-up rounds, contenders interleaved round-robin; "
          "ratios are median / median with the spread of the same-round ratios." +
          (" QUICK RUN: not a record." if args.quick else ""), ""]
    if device.type == "cpu":
        md += [f"Our CPU kernels' software prefetch: {config['cpu_prefetch']} (PYFINETUNE_CPU_PREFETCH).", ""]
    md += [case_markdown(r, device) for r in results]
    record = {"benchmark": "optim", "device": device.type, "when": when, "machine": machine, "config": config,
              "cases": results}
    common.publish("optim", device, record, "\n".join(md), args.out, stamp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
