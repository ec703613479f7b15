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

Distillation ops (forward with the gradient; the backward only scales the saved gradient):

``torch.ops.pyfinetune.kd_loss_fwd(student, teacher, labels, *, temperature, alpha, divergence,
beta, ignore_index, need_grad) -> (loss, grad)``

``torch.ops.pyfinetune.kd_loss_topk_fwd(student, teacher_values, teacher_indices, labels, *,
temperature, alpha, divergence, beta, ignore_index, need_grad) -> (loss, grad)``

* ``student``, ``teacher``: [N, V] float32, bfloat16, float16 or float64 (each its own dtype),
  unit stride along V, any row stride. ``teacher_values`` [N, k] float, ``teacher_indices``
  [N, k] int64 in [0, V), distinct within a row. ``labels``: None or int64 [N].
* ``loss``: [N] float32 (float64 when an input is float64), the per-row loss, 0 for ignored rows.
* ``grad``: d(loss[r]) / d(student[r]), [N, V] in the student's dtype, or an empty tensor when
  ``need_grad`` is False. The autograd formula of both ops is d/d(student) = grad * g[:, None]
  for the incoming gradient g of ``loss``; the teacher and the labels get no gradient.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("pyfinetune::fused_adamw_")
def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                      lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, *, amsgrad, maximize,
                      decoupled_l2sp, grad_scale=None, found_inf=None):
    _check_fake_lists("fused_adamw_", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    return None


@torch.library.register_fake("pyfinetune::fused_sgd_")
def _fused_sgd_fake(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings,
                    weight_decays, l2sps, l1s, *, nesterov, maximize, decoupled_l2sp, grad_scale=None,
                    found_inf=None):
    _check_fake_lists("fused_sgd_", params, grads=grads)
    return None


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


def _kd_fake_outputs(student, teacher, need_grad):
    if student.dim() != 2:
        raise RuntimeError(f"pyfinetune.kd_loss: student must be 2-D [N, V], got shape {tuple(student.shape)}")
    n, v = student.shape
    wide = torch.float64 in (student.dtype, teacher.dtype)
    loss = student.new_empty((n,), dtype=torch.float64 if wide else torch.float32)
    grad = student.new_empty((n, v)) if need_grad else student.new_empty((0,))
    return loss, grad


@torch.library.register_fake("pyfinetune::kd_loss_fwd")
def _kd_loss_fwd_fake(student, teacher, labels, *, temperature, alpha, divergence, beta, ignore_index, need_grad):
    if teacher.shape != student.shape:
        raise RuntimeError(
            f"pyfinetune.kd_loss_fwd: teacher must have the shape of student {tuple(student.shape)}, "
            f"got {tuple(teacher.shape)}"
        )
    return _kd_fake_outputs(student, teacher, need_grad)


@torch.library.register_fake("pyfinetune::kd_loss_topk_fwd")
def _kd_loss_topk_fwd_fake(student, teacher_values, teacher_indices, labels, *, temperature, alpha, divergence, beta,
                           ignore_index, need_grad):
    if teacher_indices.shape != teacher_values.shape:
        raise RuntimeError(
            f"pyfinetune.kd_loss_topk_fwd: teacher_indices must have the shape of teacher_values "
            f"{tuple(teacher_values.shape)}, got {tuple(teacher_indices.shape)}"
        )
    return _kd_fake_outputs(student, teacher_values, need_grad)


def _kd_setup_context(ctx, inputs, keyword_only_inputs, output):
    _, grad = output
    ctx.need_grad = keyword_only_inputs["need_grad"]
    # The kept gradient is an output nobody differentiates: without this, autograd would
    # materialize a logits-sized tensor of zeros as its incoming gradient on every backward.
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad)


def _is_eager(t: torch.Tensor) -> bool:
    """True for a plain tensor outside any tracing (compile, export, fake or functional modes)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return type(t) is torch.Tensor and not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None


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
    if not _is_eager(grad):
        # Traced backward: the functional form (the compiler plans the buffers itself).
        return grad.mul(scale).to(grad.dtype), None, None
    applied = getattr(ctx, "applied_scale", None)
    if applied is None:
        # On the CPU, when every row's scale is finite and nonzero (so that it can be undone),
        # scale the kept buffer in place and hand it on: no second logits-sized tensor and no
        # fresh pages to fault in. `.data` leaves the saved tensor's version unchanged so that
        # a retained graph can still unpack it; `applied_scale` records what it now holds. On
        # CUDA that check would synchronize with the host, so the product is a new tensor there.
        if grad.device.type == "cpu" and bool(((scale != 0) & scale.isfinite()).all()):
            ctx.applied_scale = scale.detach().clone()
            grad.data.mul_(scale)
            return grad, None, None
        return grad.mul(scale).to(grad.dtype), None, None
    # A later backward through a retained graph: the buffer holds the gradient times the first
    # in-place call's scale, which was finite and nonzero in every row.
    return grad.mul(scale / applied).to(grad.dtype), None, None


def _kd_topk_backward(ctx, grad_loss, _grad_of_grad):
    g_student, _, _ = _kd_backward(ctx, grad_loss, _grad_of_grad)
    return g_student, None, None, None


torch.library.register_autograd("pyfinetune::kd_loss_fwd", _kd_backward, setup_context=_kd_setup_context)
torch.library.register_autograd("pyfinetune::kd_loss_topk_fwd", _kd_topk_backward, setup_context=_kd_setup_context)

fused_adamw_ = torch.ops.pyfinetune.fused_adamw_
fused_sgd_ = torch.ops.pyfinetune.fused_sgd_

kd_loss_fwd = torch.ops.pyfinetune.kd_loss_fwd
kd_loss_topk_fwd = torch.ops.pyfinetune.kd_loss_topk_fwd

__all__ = ["fused_adamw_", "fused_sgd_", "kd_loss_fwd", "kd_loss_topk_fwd"]
