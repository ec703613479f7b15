// Allocation of large CPU outputs that a kernel writes once, streaming.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

namespace pyfinetune {

// Ask for transparent huge pages over the whole 2 MiB pages inside [p, p + bytes) (a hint: where
// THP is disabled or the call fails nothing changes).
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) {
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)p;
  (void)bytes;
#endif
}

// at::empty, and for buffers of 4 MiB and more a hint to back them with transparent huge pages.
// glibc serves such sizes with a fresh mmap each time, so every call would otherwise take one
// page fault (and a kernel page clear) per 4 KiB: for a 125 MiB logits-sized gradient that costs
// more than the kernel writing it. With the hint the faults are per 2 MiB. The hint changes
// nothing else (the memory is still freed to the system as before); where THP is disabled or the
// call fails it is ignored.
inline at::Tensor empty_streaming(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (out.device().is_cpu() && out.nbytes() >= (size_t{4} << 20)) {
    advise_huge_pages(out.data_ptr(), out.nbytes());
  }
  return out;
}

}  // namespace pyfinetune
