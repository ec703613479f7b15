"""The host side of the CUDA multi-tensor launches (csrc/include/pyfinetune/multi_tensor_apply.cuh):
how a list of tensors is packed into launches, checked without a GPU.

tests/cpp/mta_packing.cpp is compiled with the host compiler against the header (with a table of 3
tensors and 2 groups, so that every kind of cut happens on small lists) and prints each launch's
tables. Checked: every chunk of every non-empty tensor is handed to exactly one block, in order;
no launch holds more tensors, groups or blocks than its tables; each tensor carries its own group's
values; a new launch starts only when a table is full (the counts of launches of a greedy packing);
a tensor whose chunks straddle a full block table continues, alone with its group, in the next
launch at the right chunk. Skipped where no C++ compiler or CUDA runtime header is found.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 65536


def _cuda_include():
    from torch.utils import cpp_extension

    for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    cuda_inc = _cuda_include()
    if cxx is None or cuda_inc is None:
        pytest.skip("needs a C++ compiler and the CUDA runtime headers")
    torch_dir = os.path.dirname(torch.__file__)
    exe = str(tmp_path_factory.mktemp("mta") / "mta_packing")
    cmd = [cxx, "-std=c++17", "-O1", "-I", os.path.join(ROOT, "csrc", "include"),
           "-I", os.path.join(torch_dir, "include"), "-I", cuda_inc, os.path.join(ROOT, "tests", "cpp", "mta_packing.cpp"),
           "-o", exe, "-L", os.path.join(torch_dir, "lib"), "-lc10", f"-Wl,-rpath,{os.path.join(torch_dir, 'lib')}",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return exe


def pack(driver, tensors):
    """[(numel, group)] -> (limits, [launch]) with launch = {"tensors": [(id, numel, group slot, group
    value)], "blocks": [(tensor slot, chunk)]}."""
    text = "".join(f"{n} {g}\n" for n, g in tensors)
    out = subprocess.run([driver], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    launches = []
    limits = None
    for line in out.stdout.splitlines():
        kind, *vals = line.split()
        vals = [int(v) for v in vals]
        if kind == "max":
            limits = vals
        elif kind == "launch":
            launches.append({"n": vals, "tensors": [], "blocks": []})
        elif kind == "tensor":
            assert vals[0] == len(launches[-1]["tensors"])
            launches[-1]["tensors"].append(tuple(vals[1:]))
        else:
            launches[-1]["blocks"].append(tuple(vals))
    return limits, launches


def check_packing(limits, launches, tensors):
    max_tensors, max_groups, max_blocks = limits
    handed = []
    for launch in launches:
        n_blocks, n_tensors, n_groups = launch["n"]
        assert 0 < n_blocks <= max_blocks and 0 < n_tensors <= max_tensors and 0 < n_groups <= max_groups
        assert len(launch["blocks"]) == n_blocks and len(launch["tensors"]) == n_tensors
        slots_of_group = {}
        for tid, numel, gslot, gvalue in launch["tensors"]:
            assert numel == tensors[tid][0] and gvalue == tensors[tid][1]
            assert slots_of_group.setdefault(gvalue, gslot) == gslot  # one entry per distinct group
        assert sorted(slots_of_group.values()) == list(range(len(slots_of_group)))
        handed += [(launch["tensors"][t][0], chunk) for t, chunk in launch["blocks"]]
    expected = [(i, c) for i, (n, _) in enumerate(tensors) for c in range(-(-n // CHUNK))]
    assert handed == expected


def greedy_launches(limits, tensors):
    """How many launches a packing that cuts only at full tables makes."""
    max_tensors, max_groups, max_blocks = limits
    launches, n_t, groups, n_b = 0, 0, set(), 0
    for n, g in tensors:
        if n == 0:
            continue
        if n_t == max_tensors or (g not in groups and len(groups) == max_groups):
            launches, n_t, groups, n_b = launches + 1, 0, set(), 0
        n_t += 1
        groups.add(g)
        for c in range(-(-n // CHUNK)):
            n_b += 1
            if n_b == max_blocks:
                launches, n_t, groups, n_b = launches + 1, 0, set(), 0
                if c + 1 < -(-n // CHUNK):
                    n_t, groups = 1, {g}
    return launches + (1 if n_b else 0)


CASES = {
    "one": [(10, 1)],
    "empty tensors skipped": [(0, 1), (5, 1), (0, 2), (0, 2), (7, 2)],
    "tensor table full": [(3, 1)] * 7,
    "group table full": [(3, 1), (3, 2), (3, 3), (3, 1), (3, 3)],
    "many chunks": [(CHUNK * 5 + 1, 1), (CHUNK, 2), (1, 1)],
}


@pytest.mark.parametrize("name", list(CASES))
def test_packing(driver, name):
    tensors = CASES[name]
    limits, launches = pack(driver, tensors)
    check_packing(limits, launches, tensors)
    assert len(launches) == greedy_launches(limits, tensors)


def test_tensor_straddling_a_full_block_table(driver):
    limits, _ = pack(driver, [(1, 1)])
    max_blocks = limits[2]
    # Two small tensors, then one of max_blocks + 5 chunks (same group): it fills the first launch's
    # block table and its 7 remaining chunks open the second launch, alone with its group; the next
    # tensor (another group) joins it.
    tensors = [(1, 9), (1, 9), ((max_blocks + 5) * CHUNK - 3, 9), (2, 7)]
    limits, launches = pack(driver, tensors)
    check_packing(limits, launches, tensors)
    assert [len(x["blocks"]) for x in launches] == [max_blocks, 8]
    second = launches[1]
    assert second["tensors"][0][0] == 2 and second["tensors"][0][2:] == (0, 9)
    assert second["blocks"][0] == (0, max_blocks - 2)  # chunk numbering continues within the tensor
    assert [t[0] for t in second["tensors"]] == [2, 3]


def test_random_lists(driver):
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for _ in range(20):
        k = int(torch.randint(1, 40, (1,), generator=gen))
        sizes = torch.randint(0, 4 * CHUNK, (k,), generator=gen).tolist()
        big = torch.rand(k, generator=gen) < 0.1
        tensors = [(s * (300 if b else 1), int(g)) for s, b, g in
                   zip(sizes, big.tolist(), torch.randint(0, 4, (k,), generator=gen).tolist())]
        limits, launches = pack(driver, tensors)
        check_packing(limits, launches, tensors)
        assert len(launches) == greedy_launches(limits, tensors), tensors
