// Validation of the fused optimizer ops' arguments, shared by the CPU and CUDA kernels.
#include <pyfinetune/checks.h>
#include <pyfinetune/fused_optim.h>

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace pyfinetune {

namespace {
thread_local bool t_prevalidated = false;
}  // namespace

PrevalidatedTensors::PrevalidatedTensors() : previous_(t_prevalidated) { t_prevalidated = true; }
PrevalidatedTensors::~PrevalidatedTensors() { t_prevalidated = previous_; }

namespace {

// Whether this call's tensors were checked already (see PrevalidatedTensors): read once per call,
// and reset, so that nothing the op calls in turn inherits it.
bool take_prevalidated() {
  const bool was = t_prevalidated;
  t_prevalidated = false;
  return was;
}

at::ScalarType state_dtype_for(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_list_size(const char* op, const char* name, size_t got, size_t n) {
  PF_CHECK(got == n, op, name, " must have one tensor per parameter (", n, "), got ", got);
}

void check_optional_list_size(const char* op, const char* name, size_t got, size_t n) {
  PF_CHECK(got == 0 || got == n, op, name, " must be empty or have one entry per parameter (", n,
           "), got ", got);
}

void check_scalar_list(const char* op, const char* name, at::ArrayRef<double> values, size_t n, double lo,
                       double hi, bool hi_inclusive, const char* expected) {
  PF_CHECK(values.size() == n, op, name, " must have one value per parameter (", n, "), got ", values.size());
  for (size_t i = 0; i < n; ++i) {
    const double x = values[i];
    const bool ok = std::isfinite(x) && x >= lo && (hi_inclusive ? x <= hi : x < hi);
    PF_CHECK(ok, op, ArgName{name, i}, " must be ", expected, ", got ", x);
  }
}

// Hyper-parameters are converted to float32 for float32 / bfloat16 / float16 parameters: a value
// beyond float32's range would become inf there (lr 1e300 -> a NaN step) where float64 is fine.
void check_float32_range(const char* op, const char* name, at::ArrayRef<double> values, at::ScalarType dtype) {
  if (dtype == at::kDouble) {
    return;
  }
  constexpr double kMax = static_cast<double>(std::numeric_limits<float>::max());
  for (size_t i = 0; i < values.size(); ++i) {
    PF_CHECK(values[i] <= kMax, op, ArgName{name, i}, " must be at most ", kMax, " (float32's largest) for ",
             dtype, " parameters, got ", values[i]);
  }
}

// The tensors a step writes (parameters and their states) must not share memory: a state passed
// as its own parameter, one buffer listed for two parameters or for two states, or a parameter
// listed twice would be updated twice per step, or read after its own update. Every such tensor is
// non-overlapping and dense (checked before), so it covers exactly the bytes
// [data, data + numel * itemsize): sorted by start, two overlap iff a range starts before the
// furthest end so far.
struct Written {
  uintptr_t begin, end;
  const char* list;
  size_t index;
};

void check_no_shared_memory(const char* op, std::vector<Written>& written) {
  std::sort(written.begin(), written.end(), [](const Written& a, const Written& b) { return a.begin < b.begin; });
  size_t widest = 0;
  for (size_t k = 1; k < written.size(); ++k) {
    const Written& a = written[widest];
    const Written& b = written[k];
    PF_CHECK(b.begin >= a.end, op, ArgName{b.list, b.index}, " shares memory with ", ArgName{a.list, a.index},
             ": every parameter and optimizer state a step writes must be a tensor of its own");
    if (b.end > a.end) {
      widest = k;
    }
  }
}

void add_written(std::vector<Written>& written, const char* list, size_t i, const at::Tensor& t) {
  if (t.numel() > 0) {
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    written.push_back({begin, begin + static_cast<uintptr_t>(t.numel()) * t.element_size(), list, i});
  }
}

void add_written(std::vector<Written>& written, const char* list, at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    add_written(written, list, i, tensors[i]);
  }
}

// Same memory order: strides equal on every dimension of size > 1 (a size-1 dimension's stride
// is never used to address an element).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

// `t` must be a dense strided tensor laid out exactly like params[i] (same device, shape and
// strides), so that all tensors of one parameter can be walked with one flat index.
void check_like_param(const char* op, const char* list, size_t i, const at::Tensor& t, const at::Tensor& p) {
  const ArgName name{list, i};
  PF_CHECK(t.defined(), op, name, " is undefined");
  PF_CHECK(t.layout() == at::kStrided, op, name, " must be a dense (strided) tensor, got layout ", t.layout(),
           list == std::string("grads") ? " (sparse gradients are not supported)" : "");
  PF_CHECK(t.device() == p.device(), op, name, " must be on ", p.device(), " like params[", i, "], got ",
           t.device());
  PF_CHECK(t.sizes() == p.sizes(), op, name, " must have the shape of params[", i, "] ", p.sizes(), ", got ",
           t.sizes());
  PF_CHECK(t.numel() <= 1 || same_layout(t, p), op, name, " must have the strides of params[", i,
           "] ", p.strides(), ", got ", t.strides());
}

template <typename Name>
void check_scalar_tensor(const char* op, const Name& name, const at::Tensor& t, const at::Device& device,
                         bool allow_double) {
  PF_CHECK(t.layout() == at::kStrided, op, name, " must be a dense tensor");
  PF_CHECK(t.numel() == 1, op, name, " must hold exactly one value, got ", t.numel(), " values");
  PF_CHECK(t.scalar_type() == at::kFloat || (allow_double && t.scalar_type() == at::kDouble), op, name,
           " must be float32", allow_double ? " or float64" : "", ", got ", t.scalar_type());
  PF_CHECK(t.device() == device, op, name, " must be on the parameters' device ", device, ", got ", t.device());
}

// Checks shared by both ops: params, grads, anchors, masks, lr tensors, GradScaler tensors.
void check_common(const char* op, at::TensorList params, at::TensorList grads, const OptTensorList& anchors,
                  const OptTensorList& masks, at::ArrayRef<double> lrs, const OptTensorList& lr_tensors,
                  at::ArrayRef<double> weight_decays, at::ArrayRef<double> l2sps, at::ArrayRef<double> l1s,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  bool tensors_prevalidated) {
  const size_t n = params.size();
  check_list_size(op, "grads", grads.size(), n);
  check_optional_list_size(op, "anchors", anchors.size(), n);
  check_optional_list_size(op, "masks", masks.size(), n);
  check_optional_list_size(op, "lr_tensors", lr_tensors.size(), n);
  check_scalar_list(op, "lrs", lrs, n, 0.0, INFINITY, false, "a finite number >= 0");
  check_scalar_list(op, "weight_decays", weight_decays, n, 0.0, INFINITY, false, "a finite number >= 0");
  check_scalar_list(op, "l2sps", l2sps, n, 0.0, INFINITY, false, "a finite number >= 0");
  check_scalar_list(op, "l1s", l1s, n, 0.0, INFINITY, false, "a finite number >= 0");
  if (n == 0) {
    return;
  }
  const at::Tensor& p0 = params[0];
  PF_CHECK(p0.defined(), op, "params[0] is undefined");
  const at::Device device = p0.device();
  const at::ScalarType dtype = p0.scalar_type();
  PF_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble, op,
           "params must be float32, bfloat16, float16 or float64, got ", dtype);
  check_float32_range(op, "lrs", lrs, dtype);
  check_float32_range(op, "weight_decays", weight_decays, dtype);
  check_float32_range(op, "l2sps", l2sps, dtype);
  check_float32_range(op, "l1s", l1s, dtype);
  for (size_t i = 0; i < n && !tensors_prevalidated; ++i) {
    const at::Tensor& p = params[i];
    const ArgName name{"params", i};
    PF_CHECK(p.defined(), op, name, " is undefined");
    PF_CHECK(p.layout() == at::kStrided, op, name, " must be a dense (strided) tensor, got layout ", p.layout());
    PF_CHECK(p.device() == device, op, "all params must be on one device: params[0] is on ", device, ", ", name,
             " is on ", p.device());
    PF_CHECK(p.scalar_type() == dtype, op, "all params must have one dtype: params[0] is ", dtype, ", ", name,
             " is ", p.scalar_type());
    PF_CHECK(p.is_non_overlapping_and_dense(), op, name,
             " must be non-overlapping and dense (e.g. contiguous); got strides ", p.strides(), " for shape ",
             p.sizes());
    check_like_param(op, "grads", i, grads[i], p);
    PF_CHECK(grads[i].scalar_type() == dtype, op, "grads[", i, "] must have the dtype of params[", i, "] (", dtype,
             "), got ", grads[i].scalar_type());
    auto a = opt_at(anchors, i);
    PF_CHECK(a.has_value() || l2sps[i] == 0.0, op, "l2sps[", i, "] is ", l2sps[i], " but anchors[", i,
             "] is None; L2-SP needs the anchor (the pretrained weights) of every parameter with l2sp > 0");
    if (a) {
      check_like_param(op, "anchors", i, *a, p);
      const at::ScalarType adt = a->scalar_type();
      PF_CHECK(adt == dtype || adt == at::kFloat || adt == at::kBFloat16, op, "anchors[", i,
               "] must be float32, bfloat16 or the dtype of params[", i, "] (", dtype, "), got ", adt);
    }
    if (auto m = opt_at(masks, i)) {
      check_like_param(op, "masks", i, *m, p);
      PF_CHECK(m->scalar_type() == at::kBool, op, "masks[", i, "] must be a bool tensor, got ", m->scalar_type());
    }
    if (auto lr = opt_at(lr_tensors, i)) {
      check_scalar_tensor(op, ArgName{"lr_tensors", i}, *lr, device, true);
    }
  }
  if (grad_scale.has_value() && grad_scale->defined()) {
    check_scalar_tensor(op, "grad_scale", *grad_scale, device, false);
  }
  if (found_inf.has_value() && found_inf->defined()) {
    check_scalar_tensor(op, "found_inf", *found_inf, device, false);
  }
}

void check_state_list(const char* op, const char* name, at::TensorList states, at::TensorList params) {
  check_list_size(op, name, states.size(), params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    check_like_param(op, name, i, states[i], params[i]);
    const at::ScalarType want = state_dtype_for(params[i].scalar_type());
    PF_CHECK(states[i].scalar_type() == want, op, name, "[", i, "] must be ", want, " (optimizer state of a ",
             params[i].scalar_type(), " parameter), got ", states[i].scalar_type());
  }
}

}  // namespace

void check_fused_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                            const OptTensorList& anchors, const OptTensorList& masks, at::TensorList steps,
                            at::ArrayRef<double> lrs, const OptTensorList& lr_tensors,
                            at::ArrayRef<double> beta1s, at::ArrayRef<double> beta2s, at::ArrayRef<double> epss,
                            at::ArrayRef<double> weight_decays, at::ArrayRef<double> l2sps,
                            at::ArrayRef<double> l1s, bool amsgrad, const std::optional<at::Tensor>& grad_scale,
                            const std::optional<at::Tensor>& found_inf) {
  const char* op = "fused_adamw_";
  const size_t n = params.size();
  const bool prevalidated = take_prevalidated();
  check_common(op, params, grads, anchors, masks, lrs, lr_tensors, weight_decays, l2sps, l1s, grad_scale,
               found_inf, prevalidated);
  check_scalar_list(op, "beta1s", beta1s, n, 0.0, 1.0, false, "in [0, 1)");
  check_scalar_list(op, "beta2s", beta2s, n, 0.0, 1.0, false, "in [0, 1)");
  check_scalar_list(op, "epss", epss, n, 0.0, INFINITY, false, "a finite number >= 0");
  if (n > 0) {
    check_float32_range(op, "epss", epss, params[0].scalar_type());
  }
  if (prevalidated) {
    return;
  }
  check_state_list(op, "exp_avgs", exp_avgs, params);
  check_state_list(op, "exp_avg_sqs", exp_avg_sqs, params);
  if (amsgrad) {
    check_state_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, params);
  } else {
    PF_CHECK(max_exp_avg_sqs.empty(), op, "max_exp_avg_sqs must be empty when amsgrad=False, got ",
             max_exp_avg_sqs.size(), " tensors");
  }
  check_list_size(op, "steps", steps.size(), n);
  for (size_t i = 0; i < n; ++i) {
    check_scalar_tensor(op, ArgName{"steps", i}, steps[i], params[i].device(), false);
  }
  std::vector<Written> written;
  written.reserve((amsgrad ? 4 : 3) * n);
  add_written(written, "params", params);
  add_written(written, "exp_avgs", exp_avgs);
  add_written(written, "exp_avg_sqs", exp_avg_sqs);
  if (amsgrad) {
    add_written(written, "max_exp_avg_sqs", max_exp_avg_sqs);
  }
  check_no_shared_memory(op, written);
}

void check_fused_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                          const OptTensorList& anchors, const OptTensorList& masks, at::ArrayRef<double> lrs,
                          const OptTensorList& lr_tensors, at::ArrayRef<double> momentums,
                          at::ArrayRef<double> dampenings, at::ArrayRef<double> weight_decays,
                          at::ArrayRef<double> l2sps, at::ArrayRef<double> l1s, bool nesterov,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  const char* op = "fused_sgd_";
  const size_t n = params.size();
  const bool prevalidated = take_prevalidated();
  check_common(op, params, grads, anchors, masks, lrs, lr_tensors, weight_decays, l2sps, l1s, grad_scale,
               found_inf, prevalidated);
  check_scalar_list(op, "momentums", momentums, n, 0.0, INFINITY, false, "a finite number >= 0");
  check_scalar_list(op, "dampenings", dampenings, n, 0.0, 1.0, true, "in [0, 1]");
  if (!momentum_buffers.empty()) {
    if (!prevalidated) {
      check_state_list(op, "momentum_buffers", momentum_buffers, params);
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      PF_CHECK(momentums[i] == 0.0, op, "momentums[", i, "] is ", momentums[i],
               " but momentum_buffers is empty; pass one buffer per parameter");
    }
  }
  if (nesterov) {
    for (size_t i = 0; i < n; ++i) {
      PF_CHECK(momentums[i] > 0.0 && dampenings[i] == 0.0, op,
               "nesterov=True needs momentum > 0 and dampening = 0; parameter ", i, " has momentum ",
               momentums[i], " and dampening ", dampenings[i]);
    }
  }
  if (n > 0) {
    check_float32_range(op, "momentums", momentums, params[0].scalar_type());
  }
  if (prevalidated) {
    return;
  }
  std::vector<Written> written;
  written.reserve(2 * n);
  add_written(written, "params", params);
  for (size_t i = 0; i < momentum_buffers.size(); ++i) {
    if (momentums[i] != 0.0) {  // a buffer is written only with momentum
      add_written(written, "momentum_buffers", i, momentum_buffers[i]);
    }
  }
  check_no_shared_memory(op, written);
}

}  // namespace pyfinetune

namespace pyfinetune {
namespace {

// FNV-1a over 64-bit words: equal metadata gives equal signatures; a collision between different
// metadata (about 2^-64) only makes the optimizer skip its Python re-validation for one step, and
// the op's own checks still refuse a gradient laid out unlike its parameter.
struct Fnv64 {
  uint64_t h = 1469598103934665603ull;
  void mix(uint64_t v) {
    h ^= v;
    h *= 1099511628211ull;
  }
};

void mix_layout(Fnv64& f, const at::Tensor* t) {
  if (t == nullptr || !t->defined()) {
    f.mix(~uint64_t{0});
    return;
  }
  const c10::Device device = t->device();
  f.mix(static_cast<uint64_t>(t->scalar_type()) | static_cast<uint64_t>(device.type()) << 8 |
        static_cast<uint64_t>(static_cast<uint8_t>(device.index())) << 16 |
        static_cast<uint64_t>(t->layout()) << 24 | static_cast<uint64_t>(t->dim()) << 32);
  if (t->is_nested()) {  // no sizes to read; never the layout of a parameter
    f.mix(~uint64_t{1});
    return;
  }
  for (const int64_t size : t->sizes()) {
    f.mix(static_cast<uint64_t>(size));
  }
  if (t->layout() == at::kStrided) {  // sparse layouts have no strides
    for (const int64_t stride : t->strides()) {
      f.mix(static_cast<uint64_t>(stride));
    }
  }
}

int64_t layout_signature(const c10::List<std::optional<at::Tensor>>& tensors) {
  Fnv64 f;
  f.mix(tensors.size());
  for (const std::optional<at::Tensor>& opt : tensors) {
    mix_layout(f, opt.has_value() ? &*opt : nullptr);
  }
  return static_cast<int64_t>(f.h);
}

}  // namespace

int64_t layout_signature_of(at::TensorList first, at::TensorList second) {
  Fnv64 f;
  f.mix(first.size() + second.size());
  for (const at::TensorList list : {first, second}) {
    for (const at::Tensor& t : list) {
      mix_layout(f, &t);
    }
  }
  return static_cast<int64_t>(f.h);
}

}  // namespace pyfinetune

// Metadata only, so one kernel for every backend, fake tensors included (no autograd: an int).
TORCH_LIBRARY_IMPL(pyfinetune, CompositeImplicitAutograd, m) {
  m.impl("_layout_signature", &pyfinetune::layout_signature);
}
