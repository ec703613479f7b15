// CUDA kernel of pyfinetune::tiled_csr_linear: y [N, M] = x [N, K] @ W^T + bias for a sparse
// weight W [M, K] whose kept entries are grouped in 128 x 64 tiles, float16 / bfloat16 on tensor
// cores (sm80+), float32 accumulation.
//
// Why. The warp-per-row SpMM of csr_linear (masked_matmul_cuda.cu) runs on CUDA cores and reads
// one row of x^T from L2 per kept weight: at 90% sparsity of a 4096 x 4096 weight and N = 256 that
// is 1.7 GB of L2 traffic, and on an H100 it ran at 0.43x cuBLAS's dense float16 product
// (benchmarks/results/gpu-check-20261126-1338). This kernel loads the weight as sparse and computes
// as dense ("load as sparse, compute as dense", the idea of Flash-LLM, Xia et al., VLDB 2024): each
// block owns 128 output features and 64 rows of x; for each 64-wide slice of K it expands the
// slice's kept weights (4 bytes each: a value and an int16 place in the tile) into a zeroed dense
// 128 x 64 tile in shared memory and multiplies it with the 64 x 64 slice of x on the tensor cores
// (mma.sync m16n8k16). Global traffic is the compressed weight (once per 64 rows of x) and x (once
// per 128 features); the multiply-adds are those of the dense product, which the tensor cores do
// many times faster than the CUDA cores do the sparse ones.
//
// Block: 8 warps = 2 (rows of x, 32 each) x 4 (features, 32 each); each warp holds 2 x 4 mma tiles
// of 16 x 8 float32 accumulators. Shared memory: 3 stages of (x slice 64 x 64, weight tile 128 x 64),
// rows padded to 72 elements (144 bytes) so that the 8 row addresses of every ldmatrix phase fall in
// distinct banks. Pipeline, at step t (computing slice t from stage t % 3):
//   wait for x slice t (cp.async), barrier;
//   scatter tile t + 1's entries (loaded into registers during step t - 1) into its stage, which
//   step t - 1 zeroed; zero the stage of tile t + 2 (slice t - 1 was computed from it), load tile
//   t + 2's entries into registers and start the copy of x slice t + 2 (cp.async, zero-filled past
//   N and K); then the 2 x 4 x 4 mma of slice t.
// One barrier per step orders all of it: a zeroing and the scatter into the same stage are a
// barrier apart, and a stage is rewritten only after the barrier that follows its last read. Each
// thread stages up to kStaged entries of a tile in registers (1024 per tile: a 128 x 64 tile at
// 87.5% sparsity); a denser tile's remaining entries are read at the scatter (correct, slower).
//
// x with unit column stride, K and the row stride multiples of 8 and a 16-byte aligned start is
// copied with cp.async (16 bytes at a time); other x with plain loads (same pipeline, synchronous).
// The tile data cannot be validated on the host without a synchronization: the kernel asserts
// (CUDA_KERNEL_ASSERT) that tile_ptr is non-decreasing and within nnz and that each tile_loc lies
// in [0, 8192), so a malformed layout stops with a device assertion instead of writing out of
// bounds. An entry placed past row M or column K (which pyfinetune.ops.tiled_pattern never makes)
// multiplies zeros and is not stored; two entries at one place leave one of them (the CPU kernel
// refuses both). A tile with no entry skips its multiply (block-uniform: read from tile_ptr).
//
// Non-finite inputs: the tiles are multiplied densely, so an inf or NaN in x reaches every output
// of its row through the zeros of a tile (0 * inf = NaN), as in the dense product x @ W^T, except
// where it meets only tiles with no entry (skipped): there the output stays finite, as in
// csr_linear, which multiplies only kept weights. The CPU kernel computes densely (NaN there too).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <pyfinetune/checks.h>
#include <pyfinetune/masked_matmul.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <mutex>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

namespace pyfinetune {
namespace {

constexpr int kRows = static_cast<int>(kTiledRows);  // output features per block and per tile
constexpr int kCols = static_cast<int>(kTiledCols);  // K per tile (one pipeline step)
constexpr int kTokens = 64;                          // rows of x per block
constexpr int kThreads = 256;                        // 8 warps
constexpr int kStages = 3;
constexpr int kPitch = kCols + 8;  // elements per shared-memory row: 144 bytes
constexpr int kStaged = 4;         // tile entries per thread held in registers (1024 per tile)
constexpr int kXStage = kTokens * kPitch;  // elements
constexpr int kWStage = kRows * kPitch;
constexpr int kSmemBytes = kStages * (kXStage + kWStage) * 2;  // 82944
constexpr int64_t kMaxGridY = 65535;
static_assert(kRows * kCols <= 32768, "tile_loc is int16");
static_assert((kXStage * 2) % 16 == 0 && (kWStage * 2) % 16 == 0, "16-byte aligned stages");

struct TiledArgs {
  const uint16_t* x;      // [N, K] with row stride x_rs (elements), unit column stride
  const uint16_t* vals;   // [nnz] in tile order
  const int32_t* ptr;     // [tiles + 1]
  const int16_t* loc;     // [nnz]
  const void* bias;       // [M] of x's dtype, or nullptr
  void* y;                // [N, M] contiguous
  float* partial;         // forward split over K: [gridDim.z, N, M] float32 sums per part, else nullptr
  int64_t x_rs;
  int64_t n;
  int64_t nnz;
  int32_t k;
  int32_t m;
  int32_t k_tiles;
  int32_t kt_per;         // forward: K tiles per part (blockIdx.z); k_tiles when K is not split
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define PF_TILED_SM80 1
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
#ifdef PF_TILED_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef PF_TILED_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef PF_TILED_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef PF_TILED_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

// The same with each 8 x 8 matrix transposed on the way (.trans): lane 4 r + c receives the elements
// (2c, r) and (2c + 1, r) of matrix i in register i.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#ifdef PF_TILED_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
#endif
}

// d += a (16 x 16, row-major) * b (16 x 8, column-major), float32 accumulators.
template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef PF_TILED_SM80
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// acc[i][j] += a[i] * (8-column block j of b): a[i] two 16-row A fragments, b[p] the B fragments of
// 16 columns (registers 0, 1: b0, b1 of columns 0-7; 2, 3: of 8-15), so block j is half (j & 1) of
// b[j >> 1]. The 2 x 4 mma of the forward's and the values gradient's warp tiles.
template <bool kBf16>
__device__ __forceinline__ void mma_2x4(float (&acc)[2][4][4], const uint32_t (&a)[2][4], const uint32_t (&b)[2][4]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) mma_16816<kBf16>(acc[i][j], a[i], b[j >> 1][(j & 1) * 2], b[j >> 1][(j & 1) * 2 + 1]);
}

// The slice [r0, r0 + 64) x [c0, c0 + kSliceCols) of a row-major [rows, cols] operand (row stride
// rs, unit column stride) into a stage of row pitch kSliceCols + 8, zeros outside [0, rows) x
// [0, cols). kAligned: cols and rs multiples of 8 and a 16-byte aligned start, so that a 16-byte
// chunk is wholly inside or wholly outside: cp.async, zero-filled outside (src-size 0).
template <int kSliceCols, bool kAligned>
__device__ __forceinline__ void load_slice(const uint16_t* src, int64_t rows, int64_t cols, int64_t rs,
                                           uint16_t* stage, int64_t r0, int64_t c0) {
  constexpr int kChunksPerRow = kSliceCols / 8;
  constexpr int kPerThread = kTokens * kChunksPerRow / kThreads;
  static_assert(kPerThread * kThreads == kTokens * kChunksPerRow, "whole chunks per thread");
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int c = threadIdx.x + i * kThreads;  // 16-byte chunk of the slice
    const int r = c / kChunksPerRow;
    const int cc = (c % kChunksPerRow) * 8;
    const int64_t row = r0 + r;
    const int64_t col = c0 + cc;
    uint16_t* dst = stage + r * (kSliceCols + 8) + cc;
    if constexpr (kAligned) {
      const bool inside = row < rows && col < cols;
      const uint16_t* from = inside ? src + row * rs + col : src;
      cp_async16(smem_addr(dst), from, inside ? 16 : 0);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        dst[j] = (row < rows && col + j < cols) ? src[row * rs + col + j] : uint16_t{0};
      }
    }
  }
}

__device__ __forceinline__ void zero_stage(uint16_t* ws) {
  uint4* p = reinterpret_cast<uint4*>(ws);
  constexpr int kChunks = kWStage * 2 / 16;
  for (int i = threadIdx.x; i < kChunks; i += kThreads) {
    p[i] = make_uint4(0, 0, 0, 0);
  }
}

__device__ __forceinline__ void put_entry(uint16_t* ws, int l, uint16_t v) {
  CUDA_KERNEL_ASSERT(static_cast<unsigned>(l) < static_cast<unsigned>(kRows * kCols));
  ws[(l / kCols) * kPitch + (l % kCols)] = v;
}

// Entries of one tile staged in registers: the first kStaged * kThreads of [begin, end). A slot
// without an entry holds kNoEntry (not a negative value: a malformed negative tile_loc must reach
// put_entry's assertion like any other).
constexpr int kNoEntry = INT_MIN;

struct Staged {
  int begin = 0;  // tile_ptr entries (int32); entry indices are formed in int64
  int end = 0;
  int l[kStaged];
  uint16_t v[kStaged];
};

__device__ __forceinline__ void stage_tile(const TiledArgs& a, int tile, Staged& s) {
  s.begin = a.ptr[tile];
  s.end = a.ptr[tile + 1];
  CUDA_KERNEL_ASSERT(0 <= s.begin && s.begin <= s.end && s.end <= a.nnz);
#pragma unroll
  for (int j = 0; j < kStaged; ++j) {
    const int64_t e = static_cast<int64_t>(s.begin) + threadIdx.x + j * kThreads;  // nnz may be near 2^31
    if (e < s.end) {
      s.l[j] = a.loc[e];
      s.v[j] = a.vals[e];
    } else {
      s.l[j] = kNoEntry;
    }
  }
}

__device__ __forceinline__ void scatter_tile(const TiledArgs& a, const Staged& s, uint16_t* ws) {
#pragma unroll
  for (int j = 0; j < kStaged; ++j) {
    if (s.l[j] != kNoEntry) {
      put_entry(ws, s.l[j], s.v[j]);
    }
  }
  for (int64_t e = static_cast<int64_t>(s.begin) + kStaged * kThreads + threadIdx.x; e < s.end; e += kThreads) {
    put_entry(ws, a.loc[e], a.vals[e]);
  }
}

// The pipeline both kernels run over `steps` weight tiles (see the header): per step, the tile
// tile_of(t) expanded into its stage of `ws` and the operand slice of step t loaded by
// load_operand(t, stage); compute(stage) multiplies the two (skipped for a tile with no entry: the
// same decision in every thread, read from tile_ptr). Starts with a barrier, so that a block can
// run it again for its next rows once the previous run's last compute is done.
template <typename LoadOperand, typename TileOf, typename Compute>
__device__ __forceinline__ void tile_pipeline(const TiledArgs& a, int steps, uint16_t* ws, LoadOperand load_operand,
                                              TileOf tile_of, Compute compute) {
  __syncthreads();  // the previous run's last step has read every stage
  for (int s = 0; s < kStages; ++s) {
    zero_stage(ws + s * kWStage);
  }
  load_operand(0, 0);
  cp_async_commit();
  if (steps > 1) {
    load_operand(1, 1);
  }
  cp_async_commit();
  Staged next;
  stage_tile(a, tile_of(0), next);
  __syncthreads();  // zeros before the scatter
  scatter_tile(a, next, ws);
  bool empty_next = next.begin == next.end;  // of the coming step's tile
  if (steps > 1) {
    stage_tile(a, tile_of(1), next);
  }
  for (int t = 0; t < steps; ++t) {
    cp_async_wait<1>();  // this thread's copies of step t are done (step t + 1's may be pending)
    __syncthreads();     // ... and everyone's, and the scatter of tile t; stage (t + 2) % 3 is free
    const bool empty = empty_next;
    if (t + 1 < steps) {
      scatter_tile(a, next, ws + ((t + 1) % kStages) * kWStage);
      empty_next = next.begin == next.end;
    }
    if (t + 2 < steps) {
      const int s2 = (t + 2) % kStages;
      zero_stage(ws + s2 * kWStage);
      stage_tile(a, tile_of(t + 2), next);
      load_operand(t + 2, s2);
    }
    cp_async_commit();  // possibly empty: keeps one group per step for the wait above
    if (!empty) {
      compute(t % kStages);
    }
  }
}

// ---- The asynchronous pipeline (PYFINETUNE_TILED_CUDA_ASYNC=1, experimental) -------------------
// Why: in tile_pipeline every step starts with a global load of tile_ptr whose value the next
// instruction needs (the bounds of the entries to stage), so each step waits out one memory latency
// with every warp of the block idle, and the entries it stages are loaded only one step before
// their scatter. On an H200 the forward took 0.074 ms at N = 256 and 90% sparsity, 0.067 ms at 99%
// (where there is almost nothing to scatter): about 2000 cycles a step against a few hundred of
// tensor-core work, i.e. latency (benchmarks/results/gpu-check-20261127-1257, prune-tc-quick).
// Here nothing a step waits for is loaded in that step:
//   * the tile bounds come from registers loaded one step earlier (tile t + 4's at step t);
//   * a tile's entries are copied global -> shared (cp.async, 16 bytes at a time, the first kCap
//     of them) two steps before their scatter, in the same commit group as the operand slice of
//     step t + 2, so the one wait per step covers both;
//   * the scatter reads them from shared memory (entries past kCap: from global, as the register
//     pipeline reads its overflow; only those loads are waited for in the step that issues them).
// kCap: 1032 entries for the forward (87.4% sparsity of a 128 x 64 tile; 95 KB per block, two blocks
// per SM on an H100 / H200, one on an A100, whose default forward fills its 164 KB with two), 680
// for the input gradient (its larger operand stages: 115 KB per block keeps two per H100 SM; a tile
// at 90% sparsity holds ~820 entries, the rest read at the scatter).
// At step t (after the wait for step t's group - 1 and the barrier): scatter tile t + 1 (copied at
// step t - 2) into its stage, zeroed at step t - 1; zero the stage of tile t + 2; copy tile t + 3's
// entries into entry stage (t + 3) % 3 (last read by the scatter of step t - 1, before this step's
// barrier) and operand slice t + 2; commit; multiply tile t. The copies of the entries start at the
// tile's first entry rounded down to 8 (16 bytes): loc and vals must be 16-byte aligned (else the
// host runs tile_pipeline); the last chunk is cut at nnz (cp.async zero-fills it), so nothing past
// either array is read. Same barriers, zeroing and empty-tile skip as tile_pipeline, so the results
// are the same bits (the scatter writes the same values to the same places).
constexpr int kFwdEntryCap = 1032;  // entries staged per tile by the forward: 129 16-byte chunks per array
constexpr int kDxEntryCap = 680;    // by the input gradient: 85 chunks

template <int kCap>
constexpr int entry_stage_elems() {  // elements per entry stage: tile_loc's chunks, then the values'
  static_assert(kCap % 8 == 0, "whole 16-byte chunks per array");
  return 2 * kCap;
}

template <int kCap>
constexpr int entry_smem_bytes() {
  return kStages * entry_stage_elems<kCap>() * 2;  // forward 12384, input gradient 8160
}

struct TileBounds {
  int begin = 0;
  int end = 0;
};

__device__ __forceinline__ TileBounds read_bounds(const TiledArgs& a, int tile) {
  return {a.ptr[tile], a.ptr[tile + 1]};
}

// The first kCap entries of [b.begin, b.end) (from the chunk holding b.begin), tile_loc's and the
// values', into entry stage es; part of the caller's commit group.
template <int kCap>
__device__ __forceinline__ void copy_entries(const TiledArgs& a, TileBounds b, uint16_t* es) {
  CUDA_KERNEL_ASSERT(0 <= b.begin && b.begin <= b.end && b.end <= a.nnz);
  if (b.begin == b.end) {
    return;
  }
  const int64_t first = static_cast<int64_t>(b.begin) & ~int64_t{7};
  const int64_t stop = std::min<int64_t>(b.end, first + kCap);
  const int chunks = static_cast<int>((stop - first + 7) / 8);  // per array, <= kCap / 8
  for (int c = threadIdx.x; c < 2 * chunks; c += kThreads) {
    const bool values = c >= chunks;
    const int cc = values ? c - chunks : c;
    const int64_t e0 = first + static_cast<int64_t>(cc) * 8;  // < stop <= nnz
    const int64_t left = a.nnz - e0;
    const int bytes = left >= 8 ? 16 : static_cast<int>(left) * 2;
    const uint16_t* src = values ? a.vals + e0 : reinterpret_cast<const uint16_t*>(a.loc) + e0;
    cp_async16(smem_addr(es + (values ? kCap : 0) + cc * 8), src, bytes);
  }
}

// Scatter of a tile whose entries copy_entries put in es (and completed): as scatter_tile.
template <int kCap>
__device__ __forceinline__ void scatter_copied(const TiledArgs& a, TileBounds b, const uint16_t* es, uint16_t* ws) {
  const int64_t first = static_cast<int64_t>(b.begin) & ~int64_t{7};
  const int64_t stop = std::min<int64_t>(b.end, first + kCap);
  const int16_t* loc = reinterpret_cast<const int16_t*>(es);
  for (int64_t e = static_cast<int64_t>(b.begin) + threadIdx.x; e < stop; e += kThreads) {
    put_entry(ws, loc[e - first], es[kCap + (e - first)]);
  }
  for (int64_t e = stop + threadIdx.x; e < b.end; e += kThreads) {
    put_entry(ws, a.loc[e], a.vals[e]);
  }
}

template <int kCap, typename LoadOperand, typename TileOf, typename Compute>
__device__ __forceinline__ void tile_pipeline_async(const TiledArgs& a, int steps, uint16_t* ws, uint16_t* es,
                                                    LoadOperand load_operand, TileOf tile_of, Compute compute) {
  constexpr int kEStage = entry_stage_elems<kCap>();
  auto bounds = [&](int t) { return t < steps ? read_bounds(a, tile_of(t)) : TileBounds{}; };
  __syncthreads();  // the previous run's last step has read every stage
  for (int s = 0; s < kStages; ++s) {
    zero_stage(ws + s * kWStage);
  }
  TileBounds b0 = bounds(0), b1 = bounds(1), b2 = bounds(2), b3 = bounds(3);  // tiles t .. t + 3
  load_operand(0, 0);
  copy_entries<kCap>(a, b0, es);
  if (steps > 1) {
    copy_entries<kCap>(a, b1, es + kEStage);
  }
  cp_async_commit();
  if (steps > 1) {
    load_operand(1, 1);
  }
  if (steps > 2) {
    copy_entries<kCap>(a, b2, es + 2 * kEStage);
  }
  cp_async_commit();
  cp_async_wait<1>();  // the first group: slice 0 and the entries of tiles 0 and 1
  __syncthreads();     // ... everyone's, and the zeros
  scatter_copied<kCap>(a, b0, es, ws);
  for (int t = 0; t < steps; ++t) {
    cp_async_wait<1>();  // step t's group - 1: slice t and the entries of tile t + 1
    __syncthreads();     // ... everyone's, and the scatter of tile t; stage (t + 2) % 3 is free
    const bool empty = b0.begin == b0.end;
    if (t + 1 < steps) {
      scatter_copied<kCap>(a, b1, es + ((t + 1) % kStages) * kEStage, ws + ((t + 1) % kStages) * kWStage);
    }
    if (t + 2 < steps) {
      const int s2 = (t + 2) % kStages;
      zero_stage(ws + s2 * kWStage);
      load_operand(t + 2, s2);
    }
    if (t + 3 < steps) {
      copy_entries<kCap>(a, b3, es + (t % kStages) * kEStage);  // (t + 3) % 3
    }
    b0 = b1;
    b1 = b2;
    b2 = b3;
    b3 = bounds(t + 4);  // straight into b3's registers: first needed by step t + 1's copy
    cp_async_commit();   // possibly empty: keeps one group per step for the wait above
    if (!empty) {
      compute(t % kStages);
    }
  }
}

// The pipeline a kernel runs: tile_pipeline, or (kAsync) tile_pipeline_async with its entry stages at es.
template <bool kAsync, int kCap, typename LoadOperand, typename TileOf, typename Compute>
__device__ __forceinline__ void run_pipeline(const TiledArgs& a, int steps, uint16_t* ws, uint16_t* es,
                                             LoadOperand load_operand, TileOf tile_of, Compute compute) {
  if constexpr (kAsync) {
    tile_pipeline_async<kCap>(a, steps, ws, es, load_operand, tile_of, compute);
  } else {
    tile_pipeline(a, steps, ws, load_operand, tile_of, compute);
  }
}

template <typename scalar_t, bool kAligned, bool kAsync>
__global__ void __launch_bounds__(kThreads, 2) tiled_csr_linear_kernel(const TiledArgs a) {
#ifdef PF_TILED_SM80
  constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* xs = smem;                       // kStages x [kTokens][kPitch]
  uint16_t* ws = smem + kStages * kXStage;   // kStages x [kRows][kPitch]
  uint16_t* es = ws + kStages * kWStage;     // kAsync: kStages entry stages (entry_stage_elems)

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warp_tok = warp & 1;   // rows [32 * warp_tok, +32) of the block's 64 rows of x
  const int warp_feat = warp >> 1;  // features [32 * warp_feat, +32) of the block's 128
  const int rb = blockIdx.x;
  const int64_t feat0 = static_cast<int64_t>(rb) * kRows;
  // K tiles [kt0, kt0 + kt_count) of this part (blockIdx.z; the host makes every part non-empty).
  const int kt0 = static_cast<int>(blockIdx.z) * a.kt_per;
  const int kt_count = min(a.kt_per, a.k_tiles - kt0);
  const int tile0 = rb * a.k_tiles + kt0;
  const int64_t n_blocks = (a.n + kTokens - 1) / kTokens;

  // ldmatrix row addresses (element offsets within a stage), see the fragment layouts of
  // mma.m16n8k16: x (operand A, 16 x 16 row-major): lanes 0-15 give rows 0-15 at k 0, lanes 16-31
  // rows 0-15 at k 8; weight (operand B, k x features, stored features-major): lanes 0-7 features
  // 0-7 at k 0, 8-15 features 0-7 at k 8, 16-23 features 8-15 at k 0, 24-31 features 8-15 at k 8.
  const int a_off = (warp_tok * 32 + (lane & 15)) * kPitch + (lane >> 4) * 8;
  const int b_off = (warp_feat * 32 + (lane & 7) + (lane >> 4) * 8) * kPitch + ((lane >> 3) & 1) * 8;

  for (int64_t nb = blockIdx.y; nb < n_blocks; nb += gridDim.y) {
    const int64_t n0 = nb * kTokens;
    float acc[2][4][4] = {};  // zeros

    run_pipeline<kAsync, kFwdEntryCap>(
        a, kt_count, ws, es,
        [&](int t, int stage) {
          load_slice<kCols, kAligned>(a.x, a.n, a.k, a.x_rs, xs + stage * kXStage, n0,
                                      static_cast<int64_t>(kt0 + t) * kCols);
        },
        [&](int t) { return tile0 + t; },
        [&](int stage) {
          const uint16_t* xst = xs + stage * kXStage;
          const uint16_t* wst = ws + stage * kWStage;
#pragma unroll
          for (int kk = 0; kk < kCols / 16; ++kk) {
            uint32_t af[2][4];
            uint32_t bf[2][4];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              ldmatrix_x4(af[i], smem_addr(xst + a_off + i * 16 * kPitch + kk * 16));
              ldmatrix_x4(bf[i], smem_addr(wst + b_off + i * 16 * kPitch + kk * 16));
            }
            mma_2x4<kBf16>(acc, af, bf);
          }
        });

    // Epilogue: acc[i][j] = rows 16 i + g (+8) of the warp's 32, features 8 j + 2 c (+1) of its 32,
    // g = lane / 4, c = lane % 4.
    const int g = lane >> 2;
    const int c2 = (lane & 3) * 2;
    if (a.partial != nullptr) {
      // A part of a split K: its float32 sums, to be added up (and the bias added) by
      // tiled_csr_sum_parts_kernel.
      float* part = a.partial + static_cast<int64_t>(blockIdx.z) * a.n * a.m;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t f = feat0 + warp_feat * 32 + j * 8 + c2;
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t row = n0 + warp_tok * 32 + i * 16 + g + h * 8;
            if (row < a.n && f < a.m) {
              part[row * a.m + f] = acc[i][j][2 * h];
              if (f + 1 < a.m) {
                part[row * a.m + f + 1] = acc[i][j][2 * h + 1];
              }
            }
          }
      }
      continue;
    }
    scalar_t* y = static_cast<scalar_t*>(a.y);
    const scalar_t* bias = static_cast<const scalar_t*>(a.bias);
    const bool pairs = (a.m & 1) == 0;  // y rows start at even elements: (f, f + 1) is one 4-byte store
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t f = feat0 + warp_feat * 32 + j * 8 + c2;
      const float b0 = (bias != nullptr && f < a.m) ? static_cast<float>(bias[f]) : 0.f;
      const float b1 = (bias != nullptr && f + 1 < a.m) ? static_cast<float>(bias[f + 1]) : 0.f;
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = n0 + warp_tok * 32 + i * 16 + g + h * 8;
          if (row >= a.n || f >= a.m) {
            continue;
          }
          scalar_t* out = y + row * a.m + f;
          const scalar_t v0 = static_cast<scalar_t>(acc[i][j][2 * h] + b0);
          const scalar_t v1 = static_cast<scalar_t>(acc[i][j][2 * h + 1] + b1);
          if (pairs) {  // f is even and f + 1 < M
            const uint32_t packed = static_cast<uint32_t>(v0.x) | (static_cast<uint32_t>(v1.x) << 16);
            *reinterpret_cast<uint32_t*>(out) = packed;
          } else {
            out[0] = v0;
            if (f + 1 < a.m) {
              out[1] = v1;
            }
          }
        }
    }
  }
#else
  CUDA_KERNEL_ASSERT(false && "tiled_csr_linear needs sm80 or newer");
#endif
}

// y = the sum of the parts of a split K (in part order: the same bits every run) + bias, rounded
// once to y's dtype. Four consecutive outputs per thread (M % 4 == 0: 16-byte loads of every part).
template <typename scalar_t, bool kVec4>
__global__ void tiled_csr_sum_parts_kernel(const float* __restrict__ partial, int parts, int64_t n, int64_t m,
                                           const scalar_t* __restrict__ bias, scalar_t* __restrict__ y) {
  const int64_t total = n * m;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * 4;
  for (int64_t e0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4; e0 < total; e0 += stride) {
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    for (int z = 0; z < parts; ++z) {
      const float* src = partial + z * total + e0;
      if constexpr (kVec4) {
        const float4 v = *reinterpret_cast<const float4*>(src);
        s[0] += v.x;
        s[1] += v.y;
        s[2] += v.z;
        s[3] += v.w;
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (e0 + k < total) {
            s[k] += src[k];
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t e = e0 + k;
      if (e < total) {
        const float b = bias != nullptr ? static_cast<float>(bias[e % m]) : 0.f;
        y[e] = static_cast<scalar_t>(s[k] + b);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Input gradient: dx [N, K] = dy [N, M] @ W [M, K]. A block owns 64 rows of dy and one 64-wide
// column slice kt of W (the output columns kt * 64 ...), and walks the tiles of that column, rb =
// 0, 1, ... (tile rb * KT + kt): per step the slice dy[64 rows, 128 of M] (stage pitch 136) and the
// tile expanded as in the forward ([128 of M][64 of K], pitch 72). The tile is operand B of the mma
// with M as the reduction: stored reduction-major, so it is read with ldmatrix .trans (lanes 0-7:
// M rows 0-7 at columns 0, 8-15: M rows 8-15 at columns 0, 16-23: rows 0-7 at columns 8, 24-31:
// rows 8-15 at columns 8; registers 0, 1 = b0, b1 of output columns 0-7, 2, 3 = those of 8-15).
// Warps: 2 (rows of dy, 32 each) x 4 (output columns, 16 each), 2 x 2 mma tiles per warp, 8 mma
// k-steps of 16 per tile. Same pipeline, barriers and empty-tile skip as the forward.
constexpr int kDyCols = kRows;              // reduction per step: one tile's rows
constexpr int kDyPitch = kDyCols + 8;       // 136 elements: conflict-free ldmatrix rows
constexpr int kDyStage = kTokens * kDyPitch;
// 107520: more than the 99 KB per block of compute capability 8.6 / 8.9 / 12.x (checked at the call;
// pyfinetune.ops.TILED_DX_SMEM_BYTES mirrors it for the Python fallback).
constexpr int kDxSmemBytes = kStages * (kDyStage + kWStage) * 2;

// a.x = dy [N, M] (row stride a.x_rs), a.m = M (the reduction), a.k = K (dx's columns), a.k_tiles =
// ceil(K / 64), a.y = dx [N, K].
template <typename scalar_t, bool kAligned, bool kAsync>
__global__ void __launch_bounds__(kThreads, 2) tiled_csr_dx_kernel(const TiledArgs a) {
#ifdef PF_TILED_SM80
  constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* dys = smem;                       // kStages x [kTokens][kDyPitch]
  uint16_t* ws = smem + kStages * kDyStage;   // kStages x [kRows][kPitch]
  uint16_t* es = ws + kStages * kWStage;      // kAsync: kStages entry stages (entry_stage_elems)

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warp_tok = warp & 1;   // rows [32 * warp_tok, +32) of the block's 64
  const int warp_col = warp >> 1;  // output columns [16 * warp_col, +16) of the block's 64
  const int kt = blockIdx.x;
  const int64_t col0 = static_cast<int64_t>(kt) * kCols;
  const int steps = static_cast<int>((static_cast<int64_t>(a.m) + kRows - 1) / kRows);
  const int64_t n_blocks = (a.n + kTokens - 1) / kTokens;
  const int a_off = (warp_tok * 32 + (lane & 15)) * kDyPitch + (lane >> 4) * 8;
  const int b_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + warp_col * 16 + (lane >> 4) * 8;

  for (int64_t nb = blockIdx.y; nb < n_blocks; nb += gridDim.y) {
    const int64_t n0 = nb * kTokens;
    float acc[2][2][4] = {};  // zeros

    run_pipeline<kAsync, kDxEntryCap>(
        a, steps, ws, es,
        [&](int t, int stage) {
          load_slice<kDyCols, kAligned>(a.x, a.n, a.m, a.x_rs, dys + stage * kDyStage, n0,
                                        static_cast<int64_t>(t) * kDyCols);
        },
        [&](int t) { return t * a.k_tiles + kt; },
        [&](int stage) {
          const uint16_t* dst = dys + stage * kDyStage;
          const uint16_t* wst = ws + stage * kWStage;
#pragma unroll
          for (int kk = 0; kk < kDyCols / 16; ++kk) {
            uint32_t af[2][4];
            uint32_t bf[4];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              ldmatrix_x4(af[i], smem_addr(dst + a_off + i * 16 * kDyPitch + kk * 16));
            }
            ldmatrix_x4_trans(bf, smem_addr(wst + b_off + kk * 16 * kPitch));
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
              for (int j = 0; j < 2; ++j) mma_16816<kBf16>(acc[i][j], af[i], bf[2 * j], bf[2 * j + 1]);
          }
        });

    // acc[i][j]: rows 16 i + g (+8) of the warp's 32, output columns 8 j + 2 c (+1) of its 16.
    const int g = lane >> 2;
    const int c2 = (lane & 3) * 2;
    scalar_t* y = static_cast<scalar_t*>(a.y);
    const bool pairs = (a.k & 1) == 0;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t col = col0 + warp_col * 16 + j * 8 + c2;
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = n0 + warp_tok * 32 + i * 16 + g + h * 8;
          if (row >= a.n || col >= a.k) {
            continue;
          }
          scalar_t* out = y + row * a.k + col;
          const scalar_t v0 = static_cast<scalar_t>(acc[i][j][2 * h]);
          const scalar_t v1 = static_cast<scalar_t>(acc[i][j][2 * h + 1]);
          if (pairs) {
            *reinterpret_cast<uint32_t*>(out) = static_cast<uint32_t>(v0.x) | (static_cast<uint32_t>(v1.x) << 16);
          } else {
            out[0] = v0;
            if (col + 1 < a.k) {
              out[1] = v1;
            }
          }
        }
    }
  }
#else
  CUDA_KERNEL_ASSERT(false && "tiled_csr_linear_backward_input needs sm80 or newer");
#endif
}

// ------------------------------------------------------------------------------------------------
// Weight gradient at the kept positions: for each tile with entries, the block C [128 of M][64 of
// K] = dy^T @ x over all N (steps of 64 rows: the slices dy[64][128 of M], pitch 136, and x[64][64
// of K], pitch 72, both by cp.async, 3 stages), then dvalues[tile_src[e]] = C[tile_loc[e]]. Both
// operands are stored with the reduction (N) as rows, so both are read with ldmatrix .trans:
//   A (16 of M x 16 of N): lanes 0-7 give N rows 0-7 at M column 0, 8-15 rows 0-7 at column 8,
//     16-23 rows 8-15 at column 0, 24-31 rows 8-15 at column 8 (registers a0..a3);
//   B (16 of N x 8 of K), two K blocks per load: lanes 0-7 N rows 0-7 at K column 0, 8-15 rows
//     8-15 at column 0, 16-23 rows 0-7 at column 8, 24-31 rows 8-15 at column 8 (b0, b1 of K
//     columns 0-7, then of 8-15).
// Warps: 4 (M, 32 each) x 2 (K, 32 each), 2 x 4 mma tiles each. The accumulators then go through
// shared memory (float [128][72], in the pipeline's space) so that each entry reads its place.
// A tile with no entry returns at once (block-uniform).
constexpr int kXvPitch = kCols + 8;  // 72
constexpr int kDvStage = kTokens * kDyPitch + kTokens * kXvPitch;  // elements per stage (dy + x)
constexpr int kDvSmemBytes = kStages * kDvStage * 2;                // 79872
constexpr int kCPitch = kCols + 8;  // floats per row of the gathered block: float2 stores without conflicts
static_assert(kRows * kCPitch * 4 <= kDvSmemBytes, "the block C fits in the pipeline's space");

struct ValuesArgs {
  const uint16_t* dy;  // [N, M], row stride dy_rs
  const uint16_t* x;   // [N, K], row stride x_rs
  const int32_t* ptr;
  const int16_t* loc;
  const int32_t* src;  // [nnz]: compressed-row position of each tile entry
  void* dv;            // [nnz]
  int64_t dy_rs;
  int64_t x_rs;
  int64_t n;
  int64_t nnz;
  int32_t m;
  int32_t k;
  int32_t k_tiles;
};

template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(kThreads, 2) tiled_csr_dv_kernel(const ValuesArgs a) {
#ifdef PF_TILED_SM80
  constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
  extern __shared__ __align__(16) uint16_t smem[];
  const int tile = blockIdx.x;
  const int begin = a.ptr[tile];
  const int end = a.ptr[tile + 1];
  CUDA_KERNEL_ASSERT(0 <= begin && begin <= end && end <= a.nnz);
  if (begin == end) {
    return;
  }
  const int64_t m0 = static_cast<int64_t>(tile / a.k_tiles) * kRows;
  const int64_t k0 = static_cast<int64_t>(tile % a.k_tiles) * kCols;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warp_m = warp & 3;   // M rows [32 * warp_m, +32) of the tile
  const int warp_k = warp >> 2;  // K columns [32 * warp_k, +32) of the tile
  const int steps = static_cast<int>((a.n + kTokens - 1) / kTokens);
  const int a_off = ((lane & 7) + (lane >> 4) * 8) * kDyPitch + warp_m * 32 + ((lane >> 3) & 1) * 8;
  const int b_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * kXvPitch + warp_k * 32 + (lane >> 4) * 8;
  auto dy_stage = [&](int s) { return smem + s * kDvStage; };
  auto x_stage = [&](int s) { return smem + s * kDvStage + kTokens * kDyPitch; };
  auto load = [&](int t, int s) {
    const int64_t n0 = static_cast<int64_t>(t) * kTokens;
    load_slice<kDyCols, kAligned>(a.dy, a.n, a.m, a.dy_rs, dy_stage(s), n0, m0);
    load_slice<kCols, kAligned>(a.x, a.n, a.k, a.x_rs, x_stage(s), n0, k0);
  };

  float acc[2][4][4] = {};  // zeros

  load(0, 0);
  cp_async_commit();
  if (steps > 1) {
    load(1, 1);
  }
  cp_async_commit();
  for (int t = 0; t < steps; ++t) {
    cp_async_wait<1>();
    __syncthreads();  // slice t everywhere; stage (t + 2) % 3 was last read at step t - 1
    if (t + 2 < steps) {
      load(t + 2, (t + 2) % kStages);
    }
    cp_async_commit();
    const uint16_t* dst = dy_stage(t % kStages);
    const uint16_t* xst = x_stage(t % kStages);
#pragma unroll
    for (int kk = 0; kk < kTokens / 16; ++kk) {
      uint32_t af[2][4];
      uint32_t bf[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        ldmatrix_x4_trans(af[i], smem_addr(dst + a_off + kk * 16 * kDyPitch + i * 16));
        ldmatrix_x4_trans(bf[i], smem_addr(xst + b_off + kk * 16 * kXvPitch + i * 16));
      }
      mma_2x4<kBf16>(acc, af, bf);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every read of the stages is done: their space takes the block C
  float* c = reinterpret_cast<float*>(smem);
  const int g = lane >> 2;
  const int c2 = (lane & 3) * 2;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_m * 32 + i * 16 + g + h * 8;
        const int col = warp_k * 32 + j * 8 + c2;
        *reinterpret_cast<float2*>(c + r * kCPitch + col) = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
  __syncthreads();
  scalar_t* dv = static_cast<scalar_t*>(a.dv);
  for (int64_t e = static_cast<int64_t>(begin) + threadIdx.x; e < end; e += kThreads) {
    const int l = a.loc[e];
    const int64_t p = a.src[e];
    CUDA_KERNEL_ASSERT(static_cast<unsigned>(l) < static_cast<unsigned>(kRows * kCols));
    CUDA_KERNEL_ASSERT(0 <= p && p < a.nnz);
    dv[p] = static_cast<scalar_t>(c[(l / kCols) * kCPitch + (l % kCols)]);
  }
#else
  CUDA_KERNEL_ASSERT(false && "tiled_csr_linear_backward_values needs sm80 or newer");
#endif
}

// The kernels' stages exceed the default 48 KB of dynamic shared memory: opt in, once per kernel
// (the template argument: one set of flags per kernel instantiation) and device.
template <auto kKernel>
void opt_in_shared_memory(int bytes) {
  static std::once_flag flags[64];
  const int dev = c10::cuda::current_device();
  TORCH_INTERNAL_ASSERT(dev >= 0 && dev < 64);
  std::call_once(flags[dev], [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  });
}

template <typename scalar_t, bool kAligned>
void launch_dv(const ValuesArgs& a, int64_t tiles) {
  constexpr auto kernel = tiled_csr_dv_kernel<scalar_t, kAligned>;
  opt_in_shared_memory<kernel>(kDvSmemBytes);
  kernel<<<static_cast<unsigned>(tiles), kThreads, kDvSmemBytes, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the forward or (kDx) the input-gradient kernel: grid (grid_x, row blocks of 64 rows,
// looped past 65535).
template <bool kDx, typename scalar_t, bool kAligned, bool kAsync>
void launch(const TiledArgs& a, int64_t grid_x, int parts) {
  constexpr auto kernel = kDx ? tiled_csr_dx_kernel<scalar_t, kAligned, kAsync>
                              : tiled_csr_linear_kernel<scalar_t, kAligned, kAsync>;
  constexpr int smem_bytes = kDx ? kDxSmemBytes + (kAsync ? entry_smem_bytes<kDxEntryCap>() : 0)
                                 : kSmemBytes + (kAsync ? entry_smem_bytes<kFwdEntryCap>() : 0);
  opt_in_shared_memory<kernel>(smem_bytes);
  const int64_t n_blocks = (a.n + kTokens - 1) / kTokens;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(std::min(n_blocks, kMaxGridY)),
                  static_cast<unsigned>(parts));
  kernel<<<grid, kThreads, smem_bytes, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kDx, typename scalar_t>
void launch_dispatch(const TiledArgs& a, int64_t grid_x, int parts, bool aligned, bool async) {
  if (async) {
    aligned ? launch<kDx, scalar_t, true, true>(a, grid_x, parts) : launch<kDx, scalar_t, false, true>(a, grid_x, parts);
  } else {
    aligned ? launch<kDx, scalar_t, true, false>(a, grid_x, parts)
            : launch<kDx, scalar_t, false, false>(a, grid_x, parts);
  }
}

// The forward's split over K, and the sum of its parts.
// Why: a block of the forward walks all ceil(K / 64) tiles of its 128 features in sequence, one
// pipeline step each (~2000 cycles a step on an H100, latency rather than work: see the
// asynchronous pipeline's note), and there are only ceil(M / 128) x ceil(N / 64) blocks: 32 for a
// 4096 x 4096 weight at N <= 64, 128 at N = 256, against 2 x 132 block slots of an H100. The whole
// product then takes ~64 steps' latency whatever N (the H100 measured 0.066 ms at N = 1 and at
// N = 256 alike, gpu-check-20261127-2118). Cut in P parts of K, the grid has P times the blocks,
// each P times fewer steps, and a second kernel adds the parts' float32 sums (in part order: the
// same bits every run; not the bits of the unsplit product, whose float32 sums run in another
// order) and the bias. PYFINETUNE_TILED_CUDA_SPLIT_K (read at each call): unset or "auto" (the
// default since gpu-check-20261129-2137 on an H200: 15-45% less time at N = 256, 36-84% at N = 1 / 16,
// within 1% at N = 2048, where auto keeps one part) = the parts that split_k_parts' model of the
// product's time picks (waves of blocks over the GPU's block slots times tiles per part, plus the
// parts' sums written and read back; at least 4 tiles per part), an integer P = parts of
// ceil(k_tiles / P) tiles, the longest part P parts would have: at most P parts, fewer where P does
// not divide the tiles (P = 7 over 8 tiles: 4 parts of 2; the same latency as 7 parts of 1-2 tiles,
// with fewer sums to add); 1 = no split (the default before, and the bits of the unsplit sums).
constexpr int kMinTilesPerPart = 4;

int split_k_requested(const char* op) {  // 0: auto, else the parts asked for
  const char* raw = std::getenv("PYFINETUNE_TILED_CUDA_SPLIT_K");
  if (raw == nullptr || raw[0] == '\0') {
    return 0;
  }
  const std::string v(raw);
  if (v == "auto") {
    return 0;
  }
  const bool digits = v.size() <= 5 && std::all_of(v.begin(), v.end(), [](char c) { return c >= '0' && c <= '9'; });
  const int parts = digits ? std::stoi(v) : 0;
  TORCH_CHECK_VALUE(parts >= 1 && parts <= 65535,
                    check_message("pyfinetune.", op, ": PYFINETUNE_TILED_CUDA_SPLIT_K must be auto or an integer in ",
                                  "[1, 65535] (or unset: auto), got '", v, "'"));
  return parts;
}

// Blocks of the forward kernel (the asynchronous pipeline's, with its larger shared memory, or the
// default's) that one SM of the current GPU holds at once (the default's: 2 on an H100 / H200 and
// on an A100, whose 164 KB hold exactly two 81 KB blocks with their 1 KB reserve each; the
// asynchronous pipeline's 93 KB blocks: one on an A100). Asked once per device and pipeline.
int forward_blocks_per_sm(bool async) {
  static std::atomic<int> cache[2][64];
  const int dev = c10::cuda::current_device();
  TORCH_INTERNAL_ASSERT(dev >= 0 && dev < 64);
  int n = cache[async][dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (async) {
      constexpr auto kernel = tiled_csr_linear_kernel<at::Half, true, true>;
      constexpr int smem = kSmemBytes + entry_smem_bytes<kFwdEntryCap>();
      opt_in_shared_memory<kernel>(smem);
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
    } else {
      constexpr auto kernel = tiled_csr_linear_kernel<at::Half, true, false>;
      opt_in_shared_memory<kernel>(kSmemBytes);
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, kSmemBytes));
    }
    n = std::max(n, 1);
    cache[async][dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Parts for a forward of `blocks` blocks over k_tiles tiles and an [n, m] output (requested: 0 =
// auto), every part holding at least one tile; kt_per: tiles per part. Auto picks, among parts of at
// least kMinTilesPerPart tiles, the fewest with the smallest modelled time: (waves of blocks over
// the GPU's block slots) x (tiles per part) pipeline steps of kStepNs each, plus writing and reading
// back the parts' float32 sums at kSumBytesPerNs (a model for choosing, not a measurement: the
// quick check times the choice against the unsplit product).
constexpr double kStepNs = 1000.0;       // ~2000 cycles a step, H100 / H200 (see above)
constexpr double kSumBytesPerNs = 2000.0;  // 2 TB/s

int split_k_parts(int requested, int64_t blocks, int32_t k_tiles, int64_t n, int64_t m, bool async,
                  int32_t& kt_per) {
  int64_t parts = requested;
  if (requested == 0) {
    const int64_t slots =
        static_cast<int64_t>(forward_blocks_per_sm(async)) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const auto cost = [&](int64_t p) {
      const int64_t per = (k_tiles + p - 1) / p;
      const int64_t used = (k_tiles + per - 1) / per;
      const double steps = static_cast<double>(((blocks * used + slots - 1) / slots) * per);
      const double sums = used > 1 ? 2.0 * static_cast<double>(used) * static_cast<double>(n) * static_cast<double>(m) * 4.0
                                   : 0.0;
      return steps * kStepNs + sums / kSumBytesPerNs;
    };
    parts = 1;
    double best = cost(1);
    const int64_t most = std::min<int64_t>(slots, k_tiles / kMinTilesPerPart);
    for (int64_t p = 2; p <= most; ++p) {
      const double c = cost(p);
      if (c < best) {
        best = c;
        parts = p;
      }
    }
  }
  parts = std::max<int64_t>(1, std::min<int64_t>(parts, k_tiles));
  kt_per = static_cast<int32_t>((k_tiles + parts - 1) / parts);
  return static_cast<int>((k_tiles + kt_per - 1) / kt_per);
}

template <typename scalar_t>
void launch_sum_parts(const at::Tensor& partial, int parts, int64_t n, int64_t m, const void* bias, void* y) {
  const int64_t quads = (n * m + 3) / 4;
  constexpr int kSumThreads = 256;
  const int64_t max_blocks = 8LL * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const unsigned blocks = static_cast<unsigned>(std::min((quads + kSumThreads - 1) / kSumThreads, max_blocks));
  const float* src = partial.const_data_ptr<float>();
  const scalar_t* b = static_cast<const scalar_t*>(bias);
  scalar_t* out = static_cast<scalar_t*>(y);
  if (m % 4 == 0) {
    tiled_csr_sum_parts_kernel<scalar_t, true>
        <<<blocks, kSumThreads, 0, at::cuda::getCurrentCUDAStream()>>>(src, parts, n, m, b, out);
  } else {
    tiled_csr_sum_parts_kernel<scalar_t, false>
        <<<blocks, kSumThreads, 0, at::cuda::getCurrentCUDAStream()>>>(src, parts, n, m, b, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// PYFINETUNE_TILED_CUDA_ASYNC=1 (experimental, for A/B timing on a GPU; read at each call; unset
// or 0: tile_pipeline) runs tile_pipeline_async. Bad values are refused (ValueError) before the op
// allocates or writes anything.
bool async_requested(const char* op) {
  return env_switch(op, "PYFINETUNE_TILED_CUDA_ASYNC", "0").value_or(false);
}

// Whether the asynchronous pipeline can run: requested, tile_loc and the values 16-byte aligned
// (copy_entries), and its larger shared memory within this GPU's limit per block.
bool use_async(bool requested, const at::Tensor& vals, const at::Tensor& loc, int smem_bytes) {
  return requested && reinterpret_cast<uintptr_t>(vals.const_data_ptr()) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(loc.const_data_ptr()) % 16 == 0 &&
         static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) >= smem_bytes;
}

// The launch arguments and the launch: operand is x [N, K] (forward, output [N, M]) or grad_out
// [N, M] (kDx, output [N, K]); `out` is the fresh contiguous output; async: async_requested's answer;
// split: split_k_requested's (forward only).
template <bool kDx>
void run_tiled(const char* op, const at::Tensor& operand_in, const at::Tensor& tile_values,
               const at::Tensor& tile_ptr, const at::Tensor& tile_loc, const at::Tensor& bias, at::Tensor& out,
               int64_t M, int64_t K, bool async_wanted, int split_wanted = 1) {
  const at::Tensor operand = operand_in.stride(1) == 1 ? operand_in : operand_in.contiguous();
  const at::Tensor vals = tile_values.contiguous();
  const at::Tensor ptr = tile_ptr.contiguous();
  const at::Tensor loc = tile_loc.contiguous();
  const int64_t width = operand.size(1);  // K for the forward, M for the input gradient
  TiledArgs a{};
  a.x = static_cast<const uint16_t*>(operand.const_data_ptr());
  a.vals = static_cast<const uint16_t*>(vals.const_data_ptr());
  a.ptr = ptr.const_data_ptr<int32_t>();
  a.loc = loc.const_data_ptr<int16_t>();
  a.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  a.y = out.data_ptr();
  a.x_rs = operand.size(0) > 1 ? operand.stride(0) : width;
  a.n = operand.size(0);
  a.nnz = vals.numel();
  a.k = static_cast<int32_t>(K);
  a.m = static_cast<int32_t>(M);
  a.k_tiles = static_cast<int32_t>((K + kCols - 1) / kCols);
  const int64_t m_blocks = (M + kRows - 1) / kRows;
  PF_CHECK(m_blocks * a.k_tiles < std::numeric_limits<int32_t>::max(), op, "too many tiles: ceil(M / ", kRows,
           ") * ceil(K / ", kCols, ") must be below 2^31 - 1, got M = ", M, ", K = ", K);
  const bool aligned = width % 8 == 0 && a.x_rs % 8 == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  const int64_t grid_x = kDx ? a.k_tiles : m_blocks;
  const bool async = use_async(async_wanted, vals, loc,
                               kDx ? kDxSmemBytes + entry_smem_bytes<kDxEntryCap>()
                                   : kSmemBytes + entry_smem_bytes<kFwdEntryCap>());
  a.kt_per = a.k_tiles;
  int parts = 1;
  if (!kDx && split_wanted != 1) {
    parts = split_k_parts(split_wanted, grid_x * std::min((a.n + kTokens - 1) / kTokens, kMaxGridY), a.k_tiles, a.n,
                          M, async, a.kt_per);
  }
  at::Tensor partial;
  if (parts > 1) {
    partial = at::empty({parts, a.n, M}, operand.options().dtype(at::kFloat));
    a.partial = partial.data_ptr<float>();
  }
  AT_DISPATCH_SWITCH(operand.scalar_type(), "tiled_csr_linear_cuda",
                     AT_DISPATCH_CASE(at::kHalf, [&] {
                       launch_dispatch<kDx, scalar_t>(a, grid_x, parts, aligned, async);
                       if (parts > 1) {
                         launch_sum_parts<scalar_t>(partial, parts, a.n, M, a.bias, a.y);
                       }
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       launch_dispatch<kDx, scalar_t>(a, grid_x, parts, aligned, async);
                       if (parts > 1) {
                         launch_sum_parts<scalar_t>(partial, parts, a.n, M, a.bias, a.y);
                       }
                     }));
}

// Device, dtype and GPU checks of both ops (after the shared argument checks); smem_bytes: the
// kernel's dynamic shared memory per block.
void check_tensor_core_call(const char* op, const char* name, const at::Tensor& t, int smem_bytes) {
  PF_CHECK(t.is_cuda(), op, name, " must be a CUDA tensor here, got ", t.device());
  PF_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op,
           "the CUDA kernel runs on tensor cores: ", name, " must be float16 or bfloat16, got ", t.scalar_type(),
           " (csr_linear and csr_linear_backward take every float dtype)");
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  PF_CHECK(prop->major >= 8, op, "the CUDA kernel needs a GPU of compute capability 8.0 or newer (mma.sync, cp.async), ",
           "this one is ", prop->major, ".", prop->minor);
  // 8.6 / 8.9 / 12.x GPUs give a block at most 99 KB (A100 163 KB, H100 227 KB).
  PF_CHECK(static_cast<int64_t>(prop->sharedMemPerBlockOptin) >= smem_bytes, op, "the CUDA kernel needs ", smem_bytes,
           " bytes of shared memory per block, this GPU (compute capability ", prop->major, ".", prop->minor,
           ") allows ", static_cast<int64_t>(prop->sharedMemPerBlockOptin),
           " (pyfinetune.ops.tiled_csr_linear falls back to csr_linear_backward there)");
}

at::Tensor tiled_csr_linear_cuda(const at::Tensor& x, const at::Tensor& tile_values, const at::Tensor& tile_ptr,
                                 const at::Tensor& tile_loc, int64_t out_features,
                                 const std::optional<at::Tensor>& bias) {
  const char* op = "tiled_csr_linear";
  const MatmulSizes sz = check_tiled_csr_linear_args(x, tile_values, tile_ptr, tile_loc, out_features, bias);
  PF_CHECK(x.is_cuda(), op, "x must be a CUDA tensor here, got ", x.device());
  const bool async = async_requested(op);
  const int split = split_k_requested(op);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  check_tensor_core_call(op, "x", x, kSmemBytes);
  PF_CHECK(sz.k <= std::numeric_limits<int32_t>::max(), op, "x must have at most 2^31 - 1 columns, got K = ", sz.k);
  const int64_t N = sz.n, K = sz.k, M = sz.m;
  const bool has_bias = bias.has_value() && bias->defined();
  if (N == 0 || M == 0) {
    return at::empty({N, M}, x.options());
  }
  if (K == 0) {
    // clone: for N = 1 the expanded bias is already contiguous (contiguous() would alias the bias).
    return has_bias ? bias->unsqueeze(0).expand({N, M}).clone(at::MemoryFormat::Contiguous)
                    : at::zeros({N, M}, x.options());
  }
  at::Tensor y = at::empty({N, M}, x.options());
  run_tiled<false>(op, x, tile_values, tile_ptr, tile_loc, has_bias ? bias->contiguous() : at::Tensor(), y, M, K,
                   async, split);
  return y;
}

at::Tensor tiled_csr_linear_backward_input_cuda(const at::Tensor& grad_out, const at::Tensor& tile_values,
                                                const at::Tensor& tile_ptr, const at::Tensor& tile_loc,
                                                int64_t in_features) {
  const char* op = "tiled_csr_linear_backward_input";
  const MatmulSizes sz =
      check_tiled_csr_linear_backward_input_args(grad_out, tile_values, tile_ptr, tile_loc, in_features);
  PF_CHECK(grad_out.is_cuda(), op, "grad_out must be a CUDA tensor here, got ", grad_out.device());
  const bool async = async_requested(op);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  check_tensor_core_call(op, "grad_out", grad_out, kDxSmemBytes);
  const int64_t N = sz.n, K = sz.k, M = sz.m;
  if (N == 0 || K == 0) {
    return at::empty({N, K}, grad_out.options());
  }
  if (M == 0) {
    return at::zeros({N, K}, grad_out.options());
  }
  at::Tensor dx = at::empty({N, K}, grad_out.options());
  run_tiled<true>(op, grad_out, tile_values, tile_ptr, tile_loc, at::Tensor(), dx, M, K, async);
  return dx;
}

at::Tensor tiled_csr_linear_backward_values_cuda(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                 const at::Tensor& tile_ptr, const at::Tensor& tile_loc,
                                                 const at::Tensor& tile_src) {
  const char* op = "tiled_csr_linear_backward_values";
  const MatmulSizes sz = check_tiled_csr_linear_backward_values_args(grad_out, x_in, tile_ptr, tile_loc, tile_src);
  PF_CHECK(x_in.is_cuda(), op, "x must be a CUDA tensor here, got ", x_in.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x_in.device());
  check_tensor_core_call(op, "x", x_in, kDvSmemBytes);
  const int64_t N = sz.n, K = sz.k, M = sz.m, nnz = sz.nnz;
  if (nnz == 0) {
    return at::empty({0}, x_in.options());
  }
  if (N == 0) {
    return at::zeros({nnz}, x_in.options());
  }
  const at::Tensor dy = grad_out.stride(1) == 1 ? grad_out : grad_out.contiguous();
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor ptr = tile_ptr.contiguous();
  const at::Tensor loc = tile_loc.contiguous();
  const at::Tensor src = tile_src.contiguous();
  // Every kept position is written (tile_src is a permutation, as tiled_pattern makes it); empty
  // avoids a pass, and a malformed tile_src that misses positions leaves them unwritten.
  at::Tensor dv = at::empty({nnz}, x.options());
  ValuesArgs a{};
  a.dy = static_cast<const uint16_t*>(dy.const_data_ptr());
  a.x = static_cast<const uint16_t*>(x.const_data_ptr());
  a.ptr = ptr.const_data_ptr<int32_t>();
  a.loc = loc.const_data_ptr<int16_t>();
  a.src = src.const_data_ptr<int32_t>();
  a.dv = dv.data_ptr();
  a.dy_rs = N > 1 ? dy.stride(0) : M;
  a.x_rs = N > 1 ? x.stride(0) : K;
  a.n = N;
  a.nnz = nnz;
  a.m = static_cast<int32_t>(M);
  a.k = static_cast<int32_t>(K);
  a.k_tiles = static_cast<int32_t>((K + kCols - 1) / kCols);
  const int64_t tiles = ((M + kRows - 1) / kRows) * a.k_tiles;
  PF_CHECK(tiles < std::numeric_limits<int32_t>::max(), op, "too many tiles: ceil(M / ", kRows, ") * ceil(K / ", kCols,
           ") must be below 2^31 - 1, got M = ", M, ", K = ", K);
  PF_CHECK(N <= static_cast<int64_t>(std::numeric_limits<int32_t>::max()) * kTokens, op, "too many rows: N = ", N);
  const bool aligned = M % 8 == 0 && K % 8 == 0 && a.dy_rs % 8 == 0 && a.x_rs % 8 == 0 &&
                       reinterpret_cast<uintptr_t>(a.dy) % 16 == 0 && reinterpret_cast<uintptr_t>(a.x) % 16 == 0;
  AT_DISPATCH_SWITCH(x.scalar_type(), "tiled_csr_linear_backward_values_cuda",
                     AT_DISPATCH_CASE(at::kHalf,
                                      [&] {
                                        aligned ? launch_dv<scalar_t, true>(a, tiles) : launch_dv<scalar_t, false>(a, tiles);
                                      })
                         AT_DISPATCH_CASE(at::kBFloat16, [&] {
                           aligned ? launch_dv<scalar_t, true>(a, tiles) : launch_dv<scalar_t, false>(a, tiles);
                         }));
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfinetune, CUDA, m) {
  m.impl("tiled_csr_linear_backward_values", &tiled_csr_linear_backward_values_cuda);
  m.impl("tiled_csr_linear", &tiled_csr_linear_cuda);
  m.impl("tiled_csr_linear_backward_input", &tiled_csr_linear_backward_input_cuda);
}

}  // namespace pyfinetune
