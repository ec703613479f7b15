"""Float64 reference of the distillation losses, written from torch.nn.functional, and the test
tolerances of every dtype (in one place, with the reason for each)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Tolerances against the float64 reference, computed from the *same* (already rounded) inputs.
#   float32: our arithmetic is float32 with shift-exact formulations of the stable terms, so
#     errors are a few ulps of the row's scale: loss rtol 2e-5, gradient 2e-5 of the largest
#     gradient entry of the case (atol) plus 1e-4 relative. At large T the loss T^2 D is
#     ill-conditioned in float32 (D ~ 1e-6 from sums of O(1) terms, times T^2 = 1e4) for any
#     implementation, so the loss bound also allows twice PyTorch's own float32 error.
#   bfloat16 / float16: the loss is still computed in float32 (same bound as float32); the
#     gradient is rounded to the student's dtype twice (the kept gradient, then its product with
#     the upstream gradient in the backward; relative 2^-8 / 2^-11 each), so the bound is the
#     flash-attention rule: at most twice the error PyTorch's own composition makes in that dtype
#     against the same float64 reference, plus two roundings of the largest entry.
#   float64 (gradcheck): the kernels run in float64.
LOSS_RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-10, 1e-10)}  # (atol of the max, rtol)
ROUNDING = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def kd_reference_rows(student, teacher, labels=None, *, temperature=1.0, alpha=0.5, divergence="forward_kl", beta=0.5,
                      ignore_index=-100, compute_dtype=torch.float64):
    """Per-row loss [N] of [..., V] logits, computed in `compute_dtype` (float64 for the reference)."""
    V = student.shape[-1]
    s = student.reshape(-1, V).to(compute_dtype)
    t = teacher.reshape(-1, V).to(compute_dtype)
    T = temperature
    log_q = F.log_softmax(s / T, dim=-1)
    log_p = F.log_softmax(t / T, dim=-1)
    # F.kl_div with log targets; entries whose target log-probability is -inf (a top-k teacher
    # scattered into a -inf row) contribute 0, and are masked so that no 0 * inf reaches autograd.
    def kl(log_target_dist, log_input):
        absent = log_target_dist == float("-inf")
        lt = torch.where(absent, torch.zeros_like(log_target_dist), log_target_dist)
        li = torch.where(absent, torch.zeros_like(log_input), log_input)
        terms = F.kl_div(li, lt, reduction="none", log_target=True)
        return torch.where(absent, torch.zeros_like(terms), terms).sum(-1)

    if divergence == "forward_kl":
        d = kl(log_p, log_q)
    elif divergence == "reverse_kl":
        d = kl(log_q, log_p)
    elif divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
        d = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    else:
        raise ValueError(divergence)
    if labels is None:
        return T * T * d
    lab = labels.reshape(-1)
    ce = F.cross_entropy(s, lab, ignore_index=ignore_index, reduction="none")
    rows = alpha * T * T * d + (1 - alpha) * ce
    return torch.where(lab == ignore_index, torch.zeros_like(rows), rows)


def reduce_rows(rows, labels, ignore_index, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if labels is None:
        return rows.sum() / max(rows.numel(), 1)
    return rows.sum() / (labels.reshape(-1) != ignore_index).sum().clamp_min(1)


def kd_reference(student, teacher, labels=None, *, reduction="batchmean", grad_output=None, compute_dtype=torch.float64,
                 **kw):
    """(loss, d loss / d student) with the upstream gradient `grad_output` (default 1)."""
    s = student.detach().to(compute_dtype).requires_grad_(True)
    rows = kd_reference_rows(s, teacher.detach(), labels, compute_dtype=compute_dtype, **kw)
    loss = reduce_rows(rows, labels, kw.get("ignore_index", -100), reduction)
    go = torch.ones_like(loss) if grad_output is None else grad_output.to(compute_dtype)
    (g,) = torch.autograd.grad(loss, s, go)
    return loss.detach(), g


def topk_to_full(values, indices, V):
    """Scatter top-k teacher logits into a [..., V] row filled with -inf."""
    full = torch.full(values.shape[:-1] + (V,), float("-inf"), dtype=torch.float64, device=values.device)
    return full.scatter(-1, indices, values.to(torch.float64))


def divergence_rounding_atol(student, teacher, temperature, alpha=1.0):
    """What float32 arithmetic can lose in alpha * T^2 * D, per row: D sums probability-weighted
    log-probabilities of magnitude up to L = max |log_softmax(logits / T)| (log V and more), each
    held to float32's unit roundoff u, so D carries errors of a few u * L, which T^2 multiplies
    (at T = 100, V = 1000: 1e4 * 6e-8 * 7 ~ 4e-3 on a loss of ~10, for PyTorch's own float32
    composition too; its error on one draw is no bound for ours, whose sums run in another order).
    Two such units; negligible next to the loss rtol at T <= 4."""
    logq = torch.log_softmax(student.detach().double() / temperature, -1)
    logp = torch.log_softmax(teacher.detach().double() / temperature, -1)
    finite = lambda x: x[torch.isfinite(x)]
    L = max([finite(x).abs().max().item() for x in (logq, logp) if finite(x).numel()] or [0.0])
    return 2 * 2.0 ** -24 * alpha * temperature ** 2 * L


def assert_loss_close(actual, expected, dtype, torch_same_dtype=None, msg="", atol=0.0):
    """rtol of the dtype, plus twice the error of PyTorch's composition in the input dtype if given,
    plus atol (for example divergence_rounding_atol)."""
    rtol = LOSS_RTOL[dtype]
    a, e = actual.double(), expected.double()
    scale = e.abs().max().clamp_min(1e-6) if e.numel() else 1.0
    err = (a - e).abs()
    extra = 0.0
    if torch_same_dtype is not None:
        extra = 2 * (torch_same_dtype.double() - e).abs().max().item()
    assert torch.all(err <= rtol * e.abs() + rtol * scale + extra + atol), (
        f"{msg} loss error {err.max().item():.3e} (rtol {rtol}, 2x torch {extra:.3e}, atol {atol:.3e})")


def assert_grad_close(actual, expected, dtype, torch_lowp=None, msg="", cond_atol=0.0):
    """fp32/fp64: fixed bounds, widened for fp32 to 2x PyTorch's own float32 error when
    ``torch_lowp`` (PyTorch's composition in float32) is given: logits in the thousands at a small
    temperature make (s - t) / T ~ 1e5, whose float32 rounding (~1e-2) no float32 formula avoids.
    ``cond_atol``: an absolute allowance for that conditioning where PyTorch's own error on one
    draw is no measure of it (its error and ours vary 100x between seeds at the same size).
    Low precision: <= 2x PyTorch's own low-precision error + one rounding."""
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    gmax = e.abs().max().item() if e.numel() else 0.0
    if dtype in GRAD_TOL:
        atol, rtol = GRAD_TOL[dtype]
        extra = 2 * (torch_lowp.double() - e).abs().max().item() if torch_lowp is not None else 0.0
        extra += cond_atol
        ok = err <= atol * gmax + rtol * e.abs() + extra
        assert torch.all(ok), f"{msg} grad error {err.max().item():.3e} (max |grad| {gmax:.3e})"
        return
    bound = 2 * ROUNDING[dtype] * gmax
    if torch_lowp is not None:
        bound += 2 * (torch_lowp.double() - e).abs().max().item()
    assert err.max().item() <= bound, f"{msg} grad error {err.max().item():.3e} > bound {bound:.3e}"


def assert_inplace_matches(s, t, lab, **kw):
    """kd_loss_fwd_inplace(copy of s) writes exactly kd_loss_fwd's gradient over it and returns its
    row losses (the CUDA variants' tests)."""
    rows, grad = torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, need_grad=True, **kw)
    x = s.clone()
    out = torch.ops.pyfinetune.kd_loss_fwd_inplace(x, t, lab, **kw)
    assert torch.equal(out, rows)
    assert torch.equal(x, grad)


def assert_refused_before_write(s, t, lab, message):
    """A bad setting of a kernel variable: kd_loss_fwd_inplace raises ValueError matching
    ``message`` (prefixed with the op's name) and leaves the student untouched; kd_loss raises too."""
    import pytest

    x = s.clone()
    with pytest.raises(ValueError, match=f"pyfinetune.kd_loss_fwd_inplace: {message}"):
        torch.ops.pyfinetune.kd_loss_fwd_inplace(x, t, lab, temperature=1.0, alpha=0.5, divergence="forward_kl",
                                                 beta=0.5, ignore_index=-100, grad_scale=1.0)
    torch.cuda.synchronize()
    assert torch.equal(x, s)
    with pytest.raises(ValueError, match=message):
        from pyfinetune.losses import kd_loss

        kd_loss(s, t, lab)
