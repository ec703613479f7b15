"""One call of a GPU target's kernels between cudaProfilerStart / Stop, for Nsight Compute.

    ncu --profile-from-start off [--section ...] python benchmarks/gpu_profile_target.py WORKLOAD
    python benchmarks/gpu_profile_target.py WORKLOAD --smoke      # small shapes, on the CPU

WORKLOAD is one of:

* ``kd``: ``kd_loss`` forward with the kept gradient, 8192 x 128256 bf16, forward_kl, T = 2, 1/8 of
  the rows ignored (issue #3's case; the launch of ``benchmarks/kd_gpu_launch_ab.py``);
* ``kd_persistent``: the same with ``PYFINETUNE_KD_CUDA_PERSISTENT=1`` (experimental: a grid of the
  resident rows, each block prefetching its next row's slice to L2);
* ``optim``: one ``pyfinetune.optim.AdamW`` step with L2-SP on 128 float32 tensors of 2^20 (134M
  parameters, issue #2's case of ``bench_optim.py``);
* ``optim_flat``: the same step with ``PYFINETUNE_OPTIM_CUDA_LAYOUT=flat`` (experimental);
* ``sparse``: ``SparseLinear`` forward, 90% unstructured, float16 x [256, 4096] @ W [4096, 4096]^T
  (issue #4's case), the sparse kernel (``kernel="sparse"``: "auto" would run the dense path, cuBLAS,
  below the 16-bit CUDA crossover of 99%);
* ``sparse_tc_split``: the same product on the tensor cores (``tiled_csr_linear``) with its K split
  (``PYFINETUNE_TILED_CUDA_SPLIT_K=auto``, the default since 2026-11-29).

Each workload runs three times first (warm-up: allocations, the launch plans' caches, the
occupancy queries), then once between the profiler calls, so that ncu sees only the measured
launches. ``benchmarks/gpu_profile.sh`` runs ncu over each one. ``--smoke`` runs the same calls at
small shapes on the CPU (a test of the script, tests/test_benchmark_scripts.py).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

WORKLOADS = ("kd", "kd_persistent", "optim", "optim_flat", "sparse", "sparse_tc_split")


def kd_workload(device, small):
    from pyfinetune.benchmarks.distill import kd_inputs

    s, t, lab = kd_inputs(*((16, 1000) if small else (8192, 128256)), torch.bfloat16, device)
    s = s.detach()

    def call():
        torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, temperature=2.0, alpha=0.5, divergence="forward_kl", beta=0.5,
                                         ignore_index=-100, need_grad=True, grad_scale=1.0)
    return call


def kd_persistent_workload(device, small):
    os.environ["PYFINETUNE_KD_CUDA_PERSISTENT"] = "1"
    return kd_workload(device, small)


def optim_workload(device, small):
    from pyfinetune.optim import AdamW

    g = torch.Generator(device=device).manual_seed(0)
    n, size = (4, 1000) if small else (128, 2 ** 20)
    params = [torch.nn.Parameter(torch.randn(size, device=device, generator=g)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(size, device=device, generator=g) * 1e-3
    opt = AdamW(params, lr=1e-4, weight_decay=0.01, l2sp=0.1)
    return opt.step


def optim_flat_workload(device, small):
    # The same step with the experimental flat layout (resident blocks over pieces end to end).
    os.environ["PYFINETUNE_OPTIM_CUDA_LAYOUT"] = "flat"
    return optim_workload(device, small)


def sparse_tc_split_workload(device, small):
    """The same product on the tensor cores (tiled_csr_linear, float16), its K split in parts
    (PYFINETUNE_TILED_CUDA_SPLIT_K=auto, the default since 2026-11-29); on the CPU its CPU kernel,
    float32."""
    from pyfinetune import ops

    os.environ["PYFINETUNE_TILED_CUDA_SPLIT_K"] = "auto"
    g = torch.Generator(device=device).manual_seed(0)
    n, k = (8, 64) if small else (256, 4096)
    dtype = torch.float32 if device == "cpu" else torch.float16
    w = torch.randn(k, k, device=device, generator=g).to(dtype)
    mask = torch.rand(k, k, device=device, generator=g) >= 0.9
    pattern = ops.compressed_pattern(mask)
    tiled = ops.tiled_pattern(pattern.crow_indices, pattern.col_indices, k)
    values = w[mask]
    x = torch.randn(n, k, device=device, generator=g).to(dtype)

    def call():
        with torch.no_grad():
            ops.tiled_csr_linear(x, values, pattern, tiled)
    return call


def sparse_workload(device, small):
    from pyfinetune.prune import SparseLinear

    g = torch.Generator(device=device).manual_seed(0)
    n, k = (8, 64) if small else (256, 4096)
    dtype = torch.float32 if device == "cpu" else torch.float16
    w = torch.randn(k, k, device=device, generator=g).to(dtype)
    mask = torch.rand(k, k, device=device, generator=g) >= 0.9
    layer = SparseLinear.from_dense(w, mask, kernel="sparse")  # "auto" takes cuBLAS at 90% fp16 on CUDA
    x = torch.randn(n, k, device=device, generator=g).to(dtype)

    def call():
        with torch.no_grad():
            layer(x)
    return call


def main(argv) -> int:
    smoke = "--smoke" in argv
    args = [a for a in argv if a != "--smoke"]
    if len(args) != 1 or args[0] not in WORKLOADS:
        print(f"usage: gpu_profile_target.py {{{','.join(WORKLOADS)}}} [--smoke]", file=sys.stderr)
        return 2
    if not smoke and not torch.cuda.is_available():
        print("gpu_profile_target.py: needs a CUDA device (--smoke: small shapes on the CPU)", file=sys.stderr)
        return 2
    device = "cpu" if smoke else "cuda"
    call = {"kd": kd_workload, "kd_persistent": kd_persistent_workload, "optim": optim_workload, "optim_flat": optim_flat_workload, "sparse": sparse_workload,
            "sparse_tc_split": sparse_tc_split_workload}[args[0]](device, smoke)
    for _ in range(3):
        call()
    if smoke:
        call()
    else:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        call()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"gpu_profile_target.py {args[0]}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
