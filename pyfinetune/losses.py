"""Fused knowledge-distillation losses.

With ``P = softmax(teacher / T)`` and ``Q = softmax(student / T)`` per row of logits:

* ``divergence="forward_kl"``: ``D = KL(P || Q)``; ``"reverse_kl"``: ``D = KL(Q || P)``;
  ``"jsd"``: ``D = beta KL(P || M) + (1 - beta) KL(Q || M)`` with ``M = beta P + (1 - beta) Q``.
* row loss ``alpha T^2 D + (1 - alpha) CE(student, label)`` (CE at temperature 1); ``T^2 D`` alone
  without labels; rows whose label is ``ignore_index`` contribute nothing.
* ``reduction``: ``"batchmean"`` (sum over rows / number of rows not ignored, 0 when all are
  ignored), ``"sum"``, ``"none"`` (one value per row, leading dimensions flattened).

The kernels read each row of logits a few times, compute the loss and the gradient with respect to
the student in one forward call, and keep only that gradient for the backward: no softmax or
log-softmax tensor is stored. The gradient flows to the student only. Inputs may be float32,
bfloat16 or float16 (student and teacher independently); the arithmetic is float32 and the loss is
float32 (float64 inputs, CPU only, compute and return float64: for gradcheck and references).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Dict, Optional, Tuple

import torch

from . import ops as _ops

__all__ = ["kd_loss", "kd_loss_topk", "fused_linear_kd_loss", "DistillationLoss"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "none")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INDEX_DTYPES = tuple(getattr(torch, name) for name in ("int64", "int32", "int16", "int8", "uint8", "uint16",
                                                        "uint32", "uint64") if hasattr(torch, name))
# fused_linear_kd_loss: rows per chunk are chosen so that a chunk's float32 logits take at most this
# many bytes (786 rows at V = 32000; see _default_chunk_rows): big enough for efficient matmuls
# (chunks of 256 rows made the fused head 9% slower than the default chunks, kd-cpu-20261126-1641),
# small next to [N, V]. Two such buffers are live at a time (student logits, which become the
# chunk's gradient, and teacher logits).
DEFAULT_CHUNK_BYTES = 96 * 1024 * 1024
_PLAIN_REALS = (float, int)  # exact types: bool, a subclass of int, takes the full checks
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_KD_FWD = torch.ops.pyfinetune.kd_loss_fwd.default
_KD_TOPK_FWD = torch.ops.pyfinetune.kd_loss_topk_fwd.default


# ----------------------------------------------------------------------------------- validation
def _check_options(temperature, alpha, divergence, beta, ignore_index, reduction, fn: str = "kd_loss") -> None:
    """Raise TypeError / ValueError naming the argument (and the function ``fn``) for bad keyword
    arguments."""
    # The usual call (plain numbers in range, known names) is settled by a few comparisons: this
    # runs on every call of a loss that may take tens of microseconds.
    if (type(temperature) in _PLAIN_REALS and type(alpha) in _PLAIN_REALS and type(beta) in _PLAIN_REALS
            and type(ignore_index) is int and 1e-18 <= temperature <= 1e18 and 0 <= alpha <= 1 and 0 < beta < 1
            and divergence in DIVERGENCES and reduction in REDUCTIONS and _INT64_MIN <= ignore_index <= _INT64_MAX):
        return
    for name, value in (("temperature", temperature), ("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"pyfinetune.{fn}: {name} must be a real number, got {type(value).__name__}")
    if not 1e-18 <= temperature <= 1e18:  # the kernels square it in float32
        raise ValueError(f"pyfinetune.{fn}: temperature must be a number in [1e-18, 1e18], got {temperature}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"pyfinetune.{fn}: alpha must be in [0, 1], got {alpha}")
    if not 0 < beta < 1:
        raise ValueError(f"pyfinetune.{fn}: beta must be in (0, 1), got {beta}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"pyfinetune.{fn}: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"pyfinetune.{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"pyfinetune.{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"pyfinetune.{fn}: ignore_index must fit int64 (labels are int64), got {ignore_index}")


# Above this temperature the float32 arithmetic of the kernels (and of a float32 torch composition)
# loses the T^2-scaled divergence to cancellation: the verified range is [0.05, 100].
PRECISE_TEMPERATURE_MAX = 100.0


def _warn_large_temperature(temperature: float, *tensors: Optional[torch.Tensor]) -> None:
    """A RuntimeWarning for a temperature above PRECISE_TEMPERATURE_MAX computed in float32 (not all
    inputs float64): at large T the log-probabilities of student and teacher differ by O(1 / T),
    the divergence is O(1 / T^2) and the loss multiplies it by T^2, so float32 rounding of the
    O(1) terms grows to ~1e-3 of the loss at T = 200, ~4% at T = 1000, and swamps it beyond ~1e4
    (even negative KL). Once per call site (Python's default warning filter)."""
    if temperature <= PRECISE_TEMPERATURE_MAX or torch.compiler.is_compiling():
        return
    if all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors if t is not None):
        return
    warnings.warn(
        f"pyfinetune.kd_loss: temperature={temperature:g} is above {PRECISE_TEMPERATURE_MAX:g}, where float32 "
        "arithmetic loses the T^2-scaled divergence to cancellation (relative error ~1e-3 at T = 200, ~4% at "
        "T = 1000, meaningless beyond ~1e4); pass float64 logits for such temperatures",
        RuntimeWarning, stacklevel=3)


def _as_rows(name: str, x, fn: str = "kd_loss") -> torch.Tensor:
    """[..., V] logits -> [N, V] with unit stride along V (a view when possible)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pyfinetune.{fn}: {name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"pyfinetune.{fn}: {name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.layout != torch.strided:
        raise TypeError(f"pyfinetune.{fn}: {name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() < 1 or x.shape[-1] < 1:
        size = "k" if name.startswith("teacher_topk") else "V"
        raise ValueError(f"pyfinetune.{fn}: {name} must have shape [..., {size}] with {size} >= 1, got "
                         f"{tuple(x.shape)}")
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def _as_labels(labels, lead_shape, device, name: str = "labels", *, fn: str = "kd_loss",
               lead_name: str = "student_logits", vocab: Optional[int] = None,
               ignore_index: Optional[int] = None) -> Optional[torch.Tensor]:
    """labels [lead_shape] -> [N] int64. With ``vocab``: CPU labels outside [0, vocab) that are not
    ``ignore_index`` raise here, naming ``fn`` and the label's position in ``labels`` (the kernels
    would name their op and a flattened row, or in chunks a row of the chunk)."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"pyfinetune.{fn}: {name} must be a tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"pyfinetune.{fn}: {name} must be an integer tensor (int64), got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(
            f"pyfinetune.{fn}: {name} must have the leading shape of {lead_name} {tuple(lead_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"pyfinetune.{fn}: {name} must be on {device} like {lead_name}, got {labels.device}")
    if vocab is not None and labels.device.type == "cpu" and _ops._inspectable(labels):
        bad = ((labels != ignore_index) & ((labels < 0) | (labels >= vocab))).nonzero()
        if bad.shape[0]:  # (not numel: a 0-d label's nonzero() is [1, 0])
            at = tuple(int(i) for i in bad[0])
            where = f"[{', '.join(map(str, at))}]" if at else ""
            raise RuntimeError(f"pyfinetune.{fn}: {name}{where} = {int(labels[at])} is outside [0, V = {vocab}) and "
                               f"is not ignore_index = {ignore_index}")
    if labels.dim() != 1:
        labels = labels.reshape(-1)
    return labels if labels.dtype == torch.int64 else labels.to(torch.int64)


def _check_same_device(name: str, x: torch.Tensor, ref: torch.Tensor, op: str = "kd_loss",
                       ref_name: str = "student_logits") -> None:
    if x.device != ref.device:
        raise ValueError(f"pyfinetune.{op}: {name} must be on {ref.device} like {ref_name}, got {x.device}")


def _need_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _reduce(loss_rows: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, reduction: str):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    # batchmean: divide by the rows that count, on the device (no host synchronization).
    if labels is None:
        return total / max(loss_rows.shape[0], 1)
    count = (labels != ignore_index).sum().clamp_min(1)
    return total / count.to(total.dtype)


# ----------------------------------------------------------------------------------- eager path
# In plain eager mode kd_loss / kd_loss_topk skip torch.library's Python autograd kernel of the op
# (an autograd.Function built per call site, fill_defaults, a redispatch: tens of microseconds per
# call, as much as the whole torch composition at [128, 5]): the op is called below autograd and
# one autograd.Function below covers the op and the reduction. Under tracing (torch.compile,
# export, fake or functional modes, torch.func) the registered op and its autograd are used, so
# that the compiler sees the op. Both paths run the same arithmetic and give the same bits
# (tests/test_kd_eager_path.py), except the gradient of "batchmean", which the eager path has the
# kernel divide by the counted rows (one rounding instead of two, see _EagerKdLoss).
def _host_count(rows: int, labels: Optional[torch.Tensor], ignore_index: int, sync_ok: bool) -> Optional[int]:
    """The divisor of ``"batchmean"`` as a Python int where it is known without a device
    synchronization (no labels, CPU labels) or where one is allowed (``sync_ok``); else None."""
    if labels is None:
        return max(rows, 1)
    if labels.device.type == "cpu" or sync_ok:
        return max(int(labels.ne(ignore_index).sum()), 1)
    return None


def _reduce_eager(loss_rows: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, reduction: str,
                  count: Optional[int] = None):
    """``_reduce`` without autograd, in place where it can be; also returns the divisor of
    ``"batchmean"`` (a Python int, or a tensor on devices where counting on the host would
    synchronize; None for the other reductions), which the backward needs. ``count``: that divisor
    when the caller already has it as an int."""
    if reduction == "none":
        return loss_rows, None
    total = loss_rows.sum()
    if reduction == "sum":
        return total, None
    if count is None:
        count = _host_count(loss_rows.shape[0], labels, ignore_index, sync_ok=False)
    if count is None:
        count = (labels != ignore_index).sum().clamp_min(1).to(total.dtype)
    # An int divides like _reduce's float tensor (it converts to the loss dtype the same way) and
    # costs one tensor op less.
    return total.div_(count), count


class _EagerKdLoss(torch.autograd.Function):
    """kd_loss_fwd / kd_loss_topk_fwd (``op``) plus the reduction, for a student that needs a
    gradient, in plain eager mode. Only ``student`` is an autograd input: the teacher and the labels
    travel in ``others`` (no gradient, no detach needed). The backward is the op's registered one
    (``ops._kd_backward``) with the reduction's backward folded into the scale.

    ``"batchmean"``: when the number of counted rows is known on the host (no labels, CPU labels, or
    a gradient large enough that one device synchronization costs less than a pass over it,
    ``ops._may_read_on_host``), the kernel computes the kept gradient already divided by it
    (``grad_scale``), so that ``loss.backward()`` (an upstream gradient of exactly 1) hands the
    kept gradient on with no pass over it; the registered path divides in the backward instead (the
    same values up to the rounding of one product)."""

    @staticmethod
    def forward(ctx, student, op, others, labels, options, reduction):
        temperature, alpha, divergence, beta, ignore_index = options
        kept_scale = _kept_gradient_scale(student, options, labels is not None)
        count = None
        if reduction == "batchmean" and student.dtype != torch.float16:  # float16: see _kept_gradient_scale
            count = _host_count(student.shape[0], labels, ignore_index, sync_ok=_ops._may_read_on_host([student]))
        # Below autograd: the op's registered (Python) autograd kernel would otherwise run here
        # too, although grad mode is off inside forward.
        with torch._C._AutoDispatchBelowAutograd():
            loss_rows, grad = op(student, *others, temperature=temperature, alpha=alpha, divergence=divergence,
                                 beta=beta, ignore_index=ignore_index, need_grad=True,
                                 grad_scale=1.0 / count if count is not None else kept_scale)
        loss, count_used = _reduce_eager(loss_rows, labels, ignore_index, reduction, count)
        ctx.save_for_backward(grad)
        ctx.count = count_used
        ctx.folded = count is not None  # the kept gradient is already divided by the count
        ctx.kept_scale = kept_scale
        # Rows that are a view of a leaf (a leaf of more than two dimensions, flattened): autograd
        # stores the view's backward of the handed-on buffer as the leaf's .grad, and accumulates a
        # retained graph's next backward into it in place, which changed the buffer that graph
        # still reads (a third backward failed). Such a leaf gets a copy (logits computed by a
        # layer, the usual case, are no leaf: no copy).
        base = student._base
        ctx.copy_grad = base is not None and base.is_leaf
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        # The same operations as the registered path's backward: the reduction's backward in the
        # loss dtype (sum: the incoming value itself; batchmean: divided by the count unless the
        # kernel did), cast to the dtype of the arithmetic, one scale per row ([N, 1]) or for all
        # rows ([1, 1]: a 2-D tensor so that type promotion against a bf16 / fp16 gradient is that
        # of the [N, 1] scale).
        if ctx.reduction == "batchmean" and not ctx.folded:
            grad_out = grad_out / ctx.count
        if ctx.kept_scale != 1.0:
            grad_out = grad_out / ctx.kept_scale  # a power of two: exact
        math_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        scale = grad_out if grad_out.dtype == math_dtype else grad_out.to(math_dtype)
        scale = scale.unsqueeze(-1) if ctx.reduction == "none" else scale.view(1, 1)
        (g_student,) = _ops.scale_kept_gradients(ctx, (grad,), scale, (grad.dtype,))
        if ctx.copy_grad and g_student is grad:
            g_student = g_student.clone()
        return g_student, None, None, None, None, None


# A float16 student keeps the forward's gradient in float16, where its entries (probabilities over
# a large vocabulary, ~1e-5, and less once divided by the batch) fall in the subnormal range or
# below it: a GradScaler's factor, applied only in the backward, could no longer restore them
# (tests/test_kd_loss.py::test_float16_gradient_survives_a_grad_scaler). The kernels write them scaled by a power of two that
# keeps the largest possible entry, w_kd / T + w_ce (|dD/ds_i| <= 1 / T for forward_kl and jsd,
# |dCE/ds_i| <= 1), within 2^13, and the backward divides it out in float32 before its one rounding,
# as torch's composition rounds scale * gradient once. reverse_kl's entries have no such bound
# (q log(q / p)): unscaled, but not divided by the batch either; kd_loss therefore gives a float16
# student that needs a gradient to the kernels as float32 with reverse_kl (the raw op keeps this).
_KEPT_FP16_TOP = 8192.0


def _kept_gradient_scale(student: torch.Tensor, options: tuple, has_labels: bool) -> float:
    """The factor the kernels write a kept float16 gradient with (1.0 for other dtypes)."""
    if student.dtype != torch.float16:
        return 1.0
    temperature, alpha, divergence = options[0], options[1], options[2]
    if divergence == "reverse_kl":
        return 1.0
    bound = alpha * temperature + (1.0 - alpha) if has_labels else temperature
    # The kernels take temperature^2 * grad_scale in float32: at huge temperatures (up to the
    # accepted 1e18, T^2 = 1e36) the scale must leave it finite.
    room = math.floor(math.log2(_ops._F32_MAX / (temperature * temperature)))
    return float(2.0 ** max(min(math.floor(math.log2(_KEPT_FP16_TOP / bound)), 24, room), 0))


def _kd_eager(op, student: torch.Tensor, others: tuple, labels: Optional[torch.Tensor], options: tuple,
              reduction: str) -> torch.Tensor:
    """The eager path of kd_loss / kd_loss_topk: ``op(student, *others, ...)`` and the reduction."""
    if torch.is_grad_enabled() and student.requires_grad:
        return _EagerKdLoss.apply(student, op, others, labels, options, reduction)
    temperature, alpha, divergence, beta, ignore_index = options
    with torch._C._AutoDispatchBelowAutograd():
        loss_rows, _ = op(student, *others, temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                          ignore_index=ignore_index, need_grad=False)
    return _reduce_eager(loss_rows, labels, ignore_index, reduction)[0]


# ------------------------------------------------------------------------------- composed path
# Under torch.func transforms (grad, vmap, jvp, jacrev, jacfwd, hessian) and forward-mode AD the
# kernels' autograd (a backward only) does not apply: with no forward rule a tangent would be
# dropped silently. There the same loss is composed of torch ops, in the kernels' arithmetic dtype
# (float32, float64 when an input is float64), with their argument checks.
def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) per row from log-probabilities; entries where A is 0 (log -inf, or so negative
    that its exponential underflows: a -1e9 mask against the other input's -inf) add 0, as in the
    kernels, with no 0 * inf reaching the value or its derivatives."""
    absent = log_a.exp() == 0
    la = torch.where(absent, 0.0, log_a)
    lb = torch.where(absent, 0.0, log_b)
    return torch.where(absent, 0.0, la.exp() * (la - lb)).sum(-1)


def _check_labels_in_range(labels: Optional[torch.Tensor], vocab: int, ignore_index: int) -> None:
    if labels is None or not _ops._inspectable(labels):
        return
    bad = ((labels != ignore_index) & ((labels < 0) | (labels >= vocab))).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise RuntimeError(f"pyfinetune.kd_loss: labels[{i}] = {int(labels[i])} is outside [0, V = {vocab}) and is not "
                           f"ignore_index = {ignore_index}")


def _kd_composed(s: torch.Tensor, log_p: torch.Tensor, labels: Optional[torch.Tensor], options: tuple,
                 reduction: str, math_dtype: torch.dtype) -> torch.Tensor:
    """The loss of student rows ``s`` [N, V] against teacher log-probabilities ``log_p`` [N, V]
    (at temperature T, -inf where the teacher has probability 0), of torch ops."""
    temperature, alpha, divergence, beta, ignore_index = options
    s = s.to(math_dtype)
    ignored = None
    if labels is not None:
        _check_labels_in_range(labels, s.shape[-1], ignore_index)
        # Ignored rows compute on zeros (a uniform teacher): their loss is masked below, and a
        # -inf or NaN there must not reach the gradient through the mask (0 * NaN), as the kernels
        # give those rows a gradient of exactly 0.
        ignored = (labels == ignore_index).unsqueeze(-1)
        s = torch.where(ignored, 0.0, s)
        log_p = torch.where(ignored, -math.log(s.shape[-1]), log_p)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    if divergence == "forward_kl":
        d = _kl_rows(log_p, log_q)
    elif divergence == "reverse_kl":
        d = _kl_rows(log_q, log_p)
    else:  # jsd: M = beta P + (1 - beta) Q; where both are 0, M is too (logaddexp's gradient is NaN there)
        both = (log_p == float("-inf")) & (log_q == float("-inf"))
        log_m = torch.logaddexp(torch.where(both, 0.0, log_p) + math.log(beta),
                                torch.where(both, 0.0, log_q) + math.log1p(-beta))
        log_m = torch.where(both, float("-inf"), log_m)
        d = beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)
    rows = (temperature * temperature) * d
    if labels is not None:
        # alpha = 1: the labels only select rows; alpha = 0: the divergence drops out. Either way the
        # zero-weighted term is left out (0 * an infinite CE or divergence would be NaN), as the
        # kernels skip a term whose weight is 0.
        if alpha < 1.0:
            ce = torch.nn.functional.cross_entropy(s, torch.where(ignored.squeeze(-1), 0, labels), reduction="none")
            rows = ce if alpha == 0.0 else alpha * rows + (1.0 - alpha) * ce
        rows = torch.where(ignored.squeeze(-1), 0.0, rows)
    return _reduce(rows, labels, ignore_index, reduction)


def _math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------------- functional
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Fused distillation loss of student logits against teacher logits.

    Args:
        student_logits: ``[..., V]`` float32 / bfloat16 / float16 (any leading dims).
        teacher_logits: same shape, any of those dtypes; treated as a constant (no gradient).
        labels: ``None`` or integer tensor of the leading shape; with labels the row loss is
            ``alpha T^2 D + (1 - alpha) CE``, rows equal to ``ignore_index`` count for nothing.
        temperature: ``T > 0``. alpha: in ``[0, 1]``. beta: jsd mixing weight in ``(0, 1)``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.

    Returns:
        float32 scalar, or ``[N]`` for ``reduction="none"`` (N = product of the leading dims).

    Non-finite logits: a row whose loss is undefined (NaN: a student or teacher row of only
    ``-inf``, a ``+inf`` or NaN logit) gets a NaN gradient row, as the composition of torch ops
    gives, so that ``GradScaler`` and anomaly checks see it; ``-inf`` entries of a row otherwise
    finite (a masked vocabulary) are zero-probability entries and keep the gradient finite.

    Second derivatives: the gradient is computed in the forward and kept, so under
    ``create_graph=True`` it is differentiable in the upstream gradient (it is linear in it) but
    not in the logits: second derivatives with respect to the logits (Hessian-vector products,
    gradient penalties through this loss) get no contribution from this loss, and where nothing
    else connects the gradient to a graph autograd raises "element 0 of tensors does not require
    grad". Under torch.func transforms (``grad``,
    ``vmap``, ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``) and forward-mode AD the same loss is
    composed of torch ops (exact derivatives of every order, at the memory and speed of the
    composition): use those for second derivatives.
    """
    _check_options(temperature, alpha, divergence, beta, ignore_index, reduction)
    _warn_large_temperature(temperature, student_logits, teacher_logits)
    s = _as_rows("student_logits", student_logits)
    t = _as_rows("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"pyfinetune.kd_loss: teacher_logits must have the shape of student_logits "
            f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}"
        )
    _check_same_device("teacher_logits", teacher_logits, student_logits)
    lab = _as_labels(labels, student_logits.shape[:-1], student_logits.device, vocab=s.shape[-1],
                     ignore_index=int(ignore_index))
    options = (float(temperature), float(alpha), divergence, float(beta), int(ignore_index))
    if divergence == "reverse_kl" and s.dtype == torch.float16 and _need_grad(s):
        # reverse_kl's gradient entries have no bound that a fixed power-of-two scale could keep in
        # float16's range (see _kept_gradient_scale): kept in float16 unscaled, those below its
        # smallest subnormal (~6e-8) were lost before a GradScaler's factor reached them in the
        # backward. A float32 student keeps a float32 gradient, and the cast's backward rounds
        # factor * gradient to float16 once, as torch's composition does.
        s = s.float()
    if _ops._is_plain_eager(s, t, lab):  # false under transforms and forward-mode AD
        return _kd_eager(_KD_FWD, s, (t, lab), lab, options, reduction)
    if _ops._transforms_active():
        dtype = _math_dtype(s, t)
        log_p = torch.log_softmax(t.detach().to(dtype) / options[0], dim=-1)
        return _kd_composed(s, log_p, lab, options, reduction, dtype)
    loss_rows, _ = torch.ops.pyfinetune.kd_loss_fwd(
        s, t.detach(), lab, temperature=float(temperature), alpha=float(alpha), divergence=divergence,
        beta=float(beta), ignore_index=int(ignore_index), need_grad=_need_grad(s),
        grad_scale=_kept_gradient_scale(s, options, lab is not None),
    )
    return _reduce(loss_rows, lab, ignore_index, reduction)


def kd_loss_topk(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Distillation from a teacher saved as its top-k logits per row (offline distillation).

    The teacher distribution is the softmax of its k logits at temperature T (0 elsewhere); the
    student's log-partition is over all V. ``teacher_topk_logits``: ``[..., k]`` float,
    ``teacher_topk_indices``: ``[..., k]`` integer in ``[0, V)``, distinct within a row (as
    ``torch.topk`` returns them; checked on the CPU, where a repeat raises ValueError, not on a GPU,
    where the check would wait for the device at every call). ``divergence="reverse_kl"`` is refused: KL(Q || P) is infinite
    where the teacher has probability 0. Other arguments as :func:`kd_loss`.
    """
    _check_options(temperature, alpha, divergence, beta, ignore_index, reduction, "kd_loss_topk")
    _warn_large_temperature(temperature, student_logits, teacher_topk_logits)
    if divergence == "reverse_kl":
        raise ValueError(
            "pyfinetune.kd_loss_topk: divergence 'reverse_kl' is not defined with a top-k teacher (its probability "
            "is 0 outside the top-k, so KL(Q || P) is infinite); use 'forward_kl' or 'jsd'"
        )
    s = _as_rows("student_logits", student_logits, "kd_loss_topk")
    v = _as_rows("teacher_topk_logits", teacher_topk_logits, "kd_loss_topk")
    lead = student_logits.shape[:-1]
    if tuple(teacher_topk_logits.shape[:-1]) != tuple(lead):
        raise ValueError(
            f"pyfinetune.kd_loss_topk: teacher_topk_logits must have the leading shape of student_logits "
            f"{tuple(lead)}, got {tuple(teacher_topk_logits.shape)}"
        )
    k = teacher_topk_logits.shape[-1]
    if k > student_logits.shape[-1]:
        raise ValueError(f"pyfinetune.kd_loss_topk: teacher_topk_logits has k = {k} > V = {student_logits.shape[-1]}")
    if not isinstance(teacher_topk_indices, torch.Tensor) or teacher_topk_indices.dtype not in _INDEX_DTYPES:
        got = teacher_topk_indices.dtype if isinstance(teacher_topk_indices, torch.Tensor) else type(teacher_topk_indices).__name__
        raise TypeError(f"pyfinetune.kd_loss_topk: teacher_topk_indices must be an integer tensor (int64), got {got}")
    if tuple(teacher_topk_indices.shape) != tuple(teacher_topk_logits.shape):
        raise ValueError(
            f"pyfinetune.kd_loss_topk: teacher_topk_indices must have the shape of teacher_topk_logits "
            f"{tuple(teacher_topk_logits.shape)}, got {tuple(teacher_topk_indices.shape)}"
        )
    _check_same_device("teacher_topk_logits", teacher_topk_logits, student_logits, "kd_loss_topk")
    _check_same_device("teacher_topk_indices", teacher_topk_indices, student_logits, "kd_loss_topk")
    idx = teacher_topk_indices if teacher_topk_indices.dim() == 2 else teacher_topk_indices.reshape(-1, k)
    if idx.dtype != torch.int64:
        idx = idx.to(torch.int64)
    if idx.device.type == "cpu" and k > 1 and _ops._transforms_active() and _ops._inspectable(idx):
        # Distinct within a row (a repeated index would count one student logit twice): the CPU
        # kernel checks it; here for the composed path of transforms, which calls no kernel. Not
        # on a GPU, where the check would wait for the device at every call.
        ordered = idx.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if repeated.any():
            row = int(repeated.nonzero()[0, 0])
            raise ValueError(f"pyfinetune.kd_loss_topk: teacher_topk_indices must be distinct within each row "
                             f"(as torch.topk returns them); row {row} repeats an index")
    lab = _as_labels(labels, lead, student_logits.device, fn="kd_loss_topk", vocab=s.shape[-1],
                     ignore_index=int(ignore_index))
    options = (float(temperature), float(alpha), divergence, float(beta), int(ignore_index))
    if _ops._is_plain_eager(s, v, idx, lab):  # false under transforms and forward-mode AD
        return _kd_eager(_KD_TOPK_FWD, s, (v, idx, lab), lab, options, reduction)
    if _ops._transforms_active():
        vocab = s.shape[-1]
        bad = ((idx < 0) | (idx >= vocab)).nonzero() if _ops._inspectable(idx) else idx.new_empty((0, 2))
        if bad.numel():
            r, j = (int(i) for i in bad[0])
            raise RuntimeError(f"pyfinetune.kd_loss_topk: teacher_topk_indices[{r}, {j}] = {int(idx[r, j])} is outside "
                               f"[0, V = {vocab})")
        dtype = _math_dtype(s, v)
        log_pk = torch.log_softmax(v.detach().to(dtype) / options[0], dim=-1)
        log_p = torch.full(s.shape, float("-inf"), dtype=dtype, device=s.device).scatter(-1, idx, log_pk)
        return _kd_composed(s, log_p, lab, options, reduction, dtype)
    loss_rows, _ = torch.ops.pyfinetune.kd_loss_topk_fwd(
        s, v.detach(), idx, lab, temperature=float(temperature), alpha=float(alpha), divergence=divergence,
        beta=float(beta), ignore_index=int(ignore_index), need_grad=_need_grad(s),
        grad_scale=_kept_gradient_scale(s, options, lab is not None),
    )
    return _reduce(loss_rows, lab, ignore_index, reduction)


# ----------------------------------------------------------------------------------- fused linear
def _default_chunk_rows(rows: int, vocab: int) -> int:
    """Rows per chunk: at most DEFAULT_CHUNK_BYTES of float32 logits, the rows split evenly over
    the fewest chunks that allows, rounded to a multiple of 64 rows. The matmuls are sensitive to
    the row count: on a 2-core AVX-512 CPU with MKL (N = 4096, H = 1024, V = 32000) chunks of 820
    rows made the fused loss 6% slower than the default 704 (benchmarks/results/kd-cpu-20261126-1738;
    `python benchmarks/bench_kd.py --case linear --linear-chunks 768 820`)."""
    most = max(1, DEFAULT_CHUNK_BYTES // (4 * max(vocab, 1)))
    if rows <= most:
        return max(rows, 1)
    chunks = -(-rows // most)
    even = -(-rows // chunks)
    if most < 64:
        return even
    up = -(-even // 64) * 64
    return up if up <= most else most // 64 * 64


def _chunk_logits_buffer(rows: int, cols: int, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] buffer that every chunk's logits are written into (out=): on the CPU in plain
    eager mode from the block pool (a fresh chunk of logits, tens of MB, cost page faults on every
    chunk: about 7 ms per 32 MB in an ad hoc timing on a 2-core CPU, not recorded)."""
    if like.device.type == "cpu" and _ops._is_plain_eager(like):
        from ._sparse_linear import _pooled_empty

        return _pooled_empty((rows, cols), dtype)
    return torch.empty((rows, cols), dtype=dtype, device=like.device)


# On CUDA, a bfloat16 student head runs its products on the tensor cores with float32 results
# (torch's mm / addmm with out_dtype): the chunk logits are float32 sums of the bfloat16 products,
# never rounded to bfloat16 (the accuracy requirement), and no float32 copy of the [V, H]
# weight is made. The chunk's gradient is rounded to bfloat16 for the two gradient products (as the
# unfused bfloat16 composition's logits gradient is); they accumulate in float32, across chunks
# too. float16 keeps the float32 products: the gradient's entries (about 1/V) would fall into
# float16's subnormal range. Where the path is not available, the float32 products (correct, slower):
#   * torch without the out_dtype overloads, or (2.8, 2.9) whose addmm refuses a float32
#     accumulator with bfloat16 operands, or a GPU below compute capability 8.0: a one-time probe
#     per device with 2 x 2 operands finds out (never during CUDA graph capture);
#   * under torch.compile: torch 2.11's addmm decomposition reads out_dtype as beta when traced.
_HAS_OUT_DTYPE_MM = all("dtype_out" in op.overloads() for op in (torch.ops.aten.mm, torch.ops.aten.addmm))
_TENSOR_CORE_OK: Dict[int, bool] = {}


def _tensor_core_ok(device: torch.device) -> bool:
    """Whether this device runs bf16 x bf16 -> float32 mm and addmm (a float32 accumulator), probed
    once per device; False while a CUDA graph is being captured and the probe has not run."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _TENSOR_CORE_OK.get(index)
    if ok is not None:
        return ok
    if torch.cuda.is_current_stream_capturing():
        return False
    ok = torch.cuda.get_device_capability(index) >= (8, 0)
    if ok:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            acc = torch.mm(a, a, out_dtype=torch.float32)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            ok = bool((acc == 4.0).all())
        except (RuntimeError, TypeError):
            ok = False
    _TENSOR_CORE_OK[index] = ok
    return ok


def _tensor_core_head(h_s: torch.Tensor, w_s: torch.Tensor) -> bool:
    return (_HAS_OUT_DTYPE_MM and h_s.is_cuda and h_s.dtype == torch.bfloat16 and w_s.dtype == torch.bfloat16
            and not torch.compiler.is_compiling() and _tensor_core_ok(h_s.device))


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out (float32, or float64 with float64 operands) = a @ b, or out += a @ b: products of
    same-dtype operands. On CUDA with bfloat16 operands, cuBLAS on the tensor cores with a float32
    result; elsewhere (and in the tests, which force the tensor-core path on the CPU) the same math
    through float32 copies."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif a.is_cuda:
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        _mm_f32(a.float(), b.float(), out, accumulate)


def _accumulation_dtype(h_s: torch.Tensor, w_s: torch.Tensor) -> torch.dtype:
    """float64 for a float64 student (hidden states and weight) on the CPU, else float32 (the CUDA
    kernel has no float64: a float64 student there computes in float32, as before)."""
    return torch.float64 if (h_s.dtype == torch.float64 and w_s.dtype == torch.float64
                             and h_s.device.type == "cpu") else torch.float32


def _linear_kd_chunks(h_s, w_s, b_s32, h_t, w_t, b_t, labels, opts, chunk, need, row_scale=None):
    """Loss rows and float32 gradients of the fused linear KD loss, chunk by chunk of rows.

    w_s: the student weight in the dtype of the products: float32, or bfloat16 on the tensor-core
    path (_tensor_core_head), where the hidden states are taken in bfloat16 too and the chunk's
    gradient is rounded to bfloat16 for the gradient products.
    need = (grad_h, grad_w, grad_b) flags; row_scale: None (1 for every row) or [N] float32.
    Returns (loss_rows, grad_h32, grad_w32, grad_b32), the gradients None where not needed.
    A float64 w_s (float64 student, _accumulation_dtype) makes all of these float64 instead.
    """
    n = h_s.shape[0]
    dev = h_s.device
    mm_dtype = w_s.dtype
    acc = torch.float64 if mm_dtype == torch.float64 else torch.float32
    any_grad = any(need)
    loss_rows = torch.empty(n, dtype=acc, device=dev)
    grad_h = torch.empty(h_s.shape, dtype=acc, device=dev) if need[0] else None
    # The first chunk writes grad_w (no zero fill of a weight-sized buffer), later ones add to it.
    grad_w = torch.empty(w_s.shape, dtype=acc, device=dev) if need[1] else None
    grad_b = torch.zeros(w_s.shape[0], dtype=acc, device=dev) if need[2] else None
    rows = min(chunk, n)
    s_buf = _chunk_logits_buffer(rows, w_s.shape[0], acc, h_s)
    t_buf = _chunk_logits_buffer(rows, w_t.shape[0], w_t.dtype, h_s)
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        hs = h_s[start:end].to(mm_dtype)
        # float32 logits: rounding them to bf16 first costs several percent of gradient accuracy.
        logits = s_buf[: end - start]
        if b_s32 is not None and mm_dtype == acc:
            torch.addmm(b_s32, hs, w_s.t(), out=logits)
        else:
            _mm_f32(hs, w_s.t(), logits)
            if b_s32 is not None:
                logits.add_(b_s32)
        ht = h_t[start:end].to(w_t.dtype)
        tl = t_buf[: end - start]
        if b_t is not None:
            torch.addmm(b_t, ht, w_t.t(), out=tl)
        else:
            torch.mm(ht, w_t.t(), out=tl)
        lab = labels[start:end] if labels is not None else None
        if not any_grad:
            rows, _ = torch.ops.pyfinetune.kd_loss_fwd(logits, tl, lab, need_grad=False, **opts)
            loss_rows[start:end] = rows
            continue
        # The chunk's gradient is written over its logits (no third chunk-sized buffer).
        loss_rows[start:end] = torch.ops.pyfinetune.kd_loss_fwd_inplace(logits, tl, lab, **opts)
        g = logits
        if row_scale is not None:
            g.mul_(row_scale[start:end].unsqueeze(-1))
        if grad_b is not None:
            grad_b.add_(g.sum(0))
        if mm_dtype != acc and (grad_h is not None or grad_w is not None):
            # into the teacher's buffer when it has the dtype: it is free once the kernel ran
            g = tl.copy_(g) if tl.dtype == mm_dtype else g.to(mm_dtype)
        if grad_h is not None:
            _mm_f32(g, w_s, grad_h[start:end])
        if grad_w is not None:
            _mm_f32(g.t(), hs, grad_w, accumulate=start > 0)
    if grad_w is not None and (n == 0 or not any_grad):
        grad_w.zero_()  # no chunk wrote it
    return loss_rows, grad_h, grad_w, grad_b


def _without_autocast(device: torch.device):
    """A context that turns autocast off on ``device`` (a no-op where it has no autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _FusedLinearKD(torch.autograd.Function):
    # forward and backward run with autocast off: under torch.autocast the chunk matmuls would
    # compute the student's logits in bf16/fp16 (the float32 logits are the point) and the
    # `matmul(out=float32)` of the gradient fails against autocast's low-precision result.
    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, opts, chunk, reduction, ignore_index):
        with _without_autocast(h_s.device):
            return _FusedLinearKD._forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, opts, chunk, reduction,
                                           ignore_index)

    @staticmethod
    def _forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, opts, chunk, reduction, ignore_index):
        need = tuple(ctx.needs_input_grad[:3])
        ctx.device = h_s.device
        # The weight in the dtype of the products: bfloat16 on the tensor-core path, else one
        # float32 copy of a low-precision weight per call (not one per chunk); a float64 student
        # (hidden states and weight) computes in float64, as kd_loss does.
        acc = _accumulation_dtype(h_s, w_s)
        w_mm = w_s.detach() if _tensor_core_head(h_s, w_s) else w_s.detach().to(acc)
        b_s32 = b_s.detach().to(acc) if b_s is not None else None
        ctx.acc = acc
        # The teacher's head runs in the promoted dtype of its hidden states, weight and bias
        # (a bf16 hidden state from autocast against a float32 weight: float32).
        t_dtype = torch.promote_types(h_t.dtype, w_t.dtype)
        if b_t is not None:
            t_dtype = torch.promote_types(t_dtype, b_t.dtype)
        h_t, w_t = h_t.detach(), w_t.detach().to(t_dtype)
        b_t = b_t.detach().to(t_dtype) if b_t is not None else None
        ctx.reduction = reduction
        ctx.dtypes = (h_s.dtype, w_s.dtype, b_s.dtype if b_s is not None else None)
        ctx.hidden_reshaped = h_s._base is not None  # a view made by fused_linear_kd_loss's reshape
        ctx.need = need
        if reduction == "none":
            # The per-row upstream gradient is only known in the backward, which recomputes the
            # chunks (a second pass of matmuls) instead of keeping [N, V] anything.
            loss_rows, _, _, _ = _linear_kd_chunks(h_s, w_mm, b_s32, h_t, w_t, b_t, labels, opts, chunk,
                                                   (False, False, False))
            ctx.save_for_backward(h_s, w_mm, b_s32, h_t, w_t, b_t, labels)
            ctx.opts, ctx.chunk = opts, chunk
            return loss_rows
        loss_rows, gh, gw, gb = _linear_kd_chunks(h_s, w_mm, b_s32, h_t, w_t, b_t, labels, opts, chunk, need)
        total = loss_rows.sum()
        if reduction == "batchmean":
            if labels is None:
                count = torch.full((), float(max(h_s.shape[0], 1)), dtype=total.dtype, device=total.device)
            else:
                count = (labels != ignore_index).sum().clamp_min(1).to(total.dtype)
            total = total / count
        else:
            count = None
        ctx.save_for_backward(gh, gw, gb, count)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        with _without_autocast(ctx.device):
            return _FusedLinearKD._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        if ctx.reduction == "none" and torch.is_grad_enabled():
            raise RuntimeError(
                "pyfinetune.fused_linear_kd_loss: reduction=\"none\" does not support create_graph=True (its "
                "backward recomputes the chunks with out= matmuls, which autograd cannot differentiate); use "
                "reduction=\"sum\" or \"batchmean\", whose gradients are differentiable in the upstream gradient"
            )
        if ctx.reduction == "none":
            h_s, w_mm, b_s32, h_t, w_t, b_t, labels = ctx.saved_tensors
            _, gh, gw, gb = _linear_kd_chunks(h_s, w_mm, b_s32, h_t, w_t, b_t, labels, ctx.opts, ctx.chunk, ctx.need,
                                              row_scale=grad_out.to(ctx.acc))
            scale = None
        else:
            gh, gw, gb, count = ctx.saved_tensors
            scale = grad_out.to(ctx.acc)
            if count is not None:
                scale = scale / count
        if scale is None:
            outs = [None if g is None else g.to(dtype) for g, dtype in zip((gh, gw, gb), ctx.dtypes)]
        else:
            outs = _ops.scale_kept_gradients(ctx, (gh, gw, gb), scale, ctx.dtypes)
            # The hidden states' kept gradient, handed on as it is, must not become their .grad when
            # they reached this function through a reshape (leading dimensions flattened): autograd
            # stores the reshape's backward view of the buffer as .grad without a copy, and zeroing
            # .grad in place (zero_grad(set_to_none=False), clipping, GradScaler.unscale_) would then
            # change what a retained graph's next backward reads. For an input passed as it is
            # (2-D hidden states, the weight, the bias) autograd itself copies while the graph is
            # kept and takes the buffer over otherwise: no copy here (V x H for the weight).
            if ctx.hidden_reshaped and outs[0] is gh and gh is not None:
                outs[0] = gh.clone()
        return (*outs, None, None, None, None, None, None, None, None)


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """:func:`kd_loss` of ``student_hidden @ student_weight.T (+ student_bias)`` against the
    teacher's logits, computed ``chunk_size`` rows at a time: the ``[N, V]`` logits never exist.

    Shapes: ``student_hidden [..., H_s]``, ``student_weight [V, H_s]``, ``teacher_hidden [..., H_t]``
    (same leading shape), ``teacher_weight [V, H_t]``, biases ``[V]``. The student's chunk logits
    are computed in float32 and the weight and bias gradients accumulated in float32 (on CUDA, a
    bfloat16 ``student_hidden`` and ``student_weight`` run the products on the tensor cores with
    float32 results, the chunk gradient rounded to bfloat16 for the two gradient products, as the
    unfused bfloat16 composition rounds its logits gradient; elsewhere, float32 products; a
    float64 ``student_hidden`` and ``student_weight`` compute, and return the loss, in float64, as
    :func:`kd_loss` does, CPU only); the gradients are returned in the dtypes of
    ``student_hidden``, ``student_weight`` and ``student_bias``. The teacher gets no gradient; its chunk logits are computed in the promoted
    dtype of ``teacher_hidden``, ``teacher_weight`` and ``teacher_bias``. Under ``torch.autocast``
    the function runs with autocast off, so the result is the same as without it.

    ``chunk_size`` (rows per chunk): default such that one chunk's float32 logits take at most
    96 MiB, the rows split evenly in multiples of 64 (704 rows for N = 4096, V = 32000). Memory
    beyond the inputs: two chunk-sized buffers (the student's chunk logits, which the kernel
    overwrites with their gradient, and the teacher's; on the CUDA bf16 path with a teacher of
    another dtype, a third of half that size for the bf16 gradient) and float32 ``[V, H_s]`` for
    the weight gradient (and for a float32 copy of a low-precision weight, except on that path).
    A smaller ``chunk_size`` saves memory at some cost in speed (the chunk matmuls run less
    efficiently). The gradients are computed in the forward; with ``reduction="none"`` the
    backward recomputes the chunks instead. Under torch.func transforms and forward-mode AD the
    loss is the unfused composition (the ``[N, V]`` logits exist), with exact derivatives of every
    order.
    """
    _check_options(temperature, alpha, divergence, beta, ignore_index, reduction, "fused_linear_kd_loss")
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if not isinstance(x, torch.Tensor) or x.dtype not in _LOGIT_DTYPES:
            raise TypeError(f"pyfinetune.fused_linear_kd_loss: {name} must be a float tensor")
        _check_same_device(name, x, student_hidden, "fused_linear_kd_loss", "student_hidden")
    _warn_large_temperature(temperature, student_hidden, student_weight, teacher_hidden, teacher_weight)
    if student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError("pyfinetune.fused_linear_kd_loss: student_weight and teacher_weight must be 2-D [V, H]")
    vocab = student_weight.shape[0]
    if vocab < 1:
        raise ValueError("pyfinetune.fused_linear_kd_loss: student_weight must have at least one row (V >= 1 "
                         f"classes), got shape {tuple(student_weight.shape)}")
    if teacher_weight.shape[0] != vocab:
        raise ValueError(
            f"pyfinetune.fused_linear_kd_loss: teacher_weight must have V = {vocab} rows like student_weight, got "
            f"{tuple(teacher_weight.shape)}"
        )
    if student_hidden.dim() < 1 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(
            f"pyfinetune.fused_linear_kd_loss: student_hidden must have shape [..., {student_weight.shape[1]}], got "
            f"{tuple(student_hidden.shape)}"
        )
    if teacher_hidden.dim() < 1 or teacher_hidden.shape[-1] != teacher_weight.shape[1] \
            or tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(
            f"pyfinetune.fused_linear_kd_loss: teacher_hidden must have shape "
            f"{tuple(student_hidden.shape[:-1]) + (teacher_weight.shape[1],)}, got {tuple(teacher_hidden.shape)}"
        )
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is None:
            continue
        if not isinstance(b, torch.Tensor) or b.dtype not in _LOGIT_DTYPES:
            got = b.dtype if isinstance(b, torch.Tensor) else type(b).__name__
            raise TypeError(f"pyfinetune.fused_linear_kd_loss: {name} must be None or a float tensor, got {got}")
        if tuple(b.shape) != (vocab,):
            raise ValueError(f"pyfinetune.fused_linear_kd_loss: {name} must be None or a tensor of shape [{vocab}], "
                             f"got {tuple(b.shape)}")
        _check_same_device(name, b, student_hidden, "fused_linear_kd_loss", "student_hidden")
    if chunk_size is None:
        chunk = _default_chunk_rows(math.prod(student_hidden.shape[:-1]), vocab)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"pyfinetune.fused_linear_kd_loss: chunk_size must be a positive int or None, got {chunk_size!r}")
    else:
        chunk = int(chunk_size)
    # Rows by the leading dimensions (not -1: a hidden size of 0 leaves -1 ambiguous).
    h_s = (student_hidden if student_hidden.dim() == 2
           else student_hidden.reshape(math.prod(student_hidden.shape[:-1]), student_hidden.shape[-1]))
    h_t = teacher_hidden.reshape(math.prod(teacher_hidden.shape[:-1]), teacher_hidden.shape[-1])
    lab = _as_labels(labels, student_hidden.shape[:-1], student_hidden.device, fn="fused_linear_kd_loss",
                     lead_name="student_hidden", vocab=vocab, ignore_index=int(ignore_index))
    opts = dict(temperature=float(temperature), alpha=float(alpha), divergence=divergence, beta=float(beta),
                ignore_index=int(ignore_index))
    if _ops._transforms_active():
        # torch.func transforms, forward-mode AD: the unfused composition, [N, V] logits included.
        s_dtype = torch.float64 if h_s.dtype == student_weight.dtype == torch.float64 else torch.float32
        z_s = torch.nn.functional.linear(h_s.to(s_dtype), student_weight.to(s_dtype),
                                         None if student_bias is None else student_bias.to(s_dtype))
        t_dtype = torch.promote_types(h_t.dtype, teacher_weight.dtype)
        if teacher_bias is not None:
            t_dtype = torch.promote_types(t_dtype, teacher_bias.dtype)
        z_t = torch.nn.functional.linear(h_t.detach().to(t_dtype), teacher_weight.detach().to(t_dtype),
                                         None if teacher_bias is None else teacher_bias.detach().to(t_dtype))
        options = (opts["temperature"], opts["alpha"], divergence, opts["beta"], opts["ignore_index"])
        # The kernels' arithmetic dtype is the student's (float64 only for a float64 student).
        log_p = torch.log_softmax(z_t.to(s_dtype) / options[0], dim=-1)
        return _kd_composed(z_s, log_p, lab, options, reduction, s_dtype)
    return _FusedLinearKD.apply(h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias, lab, opts, chunk,
                                reduction, int(ignore_index))


# ----------------------------------------------------------------------------------- module
class DistillationLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`kd_loss`; the keyword arguments are validated here, once.

    ``forward(student_logits, teacher_logits, labels=None)``.
    """

    def __init__(self, *, temperature: float = 1.0, alpha: float = 0.5, divergence: str = "forward_kl",
                 beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean") -> None:
        super().__init__()
        _check_options(temperature, alpha, divergence, beta, ignore_index, reduction)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.divergence = divergence
        self.beta = float(beta)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, labels, temperature=self.temperature, alpha=self.alpha,
                       divergence=self.divergence, beta=self.beta, ignore_index=self.ignore_index,
                       reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, divergence={self.divergence!r}, "
                f"beta={self.beta}, ignore_index={self.ignore_index}, reduction={self.reduction!r}")
