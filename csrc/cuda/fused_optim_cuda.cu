// CUDA kernels of pyfinetune::fused_adamw_ and pyfinetune::fused_sgd_.
//
// One launch updates many tensors (multi_tensor_apply.cuh). Everything that can change between
// steps without a new launch configuration is read on the device: the step counts, tensor
// learning rates, grad_scale and found_inf, so a whole step can be captured in a CUDA graph.
// Each block derives its tensor's constants once (thread 0, into shared memory) with the same
// make_*_consts / *_element functions the CPU kernel uses, then walks its chunk with 16-byte
// accesses where every operand of the tensor is aligned, element by element otherwise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <pyfinetune/fused_optim.h>
#include <pyfinetune/fused_optim_math.h>
#include <pyfinetune/multi_tensor_apply.cuh>

#include <cstdint>
#include <optional>

namespace pyfinetune {
namespace {

namespace om = optim_math;

// ---- Metadata ------------------------------------------------------------------------------------

// Where a learning rate comes from: the float list, or a scalar tensor read on the device.
enum LrSource : uint8_t { kLrValue = 0, kLrFloatTensor = 1, kLrDoubleTensor = 2 };

// The dtype of a tensor's anchor (the per-tensor tag byte). Anchors are None, the parameter's
// dtype, float32 or bfloat16; one runtime branch, uniform over the block, picks the load.
enum AnchorDtype : uint8_t { kNoAnchor = 0, kAnchorParamDtype = 1, kAnchorFloat = 2, kAnchorBFloat16 = 3 };

struct LaunchArgs {
  const float* found_inf;   // nullptr: no GradScaler
  const float* grad_scale;  // nullptr: 1
  bool maximize;
  bool decoupled_l2sp;
  bool nesterov;
};

struct AdamWGroup {
  double lr, beta1, beta2, eps, weight_decay, l2sp, l1;
  const void* lr_tensor;
  uint8_t lr_source;

  bool operator==(const AdamWGroup& o) const {
    return lr == o.lr && beta1 == o.beta1 && beta2 == o.beta2 && eps == o.eps && weight_decay == o.weight_decay &&
           l2sp == o.l2sp && l1 == o.l1 && lr_tensor == o.lr_tensor && lr_source == o.lr_source;
  }
};

struct SGDGroup {
  double lr, momentum, dampening, weight_decay, l2sp, l1;
  const void* lr_tensor;
  uint8_t lr_source;

  bool operator==(const SGDGroup& o) const {
    return lr == o.lr && momentum == o.momentum && dampening == o.dampening && weight_decay == o.weight_decay &&
           l2sp == o.l2sp && l1 == o.l1 && lr_tensor == o.lr_tensor && lr_source == o.lr_source;
  }
};

// Operand rows of the metadata's pointer table.
struct AdamWOperand {
  enum : int { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kAnchor, kMask, kStep, kCount };
};
struct SGDOperand {
  enum : int { kParam, kGrad, kMomentumBuffer, kAnchor, kMask, kCount };
};

// Tensors per launch (4 groups each): with 4 KB arguments 36 AdamW tensors and 222 blocks, 48 SGD
// tensors and 281 blocks; with 32 KB, 192 AdamW tensors (resnet50's 161 in one launch) and ~3600
// blocks, 224 SGD tensors and ~4300 blocks. The large tables need 16 KB of arguments or more (their
// pointers alone take ~14.5 KB); sizes between 4 and 16 KB keep the small tables and more blocks.
constexpr bool kLargeArgs = mta::kMaxKernelArgBytes >= 16384;
using AdamWMeta = mta::TensorListMeta<AdamWOperand::kCount, kLargeArgs ? 192 : 36, AdamWGroup, 4, LaunchArgs>;
using SGDMeta = mta::TensorListMeta<SGDOperand::kCount, kLargeArgs ? 224 : 48, SGDGroup, 4, LaunchArgs>;

// ---- Per-block constants -------------------------------------------------------------------------

C10_HOST_DEVICE inline double read_lr(double lr, const void* lr_tensor, uint8_t source) {
  if (source == kLrFloatTensor) {
    return static_cast<double>(*static_cast<const float*>(lr_tensor));
  }
  if (source == kLrDoubleTensor) {
    return *static_cast<const double*>(lr_tensor);
  }
  return lr;
}

C10_HOST_DEVICE inline double read_grad_scale(const LaunchArgs& args) {
  return args.grad_scale != nullptr ? static_cast<double>(*args.grad_scale) : 1.0;
}

// A nonzero (or NaN) found_inf skips the whole step: nothing is written.
C10_HOST_DEVICE inline bool step_skipped(const LaunchArgs& args) {
  return args.found_inf != nullptr && *args.found_inf != 0.0f;
}

template <typename opmath_t>
C10_HOST_DEVICE inline om::AdamWConsts<opmath_t> adamw_block_consts(const AdamWMeta& meta, int block) {
  const int t = meta.block_tensor[block];
  const AdamWGroup& g = meta.groups[meta.group_of[t]];
  const double step = static_cast<double>(*static_cast<const float*>(meta.ptrs[AdamWOperand::kStep][t]));
  return om::make_adamw_consts<opmath_t>(read_lr(g.lr, g.lr_tensor, g.lr_source), g.beta1, g.beta2, g.eps,
                                         g.weight_decay, g.l2sp, g.l1, step, read_grad_scale(meta.shared),
                                         meta.shared.maximize, meta.tags[t] != kNoAnchor);
}

template <typename opmath_t>
C10_HOST_DEVICE inline om::SGDConsts<opmath_t> sgd_block_consts(const SGDMeta& meta, int block) {
  const int t = meta.block_tensor[block];
  const SGDGroup& g = meta.groups[meta.group_of[t]];
  return om::make_sgd_consts<opmath_t>(read_lr(g.lr, g.lr_tensor, g.lr_source), g.momentum, g.dampening,
                                       g.weight_decay, g.l2sp, g.l1, read_grad_scale(meta.shared),
                                       meta.shared.maximize, meta.tags[t] != kNoAnchor);
}

// ---- Chunk bodies --------------------------------------------------------------------------------
// Host-device so that a CPU test can run a block by calling them for every thread index in turn
// (the only value shared within a block is the constants, computed before). On the device `c` is
// the block's shared-memory copy: reading it there rather than copying it into registers keeps the
// 16-bit AdamW kernels within 128 registers without spills.

template <typename scalar_t>
C10_HOST_DEVICE inline int64_t anchor_itemsize(uint8_t dtype) {
  return dtype == kAnchorFloat ? 4 : dtype == kAnchorBFloat16 ? 2 : static_cast<int64_t>(sizeof(scalar_t));
}

template <int N, typename scalar_t>
C10_HOST_DEVICE inline bool anchor_aligned_for(const void* ptr, uint8_t dtype) {
  if (dtype == kAnchorFloat) {
    return mta::is_aligned_for<N, float>(ptr);
  }
  if (dtype == kAnchorBFloat16) {
    return mta::is_aligned_for<N, c10::BFloat16>(ptr);
  }
  return mta::is_aligned_for<N, scalar_t>(ptr);
}

template <int N, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void load_anchor(const void* anchor, uint8_t dtype, int i, opmath_t (&out)[N]) {
  if (dtype == kAnchorFloat) {
    mta::load_n<N>(static_cast<const float*>(anchor) + i, out);
  } else if (dtype == kAnchorBFloat16) {
    mta::load_n<N>(static_cast<const c10::BFloat16*>(anchor) + i, out);
  } else {
    mta::load_n<N>(static_cast<const scalar_t*>(anchor) + i, out);
  }
}

// The operands of one chunk, already offset to the chunk's first element.
template <typename scalar_t>
struct AdamWChunk {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* p;
  const scalar_t* g;
  opmath_t* m;
  opmath_t* v;
  opmath_t* vmax;        // amsgrad only
  const void* anchor;    // nullptr unless the L2-SP term is on (a None anchor is never read)
  const uint8_t* mask;   // nullptr: dense
  uint8_t anchor_dtype;
};

// Elements [i, i + N) of a chunk. N > 1 needs every operand aligned for N-element accesses.
template <int N, bool kAmsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void adamw_n(const AdamWChunk<scalar_t>& x, int i,
                                               const om::AdamWConsts<opmath_t>& c, bool decoupled_l2sp) {
  opmath_t p[N], g[N], m[N], v[N], vmax[N], p0[N];
  uint8_t keep[N];
  mta::load_n<N>(x.p + i, p);
  mta::load_n<N>(x.g + i, g);
  mta::load_n<N>(x.m + i, m);
  mta::load_n<N>(x.v + i, v);
  if constexpr (kAmsgrad) {
    mta::load_n<N>(x.vmax + i, vmax);
  } else {
    mta::fill_n<N>(vmax, opmath_t(0));
  }
  if (x.anchor != nullptr) {
    load_anchor<N, scalar_t>(x.anchor, x.anchor_dtype, i, p0);
  } else {
    mta::fill_n<N>(p0, opmath_t(0));
  }
  if (x.mask != nullptr) {
    mta::load_n<N>(x.mask + i, keep);
  } else {
    mta::fill_n<N>(keep, uint8_t{1});
  }
  const om::AdamWFlags flags{kAmsgrad, decoupled_l2sp};
  PF_UNROLL
  for (int k = 0; k < N; ++k) {
    om::adamw_element(p[k], g[k], m[k], v[k], vmax[k], p0[k], c, flags);
    if (keep[k] == 0) {
      p[k] = m[k] = v[k] = vmax[k] = opmath_t(0);
    }
  }
  mta::store_n<N>(x.p + i, p);
  mta::store_n<N>(x.m + i, m);
  mta::store_n<N>(x.v + i, v);
  if constexpr (kAmsgrad) {
    mta::store_n<N>(x.vmax + i, vmax);
  }
}

template <typename scalar_t, bool kAmsgrad>
C10_HOST_DEVICE C10_ALWAYS_INLINE void adamw_chunk(const AdamWMeta& meta, int block, int tid, int nthreads,
                                                   const om::AdamWConsts<at::opmath_type<scalar_t>>& c) {
  using opmath_t = at::opmath_type<scalar_t>;
  using O = AdamWOperand;
  constexpr int kVec = 16 / sizeof(scalar_t);  // 8 bf16/fp16, 4 fp32, 2 fp64 per 16-byte access
  const int t = meta.block_tensor[block];
  const int64_t base = static_cast<int64_t>(meta.block_chunk[block]) * mta::kChunkSize;
  const int64_t left = meta.numels[t] - base;
  const int n = left < mta::kChunkSize ? static_cast<int>(left) : mta::kChunkSize;

  AdamWChunk<scalar_t> x;
  x.p = static_cast<scalar_t*>(meta.ptrs[O::kParam][t]) + base;
  x.g = static_cast<const scalar_t*>(meta.ptrs[O::kGrad][t]) + base;
  x.m = static_cast<opmath_t*>(meta.ptrs[O::kExpAvg][t]) + base;
  x.v = static_cast<opmath_t*>(meta.ptrs[O::kExpAvgSq][t]) + base;
  x.vmax = kAmsgrad ? static_cast<opmath_t*>(meta.ptrs[O::kMaxExpAvgSq][t]) + base : nullptr;
  x.anchor_dtype = meta.tags[t];
  x.anchor = c.has_l2sp ? static_cast<const char*>(meta.ptrs[O::kAnchor][t]) +
                              base * anchor_itemsize<scalar_t>(x.anchor_dtype)
                        : nullptr;
  x.mask = meta.ptrs[O::kMask][t] != nullptr ? static_cast<const uint8_t*>(meta.ptrs[O::kMask][t]) + base
                                             : nullptr;

  const bool aligned = mta::is_aligned_for<kVec, scalar_t>(x.p) && mta::is_aligned_for<kVec, scalar_t>(x.g) &&
                       mta::is_aligned_for<kVec, opmath_t>(x.m) && mta::is_aligned_for<kVec, opmath_t>(x.v) &&
                       (!kAmsgrad || mta::is_aligned_for<kVec, opmath_t>(x.vmax)) &&
                       (x.anchor == nullptr || anchor_aligned_for<kVec, scalar_t>(x.anchor, x.anchor_dtype)) &&
                       (x.mask == nullptr || mta::is_aligned_for<kVec, uint8_t>(x.mask));
  const bool decoupled = meta.shared.decoupled_l2sp;
  const int n_vec = aligned ? n / kVec : 0;
  for (int i = tid; i < n_vec; i += nthreads) {
    adamw_n<kVec, kAmsgrad>(x, i * kVec, c, decoupled);
  }
  // The scalar tail (a partial last vector) or the whole chunk when an operand is misaligned.
  for (int i = n_vec * kVec + tid; i < n; i += nthreads) {
    adamw_n<1, kAmsgrad>(x, i, c, decoupled);
  }
}

template <typename scalar_t>
struct SGDChunk {
  using opmath_t = at::opmath_type<scalar_t>;
  scalar_t* p;
  const scalar_t* g;
  opmath_t* buf;         // nullptr: this tensor uses no momentum (buffer neither read nor written)
  const void* anchor;
  const uint8_t* mask;
  uint8_t anchor_dtype;
};

template <int N, bool kMomentum, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sgd_n(const SGDChunk<scalar_t>& x, int i, const om::SGDConsts<opmath_t>& c,
                                             bool nesterov, bool decoupled_l2sp) {
  opmath_t p[N], g[N], buf[N], p0[N];
  uint8_t keep[N];
  const bool has_buf = kMomentum && x.buf != nullptr;
  mta::load_n<N>(x.p + i, p);
  mta::load_n<N>(x.g + i, g);
  if (has_buf) {
    mta::load_n<N>(x.buf + i, buf);
  } else {
    mta::fill_n<N>(buf, opmath_t(0));
  }
  if (x.anchor != nullptr) {
    load_anchor<N, scalar_t>(x.anchor, x.anchor_dtype, i, p0);
  } else {
    mta::fill_n<N>(p0, opmath_t(0));
  }
  if (x.mask != nullptr) {
    mta::load_n<N>(x.mask + i, keep);
  } else {
    mta::fill_n<N>(keep, uint8_t{1});
  }
  PF_UNROLL
  for (int k = 0; k < N; ++k) {
    om::sgd_element(p[k], g[k], buf[k], p0[k], c, has_buf, nesterov, decoupled_l2sp);
    if (keep[k] == 0) {
      p[k] = buf[k] = opmath_t(0);
    }
  }
  mta::store_n<N>(x.p + i, p);
  if (has_buf) {
    mta::store_n<N>(x.buf + i, buf);
  }
}

template <typename scalar_t, bool kMomentum>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sgd_chunk(const SGDMeta& meta, int block, int tid, int nthreads,
                                                 const om::SGDConsts<at::opmath_type<scalar_t>>& c) {
  using opmath_t = at::opmath_type<scalar_t>;
  using O = SGDOperand;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int t = meta.block_tensor[block];
  const int64_t base = static_cast<int64_t>(meta.block_chunk[block]) * mta::kChunkSize;
  const int64_t left = meta.numels[t] - base;
  const int n = left < mta::kChunkSize ? static_cast<int>(left) : mta::kChunkSize;

  SGDChunk<scalar_t> x;
  x.p = static_cast<scalar_t*>(meta.ptrs[O::kParam][t]) + base;
  x.g = static_cast<const scalar_t*>(meta.ptrs[O::kGrad][t]) + base;
  x.buf = kMomentum && meta.ptrs[O::kMomentumBuffer][t] != nullptr
              ? static_cast<opmath_t*>(meta.ptrs[O::kMomentumBuffer][t]) + base
              : nullptr;
  x.anchor_dtype = meta.tags[t];
  x.anchor = c.has_l2sp ? static_cast<const char*>(meta.ptrs[O::kAnchor][t]) +
                              base * anchor_itemsize<scalar_t>(x.anchor_dtype)
                        : nullptr;
  x.mask = meta.ptrs[O::kMask][t] != nullptr ? static_cast<const uint8_t*>(meta.ptrs[O::kMask][t]) + base
                                             : nullptr;

  const bool aligned = mta::is_aligned_for<kVec, scalar_t>(x.p) && mta::is_aligned_for<kVec, scalar_t>(x.g) &&
                       (x.buf == nullptr || mta::is_aligned_for<kVec, opmath_t>(x.buf)) &&
                       (x.anchor == nullptr || anchor_aligned_for<kVec, scalar_t>(x.anchor, x.anchor_dtype)) &&
                       (x.mask == nullptr || mta::is_aligned_for<kVec, uint8_t>(x.mask));
  const bool nesterov = meta.shared.nesterov;
  const bool decoupled = meta.shared.decoupled_l2sp;
  const int n_vec = aligned ? n / kVec : 0;
  for (int i = tid; i < n_vec; i += nthreads) {
    sgd_n<kVec, kMomentum>(x, i * kVec, c, nesterov, decoupled);
  }
  for (int i = n_vec * kVec + tid; i < n; i += nthreads) {
    sgd_n<1, kMomentum>(x, i, c, nesterov, decoupled);
  }
}

// ---- Kernels -------------------------------------------------------------------------------------
// Template parameters only where they remove per-element work: amsgrad (a third state tensor) and
// whether the call has momentum buffers at all. maximize is folded into the constants; nesterov
// and decoupled_l2sp are uniform branches next to per-tensor ones (has_l2sp, has_l1) that exist
// anyway, so they stay runtime values and the instantiations stay at 8 + 8.

template <typename scalar_t, bool kAmsgrad>
__global__ void __launch_bounds__(mta::kBlockSize) fused_adamw_kernel(const AdamWMeta meta) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (step_skipped(meta.shared)) {
    return;
  }
  __shared__ om::AdamWConsts<opmath_t> consts;
  if (threadIdx.x == 0) {
    consts = adamw_block_consts<opmath_t>(meta, blockIdx.x);
  }
  __syncthreads();
  adamw_chunk<scalar_t, kAmsgrad>(meta, blockIdx.x, threadIdx.x, blockDim.x, consts);
}

template <typename scalar_t, bool kMomentum>
__global__ void __launch_bounds__(mta::kBlockSize) fused_sgd_kernel(const SGDMeta meta) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (step_skipped(meta.shared)) {
    return;
  }
  __shared__ om::SGDConsts<opmath_t> consts;
  if (threadIdx.x == 0) {
    consts = sgd_block_consts<opmath_t>(meta, blockIdx.x);
  }
  __syncthreads();
  sgd_chunk<scalar_t, kMomentum>(meta, blockIdx.x, threadIdx.x, blockDim.x, consts);
}

// ---- Host side -----------------------------------------------------------------------------------

void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

const float* scalar_ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<float>() : nullptr;
}

uint8_t anchor_dtype_tag(const std::optional<at::Tensor>& anchor, at::ScalarType param_dtype) {
  if (!anchor.has_value()) {
    return kNoAnchor;
  }
  const at::ScalarType dt = anchor->scalar_type();
  if (dt == param_dtype) {
    return kAnchorParamDtype;
  }
  return dt == at::kFloat ? kAnchorFloat : kAnchorBFloat16;  // the only others the checks allow
}

void set_lr(const std::optional<at::Tensor>& lr_tensor, const void*& ptr, uint8_t& source) {
  ptr = nullptr;
  source = kLrValue;
  if (lr_tensor.has_value()) {
    ptr = lr_tensor->const_data_ptr();
    source = lr_tensor->scalar_type() == at::kDouble ? kLrDoubleTensor : kLrFloatTensor;
  }
}

LaunchArgs make_launch_args(const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                            bool maximize, bool decoupled_l2sp, bool nesterov) {
  LaunchArgs args;
  args.found_inf = scalar_ptr_or_null(found_inf);
  args.grad_scale = scalar_ptr_or_null(grad_scale);
  args.maximize = maximize;
  args.decoupled_l2sp = decoupled_l2sp;
  args.nesterov = nesterov;
  return args;
}

// Packs the (already checked) AdamW arguments and calls launch(meta, n_blocks) for each launch.
template <typename Launch>
void adamw_for_each_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const OptTensorList& anchors,
                           const OptTensorList& masks, at::TensorList steps, at::ArrayRef<double> lrs,
                           const OptTensorList& lr_tensors, at::ArrayRef<double> beta1s,
                           at::ArrayRef<double> beta2s, at::ArrayRef<double> epss,
                           at::ArrayRef<double> weight_decays, at::ArrayRef<double> l2sps, at::ArrayRef<double> l1s,
                           bool amsgrad, const LaunchArgs& args, Launch&& launch) {
  using O = AdamWOperand;
  const at::ScalarType dtype = params[0].scalar_type();
  auto describe = [&](int64_t i) {
    mta::TensorSlot<AdamWMeta> s{};
    s.numel = params[i].numel();
    if (s.numel == 0) {
      return s;
    }
    const std::optional<at::Tensor> anchor = opt_at(anchors, i);
    s.ptrs[O::kParam] = params[i].data_ptr();
    s.ptrs[O::kGrad] = const_cast<void*>(grads[i].const_data_ptr());
    s.ptrs[O::kExpAvg] = exp_avgs[i].data_ptr();
    s.ptrs[O::kExpAvgSq] = exp_avg_sqs[i].data_ptr();
    s.ptrs[O::kMaxExpAvgSq] = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    s.ptrs[O::kAnchor] = ptr_or_null(anchor);
    s.ptrs[O::kMask] = ptr_or_null(opt_at(masks, i));
    s.ptrs[O::kStep] = const_cast<void*>(steps[i].const_data_ptr());
    s.tag = anchor_dtype_tag(anchor, dtype);
    s.group = AdamWGroup{lrs[i], beta1s[i], beta2s[i], epss[i], weight_decays[i], l2sps[i], l1s[i], nullptr,
                         kLrValue};
    set_lr(opt_at(lr_tensors, i), s.group.lr_tensor, s.group.lr_source);
    return s;
  };
  mta::multi_tensor_apply<AdamWMeta>(static_cast<int64_t>(params.size()), args, describe, launch);
}

template <typename Launch>
void sgd_for_each_launch(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         const OptTensorList& anchors, const OptTensorList& masks, at::ArrayRef<double> lrs,
                         const OptTensorList& lr_tensors, at::ArrayRef<double> momentums,
                         at::ArrayRef<double> dampenings, at::ArrayRef<double> weight_decays,
                         at::ArrayRef<double> l2sps, at::ArrayRef<double> l1s, const LaunchArgs& args,
                         Launch&& launch) {
  using O = SGDOperand;
  const at::ScalarType dtype = params[0].scalar_type();
  auto describe = [&](int64_t i) {
    mta::TensorSlot<SGDMeta> s{};
    s.numel = params[i].numel();
    if (s.numel == 0) {
      return s;
    }
    const std::optional<at::Tensor> anchor = opt_at(anchors, i);
    s.ptrs[O::kParam] = params[i].data_ptr();
    s.ptrs[O::kGrad] = const_cast<void*>(grads[i].const_data_ptr());
    // A tensor whose momentum is 0 leaves its buffer alone, even if one is passed.
    s.ptrs[O::kMomentumBuffer] =
        !momentum_buffers.empty() && momentums[i] != 0.0 ? momentum_buffers[i].data_ptr() : nullptr;
    s.ptrs[O::kAnchor] = ptr_or_null(anchor);
    s.ptrs[O::kMask] = ptr_or_null(opt_at(masks, i));
    s.tag = anchor_dtype_tag(anchor, dtype);
    s.group = SGDGroup{lrs[i], momentums[i], dampenings[i], weight_decays[i], l2sps[i], l1s[i], nullptr, kLrValue};
    set_lr(opt_at(lr_tensors, i), s.group.lr_tensor, s.group.lr_source);
    return s;
  };
  mta::multi_tensor_apply<SGDMeta>(static_cast<int64_t>(params.size()), args, describe, launch);
}

template <typename scalar_t, bool kAmsgrad>
void launch_adamw(const AdamWMeta& meta, int n_blocks) {
  fused_adamw_kernel<scalar_t, kAmsgrad>
      <<<n_blocks, mta::kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(meta);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kMomentum>
void launch_sgd(const SGDMeta& meta, int n_blocks) {
  fused_sgd_kernel<scalar_t, kMomentum><<<n_blocks, mta::kBlockSize, 0, at::cuda::getCurrentCUDAStream()>>>(meta);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fused_adamw_cuda(PF_FUSED_ADAMW_PARAMS) {
  check_fused_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                         lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, amsgrad, grad_scale, found_inf);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const LaunchArgs args = make_launch_args(grad_scale, found_inf, maximize, decoupled_l2sp, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_adamw_cuda", [&] {
    if (amsgrad) {
      adamw_for_each_launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                            lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, true, args,
                            launch_adamw<scalar_t, true>);
    } else {
      adamw_for_each_launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                            lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, false, args,
                            launch_adamw<scalar_t, false>);
    }
  });
}

void fused_sgd_cuda(PF_FUSED_SGD_PARAMS) {
  check_fused_sgd_args(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings,
                       weight_decays, l2sps, l1s, nesterov, grad_scale, found_inf);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const LaunchArgs args = make_launch_args(grad_scale, found_inf, maximize, decoupled_l2sp, nesterov);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_sgd_cuda", [&] {
    if (!momentum_buffers.empty()) {
      sgd_for_each_launch(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings,
                          weight_decays, l2sps, l1s, args, launch_sgd<scalar_t, true>);
    } else {
      sgd_for_each_launch(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings,
                          weight_decays, l2sps, l1s, args, launch_sgd<scalar_t, false>);
    }
  });
}

}  // namespace
}  // namespace pyfinetune

TORCH_LIBRARY_IMPL(pyfinetune, CUDA, m) {
  m.impl("fused_adamw_", &pyfinetune::fused_adamw_cuda);
  m.impl("fused_sgd_", &pyfinetune::fused_sgd_cuda);
}

// Sparse gradients: the argument checks run first and name the sparse argument.
TORCH_LIBRARY_IMPL(pyfinetune, SparseCUDA, m) {
  m.impl("fused_adamw_", &pyfinetune::fused_adamw_cuda);
  m.impl("fused_sgd_", &pyfinetune::fused_sgd_cuda);
}
