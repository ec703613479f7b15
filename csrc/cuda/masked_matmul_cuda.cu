// CUDA kernels of the pruning ops: pyfinetune::masked_matmul(_backward) (dense masked path) and
// pyfinetune::csr_linear(_backward) (compressed-row sparse weight).
//
// Dense masked path: the mask is applied to the weight once and the products go to cuBLAS through
// at::mm / at::addmm.
//
// Sparse path. y [N, M] = x [N, K] @ W^T with W [M, K] in CSR is computed as the SpMM
//   yT [M, N] = W [M, K] @ xT [K, N]
// in the style of Sputnik (Gale et al., "Sparse GPU Kernels for Deep Learning", SC 2020): one warp
// per sparse row, rows taken in row_order (longest first, so the warps of a block, which retire
// together, have similar work), the row's nonzeros staged 32 at a time in shared memory (each lane
// loads one, coalesced) and read back as broadcasts, and each lane owning one 16-byte vector of the
// N dimension, accumulated in registers (float32 for bf16/fp16/fp32, double for double).
//
// Why the transposes. x is row-major [N, K]; a nonzero (m, k) needs the column x[:, k]. Read in
// place, every element of that column sits in its own 32-byte sector (1/8 of the sector used for
// fp32, 1/16 for bf16), for every nonzero and every n. One tiled transpose of x into
// xT [K, ld] (2 * N * K elements moved, coalesced on both sides through shared memory) turns the
// operand of each nonzero into a contiguous row read with 16-byte vector loads, and all rows of W
// then reuse the same xT slab from L2 (the grid walks all rows for one N tile before the next).
// The output is the same story mirrored: the warp of row m produces y[n-tile, m], a column of y.
// Stored in place that is a stride-M scalar store per element (a partial sector each, written back
// to DRAM with a read-modify-write when y does not stay in L2); instead the warp writes the row
// yT[m, n-tile] with 16-byte stores and one tiled transpose produces y (2 * N * M elements moved).
// Both transposes are memory-bound copies that cost a few percent of the SpMM, which is bound by
// the L2 traffic of nnz * N operand elements. The temporaries have a row pitch `ld` = N rounded up
// to the vector width, zero-filled past N, so every vector access is aligned and in bounds and the
// hot loops have no tail code (the zeros also make the padded part of the SDDMM dot products 0).
//
// Backward. dx = grad_out @ W is dxT [K, N] = W^T [K, M] @ goT [M, N] with W^T in CSR being W in
// CSC (ccol_indices / row_indices), its values gathered through csc_to_csr: the same SpMM kernel.
// dvalues (SDDMM): for each nonzero p = (m, k), dvalues[p] = dot(goT[m, :], xT[k, :]) over N. A
// warp takes 32 consecutive nonzeros (perfect load balance, whatever the row lengths), each lane
// accumulates its share of N for all 32 dot products, and a reduce-scatter of the 32 per-lane sums
// (31 shuffles) leaves the total of nonzero `lane` in lane `lane`. When there are too few nonzeros
// to fill the GPU, N is cut into slabs (grid.y) whose partial sums are added by at::sum.
//
// Indexing: rows, columns and nonzero positions are int32 by contract (int32 index tensors);
// every element offset into a dense operand (row * pitch) is int64. Grids loop over the N tiles
// (grid.y is capped at 65535) so N is unbounded. Index contents cannot be checked on the host
// without a synchronization; the kernels assert them on the device (CUDA_KERNEL_ASSERT) before
// using them as addresses, so a malformed pattern stops with a device assertion instead of
// reading out of bounds.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <pyfinetune/checks.h>
#include <pyfinetune/masked_matmul.h>
#include <pyfinetune/multi_tensor_apply.cuh>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

namespace pyfinetune {
namespace {

// ================================================================================================
// Argument checks: the shared ones (masked_matmul_checks.cpp, identical on CPU and CUDA) plus the
// limits of this implementation: CUDA tensors and int32 row and column counts.
// ================================================================================================

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

void check_cuda_limits(const char* op, const at::Tensor& x, const MatmulSizes& sz) {
  PF_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got ", x.device());
  PF_CHECK(sz.m <= kInt32Max, op, "the weight must have at most 2^31 - 1 rows (int32 row indices), got M = ", sz.m);
  PF_CHECK(sz.k <= kInt32Max, op, "x must have at most 2^31 - 1 columns (int32 column indices), got K = ", sz.k);
  PF_CHECK(sz.nnz <= sz.m * sz.k, op, "values must have at most M * K = ", sz.m * sz.k,
           " entries for a weight [M, K] = [", sz.m, ", ", sz.k, "], got nnz = ", sz.nnz);
}

// ================================================================================================
// Device code
// ================================================================================================

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Elements of scalar_t per 16-byte access: 8 bf16/fp16, 4 fp32, 2 fp64.
template <typename scalar_t>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The largest grid.y (and grid.z); kernels loop when they need more. grid.x goes to 2^31 - 1.
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

// ---- Tiled transpose ---------------------------------------------------------------------------
// dst[c * ldd + r] = src[r * src_rs + c * src_cs] for r < R, c < C, and 0 for R <= r < R_pad: the
// transpose of a strided [R, C] matrix into a [C, R_pad] one of row pitch ldd, zero-padded. T is an
// unsigned integer of the element's size (a bit copy, one instantiation per size); the 0 bit
// pattern is +0.0 in every float format. A 32 x 32 tile passes through shared memory (one column
// of padding against bank conflicts) so that both the loads and the stores are coalesced.

constexpr int kTile = 32;
constexpr int kTileRows = 8;

template <typename T>
__global__ void __launch_bounds__(kTile* kTileRows)
    transpose_pad_kernel(const T* __restrict__ src, int64_t src_rs, int64_t src_cs, T* __restrict__ dst,
                         int64_t ldd, int64_t R, int64_t R_pad, int64_t C) {
  __shared__ T tile[kTile][kTile + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile; r0 < R_pad;
       r0 += static_cast<int64_t>(gridDim.y) * kTile) {
    // Loads: lanes along c (consecutive in a row-major source).
    for (int i = ty; i < kTile; i += kTileRows) {
      const int64_t r = r0 + i;
      const int64_t c = c0 + tx;
      tile[i][tx] = (r < R && c < C) ? src[r * src_rs + c * src_cs] : T(0);
    }
    __syncthreads();
    // Stores: lanes along r (consecutive in the destination row).
    for (int i = ty; i < kTile; i += kTileRows) {
      const int64_t c = c0 + i;
      const int64_t r = r0 + tx;
      if (c < C && r < R_pad) {
        dst[c * ldd + r] = tile[tx][i];
      }
    }
    __syncthreads();  // the next iteration overwrites the tile
  }
}

// One 16-byte store of kVec values converted to scalar_t; ptr must be 16-byte aligned. (NVVM splits
// a plain 16-byte store (mta::store_n, or a uint4 assignment) at a row * ld + v address into four
// 4-byte stores; __stwb is st.global.wb.v4, the default write-back store, in one instruction:
// STG.E.128 in the SASS.)
template <int kVec, typename scalar_t, typename opmath_t>
__device__ C10_ALWAYS_INLINE void store_vec16(scalar_t* ptr, const opmath_t (&in)[kVec]) {
  static_assert(kVec * sizeof(scalar_t) == sizeof(uint4), "one 16-byte vector");
  mta::Pack<scalar_t, kVec> pack;
  PF_UNROLL
  for (int i = 0; i < kVec; ++i) {
    pack.val[i] = static_cast<scalar_t>(in[i]);
  }
  uint4 raw;
  memcpy(&raw, &pack, sizeof(raw));
  __stwb(reinterpret_cast<uint4*>(ptr), raw);
}

// ---- SpMM: C[r, :] = sum over the nonzeros p of row r of val(p) * B[idx(p), :] (+ bias[r]) --------

constexpr int kSpmmWarps = 4;   // warps (sparse rows) per block
constexpr int kStage = kWarpSize;  // nonzeros staged per round: one per lane

template <typename scalar_t>
struct SpmmArgs {
  const scalar_t* values;     // [nnz]
  const int32_t* value_pos;   // kGather: entry p's value is values[value_pos[p]] (csc_to_csr)
  const int32_t* offsets;     // [rows + 1]: the entries of row r are [offsets[r], offsets[r + 1])
  const int32_t* indices;     // [nnz]: the row of B each entry multiplies, < b_rows
  const int32_t* order;       // [rows]: the row handled by warp slot s (longest rows first)
  const scalar_t* bias;       // [rows] or nullptr
  const scalar_t* b;          // [b_rows, ld], 16-byte aligned
  scalar_t* c;                // [rows, ld], 16-byte aligned
  int64_t ld;                 // row pitch of b and c in elements, a multiple of vec_width
  int64_t nnz;
  int32_t rows;
  int32_t b_rows;
};

// acc += sum over the staged entries [0, cnt) of val[e] * B[col[e], lane's vector]. Groups of four
// entries issue four independent 16-byte loads before their FMAs; the tail (cnt % 4 entries) goes
// one by one, so no padding entry is ever multiplied (0 * inf would be NaN).
template <int kVec, typename scalar_t, typename opmath_t>
__device__ C10_ALWAYS_INLINE void spmm_staged(const scalar_t* b_lane, int64_t ld, const opmath_t* s_val,
                                              const int32_t* s_col, int cnt, opmath_t (&acc)[kVec]) {
  int e = 0;
  for (; e + 4 <= cnt; e += 4) {
    const mta::Pack<int32_t, 4> cols = *reinterpret_cast<const mta::Pack<int32_t, 4>*>(s_col + e);
    const mta::Pack<opmath_t, 4> vals = *reinterpret_cast<const mta::Pack<opmath_t, 4>*>(s_val + e);
    opmath_t bv[4][kVec];
    PF_UNROLL
    for (int u = 0; u < 4; ++u) {
      mta::load_n<kVec>(b_lane + static_cast<int64_t>(cols.val[u]) * ld, bv[u]);
    }
    PF_UNROLL
    for (int u = 0; u < 4; ++u) {
      PF_UNROLL
      for (int i = 0; i < kVec; ++i) {
        acc[i] += vals.val[u] * bv[u][i];
      }
    }
  }
  for (; e < cnt; ++e) {
    opmath_t bv[kVec];
    mta::load_n<kVec>(b_lane + static_cast<int64_t>(s_col[e]) * ld, bv);
    const opmath_t v = s_val[e];
    PF_UNROLL
    for (int i = 0; i < kVec; ++i) {
      acc[i] += v * bv[i];
    }
  }
}

// grid.x: groups of kSpmmWarps row slots; grid.y: N tiles of 32 vectors (looped past 65535).
// blockIdx.x varies fastest, so all rows of one N tile are scheduled before the next tile and
// the tile's slab of B stays in L2.
template <typename scalar_t, bool kGather>
__global__ void __launch_bounds__(kSpmmWarps* kWarpSize) csr_spmm_kernel(const SpmmArgs<scalar_t> a) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  // Per-warp staging areas, aligned for the 4-entry vector reads of spmm_staged.
  __shared__ alignas(4 * sizeof(opmath_t)) opmath_t s_val[kSpmmWarps][kStage];
  __shared__ alignas(16) int32_t s_col[kSpmmWarps][kStage];

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kSpmmWarps + warp;
  if (slot >= a.rows) {
    return;  // uniform over the warp; the kernel has no block-wide barrier
  }
  const int32_t row = a.order[slot];
  CUDA_KERNEL_ASSERT(row >= 0 && row < a.rows);
  const int64_t begin = a.offsets[row];
  const int64_t end = a.offsets[row + 1];
  CUDA_KERNEL_ASSERT(begin >= 0 && begin <= end && end <= a.nnz);
  const opmath_t bias = a.bias != nullptr ? static_cast<opmath_t>(a.bias[row]) : opmath_t(0);
  const int64_t vecs = a.ld / kVec;
  const int64_t tiles = (vecs + kWarpSize - 1) / kWarpSize;

  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t v = tile * kWarpSize + lane;
    const bool active = v < vecs;  // lanes past the last vector still stage entries
    opmath_t acc[kVec];
    mta::fill_n<kVec>(acc, opmath_t(0));
    for (int64_t s = begin; s < end; s += kStage) {
      const int cnt = static_cast<int>(end - s < kStage ? end - s : kStage);
      if (lane < cnt) {
        const int64_t p = s + lane;
        const int32_t col = a.indices[p];
        CUDA_KERNEL_ASSERT(col >= 0 && col < a.b_rows);
        const int64_t q = kGather ? static_cast<int64_t>(a.value_pos[p]) : p;
        CUDA_KERNEL_ASSERT(q >= 0 && q < a.nnz);
        s_col[warp][lane] = col;
        s_val[warp][lane] = static_cast<opmath_t>(a.values[q]);
      }
      __syncwarp();
      if (active) {
        spmm_staged<kVec>(a.b + v * kVec, a.ld, s_val[warp], s_col[warp], cnt, acc);
      }
      __syncwarp();  // every lane is done reading before the next round overwrites the stage
    }
    if (active) {
      PF_UNROLL
      for (int i = 0; i < kVec; ++i) {
        acc[i] += bias;
      }
      store_vec16<kVec>(a.c + static_cast<int64_t>(row) * a.ld + v * kVec, acc);
    }
  }
}

// ---- Few rows of x: y = x @ W^T with the lanes over each row's nonzeros (opt-in) ------------------
// For N <= kSmallN rows of x (decoding: N = 1 to a few), the kernel above wastes the warp: x^T is
// padded to one 16-byte vector per operand row (8 halves where 1 is used at N = 1), a lane holds
// one vector of the N tile, so only lane 0 of each warp works, entry after entry; and x is
// transposed before and y after. Here a warp takes a sparse row, its lanes take the row's nonzeros
// (lane l: entries begin + l, begin + l + 32, ...: coalesced reads of values and indices), each
// multiplies its entry by the N values of x in that column, read from x itself (row-major, a few
// KB that stay in L1), and the warp sums the lanes' partial sums (butterfly shuffles); lane n
// writes y[n, row]. Reads nnz * (value + index) bytes once and x from cache: the bandwidth a dense
// x @ W^T spends on all M * K weights goes to the kept ones only. Only kept entries are multiplied
// (an inf in x at a pruned column adds nothing), as in the kernel above. PYFINETUNE_CSR_CUDA_SMALL_N.
constexpr int kSmallN = 16;

template <typename scalar_t>
struct SpmvArgs {
  const scalar_t* values;  // [nnz]
  const int32_t* offsets;  // [rows + 1]
  const int32_t* indices;  // [nnz], < k
  const int32_t* order;    // [rows]: the row of warp slot s (longest rows first)
  const scalar_t* bias;    // [rows] or nullptr
  const scalar_t* x;       // [n, k], unit column stride, row stride ldx
  scalar_t* y;             // [n, rows], contiguous
  int64_t ldx;
  int64_t nnz;
  int32_t rows;
  int32_t k;
  int32_t n;               // <= kN
};

// acc[i] += v * x[i, col] for the n rows of x: one kept entry of the lane's weight row.
template <int kN, typename scalar_t, typename opmath_t>
__device__ C10_ALWAYS_INLINE void spmv_entry(const SpmvArgs<scalar_t>& a, int32_t col, opmath_t v,
                                             opmath_t (&acc)[kN]) {
  CUDA_KERNEL_ASSERT(col >= 0 && col < a.k);
  const scalar_t* xc = a.x + col;
  PF_UNROLL
  for (int i = 0; i < kN; ++i) {
    if (i < a.n) {
      acc[i] += v * static_cast<opmath_t>(xc[i * a.ldx]);
    }
  }
}

// kN: the accumulators per lane (a power of two >= n; the loops run to n).
template <typename scalar_t, int kN>
__global__ void __launch_bounds__(kSpmmWarps* kWarpSize) csr_spmv_kernel(const SpmvArgs<scalar_t> a) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kSpmmWarps + warp;
  if (slot >= a.rows) {
    return;  // uniform over the warp; no block-wide barrier
  }
  const int32_t row = a.order[slot];
  CUDA_KERNEL_ASSERT(row >= 0 && row < a.rows);
  const int64_t begin = a.offsets[row];
  const int64_t end = a.offsets[row + 1];
  CUDA_KERNEL_ASSERT(begin >= 0 && begin <= end && end <= a.nnz);
  opmath_t acc[kN];
  PF_UNROLL
  for (int i = 0; i < kN; ++i) {
    acc[i] = opmath_t(0);
  }
  // Four of a lane's entries at a time: their index and value loads are issued together (a row of
  // 410 entries, 90% of 4096, is 13 entries per lane: one at a time, 13 dependent trips to memory).
  int64_t p = begin + lane;
  for (; p + 3 * kWarpSize < end; p += 4 * kWarpSize) {
    int32_t col[4];
    opmath_t v[4];
    PF_UNROLL
    for (int u = 0; u < 4; ++u) {
      col[u] = a.indices[p + u * kWarpSize];
      v[u] = static_cast<opmath_t>(a.values[p + u * kWarpSize]);
    }
    PF_UNROLL
    for (int u = 0; u < 4; ++u) {
      spmv_entry<kN>(a, col[u], v[u], acc);
    }
  }
  for (; p < end; p += kWarpSize) {
    spmv_entry<kN>(a, a.indices[p], static_cast<opmath_t>(a.values[p]), acc);
  }
  PF_UNROLL
  for (int i = 0; i < kN; ++i) {
    PF_UNROLL
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      acc[i] += __shfl_xor_sync(kFullMask, acc[i], offset);
    }
  }
  const opmath_t bias = a.bias != nullptr ? static_cast<opmath_t>(a.bias[row]) : opmath_t(0);
  PF_UNROLL
  for (int i = 0; i < kN; ++i) {
    if (i < a.n && lane == i) {
      a.y[static_cast<int64_t>(i) * a.rows + row] = static_cast<scalar_t>(acc[i] + bias);
    }
  }
}

// PYFINETUNE_CSR_CUDA_SMALL_N=1 (experimental, read at each call; unset, empty or 0: off): csr_linear
// with at most kSmallN rows of x runs csr_spmv_kernel. Timed on an H200 (gpu-check-20261129-2137,
// benchmarks/prune_gpu_quick_check.py, 4096 x 4096 weight, CUDA graph replays): 3.7-12x less GPU
// time than the warp kernel at N = 1 and 1.4-3.3x at N = 16 (90% / 99% sparsity, fp16 / bf16). Not
// the default until its test (tests/test_masked_matmul_cuda.py -k small_n) has passed on a GPU: the
// time-boxed check did not reach it. The sums are taken in another order. Another value is refused
// before anything is written.
bool small_n_requested() {
  return env_switch("csr_linear", "PYFINETUNE_CSR_CUDA_SMALL_N", "off").value_or(false);
}

template <typename scalar_t, int kN>
void launch_spmv(const SpmvArgs<scalar_t>& a) {
  const dim3 grid(static_cast<unsigned>(ceil_div(static_cast<int64_t>(a.rows), kSpmmWarps)));
  csr_spmv_kernel<scalar_t, kN><<<grid, kSpmmWarps * kWarpSize, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// y [N, M] = x [N, K] @ W^T (+ bias), N in [1, kSmallN], W in CSR.
template <typename scalar_t>
at::Tensor spmv_rows(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                     const at::Tensor& order, const at::Tensor& bias, int64_t M) {
  const at::Tensor xr = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor y = at::empty({x.size(0), M}, x.options());
  SpmvArgs<scalar_t> a{};
  a.values = values.const_data_ptr<scalar_t>();
  a.offsets = crow.const_data_ptr<int32_t>();
  a.indices = col.const_data_ptr<int32_t>();
  a.order = order.const_data_ptr<int32_t>();
  a.bias = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  a.x = xr.const_data_ptr<scalar_t>();
  a.y = y.data_ptr<scalar_t>();
  a.ldx = xr.stride(0);
  a.nnz = values.numel();
  a.rows = static_cast<int32_t>(M);
  a.k = static_cast<int32_t>(x.size(1));
  a.n = static_cast<int32_t>(x.size(0));
  if (a.n <= 1) {
    launch_spmv<scalar_t, 1>(a);
  } else if (a.n <= 2) {
    launch_spmv<scalar_t, 2>(a);
  } else if (a.n <= 4) {
    launch_spmv<scalar_t, 4>(a);
  } else if (a.n <= 8) {
    launch_spmv<scalar_t, 8>(a);
  } else {
    launch_spmv<scalar_t, kSmallN>(a);
  }
  return y;
}

// ---- SpMM, operand tiles in shared memory (opt-in: PYFINETUNE_CSR_CUDA_KERNEL=tiled) -------------
// The kernel above reads, for every nonzero, its operand row from L2: nnz * N values (1.7 GB for
// N = 256 at 90% of 4096 x 4096 in float32), which bounds it by L2 bandwidth. Here a block takes
// kTiledRows sparse rows (consecutive in row_order, so of similar lengths) and an N tile of
// kTiledN columns, walks K in tiles of kTiledK operand rows staged once in shared memory (in the
// math type), and every nonzero of its rows that falls in the tile reads its operand row from
// there; L2 then serves each operand row once per block instead of once per nonzero. A warp owns
// kTiledRowsPerWarp rows; each lane owns 2 columns of the tile for every row (float2 reads of
// shared memory, conflict-free). A row's nonzeros are read 32 at a time (one per lane) from its
// cursor; as columns are sorted within a row (the op's contract), the ones inside the tile are a
// prefix of those 32, broadcast one by one with shuffles. A row whose columns are not sorted
// stops the kernel with a device assertion (the warp-per-row kernel, the default, takes any
// order). Not yet measured or run on a GPU: see benchmarks/README.md.
constexpr int kTiledWarps = 8;
constexpr int kTiledRowsPerWarp = 4;
constexpr int kTiledRows = kTiledWarps * kTiledRowsPerWarp;  // 32 sparse rows per block
constexpr int kTiledN = 2 * kWarpSize;                        // 64 columns per block

template <typename opmath_t>
constexpr int tiled_k() {
  return sizeof(opmath_t) == 8 ? 64 : 128;  // a 32 KB tile in either math type
}

// At least two resident blocks per SM: ptxas's own choice at sm_90 (64 registers) spilled.
template <typename scalar_t, bool kGather>
__global__ void __launch_bounds__(kTiledWarps* kWarpSize, 2) csr_spmm_tiled_kernel(const SpmmArgs<scalar_t> a) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  constexpr int kK = tiled_k<opmath_t>();
  constexpr int kVecsPerRow = kTiledN / kVec;
  static_assert(kTiledN % kVec == 0, "whole vectors per tile row");
  __shared__ alignas(16) opmath_t s_b[kK][kTiledN];

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  int32_t row[kTiledRowsPerWarp];
  int32_t cur[kTiledRowsPerWarp];
  int32_t end[kTiledRowsPerWarp];
  PF_UNROLL
  for (int i = 0; i < kTiledRowsPerWarp; ++i) {
    const int64_t slot = static_cast<int64_t>(blockIdx.x) * kTiledRows + warp * kTiledRowsPerWarp + i;
    row[i] = slot < a.rows ? a.order[slot] : -1;  // -1: past the last row
    CUDA_KERNEL_ASSERT(slot >= a.rows || (row[i] >= 0 && row[i] < a.rows));
  }
  const int64_t tiles = ceil_div(a.ld, kTiledN);
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t n0 = tile * kTiledN;
    const int64_t width = a.ld - n0 < kTiledN ? a.ld - n0 : kTiledN;  // a multiple of kVec
    opmath_t acc[kTiledRowsPerWarp][2];
    PF_UNROLL
    for (int i = 0; i < kTiledRowsPerWarp; ++i) {
      acc[i][0] = acc[i][1] = opmath_t(0);
      cur[i] = row[i] >= 0 ? a.offsets[row[i]] : 0;
      end[i] = row[i] >= 0 ? a.offsets[row[i] + 1] : 0;
      CUDA_KERNEL_ASSERT(cur[i] >= 0 && cur[i] <= end[i] && end[i] <= a.nnz);
    }
    for (int64_t k0 = 0; k0 < a.b_rows; k0 += kK) {
      __syncthreads();  // every warp is done with the previous tile
      for (int idx = threadIdx.x; idx < kK * kVecsPerRow; idx += kTiledWarps * kWarpSize) {
        const int kr = idx / kVecsPerRow;
        const int c = (idx % kVecsPerRow) * kVec;
        opmath_t v[kVec];
        if (k0 + kr < a.b_rows && c < width) {
          mta::load_n<kVec>(a.b + (k0 + kr) * a.ld + n0 + c, v);
        } else {
          mta::fill_n<kVec>(v, opmath_t(0));
        }
        PF_UNROLL
        for (int j = 0; j < kVec; ++j) {
          s_b[kr][c + j] = v[j];
        }
      }
      __syncthreads();
      const int64_t k1 = k0 + kK < a.b_rows ? k0 + kK : a.b_rows;
      PF_UNROLL
      for (int i = 0; i < kTiledRowsPerWarp; ++i) {
        while (cur[i] < end[i]) {  // uniform over the warp
          const int64_t p = static_cast<int64_t>(cur[i]) + lane;
          const int32_t col = p < end[i] ? a.indices[p] : std::numeric_limits<int32_t>::max();
          const bool inside = col < k1;
          const unsigned in_mask = __ballot_sync(kFullMask, inside);
          const int cnt = __popc(in_mask);
          // Sorted columns: the entries inside the tile are a prefix, none before it.
          CUDA_KERNEL_ASSERT(in_mask == (cnt == kWarpSize ? kFullMask : (1u << cnt) - 1u));
          opmath_t val = opmath_t(0);
          if (inside) {
            CUDA_KERNEL_ASSERT(col >= k0 && col < a.b_rows);
            const int64_t q = kGather ? static_cast<int64_t>(a.value_pos[p]) : p;
            CUDA_KERNEL_ASSERT(q >= 0 && q < a.nnz);
            val = static_cast<opmath_t>(a.values[q]);
          }
          for (int e = 0; e < cnt; ++e) {
            const int kr = __shfl_sync(kFullMask, col, e) - static_cast<int32_t>(k0);
            const opmath_t v = __shfl_sync(kFullMask, val, e);
            // One 8-byte (16 for double) shared-memory read per lane: consecutive lanes,
            // consecutive addresses (two 4-byte reads would each be a 2-way bank conflict).
            const mta::Pack<opmath_t, 2> b2 = *reinterpret_cast<const mta::Pack<opmath_t, 2>*>(&s_b[kr][2 * lane]);
            acc[i][0] += v * b2.val[0];
            acc[i][1] += v * b2.val[1];
          }
          cur[i] += cnt;
          if (cnt < kWarpSize) {
            break;
          }
        }
      }
    }
    PF_UNROLL
    for (int i = 0; i < kTiledRowsPerWarp; ++i) {
      if (row[i] < 0) {
        continue;
      }
      const opmath_t bias = a.bias != nullptr ? static_cast<opmath_t>(a.bias[row[i]]) : opmath_t(0);
      scalar_t* c = a.c + static_cast<int64_t>(row[i]) * a.ld + n0;
      PF_UNROLL
      for (int j = 0; j < 2; ++j) {
        if (2 * lane + j < width) {
          c[2 * lane + j] = static_cast<scalar_t>(acc[i][j] + bias);
        }
      }
    }
  }
}

// ---- SDDMM: out[p] = dot(A[row(p), :], B[col(p), :]) for every nonzero p of a CSR pattern -------

constexpr int kSddmmWarps = 4;

template <typename scalar_t>
struct SddmmArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const int32_t* crow;        // [rows + 1]
  const int32_t* col;         // [nnz], < b_rows
  const scalar_t* a;          // [rows, ld], 16-byte aligned (grad_out^T)
  const scalar_t* b;          // [b_rows, ld], 16-byte aligned (x^T)
  scalar_t* out;              // [nnz], written when there is one slab
  opmath_t* partial;          // [slabs, nnz], written instead when there are several
  int64_t ld;                 // a multiple of vec_width; columns past N hold zeros
  int64_t vecs_per_slab;      // vectors of the N dimension per slab (grid.y)
  int64_t nnz;
  int32_t rows;
  int32_t b_rows;
};

// The element offsets of the two rows a nonzero multiplies (one 16-byte shared-memory read).
struct alignas(16) RowOffsets {
  int64_t a;
  int64_t b;
};

// Reduce-scatter of 32 per-lane values: afterwards acc[0] of lane l holds the sum over all lanes of
// their acc[l]. Stage h keeps, of the 2h values still live, the half selected by bit h of the lane
// and adds the partner's (lane ^ h) copy of that half: 16 + 8 + 4 + 2 + 1 = 31 shuffles in all,
// against 32 * 5 for 32 separate butterfly reductions.
template <int kHalf, typename T>
__device__ C10_ALWAYS_INLINE void reduce_scatter_stage(T (&acc)[kWarpSize], int lane) {
  const bool upper = (lane & kHalf) != 0;
  PF_UNROLL
  for (int k = 0; k < kHalf; ++k) {
    const T send = upper ? acc[k] : acc[k + kHalf];
    const T keep = upper ? acc[k + kHalf] : acc[k];
    acc[k] = keep + __shfl_xor_sync(kFullMask, send, kHalf);
  }
}

template <typename T>
__device__ C10_ALWAYS_INLINE void warp_reduce_scatter(T (&acc)[kWarpSize], int lane) {
  reduce_scatter_stage<16>(acc, lane);
  reduce_scatter_stage<8>(acc, lane);
  reduce_scatter_stage<4>(acc, lane);
  reduce_scatter_stage<2>(acc, lane);
  reduce_scatter_stage<1>(acc, lane);
}

// grid.x: groups of kSddmmWarps warps, each warp 32 consecutive nonzeros; grid.y: N slabs.
template <typename scalar_t>
__global__ void __launch_bounds__(kSddmmWarps* kWarpSize) csr_sddmm_kernel(const SddmmArgs<scalar_t> a) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  __shared__ RowOffsets s_off[kSddmmWarps][kWarpSize];

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kSddmmWarps + warp) * kWarpSize;
  if (first >= a.nnz) {
    return;  // uniform over the warp; no block-wide barrier follows
  }
  const int cnt = static_cast<int>(a.nnz - first < kWarpSize ? a.nnz - first : kWarpSize);
  if (lane < cnt) {
    const int64_t p = first + lane;
    // The row of entry p: the last m with crow[m] <= p (this skips rows without entries). The
    // search stays in [0, rows - 1] whatever crow holds, so a bad pattern cannot make it read
    // out of bounds; rows >= 1 here because nnz > 0 implies M > 0 (host check).
    int32_t lo = 0;
    int32_t hi = a.rows;
    while (hi - lo > 1) {
      const int32_t mid = lo + (hi - lo) / 2;
      if (a.crow[mid] <= p) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    CUDA_KERNEL_ASSERT(a.crow[lo] <= p && p < a.crow[lo + 1]);  // crow is a CSR offset array of nnz
    const int32_t col = a.col[p];
    CUDA_KERNEL_ASSERT(col >= 0 && col < a.b_rows);
    s_off[warp][lane] = RowOffsets{static_cast<int64_t>(lo) * a.ld, static_cast<int64_t>(col) * a.ld};
  }
  __syncwarp();

  opmath_t acc[kWarpSize];
  mta::fill_n<kWarpSize>(acc, opmath_t(0));
  const int64_t vecs = a.ld / kVec;
  const int64_t v_begin = static_cast<int64_t>(blockIdx.y) * a.vecs_per_slab;
  const int64_t v_end = v_begin + a.vecs_per_slab < vecs ? v_begin + a.vecs_per_slab : vecs;
  for (int64_t v = v_begin + lane; v < v_end; v += kWarpSize) {
    const int64_t n0 = v * kVec;
    opmath_t av[kVec];
    int64_t a_loaded = -1;  // consecutive entries mostly share their row: load it once
    PF_UNROLL
    for (int j = 0; j < kWarpSize; ++j) {
      if (j < cnt) {
        const RowOffsets off = s_off[warp][j];
        if (off.a != a_loaded) {
          mta::load_n<kVec>(a.a + off.a + n0, av);
          a_loaded = off.a;
        }
        opmath_t bv[kVec];
        mta::load_n<kVec>(a.b + off.b + n0, bv);
        PF_UNROLL
        for (int i = 0; i < kVec; ++i) {
          acc[j] += av[i] * bv[i];
        }
      }
    }
  }
  warp_reduce_scatter(acc, lane);  // every lane of the warp is here (no early exit above)
  if (lane < cnt) {
    if (a.partial != nullptr) {
      a.partial[static_cast<int64_t>(blockIdx.y) * a.nnz + first + lane] = acc[0];
    } else {
      a.out[first + lane] = static_cast<scalar_t>(acc[0]);
    }
  }
}

// ================================================================================================
// Host side
// ================================================================================================

bool has_value(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

at::Tensor empty_output(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

void check_vector_aligned(const void* ptr) {
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, "pyfinetune: a temporary is not 16-byte aligned");
}

template <typename T>
void launch_transpose_t(const void* src, int64_t src_rs, int64_t src_cs, void* dst, int64_t ldd, int64_t R,
                        int64_t R_pad, int64_t C) {
  const int64_t col_tiles = ceil_div(C, kTile);
  TORCH_CHECK(col_tiles <= kMaxGridX, check_message("pyfinetune: a matrix of ", C, " columns is too wide to transpose"));
  const dim3 block(kTile, kTileRows);
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(std::min(ceil_div(R_pad, kTile), kMaxGridY)));
  transpose_pad_kernel<T><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(src), src_rs, src_cs, static_cast<T*>(dst), ldd, R, R_pad, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dst[c, r] = src[r, c] for the [R, C] matrix src (any strides), dst of row pitch ldd, columns
// [R, R_pad) of dst set to 0.
void transpose_pad(const at::Tensor& src, int64_t R, int64_t C, int64_t src_rs, int64_t src_cs, at::Tensor& dst,
                   int64_t ldd, int64_t R_pad) {
  if (R_pad == 0 || C == 0) {
    return;
  }
  const void* s = src.const_data_ptr();
  void* d = dst.data_ptr();
  switch (src.element_size()) {
    case 2:
      launch_transpose_t<uint16_t>(s, src_rs, src_cs, d, ldd, R, R_pad, C);
      break;
    case 4:
      launch_transpose_t<uint32_t>(s, src_rs, src_cs, d, ldd, R, R_pad, C);
      break;
    case 8:
      launch_transpose_t<uint64_t>(s, src_rs, src_cs, d, ldd, R, R_pad, C);
      break;
    default:
      TORCH_INTERNAL_ASSERT(false, check_message("pyfinetune: unexpected element size ", src.element_size()));
  }
}

// The [C, ld] transpose of a 2-D tensor [R, C], zero-padded from column R to ld.
at::Tensor transposed_padded(const at::Tensor& t, int64_t ld) {
  const int64_t R = t.size(0);
  const int64_t C = t.size(1);
  at::Tensor out = at::empty({C, ld}, t.options());
  transpose_pad(t, R, C, t.stride(0), t.stride(1), out, ld, ld);
  return out;
}

// The contiguous [N, R] transpose of the first N columns of a [R, ld] temporary.
at::Tensor untransposed(const at::Tensor& t_pad, int64_t N) {
  const int64_t R = t_pad.size(0);
  at::Tensor out = at::empty({N, R}, t_pad.options());
  transpose_pad(t_pad, R, N, t_pad.stride(0), 1, out, R, R);
  return out;
}

// A sparse operand of the SpMM: W in CSR, or W^T in CSR (= W in CSC, values gathered via value_pos).
struct SparseOperand {
  at::Tensor values;     // [nnz]
  at::Tensor value_pos;  // [nnz] int32, or undefined: entry p's value is values[p]
  at::Tensor offsets;    // [rows + 1] int32
  at::Tensor indices;    // [nnz] int32, < b_rows
  at::Tensor order;      // [rows] int32
  int64_t rows;
  int64_t b_rows;
};

// PYFINETUNE_CSR_CUDA_KERNEL=tiled selects csr_spmm_tiled_kernel (experimental, read at each call);
// unset, "warp" or "tensor_cores" (which SparseLinear reads: its 16-bit forward then runs
// tiled_csr_linear; csr_linear itself keeps this warp kernel): the warp-per-row kernel.
bool use_tiled_spmm() {
  const char* env = std::getenv("PYFINETUNE_CSR_CUDA_KERNEL");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "warp") == 0 || std::strcmp(env, "tensor_cores") == 0) {
    return false;
  }
  TORCH_CHECK(std::strcmp(env, "tiled") == 0,
              "pyfinetune: PYFINETUNE_CSR_CUDA_KERNEL must be \"warp\", \"tiled\" or \"tensor_cores\", got \"", env,
              "\"");
  return true;
}

template <typename scalar_t, bool kGather>
void launch_spmm(const SpmmArgs<scalar_t>& a, int64_t tiles) {
  if (use_tiled_spmm()) {
    const dim3 grid(static_cast<unsigned>(ceil_div(a.rows, kTiledRows)),
                    static_cast<unsigned>(std::min(ceil_div(a.ld, kTiledN), kMaxGridY)));
    csr_spmm_tiled_kernel<scalar_t, kGather>
        <<<grid, kTiledWarps * kWarpSize, 0, at::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(a.rows, kSpmmWarps)),
                  static_cast<unsigned>(std::min(tiles, kMaxGridY)));
  csr_spmm_kernel<scalar_t, kGather><<<grid, kSpmmWarps * kWarpSize, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// C [rows, ld] = W @ B (+ bias per row), B [b_rows, ld] dense with ld a multiple of the vector width.
template <typename scalar_t>
at::Tensor spmm(const SparseOperand& w, const at::Tensor& b, int64_t ld, const at::Tensor& bias) {
  constexpr int kVec = vec_width<scalar_t>();
  TORCH_INTERNAL_ASSERT(ld % kVec == 0 && b.size(1) == ld && b.is_contiguous());
  at::Tensor c = at::empty({w.rows, ld}, b.options());
  const int64_t tiles = ceil_div(ld / kVec, kWarpSize);
  if (w.rows == 0 || tiles == 0) {
    return c;
  }
  SpmmArgs<scalar_t> a{};
  a.values = w.values.const_data_ptr<scalar_t>();
  a.value_pos = w.value_pos.defined() ? w.value_pos.const_data_ptr<int32_t>() : nullptr;
  a.offsets = w.offsets.const_data_ptr<int32_t>();
  a.indices = w.indices.const_data_ptr<int32_t>();
  a.order = w.order.const_data_ptr<int32_t>();
  a.bias = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  a.b = b.const_data_ptr<scalar_t>();
  a.c = c.data_ptr<scalar_t>();
  a.ld = ld;
  a.nnz = w.values.numel();
  a.rows = static_cast<int32_t>(w.rows);
  a.b_rows = static_cast<int32_t>(w.b_rows);
  check_vector_aligned(a.b);
  check_vector_aligned(a.c);
  if (a.value_pos != nullptr) {
    launch_spmm<scalar_t, true>(a, tiles);
  } else {
    launch_spmm<scalar_t, false>(a, tiles);
  }
  return c;
}

// N rounded up to a whole number of 16-byte vectors: the row pitch of the transposed temporaries.
template <typename scalar_t>
int64_t padded_width(int64_t N) {
  return ceil_div(N, vec_width<scalar_t>()) * vec_width<scalar_t>();
}

// Resident warps to aim for per SM when choosing the SDDMM slabs: two full waves of 64 warps.
constexpr int64_t kSddmmTargetWarpsPerSM = 128;

// dvalues [nnz] of x's dtype: the SDDMM of goT [M, ld] and xT [K, ld] at the CSR pattern.
template <typename scalar_t>
at::Tensor sddmm(const at::Tensor& goT, const at::Tensor& xT, int64_t ld, const at::Tensor& crow,
                 const at::Tensor& col, int64_t M, int64_t K, int64_t nnz) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = vec_width<scalar_t>();
  TORCH_INTERNAL_ASSERT(ld % kVec == 0 && nnz > 0 && M > 0);
  check_vector_aligned(goT.const_data_ptr());
  check_vector_aligned(xT.const_data_ptr());
  const int64_t tiles = ceil_div(ld / kVec, kWarpSize);
  const int64_t warp_tasks = ceil_div(nnz, kWarpSize);
  // Enough warps for the whole GPU: cut N into slabs when the nonzeros alone are too few.
  const int64_t target = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * kSddmmTargetWarpsPerSM;
  int64_t slabs = std::clamp<int64_t>(ceil_div(target, warp_tasks), 1, std::min(tiles, kMaxGridY));
  const int64_t tiles_per_slab = ceil_div(tiles, slabs);
  slabs = ceil_div(tiles, tiles_per_slab);  // no empty slab

  at::Tensor out = at::empty({nnz}, xT.options());
  at::Tensor partial;
  SddmmArgs<scalar_t> a{};
  a.crow = crow.const_data_ptr<int32_t>();
  a.col = col.const_data_ptr<int32_t>();
  a.a = goT.const_data_ptr<scalar_t>();
  a.b = xT.const_data_ptr<scalar_t>();
  a.out = out.data_ptr<scalar_t>();
  a.partial = nullptr;
  if (slabs > 1) {
    partial = at::empty({slabs, nnz}, xT.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
    a.partial = partial.data_ptr<opmath_t>();
  }
  a.ld = ld;
  a.vecs_per_slab = tiles_per_slab * kWarpSize;
  a.nnz = nnz;
  a.rows = static_cast<int32_t>(M);
  a.b_rows = static_cast<int32_t>(K);
  const dim3 grid(static_cast<unsigned>(ceil_div(warp_tasks, kSddmmWarps)), static_cast<unsigned>(slabs));
  csr_sddmm_kernel<scalar_t><<<grid, kSddmmWarps * kWarpSize, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (slabs > 1) {
    out.copy_(partial.sum(0));  // float (double) sum of the slabs, one rounding to the dtype
  }
  return out;
}

// ---- csr_to_dense / csr_gather -----------------------------------------------------------------
// A block per row (a grid of at most kMaxRowBlocks looping over the rows): csr_to_dense zeroes the
// row with coalesced stores and, after a barrier, scatters the row's kept values into it, so every
// element is written by one kernel (no memset pass); csr_gather reads the kept positions of a row.
// Both assert the pattern on the device (offsets within [0, nnz], columns in range and strictly
// increasing within a row), as the CPU kernels check it on the host.
constexpr int kRowThreads = 256;
constexpr int64_t kMaxRowBlocks = int64_t{1} << 16;

__device__ __forceinline__ void assert_row_entry(const int32_t* __restrict__ col, int64_t e, int64_t begin,
                                                 int64_t cols) {
  CUDA_KERNEL_ASSERT(col[e] >= 0 && col[e] < cols);
  CUDA_KERNEL_ASSERT(e == begin || col[e - 1] < col[e]);
}

__device__ __forceinline__ void assert_row_range(int64_t r, int64_t rows, int64_t begin, int64_t end, int64_t nnz) {
  CUDA_KERNEL_ASSERT(begin >= 0 && begin <= end && end <= nnz);
  CUDA_KERNEL_ASSERT(r != 0 || begin == 0);
  CUDA_KERNEL_ASSERT(r != rows - 1 || end == nnz);
}

template <typename scalar_t, bool kWideZeros>
__global__ void __launch_bounds__(kRowThreads) csr_to_dense_kernel(const scalar_t* __restrict__ values,
                                                                   const int32_t* __restrict__ crow,
                                                                   const int32_t* __restrict__ col,
                                                                   scalar_t* __restrict__ out, int64_t rows,
                                                                   int64_t cols, int64_t nnz) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {  // uniform within the block: the barrier is safe
    scalar_t* row = out + r * cols;
    if constexpr (kWideZeros) {  // rows of whole, aligned 16-byte words: one store per 16 bytes (bf16: 8 values)
      uint4* words = reinterpret_cast<uint4*>(row);
      const int64_t n = cols * static_cast<int64_t>(sizeof(scalar_t)) / 16;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        words[i] = make_uint4(0u, 0u, 0u, 0u);  // +0.0 in every float format
      }
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        row[c] = scalar_t(0);
      }
    }
    __syncthreads();  // the zeros before the values (another thread's column)
    const int64_t begin = crow[r], end = crow[r + 1];
    assert_row_range(r, rows, begin, end, nnz);
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
      assert_row_entry(col, e, begin, cols);
      row[col[e]] = values[e];
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads) csr_gather_kernel(const scalar_t* __restrict__ dense, int64_t s0,
                                                                 int64_t s1, const int32_t* __restrict__ crow,
                                                                 const int32_t* __restrict__ col,
                                                                 scalar_t* __restrict__ out, int64_t rows,
                                                                 int64_t cols, int64_t nnz) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t begin = crow[r], end = crow[r + 1];
    assert_row_range(r, rows, begin, end, nnz);
    const scalar_t* row = dense + r * s0;
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
      assert_row_entry(col, e, begin, cols);
      out[e] = row[static_cast<int64_t>(col[e]) * s1];
    }
  }
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::min(rows, kMaxRowBlocks));
}

// ---- Ops ---------------------------------------------------------------------------------------
// Each op runs its ATen calls (mm, where, sum, transposes' allocations ...) below autograd
// (KernelGuards): a backend kernel is differentiated only through the autograd formula registered
// for the op, never by recording its internals, so its outputs never require grad by themselves
// (what torch.library.opcheck's test_autograd_registration checks).
struct KernelGuards {
  explicit KernelGuards(const at::Tensor& x) : device(x.device()) {}
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard device;
};

// weight with 0 at the pruned positions. A select rather than weight * mask, so that whatever a
// pruned position holds (inf, NaN) contributes exactly 0.
at::Tensor masked_weight(const at::Tensor& weight, const at::Tensor& mask) {
  return at::where(mask, weight, 0);
}

at::Tensor masked_matmul_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                              const std::optional<at::Tensor>& bias) {
  check_cuda_limits("masked_matmul", x, check_masked_matmul_args(x, weight, mask, bias));
  const KernelGuards guards(x);
  const at::Tensor w = masked_weight(weight, mask);
  return has_value(bias) ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_matmul_backward_cuda(const at::Tensor& grad_out,
                                                                           const at::Tensor& x,
                                                                           const at::Tensor& weight,
                                                                           const at::Tensor& mask,
                                                                           std::array<bool, 3> output_mask,
                                                                           bool dense_grad) {
  check_cuda_limits("masked_matmul_backward", x, check_masked_matmul_backward_args(grad_out, x, weight, mask));
  const KernelGuards guards(x);
  at::Tensor dx = output_mask[0] ? at::mm(grad_out, masked_weight(weight, mask)) : empty_output(x);
  at::Tensor dweight = empty_output(x);
  if (output_mask[1]) {
    dweight = at::mm(grad_out.t(), x);
    if (!dense_grad) {
      dweight = at::where(mask, dweight, 0);
    }
  }
  at::Tensor dbias = output_mask[2] ? grad_out.sum(0) : empty_output(x);
  return {dx, dweight, dbias};
}

at::Tensor csr_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                           const at::Tensor& col_indices, const at::Tensor& row_order,
                           const std::optional<at::Tensor>& bias) {
  const MatmulSizes sz = check_csr_linear_args(x, values, crow_indices, col_indices, row_order, bias);
  check_cuda_limits("csr_linear", x, sz);
  const bool small_n = small_n_requested();  // at every call: a bad value is refused whatever the sizes
  const int64_t M = sz.m;
  const KernelGuards guards(x);
  const int64_t N = x.size(0);
  const int64_t K = x.size(1);
  const int64_t nnz = values.numel();
  if (N == 0 || M == 0) {
    return at::empty({N, M}, x.options());
  }
  if (nnz == 0) {  // a fully pruned weight (also every K == 0 weight)
    // clone: for N = 1 the expanded bias is already contiguous, and contiguous() would return the bias
    // itself (an output aliasing an input).
    return has_value(bias) ? bias->unsqueeze(0).expand({N, M}).clone(at::MemoryFormat::Contiguous)
                           : at::zeros({N, M}, x.options());
  }
  const SparseOperand w{values.contiguous(), /*value_pos=*/at::Tensor(), crow_indices.contiguous(),
                        col_indices.contiguous(), row_order.contiguous(), M, K};
  const at::Tensor b = has_value(bias) ? bias->contiguous() : at::Tensor();
  const bool few_rows = N <= kSmallN && small_n;
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csr_linear_cuda", [&] {
    if (few_rows) {
      y = spmv_rows<scalar_t>(x, w.values, w.offsets, w.indices, w.order, b, M);
      return;
    }
    const int64_t ld = padded_width<scalar_t>(N);
    y = untransposed(spmm<scalar_t>(w, transposed_padded(x, ld), ld, b), N);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
    const at::Tensor& col_indices, const at::Tensor& row_order, const at::Tensor& ccol_indices,
    const at::Tensor& row_indices, const at::Tensor& csc_to_csr, std::array<bool, 3> output_mask) {
  const MatmulSizes sz = check_csr_linear_backward_args(grad_out, x, values, crow_indices, col_indices, row_order,
                                                        ccol_indices, row_indices, csc_to_csr);
  check_cuda_limits("csr_linear_backward", x, sz);
  const int64_t M = sz.m;
  const KernelGuards guards(x);
  const int64_t N = x.size(0);
  const int64_t K = x.size(1);
  const int64_t nnz = values.numel();
  const bool need_dx = output_mask[0];
  const bool need_dvalues = output_mask[1];

  at::Tensor dx = empty_output(x);
  at::Tensor dvalues = empty_output(x);
  at::Tensor dbias = output_mask[2] ? grad_out.sum(0) : empty_output(x);
  if (need_dx && (nnz == 0 || N == 0)) {
    dx = at::zeros({N, K}, x.options());
  }
  if (need_dvalues && (nnz == 0 || N == 0)) {
    dvalues = at::zeros({nnz}, x.options());
  }
  if (nnz == 0 || N == 0 || !(need_dx || need_dvalues)) {
    return {dx, dvalues, dbias};
  }

  // W^T in CSR (the compressed-column view), only for dx. Its rows (the columns of W) are taken
  // longest first, for the load balance row_order gives the forward (a device sort: no sync).
  SparseOperand wt{values.contiguous(), csc_to_csr.contiguous(), ccol_indices.contiguous(),
                   row_indices.contiguous(), /*order=*/at::Tensor(), K, M};
  if (need_dx) {
    const at::Tensor col_len = at::sub(wt.offsets.narrow(0, 1, K), wt.offsets.narrow(0, 0, K));
    wt.order = at::argsort(col_len, /*stable=*/false, /*dim=*/0, /*descending=*/true).to(at::kInt);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "csr_linear_backward_cuda", [&] {
    const int64_t ld = padded_width<scalar_t>(N);
    const at::Tensor goT = transposed_padded(grad_out, ld);  // [M, ld]: B of dx, A of dvalues
    if (need_dx) {
      dx = untransposed(spmm<scalar_t>(wt, goT, ld, at::Tensor()), N);
    }
    if (need_dvalues) {
      dvalues = sddmm<scalar_t>(goT, transposed_padded(x, ld), ld, crow_indices.contiguous(),
                                col_indices.contiguous(), M, K, nnz);
    }
  });
  return {dx, dvalues, dbias};
}

void csr_to_dense_into_cuda(const MatmulSizes& sz, const at::Tensor& values, const at::Tensor& crow_indices,
                            const at::Tensor& col_indices, at::Tensor& out) {
  const int64_t cols = sz.k;
  if (sz.m == 0) {
    return;
  }
  // Launched even without columns or kept weights: the kernel's row asserts check crow_indices,
  // as the CPU kernel checks it on the host.
  const at::Tensor v = values.contiguous(), crow = crow_indices.contiguous(), col = col_indices.contiguous();
  const bool wide_zeros = (cols * static_cast<int64_t>(out.element_size())) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "csr_to_dense_cuda", [&] {
    const auto kernel = wide_zeros ? csr_to_dense_kernel<scalar_t, true> : csr_to_dense_kernel<scalar_t, false>;
    kernel<<<row_blocks(sz.m), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        v.const_data_ptr<scalar_t>(), crow.const_data_ptr<int32_t>(), col.const_data_ptr<int32_t>(),
        out.mutable_data_ptr<scalar_t>(), sz.m, cols, sz.nnz);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor csr_to_dense_cuda(const at::Tensor& values, const at::Tensor& crow_indices, const at::Tensor& col_indices,
                             int64_t cols) {
  const MatmulSizes sz = check_csr_to_dense_args(values, crow_indices, col_indices, cols);
  PF_CHECK(values.is_cuda(), "csr_to_dense", "values must be a CUDA tensor, got ", values.device());
  const KernelGuards guards(values);
  at::Tensor out = at::empty({sz.m, cols}, values.options());
  csr_to_dense_into_cuda(sz, values, crow_indices, col_indices, out);
  return out;
}

void csr_to_dense_into_cuda_op(at::Tensor& out, const at::Tensor& values, const at::Tensor& crow_indices,
                               const at::Tensor& col_indices) {
  const MatmulSizes sz = check_csr_to_dense_into_args(out, values, crow_indices, col_indices);
  PF_CHECK(values.is_cuda(), "csr_to_dense_into", "values must be a CUDA tensor, got ", values.device());
  const KernelGuards guards(values);
  csr_to_dense_into_cuda(sz, values, crow_indices, col_indices, out);
}

at::Tensor csr_gather_cuda(const at::Tensor& dense, const at::Tensor& crow_indices, const at::Tensor& col_indices) {
  const MatmulSizes sz = check_csr_gather_args(dense, crow_indices, col_indices);
  PF_CHECK(dense.is_cuda(), "csr_gather", "dense must be a CUDA tensor, got ", dense.device());
  const KernelGuards guards(dense);
  at::Tensor out = at::empty({sz.nnz}, dense.options());
  if (sz.m == 0) {  // then nnz == 0 (checked); else launched even without kept weights, to assert crow
    return out;
  }
  const at::Tensor crow = crow_indices.contiguous(), col = col_indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "csr_gather_cuda", [&] {
    csr_gather_kernel<scalar_t><<<row_blocks(sz.m), kRowThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        dense.const_data_ptr<scalar_t>(), dense.stride(0), dense.stride(1), crow.const_data_ptr<int32_t>(),
        col.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), sz.m, sz.k, sz.nnz);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace pyfinetune

TORCH_LIBRARY_IMPL(pyfinetune, CUDA, m) {
  m.impl("masked_matmul", &pyfinetune::masked_matmul_cuda);
  m.impl("masked_matmul_backward", &pyfinetune::masked_matmul_backward_cuda);
  m.impl("csr_linear", &pyfinetune::csr_linear_cuda);
  m.impl("csr_linear_backward", &pyfinetune::csr_linear_backward_cuda);
  m.impl("csr_to_dense", &pyfinetune::csr_to_dense_cuda);
  m.impl("csr_to_dense_into", &pyfinetune::csr_to_dense_into_cuda_op);
  m.impl("csr_gather", &pyfinetune::csr_gather_cuda);
}
