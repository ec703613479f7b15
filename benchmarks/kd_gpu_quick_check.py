"""Targeted checks of the CUDA distillation kernels, to run first on a GPU machine (a minute).

    python benchmarks/kd_gpu_quick_check.py [cuda|cpu]      # from the repository root, after the build

Each case prints OK or FAIL with the error; a failure does not stop the others (a sticky CUDA
error does). Exit status 1 if any case failed. The cases are the ones a CPU machine cannot check:
the launch shapes (the dynamic shared memory just under 48 KB, the cluster split on sm_90), rows
whose operands differ in alignment, logits in the thousands, and each setting of the cp.async
prefetch (PYFINETUNE_KD_CUDA_PREFETCH) and the register-capped bfloat16 kernels
(PYFINETUNE_KD_CUDA_CAP_REGISTERS) on the same shapes (both on by default for bfloat16 on the cached
path). The full suite
(`python -m pytest tests`) covers the same and more; benchmarks/gpu_check.sh runs this first.
"""

import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

from pyfinetune.losses import kd_loss, kd_loss_topk  # noqa: E402
from reference_kd import assert_grad_close, assert_loss_close, kd_reference, topk_to_full  # noqa: E402

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
failures = []


def run(name, fn):
    try:
        fn()
        print(f"OK   {name}", flush=True)
    except Exception as e:  # noqa: BLE001
        failures.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        if "CUDA error" in str(e):
            traceback.print_exc()


def dense(N, V, sdt, tdt, div="forward_kl", T=1.0, scale=3.0, labels=True, seed=0, offset=0):
    def f():
        g = torch.Generator().manual_seed(seed)
        s = (torch.randn(N, V, generator=g) * scale).to(sdt)
        t = (torch.randn(N, V, generator=g) * scale).to(tdt)
        lab = torch.randint(0, V, (N,), generator=g) if labels else None
        x = torch.zeros(N, V + offset, dtype=sdt, device=dev)[:, offset:]  # offset > 0: a sliced student
        x.copy_(s)
        x.requires_grad_(True)
        loss = kd_loss(x, t.to(dev), lab.to(dev) if labels else None, temperature=T, divergence=div)
        loss.backward()
        ref_l, ref_g = kd_reference(s, t, lab, temperature=T, divergence=div)
        torch_l, torch_g = kd_reference(s, t, lab, temperature=T, divergence=div, compute_dtype=torch.float32)
        assert_loss_close(loss.cpu(), ref_l, torch.float32, torch_same_dtype=torch_l)
        assert_grad_close(x.grad.float().cpu(), ref_g, sdt, torch_lowp=torch_g)

    return f


def topk(N, V, k, div="forward_kl", T=1.7, scale=3.0, seed=0):
    def f():
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(N, V, generator=g) * scale
        v, i = torch.topk(torch.randn(N, V, generator=g) * scale, k, dim=-1)
        lab = torch.randint(0, V, (N,), generator=g)
        x = s.to(dev).requires_grad_(True)
        loss = kd_loss_topk(x, v.to(dev), i.to(dev), lab.to(dev), temperature=T, divergence=div)
        loss.backward()
        ref_l, ref_g = kd_reference(s, topk_to_full(v, i, V), lab, temperature=T, divergence=div)
        torch_l, torch_g = kd_reference(s, topk_to_full(v, i, V).float(), lab, temperature=T, divergence=div,
                                        compute_dtype=torch.float32)
        assert_loss_close(loss.cpu(), ref_l, torch.float32, torch_same_dtype=torch_l)
        assert_grad_close(x.grad.cpu(), ref_g, torch.float32, torch_lowp=torch_g)

    return f


f32, bf16 = torch.float32, torch.bfloat16
DIVS = ("forward_kl", "reverse_kl", "jsd")
# 1. dynamic shared memory just under 48 KB, above the default limit (48 KB minus static): one
#    block per row (N >= #SMs), with a gradient.
for div in DIVS:
    run(f"smem window fp32 N=256 V=6100 {div}", dense(256, 6100, f32, f32, div=div))
    run(f"smem window bf16/fp32 N=256 V=8192 {div}", dense(256, 8192, bf16, f32, div=div))
    run(f"smem window bf16 N=256 V=12000 {div}", dense(256, 12000, bf16, bf16, div=div))
# 2. clusters (sm_90): few rows, large V -> 8 blocks per row; dense and top-k (fix-ups across ranks).
for div in DIVS:
    run(f"cluster dense {div} N=2 V=50257", dense(2, 50257, f32, f32, div=div))
for div in ("forward_kl", "jsd"):
    run(f"cluster topk {div} N=2 V=50257 k=64", topk(2, 50257, 64, div=div))
# 3. a student misaligned against its teacher and gradient (vector split kept, element loads).
for div in DIVS:
    run(f"sliced student fp32 offset 1 N=2 V=50257 {div}", dense(2, 50257, f32, f32, div=div, offset=1))
    run(f"sliced student bf16 offset 3 N=4 V=1003 {div}", dense(4, 1003, bf16, bf16, div=div, offset=3))
# 4. logits in the thousands (statistics relative to the raw row maximum) and temperature extremes.
for div in DIVS:
    for T in (0.05, 1.0, 100.0):
        run(f"large logits {div} T={T} scale=2000", dense(4, 3001, f32, f32, div=div, T=T, scale=2000.0))
for div in ("forward_kl", "jsd"):
    for T in (0.05, 100.0):
        run(f"large logits topk {div} T={T} scale=1500", topk(4, 2000, 50, div=div, T=T, scale=1500.0))
run("jsd T=100 (small D)", dense(6, 1000, f32, f32, div="jsd", T=100.0))
# 5. a kept gradient above pyfinetune.ops._SYNC_SCALE_MIN_BYTES (64 MiB): batchmean divided by the
#    counted rows in the kernel (grad_scale), loss.backward() hands it on with no pass; the launch
#    block size chosen by occupancy (many rows, a cluster per row).
for div in ("forward_kl", "jsd"):
    run(f"folded batchmean bf16 N=320 V=128256 {div}", dense(320, 128256, bf16, bf16, div=div, T=2.0))



# 6. kd_loss_fwd_inplace (the gradient written over the student; the label's logit read before the
#    first cluster barrier): bit-identical to kd_loss_fwd, rows split over clusters and not.
def inplace(N, V, sdt, div, T):
    def f():
        g = torch.Generator().manual_seed(7)
        s = (torch.randn(N, V, generator=g) * 3).to(dev, sdt)
        t = (torch.randn(N, V, generator=g) * 3).to(dev, sdt)
        lab = torch.randint(0, V, (N,), generator=g)
        lab[::4] = -100
        lab = lab.to(dev)
        kw = dict(temperature=T, alpha=0.5, divergence=div, beta=0.5, ignore_index=-100, grad_scale=0.5)
        rows, grad = torch.ops.pyfinetune.kd_loss_fwd(s, t, lab, need_grad=True, **kw)
        x = s.clone()
        out = torch.ops.pyfinetune.kd_loss_fwd_inplace(x, t, lab, **kw)
        assert torch.equal(out, rows), (out - rows).abs().max().item()
        assert torch.equal(x, grad), (x.float() - grad.float()).abs().max().item()

    return f


for div in DIVS:
    run(f"in place {div} N=3 V=128256 bf16 (clusters)", inplace(3, 128256, bf16, div, 2.0))
    run(f"in place {div} N=300 V=32000 fp32", inplace(300, 32000, f32, div, 1.3))


# 7. fused_linear_kd_loss with a bf16 head: the tensor-core path (mm / addmm with out_dtype=float32)
#    against the float32-product path, then one timing line against the unfused bf16 composition.
def linear_bf16(N, H, V):
    def f():
        import pyfinetune.losses as losses
        from pyfinetune.losses import fused_linear_kd_loss

        g = torch.Generator().manual_seed(8)
        h = torch.randn(N, H, generator=g).to(dev, bf16)
        w = (torch.randn(V, H, generator=g) / H ** 0.5).to(dev, bf16)
        ht = torch.randn(N, H, generator=g).to(dev, bf16)
        wt = (torch.randn(V, H, generator=g) / H ** 0.5).to(dev, bf16)
        b = torch.randn(V, generator=g).to(dev, bf16)
        lab = torch.randint(0, V, (N,), generator=g).to(dev)
        assert losses._tensor_core_head(h, w) == (dev == "cuda"), "tensor-core path not taken"

        def grads(tensor_core):
            saved = losses._tensor_core_head
            losses._tensor_core_head = lambda a, c: tensor_core and saved(a, c)
            try:
                xs = [x.clone().requires_grad_(True) for x in (h, w, b)]
                loss = fused_linear_kd_loss(xs[0], xs[1], ht, wt, lab, student_bias=xs[2], temperature=2.0)
                loss.backward()
                return loss.detach(), [x.grad.float() for x in xs]
            finally:
                losses._tensor_core_head = saved

        l_tc, g_tc = grads(True)
        l_32, g_32 = grads(False)
        assert abs(l_tc.item() - l_32.item()) <= 1e-3 * abs(l_32.item()) + 1e-4, (l_tc.item(), l_32.item())
        for a, c, name in zip(g_tc, g_32, ("hidden", "weight", "bias")):
            err = (a - c).abs().max().item()
            assert err <= 2e-2 * c.abs().max().item(), f"{name}: {err:.3e} vs max {c.abs().max().item():.3e}"
        if dev != "cuda":
            return
        hs, ws = h.clone().requires_grad_(True), w.clone().requires_grad_(True)

        def fused():
            fused_linear_kd_loss(hs, ws, ht, wt, lab, temperature=2.0).backward()

        def unfused():
            kd_loss(hs @ ws.t(), ht @ wt.t(), lab, temperature=2.0).backward()

        for name, fn in (("fused (tensor cores)", fused), ("unfused bf16", unfused)):
            fn()
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            stop.record()
            torch.cuda.synchronize()
            print(f"     {name}: {start.elapsed_time(stop) / 5:.1f} ms fwd+bwd (N={N} H={H} V={V} bf16)", flush=True)

    return f


# PYFINETUNE_KD_CUDA_PREFETCH=1 (the default for bfloat16 on the cached path; forced here for every
# dtype): pass 1 fills the shared-memory cache with cp.async copies. The launch shapes again, a row
# longer than the cache (uncached rest in registers while the copies fly), the misaligned student
# (falls back to register loads), top-k and in place.
os.environ["PYFINETUNE_KD_CUDA_PREFETCH"] = "1"
for div in DIVS:
    run(f"prefetch smem window bf16 N=256 V=12000 {div}", dense(256, 12000, bf16, bf16, div=div))
    run(f"prefetch cluster dense {div} N=2 V=50257", dense(2, 50257, f32, f32, div=div))
    run(f"prefetch longer than the cache fp32 N=2 V=262144 {div}", dense(2, 262144, f32, f32, div=div, T=1.3))
    run(f"prefetch sliced student fp32 offset 1 N=2 V=50257 {div}", dense(2, 50257, f32, f32, div=div, offset=1))
    run(f"prefetch in place {div} N=3 V=128256 bf16", inplace(3, 128256, bf16, div, 2.0))
for div in ("forward_kl", "jsd"):
    run(f"prefetch cluster topk {div} N=2 V=50257 k=64", topk(2, 50257, 64, div=div))
os.environ.pop("PYFINETUNE_KD_CUDA_PREFETCH")

# PYFINETUNE_KD_CUDA_CAP_REGISTERS: the bfloat16 kernels compiled for three 256-thread blocks per SM
# (at most 80 registers; with the prefetch, the default for bfloat16 on the cached path) and, set
# to 0, the uncapped ones with register loads (the default before 2026-11-27, still what 0 / 0
# selects), against float64 (in place: bit-identical to kd_loss_fwd). tests/test_kd_cuda_prefetch.py
# compares their bits.
for cap, prefetch in (("1", "0"), ("1", "1"), ("0", "0")):
    os.environ["PYFINETUNE_KD_CUDA_CAP_REGISTERS"] = cap
    os.environ["PYFINETUNE_KD_CUDA_PREFETCH"] = prefetch
    label = f"cap registers={cap} prefetch={prefetch}"
    for div in DIVS:
        run(f"{label} smem window bf16 N=256 V=12000 {div}", dense(256, 12000, bf16, bf16, div=div))
        run(f"{label} in place {div} N=3 V=128256 bf16", inplace(3, 128256, bf16, div, 2.0))
        run(f"{label} folded batchmean bf16 N=320 V=128256 {div}", dense(320, 128256, bf16, bf16, div=div, T=2.0))
        run(f"{label} sliced student bf16 offset 3 N=4 V=1003 {div}", dense(4, 1003, bf16, bf16, div=div, offset=3))
os.environ.pop("PYFINETUNE_KD_CUDA_PREFETCH")
os.environ.pop("PYFINETUNE_KD_CUDA_CAP_REGISTERS")

# PYFINETUNE_KD_CUDA_PERSISTENT (experimental): a grid of the resident rows only, each block or
# cluster looping over rows and prefetching its next row's slice to L2 (bfloat16 kernels without a
# top-k teacher); more rows than an H100 holds at once (~50 clusters of the 128256-column rows,
# thousands of blocks of the short ones). And PYFINETUNE_KD_CUDA_SPLIT=16 (16-block clusters, a
# non-portable size), alone and with it. tests/test_kd_cuda_persistent.py compares their bits.
for env in ({"PYFINETUNE_KD_CUDA_PERSISTENT": "1"}, {"PYFINETUNE_KD_CUDA_SPLIT": "16"},
            {"PYFINETUNE_KD_CUDA_PERSISTENT": "1", "PYFINETUNE_KD_CUDA_SPLIT": "16"}):
    os.environ.update(env)
    label = " ".join(f"{k.replace('PYFINETUNE_KD_CUDA_', '').lower()}={v}" for k, v in env.items())
    for div in DIVS:
        run(f"{label} bf16 N=160 V=128256 {div}", dense(160, 128256, bf16, bf16, div=div, T=2.0))
        run(f"{label} short rows bf16 N=9000 V=301 {div}", dense(9000, 301, bf16, bf16, div=div))
        run(f"{label} in place {div} N=130 V=128256 bf16", inplace(130, 128256, bf16, div, 2.0))
        run(f"{label} sliced student bf16 offset 3 N=300 V=1003 {div}", dense(300, 1003, bf16, bf16, div=div, offset=3))
    for k in env:
        os.environ.pop(k)

LINEAR_SHAPE = (4096, 4096, 128256) if dev == "cuda" else (64, 32, 1000)
run("fused linear bf16 tensor-core path N={} H={} V={}".format(*LINEAR_SHAPE), linear_bf16(*LINEAR_SHAPE))

if dev == "cuda":
    torch.cuda.synchronize()
print(f"{len(failures)} failed" if failures else "all OK")
sys.exit(1 if failures else 0)
