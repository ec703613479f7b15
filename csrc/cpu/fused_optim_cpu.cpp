// CPU kernels of the fused optimizer steps: one at::parallel_for region over all tensors of the
// call, vectorized with at::vec::Vectorized, math in float (double for float64 parameters).
//
// Work split: the elements of all tensors are laid end to end and cut into equal chunks of
// kChunk elements; a chunk may span several small tensors. Threads therefore get equal work
// whatever the mix of tensor sizes (a model has many tiny biases and a few huge matrices).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <pyfinetune/checks.h>
#include <pyfinetune/fused_optim.h>

// Vector overloads of the math helpers, declared before the math header so its templates see them.
namespace pyfinetune {
namespace optim_math {
template <typename T>
inline at::vec::Vectorized<T> pf_sqrt(const at::vec::Vectorized<T>& x) {
  return x.sqrt();
}
template <typename T>
inline at::vec::Vectorized<T> pf_max(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}
template <typename T>
inline at::vec::Vectorized<T> pf_min(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::minimum(a, b);
}
}  // namespace optim_math
}  // namespace pyfinetune

#include <pyfinetune/fused_optim_math.h>

namespace pyfinetune {
namespace {

using at::vec::Vectorized;
using namespace optim_math;

constexpr int64_t kChunk = 32768;  // elements per parallel task; small models run on one thread
// Software prefetch distance in elements. The update is memory bound and walks 4-5 streams at
// once. Prefetching ~2 KiB ahead measured 7-17% faster steps on the 2-core Intel Xeon of
// benchmarks/results/optim-cpu-20261125-*, and 7-19% slower ones on the 2-core AMD EPYC (Zen,
// AVX-512) of the later records (an interleaved A/B in one process, 40 rounds; the records
// optim-cpu-20261127-* run without it), whose hardware prefetchers follow the streams on their
// own: it is on for Intel CPUs only, unless PYFINETUNE_CPU_PREFETCH says otherwise.
constexpr int64_t kPrefetchDist = 512;

bool cpu_vendor_is_intel() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool intel = [] {
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) {
      return false;
    }
    char vendor[13];
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    vendor[12] = '\0';
    return std::strcmp(vendor, "GenuineIntel") == 0;
  }();
  return intel;
#else
  return false;
#endif
}

// Prefetch the cache line `dist` elements ahead of ptr + i, once per line: only on the vector
// step whose elements start a new 64-byte line (step_bytes = bytes the stream advances per step).
template <bool kPrefetch, typename T>
C10_ALWAYS_INLINE void prefetch_ahead(const T* ptr, int64_t i, int64_t end, int64_t step_bytes, int rw) {
  if (kPrefetch && i + kPrefetchDist < end) {
    const T* target = ptr + i + kPrefetchDist;
    if ((reinterpret_cast<uintptr_t>(target) & 63) < static_cast<uintptr_t>(step_bytes)) {
      if (rw) {
        __builtin_prefetch(target, 1, 3);
      } else {
        __builtin_prefetch(target, 0, 3);
      }
    }
  }
}

// PYFINETUNE_CPU_PREFETCH: "1" or "0" turns the optimizer kernels' software prefetch on or off;
// unset or empty: on for Intel CPUs only (see kPrefetchDist). Read at every step, like the other
// variables, so that a change takes effect without a restart.
bool optim_cpu_prefetch(const char* op) {
  const std::optional<bool> set = env_switch(op, "PYFINETUNE_CPU_PREFETCH", "on for Intel CPUs only");
  return set.has_value() ? *set : cpu_vendor_is_intel();
}

template <typename scalar_t>
using opmath_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Elements handled per vector step: one full vector of the parameter type (16 bf16 values with
// AVX2), i.e. kN vectors of the math type.
template <typename scalar_t>
struct VecShape {
  using opmath_t = opmath_of<scalar_t>;
  using OVec = Vectorized<opmath_t>;
  static constexpr int64_t kStep = Vectorized<scalar_t>::size();
  static constexpr int kN = static_cast<int>(kStep / OVec::size());
};

// Load kN math vectors from `ptr` of element type src_t.
template <typename src_t, typename opmath_t, int kN>
inline void load_as(const src_t* ptr, Vectorized<opmath_t>* out) {
  using OVec = Vectorized<opmath_t>;
  constexpr int64_t kW = OVec::size();
  if constexpr (std::is_same_v<src_t, opmath_t>) {
    for (int k = 0; k < kN; ++k) {
      out[k] = OVec::loadu(ptr + k * kW);
    }
  } else if constexpr (at::vec::is_reduced_floating_point_v<src_t> && std::is_same_v<opmath_t, float>) {
    static_assert(kN == 1 || kN == 2, "unexpected vector shape");
    if constexpr (kN == 2) {
      std::tie(out[0], out[1]) = at::vec::convert_to_float<src_t>(Vectorized<src_t>::loadu(ptr));
    } else {
      auto lo_hi = at::vec::convert_to_float<src_t>(Vectorized<src_t>::loadu(ptr, kW));
      out[0] = std::get<0>(lo_hi);
    }
  } else {
    alignas(64) opmath_t tmp[kN * kW];
    for (int64_t j = 0; j < kN * kW; ++j) {
      tmp[j] = static_cast<opmath_t>(ptr[j]);
    }
    for (int k = 0; k < kN; ++k) {
      out[k] = OVec::loadu(tmp + k * kW);
    }
  }
}

// Store kN math vectors to `ptr` of element type dst_t (only the parameter or the state).
template <typename dst_t, typename opmath_t, int kN>
inline void store_as(dst_t* ptr, const Vectorized<opmath_t>* in) {
  constexpr int64_t kW = Vectorized<opmath_t>::size();
  if constexpr (std::is_same_v<dst_t, opmath_t>) {
    for (int k = 0; k < kN; ++k) {
      in[k].store(ptr + k * kW);
    }
  } else {
    static_assert(kN == 2 && std::is_same_v<opmath_t, float>, "reduced types store two float vectors");
    at::vec::convert_from_float<dst_t>(in[0], in[1]).store(ptr);
  }
}

// All-ones lanes where the bool mask is true.
template <typename opmath_t, int kN>
inline void load_mask(const bool* ptr, Vectorized<opmath_t>* out) {
  using OVec = Vectorized<opmath_t>;
  constexpr int64_t kW = OVec::size();
  alignas(64) opmath_t tmp[kN * kW];
  for (int64_t j = 0; j < kN * kW; ++j) {
    tmp[j] = ptr[j] ? opmath_t(1) : opmath_t(0);
  }
  for (int k = 0; k < kN; ++k) {
    out[k] = OVec::loadu(tmp + k * kW) != OVec(opmath_t(0));
  }
}

template <typename T>
T read_scalar(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return static_cast<T>(*t.const_data_ptr<float>());
    case at::kDouble:
      return static_cast<T>(*t.const_data_ptr<double>());
    default:
      TORCH_CHECK(false, "pyfinetune: unexpected scalar tensor dtype ", t.scalar_type());
  }
}

// Raw pointers of one parameter's tensors; nullptr where absent.
struct ParamPtrs {
  void* param = nullptr;
  const void* grad = nullptr;
  void* state1 = nullptr;  // exp_avg / momentum buffer
  void* state2 = nullptr;  // exp_avg_sq
  void* state3 = nullptr;  // max_exp_avg_sq
  const void* anchor = nullptr;
  at::ScalarType anchor_dtype = at::kFloat;
  const bool* mask = nullptr;
  int64_t numel = 0;
};

// Run `fn(i, begin, end)` over the elements of all parameters in one parallel region, in equal
// chunks of the concatenated index space.
template <typename Fn>
void parallel_over_params(const std::vector<ParamPtrs>& ptrs, const Fn& fn) {
  std::vector<int64_t> offsets(ptrs.size() + 1, 0);
  for (size_t i = 0; i < ptrs.size(); ++i) {
    offsets[i + 1] = offsets[i] + ptrs[i].numel;
  }
  const int64_t total = offsets.back();
  if (total == 0) {
    return;
  }
  const int64_t num_chunks = (total + kChunk - 1) / kChunk;
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const int64_t lo = chunk_begin * kChunk;
    const int64_t hi = std::min(total, chunk_end * kChunk);
    // First parameter whose range contains `lo`.
    size_t i = static_cast<size_t>(std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin()) - 1;
    for (int64_t pos = lo; pos < hi; ++i) {
      const int64_t end = std::min(hi, offsets[i + 1]);
      if (end > pos) {
        fn(i, pos - offsets[i], end - offsets[i]);
        pos = end;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// AdamW

template <typename scalar_t, typename anchor_t, bool kPrefetch>
void adamw_range(const ParamPtrs& t, const AdamWConsts<opmath_of<scalar_t>>& c, AdamWFlags flags, int64_t begin,
                 int64_t end) {
  using opmath_t = opmath_of<scalar_t>;
  using Shape = VecShape<scalar_t>;
  using OVec = Vectorized<opmath_t>;
  constexpr int kN = Shape::kN;
  constexpr int64_t kStep = Shape::kStep;

  auto* p_ptr = static_cast<scalar_t*>(t.param);
  auto* g_ptr = static_cast<const scalar_t*>(t.grad);
  auto* m_ptr = static_cast<opmath_t*>(t.state1);
  auto* v_ptr = static_cast<opmath_t*>(t.state2);
  auto* vmax_ptr = static_cast<opmath_t*>(t.state3);
  auto* a_ptr = static_cast<const anchor_t*>(t.anchor);
  const bool* mask_ptr = t.mask;
  const bool use_anchor = c.has_l2sp && a_ptr != nullptr;

  // Vector constants, broadcast once.
  AdamWConsts<OVec> vc;
  vc.grad_mult = OVec(c.grad_mult);
  vc.beta1 = OVec(c.beta1);
  vc.one_minus_beta1 = OVec(c.one_minus_beta1);
  vc.beta2 = OVec(c.beta2);
  vc.one_minus_beta2 = OVec(c.one_minus_beta2);
  vc.eps = OVec(c.eps);
  vc.decay = OVec(c.decay);
  vc.l2sp = OVec(c.l2sp);
  vc.lr_l2sp = OVec(c.lr_l2sp);
  vc.step_size = OVec(c.step_size);
  vc.bc2_sqrt = OVec(c.bc2_sqrt);
  vc.lr_l1 = OVec(c.lr_l1);
  vc.has_l2sp = use_anchor;
  vc.has_l1 = c.has_l1;

  constexpr int64_t kParamBytes = kStep * sizeof(scalar_t);
  constexpr int64_t kStateBytes = kStep * sizeof(opmath_t);
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    prefetch_ahead<kPrefetch>(p_ptr, i, end, kParamBytes, 1);
    prefetch_ahead<kPrefetch>(g_ptr, i, end, kParamBytes, 0);
    prefetch_ahead<kPrefetch>(m_ptr, i, end, kStateBytes, 1);
    prefetch_ahead<kPrefetch>(v_ptr, i, end, kStateBytes, 1);
    if (use_anchor) {
      prefetch_ahead<kPrefetch>(a_ptr, i, end, static_cast<int64_t>(kStep * sizeof(anchor_t)), 0);
    }
    OVec p[kN], g[kN], m[kN], v[kN], vmax[kN], p0[kN], keep[kN];
    load_as<scalar_t, opmath_t, kN>(p_ptr + i, p);
    load_as<scalar_t, opmath_t, kN>(g_ptr + i, g);
    load_as<opmath_t, opmath_t, kN>(m_ptr + i, m);
    load_as<opmath_t, opmath_t, kN>(v_ptr + i, v);
    if (flags.amsgrad) {
      load_as<opmath_t, opmath_t, kN>(vmax_ptr + i, vmax);
    }
    if (use_anchor) {
      load_as<anchor_t, opmath_t, kN>(a_ptr + i, p0);
    }
    for (int k = 0; k < kN; ++k) {
      adamw_element(p[k], g[k], m[k], v[k], vmax[k], use_anchor ? p0[k] : p[k], vc, flags);
    }
    if (mask_ptr != nullptr) {
      load_mask<opmath_t, kN>(mask_ptr + i, keep);
      const OVec zero(opmath_t(0));
      for (int k = 0; k < kN; ++k) {
        p[k] = OVec::blendv(zero, p[k], keep[k]);
        m[k] = OVec::blendv(zero, m[k], keep[k]);
        v[k] = OVec::blendv(zero, v[k], keep[k]);
        if (flags.amsgrad) {
          vmax[k] = OVec::blendv(zero, vmax[k], keep[k]);
        }
      }
    }
    store_as<scalar_t, opmath_t, kN>(p_ptr + i, p);
    store_as<opmath_t, opmath_t, kN>(m_ptr + i, m);
    store_as<opmath_t, opmath_t, kN>(v_ptr + i, v);
    if (flags.amsgrad) {
      store_as<opmath_t, opmath_t, kN>(vmax_ptr + i, vmax);
    }
  }
  // Scalar tail: the same arithmetic, one element at a time.
  AdamWConsts<opmath_t> sc = c;
  sc.has_l2sp = use_anchor;
  for (; i < end; ++i) {
    opmath_t p = static_cast<opmath_t>(p_ptr[i]);
    opmath_t m = m_ptr[i];
    opmath_t v = v_ptr[i];
    opmath_t vmax = flags.amsgrad ? vmax_ptr[i] : opmath_t(0);
    const opmath_t p0 = use_anchor ? static_cast<opmath_t>(a_ptr[i]) : p;
    adamw_element(p, static_cast<opmath_t>(g_ptr[i]), m, v, vmax, p0, sc, flags);
    if (mask_ptr != nullptr && !mask_ptr[i]) {
      p = m = v = vmax = opmath_t(0);
    }
    p_ptr[i] = static_cast<scalar_t>(p);
    m_ptr[i] = m;
    v_ptr[i] = v;
    if (flags.amsgrad) {
      vmax_ptr[i] = vmax;
    }
  }
}

template <typename scalar_t>
using AdamWRangeFn = void (*)(const ParamPtrs&, const AdamWConsts<opmath_of<scalar_t>>&, AdamWFlags, int64_t,
                              int64_t);

template <typename scalar_t>
AdamWRangeFn<scalar_t> adamw_range_for(at::ScalarType anchor_dtype, bool prefetch) {
  switch (anchor_dtype) {
    case at::kFloat:
      return prefetch ? &adamw_range<scalar_t, float, true> : &adamw_range<scalar_t, float, false>;
    case at::kBFloat16:
      return prefetch ? &adamw_range<scalar_t, c10::BFloat16, true> : &adamw_range<scalar_t, c10::BFloat16, false>;
    case at::kHalf:
      return prefetch ? &adamw_range<scalar_t, c10::Half, true> : &adamw_range<scalar_t, c10::Half, false>;
    case at::kDouble:
      return prefetch ? &adamw_range<scalar_t, double, true> : &adamw_range<scalar_t, double, false>;
    default:
      TORCH_CHECK(false, "pyfinetune.fused_adamw_: unsupported anchor dtype ", anchor_dtype);
  }
}

// The gradients are divided by the scale (GradScaler's): 0, a negative, inf or NaN would turn the
// step into inf / NaN or reverse it. Read here, on the CPU, before anything is written (on a GPU the
// value stays on the device: GradScaler keeps it positive and finite).
void check_grad_scale_value(const char* op, double scale) {
  PF_CHECK(std::isfinite(scale) && scale > 0.0, op, "grad_scale must hold a finite number > 0, got ", scale);
}

void fused_adamw_cpu(PF_FUSED_ADAMW_PARAMS) {
  check_fused_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                         lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, amsgrad, grad_scale, found_inf);
  const size_t n = params.size();
  if (n == 0) {
    return;
  }
  PF_CHECK(params[0].device().is_cpu(), "fused_adamw_", "CPU kernel called with params on ", params[0].device());
  if (found_inf.has_value() && found_inf->defined() && read_scalar<double>(*found_inf) != 0.0) {
    return;  // GradScaler found inf/NaN: skip the step, leave parameters and state untouched
  }
  const double scale = (grad_scale.has_value() && grad_scale->defined()) ? read_scalar<double>(*grad_scale) : 1.0;
  check_grad_scale_value("fused_adamw_", scale);
  const AdamWFlags flags{amsgrad, decoupled_l2sp};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fused_adamw_cpu", [&] {
    using opmath_t = opmath_of<scalar_t>;
    const bool prefetch = optim_cpu_prefetch("fused_adamw_");
    std::vector<ParamPtrs> ptrs(n);
    std::vector<AdamWConsts<opmath_t>> consts(n);
    std::vector<AdamWRangeFn<scalar_t>> fns(n);
    for (size_t i = 0; i < n; ++i) {
      ParamPtrs& t = ptrs[i];
      t.param = params[i].data_ptr();
      t.grad = grads[i].const_data_ptr();
      t.state1 = exp_avgs[i].data_ptr();
      t.state2 = exp_avg_sqs[i].data_ptr();
      t.state3 = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
      auto anchor = opt_at(anchors, i);
      if (anchor && l2sps[i] != 0.0) {
        t.anchor = anchor->const_data_ptr();
        t.anchor_dtype = anchor->scalar_type();
      }
      auto mask = opt_at(masks, i);
      t.mask = mask ? mask->const_data_ptr<bool>() : nullptr;
      t.numel = params[i].numel();
      auto lr_t = opt_at(lr_tensors, i);
      const double lr = lr_t ? read_scalar<double>(*lr_t) : lrs[i];
      PF_CHECK(std::isfinite(lr) && lr >= 0.0, "fused_adamw_", "lr_tensors[", i, "] must hold a finite lr >= 0, got ",
               lr);
      const double step = read_scalar<double>(steps[i]);
      PF_CHECK(step >= 1.0, "fused_adamw_", "steps[", i, "] must be >= 1 (incremented before the update), got ",
               step);
      consts[i] = make_adamw_consts<opmath_t>(lr, beta1s[i], beta2s[i], epss[i], weight_decays[i], l2sps[i], l1s[i],
                                              step, scale, maximize, t.anchor != nullptr);
      fns[i] = adamw_range_for<scalar_t>(t.anchor != nullptr ? t.anchor_dtype : at::kFloat, prefetch);
    }
    parallel_over_params(ptrs, [&](size_t i, int64_t begin, int64_t end) {
      fns[i](ptrs[i], consts[i], flags, begin, end);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// SGD

struct SGDFlags {
  bool nesterov;
  bool decoupled_l2sp;
};

template <typename scalar_t, typename anchor_t, bool kPrefetch>
void sgd_range(const ParamPtrs& t, const SGDConsts<opmath_of<scalar_t>>& c, SGDFlags flags, int64_t begin,
               int64_t end) {
  using opmath_t = opmath_of<scalar_t>;
  using Shape = VecShape<scalar_t>;
  using OVec = Vectorized<opmath_t>;
  constexpr int kN = Shape::kN;
  constexpr int64_t kStep = Shape::kStep;

  auto* p_ptr = static_cast<scalar_t*>(t.param);
  auto* g_ptr = static_cast<const scalar_t*>(t.grad);
  auto* buf_ptr = static_cast<opmath_t*>(t.state1);
  auto* a_ptr = static_cast<const anchor_t*>(t.anchor);
  const bool* mask_ptr = t.mask;
  const bool use_anchor = c.has_l2sp && a_ptr != nullptr;
  const bool has_momentum = buf_ptr != nullptr;

  SGDConsts<OVec> vc;
  vc.grad_mult = OVec(c.grad_mult);
  vc.weight_decay = OVec(c.weight_decay);
  vc.l2sp = OVec(c.l2sp);
  vc.lr_l2sp = OVec(c.lr_l2sp);
  vc.momentum = OVec(c.momentum);
  vc.one_minus_dampening = OVec(c.one_minus_dampening);
  vc.lr = OVec(c.lr);
  vc.lr_l1 = OVec(c.lr_l1);
  vc.has_weight_decay = c.has_weight_decay;
  vc.has_l2sp = use_anchor;
  vc.has_l1 = c.has_l1;

  constexpr int64_t kParamBytes = kStep * sizeof(scalar_t);
  constexpr int64_t kStateBytes = kStep * sizeof(opmath_t);
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    prefetch_ahead<kPrefetch>(p_ptr, i, end, kParamBytes, 1);
    prefetch_ahead<kPrefetch>(g_ptr, i, end, kParamBytes, 0);
    if (has_momentum) {
      prefetch_ahead<kPrefetch>(buf_ptr, i, end, kStateBytes, 1);
    }
    if (use_anchor) {
      prefetch_ahead<kPrefetch>(a_ptr, i, end, static_cast<int64_t>(kStep * sizeof(anchor_t)), 0);
    }
    OVec p[kN], g[kN], buf[kN], p0[kN], keep[kN];
    load_as<scalar_t, opmath_t, kN>(p_ptr + i, p);
    load_as<scalar_t, opmath_t, kN>(g_ptr + i, g);
    if (has_momentum) {
      load_as<opmath_t, opmath_t, kN>(buf_ptr + i, buf);
    }
    if (use_anchor) {
      load_as<anchor_t, opmath_t, kN>(a_ptr + i, p0);
    }
    for (int k = 0; k < kN; ++k) {
      sgd_element(p[k], g[k], buf[k], use_anchor ? p0[k] : p[k], vc, has_momentum, flags.nesterov,
                  flags.decoupled_l2sp);
    }
    if (mask_ptr != nullptr) {
      load_mask<opmath_t, kN>(mask_ptr + i, keep);
      const OVec zero(opmath_t(0));
      for (int k = 0; k < kN; ++k) {
        p[k] = OVec::blendv(zero, p[k], keep[k]);
        buf[k] = OVec::blendv(zero, buf[k], keep[k]);
      }
    }
    store_as<scalar_t, opmath_t, kN>(p_ptr + i, p);
    if (has_momentum) {
      store_as<opmath_t, opmath_t, kN>(buf_ptr + i, buf);
    }
  }
  SGDConsts<opmath_t> sc = c;
  sc.has_l2sp = use_anchor;
  for (; i < end; ++i) {
    opmath_t p = static_cast<opmath_t>(p_ptr[i]);
    opmath_t buf = has_momentum ? buf_ptr[i] : opmath_t(0);
    const opmath_t p0 = use_anchor ? static_cast<opmath_t>(a_ptr[i]) : p;
    sgd_element(p, static_cast<opmath_t>(g_ptr[i]), buf, p0, sc, has_momentum, flags.nesterov, flags.decoupled_l2sp);
    if (mask_ptr != nullptr && !mask_ptr[i]) {
      p = buf = opmath_t(0);
    }
    p_ptr[i] = static_cast<scalar_t>(p);
    if (has_momentum) {
      buf_ptr[i] = buf;
    }
  }
}

template <typename scalar_t>
using SGDRangeFn = void (*)(const ParamPtrs&, const SGDConsts<opmath_of<scalar_t>>&, SGDFlags, int64_t, int64_t);

template <typename scalar_t>
SGDRangeFn<scalar_t> sgd_range_for(at::ScalarType anchor_dtype, bool prefetch) {
  switch (anchor_dtype) {
    case at::kFloat:
      return prefetch ? &sgd_range<scalar_t, float, true> : &sgd_range<scalar_t, float, false>;
    case at::kBFloat16:
      return prefetch ? &sgd_range<scalar_t, c10::BFloat16, true> : &sgd_range<scalar_t, c10::BFloat16, false>;
    case at::kHalf:
      return prefetch ? &sgd_range<scalar_t, c10::Half, true> : &sgd_range<scalar_t, c10::Half, false>;
    case at::kDouble:
      return prefetch ? &sgd_range<scalar_t, double, true> : &sgd_range<scalar_t, double, false>;
    default:
      TORCH_CHECK(false, "pyfinetune.fused_sgd_: unsupported anchor dtype ", anchor_dtype);
  }
}

void fused_sgd_cpu(PF_FUSED_SGD_PARAMS) {
  check_fused_sgd_args(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings,
                       weight_decays, l2sps, l1s, nesterov, grad_scale, found_inf);
  const size_t n = params.size();
  if (n == 0) {
    return;
  }
  PF_CHECK(params[0].device().is_cpu(), "fused_sgd_", "CPU kernel called with params on ", params[0].device());
  if (found_inf.has_value() && found_inf->defined() && read_scalar<double>(*found_inf) != 0.0) {
    return;
  }
  const double scale = (grad_scale.has_value() && grad_scale->defined()) ? read_scalar<double>(*grad_scale) : 1.0;
  check_grad_scale_value("fused_sgd_", scale);
  const SGDFlags flags{nesterov, decoupled_l2sp};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fused_sgd_cpu", [&] {
    using opmath_t = opmath_of<scalar_t>;
    const bool prefetch = optim_cpu_prefetch("fused_sgd_");
    std::vector<ParamPtrs> ptrs(n);
    std::vector<SGDConsts<opmath_t>> consts(n);
    std::vector<SGDRangeFn<scalar_t>> fns(n);
    for (size_t i = 0; i < n; ++i) {
      ParamPtrs& t = ptrs[i];
      t.param = params[i].data_ptr();
      t.grad = grads[i].const_data_ptr();
      t.state1 = (!momentum_buffers.empty() && momentums[i] != 0.0) ? momentum_buffers[i].data_ptr() : nullptr;
      auto anchor = opt_at(anchors, i);
      if (anchor && l2sps[i] != 0.0) {
        t.anchor = anchor->const_data_ptr();
        t.anchor_dtype = anchor->scalar_type();
      }
      auto mask = opt_at(masks, i);
      t.mask = mask ? mask->const_data_ptr<bool>() : nullptr;
      t.numel = params[i].numel();
      auto lr_t = opt_at(lr_tensors, i);
      const double lr = lr_t ? read_scalar<double>(*lr_t) : lrs[i];
      PF_CHECK(std::isfinite(lr) && lr >= 0.0, "fused_sgd_", "lr_tensors[", i, "] must hold a finite lr >= 0, got ",
               lr);
      consts[i] = make_sgd_consts<opmath_t>(lr, momentums[i], dampenings[i], weight_decays[i], l2sps[i], l1s[i], scale,
                                            maximize, t.anchor != nullptr);
      fns[i] = sgd_range_for<scalar_t>(t.anchor != nullptr ? t.anchor_dtype : at::kFloat, prefetch);
    }
    parallel_over_params(ptrs, [&](size_t i, int64_t begin, int64_t end) {
      fns[i](ptrs[i], consts[i], flags, begin, end);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfinetune, CPU, m) {
  m.impl("fused_adamw_", &fused_adamw_cpu);
  m.impl("fused_sgd_", &fused_sgd_cpu);
}

TORCH_LIBRARY_IMPL(pyfinetune, CompositeExplicitAutograd, m) {
  m.impl("_optim_cpu_prefetch", [] { return pyfinetune::optim_cpu_prefetch("_optim_cpu_prefetch"); });
}

// A sparse tensor anywhere in the lists routes the call here; the argument checks, which run
// first, then name the sparse argument instead of the dispatcher's "no kernel for SparseCPU".
TORCH_LIBRARY_IMPL(pyfinetune, SparseCPU, m) {
  m.impl("fused_adamw_", &fused_adamw_cpu);
  m.impl("fused_sgd_", &fused_sgd_cpu);
}

}  // namespace pyfinetune
