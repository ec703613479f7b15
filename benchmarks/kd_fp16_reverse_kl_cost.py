"""What a float16 student with divergence="reverse_kl" costs now that kd_loss keeps its gradient in
float32 (the README's "float16 and reverse_kl" paragraph):

    python benchmarks/kd_fp16_reverse_kl_cost.py [--rows 512] [--vocab 32000] [--reps 15] [--device cpu]

Forward + backward of ``kd_loss(student, teacher, divergence="reverse_kl")`` (T = 1, no labels,
batchmean) on float16 logits ~ N(0, 9), timed interleaved in one process (common.time_interleaved)
against the float16 kept gradient it replaced (the same kernels called on the float16 student,
through the eager path kd_loss used before) and torch's composition in float32. Prints the median
ms of each and the ratios; writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from pyfinetune import losses  # noqa: E402
from pyfinetune.benchmarks import common  # noqa: E402
from pyfinetune.benchmarks.common import Contender  # noqa: E402

OPTIONS = (1.0, 0.5, "reverse_kl", 0.5, -100)  # temperature, alpha, divergence, beta, ignore_index


def contenders(s: torch.Tensor, t: torch.Tensor) -> list:
    def float32_gradient():  # kd_loss today
        x = s.clone().requires_grad_()
        losses.kd_loss(x, t, temperature=OPTIONS[0], divergence="reverse_kl").backward()

    def float16_gradient():  # what kd_loss ran before: the kernels on the float16 student
        x = s.clone().requires_grad_()
        losses._kd_eager(losses._KD_FWD, x, (t, None), None, OPTIONS, "batchmean").backward()

    def torch_composition():
        x = s.clone().requires_grad_()
        log_q = torch.log_softmax(x.float() / OPTIONS[0], -1)
        log_p = torch.log_softmax(t.float() / OPTIONS[0], -1)
        torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean").backward()

    return [Contender("kd_loss, float32 gradient", float32_gradient),
            Contender("float16 kept gradient (before)", float16_gradient),
            Contender("torch composition", torch_composition)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(args.rows, args.vocab, generator=g) * 3).half().to(device)
    t = (torch.randn(args.rows, args.vocab, generator=g) * 3).half().to(device)
    timings = common.time_interleaved(contenders(s, t), reps=args.reps, device=device)
    ours = timings["kd_loss, float32 gradient"].median
    print(f"{args.rows} x {args.vocab} float16, reverse_kl, forward + backward on {device} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads), median of {args.reps}:")
    for name, timing in timings.items():
        print(f"  {name:32s} {timing.median:8.2f} ms  [{timing.p20:.2f} .. {timing.p80:.2f}]  "
              f"kd_loss / this: {ours / timing.median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
