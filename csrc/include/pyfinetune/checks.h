// Argument checks whose messages name the op, the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

// PF_CHECK(cond, "fused_adamw_", "lrs[", i, "] must be >= 0, got ", lr)
#define PF_CHECK(cond, op, ...) TORCH_CHECK((cond), "pyfinetune.", op, ": ", __VA_ARGS__)

namespace pyfinetune {

// "params[3]" style names for list elements.
inline std::string arg_name(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

}  // namespace pyfinetune
