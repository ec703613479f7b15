// The per-row arithmetic of the fused distillation loss, shared by the CPU and CUDA kernels.
//
// For one row of student logits s and teacher logits t (length V) at temperature T:
//   P = softmax(t / T), Q = softmax(s / T)
//   forward_kl: D = KL(P || Q);  reverse_kl: D = KL(Q || P);
//   jsd:        M = beta P + (1 - beta) Q,  D = beta KL(P || M) + (1 - beta) KL(Q || M)
//   row loss  = w_kd * D + w_ce * CE(s, label),   CE at temperature 1
//   w_kd = alpha T^2, w_ce = 1 - alpha with labels; w_kd = T^2, w_ce = 0 without labels; both 0
//   for an ignored row (label == ignore_index).
// The kernels make one pass over the row collecting online statistics (running max and sum of
// exponentials, rescaled when the max grows) and, for jsd only, a second pass for the sums that
// need both log-partitions; the last pass writes the gradient d(row loss)/d(s_i).
// Zero-probability entries (logits of -inf, e.g. a masked vocabulary) contribute 0 (0 log 0 = 0).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <limits>

namespace pyfinetune {
namespace kd_math {

enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// exp(x) with exp(-inf) = 0; kernels may substitute a fast exp through the Exp policy.
C10_HOST_DEVICE C10_ALWAYS_INLINE float kd_exp(float x) { return ::expf(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE double kd_exp(double x) { return ::exp(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE float kd_log(float x) { return ::logf(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE double kd_log(double x) { return ::log(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE float kd_log1p(float x) { return ::log1pf(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE double kd_log1p(double x) { return ::log1p(x); }

// A weighted sum w of exponentials rescaled by r (a grown maximum); r == 0 drops the terms (their
// probabilities are exactly 0 now and their weights may be infinite), as an exp of 0 adds nothing.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T rescaled(T w, T r) {
  return r != T(0) ? w * r : T(0);
}

// Online log-sum-exp with an optional weighted mean: after add(x_i, w_i) for all i,
//   lse()    = log sum_i exp(x_i)
//   mean_w() = sum_i exp(x_i) w_i / sum_i exp(x_i)      (terms with exp(x_i) == 0 skipped)
// merge() combines two partial accumulators (threads, warps, blocks, vector lanes).
template <typename T>
struct OnlineLse {
  T max = neg_inf<T>();
  T sum = T(0);   // sum exp(x - max)
  T wsum = T(0);  // sum exp(x - max) * w

  C10_HOST_DEVICE C10_ALWAYS_INLINE void add(T x) {
    if (x > max) {
      sum = sum * kd_exp(max - x) + T(1);
      max = x;
    } else if (x != neg_inf<T>()) {
      sum += kd_exp(x - max);
    }
  }
  C10_HOST_DEVICE C10_ALWAYS_INLINE void add(T x, T w) {
    if (x > max) {
      const T r = kd_exp(max - x);
      sum = sum * r + T(1);
      wsum = rescaled(wsum, r) + w;
      max = x;
    } else if (x != neg_inf<T>()) {
      const T e = kd_exp(x - max);
      sum += e;
      wsum += e != T(0) ? e * w : T(0);  // a zero probability adds nothing (w may be infinite)
    }
  }
  C10_HOST_DEVICE C10_ALWAYS_INLINE void merge(const OnlineLse& o) {
    if (o.max == neg_inf<T>()) {
      return;
    }
    if (max == neg_inf<T>()) {
      *this = o;
      return;
    }
    if (o.max > max) {
      const T r = kd_exp(max - o.max);
      sum = sum * r + o.sum;
      wsum = rescaled(wsum, r) + o.wsum;
      max = o.max;
    } else {
      const T r = kd_exp(o.max - max);
      sum += o.sum * r;
      wsum += rescaled(o.wsum, r);
    }
  }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T lse() const { return max + kd_log(sum); }
  C10_HOST_DEVICE C10_ALWAYS_INLINE T mean_w() const { return wsum / sum; }
};

// The constants of one call.
template <typename T>
struct KdParams {
  T inv_temperature;  // 1 / T
  T temperature;
  T alpha;
  T beta;             // jsd only
  T log_beta;         // log(beta), log(1 - beta): jsd only
  T log_one_minus_beta;
  int divergence;
};

// Row weights of the two terms.
template <typename T>
struct KdRowWeights {
  T kd;  // multiplies D
  T ce;  // multiplies CE
};

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE KdRowWeights<T> row_weights(const KdParams<T>& k, bool has_labels, bool ignored) {
  KdRowWeights<T> w;
  const T t2 = k.temperature * k.temperature;
  if (ignored) {
    w.kd = T(0);
    w.ce = T(0);
  } else if (has_labels) {
    w.kd = k.alpha * t2;
    w.ce = T(1) - k.alpha;
  } else {
    w.kd = t2;
    w.ce = T(0);
  }
  return w;
}

// Statistics of one row after the first pass.
//   lse_s  = log sum exp(s / T), lse_t = log sum exp(t / T), lse_s1 = log sum exp(s) (CE)
//   cross  = forward_kl: E_P[(t - s) / T];  reverse_kl: E_Q[(s - t) / T]; jsd: unused
//   jsd_s  = jsd only, after the second pass: S_Q + log(1 - beta) = sum_i q_i u_i,
//            where S_Q = sum_i q_i log(q_i / m_i) (see jsd_offset_log_ratios; sum_i q_i = 1)
//   jsd_p  = jsd only, after the second pass: S_P + log(beta) = sum_i p_i v_i
template <typename T>
struct KdRowStats {
  T lse_s, lse_t, lse_s1, cross, jsd_s, jsd_p;
};

// log m_i = log(beta p_i + (1 - beta) q_i) from log p_i, log q_i, stably.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T jsd_log_m(const KdParams<T>& k, T log_p, T log_q) {
  const T a = k.log_beta + log_p;
  const T b = k.log_one_minus_beta + log_q;
  const T hi = a > b ? a : b;
  if (hi == neg_inf<T>()) {
    return neg_inf<T>();
  }
  const T lo = a > b ? b : a;
  return hi + kd_log1p(kd_exp(lo - hi));
}

// x * log-ratio with the convention 0 * anything = 0 (zero probabilities contribute nothing).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T xlogr(T x, T log_ratio) {
  return x == T(0) ? T(0) : x * log_ratio;
}

// The jsd log-ratios, offset by constants: with d = log(beta p) - log((1 - beta) q),
//   u = log(q / m) + log(1 - beta) = -max(d, 0) - log1p(exp(-|d|))
//   v = log(p / m) + log(beta)     =  min(d, 0) - log1p(exp(-|d|))
// u is 0 where q dominates m, v where p does, so the row sums of q u and p v are small numbers
// with small absolute error; log q - log m and S_Q - log(q_i / m_i) would cancel large ones
// (several times the fp32 gradient error of PyTorch's own composition on peaked rows).
// p = 0 gives u = 0 and v = -inf (and the converse for q = 0).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void jsd_offset_log_ratios(const KdParams<T>& k, T log_p, T log_q, T& u, T& v) {
  const T d = (k.log_beta - k.log_one_minus_beta) + (log_p - log_q);
  const T ad = d < T(0) ? -d : d;
  const T l1 = kd_log1p(kd_exp(-ad));
  u = -(d > T(0) ? d : T(0)) - l1;
  v = (d < T(0) ? d : T(0)) - l1;
}

// The jsd second-pass terms of one element: adds q u to sq, p v to sp (see KdRowStats) and the
// element's term of D to sd:
//   beta p log(p / m) + (1 - beta) q log(q / m) = beta (p v - p log(beta)) + (1 - beta) (q u - q log(1 - beta)).
// Each term is >= 0 and second order in p - q, so their sum keeps its precision where D is tiny
// (large T); divergence_value's beta (S_P - log(beta)) + (1 - beta) (S_Q - log(1 - beta)) from
// the row sums cancels O(1) numbers there.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void jsd_accumulate(const KdParams<T>& k, T s, T t, T lse_s, T lse_t, T& sq, T& sp,
                                                      T& sd) {
  const T log_q = s * k.inv_temperature - lse_s;
  const T log_p = t * k.inv_temperature - lse_t;
  T u, v;
  jsd_offset_log_ratios(k, log_p, log_q, u, v);
  const T q = kd_exp(log_q), p = kd_exp(log_p);
  const T qu = xlogr(q, u), pv = xlogr(p, v);
  sq += qu;
  sp += pv;
  sd += k.beta * (pv - xlogr(p, k.log_beta)) + (T(1) - k.beta) * (qu - xlogr(q, k.log_one_minus_beta));
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void jsd_accumulate(const KdParams<T>& k, T s, T t, T lse_s, T lse_t, T& sq, T& sp) {
  T sd = T(0);  // unused: the compiler drops its terms
  jsd_accumulate(k, s, t, lse_s, lse_t, sq, sp, sd);
}

// D of one row from its statistics.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T divergence_value(const KdParams<T>& k, const KdRowStats<T>& st) {
  switch (k.divergence) {
    case kForwardKL:
      return st.cross - st.lse_t + st.lse_s;
    case kReverseKL:
      return st.cross - st.lse_s + st.lse_t;
    default:
      return k.beta * (st.jsd_p - k.log_beta) + (T(1) - k.beta) * (st.jsd_s - k.log_one_minus_beta);
  }
}

// The weights the gradient pass of a row multiplies by (the gradient is linear in them): w times
// grad_scale, or NaN in place of each non-zero weight where the row's loss is NaN (a student or
// teacher row of only -inf, an inf or NaN logit), so that such a row's gradient is NaN as the
// composition of torch ops gives, never a finite gradient of an undefined loss (GradScaler and
// anomaly checks look at the gradients, not at the loss).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE KdRowWeights<T> gradient_weights(const KdRowWeights<T>& w, T loss, T grad_scale) {
  KdRowWeights<T> g{w.kd * grad_scale, w.ce * grad_scale};
  if (loss != loss) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    g.kd = w.kd != T(0) ? nan : g.kd;
    g.ce = w.ce != T(0) ? nan : g.ce;
  }
  return g;
}

// Row loss: w.kd * D + w.ce * (lse_s1 - s_label). s_label is ignored when w.ce == 0.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T row_loss(const KdParams<T>& k, const KdRowStats<T>& st, const KdRowWeights<T>& w,
                                            T s_label) {
  T loss = T(0);
  if (w.kd != T(0)) {
    loss += w.kd * divergence_value(k, st);
  }
  if (w.ce != T(0)) {
    loss += w.ce * (st.lse_s1 - s_label);
  }
  return loss;
}

// d(row loss) / d(s_i) for one element; d_value = divergence_value(k, st) (precomputed per row),
// is_label: i == label.
//   forward_kl: dD/ds_i = (q_i - p_i) / T
//   reverse_kl: dD/ds_i = q_i ((log q_i - log p_i) - D) / T
//   jsd:        dD/ds_i = (1 - beta) q_i (log(q_i / m_i) - S_Q) / T = (1 - beta) q_i (u_i - jsd_s) / T
//   CE:         dCE/ds_i = softmax(s)_i - [i == label]
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T grad_element(const KdParams<T>& k, const KdRowStats<T>& st,
                                                const KdRowWeights<T>& w, T d_value, T s, T t, bool is_label) {
  T g = T(0);
  if (w.kd != T(0)) {
    const T log_q = s * k.inv_temperature - st.lse_s;
    const T q = kd_exp(log_q);
    T dd;
    if (k.divergence == kForwardKL) {
      const T p = kd_exp(t * k.inv_temperature - st.lse_t);
      dd = q - p;
    } else if (k.divergence == kReverseKL) {
      const T log_p = t * k.inv_temperature - st.lse_t;
      dd = xlogr(q, log_q - log_p - d_value);
    } else {
      const T log_p = t * k.inv_temperature - st.lse_t;
      T u, v;
      jsd_offset_log_ratios(k, log_p, log_q, u, v);
      dd = (T(1) - k.beta) * xlogr(q, u - st.jsd_s);
    }
    g += w.kd * k.inv_temperature * dd;
  }
  if (w.ce != T(0)) {
    g += w.ce * (kd_exp(s - st.lse_s1) - (is_label ? T(1) : T(0)));
  }
  return g;
}

}  // namespace kd_math
}  // namespace pyfinetune
