// AVX-512 versions of csr_linear's float32 inner kernels: the same walks as the portable kernels
// of masked_matmul_cpu.cpp with 16-float vectors (an SpMM panel of up to 256 floats is up to 16 of
// them), compiled for AVX-512 whatever ISA the build targets and chosen at run time on CPUs that
// have it, so that an AVX2 build gets them too. Measured on the 2-core Xeon of
// benchmarks/results/prune-cpu-* (one thread, N = 256, K = M = 4096, AVX-512 build, where the
// portable kernels use 16-float vectors as well): forward and dx as fast as the portable ones
// (15.8 / 18.3 ms at 90% sparsity, 35.5 / 63 ms at 70%), dvalues 18.6 vs 36.7 ms at 90% and 43
// vs 78 ms at 70% (one horizontal reduction per eight dot products, 256-float panels).
// PYFINETUNE_CPU_AVX512=0 selects the portable kernels.
//
// Everything after the target pragma is compiled for AVX-512, so this file includes no torch
// or standard-library header there (their inline functions, emitted here with AVX-512 code,
// could be picked by the linker for the whole library and fault on other CPUs).
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PF_AVX512_KERNELS 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
// GCC 12's avx512fintrin.h builds _mm512_castps512_ps256 on a deliberately undefined vector
// and then warns about it (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

#include <pyfinetune/csr_kernels_avx512.h>

namespace pyfinetune {
namespace avx512 {

#ifdef PF_AVX512_KERNELS
namespace {

constexpr int kLanes = 16;

// Lanes of vector v (16 floats each) that lie within the first `width` floats.
inline __mmask16 lanes_of(int64_t width, int v) {
  const int64_t rem = width - kLanes * v;
  return rem >= kLanes ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
}

// Vector v of a panel row; the last vector may be partial (masked: no access past the row) unless
// the panel is known to be full (Full: every load folds into its FMA as a memory operand, which a
// zero-masked load cannot).
template <int V, bool Full>
inline __attribute__((always_inline)) __m512 load_vec(const float* p, int v, __mmask16 last) {
  return !Full && v == V - 1 ? _mm512_maskz_loadu_ps(last, p + kLanes * v) : _mm512_loadu_ps(p + kLanes * v);
}

template <int V, bool Full>
struct SpmmSeg {
  const SpmmPanel& a;
  int64_t n0;
  __mmask16 last;

  // The row's accumulators (in the work item's buffer, cache resident) are not prefetched: with
  // 8 vectors that was 8 more load-port operations per segment of a dozen kept weights, and
  // leaving them out measured 15.9 -> 14.9 ms at 90% sparsity (N = 256, K = M = 4096, one thread).
  inline __attribute__((always_inline)) void prefetch(int64_t r, int64_t e) const {
    (void)r;
    __builtin_prefetch(a.pat.idx + e, 0, 3);
    __builtin_prefetch(a.values + (e - a.value_base), 0, 3);
  }

  // Two accumulator sets (even and odd entries): each vector then has two independent FMA
  // chains, enough to keep both FMA units busy with V = 4 vectors.
  inline __attribute__((always_inline)) int64_t run(int64_t r, int64_t e, int64_t e1, int64_t k1) const {
    float* o = a.out + (r - a.out_r0) * a.out_ld + (n0 - a.out_n0);
    const int32_t* idx = a.pat.idx;
    const float* vals = a.values - a.value_base;
    // The row's first segment starts from zero instead of loading zeroed accumulators: only rows
    // without kept weights are zeroed beforehand (spmm_panel_v).
    const bool first = e == a.pat.ptr[r];
    if constexpr (V > 8) {
      // Wide panels: V independent FMA chains per kept weight already keep both FMA units busy,
      // and two sets of V accumulators would not fit the 32 registers.
      __m512 acc[V];
      for (int v = 0; v < V; ++v) {
        acc[v] = first ? _mm512_setzero_ps() : load_vec<V, Full>(o, v, last);
      }
      do {
        const float* row = a.b + static_cast<int64_t>(idx[e]) * a.ld + n0;
        const __m512 w = _mm512_set1_ps(vals[e]);
        for (int v = 0; v < V; ++v) {
          acc[v] = _mm512_fmadd_ps(w, load_vec<V, Full>(row, v, last), acc[v]);
        }
        ++e;
      } while (e < e1 && idx[e] < k1);
      for (int v = 0; v < V - 1; ++v) {
        _mm512_storeu_ps(o + kLanes * v, acc[v]);
      }
      if (Full) {
        _mm512_storeu_ps(o + kLanes * (V - 1), acc[V - 1]);
      } else {
        _mm512_mask_storeu_ps(o + kLanes * (V - 1), last, acc[V - 1]);
      }
      return e;
    }
    __m512 acc0[V], acc1[V];
    for (int v = 0; v < V; ++v) {
      acc0[v] = first ? _mm512_setzero_ps() : load_vec<V, Full>(o, v, last);
      acc1[v] = _mm512_setzero_ps();
    }
    do {
      const float* row0 = a.b + static_cast<int64_t>(idx[e]) * a.ld + n0;
      const __m512 w0 = _mm512_set1_ps(vals[e]);
      if (e + 1 < e1 && idx[e + 1] < k1) {
        const float* row1 = a.b + static_cast<int64_t>(idx[e + 1]) * a.ld + n0;
        const __m512 w1 = _mm512_set1_ps(vals[e + 1]);
        for (int v = 0; v < V; ++v) {
          acc0[v] = _mm512_fmadd_ps(w0, load_vec<V, Full>(row0, v, last), acc0[v]);
          acc1[v] = _mm512_fmadd_ps(w1, load_vec<V, Full>(row1, v, last), acc1[v]);
        }
        e += 2;
      } else {
        for (int v = 0; v < V; ++v) {
          acc0[v] = _mm512_fmadd_ps(w0, load_vec<V, Full>(row0, v, last), acc0[v]);
        }
        e += 1;
        break;
      }
    } while (e < e1 && idx[e] < k1);
    for (int v = 0; v < V - 1; ++v) {
      _mm512_storeu_ps(o + kLanes * v, _mm512_add_ps(acc0[v], acc1[v]));
    }
    if (Full) {
      _mm512_storeu_ps(o + kLanes * (V - 1), _mm512_add_ps(acc0[V - 1], acc1[V - 1]));
    } else {
      _mm512_mask_storeu_ps(o + kLanes * (V - 1), last, _mm512_add_ps(acc0[V - 1], acc1[V - 1]));
    }
    return e;
  }
};

template <int V, bool Full>
void spmm_panel_v(const SpmmPanel& a, int64_t r0, int64_t r1, int64_t n0, int64_t width, int32_t* cursor) {
  const __mmask16 last = lanes_of(width, V - 1);
  for (int64_t r = r0; r < r1; ++r) {
    if (a.pat.ptr[r] < a.pat.ptr[r + 1]) {
      continue;  // its first segment writes it
    }
    float* o = a.out + (r - a.out_r0) * a.out_ld + (n0 - a.out_n0);
    for (int v = 0; v < V - 1; ++v) {
      _mm512_storeu_ps(o + kLanes * v, _mm512_setzero_ps());
    }
    _mm512_mask_storeu_ps(o + kLanes * (V - 1), last, _mm512_setzero_ps());
  }
  walk_pattern(a.pat, r0, r1, cursor, SpmmSeg<V, Full>{a, n0, last});
}

// The sums of the 16 lanes of each of acc[0..8), as 8 floats.
inline __attribute__((always_inline)) __m256 reduce8(const __m512* acc) {
  __m256 h[8];
  for (int j = 0; j < 8; ++j) {
    h[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[j]), _mm512_extractf32x8_ps(acc[j], 1));
  }
  const __m256 t0 = _mm256_hadd_ps(h[0], h[1]);
  const __m256 t1 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 t2 = _mm256_hadd_ps(h[4], h[5]);
  const __m256 t3 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

template <int V, bool Full>
struct SddmmSeg {
  const SddmmPanel& a;
  int64_t n0;
  __mmask16 last;

  inline __attribute__((always_inline)) void prefetch(int64_t r, int64_t e) const {
    __builtin_prefetch(a.pat.idx + e, 0, 3);
    __builtin_prefetch(a.out + e, 1, 3);
    prefetch_bytes(a.dyT + r * a.ld + n0, V * kLanes * 4, false);
  }

  // acc[j] += dot(d, xT[idx[j]]) for j < G (for j >= cnt: the row of idx[0]).
  template <int G>
  inline __attribute__((always_inline)) void dot_group(__m512* acc, const __m512* d, const int32_t* idx,
                                                        int64_t cnt) const {
    const float* xr[G];
    for (int j = 0; j < G; ++j) {
      xr[j] = a.xT + static_cast<int64_t>(idx[j < cnt ? j : 0]) * a.ld + n0;
    }
#pragma GCC unroll 16
    for (int v = 0; v < V; ++v) {
#pragma GCC unroll 8
      for (int j = 0; j < G; ++j) {
        acc[j] = _mm512_fmadd_ps(d[v], load_vec<V, Full>(xr[j], v, last), acc[j]);
      }
    }
  }

  // Eight dot products at a time (eight independent FMA chains), one reduction per eight.
  inline __attribute__((always_inline)) int64_t run(int64_t r, int64_t e, int64_t e1, int64_t k1) const {
    const int64_t end = segment_end(a.pat.idx, e, e1, k1);
    __m512 d[V];
    for (int v = 0; v < V; ++v) {
      d[v] = load_vec<V, Full>(a.dyT + r * a.ld + n0, v, last);
    }
    for (; e < end; e += 8) {
      const int64_t cnt = end - e < 8 ? end - e : 8;
      __m512 acc[8];
      for (int j = 0; j < 8; ++j) {
        acc[j] = _mm512_setzero_ps();
      }
      // The group's dot products interleaved vector by vector, G independent FMA chains held
      // in registers (a loop over the products kept acc[] on the stack and ran each product's
      // dependent FMAs in turn: dvalues 8.4 -> 7.8 ms at 90% sparsity, N = 256, K = M = 4096, two
      // threads). A partial group runs in the next G of 8, 4, 2, 1 with its missing products
      // repeating the first row (an L1 hit; their sums are not stored).
      const int32_t* idx = a.pat.idx + e;
      if (cnt > 4) {
        dot_group<8>(acc, d, idx, cnt);
      } else if (cnt > 2) {
        dot_group<4>(acc, d, idx, cnt);
      } else if (cnt == 2) {
        dot_group<2>(acc, d, idx, cnt);
      } else {
        dot_group<1>(acc, d, idx, cnt);
      }
      const __mmask8 keep = static_cast<__mmask8>((1u << cnt) - 1u);
      const __m256 sums = reduce8(acc);
      const __m256 total = a.add ? _mm256_add_ps(_mm256_maskz_loadu_ps(keep, a.out + e), sums) : sums;
      _mm256_mask_storeu_ps(a.out + e, keep, total);
    }
    return end;
  }
};

template <int V, bool Full>
void sddmm_panel_v(const SddmmPanel& a, int64_t r0, int64_t r1, int64_t n0, int64_t width, int32_t* cursor) {
  walk_pattern(a.pat, r0, r1, cursor, SddmmSeg<V, Full>{a, n0, lanes_of(width, V - 1)});
}

template <int V, bool Full>
struct Vecs {
  static constexpr int kV = V;
  static constexpr bool kFull = Full;
};

template <int V, typename Fn>
inline __attribute__((always_inline)) void with_v(int64_t width, const Fn& fn) {
  return width == V * kLanes ? fn(Vecs<V, true>{}) : fn(Vecs<V, false>{});
}

// fn(Vecs<V, Full>{}) with V = the number of 16-float vectors of a panel `width` floats wide
// (at most Max of them) and Full = whether all V vectors are whole (every panel but a ragged last
// one).
template <int Max, int V = 1, typename Fn>
inline __attribute__((always_inline)) void with_vecs(int64_t width, const Fn& fn) {
  if constexpr (V < Max) {
    if (width > V * kLanes) {
      return with_vecs<Max, V + 1>(width, fn);
    }
  }
  return with_v<V>(width, fn);
}

// The 128-bit lanes of a and b regrouped: even = (a0, a2, b0, b2), odd = (a1, a3, b1, b3).
inline __attribute__((always_inline)) void even_odd_lanes(__m512 a, __m512 b, __m512& even, __m512& odd) {
  even = _mm512_shuffle_f32x4(a, b, 0x88);
  odd = _mm512_shuffle_f32x4(a, b, 0xdd);
}

// One block of at most 16 x 16: column c of the block (row(r)[c] + add[r] for r < rows) goes to
// store(c, values, row_mask) for c < cols, where row(r, mask) loads source row r's (at most 16)
// values as floats, the lanes outside `mask` zero, and store writes the lanes of row_mask. The 16 rows are transposed in registers in four stages: unpacklo/hi_ps pairs
// the rows (a, b) within each 128-bit lane, unpacklo/hi_pd pairs those (ab, cd), leaving in
// u[k] lane j = column 4j + k of four rows; two rounds of shuffle_f32x4 then gather each column's
// four lanes. Missing rows are zeros (never stored), missing columns are masked loads / stores.
template <typename Row, typename Store>
inline __attribute__((always_inline)) void transpose_block(const Row& row, const Store& store, int rows, int cols,
                                                           const float* add) {
  const __mmask16 col_mask = lanes_of(cols, 0), row_mask = lanes_of(rows, 0);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = i < rows ? row(i, col_mask) : _mm512_setzero_ps();
  }
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // rows 4g/4 .. +3: u[g + k], lane j = column 4j + k
    const __m512d t0 = _mm512_castps_pd(t[g]), t1 = _mm512_castps_pd(t[g + 1]);
    const __m512d t2 = _mm512_castps_pd(t[g + 2]), t3 = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  // Stage 3: v[k] = columns (k, 8 + k) of rows 0-7 as lanes [k 0-3, 8+k 0-3, k 4-7, 8+k 4-7];
  // v[4 + k] the same for columns (4 + k, 12 + k); v[8 + k], v[12 + k] for rows 8-15.
  // Stage 4 pairs v[k] with v[8 + k] (rows 0-7 with 8-15) into whole columns.
  __m512 v[16], col[16];
  for (int k = 0; k < 4; ++k) {
    even_odd_lanes(u[k], u[4 + k], v[k], v[4 + k]);
    even_odd_lanes(u[8 + k], u[12 + k], v[8 + k], v[12 + k]);
  }
  for (int k = 0; k < 4; ++k) {
    even_odd_lanes(v[k], v[8 + k], col[k], col[8 + k]);
    even_odd_lanes(v[4 + k], v[12 + k], col[4 + k], col[12 + k]);
  }
  const __m512 addv = add != nullptr ? _mm512_maskz_loadu_ps(row_mask, add) : _mm512_setzero_ps();
  for (int c = 0; c < cols; ++c) {
    store(c, add != nullptr ? _mm512_add_ps(col[c], addv) : col[c], row_mask);
  }
}

// float32 -> bfloat16, rounded to nearest even, NaN -> 0x7FC0: c10::BFloat16's conversion.
inline __attribute__((always_inline)) __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// float32 -> float16, rounded to nearest even (F16C, as c10::Half's conversion).
inline __attribute__((always_inline)) __m256i to_f16(__m512 x) {
  return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

}  // namespace

bool available() {
  static const bool ok = [] {
    const char* env = getenv("PYFINETUNE_CPU_AVX512");
    if (env != nullptr && env[0] == '0') {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }();
  return ok;
}

void spmm_panel(const SpmmPanel& a, int64_t r0, int64_t r1, int64_t n0, int64_t width, int32_t* cursor) {
  with_vecs<kPanelFloats / kLanes>(width, [&](auto vecs) { spmm_panel_v<decltype(vecs)::kV, decltype(vecs)::kFull>(a, r0, r1, n0, width, cursor); });
}

void sddmm_panel(const SddmmPanel& a, int64_t r0, int64_t r1, int64_t n0, int64_t width, int32_t* cursor) {
  with_vecs<kSddmmPanelFloats / kLanes>(width, [&](auto vecs) { sddmm_panel_v<decltype(vecs)::kV, decltype(vecs)::kFull>(a, r0, r1, n0, width, cursor); });
}

namespace {

// The blocks of a [rows, cols] source (row r, column c at src + r * src_ld + c) into the [cols,
// rows] destination (at dst + c * dst_ld + r): each source row read by load(pointer, mask) as 16
// floats, each destination row of a block written by put(pointer, values, mask).
template <typename S, typename D, typename Load, typename Put>
inline __attribute__((always_inline)) void transpose_blocks(const S* src, int64_t src_ld, D* dst, int64_t dst_ld,
                                                            int64_t rows, int64_t cols, const float* add,
                                                            const Load& load, const Put& put) {
  for (int64_t r = 0; r < rows; r += kLanes) {
    const int nr = static_cast<int>(rows - r < kLanes ? rows - r : kLanes);
    for (int64_t c = 0; c < cols; c += kLanes) {
      const int nc = static_cast<int>(cols - c < kLanes ? cols - c : kLanes);
      const S* block = src + r * src_ld + c;
      D* out = dst + c * dst_ld + r;
      transpose_block([&](int i, __mmask16 mask) { return load(block + i * src_ld, mask); },
                      [&](int j, __m512 values, __mmask16 mask) { put(out + j * dst_ld, values, mask); }, nr, nc,
                      add != nullptr ? add + r : nullptr);
    }
  }
}

inline __m512 load_f32(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}

inline void put_f32(float* p, __m512 values, __mmask16 mask) {
  if (mask == 0xFFFF) {
    _mm512_storeu_ps(p, values);
  } else {
    _mm512_mask_storeu_ps(p, mask, values);
  }
}

}  // namespace

void transpose(const float* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t rows, int64_t cols,
               const float* add) {
  transpose_blocks(src, src_ld, dst, dst_ld, rows, cols, add, load_f32, put_f32);
}

// bfloat16 is the upper half of a float32: widen to 32 bits and shift (exact, NaN and inf kept).
void transpose_bf16(const uint16_t* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t rows, int64_t cols) {
  transpose_blocks(
      src, src_ld, dst, dst_ld, rows, cols, nullptr,
      [](const uint16_t* p, __mmask16 mask) {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
      },
      put_f32);
}

// float16 -> float32 with F16C's conversion (exact for every half value, subnormals included).
void transpose_f16(const uint16_t* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t rows, int64_t cols) {
  transpose_blocks(
      src, src_ld, dst, dst_ld, rows, cols, nullptr,
      [](const uint16_t* p, __mmask16 mask) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p)); },
      put_f32);
}

void transpose_to_bf16(const float* src, int64_t src_ld, uint16_t* dst, int64_t dst_ld, int64_t rows, int64_t cols,
                       const float* add) {
  transpose_blocks(src, src_ld, dst, dst_ld, rows, cols, add, load_f32, [](uint16_t* p, __m512 values, __mmask16 mask) {
    _mm256_mask_storeu_epi16(p, mask, to_bf16(values));
  });
}

void transpose_to_f16(const float* src, int64_t src_ld, uint16_t* dst, int64_t dst_ld, int64_t rows, int64_t cols,
                      const float* add) {
  transpose_blocks(src, src_ld, dst, dst_ld, rows, cols, add, load_f32, [](uint16_t* p, __m512 values, __mmask16 mask) {
    _mm256_mask_storeu_epi16(p, mask, to_f16(values));
  });
}

// Four independent 16-lane hardware gathers per step keep more of the scattered loads in flight
// than a scalar loop: csr_linear_backward's dx gathers 1.68M values at 90% sparsity (4096 x
// 4096) in 0.58-0.64 ms per quarter against 0.8-1.1 ms (two threads).
void gather(const float* values, const int32_t* index, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i i0 = _mm512_loadu_si512(index + i), i1 = _mm512_loadu_si512(index + i + 16);
    const __m512i i2 = _mm512_loadu_si512(index + i + 32), i3 = _mm512_loadu_si512(index + i + 48);
    _mm512_storeu_ps(out + i, _mm512_i32gather_ps(i0, values, 4));
    _mm512_storeu_ps(out + i + 16, _mm512_i32gather_ps(i1, values, 4));
    _mm512_storeu_ps(out + i + 32, _mm512_i32gather_ps(i2, values, 4));
    _mm512_storeu_ps(out + i + 48, _mm512_i32gather_ps(i3, values, 4));
  }
  for (; i < n; ++i) {
    out[i] = values[index[i]];
  }
}

// ---- Small-batch SpMM (csr_linear with up to kSpmvMaxBatch rows of x) ---------------------------
// x transposed into xT [K][L] (L = 1, 4, 8, 16 or 32 floats, the batch zero padded), so that a kept
// weight multiplies one short contiguous row of xT: a broadcast and one FMA of an L-float vector
// per kept weight, in several independent chains per output row. The values are read in their own
// dtype.
namespace {

template <int kKind>
inline __attribute__((always_inline)) float value_at(const void* values, int64_t e) {
  if constexpr (kKind == kSpmvFloat) {
    return static_cast<const float*>(values)[e];
  } else if constexpr (kKind == kSpmvBFloat16) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(values)[e]) << 16;
    return _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128(static_cast<int>(bits))));
  } else {
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<const uint16_t*>(values)[e])));
  }
}

// One kernel for every lane count: V is float (one lane), __m128, __m256 or __m512, added with the
// vector extensions' +, multiplied and added with these FMAs (the build's ISO C++ mode does not
// contract a * b + c into one).
inline __attribute__((always_inline)) float fma_lanes(float w, float x, float acc) { return __builtin_fmaf(w, x, acc); }
inline __attribute__((always_inline)) __m128 fma_lanes(float w, __m128 x, __m128 acc) { return _mm_fmadd_ps(_mm_set1_ps(w), x, acc); }
inline __attribute__((always_inline)) __m256 fma_lanes(float w, __m256 x, __m256 acc) { return _mm256_fmadd_ps(_mm256_set1_ps(w), x, acc); }
inline __attribute__((always_inline)) __m512 fma_lanes(float w, __m512 x, __m512 acc) { return _mm512_fmadd_ps(_mm512_set1_ps(w), x, acc); }

template <typename V>
inline __attribute__((always_inline)) V load_lanes(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

// kVecs vectors V per kept weight (L = kVecs * lanes of V), kChains independent accumulator sets.
// cols for unsigned 32-bit compares of indices (an int32 index is < 2^31 <= any larger cols).
inline __m512i cols_vector(int64_t cols) {
  return _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(cols < (int64_t{1} << 31) ? cols : int64_t{1} << 31)));
}

// Whether the indices [e, e1) all lie in [0, cols): sixteen unsigned compares at a time, ahead of
// the row's pass (which then finds them in L1).
inline __attribute__((always_inline)) bool row_in_range(const int32_t* idx, int64_t e, int64_t e1, __m512i cols) {
  __mmask16 bad = 0;
  for (; e < e1; e += kLanes) {
    const __mmask16 m = lanes_of(e1 - e, 0);
    bad |= static_cast<__mmask16>(m & ~_mm512_mask_cmplt_epu32_mask(m, _mm512_maskz_loadu_epi32(m, idx + e), cols));
  }
  return bad == 0;
}

template <typename V, int kVecs, int kChains, int kKind>
bool spmv_lanes_rows(const SpmvRows& a, int64_t r0, int64_t r1) {
  constexpr int64_t kW = static_cast<int64_t>(sizeof(V) / sizeof(float));
  constexpr int64_t kLd = kVecs * kW;
  const float* xT = a.x;
  const __m512i cols = cols_vector(a.cols);
  bool bad = false;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t e = a.ptr[r];
    const int64_t e1 = a.ptr[r + 1];
    if (!row_in_range(a.idx, e, e1, cols)) {
      bad = true;
      __builtin_memset(a.out + (r - r0) * kLd, 0, kLd * sizeof(float));
      continue;
    }
    V acc[kChains][kVecs] = {};
    for (; e + kChains <= e1; e += kChains) {
      for (int j = 0; j < kChains; ++j) {
        const float w = value_at<kKind>(a.values, e + j);
        const float* row = xT + static_cast<int64_t>(a.idx[e + j]) * kLd;
        for (int v = 0; v < kVecs; ++v) {
          acc[j][v] = fma_lanes(w, load_lanes<V>(row + v * kW), acc[j][v]);
        }
      }
    }
    for (; e < e1; ++e) {
      const float w = value_at<kKind>(a.values, e);
      const float* row = xT + static_cast<int64_t>(a.idx[e]) * kLd;
      for (int v = 0; v < kVecs; ++v) {
        acc[0][v] = fma_lanes(w, load_lanes<V>(row + v * kW), acc[0][v]);
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      V sum = acc[0][v];
      for (int j = 1; j < kChains; ++j) {
        sum += acc[j][v];
      }
      __builtin_memcpy(a.out + (r - r0) * kLd + v * kW, &sum, sizeof(V));
    }
  }
  return !bad;
}

// Sixteen kept values (the lanes of `mask`, the others zero) as floats.
template <int kKind>
inline __attribute__((always_inline)) __m512 values16(const void* values, int64_t e, __mmask16 mask) {
  if constexpr (kKind == kSpmvFloat) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(values) + e);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(values) + e);
    if constexpr (kKind == kSpmvBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// One lane (N = 1): sixteen kept weights at a time, their x values fetched by one hardware gather
// and their values and indices loaded as vectors, instead of three scalar loads and a scalar FMA
// per kept weight. Measured against that scalar kernel (spmv_lanes_rows<float, 1, 4>, which it
// replaces; K = M = 4096, 90% sparsity, AMD EPYC, contenders interleaved in one process; an ad
// hoc development A/B, not a kept record):
// 1.40x / 1.55x / 1.32x faster in float32 / bfloat16 / float16 with two threads, 1.59x / 1.54x /
// 1.32x with one.
// Every index is checked against cols in the same pass (an unsigned compare per sixteen): the
// lanes out of range are left out of the gather and reported.
template <int kKind>
bool spmv_gather_rows(const SpmvRows& a, int64_t r0, int64_t r1) {
  const float* x = a.x;
  const __m512i cols = cols_vector(a.cols);
  __mmask16 bad = 0;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t e = a.ptr[r];
    const int64_t e1 = a.ptr[r + 1];
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; e + 2 * kLanes <= e1; e += 2 * kLanes) {
      const __m512i i0 = _mm512_loadu_si512(a.idx + e);
      const __m512i i1 = _mm512_loadu_si512(a.idx + e + kLanes);
      const __mmask16 ok0 = _mm512_cmplt_epu32_mask(i0, cols), ok1 = _mm512_cmplt_epu32_mask(i1, cols);
      bad |= static_cast<__mmask16>(~(ok0 & ok1));
      const __m512 x0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok0, i0, x, 4);
      const __m512 x1 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok1, i1, x, 4);
      acc0 = _mm512_fmadd_ps(values16<kKind>(a.values, e, 0xFFFF), x0, acc0);
      acc1 = _mm512_fmadd_ps(values16<kKind>(a.values, e + kLanes, 0xFFFF), x1, acc1);
    }
    for (; e < e1; e += kLanes) {
      const __mmask16 m = lanes_of(e1 - e, 0);
      const __m512i i = _mm512_maskz_loadu_epi32(m, a.idx + e);
      const __mmask16 ok = _mm512_mask_cmplt_epu32_mask(m, i, cols);
      bad |= static_cast<__mmask16>(m & ~ok);
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok, i, x, 4);
      acc0 = _mm512_fmadd_ps(values16<kKind>(a.values, e, m), xv, acc0);
    }
    a.out[r - r0] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
  return bad == 0;
}

template <int kKind>
bool spmv_rows_kind(const SpmvRows& a, int64_t r0, int64_t r1) {
  switch (a.x_ld) {
    case 1: return spmv_gather_rows<kKind>(a, r0, r1);
    case 4: return spmv_lanes_rows<__m128, 1, 4, kKind>(a, r0, r1);
    case 8: return spmv_lanes_rows<__m256, 1, 4, kKind>(a, r0, r1);
    case 16: return spmv_lanes_rows<__m512, 1, 4, kKind>(a, r0, r1);
    case 32: return spmv_lanes_rows<__m512, 2, 2, kKind>(a, r0, r1);
    default: abort();  // the caller's lanes are one of these
  }
}

}  // namespace

bool spmv_rows(const SpmvRows& a, int64_t r0, int64_t r1) {
  switch (a.value_kind) {
    case kSpmvFloat: return spmv_rows_kind<kSpmvFloat>(a, r0, r1);
    case kSpmvBFloat16: return spmv_rows_kind<kSpmvBFloat16>(a, r0, r1);
    case kSpmvHalf: return spmv_rows_kind<kSpmvHalf>(a, r0, r1);
    default: abort();
  }
}

#else  // no AVX-512 kernels in this build: the portable kernels run everywhere

bool spmv_rows(const SpmvRows&, int64_t, int64_t) {
  abort();  // unreachable: available() is false
}


void gather(const float*, const int32_t*, float*, int64_t) {
  abort();  // unreachable: available() is false
}

bool available() {
  return false;
}

void spmm_panel(const SpmmPanel&, int64_t, int64_t, int64_t, int64_t, int32_t*) {
  abort();  // unreachable: available() is false
}

void sddmm_panel(const SddmmPanel&, int64_t, int64_t, int64_t, int64_t, int32_t*) {
  abort();  // unreachable: available() is false
}

void transpose(const float*, int64_t, float*, int64_t, int64_t, int64_t, const float*) {
  abort();  // unreachable: available() is false
}

void transpose_bf16(const uint16_t*, int64_t, float*, int64_t, int64_t, int64_t) {
  abort();  // unreachable: available() is false
}

void transpose_f16(const uint16_t*, int64_t, float*, int64_t, int64_t, int64_t) {
  abort();  // unreachable: available() is false
}

void transpose_to_bf16(const float*, int64_t, uint16_t*, int64_t, int64_t, int64_t, const float*) {
  abort();  // unreachable: available() is false
}

void transpose_to_f16(const float*, int64_t, uint16_t*, int64_t, int64_t, int64_t, const float*) {
  abort();  // unreachable: available() is false
}

#endif

}  // namespace avx512
}  // namespace pyfinetune

#ifdef PF_AVX512_KERNELS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
