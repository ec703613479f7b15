"""masked_matmul's weight gradient on the CPU: sampled at the kept positions (SDDMM) against the dense
product and its mask, by sparsity and batch rows (the crossover behind the default of
``PYFINETUNE_MASKED_GRAD``, minutes).

    python benchmarks/prune_sampled_grad.py [--rows 16 64 256 2048] [--sparsity 0.5 ... 0.99]
                                            [--features 4096] [--dtype float32] [--reps 5] [--out DIR]
                                            [--no-write]

For each (rows N, sparsity) with x [N, K], grad_out [N, M], weight and a random mask [M, K] (M = K =
``--features``): ``torch.ops.pyfinetune.masked_matmul_backward`` asked for the weight gradient only,
with ``PYFINETUNE_MASKED_GRAD=dense`` (the product ``grad_out^T @ x`` by torch, then the mask),
``=sampled`` (the mask's compressed rows, csr_linear's SDDMM over them, a scatter into the dense
gradient) and unset (the default's choice), interleaved round by round, median of ``--reps`` calls
after one warm-up; both results are compared (the same up to the order of the sums). Writes
prune-sampled-grad-cpu-*.md / .json to ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from pyfinetune.benchmarks import common  # noqa: E402

ENV = "PYFINETUNE_MASKED_GRAD"
PATHS = ("dense", "sampled", "auto")


def weight_grad(g, x, w, mask, path: str):
    if path == "auto":
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = path
    try:
        return torch.ops.pyfinetune.masked_matmul_backward(g, x, w, mask, [False, True, False], False)[1]
    finally:
        os.environ.pop(ENV, None)


def measure(n: int, features: int, sparsity: float, dtype: torch.dtype, reps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen).to(dtype)
    g = torch.randn(n, features, generator=gen).to(dtype)
    w = torch.randn(features, features, generator=gen).to(dtype)
    mask = torch.rand(features, features, generator=gen) >= sparsity
    dense, sampled = weight_grad(g, x, w, mask, "dense"), weight_grad(g, x, w, mask, "sampled")
    scale = float(dense.abs().max()) or 1.0
    diff = float((dense.float() - sampled.float()).abs().max()) / scale
    same_zeros = bool(torch.equal(sampled[~mask], torch.zeros_like(sampled[~mask])))
    times = {p: [] for p in PATHS}
    for r in range(reps + 1):
        for k in range(len(PATHS)):
            path = PATHS[(r + k) % len(PATHS)]
            t0 = time.perf_counter()
            weight_grad(g, x, w, mask, path)
            if r > 0:
                times[path].append((time.perf_counter() - t0) * 1e3)
    return times, diff, same_zeros


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256, 2048])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=common.RESULTS_DIR)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows, record = [], []
    for n in args.rows:
        for sp in args.sparsity:
            times, diff, zeros = measure(n, args.features, sp, dtype, args.reps, seed=len(record))
            med = {p: common.percentile(ts, 50) for p, ts in times.items()}
            record.append({"rows": n, "sparsity": sp, "times_ms": times, "max_rel_diff": diff, "pruned_zero": zeros})
            rows.append([n, f"{sp:.0%}", f"{med['dense']:.2f}", f"{med['sampled']:.2f}",
                         f"{med['dense'] / med['sampled']:.2f}x", f"{med['auto']:.2f}",
                         f"{diff:.1e}", "yes" if zeros else "NO"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    info = common.machine_info(torch.device("cpu"))
    md = "\n".join([
        f"# masked_matmul weight gradient: sampled (SDDMM) vs dense product + mask (cpu, {args.dtype}, "
        f"M = K = {args.features})", "", common.machine_summary(info), "",
        f"Median ms of {args.reps} calls per path, interleaved; speed-up = dense / sampled; default = "
        f"{ENV} unset; difference = max |dense - sampled| / max |dense|.", "",
        common.markdown_table(["rows N", "sparsity", "dense ms", "sampled ms", "speed-up", "default ms",
                               "difference", "pruned exactly 0"], rows), ""])
    print(md)
    if not args.no_write:
        print("wrote", *common.write_results("prune-sampled-grad", torch.device("cpu"),
                                             {"machine": info, "dtype": args.dtype, "features": args.features,
                                              "cases": record}, md, out_dir=args.out))
    bad = [c for c in record if not c["pruned_zero"] or c["max_rel_diff"] > (1e-4 if dtype == torch.float32 else 2e-2)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
