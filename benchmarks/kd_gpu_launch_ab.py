"""A/B of the CUDA distillation kernel's launch: block size, prefetch, registers, in one process (a GPU check, seconds).

    python benchmarks/kd_gpu_launch_ab.py [--rows 8192] [--vocab 128256] [--reps 20] [--out DIR]
                                          [--device cuda] [--no-write]

Times ``kd_loss`` (forward_kl, T = 2, alpha = 0.5, 1/8 of the rows ignored, batchmean, bf16) forward,
backward and forward + backward with the launch's own choice of block size (by occupancy) and with
``PYFINETUNE_KD_CUDA_THREADS`` = 512, 256, 128 (read by the extension at each call), at
T = 2.0001 (the kernels' general path, where T = 2 computes the CE exponential as a square), and with
each of ``PYFINETUNE_KD_CUDA_PREFETCH`` (the shared-memory cache filled by cp.async copies) and
``PYFINETUNE_KD_CUDA_CAP_REGISTERS`` (the bfloat16 kernels held to 80 registers, three 256-thread
blocks per SM) off, alone and (the default here: unset) together, and with
``PYFINETUNE_KD_CUDA_PERSISTENT=1`` (a grid of the resident rows only, each block or cluster looping
over rows) with and without ``PYFINETUNE_KD_CUDA_L2_PREFETCH`` (its next row's slice asked of L2
before each row), and with ``PYFINETUNE_KD_CUDA_SPLIT`` (blocks per row) 4 and 16, and with ``PYFINETUNE_KD_DEVICE_SCALE=1`` (the
backward's scale read on the device: no host synchronization), interleaved round by round, against the time to read both inputs and write the gradient once at the measured
copy bandwidth (issue #3's GPU target: forward + backward within 1.3x of it). Each variant's loss and
gradient are checked against the first one's (the block size changes only the order of sums).
A second table takes the default forward apart (ATTRIBUTION: without the gradient pass, without
labels, at T = 1, on float32 inputs, and torch kernels that move the same bytes), so that a check
without Nsight Compute still says where the forward's time goes.
Writes kd-launch-ab-cuda-*.md / .json to ``--out`` (default benchmarks/results). ``--device cpu``
runs the same steps on the CPU (where the variable changes nothing): a smoke test of the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from pyfinetune.benchmarks import common  # noqa: E402
from pyfinetune.benchmarks.distill import copy_bandwidth, kd_inputs  # noqa: E402
from pyfinetune.losses import kd_loss  # noqa: E402

ENV = "PYFINETUNE_KD_CUDA_THREADS"
PREFETCH_ENV = "PYFINETUNE_KD_CUDA_PREFETCH"
CAP_ENV = "PYFINETUNE_KD_CUDA_CAP_REGISTERS"
PERSISTENT_ENV = "PYFINETUNE_KD_CUDA_PERSISTENT"
L2_ENV = "PYFINETUNE_KD_CUDA_L2_PREFETCH"
SPLIT_ENV = "PYFINETUNE_KD_CUDA_SPLIT"
DEVICE_SCALE_ENV = "PYFINETUNE_KD_DEVICE_SCALE"
# name -> (block size override or None, temperature, prefetch, capped registers[, persistent, L2
# prefetch[, blocks per row]]). T = 2.0001 takes
# the kernels' general path (an exponential for the CE term of every element); T = 2 computes it as
# a square. prefetch: PYFINETUNE_KD_CUDA_PREFETCH (pass 1 fills the shared-memory cache with
# cp.async copies). capped: PYFINETUNE_KD_CUDA_CAP_REGISTERS (the bfloat16 kernels compiled for
# three 256-thread blocks per SM, at most 80 registers; blocks of at most 256 threads). True / False
# set the variable to 1 / 0; None leaves it unset (auto: both on for this bf16 case with the
# gradient, as an H100 measured them faster in gpu-check-20261127-2118). persistent: PYFINETUNE_KD_CUDA_PERSISTENT,
# L2 prefetch: PYFINETUNE_KD_CUDA_L2_PREFETCH (both unset, i.e. off, unless given); blocks per row:
# PYFINETUNE_KD_CUDA_SPLIT (unset: the launch's choice, 8 here; 16 blocks take 128 threads each by
# the occupancy choice, six per SM); device scale: PYFINETUNE_KD_DEVICE_SCALE (unset: off).
VARIANTS = {"default": (None, 2.0, None, None),
            "no prefetch, uncapped (the default before 2026-11-27)": (None, 2.0, False, False),
            "512, no prefetch, uncapped": ("512", 2.0, False, False), "256": ("256", 2.0, None, None),
            "128": ("128", 2.0, None, None), "default, T=2.0001 (no power path)": (None, 2.0001, None, None),
            "prefetch, uncapped": (None, 2.0, True, False), "capped registers, no prefetch": (None, 2.0, False, True),
            "persistent + L2 prefetch": (None, 2.0, None, None, True, True),
            "persistent, no L2 prefetch": (None, 2.0, None, None, True, False),
            "persistent + L2 prefetch, no cp.async prefetch": (None, 2.0, False, None, True, True),
            "split 16": (None, 2.0, None, None, None, None, "16"),
            "split 16, persistent + L2 prefetch": (None, 2.0, None, None, True, True, "16"),
            "split 4 (cache too small: re-reads)": (None, 2.0, None, None, None, None, "4"),
            "default, backward scale on the device": (None, 2.0, None, None, None, None, None, True)}


def set_variant(v: str) -> float:
    threads, temperature, prefetch, capped, *rest = VARIANTS[v]
    persistent, l2, split, device_scale = (list(rest) + [None, None, None, None])[:4]
    if threads is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = threads
    if split is None:
        os.environ.pop(SPLIT_ENV, None)
    else:
        os.environ[SPLIT_ENV] = split
    for name, on in ((PREFETCH_ENV, prefetch), (CAP_ENV, capped), (PERSISTENT_ENV, persistent), (L2_ENV, l2),
                     (DEVICE_SCALE_ENV, device_scale)):
        if on is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = "1" if on else "0"
    return temperature


# The forward's time taken apart (issue #3: the forward is 4.8 ms of the 5.05 on the H200, and no
# launch switch above moved it): the default kernel on the same rows with parts of its work left out,
# and two torch kernels that move the floor's bytes, interleaved round by round. Reading them: "loss
# only" against "gradient kept" is the gradient pass's share; "loss only" against "2 reads" is what
# the statistics pass costs above reading both inputs; "float32 inputs" against "gradient kept" says
# whether bytes set the pace (twice the bytes, twice the time) or the arithmetic does (about the same
# time); "no labels" and "T = 1" are the CE term's and the temperature's exponentials.
ATTRIBUTION = ("kd_loss_fwd, gradient kept (the forward of kd_loss)",
               "loss only (need_grad=False: no gradient pass, no gradient written)",
               "no labels (no CE statistics, no CE term)",
               "T = 1 (the CE and the soft terms share their exponentials)",
               "float32 inputs (twice the bytes of the same work)",
               "torch.add(s, t, out=g): 2 reads + 1 write of the floor",
               "torch.amax of s and of t per row: the 2 reads alone")


def attribution_calls(s, t, lab):
    """name -> call for ATTRIBUTION, on detached copies of the benchmark's inputs."""
    s = s.detach()
    s32, t32 = s.float(), t.float()
    out = torch.empty_like(s)
    kd = torch.ops.pyfinetune.kd_loss_fwd

    def fwd(st, tt, labels, temperature=2.0, need_grad=True):
        return lambda: kd(st, tt, labels, temperature=temperature, alpha=0.5, divergence="forward_kl", beta=0.5,
                          ignore_index=-100, need_grad=need_grad, grad_scale=1.0)

    return dict(zip(ATTRIBUTION, (fwd(s, t, lab), fwd(s, t, lab, need_grad=False), fwd(s, t, None),
                                  fwd(s, t, lab, temperature=1.0), fwd(s32, t32, lab),
                                  lambda: torch.add(s, t, out=out),
                                  lambda: (torch.amax(s, -1), torch.amax(t, -1)))))


def attribution(s, t, lab, dev, reps: int) -> dict:
    """Median ms per call of each ATTRIBUTION row, interleaved round by round (3 warm-up rounds)."""
    calls = attribution_calls(s, t, lab)
    times = {k: [] for k in calls}
    for r in range(reps + 3):
        for k in range(len(ATTRIBUTION)):
            name = ATTRIBUTION[(r + k) % len(ATTRIBUTION)]
            ms = timed(calls[name], dev)
            if r >= 3:
                times[name].append(ms)
    return times


def timed(fn, dev) -> float:
    common.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    common.synchronize(dev)
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=common.RESULTS_DIR)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device (or --device cpu for a smoke test)")
        return 2
    s, t, lab = kd_inputs(args.rows, args.vocab, torch.bfloat16, dev)

    temp = {"T": 2.0}

    def loss_fn():
        return kd_loss(s, t, lab, temperature=temp["T"], alpha=0.5)

    names = list(VARIANTS)
    ref = None
    times = {v: {"forward": [], "backward": [], "forward+backward": []} for v in VARIANTS}
    check = {}
    for r in range(args.reps + 3):
        for k in range(len(names)):
            v = names[(r + k) % len(names)]
            temp["T"] = set_variant(v)
            box = {}
            f = timed(lambda: box.setdefault("loss", loss_fn()), dev)
            b = timed(lambda: box["loss"].backward(), dev)
            if r == 0:
                got = (box["loss"].detach().float().cpu(), s.grad.detach().float())
                if ref is None:
                    ref = got
                check[v] = {"loss_rel_diff": float((got[0] - ref[0]).abs() / ref[0].abs().clamp_min(1e-30)),
                            "grad_max_abs_diff": float((got[1] - ref[1]).abs().max())}
            s.grad = None
            fb = timed(lambda: loss_fn().backward(), dev)
            s.grad = None
            if r >= 3:
                times[v]["forward"].append(f)
                times[v]["backward"].append(b)
                times[v]["forward+backward"].append(fb)
    set_variant("default")
    attr = attribution(s, t, lab, dev, args.reps)
    item = s.element_size()
    moved = 3 * s.numel() * item
    gbps, _ = copy_bandwidth(2 * s.numel() * item, max(args.reps, 20), dev)
    floor_ms = moved / (gbps * 1e6)
    rows = []
    for v in names:
        med = {m: common.percentile(ts, 50) for m, ts in times[v].items()}
        same_t = VARIANTS[v][1] == VARIANTS["default"][1]  # another T: its loss differs by that, not by an error
        rows.append([v, f"{med['forward']:.2f}", f"{med['backward']:.2f}", f"{med['forward+backward']:.2f}",
                     f"{med['forward+backward'] / floor_ms:.2f}",
                     f"{check[v]['loss_rel_diff']:.1e}" if same_t else "(other T)",
                     f"{check[v]['grad_max_abs_diff']:.1e}" if same_t else "(other T)"])
    attr_med = {k: common.percentile(ts, 50) for k, ts in attr.items()}
    base = attr_med[ATTRIBUTION[0]]
    attr_rows = [[k, f"{attr_med[k]:.3f}", f"{attr_med[k] / base:.2f}", f"{attr_med[k] / floor_ms:.2f}"]
                 for k in ATTRIBUTION]
    info = common.machine_info(dev)
    md = "\n".join([
        f"# kd_loss launch A/B: block size, prefetch, registers, persistent grid, split ({dev.type}), {args.rows} x {args.vocab} bf16", "", common.machine_summary(info), "",
        f"copy bandwidth {gbps:.0f} GB/s; floor (read student + teacher, write the gradient once) {floor_ms:.2f} ms;"
        f" medians of {args.reps} interleaved rounds", "",
        common.markdown_table(["variant", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd / floor (target <= 1.3)",
                               "loss rel diff", "grad max abs diff"], rows), "",
        "## The forward taken apart (all variables unset; medians of "
        f"{args.reps} interleaved rounds; see ATTRIBUTION in the script for how to read it)", "",
        common.markdown_table(["forward", "ms", "/ gradient kept", "/ floor"], attr_rows), ""])
    print(md)
    record = {"machine": info, "rows": args.rows, "vocab": args.vocab, "copy_gbps": gbps, "floor_ms": floor_ms,
              "times_ms": times, "check": check,
              "attribution_ms": attr}
    if not args.no_write:
        print("wrote", *common.write_results("kd-launch-ab", dev, record, md, out_dir=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
