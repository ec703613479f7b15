"""The raw ops of pyfinetune, ``torch.ops.pyfinetune.*``, with their fake (meta) kernels.

Most users want the high-level APIs (:mod:`pyfinetune.optim`); these functions are the
building blocks, documented here with the shapes and dtypes they accept. Registering the fake
kernels makes the ops traceable by ``torch.compile(fullgraph=True)`` and checkable by
``torch.library.opcheck``.

Fused optimizer ops (mutate their first arguments in place, return nothing):

``torch.ops.pyfinetune.fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
anchors, masks, steps, lrs, lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, *,
amsgrad, maximize, decoupled_l2sp, grad_scale=None, found_inf=None)``

``torch.ops.pyfinetune.fused_sgd_(params, grads, momentum_buffers, anchors, masks, lrs,
lr_tensors, momentums, dampenings, weight_decays, l2sps, l1s, *, nesterov, maximize,
decoupled_l2sp, grad_scale=None, found_inf=None)``

* ``params``: n tensors of one device and one dtype (float32, bfloat16, float16, float64), each
  non-overlapping and dense; ``grads`` match them in dtype, shape and strides.
* optimizer state (``exp_avgs`` ...): float32 (float64 for float64 parameters), laid out like
  the parameters. ``max_exp_avg_sqs`` is empty unless ``amsgrad``; ``momentum_buffers`` is empty
  when no parameter of the call uses momentum.
* ``anchors``: empty or n entries, each None or a tensor of the parameter's shape in float32,
  bfloat16 or the parameter's dtype (the L2-SP pull-back point).
* ``masks``: empty or n entries, each None or a bool tensor of the parameter's shape; entries
  where the mask is False are set to 0 in the parameter and in every state tensor.
* ``steps``: n float32 scalar tensors on the parameters' device, already incremented.
* the float lists hold one value per parameter; ``lr_tensors`` is empty or holds per-parameter
  optional scalar tensors on the device that override ``lrs`` (CUDA-graph capturable).
* ``grad_scale`` / ``found_inf``: float32 scalars on the device (the ``torch.amp.GradScaler``
  contract): gradients are divided by ``grad_scale``; a nonzero ``found_inf`` skips the update.

Pruning ops (return new tensors; the differentiable Python functions below wrap them):

``torch.ops.pyfinetune.masked_matmul(x, weight, mask, bias) -> y``: ``y = x @ (weight * mask)^T + bias``
computed densely (the path below the sparsity crossover). ``x`` [N, K], ``weight`` [M, K],
``mask`` [M, K] bool, ``bias`` None or [M]; ``x``, ``weight`` and ``bias`` share one dtype
(float32, bfloat16, float16, float64) and one device. Pruned positions contribute exactly 0, even
where ``weight`` holds inf or NaN there.

``torch.ops.pyfinetune.masked_matmul_backward(grad_out, x, weight, mask, output_mask, dense_grad)
-> (dx [N, K], dweight [M, K], dbias [M])``: ``dweight`` is 0 at pruned positions unless
``dense_grad`` (movement pruning, regrowth). An output whose ``output_mask`` entry is False is an
empty tensor (shape [0]).

``torch.ops.pyfinetune.csr_linear(x, values, crow_indices, col_indices, row_order, bias) -> y``:
``y = x @ W^T + bias`` for a weight W [M, K] kept in compressed rows: ``values`` [nnz] (x's dtype),
``crow_indices`` [M + 1], ``col_indices`` [nnz] (columns sorted within a row), ``row_order`` [M]
(rows by decreasing length), all int32; :func:`compressed_pattern` builds them from a mask.

``torch.ops.pyfinetune.csr_linear_backward(grad_out, x, values, crow_indices, col_indices,
row_order, ccol_indices, row_indices, csc_to_csr, output_mask) -> (dx [N, K], dvalues [nnz],
dbias [M])``: ``ccol_indices`` [K + 1], ``row_indices`` [nnz], ``csc_to_csr`` [nnz] are the
compressed-column view of the same pattern (``csc_to_csr[p]`` = the position in ``values`` of
compressed-column entry ``p``). Outputs not asked for are empty tensors.

``torch.ops.pyfinetune.tiled_csr_linear(x, tile_values, tile_ptr, tile_loc, out_features, bias) -> y`` and
``torch.ops.pyfinetune.tiled_csr_linear_backward_input(grad_out, tile_values, tile_ptr, tile_loc,
in_features) -> grad_out @ W`` and ``torch.ops.pyfinetune.tiled_csr_linear_backward_values(grad_out, x,
tile_ptr, tile_loc, tile_src) -> dvalues`` ((grad_out^T @ x) at the kept positions, compressed-row order):
the same product from the kept weights regrouped in tiles of 128 rows x 64 columns
(:func:`tiled_pattern` builds ``tile_ptr`` int32 and ``tile_loc`` int16 from a compressed-row
pattern, and the order ``tile_src`` that takes ``values`` to ``tile_values = values[tile_src]``).
Its CUDA kernel (float16 / bfloat16, compute capability 8.0+) expands each tile into shared memory
and multiplies on the tensor cores; the CPU kernel checks the tile data and computes densely.
Differentiable in all floating inputs (:func:`tiled_csr_linear`'s backward runs the two gradient
ops on CUDA and csr_linear's backward for the rest).

All four accumulate in float32 (float64 for float64 inputs) and round once. The CPU kernels also
check the index tensors' contents (monotone row pointers, indices in range). The CUDA kernels
cannot read them on the host without a synchronization: they assert on the device what they index
with (a malformed pattern stops with a device assertion, not an out-of-bounds access), but not that
``row_order`` is a permutation of the rows (a repeated row would leave another row of ``y``
unwritten): build the patterns with :func:`compressed_pattern` / :func:`pattern_from_csr` /
:func:`tiled_pattern`, which :class:`~pyfinetune.prune.SparseLinear` and the functions below do.

``torch.ops.pyfinetune.csr_to_dense(values, crow_indices, col_indices, cols) -> [M, cols]``: the
dense weight of a compressed-row pattern, zeros at the pruned positions, each row written once;
``torch.ops.pyfinetune.csr_gather(dense, crow_indices, col_indices) -> [nnz]``: the kept positions
of a dense [M, K] tensor (any strides), in the pattern's order. Columns must increase strictly
within a row; any float dtype. Each is the other's gradient (:func:`csr_to_dense`,
:func:`csr_gather`).
Distillation ops (forward with the gradient; the backward only scales the saved gradient):

``torch.ops.pyfinetune.kd_loss_fwd(student, teacher, labels, *, temperature, alpha, divergence,
beta, ignore_index, need_grad, grad_scale=1.0) -> (loss, grad)``

``torch.ops.pyfinetune.kd_loss_topk_fwd(student, teacher_values, teacher_indices, labels, *,
temperature, alpha, divergence, beta, ignore_index, need_grad, grad_scale=1.0) -> (loss, grad)``

* ``student``, ``teacher``: [N, V] float32, bfloat16, float16 or float64 (each its own dtype),
  unit stride along V, any row stride. ``teacher_values`` [N, k] float, ``teacher_indices``
  [N, k] int64 in [0, V), distinct within a row. ``labels``: None or int64 [N].
* ``loss``: [N] float32 (float64 when an input is float64), the per-row loss, 0 for ignored rows.
* ``grad``: ``grad_scale`` * d(loss[r]) / d(student[r]), [N, V] in the student's dtype, or an empty
  tensor when ``need_grad`` is False. ``grad_scale`` (finite > 0, default 1) lets a caller who knows
  the factor of its reduction (1 / rows of a batch mean) have the kernel apply it (one rounding, no
  later pass). The autograd formula of both ops is d/d(student) = grad * g[:, None] / grad_scale
  for the incoming gradient g of ``loss``; the teacher and the labels get no gradient. A float16
  student's grad is float16: ``pyfinetune.losses.kd_loss`` passes a scale that keeps forward_kl /
  jsd entries in float16's normal range, and gives reverse_kl (no bound on its entries) a float32
  student instead; a caller of the raw op with float16 and reverse_kl gets the float16 rounding.

``torch.ops.pyfinetune.kd_loss_fwd_inplace(student, teacher, labels, *, temperature, alpha,
divergence, beta, ignore_index, grad_scale=1.0) -> loss``: ``kd_loss_fwd`` with the gradient written
over ``student`` (contiguous, sharing no memory with ``teacher`` or ``labels``), for a caller that owns
the logits buffer and needs no copy of the logits afterwards (:func:`pyfinetune.fused_linear_kd_loss`'s
chunks: one chunk-sized buffer fewer). Not differentiable: call it on tensors that need no gradient.
Its results are ``kd_loss_fwd``'s bit for bit when the student starts on a 16-byte boundary (as a
fresh or chunked buffer does); otherwise the CUDA kernel's vector split of a row differs and the
two agree to float32 rounding.
"""

from __future__ import annotations

import math
import operator
import os
import weakref
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode


@torch.library.register_fake("pyfinetune::fused_adamw_")
def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                      lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, *, amsgrad, maximize,
                      decoupled_l2sp, grad_scale=None, found_inf=None):
    op = "fused_adamw_"
    _check_fake_lists(op, params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    _check_fake_devices(op, params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                        max_exp_avg_sqs=max_exp_avg_sqs, anchors=anchors, masks=masks, steps=steps,
                        lr_tensors=lr_tensors, grad_scale=grad_scale, found_inf=found_inf)
    _check_fake_common(op, params, grads, anchors, masks, lrs, lr_tensors, weight_decays, l2sps, l1s,
                       grad_scale, found_inf)
    _check_fake_values(op, len(params), beta1s=(beta1s, 0.0, 1.0, False), beta2s=(beta2s, 0.0, 1.0, False),
                       epss=(epss, 0.0, math.inf, False))
    _check_fake_states(op, params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if amsgrad:
        _check_fake_lists(op, params, max_exp_avg_sqs=max_exp_avg_sqs)
        _check_fake_states(op, params, max_exp_avg_sqs=max_exp_avg_sqs)
    else:
        _fake_check(not max_exp_avg_sqs, op, "max_exp_avg_sqs must be empty when amsgrad=False")
    _fake_check(len(steps) == len(params), op, f"steps must have one tensor per parameter ({len(params)})")
    for i, t in enumerate(steps):
        _check_fake_scalar(op, f"steps[{i}]", t)
    return None


@torch.library.register_fake("pyfinetune::fused_sgd_")
def _fused_sgd_fake(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings,
                    weight_decays, l2sps, l1s, *, nesterov, maximize, decoupled_l2sp, grad_scale=None,
                    found_inf=None):
    op = "fused_sgd_"
    _check_fake_lists(op, params, grads=grads)
    _check_fake_devices(op, params, grads=grads, momentum_buffers=momentum_buffers, anchors=anchors,
                        masks=masks, lr_tensors=lr_tensors, grad_scale=grad_scale, found_inf=found_inf)
    _check_fake_common(op, params, grads, anchors, masks, lrs, lr_tensors, weight_decays, l2sps, l1s,
                       grad_scale, found_inf)
    _check_fake_values(op, len(params), momentums=(momentums, 0.0, math.inf, False),
                       dampenings=(dampenings, 0.0, 1.0, True))
    if momentum_buffers:
        _check_fake_lists(op, params, momentum_buffers=momentum_buffers)
        _check_fake_states(op, params, momentum_buffers=momentum_buffers)
    else:
        _fake_check(all(m == 0.0 for m in momentums), op,
                    "momentums are not all 0 but momentum_buffers is empty; pass one buffer per parameter")
    _fake_check(not nesterov or all(m > 0.0 and d == 0.0 for m, d in zip(momentums, dampenings)), op,
                "nesterov=True needs momentum > 0 and dampening = 0")
    return None


# What the fused optimizer kernels check of their arguments' metadata and values
# (csrc/fused_optim_checks.cpp; not the memory overlaps, which need the data pointers): a fake or
# meta call must refuse what the kernels refuse.
def _check_fake_values(op, n, **named):
    for name, (values, lo, hi, hi_inclusive) in named.items():
        _fake_check(len(values) == n, op, f"{name} must have one value per parameter ({n}), got {len(values)}")
        for i, x in enumerate(values):
            ok = math.isfinite(x) and x >= lo and (x <= hi if hi_inclusive else x < hi)
            _fake_check(ok, op, f"{name}[{i}] must be in [{lo}, {hi}{']' if hi_inclusive else ')'}, got {x}")


def _check_fake_scalar(op, name, t, allow_double=False):
    _fake_check(t.layout == torch.strided and t.numel() == 1, op, f"{name} must hold exactly one value")
    ok = t.dtype == torch.float32 or (allow_double and t.dtype == torch.float64)
    _fake_check(ok, op, f"{name} must be float32{' or float64' if allow_double else ''}, got {t.dtype}")


def _state_dtype(param: Tensor) -> torch.dtype:
    """The dtype of a parameter's optimizer state: float64 for float64 parameters, else float32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _check_fake_states(op, params, **lists):
    for name, states in lists.items():
        for i, (t, p) in enumerate(zip(states, params)):
            _fake_check(t.dtype == _state_dtype(p), op,
                        f"{name}[{i}] must be {_state_dtype(p)} (optimizer state of a {p.dtype} parameter), got "
                        f"{t.dtype}")


def _check_fake_common(op, params, grads, anchors, masks, lrs, lr_tensors, weight_decays, l2sps, l1s, grad_scale,
                       found_inf):
    n = len(params)
    hypers = dict(lrs=lrs, weight_decays=weight_decays, l2sps=l2sps, l1s=l1s)
    _check_fake_values(op, n, **{k: (v, 0.0, math.inf, False) for k, v in hypers.items()})
    if n:
        dtype = params[0].dtype
        _fake_check(dtype in _FLOAT_DTYPES, op,
                    f"params must be float32, bfloat16, float16 or float64, got {dtype}")
        for name, values in hypers.items():
            _fake_check(dtype == torch.float64 or all(x <= _F32_MAX for x in values), op,
                        f"{name} must be at most {_F32_MAX:.6g} (float32's largest) for {dtype} parameters")
    for i, p in enumerate(params):
        _fake_check(p.layout == torch.strided and p.dtype == params[0].dtype, op,
                    f"all params must be dense tensors of one dtype: params[0] is {params[0].dtype}, params[{i}] "
                    f"{p.dtype}")
        _fake_check(grads[i].layout == torch.strided and grads[i].dtype == p.dtype, op,
                    f"grads[{i}] must be a dense tensor of the dtype of params[{i}] ({p.dtype}), got "
                    f"{grads[i].dtype}")
    for name, entries in (("anchors", anchors), ("masks", masks), ("lr_tensors", lr_tensors)):
        _fake_check(len(entries) in (0, n), op,
                    f"{name} must be empty or have one entry per parameter ({n}), got {len(entries)}")
    for i, a in enumerate(anchors):
        _fake_check(a is not None or l2sps[i] == 0.0, op, f"l2sps[{i}] is {l2sps[i]} but anchors[{i}] is None")
        if a is not None:
            _fake_check(a.shape == params[i].shape and a.dtype in (params[i].dtype, torch.float32, torch.bfloat16),
                        op, f"anchors[{i}] must have the shape of params[{i}] and its dtype, float32 or "
                                f"bfloat16, got {a.dtype} of shape {tuple(a.shape)}")
    if not anchors:
        _fake_check(all(x == 0.0 for x in l2sps), op, "l2sps are not all 0 but anchors is empty")
    for i, m in enumerate(masks):
        if m is not None:
            _fake_check(m.dtype == torch.bool and m.shape == params[i].shape, op,
                        f"masks[{i}] must be a bool tensor of the shape of params[{i}], got {m.dtype} of shape "
                        f"{tuple(m.shape)}")
    for i, t in enumerate(lr_tensors):
        if t is not None:
            _check_fake_scalar(op, f"lr_tensors[{i}]", t, allow_double=True)
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None:
            _check_fake_scalar(op, name, t)


def _check_fake_devices(op, params, **named):
    """Every tensor argument on the parameters' device, as the kernels check. Also here: a meta
    tensor mixed with real ones dispatches to the fake kernel, which must refuse the call like the
    real kernel would instead of returning nothing done (the in-place step silently skipped)."""
    if not params:
        return
    device = params[0].device
    for name, value in (("params", params), *named.items()):
        entries = value if isinstance(value, (list, tuple)) else [value]
        for i, t in enumerate(entries):
            if t is not None and t.device != device:
                where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                raise RuntimeError(f"pyfinetune.{op}: {where} must be on the parameters' device {device}, got {t.device}")


def _check_fake_lists(op, params, **lists):
    # The full validation runs in the real kernels; under tracing we check what shapes allow.
    for name, tensors in lists.items():
        if len(tensors) != len(params):
            raise RuntimeError(
                f"pyfinetune.{op}: {name} must have one tensor per parameter ({len(params)}), got {len(tensors)}"
            )
        for i, (t, p) in enumerate(zip(tensors, params)):
            if t.shape != p.shape:
                raise RuntimeError(
                    f"pyfinetune.{op}: {name}[{i}] must have the shape of params[{i}] {tuple(p.shape)}, "
                    f"got {tuple(t.shape)}"
                )
            if t.layout == torch.strided and p.layout == torch.strided and any(
                    n > 1 and ts != ps for n, ts, ps in zip(p.shape, t.stride(), p.stride())):
                raise RuntimeError(f"pyfinetune.{op}: {name}[{i}] must have the strides of params[{i}] {p.stride()}, "
                                   f"got {t.stride()}")


def _kd_fake_outputs(student, teacher, need_grad):
    if student.dim() != 2:
        raise RuntimeError(f"pyfinetune.kd_loss: student must be 2-D [N, V], got shape {tuple(student.shape)}")
    n, v = student.shape
    wide = torch.float64 in (student.dtype, teacher.dtype)
    loss = student.new_empty((n,), dtype=torch.float64 if wide else torch.float32)
    grad = student.new_empty((n, v)) if need_grad else student.new_empty((0,))
    return loss, grad


_F32_MIN, _F32_MAX = float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max)


def _kd_fake_checks(op, student, teacher, labels, temperature, alpha, divergence, beta, grad_scale,
                    teacher_name="teacher"):
    """The metadata and option checks of the kernels (kd_loss_checks.cpp), which a fake / meta
    call must refuse like the real one instead of returning plausible outputs."""
    for name, t in (("student", student), (teacher_name, teacher)):
        _fake_check(t.layout == torch.strided and t.dim() == 2 and t.dtype in _FLOAT_DTYPES, op,
                    lambda name=name, t=t: f"{name} must be a 2-D float32, bfloat16, float16 or float64 tensor "
                                           f"[N, V], got {t.dtype} of shape {tuple(t.shape)}")
        _fake_check(t.shape[1] <= 1 or t.stride(1) == 1, op,
                    lambda name=name, t=t: f"{name} must have unit stride along V (dim 1), got strides {t.stride()}")
    _fake_check(student.shape[1] >= 1, op,
                lambda: f"student must have at least one class (V >= 1), got shape {tuple(student.shape)}")
    _fake_check(1e-18 <= temperature <= 1e18, op,
                lambda: f"temperature must be a number in [1e-18, 1e18] (squared in float32), got {temperature}")
    _fake_check(0.0 <= alpha <= 1.0, op, lambda: f"alpha must be in [0, 1], got {alpha}")
    _fake_check(0.0 < beta < 1.0, op, lambda: f"beta must be in (0, 1), got {beta}")
    _fake_check(_F32_MIN <= grad_scale <= _F32_MAX and temperature * temperature * grad_scale <= _F32_MAX, op,
                lambda: f"grad_scale must be a finite number > 0 in float32's normal range with temperature^2 * "
                        f"grad_scale <= 3.40282e+38, got {grad_scale}")
    _fake_check(divergence in ("forward_kl", "reverse_kl", "jsd"), op,
                lambda: f'divergence must be "forward_kl", "reverse_kl" or "jsd", got "{divergence}"')
    if labels is not None:
        _fake_check(labels.dtype == torch.int64 and labels.dim() == 1 and labels.shape[0] == student.shape[0], op,
                    lambda: f"labels must be an int64 tensor of shape [N] = [{student.shape[0]}], got {labels.dtype} "
                            f"of shape {tuple(labels.shape)}")


def _kd_fake_devices(op, student, **others):
    # As the kernels check; a meta tensor mixed with real ones dispatches here and must be refused
    # (the outputs would be uninitialized real tensors).
    for name, t in others.items():
        if t is not None and t.device != student.device:
            raise RuntimeError(f"pyfinetune.{op}: {name} must be on {student.device} like student, got {t.device}")


@torch.library.register_fake("pyfinetune::kd_loss_fwd")
def _kd_loss_fwd_fake(student, teacher, labels, *, temperature, alpha, divergence, beta, ignore_index, need_grad,
                      grad_scale=1.0):
    _kd_fake_devices("kd_loss_fwd", student, teacher=teacher, labels=labels)
    _kd_fake_checks("kd_loss_fwd", student, teacher, labels, temperature, alpha, divergence, beta, grad_scale)
    if teacher.shape != student.shape:
        raise RuntimeError(
            f"pyfinetune.kd_loss_fwd: teacher must have the shape of student {tuple(student.shape)}, "
            f"got {tuple(teacher.shape)}"
        )
    return _kd_fake_outputs(student, teacher, need_grad)


@torch.library.register_fake("pyfinetune::kd_loss_fwd_inplace")
def _kd_loss_fwd_inplace_fake(student, teacher, labels, *, temperature, alpha, divergence, beta, ignore_index,
                              grad_scale=1.0):
    _kd_fake_devices("kd_loss_fwd_inplace", student, teacher=teacher, labels=labels)
    _kd_fake_checks("kd_loss_fwd_inplace", student, teacher, labels, temperature, alpha, divergence, beta, grad_scale)
    if teacher.shape != student.shape:
        raise RuntimeError(
            f"pyfinetune.kd_loss_fwd_inplace: teacher must have the shape of student {tuple(student.shape)}, "
            f"got {tuple(teacher.shape)}"
        )
    if not student.is_contiguous():
        raise RuntimeError(
            f"pyfinetune.kd_loss_fwd_inplace: student must be contiguous (its gradient is written over it in the "
            f"layout [N, V]), got strides {tuple(student.stride())}"
        )
    return _kd_fake_outputs(student, teacher, False)[0]


@torch.library.register_fake("pyfinetune::_scale_kept_")
def _scale_kept_fake(grad, scale):
    op = "pyfinetune._scale_kept_"
    if not grad.is_contiguous() or grad.dtype not in _OPMATH:
        raise RuntimeError(f"{op}: grad must be a contiguous float32, float64, bfloat16 or float16 tensor")
    if scale.numel() != 1 or scale.dtype != _OPMATH[grad.dtype] or scale.device != grad.device:
        raise RuntimeError(f"{op}: scale must be one {_OPMATH[grad.dtype]} value on grad's device {grad.device}")


@torch.library.register_fake("pyfinetune::kd_loss_topk_fwd")
def _kd_loss_topk_fwd_fake(student, teacher_values, teacher_indices, labels, *, temperature, alpha, divergence, beta,
                           ignore_index, need_grad, grad_scale=1.0):
    _kd_fake_devices("kd_loss_topk_fwd", student, teacher_values=teacher_values, teacher_indices=teacher_indices,
                     labels=labels)
    if teacher_indices.shape != teacher_values.shape:
        raise RuntimeError(
            f"pyfinetune.kd_loss_topk_fwd: teacher_indices must have the shape of teacher_values "
            f"{tuple(teacher_values.shape)}, got {tuple(teacher_indices.shape)}"
        )
    op = "kd_loss_topk_fwd"
    _kd_fake_checks(op, student, teacher_values, labels, temperature, alpha, divergence, beta, grad_scale,
                    teacher_name="teacher_values")
    _fake_check(divergence != "reverse_kl", op,
                lambda: "reverse_kl is not defined with a top-k teacher (the teacher's probability is 0 outside "
                        "its k entries)")
    _fake_check(teacher_values.shape[0] == student.shape[0], op,
                lambda: f"teacher_values must have one row per row of student ({student.shape[0]}), got "
                        f"{teacher_values.shape[0]}")
    _fake_check(1 <= teacher_values.shape[1] <= student.shape[1], op,
                lambda: f"teacher_values must have k in [1, V = {student.shape[1]}] columns, got {teacher_values.shape[1]}")
    _fake_check(teacher_indices.dtype == torch.int64, op,
                lambda: f"teacher_indices must be int64, got {teacher_indices.dtype}")
    return _kd_fake_outputs(student, teacher_values, need_grad)


def _kd_setup_context(ctx, inputs, keyword_only_inputs, output):
    _, grad = output
    ctx.need_grad = keyword_only_inputs["need_grad"]
    ctx.grad_scale = keyword_only_inputs.get("grad_scale", 1.0)
    # The kept gradient is an output nobody differentiates: without this, autograd would
    # materialize a logits-sized tensor of zeros as its incoming gradient on every backward.
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)


def _is_eager(t: torch.Tensor) -> bool:
    """True for a plain tensor outside any tracing (compile, export, fake or functional modes)."""
    # is_compiling() first: under Dynamo it is a constant and the rest is never traced.
    return not torch.compiler.is_compiling() and type(t) is torch.Tensor and _get_current_dispatch_mode() is None


def _is_plain_eager(*tensors: Optional[Tensor]) -> bool:
    """True when a call with these tensors (None entries allowed) runs in plain eager mode: every
    tensor a plain ``torch.Tensor``, no compile, export, fake, functional or other dispatch mode,
    no torch.func transform, no forward-mode AD and no TorchScript tracer. A few hundred nanoseconds: cheap enough to
    pick a lean path per call (``pyfinetune.losses``) where tracing needs the registered op."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if (torch._C._functorch.peek_interpreter_stack() is not None or torch._C._get_tracing_state() is not None
            or torch.autograd.forward_ad._current_level >= 0):
        return False
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor:
            return False
    return True


# A kept gradient at least this large on a GPU is scaled in place after a look at the scale on the
# host (one synchronization, about the time of a kernel launch or two), instead of the product as a
# new tensor: at 8192 x 128256 bf16 on an H100 the new tensor cost 6 ms (the [1, 1] float32 scale
# promotes the product to a float32 tensor, then a cast: three passes) where scaling in place takes
# one pass and scaling by 1 none. Below it the synchronization is not worth it.
_SYNC_SCALE_MIN_BYTES = 64 << 20


# The dtype elementwise products of a dtype are computed in (a Python number multiplies in it).
_OPMATH = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
           torch.float16: torch.float32}


def _may_read_on_host(kept) -> bool:
    """Whether the kept buffers ``kept`` (all on one device) may be scaled in place after a host
    look at the scale: plain eager tensors, on the CPU, or on a GPU when large (a synchronization
    then costs less than the pass it saves) and no CUDA graph is being captured."""
    if not all(_is_eager(g) for g in kept):
        return False
    device = kept[0].device
    if device.type == "cpu":
        return True
    if device.type != "cuda" or sum(g.numel() * g.element_size() for g in kept) < _SYNC_SCALE_MIN_BYTES:
        return False
    # Not while a CUDA graph is captured, nor when the user asked to be told of synchronizations.
    return not torch.cuda.is_current_stream_capturing() and torch.cuda.get_sync_debug_mode() == 0


def scale_kept_gradients(ctx, grads, scale: torch.Tensor, dtypes, *, in_place_ok: bool = True):
    """The backward of a loss that kept its unscaled gradients from the forward: ``grads[i] * scale``
    cast to ``dtypes[i]`` (None entries stay None), the product in the dtype of ``scale``.

    Eager, when every entry of ``scale`` is finite and nonzero (so that it can be undone), the kept
    buffers are scaled in place and handed on: no second logits- or weight-sized tensor and no
    fresh pages to fault in; a scale of exactly 1 (``loss.backward()`` of a summed loss) costs no
    pass at all. ``.data`` leaves the saved tensors' versions unchanged so that a retained graph
    can still unpack them, and ``ctx.applied_scale`` records what they now hold, so a later
    backward through the retained graph divides it out. That check reads the scale on the host: on
    a GPU it is done only for kept gradients of at least ``_SYNC_SCALE_MIN_BYTES`` outside CUDA
    graph capture (below that the synchronization costs more than it saves). Under tracing the
    compiler plans the buffers itself: there, as on a GPU for small gradients, the product is a new
    tensor. ``in_place_ok=False``: always a new tensor (the kept buffers are visible to the caller,
    as the registered ops' second output is).
    """
    applied = getattr(ctx, "applied_scale", None)
    kept = [g for g in grads if g is not None]
    if applied is not None:
        # A later backward through a retained graph. The buffers hold applied * gradient only if
        # they are the very tensors scaled in place: a saved-tensor hook that unpacks a copy
        # (save_on_cpu, non-reentrant checkpointing) hands out the unscaled values again. Object
        # identity, not the address, which the allocator may give to a fresh copy.
        refs = getattr(ctx, "scaled_refs", {})
        if getattr(ctx, "applied_unchecked", False) and any(refs.get(i, _dead_ref)() is g for i, g in enumerate(grads)):
            # Scaled on the device (`_device_scale`) by a factor nobody looked at: only now, in a
            # backward through a retained graph (rare), is it read, once it is found invertible
            # (until then every such backward raises).
            if not _host_scale(applied)[0]:
                raise RuntimeError(
                    "pyfinetune: a backward through a retained graph of a distillation loss whose first backward "
                    f"had an upstream gradient of {applied.reshape(-1)[0].item()} (zero or not finite): the kept "
                    "gradient was scaled by it in place on the device and cannot be recovered; set "
                    f"{DEVICE_SCALE_ENV}=0 for such a graph (the scale is then read on the host first)")
            ctx.applied_unchecked = False

        out_scales = [None if g is None else (scale / applied if refs.get(i, _dead_ref)() is g else scale)
                      for i, g in enumerate(grads)]
        return [None if g is None else _product(g, sc, dtype) for g, sc, dtype in zip(grads, out_scales, dtypes)]
    # Under create_graph the scale (the upstream gradient) is part of a graph: the product must be
    # an op on it, so that the gradient of this backward with respect to the upstream one exists.
    if in_place_ok and not scale.requires_grad and kept and _device_scale(kept, scale):
        for g in kept:
            torch.ops.pyfinetune._scale_kept_(g.data, scale)
        ctx.applied_scale = scale.detach().clone()
        ctx.applied_unchecked = True
        ctx.scaled_refs = {i: weakref.ref(g) for i, g in enumerate(grads) if g is not None}
        return [None if g is None else (g if g.dtype == dtype else g.to(dtype)) for g, dtype in zip(grads, dtypes)]
    in_place = in_place_ok and not scale.requires_grad and bool(kept) and _may_read_on_host(kept)
    factor = None
    if in_place:
        in_place, factor = _host_scale(scale)
    if in_place:
        ctx.applied_scale = scale.detach().clone()
        ctx.scaled_refs = {i: weakref.ref(g) for i, g in enumerate(grads) if g is not None}
    outs = []
    for g, dtype in zip(grads, dtypes):
        if g is None:
            outs.append(None)
        elif in_place:
            if factor == 1.0:
                pass  # x * 1 == x in every dtype: no pass over the buffer
            elif factor is not None and _OPMATH.get(g.dtype) == scale.dtype:
                # A host number: g.mul_(float) multiplies in g's arithmetic dtype (float32 for
                # bf16 / fp16: the scale is not rounded to g's dtype) in one vectorized pass, the
                # same bits as the product with the scale tensor.
                g.data.mul_(factor)
            else:
                g.data.mul_(scale)
            outs.append(g if g.dtype == dtype else g.to(dtype))
        else:
            outs.append(_product(g, scale, dtype))
    return outs


def _product(g: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """``g * scale`` as a new tensor (in the scale's dtype), cast to ``dtype``."""
    g = g.mul(scale)
    return g if g.dtype == dtype else g.to(dtype)


def _dead_ref():
    return None


# PYFINETUNE_KD_DEVICE_SCALE=1 (experimental, read at each backward; unset: 0): the backward scales
# the kept gradients in place by the upstream gradient read on the device (`_scale_kept_`: a scale
# of 1, `loss.backward()` of a reduced loss, costs a launch and no pass) instead of reading it on
# the host first. On a GPU that read is a synchronization: the backward waits for the forward's
# kernels, and the host can queue nothing meanwhile (the backward of an 8192 x 128256 bf16 loss
# took 0.52-0.64 ms on an H200, all of it host work and that wait: gpu-check-20261129-2137). Also
# under CUDA graph capture and with torch.cuda.set_sync_debug_mode, where no host read is allowed.
# The price: a scale of 0 or one not finite is applied too (the host path keeps the buffers then),
# so a later backward through a retained graph cannot undo it and raises (scale_kept_gradients).
# Off until a GPU check has timed it (benchmarks/kd_gpu_launch_ab.py) and run its tests.
DEVICE_SCALE_ENV = "PYFINETUNE_KD_DEVICE_SCALE"
# The devices where the variable applies: on the CPU the host read costs nothing and keeps a
# retained graph differentiable after any scale (tests add "cpu" to exercise the logic).
_DEVICE_SCALE_DEVICES = ("cuda",)


def _device_scale_requested() -> bool:
    raw = os.environ.get(DEVICE_SCALE_ENV, "")
    if raw not in ("", "0", "1"):
        raise ValueError(f"{DEVICE_SCALE_ENV} must be 0 or 1 (or unset: 0), got {raw!r}")
    return raw == "1"


def _device_scale(kept, scale: torch.Tensor) -> bool:
    """Whether the kept buffers are scaled in place on the device (`_scale_kept_`, see
    DEVICE_SCALE_ENV): requested, on a GPU, plain eager tensors, a one-element scale of each
    buffer's arithmetic dtype on its device, contiguous buffers."""
    if (not _device_scale_requested() or scale.device.type not in _DEVICE_SCALE_DEVICES or scale.numel() != 1
            or not _is_eager(scale)):
        return False
    for g in kept:
        if (not _is_eager(g) or g.device != scale.device or _OPMATH.get(g.dtype) != scale.dtype
                or not g.is_contiguous()):
            return False
    return True


def _host_scale(scale: torch.Tensor):
    """(ok, factor): ok when every entry of ``scale`` is finite and nonzero; factor, for a
    one-element scale, its value as a Python float (exact for float32 and float64), else None. One
    host read (on a GPU, one synchronization)."""
    if scale.numel() == 1:
        # The scale of a scalar loss: one read instead of four small tensor ops.
        v = scale.item()
        return v != 0 and math.isfinite(v), v
    return bool(((scale != 0) & scale.isfinite()).all()), None


def _kd_backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:
        return None, None, None
    if not ctx.need_grad:
        raise RuntimeError(
            "pyfinetune.kd_loss: the op was called with need_grad=False, so it kept no gradient; call it with "
            "need_grad=True to differentiate it"
        )
    (grad,) = ctx.saved_tensors
    scale = grad_loss.to(torch.float64 if grad.dtype == torch.float64 else torch.float32).unsqueeze(-1)
    if ctx.grad_scale != 1.0:
        scale = scale / ctx.grad_scale
    # Never in place: the kept gradient is the op's second output, which its caller may hold (the
    # losses' eager path, where it is private, calls the op below autograd and scales it in place).
    (g_student,) = scale_kept_gradients(ctx, (grad,), scale, (grad.dtype,), in_place_ok=False)
    return g_student, None, None


def _kd_topk_backward(ctx, grad_loss, _grad_of_grad):
    g_student, _, _ = _kd_backward(ctx, grad_loss, _grad_of_grad)
    return g_student, None, None, None


torch.library.register_autograd("pyfinetune::kd_loss_fwd", _kd_backward, setup_context=_kd_setup_context)
torch.library.register_autograd("pyfinetune::kd_loss_topk_fwd", _kd_topk_backward, setup_context=_kd_setup_context)

fused_adamw_ = torch.ops.pyfinetune.fused_adamw_
fused_sgd_ = torch.ops.pyfinetune.fused_sgd_


# ------------------------------------------------------------------------------------ pruning ops
def _fake_check(cond, op: str, msg) -> None:
    # torch._check records the condition as a guard on symbolic sizes instead of failing on them.
    # msg: a string, or a callable formatting it only on failure.
    torch._check(cond, lambda: f"pyfinetune.{op}: {msg() if callable(msg) else msg}")


def _fake_check_x(op: str, x: Tensor) -> None:
    _fake_check(x.dim() == 2, op, lambda: f"x must be a 2-D tensor [N, K], got shape {tuple(x.shape)}")


def _fake_check_like_x(op: str, x: Tensor, floats: dict, others: dict) -> None:
    # The device and dtype checks of the kernels, also here: a meta argument mixed with real
    # ones dispatches to this fake kernel, which must refuse it like the real kernel would.
    for name, t in {**floats, **others}.items():
        if t is not None:
            _fake_check(t.device == x.device, op,
                        lambda name=name, t=t: f"{name} must be on the device of x ({x.device}), got {t.device}")
    for name, t in floats.items():
        if t is not None:
            _fake_check(t.dtype == x.dtype, op,
                        lambda name=name, t=t: f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")


def _not_needed(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _fake_check_float_x(op: str, x: Tensor) -> None:
    _fake_check(x.dtype in _FLOAT_DTYPES, op, lambda: f"x must be float32, bfloat16, float16 or float64, got {x.dtype}")


def _fake_check_bias(op: str, bias: Optional[Tensor], m) -> None:
    _fake_check(bias is None or (bias.dim() == 1 and bias.shape[0] == m), op,
                lambda: f"bias must be None or a 1-D tensor [M] with M = {m}, got shape {tuple(bias.shape)}")


def _fake_check_grad_out(op: str, grad_out: Tensor, n, m) -> None:
    _fake_check(grad_out.dim() == 2 and grad_out.shape[0] == n and grad_out.shape[1] == m, op,
                lambda: f"grad_out must be [N, M] = [{n}, {m}], got shape {tuple(grad_out.shape)}")


def _fake_check_csr(op: str, values: Tensor, crow_indices: Tensor, col_indices: Tensor, row_order: Tensor) -> None:
    # What the kernels check of the pattern's metadata (not its contents, which only the kernels read).
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices), ("row_order", row_order)):
        _fake_check(t.dtype == torch.int32 and t.dim() == 1, op,
                    lambda name=name, t=t: f"{name} must be a 1-D int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    _fake_check(values.dim() == 1, op, lambda: f"values must be 1-D [nnz], got shape {tuple(values.shape)}")
    _fake_check(crow_indices.shape[0] >= 1 and row_order.shape[0] == crow_indices.shape[0] - 1, op,
                lambda: f"row_order must have M = crow_indices.numel() - 1 = {crow_indices.shape[0] - 1} entries, "
                        f"got {row_order.shape[0]}")


@torch.library.register_fake("pyfinetune::masked_matmul")
def _masked_matmul_fake(x, weight, mask, bias):
    op = "masked_matmul"
    _fake_check_x(op, x)
    _fake_check_like_x(op, x, dict(weight=weight, bias=bias), dict(mask=mask))
    _fake_check(weight.dim() == 2 and weight.shape[1] == x.shape[1], op,
                lambda: f"weight must be [M, K] with K = x.size(1) = {x.shape[1]}, got shape {tuple(weight.shape)}")
    _fake_check(mask.shape == weight.shape, op,
                lambda: f"mask must have the shape of weight {tuple(weight.shape)}, got {tuple(mask.shape)}")
    _fake_check(mask.dtype == torch.bool, op, lambda: f"mask must be a bool tensor, got {mask.dtype}")
    _fake_check_float_x(op, x)
    _fake_check_bias(op, bias, weight.shape[0])
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("pyfinetune::masked_matmul_backward")
def _masked_matmul_backward_fake(grad_out, x, weight, mask, output_mask, dense_grad):
    op = "masked_matmul_backward"
    _fake_check_x(op, x)
    _fake_check_like_x(op, x, dict(grad_out=grad_out, weight=weight), dict(mask=mask))
    _fake_check_float_x(op, x)
    _fake_check(weight.dim() == 2 and weight.shape[1] == x.shape[1], op,
                lambda: f"weight must be [M, K] with K = x.size(1) = {x.shape[1]}, got shape {tuple(weight.shape)}")
    _fake_check(mask.shape == weight.shape, op,
                lambda: f"mask must have the shape of weight {tuple(weight.shape)}, got {tuple(mask.shape)}")
    _fake_check(mask.dtype == torch.bool, op, lambda: f"mask must be a bool tensor, got {mask.dtype}")
    _fake_check_grad_out(op, grad_out, x.shape[0], weight.shape[0])
    dx = x.new_empty(x.shape) if output_mask[0] else _not_needed(x)
    dweight = x.new_empty(weight.shape) if output_mask[1] else _not_needed(x)
    dbias = x.new_empty((weight.shape[0],)) if output_mask[2] else _not_needed(x)
    return dx, dweight, dbias


@torch.library.register_fake("pyfinetune::csr_linear")
def _csr_linear_fake(x, values, crow_indices, col_indices, row_order, bias):
    op = "csr_linear"
    _fake_check_x(op, x)
    _fake_check_like_x(op, x, dict(values=values, bias=bias),
                       dict(crow_indices=crow_indices, col_indices=col_indices, row_order=row_order))
    _fake_check(col_indices.shape == values.shape, op,
                lambda: f"col_indices must have nnz = values.numel() = {values.numel()} entries, "
                        f"got shape {tuple(col_indices.shape)}")
    _fake_check_float_x(op, x)
    _fake_check_csr(op, values, crow_indices, col_indices, row_order)
    _fake_check_bias(op, bias, crow_indices.shape[0] - 1)
    return x.new_empty((x.shape[0], crow_indices.shape[0] - 1))


@torch.library.register_fake("pyfinetune::csr_linear_backward")
def _csr_linear_backward_fake(grad_out, x, values, crow_indices, col_indices, row_order, ccol_indices,
                              row_indices, csc_to_csr, output_mask):
    op = "csr_linear_backward"
    _fake_check_x(op, x)
    _fake_check_like_x(op, x, dict(grad_out=grad_out, values=values),
                       dict(crow_indices=crow_indices, col_indices=col_indices, row_order=row_order,
                            ccol_indices=ccol_indices, row_indices=row_indices, csc_to_csr=csc_to_csr))
    _fake_check_float_x(op, x)
    _fake_check_csr(op, values, crow_indices, col_indices, row_order)
    _fake_check_grad_out(op, grad_out, x.shape[0], crow_indices.shape[0] - 1)
    _fake_check(ccol_indices.dim() == 1 and ccol_indices.shape[0] == x.shape[1] + 1, op,
                lambda: f"ccol_indices must have K + 1 = {x.shape[1] + 1} entries, got shape {tuple(ccol_indices.shape)}")
    dx = x.new_empty(x.shape) if output_mask[0] else _not_needed(x)
    dvalues = x.new_empty(values.shape) if output_mask[1] else _not_needed(x)
    dbias = x.new_empty((crow_indices.shape[0] - 1,)) if output_mask[2] else _not_needed(x)
    return dx, dvalues, dbias


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


TILE_ROWS = 128  # tiled_csr_linear's tile: rows of W (output features) ...
TILE_COLS = 64  # ... by columns of W (input features); fixed by the CUDA kernel
# Dynamic shared memory per block of tiled_csr_linear_backward_input's CUDA kernel (kDxSmemBytes in
# csrc/cuda/tiled_csr_cuda.cu): more than GPUs of compute capability 8.6 / 8.9 / 12.x allow.
TILED_DX_SMEM_BYTES = 107520
_TILED_DX_FITS = {}


def _tiled_dx_fits(device: torch.device) -> bool:
    """Whether tiled_csr_linear_backward_input's CUDA kernel fits this GPU's shared memory per
    block (read once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TILED_DX_FITS:
        optin = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0)
        _TILED_DX_FITS[index] = optin >= TILED_DX_SMEM_BYTES
    return _TILED_DX_FITS[index]


@torch.library.register_fake("pyfinetune::tiled_csr_linear")
def _tiled_csr_linear_fake(x, tile_values, tile_ptr, tile_loc, out_features, bias):
    op = "tiled_csr_linear"
    _fake_check_x(op, x)
    _fake_check_float_x(op, x)
    _fake_check_like_x(op, x, dict(tile_values=tile_values, bias=bias), dict(tile_ptr=tile_ptr, tile_loc=tile_loc))
    _fake_check_bias(op, bias, out_features)
    _fake_check(tile_values.shape[0] <= out_features * x.shape[1] if tile_values.dim() == 1 else True, op,
                lambda: f"tile_values must have at most out_features * K = {out_features * x.shape[1]} entries")
    _fake_check(0 <= out_features <= _INT32_MAX, op,
                lambda: f"out_features must be in [0, 2^31 - 1], got {out_features}")
    _fake_check_tiles(op, tile_values, tile_ptr, tile_loc, out_features, x.shape[1])
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("pyfinetune::tiled_csr_linear_backward_values")
def _tiled_csr_linear_backward_values_fake(grad_out, x, tile_ptr, tile_loc, tile_src):
    op = "tiled_csr_linear_backward_values"
    _fake_check_x(op, x)
    _fake_check_float_x(op, x)
    _fake_check_like_x(op, x, dict(grad_out=grad_out), dict(tile_ptr=tile_ptr, tile_loc=tile_loc, tile_src=tile_src))
    _fake_check(grad_out.dim() == 2 and grad_out.shape[0] == x.shape[0], op,
                lambda: f"grad_out must be [N, M] with N = x.size(0) = {x.shape[0]}, got shape {tuple(grad_out.shape)}")
    _fake_check(tile_src.dtype == torch.int32 and tile_src.shape == tile_loc.shape, op,
                lambda: f"tile_src must be int32 [nnz] like tile_loc {tuple(tile_loc.shape)}, got {tile_src.dtype} of "
                        f"shape {tuple(tile_src.shape)}")
    _fake_check_tiles(op, x.new_empty(tile_loc.shape), tile_ptr, tile_loc, grad_out.shape[1], x.shape[1],
                      counted="tile_loc")
    return x.new_empty(tile_loc.shape)


def _fake_check_nnz(op: str, name: str, nnz: int, what: str = "indices") -> None:
    _fake_check(nnz <= _INT32_MAX, op,
                lambda: f"{name} has {nnz} entries; int32 {what} address at most 2^31 - 1 kept weights")


def _fake_check_tiles(op, tile_values, tile_ptr, tile_loc, m, k, counted="tile_values"):
    counted_tensor = tile_values if counted == "tile_values" else tile_loc
    _fake_check_nnz(op, counted, counted_tensor.shape[0] if counted_tensor.dim() == 1 else 0, "tile offsets")
    tiles = -(-m // TILE_ROWS) * -(-k // TILE_COLS)
    _fake_check(tile_ptr.dtype == torch.int32 and tile_ptr.shape == (tiles + 1,), op,
                lambda: f"tile_ptr must be an int32 tensor of ceil(out_features / {TILE_ROWS}) * ceil(K / {TILE_COLS}) "
                        f"+ 1 = {tiles + 1} entries, got {tile_ptr.dtype} of shape {tuple(tile_ptr.shape)}")
    _fake_check(tile_loc.dtype == torch.int16 and tile_loc.shape == tile_values.shape and tile_values.dim() == 1, op,
                lambda: f"tile_loc must be int16 [nnz] like tile_values {tuple(tile_values.shape)}, got "
                        f"{tile_loc.dtype} of shape {tuple(tile_loc.shape)}")


@torch.library.register_fake("pyfinetune::tiled_csr_linear_backward_input")
def _tiled_csr_linear_backward_input_fake(grad_out, tile_values, tile_ptr, tile_loc, in_features):
    op = "tiled_csr_linear_backward_input"
    _fake_check(grad_out.dim() == 2, op,
                lambda: f"grad_out must be a 2-D tensor [N, out_features], got shape {tuple(grad_out.shape)}")
    _fake_check(grad_out.dtype in _FLOAT_DTYPES, op,
                lambda: f"grad_out must be float32, bfloat16, float16 or float64, got {grad_out.dtype}")
    _fake_check(0 <= in_features <= _INT32_MAX, op, lambda: f"in_features must be in [0, 2^31 - 1], got {in_features}")
    for name, t in dict(tile_values=tile_values, tile_ptr=tile_ptr, tile_loc=tile_loc).items():
        _fake_check(t.device == grad_out.device, op,
                    lambda name=name, t=t: f"{name} must be on the device of grad_out ({grad_out.device}), got "
                                           f"{t.device}")
    _fake_check(tile_values.dtype == grad_out.dtype, op,
                lambda: f"tile_values must have the dtype of grad_out ({grad_out.dtype}), got {tile_values.dtype}")
    _fake_check_tiles(op, tile_values, tile_ptr, tile_loc, grad_out.shape[1], in_features)
    return grad_out.new_empty((grad_out.shape[0], in_features))


def _fake_check_pattern(op: str, ref_name: str, ref: Tensor, crow_indices: Tensor, col_indices: Tensor) -> None:
    # The shared checks of csr_to_dense(_into) / csr_gather (masked_matmul_checks.cpp) on metadata.
    _fake_check(ref.dtype in _FLOAT_DTYPES, op,
                lambda: f"{ref_name} must be float32, bfloat16, float16 or float64, got {ref.dtype}")
    for name, t in dict(crow_indices=crow_indices, col_indices=col_indices).items():
        _fake_check(t.device == ref.device, op,
                    lambda name=name, t=t: f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
        _fake_check(t.dtype == torch.int32, op, lambda name=name, t=t: f"{name} must be int32, got {t.dtype}")
        _fake_check(t.dim() == 1, op, lambda name=name, t=t: f"{name} must be a 1-D tensor, got shape {tuple(t.shape)}")
    _fake_check(crow_indices.shape[0] >= 1, op, lambda: "crow_indices must be a 1-D tensor [M + 1] (M rows), got shape "
                                                       f"{tuple(crow_indices.shape)}")
    _fake_check(crow_indices.shape[0] > 1 or col_indices.shape[0] == 0, op,
                lambda: f"a pattern of no rows has no kept entries, got nnz = {col_indices.shape[0]}")


def _fake_check_to_dense(op, values, crow_indices, col_indices, cols):
    _fake_check_pattern(op, "values", values, crow_indices, col_indices)
    _fake_check_nnz(op, "values", values.shape[0] if values.dim() == 1 else 0)
    _fake_check(values.dim() == 1 and col_indices.shape == values.shape, op,
                lambda: f"values [nnz] and col_indices [nnz] must match, got shapes {tuple(values.shape)} and "
                        f"{tuple(col_indices.shape)}")
    _fake_check(cols >= 0, op, lambda: f"cols must be >= 0, got {cols}")
    _fake_check(cols > 0 or values.shape[0] == 0, op,
                lambda: f"a pattern of cols = 0 columns has no kept entries, got nnz = {values.shape[0]}")


@torch.library.register_fake("pyfinetune::csr_to_dense")
def _csr_to_dense_fake(values, crow_indices, col_indices, cols):
    _fake_check_to_dense("csr_to_dense", values, crow_indices, col_indices, cols)
    return values.new_empty((crow_indices.shape[0] - 1, cols))


@torch.library.register_fake("pyfinetune::csr_to_dense_into")
def _csr_to_dense_into_fake(out, values, crow_indices, col_indices):
    op = "csr_to_dense_into"
    _fake_check(out.dim() == 2, op, lambda: f"out must be a 2-D tensor [M, cols], got shape {tuple(out.shape)}")
    cols = out.shape[1]
    _fake_check_to_dense(op, values, crow_indices, col_indices, cols)
    _fake_check(out.is_contiguous(), op, lambda: f"out must be contiguous (row-major), got strides {out.stride()}")
    _fake_check(out.device == values.device and out.dtype == values.dtype, op,
                lambda: f"out must have the dtype and device of values ({values.dtype}, {values.device}), got "
                        f"{out.dtype}, {out.device}")
    _fake_check(tuple(out.shape) == (crow_indices.shape[0] - 1, cols), op,
                lambda: f"out must be [M, cols] = [{crow_indices.shape[0] - 1}, {cols}], got shape {tuple(out.shape)}")


@torch.library.register_fake("pyfinetune::csr_gather")
def _csr_gather_fake(dense, crow_indices, col_indices):
    op = "csr_gather"
    _fake_check_pattern(op, "dense", dense, crow_indices, col_indices)
    _fake_check_nnz(op, "col_indices", col_indices.shape[0])
    _fake_check(dense.dim() == 2 and dense.shape[0] == crow_indices.shape[0] - 1, op,
                lambda: f"dense must be [M, K] with M = crow_indices.numel() - 1 = {crow_indices.shape[0] - 1}, "
                        f"got shape {tuple(dense.shape)}")
    _fake_check(dense.shape[1] > 0 or col_indices.shape[0] == 0, op,
                lambda: f"a dense tensor of no columns has no kept entries, got nnz = {col_indices.shape[0]}")
    return dense.new_empty((col_indices.shape[0],))


@torch.library.register_fake("pyfinetune::_pool_empty_cpu")
def _pool_empty_cpu_fake(size, dtype, idle_limit_bytes):
    return torch.empty(size, dtype=dtype, device="cpu")


def _csr_to_dense_setup_context(ctx, inputs, output):
    _, crow, col, _ = inputs
    ctx.save_for_backward(crow, col)


def _csr_to_dense_backward(ctx, grad):
    crow, col = ctx.saved_tensors
    return torch.ops.pyfinetune.csr_gather(grad, crow, col), None, None, None


def _csr_gather_setup_context(ctx, inputs, output):
    dense, crow, col = inputs
    ctx.save_for_backward(crow, col)
    ctx.cols = dense.shape[1]


def _csr_gather_backward(ctx, grad):
    crow, col = ctx.saved_tensors
    return torch.ops.pyfinetune.csr_to_dense(grad, crow, col, ctx.cols), None, None


torch.library.register_autograd("pyfinetune::csr_to_dense", _csr_to_dense_backward,
                                setup_context=_csr_to_dense_setup_context)
torch.library.register_autograd("pyfinetune::csr_gather", _csr_gather_backward,
                                setup_context=_csr_gather_setup_context)


def csr_to_dense(values: Tensor, crow_indices: Tensor, col_indices: Tensor, cols: int) -> Tensor:
    """The dense [M, cols] tensor of a compressed-row pattern: ``values`` at the kept positions,
    exact zeros elsewhere. One pass that writes each element once (``torch.zeros`` followed by an
    ``index_copy_`` writes the weight twice and, on the CPU, page-faults a fresh buffer).

    Args:
        values: [nnz] kept values (float32, bfloat16, float16 or float64), row-major order.
        crow_indices: [M + 1] int32 row offsets; col_indices: [nnz] int32 columns in [0, cols),
            increasing strictly within each row; both on the values' device.
        cols: the number of columns of the dense tensor.

    Differentiable in ``values``: the gradient is :func:`csr_gather` of the incoming gradient.
    Under torch.func transforms and forward-mode AD (as :func:`csr_gather`) it is composed of torch
    ops, with the kernels' checks of the pattern.
    """
    if _transforms_active():
        return _csr_to_dense_composed(values, crow_indices, col_indices, cols)
    return torch.ops.pyfinetune.csr_to_dense(values, crow_indices, col_indices, cols)


def csr_gather(dense: Tensor, crow_indices: Tensor, col_indices: Tensor) -> Tensor:
    """The kept positions of ``dense`` [M, K] (any strides) as a [nnz] tensor in the pattern's
    row-major order: ``dense[mask]`` for the pattern's mask, without building the mask.
    Differentiable in ``dense`` (the gradient is :func:`csr_to_dense`)."""
    if _transforms_active():
        return _csr_gather_composed(dense, crow_indices, col_indices)
    return torch.ops.pyfinetune.csr_gather(dense, crow_indices, col_indices)


# Two questions that torch 2.4 (before 2.5) answers differently, asked on every op call:
# * _functorch_active: whether a torch.func transform is active. Dynamo 2.4 cannot trace
#   torch._C._are_functorch_transforms_active (torch.compile failed on every call of our ops,
#   "Unsupported"); the level of the innermost transform (None when none is active) answers the
#   same question, and it traces that.
# * _in_dispatch_mode: whether a TorchDispatchMode (user or infra: fake, functional, proxy) is
#   active. torch 2.4's flag (is_in_torch_dispatch_mode) stayed True after a mode entered twice,
#   nested, exited (as a compiled function's backward does): every later call then skipped the
#   host checks of patterns. The mode stack itself, which holds the infra modes too there, answers.
if torch.torch_version.TorchVersion(torch.__version__) < (2, 5):
    def _functorch_active() -> bool:
        return torch._C._functorch.maybe_current_level() is not None

    def _in_dispatch_mode() -> bool:
        return torch._C._len_torch_dispatch_stack() > 0
else:
    _functorch_active = torch._C._are_functorch_transforms_active
    _in_dispatch_mode = torch.utils._python_dispatch.is_in_torch_dispatch_mode


def _transforms_active() -> bool:
    """A torch.func transform (grad, vmap, jvp, jacfwd, ...) or forward-mode AD
    (torch.autograd.forward_ad) is active. Our ops' autograd rules (torch.library style: a backward
    only) do not support them: under forward-mode AD an op with no forward rule hands on no
    tangent, silently (a zero derivative). The ops' callers then compute with plain torch ops."""
    return _functorch_active() or torch.autograd.forward_ad._current_level >= 0


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled(device_type), False for device types that have no autocast
    (meta: shape inference, empty-weight initialisation), for which torch raises instead."""
    if device_type in ("cpu", "cuda"):  # the common case first: the availability query costs ~250 ns
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _is_numpy_bool(value: object) -> bool:
    """Whether ``value`` is a NumPy bool scalar (np.bool_ is no subclass of bool: a flag read from a
    NumPy array or a sweep's config), without importing NumPy."""
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


def _inspectable(*tensors: Tensor) -> bool:
    """Whether the contents of these tensors can be read on the host for a check: not inside
    torch.compile and none a torch.func-wrapped tensor (a vmap batch, which refuses data-dependent
    control flow)."""
    if torch.compiler.is_compiling():
        return False
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _flat_positions(op: str, crow_indices: Tensor, col_indices: Tensor, cols: int, sorted_rows: bool) -> Tensor:
    """row * cols + col (int64) of each kept entry of a compressed-row pattern, after the checks
    of its contents that the kernels make (a column out of range would land in another row;
    ``sorted_rows``: columns must increase strictly within each row, as csr_to_dense and
    csr_gather require)."""
    crow = crow_indices.long()
    nnz = col_indices.shape[0]
    col = col_indices.long()
    inspect = _inspectable(crow_indices, col_indices)
    if inspect:
        _check_pattern_contents(op, crow, col, nnz, cols)
    rows = _entry_rows(crow, nnz)
    if inspect:
        if sorted_rows:
            bad = ((rows[1:] == rows[:-1]) & (col[1:] <= col[:-1])).nonzero()
            if bad.numel():
                i = int(bad[0, 0]) + 1
                raise RuntimeError(f"pyfinetune.{op}: col_indices must increase strictly within each row (no repeated "
                                   f"column): col_indices[{i}] = {int(col[i])} follows {int(col[i - 1])} in row "
                                   f"{int(rows[i])}")
    return rows * cols + col


def _check_pattern_contents(op: str, crow: Tensor, col: Tensor, nnz: int, cols: int) -> None:
    if int(crow[0]) != 0:
        raise RuntimeError(f"pyfinetune.{op}: crow_indices[0] must be 0, got {int(crow[0])}")
    if int(crow[-1]) != nnz:
        raise RuntimeError(f"pyfinetune.{op}: crow_indices[-1] must be nnz = {nnz} (the number of kept weights), "
                           f"got {int(crow[-1])}")
    drop = (crow[1:] < crow[:-1]).nonzero()
    if drop.numel():
        r = int(drop[0, 0])
        raise RuntimeError(f"pyfinetune.{op}: crow_indices must be non-decreasing, but crow_indices[{r}] = "
                           f"{int(crow[r])} > crow_indices[{r + 1}] = {int(crow[r + 1])}")
    bad = ((col < 0) | (col >= cols)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise RuntimeError(f"pyfinetune.{op}: col_indices[{i}] = {int(col[i])} is out of range: entries must lie in "
                           f"[0, {cols})")


def _csr_to_dense_composed(values: Tensor, crow_indices: Tensor, col_indices: Tensor, cols: int,
                           op: str = "csr_to_dense") -> Tensor:
    """csr_to_dense of torch ops (for _transforms_active): the op's argument checks, then the
    values placed at their flat positions in a tensor of zeros. ``op`` names the caller in errors."""
    _fake_check_to_dense(op, values, crow_indices, col_indices, cols)
    m = crow_indices.shape[0] - 1
    if op == "csr_linear":
        # The product's kernels accept any order within a row and add a repeated column's values.
        flat = _flat_positions(op, crow_indices, col_indices, cols, sorted_rows=False)
        return values.new_zeros(m * cols).index_add(0, flat, values).view(m, cols)
    flat = _flat_positions(op, crow_indices, col_indices, cols, sorted_rows=True)
    return values.new_zeros(m * cols).index_copy(0, flat, values).view(m, cols)


def _csr_gather_composed(dense: Tensor, crow_indices: Tensor, col_indices: Tensor) -> Tensor:
    """csr_gather of torch ops (for _transforms_active)."""
    _csr_gather_fake(dense, crow_indices, col_indices)
    return dense.reshape(-1)[_flat_positions("csr_gather", crow_indices, col_indices, dense.shape[1], sorted_rows=True)]


def _masked_matmul_grads(ctx, grad, dense_grad: bool):
    x, weight, mask = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    if _create_graph():  # a differentiable backward
        dx, dw, db = _differentiable_masked_grads(grad, x, weight, mask, need_x, need_w, need_b, dense_grad)
    else:
        dx, dw, db = torch.ops.pyfinetune.masked_matmul_backward(grad, x, weight, mask, [need_x, need_w, need_b],
                                                                 dense_grad)
    return dx if need_x else None, dw if need_w else None, None, db if need_b else None


def _effective_weight(weight: Tensor, mask: Tensor, dense_grad: bool) -> Tensor:
    """The weight the masked product sees, of differentiable torch ops: exact zeros at the pruned
    positions; with dense_grad the mask passed straight through (the weight receives the effective
    weight's full gradient)."""
    effective = torch.where(mask, weight, 0)
    if not dense_grad:
        return effective
    # Straight through: the values of `effective`, the weight's gradient everywhere. An inf or NaN
    # at a pruned position would make `weight + (effective - weight)` NaN (inf - inf): there the
    # pass-through starts from 0 instead (those positions get no second-order gradient).
    base = torch.where(mask | weight.isfinite(), weight, 0)
    return base + (effective - base).detach()


def _differentiable_masked_grads(grad, x, weight, mask, need_x, need_w, need_b, dense_grad):
    """masked_matmul's gradients (x [N, K], grad [N, M]) composed of differentiable ops, for a
    backward under create_graph (double backward, gradient penalties): masked_matmul_backward has no
    autograd formula of its own, so its results would carry no graph (second derivatives through the
    weight came out wrong). Pruned positions are exact zeros (torch.where, not a product with the
    mask, which would turn an inf there into NaN); with dense_grad the effective weight passes the
    mask straight through here too, so that every derivative reaching the weight is the effective
    weight's, pruned positions included."""
    dx = grad @ _effective_weight(weight, mask, dense_grad) if need_x else None
    dw = None
    if need_w:
        full = grad.t() @ x
        dw = full if dense_grad else torch.where(mask, full, 0)
    db = grad.sum(0) if need_b else None
    return dx, dw, db


def _masked_matmul_setup_context(ctx, inputs, output):
    x, weight, mask, bias = inputs
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None


torch.library.register_autograd(
    "pyfinetune::masked_matmul", lambda ctx, grad: _masked_matmul_grads(ctx, grad, False),
    setup_context=_masked_matmul_setup_context)


def _without_autograd(op, *args):
    """``op(*args)`` for a call with nothing to differentiate (the caller checked), skipping the op's
    autograd kernel: torch.library's Python one (register_autograd) runs at every call even then, only
    to redispatch, ~20 us on the CI machine, 40% of a small sparse product (an inference layer's
    host time). Under torch.compile the op is traced as it is."""
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _eager_twin(cls):
    """Give the new-style autograd.Function ``cls`` (forward without ctx + setup_context) an old-style
    twin, ``cls.eager``, with the same forward, saved state and backward, and return ``cls``.

    Why: torch binds a new-style Function's arguments with ``inspect.signature`` at every ``apply``
    (to fill defaults for setup_context), which costs ~10-20 us a call on a CPU, ~7x the whole
    apply of an old-style Function with the same body (measured on the CI machine with torch
    2.14); for a layer called per step that is host time a GPU waits for. torch.func transforms
    require the new style, so :func:`_apply` takes the twin only outside them and outside
    torch.compile."""

    def forward(ctx, *args):
        # Below autograd: grad mode is off here, but the ops' registered (Python) autograd kernels
        # would still run and redispatch.
        with torch._C._AutoDispatchBelowAutograd():
            out = cls.forward(*args)
        cls.setup_context(ctx, args, out)
        return out

    def backward(ctx, *grads):
        return cls.backward(ctx, *grads)

    # Created with type() so that its backward node is named after cls ("_CsrLinearEagerBackward").
    cls.eager = type(cls.__name__ + "Eager", (torch.autograd.Function,),
                     {"forward": staticmethod(forward), "backward": staticmethod(backward),
                      "__doc__": f"Old-style twin of {cls.__name__} (see _eager_twin)."})
    return cls


def _apply(cls, *args):
    """``cls.apply(*args)``, through its old-style twin (:func:`_eager_twin`) in plain eager mode."""
    if torch.compiler.is_compiling() or _functorch_active():
        return cls.apply(*args)
    return cls.eager.apply(*args)


@_eager_twin
class _MaskedMatmul(torch.autograd.Function):
    """masked_matmul with dense_grad=True: the op's registered autograd masks the weight gradient,
    and the op's schema has no place for the flag."""

    @staticmethod
    def forward(x, weight, mask, bias, dense_grad):
        return torch.ops.pyfinetune.masked_matmul(x, weight, mask, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _masked_matmul_setup_context(ctx, inputs[:4], output)
        ctx.dense_grad = inputs[4]

    @staticmethod
    def backward(ctx, grad):
        return (*_masked_matmul_grads(ctx, grad, ctx.dense_grad), None)


def _masked_matmul_composed(x, weight, mask, bias, dense_grad: bool) -> Tensor:
    """masked_matmul of torch ops, for torch.func transforms (grad, vmap, jacrev, hessian, jvp) and
    forward-mode AD, which the op's autograd (registered with torch.library.register_autograd, an
    old-style autograd.Function with a backward only) does not support. The op's argument checks
    first, then ``x @ W_eff^T + bias`` with the pruned positions exact zeros; with dense_grad the
    weight's gradient passes the mask straight through (the full gradient of W_eff)."""
    _masked_matmul_fake(x, weight, mask, bias)
    return torch.nn.functional.linear(x, _effective_weight(weight, mask, dense_grad), bias)


def _require_tensors(name: str, **args) -> None:
    """TypeError naming the first argument that is not a Tensor (None allowed for those whose keyword
    ends in '_', e.g. ``bias_=bias``)."""
    for arg, value in args.items():
        optional = arg.endswith("_")
        if isinstance(value, Tensor) or (optional and value is None):
            continue
        what = "a tensor or None" if optional else "a tensor"
        raise TypeError(f"pyfinetune.{name}: {arg.rstrip('_')} must be {what}, got {type(value).__name__}")


def _flatten_batch(x: Tensor, name: str) -> Tensor:
    # [..., K] -> [N, K] (x a tensor: the public functions check it); the op's checks then name any
    # mismatch with the weight.
    if x.dim() == 0:
        raise ValueError(f"pyfinetune.{name}: x must be a tensor [..., K], got a 0-d tensor")
    # By the leading dimensions, not -1: K = 0 would leave -1 ambiguous.
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def masked_matmul(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor] = None, *,
                  dense_grad: bool = False) -> Tensor:
    """``x @ (weight * mask)^T + bias``, the pruned linear layer computed densely.

    Args:
        x: [..., K], float32, bfloat16, float16 or float64 (leading dimensions are flattened).
        weight: [M, K], x's dtype and device.
        mask: [M, K] bool; False = pruned. Pruned positions contribute exactly 0.
        bias: None or [M].
        dense_grad: if True the gradient of ``weight`` is the full ``grad_out^T @ x`` (movement
            pruning, regrowth); by default it is 0 at pruned positions, and on the CPU, where the
            mask keeps at most 30% of the weight, computed at the kept positions only (the mask's
            compressed rows and csr_linear's SDDMM; ``PYFINETUNE_MASKED_GRAD=dense|sampled``
            forces either path).

    Returns:
        [..., M] in x's dtype (float32 accumulation for 16-bit inputs). Differentiable in x,
        weight and bias, twice differentiable (under ``create_graph=True`` the backward is composed
        of differentiable torch ops); under torch.func transforms (``grad``, ``vmap``, ``jacrev``,
        ``hessian``) and forward-mode AD the same product is composed of torch ops.
    """
    _require_tensors("masked_matmul", x=x, weight=weight, mask=mask, bias_=bias)
    if not (isinstance(dense_grad, bool) or _is_numpy_bool(dense_grad)):
        raise TypeError(f"pyfinetune.masked_matmul: dense_grad must be a bool, got {dense_grad!r}")
    dense_grad = bool(dense_grad)
    x2 = _flatten_batch(x, "masked_matmul")
    if _transforms_active():
        y = _masked_matmul_composed(x2, weight, mask, bias, dense_grad)
    elif dense_grad:
        y = _apply(_MaskedMatmul, x2, weight, mask, bias, dense_grad)
    elif torch.is_grad_enabled() and (x2.requires_grad or weight.requires_grad
                                      or (bias is not None and bias.requires_grad)):
        y = torch.ops.pyfinetune.masked_matmul(x2, weight, mask, bias)  # its registered autograd
    else:
        y = _without_autograd(torch.ops.pyfinetune.masked_matmul, x2, weight, mask, bias)
    return y if x2 is x else y.reshape(*x.shape[:-1], y.shape[-1])


# ------------------------------------------------------------------------------ compressed patterns
class CompressedPattern(NamedTuple):
    """Index tensors (int32) of a sparsity pattern of a weight [M, K], as ``csr_linear`` takes them.

    Compressed rows: ``crow_indices`` [M + 1], ``col_indices`` [nnz] (sorted within each row),
    ``row_order`` [M] (rows by decreasing length, ties by index). Compressed columns of the same
    pattern: ``ccol_indices`` [K + 1], ``row_indices`` [nnz] (sorted within each column) and
    ``csc_to_csr`` [nnz], the position in the row-major ``values`` of each column-major entry.

    Make them with :func:`compressed_pattern` or :func:`pattern_from_csr`. The ops check every
    index against its range, but do not cross-check the compressed columns against the compressed
    rows (an O(nnz) scattered pass on every backward): a hand-built column view that describes
    another pattern gives wrong gradients (which ones depends on the batch size).
    """

    crow_indices: Tensor
    col_indices: Tensor
    row_order: Tensor
    ccol_indices: Tensor
    row_indices: Tensor
    csc_to_csr: Tensor


_INT32_MAX = 2**31 - 1


def _entry_rows(crow_indices: Tensor, nnz: int) -> Tensor:
    """The row (int64) of each of the nnz entries of a compressed-row pattern."""
    crow = crow_indices.long()
    m = crow.shape[0] - 1
    return torch.repeat_interleave(torch.arange(m, device=crow.device), crow[1:] - crow[:-1], output_size=nnz)


def _check_csr_on_host(crow: Tensor, col: Tensor, num_cols: int) -> None:
    """A compressed-row pattern's invariants, for CPU tensors: ValueError naming what is wrong."""
    name = "pyfinetune.pattern_from_csr"
    if crow.dim() != 1 or crow.shape[0] < 1 or col.dim() != 1:
        raise ValueError(f"{name}: crow_indices must be [M + 1] and col_indices [nnz], got shapes "
                         f"{tuple(crow.shape)} and {tuple(col.shape)}")
    if crow.is_floating_point() or col.is_floating_point():
        raise ValueError(f"{name}: crow_indices and col_indices must be integer tensors, got {crow.dtype} and {col.dtype}")
    c = crow.long()
    if int(c[0]) != 0 or int(c[-1]) != col.shape[0]:
        raise ValueError(f"{name}: crow_indices must start at 0 and end at nnz = {col.shape[0]}, got "
                         f"{int(c[0])} and {int(c[-1])}")
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{name}: crow_indices must be non-decreasing")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= num_cols):
        raise ValueError(f"{name}: col_indices must lie in [0, num_cols = {num_cols}), got values in "
                         f"[{int(col.min())}, {int(col.max())}]")
    if col.shape[0] > 1:
        rows = _entry_rows(c, col.shape[0])
        bad = ((rows[1:] == rows[:-1]) & (col[1:].long() <= col[:-1].long())).nonzero()
        if bad.numel():
            j = int(bad[0, 0])
            raise ValueError(f"{name}: col_indices must increase strictly within each row, got {int(col[j])} then "
                             f"{int(col[j + 1])} in row {int(rows[j])}")


def pattern_from_csr(crow_indices: Tensor, col_indices: Tensor, num_cols: int) -> CompressedPattern:
    """The :class:`CompressedPattern` of a compressed-row pattern ``crow_indices`` [M + 1],
    ``col_indices`` [nnz] (columns sorted within each row) of a weight with ``num_cols`` columns.
    Traceable by torch.compile (no size depends on the data). A pattern on the CPU is checked
    (ValueError naming the argument); on a GPU its contents are not read on the host (no
    synchronization): the kernels check what they read."""
    m = crow_indices.shape[0] - 1
    nnz = col_indices.shape[0]
    device = crow_indices.device
    if (device.type == "cpu" and col_indices.device.type == "cpu" and type(crow_indices) is Tensor
            and type(col_indices) is Tensor and not _transforms_active() and not torch.compiler.is_compiling()
            and not _in_dispatch_mode()):
        _check_csr_on_host(crow_indices, col_indices, num_cols)
    crow = crow_indices.long()
    col = col_indices.long()
    lengths = crow[1:] - crow[:-1]
    rows = _entry_rows(crow, nnz)
    csc_to_csr = torch.argsort(col, stable=True)  # CSR order breaks ties: rows ascend within a column
    ccol = torch.zeros(num_cols + 1, dtype=torch.long, device=device)
    ccol.index_add_(0, col + 1, torch.ones_like(col))
    row_order = torch.argsort(lengths, descending=True, stable=True)
    i32 = torch.int32
    return CompressedPattern(crow_indices.to(i32), col_indices.to(i32), row_order.to(i32),
                             ccol.cumsum(0).to(i32), rows[csc_to_csr].to(i32), csc_to_csr.to(i32))


def compressed_pattern(mask: Tensor) -> CompressedPattern:
    """The :class:`CompressedPattern` (int32 index tensors, on mask's device) of a bool mask [M, K]."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"pyfinetune.compressed_pattern: mask must be a 2-D bool tensor [M, K], got "
                         f"{mask.dtype} of shape {tuple(mask.shape)}")
    m, k = mask.shape
    nz = mask.nonzero()  # row-major: rows ascending, columns ascending within a row
    if max(m, k, nz.shape[0]) + 1 > _INT32_MAX:
        raise ValueError(f"pyfinetune.compressed_pattern: a [{m}, {k}] pattern with {nz.shape[0]} kept weights "
                         "does not fit int32 indices")
    crow = torch.zeros(m + 1, dtype=torch.long, device=mask.device)
    crow[1:] = mask.sum(1).cumsum(0)
    return pattern_from_csr(crow, nz[:, 1], k)


# ------------------------------------------------------------------------------------- csr_linear
def _csr_linear_op_backward(ctx, grad):
    # The op's own autograd: its forward has no compressed-column view, so the backward derives
    # one (a sort of the column indices). The csr_linear function below passes the view in.
    x, values, crow, col, row_order = ctx.saved_tensors
    need_x, need_v, _, _, _, need_b = ctx.needs_input_grad
    need_b = need_b and ctx.has_bias
    if _create_graph():  # a differentiable backward (the kernel's results would carry no graph)
        dx, dv, db = _differentiable_csr_grads(grad, x, values, crow, col, need_x, need_v, need_b)
    else:
        pat = pattern_from_csr(crow, col, x.shape[1])
        dx, dv, db = torch.ops.pyfinetune.csr_linear_backward(grad, x, values, crow, col, row_order, pat.ccol_indices,
                                                              pat.row_indices, pat.csc_to_csr, [need_x, need_v, need_b])
    return dx if need_x else None, dv if need_v else None, None, None, None, db if need_b else None


def _csr_linear_op_setup_context(ctx, inputs, output):
    x, values, crow, col, row_order, bias = inputs
    ctx.save_for_backward(x, values, crow, col, row_order)
    ctx.has_bias = bias is not None


torch.library.register_autograd("pyfinetune::csr_linear", _csr_linear_op_backward,
                                setup_context=_csr_linear_op_setup_context)


@_eager_twin
class _CsrLinear(torch.autograd.Function):
    """csr_linear with the compressed-column view at hand for the backward (no sort per step)."""

    @staticmethod
    def forward(x, values, crow, col, row_order, ccol, row_idx, csc_to_csr, bias):
        return torch.ops.pyfinetune.csr_linear(x, values, crow, col, row_order, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, crow, col, row_order, ccol, row_idx, csc_to_csr, bias = inputs
        ctx.save_for_backward(x, values, crow, col, row_order, ccol, row_idx, csc_to_csr)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, values, crow, col, row_order, ccol, row_idx, csc_to_csr = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_v, need_b = need[0], need[1], need[8] and ctx.has_bias
        if _create_graph():  # a differentiable backward
            dx, dv, db = _differentiable_csr_grads(grad, x, values, crow, col, need_x, need_v, need_b)
        else:
            dx, dv, db = torch.ops.pyfinetune.csr_linear_backward(grad, x, values, crow, col, row_order, ccol, row_idx,
                                                                  csc_to_csr, [need_x, need_v, need_b])
        return (dx if need_x else None, dv if need_v else None, None, None, None, None, None, None,
                db if need_b else None)


def _create_graph() -> bool:
    """Inside a backward: whether it builds a graph (create_graph=True), outside torch.func
    transforms, under which the ops' registered autograd formulas do not run (and the single-level
    gradient needs no graph)."""
    return torch.is_grad_enabled() and not _functorch_active()


def _differentiable_csr_grads(grad, x, values, crow, col, need_x, need_v, need_b):
    """csr_linear's gradients (x [N, K], grad [N, M]) composed of differentiable ops, for a backward
    under create_graph (double backward, gradient penalties): csr_linear_backward has no autograd
    formula of its own, so its results would carry no graph and second derivatives would be zero."""
    dx = grad @ csr_to_dense(values, crow, col, x.shape[1]) if need_x else None
    dv = csr_gather(grad.t() @ x, crow, col) if need_v else None
    db = grad.sum(0) if need_b else None
    return dx, dv, db


def _check_pattern_width(name: str, x: Tensor, x2: Tensor, ccol_indices: Tensor) -> None:
    """x's K against the pattern's (ccol_indices has K + 1 entries): the forward ops read only the
    columns the pattern names, so a wider x, or a narrower one whose missing columns hold no kept
    weight, would pass silently."""
    if (isinstance(ccol_indices, Tensor) and ccol_indices.dim() == 1 and ccol_indices.shape[0] > 0
            and x2.shape[1] != ccol_indices.shape[0] - 1):
        raise ValueError(f"pyfinetune.{name}: x must have K = {ccol_indices.shape[0] - 1} columns (the pattern's: "
                         f"ccol_indices has K + 1 entries), got x of shape {tuple(x.shape)}")


def csr_linear(x: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, row_order: Tensor,
               ccol_indices: Tensor, row_indices: Tensor, csc_to_csr: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W^T + bias`` for a sparse weight W [M, K] given by its kept values and pattern.

    Args:
        x: [..., K], float32, bfloat16, float16 or float64 (leading dimensions are flattened).
        values: [nnz] kept weights in row-major order, x's dtype and device.
        crow_indices, col_indices, row_order, ccol_indices, row_indices, csc_to_csr: the int32
            pattern tensors, see :class:`CompressedPattern` and :func:`compressed_pattern`.
        bias: None or [M].

    Returns:
        [..., M] in x's dtype (float32 accumulation for 16-bit inputs). Differentiable in x,
        values and bias; the gradient of values is the product ``grad_out^T @ x`` sampled at the
        kept positions. Twice differentiable: under ``create_graph=True`` the backward is composed
        of differentiable ops (:func:`csr_to_dense`, :func:`csr_gather`) instead of the kernels.
        Under torch.func transforms (``grad``, ``vmap``, ``jvp``, ``jacfwd``, ``hessian``) and
        forward-mode AD the product is composed of torch ops (a dense weight is built).
    """
    _require_tensors("csr_linear", x=x, values=values, crow_indices=crow_indices, col_indices=col_indices,
                     row_order=row_order, ccol_indices=ccol_indices, row_indices=row_indices, csc_to_csr=csc_to_csr,
                     bias_=bias)
    x2 = _flatten_batch(x, "csr_linear")
    _check_pattern_width("csr_linear", x, x2, ccol_indices)
    if _transforms_active():
        # torch.func transforms, forward-mode AD: torch ops (see _transforms_active).
        _csr_linear_fake(x2, values, crow_indices, col_indices, row_order, bias)
        weight = _csr_to_dense_composed(values, crow_indices, col_indices, x2.shape[1], "csr_linear")
        y = torch.nn.functional.linear(x2, weight, bias)
    elif torch.is_grad_enabled() and (x2.requires_grad or values.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _apply(_CsrLinear, x2, values, crow_indices, col_indices, row_order, ccol_indices, row_indices,
                             csc_to_csr, bias)
    else:  # nothing to differentiate: the op alone (the autograd Function costs ~30 us a call)
        y = _without_autograd(torch.ops.pyfinetune.csr_linear, x2, values, crow_indices, col_indices, row_order, bias)
    return y if x2 is x else y.reshape(*x.shape[:-1], y.shape[-1])


# ------------------------------------------------------------------------------- tiled_csr_linear
class TiledPattern(NamedTuple):
    """A compressed-row pattern regrouped in tiles of :data:`TILE_ROWS` x :data:`TILE_COLS` for
    ``tiled_csr_linear``: ``tile_ptr`` int32 [tiles + 1] (tile ``rb * ceil(K / TILE_COLS) + kt``
    covers rows ``rb * TILE_ROWS ...`` and columns ``kt * TILE_COLS ...``), ``tile_loc`` int16 [nnz]
    (row within the tile * TILE_COLS + column within the tile) and ``tile_src`` int32 [nnz]: the
    position in the row-major ``values`` of each tile entry (``tile_values = values[tile_src]``)."""

    tile_ptr: Tensor
    tile_loc: Tensor
    tile_src: Tensor


def tiled_pattern(crow_indices: Tensor, col_indices: Tensor, num_cols: int) -> TiledPattern:
    """The :class:`TiledPattern` of a compressed-row pattern ``crow_indices`` [M + 1], ``col_indices``
    [nnz] of a weight [M, ``num_cols``], on the pattern's device. Within a tile the entries keep the
    compressed-row order (rows ascending, then columns), so that the tile order of ``values`` is
    read in runs. The pattern is taken as valid (columns in [0, num_cols), as
    :func:`compressed_pattern` makes them): its contents are not read on the host, so that a CUDA
    pattern costs no synchronization; the ops' CPU kernels check the tiles they are given."""
    if crow_indices.dim() != 1 or crow_indices.shape[0] < 1 or col_indices.dim() != 1:
        raise ValueError(f"pyfinetune.tiled_pattern: crow_indices must be [M + 1] and col_indices [nnz], got shapes "
                         f"{tuple(crow_indices.shape)} and {tuple(col_indices.shape)}")
    try:
        num_cols = operator.index(num_cols)
    except TypeError:
        num_cols = -1
    if num_cols < 0:
        raise ValueError(f"pyfinetune.tiled_pattern: num_cols must be an int >= 0, got {num_cols!r}")
    m = crow_indices.shape[0] - 1
    nnz = col_indices.shape[0]
    kt = -(-num_cols // TILE_COLS)
    tiles = -(-m // TILE_ROWS) * kt
    if tiles + 1 > _INT32_MAX or nnz > _INT32_MAX:
        raise ValueError(f"pyfinetune.tiled_pattern: a [{m}, {num_cols}] pattern with {nnz} kept weights has too many "
                         "tiles or entries for int32 offsets")
    rows = _entry_rows(crow_indices, nnz)
    col = col_indices.long()
    tile = (rows // TILE_ROWS) * kt + col // TILE_COLS
    # A stable sort by tile keeps the compressed-row order inside each tile.
    tile_src = torch.argsort(tile, stable=True)
    loc = (rows % TILE_ROWS) * TILE_COLS + col % TILE_COLS
    # index_add_ rather than bincount: no size depends on the data (traceable, meta tensors).
    counts = torch.zeros(tiles + 1, dtype=torch.long, device=col.device)
    counts.index_add_(0, tile + 1, torch.ones_like(tile))
    tile_ptr = counts.cumsum(0).to(torch.int32)
    return TiledPattern(tile_ptr, loc[tile_src].to(torch.int16), tile_src.to(torch.int32))


def _tiled_index(tile_ptr: Tensor, tile_loc: Tensor, m: int, k: int) -> Tensor:
    """Flat position (row * k + col, int64) in W [m, k] of each tile entry."""
    kt = -(-k // TILE_COLS)
    n_tiles = tile_ptr.shape[0] - 1
    counts = (tile_ptr[1:] - tile_ptr[:-1]).long()
    tile = torch.repeat_interleave(torch.arange(n_tiles, device=tile_ptr.device), counts,
                                   output_size=tile_loc.shape[0])
    loc = tile_loc.long()
    rows = (tile // kt) * TILE_ROWS + loc // TILE_COLS
    cols = (tile % kt) * TILE_COLS + loc % TILE_COLS
    return rows * k + cols


def _tiled_op_backward(ctx, grad):
    # The op's own autograd, in torch ops (differentiable again): dx = grad @ W, dtile_values =
    # (grad^T @ x) at the tile positions, dbias = grad summed. tiled_csr_linear below uses the
    # sparse backward kernels instead.
    x, tile_values, tile_ptr, tile_loc = ctx.saved_tensors
    m, k = ctx.out_features, x.shape[1]
    flat = _tiled_index(tile_ptr, tile_loc, m, k)
    need_x, need_v, _, _, _, need_b = ctx.needs_input_grad
    dx = dv = db = None
    if need_x:
        w = tile_values.new_zeros(m * k).index_put((flat,), tile_values).view(m, k)
        dx = grad @ w
    if need_v:
        dv = (grad.t() @ x).reshape(-1)[flat]
    if need_b and ctx.has_bias:
        db = grad.sum(0)
    return dx, dv, None, None, None, db


def _tiled_op_setup_context(ctx, inputs, output):
    x, tile_values, tile_ptr, tile_loc, out_features, bias = inputs
    ctx.save_for_backward(x, tile_values, tile_ptr, tile_loc)
    ctx.out_features = out_features
    ctx.has_bias = bias is not None


torch.library.register_autograd("pyfinetune::tiled_csr_linear", _tiled_op_backward,
                                setup_context=_tiled_op_setup_context)


def _tiled_dx_op_backward(ctx, grad):
    # dx = grad_out @ W: d(grad_out) = grad @ W^T, d(tile_values) = (grad_out^T @ grad) at the tiles.
    grad_out, tile_values, tile_ptr, tile_loc = ctx.saved_tensors
    m, k = grad_out.shape[1], ctx.in_features
    flat = _tiled_index(tile_ptr, tile_loc, m, k)
    need_g, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dg = dv = None
    if need_g:
        w = tile_values.new_zeros(m * k).index_put((flat,), tile_values).view(m, k)
        dg = grad @ w.t()
    if need_v:
        dv = (grad_out.t() @ grad).reshape(-1)[flat]
    return dg, dv, None, None, None


def _tiled_dx_op_setup_context(ctx, inputs, output):
    grad_out, tile_values, tile_ptr, tile_loc, in_features = inputs
    ctx.save_for_backward(grad_out, tile_values, tile_ptr, tile_loc)
    ctx.in_features = in_features


torch.library.register_autograd("pyfinetune::tiled_csr_linear_backward_input", _tiled_dx_op_backward,
                                setup_context=_tiled_dx_op_setup_context)


def _tiled_dv_op_backward(ctx, grad):
    # dvalues = (grad_out^T @ x) at the kept positions, in compressed-row order: with S the dense
    # [M, K] holding grad at those positions, d(grad_out) = x @ S^T and d(x) = grad_out @ S.
    grad_out, x, tile_ptr, tile_loc, tile_src = ctx.saved_tensors
    m, k = grad_out.shape[1], x.shape[1]
    flat = _tiled_index(tile_ptr, tile_loc, m, k)
    s = grad.new_zeros(m * k).index_put((flat,), grad[tile_src.long()]).view(m, k)
    need_g, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return x @ s.t() if need_g else None, grad_out @ s if need_x else None, None, None, None


def _tiled_dv_op_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


torch.library.register_autograd("pyfinetune::tiled_csr_linear_backward_values", _tiled_dv_op_backward,
                                setup_context=_tiled_dv_op_setup_context)


@_eager_twin
class _TiledCsrLinear(torch.autograd.Function):
    """tiled_csr_linear forward; backward on CUDA from the same tiles on tensor cores: the input
    gradient (tiled_csr_linear_backward_input, where its kernel's shared memory fits the GPU: A100,
    H100, not 8.6 / 8.9 / 12.x) and the values' gradient (tiled_csr_linear_backward_values); the
    rest (the bias's gradient, and everything on the CPU) from csr_linear's backward."""

    @staticmethod
    def forward(x, values, tile_values, tiled, pattern, bias):
        return torch.ops.pyfinetune.tiled_csr_linear(x, tile_values, tiled.tile_ptr, tiled.tile_loc,
                                                     pattern.crow_indices.shape[0] - 1, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, values, tile_values, tiled, pattern, bias = inputs
        ctx.save_for_backward(x, values, tile_values, tiled.tile_ptr, tiled.tile_loc, tiled.tile_src, *pattern)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        (x, values, tile_values, tile_ptr, tile_loc, tile_src, crow, col, row_order, ccol, row_idx,
         csc_to_csr) = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_v, need_b = need[0], need[1], need[5] and ctx.has_bias
        if _create_graph():  # a differentiable backward
            dx, dv, db = _differentiable_csr_grads(grad, x, values, crow, col, need_x, need_v, need_b)
            return dx, dv, None, None, None, db
        dx = dv = db = None
        on_tensor_cores = grad.is_cuda
        if need_x and on_tensor_cores and _tiled_dx_fits(grad.device):
            dx = torch.ops.pyfinetune.tiled_csr_linear_backward_input(grad, tile_values, tile_ptr, tile_loc, x.shape[1])
        if need_v and on_tensor_cores:
            dv = torch.ops.pyfinetune.tiled_csr_linear_backward_values(grad, x, tile_ptr, tile_loc, tile_src)
        rest = [need_x and dx is None, need_v and dv is None, need_b]
        if any(rest):
            dx2, dv2, db = torch.ops.pyfinetune.csr_linear_backward(grad, x, values, crow, col, row_order, ccol,
                                                                    row_idx, csc_to_csr, rest)
            dx = dx2 if rest[0] else dx
            dv = dv2 if rest[1] else dv
        return dx if need_x else None, dv if need_v else None, None, None, None, db if need_b else None


def tiled_csr_linear(x: Tensor, values: Tensor, pattern: CompressedPattern, tiled: TiledPattern,
                     bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W^T + bias`` like :func:`csr_linear`, the forward through ``tiled_csr_linear`` (on CUDA:
    tensor cores, float16 / bfloat16, compute capability 8.0+).

    Args:
        x: [..., K]. values: [nnz] in the compressed-row order of ``pattern``.
        pattern: the :class:`CompressedPattern` of W (the backward runs csr_linear's kernels on it).
        tiled: :func:`tiled_pattern` of the same pattern.
        bias: None or [M].

    The values in tile order (``values[tiled.tile_src]``) are gathered at each call.

    Differentiable in x, values and bias (dvalues: the sampled product at the kept positions), twice
    under ``create_graph=True`` (as :func:`csr_linear`); under torch.func transforms and
    forward-mode AD it is :func:`csr_linear`'s composition of torch ops.
    """
    _require_tensors("tiled_csr_linear", x=x, bias_=bias)
    x2 = _flatten_batch(x, "tiled_csr_linear")
    _check_pattern_width("tiled_csr_linear", x, x2, pattern.ccol_indices)
    nnz = pattern.col_indices.shape[0]
    if not isinstance(values, Tensor) or values.dim() != 1 or values.shape[0] != nnz:
        got = f"shape {tuple(values.shape)}" if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"pyfinetune.tiled_csr_linear: values must be [nnz] = [{nnz}] (the pattern's kept weights), "
                         f"got {got}")
    if tiled.tile_src.shape[0] != nnz:
        raise ValueError(f"pyfinetune.tiled_csr_linear: tiled must be tiled_pattern of the same pattern (nnz = {nnz}), "
                         f"got tile_src of {tiled.tile_src.shape[0]} entries")
    if _transforms_active():
        # torch.func transforms, forward-mode AD: the op's registered autograd does not run there;
        # csr_linear composes the same product of torch ops.
        return csr_linear(x, values, *pattern, bias=bias)
    with torch.no_grad():
        tile_values = values.index_select(0, tiled.tile_src)
    if torch.is_grad_enabled() and (x2.requires_grad or values.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _apply(_TiledCsrLinear, x2, values, tile_values, tiled, pattern, bias)
    else:
        y = _without_autograd(torch.ops.pyfinetune.tiled_csr_linear, x2, tile_values, tiled.tile_ptr, tiled.tile_loc,
                              pattern.crow_indices.shape[0] - 1, bias)
    return y if x2 is x else y.reshape(*x.shape[:-1], y.shape[-1])


kd_loss_fwd = torch.ops.pyfinetune.kd_loss_fwd
kd_loss_topk_fwd = torch.ops.pyfinetune.kd_loss_topk_fwd

__all__ = ["fused_adamw_", "fused_sgd_", "kd_loss_fwd", "kd_loss_topk_fwd", "masked_matmul", "csr_linear",
           "tiled_csr_linear", "TiledPattern", "tiled_pattern", "TILE_ROWS", "TILE_COLS",
           "csr_to_dense", "csr_gather", "CompressedPattern", "compressed_pattern", "pattern_from_csr"]
