"""Per-step host time of pyfinetune's optimizer steps on tiny tensors (a CPU probe, seconds).

    PYTHONPATH=<a build's root> python benchmarks/optim_step_overhead.py [--rounds 21]

Times ``opt.step()`` (one torch thread; median of ``--rounds`` rounds of 300 steps, after 20 warm-up
steps) for AdamW + L2-SP and SGD (momentum) + L2-SP on resnet50's tensor count (161 tensors of 64
fp32 elements, one param group) and, for AdamW + L2-SP, on 100 param groups of 2 such tensors with
an lr of their own each (layer-wise learning rates); torch's fused AdamW on the same groups for
reference. The tensors are tiny, so the time is the fixed cost: Python, the cached plan's checks,
dispatch. To compare two builds, run it with each on PYTHONPATH, alternating.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pyfinetune.optim import SGD, AdamW


def per_step_us(step, rounds: int, n: int = 300) -> float:
    for _ in range(20):
        step()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def with_grads(params):
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = {}
    ps = with_grads([torch.nn.Parameter(torch.randn(64)) for _ in range(161)])
    out["161 tensors, AdamW + L2-SP"] = per_step_us(AdamW(ps, lr=1e-3, l2sp=1e-2).step, args.rounds)
    qs = with_grads([torch.nn.Parameter(torch.randn(64)) for _ in range(161)])
    out["161 tensors, SGD + L2-SP"] = per_step_us(SGD(qs, lr=1e-3, momentum=0.9, l2sp=1e-2).step, args.rounds)
    groups = [{"params": with_grads([torch.nn.Parameter(torch.randn(64)) for _ in range(2)]), "lr": 1e-3 * 0.9 ** i}
              for i in range(100)]
    out["100 groups x 2 tensors, AdamW + L2-SP"] = per_step_us(AdamW(groups, lr=1e-3, l2sp=1e-2).step, args.rounds)
    twins = [{"params": with_grads([torch.nn.Parameter(p.detach().clone()) for p in g["params"]]), "lr": g["lr"]}
             for g in groups]
    out["100 groups x 2 tensors, torch fused AdamW"] = per_step_us(torch.optim.AdamW(twins, fused=True).step,
                                                                   args.rounds)
    for name, us in out.items():
        print(f"{name}: {us:.1f} us a step")


if __name__ == "__main__":
    main()
