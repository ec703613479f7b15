// Validation of the distillation ops' arguments, shared by the CPU and CUDA kernels.
#include <pyfinetune/checks.h>
#include <pyfinetune/kd_loss.h>

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <limits>
#include <string>

namespace pyfinetune {
namespace {

bool is_logit_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_logits(const char* op, const char* name, const at::Tensor& x) {
  PF_CHECK(x.defined(), op, name, " is undefined");
  PF_CHECK(x.layout() == at::kStrided, op, name, " must be a dense (strided) tensor, got layout ", x.layout());
  PF_CHECK(x.dim() == 2, op, name, " must be 2-D [N, V] (flatten the leading dimensions), got shape ", x.sizes());
  PF_CHECK(is_logit_dtype(x.scalar_type()), op, name, " must be float32, bfloat16, float16 or float64, got ",
           x.scalar_type());
  PF_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, name, " must have unit stride along V (dim 1), got strides ",
           x.strides());
  PF_CHECK(x.size(0) <= 1 || x.stride(0) >= 0, op, name, " must have a non-negative row stride, got ", x.strides());
}

void check_scalars(const char* op, double temperature, double alpha, double beta, double grad_scale) {
  // The kernels compute T^2 and 1/T in float32: [1e-18, 1e18] keeps both normal numbers.
  PF_CHECK(temperature >= 1e-18 && temperature <= 1e18, op,
           "temperature must be a number in [1e-18, 1e18] (squared in float32), got ", temperature);
  PF_CHECK(alpha >= 0 && alpha <= 1, op, "alpha must be in [0, 1], got ", alpha);
  PF_CHECK(beta > 0 && beta < 1, op, "beta must be in (0, 1), got ", beta);
  // The kernels multiply in float32: a positive normal float32 (1e-39 or 1e39 would give 0 or inf).
  PF_CHECK(grad_scale >= static_cast<double>(std::numeric_limits<float>::min()) &&
               grad_scale <= static_cast<double>(std::numeric_limits<float>::max()),
           op, "grad_scale must be a finite number > 0 in float32's normal range [1.17549e-38, 3.40282e+38], got ",
           grad_scale);
  // Each in range, the gradient's weight T^2 * grad_scale (times alpha <= 1) could still overflow
  // float32 (T = 1e4, grad_scale = 1e31): an inf weight times a zero term is a NaN gradient.
  PF_CHECK(temperature * temperature * grad_scale <= static_cast<double>(std::numeric_limits<float>::max()), op,
           "temperature^2 * grad_scale must fit in float32 (<= 3.40282e+38), got temperature = ", temperature,
           ", grad_scale = ", grad_scale);
}

void check_labels(const char* op, const std::optional<at::Tensor>& labels, const at::Tensor& student) {
  if (!labels.has_value() || !labels->defined()) {
    return;
  }
  const at::Tensor& l = *labels;
  PF_CHECK(l.layout() == at::kStrided, op, "labels must be a dense (strided) tensor");
  PF_CHECK(l.scalar_type() == at::kLong, op, "labels must be int64, got ", l.scalar_type());
  PF_CHECK(l.dim() == 1 && l.size(0) == student.size(0), op, "labels must have shape [N] = [", student.size(0),
           "] (one class per row of student), got ", l.sizes());
  PF_CHECK(l.device() == student.device(), op, "labels must be on ", student.device(), " like student, got ",
           l.device());
}

}  // namespace

int parse_kd_divergence(const char* op, c10::string_view divergence) {
  if (divergence == "forward_kl") {
    return kd_math::kForwardKL;
  }
  if (divergence == "reverse_kl") {
    return kd_math::kReverseKL;
  }
  if (divergence == "jsd") {
    return kd_math::kJSD;
  }
  PF_CHECK(false, op, "divergence must be \"forward_kl\", \"reverse_kl\" or \"jsd\", got \"",
           std::string(divergence), "\"");
  return -1;
}

void check_kd_loss_args(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                        double temperature, double alpha, double beta, double grad_scale, const char* op) {
  check_logits(op, "student", student);
  check_logits(op, "teacher", teacher);
  PF_CHECK(teacher.sizes() == student.sizes(), op, "teacher must have the shape of student ", student.sizes(),
           ", got ", teacher.sizes());
  PF_CHECK(teacher.device() == student.device(), op, "teacher must be on ", student.device(),
           " like student, got ", teacher.device());
  PF_CHECK(student.size(1) >= 1, op, "student must have at least one class (V >= 1), got shape ", student.sizes());
  check_labels(op, labels, student);
  check_scalars(op, temperature, alpha, beta, grad_scale);
}

void check_scale_kept_args(const at::Tensor& grad, const at::Tensor& scale) {
  const char* op = "_scale_kept_";
  PF_CHECK(grad.defined() && scale.defined(), op, "grad and scale must be defined tensors");
  PF_CHECK(grad.layout() == at::kStrided && grad.is_contiguous(), op, "grad must be a contiguous dense tensor, got ",
           grad.layout() == at::kStrided ? "strides " : "layout ",
           grad.layout() == at::kStrided ? c10::str(grad.strides()) : c10::str(grad.layout()));
  const at::ScalarType dtype = grad.scalar_type();
  PF_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
           "grad must be float32, float64, bfloat16 or float16, got ", dtype);
  const at::ScalarType want = dtype == at::kDouble ? at::kDouble : at::kFloat;
  PF_CHECK(scale.layout() == at::kStrided && scale.numel() == 1, op, "scale must hold exactly one value, got ",
           scale.numel(), " values");
  PF_CHECK(scale.scalar_type() == want, op, "scale must be ", want, " (the arithmetic dtype of a ", dtype,
           " grad), got ", scale.scalar_type());
  PF_CHECK(scale.device() == grad.device(), op, "scale must be on grad's device ", grad.device(), ", got ",
           scale.device());
  PF_CHECK(!scale.storage().is_alias_of(grad.storage()) ||
               at::get_overlap_status(grad, scale) == at::MemOverlapStatus::No,
           op, "scale must not share memory with grad (grad is written while scale is read)");
}

void check_kd_loss_inplace_args(const at::Tensor& student, const at::Tensor& teacher,
                                const std::optional<at::Tensor>& labels) {
  const char* op = "kd_loss_fwd_inplace";
  PF_CHECK(student.is_contiguous(), op, "student must be contiguous (its gradient is written over it in the layout ",
           "[N, V]), got strides ", student.strides());
  PF_CHECK(at::has_internal_overlap(student) != at::MemOverlap::Yes, op,
           "student must not have overlapping elements (it is written to)");
  // Another storage cannot overlap; within the same storage, get_overlap_status decides (TooHard,
  // for a strided view, counts as sharing: it is refused rather than risked).
  const auto disjoint = [&](const at::Tensor& x) {
    return !x.storage().is_alias_of(student.storage()) ||
           at::get_overlap_status(student, x) == at::MemOverlapStatus::No;
  };
  PF_CHECK(disjoint(teacher), op,
           "teacher must not share memory with student (student is overwritten by the gradient)");
  if (labels.has_value() && labels->defined()) {
    PF_CHECK(disjoint(*labels), op, "labels must not share memory with student (student is overwritten by the gradient)");
  }
}

void check_kd_loss_topk_args(const at::Tensor& student, const at::Tensor& teacher_values,
                             const at::Tensor& teacher_indices, const std::optional<at::Tensor>& labels,
                             double temperature, double alpha, int divergence, double beta, double grad_scale) {
  const char* op = "kd_loss_topk_fwd";
  check_logits(op, "student", student);
  check_logits(op, "teacher_values", teacher_values);
  PF_CHECK(student.size(1) >= 1, op, "student must have at least one class (V >= 1), got shape ", student.sizes());
  PF_CHECK(teacher_values.size(0) == student.size(0), op, "teacher_values must have one row per row of student (",
           student.size(0), "), got shape ", teacher_values.sizes());
  const int64_t k = teacher_values.size(1);
  PF_CHECK(k >= 1 && k <= student.size(1), op, "teacher_values must have k in [1, V = ", student.size(1),
           "] entries per row, got ", k);
  PF_CHECK(teacher_values.device() == student.device(), op, "teacher_values must be on ", student.device(),
           " like student, got ", teacher_values.device());
  PF_CHECK(teacher_indices.defined() && teacher_indices.layout() == at::kStrided, op,
           "teacher_indices must be a dense (strided) tensor");
  PF_CHECK(teacher_indices.scalar_type() == at::kLong, op, "teacher_indices must be int64, got ",
           teacher_indices.scalar_type());
  PF_CHECK(teacher_indices.sizes() == teacher_values.sizes(), op, "teacher_indices must have the shape of teacher_values ",
           teacher_values.sizes(), ", got ", teacher_indices.sizes());
  PF_CHECK(teacher_indices.device() == student.device(), op, "teacher_indices must be on ", student.device(),
           " like student, got ", teacher_indices.device());
  PF_CHECK(divergence != kd_math::kReverseKL, op,
           "divergence \"reverse_kl\" is not defined with a top-k teacher: the teacher probability is 0 outside "
           "its top-k entries, so KL(Q || P) is infinite; use \"forward_kl\" or \"jsd\"");
  check_labels(op, labels, student);
  check_scalars(op, temperature, alpha, beta, grad_scale);
}

}  // namespace pyfinetune
