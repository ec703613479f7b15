"""Shared fixtures and helpers of the pyfinetune test suite.

* ``DEVICES``: "cpu", plus "cuda" when a GPU is visible; tests parametrized over ``device_dtype``
  run on every device. ``@pytest.mark.cuda`` tests are skipped without a GPU.
* a fresh random seed per test (autouse), shown in the failure report; rerun a failure with
  ``PYFINETUNE_SEED=<base seed> pytest <test id>``.
* ``TOL``: the tolerance table, one entry per parameter dtype, used by every numeric comparison.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import sys
import zlib

import pytest
import torch

# Make `import pyfinetune` resolve to this checkout (the in-place build), not an installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

# The tests check kernel="auto" against the documented crossovers: a user's setting of them
# (`pyfinetune calibrate` suggests exporting one) must not leak in.
os.environ.pop("PYFINETUNE_SPARSE_CROSSOVER", None)
import pyfinetune  # noqa: E402,F401
import pyfinetune.optim  # noqa: E402,F401

# torch.compile / opcheck of the optimizer ops (custom ops that mutate lists of tensors) need
# torch's auto-functionalization of them (torch 2.6; not torch 2.4, where our steps run eagerly
# inside compiled functions: pyfinetune.optim.COMPILE_TRACES_STEP).
needs_compiled_step = pytest.mark.skipif(
    not pyfinetune.optim.COMPILE_TRACES_STEP,
    reason=f"torch {torch.__version__} cannot put the optimizer ops (custom ops that mutate lists of tensors) "
           "into a compiled graph: the step runs eagerly there")

@functools.lru_cache(maxsize=None)
def hf_unusable() -> str:
    """Why ``pyfinetune.integrations.hf`` cannot be used here ("" when it can): transformers is not
    installed, or it cannot use this torch (transformers 5 imports under torch < 2.6, then refuses
    every model; the hf module says so at import). Imports transformers only when first asked."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    try:
        import pyfinetune.integrations.hf  # noqa: F401
    except ImportError as e:
        return str(e).strip() or type(e).__name__
    return ""


HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_DTYPES = (torch.bfloat16, torch.float16)

# Tolerances of the parameters, per dtype, in one place. Why these values:
# * float64: the kernel does double math; only the order of the operations differs from torch or
#   from the reference (FMA contraction, lerp vs multiply-add): a few ulps (2.2e-16) per step,
#   which stay below 1e-13 relative over 100 steps (1e-12 is ~15x the largest we observe).
# * float32: float math (ulp 1.2e-7) against torch's float math or the float64 reference: a few
#   ulps per step add up over the steps, and Adam's m / sqrt(v) or SGD's momentum (buffers up to
#   10x the gradient) amplify them. rtol 4e-5 / atol 1e-5 is ~10x the largest error we observe
#   after 100 steps; atol covers entries that pass near zero.
# * bfloat16 / float16: math and state are float32, only the stored parameter is rounded. A
#   float32 difference of 1e-7 can flip that rounding, so the two sides may differ by one ulp
#   of the low dtype, at most 2^-7 (bf16) / 2^-10 (fp16) of the value. Such a flipped entry then
#   stays apart (and its ulp can grow relative to a shrinking value), so the low-dtype tests
#   compare after every step and then copy our parameter into the other side: the bound is one
#   ulp per step, not a drift. atol covers results near zero, where float32 cancellation of
#   O(1) terms leaves an absolute error of a few float32 ulps of O(1) (~1e-7), more than one
#   low-dtype ulp of the tiny result; 1e-6 is still ~1000x below a bf16 ulp of our values (~0.3).
# The optimizer state of a bf16/fp16 parameter is float32: use ``state_tol``.
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=4e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-6),
    torch.float16: dict(rtol=2.0**-10, atol=1e-6),
}


def tol(dtype: torch.dtype) -> dict:
    """Tolerances (rtol, atol) for results stored in ``dtype``; see ``TOL``."""
    return TOL[dtype]


def state_tol(param_dtype: torch.dtype) -> dict:
    """Tolerances of the optimizer state of a ``param_dtype`` parameter: the state is float32
    (float64 for float64 parameters), computed in float32 from the same parameter values."""
    return TOL[torch.float64 if param_dtype == torch.float64 else torch.float32]


def assert_close(actual, expected, dtype, msg=""):
    """``torch.testing.assert_close`` with the tolerance of ``dtype``, comparing in float64."""
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), **TOL[dtype],
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


def device_dtype_params(dtypes=DTYPES, devices=None):
    """``pytest.param((device, dtype))`` for each device and dtype; cuda cases carry the cuda mark."""
    out = []
    for device in devices or DEVICES:
        for dtype in dtypes:
            marks = [pytest.mark.cuda] if device == "cuda" else []
            out.append(pytest.param(device, dtype, marks=marks, id=f"{device}-{str(dtype).replace('torch.', '')}"))
    return out


def device_params(devices=None):
    return [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else [], id=d) for d in devices or DEVICES]


# --------------------------------------------------------------------------------------- seeds
_ENV_SEED = os.environ.get("PYFINETUNE_SEED")
BASE_SEED = int(_ENV_SEED) if _ENV_SEED else random.SystemRandom().randrange(2**31)


def pytest_report_header(config):
    return f"pyfinetune: {pyfinetune.__file__}; devices {DEVICES}; PYFINETUNE_SEED={BASE_SEED}"


@pytest.fixture(autouse=True)
def seed(request):
    """Seed torch and random with a per-test seed derived from the session's base seed and the
    test id, so a failure is reproduced by rerunning that test with ``PYFINETUNE_SEED``."""
    s = (BASE_SEED ^ zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(s)
    random.seed(s)
    request.node.add_report_section(
        "setup", "seed", f"test seed {s}; reproduce with PYFINETUNE_SEED={BASE_SEED} pytest '{request.node.nodeid}'")
    return s


# ---------------------------------------------------------------------------------- cuda mark
def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------------- helpers
def snapshot(opt) -> dict:
    """Deep copy of every parameter and every tensor of the optimizer state, keyed by position."""
    out = {}
    for gi, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            out[(gi, j, "param")] = p.detach().clone()
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[(gi, j, k)] = v.detach().clone()
    return out


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """Two snapshots hold the same keys and bit-identical tensors (NaN equal to NaN)."""
    assert a.keys() == b.keys(), (sorted(map(str, a.keys())), sorted(map(str, b.keys())))
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride(), k
        assert torch.equal(bits(x), bits(y)), f"{k} differs"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so -0.0 != 0.0 and NaN == NaN compare as bits)."""
    t = t.detach().reshape(-1).contiguous()
    return t if t.dtype == torch.bool else t.view(torch.uint8)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one CPU thread: tiny models train fastest that way, and on a busy
    machine the wake-ups of a second thread can cost more than a whole training step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same_layout_input(s: torch.Tensor) -> torch.Tensor:
    """A copy of s that autograd differentiates, with s's strides and storage offset (so its rows
    keep their stride and their 16-byte alignment): a view of a fresh leaf (take its gradient with
    ``torch.autograd.grad`` or ``retain_grad()``). ``s.detach().clone()`` hands the op a compact,
    aligned tensor instead of a sliced one a test built (clone keeps strides only when s is dense)."""
    extent = s.storage_offset() + sum((n - 1) * st for n, st in zip(s.shape, s.stride())) + 1 if s.numel() else 0
    base = torch.zeros(max(extent, 1), dtype=s.dtype, device=s.device)
    base.as_strided(s.shape, s.stride(), s.storage_offset()).copy_(s.detach())
    base.requires_grad_(True)
    x = base.as_strided(s.shape, s.stride(), s.storage_offset())
    assert x.stride() == s.stride() and x.data_ptr() % 16 == s.data_ptr() % 16
    return x


# CUDA graph capture needs the caching allocator: with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (set by
# benchmarks/gpu_check.sh for compute-sanitizer, which then sees every allocation) an allocation inside
# a capture is a cudaMalloc, which the capture refuses (cudaErrorStreamCaptureUnsupported).
needs_caching_allocator = pytest.mark.skipif(
    "PYTORCH_NO_CUDA_MEMORY_CACHING" in os.environ,  # some torch releases read any value as set
    reason="CUDA graph capture needs the caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING is set)",
)


def cuda_kernel_names(fn, containing: str):
    """The names of the CUDA kernels fn() launched whose name contains ``containing`` (profiler), or
    None where the profiler saw no such kernel (no CUPTI, or under compute-sanitizer, which
    gpu_check.sh runs the CUDA tests under too): which kernel ran, where the numbers cannot tell."""
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except (RuntimeError, AssertionError):  # a profiler that cannot trace CUDA here
        return None
    names = {e.name for e in prof.events() if containing in e.name}
    return names or None


def cuda_kernel_grids(fn, containing: str):
    """The grid sizes (x, y, z) of the CUDA kernels fn() launched whose name contains ``containing``,
    from the profiler's trace, or None where it recorded none (see cuda_kernel_names)."""
    import json
    import tempfile

    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                trace = json.load(f)
    except (RuntimeError, AssertionError, OSError, ValueError):
        return None
    grids = [tuple(e["args"]["grid"]) for e in trace.get("traceEvents", [])
             if e.get("cat") == "kernel" and containing in e.get("name", "") and "grid" in e.get("args", {})]
    return grids or None
