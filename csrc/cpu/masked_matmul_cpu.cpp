// CPU kernels of the pruning ops: masked_matmul (dense masked path) and csr_linear (sparse path),
// forward and backward.
//
// Dense masked path: one GEMM of torch (MKL / oneDNN, which accumulate bfloat16 and float16 in
// float32) on the masked weight. It wins below the sparsity crossover (SparseLinear's docstring).
//
// Sparse path, y = x @ W^T with W [M, K] in compressed rows. Unstructured sparsity gives no reuse
// of a weight across output rows, so the kernel vectorizes along the batch instead:
//   * x [N, K] is transposed once into xT [K, ld] (float32 for 16-bit inputs; ld = N rounded up
//     to whole vectors and to an odd number of cache lines, zero padded), so that the N values
//     multiplied by one weight are contiguous;
//   * output row m, panel [n0, n0 + P): yT[m, panel] = sum_j values[j] * xT[col[j], panel], the
//     accumulators held in registers, one broadcast and one FMA per vector and kept weight (yT is
//     a per-thread buffer of the work item's rows, see below); panels of padding only are skipped;
//     P = 256 floats where the CPU has AVX-512 (float32, 16 registers of 16: avx512::kPanelFloats),
//     else 128 floats in AVX-512 builds (8 registers of 16) and 64 in AVX2 builds (kPanelVecs);
//   * sorted patterns walk xT in tiles of rows (32 to 256 KiB per panel, sized by choose_tile so
//     that a row's share of a tile averages a dozen kept weights): every output row adds its kept
//     weights whose column falls in the tile (a cursor per row finds them), loading and storing
//     its accumulators around each such segment, while the tile stays in cache; the sparsest
//     patterns walk each row in one go;
//   * on CPUs without the AVX-512 kernels, patterns of at least 2% density and batches of
//     several panels are instead copied once per row range into tile-major order (the kept weights of tile t, row by row, then of
//     tile t + 1), and every panel streams through the copy ("Tile-major SpMM" below);
//   * work items are (panel, row range) pairs taken dynamically by the threads; the row ranges
//     hold equal numbers of kept weights (prefix sums of crow + binary search);
//   * each work item transposes its block of yT (L2 resident) into y right away, adding the bias,
//     rounded once to the output dtype: no [M, ld] yT round trip through memory.
// Batches of up to 32 rows take separate kernels, forward and backward (spmv_into_rows and below).
// The backward runs the same kernel over the compressed columns (dx = grad_out @ W reads dyT rows
// through row_indices, values through csc_to_csr), and computes dvalues as a sampled product
// (SDDMM): for every kept (m, k), dot(dyT[m, :], xT[k, :]), eight kept weights at a time with one
// horizontal reduction per eight dot products.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <pyfinetune/checks.h>
#include <pyfinetune/cpu_alloc.h>
#include <pyfinetune/csr_kernels_avx512.h>
#include <pyfinetune/csr_walk.h>
#include <pyfinetune/masked_matmul.h>

namespace pyfinetune {
namespace {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

at::Tensor not_needed(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

// ---------------------------------------------------------------------------------------------
// Dense masked path

// dst[i] = mask[i] ? src[i] : +0, on the bits (bool is 0 or 1, so -mask is all ones or zero):
// a select, not a product, so that an inf or NaN stored at a pruned position does not leak
// into the result; and a loop the compiler vectorizes for every element size (torch's where
// with a broadcast zero measured 3x slower than a copy here).
template <typename bits_t>
void select_bits(const bits_t* src, const bool* mask, bits_t* dst, int64_t n) {
  at::parallel_for(0, n, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      dst[i] = src[i] & static_cast<bits_t>(-static_cast<bits_t>(mask[i]));
    }
  });
}

// `t` with exact zeros where mask is false, written into `out` (which may be `t` itself). All
// three have t's shape; t and out contiguous.
void apply_mask(const at::Tensor& t, const at::Tensor& mask, at::Tensor& out) {
  const at::Tensor m = mask.contiguous();
  const int64_t n = t.numel();
  switch (t.element_size()) {
    case 2:
      select_bits(static_cast<const uint16_t*>(t.const_data_ptr()), m.const_data_ptr<bool>(),
                  static_cast<uint16_t*>(out.mutable_data_ptr()), n);
      break;
    case 4:
      select_bits(static_cast<const uint32_t*>(t.const_data_ptr()), m.const_data_ptr<bool>(),
                  static_cast<uint32_t*>(out.mutable_data_ptr()), n);
      break;
    case 8:
      select_bits(static_cast<const uint64_t*>(t.const_data_ptr()), m.const_data_ptr<bool>(),
                  static_cast<uint64_t*>(out.mutable_data_ptr()), n);
      break;
    default:
      TORCH_CHECK(false, check_message("pyfinetune: unexpected element size ", t.element_size()));
  }
}

at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask) {
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(w);
  apply_mask(w, mask, out);
  return out;
}

at::Tensor masked_matmul_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                             const std::optional<at::Tensor>& bias) {
  check_masked_matmul_args(x, weight, mask, bias);
  const at::Tensor w = masked_weight(weight, mask);
  if (bias.has_value() && bias->defined()) {
    return at::addmm(*bias, x, w.t());
  }
  return at::mm(x, w.t());
}

// d(loss)/d(weight) sampled at the kept positions of `mask` (an SDDMM over the mask's compressed
// rows, scattered into a dense [M, K] gradient with +0 elsewhere), or an undefined tensor where the
// dense product is expected to be faster (see sampled_grad_pays). Defined after csr_linear's kernels.
at::Tensor sampled_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_matmul_backward_cpu(const at::Tensor& grad_out,
                                                                          const at::Tensor& x,
                                                                          const at::Tensor& weight,
                                                                          const at::Tensor& mask,
                                                                          std::array<bool, 3> output_mask,
                                                                          bool dense_grad) {
  check_masked_matmul_backward_args(grad_out, x, weight, mask);
  at::Tensor dx = not_needed(x), dweight = not_needed(x), dbias = not_needed(x);
  if (output_mask[0]) {
    dx = at::mm(grad_out, masked_weight(weight, mask));
  }
  if (output_mask[1]) {
    // Only the kept positions' dot products where the mask is sparse enough for that to pay (the
    // issue's SDDMM); else the dense product, masked.
    at::Tensor sampled = dense_grad ? at::Tensor() : sampled_weight_grad(grad_out, x, mask);
    if (sampled.defined()) {
      dweight = sampled;
    } else {
      dweight = at::mm(grad_out.t(), x).contiguous();  // a new tensor: masked in place
      if (!dense_grad) {
        apply_mask(dweight, mask, dweight);
      }
    }
  }
  if (output_mask[2]) {
    // float32 accumulation for 16-bit grad_out (torch's CPU sum accumulates in float).
    dbias = at::sum(grad_out, {0});
  }
  return {dx, dweight, dbias};
}

// ---------------------------------------------------------------------------------------------
// Sparse path: layout helpers

// The transposed operands of csr_linear (xT; dyT, xT: slots A and C, on the calling thread) and
// dx's gathered values (slot B, in each worker thread) are temporaries of a few MiB per call. A
// fresh buffer of that size is a fresh mmap, and its first touch costs a page fault and a page
// clear per 4 KiB: measured ~1 ms per 4 MiB buffer here, a sizeable part of a 90%-sparse forward.
// Each thread therefore keeps one buffer per slot and reuses it (grown when needed) across calls;
// larger temporaries than PYFINETUNE_CPU_SCRATCH_MB (default kMaxScratchBytes, 0: none kept) are
// allocated per call with the huge-page hint instead, so that a rare huge shape does not stay
// resident.
// A and C: the transposed operands (calling thread); B: dx's gathered values; D and E: the
// tile-major copies of a row range (spmm_tile_major_rows); B, D and E in the worker threads.
enum ScratchSlot { kScratchA = 0, kScratchB = 1, kScratchC = 2, kScratchD = 3, kScratchE = 4, kScratchSlots = 5 };
constexpr int64_t kMaxScratchBytes = int64_t{64} << 20;

// An uninitialized [rows, cols] tensor of `dtype` on the CPU, valid until this thread asks for
// the same slot again (the callers use it within one kernel call and return none of it).
at::Tensor scratch(ScratchSlot slot, int64_t rows, int64_t cols, at::ScalarType dtype) {
  const at::TensorOptions options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > env_megabytes("csr_linear", "PYFINETUNE_CPU_SCRATCH_MB", kMaxScratchBytes, "no buffer kept")) {
    return empty_streaming({rows, cols}, options);
  }
  thread_local std::array<at::Tensor, kScratchSlots> buffers;
  at::Tensor& buf = buffers[slot];
  if (!buf.defined() || buf.nbytes() < static_cast<size_t>(bytes)) {
    buf = at::Tensor();  // free the old one first
    buf = empty_streaming({std::max<int64_t>(bytes, 1)}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
  }
  return buf.narrow(0, 0, bytes).view(dtype).view({rows, cols});
}


template <typename acc_t>
constexpr int64_t kLanes = Vectorized<acc_t>::size();

// Batch-block (panel) width: the accumulators of one output row, held in registers. An AVX-512
// build has 32 vector registers: 8 accumulators of 16 floats (512 bytes, 128 floats, 64 doubles)
// plus the broadcast weight and the loads; an AVX2 build has 16: 8 accumulators of 8 floats (256
// bytes, 64 floats). A wider panel walks the pattern (index, value, address, loop control) once
// per 8 vector FMAs instead of 4: measured 5-10% faster at 90% sparsity and 10-15% at 70% than
// 64 floats on AVX-512 (N = 256, K = M = 4096). The AVX-512 float kernels, chosen at run time,
// take panels up to avx512::kPanelFloats, so they serve both builds.
constexpr int64_t kPanelBuildBytes = kLanes<float> >= 16 ? 512 : 256;
template <typename acc_t>
constexpr int kPanelVecs = static_cast<int>(kPanelBuildBytes / sizeof(acc_t) / kLanes<acc_t>);
static_assert(kPanelVecs<float> * kLanes<float> <= avx512::kPanelFloats,
              "the float panel must fit the AVX-512 kernels' (avx512::kPanelFloats)");
static_assert(kPanelVecs<float> == 8 && kPanelVecs<double> == 8, "8 accumulators per row");
template <typename acc_t>
constexpr int64_t kPanelBytes = kPanelVecs<acc_t> * kLanes<acc_t> * sizeof(acc_t);
// Tiles of the operand rows read by a panel (see choose_tile). A tile pays for its (row, tile)
// segments: each loads and stores the row's accumulators, and its variable length costs a
// mispredicted loop exit; so a tile is grown from its smallest size (one for the SpMM, whose
// segments are cheap, one for the SDDMM, which reduces its dot products per segment) until the
// mean segment holds kTargetSegment kept weights, up to kMaxTileBytes. Measured on the 2-core
// Xeon (AVX-512, 128-float panels, one thread, N = 256, K = M = 4096), forward / dvalues:
//   sparsity  tile rows (bytes)          forward ms                  dvalues ms
//   90%       64 / 128 / 256 (32-128 K)  17.4 / 16.4 / 17.0          29 / 20.5 / 20.5
//   70%       32 / 64 / 128              39.5 / 34.3 / 37.3          80 / 50 / 48
//   95%       64 / 128 / 256 / 512       14.0 / 11.9 / 10.9 / 11.2   17.9 / 13.2 / 12.5 / 12.7
// Tiles larger than L1 still pay: they keep the panel's working set in L2 with few segments.
constexpr int64_t kTileBytes = 32 * 1024;
constexpr int64_t kSddmmTileBytes = 64 * 1024;
constexpr int64_t kMaxTileBytes = 256 * 1024;
constexpr double kTargetSegment = 12.0;
// Tile only when a (row, tile) segment holds this many kept weights on average even in the
// largest tile; sparser patterns pay more for the segments than the tiles save.
constexpr double kMinSegment = 4.0;
// Work items are row ranges, at least kPartsPerThread per thread so that a slowed thread (a shared
// machine) hands work to the others, and at most kPartBytes of panel per range: a range's panel
// (its rows' accumulators in the SpMM, their dyT rows in the SDDMM) stays in L2 beside the operand
// tile, while every range reads the whole operand (xT) once per panel, so ranges smaller than
// that only read it more often. `benchmarks/bench_prune.py --threads 2`, N = 256, K = M = 4096:
// forward 8.1 -> 7.9 ms at 90% and 2.9 -> 2.4 ms at 99% against 8 ranges per thread
// (prune-cpu-20261126-0723, -0916); one thread (4 MiB of panel at 90%) needs the cap: 1365-row
// ranges measured 5% slower than 512.
constexpr int64_t kPartsPerThread = 2;
constexpr int64_t kPartBytes = 512 * 1024;
// Cost of a row besides its kept weights, in kept-weight units (zero and store the accumulators).
constexpr int64_t kRowCost = 4;
int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

// Row stride of a transposed operand with `rows` columns: whole vectors and, once a row spans
// cache lines, an odd number of lines. A power-of-two stride (N = 256 floats: 1 KiB) would map
// the same panel of every row to a few cache sets, and the slice that must stay in L2 would use
// a third of it (measured: 6x slower at N = 256).
template <typename acc_t>
int64_t padded_ld(int64_t rows) {
  constexpr int64_t kLine = 64 / sizeof(acc_t);
  int64_t ld = round_up(std::max<int64_t>(rows, 1), kLanes<acc_t>);
  if (ld >= kLine) {
    ld = round_up(ld, kLine);
    if ((ld / kLine) % 2 == 0) {
      ld += kLine;
    }
  }
  return ld;
}

// Calls fn(o0, o1, i0, i1) for the 32 x 32 tiles of [0, outer) x [0, inner), the outer tiles
// spread over the threads: a transpose tile's strided reads and its writes both stay in L1.
template <typename Fn>
void for_each_tile(int64_t outer, int64_t inner, const Fn& fn) {
  constexpr int64_t kT = 32;
  at::parallel_for(0, (outer + kT - 1) / kT, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * kT, o1 = std::min(outer, o0 + kT);
      for (int64_t i0 = 0; i0 < inner; i0 += kT) {
        fn(o0, o1, i0, std::min(inner, i0 + kT));
      }
    }
  });
}

// dst [cols, ld] = src^T, converted to acc_t, with columns [rows, ld) of dst zeroed. src is
// [rows, cols] with element (r, c) at src[r * s0 + c * s1] (any strides).
template <typename src_t, typename acc_t>
void transpose_in(const src_t* src, int64_t rows, int64_t cols, int64_t s0, int64_t s1, acc_t* dst, int64_t ld) {
  // Rows of unit stride, float32 or (converted exactly while loaded) bfloat16 / float16: 16 x 16
  // blocks transposed in AVX-512 registers (with the same for the output, store_block).
  // `benchmarks/bench_prune.py --threads 2`, 90% forward: 8.79 ms with scalar transposes
  // (prune-cpu-20261126-0509), 8.58 ms with these (-0711); bfloat16 x [256, 4096] alone: 0.92 ms
  // scalar, 0.34 ms in registers like float32.
  constexpr bool kVectorTypes =
      std::is_same_v<acc_t, float> && (std::is_same_v<src_t, float> || std::is_same_v<src_t, c10::BFloat16> ||
                                       std::is_same_v<src_t, c10::Half>);
  const bool vector = kVectorTypes && s1 == 1 && avx512::available();
  for_each_tile(cols, std::max<int64_t>(rows, 1), [&](int64_t c0, int64_t c1, int64_t r0, int64_t r1) {
    bool in_registers = false;
    if constexpr (kVectorTypes) {
      if (vector && r0 < rows) {
        const src_t* block = src + r0 * s0 + c0;
        acc_t* out = dst + c0 * ld + r0;
        const int64_t nr = std::min(r1, rows) - r0, nc = c1 - c0;
        if constexpr (std::is_same_v<src_t, float>) {
          avx512::transpose(block, s0, out, ld, nr, nc, nullptr);
        } else if constexpr (std::is_same_v<src_t, c10::BFloat16>) {
          avx512::transpose_bf16(reinterpret_cast<const uint16_t*>(block), s0, out, ld, nr, nc);
        } else {
          avx512::transpose_f16(reinterpret_cast<const uint16_t*>(block), s0, out, ld, nr, nc);
        }
        in_registers = true;
      }
    }
    if (!in_registers) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < std::min(r1, rows); ++r) {
          dst[c * ld + r] = static_cast<acc_t>(src[r * s0 + c * s1]);
        }
      }
    }
    if (r1 >= rows) {  // the last tile of rows: the padding columns [rows, ld) of dst
      for (int64_t c = c0; c < c1; ++c) {
        std::fill(dst + c * ld + rows, dst + (c + 1) * ld, acc_t(0));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Work split and the walk over a compressed pattern

// Boundaries 0 = b[0] <= ... <= b[parts] = rows cutting the rows into ranges of equal cost, where
// the rows before r cost ptr[r] + kRowCost * r (ptr non-decreasing, so the cost is monotone).
std::vector<int64_t> balanced_row_splits(const int32_t* ptr, int64_t rows, int64_t parts) {
  std::vector<int64_t> b(parts + 1, rows);
  b[0] = 0;
  const auto cost = [&](int64_t r) { return static_cast<int64_t>(ptr[r]) + kRowCost * r; };
  const int64_t total = cost(rows);
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = total * p / parts;
    int64_t lo = b[p - 1], hi = rows;  // smallest r in [lo, hi] with cost(r) >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (cost(mid) < target) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    b[p] = lo;
  }
  return b;
}

// The number of row ranges for `rows` rows of `row_bytes` bytes of panel each.
int64_t num_parts(int64_t rows, int64_t row_bytes) {
  const int64_t by_size = (rows * row_bytes + kPartBytes - 1) / kPartBytes;
  return std::max<int64_t>(1, std::min<int64_t>(rows, std::max(at::get_num_threads() * kPartsPerThread, by_size)));
}

// Run fn(task) for task in [0, tasks), handed out dynamically to the threads in increasing order.
template <typename Fn>
void run_tasks(int64_t tasks, const Fn& fn) {
  if (tasks <= 0) {
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < tasks; t = next.fetch_add(1)) {
      fn(t);
    }
  });
}

// Operand rows per tile for a panel of `panel_bytes` per row, starting from min_bytes per tile
// (kTileBytes or kSddmmTileBytes), or 0 where tiling does not pay (too sparse, too few columns to
// tile, or indices not sorted within the rows).
int64_t choose_tile(int64_t nnz, int64_t rows, int64_t cols, int64_t panel_bytes, bool sorted, int64_t min_bytes) {
  if (!sorted || rows == 0 || cols == 0) {
    return 0;
  }
  const double density = static_cast<double>(nnz) / (static_cast<double>(rows) * static_cast<double>(cols));
  const int64_t max_tile = std::max<int64_t>(1, kMaxTileBytes / panel_bytes);
  int64_t tile = std::max<int64_t>(1, std::min(min_bytes, kMaxTileBytes) / panel_bytes);
  while (density * static_cast<double>(tile) < kTargetSegment && tile < max_tile) {
    tile = std::min(2 * tile, max_tile);
  }
  if (cols <= tile || density * static_cast<double>(tile) < kMinSegment) {
    return 0;
  }
  return tile;
}

// ---------------------------------------------------------------------------------------------
// SpMM: out[r, panel] = sum_e a(e) * b[idx[e], panel] over the row's entries, a(e) =
// values[perm ? perm[e] : e]; the panel (V vectors at column n0) accumulates in registers.

template <typename acc_t>
struct SpmmArgs {
  Pattern pat;
  const acc_t* values;  // entry e's value: values[e - value_base], or values[perm[e]] with perm
  const int32_t* perm;  // nullptr: values in entry order
  const acc_t* b;       // [pat.cols, ld]
  acc_t* out;           // [pat.rows, ld], or see out_ld
  int64_t ld;
  int64_t value_base = 0;
  // Row r's panel at column n0 is at out + (r - out_r0) * out_ld + (n0 - out_n0): out_ld = 0
  // means out [pat.rows, ld]; else out holds only the rows from out_r0 of the panel at out_n0.
  int64_t out_ld = 0;
  int64_t out_r0 = 0;
  int64_t out_n0 = 0;
  // Panel width in acc_t values (spmm_panel_floats); 0: the portable kernels' kPanelVecs vectors.
  int64_t panel = 0;

  C10_ALWAYS_INLINE acc_t* out_at(int64_t r, int64_t n0) const {
    return out_ld == 0 ? out + r * ld + n0 : out + (r - out_r0) * out_ld + (n0 - out_n0);
  }
};

// The segment kernels read values in entry order; spmm resolves perm before calling them.
template <typename acc_t, int V>
struct SpmmSegment {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = kLanes<acc_t>;
  const SpmmArgs<acc_t>& a;
  int64_t n0;

  C10_ALWAYS_INLINE void prefetch(int64_t r, int64_t e) const {
    __builtin_prefetch(a.pat.idx + e, 0, 3);
    __builtin_prefetch(a.values + (e - a.value_base), 0, 3);
    prefetch_bytes(a.out_at(r, n0), V * W * sizeof(acc_t), true);
  }

  C10_ALWAYS_INLINE int64_t run(int64_t r, int64_t e, int64_t e1, int64_t k1) const {
    acc_t* o = a.out_at(r, n0);
    // The row's first segment starts from zero (only rows without kept weights are zeroed first).
    const bool first = e == a.pat.ptr[r];
    Vec acc[V];
    for (int v = 0; v < V; ++v) {
      acc[v] = first ? Vec(acc_t(0)) : Vec::loadu(o + v * W);
    }
    do {
      const Vec w(a.values[e - a.value_base]);
      const acc_t* row = a.b + static_cast<int64_t>(a.pat.idx[e]) * a.ld + n0;
      for (int v = 0; v < V; ++v) {
        acc[v] = at::vec::fmadd(w, Vec::loadu(row + v * W), acc[v]);
      }
    } while (++e < e1 && a.pat.idx[e] < k1);
    for (int v = 0; v < V; ++v) {
      acc[v].store(o + v * W);
    }
    return e;
  }
};

// The function of one panel of rows [r0, r1) at column n0, one per panel width in vectors.
template <typename Args>
using PanelFn = void (*)(const Args&, int64_t, int64_t, int64_t, int32_t*);

// {&Panels::run<1>, ..., &Panels::run<kPanelVecs>}: indexed by the panel's vectors - 1.
template <typename Panels, typename Args, int... Vs>
constexpr std::array<PanelFn<Args>, sizeof...(Vs)> panel_table(std::integer_sequence<int, Vs...>) {
  return {&Panels::template run<Vs + 1>...};
}

template <typename acc_t>
struct SpmmPanels {
  template <int V>
  static void run(const SpmmArgs<acc_t>& a, int64_t r0, int64_t r1, int64_t n0, int32_t* cursor) {
    constexpr int64_t W = kLanes<acc_t>;
    for (int64_t r = r0; r < r1; ++r) {
      if (a.pat.ptr[r] == a.pat.ptr[r + 1]) {
        std::fill(a.out_at(r, n0), a.out_at(r, n0) + V * W, acc_t(0));
      }
    }
    walk_pattern(a.pat, r0, r1, cursor, SpmmSegment<acc_t, V>{a, n0});
  }
};

// The SpMM's panel width for a pattern of nnz kept weights in [rows, cols]: the AVX-512 kernels'
// wide panels (avx512::kPanelFloats) for float32 patterns of at least kWidePanelDensity kept
// weights, else the portable panel. Wide panels read the kept weights and indices half as often
// but load and store twice the accumulators per row segment, and their operand tiles (choose_tile)
// take twice the bytes for the same segment length: at 90% sparsity 128 KiB against 64 KiB, which
// L2 serves more slowly. Measured with two threads (N = 256, K = M = 4096, forward, the kernels
// of prune-cpu-20261126-1025, contenders interleaved in one process), narrow over wide: 0.99x at
// 70%, 0.99x at 80%, 1.11x at 85%, 1.06-1.09x at 90%, 1.02x at 95%, 1.7x at 99%; forward +
// backward 1.05x at 85% and 1.06x at 90%.
constexpr double kWidePanelDensity = 0.18;

template <typename acc_t>
int64_t spmm_panel_floats(int64_t nnz, int64_t rows, int64_t cols) {
  if constexpr (std::is_same_v<acc_t, float>) {
    const double cells = static_cast<double>(rows) * static_cast<double>(cols);
    if (avx512::available() && cells > 0 && static_cast<double>(nnz) >= kWidePanelDensity * cells) {
      return avx512::kPanelFloats;
    }
  }
  return kPanelVecs<acc_t> * kLanes<acc_t>;
}

template <typename acc_t>
int64_t panel_of(const SpmmArgs<acc_t>& a) {
  return a.panel > 0 ? a.panel : kPanelVecs<acc_t> * kLanes<acc_t>;
}

// One panel of rows [r0, r1): the AVX-512 kernel for float32 where the CPU has it, else the
// portable one with the panel's number of vectors.
template <typename acc_t>
void spmm_panel_any(const SpmmArgs<acc_t>& a, int64_t r0, int64_t r1, int64_t n0, int32_t* cursor) {
  static constexpr auto table =
      panel_table<SpmmPanels<acc_t>, SpmmArgs<acc_t>>(std::make_integer_sequence<int, kPanelVecs<acc_t>>{});
  const int64_t width = std::min<int64_t>(panel_of(a), a.ld - n0);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512::available()) {
      const bool rows = a.out_ld == 0;
      avx512::spmm_panel({a.pat, a.values, a.value_base, a.b, a.out, a.ld, rows ? a.ld : a.out_ld,
                          rows ? 0 : a.out_r0, rows ? 0 : a.out_n0},
                         r0, r1, n0, width, cursor);
      return;
    }
  }
  table[width / kLanes<acc_t> - 1](a, r0, r1, n0, cursor);
}

// y[i, r] = buf[(r - r0) * 64 + (i - n0)] (+ bias[r]) for i in [n0, n1), r in [r0, r1): a
// panel of rows accumulated in a buffer, transposed into y [n, rows] (row-major).
template <typename acc_t, typename dst_t>
void store_block(const acc_t* buf, int64_t kPanel, int64_t r0, int64_t r1, int64_t n0, int64_t n1, int64_t rows,
                 const dst_t* bias, dst_t* y) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<dst_t, float>) {
    if (avx512::available()) {  // 16 x 16 blocks in registers, the bias added to each
      avx512::transpose(buf, kPanel, y + n0 * rows + r0, rows, r1 - r0, n1 - n0, bias != nullptr ? bias + r0 : nullptr);
      return;
    }
  }
  if constexpr (std::is_same_v<acc_t, float> && (std::is_same_v<dst_t, c10::BFloat16> || std::is_same_v<dst_t, c10::Half>)) {
    if (avx512::available()) {  // the same, rounded once to the 16-bit type (bfloat16 y [256, 4096]
                                // from float32 blocks: 0.58 -> 0.33 ms with two threads)
      thread_local std::vector<float> bias_f;
      if (bias != nullptr) {
        bias_f.assign(bias + r0, bias + r1);  // converted exactly
      }
      uint16_t* out = reinterpret_cast<uint16_t*>(y + n0 * rows + r0);
      const float* add = bias != nullptr ? bias_f.data() : nullptr;
      if constexpr (std::is_same_v<dst_t, c10::BFloat16>) {
        avx512::transpose_to_bf16(buf, kPanel, out, rows, r1 - r0, n1 - n0, add);
      } else {
        avx512::transpose_to_f16(buf, kPanel, out, rows, r1 - r0, n1 - n0, add);
      }
      return;
    }
  }
  // Blocks of kRows buffer rows: their lines stay in L1 while every y row takes its kRows values
  // from them (a whole column of the buffer per y row read a new line per value).
  constexpr int64_t kRows = 16;
  for (int64_t rb = r0; rb < r1; rb += kRows) {
    const int64_t re = std::min(r1, rb + kRows);
    for (int64_t i = n0; i < n1; ++i) {
      dst_t* yr = y + i * rows;
      const acc_t* src = buf + (i - n0);
      if (bias != nullptr) {
        for (int64_t r = rb; r < re; ++r) {
          yr[r] = static_cast<dst_t>(src[(r - r0) * kPanel] + static_cast<acc_t>(bias[r]));
        }
      } else {
        for (int64_t r = rb; r < re; ++r) {
          yr[r] = static_cast<dst_t>(src[(r - r0) * kPanel]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tile-major SpMM (CPUs without the AVX-512 kernels)
//
// On a CPU with 32 KiB of L1 and 512 KiB of L2 per core (the AVX2-only AMD EPYC of benchmarks/
// results/prune-cpu-20261129-*, Zen 3), the tiled walk of walk_pattern spends more on its (row,
// tile) segments than on its FMAs: each segment finds the row's next indices and values where the
// row's previous segment left them (a jump per row into arrays larger than L2, which the hardware
// prefetcher does not follow), tests every index against the tile's end, and leaves its loop at
// an unpredictable count; and it does so once per panel. A stand-alone copy of the loop (one
// thread, N = 256, K = M = 4096, 90% sparsity, 64-float panels, 128-row tiles) took 65 ms, and
// still 51 ms with every operand row in L1 (24 ms untiled there): the segments, not the memory.
// Here each work item first copies its rows' kept weights in tile-major order (tile by tile, row
// by row, values converted on the way; one pass over the entries for all panels), with the offset
// of every (tile, row) segment, and the panels then stream through the copy: indices and values
// read in order, each segment's length known. The same stand-alone test: 30 ms, copy included.
// The AVX-512 kernels keep the walk (measured with it on AVX-512 CPUs, whose L2 is larger).

// The tile-major copy of rows [r0, r1): segment (t, r) is entries [seg[t * rows + r],
// seg[t * rows + r + 1]) of idx and values (offsets from the copy's start).
template <typename acc_t>
struct TileMajorRows {
  const int32_t* seg;
  const int32_t* idx;
  const acc_t* values;
  int64_t rows;
  int64_t tiles;
  // The buffers behind the pointers: a thread's scratch slots, or (above the scratch limit)
  // tensors of this call only, which must outlive the pointers.
  at::Tensor ints_storage;
  at::Tensor values_storage;
};

// fn(r, e, e1) for every non-empty segment of the copy, tile by tile, row by row.
template <typename acc_t, typename Fn>
C10_ALWAYS_INLINE void for_each_segment(const TileMajorRows<acc_t>& c, const Fn& fn) {
  for (int64_t t = 0; t < c.tiles; ++t) {
    const int32_t* seg = c.seg + t * c.rows;
    for (int64_t r = 0; r < c.rows; ++r) {
      if (seg[r] < seg[r + 1]) {
        fn(r, static_cast<int64_t>(seg[r]), static_cast<int64_t>(seg[r + 1]));
      }
    }
  }
}

// The copy pays when several panels stream through it. Sparser patterns keep the walk: at 99%
// sparsity (1% density, 1024-row tiles) the copy cost more than it saved (forward 6.7 ms walked,
// 7.5 ms tile-major: prune-cpu-20261129-0639 and -0732), at 95% it gained (19.7 -> 14.8 ms). So do
// batches of one panel (N <= 64 on AVX2): at N = 33 / 48 / 64 and 70% sparsity the copy made the
// forward 12.1 / 12.4 / 14.6 -> 15.9 / 17.8 / 19.5 ms, while from two panels (N = 100, 128) it
// gained (39 / 44 -> 26 / 29 ms; ad hoc A/B of the two builds, 2 threads, K = M = 4096).
constexpr double kTileMajorMinDensity = 0.02;
constexpr int64_t kTileMajorMinPanels = 2;

// Whether p keeps at least `fraction` of its rows x cols cells (false for an empty shape).
bool keeps_at_least(const Pattern& p, double fraction) {
  const double cells = static_cast<double>(p.rows) * static_cast<double>(p.cols);
  return cells > 0 && static_cast<double>(p.ptr[p.rows] - p.ptr[0]) >= fraction * cells;
}

bool tile_major_pays(const Pattern& p, int64_t panels) {
  return p.tile > 0 && panels >= kTileMajorMinPanels && keeps_at_least(p, kTileMajorMinDensity);
}

// Whether the SpMM of `a` over the first n columns of its operand takes the tile-major path
// (values in entry order or through perm: the copy resolves perm on the way).
template <typename acc_t>
bool use_tile_major(const SpmmArgs<acc_t>& a, int64_t n) {
  const int64_t panel = kPanelVecs<acc_t> * kLanes<acc_t>;
  const int64_t panels = (std::min(n, a.ld) + panel - 1) / panel;
  if (!tile_major_pays(a.pat, panels) || panel_of(a) != panel) {
    return false;
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512::available()) {
      return false;
    }
  }
  return true;
}

// Walks rows [r0, r1) of a tiled pattern tile by tile, row by row: seg[t * rows + r] = the first
// copy position of segment (t, r) (seg has tiles * rows + 1 entries), idx[q] = the entry's index
// and emit(q, e) for the entry e it copies to position q; ahead(e) hints entry e a few rows
// ahead. cursor: scratch for r1 - r0 entries.
template <typename Emit, typename Ahead>
void tile_major_order(const Pattern& p, int64_t r0, int64_t r1, int32_t* seg, int32_t* cursor, int32_t* idx,
                         const Emit& emit, const Ahead& ahead) {
  const int64_t rows = r1 - r0, tile = p.tile, tiles = (p.cols + tile - 1) / tile;
  std::copy(p.ptr + r0, p.ptr + r1, cursor);
  int32_t q = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t k1 = std::min(p.cols, (t + 1) * tile);
    int32_t* seg_t = seg + t * rows;
    for (int64_t r = 0; r < rows; ++r) {
      if (r + kPrefetchRows < rows) {
        __builtin_prefetch(p.idx + cursor[r + kPrefetchRows], 0, 3);
        ahead(cursor[r + kPrefetchRows]);
      }
      seg_t[r] = q;
      int64_t e = cursor[r];
      const int64_t end = p.ptr[r0 + r + 1];
      for (; e < end && p.idx[e] < k1; ++e, ++q) {
        idx[q] = p.idx[e];
        emit(q, e);
      }
      cursor[r] = static_cast<int32_t>(e);
    }
  }
  seg[tiles * rows] = q;
  TORCH_INTERNAL_ASSERT(q == p.ptr[r1] - p.ptr[r0], "pyfinetune.csr_linear: the tile-major copy took ", q, " of ",
                        p.ptr[r1] - p.ptr[r0], " entries");
}

// Slot D of a tile-major copy of rows [r0, r1) of a tiled pattern: the segment offsets (tiles *
// rows + 1), tile_major_order's cursor (rows), the indices (count), then `extra` ints per entry.
struct TileMajorInts {
  at::Tensor storage;
  int32_t* seg;
  int32_t* cursor;
  int32_t* idx;
  int32_t* extra;
  int64_t rows;
  int64_t tiles;
  int64_t count;
};

TileMajorInts tile_major_ints(const Pattern& p, int64_t r0, int64_t r1, int64_t extra) {
  const int64_t rows = r1 - r0, tiles = (p.cols + p.tile - 1) / p.tile, count = p.ptr[r1] - p.ptr[r0];
  const int64_t segs = tiles * rows + 1;
  at::Tensor storage = scratch(kScratchD, 1, segs + rows + (1 + extra) * count, at::kInt);
  int32_t* seg = storage.mutable_data_ptr<int32_t>();
  return {storage, seg, seg + segs, seg + segs + rows, seg + segs + rows + count, rows, tiles, count};
}

// The tile-major copy of rows [r0, r1) of a tiled SpMM pattern, with the values (read through
// a.perm when it is set: dx's values, so that no gathered copy in entry order is made first), in
// this worker thread's scratch slots D and E (valid until its next copy).
template <typename acc_t>
TileMajorRows<acc_t> copy_tile_major(const SpmmArgs<acc_t>& a, int64_t r0, int64_t r1) {
  const TileMajorInts ints = tile_major_ints(a.pat, r0, r1, 0);
  const at::Tensor vals =
      scratch(kScratchE, 1, std::max<int64_t>(ints.count, 1), c10::CppTypeToScalarType<acc_t>::value);
  acc_t* values = vals.mutable_data_ptr<acc_t>();
  if (a.perm != nullptr) {
    const acc_t* src = a.values;
    const int32_t* perm = a.perm;
    // (A prefetch of the value 8 entries ahead measured no faster: 90% sparsity, dx alone, one thread.)
    tile_major_order(
        a.pat, r0, r1, ints.seg, ints.cursor, ints.idx, [&](int32_t q, int64_t e) { values[q] = src[perm[e]]; },
        [&](int64_t e) { __builtin_prefetch(perm + e, 0, 3); });
  } else {
    const acc_t* src = a.values - a.value_base;
    tile_major_order(
        a.pat, r0, r1, ints.seg, ints.cursor, ints.idx, [&](int32_t q, int64_t e) { values[q] = src[e]; },
        [&](int64_t e) { __builtin_prefetch(src + e, 0, 3); });
  }
  return {ints.seg, ints.idx, values, ints.rows, ints.tiles, ints.storage, vals};
}

// out[r, panel] = sum over row r's entries of values[e] * b[idx[e], panel] (V vectors at n0),
// for the rows of the copy; out row r at out + r * out_ld.
template <typename acc_t>
struct TileMajorPanels {
  template <int V>
  static void run(const TileMajorRows<acc_t>& c, const acc_t* b, int64_t ld, int64_t n0, acc_t* out, int64_t out_ld) {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t W = kLanes<acc_t>;
    for (int64_t r = 0; r < c.rows; ++r) {
      std::fill(out + r * out_ld, out + r * out_ld + V * W, acc_t(0));
    }
    const acc_t* base = b + n0;
    for_each_segment(c, [&](int64_t r, int64_t e, int64_t e1) {
      acc_t* o = out + r * out_ld;
      Vec acc[V];
      for (int v = 0; v < V; ++v) {
        acc[v] = Vec::loadu(o + v * W);
      }
      do {
        const Vec w(c.values[e]);
        const acc_t* row = base + static_cast<int64_t>(c.idx[e]) * ld;
        for (int v = 0; v < V; ++v) {
          acc[v] = at::vec::fmadd(w, Vec::loadu(row + v * W), acc[v]);
        }
      } while (++e < e1);
      for (int v = 0; v < V; ++v) {
        acc[v].store(o + v * W);
      }
    });
  }
};

template <typename acc_t>
using TileMajorFn = void (*)(const TileMajorRows<acc_t>&, const acc_t*, int64_t, int64_t, acc_t*, int64_t);

template <typename acc_t, int... Vs>
constexpr std::array<TileMajorFn<acc_t>, sizeof...(Vs)> tile_major_table(std::integer_sequence<int, Vs...>) {
  return {&TileMajorPanels<acc_t>::template run<Vs + 1>...};
}

// Rows [r0, r1) of the SpMM, every panel, written into y [n, a.pat.rows] (+ bias) like
// spmm_into_rows does: the tile-major copy once, then each panel into a buffer and out to y.
template <typename acc_t, typename dst_t>
void spmm_tile_major_rows(const SpmmArgs<acc_t>& a, int64_t r0, int64_t r1, int64_t n, const dst_t* bias, dst_t* y) {
  static constexpr auto table = tile_major_table<acc_t>(std::make_integer_sequence<int, kPanelVecs<acc_t>>{});
  const int64_t kPanel = kPanelVecs<acc_t> * kLanes<acc_t>;
  const TileMajorRows<acc_t> copy = copy_tile_major(a, r0, r1);
  thread_local std::vector<acc_t> buf;
  buf.resize(static_cast<size_t>((r1 - r0) * kPanel));
  for (int64_t n0 = 0; n0 < std::min(n, a.ld); n0 += kPanel) {
    const int64_t width = std::min<int64_t>(kPanel, a.ld - n0);
    table[width / kLanes<acc_t> - 1](copy, a.b, a.ld, n0, buf.data(), kPanel);
    store_block<acc_t, dst_t>(buf.data(), kPanel, r0, r1, n0, std::min(n, n0 + kPanel), a.pat.rows, bias, y);
  }
}

// The forward's spmm, writing y [n, rows] (row-major, dst_t) directly with the bias added: each
// work item (panel, row range) accumulates its rows' panel in a per-thread buffer of
// (r1 - r0) x 64 floats (L2 resident) and then transposes it into y's block [n0, n0 + 64) x
// [r0, r1), so no yT [rows, ld] is written and read back by a separate transpose pass. Panels
// that hold only padding columns (n0 >= n) are skipped.
template <typename acc_t, typename dst_t>
void spmm_into_rows(const SpmmArgs<acc_t>& a, int64_t n, const dst_t* bias, dst_t* y) {
  const int64_t kPanel = panel_of(a);
  const int64_t rows = a.pat.rows;
  const int64_t parts = num_parts(rows, kPanel * static_cast<int64_t>(sizeof(acc_t)));
  const std::vector<int64_t> splits = balanced_row_splits(a.pat.ptr, rows, parts);
  if (use_tile_major(a, n)) {
    run_tasks(parts, [&](int64_t p) {
      if (splits[p] < splits[p + 1]) {
        spmm_tile_major_rows<acc_t, dst_t>(a, splits[p], splits[p + 1], n, bias, y);
      }
    });
    return;
  }
  const int64_t panels = (std::min(n, a.ld) + kPanel - 1) / kPanel;
  run_tasks(panels * parts, [&](int64_t t) {
    const int64_t p = t % parts, n0 = (t / parts) * kPanel;
    const int64_t r0 = splits[p], r1 = splits[p + 1];
    if (r0 == r1) {
      return;
    }
    thread_local std::vector<acc_t> buf;
    buf.resize(static_cast<size_t>((r1 - r0) * kPanel));
    std::vector<int32_t> cursor(a.pat.tile > 0 ? static_cast<size_t>(r1 - r0) : 0);
    SpmmArgs<acc_t> local = a;
    local.out = buf.data();
    local.out_ld = kPanel;
    local.out_r0 = r0;
    local.out_n0 = n0;
    spmm_panel_any(local, r0, r1, n0, cursor.data());
    store_block<acc_t, dst_t>(buf.data(), kPanel, r0, r1, n0, std::min(n, n0 + kPanel), rows, bias, y);
  });
}

// Whether dx's tile-major copy reads values[perm[e]] itself rather than from a gathered copy in
// entry order (one pass over the kept values fewer). In tile-major order the reads of perm and
// the values follow the segments, whose loop exits (an index test per entry) stall the scattered
// loads behind them, while the gather's sequential pass keeps many in flight: dx alone, N = 256,
// K = M = 4096, two threads, the two interleaved in one process (median of 50 calls each), read
// directly / gathered first: 47.6 / 54.3 ms at 70% sparsity, 35.6 / 36.3 at 80%, 20.3 / 19.8 at
// 90%, 16.5 / 15.1 at 95% (an ad hoc A/B: a temporary environment switch between the two paths in
// one build, not kept).
constexpr double kTileMajorPermMinDensity = 0.15;

// dx = grad_out @ W over the compressed columns (values reached through perm = csc_to_csr),
// written into dx [n, rows] (row-major, dst_t) directly. Reading values[perm[e]] is a random
// access per kept weight, which repeated for every panel (and, tiled, in an order that defeats
// the caches) measured 3-10x slower than the forward; so each work item is a whole row range:
// it gathers its rows' values once into a scratch buffer and then runs all panels over it, each
// panel accumulated in a per-thread buffer and transposed into dx like spmm_into_rows does. On
// the tile-major path of a dense enough pattern the gather is the copy's (kTileMajorPermMinDensity).
template <typename acc_t, typename dst_t>
void spmm_perm_into_rows(const SpmmArgs<acc_t>& a, int64_t n, dst_t* y) {
  const int64_t kPanel = panel_of(a);
  const int64_t rows = a.pat.rows;
  const int64_t parts = num_parts(rows, kPanel * static_cast<int64_t>(sizeof(acc_t)));
  const std::vector<int64_t> splits = balanced_row_splits(a.pat.ptr, rows, parts);
  const bool direct_copy = use_tile_major(a, n) && keeps_at_least(a.pat, kTileMajorPermMinDensity);
  run_tasks(parts, [&](int64_t p) {
    const int64_t r0 = splits[p], r1 = splits[p + 1];
    if (r0 == r1) {
      return;
    }
    if (direct_copy) {  // the copy reads values[perm[e]] itself
      spmm_tile_major_rows<acc_t, dst_t>(a, r0, r1, n, static_cast<const dst_t*>(nullptr), y);
      return;
    }
    const int64_t e0 = a.pat.ptr[r0], e1 = a.pat.ptr[r1];
    // Every entry is written below: an uninitialized scratch buffer of this thread.
    const at::Tensor gathered_buf = scratch(kScratchB, 1, e1 - e0, c10::CppTypeToScalarType<acc_t>::value);
    acc_t* gathered = gathered_buf.mutable_data_ptr<acc_t>();
    bool vector_gather = false;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (avx512::available()) {
        avx512::gather(a.values, a.perm + e0, gathered, e1 - e0);
        vector_gather = true;
      }
    }
    if (!vector_gather) {
      for (int64_t e = e0; e < e1; ++e) {
        gathered[e - e0] = a.values[a.perm[e]];
      }
    }
    SpmmArgs<acc_t> local{a.pat, gathered, nullptr, a.b, nullptr, a.ld, e0};
    local.panel = a.panel;
    if (use_tile_major(local, n)) {
      spmm_tile_major_rows<acc_t, dst_t>(local, r0, r1, n, static_cast<const dst_t*>(nullptr), y);
      return;
    }
    thread_local std::vector<acc_t> buf;
    buf.resize(static_cast<size_t>((r1 - r0) * kPanel));
    local.out = buf.data();
    local.out_ld = kPanel;
    local.out_r0 = r0;
    std::vector<int32_t> cursor(a.pat.tile > 0 ? static_cast<size_t>(r1 - r0) : 0);
    for (int64_t n0 = 0; n0 < std::min(n, a.ld); n0 += kPanel) {
      local.out_n0 = n0;
      spmm_panel_any(local, r0, r1, n0, cursor.data());
      store_block<acc_t, dst_t>(buf.data(), kPanel, r0, r1, n0, std::min(n, n0 + kPanel), rows, nullptr, y);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// SDDMM: out[e] = dot(dyT[r, :], xT[idx[e], :]) for the entries e of row r.

// sums[j] = the sum of the lanes of acc[j], j < 8.
template <typename acc_t>
inline void reduce8(const Vectorized<acc_t>* acc, acc_t* sums) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  if constexpr (std::is_same_v<acc_t, float>) {
    static_assert(Vectorized<float>::size() == 8, "AVX2 float vectors have 8 lanes");
    const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]);
    const __m256 t1 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]);
    const __m256 t3 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1);  // per 128-bit half: partial sums of acc 0..3
    const __m256 u1 = _mm256_hadd_ps(t2, t3);  // per 128-bit half: partial sums of acc 4..7
    const __m256 lo = _mm256_permute2f128_ps(u0, u1, 0x20);
    const __m256 hi = _mm256_permute2f128_ps(u0, u1, 0x31);
    _mm256_storeu_ps(sums, _mm256_add_ps(lo, hi));
    return;
  }
#endif
  constexpr int64_t W = kLanes<acc_t>;
  alignas(64) acc_t tmp[W];
  for (int j = 0; j < 8; ++j) {
    acc[j].store(tmp);
    acc_t s = 0;
    for (int64_t l = 0; l < W; ++l) {
      s += tmp[l];
    }
    sums[j] = s;
  }
}

template <typename acc_t>
struct SddmmArgs {
  Pattern pat;
  const acc_t* dyT;  // [pat.rows, ld]
  const acc_t* xT;   // [pat.cols, ld]
  acc_t* out;        // [nnz]: the first panel writes it, the others add into it
  int64_t ld;
  int64_t n;         // columns of dyT and xT that hold data; those from n on are zero padding
  bool add = false;  // set per panel by sddmm: false for the first (n0 = 0)
};

template <typename acc_t, int V>
struct SddmmSegment {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = kLanes<acc_t>;
  const SddmmArgs<acc_t>& a;
  int64_t n0;

  C10_ALWAYS_INLINE void prefetch(int64_t r, int64_t e) const {
    __builtin_prefetch(a.pat.idx + e, 0, 3);
    __builtin_prefetch(a.out + e, 1, 3);
    prefetch_bytes(a.dyT + r * a.ld + n0, V * W * sizeof(acc_t), false);
  }

  // Eight dot products at a time (eight independent FMA chains), one reduction per eight.
  C10_ALWAYS_INLINE int64_t run(int64_t r, int64_t e, int64_t e1, int64_t k1) const {
    const int64_t end = segment_end(a.pat.idx, e, e1, k1);
    Vec d[V];
    for (int v = 0; v < V; ++v) {
      d[v] = Vec::loadu(a.dyT + r * a.ld + n0 + v * W);
    }
    for (; e < end; e += 8) {
      const int64_t cnt = std::min<int64_t>(8, end - e);
      Vec acc[8];
      for (int j = 0; j < 8; ++j) {
        acc[j] = Vec(acc_t(0));
      }
      for_group8(cnt, a.pat.idx + e, [&](int64_t j, int32_t k) { dot_into(acc[j], d, k); });
      acc_t sums[8];
      reduce8(acc, sums);
      for (int64_t j = 0; j < cnt; ++j) {
        a.out[e + j] = a.add ? a.out[e + j] + sums[j] : sums[j];
      }
    }
    return end;
  }

  C10_ALWAYS_INLINE void dot_into(Vec& acc, const Vec* d, int32_t k) const {
    const acc_t* xr = a.xT + static_cast<int64_t>(k) * a.ld + n0;
    for (int v = 0; v < V; ++v) {
      acc = at::vec::fmadd(d[v], Vec::loadu(xr + v * W), acc);
    }
  }
};

template <typename acc_t>
struct SddmmPanels {
  template <int V>
  static void run(const SddmmArgs<acc_t>& a, int64_t r0, int64_t r1, int64_t n0, int32_t* cursor) {
    walk_pattern(a.pat, r0, r1, cursor, SddmmSegment<acc_t, V>{a, n0});
  }
};

// The SDDMM over tile-major copies of the pattern (CPUs without the AVX-512 kernels; see
// "Tile-major SpMM"): each panel's dot products accumulate in copy order into `sums` (written by
// the first panel, added to by the others), which go to their entries once at the end.
template <typename acc_t>
struct SddmmTileMajorPanels {
  template <int V>
  static void run(const TileMajorRows<acc_t>& c, const SddmmArgs<acc_t>& a, int64_t r0, int64_t n0, acc_t* sums,
                  bool add) {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t W = kLanes<acc_t>;
    for_each_segment(c, [&](int64_t r, int64_t e, int64_t e1) {
      Vec d[V];
      for (int v = 0; v < V; ++v) {
        d[v] = Vec::loadu(a.dyT + (r0 + r) * a.ld + n0 + v * W);
      }
      for (; e < e1; e += 8) {
        const int64_t cnt = std::min<int64_t>(8, e1 - e);
        Vec acc[8];
        for (int j = 0; j < 8; ++j) {
          acc[j] = Vec(acc_t(0));
        }
        for_group8(cnt, c.idx + e, [&](int64_t j, int32_t k) {
          const acc_t* xr = a.xT + static_cast<int64_t>(k) * a.ld + n0;
          for (int v = 0; v < V; ++v) {
            acc[j] = at::vec::fmadd(d[v], Vec::loadu(xr + v * W), acc[j]);
          }
        });
        acc_t part[8];
        reduce8(acc, part);
        for (int64_t j = 0; j < cnt; ++j) {
          sums[e + j] = add ? sums[e + j] + part[j] : part[j];
        }
      }
    });
  }
};

template <typename acc_t>
using SddmmTileMajorFn = void (*)(const TileMajorRows<acc_t>&, const SddmmArgs<acc_t>&, int64_t, int64_t, acc_t*,
                                  bool);

template <typename acc_t, int... Vs>
constexpr std::array<SddmmTileMajorFn<acc_t>, sizeof...(Vs)> sddmm_tile_major_table(
    std::integer_sequence<int, Vs...>) {
  return {&SddmmTileMajorPanels<acc_t>::template run<Vs + 1>...};
}

// Rows [r0, r1) of the SDDMM, every panel, through a tile-major copy of their pattern (slot D:
// offsets, cursor, indices and each copied entry's position; slot E: the sums in copy order).
template <typename acc_t>
void sddmm_tile_major_rows(const SddmmArgs<acc_t>& a, int64_t r0, int64_t r1, int64_t kPanel) {
  static constexpr auto table = sddmm_tile_major_table<acc_t>(std::make_integer_sequence<int, kPanelVecs<acc_t>>{});
  const TileMajorInts ints = tile_major_ints(a.pat, r0, r1, 1);
  const int64_t count = ints.count;
  const at::Tensor sums_buf = scratch(kScratchE, 1, std::max<int64_t>(count, 1), c10::CppTypeToScalarType<acc_t>::value);
  int32_t* pos = ints.extra;  // each copied entry's position
  acc_t* sums = sums_buf.mutable_data_ptr<acc_t>();
  tile_major_order(
      a.pat, r0, r1, ints.seg, ints.cursor, ints.idx, [&](int32_t q, int64_t e) { pos[q] = static_cast<int32_t>(e); },
      [](int64_t) {});
  const TileMajorRows<acc_t> copy{ints.seg, ints.idx, nullptr, ints.rows, ints.tiles, ints.storage, sums_buf};
  bool written = false;
  for (int64_t n0 = 0; n0 < std::min(a.n, a.ld); n0 += kPanel) {
    const int64_t width = std::min<int64_t>(kPanel, a.ld - n0);
    table[width / kLanes<acc_t> - 1](copy, a, r0, n0, sums, written);
    written = true;
  }
  for (int64_t q = 0; q < count; ++q) {
    a.out[pos[q]] = written ? sums[q] : acc_t(0);
  }
}

// The SDDMM's panel width: the AVX-512 float kernels take panels of avx512::kSddmmPanelFloats
// (one horizontal reduction per dot product per 256 floats, whose shuffles compete with the FMAs
// for a port: dvalues 19.8 -> 17.5 ms at 90% sparsity and 46.6 -> 42 ms at 70%, N = 256, K = M =
// 4096, one thread), the portable ones kPanelVecs vectors.
template <typename acc_t>
int64_t sddmm_panel_floats() {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512::available()) {
      return avx512::kSddmmPanelFloats;
    }
  }
  return kPanelVecs<acc_t> * kLanes<acc_t>;
}

template <typename acc_t>
void sddmm(const SddmmArgs<acc_t>& a) {
  static constexpr auto table =
      panel_table<SddmmPanels<acc_t>, SddmmArgs<acc_t>>(std::make_integer_sequence<int, kPanelVecs<acc_t>>{});
  constexpr int64_t W = kLanes<acc_t>;
  const int64_t kPanel = sddmm_panel_floats<acc_t>();
  const int64_t parts = num_parts(a.pat.rows, kPanel * static_cast<int64_t>(sizeof(acc_t)));
  const std::vector<int64_t> splits = balanced_row_splits(a.pat.ptr, a.pat.rows, parts);
  bool tile_major = tile_major_pays(a.pat, (std::min(a.n, a.ld) + kPanel - 1) / kPanel) &&
                    kPanel == kPanelVecs<acc_t> * W;
  if constexpr (std::is_same_v<acc_t, float>) {
    tile_major = tile_major && !avx512::available();
  }
  // One task per row range, all panels inside: a kept weight's sum is written by one thread.
  run_tasks(parts, [&](int64_t p) {
    const int64_t r0 = splits[p], r1 = splits[p + 1];
    if (tile_major) {
      if (r0 < r1) {
        sddmm_tile_major_rows(a, r0, r1, kPanel);
      }
      return;
    }
    std::vector<int32_t> cursor(a.pat.tile > 0 ? static_cast<size_t>(r1 - r0) : 0);
    // A panel of padding only adds zeros: skipped (at N = 256, ld = 272: a 16-float panel that
    // walked every kept weight again).
    // The first panel writes every kept weight of the range (the walk visits each entry once per
    // panel), so out is not zeroed first (a 6.7 MB fill, 0.7 ms, at 90% of 4096 x 4096).
    SddmmArgs<acc_t> local = a;
    for (int64_t n0 = 0; n0 < std::min(a.n, a.ld); n0 += kPanel) {
      const int64_t width = std::min<int64_t>(kPanel, a.ld - n0);
      local.add = n0 > 0;
      if constexpr (std::is_same_v<acc_t, float>) {
        if (avx512::available()) {
          avx512::sddmm_panel({a.pat, a.dyT, a.xT, a.out, a.ld, local.add}, r0, r1, n0, width, cursor.data());
          continue;
        }
      }
      table[width / W - 1](local, r0, r1, n0, cursor.data());
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Small batches: N <= avx512::kSpmvMaxBatch rows of x
//
// The SpMM above holds the batch in its vectors and walks xT in tiles: with a few rows of x most
// lanes are padding and the walk's per-segment costs dominate. Here x is transposed into xT [K][L]
// with the batch padded only to L = 1, 4, 8, 16 or 32 lanes, and each output row is a plain pass
// over its kept weights: one broadcast weight times one L-lane row of xT (L2 resident) per kept
// weight, in independent chains; values are read in their own dtype. Ad hoc A/B of the two kernels
// during development (K = M = 4096, 2 threads, forward; not a kept record): at 90% sparsity and N = 1 2.3-2.7 ms -> 0.41-0.64 ms; 2.3-6x
// for N = 1 to 16 and 1.8-3.5x at 32 (float32 and bfloat16, 70-99%); at 48 and 64 rows (64 lanes)
// 0.96-1.6x, so the panel kernel keeps N > 32. Recorded against torch: benchmarks/results/
// prune-n1-cpu-20261127-0125 and its neighbours (bench_prune.py --batch), forward and training step.

// The lanes of xT for a batch of n rows: for the AVX-512 kernel (float32 accumulation on a CPU
// with AVX-512) 1, 4, 8, 16 or 32; for the portable one 1 or whole vectors of acc_t, a power of two.
template <typename acc_t>
int64_t spmv_lanes(int64_t n, bool avx512_kernel) {
  if (n == 1 || avx512_kernel) {
    return n == 1 ? 1 : n <= 4 ? 4 : n <= 8 ? 8 : n <= 16 ? 16 : 32;
  }
  int64_t vecs = 1;
  while (vecs * kLanes<acc_t> < n) {
    vecs *= 2;
  }
  return vecs * kLanes<acc_t>;
}

// Row r's L = kVecs * W lanes of a [rows][L] operand, as kVecs vectors.
template <int kVecs, typename acc_t>
C10_ALWAYS_INLINE void load_row_lanes(const acc_t* t, int64_t r, Vectorized<acc_t> (&d)[kVecs]) {
  constexpr int64_t W = kLanes<acc_t>;
  for (int v = 0; v < kVecs; ++v) {
    d[v] = Vectorized<acc_t>::loadu(t + r * kVecs * W + v * W);
  }
}

// fn(std::integral_constant<int, V>) with V = lanes / W vectors (0 for a single lane), for the
// portable small-batch kernels' lane counts (spmv_lanes' portable rule).
template <typename acc_t, typename Fn>
decltype(auto) with_lane_vecs(int64_t lanes, const Fn& fn) {
  // Up to 32 lanes: 16 vectors where a vector holds two doubles (NEON).
  static_assert(avx512::kSpmvMaxBatch <= 16 * kLanes<acc_t>, "a case per power of two up to 16 vectors");
  switch (lanes == 1 ? 0 : lanes / kLanes<acc_t>) {
    case 0: return fn(std::integral_constant<int, 0>{});
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    case 16: return fn(std::integral_constant<int, 16>{});
    default: TORCH_INTERNAL_ASSERT(false, "pyfinetune: no small-batch kernel for ", lanes, " lanes");
  }
  return fn(std::integral_constant<int, 0>{});  // unreachable
}

// The portable kernels of avx512::spmv_rows (any value and accumulation type): a single row of x
// in four scalar chains, or kVecs vectors per kept weight in two chains (four for one vector).
// Like them they check each column against cols on the way (the forward's only check of the
// indices: a separate pass over them cost a third of a one-row product's memory traffic): an
// index outside [0, cols) reads column 0 instead and makes the kernel return false.

// idx if it lies in [0, cols), else 0 with `bad` set (branch-free).
C10_ALWAYS_INLINE int64_t column_in_range(int32_t idx, int64_t cols, bool& bad) {
  // (a negative index becomes a huge unsigned one, whatever cols is)
  const bool out = static_cast<uint64_t>(static_cast<int64_t>(idx)) >= static_cast<uint64_t>(cols);
  bad |= out;
  return out ? 0 : idx;
}

template <typename val_t, typename acc_t>
bool spmv_rows_scalar(const int32_t* ptr, const int32_t* idx, const val_t* values, const acc_t* x, int64_t cols,
                      int64_t r0, int64_t r1, acc_t* out) {
  bool bad = false;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t e = ptr[r];
    const int64_t e1 = ptr[r + 1];
    acc_t acc[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (; e + 4 <= e1; e += 4) {
      for (int j = 0; j < 4; ++j) {
        acc[j] += static_cast<acc_t>(values[e + j]) * x[column_in_range(idx[e + j], cols, bad)];
      }
    }
    for (; e < e1; ++e) {
      acc[0] += static_cast<acc_t>(values[e]) * x[column_in_range(idx[e], cols, bad)];
    }
    out[r - r0] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
  return !bad;
}

template <int kVecs, typename val_t, typename acc_t>
bool spmv_rows_vec(const int32_t* ptr, const int32_t* idx, const val_t* values, const acc_t* xT, int64_t cols,
                   int64_t r0, int64_t r1, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  bool bad = false;
  constexpr int64_t W = kLanes<acc_t>;
  constexpr int64_t L = kVecs * W;
  constexpr int C = kVecs == 1 ? 4 : 2;  // chains
  for (int64_t r = r0; r < r1; ++r) {
    int64_t e = ptr[r];
    const int64_t e1 = ptr[r + 1];
    Vec acc[C][kVecs];
    for (int j = 0; j < C; ++j) {
      for (int v = 0; v < kVecs; ++v) {
        acc[j][v] = Vec(acc_t(0));
      }
    }
    for (; e + C <= e1; e += C) {
      for (int j = 0; j < C; ++j) {
        const Vec w(static_cast<acc_t>(values[e + j]));
        const acc_t* row = xT + column_in_range(idx[e + j], cols, bad) * L;
        for (int v = 0; v < kVecs; ++v) {
          acc[j][v] = at::vec::fmadd(w, Vec::loadu(row + v * W), acc[j][v]);
        }
      }
    }
    for (; e < e1; ++e) {
      const Vec w(static_cast<acc_t>(values[e]));
      const acc_t* row = xT + column_in_range(idx[e], cols, bad) * L;
      for (int v = 0; v < kVecs; ++v) {
        acc[0][v] = at::vec::fmadd(w, Vec::loadu(row + v * W), acc[0][v]);
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      Vec sum = acc[0][v];
      for (int j = 1; j < C; ++j) {
        sum = sum + acc[j][v];
      }
      sum.store(out + (r - r0) * L + v * W);
    }
  }
  return !bad;
}

template <typename val_t, typename acc_t>
bool spmv_rows_portable(int64_t lanes, const int32_t* ptr, const int32_t* idx, const val_t* values, const acc_t* xT,
                        int64_t cols, int64_t r0, int64_t r1, acc_t* out) {
  return with_lane_vecs<acc_t>(lanes, [&](auto vecs) {
    if constexpr (vecs() == 0) {
      return spmv_rows_scalar(ptr, idx, values, xT, cols, r0, r1, out);
    } else {
      return spmv_rows_vec<vecs()>(ptr, idx, values, xT, cols, r0, r1, out);
    }
  });
}

// Kept weights times rows of x per work item; below one item the product runs on the calling thread.
constexpr int64_t kSpmvWorkPerPart = 64 * 1024;
// Elements of a thread's output buffer kept for its next call (1 MiB of floats).
constexpr size_t kSpmvKeptBuffer = 256 * 1024;

// t [n, cols] (any strides) transposed into a fresh [cols, lanes] tensor of the accumulation type,
// the batch zero padded to `lanes` (transposed_acc's layout with the small-batch kernels' pitch).
template <typename scalar_t>
at::Tensor lanes_transposed(const at::Tensor& t, int64_t lanes) {
  using acc_t = acc_of<scalar_t>;
  at::Tensor out = at::empty({t.size(1), lanes}, t.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  transpose_in(t.const_data_ptr<scalar_t>(), t.size(0), t.size(1), t.stride(0), t.stride(1),
               out.mutable_data_ptr<acc_t>(), lanes);
  return out;
}

// Row ranges of equal kept weights for the small-batch kernels' work items: one per
// kSpmvWorkPerPart kept weights times batch rows, up to kPartsPerThread per thread (rows >= 1).
std::vector<int64_t> small_batch_splits(const int32_t* ptr, int64_t rows, int64_t nnz, int64_t n) {
  const int64_t parts = std::clamp<int64_t>(nnz * n / kSpmvWorkPerPart, 1,
                                            std::min<int64_t>(rows, at::get_num_threads() * kPartsPerThread));
  return balanced_row_splits(ptr, rows, parts);
}

// y [n, rows] (row-major, with bias[r] added when given) = operand [n, cols] (any strides) times the
// sparse [rows, cols] matrix (ptr, idx; `values` in entry order, the operand's dtype) transposed.
// ptr must be valid (check_compressed_ptr_cpu); the indices are checked by the kernels on the way:
// false when one lies outside [0, cols) (y is then garbage and the caller reports the index).
template <typename scalar_t>
bool spmv_into_rows(const int32_t* ptr, const int32_t* idx, int64_t rows, int64_t nnz, const at::Tensor& values,
                    const at::Tensor& operand, const scalar_t* bias, scalar_t* y) {
  using acc_t = acc_of<scalar_t>;
  constexpr at::ScalarType kAcc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t n = operand.size(0), cols = operand.size(1);
  if (rows == 0) {
    return true;
  }
  const at::Tensor vals = values.contiguous();
  int kind = -1;  // the AVX-512 kernel's value kind; -1: the portable kernels
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx512::available()) {
      kind = std::is_same_v<scalar_t, float>           ? avx512::kSpmvFloat
             : std::is_same_v<scalar_t, c10::BFloat16> ? avx512::kSpmvBFloat16
                                                       : avx512::kSpmvHalf;
    }
  }
  const int64_t lanes = spmv_lanes<acc_t>(n, kind >= 0);
  at::Tensor xT;
  if (lanes == 1 && operand.scalar_type() == kAcc && operand.stride(1) == 1) {
    xT = operand;  // one row of unit stride: already xT
  } else {
    xT = lanes_transposed<scalar_t>(operand, lanes);
  }
  const acc_t* xp = xT.const_data_ptr<acc_t>();
  const std::vector<int64_t> splits = small_batch_splits(ptr, rows, nnz, n);
  std::atomic<bool> in_range{true};
  run_tasks(static_cast<int64_t>(splits.size()) - 1, [&](int64_t p) {
    const int64_t r0 = splits[p], r1 = splits[p + 1];
    if (r0 == r1) {
      return;
    }
    thread_local std::vector<acc_t> buf;
    buf.resize(static_cast<size_t>((r1 - r0) * lanes));
    bool ok = true;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (kind >= 0) {
        ok = avx512::spmv_rows({ptr, idx, vals.const_data_ptr(), kind, xp, lanes, cols, buf.data()}, r0, r1);
      }
    }
    if (kind < 0) {
      ok = spmv_rows_portable(lanes, ptr, idx, vals.const_data_ptr<scalar_t>(), xp, cols, r0, r1, buf.data());
    }
    if (!ok) {
      in_range.store(false, std::memory_order_relaxed);
    }
    for (int64_t i = 0; i < n; ++i) {
      scalar_t* yi = y + i * rows;
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t v = buf[(r - r0) * lanes + i];
        yi[r] = static_cast<scalar_t>(bias != nullptr ? v + static_cast<acc_t>(bias[r]) : v);
      }
    }
    if (buf.capacity() > kSpmvKeptBuffer) {  // a huge layer's buffer is not kept by every thread
      std::vector<acc_t>().swap(buf);
    }
  });
  return in_range.load();
}

// The input gradient for a small batch, dx [n, cols] = grad_out [n, rows] @ W, from the compressed
// rows: each kept weight adds its value times its row's L lanes of dyT into the L lanes of its
// column, in a buffer per thread ([cols][L], cache resident), then summed over the threads. (A pass
// over the compressed columns instead would read the values through csc_to_csr: a random read per
// kept weight, which at 50% sparsity of 4096 x 4096 took longer than the rest of the step.)
// fn(e, d) for the kept weights e of rows [r0, r1), d: row r's kVecs vectors of lanes of dyT
// [rows][L], loaded once per row (the small-batch backward kernels' walk).
template <int kVecs, typename acc_t, typename Fn>
C10_ALWAYS_INLINE void for_kept_with_row_lanes(const int32_t* ptr, const acc_t* dyT, int64_t r0, int64_t r1,
                                               const Fn& fn) {
  for (int64_t r = r0; r < r1; ++r) {
    Vectorized<acc_t> d[kVecs];
    load_row_lanes(dyT, r, d);
    for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
      fn(e, d);
    }
  }
}

template <int kVecs, typename val_t, typename acc_t>
void scatter_rows_vec(const int32_t* ptr, const int32_t* idx, const val_t* values, const acc_t* dyT, int64_t r0,
                      int64_t r1, acc_t* part) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  constexpr int64_t L = kVecs * W;
  for_kept_with_row_lanes<kVecs>(ptr, dyT, r0, r1, [&](int64_t e, const Vec (&d)[kVecs]) {
    const Vec w(static_cast<acc_t>(values[e]));
    acc_t* o = part + static_cast<int64_t>(idx[e]) * L;
    for (int v = 0; v < kVecs; ++v) {
      at::vec::fmadd(w, d[v], Vec::loadu(o + v * W)).store(o + v * W);
    }
  });
}

template <typename val_t, typename acc_t>
void scatter_rows_scalar(const int32_t* ptr, const int32_t* idx, const val_t* values, const acc_t* dy, int64_t r0,
                         int64_t r1, acc_t* part) {
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t d = dy[r];
    for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
      part[idx[e]] += static_cast<acc_t>(values[e]) * d;
    }
  }
}

template <typename scalar_t>
void scatter_into_rows(const int32_t* ptr, const int32_t* idx, int64_t rows, int64_t cols, int64_t nnz,
                       const at::Tensor& values, const at::Tensor& grad_out, scalar_t* dx) {
  using acc_t = acc_of<scalar_t>;
  const int64_t n = grad_out.size(0);
  const int64_t lanes = spmv_lanes<acc_t>(n, false);
  const at::Tensor dyT = lanes_transposed<scalar_t>(grad_out, lanes);
  const at::Tensor vals = values.contiguous();
  // Each thread zeroes and sums a [cols][lanes] buffer: at most as many threads as have at least
  // four kept weights per buffer row to add (on a many-core machine a thread per core would spend
  // more on its buffer than on the product).
  const int64_t threads = std::clamp<int64_t>(std::min(nnz * n / kSpmvWorkPerPart, nnz / std::max<int64_t>(4 * cols, 1)),
                                              1, at::get_num_threads());
  const std::vector<int64_t> splits = balanced_row_splits(ptr, rows, threads);
  at::Tensor parts = at::zeros({threads, cols, lanes}, dyT.options());
  const acc_t* d = dyT.const_data_ptr<acc_t>();
  const scalar_t* v = vals.const_data_ptr<scalar_t>();
  acc_t* pp = parts.mutable_data_ptr<acc_t>();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = splits[t], r1 = splits[t + 1];
      acc_t* part = pp + t * cols * lanes;
      with_lane_vecs<acc_t>(lanes, [&](auto vecs) {
        if constexpr (vecs() == 0) {
          scatter_rows_scalar(ptr, idx, v, d, r0, r1, part);
        } else {
          scatter_rows_vec<vecs()>(ptr, idx, v, d, r0, r1, part);
        }
      });
    }
  });
  at::parallel_for(0, cols, 1024, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t c = c0; c < c1; ++c) {
        acc_t sum = pp[c * lanes + i];
        for (int64_t t = 1; t < threads; ++t) {
          sum += pp[(t * cols + c) * lanes + i];
        }
        dx[i * cols + c] = static_cast<scalar_t>(sum);
      }
    }
  });
}

// The kept values' gradient for a small batch: out[e] = dot(dyT[r], xT[idx[e]]) over the L lanes
// of both (the batch zero padded; spmv_lanes' portable rule), row r's lanes loaded once.
template <int kVecs, typename acc_t>
void sddmm_rows_vec(const int32_t* ptr, const int32_t* idx, const acc_t* dyT, const acc_t* xT, int64_t r0,
                    int64_t r1, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = kLanes<acc_t>;
  constexpr int64_t L = kVecs * W;
  for_kept_with_row_lanes<kVecs>(ptr, dyT, r0, r1, [&](int64_t e, const Vec (&d)[kVecs]) {
    const acc_t* row = xT + static_cast<int64_t>(idx[e]) * L;
    Vec prod = d[0] * Vec::loadu(row);
    for (int v = 1; v < kVecs; ++v) {
      prod = at::vec::fmadd(d[v], Vec::loadu(row + v * W), prod);
    }
    acc_t lanes[W];
    prod.store(lanes);
    acc_t sum = lanes[0];
    for (int64_t w = 1; w < W; ++w) {
      sum += lanes[w];
    }
    out[e] = sum;
  });
}

template <typename acc_t>
void sddmm_rows_scalar(const int32_t* ptr, const int32_t* idx, const acc_t* dy, const acc_t* x, int64_t r0,
                       int64_t r1, acc_t* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t d = dy[r];
    for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
      out[e] = acc_t(0) + d * x[idx[e]];  // a sum from +0, as at other batch sizes (no -0)
    }
  }
}

template <typename scalar_t>
at::Tensor sddmm_small(const int32_t* ptr, const int32_t* idx, int64_t rows, int64_t nnz, const at::Tensor& grad_out,
                       const at::Tensor& x) {
  using acc_t = acc_of<scalar_t>;
  const int64_t n = x.size(0);
  const int64_t lanes = spmv_lanes<acc_t>(n, false);
  const at::Tensor dyT = lanes_transposed<scalar_t>(grad_out, lanes), xT = lanes_transposed<scalar_t>(x, lanes);
  at::Tensor out = empty_streaming({nnz}, dyT.options());
  if (rows == 0) {
    return out.to(x.scalar_type());
  }
  const std::vector<int64_t> splits = small_batch_splits(ptr, rows, nnz, n);
  const acc_t* d = dyT.const_data_ptr<acc_t>();
  const acc_t* xp = xT.const_data_ptr<acc_t>();
  acc_t* o = out.mutable_data_ptr<acc_t>();
  run_tasks(static_cast<int64_t>(splits.size()) - 1, [&](int64_t p) {
    const int64_t r0 = splits[p], r1 = splits[p + 1];
    with_lane_vecs<acc_t>(lanes, [&](auto vecs) {
      if constexpr (vecs() == 0) {
        sddmm_rows_scalar(ptr, idx, d, xp, r0, r1, o);
      } else {
        sddmm_rows_vec<vecs()>(ptr, idx, d, xp, r0, r1, o);
      }
    });
  });
  return std::is_same_v<scalar_t, acc_t> ? out : out.to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// csr_linear and its backward

// src [rows, cols] (any strides) transposed into a [cols, padded_ld(rows)] acc tensor (scratch).
template <typename scalar_t>
at::Tensor transposed_acc(const at::Tensor& src, ScratchSlot slot) {
  using acc_t = acc_of<scalar_t>;
  const int64_t rows = src.size(0), cols = src.size(1);
  const int64_t ld = padded_ld<acc_t>(rows);
  at::Tensor t = scratch(slot, cols, ld, c10::CppTypeToScalarType<acc_t>::value);
  transpose_in(src.const_data_ptr<scalar_t>(), rows, cols, src.stride(0), src.stride(1), t.mutable_data_ptr<acc_t>(),
               ld);
  return t;
}

// The kept values in the accumulation type, contiguous (16-bit values: a float32 copy of nnz
// entries, so that the kernels load and broadcast floats).
template <typename acc_t>
at::Tensor values_as_acc(const at::Tensor& values) {
  return values.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

at::Tensor csr_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                          const at::Tensor& col_indices, const at::Tensor& row_order,
                          const std::optional<at::Tensor>& bias) {
  const MatmulSizes s = check_csr_linear_args(x, values, crow_indices, col_indices, row_order, bias);
  const char* op = "csr_linear";
  PF_CHECK(x.device().is_cpu(), op, "CPU kernel called with x on ", x.device());
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  // Small batches check the column indices inside their kernel (a separate pass over them cost
  // 1.37x at one row of x and 1.15x at 4-16 rows, 90% of 4096 x 4096, weights not in cache, in an ad
  // hoc development A/B).
  // (K = 0 with kept weights: every index is out of range, which the full check reports.)
  const bool small = s.n > 0 && s.n <= avx512::kSpmvMaxBatch && s.m > 0 && s.k > 0;
  bool sorted = false;
  if (small) {
    check_compressed_ptr_cpu(op, "crow_indices", crow, s.nnz);
  } else {
    sorted = check_compressed_pattern_cpu(op, "crow_indices", "col_indices", crow, col, s.k, "K = x.size(1)");
  }
  at::Tensor y = empty_streaming({s.n, s.m}, x.options());
  if (s.n == 0 || s.m == 0) {
    return y;
  }
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "csr_linear_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    if (small) {
      if (!spmv_into_rows<scalar_t>(crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), s.m, s.nnz, values,
                                    x, has_bias ? b.const_data_ptr<scalar_t>() : nullptr, y.mutable_data_ptr<scalar_t>())) {
        check_index_range_cpu(op, "col_indices", col, s.k, "K = x.size(1)");  // names the index
        TORCH_INTERNAL_ASSERT(false, "pyfinetune.csr_linear: a kernel found a column index out of range, the check none");
      }
      return;
    }
    const at::Tensor vals = values_as_acc<acc_t>(values);
    const at::Tensor xT = transposed_acc<scalar_t>(x, kScratchA);
    const int64_t ld = xT.size(1);
    const int64_t panel = spmm_panel_floats<acc_t>(s.nnz, s.m, s.k);
    const Pattern pat{crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), s.m, s.k,
                      choose_tile(s.nnz, s.m, s.k, panel * static_cast<int64_t>(sizeof(acc_t)), sorted, kTileBytes)};
    SpmmArgs<acc_t> args{pat, vals.const_data_ptr<acc_t>(), nullptr, xT.const_data_ptr<acc_t>(), nullptr, ld};
    args.panel = panel;
    spmm_into_rows<acc_t, scalar_t>(args, s.n, has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                                    y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

// The SDDMM of the pattern (ptr, idx) [m, k] with nnz entries: out[e] = dot(dyT[r, :n], xT[idx[e], :n]),
// [nnz] in acc_t; dyT [m, ld] and xT [k, ld] as transposed_acc makes them.
template <typename acc_t>
at::Tensor sddmm_values(const int32_t* ptr, const int32_t* idx, int64_t m, int64_t k, int64_t nnz,
                        const at::Tensor& dyT, const at::Tensor& xT, int64_t n, bool sorted) {
  at::Tensor out = empty_streaming({nnz}, dyT.options());  // every entry written by sddmm
  const Pattern pat{ptr, idx, m, k,
                    choose_tile(nnz, m, k, sddmm_panel_floats<acc_t>() * static_cast<int64_t>(sizeof(acc_t)), sorted,
                                kSddmmTileBytes)};
  const SddmmArgs<acc_t> args{pat, dyT.const_data_ptr<acc_t>(), xT.const_data_ptr<acc_t>(),
                              out.mutable_data_ptr<acc_t>(), dyT.size(1), n};
  sddmm<acc_t>(args);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, const at::Tensor& row_order, const at::Tensor& ccol_indices,
    const at::Tensor& row_indices, const at::Tensor& csc_to_csr, std::array<bool, 3> output_mask) {
  const MatmulSizes s = check_csr_linear_backward_args(grad_out, x, values, crow_indices, col_indices, row_order,
                                                       ccol_indices, row_indices, csc_to_csr);
  const char* op = "csr_linear_backward";
  PF_CHECK(x.device().is_cpu(), op, "CPU kernel called with x on ", x.device());
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  const at::Tensor ccol = ccol_indices.contiguous(), rows_of = row_indices.contiguous();
  const at::Tensor perm = csc_to_csr.contiguous();
  // Small batches compute dx from the compressed rows; the compressed columns are validated all the
  // same (an argument is checked whether or not this batch size reads it).
  const bool small = s.n <= avx512::kSpmvMaxBatch;
  bool csc_sorted = false, csr_sorted = false;
  if (output_mask[0]) {
    csc_sorted = check_compressed_pattern_cpu(op, "ccol_indices", "row_indices", ccol, rows_of, s.m,
                                              "M = crow_indices.numel() - 1");
    check_index_range_cpu(op, "csc_to_csr", perm, s.nnz, "nnz = values.numel()");
  }
  if (output_mask[1] || (output_mask[0] && small)) {
    csr_sorted = check_compressed_pattern_cpu(op, "crow_indices", "col_indices", crow, col, s.k, "K = x.size(1)");
  }
  at::Tensor dx = not_needed(x), dvalues = not_needed(x), dbias = not_needed(x);
  if (s.n == 0) {
    // No rows: dx is [0, K]; the sums over the rows are zero.
    if (output_mask[0]) dx = at::empty({0, s.k}, x.options());
    if (output_mask[1]) dvalues = at::zeros({s.nnz}, x.options());
    if (output_mask[2]) dbias = at::zeros({s.m}, x.options());
    return {dx, dvalues, dbias};
  }
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) {
    return {dx, dvalues, dbias};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "csr_linear_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    if (small) {
      // Small batches: dx scattered from the compressed rows, dvalues as row-by-row dot products
      // of the batch's lanes.
      if (output_mask[0]) {
        dx = empty_streaming({s.n, s.k}, x.options());
        scatter_into_rows<scalar_t>(crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), s.m, s.k, s.nnz,
                                    values, grad_out, dx.mutable_data_ptr<scalar_t>());
      }
      if (output_mask[1]) {
        dvalues = sddmm_small<scalar_t>(crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), s.m, s.nnz,
                                        grad_out, x);
      }
      if (output_mask[2]) {
        dbias = at::sum(grad_out, {0}, false, c10::CppTypeToScalarType<acc_t>::value).to(x.scalar_type());
      }
      return;
    }
    const at::Tensor dyT = transposed_acc<scalar_t>(grad_out, kScratchA);  // [M, ld]
    const int64_t ld = dyT.size(1);
    if (output_mask[0]) {
      dx = empty_streaming({s.n, s.k}, x.options());
      if (s.k > 0) {
        const at::Tensor vals = values_as_acc<acc_t>(values);
        const int64_t panel = spmm_panel_floats<acc_t>(s.nnz, s.k, s.m);
        const Pattern pat{ccol.const_data_ptr<int32_t>(), rows_of.const_data_ptr<int32_t>(), s.k, s.m,
                          choose_tile(s.nnz, s.k, s.m, panel * static_cast<int64_t>(sizeof(acc_t)), csc_sorted, kTileBytes)};
        SpmmArgs<acc_t> args{pat, vals.const_data_ptr<acc_t>(), perm.const_data_ptr<int32_t>(),
                             dyT.const_data_ptr<acc_t>(), nullptr, ld};
        args.panel = panel;
        spmm_perm_into_rows<acc_t, scalar_t>(args, s.n, dx.mutable_data_ptr<scalar_t>());
      }
    }
    if (output_mask[1]) {
      const at::Tensor xT = transposed_acc<scalar_t>(x, kScratchC);  // [K, ld]
      constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;
      const at::Tensor out = sddmm_values<acc_t>(crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(), s.m,
                                                 s.k, s.nnz, dyT, xT, s.n, csr_sorted);
      dvalues = kSameType ? out : out.to(x.scalar_type());
    }
    if (output_mask[2]) {
      // The padding columns of dyT are zero: summing all ld of them is the sum over the N rows.
      dbias = at::sum(dyT, {1}).to(x.scalar_type());
    }
  });
  return {dx, dvalues, dbias};
}

// ---------------------------------------------------------------------------------------------
// csr_to_dense and csr_gather (SparseLinear's dense path)

// Rows per parallel task: about kDenseGrainBytes of dense output each.
constexpr int64_t kDenseGrainBytes = 256 * 1024;

int64_t dense_row_grain(int64_t cols, int64_t elem_bytes) {
  return std::max<int64_t>(1, kDenseGrainBytes / std::max<int64_t>(1, cols * elem_bytes));
}

// Each row written once: zeroed while it sits in L1 and its kept values scattered into it, into a
// fresh tensor with the huge-page hint (a [4096, 4096] float32 weight at 50%: ~4 ms against ~21
// ms for torch.zeros + index_copy_, whose fresh 64 MB took a page fault per 4 KiB).
void csr_to_dense_into(const char* op, const MatmulSizes& s, const at::Tensor& values,
                       const at::Tensor& crow_indices, const at::Tensor& col_indices, at::Tensor& out) {
  const int64_t cols = s.k;
  PF_CHECK(values.device().is_cpu(), op, "CPU kernel called with values on ", values.device());
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  PF_CHECK(check_compressed_pattern_cpu(op, "crow_indices", "col_indices", crow, col, cols, "cols"), op,
           "col_indices must increase strictly within each row (no repeated column)");
  if (out.numel() == 0) {
    return;
  }
  const at::Tensor v = values.contiguous();
  const int32_t* ptr = crow.const_data_ptr<int32_t>();
  const int32_t* idx = col.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "csr_to_dense_cpu", [&] {
    const scalar_t* src = v.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.m, dense_row_grain(cols, sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = dst + r * cols;
        std::memset(static_cast<void*>(row), 0, static_cast<size_t>(cols) * sizeof(scalar_t));  // +0.0
        for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
          row[idx[e]] = src[e];
        }
      }
    });
  });
}

at::Tensor csr_to_dense_cpu(const at::Tensor& values, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                            int64_t cols) {
  const MatmulSizes s = check_csr_to_dense_args(values, crow_indices, col_indices, cols);
  at::Tensor out = empty_streaming({s.m, cols}, values.options());
  csr_to_dense_into("csr_to_dense", s, values, crow_indices, col_indices, out);
  return out;
}

void csr_to_dense_into_cpu(at::Tensor& out, const at::Tensor& values, const at::Tensor& crow_indices,
                           const at::Tensor& col_indices) {
  const MatmulSizes s = check_csr_to_dense_into_args(out, values, crow_indices, col_indices);
  csr_to_dense_into("csr_to_dense_into", s, values, crow_indices, col_indices, out);
}

at::Tensor csr_gather_cpu(const at::Tensor& dense, const at::Tensor& crow_indices, const at::Tensor& col_indices) {
  const MatmulSizes s = check_csr_gather_args(dense, crow_indices, col_indices);
  const char* op = "csr_gather";
  PF_CHECK(dense.device().is_cpu(), op, "CPU kernel called with dense on ", dense.device());
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  PF_CHECK(check_compressed_pattern_cpu(op, "crow_indices", "col_indices", crow, col, s.k, "K = dense.size(1)"), op,
           "col_indices must increase strictly within each row (no repeated column)");
  at::Tensor out = at::empty({s.nnz}, dense.options());
  if (s.nnz == 0) {
    return out;
  }
  const int32_t* ptr = crow.const_data_ptr<int32_t>();
  const int32_t* idx = col.const_data_ptr<int32_t>();
  const int64_t s0 = dense.stride(0), s1 = dense.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dense.scalar_type(), "csr_gather_cpu", [&] {
    const scalar_t* src = dense.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.m, dense_row_grain(s.k, sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = src + r * s0;
        if (s1 == 1) {
          for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
            dst[e] = row[idx[e]];
          }
        } else {
          for (int64_t e = ptr[r]; e < ptr[r + 1]; ++e) {
            dst[e] = row[static_cast<int64_t>(idx[e]) * s1];
          }
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// masked_matmul's sampled weight gradient (dense_grad = False)
//
// dweight = (grad_out^T @ x) * mask computed at the kept positions only: the mask's compressed
// rows (one counting pass over its bytes, one filling pass), csr_linear's SDDMM over them, and a
// scatter into a dense gradient whose pruned positions are +0, as the dense product's mask gives.

// The sampled gradient where the mask keeps at most this share of the weight (sparsity >= 70%); the
// dense product (MKL / oneDNN) and its mask elsewhere. Measured with
// `python benchmarks/prune_sampled_grad.py` on the 2-core AMD EPYC CI machine (AVX-512, float32, M =
// K = 4096, benchmarks/results/prune-sampled-grad-cpu-20261130-0428.md): the sampled gradient was
// faster at 70% and above for every batch from 1 to 2048 rows (1.2-2.0x at 70%, 2.1-3.5x at 90%,
// 2.2-10.6x at 99%); at 50-60% 0.9-1.6x, so the dense path stays there. Its fixed cost, the mask's
// counting pass, is spent at every density.
constexpr double kSampledMaxDensity = 0.3;

bool sampled_grad_pays(int64_t m, int64_t k, int64_t kept) {
  return static_cast<double>(kept) <= kSampledMaxDensity * static_cast<double>(m) * static_cast<double>(k);
}

// PYFINETUNE_MASKED_GRAD: auto (unset), dense or sampled; read at each call (tests and benchmarks
// compare the two paths on the same inputs).
enum class MaskedGrad { kAuto, kDense, kSampled };

MaskedGrad masked_grad_requested() {
  const char* v = std::getenv("PYFINETUNE_MASKED_GRAD");
  if (v == nullptr || std::strcmp(v, "auto") == 0) {
    return MaskedGrad::kAuto;
  }
  if (std::strcmp(v, "dense") == 0) {
    return MaskedGrad::kDense;
  }
  PF_CHECK(std::strcmp(v, "sampled") == 0, "masked_matmul_backward",
           "PYFINETUNE_MASKED_GRAD must be auto, dense or sampled, got '", v, "'");
  return MaskedGrad::kSampled;
}

at::Tensor sampled_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mask) {
  const MaskedGrad how = masked_grad_requested();
  const int64_t n = x.size(0), m = mask.size(0), k = mask.size(1);
  // Empty products, and masks whose positions int32 cannot index, take the dense path.
  if (how == MaskedGrad::kDense || n == 0 || m == 0 || k == 0 || m * k > std::numeric_limits<int32_t>::max()) {
    return at::Tensor();
  }
  const at::Tensor mk = mask.contiguous();
  // Bytes, compared with 0: a bool tensor viewed from other bytes still counts each position once.
  const uint8_t* bits = reinterpret_cast<const uint8_t*>(mk.const_data_ptr<bool>());
  at::Tensor crow_t = at::empty({m + 1}, at::TensorOptions().dtype(at::kInt));
  int32_t* crow = crow_t.mutable_data_ptr<int32_t>();
  const int64_t grain = dense_row_grain(k, 1);
  at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = bits + r * k;
      int32_t kept = 0;
      for (int64_t j = 0; j < k; ++j) {
        kept += row[j] != 0;
      }
      crow[r + 1] = kept;
    }
  });
  crow[0] = 0;
  for (int64_t r = 0; r < m; ++r) {
    crow[r + 1] += crow[r];  // at most m * k <= INT32_MAX
  }
  const int64_t nnz = crow[m];
  if (how == MaskedGrad::kAuto && !sampled_grad_pays(m, k, nnz)) {
    return at::Tensor();
  }
  at::Tensor col_t = at::empty({nnz}, crow_t.options());
  int32_t* col = col_t.mutable_data_ptr<int32_t>();
  at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = bits + r * k;
      // Without a branch per position: every position is written at the next free slot, which only
      // a kept one advances; the loop ends at the row's last kept position (so no slot of the next
      // row is touched).
      for (int64_t j = 0, pos = crow[r], end = crow[r + 1]; pos < end; ++j) {
        col[pos] = static_cast<int32_t>(j);
        pos += row[j] != 0;
      }
    }
  });
  at::Tensor values;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_matmul_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    if (n <= avx512::kSpmvMaxBatch) {
      values = sddmm_small<scalar_t>(crow, col, m, nnz, grad_out, x);
    } else {
      const at::Tensor dyT = transposed_acc<scalar_t>(grad_out, kScratchA);  // [M, ld]
      const at::Tensor xT = transposed_acc<scalar_t>(x, kScratchC);          // [K, ld]
      values = sddmm_values<acc_t>(crow, col, m, k, nnz, dyT, xT, n, /*sorted=*/true).to(x.scalar_type());
    }
  });
  at::Tensor dweight = empty_streaming({m, k}, x.options());
  csr_to_dense_into("masked_matmul_backward", MatmulSizes{n, k, m, nnz}, values, crow_t, col_t, dweight);
  return dweight;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfinetune, CPU, m) {
  m.impl("masked_matmul", &masked_matmul_cpu);
  m.impl("masked_matmul_backward", &masked_matmul_backward_cpu);
  m.impl("csr_linear", &csr_linear_cpu);
  m.impl("csr_linear_backward", &csr_linear_backward_cpu);
  m.impl("csr_to_dense", &csr_to_dense_cpu);
  m.impl("csr_to_dense_into", &csr_to_dense_into_cpu);
  m.impl("csr_gather", &csr_gather_cpu);
}

// A torch sparse tensor passed for any argument routes the call here; the argument checks, which
// run first, then name it instead of the dispatcher's "no kernel for SparseCPU".
TORCH_LIBRARY_IMPL(pyfinetune, SparseCPU, m) {
  m.impl("masked_matmul", &masked_matmul_cpu);
  m.impl("masked_matmul_backward", &masked_matmul_backward_cpu);
  m.impl("csr_linear", &csr_linear_cpu);
  m.impl("csr_linear_backward", &csr_linear_backward_cpu);
  m.impl("csr_to_dense", &csr_to_dense_cpu);
  m.impl("csr_to_dense_into", &csr_to_dense_into_cpu);
  m.impl("csr_gather", &csr_gather_cpu);
}

TORCH_LIBRARY_IMPL(pyfinetune, SparseCsrCPU, m) {
  m.impl("masked_matmul", &masked_matmul_cpu);
  m.impl("masked_matmul_backward", &masked_matmul_backward_cpu);
  m.impl("csr_linear", &csr_linear_cpu);
  m.impl("csr_linear_backward", &csr_linear_backward_cpu);
  m.impl("csr_to_dense", &csr_to_dense_cpu);
  m.impl("csr_to_dense_into", &csr_to_dense_into_cpu);
  m.impl("csr_gather", &csr_gather_cpu);
}

}  // namespace pyfinetune
