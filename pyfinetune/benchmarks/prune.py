"""Benchmark of pyfinetune's pruned linear layer (SparseLinear / csr_linear) against dense and
torch sparse products, across sparsities.

    python benchmarks/bench_prune.py                        # CPU, N=256, K=M=4096, 50..99% sparsity (~5 min)
    python benchmarks/bench_prune.py --device cuda          # GPU (the CUDA kernels must be built)
    python benchmarks/bench_prune.py --quick --sparsity 0.9 # smoke run
    python benchmarks/bench_prune.py --device cuda --dtype float16 --sparsity 0.9   # the H100 target
    python benchmarks/bench_prune.py --batch 1              # one row of x (token-by-token inference)
    python benchmarks/bench_prune.py --pattern block:16x16  # masks of whole 16 x 16 blocks, + torch BSR

Per sparsity, two groups of contenders run round-robin (``common.time_interleaved``):

* forward, ``y = x @ W^T`` with x [N, K] and W [M, K] pruned at random, both in ``--dtype``
  (float32 by default; no autograd):
  ``dense x @ w.T`` on the pre-masked dense weight, ``torch.nn.utils.prune`` (an ``nn.Linear``
  pruned with ``custom_from_mask``: torch's pruning workflow, whose hook multiplies the weight by
  its mask at every call), ``torch.sparse.mm CSR`` (W as a
  ``torch.sparse_csr`` tensor times x^T), with ``--pattern block:RxC`` ``torch.sparse.mm BSR``
  (W as ``torch.sparse_bsr`` with the pattern's blocks; torch's CPU product takes square blocks
  only, so other blocks leave it out with a note), ``ours sparse`` (SparseLinear, kernel="sparse":
  csr_linear), ``ours dense path`` (SparseLinear, kernel="dense": masked_matmul on the weight
  rebuilt from the kept values; what kernel="auto" runs below the crossover);
* training step, forward + backward (grad of x and of the weights) + optimizer step:
  ``dense + torch AdamW fused`` (a dense [M, K] parameter), ``torch.nn.utils.prune + torch AdamW
  fused`` (the same pruned ``nn.Linear``; the optimizer updates the dense ``weight_orig``), ``ours sparse + AdamW`` and ``ours
  dense path + AdamW`` (pyfinetune.optim.AdamW on the nnz kept values). torch's CSR tensors have
  no fused training path (no gradient of the CSR values through torch.sparse.mm), so no row.

Crossover: the lowest measured sparsity from which ours sparse beats the dense product (and
beats our dense path: the kernel="auto" threshold), with the sparsity where the time ratio
crosses 1 interpolated linearly between the two measured sparsities around it.
Targets (the pruning issue's): on the CPU in float32, forward >= 3x dense and >= 1.5x torch CSR and
training step >= 3x dense at 90%, forward crossover at or below 70%; on CUDA in float16, forward
>= 2x cuBLAS dense at 90%. Other device and dtype pairs report the same ratios without targets.
Results: ``benchmarks/results/prune-<device>-YYYYMMDD-HHMM.{json,md}`` (float32), else
``prune-<dtype>-<device>-...``; with ``--batch n`` other than 256, ``prune[-<dtype>]-n<n>-<device>-...``
(no targets: the issue's are at N = 256); with ``--pattern block:RxC``, ``...-blockRxC-<device>-...``
(no targets: the issue's are for random unstructured masks).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import pyfinetune
from pyfinetune._sparse_linear import SparseLinear

from . import common
from .common import Contender

# 60% and 65% resolve the crossover of SparseLinear's kernel='auto'.
KERNEL = "csr_linear"  # the op whose kernels `pyfinetune bench` needs on its device
DEFAULT_REPS = 15
SPARSITIES = (0.5, 0.6, 0.65, 0.7, 0.8, 0.9, 0.95, 0.99)
N, K, M = 256, 4096, 4096
LR = 1e-3

DENSE_FWD = "dense x @ w.T"
TORCH_CSR_FWD = "torch.sparse.mm CSR"
TORCH_BSR_FWD = "torch.sparse.mm BSR"  # block patterns only: W as torch.sparse_bsr with the pattern's blocks
OURS_FWD = "ours sparse"
OURS_DENSE_FWD = "ours dense path"
OURS_TC_FWD = "ours sparse, tensor cores"  # SparseLinear's tiled_csr_linear path (CUDA, 16-bit, sm80+)
OURS_TC_STEP = "ours sparse, tensor cores + AdamW"  # forward and input gradient on tensor cores
TC_ENV = "PYFINETUNE_CSR_CUDA_KERNEL"
DENSE_STEP = "dense + torch AdamW fused"
TORCH_PRUNE_FWD = "torch.nn.utils.prune"  # nn.Linear + custom_from_mask: weight_orig * weight_mask per call
TORCH_PRUNE_STEP = "torch.nn.utils.prune + torch AdamW fused"
OURS_STEP = "ours sparse + AdamW"
OURS_DENSE_STEP = "ours dense path + AdamW"

# Rivals reported against ours sparse at every sparsity: (group, rival, ours).
RIVALS = (("forward", TORCH_PRUNE_FWD, OURS_FWD), ("step", TORCH_PRUNE_STEP, OURS_STEP),
          ("forward", TORCH_BSR_FWD, OURS_FWD))

# (key, description, sparsity it is judged at, target), per (device type, dtype) that has targets.
CPU_TARGETS = [
    ("fwd_vs_dense", "forward: dense x @ w.T / ours sparse (time ratio, >1 = ours faster)", 0.9, 3.0),
    ("fwd_vs_torch_csr", "forward: torch.sparse.mm CSR / ours sparse", 0.9, 1.5),
    ("step_vs_dense", "fwd+bwd+AdamW step: dense + torch fused AdamW / ours sparse + AdamW", 0.9, 3.0),
]
CUDA_FP16_TARGETS = [
    ("fwd_vs_dense", "forward: dense x @ w.T (cuBLAS) / ours sparse (time ratio, >1 = ours faster)", 0.9, 2.0),
    ("fwd_tc_vs_dense", "forward: dense x @ w.T (cuBLAS) / ours sparse on tensor cores (tiled_csr_linear)", 0.9, 2.0),
]
# On CUDA each timed sample is this many back-to-back calls (per call reported): a lone call of a
# ~0.05 ms product is timed with its launch latency and the host's time to issue it, which a model's
# stream of layers overlaps; both sides get the same treatment.
CUDA_CALLS_PER_SAMPLE = {"forward": 20, "step": 5}
TARGETS = {("cpu", torch.float32): CPU_TARGETS, ("cuda", torch.float16): CUDA_FP16_TARGETS}
CROSSOVER_TARGET = 0.7  # CPU, float32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Relative bound of check_against_dense: float32 accumulation rounded once to the dtype, against a
# float64 product of the same (rounded) inputs.
CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


# --------------------------------------------------------------------------------------- inputs
def make_problem(sparsity: float, device: torch.device, seed: int = 0,
                 dtype: torch.dtype = torch.float32, n: int = N,
                 block: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """x [n, K], a weight [M, K] with a random mask keeping 1 - ``sparsity`` of it (of its
    ``block`` = (rows, cols) blocks, each kept or pruned whole, when given), an upstream gradient
    [n, M], in ``dtype``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, K, generator=gen).to(device, dtype)
    w = (torch.randn(M, K, generator=gen) * K**-0.5).to(device, dtype)
    if block is None:
        mask = torch.rand(M, K, generator=gen) >= sparsity
    else:
        rows, cols = block
        mask = (torch.rand(M // rows, K // cols, generator=gen) >= sparsity)
        mask = mask.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    grad = torch.randn(n, M, generator=gen).to(device, dtype)
    return {"x": x, "w": w, "mask": mask.to(device), "grad": grad, "block": block}


def parse_pattern(text: str) -> Optional[Tuple[int, int]]:
    """``"unstructured"`` -> None; ``"block:RxC"`` -> (R, C), R dividing M and C dividing K."""
    if text == "unstructured":
        return None
    m = re.fullmatch(r"block:(\d+)x(\d+)", text)
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f'pattern must be "unstructured" or "block:RxC" (e.g. block:16x16), got {text!r}')
    rows, cols = int(m.group(1)), int(m.group(2))
    if M % rows or K % cols:
        raise ValueError(f"pattern {text!r} must divide the {M} x {K} weight")
    return rows, cols


def reference(p: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The problem's float64 products (output, grad of x, grad of the kept values), computed once
    for all contenders and kept in ``p``."""
    if "reference" not in p:
        wm = torch.where(p["mask"], p["w"], 0.0).double()
        x64, g64 = p["x"].double(), p["grad"].double()
        p["reference"] = (x64 @ wm.t(), g64 @ wm, (g64.t() @ x64)[p["mask"]])
    return p["reference"]


def deviation(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> Tuple[float, float]:
    """(largest absolute error of ``got`` against the float64 ``want``, the bound allowed for
    ``dtype``: :data:`CHECK_RTOL` of the largest value, at least of 1)."""
    return (got.double() - want).abs().max().item(), CHECK_RTOL[dtype] * max(1.0, want.abs().max().item())


def check_against_dense(layer: SparseLinear, p: Dict[str, Any]) -> None:
    """A contender is timed only after it computed the right thing: ``layer``'s output and its
    gradients (x and the kept values, for the upstream gradient ``p["grad"]``) against the dense
    product in float64 of the same inputs, at the dtype's tolerance (:data:`CHECK_RTOL` of the
    largest value). Raises RuntimeError naming what differs."""
    x, g = p["x"], p["grad"]
    xs = x.clone().requires_grad_(True)
    with torch.enable_grad():
        y = layer(xs)
        y.backward(g)
    y_ref, dx_ref, dv_ref = reference(p)
    checks = (("output", y, y_ref), ("grad of x", xs.grad, dx_ref), ("grad of the kept values", layer.values.grad, dv_ref))
    for what, got, want in checks:
        err, bound = deviation(got, want, x.dtype)
        if not err <= bound:
            raise RuntimeError(f"pyfinetune benchmark: SparseLinear(kernel={layer.kernel!r}) {what} differs from the "
                               f"dense product by {err:.3g} (> {bound:.3g}); not timing a wrong kernel")
    layer.zero_grad(set_to_none=True)


def torch_pruned_linear(p: Dict[str, torch.Tensor]) -> torch.nn.Linear:
    """An ``nn.Linear`` holding the problem's weight, pruned by ``torch.nn.utils.prune`` with its
    mask (``custom_from_mask``: a ``weight_orig`` parameter, a mask buffer of the weight's dtype and
    a forward pre-hook that multiplies them at every call): what torch's pruning workflow runs."""
    from torch.nn.utils import prune as torch_prune

    w = p["w"]
    layer = torch.nn.Linear(K, M, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
    torch_prune.custom_from_mask(layer, "weight", p["mask"])
    return layer


def forward_contenders(p: Dict[str, torch.Tensor], ours_ok: bool, dense_path: bool = True,
                       rivals: bool = True) -> List[Contender]:
    """Forward contenders: dense, (``rivals``) torch.nn.utils.prune, torch CSR, ours sparse and
    (``dense_path``) our dense path."""
    x, w, mask = p["x"], p["w"], p["mask"]
    wm = torch.where(mask, w, 0.0)
    out = [Contender(DENSE_FWD, lambda: x @ wm.t())]
    if rivals:
        pruned = torch_pruned_linear(p)
        out.append(Contender(TORCH_PRUNE_FWD, lambda: pruned(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        w_csr = wm.to_sparse_csr()
        xt = x.t()
        try:
            torch.sparse.mm(w_csr, xt)
        except (RuntimeError, NotImplementedError) as e:  # no kernel for this dtype and device
            print(f"torch.sparse.mm CSR left out ({x.dtype}, {x.device.type}): {str(e).splitlines()[0]}",
                  file=sys.stderr, flush=True)
        else:
            out.append(Contender(TORCH_CSR_FWD, lambda: torch.sparse.mm(w_csr, xt)))
        if p.get("block") is not None:
            w_bsr = wm.to_sparse_bsr(p["block"])
            try:
                y = torch.sparse.mm(w_bsr, xt).t()
            except (RuntimeError, NotImplementedError) as e:
                print(f"torch.sparse.mm BSR left out ({x.dtype}, {x.device.type}): {str(e).splitlines()[0]}",
                      file=sys.stderr, flush=True)
            else:
                err, bound = deviation(y, reference(p)[0], x.dtype)
                if err <= bound:
                    out.append(Contender(TORCH_BSR_FWD, lambda: torch.sparse.mm(w_bsr, xt)))
                else:
                    print(f"torch.sparse.mm BSR left out ({x.dtype}, {x.device.type}): it differs from the dense "
                          f"product by {err:.3g} (> {bound:.3g})", file=sys.stderr, flush=True)
    if ours_ok:
        for name, kernel in ((OURS_FWD, "sparse"),) + (((OURS_DENSE_FWD, "dense"),) if dense_path else ()):
            layer = SparseLinear.from_dense(w, mask, kernel=kernel)
            check_against_dense(layer, p)
            out.append(Contender(name, lambda layer=layer: layer(x)))
        if tensor_cores_available(x):
            layer = SparseLinear.from_dense(w, mask, kernel="sparse")
            with torch.no_grad():
                y = layer._tiled_forward(x, layer.values, None)  # what SparseLinear runs with the opt-in
            err, bound = deviation(y, reference(p)[0], x.dtype)
            if not err <= bound:
                raise RuntimeError(f"pyfinetune benchmark: tiled_csr_linear differs from the dense product by "
                                   f"{err:.3g} (> {bound:.3g}); not timing a wrong kernel")
            out.append(Contender(OURS_TC_FWD, lambda layer=layer: layer._tiled_forward(x, layer.values, None)))
    return out


@contextlib.contextmanager
def kernel_env(value: Optional[str]):
    """PYFINETUNE_CSR_CUDA_KERNEL set to ``value`` (unset for None) inside the block."""
    saved = os.environ.get(TC_ENV)
    if value is None:
        os.environ.pop(TC_ENV, None)
    else:
        os.environ[TC_ENV] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(TC_ENV, None)
        else:
            os.environ[TC_ENV] = saved


def tensor_cores_available(x: torch.Tensor) -> bool:
    """Whether tiled_csr_linear's tensor-core kernel runs for x: CUDA, float16 / bfloat16, sm80+."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(x.device)[0] >= 8)


def step_contenders(p: Dict[str, torch.Tensor], ours_ok: bool, dense_path: bool = True,
                    rivals: bool = True) -> List[Contender]:
    """Training-step contenders: dense + torch fused AdamW, (``rivals``) torch.nn.utils.prune +
    torch fused AdamW, ours sparse and (``dense_path``) our dense path + AdamW."""
    x0, w, mask, g = p["x"], p["w"], p["mask"], p["grad"]
    out = []

    weight = torch.nn.Parameter(torch.where(mask, w, 0.0))
    x_dense = x0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([weight], lr=LR, fused=True)

    def dense_step():
        x_dense.grad = None
        (x_dense @ weight.t()).backward(g)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out.append(Contender(DENSE_STEP, dense_step))
    if rivals:
        pruned = torch_pruned_linear(p)
        x_pruned = x0.clone().requires_grad_(True)
        pruned_opt = torch.optim.AdamW(pruned.parameters(), lr=LR, fused=True)  # weight_orig, dense

        def torch_prune_step():
            x_pruned.grad = None
            pruned(x_pruned).backward(g)
            pruned_opt.step()
            pruned_opt.zero_grad(set_to_none=True)
        out.append(Contender(TORCH_PRUNE_STEP, torch_prune_step))
    if ours_ok:
        for name, kernel in ((OURS_STEP, "sparse"),) + (((OURS_DENSE_STEP, "dense"),) if dense_path else ()):
            layer = SparseLinear.from_dense(w, mask, kernel=kernel)
            check_against_dense(layer, p)
            layer_opt = pyfinetune.optim.AdamW(layer.parameters(), lr=LR)
            xs = x0.clone().requires_grad_(True)

            def ours_step(layer=layer, layer_opt=layer_opt, xs=xs):
                xs.grad = None
                layer(xs).backward(g)
                layer_opt.step()
                layer_opt.zero_grad(set_to_none=True)
            out.append(Contender(name, ours_step))
        if tensor_cores_available(x0):
            layer = SparseLinear.from_dense(w, mask, kernel="sparse")
            layer_opt = pyfinetune.optim.AdamW(layer.parameters(), lr=LR)
            xs = x0.clone().requires_grad_(True)

            with kernel_env("tensor_cores"):
                check_against_dense(layer, p)

            def tc_step(layer=layer, layer_opt=layer_opt, xs=xs):
                # The opt-in is an environment variable read at each forward; setting it here
                # bills its few microseconds to this contender.
                with kernel_env("tensor_cores"):
                    xs.grad = None
                    layer(xs).backward(g)
                layer_opt.step()
                layer_opt.zero_grad(set_to_none=True)
            out.append(Contender(OURS_TC_STEP, tc_step))
    return out


# ---------------------------------------------------------------------------------- pyfinetune bench
BENCH_SPARSITY = 0.9


def speedup_rows(device: torch.device, *, quick: bool, reps: int, warmup: int) -> List[common.Speedup]:
    """``pyfinetune bench``'s pruning rows at 90% sparsity: ``SparseLinear`` (csr_linear) forward
    against the faster of the dense product and ``torch.sparse.mm`` on CSR, and a training step
    (forward, backward, AdamW) against dense + torch fused AdamW; x [N, K] fp32, weight [M, K] with
    the script's N, K, M (256, 4096, 4096), ``quick`` or not: at smaller shapes the times are
    too short to show a sparse kernel's gain, and these take seconds. Then the forward with one row
    of x (token-by-token inference, the small-batch kernel)."""
    rows = []
    for n, groups in ((N, (("forward", OURS_FWD, forward_contenders, torch.no_grad),
                           ("train step", OURS_STEP, step_contenders, torch.enable_grad))),
                      (1, (("forward", OURS_FWD, forward_contenders, torch.no_grad),))):
        p = make_problem(BENCH_SPARSITY, device, n=n)  # float32
        shape = f"{BENCH_SPARSITY:.0%} sparse, x {n}x{K}, W {M}x{K} fp32"
        for label, ours, build, grad_mode in groups:
            contenders = build(p, True, dense_path=False, rivals=False)  # dense is the faster torch row
            with grad_mode():
                rows.append(common.measure_speedup("prune", f"SparseLinear {label}, {shape}", contenders, ours,
                                                   device=device, reps=reps, warmup=warmup))
            del contenders
            gc.collect()
    return rows


# -------------------------------------------------------------------------------------- running
def timings_summary(timings: Dict[str, common.Timing]) -> Dict[str, Dict[str, Any]]:
    return {k: t.summary() for k, t in timings.items()}


def run_sparsity(sparsity: float, device: torch.device, reps: int, warmup: int, ours_ok: bool,
                 dtype: torch.dtype = torch.float32, n: int = N, block: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    p = make_problem(sparsity, device, dtype=dtype, n=n, block=block)
    res: Dict[str, Any] = {"sparsity": sparsity, "nnz": int(p["mask"].sum())}
    with common.CpuContention() as load:
        for group, build in (("forward", forward_contenders), ("step", step_contenders)):
            contenders = build(p, ours_ok)
            with torch.no_grad() if group == "forward" else torch.enable_grad():
                calls = CUDA_CALLS_PER_SAMPLE[group] if device.type == "cuda" else 1
                t = common.time_interleaved(contenders, reps=reps, warmup=warmup, device=device, calls_per_rep=calls)
            res[group] = t
            del contenders
            gc.collect()
    res["cpu_contention"] = load.result
    return res


def run_sparsity_quietly(sparsity: float, device: torch.device, reps: int, warmup: int, attempts: int,
                         ours_ok: bool, dtype: torch.dtype = torch.float32, n: int = N,
                         block: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    best = None
    for attempt in range(1, attempts + 1):
        if device.type == "cpu" and not common.wait_for_quiet():
            print(f"[{sparsity:.0%}] the machine stayed busy; measuring anyway", file=sys.stderr, flush=True)
        res = run_sparsity(sparsity, device, reps, warmup, ours_ok, dtype, n, block)
        share = res["cpu_contention"].get("other_share") or 0.0
        if best is None or share < (best["cpu_contention"].get("other_share") or 0.0):
            best = res
        best["attempts"] = attempt
        print(f"[{sparsity:.0%}] attempt {attempt}: other processes took {100 * share:.1f}% of the CPUs",
              file=sys.stderr, flush=True)
        if device.type != "cpu" or not common.is_contended(res["cpu_contention"]):
            break
    return best


def crossover(results: List[Dict[str, Any]], group: str, num: str, den: str) -> Dict[str, Any]:
    """Lowest measured sparsity from which den (ours) is faster than num at every higher measured
    sparsity, and the sparsity where the time ratio num/den crosses 1, interpolated linearly."""
    pts = [(r["sparsity"], r[group][num].median / r[group][den].median) for r in results
           if num in r[group] and den in r[group]]
    pts.sort()
    measured, interpolated = common.ratio_crossover(pts)
    return {"measured": measured, "interpolated": interpolated, "points": pts}


def analyse(results: List[Dict[str, Any]], device_type: str = "cpu",
            dtype: torch.dtype = torch.float32, n: int = N, block: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """Target ratios (the issue's targets are at N = 256 rows of x, random unstructured masks
    only), crossovers, and ours against each rival of torch (time ratios per sparsity)."""
    by_sparsity = {r["sparsity"]: r for r in results}
    ratios = []
    with_targets = n == N and block is None
    for key, desc, sparsity, target in TARGETS.get((device_type, dtype), []) if with_targets else []:
        r = by_sparsity.get(sparsity)
        if r is None:
            continue
        group = "step" if key.startswith("step") else "forward"
        num = {"fwd_vs_dense": DENSE_FWD, "fwd_tc_vs_dense": DENSE_FWD, "fwd_vs_torch_csr": TORCH_CSR_FWD,
               "step_vs_dense": DENSE_STEP}[key]
        den = OURS_STEP if group == "step" else OURS_TC_FWD if key == "fwd_tc_vs_dense" else OURS_FWD
        if num not in r[group] or den not in r[group]:
            continue
        v = common.paired_ratio(r[group][num], r[group][den])
        ratios.append({"key": key, "description": f"{desc} at {sparsity:.0%}", **v, "target": target,
                       "status": "MET" if v["value"] >= target else "NOT MET"})
    cross = {
        "forward_vs_dense": crossover(results, "forward", DENSE_FWD, OURS_FWD),
        "step_vs_dense": crossover(results, "step", DENSE_STEP, OURS_STEP),
        "forward_vs_ours_dense_path": crossover(results, "forward", OURS_DENSE_FWD, OURS_FWD),
        "step_vs_ours_dense_path": crossover(results, "step", OURS_DENSE_STEP, OURS_STEP),
    }
    rivals = []
    for r in results:
        for group, num, den in RIVALS:
            if num in r[group] and den in r[group]:
                rivals.append({"sparsity": r["sparsity"], "group": group, "rival": num, "ours": den,
                               **common.paired_ratio(r[group][num], r[group][den])})
    fwd = cross["forward_vs_dense"]["measured"]
    if (device_type, dtype) == ("cpu", torch.float32) and with_targets:
        cross["target"] = {"description": f"forward crossover with dense at or below {CROSSOVER_TARGET:.0%}",
                           "value": fwd, "status": "MET" if fwd is not None and fwd <= CROSSOVER_TARGET else "NOT MET"}
    return {"ratios": ratios, "crossover": cross, "vs_rivals": rivals}


# ------------------------------------------------------------------------------------- reporting
def sparsity_markdown(r: Dict[str, Any]) -> str:
    f = common.fmt
    out = [f"### {r['sparsity']:.0%} sparsity (nnz {r['nnz']:,})", ""]
    for group, title, dense in (("forward", "forward", DENSE_FWD), ("step", "training step", DENSE_STEP)):
        rows = []
        for name, t in r[group].items():
            ratio = common.paired_ratio(r[group][dense], t)["value"] if dense in r[group] else None
            rows.append([name, f(t.median), f(t.p20), f(t.p80), None if ratio is None else f"{ratio:.2f}x"])
        headers = ["contender", "median ms", "p20 ms", "p80 ms", "vs dense"]
        out += [f"{title}:", "", common.markdown_table(headers, rows), ""]
    load = r.get("cpu_contention") or {}
    if load.get("other_share") is not None:
        line = (f"Other processes used {100 * load['other_share']:.1f}% of the CPUs during this case "
                f"(hypervisor steal {100 * (load.get('steal_share') or 0):.1f}%); attempts: {r.get('attempts', 1)}.")
        if common.is_contended(load):
            line = "**Warning: the machine was not quiet; do not trust these numbers.** " + line
        out += [line, ""]
    return "\n".join(out)


def summary_markdown(analysis: Dict[str, Any], n: int = N, block: Optional[Tuple[int, int]] = None) -> str:
    rows = [[r["description"], f"{r['value']:.2f}", f"{r['p20']:.2f} .. {r['p80']:.2f}", f">= {r['target']}",
             r["status"]] for r in analysis["ratios"]]
    c = analysis["crossover"]

    def fmt_cross(d):
        if d["measured"] is None:
            return "not reached in the measured range"
        interp = "" if d["interpolated"] is None else f" (ratio 1 at ~{d['interpolated']:.0%})"
        return f"from {d['measured']:.0%}{interp}"
    headers = ["ratio", "value", "per-round p20 .. p80", "target", "status"]
    out = ["## Targets", "", common.markdown_table(headers, rows),
           "", "## Crossover (sparsity from which ours sparse is faster)", "",
           common.markdown_table(["against", "crossover"], [
               ["dense x @ w.T, forward", fmt_cross(c["forward_vs_dense"])],
               ["dense + torch AdamW, training step", fmt_cross(c["step_vs_dense"])],
               ["ours dense path, forward", fmt_cross(c["forward_vs_ours_dense_path"])],
               ["ours dense path, training step (SparseLinear kernel='auto')", fmt_cross(c["step_vs_ours_dense_path"])],
           ]), ""]
    if "target" in c:
        out += [f"Target: {c['target']['description']}: {c['target']['status']}.", ""]
    elif not rows:
        out[2] = (f"No targets for {n} row{'s' if n > 1 else ''} of x (the issue's are at {N})" if n != N else
                  f"No targets for {block[0]} x {block[1]} block masks (the issue's are for random unstructured ones)"
                  if block is not None else
                  "No targets for this device and dtype (the issue's: CPU float32, CUDA float16)") + "; the ratios are below."
    rivals = analysis.get("vs_rivals") or []
    if rivals:
        columns = [(g, rival) for g, rival, _ in RIVALS if any(v["group"] == g and v["rival"] == rival for v in rivals)]
        out += ["## Against torch's pruned and sparse layers (time ratio rival / ours sparse, >1 = ours faster; "
                "per-round p20 .. p80)", "",
                common.markdown_table(["sparsity"] + [f"{'forward' if g == 'forward' else 'training step'}: {rival}"
                                                      for g, rival in columns], [
                    [f"{s:.0%}"] + [next((f"{v['value']:.2f}x ({v['p20']:.2f} .. {v['p80']:.2f})" for v in rivals
                                          if v["sparsity"] == s and v["group"] == g and v["rival"] == rival), "-")
                                    for g, rival in columns]
                    for s in sorted({v["sparsity"] for v in rivals})]), ""]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, nargs="+", default=list(SPARSITIES))
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                    help="of x, the weight and the gradients (default float32)")
    ap.add_argument("--batch", type=int, default=N,
                    help=f"rows of x (default {N}, where the targets are; 1 for one-token inference)")
    ap.add_argument("--pattern", default="unstructured",
                    help='"unstructured" (default, where the targets are) or "block:RxC": masks of whole R x C '
                         "blocks, with torch.sparse.mm on BSR among the contenders")
    common.add_run_options(ap, default_reps=DEFAULT_REPS, repeat_what="a sparsity")
    args = ap.parse_args(argv)
    device, reps, warmup = common.resolve_run_options(ap, args, default_reps=DEFAULT_REPS)
    bad = [s for s in args.sparsity if not 0.0 <= s < 1.0]
    if bad:
        ap.error(f"--sparsity values must be in [0, 1), got {bad}")
    if args.batch < 1:
        ap.error(f"--batch must be at least 1, got {args.batch}")
    n = args.batch
    dtype = DTYPES[args.dtype]
    try:
        block = parse_pattern(args.pattern)
    except ValueError as e:
        ap.error(f"--pattern: {e}")
    ours_ok = device.type in pyfinetune.kernel_devices()["csr_linear"]
    if os.environ.get(TC_ENV):
        print(f"note: {TC_ENV}={os.environ[TC_ENV]} is set: the 'ours sparse' rows run that kernel (recorded in the "
              "JSON config)", file=sys.stderr, flush=True)

    stamp, when = common.timestamp()
    machine = common.machine_info(device)
    results = []
    for s in sorted(args.sparsity):
        print(f"[{s:.0%}] N={n} K={K} M={M} {args.dtype}, {reps} rounds", file=sys.stderr, flush=True)
        results.append(run_sparsity_quietly(s, device, reps, warmup, args.attempts, ours_ok, dtype, n, block))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    analysis = analyse(results, device.type, dtype, n, block)

    md = [f"# pyfinetune pruned linear benchmark ({device.type}, {when})", "",
          common.machine_summary(machine), "",
          f"x [{n}, {K}] {args.dtype}, weight [{M}, {K}] pruned at random"
          + (f" in whole {block[0]} x {block[1]} blocks" if block else "") +
          f"; {reps} timed rounds after {warmup} warm-up "
          "rounds, contenders interleaved round-robin; times are per call" +
          (f" (each sample: {CUDA_CALLS_PER_SAMPLE['forward']} back-to-back forward calls, "
           f"{CUDA_CALLS_PER_SAMPLE['step']} training steps)" if device.type == "cuda" else "") +
          "; ratios are median / median with the spread of the same-round ratios."
          + (" QUICK RUN: not a record." if args.quick else ""), "",
          summary_markdown(analysis, n, block)]
    md += [sparsity_markdown(r) for r in results]
    if not ours_ok:
        md += [f"Note: pyfinetune has no {device.type} kernel for csr_linear in this build: only torch rows.", ""]
    record = {
        "benchmark": "prune", "device": device.type, "when": when, "machine": machine,
        "config": {"reps": reps, "warmup": warmup, "quick": args.quick, "N": n, "K": K, "M": M, "lr": LR,
                   "calls_per_sample": CUDA_CALLS_PER_SAMPLE if device.type == "cuda" else {"forward": 1, "step": 1},
                   TC_ENV: os.environ.get(TC_ENV),
                   "dtype": args.dtype, "pattern": args.pattern,
                   "sparsities": sorted(args.sparsity)},
        "sparsities": [{**{k: v for k, v in r.items() if k not in ("forward", "step")},
                        "forward": timings_summary(r["forward"]), "step": timings_summary(r["step"])} for r in results],
        "analysis": analysis,
    }
    name = "prune" if dtype == torch.float32 else f"prune-{args.dtype}"
    if n != N:
        name += f"-n{n}"
    if block is not None:
        name += f"-block{block[0]}x{block[1]}"
    common.publish(name, device, record, "\n".join(md), args.out, stamp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
