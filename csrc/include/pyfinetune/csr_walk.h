// The walk over a compressed pattern shared by csr_linear's CPU kernels: the portable ones
// (cpu/masked_matmul_cpu.cpp) and the AVX-512 ones (cpu/masked_matmul_avx512.cpp).
//
// No torch or standard-library templates here: masked_matmul_avx512.cpp compiles everything it
// includes for AVX-512, and a function with external linkage defined in two files may be taken by
// the linker from either. The functions below sit in an unnamed namespace, so each file gets its
// own copy (the struct has no code).
#pragma once

#include <cstdint>

namespace pyfinetune {

// A compressed pattern: row r holds the entries [ptr[r], ptr[r + 1]); idx[e] is the operand row
// (a column of W for the forward) of entry e, in [0, cols).
struct Pattern {
  const int32_t* ptr;
  const int32_t* idx;
  int64_t rows;
  int64_t cols;
  int64_t tile;  // 0: untiled; else operand rows per L1 tile (idx sorted within each row)
};

// Rows ahead whose first index, value and output line are prefetched (a tiled walk jumps between
// rows, which the hardware prefetcher does not follow).
constexpr int64_t kPrefetchRows = 4;

namespace {

inline __attribute__((always_inline)) void prefetch_bytes(const void* ptr, int64_t bytes, bool write) {
  const char* c = static_cast<const char*>(ptr);
  for (int64_t l = 0; l < bytes; l += 64) {
    if (write) {
      __builtin_prefetch(c + l, 1, 3);
    } else {
      __builtin_prefetch(c + l, 0, 3);
    }
  }
}

// Calls seg.run(r, e, e1, k1) for every row r in [r0, r1) with entries left, where [e, e1) are
// the row's remaining entries and k1 bounds the indices to take now; run returns the first entry
// it did not take, and seg.prefetch(r, e) hints the start of a row a few rows ahead. Untiled: one
// call per row with k1 = cols (all entries). Tiled: the operand rows go in tiles of p.tile, all
// rows visiting tile t before any visits tile t + 1, so that the tile stays in L1 while every row
// adds its entries in it. `cursor` is scratch for r1 - r0 entries (tiled walks only).
template <typename Seg>
inline __attribute__((always_inline)) void walk_pattern(const Pattern& p, int64_t r0, int64_t r1, int32_t* cursor,
                                                        const Seg& seg) {
  if (p.tile == 0) {
    for (int64_t r = r0; r < r1; ++r) {
      if (r + kPrefetchRows < r1) {
        seg.prefetch(r + kPrefetchRows, p.ptr[r + kPrefetchRows]);
      }
      if (p.ptr[r] < p.ptr[r + 1]) {
        seg.run(r, p.ptr[r], p.ptr[r + 1], p.cols);
      }
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    cursor[r - r0] = p.ptr[r];
  }
  for (int64_t k1 = p.tile; k1 - p.tile < p.cols; k1 += p.tile) {
    for (int64_t r = r0; r < r1; ++r) {
      if (r + kPrefetchRows < r1) {
        seg.prefetch(r + kPrefetchRows, cursor[r + kPrefetchRows - r0]);
      }
      const int64_t e = cursor[r - r0];
      const int64_t e1 = p.ptr[r + 1];
      if (e < e1 && p.idx[e] < k1) {
        cursor[r - r0] = static_cast<int32_t>(seg.run(r, e, e1, k1));
      }
    }
  }
}

// Calls dot(j, idx[j]) for j < cnt (cnt <= 8): the SDDMM's group of eight dot products. A full
// group runs a loop of constant trip count, so that the caller's accumulators acc[j] stay in
// registers once it is unrolled.
template <typename Dot>
inline __attribute__((always_inline)) void for_group8(int64_t cnt, const int32_t* idx, const Dot& dot) {
  if (cnt == 8) {
    for (int j = 0; j < 8; ++j) {
      dot(j, idx[j]);
    }
  } else {
    for (int64_t j = 0; j < cnt; ++j) {
      dot(j, idx[j]);
    }
  }
}

// The end of the segment that starts at entry e (< e1): the first entry from e + 1 on whose index
// is >= k1, or e1.
inline __attribute__((always_inline)) int64_t segment_end(const int32_t* idx, int64_t e, int64_t e1, int64_t k1) {
  int64_t end = e + 1;
  while (end < e1 && idx[end] < k1) {
    ++end;
  }
  return end;
}

}  // namespace
}  // namespace pyfinetune
