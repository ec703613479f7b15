// pyfinetune.optim's cached step in C++: the argument lists of a step's launches, held here so that
// a step that nothing changed since the last one costs one call from Python instead of passing
// every list again (torch.ops converts each tensor of each list from Python: with 256 parameters,
// about 0.5 ms of a step of tiny tensors on the CPU; on a GPU that is host time the kernels wait
// for when a step runs alone, as in a benchmark or after a synchronization).
//
// The Python side (pyfinetune/optim.py, `_FusedPenalizedOptimizer._save_plan`) builds a plan after
// a step whose arguments it validated in full, and runs it while the param groups, hyper-parameters
// and state it was built from are unchanged. What Python cannot see cheaply is checked here, before
// anything is written: every parameter of a launch still has a gradient laid out exactly like it
// (dtype, device, layout, sizes, strides), the parameters themselves still look as they were
// validated (`p.data = ...` behind the optimizer's back), and no parameter that had no gradient
// then has one now. When any of it fails, `run` returns false having written nothing, and the
// optimizer takes its full (validating) path. The launches themselves go through the dispatcher,
// so the Autograd / ADInplaceOrView layers and profiling all still apply, and the ops' own checks
// do too, except that a launch whose tensors all have exactly the metadata of its last launch
// whose checks passed (`Launch::validated`) skips the per-tensor ones (PrevalidatedTensors in
// pyfinetune/fused_optim.h): they could only repeat what they found then.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_foreach_add.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <pyfinetune/checks.h>
#include <pyfinetune/fused_optim.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace pyfinetune {
namespace {

using AdamwSig = void(PF_FUSED_ADAMW_PARAMS);
using SgdSig = void(PF_FUSED_SGD_PARAMS);

// One launch of a planned step: the lists of the op's arguments except the gradients (read from the
// parameters at each run) and the GradScaler tensors (given at each run).
struct Launch {
  bool is_adamw = true;
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> exp_avgs, exp_avg_sqs, max_exp_avg_sqs;  // AdamW
  std::vector<at::Tensor> momentum_buffers;                        // SGD
  OptTensorList anchors, masks;
  std::vector<at::Tensor> steps;  // AdamW: one float32 scalar per parameter
  std::optional<at::Tensor> step_base;  // AdamW: the tensor `steps` are views of, when they are
  std::vector<double> lrs, beta1s, beta2s, epss, momentums, dampenings, weight_decays, l2sps, l1s;
  bool amsgrad = false, nesterov = false, maximize = false, decoupled = false;
  int64_t expected = 0;  // layout signature of params ++ params: gradients laid out like them
  c10::Device device = c10::Device(c10::kCPU);
  // The metadata (`describe_launch`) of the last call of this launch whose checks all passed; empty
  // before the first.
  std::vector<int64_t> validated;

  void add_steps(double value) {
    if (step_base.has_value()) {
      step_base->add_(value);
    } else if (!steps.empty()) {
      at::_foreach_add_(steps, value);
    }
  }

  void sub_found_inf(const at::Tensor& found_inf) {
    if (step_base.has_value()) {
      step_base->sub_(found_inf);
    } else {
      for (at::Tensor& s : steps) {
        s.sub_(found_inf);
      }
    }
  }
};

// A dense CPU / CUDA tensor that dispatches straight to our kernels: no tensor subclass (Python
// key: its __torch_dispatch__ may hand the kernel other tensors than those described), functorch
// wrapper, functional tensor, conjugate / negative view, sparse or other backend. Only the
// autograd, ADInplaceOrView and autocast keys may come with the Dense one.
bool plain_tensor(const at::Tensor& t) {
  static const c10::DispatchKeySet ignored =
      c10::autograd_dispatch_keyset_with_ADInplaceOrView | c10::autocast_dispatch_keyset;
  return (t.unsafeGetTensorImpl()->key_set() - ignored).highestFunctionalityKey() == c10::DispatchKey::Dense;
}

// What the ops' per-tensor checks read of a tensor, exactly (no hash): defined, dtype, device,
// layout, sizes, strides and, for a tensor the step writes, where its data starts (the checks refuse
// written tensors that share memory); also its dispatch keys. `plain` becomes false for a tensor
// that is not plain_tensor (such a launch is never trusted). Reads no data and never throws.
void describe(std::vector<int64_t>& out, const at::Tensor* t, bool written, bool& plain) {
  if (t == nullptr || !t->defined()) {
    out.push_back(-1);
    return;
  }
  plain = plain && plain_tensor(*t);
  out.push_back(static_cast<int64_t>(t->unsafeGetTensorImpl()->key_set().raw_repr()));
  const c10::Device device = t->device();
  out.push_back(static_cast<int64_t>(t->scalar_type()) | static_cast<int64_t>(device.type()) << 8 |
                static_cast<int64_t>(static_cast<uint8_t>(device.index())) << 16 |
                static_cast<int64_t>(t->layout()) << 24 | static_cast<int64_t>(t->dim()) << 32 |
                static_cast<int64_t>(t->is_nested()) << 40);
  if (t->is_nested() || t->layout() != at::kStrided) {  // never a validated tensor: no more to read
    return;
  }
  const c10::TensorImpl* impl = t->unsafeGetTensorImpl();
  for (const int64_t size : t->sizes()) {
    out.push_back(size);
  }
  for (const int64_t stride : t->strides()) {
    out.push_back(stride);
  }
  if (written) {
    int64_t start = -2;  // no storage (never a validated written tensor)
    if (impl->has_storage()) {
      start = reinterpret_cast<intptr_t>(impl->unsafe_storage().data()) +
              static_cast<int64_t>(impl->storage_offset()) * static_cast<int64_t>(t->element_size());
    }
    out.push_back(start);
  }
}

void describe_all(std::vector<int64_t>& out, const std::vector<at::Tensor>& tensors, bool written, bool& plain) {
  out.push_back(static_cast<int64_t>(tensors.size()));
  for (const at::Tensor& t : tensors) {
    describe(out, &t, written, plain);
  }
}

void describe_all(std::vector<int64_t>& out, const OptTensorList& tensors, bool& plain) {
  out.push_back(static_cast<int64_t>(tensors.size()));
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::optional<at::Tensor> t = tensors.get(i);
    describe(out, t.has_value() ? &*t : nullptr, false, plain);
  }
}

// Every tensor argument of launch `l` with gradients `grads`; returns whether all are plain_tensor.
bool describe_launch(std::vector<int64_t>& out, const Launch& l, const std::vector<at::Tensor>& grads) {
  bool plain = true;
  out.clear();
  describe_all(out, l.params, true, plain);
  describe_all(out, grads, false, plain);
  describe_all(out, l.exp_avgs, true, plain);
  describe_all(out, l.exp_avg_sqs, true, plain);
  describe_all(out, l.max_exp_avg_sqs, true, plain);
  describe_all(out, l.momentum_buffers, true, plain);
  describe_all(out, l.anchors, plain);
  describe_all(out, l.masks, plain);
  describe_all(out, l.steps, false, plain);
  return plain;
}

bool plain_or_absent(const std::optional<at::Tensor>& t) {
  return !t.has_value() || !t->defined() || plain_tensor(*t);
}

class StepPlan : public torch::CustomClassHolder {
 public:
  explicit StepPlan(std::vector<at::Tensor> absent) : absent_(std::move(absent)) {}

  void add_adamw(std::vector<at::Tensor> params, std::vector<at::Tensor> exp_avgs,
                 std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> max_exp_avg_sqs,
                 c10::List<std::optional<at::Tensor>> anchors, c10::List<std::optional<at::Tensor>> masks,
                 std::vector<at::Tensor> steps, std::optional<at::Tensor> step_base, std::vector<double> lrs,
                 std::vector<double> beta1s, std::vector<double> beta2s, std::vector<double> epss,
                 std::vector<double> weight_decays, std::vector<double> l2sps, std::vector<double> l1s,
                 bool amsgrad, bool maximize, bool decoupled) {
    Launch l;
    l.is_adamw = true;
    l.params = std::move(params);
    l.exp_avgs = std::move(exp_avgs);
    l.exp_avg_sqs = std::move(exp_avg_sqs);
    l.max_exp_avg_sqs = std::move(max_exp_avg_sqs);
    l.anchors = std::move(anchors);
    l.masks = std::move(masks);
    l.steps = std::move(steps);
    l.step_base = std::move(step_base);
    l.lrs = std::move(lrs);
    l.beta1s = std::move(beta1s);
    l.beta2s = std::move(beta2s);
    l.epss = std::move(epss);
    l.weight_decays = std::move(weight_decays);
    l.l2sps = std::move(l2sps);
    l.l1s = std::move(l1s);
    l.amsgrad = amsgrad;
    l.maximize = maximize;
    l.decoupled = decoupled;
    add(std::move(l));
  }

  void add_sgd(std::vector<at::Tensor> params, std::vector<at::Tensor> momentum_buffers,
               c10::List<std::optional<at::Tensor>> anchors, c10::List<std::optional<at::Tensor>> masks,
               std::vector<double> lrs, std::vector<double> momentums, std::vector<double> dampenings,
               std::vector<double> weight_decays, std::vector<double> l2sps, std::vector<double> l1s, bool nesterov,
               bool maximize, bool decoupled) {
    Launch l;
    l.is_adamw = false;
    l.params = std::move(params);
    l.momentum_buffers = std::move(momentum_buffers);
    l.anchors = std::move(anchors);
    l.masks = std::move(masks);
    l.lrs = std::move(lrs);
    l.momentums = std::move(momentums);
    l.dampenings = std::move(dampenings);
    l.weight_decays = std::move(weight_decays);
    l.l2sps = std::move(l2sps);
    l.l1s = std::move(l1s);
    l.nesterov = nesterov;
    l.maximize = maximize;
    l.decoupled = decoupled;
    add(std::move(l));
  }

  // One step of every launch, or false (nothing written) when a gradient or a parameter no longer
  // fits the plan. grad_scale / found_inf: the optimizer's GradScaler attributes as they are.
  bool run(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
    for (const at::Tensor& p : absent_) {
      if (p.unsafeGetTensorImpl()->grad().defined()) {
        return false;
      }
    }
    const size_t n = launches_.size();
    std::vector<std::vector<at::Tensor>> grads(n);
    std::vector<std::vector<int64_t>> described(n);
    std::vector<bool> plain(n), prevalidated(n);
    for (size_t k = 0; k < n; ++k) {
      const Launch& l = launches_[k];
      grads[k].reserve(l.params.size());
      for (const at::Tensor& p : l.params) {
        const at::Tensor& g = p.unsafeGetTensorImpl()->grad();
        if (!g.defined()) {
          return false;
        }
        grads[k].push_back(g);
      }
      described[k].reserve(l.validated.size());
      plain[k] = describe_launch(described[k], l, grads[k]);
      // Equal to `validated`: the gradients are laid out as they were then, like their parameters.
      prevalidated[k] = plain[k] && !l.validated.empty() && described[k] == l.validated;
      if (!prevalidated[k] && layout_signature_of(l.params, grads[k]) != l.expected) {
        return false;
      }
    }
    // Only a call whose checks ran on exactly the described tensors may vouch for them, and only
    // then may a later call skip them: not under a TorchDispatchMode (the call may reach other code
    // than our kernels, or none: a dry run), nor with a tensor subclass among the arguments (its
    // __torch_dispatch__ may give the kernel other tensors), GradScaler tensors included.
    const bool direct = c10::impl::TorchDispatchModeTLS::stack_len() == 0 && plain_or_absent(grad_scale) &&
                        plain_or_absent(found_inf);
    for (size_t k = 0; k < n; ++k) {
      Launch& l = launches_[k];
      const bool trusted = direct && prevalidated[k];
      launch(l, grads[k], grad_scale, found_inf, trusted);
      if (!trusted) {
        ++checked_launches_;
        if (direct && plain[k]) {
          l.validated = std::move(described[k]);  // the op's checks passed (it throws otherwise)
        } else {
          l.validated.clear();
        }
      }
    }
    return true;
  }

  // How many launches ran with the ops' per-tensor checks (the rest skipped them as prevalidated).
  int64_t checked_launches() const { return checked_launches_; }

  int64_t num_launches() const { return static_cast<int64_t>(launches_.size()); }

  // New learning rates of launch k, one per parameter (an LR scheduler's step; validated by the caller).
  void set_lrs(int64_t k, std::vector<double> lrs) {
    TORCH_CHECK(k >= 0 && k < num_launches(), "StepPlan.set_lrs: no launch ", k, " (the plan has ", num_launches(),
                ")");
    Launch& l = launches_[static_cast<size_t>(k)];
    TORCH_CHECK(lrs.size() == l.params.size(), "StepPlan.set_lrs: launch ", k, " has ", l.params.size(),
                " parameters, got ", lrs.size(), " learning rates");
    l.lrs = std::move(lrs);
  }

 private:
  void add(Launch l) {
    TORCH_CHECK(!l.params.empty(), "StepPlan: a launch needs at least one parameter");
    l.device = l.params.front().device();
    l.expected = layout_signature_of(l.params, l.params);
    launches_.push_back(std::move(l));
  }

  // As pyfinetune.optim's `_amp_tensors`: float32 scalars on the launch's device; found_inf
  // clamped to 1 (GradScaler sums the per-device flags) so that a skipped step is undone once.
  // trusted: the op skips its per-tensor checks (PrevalidatedTensors, set around the op's call only).
  static void launch(Launch& l, const std::vector<at::Tensor>& grads, const std::optional<at::Tensor>& grad_scale_in,
                     const std::optional<at::Tensor>& found_inf_in, bool trusted) {
    std::optional<at::Tensor> grad_scale, found_inf;
    if (grad_scale_in.has_value() && grad_scale_in->defined()) {
      grad_scale = grad_scale_in->to(l.device, at::kFloat, /*non_blocking=*/true).reshape({});
    }
    if (found_inf_in.has_value() && found_inf_in->defined()) {
      found_inf = found_inf_in->to(l.device, at::kFloat, /*non_blocking=*/true).reshape({}).clamp_max(1.0);
    }
    const OptTensorList no_lr_tensors;  // a plan is never built for a tensor lr
    if (!l.is_adamw) {
      static const auto op =
          c10::Dispatcher::singleton().findSchemaOrThrow("pyfinetune::fused_sgd_", "").typed<SgdSig>();
      std::optional<PrevalidatedTensors> skip;
      if (trusted) {
        skip.emplace();
      }
      op.call(l.params, grads, l.momentum_buffers, l.anchors, l.masks, l.lrs, no_lr_tensors, l.momentums,
              l.dampenings, l.weight_decays, l.l2sps, l.l1s, l.nesterov, l.maximize, l.decoupled, grad_scale,
              found_inf);
      return;
    }
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("pyfinetune::fused_adamw_", "").typed<AdamwSig>();
    l.add_steps(1.0);
    try {
      std::optional<PrevalidatedTensors> skip;
      if (trusted) {
        skip.emplace();
      }
      op.call(l.params, grads, l.exp_avgs, l.exp_avg_sqs, l.max_exp_avg_sqs, l.anchors, l.masks, l.steps, l.lrs,
              no_lr_tensors, l.beta1s, l.beta2s, l.epss, l.weight_decays, l.l2sps, l.l1s, l.amsgrad, l.maximize,
              l.decoupled, grad_scale, found_inf);
    } catch (...) {
      // The op checks everything before it writes: of this launch only the step counts moved.
      l.add_steps(-1.0);
      throw;
    }
    if (found_inf.has_value()) {
      l.sub_found_inf(*found_inf);  // a skipped step does not count (as torch's fused optimizers)
    }
  }

  std::vector<at::Tensor> absent_;
  std::vector<Launch> launches_;
  int64_t checked_launches_ = 0;
};

}  // namespace

void define_step_plan(torch::Library& m) {
  m.class_<StepPlan>("StepPlan")
      .def(torch::init<std::vector<at::Tensor>>())
      .def("add_adamw", &StepPlan::add_adamw)
      .def("add_sgd", &StepPlan::add_sgd)
      .def("run", &StepPlan::run)
      .def("num_launches", &StepPlan::num_launches)
      .def("checked_launches", &StepPlan::checked_launches)
      .def("set_lrs", &StepPlan::set_lrs);
}

}  // namespace pyfinetune
