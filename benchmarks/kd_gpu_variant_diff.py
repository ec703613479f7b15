"""How far the CUDA distillation kernels' variants (PYFINETUNE_KD_CUDA_CAP_REGISTERS, _PREFETCH) are
from the plain kernels (both variables 0) and from a float64 reference, and their speed at the GPU
target's size (a GPU check, ~30 s):

    PYTHONPATH=. python benchmarks/kd_gpu_variant_diff.py > kd_variant_diff.md

bf16 inputs at the shapes of tests/test_kd_cuda_prefetch.py (one block per row, a cluster, many
rows), every divergence, loss rows and gradient; then 8192 x 128256 forward_kl with the gradient,
medians of 10 interleaved rounds. Prints markdown; the variables are left unset at the end.
"""
import os
import sys

import torch

import pyfinetune  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from reference_kd import kd_reference_rows  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("kd_gpu_variant_diff.py: needs a CUDA device (the variables select CUDA kernels only)")

CAP, PRE, THR = "PYFINETUNE_KD_CUDA_CAP_REGISTERS", "PYFINETUNE_KD_CUDA_PREFETCH", "PYFINETUNE_KD_CUDA_THREADS"


def case(n, v, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, v, generator=g) * 3).to("cuda", torch.bfloat16)
    t = (torch.randn(n, v, generator=g) * 3).to("cuda", torch.bfloat16)
    lab = torch.randint(0, v, (n,), generator=g)
    lab[1] = -100  # an ignored row
    return s, t, lab.cuda()


def run(s, t, lab, env, **kw):
    for k in (CAP, PRE, THR):
        os.environ.pop(k, None)
    os.environ.update(env)
    rows, grad = torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, need_grad=True, **kw)
    torch.cuda.synchronize()
    return rows.double(), grad.double()


print("| case | divergence | variant | rows max rel diff vs plain | grad max abs diff / max abs grad"
      " | rows max rel err vs float64 (variant, plain) |")
print("|---|---|---|---|---|---|")
for (n, v) in [(300, 32000), (3, 128256), (64, 128256)]:
    s, t, lab = case(n, v, n + v)
    for div in ["forward_kl", "reverse_kl", "jsd"]:
        kw = dict(temperature=2.0, alpha=0.5, divergence=div, beta=0.4, ignore_index=-100, grad_scale=0.5)
        base = run(s, t, lab, {THR: "256", CAP: "0", PRE: "0"}, **kw)
        ref = kd_reference_rows(s, t, lab, temperature=2.0, alpha=0.5, divergence=div, beta=0.4).detach()
        for name, env in [("capped", {THR: "256", CAP: "1", PRE: "0"}),
                          ("prefetch", {THR: "256", CAP: "0", PRE: "1"}),
                          ("capped+prefetch auto", {CAP: "1", PRE: "1"})]:
            r, g = run(s, t, lab, env, **kw)
            rd = ((r - base[0]).abs() / base[0].abs().clamp_min(1e-30)).max().item()
            gd = ((g - base[1]).abs().max() / base[1].abs().max()).item()
            e1 = ((r - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
            e0 = ((base[0] - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()
            err = f"{e1:.1e}, {e0:.1e}"
            print(f"| {n}x{v} | {div} | {name} | {rd:.1e} | {gd:.1e} | {err} |")

s, t, lab = case(8192, 128256, 1)
s.requires_grad_(False)
print("\n| 8192x128256 bf16 forward_kl, need_grad | median ms |\n|---|---|")
kw = dict(temperature=2.0, alpha=0.5, divergence="forward_kl", beta=0.4, ignore_index=-100, grad_scale=1.0)
variants = [("default", {}), ("plain (both 0)", {CAP: "0", PRE: "0"}), ("capped+prefetch auto", {CAP: "1", PRE: "1"}),
            ("capped+prefetch 128", {CAP: "1", PRE: "1", THR: "128"}),
            ("capped+prefetch 256", {CAP: "1", PRE: "1", THR: "256"}), ("capped auto", {CAP: "1", PRE: "0"})]
times = {k: [] for k, _ in variants}
for rnd in range(12):
    for name, env in variants:
        for k in (CAP, PRE, THR):
            os.environ.pop(k, None)
        os.environ.update(env)
        torch.cuda.synchronize()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(3):
            torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, need_grad=True, **kw)
        b.record()
        torch.cuda.synchronize()
        if rnd >= 2:
            times[name].append(a.elapsed_time(b) / 3)
for name, _ in variants:
    x = sorted(times[name])
    print(f"| {name} | {x[len(x) // 2]:.2f} |")
for k in (CAP, PRE, THR):
    os.environ.pop(k, None)
