// CUDA kernels of pyfinetune::kd_loss_fwd, kd_loss_fwd_inplace (the gradient written over the
// student) and kd_loss_topk_fwd.
//
// One row of the [N, V] logits is handled by one block, or on sm_90 by a cluster of n_split blocks
// (each owns a contiguous slice of the row; the partial statistics are merged through distributed
// shared memory). Passes over a block's slice:
//   1. read student and teacher once with 16-byte loads, accumulate online (max, sum exp) for
//      s/T, t/T and (with a CE term) s, with the exponents taken relative to the running maximum
//      of the raw logits (RawLse: no precision lost to logits in the thousands or a small T),
//      keeping up to cache_vecs vectors of the raw inputs in shared memory (filled by register
//      loads, or with PYFINETUNE_KD_CUDA_PREFETCH=1 by asynchronous copies); block (warp shuffle +
//      shared memory) and cluster merge;
//   2. jsd only: sum q log(q/m), p log(p/m) and D element by element (kd_math::jsd_accumulate),
//      from the cache;
//   3. with need_grad: write d(row loss)/d(s) from the cache. The part of a slice beyond the cache
//      is re-read from global memory: splitting a row over a cluster keeps that re-read within L2
//      because few rows are then in flight at once.
// The row is split between a scalar head (up to the first element where the most operands are
// 16-byte aligned), whole vectors and a scalar tail, so any row stride and any V work; an operand
// not aligned with the others goes element by element through the vectors (row_span).
// The hot loops use ex2.approx (log2 scaled), the per-row arithmetic is kd_loss_math.h's, fed the
// row statistics relative to the raw row maxima (as the CPU kernels do).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cooperative_groups.h>

#include <pyfinetune/checks.h>
#include <pyfinetune/kd_loss.h>
#include <pyfinetune/kd_loss_math.h>
#include <pyfinetune/multi_tensor_apply.cuh>

#include <algorithm>
#include <type_traits>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace pyfinetune {
namespace {

namespace km = kd_math;

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxThreads = 512;
constexpr int kMaxSplit = 8;  // portable cluster size
constexpr int kUnroll = 2;    // vectors in flight per thread and loop iteration

// ---- Element access ------------------------------------------------------------------------------

// Elements per vector: 16 bytes of the narrower operand (the wider one takes two 16-byte words).
template <typename ST, typename TT>
constexpr int vec_width() {
  return static_cast<int>(16 / (sizeof(ST) < sizeof(TT) ? sizeof(ST) : sizeof(TT)));
}

template <typename T, int VEC>
struct RawVec {
  static constexpr int kWords = static_cast<int>(VEC * sizeof(T) / 16);
  uint4 w[kWords];
};

// `stream`: last use of the data (evict first) rather than a load that a later pass re-reads in L2.
// `aligned`: p is 16-byte aligned; else the vector is read element by element (an operand whose
// address differs from the others' modulo 16 bytes, see row_span).
template <typename T, int VEC>
C10_HOST_DEVICE C10_ALWAYS_INLINE RawVec<T, VEC> load_raw(const T* p, bool stream, bool aligned) {
  RawVec<T, VEC> r;
  if (!aligned) {
    T* e = reinterpret_cast<T*>(r.w);
    PF_UNROLL
    for (int k = 0; k < VEC; ++k) {
      e[k] = p[k];
    }
    return r;
  }
  const uint4* q = reinterpret_cast<const uint4*>(p);
  PF_UNROLL
  for (int i = 0; i < RawVec<T, VEC>::kWords; ++i) {
#if defined(__CUDA_ARCH__)
    r.w[i] = stream ? __ldcs(q + i) : q[i];
#else
    (void)stream;
    r.w[i] = q[i];
#endif
  }
  return r;
}

template <typename T, int VEC>
C10_HOST_DEVICE C10_ALWAYS_INLINE void to_float(const RawVec<T, VEC>& r, float (&out)[VEC]) {
  const T* e = reinterpret_cast<const T*>(r.w);
  PF_UNROLL
  for (int k = 0; k < VEC; ++k) {
    out[k] = static_cast<float>(e[k]);
  }
}

// `aligned` as for load_raw.
template <typename T, int VEC>
C10_HOST_DEVICE C10_ALWAYS_INLINE void store_vec(T* p, const float (&in)[VEC], bool aligned) {
  if (!aligned) {
    PF_UNROLL
    for (int k = 0; k < VEC; ++k) {
      p[k] = static_cast<T>(in[k]);
    }
    return;
  }
  RawVec<T, VEC> r;
  T* e = reinterpret_cast<T*>(r.w);
  PF_UNROLL
  for (int k = 0; k < VEC; ++k) {
    e[k] = static_cast<T>(in[k]);
  }
  uint4* q = reinterpret_cast<uint4*>(p);
  PF_UNROLL
  for (int i = 0; i < RawVec<T, VEC>::kWords; ++i) {
#if defined(__CUDA_ARCH__)
    __stcs(q + i, r.w[i]);  // the gradient is not read again by this kernel
#else
    q[i] = r.w[i];
#endif
  }
}

// Asynchronous 16-byte copies global -> shared (cp.async, sm_80+): the copies of a whole slice are
// in flight at once and take no registers. Host code (and older archs, where the host never sets
// KdArgs::prefetch) copies directly. cp_async_wait_all makes the thread's own copies visible to it.
template <typename T, int VEC>
C10_HOST_DEVICE C10_ALWAYS_INLINE void copy_async(RawVec<T, VEC>* dst, const T* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  PF_UNROLL
  for (int i = 0; i < RawVec<T, VEC>::kWords; ++i) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst->w + i));
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n" ::"r"(d),
                 "l"(reinterpret_cast<const uint4*>(src) + i)
                 : "memory");
  }
#else
  *dst = load_raw<T, VEC>(src, false, true);
#endif
}

C10_HOST_DEVICE C10_ALWAYS_INLINE void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// 2^x; 2^-inf = 0. ex2.approx (2 ulp, flushes subnormal results to 0) on the device.
C10_HOST_DEVICE C10_ALWAYS_INLINE float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// x^n for n in {2, 3, 4}: with T = n, exp(x) = exp(x / T)^T, so the CE exponential of an element
// is a power of its exponential at T instead of a second ex2 (KdArgs::t_pow).
C10_HOST_DEVICE C10_ALWAYS_INLINE float pow_small(float x, int n) {
  const float x2 = x * x;
  return n == 2 ? x2 : (n == 3 ? x2 * x : x2 * x2);
}

// ---- Online statistics ---------------------------------------------------------------------------

// kd_math::OnlineLse of x / T' (T' = T, or 1 for the CE term) relative to the running maximum of
// the RAW logits x, in log2 units: with c = log2(e) / T',
//   sum = sum_i 2^((x_i - max) c),   wsum = sum_i 2^((x_i - max) c) w_i.
// x_i - max is exact for the entries that carry probability, so logits in the thousands or a small
// T lose no precision; scaling first (x c - max c) would round each exponent by ~|x c| 2^-24. This
// is the CPU kernels' scheme (kd_loss_cpu.cpp). Updated a vector at a time: one rescale per vector
// and one exp2 per element.
struct RawLse {
  float max = km::neg_inf<float>();
  float sum = 0.0f;
  float wsum = 0.0f;
};

template <bool kW, int N>
C10_HOST_DEVICE C10_ALWAYS_INLINE void lse_add(RawLse& a, float c, const float (&x)[N], const float (&w)[N]) {
  float hi = a.max;
  PF_UNROLL
  for (int k = 0; k < N; ++k) {
    hi = fmaxf(hi, x[k]);
  }
  if (hi == km::neg_inf<float>()) {
    return;  // only zero probabilities so far
  }
  if (hi > a.max) {
    const float r = fast_exp2((a.max - hi) * c);  // 0 while a.max is -inf
    a.sum *= r;
    if (kW) {
      a.wsum = km::rescaled(a.wsum, r);
    }
    a.max = hi;
  }
  PF_UNROLL
  for (int k = 0; k < N; ++k) {
    const float e = fast_exp2((x[k] - hi) * c);
    a.sum += e;
    if (kW) {
      // e == 0 skips the term, as OnlineLse::add does for -inf (the weight may be infinite).
      a.wsum = e != 0.0f ? fmaf(e, w[k], a.wsum) : a.wsum;
    }
  }
}

// lse_add(a, c, x, w) and lse_add<false>(a1, c * n, x, w) at once, for c * n = log2(e) (T = n): the
// two always hold the same maximum (the same values pass through both), so a1's terms and its
// rescale are the n-th powers of a's.
template <bool kW, int N>
C10_HOST_DEVICE C10_ALWAYS_INLINE void lse_add_pow(RawLse& a, RawLse& a1, float c, int n, const float (&x)[N],
                                                   const float (&w)[N]) {
  float hi = a.max;
  PF_UNROLL
  for (int k = 0; k < N; ++k) {
    hi = fmaxf(hi, x[k]);
  }
  if (hi == km::neg_inf<float>()) {
    return;
  }
  if (hi > a.max) {
    const float r = fast_exp2((a.max - hi) * c);  // 0 while a.max is -inf
    a.sum *= r;
    a1.sum *= pow_small(r, n);
    if (kW) {
      a.wsum = km::rescaled(a.wsum, r);
    }
    a.max = hi;
    a1.max = hi;
  }
  PF_UNROLL
  for (int k = 0; k < N; ++k) {
    const float e = fast_exp2((x[k] - hi) * c);
    a.sum += e;
    a1.sum += pow_small(e, n);
    if (kW) {
      a.wsum = e != 0.0f ? fmaf(e, w[k], a.wsum) : a.wsum;
    }
  }
}

// a += b for the same c (OnlineLse::merge).
C10_HOST_DEVICE C10_ALWAYS_INLINE void lse_merge(RawLse& a, const RawLse& b, float c) {
  if (b.max == km::neg_inf<float>()) {
    return;
  }
  if (a.max == km::neg_inf<float>()) {
    a = b;
    return;
  }
  if (b.max > a.max) {
    const float r = fast_exp2((a.max - b.max) * c);
    a.sum = fmaf(a.sum, r, b.sum);
    a.wsum = km::rescaled(a.wsum, r) + b.wsum;
    a.max = b.max;
  } else {
    const float r = fast_exp2((b.max - a.max) * c);
    a.sum = fmaf(b.sum, r, a.sum);
    a.wsum += km::rescaled(b.wsum, r);
  }
}

// log2(e) / T: the exponent scale of every exp2 of the row passes, the same float everywhere, so
// that the probabilities of the gradient pass sum to the pass-1 sums.
C10_HOST_DEVICE C10_ALWAYS_INLINE float exp2_scale(const km::KdParams<float>& kp) {
  return kp.inv_temperature * kLog2e;
}

// What pass 1 reduces: s / T (weighted by (s - t) / T for reverse_kl), t / T (weighted by
// (t - s) / T for forward_kl) and s at temperature 1 (CE only); the weights are those of the raw
// logits. s and s1 see the same elements, so their maxima are the same number.
struct RowPartial {
  RawLse s, t, s1;
};

struct RowMerge {
  float c;  // exp2_scale
  C10_HOST_DEVICE C10_ALWAYS_INLINE void operator()(RowPartial& a, const RowPartial& b) const {
    lse_merge(a.s, b.s, c);
    lse_merge(a.t, b.t, c);
    lse_merge(a.s1, b.s1, kLog2e);
  }
};

// What the jsd pass reduces: KdRowStats::jsd_s and jsd_p (sums of q u and p v) and D summed element
// by element (dense only), see jsd_accumulate.
struct JsdPartial {
  float sq = 0.0f, sp = 0.0f, sd = 0.0f;
};

struct JsdMerge {
  C10_HOST_DEVICE C10_ALWAYS_INLINE void operator()(JsdPartial& a, const JsdPartial& b) const {
    a.sq += b.sq;
    a.sp += b.sp;
    a.sd += b.sd;
  }
};

// ---- Launch arguments and row layout -------------------------------------------------------------

struct KdArgs {
  const void* student;
  const void* teacher;       // [N, V] logits, or top-k values [N, k]
  const int64_t* indices;    // top-k only
  const int64_t* labels;     // nullptr: no labels
  void* grad;                // [N, V] contiguous; nullptr unless need_grad
  float* loss;               // [N]
  int64_t s_stride, t_stride, t_col_stride, i_stride, i_col_stride, label_stride;
  int64_t ignore_index;
  int V;
  int k;                     // top-k only
  int n_split;               // blocks per row (a cluster when > 1)
  int cache_vecs;            // vectors of a block's slice kept in shared memory
  int n_rows;                // N: a block (cluster) takes the rows row0, row0 + gridDim.x / n_split, ...
  bool prefetch;             // fill the cache with asynchronous copies (see pass1_thread)
  bool l2_prefetch;          // before a row, prefetch the slice of the block's next row to L2
  bool need_grad;
  float grad_scale;          // the kept gradient is grad_scale * d(row loss)/d(s)
  int t_pow;                 // T when it is exactly 2, 3 or 4 (pow_small), else 0
  km::KdParams<float> kp;
};

// Elements [0, head) and [tail, V) are scalar; [head, tail) is nv vectors, vpb per block. The
// flags say which operands are 16-byte aligned at `head` (vector loads and stores); the others are
// read or written element by element within the vector part.
struct RowSpan {
  int head, nv, vpb, tail;
  bool s_vec, t_vec, g_vec;
};

C10_HOST_DEVICE C10_ALWAYS_INLINE bool aligned16(const void* p, int64_t byte_offset) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(byte_offset)) % 16 == 0;
}

// The head is the first element where the most operands of the row are 16-byte aligned: all of
// them unless their addresses differ modulo 16 bytes (e.g. a sliced student with its own
// contiguous gradient). An operand not aligned there goes element by element through the vector
// part, so such a row keeps its vector split over the block, the cache and the cluster.
template <typename ST, typename TT, int VEC>
C10_HOST_DEVICE inline RowSpan row_span(const ST* s, const TT* t, const ST* g, int V, int n_split) {
  int head = 0;
  int best = -1;
  for (int h = 0; h < VEC && h < V; ++h) {
    const int n = static_cast<int>(aligned16(s, h * int64_t(sizeof(ST)))) +
                  static_cast<int>(aligned16(t, h * int64_t(sizeof(TT)))) +
                  static_cast<int>(aligned16(g, h * int64_t(sizeof(ST))));
    if (n > best) {
      best = n;
      head = h;
    }
  }
  RowSpan r;
  r.head = head;
  r.s_vec = aligned16(s, head * int64_t(sizeof(ST)));
  r.t_vec = aligned16(t, head * int64_t(sizeof(TT)));
  r.g_vec = aligned16(g, head * int64_t(sizeof(ST)));
  r.nv = (V - head) / VEC;
  r.vpb = (r.nv + n_split - 1) / n_split;
  r.tail = head + r.nv * VEC;
  return r;
}

// The vectors [v0, v0 + n) of the row that block `rank` owns; the head belongs to rank 0, the
// tail to the last rank.
struct Slice {
  int v0, n, scalar_begin0, scalar_end0, scalar_begin1, scalar_end1;
};

C10_HOST_DEVICE C10_ALWAYS_INLINE Slice slice_of(const RowSpan& r, int rank, int n_split, int V) {
  Slice sl;
  sl.v0 = rank * r.vpb;
  sl.n = sl.v0 < r.nv ? (r.nv - sl.v0 < r.vpb ? r.nv - sl.v0 : r.vpb) : 0;
  sl.scalar_begin0 = 0;
  sl.scalar_end0 = rank == 0 ? r.head : 0;
  sl.scalar_begin1 = r.tail;
  sl.scalar_end1 = rank == n_split - 1 ? V : r.tail;
  return sl;
}

template <int VEC>
C10_HOST_DEVICE C10_ALWAYS_INLINE int owner_of(const RowSpan& r, int64_t i, int n_split) {
  if (i < r.head) {
    return 0;
  }
  if (i >= r.tail) {
    return n_split - 1;
  }
  return static_cast<int>((i - r.head) / VEC / r.vpb);  // i is in the vector part: nv, vpb >= 1
}

// ---- Per-thread passes (host-device: a CPU test can run a block thread by thread) ----------------

// Constants of the gradient pass, from the merged statistics. Every exponent is taken relative to
// the raw row maximum (ms for the student, mt for the teacher), as pass 1 did.
struct RowConsts {
  float c;        // exp2_scale: log2(e) / T
  float ms, mt;   // raw row maxima of s and t (0 for a row without a finite logit)
  float l2s, l2t, l2s1;  // lse_s, lse_t, lse_s1 (relative to the maxima) in log2 units
  float lse_s, lse_t;
  float kq;       // w.kd / T
  float wce;      // w.ce
  float mean_w;   // reverse_kl: E_Q[(s - t) / T], so that log q - log p - D = (s - t) / T - mean_w
  float jsd_s;    // jsd: KdRowStats::jsd_s
  float coef_q;   // top-k, entries outside the top-k: d/ds_i of the KD term is kq * coef_q * q_i
  int t_pow;      // T in {2, 3, 4} with a CE term (0 otherwise): softmax(s)_i = q_i^T * f_pow
  float f_pow;    // 2^(T l2s - l2s1), in [1, V^(T-1)] (power means): neither factor overflows
  int64_t label;  // -1 without a CE term
};

// (a - b) / T as the float product of a - b and 1 / T, rounded once and never fused into a following
// add. Pass 1 averages exactly these values (reverse_kl: mean_w = E_Q[(s - t) / T]) and the gradient
// subtracts that mean from them again; an FMA-contracted product there would differ from pass 1's
// rounded one by up to half an ulp of |s - t| / T (1e-2 for logits in the thousands at T = 0.05), a
// gradient error where the exact difference is 0 (seen on an H100: 5e-5 of a 0.125 gradient).
C10_HOST_DEVICE C10_ALWAYS_INLINE float scaled_diff(float a, float b, float inv_temperature) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a - b, inv_temperature);
#else
  return (a - b) * inv_temperature;
#endif
}

template <int kDiv, bool kTopK, int N>
C10_HOST_DEVICE C10_ALWAYS_INLINE void accumulate(const km::KdParams<float>& kp, int t_pow, const float (&s)[N],
                                                  const float (&t)[N], bool has_ce, RawLse& ls, RawLse& lt,
                                                  RawLse& ls1) {
  const float c = exp2_scale(kp);
  float w[N];
  PF_UNROLL
  for (int k = 0; k < N; ++k) {
    w[k] = kDiv == km::kReverseKL ? scaled_diff(s[k], t[k], kp.inv_temperature)
                                  : scaled_diff(t[k], s[k], kp.inv_temperature);
  }
  if (has_ce && t_pow != 0) {
    lse_add_pow<kDiv == km::kReverseKL && !kTopK>(ls, ls1, c, t_pow, s, w);
  } else {
    lse_add<kDiv == km::kReverseKL && !kTopK>(ls, c, s, w);
    if (has_ce) {
      lse_add<false>(ls1, kLog2e, s, w);
    }
  }
  if (!kTopK) {
    lse_add<kDiv == km::kForwardKL>(lt, c, t, w);
  }
}

// Pass 1's reduction of one vector of raw inputs (from registers or the cache); kTopK: no teacher
// vector (rt is not read).
template <int kDiv, bool kTopK, typename ST, typename TT, int VEC>
C10_HOST_DEVICE C10_ALWAYS_INLINE void accumulate_raw(const KdArgs& a, const RawVec<ST, VEC>& rs,
                                                      const RawVec<TT, VEC>& rt, bool has_ce, RowPartial& p) {
  float sv[VEC], tv[VEC];
  to_float(rs, sv);
  if (!kTopK) {
    to_float(rt, tv);
  } else {
    mta::fill_n<VEC>(tv, 0.0f);
  }
  accumulate<kDiv, kTopK>(a.kp, a.t_pow, sv, tv, has_ce, p.s, p.t, p.s1);
}

template <typename ST, typename TT, int kDiv, bool kTopK, int VEC>
C10_HOST_DEVICE inline RowPartial pass1_thread(const KdArgs& a, const ST* s, const TT* t, const RowSpan& rs,
                                               const Slice& sl, int rank, int tid, int nthreads,
                                               RawVec<ST, VEC>* s_cache, RawVec<TT, VEC>* t_cache, bool reread,
                                               bool has_ce, int64_t row) {
  RowPartial p;
  // KdArgs::prefetch: the cached vectors of this thread go to shared memory by asynchronous copies,
  // all issued first; the thread reduces the uncached ones (register loads) while they are in
  // flight, then the cached ones from shared memory. Otherwise each vector is loaded into registers
  // (kUnroll in flight per thread) and, when cached, stored to shared memory. Either way a cached
  // vector j is copied and later read by the thread j % nthreads only (the later passes too).
  const bool prefetch = a.prefetch && a.cache_vecs > 0 && rs.s_vec && (kTopK || rs.t_vec);
  const int first = prefetch ? (sl.n < a.cache_vecs ? sl.n : a.cache_vecs) : 0;  // vectors prefetched
  for (int j = tid; j < first; j += nthreads) {
    const int64_t e = rs.head + static_cast<int64_t>(sl.v0 + j) * VEC;
    copy_async<ST, VEC>(s_cache + j, s + e);
    if (!kTopK) {
      copy_async<TT, VEC>(t_cache + j, t + e);
    }
  }
  for (int j0 = first + tid; j0 < sl.n; j0 += kUnroll * nthreads) {
    RawVec<ST, VEC> rsv[kUnroll];
    RawVec<TT, VEC> rtv[kUnroll];
    PF_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * nthreads;
      if (j < sl.n) {
        const bool keep = j < a.cache_vecs;
        const int64_t e = rs.head + static_cast<int64_t>(sl.v0 + j) * VEC;
        rsv[u] = load_raw<ST, VEC>(s + e, keep || !reread, rs.s_vec);
        if (!kTopK) {
          rtv[u] = load_raw<TT, VEC>(t + e, keep || !reread, rs.t_vec);
        }
        if (keep) {
          s_cache[j] = rsv[u];
          if (!kTopK) {
            t_cache[j] = rtv[u];
          }
        }
      }
    }
    PF_UNROLL
    for (int u = 0; u < kUnroll; ++u) {
      if (j0 + u * nthreads < sl.n) {
        accumulate_raw<kDiv, kTopK>(a, rsv[u], rtv[u], has_ce, p);
      }
    }
  }
  if (prefetch) {
    copy_async_wait_all();
    for (int j = tid; j < first; j += nthreads) {
      accumulate_raw<kDiv, kTopK>(a, s_cache[j], t_cache[j], has_ce, p);  // t_cache unread with kTopK
    }
  }
  for (int part = 0; part < 2; ++part) {
    const int b = part == 0 ? sl.scalar_begin0 : sl.scalar_begin1;
    const int e = part == 0 ? sl.scalar_end0 : sl.scalar_end1;
    for (int64_t i = static_cast<int64_t>(b) + tid; i < e; i += nthreads) {
      const float sv[1] = {static_cast<float>(s[i])};
      const float tv[1] = {kTopK ? 0.0f : static_cast<float>(t[kTopK ? 0 : i])};
      accumulate<kDiv, kTopK>(a.kp, a.t_pow, sv, tv, has_ce, p.s, p.t, p.s1);
    }
  }
  if (kTopK && rank == 0) {
    // The teacher's k entries, gathered; forward_kl weights them by (t - s_idx) / T.
    const float c = exp2_scale(a.kp);
    for (int j = tid; j < a.k; j += nthreads) {
      const int64_t idx = a.indices[row * a.i_stride + j * a.i_col_stride];
      CUDA_KERNEL_ASSERT(idx >= 0 && idx < a.V);
      const float x[1] = {static_cast<float>(t[j * a.t_col_stride])};
      const float w[1] = {scaled_diff(x[0], static_cast<float>(s[idx]), a.kp.inv_temperature)};
      lse_add<kDiv == km::kForwardKL>(p.t, c, x, w);
    }
  }
  return p;
}

// The merged statistics of a row: kd_loss_math.h's KdRowStats relative to the raw row maxima
// (shifting every logit of a row by a constant changes no probability, so the shared row math takes
// them unchanged), the maxima, and the mean of the raw reverse_kl weights.
struct RowStats {
  km::KdRowStats<float> st;
  float ms, mt;   // 0 for a row without a finite logit, so that -inf - m stays -inf
  float mean_w;   // reverse_kl: E_Q[(s - t) / T]
  float jsd_d;    // dense jsd: D summed element by element (jsd_stats)
};

C10_HOST_DEVICE C10_ALWAYS_INLINE float safe_max(float m) { return m == km::neg_inf<float>() ? 0.0f : m; }

// Merged pass-1 statistics -> RowStats (jsd sums filled later). The shifted cross terms are
//   forward_kl: E_P[((t - mt) - (s - ms)) / T] = E_P[(t - s) / T] + (ms - mt) / T,
//   reverse_kl: E_Q[((s - ms) - (t - mt)) / T] = E_Q[(s - t) / T] - (ms - mt) / T.
C10_HOST_DEVICE inline RowStats row_stats(const km::KdParams<float>& kp, const RowPartial& p, bool has_ce) {
  RowStats r;
  r.ms = safe_max(p.s.max);
  r.mt = safe_max(p.t.max);
  r.mean_w = 0.0f;
  r.jsd_d = 0.0f;
  km::KdRowStats<float>& st = r.st;
  st.lse_s = km::kd_log(p.s.sum);
  st.lse_t = km::kd_log(p.t.sum);
  st.lse_s1 = has_ce ? km::kd_log(p.s1.sum) : 0.0f;  // p.s1.max == p.s.max
  const float off = (r.ms - r.mt) * kp.inv_temperature;
  st.cross = 0.0f;
  if (kp.divergence == km::kForwardKL) {
    st.cross = p.t.wsum / p.t.sum + off;
  } else if (kp.divergence == km::kReverseKL) {
    r.mean_w = p.s.wsum / p.s.sum;
    st.cross = r.mean_w - off;
  }
  st.jsd_s = 0.0f;
  st.jsd_p = 0.0f;
  return r;
}

// jsd over the full row: the second pass, from the cache where it holds the vector.
template <typename ST, typename TT, int VEC>
C10_HOST_DEVICE inline JsdPartial jsd_thread(const KdArgs& a, const ST* s, const TT* t, const RowSpan& rs,
                                             const Slice& sl, int tid, int nthreads, const RawVec<ST, VEC>* s_cache,
                                             const RawVec<TT, VEC>* t_cache, const RowStats& r) {
  const float lse_s = r.st.lse_s, lse_t = r.st.lse_t;
  JsdPartial p;
  for (int j = tid; j < sl.n; j += nthreads) {
    float sv[VEC], tv[VEC];
    if (j < a.cache_vecs) {
      to_float(s_cache[j], sv);
      to_float(t_cache[j], tv);
    } else {
      const int64_t e = rs.head + static_cast<int64_t>(sl.v0 + j) * VEC;
      to_float(load_raw<ST, VEC>(s + e, !a.need_grad, rs.s_vec), sv);
      to_float(load_raw<TT, VEC>(t + e, !a.need_grad, rs.t_vec), tv);
    }
    PF_UNROLL
    for (int k = 0; k < VEC; ++k) {
      km::jsd_accumulate(a.kp, sv[k] - r.ms, tv[k] - r.mt, lse_s, lse_t, p.sq, p.sp, p.sd);
    }
  }
  for (int part = 0; part < 2; ++part) {
    const int b = part == 0 ? sl.scalar_begin0 : sl.scalar_begin1;
    const int e = part == 0 ? sl.scalar_end0 : sl.scalar_end1;
    for (int64_t i = static_cast<int64_t>(b) + tid; i < e; i += nthreads) {
      km::jsd_accumulate(a.kp, static_cast<float>(s[i]) - r.ms, static_cast<float>(t[i]) - r.mt, lse_s, lse_t, p.sq,
                         p.sp, p.sd);
    }
  }
  return p;
}

// jsd with a top-k teacher: the k entries only (every block computes the same sums); outside the
// top-k p = 0, so u = 0 there (jsd_offset_log_ratios) and those entries add nothing.
template <typename ST, typename TT>
C10_HOST_DEVICE inline JsdPartial topk_jsd_thread(const KdArgs& a, const ST* s, const TT* t, int tid, int nthreads,
                                                  const RowStats& r, int64_t row) {
  JsdPartial p;
  for (int j = tid; j < a.k; j += nthreads) {
    const int64_t idx = a.indices[row * a.i_stride + j * a.i_col_stride];
    CUDA_KERNEL_ASSERT(idx >= 0 && idx < a.V);
    const float sv = static_cast<float>(s[idx]) - r.ms;
    const float tv = static_cast<float>(t[j * a.t_col_stride]) - r.mt;
    km::jsd_accumulate(a.kp, sv, tv, r.st.lse_s, r.st.lse_t, p.sq, p.sp);
  }
  return p;
}

// d(row loss)/d(s_i) from the raw logits s_i, t_i; kTeacher false: an entry outside the top-k
// (p_i = 0).
template <int kDiv, bool kTeacher>
C10_HOST_DEVICE C10_ALWAYS_INLINE float grad_value(const km::KdParams<float>& kp, const RowConsts& rc, float s,
                                                   float t, bool is_label) {
  const float ds = s - rc.ms;  // exact where q is not negligible
  float g = 0.0f;
  const bool q_for_ce = rc.t_pow != 0 && rc.wce != 0.0f;
  const float q = rc.kq != 0.0f || q_for_ce ? fast_exp2(fmaf(ds, rc.c, -rc.l2s)) : 0.0f;
  if (rc.kq != 0.0f) {
    float dd;
    if (!kTeacher) {
      dd = rc.coef_q * q;
    } else if (kDiv == km::kForwardKL) {
      dd = q - fast_exp2(fmaf(t - rc.mt, rc.c, -rc.l2t));
    } else if (kDiv == km::kReverseKL) {
      // log q - log p - D = (s - t) / T - E_Q[(s - t) / T] exactly: the pass-1 weight minus its
      // mean, with no log-partition in it (they cancel).
      dd = km::xlogr(q, scaled_diff(s, t, kp.inv_temperature) - rc.mean_w);
    } else {
      const float log_q = ds * kp.inv_temperature - rc.lse_s;
      const float log_p = (t - rc.mt) * kp.inv_temperature - rc.lse_t;
      float u, v;
      km::jsd_offset_log_ratios(kp, log_p, log_q, u, v);
      dd = (1.0f - kp.beta) * km::xlogr(q, u - rc.jsd_s);
    }
    g = rc.kq * dd;
  }
  if (rc.wce != 0.0f) {
    const float e1 = q_for_ce ? pow_small(q, rc.t_pow) * rc.f_pow : fast_exp2(fmaf(ds, kLog2e, -rc.l2s1));
    g += rc.wce * (e1 - (is_label ? 1.0f : 0.0f));
  }
  return g;
}

// Writes the block's slice of the gradient row (zeros for an ignored row).
template <typename ST, typename TT, int kDiv, bool kTopK, int VEC>
C10_HOST_DEVICE inline void grad_thread(const KdArgs& a, const ST* s, const TT* t, ST* g, const RowSpan& rs,
                                        const Slice& sl, int tid, int nthreads, const RawVec<ST, VEC>* s_cache,
                                        const RawVec<TT, VEC>* t_cache, const RowConsts& rc, bool zero) {
  for (int j = tid; j < sl.n; j += nthreads) {
    const int64_t e = rs.head + static_cast<int64_t>(sl.v0 + j) * VEC;
    float out[VEC];
    if (zero) {
      mta::fill_n<VEC>(out, 0.0f);
    } else {
      float sv[VEC], tv[VEC];
      if (j < a.cache_vecs) {
        to_float(s_cache[j], sv);
        if (!kTopK) {
          to_float(t_cache[j], tv);
        }
      } else {
        to_float(load_raw<ST, VEC>(s + e, true, rs.s_vec), sv);
        if (!kTopK) {
          to_float(load_raw<TT, VEC>(t + e, true, rs.t_vec), tv);
        }
      }
      if (kTopK) {
        mta::fill_n<VEC>(tv, 0.0f);
      }
      PF_UNROLL
      for (int k = 0; k < VEC; ++k) {
        out[k] = grad_value<kDiv, !kTopK>(a.kp, rc, sv[k], tv[k], e + k == rc.label);
      }
    }
    store_vec<ST, VEC>(g + e, out, rs.g_vec);
  }
  for (int part = 0; part < 2; ++part) {
    const int b = part == 0 ? sl.scalar_begin0 : sl.scalar_begin1;
    const int e = part == 0 ? sl.scalar_end0 : sl.scalar_end1;
    for (int64_t i = static_cast<int64_t>(b) + tid; i < e; i += nthreads) {
      float v = 0.0f;
      if (!zero) {
        const float tv = kTopK ? 0.0f : static_cast<float>(t[kTopK ? 0 : i]);
        v = grad_value<kDiv, !kTopK>(a.kp, rc, static_cast<float>(s[i]), tv, i == rc.label);
      }
      g[i] = static_cast<ST>(v);
    }
  }
}

// Top-k: overwrites the entries of the teacher's top-k that this block owns (after grad_thread
// wrote them as entries with p = 0, and a block barrier).
template <typename ST, typename TT, int kDiv>
C10_HOST_DEVICE inline void topk_fixup_thread(const KdArgs& a, const ST* s, const TT* t, ST* g, const RowSpan& rs,
                                              int rank, int tid, int nthreads, const RowConsts& rc, int64_t row) {
  for (int j = tid; j < a.k; j += nthreads) {
    const int64_t idx = a.indices[row * a.i_stride + j * a.i_col_stride];
    CUDA_KERNEL_ASSERT(idx >= 0 && idx < a.V);
    if (owner_of<vec_width<ST, TT>()>(rs, idx, a.n_split) == rank) {
      const float v = grad_value<kDiv, true>(a.kp, rc, static_cast<float>(s[idx]),
                                             static_cast<float>(t[j * a.t_col_stride]), idx == rc.label);
      g[idx] = static_cast<ST>(v);
    }
  }
}

C10_HOST_DEVICE C10_ALWAYS_INLINE void jsd_stats(const JsdPartial& j, RowStats& r) {
  r.st.jsd_s = j.sq;
  r.st.jsd_p = j.sp;
  r.jsd_d = j.sd;
}

// The row loss. The dense jsd takes D from its element-wise sum (jsd_accumulate), as the CPU
// kernel does; with a top-k teacher the entries outside it would need a sum over the whole row.
template <int kDiv, bool kTopK>
C10_HOST_DEVICE inline float row_loss_value(const km::KdParams<float>& kp, const RowStats& r,
                                            const km::KdRowWeights<float>& w, float s_label) {
  if (kDiv != km::kJSD || kTopK) {
    return km::row_loss(kp, r.st, w, s_label);
  }
  km::KdRowWeights<float> w_ce = w;
  w_ce.kd = 0.0f;
  return (w.kd != 0.0f ? w.kd * r.jsd_d : 0.0f) + km::row_loss(kp, r.st, w_ce, s_label);
}

C10_HOST_DEVICE inline RowConsts row_consts(const km::KdParams<float>& kp, const RowStats& r,
                                            const km::KdRowWeights<float>& w, bool has_ce, int64_t label, int t_pow) {
  const km::KdRowStats<float>& st = r.st;
  RowConsts rc;
  rc.c = exp2_scale(kp);
  rc.ms = r.ms;
  rc.mt = r.mt;
  rc.l2s = st.lse_s * kLog2e;
  rc.l2t = st.lse_t * kLog2e;
  rc.l2s1 = st.lse_s1 * kLog2e;
  rc.lse_s = st.lse_s;
  rc.lse_t = st.lse_t;
  rc.kq = w.kd * kp.inv_temperature;
  rc.wce = has_ce ? w.ce : 0.0f;
  rc.mean_w = r.mean_w;
  rc.jsd_s = st.jsd_s;
  // Outside a top-k, u = 0 (jsd) and p = 0 (forward_kl).
  rc.coef_q = kp.divergence == km::kJSD ? (1.0f - kp.beta) * -st.jsd_s : 1.0f;
  rc.t_pow = has_ce ? t_pow : 0;
  rc.f_pow = rc.t_pow != 0 ? exp2f(static_cast<float>(rc.t_pow) * rc.l2s - rc.l2s1) : 0.0f;
  rc.label = has_ce ? label : -1;
  return rc;
}

// ---- Block and cluster reductions ----------------------------------------------------------------

#if defined(__CUDACC__)

template <typename P, typename M>
__device__ C10_ALWAYS_INLINE P warp_reduce(P v, const M& merge) {
  static_assert(sizeof(P) % sizeof(float) == 0, "reduced as floats");
  constexpr int kWords = sizeof(P) / sizeof(float);
  PF_UNROLL
  for (int off = 16; off > 0; off >>= 1) {
    P o;
    const float* src = reinterpret_cast<const float*>(&v);
    float* dst = reinterpret_cast<float*>(&o);
    PF_UNROLL
    for (int w = 0; w < kWords; ++w) {
      dst[w] = __shfl_xor_sync(0xffffffffu, src[w], off);
    }
    merge(v, o);
  }
  return v;
}

// *out = merge of v over the block, visible to every thread on return. blockDim.x is a multiple of
// 32 and every thread calls this (uniform control flow). merge(a, b): a += b.
template <typename P, typename M>
__device__ void block_reduce(P v, P* scratch, P* out, const M& merge) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce(v, merge);
  if (lane == 0) {
    scratch[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    P x = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : P{};
    x = warp_reduce(x, merge);
    if (lane == 0) {
      *out = x;
    }
  }
  __syncthreads();
}

// *out = merge of every block's *slot over the cluster, in rank order (so every block gets the
// same bits). The trailing cluster barrier keeps each block's shared memory alive until all remote
// reads are done.
template <typename P, typename M>
__device__ void cluster_reduce(P* slot, P* out, int n_split, const M& merge) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  if (threadIdx.x == 0) {
    P acc = *cluster.map_shared_rank(slot, 0);
    for (int r = 1; r < n_split; ++r) {
      merge(acc, *cluster.map_shared_rank(slot, r));
    }
    *out = acc;
  }
  cluster.sync();
#else
  (void)slot;
  (void)out;
  (void)n_split;
  (void)merge;
  __trap();  // the host launches clusters only for code built for sm_90 or later
#endif
}

template <typename P, typename M>
__device__ C10_ALWAYS_INLINE void block_then_cluster_reduce(P v, P* scratch, P* slot, P* out, int n_split,
                                                            const M& merge) {
  block_reduce(v, scratch, slot, merge);
  if (n_split > 1) {
    cluster_reduce(slot, out, n_split, merge);
  } else if (threadIdx.x == 0) {
    *out = *slot;
  }
  __syncthreads();
}

// Shared objects with default member initializers cannot be declared __shared__: raw storage.
template <typename P, int N>
struct alignas(16) SharedArray {
  unsigned char bytes[sizeof(P) * N];
  __device__ P* get() { return reinterpret_cast<P*>(bytes); }
};

// kMinBlocks = 0: the default kernels (launch bounds of kMaxThreads threads, no minimum, so that
// ptxas keeps its own register choice: an explicit minimum of 1 changes it). 3: the register-capped
// kernels (PYFINETUNE_KD_CUDA_CAP_REGISTERS, the default for bfloat16 on the cached path), at most
// kCappedThreads threads and registers for three such blocks per SM (see kd_cap_registers_setting).
constexpr int kCappedThreads = 256;

// The bytes [p, p + bytes) to L2, a hint (no value is read into registers or shared memory, and
// no wait). sm_90: one bulk prefetch when p is 16-byte aligned (bytes a multiple of 16 then);
// otherwise, and on older archs, one prefetch per 128-byte line spread over the block's threads.
__device__ C10_ALWAYS_INLINE void prefetch_l2(const void* p, int64_t bytes, int tid, int nthreads) {
  if (bytes <= 0) {
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (aligned16(p, 0) && bytes % 16 == 0 && bytes <= std::numeric_limits<uint32_t>::max()) {
    if (tid == 0) {
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(__cvta_generic_to_global(p)),
                   "r"(static_cast<uint32_t>(bytes))
                   : "memory");
    }
    return;
  }
#endif
  const char* c = static_cast<const char*>(p);
  const uintptr_t first = reinterpret_cast<uintptr_t>(c) & ~uintptr_t{127};
  const int64_t lines = static_cast<int64_t>((reinterpret_cast<uintptr_t>(c) + bytes - 1 - first) / 128) + 1;
  for (int64_t l = tid; l < lines; l += nthreads) {
    const void* line = reinterpret_cast<const void*>(first + l * 128);
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(__cvta_generic_to_global(line)));
  }
}

// KdArgs::l2_prefetch: the slice of `row` that block `rank` reads (its vectors; the head and tail
// are a few elements) of the student and, without a top-k teacher, of the teacher. Nothing for an
// ignored row (its gradient is zeros: nothing of it is read).
template <typename ST, typename TT, bool kTopK, int VEC>
__device__ void prefetch_row_slice(const KdArgs& a, int64_t row, int rank, int tid, int nthreads) {
  if (a.labels != nullptr && a.labels[row * a.label_stride] == a.ignore_index) {
    return;
  }
  const ST* s = static_cast<const ST*>(a.student) + row * a.s_stride;
  const TT* t = static_cast<const TT*>(a.teacher) + row * a.t_stride;
  // The split kd_row will use (the head depends on the gradient's alignment too).
  ST* g = a.need_grad ? static_cast<ST*>(a.grad) + row * static_cast<int64_t>(a.V) : nullptr;
  const RowSpan rs = row_span<ST, TT, VEC>(s, kTopK ? nullptr : t, g, a.V, a.n_split);
  const Slice sl = slice_of(rs, rank, a.n_split, a.V);
  const int64_t e = rs.head + static_cast<int64_t>(sl.v0) * VEC;
  const int64_t n = static_cast<int64_t>(sl.n) * VEC;
  prefetch_l2(s + e, n * static_cast<int64_t>(sizeof(ST)), tid, nthreads);
  if (!kTopK) {
    prefetch_l2(t + e, n * static_cast<int64_t>(sizeof(TT)), tid, nthreads);
  }
}

// One row of the loss (and the gradient) by block `rank` of the row's blocks.
template <typename ST, typename TT, int kDiv, bool kTopK>
__device__ C10_ALWAYS_INLINE void kd_row(const KdArgs& a, int64_t row, int rank, uint4* kd_cache, RowPartial* rp,
                                         JsdPartial* jp) {
  constexpr int VEC = vec_width<ST, TT>();
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const ST* s = static_cast<const ST*>(a.student) + row * a.s_stride;
  const TT* t = static_cast<const TT*>(a.teacher) + row * a.t_stride;
  ST* g = a.need_grad ? static_cast<ST*>(a.grad) + row * static_cast<int64_t>(a.V) : nullptr;
  const RowSpan rs = row_span<ST, TT, VEC>(s, kTopK ? nullptr : t, g, a.V, a.n_split);
  const Slice sl = slice_of(rs, rank, a.n_split, a.V);
  auto* s_cache = reinterpret_cast<RawVec<ST, VEC>*>(kd_cache);
  auto* t_cache = reinterpret_cast<RawVec<TT, VEC>*>(s_cache + a.cache_vecs);

  const bool has_labels = a.labels != nullptr;
  const int64_t label = has_labels ? a.labels[row * a.label_stride] : 0;
  RowConsts rc{};
  if (has_labels && label == a.ignore_index) {
    // Uniform over the cluster (one row): no block of it reaches a cluster barrier.
    if (rank == 0 && tid == 0) {
      a.loss[row] = 0.0f;
    }
    if (a.need_grad) {
      grad_thread<ST, TT, kDiv, kTopK, VEC>(a, s, t, g, rs, sl, tid, nthreads, s_cache, t_cache, rc, true);
    }
    return;
  }
  CUDA_KERNEL_ASSERT(!has_labels || (label >= 0 && label < a.V));
  const km::KdRowWeights<float> w = km::row_weights(a.kp, has_labels, false);
  const bool has_ce = w.ce != 0.0f;
  // The label's logit, read before the first cluster barrier: after it, the block that owns the
  // label's slice may already write the gradient over the student (kd_loss_fwd_inplace).
  const float s_label_raw = rank == 0 && tid == 0 && has_ce ? static_cast<float>(s[label]) : 0.0f;
  const bool reread = a.need_grad || (kDiv == km::kJSD && !kTopK);

  const RowPartial mine =
      pass1_thread<ST, TT, kDiv, kTopK, VEC>(a, s, t, rs, sl, rank, tid, nthreads, s_cache, t_cache, reread, has_ce, row);
  block_then_cluster_reduce(mine, rp, rp + 32, rp + 33, a.n_split, RowMerge{exp2_scale(a.kp)});
  RowStats stats = row_stats(a.kp, rp[33], has_ce);

  if (kDiv == km::kJSD) {
    if (kTopK) {
      const JsdPartial j = topk_jsd_thread(a, s, t, tid, nthreads, stats, row);
      block_reduce(j, jp, jp + 33, JsdMerge{});  // every block computes the same sums: no cluster merge
      jsd_stats(jp[33], stats);
    } else {
      const JsdPartial j = jsd_thread<ST, TT, VEC>(a, s, t, rs, sl, tid, nthreads, s_cache, t_cache, stats);
      block_then_cluster_reduce(j, jp, jp + 32, jp + 33, a.n_split, JsdMerge{});
      jsd_stats(jp[33], stats);
    }
  }
  if (rank == 0 && tid == 0) {
    const float s_label = has_ce ? s_label_raw - stats.ms : 0.0f;
    a.loss[row] = row_loss_value<kDiv, kTopK>(a.kp, stats, w, s_label);
  }
  if (!a.need_grad) {
    return;
  }
  // The gradient is linear in the row weights: grad_scale scales them (NaN where the row's loss is
  // NaN; every thread evaluates it, with the label's logit as 0: only a NaN or +inf label logit,
  // which makes the statistics NaN as well, could tell otherwise).
  rc = row_consts(a.kp, stats,
                  km::gradient_weights(w, row_loss_value<kDiv, kTopK>(a.kp, stats, w, 0.0f), a.grad_scale), has_ce,
                  label, a.t_pow);
  grad_thread<ST, TT, kDiv, kTopK, VEC>(a, s, t, g, rs, sl, tid, nthreads, s_cache, t_cache, rc, false);
  if (kTopK) {
    __syncthreads();  // the fix-ups overwrite entries other threads of this block wrote
    topk_fixup_thread<ST, TT, kDiv>(a, s, t, g, rs, rank, tid, nthreads, rc, row);
  }
}

// Block b of the grid works on row b / n_split as block b % n_split of the row's blocks.
// kPersistent (PYFINETUNE_KD_CUDA_PERSISTENT): the grid holds only the rows that can be resident,
// R = gridDim.x / n_split, and block b takes rows b / n_split, b / n_split + R, ...; with
// KdArgs::l2_prefetch it first asks L2 for its slice of its next row (asked at the start of this
// one, the longest lead: the copy from HBM runs under this row's whole time, its pass 1 reading
// what the previous row asked for from L2, its reductions, cluster barriers and gradient writes,
// where the memory bus would otherwise idle). Every row is uniform over its blocks (the ignored row's
// early return included), so the barriers of one row are reached by all of them; the barrier between
// rows keeps a block's threads on one row (its shared reductions and top-k fix-ups) at a time. A
// separate instantiation: with the loop in every kernel ptxas kept more values live (sm_90, nvcc 13.0:
// the float32 kernels went from 48 to 94 registers, the capped bfloat16 ones spilled), fewer blocks
// per SM on the default path.
template <typename ST, typename TT, int kDiv, bool kTopK, int kMinBlocks = 0, bool kPersistent = false>
__global__ void __launch_bounds__(kMinBlocks > 0 ? kCappedThreads : kMaxThreads, kMinBlocks)
    kd_loss_kernel(const KdArgs a) {
  constexpr int VEC = vec_width<ST, TT>();
  extern __shared__ uint4 kd_cache[];
  __shared__ SharedArray<RowPartial, 34> red;  // 32 warps, slot, result
  __shared__ SharedArray<JsdPartial, 34> jred;
  if constexpr (!kPersistent) {
    kd_row<ST, TT, kDiv, kTopK>(a, blockIdx.x / a.n_split, static_cast<int>(blockIdx.x % a.n_split), kd_cache,
                                red.get(), jred.get());
  } else {
    // 32-bit counters (N * n_split < 2^31, checked on the host), the rank and stride re-read from
    // the special registers, to keep what is live across a row small.
    for (int row = static_cast<int>(blockIdx.x) / a.n_split; row < a.n_rows;) {
      const int next = row + static_cast<int>(gridDim.x) / a.n_split;
      if (a.l2_prefetch && next < a.n_rows) {
        prefetch_row_slice<ST, TT, kTopK, VEC>(a, next, static_cast<int>(blockIdx.x) % a.n_split, threadIdx.x,
                                               blockDim.x);
      }
      kd_row<ST, TT, kDiv, kTopK>(a, row, static_cast<int>(blockIdx.x) % a.n_split, kd_cache, red.get(), jred.get());
      if (next < a.n_rows) {
        __syncthreads();
      }
      row = next;
    }
  }
}

#endif  // __CUDACC__

// ---- Host side -----------------------------------------------------------------------------------

// The shared checks (kd_loss_checks.cpp) validate what CPU and CUDA have in common; these are the
// limits of this implementation: CUDA tensors, no float64 (the hot loops are float32 with
// ex2.approx), and 32-bit row and column counters.
int check_kd_args(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                  const at::Tensor* teacher_indices, const std::optional<at::Tensor>& labels, double temperature,
                  double alpha, c10::string_view divergence, double beta, double grad_scale) {
  const int div = parse_kd_divergence(op, divergence);
  if (teacher_indices == nullptr) {
    check_kd_loss_args(student, teacher, labels, temperature, alpha, beta, grad_scale, op);
  } else {
    check_kd_loss_topk_args(student, teacher, *teacher_indices, labels, temperature, alpha, div, beta, grad_scale);
  }
  const char* tname = teacher_indices != nullptr ? "teacher_values" : "teacher";
  for (const auto& [name, x] : {std::pair<const char*, const at::Tensor*>{"student", &student}, {tname, &teacher}}) {
    PF_CHECK(x->is_cuda(), op, name, " must be a CUDA tensor, got ", x->device());
    PF_CHECK(x->scalar_type() != at::kDouble, op, name,
             " must be float32, bfloat16 or float16 on CUDA (float64 is supported on the CPU only), got ",
             x->scalar_type());
  }
  const int64_t N = student.size(0);
  const int64_t V = student.size(1);
  PF_CHECK(V <= std::numeric_limits<int32_t>::max() - 64, op, "student has too many classes (V = ", V,
           ", at most 2^31 - 65 on CUDA)");
  PF_CHECK(N * kMaxSplit <= std::numeric_limits<int32_t>::max(), op, "student has too many rows (N = ", N,
           ", at most (2^31 - 1) / 8 = 268435455 on CUDA)");
  return div;
}

// Launch shape: blocks per row (cluster), threads, shared-memory cache.
struct LaunchPlan {
  int n_split, threads, cache_vecs;
  size_t smem;
};

LaunchPlan plan_launch(int64_t N, int64_t V, int vec, size_t cache_bytes_per_vec, bool reread, bool clusters,
                       const cudaDeviceProp& prop, int forced_split) {
  // Up to half of an SM's shared memory per block (two blocks per SM overlap one's reductions with
  // the other's loads), at most 96 KB.
  size_t budget = 0;
  if (reread) {
    budget = std::min<size_t>(96 * 1024, prop.sharedMemPerMultiprocessor / 2);
    budget = std::min<size_t>(budget, prop.sharedMemPerBlockOptin);
    budget = budget > 8 * 1024 ? budget - 8 * 1024 : 0;  // static shared memory and reserve
  }
  const int64_t nv = (V + vec - 1) / vec;
  LaunchPlan p;
  p.n_split = 1;
  if (forced_split > 0) {
    p.n_split = forced_split;
  } else if (clusters) {
    // Split until a slice fits the cache (a single read of the inputs), then while the grid is
    // too small for the device and the slices stay large.
    while (p.n_split < kMaxSplit && reread &&
           static_cast<size_t>((nv + p.n_split - 1) / p.n_split) * cache_bytes_per_vec > budget) {
      p.n_split *= 2;
    }
    while (p.n_split < kMaxSplit && N * p.n_split < prop.multiProcessorCount && nv / (2 * p.n_split) >= 2 * 256) {
      p.n_split *= 2;
    }
  }
  const int64_t vpb = (nv + p.n_split - 1) / p.n_split;
  const int64_t want = (vpb + kUnroll - 1) / kUnroll;
  p.threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (want + 31) / 32 * 32)));
  p.cache_vecs = reread ? static_cast<int>(std::min<int64_t>(vpb, static_cast<int64_t>(budget / cache_bytes_per_vec)))
                        : 0;
  p.smem = static_cast<size_t>(p.cache_vecs) * cache_bytes_per_vec;
  return p;
}

// PYFINETUNE_KD_CUDA_PREFETCH (read at each call): pass 1 fills the shared-memory cache with
// asynchronous copies (cp.async, sm_80+), a whole slice in flight at once, instead of register loads
// kUnroll vectors at a time per thread. 1: on, 0: off, unset or empty: auto (see kd_fast_path_auto).
// Only the order of the row sums differs. Another value is refused before anything is written.
std::optional<bool> kd_prefetch_setting(const char* op) {
  return env_switch(op, "PYFINETUNE_KD_CUDA_PREFETCH", "auto");
}

// The block size for `plan` that keeps the most threads resident on an SM, given the kernel's
// registers and the plan's shared memory: among plan.threads, 256 and 128 (not below 128 nor above
// plan.threads), the most warps per SM, ties to the smaller block (more rows in flight, whose
// reductions and gradient writes overlap the others' loads). Measured on an H100 (2026-11-26,
// 8192 x 128256 bf16): 512 threads of 78 registers left room for one block per SM (16 warps;
// 448 GB/s), where by the same count 256 fit three (24 warps). Only for rows split over several blocks or with a
// shared-memory cache: a small row keeps its small block. (nvcc 13.0 gives the bfloat16 kernels 81-87
// registers on sm_90, two 256-thread blocks per SM: see kd_cap_registers_setting.)
//
// PYFINETUNE_KD_CUDA_THREADS=T (experimental, for A/B timing, read at each call): T threads instead
// (a multiple of 32 in [32, 512]) wherever this choice is made; other values are ignored.
// The occupancy queries run once per (kernel, device, block size, shared memory) and are cached.
int forced_kd_threads() {
  const char* env = std::getenv("PYFINETUNE_KD_CUDA_THREADS");
  if (env == nullptr) {
    return 0;
  }
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  return end != env && *end == '\0' && v >= 32 && v <= kMaxThreads && v % 32 == 0 ? static_cast<int>(v) : 0;
}

template <typename Kernel>
int threads_for_occupancy(Kernel kernel, const LaunchPlan& plan) {
  if (plan.threads <= 128 || (plan.n_split == 1 && plan.smem == 0)) {
    return plan.threads;
  }
  if (const int forced = forced_kd_threads()) {
    return forced;
  }
  using Key = std::tuple<const void*, int, int, size_t>;
  static std::mutex mutex;
  static std::map<Key, int> cache;
  const Key key{reinterpret_cast<const void*>(kernel), c10::cuda::current_device(), plan.threads, plan.smem};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) {
      return it->second;
    }
  }
  int best = plan.threads;
  int best_warps = -1;
  const int candidates[3] = {plan.threads, 256, 128};
  for (int i = 0; i < 3; ++i) {
    const int threads = candidates[i];
    if (threads > plan.threads || (i > 0 && threads == plan.threads)) {
      continue;  // above the plan's block, or the plan's block again
    }
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, plan.smem) != cudaSuccess) {
      (void)cudaGetLastError();
      return plan.threads;  // not cached: a later call asks again
    }
    const int warps = blocks * threads / 32;
    if (warps >= best_warps) {  // >=: ties to the smaller block
      best = threads;
      best_warps = warps;
    }
  }
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= 4096) {
    cache.clear();  // a bound for callers with ever new row lengths (an entry per shared-memory size)
  }
  cache.emplace(key, best);
  return best;
}

// What launch_kd needs of one kernel instantiation's attributes on one device, queried once, and
// its dynamic shared memory limit, which only grows. The default limit is 48 KB minus the kernel's
// static shared memory (maxDynamicSharedSizeBytes), not 48 KB. Raising it only when a launch needs
// more, under a lock and never to less than before, keeps a launch on another host thread from
// lowering it under one that needs more.
struct KernelLimits {
  std::once_flag once;
  int ptx_version = 0;
  std::atomic<size_t> dyn_smem{0};
};

std::mutex& smem_limit_mutex() {
  static std::mutex m;
  return m;
}

// The kernel's limits on the current device, with its dynamic shared memory limit at least `smem`.
template <typename Kernel>
const KernelLimits& kernel_limits(KernelLimits* per_device, Kernel kernel, size_t smem) {
  const int device = c10::cuda::current_device();
  TORCH_INTERNAL_ASSERT(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, check_message("pyfinetune.kd_loss: device ", device));
  KernelLimits& k = per_device[device];
  std::call_once(k.once, [&] {
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    k.ptx_version = attr.ptxVersion;
    k.dyn_smem.store(static_cast<size_t>(attr.maxDynamicSharedSizeBytes));
    // The whole unified L1 / shared memory as shared memory: the kernel's global loads are
    // streaming 16-byte loads, and with the driver's default split (an H100 chose 100 KB) a second
    // block of 64 KB found no room on the SM.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        static_cast<int>(cudaSharedmemCarveoutMaxShared)));
    if (attr.ptxVersion >= 90 && at::cuda::getCurrentDeviceProperties()->major >= 9) {
      // Clusters of 16 blocks (PYFINETUNE_KD_CUDA_SPLIT=16) are a non-portable size: allowed where
      // the device has them (the launch's occupancy query says when it does not).
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
        (void)cudaGetLastError();
      }
    }
  });
  if (smem > k.dyn_smem.load()) {
    const std::lock_guard<std::mutex> lock(smem_limit_mutex());
    if (smem > k.dyn_smem.load()) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      k.dyn_smem.store(smem);
    }
  }
  return k;
}

// Rows a grid of single blocks per row can hold at once (resident blocks over the device); 0 when
// the occupancy query fails.
template <typename Kernel>
int64_t resident_block_rows(Kernel kernel, const LaunchPlan& plan, const cudaDeviceProp& prop) {
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, plan.threads, plan.smem) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return static_cast<int64_t>(blocks) * prop.multiProcessorCount;
}

// One kernel instantiation's limits, per device (shared by every launch of that kernel).
template <typename ST, typename TT, int kDiv, bool kTopK, int kMinBlocks, bool kPersistent>
KernelLimits* limits_of() {
  static KernelLimits limits[C10_COMPILE_TIME_MAX_GPUS];
  return limits;
}

// forced_split: PYFINETUNE_KD_CUDA_SPLIT (0: plan_launch's choice); with clusters only.
template <typename ST, typename TT, int kDiv, bool kTopK, int kMinBlocks = 0, bool kPersistent = false>
void launch_kd(KdArgs args, int64_t N, int forced_split) {
  constexpr int VEC = vec_width<ST, TT>();
  auto kernel = kd_loss_kernel<ST, TT, kDiv, kTopK, kMinBlocks, kPersistent>;
  KernelLimits* limits = limits_of<ST, TT, kDiv, kTopK, kMinBlocks, kPersistent>();
  // The block size is the one-row-per-block kernel's choice for the persistent one too: chosen by
  // the persistent kernel's own occupancy (more registers) it could differ, and so would the order
  // of the row sums (an A100 at V ~ 8K: 128 threads instead of 256).
  auto twin = kd_loss_kernel<ST, TT, kDiv, kTopK, kMinBlocks, false>;
  KernelLimits* twin_limits = limits_of<ST, TT, kDiv, kTopK, kMinBlocks, false>();
  const cudaDeviceProp& prop = *at::cuda::getCurrentDeviceProperties();
  // Clusters need the sm_90 code of the kernel (ptxVersion is the arch the code was compiled for).
  const int ptx_version = kernel_limits(limits, kernel, 0).ptx_version;
  const bool clusters = prop.major >= 9 && ptx_version >= 90;
  if (clusters && forced_split > 0) {
    PF_CHECK(N * forced_split <= std::numeric_limits<int32_t>::max(), "kd_loss", "student has too many rows (N = ", N,
             ") for PYFINETUNE_KD_CUDA_SPLIT=", forced_split, ": at most (2^31 - 1) / ", forced_split, " on CUDA");
  }
  args.prefetch = args.prefetch && prop.major >= 8 && ptx_version >= 80;  // cp.async: sm_80 code
  const bool reread = args.need_grad || (kDiv == km::kJSD && !kTopK);
  const size_t bytes_per_vec = sizeof(RawVec<ST, VEC>) + (kTopK ? 0 : sizeof(RawVec<TT, VEC>));
  LaunchPlan plan = plan_launch(N, args.V, VEC, bytes_per_vec, reread, clusters, prop, clusters ? forced_split : 0);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int attempt = 0; attempt < 2; ++attempt) {
    kernel_limits(limits, kernel, plan.smem);
    if constexpr (kPersistent) {
      kernel_limits(twin_limits, twin, plan.smem);
    }
    if constexpr (kMinBlocks > 0) {
      plan.threads = std::min(plan.threads, kCappedThreads);  // its launch bounds (any block size works)
    }
    plan.threads = std::min(threads_for_occupancy(twin, plan), kMinBlocks > 0 ? kCappedThreads : kMaxThreads);
    args.n_split = plan.n_split;
    args.cache_vecs = plan.cache_vecs;
    // N * n_split < 2^31: check_kd_args (n_split <= kMaxSplit), above (a forced split).
    args.n_rows = static_cast<int>(N);
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(N * plan.n_split));
    config.blockDim = dim3(static_cast<unsigned>(plan.threads));
    config.dynamicSmemBytes = plan.smem;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    int64_t resident = 0;  // rows in flight at once (clusters or blocks); 0: unknown
    if (plan.n_split > 1) {
      attribute[0].id = cudaLaunchAttributeClusterDimension;
      attribute[0].val.clusterDim.x = static_cast<unsigned>(plan.n_split);
      attribute[0].val.clusterDim.y = 1;
      attribute[0].val.clusterDim.z = 1;
      config.attrs = attribute;
      config.numAttrs = 1;
      int n_clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&n_clusters, kernel, &config) != cudaSuccess || n_clusters == 0) {
        (void)cudaGetLastError();  // clear the error: fall back to one block per row
        plan = plan_launch(N, args.V, VEC, bytes_per_vec, reread, false, prop, 1);
        continue;
      }
      resident = n_clusters;
    } else if (kPersistent) {
      resident = resident_block_rows(kernel, plan, prop);
    }
    if (kPersistent && resident > 0 && resident < N) {
      config.gridDim = dim3(static_cast<unsigned>(resident * plan.n_split));
    } else {
      args.l2_prefetch = false;  // no next row to prefetch
    }
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  TORCH_INTERNAL_ASSERT(false, "pyfinetune.kd_loss: no launch configuration");
}

#define PF_KD_DISPATCH(TYPE, NAME, ...)                              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// PYFINETUNE_KD_CUDA_CAP_REGISTERS (read at each call): the bfloat16 kernels compiled with
// __launch_bounds__(256, 3), i.e. at most 80 registers, so that three 256-thread blocks fit an SM's
// register file. Why: nvcc 13.0 gives the default bfloat16 kernels 81-87 registers on sm_90 (ptxas
// -v), one block too many for three blocks of 256 threads (65536 / (88 x 256) = 2.9), so the
// block-size choice above finds two per SM (16 warps) where the shared-memory cache of the 8192 x
// 128256 case (8 slices of 64 KB) leaves room for three. Only the bfloat16 student and teacher
// kernels without a top-k teacher have the variant (three more kernels, not forty); other dtypes
// ignore the variable. 1: on, 0: off, unset or empty: auto (see kd_fast_path_auto). Same PTX
// arithmetic: at the same block size the same bits (a block size the capped kernel cannot take,
// above 256 threads, is lowered to 256: another order of the sums). Another value is refused before
// anything is written.
std::optional<bool> kd_cap_registers_setting(const char* op) {
  return env_switch(op, "PYFINETUNE_KD_CUDA_CAP_REGISTERS", "auto");
}

// What an unset PYFINETUNE_KD_CUDA_PREFETCH / _CAP_REGISTERS means: both on where an H100 measured
// them (gpu-check-20261127-2118: 8192 x 128256 bf16 forward_kl with the gradient, 7.64 -> 5.16 ms,
// within 1e-7 of float64 as before; the whole CUDA kd suite passed with both on): a bfloat16
// student and teacher, no top-k teacher, on the path that caches the row in shared memory (with the
// gradient, or JSD), on sm_90 (Hopper's register file and shared memory, what was measured).
// Elsewhere (float32 / float16, a top-k teacher, the loss alone of forward or reverse KL: no cache,
// so one block per row of up to 512 threads; an A100 or older, Blackwell and later) the default
// kernels, unmeasured.
bool kd_fast_path_auto(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor* indices, int div,
                       bool need_grad) {
  return student.scalar_type() == at::kBFloat16 && teacher.scalar_type() == at::kBFloat16 && indices == nullptr &&
         (need_grad || div == km::kJSD) && at::cuda::getCurrentDeviceProperties()->major == 9;
}

// PYFINETUNE_KD_CUDA_PERSISTENT (read at each call): a grid of only the rows that can be resident
// at once (clusters or blocks, by the occupancy queries), each block or cluster taking every R-th
// row (see kd_loss_kernel), instead of one block or cluster per row. PYFINETUNE_KD_CUDA_L2_PREFETCH
// (with PERSISTENT only): before each row, a block asks L2 for its slice of its next row (one bulk
// prefetch per operand on sm_90). Why: on an H100 the 8192 x 128256 bf16 case ran at 2.57x the time
// of one read of both inputs and one write of the gradient (gpu-check-20261127-2118) with every row
// in one cluster of 8 blocks that first loads, then reduces and writes, so a block's loads stop
// while it reduces; a prefetched next row keeps the bus busy then. The same arithmetic in the same
// order: the same bits. Like CAP_REGISTERS, only the bfloat16 student and teacher kernels without a
// top-k teacher have the variant (the case measured: six more kernels, not forty-eight); other
// dtypes and the top-k teacher ignore both variables. 1: on, 0: off; unset or empty: PERSISTENT off
// (the H200 check of 2026-11-29: 5.47-5.69 ms against the default's 5.05 at 8192 x 128256 bf16),
// L2_PREFETCH on (when PERSISTENT is). Another value is refused before anything is
// written.
std::optional<bool> kd_persistent_setting(const char* op) {
  return env_switch(op, "PYFINETUNE_KD_CUDA_PERSISTENT", "off");
}

std::optional<bool> kd_l2_prefetch_setting(const char* op) {
  return env_switch(op, "PYFINETUNE_KD_CUDA_L2_PREFETCH", "on with PYFINETUNE_KD_CUDA_PERSISTENT=1");
}

// PYFINETUNE_KD_CUDA_SPLIT (experimental, for A/B timing; read at each call): the blocks of one row
// (a cluster), 1, 2, 4, 8 or 16, instead of plan_launch's choice (8 for the 8192 x 128256 bf16
// rows, whose slices then just fit the shared-memory cache). Only on sm_90 code and GPUs (cluster
// launches; elsewhere ignored); 16 is a non-portable cluster size (its occupancy query falls back
// to one block per row where the GPU refuses it). Why: with 8 blocks of 256 threads per row and
// three such blocks per SM (the registers' limit), an SM holds parts of three rows, each first
// loading, then reducing and writing; 16 blocks of 128 threads hold six, more of them loading at
// any moment. Unset or empty: the plan's choice; another value is refused before anything is
// written. Splits other than the plan's sum the row in another order (not the same bits).
int kd_split_setting(const char* op) {
  const char* raw = std::getenv("PYFINETUNE_KD_CUDA_SPLIT");
  if (raw == nullptr || raw[0] == '\0') {
    return 0;
  }
  const std::string v(raw);
  TORCH_CHECK_VALUE(v == "1" || v == "2" || v == "4" || v == "8" || v == "16",
                    check_message("pyfinetune.", op, ": PYFINETUNE_KD_CUDA_SPLIT must be one of 1, 2, 4, 8, 16 (or "
                                  "unset: the launch's choice), got '", v, "'"));
  return std::stoi(v);
}

struct KdLaunchOptions {
  bool cap_registers;
  bool persistent;
  int split;  // kd_split_setting
};

template <typename ST, typename TT, int kDiv, bool kTopK>
void launch_kd_variant(const KdArgs& args, int64_t N, const KdLaunchOptions& opt) {
  if constexpr (std::is_same_v<ST, at::BFloat16> && std::is_same_v<TT, at::BFloat16> && !kTopK) {
    if (opt.persistent && opt.cap_registers) {
      launch_kd<ST, TT, kDiv, kTopK, 3, true>(args, N, opt.split);
    } else if (opt.persistent) {
      launch_kd<ST, TT, kDiv, kTopK, 0, true>(args, N, opt.split);
    } else if (opt.cap_registers) {
      launch_kd<ST, TT, kDiv, kTopK, 3>(args, N, opt.split);
    } else {
      launch_kd<ST, TT, kDiv, kTopK>(args, N, opt.split);
    }
    return;
  }
  launch_kd<ST, TT, kDiv, kTopK>(args, N, opt.split);
}

template <bool kTopK>
void dispatch_kd(const at::Tensor& student, const at::Tensor& teacher, int div, const KdArgs& args, int64_t N,
                 const KdLaunchOptions& opt) {
  PF_KD_DISPATCH(student.scalar_type(), "kd_loss_cuda", [&] {
    using st_t = scalar_t;
    PF_KD_DISPATCH(teacher.scalar_type(), "kd_loss_cuda", [&] {
      using tt_t = scalar_t;
      if (div == km::kForwardKL) {
        launch_kd_variant<st_t, tt_t, km::kForwardKL, kTopK>(args, N, opt);
      } else if (div == km::kJSD) {
        launch_kd_variant<st_t, tt_t, km::kJSD, kTopK>(args, N, opt);
      } else if constexpr (!kTopK) {
        launch_kd_variant<st_t, tt_t, km::kReverseKL, false>(args, N, opt);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> kd_loss_impl(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                                                const at::Tensor* indices, const std::optional<at::Tensor>& labels,
                                                double temperature, double alpha, c10::string_view divergence,
                                                double beta, int64_t ignore_index, bool need_grad,
                                                double grad_scale, bool in_place = false) {
  const int div =
      check_kd_args(op, student, teacher, indices, labels, temperature, alpha, divergence, beta, grad_scale);
  if (in_place) {
    check_kd_loss_inplace_args(student, teacher, labels);
  }
  const std::optional<bool> prefetch_set = kd_prefetch_setting(op);
  const std::optional<bool> cap_set = kd_cap_registers_setting(op);
  const bool persistent = kd_persistent_setting(op).value_or(false);
  const bool l2_prefetch = kd_l2_prefetch_setting(op).value_or(true);
  const int split = kd_split_setting(op);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const bool fast_auto = kd_fast_path_auto(student, teacher, indices, div, need_grad);  // the student's device
  const bool prefetch = prefetch_set.value_or(fast_auto);
  const bool cap_registers = cap_set.value_or(fast_auto);
  const int64_t N = student.size(0);
  const int64_t V = student.size(1);
  at::Tensor loss = at::empty({N}, student.options().dtype(at::kFloat));
  // In place: each block writes the gradient of its own slice only, in the gradient pass, where
  // every element is read (again, or from the cache filled by the same thread) just before it is
  // written; every other read of the row (pass 1, by any thread of the block or its asynchronous
  // copies, and the label's logit) is behind the block and cluster barriers of the reduction.
  at::Tensor grad = in_place ? student
                    : need_grad ? at::empty({N, V}, student.options())
                                : at::empty({0}, student.options());
  if (N == 0) {
    return {loss, grad};
  }
  const bool has_labels = labels.has_value() && labels->defined();
  KdArgs args{};
  args.student = student.const_data_ptr();
  args.teacher = teacher.const_data_ptr();
  args.indices = indices != nullptr ? indices->const_data_ptr<int64_t>() : nullptr;
  args.labels = has_labels ? labels->const_data_ptr<int64_t>() : nullptr;
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.loss = loss.data_ptr<float>();
  args.s_stride = student.stride(0);
  args.t_stride = teacher.stride(0);
  args.t_col_stride = teacher.stride(1);
  args.i_stride = indices != nullptr ? indices->stride(0) : 0;
  args.i_col_stride = indices != nullptr ? indices->stride(1) : 0;
  args.label_stride = has_labels ? labels->stride(0) : 0;
  args.ignore_index = ignore_index;
  args.V = static_cast<int>(V);
  args.k = indices != nullptr ? static_cast<int>(teacher.size(1)) : 0;
  args.need_grad = need_grad;
  args.prefetch = prefetch;
  args.l2_prefetch = persistent && l2_prefetch;
  args.grad_scale = static_cast<float>(grad_scale);
  args.kp = make_kd_params<float>(temperature, alpha, beta, div);
  // On the float temperature, as the CPU kernel decides (small_integer_temperature).
  const float tf = args.kp.temperature;
  args.t_pow = tf == 2.0f ? 2 : (tf == 3.0f ? 3 : (tf == 4.0f ? 4 : 0));
  const KdLaunchOptions opt{cap_registers, persistent, split};
  if (indices != nullptr) {
    dispatch_kd<true>(student, teacher, div, args, N, opt);
  } else {
    dispatch_kd<false>(student, teacher, div, args, N, opt);
  }
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                    const std::optional<at::Tensor>& labels, double temperature,
                                                    double alpha, c10::string_view divergence, double beta,
                                                    int64_t ignore_index, bool need_grad, double grad_scale) {
  return kd_loss_impl("kd_loss_fwd", student, teacher, nullptr, labels, temperature, alpha, divergence, beta,
                      ignore_index, need_grad, grad_scale);
}

at::Tensor kd_loss_fwd_inplace_cuda(at::Tensor& student, const at::Tensor& teacher,
                                    const std::optional<at::Tensor>& labels, double temperature, double alpha,
                                    c10::string_view divergence, double beta, int64_t ignore_index,
                                    double grad_scale) {
  return std::get<0>(kd_loss_impl("kd_loss_fwd_inplace", student, teacher, nullptr, labels, temperature, alpha,
                                   divergence, beta, ignore_index, true, grad_scale, true));
}

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher_values,
                                                         const at::Tensor& teacher_indices,
                                                         const std::optional<at::Tensor>& labels, double temperature,
                                                         double alpha, c10::string_view divergence, double beta,
                                                         int64_t ignore_index, bool need_grad, double grad_scale) {
  return kd_loss_impl("kd_loss_topk_fwd", student, teacher_values, &teacher_indices, labels, temperature, alpha,
                      divergence, beta, ignore_index, need_grad, grad_scale);
}

// ---- _scale_kept_: the backward's scale of a kept gradient, read on the device ---------------------

// g *= *scale in opmath_t, rounded once to scalar_t (the bits of ATen's g.mul_(float)); every block
// returns at once when the scale is exactly 1, so `loss.backward()` of a reduced loss costs a launch
// and no pass. kVec: g is 16-byte aligned and is walked in 16-byte vectors (the last n % VEC
// elements by the first threads of the grid).
template <typename scalar_t, typename opmath_t, bool kVec>
__global__ void __launch_bounds__(256) scale_kept_kernel(scalar_t* __restrict__ g, const opmath_t* __restrict__ scale,
                                                         int64_t n) {
  const opmath_t f = *scale;
  if (f == opmath_t(1)) {
    return;
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  constexpr int VEC = kVec ? 16 / static_cast<int>(sizeof(scalar_t)) : 1;
  const int64_t n_vec = n / VEC;
  for (int64_t v = tid; v < n_vec; v += stride) {
    if constexpr (kVec) {
      uint4 raw = reinterpret_cast<const uint4*>(g)[v];
      scalar_t* x = reinterpret_cast<scalar_t*>(&raw);
      PF_UNROLL
      for (int k = 0; k < VEC; ++k) {
        x[k] = static_cast<scalar_t>(static_cast<opmath_t>(x[k]) * f);
      }
      reinterpret_cast<uint4*>(g)[v] = raw;
    } else {
      g[v] = static_cast<scalar_t>(static_cast<opmath_t>(g[v]) * f);
    }
  }
  for (int64_t i = n_vec * VEC + tid; i < n; i += stride) {
    g[i] = static_cast<scalar_t>(static_cast<opmath_t>(g[i]) * f);
  }
}

template <typename scalar_t, typename opmath_t>
void launch_scale_kept(at::Tensor& grad, const at::Tensor& scale) {
  const int64_t n = grad.numel();
  scalar_t* g = grad.data_ptr<scalar_t>();
  const bool vec = reinterpret_cast<uintptr_t>(g) % 16 == 0;
  const int64_t per_block = 256 * (vec ? 16 / static_cast<int64_t>(sizeof(scalar_t)) : 1);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // A grid-stride loop over at most 8 blocks per SM (a 2048-thread SM's worth of 256-thread blocks):
  // enough 16-byte accesses in flight for the memory system, and few blocks to retire when the
  // scale is 1.
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, 8LL * sms));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const opmath_t* f = scale.const_data_ptr<opmath_t>();
  if (vec) {
    scale_kept_kernel<scalar_t, opmath_t, true><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(g, f, n);
  } else {
    scale_kept_kernel<scalar_t, opmath_t, false><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(g, f, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_kept_cuda(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_kept_args(grad, scale);
  if (grad.numel() == 0) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(grad.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "_scale_kept_", [&] {
    launch_scale_kept<scalar_t, at::opmath_type<scalar_t>>(grad, scale);
  });
}

}  // namespace
}  // namespace pyfinetune

TORCH_LIBRARY_IMPL(pyfinetune, CUDA, m) {
  m.impl("kd_loss_fwd", &pyfinetune::kd_loss_fwd_cuda);
  m.impl("kd_loss_fwd_inplace", &pyfinetune::kd_loss_fwd_inplace_cuda);
  m.impl("kd_loss_topk_fwd", &pyfinetune::kd_loss_topk_fwd_cuda);
  m.impl("_scale_kept_", &pyfinetune::scale_kept_cuda);
}
