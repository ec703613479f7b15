// Declarations shared by the CPU and CUDA implementations of the fused optimizer ops: the
// argument validation (run in full before any tensor is written, so bad input never leaves a
// parameter half-updated) and small helpers to read the optional lists.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

namespace pyfinetune {

using OptTensorList = c10::List<std::optional<at::Tensor>>;

// Entry i of an optional list that may be empty (empty = all None).
inline std::optional<at::Tensor> opt_at(const OptTensorList& list, size_t i) {
  if (list.size() == 0) {
    return std::nullopt;
  }
  std::optional<at::Tensor> t = list.get(i);
  if (t.has_value() && !t->defined()) {
    return std::nullopt;
  }
  return t;
}

// The parameter lists of the two ops (their schemas in csrc/pyfinetune.cpp), written once for the
// CPU and CUDA kernels and the Autograd / ADInplaceOrView layers (csrc/inplace_autograd.cpp), and
// the matching argument lists for a kernel that forwards its call.
#define PF_FUSED_ADAMW_PARAMS                                                                               \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,           \
      at::TensorList max_exp_avg_sqs, const ::pyfinetune::OptTensorList &anchors,                              \
      const ::pyfinetune::OptTensorList &masks, at::TensorList steps, at::ArrayRef<double> lrs,                \
      const ::pyfinetune::OptTensorList &lr_tensors, at::ArrayRef<double> beta1s, at::ArrayRef<double> beta2s, \
      at::ArrayRef<double> epss, at::ArrayRef<double> weight_decays, at::ArrayRef<double> l2sps,               \
      at::ArrayRef<double> l1s, bool amsgrad, bool maximize, bool decoupled_l2sp,                              \
      const std::optional<at::Tensor>&grad_scale, const std::optional<at::Tensor>&found_inf
#define PF_FUSED_ADAMW_ARGS                                                                                   \
  params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs, lr_tensors, beta1s, beta2s, \
      epss, weight_decays, l2sps, l1s, amsgrad, maximize, decoupled_l2sp, grad_scale, found_inf
#define PF_FUSED_SGD_PARAMS                                                                                   \
  at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,                               \
      const ::pyfinetune::OptTensorList &anchors, const ::pyfinetune::OptTensorList &masks,                    \
      at::ArrayRef<double> lrs, const ::pyfinetune::OptTensorList &lr_tensors, at::ArrayRef<double> momentums, \
      at::ArrayRef<double> dampenings, at::ArrayRef<double> weight_decays, at::ArrayRef<double> l2sps,         \
      at::ArrayRef<double> l1s, bool nesterov, bool maximize, bool decoupled_l2sp,                             \
      const std::optional<at::Tensor>&grad_scale, const std::optional<at::Tensor>&found_inf
#define PF_FUSED_SGD_ARGS                                                                                     \
  params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings, weight_decays, l2sps, \
      l1s, nesterov, maximize, decoupled_l2sp, grad_scale, found_inf

void check_fused_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                            const OptTensorList& anchors, const OptTensorList& masks, at::TensorList steps,
                            at::ArrayRef<double> lrs, const OptTensorList& lr_tensors,
                            at::ArrayRef<double> beta1s, at::ArrayRef<double> beta2s, at::ArrayRef<double> epss,
                            at::ArrayRef<double> weight_decays, at::ArrayRef<double> l2sps,
                            at::ArrayRef<double> l1s, bool amsgrad, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf);

void check_fused_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                          const OptTensorList& anchors, const OptTensorList& masks, at::ArrayRef<double> lrs,
                          const OptTensorList& lr_tensors, at::ArrayRef<double> momentums,
                          at::ArrayRef<double> dampenings, at::ArrayRef<double> weight_decays,
                          at::ArrayRef<double> l2sps, at::ArrayRef<double> l1s, bool nesterov,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf);

// Set by the cached step plan (csrc/step_plan.cpp) around one call of fused_adamw_ / fused_sgd_
// whose tensors all have exactly the metadata they had in an earlier call of the same launch whose
// checks passed: the same tensors as parameters and states, dtypes, devices, layouts, sizes,
// strides and (of the tensors a step writes) data pointers. Every per-tensor check is a function
// of those, so the op then skips them (for resnet50's 161 parameters, ~50 us of a step's host time
// on a 2-core CPU) and checks only its scalar arguments and GradScaler tensors. Thread-local; the
// first argument check of the op reads and clears it, so nothing the op calls inherits it.
class PrevalidatedTensors {
 public:
  PrevalidatedTensors();
  ~PrevalidatedTensors();
  PrevalidatedTensors(const PrevalidatedTensors&) = delete;
  PrevalidatedTensors& operator=(const PrevalidatedTensors&) = delete;

 private:
  bool previous_;
};

// The value `_layout_signature` gives for the list first ++ second (undefined tensors read as None):
// the cached step plan's check that gradients are laid out like their parameters.
int64_t layout_signature_of(at::TensorList first, at::TensorList second);

}  // namespace pyfinetune
