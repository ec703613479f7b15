// Declarations shared by the CPU and CUDA kernels of the pruning ops (masked_matmul, csr_linear
// and their backwards): the argument validation, so that both devices accept and refuse exactly
// the same calls with the same messages, and the sizes the checks establish.
//
// The checks look at metadata only (shapes, dtypes, devices, layouts); they never read tensor
// data, so they cost nothing on CUDA. Whether the index tensors hold a valid pattern (crow
// non-decreasing, columns in range) needs the data: see check_csr_pattern_cpu, run by the CPU
// kernels only.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace pyfinetune {

// Problem sizes of one call: x [n, k], weight [m, k], nnz kept weights (m * k on the dense path).
struct MatmulSizes {
  int64_t n = 0;
  int64_t k = 0;
  int64_t m = 0;
  int64_t nnz = 0;
};

// masked_matmul(x, weight, mask, bias): x [N, K], weight [M, K], mask [M, K] bool, bias None or
// [M]; x, weight and bias share one dtype (float32, bfloat16, float16, float64) and device.
MatmulSizes check_masked_matmul_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                     const std::optional<at::Tensor>& bias);

// masked_matmul_backward: the forward's arguments (without bias) and grad_out [N, M].
MatmulSizes check_masked_matmul_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& weight, const at::Tensor& mask);

// csr_linear(x, values, crow_indices, col_indices, row_order, bias): x [N, K], values [nnz] of x's
// dtype, crow_indices [M + 1], col_indices [nnz], row_order [M] (all int32), bias None or [M].
MatmulSizes check_csr_linear_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                                  const at::Tensor& col_indices, const at::Tensor& row_order,
                                  const std::optional<at::Tensor>& bias);

// csr_linear_backward: the forward's arguments (without bias), grad_out [N, M], and the
// compressed-column view: ccol_indices [K + 1], row_indices [nnz], csc_to_csr [nnz] (int32).
MatmulSizes check_csr_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& values,
                                           const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                           const at::Tensor& row_order, const at::Tensor& ccol_indices,
                                           const at::Tensor& row_indices, const at::Tensor& csc_to_csr);

// tiled_csr_linear(x, tile_values, tile_ptr, tile_loc, out_features, bias): the weight W [M, K]
// (M = out_features, K = x.size(1)) cut into tiles of kTiledRows rows by kTiledCols columns, tile
// (rb, kt) = rows [rb * kTiledRows, ...), columns [kt * kTiledCols, ...) numbered rb * KT + kt with
// KT = ceil(K / kTiledCols); tile_ptr [ceil(M / kTiledRows) * KT + 1] int32: the entries of tile i
// are tile_ptr[i] .. tile_ptr[i + 1] - 1 of tile_values [nnz] (x's dtype) and tile_loc [nnz] int16,
// the entry's place in its tile (row within the tile * kTiledCols + column within the tile).
constexpr int64_t kTiledRows = 128;
constexpr int64_t kTiledCols = 64;
MatmulSizes check_tiled_csr_linear_args(const at::Tensor& x, const at::Tensor& tile_values, const at::Tensor& tile_ptr,
                                        const at::Tensor& tile_loc, int64_t out_features,
                                        const std::optional<at::Tensor>& bias);
// tiled_csr_linear_backward_input(grad_out, tile_values, tile_ptr, tile_loc, in_features): grad_out
// [N, M] (M = out_features), the tiles of a weight [M, K = in_features]. Returns {N, K, M, nnz}.
// tiled_csr_linear_backward_values(grad_out, x, tile_ptr, tile_loc, tile_src): grad_out [N, M], x
// [N, K] of one float dtype and device, the tiles of a weight [M, K] and tile_src [nnz] int32 (the
// compressed-row position of each tile entry). Returns {N, K, M, nnz}.
MatmulSizes check_tiled_csr_linear_backward_values_args(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& tile_ptr, const at::Tensor& tile_loc,
                                                        const at::Tensor& tile_src);
MatmulSizes check_tiled_csr_linear_backward_input_args(const at::Tensor& grad_out, const at::Tensor& tile_values,
                                                       const at::Tensor& tile_ptr, const at::Tensor& tile_loc,
                                                       int64_t in_features);

// csr_to_dense(values, crow_indices, col_indices, cols): values [nnz] (a supported float dtype),
// crow_indices [M + 1] and col_indices [nnz] int32 on the values' device, cols >= 0. Returns
// {n = 0, k = cols, m = M, nnz}.
MatmulSizes check_csr_to_dense_args(const at::Tensor& values, const at::Tensor& crow_indices,
                                    const at::Tensor& col_indices, int64_t cols);

// csr_to_dense_into(out, values, crow_indices, col_indices): the same with cols = out.size(1), and
// `out` a contiguous [M, cols] tensor of the values' dtype and device that overlaps no input.
MatmulSizes check_csr_to_dense_into_args(const at::Tensor& out, const at::Tensor& values,
                                         const at::Tensor& crow_indices, const at::Tensor& col_indices);

// csr_gather(dense, crow_indices, col_indices): dense [M, K] (a supported float dtype, any
// strides), crow_indices [M + 1] and col_indices [nnz] int32 on its device. Returns {0, K, M, nnz}.
MatmulSizes check_csr_gather_args(const at::Tensor& dense, const at::Tensor& crow_indices,
                                  const at::Tensor& col_indices);

// CPU only (reads the indices): `ptr` [rows + 1] starts at 0, never decreases and ends at nnz;
// every entry of `idx` [nnz] lies in [0, cols) (`cols_desc` says what cols is, e.g. "K = x.size(1)").
// Names the op and the arguments in the message. Returns whether the indices increase strictly
// within every row (the kernels may then walk the operand in tiles). `ptr` and `idx` must be
// contiguous int32 CPU tensors.
bool check_compressed_pattern_cpu(const char* op, const char* ptr_name, const char* idx_name, const at::Tensor& ptr,
                                  const at::Tensor& idx, int64_t cols, const char* cols_desc);
// CPU only: the offsets alone (ptr[0] == 0, non-decreasing, ptr[-1] == nnz), for kernels that check
// the indices themselves as they read them.
void check_compressed_ptr_cpu(const char* op, const char* ptr_name, const at::Tensor& ptr, int64_t nnz);

// CPU only: every entry of the contiguous int32 tensor `idx` lies in [0, bound).
void check_index_range_cpu(const char* op, const char* idx_name, const at::Tensor& idx, int64_t bound,
                           const char* bound_desc);

}  // namespace pyfinetune
