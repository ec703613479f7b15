// Declarations shared by the CPU and CUDA implementations of the distillation ops: argument
// validation (run before any kernel, so a bad call fails with a message naming the argument) and
// the construction of the per-call constants.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>

#include <pyfinetune/kd_loss_math.h>

namespace pyfinetune {

// "forward_kl" | "reverse_kl" | "jsd" -> kd_math::Divergence; anything else is an error naming
// the argument. `op` is the op's name for the message.
int parse_kd_divergence(const char* op, c10::string_view divergence);

// Checks of kd_loss_fwd: student and teacher [N, V] of one device, float dtypes, unit stride along
// V; labels None or int64 [N]; temperature finite > 0; alpha in [0, 1]; beta in (0, 1); grad_scale
// (the factor of the kept gradient) in float32's normal range [1.18e-38, 3.4e38]. The range of the label values is checked by each
// kernel (it needs the values).
// `op`: the op's name for the messages.
void check_kd_loss_args(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                        double temperature, double alpha, double beta, double grad_scale,
                        const char* op = "kd_loss_fwd");
// The further checks of kd_loss_fwd_inplace, whose gradient overwrites `student`: student
// contiguous (the gradient's layout), not overlapping itself, teacher or labels.
void check_kd_loss_inplace_args(const at::Tensor& student, const at::Tensor& teacher,
                                const std::optional<at::Tensor>& labels);

// Checks of kd_loss_topk_fwd: teacher_values [N, k] float, teacher_indices [N, k] int64, k in
// [1, V]; divergence must not be reverse_kl (KL(Q || P) is infinite where P is 0).
void check_kd_loss_topk_args(const at::Tensor& student, const at::Tensor& teacher_values,
                             const at::Tensor& teacher_indices, const std::optional<at::Tensor>& labels,
                             double temperature, double alpha, int divergence, double beta, double grad_scale);

// Checks of _scale_kept_: grad a contiguous float32 / float64 / bfloat16 / float16 tensor; scale
// one element of grad's arithmetic dtype (float64 for float64, else float32) on grad's device,
// sharing no memory with grad (every block reads it while others write grad).
void check_scale_kept_args(const at::Tensor& grad, const at::Tensor& scale);

// The math type of a call: double when the student or the teacher is float64, else float.
inline bool kd_use_double(at::ScalarType student, at::ScalarType teacher) {
  return student == at::kDouble || teacher == at::kDouble;
}

template <typename T>
kd_math::KdParams<T> make_kd_params(double temperature, double alpha, double beta, int divergence) {
  kd_math::KdParams<T> k;
  k.temperature = static_cast<T>(temperature);
  k.inv_temperature = static_cast<T>(1.0 / temperature);
  k.alpha = static_cast<T>(alpha);
  k.beta = static_cast<T>(beta);
  k.log_beta = static_cast<T>(std::log(beta));
  k.log_one_minus_beta = static_cast<T>(std::log1p(-beta));
  k.divergence = divergence;
  return k;
}

}  // namespace pyfinetune
