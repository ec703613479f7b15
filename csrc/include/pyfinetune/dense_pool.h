// The CPU block pool of csrc/cpu/dense_pool.cpp, for kernels that return large tensors made anew on
// every call (SparseLinear's dense path, the distillation kernel's kept gradient): a block returns
// to the pool when its storage is destroyed and is reused without the page faults of fresh memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace pyfinetune {

// The idle-bytes limit of the pool from PYFINETUNE_DENSE_POOL_MB (megabytes, default 1024, 0: no
// idle blocks kept); an invalid value is an error of `op` naming the variable (as the Python side says).
int64_t dense_pool_limit_from_env(const char* op);

// An uninitialized CPU tensor of `size` and `dtype` from the pool, idle blocks kept up to
// `idle_limit_bytes`. Its memory is reported to the profiler as the CPU allocator's is.
at::Tensor pooled_empty_cpu(at::IntArrayRef size, at::ScalarType dtype, int64_t idle_limit_bytes);

}  // namespace pyfinetune
