// Argument checks whose messages name the op, the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <locale>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>

// PF_CHECK(cond, "fused_adamw_", "lrs[", i, "] must be >= 0, got ", lr)
//
// The message is built (only when the check fails) by check_message, with no std::ostream for
// numbers: an extension built with a compiler whose C++ runtime differs from the one in the
// process (a statically linked libstdc++, say) can format integers through iostreams wrongly. Seen
// on a GPU machine whose image compiler is not torch's: such errors crashed the process (SIGSEGV);
// reproduced here with -static-libstdc++, where "labels[2] = 10 ..." came out as "labels[".
#define PF_CHECK(cond, op, ...) \
  TORCH_CHECK((cond), ::pyfinetune::check_message("pyfinetune.", op, ": ", __VA_ARGS__))

// The same, raising ValueError in Python (for a bad value inside an argument, where the Python
// API promises ValueError).
#define PF_CHECK_VALUE(cond, op, ...) \
  TORCH_CHECK_VALUE((cond), ::pyfinetune::check_message("pyfinetune.", op, ": ", __VA_ARGS__))

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

namespace detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }  // formatted by libc10
inline void append(std::string& s, const ArgName& v) {
  s += v.list;
  s += '[';
  s += std::to_string(v.i);
  s += ']';
}

template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
void append(std::string& s, T v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));  // as std::ostream prints it
  s += buf;
}

inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) {
      s += ", ";
    }
    s += std::to_string(v[i]);
  }
  s += ']';
}

// Anything else (layouts, ...): its operator<<, through c10::str.
template <typename T, std::enable_if_t<!std::is_arithmetic_v<T>, int> = 0>
void append(std::string& s, const T& v) {
  s += c10::str(v);
}

}  // namespace detail

// The concatenation of the arguments as text (see PF_CHECK).
template <typename... Args>
std::string check_message(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

// An on/off environment variable read at each call: true for "1", false for "0", std::nullopt
// when unset or empty (the caller's default); any other value is refused with a ValueError naming
// the op, the variable and `unset_means` (what unset does), before the caller writes anything.
inline std::optional<bool> env_switch(const char* op, const char* name, const char* unset_means) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || raw[0] == '\0') {
    return std::nullopt;
  }
  TORCH_CHECK_VALUE((raw[0] == '0' || raw[0] == '1') && raw[1] == '\0',
                    check_message("pyfinetune.", op, ": ", name, " must be 0 or 1 (or unset: ", unset_means,
                                  "), got '", raw, "'"));
  return raw[0] == '1';
}

// A size in megabytes from an environment variable read at each call: `default_bytes` when unset,
// else a decimal number (surrounding blanks allowed), 0 <= MB <= 2^40, read in the "C" locale (as
// Python's float() reads it, whatever LC_NUMERIC says), in bytes; anything else (empty,
// hexadecimal, inf, nan, units) is refused with a ValueError naming the op, the variable and
// `zero_means` (what 0 does).
inline int64_t env_megabytes(const char* op, const char* name, int64_t default_bytes, const char* zero_means) {
  const char* raw = std::getenv(name);
  if (raw == nullptr) {
    return default_bytes;
  }
  std::istringstream in{std::string(raw)};
  in.imbue(std::locale::classic());
  double mb = -1;
  in >> std::skipws >> mb;
  const bool parsed = !in.fail();
  in >> std::ws;
  const bool number = parsed && in.eof() && std::strpbrk(raw, "xX") == nullptr;
  TORCH_CHECK_VALUE(number && mb >= 0 && mb <= 1099511627776.0,
                    check_message("pyfinetune.", op, ": ", name, " must be a number of megabytes between 0 (",
                                  zero_means, ") and 2^40, got '", raw, "'"));
  return static_cast<int64_t>(mb * 1048576.0);
}

}  // namespace pyfinetune
