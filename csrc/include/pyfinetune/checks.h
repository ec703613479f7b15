// Argument checks whose messages name the op, the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <ostream>
#include <string>

// PF_CHECK(cond, "fused_adamw_", "lrs[", i, "] must be >= 0, got ", lr)
#define PF_CHECK(cond, op, ...) TORCH_CHECK((cond), "pyfinetune.", op, ": ", __VA_ARGS__)

namespace pyfinetune {

// "params[3]" style names for list elements.
inline std::string arg_name(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

// The same name, formatted only when a message is built (a failed check): checks that run for
// every tensor of every call build no string on success.
struct ArgName {
  const char* list;
  size_t i;
};

inline std::ostream& operator<<(std::ostream& os, const ArgName& a) {
  return os << a.list << "[" << a.i << "]";
}

}  // namespace pyfinetune
