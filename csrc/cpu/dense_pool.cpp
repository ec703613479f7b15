// A pool of CPU memory blocks for SparseLinear's dense path (pyfinetune._sparse_linear): the
// rebuilt weight and its gradient, tens of MB each, allocated once per call; and for the
// distillation kernel's kept gradient (a logits-sized tensor per call, kd_loss_cpu.cpp). A fresh block of
// that size is a fresh mmap whose first writes page-fault one 4 KiB page at a time (~7 ms per
// 32 MB on the CI machine, more than the bfloat16 GEMM that reads it); a block handed back here
// is reused without faults.
//
// A block returns to the pool only when its tensor storage is destroyed, that is, when no tensor,
// view, storage object or autograd saved variable refers to it any more: a block in use is never
// handed out twice. Idle blocks are kept up to the byte limit the caller passes (beyond it a
// returned block is freed, and the limit counts what blocks occupy); _pool_release_cpu frees them all.
// Blocks handed out and returned are reported to the profiler (torch.profiler's profile_memory) as
// the CPU allocator reports its allocations, so memory measurements see pooled tensors too.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Allocator.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <pyfinetune/checks.h>
#include <pyfinetune/cpu_alloc.h>
#include <pyfinetune/dense_pool.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <locale>
#include <sstream>
#include <string>
#include <limits>
#include <map>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyfinetune {
namespace {

constexpr size_t kAlign = 64;
constexpr size_t kPage = size_t{1} << 12;
constexpr size_t kHugePage = size_t{1} << 21;
// Blocks from this size on are mappings of their own (mmap / munmap), so that releasing them
// returns the memory to the system (freed heap memory may stay with the process), rounded up to
// whole pages, or to whole 2 MiB pages (transparent huge pages advised) from 2 MiB on. The idle
// limit counts these rounded sizes: what the blocks really occupy.
constexpr size_t kMapFrom = size_t{1} << 20;

size_t round_up(size_t n, size_t m) {
  return (n + m - 1) / m * m;
}

// The size a request of `bytes` occupies (and the key of its size class).
size_t block_size(size_t bytes) {
#if defined(__linux__)
  if (bytes >= kMapFrom) {
    return round_up(bytes, bytes >= kHugePage ? kHugePage : kPage);
  }
#endif
  return round_up(bytes, kAlign);
}

void* allocate(size_t size) {
#if defined(__linux__)
  if (size >= kMapFrom) {
    const size_t align = size % kHugePage == 0 ? kHugePage : kPage;
    const size_t span = size + (align > kPage ? align : 0);  // room to align the start to 2 MiB
    void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
      return nullptr;
    }
    const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t start = round_up(begin, align);
    if (start > begin) {
      munmap(raw, start - begin);
    }
    if (begin + span > start + size) {
      munmap(reinterpret_cast<void*>(start + size), begin + span - (start + size));
    }
    if (align == kHugePage) {
      advise_huge_pages(reinterpret_cast<void*>(start), size);
    }
    return reinterpret_cast<void*>(start);
  }
#endif
  void* p = nullptr;
  return posix_memalign(&p, kAlign, size) == 0 ? p : nullptr;
}

void deallocate(void* p, size_t size) {
#if defined(__linux__)
  if (size >= kMapFrom) {
    munmap(p, size);
    return;
  }
#endif
  std::free(p);
}

class DensePool {
 public:
  // A block of `size` (block_size) bytes: an idle one of that size, else a new one; nullptr if
  // out of memory.
  void* take(size_t size, int64_t idle_limit) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      limit_ = idle_limit;
      const auto it = idle_.find(size);
      if (it != idle_.end()) {
        void* p = it->second;
        idle_.erase(it);
        idle_bytes_ -= static_cast<int64_t>(size);
        in_use_bytes_ += static_cast<int64_t>(size);
        report(p, static_cast<int64_t>(size));
        return p;
      }
    }
    void* p = allocate(size);
    if (p != nullptr) {
      const std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ += static_cast<int64_t>(size);
      report(p, static_cast<int64_t>(size));
    }
    return p;
  }

  // Called by the storage's deleter: keep the block while the idle ones stay within the limit.
  void give_back(void* p, size_t size) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ -= static_cast<int64_t>(size);
      report(p, -static_cast<int64_t>(size));
      if (idle_bytes_ + static_cast<int64_t>(size) <= limit_) {
        idle_.emplace(size, p);
        idle_bytes_ += static_cast<int64_t>(size);
        return;
      }
    }
    deallocate(p, size);
  }

  int64_t release() {
    std::multimap<size_t, void*> blocks;
    int64_t freed = 0;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(idle_);
      freed = idle_bytes_;
      idle_bytes_ = 0;
    }
    for (const auto& [size, p] : blocks) {
      deallocate(p, size);
    }
    return freed;
  }

  int64_t idle_bytes() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

 private:
  // To the profiler of the calling thread, when it records memory (under mutex_).
  void report(void* p, int64_t delta) const {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, delta, static_cast<size_t>(in_use_bytes_),
                                       static_cast<size_t>(in_use_bytes_ + idle_bytes_), c10::Device(c10::kCPU));
    }
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;  // size -> blocks
  int64_t idle_bytes_ = 0;
  int64_t in_use_bytes_ = 0;
  int64_t limit_ = 0;
};

// Never destroyed: storages freed during interpreter shutdown still find it.
DensePool& pool() {
  static DensePool* p = new DensePool();
  return *p;
}

}  // namespace

int64_t dense_pool_limit_from_env(const char* op) {
  return env_megabytes(op, "PYFINETUNE_DENSE_POOL_MB", int64_t{1024} << 20, "no pool");
}

at::Tensor pooled_empty_cpu(at::IntArrayRef size, at::ScalarType dtype, int64_t idle_limit_bytes) {
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
  const size_t block = block_size(bytes);
  void* p = pool().take(block, idle_limit_bytes);
  PF_CHECK(p != nullptr, op, "out of memory allocating ", bytes, " bytes");
  return at::from_blob(p, size, [block](void* q) { pool().give_back(q, block); }, options);
}

namespace {

at::Tensor pool_empty_cpu(at::IntArrayRef size, at::ScalarType dtype, int64_t idle_limit_bytes) {
  return pooled_empty_cpu(size, dtype, idle_limit_bytes);
}

int64_t pool_release_cpu() {
  return pool().release();
}

int64_t pool_idle_bytes_cpu() {
  return pool().idle_bytes();
}

int64_t pool_env_limit_cpu() {
  return dense_pool_limit_from_env("dense_pool");
}

}  // namespace
}  // namespace pyfinetune

TORCH_LIBRARY_IMPL(pyfinetune, CompositeExplicitAutograd, m) {
  m.impl("_pool_empty_cpu", &pyfinetune::pool_empty_cpu);
  m.impl("_pool_release_cpu", &pyfinetune::pool_release_cpu);
  m.impl("_pool_idle_bytes_cpu", &pyfinetune::pool_idle_bytes_cpu);
  m.impl("_pool_env_limit_cpu", &pyfinetune::pool_env_limit_cpu);
}
