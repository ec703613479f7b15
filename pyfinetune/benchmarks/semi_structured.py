"""2:4 sparse tensor cores against the dense product (GPU only, compute capability >= 8.0).

    python benchmarks/bench_semi_structured.py                 # 8192 x 8192 weight, batches 2048 and 8192
    python benchmarks/bench_semi_structured.py --quick         # fewer rounds, a smoke test
    python benchmarks/bench_semi_structured.py --shape 512 4096 4096   # your layer: rows, out, in

Contenders, interleaved round-robin (``common.time_interleaved``), forward only (the 2:4 weight of
``SemiStructuredLinear`` is frozen):
  * ``dense``: ``F.linear(x, w_pruned, b)`` with the 2:4-pruned weight stored dense (cuBLAS);
  * ``ours 2:4``: ``pyfinetune._semi_structured.SemiStructuredLinear`` (PyTorch's semi-structured
    sparse tensor, cuSPARSELt / CUTLASS), as built;
  * ``ours 2:4 tuned``: the same after ``SemiStructuredLinear.tune(N)`` (the fastest cuSPARSELt
    algorithm for this batch, timed on this GPU; PyTorch's default is algorithm 0 whatever the
    shapes);
  * ``torchao 2:4``: when torchao is installed, an ``nn.Linear`` holding the pruned weight after
    ``torchao.sparsity.sparsify_(layer, SemiSparseWeightConfig())``, torchao's 2:4 inference path
    (a rival named in the developers' brief; its output is checked against the dense product
    before it is timed, and a failure to build it is reported, not fatal).
Target (issue #4): 2:4 at least 1.2x the dense product at 8192 x 8192 (fp16, H100).
Results: ``benchmarks/results/semi24-cuda-<stamp>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from pyfinetune._semi_structured import SemiStructuredLinear

from . import common
from .common import Contender

TARGET = 1.2
DEFAULT_SHAPES = ((8192, 8192, 8192), (2048, 8192, 8192))  # (rows of x, out features, in features)
TORCHAO = "torchao 2:4"


def _torchao_version() -> Optional[str]:
    try:
        from importlib.metadata import version
        return version("torchao")
    except Exception:
        return None


def torchao_two_four(w_pruned: torch.Tensor, b: Optional[torch.Tensor]):
    """``(layer, None)``: an ``nn.Linear`` of ``w_pruned`` / ``b`` sparsified by torchao's
    ``sparsify_(..., SemiSparseWeightConfig())``; or ``(None, why)`` when torchao is missing or
    refuses (torchao 0.18 defines the config in ``torchao.sparsity.sparse_api`` and exports it from
    ``torchao.sparsity`` only as ``semi_sparse_weight``; both places are tried)."""
    try:
        from torchao.sparsity import sparsify_
        try:
            from torchao.sparsity.sparse_api import SemiSparseWeightConfig as config
        except ImportError:
            from torchao.sparsity import semi_sparse_weight as config
    except Exception as e:  # ImportError, or a torchao built for another torch failing at import
        return None, f"torchao not importable ({type(e).__name__}: {e})"
    layer = torch.nn.Linear(w_pruned.shape[1], w_pruned.shape[0], bias=b is not None,
                            device=w_pruned.device, dtype=w_pruned.dtype)
    with torch.no_grad():
        layer.weight.copy_(w_pruned)
        if b is not None:
            layer.bias.copy_(b)
    layer.requires_grad_(False)
    try:
        sparsify_(layer, config())
    except Exception as e:
        return None, f"torchao sparsify_ failed ({type(e).__name__}: {e})"
    return layer, None


def two_four_mask(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every 4 consecutive inputs."""
    groups = w.abs().reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep.reshape(w.shape)


def run_case(n: int, m: int, k: int, dtype: torch.dtype, reps: int, warmup: int, device: torch.device):
    torch.manual_seed(0)
    w = torch.randn(m, k, device=device, dtype=dtype) / k ** 0.5
    mask = two_four_mask(w)
    w_pruned = torch.where(mask, w, torch.zeros((), device=device, dtype=dtype))
    b = torch.randn(m, device=device, dtype=dtype)
    x = torch.randn(n, k, device=device, dtype=dtype)
    layer = SemiStructuredLinear.from_dense(w, mask, b)
    tuned = SemiStructuredLinear.from_dense(w, mask, b)
    tune = tuned.tune(n)
    ao, ao_note = torchao_two_four(w_pruned, b)
    with torch.no_grad():
        ref = F.linear(x, w_pruned, b).float()
        err = max((layer(x).float() - ref).abs().max().item(), (tuned(x).float() - ref).abs().max().item())
        if ao is not None:
            try:
                ao_err = (ao(x).float() - ref).abs().max().item()
            except Exception as e:
                ao, ao_note = None, f"torchao's layer failed ({type(e).__name__}: {e})"
            else:
                if not ao_err <= 2 * err + 1e-2:  # the same product; NaN refused too
                    ao, ao_note = None, f"torchao's output differs from the dense product by {ao_err:.3g}: not timed"
    contenders = [
        Contender("dense", lambda: F.linear(x, w_pruned, b)),
        Contender("ours 2:4", lambda: layer(x)),
        Contender("ours 2:4 tuned", lambda: tuned(x)),
    ]
    if ao is not None:
        contenders.append(Contender(TORCHAO, lambda: ao(x)))
    with torch.no_grad():
        timings = common.time_interleaved(contenders, reps=reps, warmup=warmup, device=device, calls_per_rep=5)
    ratio = timings["dense"].median / timings["ours 2:4"].median
    return timings, ratio, err, tune, ao_note


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--device", choices=("cuda",), default="cuda", help="GPU only")
    ap.add_argument("--out", default=common.RESULTS_DIR, help=f"results folder (default {common.RESULTS_DIR})")
    ap.add_argument("--shape", nargs=3, type=int, action="append", metavar=("ROWS", "OUT", "IN"),
                    help="a product to time instead of the defaults (8192 and 2048 rows of an 8192 x 8192 "
                         "weight): x [ROWS, IN] against a weight [OUT, IN]; repeat for more. 2:4 pays off "
                         "for large ROWS only: time the batch your model runs")
    args = ap.parse_args(argv)
    shapes = [tuple(sh) for sh in args.shape] if args.shape else list(DEFAULT_SHAPES)
    for rows, out_f, in_f in shapes:
        if min(rows, out_f, in_f) < 1:
            ap.error(f"--shape: ROWS, OUT and IN must be positive, got {rows} {out_f} {in_f}")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        ap.error("needs a CUDA GPU with compute capability >= 8.0 (2:4 sparse tensor cores)")
    error = None if args.no_write else common.out_dir_error(args.out)  # before the timing, not after it
    if error:
        ap.error(error)
    device = torch.device("cuda")
    reps, warmup = (10, 2) if args.quick else (30, 5)
    info = common.machine_info(device)
    _, when = common.timestamp()
    lines = ["# 2:4 semi-structured linear vs dense (cuda)", "", common.machine_summary(info), "",
             f"{reps} timed rounds of 5 calls after {warmup} warm-up rounds, interleaved; ratio = dense median / ours.",
             "", "| x [N, K] | weight [M, K] | dtype | dense ms | ours 2:4 ms | ratio | tuned ms (algorithm) | tuned ratio | "
             "torchao 2:4 ms | tuned vs torchao | max abs diff | target | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    record = {"benchmark": "semi24", "device": device.type, "when": when, "machine": info,
              "config": {"reps": reps, "warmup": warmup, "quick": args.quick, "calls_per_rep": 5, "target": TARGET,
                         "torchao": _torchao_version()},
              "cases": []}
    for n, m, k in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            try:
                timings, ratio, err, tune, ao_note = run_case(n, m, k, dtype, reps, warmup, device)
            except ValueError as e:  # a shape PyTorch's 2:4 tensors cannot take (SemiStructuredLinear says why)
                print(f"x [{n}, {k}], weight [{m}, {k}] {dtype}: {e}", file=sys.stderr)
                return 2
            d, o, t = timings["dense"], timings["ours 2:4"], timings["ours 2:4 tuned"]
            ao = timings.get(TORCHAO)
            tuned_ratio = d.median / t.median
            if ao_note and ao_note not in notes:
                notes.append(ao_note)
            status = ("MET" if ratio >= TARGET else
                      "MET with tune()" if tuned_ratio >= TARGET else "NOT MET")
            alg = "default" if tune["alg_id"] is None else f"alg {tune['alg_id']} of {len(tune['ms'])}"
            lines.append(f"| [{n}, {k}] | [{m}, {k}] | {str(dtype).replace('torch.', '')} | {d.median:.3f} | "
                         f"{o.median:.3f} | {ratio:.2f}x | {t.median:.3f} ({alg}) | {tuned_ratio:.2f}x | "
                         f"{'-' if ao is None else f'{ao.median:.3f}'} | "
                         f"{'-' if ao is None else f'{ao.median / t.median:.2f}x'} | {err:.3g} | "
                         f">= {TARGET}x | {status} |")
            record["cases"].append({"n": n, "m": m, "k": k, "dtype": str(dtype), "ratio": ratio,
                                    "tuned_ratio": tuned_ratio, "tune": {"backend": tune["backend"],
                                                                         "alg_id": tune["alg_id"],
                                                                         "ms": {str(a): v for a, v in tune["ms"].items()}},
                                    "max_abs_diff": err, "dense": d.summary(), "ours": o.summary(),
                                    "ours_tuned": t.summary(),
                                    "torchao": None if ao is None else ao.summary(), "torchao_note": ao_note})
            print(lines[-1], flush=True)
    lines += ["", f"torchao 2:4 (torchao {_torchao_version() or 'not installed'}): "
              "`torchao.sparsity.sparsify_(nn.Linear, SemiSparseWeightConfig())` on the same pruned weight; "
              "tuned vs torchao = torchao ms / ours tuned ms."] + [f"- {n_}" for n_ in notes]
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.no_write:
        paths = common.write_results("semi24", device, record, md, out_dir=args.out)
        print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
