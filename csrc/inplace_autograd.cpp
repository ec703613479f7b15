// The Autograd and ADInplaceOrView kernels of the ops that write to their arguments (fused_adamw_,
// fused_sgd_, kd_loss_fwd_inplace, csr_to_dense_into, _scale_kept_), for every device: what torch's own in-place
// ops do at those keys, which a custom op does not get by default (it was overwriting a leaf that
// requires grad without a word, and leaving its version counter alone).
//   * Autograd (skipped inside torch.inference_mode()): in grad mode, a written argument that
//     requires grad is refused before anything is written (the ops are not differentiable;
//     pyfinetune.optim calls its ops under torch.no_grad(), as torch's optimizers do), and so is an
//     inference tensor written outside inference mode (as torch refuses it).
//   * ADInplaceOrView (also run inside inference mode, for tensors that are not inference tensors):
//     after the call, every written tensor's version counter moves, so that autograd reports a
//     tensor it saved for a backward and the op then overwrote (parameters a retained graph still
//     needs, updated by an optimizer step) instead of computing a silently wrong gradient.
// Unboxed, typed kernels: a boxed one (the arguments boxed and unboxed again) cost about 10 us per
// step of 161 small parameters in an ad hoc timing, about 4% of that step; these cost a pass over
// the written lists (benchmarks/results/optim-cpu-20261126-1739, `bench_optim.py --case tiny`: ours
// 3.8x torch's fused AdamW and 1.8x DeepSpeed's CPU Adam on that list, as before them).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <pyfinetune/checks.h>
#include <pyfinetune/fused_optim.h>

#include <initializer_list>
#include <type_traits>
#include <string>

namespace pyfinetune {
namespace {

struct Written {
  const char* name;
  at::TensorList tensors;
  bool is_list;
};

// The Autograd layer's checks.
void refuse_written(const char* op, std::initializer_list<Written> written) {
  const bool grad_mode = at::GradMode::is_enabled();
  const bool inference_mode = c10::InferenceMode::is_enabled();
  for (const Written& w : written) {
    for (size_t i = 0; i < w.tensors.size(); ++i) {
      const at::Tensor& t = w.tensors[i];
      if (!t.defined()) {
        continue;
      }
      const bool tracked = grad_mode && t.requires_grad();
      const bool inference_outside = !inference_mode && t.is_inference();
      if (tracked || inference_outside) {
        const std::string name = w.is_list ? arg_name(w.name, i) : std::string(w.name);
        PF_CHECK(!tracked, op, name,
                 " requires grad: the op writes to it in place and is not differentiable (call it under "
                 "torch.no_grad(), or on a tensor autograd does not track)");
        PF_CHECK(false, op, name,
                 " is an inference tensor (made under torch.inference_mode()): the op writes to it in place, "
                 "which torch allows only inside inference mode");
      }
    }
  }
}

// The ADInplaceOrView layer's bookkeeping.
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

// One kernel per op for both layers: kAutograd checks and calls the layer below (ADInplaceOrView,
// then the device kernel); the ADInplaceOrView instance calls the device kernel and bumps.
template <bool kAutograd, typename Call>
decltype(auto) written_layer(const char* op, std::initializer_list<Written> written, Call&& call) {
  if constexpr (kAutograd) {
    refuse_written(op, written);
    const at::AutoDispatchBelowAutograd below_autograd;
    return call();
  } else {
    if constexpr (std::is_void_v<decltype(call())>) {
      {
        const at::AutoDispatchBelowADInplaceOrView below;
        call();
      }
      bump_versions(written);
    } else {
      auto out = [&] {
        const at::AutoDispatchBelowADInplaceOrView below;
        return call();
      }();
      bump_versions(written);
      return out;
    }
  }
}

using AdamwSig = void(PF_FUSED_ADAMW_PARAMS);

template <bool kAutograd>
void fused_adamw_layer(PF_FUSED_ADAMW_PARAMS) {
  static const auto op = typed_op<AdamwSig>("pyfinetune::fused_adamw_");
  written_layer<kAutograd>("fused_adamw_",
                           {{"params", params, true},
                            {"exp_avgs", exp_avgs, true},
                            {"exp_avg_sqs", exp_avg_sqs, true},
                            {"max_exp_avg_sqs", max_exp_avg_sqs, true}},
                           [&] { op.call(PF_FUSED_ADAMW_ARGS); });
}

using SgdSig = void(PF_FUSED_SGD_PARAMS);

template <bool kAutograd>
void fused_sgd_layer(PF_FUSED_SGD_PARAMS) {
  static const auto op = typed_op<SgdSig>("pyfinetune::fused_sgd_");
  written_layer<kAutograd>("fused_sgd_", {{"params", params, true}, {"momentum_buffers", momentum_buffers, true}},
                           [&] { op.call(PF_FUSED_SGD_ARGS); });
}

using KdInplaceSig = at::Tensor(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double,
                                c10::string_view, double, int64_t, double);

template <bool kAutograd>
at::Tensor kd_loss_fwd_inplace_layer(at::Tensor& student, const at::Tensor& teacher,
                                     const std::optional<at::Tensor>& labels, double temperature, double alpha,
                                     c10::string_view divergence, double beta, int64_t ignore_index,
                                     double grad_scale) {
  static const auto op = typed_op<KdInplaceSig>("pyfinetune::kd_loss_fwd_inplace");
  return written_layer<kAutograd>("kd_loss_fwd_inplace", {{"student", at::TensorList(student), false}}, [&] {
    return op.call(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, grad_scale);
  });
}

using ScaleKeptSig = void(at::Tensor&, const at::Tensor&);

template <bool kAutograd>
void scale_kept_layer(at::Tensor& grad, const at::Tensor& scale) {
  static const auto op = typed_op<ScaleKeptSig>("pyfinetune::_scale_kept_");
  written_layer<kAutograd>("_scale_kept_", {{"grad", at::TensorList(grad), false}}, [&] { op.call(grad, scale); });
}

using CsrIntoSig = void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

template <bool kAutograd>
void csr_to_dense_into_layer(at::Tensor& out, const at::Tensor& values, const at::Tensor& crow_indices,
                             const at::Tensor& col_indices) {
  static const auto op = typed_op<CsrIntoSig>("pyfinetune::csr_to_dense_into");
  written_layer<kAutograd>("csr_to_dense_into", {{"out", at::TensorList(out), false}},
                           [&] { op.call(out, values, crow_indices, col_indices); });
}

}  // namespace
}  // namespace pyfinetune

TORCH_LIBRARY_IMPL(pyfinetune, Autograd, m) {
  m.impl("fused_adamw_", &pyfinetune::fused_adamw_layer<true>);
  m.impl("fused_sgd_", &pyfinetune::fused_sgd_layer<true>);
  m.impl("kd_loss_fwd_inplace", &pyfinetune::kd_loss_fwd_inplace_layer<true>);
  m.impl("csr_to_dense_into", &pyfinetune::csr_to_dense_into_layer<true>);
  m.impl("_scale_kept_", &pyfinetune::scale_kept_layer<true>);
}

TORCH_LIBRARY_IMPL(pyfinetune, ADInplaceOrView, m) {
  m.impl("fused_adamw_", &pyfinetune::fused_adamw_layer<false>);
  m.impl("fused_sgd_", &pyfinetune::fused_sgd_layer<false>);
  m.impl("kd_loss_fwd_inplace", &pyfinetune::kd_loss_fwd_inplace_layer<false>);
  m.impl("csr_to_dense_into", &pyfinetune::csr_to_dense_into_layer<false>);
  m.impl("_scale_kept_", &pyfinetune::scale_kept_layer<false>);
}
