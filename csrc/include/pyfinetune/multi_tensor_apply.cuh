// Multi-tensor apply: one kernel launch updates a whole list of tensors.
//
// The host walks the tensor list, cuts every tensor into chunks of kChunkSize elements and packs,
// into one struct that is passed BY VALUE as the kernel's only argument:
//   - per tensor: kDepth pointers (parameter, gradient, states, ...), numel, a group index and an
//     op-defined tag byte;
//   - a small table of distinct per-group values (the hyper-parameters of a param group), so that
//     tensors of one param group share one entry and several groups share one launch;
//   - the block table: block b works on chunk block_chunk[b] of tensor block_tensor[b].
// Everything the kernel needs travels in the launch itself: no metadata copy to the device and no
// host synchronization, so the launches can be captured in a CUDA graph. When the tensors, groups
// or blocks of the list exceed one struct, the list is cut into as many launches as needed; a
// tensor whose chunks straddle a cut continues as tensor 0 of the next launch.
//
// The device helpers at the end load and store N elements of a tensor with 16-byte accesses and
// convert them to the math type.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

// Unroll hint for the device pass only (host compilers warn about the unknown pragma).
#if defined(__CUDA_ARCH__)
#define PF_UNROLL _Pragma("unroll")
#else
#define PF_UNROLL
#endif

namespace pyfinetune {
namespace mta {

// Elements per block. A multiple of every vector width, so only the last chunk of a tensor can
// end in a partial vector.
constexpr int kChunkSize = 65536;
constexpr int kBlockSize = 512;
// The size of the kernel argument, set by setup.py: 32764 bytes (CUDA 12.1+ on sm_70+) where
// every arch of the build and nvcc allow it, else the classic 4 KB limit. With 4 KB a launch holds
// ~220 blocks (the H100 benchmark's 134M parameters, 2048 chunks of kChunkSize, took 10 launches
// of less than one wave each, 73% of copy bandwidth); with 32 KB one launch holds ~3600 blocks.
// PyTorch measured the same effect on its own fused optimizers (pytorch/pytorch#119842: 26%
// faster with one launch; #175721: 32 KiB arguments). A 32 KB launch needs a CUDA 12.1+ driver:
// check_kernel_arg_support() says so by name instead of a failed launch.
#ifndef PF_MTA_ARG_BYTES
#define PF_MTA_ARG_BYTES 4096
#endif
constexpr size_t kMaxKernelArgBytes = PF_MTA_ARG_BYTES;

template <int kDepth_, int kMaxTensors_, typename Group_, int kMaxGroups_, typename Shared_>
struct TensorListMetaHead {
  static constexpr int kDepth = kDepth_;
  static constexpr int kMaxTensors = kMaxTensors_;
  static constexpr int kMaxGroups = kMaxGroups_;
  using Group = Group_;
  using Shared = Shared_;

  Shared shared;                      // launch-wide values (same for every tensor of the call)
  Group groups[kMaxGroups];           // distinct per-group values
  void* ptrs[kDepth][kMaxTensors];    // nullptr where a tensor has no such operand
  int64_t numels[kMaxTensors];
  uint8_t group_of[kMaxTensors];      // index into groups
  uint8_t tags[kMaxTensors];          // op-defined (e.g. the dtype of an optional operand)
};

template <int kDepth_, int kMaxTensors_, typename Group_, int kMaxGroups_, typename Shared_>
struct TensorListMeta : TensorListMetaHead<kDepth_, kMaxTensors_, Group_, kMaxGroups_, Shared_> {
  using Head = TensorListMetaHead<kDepth_, kMaxTensors_, Group_, kMaxGroups_, Shared_>;
  // The block table takes all the room the rest leaves (minus alignment slack).
  static constexpr int kMaxBlocks = static_cast<int>((kMaxKernelArgBytes - sizeof(Head) - alignof(Head)) /
                                                     (sizeof(int32_t) + sizeof(uint8_t)));
  int32_t block_chunk[kMaxBlocks];    // chunk index within the tensor; offset = chunk * kChunkSize
  uint8_t block_tensor[kMaxBlocks];   // index into ptrs / numels
};

// What the op's `describe(i)` returns for tensor i of its list.
template <typename Meta>
struct TensorSlot {
  void* ptrs[Meta::kDepth];
  int64_t numel;
  uint8_t tag;
  typename Meta::Group group;         // compared with ==, so equal groups share one entry
};

namespace detail {

template <typename Meta>
void put_tensor(Meta& meta, int t, int group, const TensorSlot<Meta>& slot) {
  for (int d = 0; d < Meta::kDepth; ++d) {
    meta.ptrs[d][t] = slot.ptrs[d];
  }
  meta.numels[t] = slot.numel;
  meta.group_of[t] = static_cast<uint8_t>(group);
  meta.tags[t] = slot.tag;
}

}  // namespace detail

// The per-tensor and per-group tables of the launch being packed (multi_tensor_apply, and the
// optimizer's flat layout, which packs the same tables with another work table).
template <typename Meta>
struct TablePacker {
  int n_tensors = 0;
  int n_groups = 0;

  // Whether `slot` needs a new launch first: the tensor table is full, or its group is not in the
  // group table and that is full.
  bool full_for(const Meta& meta, const TensorSlot<Meta>& slot) const {
    return n_tensors == Meta::kMaxTensors || (find(meta, slot.group) < 0 && n_groups == Meta::kMaxGroups);
  }

  // Puts slot as the next tensor (after full_for said there is room), its group found or added;
  // returns its tensor index.
  int add(Meta& meta, const TensorSlot<Meta>& slot) {
    int group = find(meta, slot.group);
    if (group < 0) {
      group = n_groups++;
      meta.groups[group] = slot.group;
    }
    const int t = n_tensors++;
    detail::put_tensor(meta, t, group, slot);
    return t;
  }

  void clear() { n_tensors = n_groups = 0; }

 private:
  int find(const Meta& meta, const typename Meta::Group& group) const {
    for (int j = 0; j < n_groups; ++j) {
      if (meta.groups[j] == group) {
        return j;
      }
    }
    return -1;
  }
};

// A launch with more than 4 KB of arguments needs a CUDA 12.1+ driver (the toolkit that built it
// may be newer than the driver under CUDA's minor-version compatibility): an error that says so,
// instead of the launch failing with "invalid argument".
inline void check_kernel_arg_support() {
  if constexpr (kMaxKernelArgBytes > 4096) {
    static const int driver = [] {
      int v = 0;
      return cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
    }();
    TORCH_CHECK(driver >= 12010, "pyfinetune: the optimizer kernels of this build take ", kMaxKernelArgBytes,
                "-byte kernel arguments, which need a CUDA 12.1 or newer driver, but the driver supports CUDA ",
                driver / 1000, ".", (driver % 1000) / 10,
                ". Update the NVIDIA driver, or rebuild pyfinetune with PYFINETUNE_MTA_ARG_BYTES=4096.");
  }
}

// Calls launch(meta, n_blocks) once per packed struct; launch must start a grid of n_blocks
// blocks whose block b handles (meta.block_tensor[b], meta.block_chunk[b]). describe(i) gives
// tensor i; tensors with numel 0 are skipped. Nothing is launched for an empty (or all-empty) list.
template <typename Meta, typename Describe, typename Launch>
void multi_tensor_apply(int64_t num_tensors, const typename Meta::Shared& shared, Describe&& describe,
                        Launch&& launch) {
  static_assert(sizeof(Meta) <= kMaxKernelArgBytes, "multi-tensor metadata must fit the kernel argument limit (kMaxKernelArgBytes)");
  static_assert(std::is_trivially_copyable<Meta>::value, "multi-tensor metadata is copied as kernel argument");
  static_assert(Meta::kMaxTensors >= 1 && Meta::kMaxTensors <= 256, "tensor index is stored in a uint8");
  static_assert(Meta::kMaxGroups >= 1 && Meta::kMaxGroups <= 256, "group index is stored in a uint8");
  static_assert(Meta::kMaxBlocks >= 64, "too little room left for the block table");
  check_kernel_arg_support();

  Meta meta{};
  meta.shared = shared;
  TablePacker<Meta> tables;
  int n_blocks = 0;
  for (int64_t i = 0; i < num_tensors; ++i) {
    const TensorSlot<Meta> slot = describe(i);
    if (slot.numel == 0) {
      continue;
    }
    const int64_t n_chunks = (slot.numel + kChunkSize - 1) / kChunkSize;
    TORCH_CHECK(n_chunks <= std::numeric_limits<int32_t>::max(), "pyfinetune: tensor ", i, " has ", slot.numel,
                " elements, too many for the multi-tensor kernels");
    if (tables.full_for(meta, slot)) {
      // Every packed tensor owns at least one block, so n_blocks > 0 here.
      launch(static_cast<const Meta&>(meta), n_blocks);
      tables.clear();
      n_blocks = 0;
    }
    int t = tables.add(meta, slot);

    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      meta.block_chunk[n_blocks] = static_cast<int32_t>(chunk);
      meta.block_tensor[n_blocks] = static_cast<uint8_t>(t);
      ++n_blocks;
      if (n_blocks == Meta::kMaxBlocks) {
        launch(static_cast<const Meta&>(meta), n_blocks);
        tables.clear();
        n_blocks = 0;
        if (chunk + 1 < n_chunks) {
          t = tables.add(meta, slot);  // the rest of this tensor opens the next launch, alone with its group
        }
      }
    }
  }
  if (n_blocks > 0) {
    launch(static_cast<const Meta&>(meta), n_blocks);
  }
}

// ---- Vector access -------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

// Elements of T per access: all N when they fit 16 bytes, else 16-byte pieces (8 fp32 state
// values of a bf16 parameter are two 16-byte accesses).
template <typename T, int N>
constexpr int piece_width() {
  return sizeof(T) * N <= 16 ? N : static_cast<int>(16 / sizeof(T));
}

// Whether N-element accesses of T at ptr (and at every multiple of N elements after it) are aligned.
template <int N, typename T>
C10_HOST_DEVICE inline bool is_aligned_for(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (sizeof(T) * piece_width<T, N>()) == 0;
}

// out[k] = U(ptr[k]) for k < N; ptr must satisfy is_aligned_for<N, T>.
template <int N, typename T, typename U>
C10_HOST_DEVICE C10_ALWAYS_INLINE void load_n(const T* ptr, U (&out)[N]) {
  constexpr int kPiece = piece_width<T, N>();
  PF_UNROLL
  for (int j = 0; j < N; j += kPiece) {
    const Pack<T, kPiece> pack = *reinterpret_cast<const Pack<T, kPiece>*>(ptr + j);
    PF_UNROLL
    for (int k = 0; k < kPiece; ++k) {
      out[j + k] = static_cast<U>(pack.val[k]);
    }
  }
}

// ptr[k] = T(in[k]) for k < N; ptr must satisfy is_aligned_for<N, T>.
template <int N, typename T, typename U>
C10_HOST_DEVICE C10_ALWAYS_INLINE void store_n(T* ptr, const U (&in)[N]) {
  constexpr int kPiece = piece_width<T, N>();
  PF_UNROLL
  for (int j = 0; j < N; j += kPiece) {
    Pack<T, kPiece> pack;
    PF_UNROLL
    for (int k = 0; k < kPiece; ++k) {
      pack.val[k] = static_cast<T>(in[j + k]);
    }
    *reinterpret_cast<Pack<T, kPiece>*>(ptr + j) = pack;
  }
}

template <int N, typename U>
C10_HOST_DEVICE C10_ALWAYS_INLINE void fill_n(U (&out)[N], U value) {
  PF_UNROLL
  for (int k = 0; k < N; ++k) {
    out[k] = value;
  }
}

}  // namespace mta
}  // namespace pyfinetune
