// CPU kernels of pyfinetune::tiled_csr_linear (and its input and weight gradients): the product of x with a sparse weight whose kept
// entries are grouped in 128 x 64 tiles (the layout of the CUDA tensor-core kernel,
// csrc/cuda/tiled_csr_cuda.cu). On the CPU the layout brings nothing (csr_linear is the fast CPU
// kernel); this one exists so that the op behaves the same on every device: it validates the tile
// data completely (the CUDA kernel can only assert on the device), rebuilds the dense weight and
// computes y = x @ W^T + bias in float32 (float64 for float64), rounded once to x's dtype, which is
// the CUDA kernel's arithmetic up to the order of the float32 additions.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <pyfinetune/checks.h>
#include <pyfinetune/masked_matmul.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

namespace pyfinetune {
namespace {

// Checks the tile data against the shapes and returns the flat position (row * K + col) of each
// entry in W [M, K]. Every message names the offending entry.
std::vector<int64_t> tile_positions(const char* op, const at::Tensor& tile_ptr, const at::Tensor& tile_loc, int64_t M,
                                    int64_t K) {
  const int32_t* ptr = tile_ptr.const_data_ptr<int32_t>();
  const int16_t* loc = tile_loc.const_data_ptr<int16_t>();
  const int64_t tiles = tile_ptr.numel() - 1;
  const int64_t nnz = tile_loc.numel();
  const int64_t kt_count = (K + kTiledCols - 1) / kTiledCols;
  PF_CHECK(ptr[0] == 0, op, "tile_ptr[0] must be 0, got ", ptr[0]);
  PF_CHECK(ptr[tiles] == nnz, op, "tile_ptr[-1] must be nnz = ", nnz, " (the number of kept weights), got ",
           ptr[tiles]);
  for (int64_t t = 0; t < tiles; ++t) {
    PF_CHECK(ptr[t] <= ptr[t + 1], op, "tile_ptr must be non-decreasing, but tile_ptr[", t, "] = ", ptr[t],
             " > tile_ptr[", t + 1, "] = ", ptr[t + 1]);
  }
  std::vector<int64_t> pos(static_cast<size_t>(nnz));
  std::vector<uint8_t> seen(static_cast<size_t>(M * K), 0);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t row0 = (t / kt_count) * kTiledRows;
    const int64_t col0 = (t % kt_count) * kTiledCols;
    for (int64_t e = ptr[t]; e < ptr[t + 1]; ++e) {
      const int64_t l = loc[e];
      PF_CHECK(l >= 0 && l < kTiledRows * kTiledCols, op, "tile_loc[", e, "] = ", l, " is out of range: entries must lie in [0, ",
               kTiledRows * kTiledCols, ") (row within the tile * ", kTiledCols, " + column within the tile)");
      const int64_t r = row0 + l / kTiledCols;
      const int64_t c = col0 + l % kTiledCols;
      PF_CHECK(r < M && c < K, op, "tile_loc[", e, "] = ", l, " places an entry of tile ", t, " at (row ", r, ", column ",
               c, "), outside the weight [out_features, K] = [", M, ", ", K, "]");
      const int64_t p = r * K + c;
      PF_CHECK(!seen[static_cast<size_t>(p)], op, "tile_loc[", e, "] = ", l, " repeats the position (row ", r,
               ", column ", c, ") of an earlier entry of tile ", t, "; entries must be distinct");
      seen[static_cast<size_t>(p)] = 1;
      pos[static_cast<size_t>(e)] = p;
    }
  }
  return pos;
}

// The dense weight [M, K] in the accumulation dtype (float32, float64 for float64) from checked tiles.
at::Tensor dense_weight(const char* op, const at::Tensor& tile_values, const at::Tensor& tile_ptr,
                        const at::Tensor& tile_loc, int64_t M, int64_t K, at::ScalarType acc) {
  const std::vector<int64_t> pos = tile_positions(op, tile_ptr.contiguous(), tile_loc.contiguous(), M, K);
  at::Tensor w = at::zeros({M, K}, tile_values.options().dtype(acc));
  const at::Tensor v = tile_values.contiguous().to(acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "tiled_csr_dense_weight", [&] {
    scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(pos.size()), 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        wp[pos[static_cast<size_t>(i)]] = vp[i];
      }
    });
  });
  return w;
}

at::Tensor tiled_csr_linear_backward_input_cpu(const at::Tensor& grad_out, const at::Tensor& tile_values,
                                               const at::Tensor& tile_ptr, const at::Tensor& tile_loc,
                                               int64_t in_features) {
  const MatmulSizes sz =
      check_tiled_csr_linear_backward_input_args(grad_out, tile_values, tile_ptr, tile_loc, in_features);
  PF_CHECK(grad_out.is_cpu(), "tiled_csr_linear_backward_input", "grad_out must be a CPU tensor here, got ",
           grad_out.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = dense_weight("tiled_csr_linear_backward_input", tile_values, tile_ptr, tile_loc, sz.m, sz.k, acc);
  return at::mm(grad_out.to(acc), w).to(grad_out.scalar_type());
}

at::Tensor tiled_csr_linear_backward_values_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                const at::Tensor& tile_ptr, const at::Tensor& tile_loc,
                                                const at::Tensor& tile_src) {
  const char* op = "tiled_csr_linear_backward_values";
  const MatmulSizes sz = check_tiled_csr_linear_backward_values_args(grad_out, x, tile_ptr, tile_loc, tile_src);
  PF_CHECK(x.is_cpu(), op, "x must be a CPU tensor here, got ", x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const std::vector<int64_t> pos = tile_positions(op, tile_ptr.contiguous(), tile_loc.contiguous(), sz.m, sz.k);
  const at::Tensor src = tile_src.contiguous();
  const int32_t* sp = src.const_data_ptr<int32_t>();
  const int64_t nnz = sz.nnz;
  std::vector<uint8_t> taken(static_cast<size_t>(nnz), 0);
  for (int64_t e = 0; e < nnz; ++e) {
    PF_CHECK(sp[e] >= 0 && sp[e] < nnz, op, "tile_src[", e, "] = ", sp[e], " is out of range: entries must lie in [0, nnz = ",
             nnz, ")");
    PF_CHECK(!taken[static_cast<size_t>(sp[e])], op, "tile_src[", e, "] = ", sp[e],
             " repeats an earlier entry; tile_src must be a permutation of [0, nnz)");
    taken[static_cast<size_t>(sp[e])] = 1;
  }
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor dw = at::mm(grad_out.to(acc).t(), x.to(acc)).contiguous();  // [M, K]
  at::Tensor dv = at::empty({nnz}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "tiled_csr_linear_backward_values_cpu", [&] {
    const scalar_t* wp = dw.const_data_ptr<scalar_t>();
    scalar_t* vp = dv.data_ptr<scalar_t>();
    at::parallel_for(0, nnz, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        vp[sp[i]] = wp[pos[static_cast<size_t>(i)]];
      }
    });
  });
  return dv.to(x.scalar_type());
}

at::Tensor tiled_csr_linear_cpu(const at::Tensor& x, const at::Tensor& tile_values, const at::Tensor& tile_ptr,
                                const at::Tensor& tile_loc, int64_t out_features,
                                const std::optional<at::Tensor>& bias) {
  const MatmulSizes sz = check_tiled_csr_linear_args(x, tile_values, tile_ptr, tile_loc, out_features, bias);
  PF_CHECK(x.is_cpu(), "tiled_csr_linear", "x must be a CPU tensor here, got ", x.device());
  // A kernel below autograd: the result never records its internals (opcheck's autograd test).
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t M = sz.m, K = sz.k;
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = dense_weight("tiled_csr_linear", tile_values, tile_ptr, tile_loc, M, K, acc);
  const at::Tensor xa = x.to(acc);
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(bias->to(acc), xa, w.t()) : at::mm(xa, w.t());
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfinetune, CPU, m) {
  m.impl("tiled_csr_linear", &tiled_csr_linear_cpu);
  m.impl("tiled_csr_linear_backward_input", &tiled_csr_linear_backward_input_cpu);
  m.impl("tiled_csr_linear_backward_values", &tiled_csr_linear_backward_values_cpu);
}

}  // namespace pyfinetune
