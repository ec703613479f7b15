// The Autograd kernels of the ops that write to their arguments (fused_adamw_, fused_sgd_,
// kd_loss_fwd_inplace, csr_to_dense_into), for every device: what torch's own in-place ops do at that key, which a
// custom op does not get by default (it was overwriting a leaf that requires grad without a word,
// and leaving its version counter alone).
//   * In grad mode, a written argument that requires grad is refused before anything is written:
//     the ops are not differentiable (pyfinetune.optim calls its ops under torch.no_grad(), as
//     torch's optimizers do).
//   * After the call, every written tensor's version counter moves, so that autograd reports a
//     tensor it saved for a backward and the op then overwrote (parameters a retained graph still
//     needs, updated by an optimizer step) instead of computing a silently wrong gradient.
// Unboxed, typed kernels: a boxed one cost 10 us per step of 161 small parameters (the arguments
// boxed and unboxed again), 4% of that step; these cost a pass over the written lists.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <pyfinetune/checks.h>
#include <pyfinetune/fused_optim.h>

#include <initializer_list>
#include <string>

namespace pyfinetune {
namespace {

struct Written {
  const char* name;
  at::TensorList tensors;
  bool is_list;
};

void refuse_tracked(const char* op, std::initializer_list<Written> written) {
  if (!at::GradMode::is_enabled()) {
    return;
  }
  for (const Written& w : written) {
    for (size_t i = 0; i < w.tensors.size(); ++i) {
      const at::Tensor& t = w.tensors[i];
      if (t.defined() && t.requires_grad()) {
        const std::string name = w.is_list ? arg_name(w.name, i) : std::string(w.name);
        PF_CHECK(false, op, name,
                 " requires grad: the op writes to it in place and is not differentiable (call it under "
                 "torch.no_grad(), or on a tensor autograd does not track)");
      }
    }
  }
}

void bump_versions(std::initializer_list<Written> written) {
  for (const Written& w : written) {
    for (const at::Tensor& t : w.tensors) {
      if (t.defined() && !t.is_inference()) {  // inference tensors have no version counter
        t.unsafeGetTensorImpl()->bump_version();
      }
    }
  }
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using AdamwSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      const OptTensorList&, const OptTensorList&, at::TensorList, at::ArrayRef<double>,
                      const OptTensorList&, at::ArrayRef<double>, at::ArrayRef<double>, at::ArrayRef<double>,
                      at::ArrayRef<double>, at::ArrayRef<double>, at::ArrayRef<double>, bool, bool, bool,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

void fused_adamw_autograd(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const OptTensorList& anchors,
                          const OptTensorList& masks, at::TensorList steps, at::ArrayRef<double> lrs,
                          const OptTensorList& lr_tensors, at::ArrayRef<double> beta1s, at::ArrayRef<double> beta2s,
                          at::ArrayRef<double> epss, at::ArrayRef<double> weight_decays, at::ArrayRef<double> l2sps,
                          at::ArrayRef<double> l1s, bool amsgrad, bool maximize, bool decoupled_l2sp,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const std::initializer_list<Written> written = {
      {"params", params, true}, {"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true},
      {"max_exp_avg_sqs", max_exp_avg_sqs, true}};
  refuse_tracked("fused_adamw_", written);
  {
    static const auto op = typed_op<AdamwSig>("pyfinetune::fused_adamw_");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.call(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs, lr_tensors, beta1s,
            beta2s, epss, weight_decays, l2sps, l1s, amsgrad, maximize, decoupled_l2sp, grad_scale, found_inf);
  }
  bump_versions(written);
}

using SgdSig = void(at::TensorList, at::TensorList, at::TensorList, const OptTensorList&, const OptTensorList&,
                    at::ArrayRef<double>, const OptTensorList&, at::ArrayRef<double>, at::ArrayRef<double>,
                    at::ArrayRef<double>, at::ArrayRef<double>, at::ArrayRef<double>, bool, bool, bool,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);

void fused_sgd_autograd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                        const OptTensorList& anchors, const OptTensorList& masks, at::ArrayRef<double> lrs,
                        const OptTensorList& lr_tensors, at::ArrayRef<double> momentums,
                        at::ArrayRef<double> dampenings, at::ArrayRef<double> weight_decays,
                        at::ArrayRef<double> l2sps, at::ArrayRef<double> l1s, bool nesterov, bool maximize,
                        bool decoupled_l2sp, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  const std::initializer_list<Written> written = {{"params", params, true},
                                                  {"momentum_buffers", momentum_buffers, true}};
  refuse_tracked("fused_sgd_", written);
  {
    static const auto op = typed_op<SgdSig>("pyfinetune::fused_sgd_");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.call(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings, weight_decays,
            l2sps, l1s, nesterov, maximize, decoupled_l2sp, grad_scale, found_inf);
  }
  bump_versions(written);
}

using KdInplaceSig = at::Tensor(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double,
                                c10::string_view, double, int64_t, double);

at::Tensor kd_loss_fwd_inplace_autograd(at::Tensor& student, const at::Tensor& teacher,
                                        const std::optional<at::Tensor>& labels, double temperature, double alpha,
                                        c10::string_view divergence, double beta, int64_t ignore_index,
                                        double grad_scale) {
  const std::initializer_list<Written> written = {{"student", at::TensorList(student), false}};
  refuse_tracked("kd_loss_fwd_inplace", written);
  at::Tensor loss;
  {
    static const auto op = typed_op<KdInplaceSig>("pyfinetune::kd_loss_fwd_inplace");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    loss = op.call(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, grad_scale);
  }
  bump_versions(written);
  return loss;
}

using CsrIntoSig = void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

void csr_to_dense_into_autograd(at::Tensor& out, const at::Tensor& values, const at::Tensor& crow_indices,
                                const at::Tensor& col_indices) {
  const std::initializer_list<Written> written = {{"out", at::TensorList(out), false}};
  refuse_tracked("csr_to_dense_into", written);
  {
    static const auto op = typed_op<CsrIntoSig>("pyfinetune::csr_to_dense_into");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    op.call(out, values, crow_indices, col_indices);
  }
  bump_versions(written);
}

}  // namespace
}  // namespace pyfinetune

TORCH_LIBRARY_IMPL(pyfinetune, Autograd, m) {
  m.impl("fused_adamw_", &pyfinetune::fused_adamw_autograd);
  m.impl("fused_sgd_", &pyfinetune::fused_sgd_autograd);
  m.impl("kd_loss_fwd_inplace", &pyfinetune::kd_loss_fwd_inplace_autograd);
  m.impl("csr_to_dense_into", &pyfinetune::csr_to_dense_into_autograd);
}
