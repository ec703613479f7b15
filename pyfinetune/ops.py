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


fused_adamw_ = torch.ops.pyfinetune.fused_adamw_
fused_sgd_ = torch.ops.pyfinetune.fused_sgd_

__all__ = ["fused_adamw_", "fused_sgd_"]
