// A pool of CPU memory blocks for SparseLinear's dense path (pyfinetune._sparse_linear): the
// rebuilt weight and its gradient, tens of MB each, allocated once per call. A fresh block of
// that size is a fresh mmap whose first writes page-fault one 4 KiB page at a time (~7 ms per
// 32 MB on the CI machine, more than the bfloat16 GEMM that reads it); a block handed back here
// is reused without faults.
//
// A block returns to the pool only when its tensor storage is destroyed, that is, when no tensor,
// view, storage object or autograd saved variable refers to it any more: a block in use is never
// handed out twice. Idle blocks are kept up to the byte limit the caller passes (beyond it a
// returned block is freed); _pool_release_cpu frees them all.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <pyfinetune/checks.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyfinetune {
namespace {

constexpr size_t kAlign = 64;
constexpr size_t kHugePage = size_t{1} << 21;

class DensePool {
 public:
  // A block of `bytes` (from the idle ones of that exact size, else new), nullptr if out of memory.
  void* take(size_t bytes, int64_t idle_limit) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      limit_ = idle_limit;
      const auto it = idle_.find(bytes);
      if (it != idle_.end()) {
        void* p = it->second;
        idle_.erase(it);
        idle_bytes_ -= bytes;
        return p;
      }
    }
    const size_t alloc = (bytes + kHugePage - 1) / kHugePage * kHugePage;  // whole huge pages
    void* p = nullptr;
    if (posix_memalign(&p, bytes >= kHugePage ? kHugePage : kAlign, bytes >= kHugePage ? alloc : bytes) != 0) {
      return nullptr;
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kHugePage) {
      (void)madvise(p, alloc, MADV_HUGEPAGE);
    }
#endif
    return p;
  }

  // Called by the storage's deleter: keep the block while the idle ones stay within the limit.
  void give_back(void* p, size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (idle_bytes_ + static_cast<int64_t>(bytes) <= limit_) {
        idle_.emplace(bytes, p);
        idle_bytes_ += static_cast<int64_t>(bytes);
        return;
      }
    }
    std::free(p);
  }

  int64_t release() {
    std::vector<void*> blocks;
    int64_t freed = 0;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (const auto& [bytes, p] : idle_) {
        blocks.push_back(p);
      }
      idle_.clear();
      freed = idle_bytes_;
      idle_bytes_ = 0;
    }
    for (void* p : blocks) {
      std::free(p);
    }
    return freed;
  }

  int64_t idle_bytes() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;
  int64_t idle_bytes_ = 0;
  int64_t limit_ = 0;
};

// Never destroyed: storages freed during interpreter shutdown still find it.
DensePool& pool() {
  static DensePool* p = new DensePool();
  return *p;
}

at::Tensor pool_empty_cpu(at::IntArrayRef size, at::ScalarType dtype, int64_t idle_limit_bytes) {
  const char* op = "_pool_empty_cpu";
  PF_CHECK(idle_limit_bytes >= 0, op, "idle_limit_bytes must be >= 0, got ", idle_limit_bytes);
  int64_t numel = 1;
  for (const int64_t s : size) {
    PF_CHECK(s >= 0, op, "size must be non-negative, got ", size);
    PF_CHECK(s == 0 || numel <= std::numeric_limits<int64_t>::max() / s, op, "size ", size, " is too large");
    numel *= s;
  }
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const int64_t item = static_cast<int64_t>(c10::elementSize(dtype));
  PF_CHECK(numel <= std::numeric_limits<int64_t>::max() / item, op, "size ", size, " is too large");
  const size_t bytes = static_cast<size_t>(numel * item);
  if (bytes == 0) {
    return at::empty(size, options);
  }
  void* p = pool().take(bytes, idle_limit_bytes);
  PF_CHECK(p != nullptr, op, "out of memory allocating ", bytes, " bytes");
  return at::from_blob(p, size, [bytes](void* q) { pool().give_back(q, bytes); }, options);
}

int64_t pool_release_cpu() {
  return pool().release();
}

int64_t pool_idle_bytes_cpu() {
  return pool().idle_bytes();
}

}  // namespace
}  // namespace pyfinetune

TORCH_LIBRARY_IMPL(pyfinetune, CompositeExplicitAutograd, m) {
  m.impl("_pool_empty_cpu", &pyfinetune::pool_empty_cpu);
  m.impl("_pool_release_cpu", &pyfinetune::pool_release_cpu);
  m.impl("_pool_idle_bytes_cpu", &pyfinetune::pool_idle_bytes_cpu);
}
