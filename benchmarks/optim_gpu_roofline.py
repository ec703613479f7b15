"""What an H100 moves for the optimizer's access mix, next to our step (a GPU check, a minute).

    python benchmarks/optim_gpu_roofline.py [--tensors 256] [--numel 1048576] [--reps 20] [--out DIR]

Issue #2's GPU target compares our AdamW + L2-SP step's effective bandwidth with a device copy (one
read stream, one write stream). The step reads five streams (parameter, gradient, two moments,
anchor) and writes three: this script times, in the same interleaved rounds, Triton kernels that
do exactly that mix over flat buffers with trivial arithmetic (the best a streaming kernel of that
shape reaches on this GPU), the three-read / two-write mix of SGD with momentum, the copy, and our
fused AdamW + L2-SP and SGD + L2-SP steps over ``--tensors`` tensors of ``--numel`` float32 each.
Our steps run once per CUDA kernel layout each round (``PYFINETUNE_OPTIM_CUDA_LAYOUT`` = classic,
the default; wide: 16 elements per thread in blocks of 256; flat: resident blocks over 2048-element
pieces of the tensors laid end to end, so that the blocks running at once touch neighbouring
memory as the Triton kernel's do; both experimental until measured here), and AdamW once more with its cached step plan run from Python (``PYFINETUNE_OPTIM_NATIVE_PLAN=0``,
how every step ran before the plan moved to C++: its host work, billed to a single call). It reports each one's GB/s and ours as a fraction of the copy and of its own mix, timed
one call per sample and again five calls back to back (a step's host work then overlaps the
previous step's kernels, as in training; one call bills it to the step). Needs Triton
(shipped with PyTorch's CUDA wheels). Writes optim-roofline-cuda-*.md / .json to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import pyfinetune  # noqa: E402
from pyfinetune.benchmarks import common  # noqa: E402
from pyfinetune.benchmarks.common import Contender  # noqa: E402

LAYOUT_ENV = "PYFINETUNE_OPTIM_CUDA_LAYOUT"
NATIVE_PLAN_ENV = "PYFINETUNE_OPTIM_NATIVE_PLAN"
BACK_TO_BACK = 5  # calls per sample of the second timing


def triton_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def mix_5r3w(p, g, m, v, a, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        pv = tl.load(p + offs, mask=mask)
        gv = tl.load(g + offs, mask=mask)
        mv = tl.load(m + offs, mask=mask)
        vv = tl.load(v + offs, mask=mask)
        av = tl.load(a + offs, mask=mask)
        mv = 0.9 * mv + 0.1 * gv
        vv = 0.999 * vv + 0.001 * gv * gv
        pv = pv - 1e-3 * (mv / (tl.sqrt(vv) + 1e-8) + 1e-2 * (pv - av))
        tl.store(p + offs, pv, mask=mask)
        tl.store(m + offs, mv, mask=mask)
        tl.store(v + offs, vv, mask=mask)

    @triton.jit
    def mix_3r2w(p, g, b, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        pv = tl.load(p + offs, mask=mask)
        gv = tl.load(g + offs, mask=mask)
        bv = tl.load(b + offs, mask=mask)
        bv = 0.9 * bv + gv
        tl.store(p + offs, pv - 1e-3 * bv, mask=mask)
        tl.store(b + offs, bv, mask=mask)

    return triton, mix_5r3w, mix_3r2w


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=256)
    ap.add_argument("--numel", type=int, default=2**20)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--block", type=int, default=2048, help="elements per Triton program")
    ap.add_argument("--out", default=common.RESULTS_DIR)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    try:
        triton, mix_5r3w, mix_3r2w = triton_kernels()
    except Exception as e:  # noqa: BLE001
        print(f"needs Triton: {type(e).__name__}: {e}")
        return 2
    n = args.tensors * args.numel
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(count, std=1.0):
        return torch.randn(count, generator=gen, device=dev).mul_(std)

    flat = {k: rnd(n, 0.05) for k in ("p", "g", "m", "v", "a")}
    flat["v"].abs_()
    grid = (triton.cdiv(n, args.block),)
    src, dst = rnd(2 * n), torch.empty(2 * n, device=dev)

    # our steps over a list of tensors, as a model's parameters are
    params = [rnd(args.numel, 0.05) for _ in range(args.tensors)]
    grads = [rnd(args.numel, 1e-3) for _ in range(args.tensors)]
    for p, g in zip(params, grads):
        p.grad = g
    anchors = [p + rnd(args.numel, 1e-3) for p in params]
    adamw = pyfinetune.optim.AdamW(params, lr=1e-4, weight_decay=0.0, l2sp=1e-2, anchor=anchors)
    sgd_params = [p.clone() for p in params]
    for p, g in zip(sgd_params, grads):
        p.grad = g
    sgd = pyfinetune.optim.SGD(sgd_params, lr=1e-4, momentum=0.9, l2sp=1e-2, anchor=[a.clone() for a in anchors])
    adamw_params = [p.clone() for p in params]
    for p, g in zip(adamw_params, grads):
        p.grad = g
    adamw_py = pyfinetune.optim.AdamW(adamw_params, lr=1e-4, weight_decay=0.0, l2sp=1e-2,
                                      anchor=[a.clone() for a in anchors])
    adamw.step()
    sgd.step()  # states allocated before timing
    common.with_env(NATIVE_PLAN_ENV, "0", adamw_py.step)()

    def with_layout(layout, step):
        return common.with_env(LAYOUT_ENV, layout, step)

    contenders = [
        (Contender("copy", lambda: dst.copy_(src)), 2 * 8 * n, "1 read + 1 write stream of 2n fp32"),
        (Contender("triton 5 read / 3 write (AdamW + L2-SP mix)",
                   lambda: mix_5r3w[grid](flat["p"], flat["g"], flat["m"], flat["v"], flat["a"], n,
                                          BLOCK=args.block)), 32 * n, "flat buffers"),
        (Contender("ours AdamW + L2-SP", with_layout("classic", adamw.step)), 32 * n, f"{args.tensors} tensors"),
        (Contender("ours AdamW + L2-SP, wide layout", with_layout("wide", adamw.step)), 32 * n,
         f"{args.tensors} tensors, experimental"),
        (Contender("ours AdamW + L2-SP, flat layout", with_layout("flat", adamw.step)), 32 * n,
         f"{args.tensors} tensors, experimental: resident blocks over 2048-element pieces end to end"),
        (Contender("ours AdamW + L2-SP, step plan in Python",
                   common.with_env(NATIVE_PLAN_ENV, "0", adamw_py.step)), 32 * n,
         f"{args.tensors} tensors, {NATIVE_PLAN_ENV}=0 (the host work of a step before the C++ plan)"),
        (Contender("triton 3 read / 2 write (SGD momentum mix)",
                   lambda: mix_3r2w[grid](flat["p"], flat["g"], flat["m"], n, BLOCK=args.block)), 20 * n,
         "flat buffers"),
        (Contender("ours SGD + L2-SP (4 read / 2 write)", with_layout("classic", sgd.step)), 24 * n,
         f"{args.tensors} tensors"),
        (Contender("ours SGD + L2-SP, wide layout", with_layout("wide", sgd.step)), 24 * n,
         f"{args.tensors} tensors, experimental"),
        (Contender("ours SGD + L2-SP, flat layout", with_layout("flat", sgd.step)), 24 * n,
         f"{args.tensors} tensors, experimental"),
    ]
    for c, _, _ in contenders:
        c.fn()  # Triton compiles here, not in the timed rounds
    timings = common.time_interleaved([c for c, _, _ in contenders], reps=args.reps, device=dev)
    # Again with BACK_TO_BACK calls per sample: a step's host work (the plan check, the launch
    # arguments of every tensor) then overlaps the previous step's kernels, as in training, where
    # the host runs ahead of the GPU; a single call bills it to the GPU's time.
    streamed = common.time_interleaved([c for c, _, _ in contenders], reps=args.reps, device=dev,
                                       calls_per_rep=BACK_TO_BACK)
    gbps = {c.name: nbytes / (timings[c.name].median * 1e6) for c, nbytes, _ in contenders}
    gbps_streamed = {c.name: nbytes / (streamed[c.name].median * 1e6) for c, nbytes, _ in contenders}
    rows = [[c.name, f"{timings[c.name].median:.3f}", f"{timings[c.name].p20:.3f}", f"{timings[c.name].p80:.3f}",
             f"{gbps[c.name]:.0f}", f"{gbps[c.name] / gbps['copy']:.2f}", f"{streamed[c.name].median:.3f}",
             f"{gbps_streamed[c.name] / gbps_streamed['copy']:.2f}", note] for c, _, note in contenders]
    mix = "triton 5 read / 3 write (AdamW + L2-SP mix)"
    ratios = {"ours_adamw_l2sp_over_copy": gbps["ours AdamW + L2-SP"] / gbps["copy"],
              "ours_adamw_l2sp_over_its_mix": gbps["ours AdamW + L2-SP"] / gbps[mix],
              "its_mix_over_copy": gbps[mix] / gbps["copy"],
              "ours_adamw_l2sp_wide_over_classic": gbps["ours AdamW + L2-SP, wide layout"] / gbps["ours AdamW + L2-SP"],
              "ours_sgd_l2sp_wide_over_classic": (gbps["ours SGD + L2-SP, wide layout"]
                                                  / gbps["ours SGD + L2-SP (4 read / 2 write)"]),
              "ours_adamw_l2sp_flat_over_classic": gbps["ours AdamW + L2-SP, flat layout"] / gbps["ours AdamW + L2-SP"],
              "ours_sgd_l2sp_flat_over_classic": (gbps["ours SGD + L2-SP, flat layout"]
                                                  / gbps["ours SGD + L2-SP (4 read / 2 write)"]),
              "ours_adamw_l2sp_flat_over_its_mix": gbps["ours AdamW + L2-SP, flat layout"] / gbps[mix],
              "ours_adamw_l2sp_native_plan_over_python_plan": (gbps["ours AdamW + L2-SP"]
                                                                / gbps["ours AdamW + L2-SP, step plan in Python"]),
              "back_to_back_ours_adamw_l2sp_over_its_mix": gbps_streamed["ours AdamW + L2-SP"] / gbps_streamed[mix],
              "back_to_back_ours_adamw_l2sp_over_copy": gbps_streamed["ours AdamW + L2-SP"] / gbps_streamed["copy"]}
    info = common.machine_info(dev)
    md = "\n".join([
        f"# Optimizer access mix on the GPU: {args.tensors} x {args.numel} fp32 ({n / 1e6:.0f}M)", "",
        common.machine_summary(info), "", f"triton {triton.__version__}, {args.block} elements per program; "
        f"medians of {args.reps} interleaved rounds", "",
        common.markdown_table(["contender", "median ms", "p20", "p80", "GB/s", "/ copy",
                               f"ms, {BACK_TO_BACK} back to back", "/ copy, back to back", "note"], rows), "",
        common.markdown_table(["ratio", "value"], [[k, f"{v:.3f}"] for k, v in ratios.items()]), ""])
    print(md)
    record = {"machine": info, "tensors": args.tensors, "numel": args.numel, "triton": triton.__version__,
              "timings": {k: t.summary() for k, t in timings.items()}, "gbps": gbps, "ratios": ratios,
              "back_to_back": BACK_TO_BACK, "timings_back_to_back": {k: t.summary() for k, t in streamed.items()},
              "gbps_back_to_back": gbps_streamed}
    print("wrote", *common.write_results("optim-roofline", dev, record, md, out_dir=args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
