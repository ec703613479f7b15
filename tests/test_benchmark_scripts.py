"""benchmarks/gpu_check.sh runs every benchmarks/bench_*.py with `--device cuda --out DIR`: each
script must accept both options (a GPU session is short; a usage error there wastes it). The
scripts are command lines over pyfinetune.benchmarks, which ships in the package."""

import functools
import glob
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")))


@functools.lru_cache(maxsize=None)
def triton_interpreter_fault() -> str:
    """Why Triton's interpreter cannot be trusted here ("" when it can): a small kernel, run by it
    in a child process, must double five floats in a loop whose bound is an argument, as Liger's
    kernels have. Under numpy 2.4 the interpreters of Triton 3.1, 3.4 and 3.6 (torch 2.5's, 2.8's,
    2.10's) cannot take such a bound ("only 0-dimensional arrays can be converted to Python
    scalars"; 3.1's also writes nothing back without one): a test of a Triton rival that failed
    there would blame the rival for the interpreter."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    code = """
import torch, triton, triton.language as tl
@triton.jit
def double(x, y, n, BLOCK: tl.constexpr):
    for start in range(0, n, BLOCK):  # a loop bound from an argument, as Liger's kernels have
        i = start + tl.arange(0, BLOCK)
        tl.store(y + i, tl.load(x + i, mask=i < n, other=0.0) * 2.0, mask=i < n)
x = torch.arange(5, dtype=torch.float32)
y = torch.full_like(x, -1.0)
double[(1,)](x, y, 5, BLOCK=4)
print("ok" if torch.equal(y, 2 * x) else f"gave {y.tolist()}")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    if out.returncode == 0 and out.stdout.strip() == "ok":
        return ""
    what = out.stdout.strip() if out.returncode == 0 else (out.stderr.strip().splitlines() or ["no message"])[-1]
    return (f"Triton {importlib.metadata.version('triton')}'s interpreter with numpy "
            f"{importlib.metadata.version('numpy')} fails a five-line kernel (2 x [0..4]): {what}")


def test_scripts_found():
    assert len(SCRIPTS) >= 4, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_accepts_device_and_out(script):
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--device" in out.stdout and "--out" in out.stdout, out.stdout


def test_benchmarks_package_is_packaged():
    # `pyfinetune bench` runs from an installed package: the subpackage must be in the wheel.
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert '"pyfinetune.benchmarks"' in f.read()


def test_results_default_to_the_clone():
    from pyfinetune.benchmarks import common

    assert common.REPO_ROOT == ROOT
    assert common.RESULTS_DIR == os.path.join(ROOT, "benchmarks", "results")


def test_kd_memory_child_runs_as_a_module():
    # bench_kd measures each contender's memory in a child process of the package module.
    from pyfinetune.benchmarks import distill

    res = distill.measure_memory(dict(kind="kd", name=distill.OURS, n=16, v=300, dtype="float32", device="cpu"))
    assert "error" not in res, res.get("error")
    assert res["held_bytes"] >= 16 * 300 * 4, json.dumps(res)  # the gradient buffer is kept for backward


def test_kd_topk_contenders(monkeypatch):
    # The top-k case: the torch composition and kd_loss_topk give one loss and gradient (the
    # benchmark checks this before timing, and refuses a contender that differs), and the memory
    # child runs it.
    from pyfinetune.benchmarks import distill

    distill.check_topk(torch.device("cpu"))
    s, tk, idx, lab = distill.topk_inputs(12, 400, 9, torch.bfloat16, "cpu")
    assert idx.shape == (12, 9) and tk.dtype == torch.bfloat16 and (lab == -100).sum() == 2
    assert all(len(set(row.tolist())) == 9 for row in idx)
    torch.testing.assert_close(distill.ours_kd_topk(s, tk, idx, lab), distill.torch_kd_topk(s, tk, idx, lab),
                               rtol=1e-4, atol=1e-4)
    monkeypatch.setitem(distill.TOPK_FNS, distill.OURS, lambda s, tk, idx, lab: 1.01 * distill.ours_kd_topk(s, tk, idx, lab))
    with pytest.raises(RuntimeError, match="ours top-k loss or gradient differs"):
        distill.check_topk(torch.device("cpu"))
    monkeypatch.undo()
    res = distill.measure_memory(dict(kind="topk", name=distill.OURS, n=16, v=300, k=5, dtype="float32", device="cpu"))
    assert "error" not in res and res["peak_bytes"] > 0, res


def test_kd_linear_chunk_contenders(tmp_path, capsys):
    # --linear-chunks adds fused_linear_kd_loss at those chunk sizes, timed and measured (memory in
    # the child process, which rebuilds the same contender from its spec).
    from pyfinetune.benchmarks import distill

    assert distill.main(["--quick", "--case", "linear", "--reps", "10", "--linear-chunks", "64", "--out",
                         str(tmp_path)]) == 0
    md = next(tmp_path.glob("kd-cpu-*.md")).read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {distill.chunk_contender(64)} |"))
    assert "err" not in row, row
    res = distill.measure_memory(dict(kind="linear", name=distill.chunk_contender(64), n=256, h=128, v=5000,
                                      device="cpu", chunk=64))
    assert "error" not in res, res.get("error")
    assert res["peak_bytes"] >= 2 * 64 * 5000 * 4  # two chunk buffers at least


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_optimizer_compiled_rival_computes_the_composition(kind):
    # bench_optim's torch.compile contender must time the same update as the eager L2-SP
    # composition (and ours): the compiled steps made when the contender is built (one, two for
    # SGD) against as many eager ones.
    from pyfinetune.benchmarks import optim as bench_optim

    case = bench_optim.Case("t", "test", [(1000,), (7, 3)])
    master = bench_optim.make_master(case, torch.device("cpu"), seed=3)
    make_opt, prefix = ((bench_optim.torch_adamw, bench_optim.TORCH_L2SP_PREFIX) if kind == "adamw"
                        else (bench_optim.torch_sgd, bench_optim.TORCH_SGD_L2SP_PREFIX))
    entry, why_not = bench_optim.torch_compiled_l2sp_entry(master, case.numel, make_opt, prefix, 32)
    if entry is None:
        pytest.skip(f"torch.compile unavailable here: {why_not}")
    assert entry.contender.name == f"{prefix} {bench_optim.COMPILED_SUFFIX}"
    eager = next(e for e in bench_optim.torch_l2sp_entries(master, case.numel, make_opt, prefix, 32)
                 if "(sub+add, foreach)" in e.contender.name)
    for _ in range(2 if kind == "sgd" else 1):  # the compiled SGD contender made two steps
        eager.contender.fn()
    compiled_params = [p for g in entry.opt.param_groups for p in g["params"]]
    eager_params = [p for g in eager.opt.param_groups for p in g["params"]]
    for p, q, p_start in zip(compiled_params, eager_params, master.params):
        assert not torch.equal(p, p_start)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_kd_liger_rival_computes_our_loss():
    # bench_kd's Liger-Kernel contender (when liger-kernel is installed) must compute the loss and
    # gradients fused_linear_kd_loss computes, or the benchmark compares different work.
    from pyfinetune.benchmarks import distill

    why_not = distill.liger_available()
    if why_not is not None:
        pytest.skip(why_not)
    h, w, ht, wt, lab = distill.linear_inputs(300, 64, 1000, torch.device("cpu"), seed=5)
    ours = distill.fused_linear(h, w, ht, wt, lab)
    g_ours = torch.autograd.grad(ours, (h, w))
    liger = distill.linear_fn(distill.LIGER)(h, w, ht, wt, lab)
    g_liger = torch.autograd.grad(liger, (h, w))
    torch.testing.assert_close(liger, ours, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_liger, g_ours):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    assert distill.liger_mismatch("linear", torch.device("cpu")) is None  # the benchmark's own guard agrees
    # ... and refuses a Liger loss that differs (here: the soft loss without the T^2 factor).
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    other = LigerFusedLinearJSDLoss(weight_hard_loss=1 - distill.ALPHA, weight_soft_loss=distill.ALPHA, beta=0.0,
                                    temperature=distill.TEMP, compiled=False)
    saved, distill._liger_module = distill._liger_module, other
    try:
        assert "computes another loss" in distill.liger_mismatch("linear", torch.device("cpu"))
    finally:
        distill._liger_module = saved


def test_kd_liger_logits_rival_computes_our_loss():
    # bench_kd's Liger contender of the CUDA kd cases (Triton kernels), run here by Triton's
    # interpreter in a child process: the same loss and gradient as kd_loss.
    from pyfinetune.benchmarks import distill

    why_not = distill.liger_available() or triton_interpreter_fault() or None
    if why_not is not None:
        pytest.skip(why_not)
    code = """
import torch
try:  # Triton 3.2's autotuner (torch 2.6's) asks for a GPU driver even under its interpreter
    import liger_kernel.transformers
except RuntimeError as e:
    print("SKIP", e)
    raise SystemExit(0)
from pyfinetune.benchmarks import distill
s, t, lab = distill.kd_inputs(24, 300, torch.float32, torch.device("cpu"), seed=7)
ours = distill.ours_kd(s, t, lab)
g_ours, = torch.autograd.grad(ours, s)
liger = distill.kd_fn(distill.LIGER_KD)(s, t, lab)
g_liger, = torch.autograd.grad(liger, s)
torch.testing.assert_close(liger, ours, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(g_liger, g_ours, rtol=1e-4, atol=1e-8)
assert distill.liger_kd_available(torch.device("cpu")) == "its Triton kernels need a GPU"
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    if out.returncode == 0 and out.stdout.startswith("SKIP"):
        pytest.skip(f"Liger-Kernel cannot be imported under Triton's interpreter here: {out.stdout[5:].strip()}")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_kd_fp16_reverse_kl_cost_script_runs():
    # benchmarks/kd_fp16_reverse_kl_cost.py (the README's float16 reverse_kl cost), small shape.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kd_fp16_reverse_kl_cost.py"), "--rows", "8",
                          "--vocab", "300", "--reps", "10"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("kd_loss, float32 gradient", "float16 kept gradient (before)", "torch composition"):
        assert name in out.stdout, out.stdout


def test_optimizer_targets_per_device():
    # Issue #2: the CPU targets (1.6x the best torch L2-SP, 0.9x torch fused without penalty, 80% of
    # copy bandwidth) on the CPU; on a GPU only 85% of the device bandwidth, at 100M+ parameters.
    from pyfinetune.benchmarks import optim as bench_optim

    assert bench_optim.targets_for(torch.device("cpu"), 10) == [1.6, 0.9, 0.8]
    assert bench_optim.targets_for(torch.device("cuda"), 134_217_728) == [None, None, 0.85]
    assert bench_optim.targets_for(torch.device("cuda"), 25_557_032) == [None, None, None]


def test_optimizer_gpu_cases_one_and_five_steps_per_sample():
    # The 134M-parameter GPU case twice: one step per timed sample (the host's work before the first
    # launch billed to the GPU) and five (that work overlapped, as in a training loop); both are
    # GPU-only and both carry the bandwidth target.
    from pyfinetune.benchmarks import optim as bench_optim

    large, steps = bench_optim.make_case("large"), bench_optim.make_case("large-steps")
    assert steps.shapes == large.shapes and steps.numel == large.numel == 134_217_728
    assert (large.calls_per_rep, steps.calls_per_rep) == (1, 5) and steps.bandwidth_bound
    with pytest.raises(SystemExit):
        bench_optim.main(["--device", "cpu", "--case", "large-steps"])


def test_pruning_targets_per_device_and_dtype():
    # Issue #4: on the CPU in float32, forward >= 3x dense, >= 1.5x torch CSR and the step >= 3x at
    # 90% and the forward crossover at or below 70%; on an H100 in float16, forward >= 2x cuBLAS.
    from pyfinetune.benchmarks import common, prune

    def timing(ms):
        return common.Timing("t", [ms] * 10)

    def result(sparsity, dense, ours):
        return {"sparsity": sparsity,
                "forward": {prune.DENSE_FWD: timing(dense), prune.TORCH_CSR_FWD: timing(2 * dense),
                            prune.OURS_FWD: timing(ours)},
                "step": {prune.DENSE_STEP: timing(3 * dense), prune.OURS_STEP: timing(3 * ours)}}

    results = [result(0.7, 10.0, 12.0), result(0.9, 10.0, 4.0)]
    cpu = prune.analyse(results, "cpu", torch.float32)
    assert {r["key"]: r["target"] for r in cpu["ratios"]} == {"fwd_vs_dense": 3.0, "fwd_vs_torch_csr": 1.5,
                                                              "step_vs_dense": 3.0}
    assert [r["status"] for r in cpu["ratios"]] == ["NOT MET", "MET", "NOT MET"]   # 2.5x, 5x, 2.5x
    assert cpu["crossover"]["target"]["status"] == "NOT MET"                       # from 90% only
    cuda = prune.analyse(results, "cuda", torch.float16)
    assert [(r["key"], r["target"], r["status"]) for r in cuda["ratios"]] == [("fwd_vs_dense", 2.0, "MET")]
    # with the tensor-core forward timed too, its own row against the same target
    results[1]["forward"][prune.OURS_TC_FWD] = timing(6.0)
    cuda = prune.analyse(results, "cuda", torch.float16)
    assert [(r["key"], r["status"]) for r in cuda["ratios"]] == [("fwd_vs_dense", "MET"), ("fwd_tc_vs_dense", "NOT MET")]
    assert "target" not in cuda["crossover"]
    other = prune.analyse(results, "cpu", torch.bfloat16)
    assert other["ratios"] == [] and "target" not in other["crossover"]
    assert "No targets for this device and dtype" in prune.summary_markdown(other)


def test_pruning_benchmark_torch_prune_rival():
    # The torch.nn.utils.prune rows: the layer computes the masked product (and trains only the
    # kept weights' effect), and the summary reports rival / ours per sparsity, forward and step.
    from pyfinetune.benchmarks import common, prune

    p = prune.make_problem(0.8, torch.device("cpu"), seed=3)
    layer = prune.torch_pruned_linear(p)
    wm = torch.where(p["mask"], p["w"], 0.0)
    torch.testing.assert_close(layer(p["x"]), p["x"] @ wm.t())
    assert hasattr(layer, "weight_orig") and layer.weight_mask.dtype == p["w"].dtype
    names = [c.name for c in prune.forward_contenders(p, False)]
    assert names == [prune.DENSE_FWD, prune.TORCH_PRUNE_FWD, prune.TORCH_CSR_FWD]
    assert prune.TORCH_PRUNE_FWD not in [c.name for c in prune.forward_contenders(p, False, rivals=False)]
    steps = prune.step_contenders(p, False)
    assert [c.name for c in steps] == [prune.DENSE_STEP, prune.TORCH_PRUNE_STEP]
    steps[1].fn()  # one step runs

    def timing(ms):
        return common.Timing("t", [ms] * 10)

    results = [{"sparsity": 0.9,
                "forward": {prune.DENSE_FWD: timing(10.0), prune.TORCH_PRUNE_FWD: timing(12.0),
                            prune.OURS_FWD: timing(3.0)},
                "step": {prune.DENSE_STEP: timing(30.0), prune.TORCH_PRUNE_STEP: timing(40.0),
                         prune.OURS_STEP: timing(8.0)}}]
    analysis = prune.analyse(results, "cpu", torch.float32)
    assert [(v["group"], v["value"]) for v in analysis["vs_rivals"]] == [("forward", 4.0), ("step", 5.0)]
    md = prune.summary_markdown(analysis)
    assert "| sparsity | forward: torch.nn.utils.prune | training step: torch.nn.utils.prune + torch AdamW fused |" in md
    assert "| 90% | 4.00x (4.00 .. 4.00) | 5.00x (5.00 .. 5.00) |" in md


def test_pruning_benchmark_block_pattern(monkeypatch):
    # --pattern block:RxC: whole blocks kept or pruned, torch's BSR product among the forward
    # contenders (checked to compute the masked product), no targets (the are unstructured).
    from pyfinetune.benchmarks import common, prune

    assert prune.parse_pattern("unstructured") is None and prune.parse_pattern("block:16x32") == (16, 32)
    for bad in ("block:0x4", "block:3x4", "2:4", "block:16"):
        with pytest.raises(ValueError, match="pattern"):
            prune.parse_pattern(bad)
    p = prune.make_problem(0.75, torch.device("cpu"), seed=5, block=(16, 32))
    blocks = p["mask"].reshape(prune.M // 16, 16, prune.K // 32, 32)
    assert bool((blocks.all(3).all(1) | ~blocks.any(3).any(1)).all()), "every block whole"
    assert abs(p["mask"].float().mean().item() - 0.25) < 0.02
    # torch's CPU BSR product (MKL) refuses non-square blocks: left out with a note, not a crash
    assert prune.TORCH_BSR_FWD not in [c.name for c in prune.forward_contenders(p, False)]
    p = prune.make_problem(0.75, torch.device("cpu"), seed=5, block=(16, 16))
    contenders = {c.name: c for c in prune.forward_contenders(p, True, dense_path=False)}
    assert prune.TORCH_BSR_FWD in contenders
    ref = contenders[prune.DENSE_FWD].fn()
    torch.testing.assert_close(contenders[prune.TORCH_BSR_FWD].fn().t(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(contenders[prune.OURS_FWD].fn(), ref, rtol=1e-4, atol=1e-4)
    assert prune.TORCH_BSR_FWD not in [c.name for c in prune.forward_contenders(prune.make_problem(0.75, torch.device("cpu")), False)]
    # a BSR product that computed something else would be left out, not timed
    real_mm = torch.sparse.mm

    def wrong_bsr(a, b):
        out = real_mm(a, b)
        return out * 1.01 if a.layout == torch.sparse_bsr else out
    monkeypatch.setattr(torch.sparse, "mm", wrong_bsr)
    assert prune.TORCH_BSR_FWD not in [c.name for c in prune.forward_contenders(p, False)]
    monkeypatch.undo()

    def timing(ms):
        return common.Timing("t", [ms] * 10)

    results = [{"sparsity": 0.9,
                "forward": {prune.DENSE_FWD: timing(10.0), prune.TORCH_BSR_FWD: timing(6.0), prune.OURS_FWD: timing(3.0)},
                "step": {prune.DENSE_STEP: timing(30.0), prune.OURS_STEP: timing(8.0)}}]
    analysis = prune.analyse(results, "cpu", torch.float32, block=(16, 16))
    assert analysis["ratios"] == [] and "target" not in analysis["crossover"]
    md = prune.summary_markdown(analysis, block=(16, 16))
    assert "No targets for 16 x 16 block masks" in md and "| 90% | 2.00x (2.00 .. 2.00) |" in md


def test_prune_torch_model_script_runs(tmp_path):
    # benchmarks/prune_torch_model.py: a vit_b_16 pruned by torch.nn.utils.prune, baked, hooked and
    # sparsified; the three must agree before they are timed (the script raises otherwise).
    pytest.importorskip("torchvision")
    script = os.path.join(ROOT, "benchmarks", "prune_torch_model.py")
    out = subprocess.run([sys.executable, script, "--quick", "--batch", "1", "--sparsity", "0.8", "--out",
                          str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (md,) = glob.glob(str(tmp_path / "prune-model-cpu-*.md"))
    text = open(md).read()
    assert "| pyfinetune sparsify |" in text and "| torch.nn.utils.prune |" in text and "QUICK RUN" in text
    assert "the 24 MLP layers pruned to 80.0% together" in text


def test_git_state_keeps_every_dirty_path(monkeypatch):
    # git status --porcelain entries are "XY path"; the first one starts with a blank when only
    # the work tree changed, which stripping the output used to eat with the path's first letter.
    from pyfinetune.benchmarks import common

    outputs = {"rev-parse": "abc\n", "status": " M pyfinetune/x.py\0M  setup.py\0"}
    monkeypatch.setattr(common, "_run", lambda cmd, strip=True: outputs["status" if "status" in cmd else "rev-parse"])
    state = common.git_state()
    assert state["dirty"] is True
    assert state["dirty_files"] == ["pyfinetune/x.py", "setup.py"]


def test_records_name_the_library_settings(monkeypatch):
    # A record made under an experimental setting (or a CPU prefetch / crossover override) says so.
    from pyfinetune.benchmarks import common

    for k in [k for k in os.environ if k.startswith("PYFINETUNE_")]:
        monkeypatch.delenv(k)  # PYFINETUNE_SEED, a build's PYFINETUNE_FORCE_CPU ...
    monkeypatch.setenv("PYFINETUNE_KD_CUDA_PREFETCH", "1")
    monkeypatch.setenv("PYFINETUNE_CPU_PREFETCH", "0")
    info = common.machine_info(torch.device("cpu"))
    assert info["pyfinetune_env"] == {"PYFINETUNE_CPU_PREFETCH": "0", "PYFINETUNE_KD_CUDA_PREFETCH": "1"}
    assert common.machine_summary(info).endswith("; settings PYFINETUNE_CPU_PREFETCH=0, PYFINETUNE_KD_CUDA_PREFETCH=1.")
    monkeypatch.delenv("PYFINETUNE_KD_CUDA_PREFETCH")
    monkeypatch.delenv("PYFINETUNE_CPU_PREFETCH")
    info = common.machine_info(torch.device("cpu"))
    assert "settings" not in common.machine_summary(info)


def test_kd_launch_ab_runs(tmp_path):
    # gpu_check.sh runs benchmarks/kd_gpu_launch_ab.py right after the build: a smoke test of the
    # whole script on the CPU (where the block-size variable changes nothing), small and fast.
    script = os.path.join(ROOT, "benchmarks", "kd_gpu_launch_ab.py")
    out = subprocess.run([sys.executable, script, "--device", "cpu", "--rows", "16", "--vocab", "301", "--reps", "3",
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fwd+bwd / floor" in out.stdout
    (md,) = glob.glob(str(tmp_path / "kd-launch-ab-cpu-*.md"))
    (js,) = glob.glob(str(tmp_path / "kd-launch-ab-cpu-*.json"))
    record = json.load(open(js))
    assert set(record["times_ms"]) == {"default", "no prefetch, uncapped (the default before 2026-11-27)",
                                       "512, no prefetch, uncapped", "256", "128",
                                       "default, T=2.0001 (no power path)", "prefetch, uncapped",
                                       "capped registers, no prefetch", "persistent + L2 prefetch",
                                       "persistent, no L2 prefetch", "persistent + L2 prefetch, no cp.async prefetch",
                                       "split 16", "split 16, persistent + L2 prefetch",
                                       "split 4 (cache too small: re-reads)", "default, backward scale on the device"}
    assert all(len(v["forward+backward"]) == 3 for v in record["times_ms"].values())
    # The forward taken apart: every row timed in every round, and its table in the record.
    assert list(record["attribution_ms"]) == list(load_script("kd_gpu_launch_ab").ATTRIBUTION)
    assert all(len(v) == 3 for v in record["attribution_ms"].values())
    assert "## The forward taken apart" in open(md).read()


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kd_launch_ab_attribution_rows_do_what_they_say():
    # Each row of the forward's attribution must leave out what its name says and nothing else: the
    # same loss with and without the gradient pass, another loss without labels or at T = 1, the
    # same loss (to bf16 rounding of the inputs) from float32 copies, and the torch rows' results.
    ab = load_script("kd_gpu_launch_ab")
    from pyfinetune.benchmarks.distill import kd_inputs

    s, t, lab = kd_inputs(12, 257, torch.bfloat16, "cpu", seed=3)
    calls = ab.attribution_calls(s, t, lab)
    assert list(calls) == list(ab.ATTRIBUTION)
    kept, loss_only, no_labels, t1, fp32, add, amax = (calls[k]() for k in ab.ATTRIBUTION)
    assert kept[1].shape == s.shape and loss_only[1].numel() == 0
    torch.testing.assert_close(loss_only[0], kept[0], rtol=0, atol=0)
    assert not torch.allclose(no_labels[0], kept[0]) and not torch.allclose(t1[0], kept[0])
    torch.testing.assert_close(fp32[0], kept[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(add, s.detach() + t)
    torch.testing.assert_close(amax[0], s.detach().amax(-1))
    torch.testing.assert_close(amax[1], t.amax(-1))
    assert not s.grad_fn and s.grad is None  # the benchmark's leaf is left alone


def test_ncu_sass_top_ranks_instructions(tmp_path):
    # benchmarks/ncu_sass_top.py reads gpu_profile.sh's per-instruction CSV (read on any machine).
    path = tmp_path / "sass.csv"
    path.write_text('==PROF== Disconnected\n'
                    '"Address","Source","Warp Stall Sampling (All Samples)","stall_long_sb"\n'
                    '"0x10","LDG.E.128 R4, [R2.64]","10","0"\n'
                    '"0x20","@!P0 FFMA R1, R4, R5, R6","60","55"\n'
                    '"0x30","MUFU.EX2 R7, R1","30","0"\n')
    script = os.path.join(ROOT, "benchmarks", "ncu_sass_top.py")
    out = subprocess.run([sys.executable, script, str(path), "--top", "2", "--window", "1"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "3 instructions, 100 samples" in out.stdout
    assert "| float arithmetic | 60.0% |" in out.stdout and "| memory: global | 10.0% |" in out.stdout
    lines = out.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "60.0%  0x20" in line)
    assert "stall_long_sb 55" in lines[first] and "LDG.E.128" in lines[first + 1]
    assert " 30.0%  0x30  MUFU.EX2" in out.stdout
    path.write_text('"Address","Source","Instructions Executed"\n"0x10","NOP","1"\n')
    bad = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no stall-sampling column" in bad.stderr


@pytest.mark.parametrize("workload", ["kd", "kd_persistent", "optim", "optim_flat", "sparse", "sparse_tc_split"])
def test_gpu_profile_target_runs(workload):
    # gpu_check.sh ends with Nsight Compute over benchmarks/gpu_profile_target.py: its calls at small
    # shapes on the CPU, so that a GPU session's minutes are not spent on a broken script.
    script = os.path.join(ROOT, "benchmarks", "gpu_profile_target.py")
    out = subprocess.run([sys.executable, script, workload, "--smoke"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"gpu_profile_target.py {workload}: done" in out.stdout
    bad = subprocess.run([sys.executable, script, "nope"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "usage: gpu_profile_target.py {kd,kd_persistent,optim,optim_flat,sparse,sparse_tc_split}" in bad.stderr


def test_optim_roofline_kernels_compute_their_mix():
    # benchmarks/optim_gpu_roofline.py's Triton kernels, run by Triton's interpreter on the CPU: the
    # 5-read / 3-write kernel must read and write every stream (values checked against torch).
    # Triton 3.0's interpreter (torch 2.4's) refuses these kernels (tl.arange of a constexpr block).
    pytest.importorskip("triton", minversion="3.2")
    fault = triton_interpreter_fault()
    if fault:
        pytest.skip(fault)
    code = """
import sys, torch
sys.path.insert(0, "benchmarks")
import optim_gpu_roofline as r
triton, k5, k3 = r.triton_kernels()
n = 5000
t = {k: torch.randn(n) for k in "pgmva"}
t["v"].abs_()
ref = {k: v.clone() for k, v in t.items()}
k5[(triton.cdiv(n, 2048),)](t["p"], t["g"], t["m"], t["v"], t["a"], n, BLOCK=2048)
m = 0.9 * ref["m"] + 0.1 * ref["g"]
v = 0.999 * ref["v"] + 0.001 * ref["g"] ** 2
p = ref["p"] - 1e-3 * (m / (v.sqrt() + 1e-8) + 1e-2 * (ref["p"] - ref["a"]))
assert torch.allclose(t["m"], m) and torch.allclose(t["v"], v) and torch.allclose(t["p"], p, atol=1e-6)
b = 0.9 * t["m"] + t["g"]
p2 = t["p"] - 1e-3 * b
k3[(triton.cdiv(n, 2048),)](t["p"], t["g"], t["m"], n, BLOCK=2048)
assert torch.allclose(t["m"], b) and torch.allclose(t["p"], p2, atol=1e-6)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_prune_gpu_quick_check_runs(tmp_path):
    # gpu_check.sh runs benchmarks/prune_gpu_quick_check.py right after the build: the whole script
    # on the CPU (the op's CPU kernel; timings meaningless), small, so that it cannot crash there.
    script = os.path.join(ROOT, "benchmarks", "prune_gpu_quick_check.py")
    out = subprocess.run([sys.executable, script, "--device", "cpu", "--size", "64", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "correctness: all OK" in out.stdout and "FAIL" not in out.stdout
    (md,) = glob.glob(str(tmp_path / "prune-tc-quick-*.md"))
    text = open(md).read()
    assert text.count("| float16 | 256 |") == 5 and "dvalues ours (SDDMM)" in text


def test_compile_noise_is_muted_only_while_compiling():
    import logging

    from pyfinetune.benchmarks import common

    loggers = [logging.getLogger(name) for name in common._COMPILE_NOISE]
    before = [lg.level for lg in loggers]
    with common.quiet_compile_logs():
        assert all(lg.level == logging.ERROR for lg in loggers)
    assert [lg.level for lg in loggers] == before


def test_optimizer_record_names_the_prefetch_setting(monkeypatch):
    # The CPU records say whether our kernels prefetched (it moves the CPU results by 7-19%).
    from pyfinetune.benchmarks import optim as bench_optim

    for value, expected in (("0", "off"), ("1", "on")):
        monkeypatch.setenv("PYFINETUNE_CPU_PREFETCH", value)
        assert bench_optim.cpu_prefetch_setting() == expected
    monkeypatch.setenv("PYFINETUNE_CPU_PREFETCH", "sometimes")
    assert bench_optim.cpu_prefetch_setting().startswith("unknown (ValueError")


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be >= 1, got 0"),  # was torch's RuntimeError
    (["--threads", "1000000000"], "--threads must be at most"),  # was a segmentation fault of the thread pool
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),  # was accepted
    (["--attempts", "0"], "--attempts must be >= 1, got 0"),  # measured nothing, then a TypeError
    (["--out", "FILE"], "cannot be created (FileExistsError"),  # a traceback after the whole run
])
def test_run_options_are_checked_before_timing(argv, message, tmp_path, capsys):
    import argparse

    from pyfinetune.benchmarks import common

    blocker = tmp_path / "file"
    blocker.write_text("x")
    ap = argparse.ArgumentParser(prog="bench_x")
    common.add_run_options(ap, default_reps=20)
    args = ap.parse_args([str(blocker) if a == "FILE" else a for a in argv]
                         + ([] if "--out" in argv else ["--out", str(tmp_path / "out")]))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as e:
            common.resolve_run_options(ap, args, default_reps=20)
    finally:
        torch.set_num_threads(threads)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("argv, message", [
    (["--reps", "5"], "--reps must be >= 10, got 5"),  # was time_interleaved's ValueError, mid-run
    (["--linear-chunks", "0"], "--linear-chunks must be positive"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),  # was torch.device's RuntimeError
    (["--out", "FILE"], "cannot be created (FileExistsError"),  # was a traceback after the timing
])
def test_kd_benchmark_options_are_checked_before_timing(argv, message, tmp_path, capsys, monkeypatch):
    from pyfinetune.benchmarks import distill

    monkeypatch.setattr(distill, "run", lambda args: pytest.fail("timing started"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        distill.main([str(blocker) if a == "FILE" else a for a in argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_kd_benchmark_record_names_what_ran(tmp_path, monkeypatch):
    # The record held the machine and the cases' timings only: not the rounds, --quick or the cases.
    from pyfinetune.benchmarks import distill

    # torch.compile's contender would take most of a minute to compile here: the record is the point.
    monkeypatch.setattr(distill, "KD_FNS", {k: v for k, v in distill.KD_FNS.items() if k != distill.COMPILED})
    monkeypatch.setattr(distill.common, "wait_for_quiet", lambda **kw: True)  # up to a minute on a busy machine
    assert distill.main(["--quick", "--case", "kd", "--reps", "10", "--no-memory", "--no-rivals",
                         "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("kd-cpu-*.json")).read_text())
    assert record["benchmark"] == "kd" and record["device"] == "cpu" and record["when"]
    assert record["config"] == {"reps": 10, "quick": True, "cases": [["kd", "64", "5000", "torch.float32"]],
                                "linear_chunks": None, "rivals": False, "memory": False}
    assert record["machine"]["git"]["commit"] and len(record["cases"]) == 1


def test_gpu_check_gate_selections_name_existing_tests():
    # gpu_check.sh runs the tests that gate GPU_PLAN.md's decisions first, by file and -k: a renamed
    # test or file would make a gate select nothing, and a short GPU session would not notice. Each
    # named file must contribute tests (collected here; they skip without a GPU).
    import re
    import shlex

    with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")) as f:
        script = f.read().replace("\\\n", " ")
    commands = [line for line in script.splitlines() if "tests_gates" in line and "pytest" in line]
    assert len(commands) == 3, commands
    for line in commands:
        words = shlex.split(line[line.index("-m pytest") + len("-m pytest"):].split("||")[0])
        files = [w for w in words if re.fullmatch(r"tests/test_\w+\.py", w)]
        assert files, line
        select = ["-k", words[words.index("-k") + 1]] if "-k" in words else []
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "-m", "cuda", *select, *files], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        for name in files:
            assert any(l.startswith(name + "::") for l in out.stdout.splitlines()), (name, select, out.stdout[-2000:])


def test_semi_structured_bench_takes_the_users_shapes(capsys):
    # bench_semi_structured.py --shape ROWS OUT IN times the user's own product (2:4 pays off for
    # large row counts only); a non-positive size is refused before anything runs, on any machine.
    from pyfinetune.benchmarks import semi_structured

    assert semi_structured.DEFAULT_SHAPES == ((8192, 8192, 8192), (2048, 8192, 8192))
    with pytest.raises(SystemExit) as e:
        semi_structured.main(["--shape", "0", "4096", "4096", "--no-write"])
    assert e.value.code == 2
    assert "--shape: ROWS, OUT and IN must be positive, got 0 4096 4096" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        semi_structured.main(["--shape", "512", "4096", "--no-write"])  # three numbers or none


@pytest.mark.parametrize("args, message", [
    ([], "usage: bash benchmarks/gpu_rerun.sh OUT_DIR SECONDS pytest-arguments..."),
    (["OUT", "90s", "tests"], "SECONDS must be a whole number of seconds, got '90s'"),
])
def test_gpu_rerun_script_refuses_bad_arguments_before_building(tmp_path, args, message):
    # benchmarks/gpu_rerun.sh (a GPU session's targeted rerun) says what is wrong before it builds:
    # a usage error must not cost device time.
    args = [str(tmp_path / a) if a == "OUT" else a for a in args]
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_rerun.sh"), *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr, (out.returncode, out.stderr)
    assert not (tmp_path / "OUT" / "build.log").exists()


def test_prune_sampled_grad_runs(tmp_path):
    # benchmarks/prune_sampled_grad.py (the crossover behind masked_matmul's CPU weight-gradient
    # default) at small sizes: both paths run, agree, keep the pruned positions at 0, and the
    # default's times are recorded.
    script = os.path.join(ROOT, "benchmarks", "prune_sampled_grad.py")
    out = subprocess.run([sys.executable, script, "--rows", "3", "40", "--sparsity", "0.5", "0.95", "--features", "64",
                          "--reps", "1", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (js,) = glob.glob(str(tmp_path / "prune-sampled-grad-cpu-*.json"))
    record = json.load(open(js))
    assert [(c["rows"], c["sparsity"]) for c in record["cases"]] == [(3, 0.5), (3, 0.95), (40, 0.5), (40, 0.95)]
    for case in record["cases"]:
        assert case["pruned_zero"] and case["max_rel_diff"] < 1e-5
        assert all(len(case["times_ms"][p]) == 1 for p in ("dense", "sampled", "auto"))
    assert "| rows N | sparsity | dense ms | sampled ms |" in open(glob.glob(str(tmp_path / "*.md"))[0]).read()


def test_kd_precision_runs(tmp_path):
    # benchmarks/kd_precision.py (the README's numbers for kd_loss at high temperature): its rows,
    # and ours within the bound the kd tests hold at T = 100 (float32 vs float64 inputs).
    script = os.path.join(ROOT, "benchmarks", "kd_precision.py")
    out = subprocess.run([sys.executable, script, "--temperatures", "4", "100", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (js,) = glob.glob(str(tmp_path / "kd-precision-cpu-*.json"))
    rows = json.load(open(js))["rows"]
    assert [(r["divergence"], r["temperature"]) for r in rows] == [
        ("forward_kl", 4.0), ("forward_kl", 100.0), ("reverse_kl", 4.0), ("reverse_kl", 100.0)]
    assert all(r["ours"] < 1e-3 for r in rows)
    assert all(r["torch_float32"] > r["ours"] for r in rows if r["temperature"] == 100.0)
