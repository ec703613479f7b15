"""The tensor-core sparse products (tiled_csr_linear and its two gradient ops) on a GPU:
correctness first, then their speed against cuBLAS and our warp kernels, in about a minute.

    python benchmarks/prune_gpu_quick_check.py [--out DIR]      # repository root, after the build
    python benchmarks/prune_gpu_quick_check.py --device cpu --size 64   # smoke test of the script

1. Correctness of the forward, tiled_csr_linear_backward_input (dx) and
   tiled_csr_linear_backward_values (dvalues): float16 and bfloat16 against float64 products on the
   CPU, shapes crossing every edge of the kernels' blocks (64 rows, 128 features, 64-wide K
   slices), sizes not multiples of 8 (plain loads), tiles denser than the 1024 entries a block
   stages in registers, strided operands; the forward and dx again with PYFINETUNE_TILED_CUDA_ASYNC=1
   (the experimental pipeline: tile bounds and entries fetched ahead with asynchronous copies), and
   the forward with PYFINETUNE_TILED_CUDA_SPLIT_K (its K cut in parts; unset = auto, the default since
   2026-11-29, which the plain and async cases run under). Each case prints OK or FAIL; a failure does
   not stop the others (a sticky CUDA error does).
2. Speed: x [N, 4096] @ W^T, W [4096, 4096], random sparsity 50-99% for N = 256 (issue #4's case),
   90% and 99% for N = 2048, and decoding sizes (N = 1: 50, 90, 99%; N = 16: 90, 99%), where the
   product reads the weight once and a sparse one reads 10% of it; contenders interleaved, each sample 20 back-to-back calls timed with
   CUDA events, median of 15 samples: cuBLAS dense (x @ w.T on the pruned weight), our warp-per-row
   csr_linear, and tiled_csr_linear alone (tile values gathered once; SparseLinear gathers them
   at each call: one nnz-sized gather more, which bench_prune.py's "ours sparse, tensor cores" row
   includes), without a split of K (=1, the default before 2026-11-29), with the asynchronous pipeline
   (and =1) and with K split (=auto, the default now; the variables set and unset around
   each call, a few microseconds of host time hidden behind the queued kernels). The same rows
   again with the 20 calls captured in a CUDA graph and replayed: GPU time alone, where the eager
   times of small N can be the host's (Python, dispatcher, launches). Then the backward's products at N = 256, 90%: dx and the weight gradient, ours (warp
   kernels and tensor cores) against cuBLAS. Markdown tables go to stdout (and to
   DIR/prune-tc-quick-<stamp>.md with --out).
Exit status 1 if a correctness case failed.
"""

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import torch  # noqa: E402

from pyfinetune import ops  # noqa: E402
from pyfinetune.benchmarks import common  # noqa: E402

failures = []
DEVICE = "cuda"
SIZE = 4096  # K = M of the timed cases
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def run(name, fn):
    try:
        fn()
        print(f"OK   {name}", flush=True)
    except Exception as e:  # noqa: BLE001
        failures.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if "CUDA error" in str(e):
            traceback.print_exc()


def check_close(got, ref, dtype, length):
    """|got - ref| <= eps |ref| + eps sqrt(length) everywhere (float32 accumulation of `length` terms,
    rounded once; eps one ulp of dtype), else AssertionError naming the worst element."""
    err = (got.double().cpu() - ref).abs()
    bound = EPS[dtype] * ref.abs() + EPS[dtype] * max(length, 1) ** 0.5
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        where = divmod(i, ref.shape[-1]) if ref.dim() == 2 else i
        raise AssertionError(f"max error {err.max().item():.3g}; worst at {where}: got "
                             f"{got.reshape(-1)[i].item():.5g}, want {ref.reshape(-1)[i].item():.5g}")


def problem(n, k, m, sparsity, dtype, seed=0):
    device = DEVICE
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g).to(dtype)
    w = (torch.randn(m, k, generator=g) * k**-0.5).to(dtype)
    mask = torch.rand(m, k, generator=g) >= sparsity
    b = torch.randn(m, generator=g).to(dtype)
    p = ops.compressed_pattern(mask.to(device))
    t = ops.tiled_pattern(p.crow_indices, p.col_indices, k)
    vals = w.to(device)[mask.to(device)]
    return x, w, mask, b, p, t, vals


def correctness(n, k, m, sparsity, dtype, bias=True, x_view=None):
    def f():
        x, w, mask, b, p, t, vals = problem(n, k, m, sparsity, dtype)
        xd = x.to(DEVICE)
        if x_view == "row-sliced":
            big = torch.zeros(n, k + 24, dtype=dtype, device=DEVICE)
            big[:, 8:8 + k] = xd
            xd = big[:, 8:8 + k]
        y = torch.ops.pyfinetune.tiled_csr_linear(xd, vals[t.tile_src.long()], t.tile_ptr, t.tile_loc, m,
                                                  b.to(DEVICE) if bias else None)
        sync()
        ref = x.double() @ torch.where(mask, w.double(), 0.0).t() + (b.double() if bias else 0.0)
        check_close(y, ref, dtype, k)

    return f


ASYNC_ENV = "PYFINETUNE_TILED_CUDA_ASYNC"
SMALL_N_ENV = "PYFINETUNE_CSR_CUDA_SMALL_N"


def with_async(fn):
    """fn run with PYFINETUNE_TILED_CUDA_ASYNC=1 (the experimental pipeline of the tensor-core
    kernels: tile bounds and entries fetched ahead by asynchronous copies), the variable restored
    afterwards (the script's other contenders run as the environment it was started in says)."""
    return common.with_env(ASYNC_ENV, "1", fn)


SPLIT_K_ENV = "PYFINETUNE_TILED_CUDA_SPLIT_K"


def with_split_k(fn, parts="auto"):
    """fn run with PYFINETUNE_TILED_CUDA_SPLIT_K=parts (the forward's K cut in parts that run as
    more blocks, their float32 sums added by a second kernel), the variable restored afterwards."""
    return common.with_env(SPLIT_K_ENV, str(parts), fn)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def correctness_dx(n, k, m, sparsity, dtype):
    """tiled_csr_linear_backward_input: dy [n, m] @ W [m, k] against float64."""
    def f():
        _, w, mask, _, _, t, vals = problem(n, k, m, sparsity, dtype)
        dy = torch.randn(n, m, generator=torch.Generator().manual_seed(5)).to(dtype)
        dx = torch.ops.pyfinetune.tiled_csr_linear_backward_input(dy.to(DEVICE), vals[t.tile_src.long()], t.tile_ptr,
                                                                  t.tile_loc, k)
        sync()
        ref = dy.double() @ torch.where(mask, w.double(), 0.0)
        check_close(dx, ref, dtype, m)

    return f


def correctness_dv(n, k, m, sparsity, dtype):
    """tiled_csr_linear_backward_values: (dy^T @ x) at the kept positions, against float64."""
    def f():
        x, w, mask, _, _, t, vals = problem(n, k, m, sparsity, dtype)
        dy = torch.randn(n, m, generator=torch.Generator().manual_seed(6)).to(dtype)
        dv = torch.ops.pyfinetune.tiled_csr_linear_backward_values(dy.to(DEVICE), x.to(DEVICE), t.tile_ptr,
                                                                   t.tile_loc, t.tile_src)
        sync()
        ref = (dy.double().t() @ x.double())[mask]
        check_close(dv, ref, dtype, n)

    return f


def time_ms(fns, reps=15, calls=20, warmup=3):
    """{name: median ms per call}, contenders interleaved, each sample `calls` back-to-back calls
    (CUDA events on a GPU; the host clock on the CPU, where this script only smoke-tests itself)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            sync()
            if DEVICE == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(calls):
                    fns[name]()
                b.record()
                b.synchronize()
                samples[name].append(a.elapsed_time(b) / calls)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fns[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3 / calls)
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


def graph_time_ms(fns, reps=15, calls=20):
    """{name: median GPU ms per call}: each contender's `calls` back-to-back calls captured once in a
    CUDA graph and replayed, contenders interleaved, so that no host overhead (Python, the
    dispatcher, launch calls) is left in the time: at N = 1 or 16 the eager times above can be the
    host's, not the kernels'. A contender that cannot be captured is left out (printed)."""
    graphs = {}
    for name, fn in fns.items():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                for _ in range(calls):
                    fn()
        except Exception as e:  # noqa: BLE001
            print(f"{name}: not timed in a CUDA graph ({type(e).__name__}: {str(e)[:160]})", flush=True)
            continue
        graphs[name] = g
    samples = {name: [] for name in graphs}
    names = list(graphs)
    for r in range(reps):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs[name].replay()
            b.record()
            b.synchronize()
            samples[name].append(a.elapsed_time(b) / calls)
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


def speed(dtype, n, sparsity):
    x, w, mask, b, p, t, vals = problem(n, SIZE, SIZE, sparsity, dtype, seed=1)
    x = x.to(DEVICE)
    wm = torch.where(mask, w, torch.zeros((), dtype=dtype)).to(DEVICE)
    tv = vals[t.tile_src.long()]
    fns = {
        "cuBLAS dense": lambda: x @ wm.t(),
        "ours warp (csr_linear)": common.with_env(  # pinned: the small-N kernel has its own row
            SMALL_N_ENV, "0", lambda: torch.ops.pyfinetune.csr_linear(x, vals, p.crow_indices, p.col_indices,
                                                                      p.row_order, None)),
        # pinned to one part: the split over K (auto) is the default since 2026-11-29 and has its column
        "ours tensor cores": with_split_k(
            lambda: torch.ops.pyfinetune.tiled_csr_linear(x, tv, t.tile_ptr, t.tile_loc, SIZE, None), 1),
        "ours tensor cores, async": with_async(with_split_k(
            lambda: torch.ops.pyfinetune.tiled_csr_linear(x, tv, t.tile_ptr, t.tile_loc, SIZE, None), 1)),
        "ours tensor cores, split K": with_split_k(
            lambda: torch.ops.pyfinetune.tiled_csr_linear(x, tv, t.tile_ptr, t.tile_loc, SIZE, None)),
    }
    if n <= 16:  # PYFINETUNE_CSR_CUDA_SMALL_N=1: the lanes over each row's nonzeros, x read in place
        fns["ours small-N kernel"] = common.with_env(
            SMALL_N_ENV, "1", lambda: torch.ops.pyfinetune.csr_linear(x, vals, p.crow_indices, p.col_indices,
                                                                      p.row_order, None))
    eager, graph = time_ms(fns), {}
    if DEVICE == "cuda":
        try:
            graph = graph_time_ms(fns)
        except Exception as e:  # noqa: BLE001 (the eager times stand on their own)
            print(f"CUDA graph timing N={n} {sparsity}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return eager, graph


def backward_breakdown(dtype, n=256, sparsity=0.9):
    """ms per call of each product of a training step, ours against cuBLAS: dx = dy @ W and the
    weight gradient (dense dW = dy^T @ x; ours: dvalues at the kept positions only)."""
    x, w, mask, b, p, t, vals = problem(n, SIZE, SIZE, sparsity, dtype, seed=2)
    x = x.to(DEVICE)
    dy = torch.randn(n, SIZE, dtype=dtype, device=DEVICE)
    wm = torch.where(mask, w, torch.zeros((), dtype=dtype)).to(DEVICE)
    bwd = torch.ops.pyfinetune.csr_linear_backward
    pat = (p.crow_indices, p.col_indices, p.row_order, p.ccol_indices, p.row_indices, p.csc_to_csr)
    tv = vals[t.tile_src.long()]
    fns = {
        "dx cuBLAS (dy @ W)": lambda: dy @ wm,
        "dx ours (csr_linear_backward, CSC SpMM)": lambda: bwd(dy, x, vals, *pat, [True, False, False]),
        "dx ours tensor cores (tiled_csr_linear_backward_input)":
            lambda: torch.ops.pyfinetune.tiled_csr_linear_backward_input(dy, tv, t.tile_ptr, t.tile_loc, SIZE),
        "dx ours tensor cores, async (PYFINETUNE_TILED_CUDA_ASYNC=1)": with_async(
            lambda: torch.ops.pyfinetune.tiled_csr_linear_backward_input(dy, tv, t.tile_ptr, t.tile_loc, SIZE)),
        "dW cuBLAS (dy^T @ x)": lambda: dy.t() @ x,
        "dvalues ours (SDDMM)": lambda: bwd(dy, x, vals, *pat, [False, True, False]),
        "dvalues ours tensor cores (tiled_csr_linear_backward_values)":
            lambda: torch.ops.pyfinetune.tiled_csr_linear_backward_values(dy, x, t.tile_ptr, t.tile_loc, t.tile_src),
    }
    return time_ms(fns)


def table_row(dtype, n, sparsity, ms):
    """A markdown row of per-call times: cuBLAS, then each of ours with cuBLAS / ours (>1: ours faster);
    '-' for a contender missing from ms."""
    d = ms.get("cuBLAS dense")
    cells = []
    for name in ("ours warp (csr_linear)", "ours tensor cores", "ours tensor cores, async", "ours tensor cores, split K",
                 "ours small-N kernel"):
        v = ms.get(name)
        cells.append(f"{v:.4f} ({d / v:.2f}x)" if v is not None and d is not None else "-")
    return f"| {str(dtype)[6:]} | {n} | {sparsity:.0%} | {d:.4f} | " + " | ".join(cells) + " |"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a smoke test of this script (the CPU kernel of the op), not a measurement")
    ap.add_argument("--size", type=int, default=4096, help="K = M of the timed cases (default 4096)")
    args = ap.parse_args()
    global DEVICE, SIZE
    DEVICE, SIZE = args.device, args.size
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke test)"
    print(f"{where}, torch {torch.__version__}", flush=True)
    for dtype in (torch.float16, torch.bfloat16):
        dn = str(dtype).replace("torch.", "")
        for (n, k, m, s) in ((1, 1, 1, 0.0), (64, 64, 128, 0.9), (65, 130, 129, 0.9), (256, 4096, 4096, 0.9),
                             (300, 1000, 517, 0.99), (7, 13, 300, 0.5), (100, 200, 260, 0.0), (130, 640, 256, 0.5),
                             (2, 4096, 11, 1.0)):
            if DEVICE == "cpu" and n * k * m > 2**24:
                continue
            run(f"{dn} {n}x{k}x{m} sparsity {s}", correctness(n, k, m, s, dtype))
        run(f"{dn} no bias", correctness(70, 96, 200, 0.9, dtype, bias=False))
        for (n, k, m, s) in ((1, 1, 1, 0.0), (65, 130, 129, 0.9), (256, 4096, 4096, 0.9), (70, 200, 300, 0.0),
                             (33, 64, 517, 0.99), (7, 13, 300, 0.5)):
            if DEVICE == "cpu" and n * k * m > 2**24:
                continue
            run(f"{dn} input gradient {n}x{k}x{m} sparsity {s}", correctness_dx(n, k, m, s, dtype))
            run(f"{dn} values gradient {n}x{k}x{m} sparsity {s}", correctness_dv(n, k, m, s, dtype))
        run(f"{dn} row-sliced x (row stride 4120, start 16 bytes in)", correctness(70, 4096, 200, 0.9, dtype,
                                                                                   x_view="row-sliced"))
        # The asynchronous pipeline (PYFINETUNE_TILED_CUDA_ASYNC=1): 1 to 64 steps, empty and
        # overflowing tiles, both plain and cp.async x.
        for (n, k, m, s) in ((1, 1, 1, 0.0), (65, 130, 129, 0.9), (256, 4096, 4096, 0.9), (300, 1000, 517, 0.99),
                             (7, 13, 300, 0.5), (100, 200, 260, 0.0), (2, 4096, 11, 1.0)):
            if DEVICE == "cpu" and n * k * m > 2**24:
                continue
            run(f"{dn} async {n}x{k}x{m} sparsity {s}", with_async(correctness(n, k, m, s, dtype)))
            run(f"{dn} async input gradient {n}x{k}x{m} sparsity {s}", with_async(correctness_dx(n, k, m, s, dtype)))
        # The forward with its K split (PYFINETUNE_TILED_CUDA_SPLIT_K): one tile, parts of one and
        # of several tiles, a shorter last part, M not a multiple of 4, several 64-row blocks.
        for (n, k, m, s), parts in (((1, 1, 1, 0.0), "auto"), ((65, 130, 129, 0.9), 2), ((256, 4096, 4096, 0.9), "auto"),
                                    ((256, 4096, 4096, 0.9), 64), ((300, 1000, 517, 0.99), 3), ((1, 4096, 4096, 0.9), "auto"),
                                    ((16, 4096, 4096, 0.9), "auto"), ((100, 200, 260, 0.0), 3)):
            if DEVICE == "cpu" and n * k * m > 2**24:
                continue
            run(f"{dn} split K {parts} {n}x{k}x{m} sparsity {s}", with_split_k(correctness(n, k, m, s, dtype), parts))
        run(f"{dn} split K 3, no bias", with_split_k(correctness(70, 640, 200, 0.9, dtype, bias=False), 3))
        # Both variables at once: the asynchronous pipeline starting mid-row at a part's
        # first tile (1000 columns, 16 tiles: 3 asked give 6 + 6 + 4 tiles, 7 asked 5 x 3 + 1).
        for parts in (3, 7):
            run(f"{dn} async + split K {parts} 70x1000x130 sparsity 0.9",
                with_async(with_split_k(correctness(70, 1000, 130, 0.9, dtype), parts)))
    if failures:
        print(f"{len(failures)} correctness case(s) FAILED: {failures}; timing anyway", flush=True)
    else:
        print("correctness: all OK", flush=True)
    rows, graph_rows = [], []
    for dtype in (torch.float16, torch.bfloat16):
        for n, sparsities in ((256, (0.5, 0.7, 0.9, 0.95, 0.99)), (2048, (0.9, 0.99)), (1, (0.5, 0.9, 0.99)),
                              (16, (0.9, 0.99))):
            for s in sparsities:
                t0 = time.time()
                try:
                    ms, gms = speed(dtype, n, s)
                except Exception as e:  # noqa: BLE001
                    print(f"timing {dtype} N={n} {s}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                rows.append(table_row(dtype, n, s, ms))
                print(rows[-1], f"[{time.time() - t0:.1f} s]", flush=True)
                if "cuBLAS dense" in gms:
                    graph_rows.append(table_row(dtype, n, s, gms))
                    print("graph", graph_rows[-1], flush=True)
    brk = []
    for dtype in (torch.float16, torch.bfloat16):
        try:
            ms = backward_breakdown(dtype)
        except Exception as e:  # noqa: BLE001
            print(f"backward breakdown {dtype}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        brk += [f"| {str(dtype)[6:]} | {name} | {v:.4f} |" for name, v in ms.items()]
        print("\n".join(brk[-len(ms):]), flush=True)
    md = ["# tiled_csr_linear quick check", "",
          f"{where}, torch {torch.__version__}; x [N, {SIZE}], W [{SIZE}, {SIZE}] random "
          "sparsity; median ms per call of 15 samples of 20 back-to-back calls; (ratio) = cuBLAS / ours, >1 = ours "
          "faster", "",
          "| dtype | N | sparsity | cuBLAS dense ms | ours warp ms (PYFINETUNE_CSR_CUDA_SMALL_N=0) | ours tensor cores "
          "ms (PYFINETUNE_TILED_CUDA_SPLIT_K=1) | ours tensor cores, async pipeline ms (PYFINETUNE_TILED_CUDA_ASYNC=1, "
          "SPLIT_K=1) | ours tensor cores, split K ms (PYFINETUNE_TILED_CUDA_SPLIT_K=auto, the default) "
          "| ours small-N kernel ms (PYFINETUNE_CSR_CUDA_SMALL_N=1) |",
          "|---|---|---|---|---|---|---|---|---|", *rows, "",
          *([f"GPU time per call, host overhead removed: the same 20 calls captured in a CUDA graph and replayed "
             "(median of 15 replays); where these are much lower than above, the host set the pace there:", "",
             "| dtype | N | sparsity | cuBLAS dense ms | ours warp ms | ours tensor cores ms | ours tensor cores, "
             "async pipeline ms | ours tensor cores, split K ms | ours small-N kernel ms |",
             "|---|---|---|---|---|---|---|---|---|", *graph_rows, ""]
            if graph_rows else []),
          "The backward's products at N = 256, 90% (where a training step's time goes):", "",
          "| dtype | product | ms per call |", "|---|---|---|", *brk, "",
          f"correctness: {'all OK' if not failures else 'FAILED: ' + ', '.join(failures)}"]
    print("\n".join(md))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"prune-tc-quick-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.md"), "w") as f:
            f.write("\n".join(md) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
