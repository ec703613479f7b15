"""Benchmark of the fused distillation loss against the torch composition, eager and compiled.

    python benchmarks/bench_kd.py                       # CPU cases (1024 x 32000, 256 x 128256, fused linear)
    python benchmarks/bench_kd.py --device cuda         # GPU cases (8192 x 128256 bf16, bigger fused linear)
    python benchmarks/bench_kd.py --quick               # smoke run, small shapes

Contenders (forward_kl, T = 2, alpha = 0.5, labels with 1/8 of the rows ignored, batchmean):
  * ``torch eager``:   log_softmax / kl_div(log_target) / cross_entropy composition;
  * ``torch compile``: the same function under ``torch.compile`` (inductor);
  * ``ours``:          ``pyfinetune.losses.kd_loss``.
Timed, interleaved round-robin in one process (``common.time_interleaved``): forward (grad mode,
student requiring grad), forward+backward, and backward alone (forward untimed before each
timed backward, contenders interleaved the same way). Memory, each contender in a fresh child
process: ``held`` = memory allocated by the forward and still live after it (graph alive), i.e.
what is kept between forward and backward; ``peak`` = peak of the memory allocated during
forward+backward above what was allocated before (CPU: torch's allocator record from the
profiler's memory events, see ``common.CpuAllocations``; CUDA:
max_memory_allocated).
``kd_loss_topk`` (a teacher saved as its top-k logits) is compared with the torch composition for
it (the student's log-softmax over V gathered at the teacher's k indices, the teacher's softmax
over its k logits, cross-entropy; eager and compiled), checked on a small case first.
``fused_linear_kd_loss`` is compared with the unfused composition (logits, then kd_loss) on
N x H hidden states and a V x H head (``--linear-chunks 256 1024``: also with those chunk sizes),
and with Liger-Kernel's ``LigerFusedLinearJSDLoss`` (beta = 0: the same loss) when liger-kernel is
installed; on CUDA the kd cases add Liger's ``LigerJSD`` + ``LigerCrossEntropyLoss`` on torch's
log-probabilities (``--no-rivals`` leaves both out). Results: ``benchmarks/results/kd-<device>-<stamp>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import pyfinetune  # noqa: F401
from pyfinetune.losses import fused_linear_kd_loss, kd_loss, kd_loss_topk

from . import common
from .common import Contender, Timing

KERNEL = "kd_loss_fwd"  # the op whose kernels `pyfinetune bench` needs on its device
DEFAULT_REPS = 10
TEMP, ALPHA = 2.0, 0.5
EAGER, COMPILED, OURS, UNFUSED, FUSED = "torch eager", "torch compile", "ours", "unfused (logits + ours)", "ours fused linear"

# ("kd", N, V, dtype); ("linear", N, H, V[, dtype of the hidden states and weights, default float32]);
# ("topk", N, V, k, dtype): kd_loss_topk, the teacher saved as its k largest logits per row.
CPU_CASES = [("kd", 1024, 32000, torch.float32), ("kd", 256, 128256, torch.float32), ("linear", 4096, 1024, 32000),
             ("topk", 1024, 32000, 64, torch.float32)]
GPU_CASES = [("kd", 8192, 128256, torch.bfloat16), ("linear", 16384, 4096, 128256),
             ("linear", 16384, 4096, 128256, torch.bfloat16), ("topk", 8192, 128256, 64, torch.bfloat16)]
QUICK_CASES = [("kd", 64, 5000, torch.float32), ("linear", 256, 128, 5000), ("topk", 64, 5000, 16, torch.float32)]


def torch_kd(s, t, lab):
    log_q = F.log_softmax(s.float() / TEMP, dim=-1)
    log_p = F.log_softmax(t.float() / TEMP, dim=-1)
    kd = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    ce = F.cross_entropy(s.float(), lab, ignore_index=-100, reduction="none")
    rows = torch.where(lab == -100, 0.0, ALPHA * TEMP * TEMP * kd + (1 - ALPHA) * ce)
    return rows.sum() / (lab != -100).sum().clamp_min(1)


def ours_kd(s, t, lab):
    return kd_loss(s, t, lab, temperature=TEMP, alpha=ALPHA)


def lazily_compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, compiled at the first call (not at import, and only when timed)."""
    compiled = None

    def run(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args)
    return run


compiled_kd = lazily_compiled(torch_kd)


KD_FNS = {EAGER: torch_kd, COMPILED: compiled_kd, OURS: ours_kd}

# Liger-Kernel's logits-level losses (Triton kernels: GPU only, a rival of the CUDA kd cases when
# liger-kernel is installed): its JSD with beta = 0 is KL(teacher || student) on log-probabilities,
# which the caller computes (log_softmax at T, as its documentation shows), plus its cross-entropy
# on the raw student logits; both average over the rows that are not ignored, so weights
# (alpha T^2, 1 - alpha) give exactly kd_loss's loss (checked by tests/test_benchmark_scripts.py).
LIGER_KD = "liger (log_softmax + LigerJSD + LigerCrossEntropy)"
_liger_kd_modules = None


def liger_kd_available(device: torch.device) -> Optional[str]:
    """None when Liger-Kernel's JSD and cross-entropy losses can run on ``device``, else why not."""
    if device.type != "cuda":
        return "its Triton kernels need a GPU"
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD  # noqa: F401
    except Exception as e:  # not installed, or failing to set itself up
        return f"liger-kernel not importable ({type(e).__name__}: {e})"
    return None


def liger_mismatch(kind: str, device: torch.device) -> Optional[str]:
    """None when Liger's contender of ``kind`` ("kd" or "linear") computes kd_loss's loss on a small
    input on ``device``, else what differs: an older liger-kernel averaged its soft loss over the
    ignored rows too, and a benchmark of another loss would compare different work."""
    try:
        if kind == "kd":
            inputs = kd_inputs(24, 300, torch.float32, device, seed=11)
            ours, theirs = ours_kd(*inputs), liger_kd(*inputs)
        else:
            inputs = linear_inputs(96, 32, 300, device, seed=11)
            ours, theirs = fused_linear(*inputs), liger_linear(*inputs)
    except Exception as e:  # an API that changed
        return f"liger-kernel failed on a small case ({type(e).__name__}: {e})"
    if not torch.allclose(ours.detach().double(), theirs.detach().double(), rtol=1e-4, atol=1e-6):
        return f"liger-kernel computes another loss ({float(theirs.detach()):.6g}, ours {float(ours.detach()):.6g}): not compared"
    return None


def liger_kd(s, t, lab):
    global _liger_kd_modules
    if _liger_kd_modules is None:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerJSD

        _liger_kd_modules = (LigerJSD(beta=0.0, ignore_index=-100), LigerCrossEntropyLoss(ignore_index=-100))
    jsd, ce = _liger_kd_modules
    log_q = F.log_softmax(s.float() / TEMP, dim=-1)
    log_p = F.log_softmax(t.float() / TEMP, dim=-1)
    return ALPHA * TEMP * TEMP * jsd(log_q, log_p, lab) + (1 - ALPHA) * ce(s, lab)


def kd_fn(name: str) -> Callable:
    return liger_kd if name == LIGER_KD else KD_FNS[name]


# kd_loss_topk's contenders. The torch composition a user writes for a top-k teacher: the
# student's log-softmax over all V (at T, and at 1 for the CE term), gathered at the teacher's k
# indices, against the softmax of the teacher's k logits: the same loss as kd_loss_topk with
# forward_kl (a teacher row scattered into V entries of -inf would cost V-sized teacher passes
# too, and 0 * -inf needs masking).
def torch_kd_topk(s, tk, idx, lab):
    log_q = F.log_softmax(s.float() / TEMP, dim=-1).gather(-1, idx)
    log_p = F.log_softmax(tk.float() / TEMP, dim=-1)
    kd = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = F.cross_entropy(s.float(), lab, ignore_index=-100, reduction="none")
    rows = torch.where(lab == -100, 0.0, ALPHA * TEMP * TEMP * kd + (1 - ALPHA) * ce)
    return rows.sum() / (lab != -100).sum().clamp_min(1)


def ours_kd_topk(s, tk, idx, lab):
    return kd_loss_topk(s, tk, idx, lab, temperature=TEMP, alpha=ALPHA)


compiled_kd_topk = lazily_compiled(torch_kd_topk)


TOPK_FNS = {EAGER: torch_kd_topk, COMPILED: compiled_kd_topk, OURS: ours_kd_topk}


def topk_inputs(n, v, k, dtype, device, seed=0):
    """Student logits [n, v] (requiring grad), the top-k of a random teacher row ([n, k] values in
    ``dtype``, int64 indices), labels with 1/8 of the rows ignored."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(n, v, generator=g, device=device).mul_(3).to(dtype).requires_grad_(True)
    tk, idx = torch.randn(n, v, generator=g, device=device).mul_(3).topk(k, dim=-1)
    lab = torch.randint(0, v, (n,), generator=g, device=device)
    lab[::8] = -100
    return s, tk.to(dtype), idx, lab


def check_topk(device: torch.device) -> None:
    """The top-k contenders compute the same loss and student gradient (small case, float32)."""
    inputs = topk_inputs(16, 300, 7, torch.float32, device, seed=1)
    ref = None
    for name, fn in TOPK_FNS.items():
        if name == COMPILED:
            continue  # the same function as eager; compiling it twice costs time, not information
        s = inputs[0].detach().clone().requires_grad_(True)
        loss = fn(s, *inputs[1:])
        loss.backward()
        if ref is None:
            ref = (loss.detach(), s.grad)
        elif not (torch.allclose(loss.detach(), ref[0], rtol=1e-4, atol=1e-5)
                  and torch.allclose(s.grad, ref[1], rtol=1e-4, atol=1e-6)):
            raise RuntimeError(f"pyfinetune benchmark: {name} top-k loss or gradient differs from the torch "
                               "composition; not timing a wrong contender")


def kd_inputs(n, v, dtype, device, seed=0):
    # Drawn on the device itself: at 8192 x 128256 drawing on the CPU and copying took minutes.
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(n, v, generator=g, device=device).mul_(3).to(dtype).requires_grad_(True)
    t = torch.randn(n, v, generator=g, device=device).mul_(3).to(dtype)
    lab = torch.randint(0, v, (n,), generator=g, device=device)
    lab[::8] = -100
    return s, t, lab


def unfused_linear(h, w, ht, wt, lab):
    return kd_loss(h @ w.t(), (ht @ wt.t()).detach(), lab, temperature=TEMP, alpha=ALPHA)


def fused_linear(h, w, ht, wt, lab):
    return fused_linear_kd_loss(h, w, ht, wt, lab, temperature=TEMP, alpha=ALPHA)


LINEAR_FNS = {UNFUSED: unfused_linear, FUSED: fused_linear}

# Liger-Kernel's fused linear distillation loss (``liger_kernel.chunked_loss``: torch ops compiled per
# chunk with torch.compile, so it runs on any device), a rival whenever liger-kernel is installed.
# With beta = 0 its generalized JSD is KL(teacher || student), the soft loss is not multiplied by T^2
# and both losses are averaged over the rows that are not ignored: weights (1 - alpha, alpha T^2)
# give exactly kd_loss's forward_kl loss (checked by tests/test_benchmark_scripts.py).
LIGER = "liger fused linear (JSD beta=0)"
_liger_module = None


def liger_available() -> Optional[str]:
    """None when Liger-Kernel's fused linear distillation loss can be imported, else why not."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception as e:  # not installed, or failing to set itself up
        return f"liger-kernel not importable ({type(e).__name__}: {e})"
    return None


def liger_linear(h, w, ht, wt, lab):
    global _liger_module
    if _liger_module is None:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # Its defaults otherwise (chunk_size=1024, compiled=True): what its users run.
        _liger_module = LigerFusedLinearJSDLoss(weight_hard_loss=1 - ALPHA, weight_soft_loss=ALPHA * TEMP * TEMP,
                                                beta=0.0, temperature=TEMP)
    return _liger_module(h, w, ht, wt, lab)


def chunk_contender(chunk: int) -> str:
    """The name of ``fused_linear_kd_loss`` with an explicit ``chunk_size`` (``--linear-chunks``)."""
    return f"{FUSED}, chunk_size={chunk}"


def linear_fn(name: str, chunk: Optional[int] = None) -> Callable:
    if name == LIGER:
        return liger_linear
    if chunk is None:
        return LINEAR_FNS[name]
    return lambda h, w, ht, wt, lab: fused_linear_kd_loss(h, w, ht, wt, lab, temperature=TEMP, alpha=ALPHA,
                                                          chunk_size=chunk)


def linear_inputs(n, hdim, v, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(v, hdim, generator=g) / hdim ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    ht = torch.randn(n, hdim, generator=g).to(device=device, dtype=dtype)
    wt = (torch.randn(v, hdim, generator=g) / hdim ** 0.5).to(device=device, dtype=dtype)
    lab = torch.randint(0, v, (n,), generator=g)
    lab[::8] = -100
    return h, w, ht, wt, lab.to(device)


# ------------------------------------------------------------------------------- memory (child)
def child_memory(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One contender's held and peak memory, measured in this (fresh) process."""
    device = torch.device(spec["device"])
    if spec["kind"] == "kd":
        fn = kd_fn(spec["name"])
        inputs = kd_inputs(spec["n"], spec["v"], getattr(torch, spec["dtype"]), device)
    elif spec["kind"] == "topk":
        fn = TOPK_FNS[spec["name"]]
        inputs = topk_inputs(spec["n"], spec["v"], spec["k"], getattr(torch, spec["dtype"]), device)
    else:
        fn = linear_fn(spec["name"], spec.get("chunk"))
        inputs = linear_inputs(spec["n"], spec["h"], spec["v"], device, getattr(torch, spec.get("dtype", "float32")))
    # One warm-up (compilation, thread pools) then the measured call.
    fn(*inputs).backward()
    for x in inputs:
        x.grad = None
    common.synchronize(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss = fn(*inputs)
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) - base
        loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        return {"held_bytes": held, "peak_bytes": peak}
    with common.CpuAllocations() as mem:
        loss = fn(*inputs)
        mem.mark("forward")
        loss.backward()
        del loss
    return {"held_bytes": mem.live_at("forward"), "peak_bytes": mem.peak()}


def measure_memory(spec: Dict[str, Any]) -> Dict[str, Any]:
    # The child imports the pyfinetune this process measures, wherever it was loaded from.
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-m", "pyfinetune.benchmarks.distill", "--child", json.dumps(spec)],
                         capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONPATH": path})
    if out.returncode != 0:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- timing
def time_backward(fns: Dict[str, Callable], inputs: Dict[str, Tuple[torch.Tensor, ...]], reps: int,
                  device) -> Dict[str, Timing]:
    """Backward alone: an untimed forward, then the timed backward; contenders round-robin."""
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(reps + 2):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            loss = fns[name](*inputs[name])
            common.synchronize(device)
            t0 = time.perf_counter_ns()
            loss.backward()
            common.synchronize(device)
            if r >= 2:
                times[name].append((time.perf_counter_ns() - t0) / 1e6)
            for x in inputs[name]:
                x.grad = None
    return {n: Timing(n, times[n]) for n in names}


def fwd_bwd(fn: Callable, inputs: Tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """One forward + backward of ``fn(*inputs)``; the gradients are cleared after it."""
    def run():
        fn(*inputs).backward()
        for x in inputs:
            x.grad = None
    return run


def time_case(fns: Dict[str, Callable], make_inputs, reps: int, device) -> Dict[str, Dict[str, Timing]]:
    per_contender = {n: make_inputs() for n in fns}

    def fwd(name):
        f, args = fns[name], per_contender[name]
        return lambda: f(*args)

    out = {}
    out["forward"] = common.time_interleaved([Contender(n, fwd(n)) for n in fns], reps=reps, device=device)
    out["backward"] = time_backward(fns, per_contender, reps, device)
    out["forward+backward"] = common.time_interleaved([Contender(n, fwd_bwd(fns[n], per_contender[n])) for n in fns],
                                                      reps=reps, device=device)
    return out


def copy_bandwidth(nbytes: int, reps: int, device: torch.device) -> Tuple[float, Timing]:
    """Measured memory bandwidth in GB/s: a device-to-device copy of ``nbytes`` (read + write counted),
    median of ``reps`` after warm-up."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = common.time_interleaved([Contender("copy", lambda: dst.copy_(src))], reps=reps, device=device)["copy"]
    return 2 * src.numel() * 4 / (t.median * 1e6), t


def kd_roofline(n: int, v: int, dtype: torch.dtype, ours_ms: float, reps: int, device: torch.device) -> Dict[str, Any]:
    """#3's GPU target: ours forward + backward against the time to read the student and teacher
    logits and write the student's gradient once at the measured copy bandwidth."""
    item = torch.tensor([], dtype=dtype).element_size()
    moved = 3 * n * v * item  # read student, read teacher, write the gradient
    gbps, t = copy_bandwidth(2 * n * v * item, max(reps, 20), device)
    floor_ms = moved / (gbps * 1e6)
    return {"bytes_moved": moved, "copy_gbps": gbps, "copy_ms": t.summary(), "floor_ms": floor_ms,
            "ours_fwd_bwd_ms": ours_ms, "ratio": ours_ms / floor_ms, "target": 1.3,
            "met": ours_ms / floor_ms <= 1.3}


def roofline_markdown(r: Dict[str, Any]) -> str:
    return common.markdown_table(
        ["measured copy GB/s", "bytes (read s, t + write grad)", "floor ms", "ours fwd+bwd ms",
         "ours / floor", "target", "status"],
        [[f"{r['copy_gbps']:.0f}", f"{r['bytes_moved'] / 2**30:.2f} GiB", f"{r['floor_ms']:.2f}",
          f"{r['ours_fwd_bwd_ms']:.2f}", f"{r['ratio']:.2f}", "<= 1.3", "MET" if r["met"] else "NOT MET"]])


# ---------------------------------------------------------------------------------- pyfinetune bench
# (rows, vocabulary, dtype) of `pyfinetune bench --quick`; the full run takes the first case of
# CPU_CASES / GPU_CASES.
BENCH_QUICK_CASES = {"cpu": (256, 32000, torch.float32), "cuda": (4096, 32000, torch.bfloat16)}
BENCH_QUICK_TOPK = {"cpu": (256, 32000, 64, torch.float32), "cuda": (4096, 32000, 64, torch.bfloat16)}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _speedup_row(fns: Dict[str, Callable], inputs: Callable[[], Tuple[torch.Tensor, ...]], label: str,
                 device: torch.device, *, quick: bool, reps: int, warmup: int) -> common.Speedup:
    """One ``pyfinetune bench`` row: ours forward + backward against the fastest of the eager
    composition and ``torch.compile`` of it (skipped with ``quick``), interleaved."""
    names = [EAGER, OURS] if quick else [EAGER, COMPILED, OURS]
    contenders = [Contender(name, fwd_bwd(fns[name], inputs())) for name in names]
    note = "torch.compile skipped (--quick)" if quick else ""
    if not quick:
        compiled = contenders[names.index(COMPILED)]
        try:
            with common.quiet_compile_logs():
                compiled.fn()  # compiles now, not in the warm-up rounds
        except Exception as e:  # no C++ compiler, or an inductor limitation: compare with eager only
            contenders.remove(compiled)
            note = f"torch.compile failed ({type(e).__name__}): not compared"
    return common.measure_speedup("distill", label, contenders, OURS, device=device, reps=reps, warmup=warmup,
                                  note=note)


def speedup_rows(device: torch.device, *, quick: bool, reps: int, warmup: int) -> List[common.Speedup]:
    """``pyfinetune bench``'s distillation rows: ``kd_loss`` and ``kd_loss_topk`` (a top-64
    teacher) forward + backward, each against the fastest of its eager torch composition and
    ``torch.compile`` of it (skipped with ``quick``: compiling takes longer than the whole quick
    run), interleaved in the same rounds."""
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    if quick:
        n, v, dtype = BENCH_QUICK_CASES[device.type]
        tn, tv, k, tdtype = BENCH_QUICK_TOPK[device.type]
    else:
        n, v, dtype = next(c for c in cases if c[0] == "kd")[1:]
        tn, tv, k, tdtype = next(c for c in cases if c[0] == "topk")[1:]
    check_topk(device)
    return [
        _speedup_row(KD_FNS, lambda: kd_inputs(n, v, dtype, device), f"kd_loss fwd+bwd, {n}x{v} {_SHORT[dtype]}",
                     device, quick=quick, reps=reps, warmup=warmup),
        _speedup_row(TOPK_FNS, lambda: topk_inputs(tn, tv, k, tdtype, device),
                     f"kd_loss_topk fwd+bwd, {tn}x{tv} top-{k} {_SHORT[tdtype]}", device, quick=quick, reps=reps,
                     warmup=warmup),
    ]


def run(args) -> None:
    device = torch.device(args.device)
    cases = QUICK_CASES if args.quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)
    if args.case:
        cases = [c for c in cases if c[0] in args.case]
    info = common.machine_info(device)
    _, when = common.timestamp()
    # What was run, beside the machine: a record without it could not tell a --quick or a one-case run
    # from a full one.
    config = {"reps": args.reps, "quick": args.quick, "cases": [list(map(str, c)) for c in cases],
              "linear_chunks": args.linear_chunks, "rivals": args.rivals, "memory": not args.no_memory}
    record: Dict[str, Any] = {"benchmark": "kd", "device": device.type, "when": when, "machine": info,
                              "config": config, "cases": []}
    md = [f"# kd loss benchmark ({device.type})", "", common.machine_summary(info), ""]
    for case in cases:
        if case[0] == "kd":
            _, n, v, dtype = case
            title = f"kd_loss {n} x {v} {str(dtype).replace('torch.', '')}"
            fns = dict(KD_FNS)
            if args.rivals and device.type == "cuda":
                why_not = liger_kd_available(device) or liger_mismatch("kd", device)
                if why_not is None:
                    fns[LIGER_KD] = liger_kd
                else:
                    print(f"no Liger-Kernel rival: {why_not}", file=sys.stderr, flush=True)
            make = lambda n=n, v=v, dtype=dtype: kd_inputs(n, v, dtype, device)
            specs = {name: dict(kind="kd", name=name, n=n, v=v, dtype=str(dtype).replace("torch.", ""),
                                device=device.type) for name in fns}
        elif case[0] == "topk":
            _, n, v, k, dtype = case
            title = f"kd_loss_topk {n} x {v}, teacher top-{k}, {str(dtype).replace('torch.', '')}"
            check_topk(device)
            fns = dict(TOPK_FNS)
            make = lambda n=n, v=v, k=k, dtype=dtype: topk_inputs(n, v, k, dtype, device)
            specs = {name: dict(kind="topk", name=name, n=n, v=v, k=k, dtype=str(dtype).replace("torch.", ""),
                                device=device.type) for name in fns}
        else:
            _, n, hdim, v = case[:4]
            dtype = case[4] if len(case) > 4 else torch.float32
            dname = str(dtype).replace("torch.", "")
            title = f"fused_linear_kd_loss N={n} H={hdim} V={v} {dname}"
            chunks = {name: None for name in LINEAR_FNS}
            chunks.update({chunk_contender(c): c for c in args.linear_chunks or ()})
            if args.rivals:
                why_not = liger_available() or liger_mismatch("linear", device)
                if why_not is None:
                    chunks[LIGER] = None
                else:
                    print(f"no Liger-Kernel rival: {why_not}", file=sys.stderr, flush=True)
            fns = {name: linear_fn(name, c) for name, c in chunks.items()}
            make = lambda n=n, hdim=hdim, v=v, dtype=dtype: linear_inputs(n, hdim, v, device, dtype)
            specs = {name: dict(kind="linear", name=name, n=n, h=hdim, v=v, device=device.type, chunk=chunks[name],
                                dtype=dname) for name in fns}
        print(f"== {title}", flush=True)
        quiet = common.wait_for_quiet(max_wait_s=60) if device.type == "cpu" else True
        with common.CpuContention() as cont:
            timings = time_case(fns, make, args.reps, device)
        memory = {} if args.no_memory else {name: measure_memory(spec) for name, spec in specs.items()}
        entry = {"title": title, "contention": cont.result, "started_quiet": quiet,
                 "contended": common.is_contended(cont.result),
                 "timings": {mode: {k: t.summary() for k, t in ts.items()} for mode, ts in timings.items()},
                 "memory": memory}
        ref = FUSED if case[0] == "linear" else OURS
        rows = []
        for name in fns:
            row = [name]
            for mode in ("forward", "backward", "forward+backward"):
                t = timings[mode][name]
                row.append(f"{t.median:.1f} [{t.p20:.1f}, {t.p80:.1f}]")
            fb = timings["forward+backward"]
            row.append(f"{fb[name].median / fb[ref].median:.2f}x")
            m = memory.get(name)
            if m is None:  # --no-memory
                row += ["-", "-"]
            else:
                row.append(f"{m.get('held_bytes', 0) / 2**20:.0f}" if "held_bytes" in m else "err")
                row.append(f"{m.get('peak_bytes', 0) / 2**20:.0f}" if "peak_bytes" in m else "err")
            rows.append(row)
        md += [f"## {title}", "",
               f"contention: other processes {cont.result.get('other_share')}, flagged {entry['contended']}", "",
               common.markdown_table(["contender", "fwd ms median [p20, p80]", "bwd ms", "fwd+bwd ms",
                                      f"fwd+bwd time / {ref}", "held MiB", "peak MiB"], rows), ""]
        if case[0] == "kd" and device.type == "cuda":
            entry["roofline"] = kd_roofline(n, v, dtype, timings["forward+backward"][OURS].median, args.reps, device)
            md += [roofline_markdown(entry["roofline"]), ""]
        record["cases"].append(entry)
        print("\n".join(md[-3:]), flush=True)
    if not args.no_write:
        paths = common.write_results("kd", device, record, "\n".join(md), out_dir=args.out)
        print("wrote", *paths)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line of ``benchmarks/bench_kd.py``; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help=f"timed rounds (>= {common.MIN_REPS})")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--case", nargs="+", choices=("kd", "linear", "topk"),
                   help="only these cases: kd (kd_loss), linear (fused_linear_kd_loss), topk (kd_loss_topk); "
                        "default all")
    p.add_argument("--linear-chunks", type=int, nargs="+", metavar="ROWS",
                   help="also time fused_linear_kd_loss with these chunk_size values (the default chunking is "
                        "always a contender)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory measurement (one child process per contender and case)")
    p.add_argument("--out", default=common.RESULTS_DIR, help=f"results folder (default {common.RESULTS_DIR})")
    p.add_argument("--no-rivals", dest="rivals", action="store_false",
                   help="leave out Liger-Kernel's losses (contenders when liger-kernel is installed: its fused "
                        "linear distillation loss, and on CUDA its JSD + cross-entropy in the kd cases)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child_memory(json.loads(args.child))))
        return 0
    # Before the timing: these once ended a run in a traceback, a bad --out only after all of it.
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    if args.reps < common.MIN_REPS:
        p.error(f"--reps must be >= {common.MIN_REPS}, got {args.reps}")
    bad_chunks = [c for c in args.linear_chunks or () if c < 1]
    if bad_chunks:
        p.error(f"--linear-chunks must be positive row counts, got {bad_chunks}")
    error = None if args.no_write else common.out_dir_error(args.out)
    if error:
        p.error(error)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
