// AVX-512 versions of csr_linear's float32 inner kernels (cpu/masked_matmul_avx512.cpp), used by
// the CPU kernels (cpu/masked_matmul_cpu.cpp) when the CPU has AVX-512. Plain functions and
// structs: the file that defines them is compiled for AVX-512 and shares no templates.
#pragma once

#include <cstdint>

#include <pyfinetune/csr_walk.h>

namespace pyfinetune {
namespace avx512 {

// The SpMM's panels are at most kPanelFloats wide (16 vectors of 16 floats, 16 accumulators held
// in registers): the float32 SpMM runs these panels wherever the CPU has AVX-512, twice the widest
// panel of the portable kernels (128 floats in an AVX-512 build, 64 in an AVX2 build), so that the
// kept weights and their indices are read half as often. `benchmarks/bench_prune.py --threads 2`
// (N = 256, K = M = 4096) forward, 128 -> 256-float panels (prune-cpu-20261126-0711 -> -0723):
// 29.3 -> 25.5 ms at 50%, 18.1 -> 17.3 at 70%, 8.58 -> 8.58 at 90%, 5.88 -> 5.42 at 95%.
constexpr int64_t kPanelFloats = 256;
// The SDDMM holds only the row of dyT (and eight sums) in registers, so its panels may be twice as
// wide: each dot product is then reduced once per 256 floats of the batch instead of per 128.
constexpr int64_t kSddmmPanelFloats = 256;

// out[r, n0 : n0 + width] = sum over the entries e of row r of values[e - value_base] *
// b[pat.idx[e], n0 : n0 + width]; b [pat.cols, ld]. Row r's panel of out is at
// out + (r - out_r0) * out_ld + (n0 - out_n0): out [pat.rows, ld] with out_ld = ld and
// out_r0 = out_n0 = 0, or a buffer holding just the rows from out_r0 of the panel at out_n0.
struct SpmmPanel {
  Pattern pat;
  const float* values;
  int64_t value_base;
  const float* b;
  float* out;
  int64_t ld;
  int64_t out_ld;
  int64_t out_r0;
  int64_t out_n0;
};

// out[e] += dot(dyT[r, n0 : n0 + width], xT[pat.idx[e], n0 : n0 + width]) for the entries e of
// row r (out[e] = the dot product when add is false: the first panel, so that out needs no
// zeroing); dyT [pat.rows, ld], xT [pat.cols, ld].
struct SddmmPanel {
  Pattern pat;
  const float* dyT;
  const float* xT;
  float* out;
  int64_t ld;
  bool add;
};

// Small batches (csr_linear with N <= kSpmvMaxBatch rows of x), from xT = x [K][x_ld] transposed
// and zero padded to x_ld = 1, 4, 8, 16 or 32 floats: out[(r - r0) * x_ld + i] = sum over row r's
// kept weights e of value(e) * xT[idx[e] * x_ld + i].
constexpr int64_t kSpmvMaxBatch = 32;
enum SpmvValues : int { kSpmvFloat = 0, kSpmvBFloat16 = 1, kSpmvHalf = 2 };

struct SpmvRows {
  const int32_t* ptr;
  const int32_t* idx;
  const void* values;  // float32, or the bits of bfloat16 / float16 values (value_kind)
  int value_kind;
  const float* x;
  int64_t x_ld;
  int64_t cols;  // xT's rows: every idx must lie in [0, cols)
  float* out;
};

// True when these kernels were compiled (x86-64, GCC or Clang) and the CPU runs AVX-512 F, VL,
// BW and DQ, unless the environment sets PYFINETUNE_CPU_AVX512=0. Read once.
bool available();
// False when an index lies outside [0, cols): the kernels read row 0 of xT in its place (out is then
// garbage) and the caller reports the index (the forward's only check of them).
bool spmv_rows(const SpmvRows& a, int64_t r0, int64_t r1);
// out[i] = values[index[i]] for i < n (every index valid: the caller checked them).
void gather(const float* values, const int32_t* index, float* out, int64_t n);

// Rows [r0, r1), panel [n0, n0 + width), width in (0, kPanelFloats] (spmm_panel) or in (0,
// kSddmmPanelFloats] (sddmm_panel); cursor: scratch for r1 - r0 entries (tiled patterns).
// spmm_panel zeroes its output panel first.
void spmm_panel(const SpmmPanel& a, int64_t r0, int64_t r1, int64_t n0, int64_t width, int32_t* cursor);
void sddmm_panel(const SddmmPanel& a, int64_t r0, int64_t r1, int64_t n0, int64_t width, int32_t* cursor);

// dst[c * dst_ld + r] = src[r * src_ld + c] (+ add[r] when add is not null) for r < rows, c < cols:
// 16 x 16 blocks transposed in registers (csr_linear's x -> xT and its output buffer -> y).
void transpose(const float* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t rows, int64_t cols,
               const float* add);
// The same for bfloat16 / float16 sources (raw 16-bit patterns), converted exactly to float32.
void transpose_bf16(const uint16_t* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t rows, int64_t cols);
void transpose_f16(const uint16_t* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t rows, int64_t cols);
// float32 (+ add[r]) into bfloat16 / float16 destinations, rounded once to nearest even as c10's
// conversions round (NaN stays NaN).
void transpose_to_bf16(const float* src, int64_t src_ld, uint16_t* dst, int64_t dst_ld, int64_t rows, int64_t cols,
                       const float* add);
void transpose_to_f16(const float* src, int64_t src_ld, uint16_t* dst, int64_t dst_ld, int64_t rows, int64_t cols,
                      const float* add);

}  // namespace avx512
}  // namespace pyfinetune
