"""Float64 reference of the pruning ops, the inputs they are tested on, and the error bound.

Error bound of a pruned product in dtype d (``assert_product_close``): every output is a sum of
``k`` products, accumulated in float32 (float64 for float64) and rounded once to d, so

    |ours - exact| <= u(d) * |exact| + (k + 2) * u(acc) * sum_j |term_j|  (+ half a subnormal step)

with u the unit roundoff (2^-53 float64, 2^-24 float32, 2^-8 bfloat16, 2^-11 float16) and
``exact`` the float64 product of the same (already rounded) inputs. The accumulation term is the
classical worst-case bound of a k-term sum in any order, so it holds for our kernels and for the
GEMMs of MKL / oneDNN alike; a wrong index or a dropped term gives errors of the size of the terms
themselves, orders of magnitude above it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8,
                 torch.float16: 2.0**-11}


def acc_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]


def assert_product_close(actual: torch.Tensor, exact: torch.Tensor, abs_terms: torch.Tensor, k: int,
                         dtype: torch.dtype, what: str, *, rounded_before: Optional[torch.Tensor] = None) -> None:
    """``actual`` (dtype) against the float64 ``exact`` sums of k terms whose absolute values sum to
    ``abs_terms``, within the bound of the module docstring. ``rounded_before``: the exact value of
    an intermediate result that the computation rounds to dtype once before the last step (cuBLAS's
    product before its bias is added): the bound then also holds u(d) times its magnitude."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(exact.shape)}"
    a = actual.detach().double().cpu()
    e = exact.detach().double().cpu()
    t = abs_terms.detach().double().cpu()
    u = UNIT_ROUNDOFF[dtype]
    acc = (k + 2) * acc_roundoff(dtype) * t
    bound = u * (e.abs() + acc) + acc + torch.finfo(dtype).smallest_normal * u
    if rounded_before is not None:
        bound = bound + u * (rounded_before.detach().double().cpu().abs() + acc)
    err = (a - e).abs()
    bad = ~(err <= bound)  # also catches NaN
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())} of {err.numel()} entries outside the error bound; first at flat "
            f"index {i}: got {a.flatten()[i].item():.9g}, exact {e.flatten()[i].item():.9g}, error "
            f"{err.flatten()[i].item():.3g} > bound {bound.flatten()[i].item():.3g}; max error / bound "
            f"{(err / bound.clamp_min(1e-300)).max().item():.3g}")


def make_mask(m: int, k: int, sparsity: float, *, empty_rows: int = 0,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random bool mask [m, k] with about ``sparsity`` of its entries False, exactly all of them
    at 0 and 1; the first ``empty_rows`` rows have no kept weight."""
    if sparsity <= 0.0:
        mask = torch.ones(m, k, dtype=torch.bool)
    elif sparsity >= 1.0:
        mask = torch.zeros(m, k, dtype=torch.bool)
    else:
        mask = torch.rand(m, k, generator=generator) >= sparsity
    mask[:empty_rows] = False
    return mask


def two_four_mask(m: int, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """2:4 semi-structured sparsity: two kept weights in every group of four columns (k % 4 == 0)."""
    assert k % 4 == 0
    scores = torch.rand(m, k // 4, 4, generator=generator)
    keep = scores.argsort(dim=-1)[..., :2]
    mask = torch.zeros(m, k // 4, 4, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(m, k)


def reference(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor],
              grad_out: torch.Tensor) -> dict:
    """Float64 forward and gradients of ``y = x @ (weight * mask)^T + bias`` (x [N, K]), with the
    absolute-term sums the error bound needs, on the CPU whatever the inputs' device.
    ``dweight`` is the full product (dense_grad); mask it for the default gradient."""
    def cpu64(t):
        return t.detach().double().cpu()

    xd, md, gd = cpu64(x), cpu64(mask), cpu64(grad_out)
    wd = cpu64(weight) * md
    bd = None if bias is None else cpu64(bias)
    out = {
        "y_product": xd @ wd.t(),
        "y": xd @ wd.t() + (bd if bd is not None else 0.0),
        "y_terms": xd.abs() @ wd.abs().t() + (bd.abs() if bd is not None else 0.0),
        "dx": gd @ wd,
        "dx_terms": gd.abs() @ wd.abs(),
        "dweight": gd.t() @ xd,
        "dweight_terms": gd.abs().t() @ xd.abs(),
        "dbias": gd.sum(0),
        "dbias_terms": gd.abs().sum(0),
    }
    return out


def random_inputs(n: int, k: int, m: int, dtype: torch.dtype, device, *, bias: bool,
                  generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, ...]:
    """x [n, k], weight [m, k], bias [m] or None, grad_out [n, m]: O(1) values in dtype."""
    def rnd(*shape):
        return torch.randn(*shape, generator=generator).to(dtype=dtype, device=device)
    return rnd(n, k), rnd(m, k), (rnd(m) if bias else None), rnd(n, m)
