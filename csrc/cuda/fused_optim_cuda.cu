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

#include <pyfinetune/checks.h>
#include <pyfinetune/fused_optim.h>
#include <pyfinetune/fused_optim_math.h>
#include <pyfinetune/multi_tensor_apply.cuh>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

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

// The flat layout's launch (PYFINETUNE_OPTIM_CUDA_LAYOUT=flat, experimental): the same per-tensor
// table, and instead of a block table the running count of kFlatPiece-element pieces through each
// tensor. Its kernel's blocks stay resident and take pieces blockIdx.x, + gridDim.x, ... of the
// launch's tensors laid end to end, so that the blocks running at once work on neighbouring pieces
// (as a kernel over one flat buffer does) rather than each on a 64K-element chunk of its own.
template <typename Head>
struct FlatMeta : Head {
  int64_t piece_end[Head::kMaxTensors];  // pieces of tensors 0 .. t
  int32_t n_tensors;
};
using AdamWFlatMeta =
    FlatMeta<mta::TensorListMetaHead<AdamWOperand::kCount, kLargeArgs ? 192 : 36, AdamWGroup, 4, LaunchArgs>>;
using SGDFlatMeta = FlatMeta<mta::TensorListMetaHead<SGDOperand::kCount, kLargeArgs ? 224 : 48, SGDGroup, 4, LaunchArgs>>;
static_assert(sizeof(AdamWFlatMeta) <= mta::kMaxKernelArgBytes && sizeof(SGDFlatMeta) <= mta::kMaxKernelArgBytes,
              "flat metadata must fit the kernel argument limit");
constexpr int kFlatThreads = 256;
// Elements per piece: 8 of every operand per thread (2 float32 / 1 16-bit vector; float64: one
// 2-element vector at a time), the Triton roofline kernel's 2048 per program. ptxas (nvcc 13.0,
// sm_90) fits every flat kernel in 64-122 registers without spills under the bound of 2 blocks
// per SM; with 16 elements per thread (4096-element pieces, as the wide layout) the AdamW ones
// hit the 128-register cap and spilled 24-124 bytes (80-96 with a third block, 1 block: 152-176
// registers and 8 warps per SM). Loads in flight per SM are the classic layout's either way
// (16 warps x 160 bytes of float32 AdamW, against 32 x 80), ~3x what the HBM's latency needs.
constexpr int64_t kFlatPiece = 2048;

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

template <typename opmath_t, typename Meta>
C10_HOST_DEVICE inline om::AdamWConsts<opmath_t> adamw_tensor_consts(const Meta& meta, int t) {
  const AdamWGroup& g = meta.groups[meta.group_of[t]];
  const double step = static_cast<double>(*static_cast<const float*>(meta.ptrs[AdamWOperand::kStep][t]));
  return om::make_adamw_consts<opmath_t>(read_lr(g.lr, g.lr_tensor, g.lr_source), g.beta1, g.beta2, g.eps,
                                         g.weight_decay, g.l2sp, g.l1, step, read_grad_scale(meta.shared),
                                         meta.shared.maximize, meta.tags[t] != kNoAnchor);
}

template <typename opmath_t>
C10_HOST_DEVICE inline om::AdamWConsts<opmath_t> adamw_block_consts(const AdamWMeta& meta, int block) {
  return adamw_tensor_consts<opmath_t>(meta, meta.block_tensor[block]);
}

template <typename opmath_t, typename Meta>
C10_HOST_DEVICE inline om::SGDConsts<opmath_t> sgd_tensor_consts(const Meta& meta, int t) {
  const SGDGroup& g = meta.groups[meta.group_of[t]];
  return om::make_sgd_consts<opmath_t>(read_lr(g.lr, g.lr_tensor, g.lr_source), g.momentum, g.dampening,
                                       g.weight_decay, g.l2sp, g.l1, read_grad_scale(meta.shared),
                                       meta.shared.maximize, meta.tags[t] != kNoAnchor);
}

template <typename opmath_t>
C10_HOST_DEVICE inline om::SGDConsts<opmath_t> sgd_block_consts(const SGDMeta& meta, int block) {
  return sgd_tensor_consts<opmath_t>(meta, meta.block_tensor[block]);
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

// The anchor (0 without one) and the mask (all kept without one) of elements [i, i + N) of a chunk
// (AdamWChunk or SGDChunk).
template <int N, typename scalar_t, typename Chunk, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void load_anchor_and_mask(const Chunk& x, int i, opmath_t (&p0)[N],
                                                            uint8_t (&keep)[N]) {
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
}

// Elements [i, i + N) of a chunk in registers: loaded, updated, stored as three steps so that a
// thread can issue the loads of several vectors before the first update (kIlp). N > 1 needs every
// operand aligned for N-element accesses.
template <int N, bool kAmsgrad, typename scalar_t, typename opmath_t>
struct AdamWRegs {
  static constexpr int kWidth = N;
  opmath_t p[N], g[N], m[N], v[N], vmax[N], p0[N];
  uint8_t keep[N];

  C10_HOST_DEVICE C10_ALWAYS_INLINE void load(const AdamWChunk<scalar_t>& x, int i) {
    mta::load_n<N>(x.p + i, p);
    mta::load_n<N>(x.g + i, g);
    mta::load_n<N>(x.m + i, m);
    mta::load_n<N>(x.v + i, v);
    if constexpr (kAmsgrad) {
      mta::load_n<N>(x.vmax + i, vmax);
    } else {
      mta::fill_n<N>(vmax, opmath_t(0));
    }
    load_anchor_and_mask<N, scalar_t>(x, i, p0, keep);
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void update(const om::AdamWConsts<opmath_t>& c, bool decoupled_l2sp) {
    const om::AdamWFlags flags{kAmsgrad, decoupled_l2sp};
    PF_UNROLL
    for (int k = 0; k < N; ++k) {
      om::adamw_element(p[k], g[k], m[k], v[k], vmax[k], p0[k], c, flags);
      if (keep[k] == 0) {
        p[k] = m[k] = v[k] = vmax[k] = opmath_t(0);
      }
    }
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void store(const AdamWChunk<scalar_t>& x, int i) const {
    mta::store_n<N>(x.p + i, p);
    mta::store_n<N>(x.m + i, m);
    mta::store_n<N>(x.v + i, v);
    if constexpr (kAmsgrad) {
      mta::store_n<N>(x.vmax + i, vmax);
    }
  }
};

template <int N, bool kAmsgrad, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void adamw_n(const AdamWChunk<scalar_t>& x, int i,
                                               const om::AdamWConsts<opmath_t>& c, bool decoupled_l2sp) {
  AdamWRegs<N, kAmsgrad, scalar_t, opmath_t> r;
  r.load(x, i);
  r.update(c, decoupled_l2sp);
  r.store(x, i);
}

// The vectors [0, n_vec) of a chunk, N = Regs::kWidth elements each; thread tid takes vectors tid,
// tid + nthreads, ... (consecutive threads, consecutive vectors). kIlp > 1: a thread loads kIlp of
// its vectors before it updates and stores them, so that kIlp times as many loads are in flight
// (one vector at a time, a thread's next loads wait for its stores: the compiler cannot move a load
// above a store that may alias it). Every element gets the same arithmetic either way.
template <int kIlp, typename Regs, typename Chunk, typename Consts, typename... Flags>
C10_HOST_DEVICE C10_ALWAYS_INLINE void update_vectors(const Chunk& x, int n_vec, int tid, int nthreads, const Consts& c,
                                                      Flags... flags) {
  constexpr int N = Regs::kWidth;
  if constexpr (kIlp == 1) {
    for (int i = tid; i < n_vec; i += nthreads) {
      Regs r;
      r.load(x, i * N);
      r.update(c, flags...);
      r.store(x, i * N);
    }
  } else {
    for (int i0 = tid; i0 < n_vec; i0 += kIlp * nthreads) {
      Regs r[kIlp];
      PF_UNROLL
      for (int u = 0; u < kIlp; ++u) {
        if (i0 + u * nthreads < n_vec) {
          r[u].load(x, (i0 + u * nthreads) * N);
        }
      }
      PF_UNROLL
      for (int u = 0; u < kIlp; ++u) {
        if (i0 + u * nthreads < n_vec) {
          r[u].update(c, flags...);
          r[u].store(x, (i0 + u * nthreads) * N);
        }
      }
    }
  }
}

// Elements [base, base + n) of tensor t of the launch (a chunk of the classic / wide layouts, a
// piece of the flat one): the block's threads tid = 0 .. nthreads - 1 share them.
template <typename scalar_t, bool kAmsgrad, int kIlp, typename Meta>
C10_HOST_DEVICE C10_ALWAYS_INLINE void adamw_span(const Meta& meta, int t, int64_t base, int n, int tid, int nthreads,
                                                  const om::AdamWConsts<at::opmath_type<scalar_t>>& c) {
  using opmath_t = at::opmath_type<scalar_t>;
  using O = AdamWOperand;
  constexpr int kVec = 16 / sizeof(scalar_t);  // 8 bf16/fp16, 4 fp32, 2 fp64 per 16-byte access

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
  update_vectors<kIlp, AdamWRegs<kVec, kAmsgrad, scalar_t, opmath_t>>(x, n_vec, tid, nthreads, c, decoupled);
  // The scalar tail (a partial last vector) or the whole chunk when an operand is misaligned.
  for (int i = n_vec * kVec + tid; i < n; i += nthreads) {
    adamw_n<1, kAmsgrad>(x, i, c, decoupled);
  }
}

template <typename scalar_t, bool kAmsgrad, int kIlp>
C10_HOST_DEVICE C10_ALWAYS_INLINE void adamw_chunk(const AdamWMeta& meta, int block, int tid, int nthreads,
                                                   const om::AdamWConsts<at::opmath_type<scalar_t>>& c) {
  const int t = meta.block_tensor[block];
  const int64_t base = static_cast<int64_t>(meta.block_chunk[block]) * mta::kChunkSize;
  const int64_t left = meta.numels[t] - base;
  const int n = left < mta::kChunkSize ? static_cast<int>(left) : mta::kChunkSize;
  adamw_span<scalar_t, kAmsgrad, kIlp>(meta, t, base, n, tid, nthreads, c);
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

// As AdamWRegs, for SGD.
template <int N, bool kMomentum, typename scalar_t, typename opmath_t>
struct SGDRegs {
  static constexpr int kWidth = N;
  opmath_t p[N], g[N], buf[N], p0[N];
  uint8_t keep[N];
  bool has_buf = false;

  C10_HOST_DEVICE C10_ALWAYS_INLINE void load(const SGDChunk<scalar_t>& x, int i) {
    has_buf = kMomentum && x.buf != nullptr;
    mta::load_n<N>(x.p + i, p);
    mta::load_n<N>(x.g + i, g);
    if (kMomentum && has_buf) {
      mta::load_n<N>(x.buf + i, buf);
    } else {
      mta::fill_n<N>(buf, opmath_t(0));
    }
    load_anchor_and_mask<N, scalar_t>(x, i, p0, keep);
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void update(const om::SGDConsts<opmath_t>& c, bool nesterov, bool decoupled_l2sp) {
    PF_UNROLL
    for (int k = 0; k < N; ++k) {
      om::sgd_element(p[k], g[k], buf[k], p0[k], c, kMomentum && has_buf, nesterov, decoupled_l2sp);
      if (keep[k] == 0) {
        p[k] = buf[k] = opmath_t(0);
      }
    }
  }

  C10_HOST_DEVICE C10_ALWAYS_INLINE void store(const SGDChunk<scalar_t>& x, int i) const {
    mta::store_n<N>(x.p + i, p);
    if (kMomentum && has_buf) {
      mta::store_n<N>(x.buf + i, buf);
    }
  }
};

template <int N, bool kMomentum, typename scalar_t, typename opmath_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sgd_n(const SGDChunk<scalar_t>& x, int i, const om::SGDConsts<opmath_t>& c,
                                             bool nesterov, bool decoupled_l2sp) {
  SGDRegs<N, kMomentum, scalar_t, opmath_t> r;
  r.load(x, i);
  r.update(c, nesterov, decoupled_l2sp);
  r.store(x, i);
}

template <typename scalar_t, bool kMomentum, int kIlp, typename Meta>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sgd_span(const Meta& meta, int t, int64_t base, int n, int tid, int nthreads,
                                                const om::SGDConsts<at::opmath_type<scalar_t>>& c) {
  using opmath_t = at::opmath_type<scalar_t>;
  using O = SGDOperand;
  constexpr int kVec = 16 / sizeof(scalar_t);

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
  update_vectors<kIlp, SGDRegs<kVec, kMomentum, scalar_t, opmath_t>>(x, n_vec, tid, nthreads, c, nesterov, decoupled);
  for (int i = n_vec * kVec + tid; i < n; i += nthreads) {
    sgd_n<1, kMomentum>(x, i, c, nesterov, decoupled);
  }
}

template <typename scalar_t, bool kMomentum, int kIlp>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sgd_chunk(const SGDMeta& meta, int block, int tid, int nthreads,
                                                 const om::SGDConsts<at::opmath_type<scalar_t>>& c) {
  const int t = meta.block_tensor[block];
  const int64_t base = static_cast<int64_t>(meta.block_chunk[block]) * mta::kChunkSize;
  const int64_t left = meta.numels[t] - base;
  const int n = left < mta::kChunkSize ? static_cast<int>(left) : mta::kChunkSize;
  sgd_span<scalar_t, kMomentum, kIlp>(meta, t, base, n, tid, nthreads, c);
}

// ---- Kernels -------------------------------------------------------------------------------------
// Template parameters only where they remove per-element work: amsgrad (a third state tensor) and
// whether the call has momentum buffers at all. maximize is folded into the constants; nesterov
// and decoupled_l2sp are uniform branches next to per-tensor ones (has_l2sp, has_l1) that exist
// anyway, so they stay runtime values. kLayout: how a block walks its chunk (Layout).

// kClassic: blocks of mta::kBlockSize threads, one vector per thread at a time (the measured
// default; the float32 AdamW kernel takes ~50 registers: two blocks, 32 warps per SM, each thread
// with 80 bytes of loads in flight). kWide: blocks of 256 threads, each loading 16 elements of every
// operand (4 float32 vectors, 2 of 16-bit values) before it updates them, compiled for two blocks
// per SM (at most 128 registers): 16 warps per SM with 320 bytes of loads each (float32 AdamW with
// an anchor), twice the bytes in flight; ptxas (nvcc 13.0, sm_90) then spills 20 bytes per thread
// for float32 AdamW, 74-104 with amsgrad, none for SGD. float64 takes kClassic. See
// PYFINETUNE_OPTIM_CUDA_LAYOUT.
enum Layout : int { kClassic = 0, kFlat = 1, kWide = 2 };

template <typename scalar_t, int kLayout>
constexpr int ilp_of() {
  return kLayout == kWide && sizeof(scalar_t) < 8 ? 16 / static_cast<int>(16 / sizeof(scalar_t)) : 1;
}

// The flat layout's vectors per thread at a time: 8 elements of every operand (see kFlatPiece).
template <typename scalar_t>
constexpr int flat_ilp_of() {
  return sizeof(scalar_t) < 8 ? 8 / static_cast<int>(16 / sizeof(scalar_t)) : 1;
}
static_assert(kFlatPiece == 8 * kFlatThreads, "a flat piece is 8 elements per thread");

template <int kLayout>
constexpr int block_size_of() {
  return kLayout == kWide ? 256 : mta::kBlockSize;
}

template <int kLayout>
constexpr int min_blocks_of() {
  return kLayout == kWide ? 2 : 0;
}

template <typename scalar_t, bool kAmsgrad, int kLayout>
__global__ void __launch_bounds__(block_size_of<kLayout>(), min_blocks_of<kLayout>())
    fused_adamw_kernel(const AdamWMeta meta) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (step_skipped(meta.shared)) {
    return;
  }
  __shared__ om::AdamWConsts<opmath_t> consts;
  if (threadIdx.x == 0) {
    consts = adamw_block_consts<opmath_t>(meta, blockIdx.x);
  }
  __syncthreads();
  adamw_chunk<scalar_t, kAmsgrad, ilp_of<scalar_t, kLayout>()>(meta, blockIdx.x, threadIdx.x, blockDim.x, consts);
}

template <typename scalar_t, bool kMomentum, int kLayout>
__global__ void __launch_bounds__(block_size_of<kLayout>(), min_blocks_of<kLayout>())
    fused_sgd_kernel(const SGDMeta meta) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (step_skipped(meta.shared)) {
    return;
  }
  __shared__ om::SGDConsts<opmath_t> consts;
  if (threadIdx.x == 0) {
    consts = sgd_block_consts<opmath_t>(meta, blockIdx.x);
  }
  __syncthreads();
  sgd_chunk<scalar_t, kMomentum, ilp_of<scalar_t, kLayout>()>(meta, blockIdx.x, threadIdx.x, blockDim.x, consts);
}

// kFlat: resident blocks of kFlatThreads over the pieces of the launch in order (FlatMeta), each
// thread loading a whole piece's share at once (8 elements of every operand, see kFlatPiece;
// float64: one 2-element vector at a time). Per tensor the constants are derived again when a
// block's next piece starts a new tensor (block-uniform: piece and tensor are the block's).
// for_each_piece calls body(t, base, n) for this block's pieces (elements [base, base + n) of
// tensor t), with `consts` (shared memory) set to make_consts(t) for the tensor of the piece.
template <typename Meta, typename Consts, typename MakeConsts, typename Body>
__device__ __forceinline__ void for_each_piece(const Meta& meta, Consts& consts, MakeConsts make_consts, Body body) {
  const int64_t total = meta.piece_end[meta.n_tensors - 1];
  int t = 0;
  int have = -1;
  for (int64_t piece = blockIdx.x; piece < total; piece += gridDim.x) {
    while (meta.piece_end[t] <= piece) {
      ++t;
    }
    if (t != have) {
      __syncthreads();  // every thread is done with the previous tensor's constants
      if (threadIdx.x == 0) {
        consts = make_consts(t);
      }
      __syncthreads();
      have = t;
    }
    const int64_t base = (piece - (t == 0 ? 0 : meta.piece_end[t - 1])) * kFlatPiece;
    const int64_t left = meta.numels[t] - base;
    body(t, base, left < kFlatPiece ? static_cast<int>(left) : static_cast<int>(kFlatPiece));
  }
}

template <typename scalar_t, bool kAmsgrad>
__global__ void __launch_bounds__(kFlatThreads, 2) fused_adamw_flat_kernel(const AdamWFlatMeta meta) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (step_skipped(meta.shared)) {
    return;
  }
  __shared__ om::AdamWConsts<opmath_t> consts;
  for_each_piece(
      meta, consts, [&](int t) { return adamw_tensor_consts<opmath_t>(meta, t); },
      [&](int t, int64_t base, int n) {
        adamw_span<scalar_t, kAmsgrad, flat_ilp_of<scalar_t>()>(meta, t, base, n, threadIdx.x, kFlatThreads, consts);
      });
}

template <typename scalar_t, bool kMomentum>
__global__ void __launch_bounds__(kFlatThreads, 2) fused_sgd_flat_kernel(const SGDFlatMeta meta) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (step_skipped(meta.shared)) {
    return;
  }
  __shared__ om::SGDConsts<opmath_t> consts;
  for_each_piece(
      meta, consts, [&](int t) { return sgd_tensor_consts<opmath_t>(meta, t); },
      [&](int t, int64_t base, int n) {
        sgd_span<scalar_t, kMomentum, flat_ilp_of<scalar_t>()>(meta, t, base, n, threadIdx.x, kFlatThreads, consts);
      });
}

// ---- Host side -----------------------------------------------------------------------------------

// The flat layout's packing: as mta::multi_tensor_apply, tensors (numel 0 skipped) and their
// distinct groups into the metadata, a new launch when either table is full; launch(meta, pieces).
template <typename Meta, typename Describe, typename Launch>
void flat_apply(int64_t num_tensors, const typename Meta::Shared& shared, Describe&& describe, Launch&& launch) {
  static_assert(std::is_trivially_copyable<Meta>::value, "flat metadata is copied as kernel argument");
  mta::check_kernel_arg_support();
  Meta meta{};
  meta.shared = shared;
  mta::TablePacker<Meta> tables;
  int64_t pieces = 0;
  for (int64_t i = 0; i < num_tensors; ++i) {
    const mta::TensorSlot<Meta> slot = describe(i);
    if (slot.numel == 0) {
      continue;
    }
    if (tables.full_for(meta, slot)) {
      meta.n_tensors = tables.n_tensors;
      launch(static_cast<const Meta&>(meta), pieces);
      tables.clear();
      pieces = 0;
    }
    const int t = tables.add(meta, slot);
    pieces += (slot.numel + kFlatPiece - 1) / kFlatPiece;
    meta.piece_end[t] = pieces;
  }
  if (tables.n_tensors > 0) {
    meta.n_tensors = tables.n_tensors;
    launch(static_cast<const Meta&>(meta), pieces);
  }
}

// A flat kernel's grid: the blocks the GPU holds at once (asked once per kernel and device), at
// most one per piece.
template <typename Kernel, typename Meta>
void launch_flat_kernel(Kernel kernel, const Meta& meta, int64_t pieces, std::atomic<int>* resident_cache) {
  const int dev = c10::cuda::current_device();
  TORCH_INTERNAL_ASSERT(dev >= 0 && dev < 64);
  int resident = resident_cache[dev].load(std::memory_order_relaxed);
  if (resident == 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kFlatThreads, 0));
    resident = std::max(per_sm, 1) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    resident_cache[dev].store(resident, std::memory_order_relaxed);
  }
  const int64_t grid = std::min<int64_t>(pieces, resident);
  kernel<<<static_cast<unsigned>(grid), kFlatThreads, 0, at::cuda::getCurrentCUDAStream()>>>(meta);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool kAmsgrad>
void launch_adamw_flat(const AdamWFlatMeta& meta, int64_t pieces) {
  static std::atomic<int> resident[64];
  launch_flat_kernel(fused_adamw_flat_kernel<scalar_t, kAmsgrad>, meta, pieces, resident);
}

template <typename scalar_t, bool kMomentum>
void launch_sgd_flat(const SGDFlatMeta& meta, int64_t pieces) {
  static std::atomic<int> resident[64];
  launch_flat_kernel(fused_sgd_flat_kernel<scalar_t, kMomentum>, meta, pieces, resident);
}

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
template <bool kFlat, typename Launch>
void adamw_for_each_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const OptTensorList& anchors,
                           const OptTensorList& masks, at::TensorList steps, at::ArrayRef<double> lrs,
                           const OptTensorList& lr_tensors, at::ArrayRef<double> beta1s,
                           at::ArrayRef<double> beta2s, at::ArrayRef<double> epss,
                           at::ArrayRef<double> weight_decays, at::ArrayRef<double> l2sps, at::ArrayRef<double> l1s,
                           bool amsgrad, const LaunchArgs& args, Launch&& launch) {
  using O = AdamWOperand;
  using Meta = std::conditional_t<kFlat, AdamWFlatMeta, AdamWMeta>;
  const at::ScalarType dtype = params[0].scalar_type();
  auto describe = [&](int64_t i) {
    mta::TensorSlot<Meta> s{};
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
  if constexpr (kFlat) {
    flat_apply<Meta>(static_cast<int64_t>(params.size()), args, describe, launch);
  } else {
    mta::multi_tensor_apply<Meta>(static_cast<int64_t>(params.size()), args, describe, launch);
  }
}

template <bool kFlat, typename Launch>
void sgd_for_each_launch(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         const OptTensorList& anchors, const OptTensorList& masks, at::ArrayRef<double> lrs,
                         const OptTensorList& lr_tensors, at::ArrayRef<double> momentums,
                         at::ArrayRef<double> dampenings, at::ArrayRef<double> weight_decays,
                         at::ArrayRef<double> l2sps, at::ArrayRef<double> l1s, const LaunchArgs& args,
                         Launch&& launch) {
  using O = SGDOperand;
  using Meta = std::conditional_t<kFlat, SGDFlatMeta, SGDMeta>;
  const at::ScalarType dtype = params[0].scalar_type();
  auto describe = [&](int64_t i) {
    mta::TensorSlot<Meta> s{};
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
  if constexpr (kFlat) {
    flat_apply<Meta>(static_cast<int64_t>(params.size()), args, describe, launch);
  } else {
    mta::multi_tensor_apply<Meta>(static_cast<int64_t>(params.size()), args, describe, launch);
  }
}

// PYFINETUNE_OPTIM_CUDA_LAYOUT=classic|wide|flat (experimental, for A/B timing on a GPU; read at
// each step; unset or empty: classic): the kernel layout (Layout). wide (0.99x / 1.03x classic on
// the H100 check) and flat (1.01x / 1.03x on the H200 check of 2026-11-29, inside the spread) are
// not the default until a GPU has measured them clearly faster (benchmarks/optim_gpu_roofline.py times all three); all three do the same arithmetic on
// every element (bit-identical results). Another value is refused before anything is written.
int requested_layout(const char* op) {
  const char* raw = std::getenv("PYFINETUNE_OPTIM_CUDA_LAYOUT");
  if (raw == nullptr || raw[0] == '\0') {
    return kClassic;
  }
  const std::string v(raw);
  TORCH_CHECK_VALUE(v == "classic" || v == "wide" || v == "flat",
                    check_message("pyfinetune.", op, ": PYFINETUNE_OPTIM_CUDA_LAYOUT must be classic, wide or flat (or ",
                                  "unset: classic), got '", v, "'"));
  return v == "wide" ? kWide : v == "flat" ? kFlat : kClassic;
}

template <int kLayout, typename Kernel, typename Meta>
void launch_layout(Kernel kernel, const Meta& meta, int n_blocks) {
  kernel<<<n_blocks, block_size_of<kLayout>(), 0, at::cuda::getCurrentCUDAStream()>>>(meta);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernel of `layout` for scalar_t: kernel_of(std::integral_constant<int, L>{}) names the
// instantiation of layout L; float64 has no wide kernel (classic then).
template <typename scalar_t, typename KernelOf, typename Meta>
void launch_by_layout(KernelOf kernel_of, const Meta& meta, int n_blocks, int layout) {
  if constexpr (ilp_of<scalar_t, kWide>() > 1) {
    if (layout == kWide) {
      launch_layout<kWide>(kernel_of(std::integral_constant<int, kWide>{}), meta, n_blocks);
      return;
    }
  }
  launch_layout<kClassic>(kernel_of(std::integral_constant<int, kClassic>{}), meta, n_blocks);
}

template <typename scalar_t, bool kAmsgrad>
void launch_adamw(const AdamWMeta& meta, int n_blocks, int layout) {
  launch_by_layout<scalar_t>([](auto l) { return fused_adamw_kernel<scalar_t, kAmsgrad, decltype(l)::value>; }, meta,
                             n_blocks, layout);
}

template <typename scalar_t, bool kMomentum>
void launch_sgd(const SGDMeta& meta, int n_blocks, int layout) {
  launch_by_layout<scalar_t>([](auto l) { return fused_sgd_kernel<scalar_t, kMomentum, decltype(l)::value>; }, meta,
                             n_blocks, layout);
}

void fused_adamw_cuda(PF_FUSED_ADAMW_PARAMS) {
  check_fused_adamw_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                         lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, amsgrad, grad_scale, found_inf);
  if (params.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const LaunchArgs args = make_launch_args(grad_scale, found_inf, maximize, decoupled_l2sp, false);
  const int layout = requested_layout("fused_adamw_");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_adamw_cuda", [&] {
    if (layout == kFlat) {
      if (amsgrad) {
        adamw_for_each_launch<true>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                                    lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, true, args,
                                    [](const AdamWFlatMeta& meta, int64_t pieces) { launch_adamw_flat<scalar_t, true>(meta, pieces); });
      } else {
        adamw_for_each_launch<true>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                                    lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, false, args,
                                    [](const AdamWFlatMeta& meta, int64_t pieces) { launch_adamw_flat<scalar_t, false>(meta, pieces); });
      }
      return;
    }
    if (amsgrad) {
      adamw_for_each_launch<false>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                            lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, true, args,
                            [layout](const AdamWMeta& meta, int n_blocks) { launch_adamw<scalar_t, true>(meta, n_blocks, layout); });
    } else {
      adamw_for_each_launch<false>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, anchors, masks, steps, lrs,
                            lr_tensors, beta1s, beta2s, epss, weight_decays, l2sps, l1s, false, args,
                            [layout](const AdamWMeta& meta, int n_blocks) { launch_adamw<scalar_t, false>(meta, n_blocks, layout); });
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
  const int layout = requested_layout("fused_sgd_");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fused_sgd_cuda", [&] {
    if (layout == kFlat) {
      if (!momentum_buffers.empty()) {
        sgd_for_each_launch<true>(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings,
                                  weight_decays, l2sps, l1s, args,
                                  [](const SGDFlatMeta& meta, int64_t pieces) { launch_sgd_flat<scalar_t, true>(meta, pieces); });
      } else {
        sgd_for_each_launch<true>(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings,
                                  weight_decays, l2sps, l1s, args,
                                  [](const SGDFlatMeta& meta, int64_t pieces) { launch_sgd_flat<scalar_t, false>(meta, pieces); });
      }
      return;
    }
    if (!momentum_buffers.empty()) {
      sgd_for_each_launch<false>(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings,
                          weight_decays, l2sps, l1s, args, [layout](const SGDMeta& meta, int n_blocks) { launch_sgd<scalar_t, true>(meta, n_blocks, layout); });
    } else {
      sgd_for_each_launch<false>(params, grads, momentum_buffers, anchors, masks, lrs, lr_tensors, momentums, dampenings,
                          weight_decays, l2sps, l1s, args, [layout](const SGDMeta& meta, int n_blocks) { launch_sgd<scalar_t, false>(meta, n_blocks, layout); });
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
