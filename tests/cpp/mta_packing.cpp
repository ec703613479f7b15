// Host-side driver of mta::multi_tensor_apply's packing (tests/test_mta_packing.py compiles and runs
// it; no GPU, no kernel): reads a list of tensors as "numel group" lines on stdin, packs them with a
// small tensor / group table, and prints each launch's tables, one line per block and per tensor:
//   launch <n_blocks> <n_tensors> <n_groups>
//   tensor <slot> <id> <numel> <group slot> <group value>
//   block <tensor slot> <chunk>
// The tensor's id is its position in the input, carried as its first pointer.
#include <pyfinetune/multi_tensor_apply.cuh>

#include <cstdint>
#include <cstdio>
#include <vector>

namespace mta = pyfinetune::mta;

struct Group {
  int64_t value;
  bool operator==(const Group& o) const { return value == o.value; }
};
struct Shared {
  int unused;
};
using Meta = mta::TensorListMeta<2, 3, Group, 2, Shared>;

int main() {
  std::vector<int64_t> numels, groups;
  long long n, g;
  while (std::scanf("%lld %lld", &n, &g) == 2) {
    numels.push_back(n);
    groups.push_back(g);
  }
  std::printf("max %d %d %d\n", Meta::kMaxTensors, Meta::kMaxGroups, Meta::kMaxBlocks);
  mta::multi_tensor_apply<Meta>(
      static_cast<int64_t>(numels.size()), Shared{0},
      [&](int64_t i) {
        mta::TensorSlot<Meta> s{};
        s.ptrs[0] = reinterpret_cast<void*>(static_cast<uintptr_t>(i + 1));
        s.numel = numels[i];
        s.group = Group{groups[i]};
        return s;
      },
      [&](const Meta& meta, int n_blocks) {
        int n_tensors = 0;
        int n_groups = 0;
        for (int b = 0; b < n_blocks; ++b) {
          n_tensors = std::max(n_tensors, meta.block_tensor[b] + 1);
        }
        for (int t = 0; t < n_tensors; ++t) {
          n_groups = std::max(n_groups, meta.group_of[t] + 1);
        }
        std::printf("launch %d %d %d\n", n_blocks, n_tensors, n_groups);
        for (int t = 0; t < n_tensors; ++t) {
          std::printf("tensor %d %lld %lld %d %lld\n", t,
                      static_cast<long long>(reinterpret_cast<uintptr_t>(meta.ptrs[0][t])) - 1,
                      static_cast<long long>(meta.numels[t]), meta.group_of[t],
                      static_cast<long long>(meta.groups[meta.group_of[t]].value));
        }
        for (int b = 0; b < n_blocks; ++b) {
          std::printf("block %d %d\n", meta.block_tensor[b], meta.block_chunk[b]);
        }
      });
  return 0;
}
