// CPU kernels of the fused distillation loss: rows in parallel (at::parallel_for), each row walked
// in tiles of kTile elements that are converted to the math type (float, or double for float64
// input) in a small stack buffer and processed with at::vec::Vectorized.
//
// Row statistics are kept relative to the running maximum of the raw logits (not of logits / T):
// exponents are (x - max) / T, where x - max is exact for the entries that carry probability, so
// the result does not lose precision with logits in the thousands or a small T. Shifting every
// logit of a row by a constant changes no probability, so the shifted statistics feed the shared
// row math of kd_loss_math.h unchanged (lse_s = log sum exp((s - max_s) / T), ...).
//
// Passes over one row (each reads the row from memory or cache once; a tile is reused from L1):
//   1. statistics: max and sum of exp of s / T, t / T and (with labels, T != 1) s, and the
//      weighted sum of the KL cross term; the maxima grow tile by tile and rescale the sums;
//   2. jsd only: S_Q = sum q log(q / m) and S_P = sum p log(p / m) (they need both log-partitions);
//   3. with need_grad: d(row loss)/d(s_i), written in the student's dtype.
// The top-k variant runs passes 1 and 3 over the student alone (the teacher is 0 outside its k
// entries, which makes the gradient there a multiple of q_i) and handles the k teacher entries
// with the scalar functions of the math header.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include <pyfinetune/checks.h>
#include <pyfinetune/cpu_alloc.h>
#include <pyfinetune/dense_pool.h>
#include <pyfinetune/kd_loss.h>
#include <pyfinetune/kd_loss_math.h>

namespace pyfinetune {
namespace {

using at::vec::Vectorized;
using namespace kd_math;

constexpr int64_t kTile = 1024;       // elements per tile: 3 math buffers stay in L1
constexpr int64_t kGrainElems = 32768;  // elements per parallel task

// ------------------------------------------------------------------------------- tile transfer
template <typename T>
void load_tile(const void* src, at::ScalarType dt, int64_t n, int64_t n_pad, T* dst) {
  switch (dt) {
    case at::kFloat:
      at::vec::convert(static_cast<const float*>(src), dst, n);
      break;
    case at::kBFloat16:
      at::vec::convert(static_cast<const c10::BFloat16*>(src), dst, n);
      break;
    case at::kHalf:
      at::vec::convert(static_cast<const c10::Half*>(src), dst, n);
      break;
    case at::kDouble:
      at::vec::convert(static_cast<const double*>(src), dst, n);
      break;
    default:
      TORCH_CHECK(false, "pyfinetune.kd_loss: unexpected dtype ", dt);
  }
  // Padding with -inf gives entries of probability 0, which every formula below ignores.
  for (int64_t i = n; i < n_pad; ++i) {
    dst[i] = neg_inf<T>();
  }
}

template <typename T>
void store_tile(void* dst, at::ScalarType dt, int64_t n, const T* src) {
  switch (dt) {
    case at::kFloat:
      at::vec::convert(src, static_cast<float*>(dst), n);
      break;
    case at::kBFloat16:
      at::vec::convert(src, static_cast<c10::BFloat16*>(dst), n);
      break;
    case at::kHalf:
      at::vec::convert(src, static_cast<c10::Half*>(dst), n);
      break;
    case at::kDouble:
      at::vec::convert(src, static_cast<double*>(dst), n);
      break;
    default:
      TORCH_CHECK(false, "pyfinetune.kd_loss: unexpected dtype ", dt);
  }
}

template <typename T>
T load_scalar(const void* base, at::ScalarType dt, int64_t i) {
  switch (dt) {
    case at::kFloat:
      return static_cast<T>(static_cast<const float*>(base)[i]);
    case at::kBFloat16:
      return static_cast<T>(static_cast<const c10::BFloat16*>(base)[i]);
    case at::kHalf:
      return static_cast<T>(static_cast<const c10::Half*>(base)[i]);
    default:
      return static_cast<T>(static_cast<const double*>(base)[i]);
  }
}

template <typename T>
void store_scalar(void* base, at::ScalarType dt, int64_t i, T v) {
  switch (dt) {
    case at::kFloat:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      break;
    case at::kBFloat16:
      static_cast<c10::BFloat16*>(base)[i] = static_cast<c10::BFloat16>(static_cast<float>(v));
      break;
    case at::kHalf:
      static_cast<c10::Half*>(base)[i] = static_cast<c10::Half>(static_cast<float>(v));
      break;
    default:
      static_cast<double*>(base)[i] = static_cast<double>(v);
  }
}

// A logit row: base pointer and dtype.
struct RowRef {
  const char* ptr;
  at::ScalarType dt;
  int64_t esize;
  const void* at(int64_t j) const { return ptr + j * esize; }
};

template <typename T>
T hmax(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vectorized<T>& a, const Vectorized<T>& b) { return at::vec::maximum(a, b); },
                                    v);
}

template <typename T>
T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, v);
}

template <typename T>
T tile_max(const T* x, int64_t n_pad) {
  using Vec = Vectorized<T>;
  Vec m(neg_inf<T>());
  for (int64_t i = 0; i < n_pad; i += Vec::size()) {
    m = at::vec::maximum(m, Vec::loadu(x + i));
  }
  return hmax(m);
}

// exp for the row passes. float: the inline polynomial exp_u20 (<= 20 ulp, ~1e-6 relative, far
// inside the tolerances; Sleef's 1-ulp exp is an out-of-line call and was the kernels' main cost);
// double keeps the accurate exp (gradcheck).
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// 0 where `e` (an exponential, >= 0) is 0, else x: the 0 * log 0 = 0 convention, vectorized.
template <typename T>
Vectorized<T> zero_where_zero(const Vectorized<T>& e, const Vectorized<T>& x) {
  return Vectorized<T>::blendv(x, Vectorized<T>(T(0)), e == Vectorized<T>(T(0)));
}

// Running maximum of a row's raw logits. `safe` is the value subtracted in exponents: 0 while the
// row has seen only -inf, so that -inf - safe = -inf (exp 0) rather than NaN.
template <typename T>
T safe_of(T max) {
  return max == neg_inf<T>() ? T(0) : max;
}

template <typename T>
struct RunningMax {
  T max = neg_inf<T>();
  T safe() const { return safe_of(max); }
};

// The offset jsd log-ratios u, v, vectorized (jsd_offset_log_ratios of the header).
template <typename T>
void vec_jsd_uv(const KdParams<T>& k, const Vectorized<T>& log_p, const Vectorized<T>& log_q, Vectorized<T>& u,
                Vectorized<T>* v) {
  using Vec = Vectorized<T>;
  // x * -1 rather than -x: at::vec::Vectorized has no unary minus before torch 2.5 (same bits).
  const Vec minus_one(T(-1));
  const Vec d = (log_p - log_q) + Vec(k.log_beta - k.log_one_minus_beta);
  const Vec l1 = vexp(d.abs() * minus_one).log1p();
  u = at::vec::maximum(d, Vec(T(0))) * minus_one - l1;
  if (v) {
    *v = at::vec::minimum(d, Vec(T(0))) - l1;
  }
}

// ------------------------------------------------------------------------------- one dense row
// Per-call constants of the dense and top-k kernels.
template <typename T>
struct CallCtx {
  KdParams<T> k;
  bool has_labels;
  bool need_grad;
  int64_t V;
  bool t_is_one;  // T == 1: the CE statistics equal those of s / T
  // T in {2, 3, 4} (exactly): exp(x) = exp(x / T)^T, so the CE exponential of an element is a power
  // of its exponential at T instead of another exponential (0 for other temperatures).
  int t_pow;
  // forward_kl / reverse_kl at T >= kGapMinTemperature: pass 1 also sums the terms of the
  // log-partition gap (Stats::gap_sum, see kd_gap), and D is taken from it.
  bool gap = false;
};

// From this temperature on, forward_kl / reverse_kl take D = cross + log1p(gap_sum / Z) (kd_gap)
// instead of cross - lse_t + lse_s (forward; the converse for reverse): the two log-partitions are
// O(log V) each while D is O(1 / T^2) for distributions that differ by O(1) logits, so their
// difference lost D to float32 cancellation as T grew, and the loss multiplies D by T^2. Worst row
// error against float64 inputs, `python benchmarks/kd_precision.py` (results/kd-precision-cpu-*):
// 1.4e-5 / 2.4e-5 / 4.6e-4 at T = 4 / 10 / 100, where torch's float32 composition, which shares the
// old form's cancellation, has 1.4e-4 / 1.8e-3 / 0.21; within 1e-3 with teacher offsets up to 1000,
// zero teacher probabilities and late row maxima (tests/test_kd_loss.py). The gap terms cost ~25% of
// a 1024 x 32000 forward + backward (an ad hoc timing with the form forced at T = 2 on the 2-core CI
// machine), so T = 1 to 3, where the old form's error stays within ~1e-4, keep the old form.
constexpr double kGapMinTemperature = 4.0;

// expm1 of each lane for |x| < 0.5 (other lanes: any value; the caller blends them out), where
// exp(x) - 1 would cancel. float: a Taylor polynomial to x^9 / 9! (the first omitted term is
// 2.7e-10 of x at |x| = 0.5; within 1.5 ulp over the range); double: Sleef's expm1.
template <typename T>
inline Vectorized<T> expm1_small(const Vectorized<T>& x) {
  using Vec = Vectorized<T>;
  if constexpr (std::is_same_v<T, float>) {
    Vec p(T(1.0 / 362880));
    for (const double c : {1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0}) {
      p = at::vec::fmadd(p, x, Vec(static_cast<T>(c)));
    }
    return p * x;
  } else {
    return x.expm1();
  }
}

// The integer power n in {2, 3, 4} of x (CallCtx::t_pow).
template <typename V>
inline V pow_small(const V& x, int n) {
  const V x2 = x * x;
  return n == 2 ? x2 : (n == 3 ? x2 * x : x2 * x2);
}

template <typename T>
int small_integer_temperature(T temperature) {
  for (int n = 2; n <= 4; ++n) {
    if (temperature == static_cast<T>(n)) {
      return n;
    }
  }
  return 0;
}

// Pass 1 over the student (and the teacher when `t` is non-null).
template <typename T>
struct Stats {
  RunningMax<T> ms, mt;
  T sum_s = 0, sum_t = 0, sum_1 = 0, wsum = 0;  // relative to ms.safe(), mt.safe()
  // CallCtx::gap: forward sum_s - sum_t, reverse sum_t - sum_s, summed element by element without
  // cancellation (see gap_terms and kd_gap).
  T gap_sum = 0;
};

// The exponentials of pass 1 kept for the gradient pass (forward_kl / reverse_kl with a gradient):
// per element exp((s - ms') / T), exp((t - mt') / T) and, for CE at T != 1, exp(s - ms'), where
// ms', mt' are the running maxima when the element's tile was read (kept per tile). The gradient
// pass then turns them into probabilities with one multiplication per tile factor, and needs no
// exponential of its own: half the transcendental work of the kernel. Streams of `stride`
// elements (V rounded up to the vector width), in a per-thread buffer that stays in L2.
template <typename T>
struct ExpCache {
  T* es = nullptr;  // nullptr: no cache
  T* et = nullptr;
  T* e1 = nullptr;  // nullptr unless CE at T != 1 is needed
  T* tile_ms = nullptr;
  T* tile_mt = nullptr;
};

// The gap sum's terms (CallCtx::gap), forward_kl: e_s - e_t per element (their sums are sum_s and
// sum_t), where x = (xs - xt) / T = log(e_s / e_t): as e_t expm1(x) where |x| < 0.5 (e_s and e_t
// within 40% of each other, where e_s - e_t would cancel), else as e_s - e_t (at most ~4 ulp of
// error there; also e_t = 0: a teacher probability of 0, whose student term e_s still counts, and
// the padding, 0 - 0). reverse_kl: the same with the roles of s and t exchanged.
template <typename T>
inline Vectorized<T> gap_terms(const Vectorized<T>& e_num, const Vectorized<T>& e_den, const Vectorized<T>& x) {
  using Vec = Vectorized<T>;
  const Vec close = (x.abs() < Vec(T(0.5))) & (e_den != Vec(T(0)));  // all-ones lanes where true
  const Vec direct = e_num - e_den;
  if (close.zero_mask() == (1 << Vec::size()) - 1) {
    return direct;  // no lane is close: no polynomial
  }
  return Vec::blendv(direct, e_den * expm1_small(x), close);
}

template <typename T>
Stats<T> stats_pass(const CallCtx<T>& c, const RowRef& s, const RowRef* t, T* fs, T* ft,
                    const ExpCache<T>& cache = ExpCache<T>{}) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T invT = c.k.inv_temperature;
  const bool need_1 = c.has_labels && !c.t_is_one;
  const int div = t ? c.k.divergence : -1;
  Stats<T> st;
  Vec vs(T(0)), vt(T(0)), v1(T(0)), vw(T(0)), vg(T(0));
  const bool gap = t && c.gap && (div == kForwardKL || div == kReverseKL);
  for (int64_t j0 = 0; j0 < c.V; j0 += kTile) {
    const int64_t n = std::min(kTile, c.V - j0);
    const int64_t np = (n + W - 1) / W * W;
    load_tile(s.at(j0), s.dt, n, np, fs);
    const T tms = tile_max(fs, np);
    T tmt = neg_inf<T>();
    if (t) {
      load_tile(t->at(j0), t->dt, n, np, ft);
      tmt = tile_max(ft, np);
    }
    // Grow the running maxima once per tile and rescale what was summed so far.
    const bool grow_s = tms > st.ms.max, grow_t = tmt > st.mt.max;
    if (grow_s || grow_t) {
      const T old_s = st.ms.max, old_t = st.mt.max;
      const T new_s = grow_s ? tms : old_s, new_t = grow_t ? tmt : old_t;
      const T rs = old_s == neg_inf<T>() ? T(0) : kd_exp((old_s - new_s) * invT);
      const T r1 = old_s == neg_inf<T>() ? T(0) : kd_exp(old_s - new_s);
      const T rt = old_t == neg_inf<T>() ? T(0) : kd_exp((old_t - new_t) * invT);
      if (div == kForwardKL || div == kReverseKL) {
        // The cross-term weights are (t - mt) - (s - ms) (forward) or the opposite (reverse), with
        // the safe maxima: moving them shifts every weight summed so far by the same amount.
        // A factor of 0 drops the terms summed so far (their probabilities are now exactly 0, and
        // their weights may be infinite: a student -inf where the teacher was finite), as the
        // scalar kd_math::rescaled does; inf * 0 made the row NaN only when such terms filled a
        // tile before the maximum grew.
        const T shift = (safe_of(old_t) - safe_of(new_t)) - (safe_of(old_s) - safe_of(new_s));
        if (div == kForwardKL) {
          vw = rt != T(0) ? (vw + vt * Vec(shift)) * Vec(rt) : Vec(T(0));
        } else {
          vw = rs != T(0) ? (vw - vs * Vec(shift)) * Vec(rs) : Vec(T(0));
        }
        if (gap) {
          // forward: G = sum_s - sum_t grows to rs sum_s - rt sum_t = rs G + (rs - rt) sum_t, with
          // rs - rt = rt expm1(log(rs / rt)) where both are positive (no cancellation); reverse the
          // converse. The old sum_t / sum_s are vt / vs, rescaled below.
          const bool fwd = div == kForwardKL;
          const T lr = ((old_s - new_s) - (old_t - new_t)) * invT;  // log(rs / rt) where both > 0
          T b;
          if (rs == T(0) || rt == T(0)) {
            b = fwd ? rs - rt : rt - rs;
          } else {
            b = fwd ? rt * std::expm1(lr) : rs * std::expm1(-lr);
          }
          vg = fwd ? vg * Vec(rs) + vt * Vec(b) : vg * Vec(rt) + vs * Vec(b);
        }
      }
      vs = vs * Vec(rs);
      v1 = v1 * Vec(r1);
      vt = vt * Vec(rt);
      st.ms.max = new_s;
      st.mt.max = new_t;
    }
    const Vec ms(st.ms.safe()), mt(st.mt.safe()), inv(invT);
    if (cache.es) {
      // The running maxima themselves: -inf while every logit so far is -inf, when the tile's
      // exponentials (taken against safe() = 0) are all 0 and its factors must be 0 too, not
      // exp(0 - ms), which overflows for a row maximum below about -88 T.
      cache.tile_ms[j0 / kTile] = st.ms.max;
      cache.tile_mt[j0 / kTile] = st.mt.max;
    }
    for (int64_t i = 0; i < np; i += W) {
      const Vec xs = Vec::loadu(fs + i) - ms;
      const Vec es = vexp(xs * inv);
      vs = vs + es;
      if (need_1) {
        const Vec e1 = c.t_pow ? pow_small(es, c.t_pow) : vexp(xs);
        v1 = v1 + e1;
        if (cache.e1) {
          e1.store(cache.e1 + j0 + i);
        }
      }
      if (cache.es) {
        es.store(cache.es + j0 + i);
      }
      if (t) {
        const Vec xt = Vec::loadu(ft + i) - mt;
        const Vec et = vexp(xt * inv);
        vt = vt + et;
        if (cache.et) {
          et.store(cache.et + j0 + i);
        }
        if (div == kForwardKL) {
          vw = vw + zero_where_zero(et, et * (xt - xs));
        } else if (div == kReverseKL) {
          vw = vw + zero_where_zero(es, es * (xs - xt));
        }
        if (gap) {
          vg = vg + (div == kForwardKL ? gap_terms(es, et, (xs - xt) * inv) : gap_terms(et, es, (xt - xs) * inv));
        }
      }
    }
  }
  st.sum_s = hsum(vs);
  st.sum_t = hsum(vt);
  st.sum_1 = c.t_is_one ? st.sum_s : hsum(v1);
  st.wsum = hsum(vw);
  st.gap_sum = gap ? hsum(vg) : T(0);
  return st;
}

// D of a forward_kl / reverse_kl row from pass 1's gap sum (CallCtx::gap). With the sums relative
// to the row maxima (ms, mt) and x_i = (s_i - ms) - (t_i - mt), forward_kl:
//   D = cross - lse_t + lse_s = cross + log(sum_s / sum_t) = cross + log1p(gap_sum / sum_t),
// gap_sum = sum_s - sum_t summed element by element (gap_terms): when student and teacher differ by
// little more than a constant, each e_s,i - e_t,i is small and computed without cancellation, so D
// (O(1 / T^2) there) keeps float32 precision relative to |cross|, where the difference of the two
// O(log V) log-partitions lost it. reverse_kl: the same with s and t exchanged. Where the ratio is
// outside [-0.5, 1] the log-partitions differ by more than log 2, D is no small difference of large
// numbers, and the row statistics' form is returned (also for an infinite or NaN cross term or sum).
template <typename T>
T kd_gap(const KdParams<T>& k, const Stats<T>& raw, const KdRowStats<T>& st) {
  const T z = k.divergence == kForwardKL ? raw.sum_t : raw.sum_s;
  const T ratio = raw.gap_sum / z;
  if (!(std::abs(st.cross) < std::numeric_limits<T>::infinity()) || !(ratio >= T(-0.5)) || !(ratio <= T(1))) {
    return divergence_value(k, st);
  }
  return st.cross + kd_log1p(ratio);
}

// jsd pass: S_Q = sum q log(q / m), S_P = sum p log(p / m).
template <typename T>
T jsd_pass(const CallCtx<T>& c, const RowRef& s, const RowRef& t, const Stats<T>& raw, KdRowStats<T>& st, T* fs,
           T* ft) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec ms(raw.ms.safe()), mt(raw.mt.safe()), inv(c.k.inv_temperature), lse_s(st.lse_s), lse_t(st.lse_t);
  const Vec vb(c.k.beta), v1b(T(1) - c.k.beta), vlb(c.k.log_beta), vl1b(c.k.log_one_minus_beta);
  Vec sq(T(0)), sp(T(0)), sd(T(0));
  for (int64_t j0 = 0; j0 < c.V; j0 += kTile) {
    const int64_t n = std::min(kTile, c.V - j0);
    const int64_t np = (n + W - 1) / W * W;
    load_tile(s.at(j0), s.dt, n, np, fs);
    load_tile(t.at(j0), t.dt, n, np, ft);
    for (int64_t i = 0; i < np; i += W) {
      const Vec log_q = (Vec::loadu(fs + i) - ms) * inv - lse_s;
      const Vec log_p = (Vec::loadu(ft + i) - mt) * inv - lse_t;
      Vec u, v;
      vec_jsd_uv(c.k, log_p, log_q, u, &v);
      const Vec q = vexp(log_q), p = vexp(log_p);
      const Vec qu = zero_where_zero(q, q * u), pv = zero_where_zero(p, p * v);
      sq = sq + qu;
      sp = sp + pv;
      // The divergence summed element by element: each term is second order in p - q, so the
      // sum keeps its precision where D is tiny (large T); b S_P + (1 - b) S_Q from the sums
      // above would cancel O(1) numbers.
      sd = sd + vb * (pv - zero_where_zero(p, p * vlb)) + v1b * (qu - zero_where_zero(q, q * vl1b));
    }
  }
  st.jsd_s = hsum(sq);
  st.jsd_p = hsum(sp);
  return hsum(sd);
}

// Gradient pass. With `t` null (top-k), the teacher is taken as 0 everywhere and the gradient is
// c_q * q + w_ce * (softmax(s) - onehot); the caller then rewrites the teacher's k entries.
template <typename T>
void grad_pass(const CallCtx<T>& c, const RowRef& s, const RowRef* t, const Stats<T>& raw, const KdRowStats<T>& st,
               const KdRowWeights<T>& w, T d_value, T c_q, int64_t label, void* grad, at::ScalarType grad_dt, T* fs,
               T* ft, T* fg) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec ms(raw.ms.safe()), mt(raw.mt.safe()), inv(c.k.inv_temperature), lse_s(st.lse_s), lse_t(st.lse_t),
      lse_1(st.lse_s1);
  const Vec ckd(w.kd * c.k.inv_temperature), wce(w.ce), dval(d_value), sq(st.jsd_s), cq(c_q),
      one_m_beta(T(1) - c.k.beta);
  // With an integer T: exp(xs - lse_1) = q^T exp(T lse_s - lse_1), and 1 <= exp(T lse_s - lse_1) <=
  // V^(T-1) (power means), so nothing overflows; an entry whose q^T underflows comes out 0 where it
  // is below V^(T-1) times the smallest float (1e-30 at V = 128256, T = 4), and q's rounding grows
  // T-fold (a few ulps of the CE term).
  const Vec wce_pow(c.t_pow ? w.ce * kd_exp(static_cast<T>(c.t_pow) * st.lse_s - st.lse_s1) : T(0));
  const bool with_kd = w.kd != T(0), with_ce = w.ce != T(0);
  const int div = c.k.divergence;
  const int64_t gsize = c10::elementSize(grad_dt);
  for (int64_t j0 = 0; j0 < c.V; j0 += kTile) {
    const int64_t n = std::min(kTile, c.V - j0);
    const int64_t np = (n + W - 1) / W * W;
    load_tile(s.at(j0), s.dt, n, np, fs);
    if (t && with_kd) {
      load_tile(t->at(j0), t->dt, n, np, ft);
    }
    for (int64_t i = 0; i < np; i += W) {
      const Vec xs = Vec::loadu(fs + i) - ms;
      const Vec log_q = xs * inv - lse_s;
      const Vec q = vexp(log_q);
      Vec g(T(0));
      if (with_kd) {
        if (!t) {
          g = cq * q;
        } else {
          const Vec log_p = (Vec::loadu(ft + i) - mt) * inv - lse_t;
          if (div == kForwardKL) {
            g = ckd * (q - vexp(log_p));
          } else if (div == kReverseKL) {
            g = ckd * zero_where_zero(q, q * (log_q - log_p - dval));
          } else {
            Vec u;
            vec_jsd_uv<T>(c.k, log_p, log_q, u, nullptr);
            g = ckd * one_m_beta * zero_where_zero(q, q * (u - sq));
          }
        }
      }
      if (with_ce) {
        if (c.t_is_one) {
          g = g + wce * q;
        } else if (c.t_pow) {
          g = g + wce_pow * pow_small(q, c.t_pow);
        } else {
          g = g + wce * vexp(xs - lse_1);
        }
      }
      g.store(fg + i);
    }
    if (with_ce && label >= j0 && label < j0 + n) {
      fg[label - j0] -= w.ce;
    }
    store_tile(static_cast<void*>(static_cast<char*>(grad) + j0 * gsize), grad_dt, n, static_cast<const T*>(fg));
  }
}

// Gradient pass from the exponentials of pass 1 (forward_kl and reverse_kl, dense teacher):
// q = es * exp((ms' - ms) / T - lse_s) with ms' the tile's maximum at pass 1, and the same for p
// and the CE softmax. reverse_kl also needs log q - log p, which is linear in the raw logits, so it
// re-reads s and t (from cache) but still computes no exponential.
template <typename T>
void grad_pass_cached(const CallCtx<T>& c, const RowRef& s, const RowRef& t, const Stats<T>& raw,
                      const KdRowStats<T>& st, const KdRowWeights<T>& w, T d_value, int64_t label, void* grad,
                      at::ScalarType grad_dt, const ExpCache<T>& cache, T* fs, T* ft, T* fg) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T invT = c.k.inv_temperature;
  const T ms = raw.ms.safe(), mt = raw.mt.safe();
  const bool with_kd = w.kd != T(0), with_ce = w.ce != T(0);
  const bool reverse = c.k.divergence == kReverseKL;
  const T ckd = w.kd * invT;
  const Vec vms(ms), vmt(mt), inv(invT), lse_s(st.lse_s), lse_t(st.lse_t), dval(d_value);
  const int64_t gsize = c10::elementSize(grad_dt);
  for (int64_t j0 = 0; j0 < c.V; j0 += kTile) {
    const int64_t n = std::min(kTile, c.V - j0);
    const int64_t np = (n + W - 1) / W * W;
    const int64_t tile = j0 / kTile;
    // Per-tile factors that turn the cached exponentials into probabilities.
    const T tms = cache.tile_ms[tile], tmt = cache.tile_mt[tile];
    const bool s_none = tms == neg_inf<T>(), t_none = tmt == neg_inf<T>();  // no finite logit up to here
    const T fq = s_none ? T(0) : kd_exp((tms - ms) * invT - st.lse_s);
    const T fp = t_none ? T(0) : kd_exp((tmt - mt) * invT - st.lse_t);
    // the CE exponentials relative to the tile's maximum: cached (e1), or es^T (t_pow), or es (T = 1)
    const T f1 = cache.e1 || c.t_pow ? (s_none ? T(0) : kd_exp((tms - ms) - st.lse_s1)) : fq;
    const Vec vq(fq), vkd_q(ckd * fq), vkd_p(ckd * fp), vce(w.ce * f1);
    const T* e1 = cache.e1 ? cache.e1 : cache.es;
    if (reverse && with_kd) {
      load_tile(s.at(j0), s.dt, n, np, fs);
      load_tile(t.at(j0), t.dt, n, np, ft);
    }
    for (int64_t i = 0; i < np; i += W) {
      Vec g(T(0));
      if (with_kd) {
        const Vec es = Vec::loadu(cache.es + j0 + i);
        if (!reverse) {
          g = vkd_q * es - vkd_p * Vec::loadu(cache.et + j0 + i);
        } else {
          const Vec q = vq * es;
          const Vec log_q = (Vec::loadu(fs + i) - vms) * inv - lse_s;
          const Vec log_p = (Vec::loadu(ft + i) - vmt) * inv - lse_t;
          g = Vec(ckd) * zero_where_zero(q, q * (log_q - log_p - dval));
        }
      }
      if (with_ce) {
        const Vec e1v = c.t_pow ? pow_small(Vec::loadu(cache.es + j0 + i), c.t_pow) : Vec::loadu(e1 + j0 + i);
        g = g + vce * e1v;
      }
      g.store(fg + i);
    }
    if (with_ce && label >= j0 && label < j0 + n) {
      fg[label - j0] -= w.ce;
    }
    store_tile(static_cast<void*>(static_cast<char*>(grad) + j0 * gsize), grad_dt, n, static_cast<const T*>(fg));
  }
}

// Fill the shifted row statistics of the header from the raw sums.
template <typename T>
KdRowStats<T> row_stats(const Stats<T>& raw, bool with_teacher) {
  KdRowStats<T> st;
  st.lse_s = kd_log(raw.sum_s);
  st.lse_t = with_teacher ? kd_log(raw.sum_t) : T(0);
  st.lse_s1 = kd_log(raw.sum_1);
  st.cross = T(0);
  st.jsd_s = T(0);
  st.jsd_p = T(0);
  return st;
}

int64_t row_label(const int64_t* labels, int64_t stride, int64_t i) { return labels ? labels[i * stride] : -1; }

void check_label_values(const char* op, const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  const int64_t* p = labels.const_data_ptr<int64_t>();
  const int64_t st = labels.stride(0);
  for (int64_t i = 0; i < labels.size(0); ++i) {
    const int64_t y = p[i * st];
    PF_CHECK(y == ignore_index || (y >= 0 && y < V), op, "labels[", i, "] = ", y, " is outside [0, V = ", V,
             ") and is not ignore_index (", ignore_index, ")");
  }
}

template <typename T>
void alloc_row_buffers(T*& fs, T*& ft, T*& fg, T* storage) {
  fs = storage;
  ft = storage + kTile;
  fg = storage + 2 * kTile;
}

// ------------------------------------------------------------------------------- dense kernel
template <typename T>
void kd_dense_kernel(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor* labels,
                     const KdParams<T>& k, int64_t ignore_index, bool need_grad, T grad_scale, at::Tensor& loss,
                     at::Tensor& grad) {
  const int64_t N = student.size(0), V = student.size(1);
  CallCtx<T> c{k, labels != nullptr, need_grad, V, k.temperature == T(1), small_integer_temperature(k.temperature)};
  // (not when the divergence has no weight: alpha = 0 with labels leaves the CE term alone)
  c.gap = (k.divergence == kForwardKL || k.divergence == kReverseKL) &&
          static_cast<double>(k.temperature) >= kGapMinTemperature && (labels == nullptr || k.alpha != T(0));
  const char* s_base = static_cast<const char*>(student.const_data_ptr());
  const char* t_base = static_cast<const char*>(teacher.const_data_ptr());
  const at::ScalarType s_dt = student.scalar_type(), t_dt = teacher.scalar_type();
  const int64_t s_es = c10::elementSize(s_dt), t_es = c10::elementSize(t_dt);
  const int64_t s_rs = student.stride(0), t_rs = teacher.stride(0);
  const int64_t* lab = labels ? labels->const_data_ptr<int64_t>() : nullptr;
  const int64_t lab_st = labels ? labels->stride(0) : 0;
  T* loss_p = loss.data_ptr<T>();
  char* grad_p = need_grad ? static_cast<char*>(grad.data_ptr()) : nullptr;
  const int64_t g_es = c10::elementSize(s_dt);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / V);

  const bool use_cache = need_grad && (k.divergence == kForwardKL || k.divergence == kReverseKL);
  const bool cache_e1 = use_cache && labels != nullptr && !c.t_is_one && c.t_pow == 0 && k.alpha != T(1);
  const int64_t W = Vectorized<T>::size();
  const int64_t stride = (V + W - 1) / W * W;
  const int64_t n_tiles = (V + kTile - 1) / kTile;

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    alignas(64) T buf[3 * kTile];
    T *fs, *ft, *fg;
    alloc_row_buffers(fs, ft, fg, buf);
    std::vector<T> cache_buf;
    ExpCache<T> cache;
    if (use_cache) {
      cache_buf.resize(static_cast<size_t>((cache_e1 ? 3 : 2) * stride + 2 * n_tiles));
      cache.es = cache_buf.data();
      cache.et = cache.es + stride;
      cache.e1 = cache_e1 ? cache.et + stride : nullptr;
      cache.tile_ms = cache.es + (cache_e1 ? 3 : 2) * stride;
      cache.tile_mt = cache.tile_ms + n_tiles;
    }
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = row_label(lab, lab_st, r);
      const bool ignored = lab && label == ignore_index;
      void* grow = grad_p ? grad_p + r * V * g_es : nullptr;
      if (ignored) {
        loss_p[r] = T(0);
        if (grow) {
          std::memset(grow, 0, V * g_es);
        }
        continue;
      }
      const RowRef s{s_base + r * s_rs * s_es, s_dt, s_es};
      const RowRef t{t_base + r * t_rs * t_es, t_dt, t_es};
      const Stats<T> raw = stats_pass(c, s, &t, fs, ft, grow ? cache : ExpCache<T>{});
      KdRowStats<T> st = row_stats(raw, true);
      if (k.divergence == kForwardKL) {
        st.cross = raw.wsum / raw.sum_t * k.inv_temperature;
      } else if (k.divergence == kReverseKL) {
        st.cross = raw.wsum / raw.sum_s * k.inv_temperature;
      }
      const KdRowWeights<T> w = row_weights(k, c.has_labels, false);
      T direct = T(0);  // D by a more precise route than the row statistics: jsd, or the KL gap form
      if (k.divergence == kJSD && w.kd != T(0)) {
        direct = jsd_pass(c, s, t, raw, st, fs, ft);
      } else if (c.gap && w.kd != T(0)) {
        direct = kd_gap(k, raw, st);
      }
      const bool use_direct = k.divergence == kJSD || c.gap;
      const T s_label = c.has_labels ? load_scalar<T>(s.ptr, s_dt, label) - raw.ms.safe() : T(0);
      if (use_direct) {
        // row_loss with the element-wise jsd value or the gap form of KL (see jsd_pass, kd_gap).
        KdRowWeights<T> w_ce = w;
        w_ce.kd = T(0);
        loss_p[r] = w.kd * direct + row_loss(k, st, w_ce, s_label);
      } else {
        loss_p[r] = row_loss(k, st, w, s_label);
      }
      if (grow) {
        // The gradient keeps the row statistics' D even where the loss took the gap form: reverse_kl's
        // gradient q_i (log q_i - log p_i - D) takes its log-ratios from the same log-partitions, so
        // their rounding cancels there (the gap form's D gave 8.6e-3 of error at T = 100 in
        // test_large_logits).
        const T d = w.kd != T(0) ? divergence_value(k, st) : T(0);
        const KdRowWeights<T> wg = gradient_weights(w, loss_p[r], grad_scale);
        if (use_cache) {
          grad_pass_cached(c, s, t, raw, st, wg, d, c.has_labels ? label : -1, grow, s_dt, cache, fs, ft, fg);
        } else {
          grad_pass(c, s, &t, raw, st, wg, d, T(0), c.has_labels ? label : -1, grow, s_dt, fs, ft, fg);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------- top-k kernel
template <typename T>
void kd_topk_kernel(const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices,
                    const at::Tensor* labels, const KdParams<T>& k, int64_t ignore_index, bool need_grad,
                    T grad_scale, at::Tensor& loss, at::Tensor& grad) {
  const int64_t N = student.size(0), V = student.size(1), K = values.size(1);
  CallCtx<T> c{k, labels != nullptr, need_grad, V, k.temperature == T(1), small_integer_temperature(k.temperature)};
  const char* s_base = static_cast<const char*>(student.const_data_ptr());
  const char* v_base = static_cast<const char*>(values.const_data_ptr());
  const at::ScalarType s_dt = student.scalar_type(), v_dt = values.scalar_type();
  const int64_t s_es = c10::elementSize(s_dt), v_es = c10::elementSize(v_dt);
  const int64_t s_rs = student.stride(0), v_rs = values.stride(0);
  const int64_t* idx_p = indices.const_data_ptr<int64_t>();
  const int64_t i_rs = indices.stride(0), i_cs = indices.stride(1);
  const int64_t* lab = labels ? labels->const_data_ptr<int64_t>() : nullptr;
  const int64_t lab_st = labels ? labels->stride(0) : 0;
  T* loss_p = loss.data_ptr<T>();
  char* grad_p = need_grad ? static_cast<char*>(grad.data_ptr()) : nullptr;
  const int64_t g_es = c10::elementSize(s_dt);
  const int64_t grain = std::max<int64_t>(1, kGrainElems / V);

  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    alignas(64) T buf[3 * kTile];
    T *fs, *ft, *fg;
    alloc_row_buffers(fs, ft, fg, buf);
    std::vector<T> tv(K), sv(K);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = row_label(lab, lab_st, r);
      const bool ignored = lab && label == ignore_index;
      void* grow = grad_p ? grad_p + r * V * g_es : nullptr;
      if (ignored) {
        loss_p[r] = T(0);
        if (grow) {
          std::memset(grow, 0, V * g_es);
        }
        continue;
      }
      const RowRef s{s_base + r * s_rs * s_es, s_dt, s_es};
      const Stats<T> raw = stats_pass<T>(c, s, nullptr, fs, ft);
      KdRowStats<T> st = row_stats(raw, false);
      const T ms = raw.ms.safe();
      // The teacher's k entries, shifted by their maximum; the student's values at them.
      const int64_t* idx = idx_p + r * i_rs;
      T mt = neg_inf<T>();
      for (int64_t j = 0; j < K; ++j) {
        tv[j] = load_scalar<T>(v_base + r * v_rs * v_es, v_dt, j);
        sv[j] = load_scalar<T>(s.ptr, s_dt, idx[j * i_cs]) - ms;
        mt = std::max(mt, tv[j]);
      }
      const T mt_safe = mt == neg_inf<T>() ? T(0) : mt;
      OnlineLse<T> acc;  // over t / T with the forward-KL weight (t - s) / T
      for (int64_t j = 0; j < K; ++j) {
        tv[j] -= mt_safe;
        acc.add(tv[j] * k.inv_temperature, (tv[j] - sv[j]) * k.inv_temperature);
      }
      st.lse_t = acc.lse();
      const KdRowWeights<T> w = row_weights(k, c.has_labels, false);
      T c_q = T(0);
      if (k.divergence == kForwardKL) {
        st.cross = acc.mean_w();
        c_q = w.kd * k.inv_temperature;
      } else {
        // jsd: outside the top-k p = 0, m = (1 - beta) q and u = 0, so only the k entries add to
        // the sums, and the gradient there is (1 - beta) q (0 - jsd_s) w_kd / T.
        T sq = T(0), sp = T(0);
        for (int64_t j = 0; j < K; ++j) {
          jsd_accumulate(k, sv[j], tv[j], st.lse_s, st.lse_t, sq, sp);
        }
        st.jsd_s = sq;
        st.jsd_p = sp;
        c_q = -w.kd * k.inv_temperature * (T(1) - k.beta) * st.jsd_s;
      }
      const T s_label = c.has_labels ? load_scalar<T>(s.ptr, s_dt, label) - ms : T(0);
      loss_p[r] = row_loss(k, st, w, s_label);
      if (grow) {
        const T d = divergence_value(k, st);
        const KdRowWeights<T> wg = gradient_weights(w, loss_p[r], grad_scale);
        const T cq = wg.kd != wg.kd ? wg.kd : c_q * grad_scale;  // NaN with the row's loss
        grad_pass<T>(c, s, nullptr, raw, st, wg, d, cq, c.has_labels ? label : -1, grow, s_dt, fs, ft, fg);
        for (int64_t j = 0; j < K; ++j) {
          const int64_t col = idx[j * i_cs];
          store_scalar<T>(grow, s_dt, col, grad_element(k, st, wg, d, sv[j], tv[j], c.has_labels && col == label));
        }
      }
    }
  });
}

// The kept gradient is a logits-sized tensor made on every call and usually freed before the next
// (handed on as the student's .grad, then zeroed to None): from 1 MiB on it comes from the block
// pool (dense_pool.h), whose reused blocks need no page faults. A fresh 131 MB buffer (1024 x 32000
// fp32) cost 0 to 40 ms of faults per call, by whether the kernel found huge pages: the forward +
// backward's median was 35 ms or 50 ms from one run to the next.
std::tuple<at::Tensor, at::Tensor> make_outputs(const char* op, const at::Tensor& student, bool use_double,
                                                bool need_grad) {
  const int64_t N = student.size(0), V = student.size(1);
  at::Tensor loss = at::empty({N}, student.options().dtype(use_double ? at::kDouble : at::kFloat));
  if (!need_grad) {
    return {loss, at::empty({0}, student.options())};
  }
  const int64_t bytes = N * V * static_cast<int64_t>(student.element_size());
  at::Tensor grad = bytes >= (int64_t{1} << 20)
                        ? pooled_empty_cpu({N, V}, student.scalar_type(), dense_pool_limit_from_env(op))
                        : empty_streaming({N, V}, student.options());
  return {loss, grad};
}

// kd_loss_fwd, or with `in_place` kd_loss_fwd_inplace: the gradient written over the student.
// That is safe because each row is one thread's, the label's logit is read before the gradient
// pass, and the gradient pass loads a tile of the student (into the thread's buffer) before it
// stores the tile's gradient.
std::tuple<at::Tensor, at::Tensor> kd_dense_call(const at::Tensor& student, const at::Tensor& teacher,
                                                 const std::optional<at::Tensor>& labels, double temperature,
                                                 double alpha, c10::string_view divergence, double beta,
                                                 int64_t ignore_index, bool need_grad, double grad_scale,
                                                 bool in_place) {
  const char* op = in_place ? "kd_loss_fwd_inplace" : "kd_loss_fwd";
  const int div = parse_kd_divergence(op, divergence);
  check_kd_loss_args(student, teacher, labels, temperature, alpha, beta, grad_scale, op);
  if (in_place) {
    check_kd_loss_inplace_args(student, teacher, labels);
  }
  const bool has_labels = labels.has_value() && labels->defined();
  if (has_labels) {
    check_label_values(op, *labels, student.size(1), ignore_index);
  }
  const bool use_double = kd_use_double(student.scalar_type(), teacher.scalar_type());
  at::Tensor loss, grad;
  if (in_place) {
    loss = at::empty({student.size(0)}, student.options().dtype(use_double ? at::kDouble : at::kFloat));
    grad = student;
  } else {
    std::tie(loss, grad) = make_outputs(op, student, use_double, need_grad);
  }
  if (student.size(0) == 0) {
    return {loss, grad};
  }
  const at::Tensor* lab = has_labels ? &*labels : nullptr;
  if (use_double) {
    kd_dense_kernel<double>(student, teacher, lab, make_kd_params<double>(temperature, alpha, beta, div), ignore_index,
                            need_grad, grad_scale, loss, grad);
  } else {
    kd_dense_kernel<float>(student, teacher, lab, make_kd_params<float>(temperature, alpha, beta, div), ignore_index,
                           need_grad, static_cast<float>(grad_scale), loss, grad);
  }
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                   const std::optional<at::Tensor>& labels, double temperature,
                                                   double alpha, c10::string_view divergence, double beta,
                                                   int64_t ignore_index, bool need_grad, double grad_scale) {
  return kd_dense_call(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, need_grad,
                       grad_scale, false);
}

at::Tensor kd_loss_fwd_inplace_cpu(at::Tensor& student, const at::Tensor& teacher,
                                   const std::optional<at::Tensor>& labels, double temperature, double alpha,
                                   c10::string_view divergence, double beta, int64_t ignore_index, double grad_scale) {
  return std::get<0>(kd_dense_call(student, teacher, labels, temperature, alpha, divergence, beta, ignore_index, true,
                                   grad_scale, true));
}

std::tuple<at::Tensor, at::Tensor> kd_loss_topk_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher_values,
                                                        const at::Tensor& teacher_indices,
                                                        const std::optional<at::Tensor>& labels, double temperature,
                                                        double alpha, c10::string_view divergence, double beta,
                                                        int64_t ignore_index, bool need_grad, double grad_scale) {
  const char* op = "kd_loss_topk_fwd";
  const int div = parse_kd_divergence(op, divergence);
  check_kd_loss_topk_args(student, teacher_values, teacher_indices, labels, temperature, alpha, div, beta, grad_scale);
  const int64_t V = student.size(1);
  const bool has_labels = labels.has_value() && labels->defined();
  if (has_labels) {
    check_label_values(op, *labels, V, ignore_index);
  }
  {
    // In range, and distinct within each row (a repeated index would count one student logit
    // twice in the loss and once in the gradient): a sorted copy of each row.
    const int64_t* p = teacher_indices.const_data_ptr<int64_t>();
    const int64_t rs = teacher_indices.stride(0), cs = teacher_indices.stride(1);
    const int64_t k = teacher_indices.size(1);
    std::vector<int64_t> row(static_cast<size_t>(k));
    for (int64_t i = 0; i < teacher_indices.size(0); ++i) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t x = p[i * rs + j * cs];
        PF_CHECK(x >= 0 && x < V, op, "teacher_indices[", i, ", ", j, "] = ", x, " is outside [0, V = ", V, ")");
        row[static_cast<size_t>(j)] = x;
      }
      std::sort(row.begin(), row.end());
      const auto repeat = std::adjacent_find(row.begin(), row.end());
      PF_CHECK_VALUE(repeat == row.end(), op, "teacher_indices must be distinct within each row (as torch.topk returns "
                     "them); row ", i, " repeats index ", repeat == row.end() ? 0 : *repeat);
    }
  }
  const bool use_double = kd_use_double(student.scalar_type(), teacher_values.scalar_type());
  auto [loss, grad] = make_outputs(op, student, use_double, need_grad);
  if (student.size(0) == 0) {
    return {loss, grad};
  }
  const at::Tensor* lab = has_labels ? &*labels : nullptr;
  if (use_double) {
    kd_topk_kernel<double>(student, teacher_values, teacher_indices, lab,
                           make_kd_params<double>(temperature, alpha, beta, div), ignore_index, need_grad, grad_scale,
                           loss, grad);
  } else {
    kd_topk_kernel<float>(student, teacher_values, teacher_indices, lab,
                          make_kd_params<float>(temperature, alpha, beta, div), ignore_index, need_grad,
                          static_cast<float>(grad_scale), loss, grad);
  }
  return {loss, grad};
}

// grad *= scale in grad's arithmetic dtype, rounded once (the bits of grad.mul_(float)); nothing
// written when the scale is 1.
template <typename scalar_t, typename opmath_t>
void scale_kept_kernel(at::Tensor& grad, const at::Tensor& scale) {
  const opmath_t f = *scale.const_data_ptr<opmath_t>();
  if (f == opmath_t(1)) {
    return;
  }
  scalar_t* g = grad.data_ptr<scalar_t>();
  at::parallel_for(0, grad.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      g[i] = static_cast<scalar_t>(static_cast<opmath_t>(g[i]) * f);
    }
  });
}

void scale_kept_cpu(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_kept_args(grad, scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "_scale_kept_", [&] {
    scale_kept_kernel<scalar_t, at::opmath_type<scalar_t>>(grad, scale);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfinetune, CPU, m) {
  m.impl("kd_loss_fwd", &kd_loss_fwd_cpu);
  m.impl("kd_loss_fwd_inplace", &kd_loss_fwd_inplace_cpu);
  m.impl("kd_loss_topk_fwd", &kd_loss_topk_fwd_cpu);
  m.impl("_scale_kept_", &scale_kept_cpu);
}

}  // namespace pyfinetune
