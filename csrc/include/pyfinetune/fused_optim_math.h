// The per-element arithmetic of the fused optimizer steps, shared by the CPU kernels (scalar and
// at::vec::Vectorized) and the CUDA kernels, so that a CPU test exercises the GPU's formulas.
//
// T is the math type: float for fp32/bf16/fp16 parameters, double for fp64 parameters, or a CPU
// vector of either. The helpers pf_sqrt / pf_max / pf_min are overloaded for the scalar types
// here; the CPU vector code declares its Vectorized overloads before including this header so
// that ordinary lookup finds them at the template's definition.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace pyfinetune {
namespace optim_math {

C10_HOST_DEVICE C10_ALWAYS_INLINE float pf_sqrt(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE C10_ALWAYS_INLINE double pf_sqrt(double x) { return ::sqrt(x); }
// NaN-propagating max/min (as torch.maximum / torch.minimum): a NaN in either operand wins.
C10_HOST_DEVICE C10_ALWAYS_INLINE float pf_max(float a, float b) { return (a != a || a > b) ? a : b; }
C10_HOST_DEVICE C10_ALWAYS_INLINE double pf_max(double a, double b) { return (a != a || a > b) ? a : b; }
C10_HOST_DEVICE C10_ALWAYS_INLINE float pf_min(float a, float b) { return (a != a || a < b) ? a : b; }
C10_HOST_DEVICE C10_ALWAYS_INLINE double pf_min(double a, double b) { return (a != a || a < b) ? a : b; }

// Flags of one call; uniform over all elements of all tensors of the call.
struct AdamWFlags {
  bool amsgrad;
  bool decoupled_l2sp;  // penalty_mode="decoupled": pull the weights, not the gradient
};

// Per-parameter constants of one AdamW step, precomputed once per tensor (not per element).
template <typename T>
struct AdamWConsts {
  T grad_mult;        // (maximize ? -1 : 1) / grad_scale
  T beta1, one_minus_beta1;
  T beta2, one_minus_beta2;
  T eps;
  T decay;            // 1 - lr * weight_decay (decoupled weight decay, as torch.optim.AdamW)
  T l2sp;             // coupled L2-SP strength (gradient of l2sp/2 ||p - p0||^2)
  T lr_l2sp;          // lr * l2sp, the decoupled pull
  T step_size;        // lr / (1 - beta1^step)
  T bc2_sqrt;         // sqrt(1 - beta2^step)
  T lr_l1;            // lr * l1, the proximal threshold
  bool has_l2sp;      // anchor present and l2sp > 0
  bool has_l1;        // l1 > 0
};

template <typename T>
struct SGDConsts {
  T grad_mult;            // (maximize ? -1 : 1) / grad_scale
  T weight_decay;         // coupled, as torch.optim.SGD
  T l2sp, lr_l2sp;
  T momentum, one_minus_dampening;
  T lr;
  T lr_l1;
  bool has_weight_decay;
  bool has_l2sp;
  bool has_l1;
};

// Host-side construction of the constants from double-precision hyper-parameters. Computing the
// bias corrections in double keeps them exact to the last float bit for any step count.
template <typename T>
C10_HOST_DEVICE inline AdamWConsts<T> make_adamw_consts(double lr, double beta1, double beta2, double eps,
                                                        double weight_decay, double l2sp, double l1, double step,
                                                        double grad_scale, bool maximize, bool has_anchor) {
  AdamWConsts<T> c;
  c.grad_mult = static_cast<T>((maximize ? -1.0 : 1.0) / grad_scale);
  c.beta1 = static_cast<T>(beta1);
  c.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  c.beta2 = static_cast<T>(beta2);
  c.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  c.eps = static_cast<T>(eps);
  c.decay = static_cast<T>(1.0 - lr * weight_decay);
  c.l2sp = static_cast<T>(l2sp);
  c.lr_l2sp = static_cast<T>(lr * l2sp);
  c.step_size = static_cast<T>(lr / (1.0 - ::pow(beta1, step)));
  c.bc2_sqrt = static_cast<T>(::sqrt(1.0 - ::pow(beta2, step)));
  c.lr_l1 = static_cast<T>(lr * l1);
  c.has_l2sp = has_anchor && l2sp != 0.0;
  c.has_l1 = l1 != 0.0;
  return c;
}

template <typename T>
C10_HOST_DEVICE inline SGDConsts<T> make_sgd_consts(double lr, double momentum, double dampening,
                                                    double weight_decay, double l2sp, double l1,
                                                    double grad_scale, bool maximize, bool has_anchor) {
  SGDConsts<T> c;
  c.grad_mult = static_cast<T>((maximize ? -1.0 : 1.0) / grad_scale);
  c.weight_decay = static_cast<T>(weight_decay);
  c.l2sp = static_cast<T>(l2sp);
  c.lr_l2sp = static_cast<T>(lr * l2sp);
  c.momentum = static_cast<T>(momentum);
  c.one_minus_dampening = static_cast<T>(1.0 - dampening);
  c.lr = static_cast<T>(lr);
  c.lr_l1 = static_cast<T>(lr * l1);
  c.has_weight_decay = weight_decay != 0.0;
  c.has_l2sp = has_anchor && l2sp != 0.0;
  c.has_l1 = l1 != 0.0;
  return c;
}

// Proximal step of lr*l1*|p|: sign(p) * max(|p| - t, 0), written as p - clamp(p, -t, t), which
// gives exact zeros inside [-t, t] and needs no sign function.
template <typename T, typename S>
C10_HOST_DEVICE C10_ALWAYS_INLINE T soft_threshold(T p, S t) {
  // hi * -1, not -hi: at::vec::Vectorized has no unary minus before torch 2.5.
  const T hi = T(t);
  return p - pf_min(pf_max(p, hi * T(-1)), hi);
}

// One AdamW element. p, m, v, vmax are read and written; vmax only with amsgrad. p0 is the anchor
// (ignored unless c.has_l2sp).
//   g  = grad * grad_mult                       (maximize, GradScaler unscale)
//   g += l2sp * (p - p0)                        (coupled L2-SP)
//   m  = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
//   p  = p * (1 - lr wd)                        (decoupled weight decay)
//   p -= lr l2sp (p - p0)                       (decoupled L2-SP)
//   p -= lr / bc1 * m / (sqrt(v or vmax) / sqrt(bc2) + eps)
//   p  = sign(p) max(|p| - lr l1, 0)            (L1, proximal)
template <typename T, typename C>
C10_HOST_DEVICE C10_ALWAYS_INLINE void adamw_element(T& p, T g, T& m, T& v, T& vmax, T p0, const C& c,
                                                     AdamWFlags flags) {
  g = g * T(c.grad_mult);
  if (c.has_l2sp && !flags.decoupled_l2sp) {
    g = g + T(c.l2sp) * (p - p0);
  }
  m = T(c.beta1) * m + T(c.one_minus_beta1) * g;
  v = T(c.beta2) * v + T(c.one_minus_beta2) * (g * g);
  p = p * T(c.decay);
  if (c.has_l2sp && flags.decoupled_l2sp) {
    p = p - T(c.lr_l2sp) * (p - p0);
  }
  T second = v;
  if (flags.amsgrad) {
    vmax = pf_max(vmax, v);
    second = vmax;
  }
  const T denom = pf_sqrt(second) / T(c.bc2_sqrt) + T(c.eps);
  p = p - T(c.step_size) * m / denom;
  if (c.has_l1) {
    p = soft_threshold(p, c.lr_l1);
  }
}

// One SGD element (torch.optim.SGD's update with the penalties added). buf is read and written
// only when has_momentum.
//   g  = grad * grad_mult + wd p + l2sp (p - p0)      (coupled terms)
//   buf = momentum buf + (1 - dampening) g ; g = nesterov ? g + momentum buf : buf
//   p -= lr l2sp (p - p0)                              (decoupled L2-SP)
//   p -= lr g ; then the L1 proximal step
template <typename T, typename C>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sgd_element(T& p, T g, T& buf, T p0, const C& c, bool has_momentum,
                                                   bool nesterov, bool decoupled_l2sp) {
  g = g * T(c.grad_mult);
  if (c.has_weight_decay) {
    g = g + T(c.weight_decay) * p;
  }
  if (c.has_l2sp && !decoupled_l2sp) {
    g = g + T(c.l2sp) * (p - p0);
  }
  if (has_momentum) {
    buf = T(c.momentum) * buf + T(c.one_minus_dampening) * g;
    g = nesterov ? g + T(c.momentum) * buf : buf;
  }
  if (c.has_l2sp && decoupled_l2sp) {
    p = p - T(c.lr_l2sp) * (p - p0);
  }
  p = p - T(c.lr) * g;
  if (c.has_l1) {
    p = soft_threshold(p, c.lr_l1);
  }
}

}  // namespace optim_math
}  // namespace pyfinetune
