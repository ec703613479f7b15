// Validation of the pruning ops' arguments (masked_matmul, csr_linear and their backwards),
// shared by the CPU and CUDA kernels. Every message names the op, the argument and what was
// expected, with the sizes that explain it.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <pyfinetune/checks.h>
#include <pyfinetune/masked_matmul.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

namespace pyfinetune {
namespace {

constexpr const char* kFloatDtypes = "float32, bfloat16, float16 or float64";

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// At most 2^31 - 1 kept entries, the reach of the int32 `what` (indices, tile offsets) of the
// kernels; `name` holds them.
void check_nnz_fits_int32(const char* op, const char* name, int64_t nnz, const char* what) {
  PF_CHECK(nnz <= std::numeric_limits<int32_t>::max(), op, name, " has ", nnz, " entries; int32 ", what,
           " address at most 2^31 - 1 kept weights");
}

// Defined, dense (strided) and on the device of `ref` (x, whose device every argument shares, or
// the tensor named ref_name).
void check_dense_on(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                    const char* ref_name = "x") {
  PF_CHECK(t.defined(), op, name, " is undefined");
  PF_CHECK(t.layout() == at::kStrided, op, name, " must be a dense (strided) tensor, got layout ", t.layout(),
           " (pass the compressed pattern as separate index tensors, not a torch sparse tensor)");
  PF_CHECK(t.device() == ref.device(), op, name, " must be on the device of ", ref_name, " (", ref.device(),
           "), got ", t.device());
}

void check_float_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_dense_on(op, name, t, x);
  PF_CHECK(t.scalar_type() == x.scalar_type(), op, name, " must have the dtype of x (", x.scalar_type(), "), got ",
           t.scalar_type());
}

// x: a 2-D float tensor [N, K].
void check_x(const char* op, const at::Tensor& x) {
  PF_CHECK(x.defined(), op, "x is undefined");
  PF_CHECK(x.layout() == at::kStrided, op, "x must be a dense (strided) tensor, got layout ", x.layout());
  PF_CHECK(x.dim() == 2, op, "x must be a 2-D tensor [N, K], got shape ", x.sizes(),
           " (the Python functions in pyfinetune.ops flatten the leading dimensions)");
  PF_CHECK(is_supported_float(x.scalar_type()), op, "x must be ", kFloatDtypes, ", got ", x.scalar_type());
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t m) {
  if (!bias.has_value() || !bias->defined()) {
    return;
  }
  check_float_like_x(op, "bias", *bias, x);
  PF_CHECK(bias->dim() == 1 && bias->size(0) == m, op, "bias must be None or a 1-D tensor [M] with M = ", m,
           " (the number of output features), got shape ", bias->sizes());
}

void check_grad_out(const char* op, const at::Tensor& grad_out, const at::Tensor& x, int64_t m) {
  check_float_like_x(op, "grad_out", grad_out, x);
  PF_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == m, op,
           "grad_out must be [N, M] = [", x.size(0), ", ", m, "] (N = x.size(0), M output features), got shape ",
           grad_out.sizes());
}

// A 1-D int32 index tensor with `len` entries; `what` says what the length is.
void check_index(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t len,
                 const std::string& what, const char* ref_name = "x") {
  check_dense_on(op, name, t, x, ref_name);
  PF_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
  PF_CHECK(t.dim() == 1 && t.size(0) == len, op, name, " must be a 1-D tensor with ", what, " = ", len,
           " entries, got shape ", t.sizes());
}

void check_weight_and_mask(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask) {
  check_float_like_x(op, "weight", weight, x);
  PF_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, "weight must be [M, K] with K = x.size(1) = ",
           x.size(1), " (the inner dimension of x), got shape ", weight.sizes());
  check_dense_on(op, "mask", mask, x);
  PF_CHECK(mask.sizes() == weight.sizes(), op, "mask must have the shape of weight ", weight.sizes(), ", got ",
           mask.sizes());
  PF_CHECK(mask.scalar_type() == at::kBool, op, "mask must be a bool tensor, got ", mask.scalar_type());
}

// values, crow_indices, col_indices, row_order: the compressed-row pattern. Returns M.
int64_t check_csr(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                  const at::Tensor& col_indices, const at::Tensor& row_order) {
  check_float_like_x(op, "values", values, x);
  PF_CHECK(values.dim() == 1, op, "values must be a 1-D tensor [nnz] (the kept weights), got shape ",
           values.sizes());
  const int64_t nnz = values.size(0);
  check_nnz_fits_int32(op, "values", nnz, "indices");
  PF_CHECK(crow_indices.defined(), op, "crow_indices is undefined");
  PF_CHECK(crow_indices.dim() == 1 && crow_indices.size(0) >= 1, op,
           "crow_indices must be a 1-D tensor [M + 1] (M output features), got shape ", crow_indices.sizes());
  const int64_t m = crow_indices.size(0) - 1;
  check_index(op, "crow_indices", crow_indices, x, m + 1, "M + 1");
  check_index(op, "col_indices", col_indices, x, nnz, "nnz = values.numel()");
  check_index(op, "row_order", row_order, x, m, "M = crow_indices.numel() - 1");
  return m;
}

}  // namespace

MatmulSizes check_masked_matmul_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                     const std::optional<at::Tensor>& bias) {
  const char* op = "masked_matmul";
  check_x(op, x);
  check_weight_and_mask(op, x, weight, mask);
  check_bias(op, bias, x, weight.size(0));
  return {x.size(0), x.size(1), weight.size(0), weight.numel()};
}

MatmulSizes check_masked_matmul_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& weight, const at::Tensor& mask) {
  const char* op = "masked_matmul_backward";
  check_x(op, x);
  check_weight_and_mask(op, x, weight, mask);
  check_grad_out(op, grad_out, x, weight.size(0));
  return {x.size(0), x.size(1), weight.size(0), weight.numel()};
}

MatmulSizes check_csr_linear_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                                  const at::Tensor& col_indices, const at::Tensor& row_order,
                                  const std::optional<at::Tensor>& bias) {
  const char* op = "csr_linear";
  check_x(op, x);
  const int64_t m = check_csr(op, x, values, crow_indices, col_indices, row_order);
  check_bias(op, bias, x, m);
  return {x.size(0), x.size(1), m, values.size(0)};
}

MatmulSizes check_csr_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& values,
                                           const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                           const at::Tensor& row_order, const at::Tensor& ccol_indices,
                                           const at::Tensor& row_indices, const at::Tensor& csc_to_csr) {
  const char* op = "csr_linear_backward";
  check_x(op, x);
  const int64_t m = check_csr(op, x, values, crow_indices, col_indices, row_order);
  check_grad_out(op, grad_out, x, m);
  const int64_t k = x.size(1);
  const int64_t nnz = values.size(0);
  check_index(op, "ccol_indices", ccol_indices, x, k + 1, "K + 1 = x.size(1) + 1");
  check_index(op, "row_indices", row_indices, x, nnz, "nnz = values.numel()");
  check_index(op, "csc_to_csr", csc_to_csr, x, nnz, "nnz = values.numel()");
  return {x.size(0), k, m, nnz};
}

namespace {

// crow_indices [M + 1] and col_indices [nnz] (int32) on the device of `ref`. Returns M.
int64_t check_pattern_of(const char* op, const at::Tensor& ref, const char* ref_name,
                         const at::Tensor& crow_indices, const at::Tensor& col_indices, int64_t nnz) {
  PF_CHECK(crow_indices.defined(), op, "crow_indices is undefined");
  PF_CHECK(crow_indices.dim() == 1 && crow_indices.size(0) >= 1, op,
           "crow_indices must be a 1-D tensor [M + 1] (M rows), got shape ", crow_indices.sizes());
  const int64_t m = crow_indices.size(0) - 1;
  check_index(op, "crow_indices", crow_indices, ref, m + 1, "M + 1", ref_name);
  check_index(op, "col_indices", col_indices, ref, nnz, "nnz", ref_name);
  PF_CHECK(m > 0 || nnz == 0, op, "a pattern of no rows (crow_indices with one entry) has no kept entries, got nnz = ",
           nnz);
  return m;
}

}  // namespace

namespace {

MatmulSizes check_to_dense(const char* op, const at::Tensor& values, const at::Tensor& crow_indices,
                           const at::Tensor& col_indices, int64_t cols) {
  PF_CHECK(values.defined(), op, "values is undefined");
  PF_CHECK(values.layout() == at::kStrided, op, "values must be a dense (strided) tensor, got layout ",
           values.layout());
  PF_CHECK(is_supported_float(values.scalar_type()), op, "values must be ", kFloatDtypes, ", got ",
           values.scalar_type());
  PF_CHECK(values.dim() == 1, op, "values must be a 1-D tensor [nnz] (the kept weights), got shape ",
           values.sizes());
  const int64_t nnz = values.size(0);
  check_nnz_fits_int32(op, "values", nnz, "indices");
  PF_CHECK(cols >= 0, op, "cols must be >= 0 (the number of columns of the dense weight), got ", cols);
  const int64_t m = check_pattern_of(op, values, "values", crow_indices, col_indices, nnz);
  PF_CHECK(cols > 0 || nnz == 0, op, "a pattern of cols = 0 columns has no kept entries, got nnz = ", nnz);
  PF_CHECK(cols <= std::numeric_limits<int32_t>::max(), op,
           "cols must be at most 2^31 - 1 (int32 column indices), got ", cols);
  PF_CHECK(cols == 0 || m <= std::numeric_limits<int64_t>::max() / cols, op, "a dense [", m, ", ", cols,
           "] tensor has too many elements");
  return {0, cols, m, nnz};
}

}  // namespace

MatmulSizes check_csr_to_dense_args(const at::Tensor& values, const at::Tensor& crow_indices,
                                    const at::Tensor& col_indices, int64_t cols) {
  return check_to_dense("csr_to_dense", values, crow_indices, col_indices, cols);
}

MatmulSizes check_csr_to_dense_into_args(const at::Tensor& out, const at::Tensor& values,
                                         const at::Tensor& crow_indices, const at::Tensor& col_indices) {
  const char* op = "csr_to_dense_into";
  PF_CHECK(out.defined(), op, "out is undefined");
  PF_CHECK(out.dim() == 2, op, "out must be a 2-D tensor [M, cols], got shape ", out.sizes());
  const MatmulSizes sizes = check_to_dense(op, values, crow_indices, col_indices, out.size(1));
  check_dense_on(op, "out", out, values, "values");
  PF_CHECK(out.scalar_type() == values.scalar_type(), op, "out must have the dtype of values (", values.scalar_type(),
           "), got ", out.scalar_type());
  PF_CHECK(out.size(0) == sizes.m, op, "out must have M = crow_indices.numel() - 1 = ", sizes.m,
           " rows, got shape ", out.sizes());
  PF_CHECK(out.is_contiguous(), op, "out must be contiguous (row-major), got strides ", out.strides());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"values", &values},
                                {"crow_indices", &crow_indices}, {"col_indices", &col_indices}}) {
    PF_CHECK(at::get_overlap_status(out, *t) == at::MemOverlapStatus::No, op, "out must not share memory with ", name);
  }
  return sizes;
}

MatmulSizes check_csr_gather_args(const at::Tensor& dense, const at::Tensor& crow_indices,
                                  const at::Tensor& col_indices) {
  const char* op = "csr_gather";
  PF_CHECK(dense.defined(), op, "dense is undefined");
  PF_CHECK(dense.layout() == at::kStrided, op, "dense must be a dense (strided) tensor, got layout ", dense.layout());
  PF_CHECK(is_supported_float(dense.scalar_type()), op, "dense must be ", kFloatDtypes, ", got ",
           dense.scalar_type());
  PF_CHECK(dense.dim() == 2, op, "dense must be a 2-D tensor [M, K], got shape ", dense.sizes());
  PF_CHECK(col_indices.defined(), op, "col_indices is undefined");
  PF_CHECK(col_indices.dim() == 1, op, "col_indices must be a 1-D tensor [nnz], got shape ", col_indices.sizes());
  const int64_t nnz = col_indices.size(0);
  check_nnz_fits_int32(op, "col_indices", nnz, "indices");
  const int64_t m = check_pattern_of(op, dense, "dense", crow_indices, col_indices, nnz);
  PF_CHECK(dense.size(0) == m, op, "dense must have M = crow_indices.numel() - 1 = ", m, " rows, got shape ",
           dense.sizes());
  PF_CHECK(dense.size(1) > 0 || nnz == 0, op, "a dense tensor of no columns has no kept entries, got nnz = ", nnz);
  return {0, dense.size(1), m, nnz};
}

namespace {

// tile_values [nnz] (ref's dtype), tile_ptr [ceil(m / kTiledRows) * ceil(k / kTiledCols) + 1] int32,
// tile_loc [nnz] int16, all on ref's device, for a weight [m, k]; k_desc says where k comes from.
// Returns nnz.
int64_t check_tiles(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& tile_values,
                    const at::Tensor& tile_ptr, const at::Tensor& tile_loc, int64_t m, int64_t k,
                    const char* k_desc) {
  check_dense_on(op, "tile_values", tile_values, ref, ref_name);
  PF_CHECK(tile_values.scalar_type() == ref.scalar_type(), op, "tile_values must have the dtype of ", ref_name, " (",
           ref.scalar_type(), "), got ", tile_values.scalar_type());
  PF_CHECK(tile_values.dim() == 1, op, "tile_values must be a 1-D tensor [nnz] (the kept weights in tile order), got shape ",
           tile_values.sizes());
  const int64_t nnz = tile_values.size(0);
  check_nnz_fits_int32(op, "tile_values", nnz, "tile offsets");
  const int64_t tiles = ((m + kTiledRows - 1) / kTiledRows) * ((k + kTiledCols - 1) / kTiledCols);
  PF_CHECK(tile_ptr.defined(), op, "tile_ptr is undefined");
  check_index(op, "tile_ptr", tile_ptr, ref, tiles + 1,
              "ceil(out_features / " + std::to_string(kTiledRows) + ") * ceil(K / " + std::to_string(kTiledCols) +
                  ") + 1 (K = " + k_desc + ")",
              ref_name);
  PF_CHECK(tile_loc.defined(), op, "tile_loc is undefined");
  check_dense_on(op, "tile_loc", tile_loc, ref, ref_name);
  PF_CHECK(tile_loc.scalar_type() == at::kShort, op, "tile_loc must be int16, got ", tile_loc.scalar_type());
  PF_CHECK(tile_loc.dim() == 1 && tile_loc.size(0) == nnz, op,
           "tile_loc must be a 1-D tensor with nnz = tile_values.numel() = ", nnz, " entries, got shape ",
           tile_loc.sizes());
  PF_CHECK(nnz <= m * k, op, "tile_values must have at most out_features * K = ", m * k, " entries, got nnz = ", nnz);
  return nnz;
}

}  // namespace

MatmulSizes check_tiled_csr_linear_args(const at::Tensor& x, const at::Tensor& tile_values, const at::Tensor& tile_ptr,
                                        const at::Tensor& tile_loc, int64_t out_features,
                                        const std::optional<at::Tensor>& bias) {
  const char* op = "tiled_csr_linear";
  check_x(op, x);
  PF_CHECK(out_features >= 0 && out_features <= std::numeric_limits<int32_t>::max(), op,
           "out_features must be in [0, 2^31 - 1], got ", out_features);
  const int64_t nnz = check_tiles(op, x, "x", tile_values, tile_ptr, tile_loc, out_features, x.size(1), "x.size(1)");
  check_bias(op, bias, x, out_features);
  return {x.size(0), x.size(1), out_features, nnz};
}

MatmulSizes check_tiled_csr_linear_backward_input_args(const at::Tensor& grad_out, const at::Tensor& tile_values,
                                                       const at::Tensor& tile_ptr, const at::Tensor& tile_loc,
                                                       int64_t in_features) {
  const char* op = "tiled_csr_linear_backward_input";
  PF_CHECK(grad_out.defined(), op, "grad_out is undefined");
  PF_CHECK(grad_out.layout() == at::kStrided, op, "grad_out must be a dense (strided) tensor, got layout ",
           grad_out.layout());
  PF_CHECK(grad_out.dim() == 2, op, "grad_out must be a 2-D tensor [N, out_features], got shape ", grad_out.sizes());
  PF_CHECK(is_supported_float(grad_out.scalar_type()), op, "grad_out must be ", kFloatDtypes, ", got ",
           grad_out.scalar_type());
  PF_CHECK(in_features >= 0 && in_features <= std::numeric_limits<int32_t>::max(), op,
           "in_features must be in [0, 2^31 - 1], got ", in_features);
  PF_CHECK(grad_out.size(1) <= std::numeric_limits<int32_t>::max(), op,
           "grad_out must have at most 2^31 - 1 columns (out_features), got ", grad_out.size(1));
  const int64_t nnz = check_tiles(op, grad_out, "grad_out", tile_values, tile_ptr, tile_loc, grad_out.size(1),
                                  in_features, "in_features");
  return {grad_out.size(0), in_features, grad_out.size(1), nnz};
}

MatmulSizes check_tiled_csr_linear_backward_values_args(const at::Tensor& grad_out, const at::Tensor& x,
                                                        const at::Tensor& tile_ptr, const at::Tensor& tile_loc,
                                                        const at::Tensor& tile_src) {
  const char* op = "tiled_csr_linear_backward_values";
  check_x(op, x);
  check_grad_out(op, grad_out, x, grad_out.defined() && grad_out.dim() == 2 ? grad_out.size(1) : -1);
  const int64_t m = grad_out.size(1);
  PF_CHECK(m <= std::numeric_limits<int32_t>::max() && x.size(1) <= std::numeric_limits<int32_t>::max(), op,
           "grad_out and x must have at most 2^31 - 1 columns, got ", m, " and ", x.size(1));
  PF_CHECK(tile_loc.defined(), op, "tile_loc is undefined");
  check_dense_on(op, "tile_loc", tile_loc, x);
  PF_CHECK(tile_loc.scalar_type() == at::kShort && tile_loc.dim() == 1, op,
           "tile_loc must be a 1-D int16 tensor [nnz], got ", tile_loc.scalar_type(), " of shape ", tile_loc.sizes());
  const int64_t nnz = tile_loc.size(0);
  check_nnz_fits_int32(op, "tile_loc", nnz, "tile offsets");
  PF_CHECK(nnz <= m * x.size(1), op, "tile_loc must have at most out_features * K = ", m * x.size(1),
           " entries, got nnz = ", nnz);
  const int64_t tiles = ((m + kTiledRows - 1) / kTiledRows) * ((x.size(1) + kTiledCols - 1) / kTiledCols);
  PF_CHECK(tile_ptr.defined(), op, "tile_ptr is undefined");
  check_index(op, "tile_ptr", tile_ptr, x, tiles + 1,
              "ceil(out_features / " + std::to_string(kTiledRows) + ") * ceil(K / " + std::to_string(kTiledCols) +
                  ") + 1 (out_features = grad_out.size(1), K = x.size(1))");
  PF_CHECK(tile_src.defined(), op, "tile_src is undefined");
  check_index(op, "tile_src", tile_src, x, nnz, "nnz = tile_loc.numel()");
  return {x.size(0), x.size(1), m, nnz};
}

// ------------------------------------------------------------------------- pattern data (CPU)

void check_index_range_cpu(const char* op, const char* idx_name, const at::Tensor& idx, int64_t bound,
                           const char* bound_desc) {
  const int32_t* p = idx.const_data_ptr<int32_t>();
  const int64_t n = idx.numel();
  // First offending position, or n; unsigned compare catches negatives too.
  std::atomic<int64_t> bad{n};
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (static_cast<uint64_t>(static_cast<int64_t>(p[i])) >= static_cast<uint64_t>(bound)) {
        int64_t cur = bad.load();
        while (i < cur && !bad.compare_exchange_weak(cur, i)) {
        }
        return;
      }
    }
  });
  const int64_t i = bad.load();
  PF_CHECK(i == n, op, idx_name, "[", i, "] = ", i < n ? p[i] : 0, " is out of range: entries must lie in [0, ",
           bound, ") (", bound_desc, ")");
}

void check_compressed_ptr_cpu(const char* op, const char* ptr_name, const at::Tensor& ptr, int64_t nnz) {
  const int32_t* p = ptr.const_data_ptr<int32_t>();
  const int64_t rows = ptr.numel() - 1;
  PF_CHECK(p[0] == 0, op, ptr_name, "[0] must be 0, got ", p[0]);
  PF_CHECK(p[rows] == nnz, op, ptr_name, "[-1] must be nnz = ", nnz, " (the number of kept weights), got ", p[rows]);
  for (int64_t r = 0; r < rows; ++r) {
    PF_CHECK(p[r] <= p[r + 1], op, ptr_name, " must be non-decreasing, but ", ptr_name, "[", r, "] = ", p[r],
             " > ", ptr_name, "[", r + 1, "] = ", p[r + 1]);
  }
}

bool check_compressed_pattern_cpu(const char* op, const char* ptr_name, const char* idx_name, const at::Tensor& ptr,
                                  const at::Tensor& idx, int64_t cols, const char* cols_desc) {
  const int32_t* p = ptr.const_data_ptr<int32_t>();
  const int64_t rows = ptr.numel() - 1;
  check_compressed_ptr_cpu(op, ptr_name, ptr, idx.numel());
  // One pass over the indices (this runs on every call, in the hot path): a row whose indices
  // increase strictly lies in [0, cols) when its first and last do, so the sortedness scan
  // (branch-free, vectorized) replaces the range scan; only an unsorted pattern falls back to
  // the element-wise range check, which also reports the first offending position.
  const int32_t* q = idx.const_data_ptr<int32_t>();
  std::atomic<bool> sorted{true}, in_range{true};
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    bool ok_sorted = true, ok_range = true;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t e0 = p[r], e1 = p[r + 1];
      if (e0 == e1) {
        continue;
      }
      int bad = 0;
      for (int64_t e = e0 + 1; e < e1; ++e) {
        bad |= q[e - 1] >= q[e];
      }
      ok_sorted &= bad == 0;
      ok_range &= q[e0] >= 0 && static_cast<int64_t>(q[e1 - 1]) < cols;
    }
    if (!ok_sorted) {
      sorted.store(false, std::memory_order_relaxed);
    }
    if (!ok_range) {
      in_range.store(false, std::memory_order_relaxed);
    }
  });
  if (!sorted.load() || !in_range.load()) {
    check_index_range_cpu(op, idx_name, idx, cols, cols_desc);
  }
  return sorted.load();
}

}  // namespace pyfinetune
