"""SemiStructuredLinear (2:4 sparse tensor cores) and sparsify(layout="2:4").

The layer runs only on CUDA GPUs of compute capability >= 8.0; the checks of its arguments run
everywhere.
"""

import pytest
import torch
from torch import nn

from pyfinetune import prune
from pyfinetune._semi_structured import SemiStructuredLinear, check_two_four

HAS_SPARSE_TC = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def needs_sparse_tc(fn):
    """A GPU test: the cuda mark (which the GPU check selects with -m cuda) and a skip without sm80+."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_SPARSE_TC,
                                               reason="needs a CUDA GPU with compute capability >= 8.0")(fn))


def two_four_mask(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(out_f, in_f // 4, 4, generator=g)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, scores.topk(2, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)


def test_two_four_check_accepts_and_refuses():
    check_two_four(two_four_mask(8, 16))
    bad = two_four_mask(8, 16)
    bad[3, 4:8] = True
    with pytest.raises(ValueError, match=r"row 3, inputs 4\.\.7 keep 4 of 4"):
        check_two_four(bad)
    with pytest.raises(ValueError, match="divisible by 4"):
        check_two_four(torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        check_two_four(torch.ones(4, 8))


def test_from_dense_argument_errors_on_cpu():
    w = torch.randn(64, 64, dtype=torch.float16)
    m = two_four_mask(64, 64)
    with pytest.raises(ValueError, match="CUDA device"):
        SemiStructuredLinear.from_dense(w, m)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        SemiStructuredLinear.from_dense(w.float(), m)
    with pytest.raises(ValueError, match="shape of weight"):
        SemiStructuredLinear.from_dense(w, m[:32])
    with pytest.raises(ValueError, match="bias"):
        SemiStructuredLinear.from_dense(w, m, torch.zeros(3, dtype=torch.float16))


def test_sparsify_unknown_layout():
    model = nn.Sequential(nn.Linear(8, 8))
    prune.magnitude_prune(model, 0.5, exclude=None)
    with pytest.raises(ValueError, match="layout"):
        prune.sparsify(model, layout="bsr")


@needs_sparse_tc
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_masked_dense_product(dtype, bias):
    torch.manual_seed(0)
    w = torch.randn(128, 256, device="cuda", dtype=dtype)
    m = two_four_mask(128, 256, seed=1).cuda()
    b = torch.randn(128, device="cuda", dtype=dtype) if bias else None
    layer = SemiStructuredLinear.from_dense(w, m, b)
    x = torch.randn(3, 64, 256, device="cuda", dtype=dtype)
    ref = (x.double() @ torch.where(m, w, 0).double().t() + (b.double() if bias else 0))
    out = layer(x)
    assert out.shape == (3, 64, 128) and out.dtype == dtype
    # float32 accumulation, one rounding to 16 bits: 2^-7 (bf16) / 2^-10 (fp16) relative, sqrt(K) scaled.
    eps = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    err = (out.double() - ref).abs()
    assert bool((err <= eps * ref.abs() + eps * 256 ** 0.5).all()), err.max()
    torch.testing.assert_close(layer.to_dense(), torch.where(m, w, 0))


@needs_sparse_tc
def test_sparsify_two_four_model_and_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 128)).cuda().half()
    prune.magnitude_prune(model, 0.5, pattern="2:4", exclude=None)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    ref = model(x)
    prune.sparsify(model, layout="2:4")
    assert isinstance(model[0], SemiStructuredLinear) and isinstance(model[2], SemiStructuredLinear)
    torch.testing.assert_close(model(x), ref, rtol=2e-2, atol=2e-2)
    prune.densify(model, keep_masks=False)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), ref, rtol=2e-2, atol=2e-2)


@needs_sparse_tc
def test_gradient_reaches_input_and_bias_not_weight():
    w = torch.randn(128, 128, device="cuda", dtype=torch.float16)
    layer = SemiStructuredLinear.from_dense(w, two_four_mask(128, 128).cuda(), torch.zeros(128, device="cuda",
                                                                                         dtype=torch.float16))
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16, requires_grad=True)
    layer(x).float().sum().backward()
    assert x.grad is not None and layer.bias.grad is not None
    assert not layer.weight.requires_grad


class _FakeProduct:
    """A product with algorithm ids 0 .. n_ids - 1 (a higher one is refused as cuSPARSELt refuses
    it) and a cost per id, for the search of SemiStructuredLinear.tune without a GPU."""

    def __init__(self, cost, n_ids=None, fail=None):
        self.alg = 7  # set before the search
        self.cost = cost
        self.n_ids = len(cost) if n_ids is None else n_ids
        self.fail = fail or {}  # id -> exception its run raises
        self.timed = []  # the id of every timed sample, in order

    def set_alg(self, alg):
        self.alg = alg

    def run(self):
        if self.alg in self.fail:
            raise self.fail[self.alg]
        if self.alg >= self.n_ids:
            raise RuntimeError("CUDA error: CUSPARSE_STATUS_INVALID_VALUE when calling "
                               "`cusparseLtMatmulAlgSetAttribute(...)`")

    def time_sample(self, fn, calls):
        fn()
        self.timed.append(self.alg)
        return self.cost[self.alg]

    def pick(self, **kw):
        from pyfinetune._semi_structured import _pick_fastest

        args = dict(max_ids=64, reps=4, warmup=1)
        args.update(kw)
        return _pick_fastest(self.set_alg, lambda: self.alg, self.run, self.time_sample, **args)


def test_pick_fastest_times_each_algorithm_until_one_is_refused():
    # The search of SemiStructuredLinear.tune: ids 0..3 exist (id 4 is refused), id 2 is the
    # fastest and is left set; the ids are timed in interleaved rounds (one sizing sample of id 0
    # first).
    p = _FakeProduct({0: 3.0, 1: 2.5, 2: 1.0, 3: 4.0})
    assert p.pick() == {"alg_id": 2, "ms": p.cost} and p.alg == 2
    assert p.timed == [0] + [0, 1, 2, 3] + [1, 2, 3, 0] + [2, 3, 0, 1] + [3, 0, 1, 2]  # rotated rounds
    # A cap on the ids tried.
    p = _FakeProduct({0: 1.0, 1: 1.0, 2: 1.0}, n_ids=10)
    assert p.pick(max_ids=3) == {"alg_id": 0, "ms": {0: 1.0, 1: 1.0, 2: 1.0}}


def test_pick_fastest_keeps_the_default_within_the_margin():
    # 2% faster is within timing noise: PyTorch's default stays; 4% faster replaces it.
    p = _FakeProduct({0: 1.0, 1: 0.98})
    assert p.pick()["alg_id"] == 0 and p.alg == 0
    p = _FakeProduct({0: 1.0, 1: 0.96})
    assert p.pick()["alg_id"] == 1 and p.alg == 1


def test_pick_fastest_errors_propagate_and_restore_the_algorithm():
    # The default id failing is an error, not a silent choice; so is any error other than
    # cuSPARSELt refusing an id (out of memory, another RuntimeError), which must not end the
    # search as if the ids were exhausted; the id set before stays set.
    cases = [({0: RuntimeError("INVALID")}, RuntimeError, "INVALID"),
             ({2: torch.cuda.OutOfMemoryError("CUDA out of memory (cusparseLt workspace)")}, torch.cuda.OutOfMemoryError,
              "out of memory"),
             ({1: RuntimeError("an illegal memory access was encountered")}, RuntimeError, "illegal memory")]
    for fail, exc, match in cases:
        p = _FakeProduct({0: 2.0, 1: 1.0, 2: 1.0, 3: 1.0}, fail=fail)
        with pytest.raises(exc, match=match):
            p.pick()
        assert p.alg == 7


def _cpu_semi_structured_weight(out_f, in_f, alg=0, device="cpu"):
    """A cuSPARSELt semi-structured tensor built by hand on the CPU (the layer's state, not its
    product, which needs a GPU), or a skip where this torch cannot."""
    try:
        packed = torch.randn(out_f * in_f // 2 + out_f * in_f // 8, dtype=torch.float16).to(device)
        w = torch.sparse.SparseSemiStructuredTensorCUSPARSELT(
            torch.Size([out_f, in_f]), packed=packed, meta=None, packed_t=None, meta_t=None,
            compressed_swizzled_bitmask=None)
    except Exception as e:  # noqa: BLE001 (any failure: this torch builds it otherwise)
        pytest.skip(f"cannot build a semi-structured tensor on the CPU with this torch: {e}")
    w.alg_id_cusparselt = alg
    return w


def test_state_dict_loads_into_a_layer():
    # PyTorch's semi-structured tensors have no copy_: load_state_dict replaces the weight (keeping
    # its algorithm choice) and refuses a weight that is not one of this layer's shape and dtype.
    # torch 2.4's detach (in nn.Parameter and state_dict()) dropped the algorithm id: kept by hand.
    src = SemiStructuredLinear(_cpu_semi_structured_weight(64, 128, alg=5), torch.randn(64, dtype=torch.float16),
                               128, 64)
    dst = SemiStructuredLinear(_cpu_semi_structured_weight(64, 128), torch.zeros(64, dtype=torch.float16), 128, 64)
    dst.load_state_dict(src.state_dict())
    assert dst.weight.alg_id_cusparselt == 5 and isinstance(dst.weight, nn.Parameter)
    assert not dst.weight.requires_grad
    assert torch.equal(dst.weight.packed, src.weight.packed) and torch.equal(dst.bias, src.bias)
    other = SemiStructuredLinear(_cpu_semi_structured_weight(64, 64), None, 64, 64)
    with pytest.raises(RuntimeError, match=r"weight must be a 2:4 semi-structured sparse tensor torch.float16 of "
                                           r"shape \(64, 128\)"):
        dst.load_state_dict(other.state_dict(), strict=False)
    with pytest.raises(RuntimeError, match="for a dense weight use from_dense"):
        dst.load_state_dict({"weight": torch.zeros(64, 128, dtype=torch.float16), "bias": dst.bias.detach()})
    with pytest.raises(RuntimeError, match="Missing key"):
        dst.load_state_dict({"bias": dst.bias.detach()})
    # A weight on another device (a checkpoint loaded elsewhere) is refused, not installed beside a
    # bias on this one; the bias and unexpected keys are still torch's business.
    elsewhere = {"weight": _cpu_semi_structured_weight(64, 128, device="meta"), "bias": torch.ones(64, dtype=torch.float16),
                 "junk": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"(?s)Unexpected key.*junk.*on cpu \(as state_dict\(\) gives.*got .* on meta"):
        dst.load_state_dict(elsewhere)
    assert dst.weight.device.type == "cpu" and list(dst.state_dict()) == ["weight", "bias"]
    # Load pre-hooks see the whole state dict, the weight included (a hook may convert it).
    seen = []
    handle = dst._register_load_state_dict_pre_hook(lambda sd, prefix, *args: seen.append(sorted(sd)))
    dst.load_state_dict(src.state_dict())
    handle.remove()
    assert seen == [["bias", "weight"]]


@needs_sparse_tc
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tune_keeps_the_product_and_its_choice(dtype):
    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=dtype)
    m = two_four_mask(256, 512, seed=2).cuda()
    layer = SemiStructuredLinear.from_dense(w, m, torch.randn(256, device="cuda", dtype=dtype))
    x = torch.randn(128, 512, device="cuda", dtype=dtype)
    before = layer(x)
    result = layer.tune(128, reps=2, warmup=1)
    if result["alg_id"] is None:  # the CUTLASS backend: nothing to choose
        assert result["ms"] == {} and result["backend"] != "cusparselt"
        return
    assert result["backend"] == "cusparselt" and 0 in result["ms"]
    ms, alg = result["ms"], result["alg_id"]
    assert alg == 0 or (ms[alg] == min(ms.values()) and ms[alg] < 0.97 * ms[0]), result
    assert layer.weight.alg_id_cusparselt == alg
    # Another algorithm: the same product up to the order of float32 sums.
    torch.testing.assert_close(layer(x), before, rtol=2 ** -7, atol=1e-2)
    # Other batch sizes run with the tuned id too, and to_dense (a product of its own).
    for rows in (1, 300):
        xr = torch.randn(rows, 512, device="cuda", dtype=dtype)
        torch.testing.assert_close(layer(xr), xr @ (w * m).t() + layer.bias, rtol=2e-2, atol=2e-2)
    assert torch.equal(layer.to_dense(), torch.where(m, w, 0)) and layer.weight.alg_id_cusparselt == alg
    # The choice travels with the state dict (load_state_dict replaces the weight: no copy_).
    other = SemiStructuredLinear.from_dense(torch.randn(256, 512, device="cuda", dtype=dtype), m)
    other.bias = nn.Parameter(torch.zeros(256, device="cuda", dtype=dtype))
    other.load_state_dict(layer.state_dict())
    assert other.weight.alg_id_cusparselt == alg and torch.equal(other(x), layer(x))
    with pytest.raises(ValueError, match="rows must be a positive int"):
        layer.tune(0)
    with pytest.raises(ValueError, match="reps must be a positive int"):
        layer.tune(8, reps=0)


@pytest.mark.parametrize("layout, tune_rows, match", [
    ("2:4", 0, "tune_rows must be None or a positive int, got 0"),
    ("2:4", 2.5, "tune_rows must be None or a positive int, got 2.5"),
    ("2:4", True, "tune_rows must be None or a positive int, got True"),
    ("csr", 64, 'tune_rows applies to layout="2:4"'),
])
def test_sparsify_tune_rows_is_checked_before_any_replacement(layout, tune_rows, match):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    prune.magnitude_prune(model, 0.5, exclude=None)
    with pytest.raises(ValueError, match=match):
        prune.sparsify(model, layout=layout, tune_rows=tune_rows)
    assert all(isinstance(m, prune.MaskedLinear) for m in model)  # nothing replaced


@needs_sparse_tc
def test_sparsify_tunes_each_layer(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 128)).cuda().half()
    prune.magnitude_prune(model, 0.5, pattern="2:4", exclude=None)
    x = torch.randn(96, 256, device="cuda", dtype=torch.float16)
    ref = model(x)
    calls = []
    original = SemiStructuredLinear.tune

    def spy(self, rows, **kw):
        # The real search, then a known nonzero id where there is one, so that sharing the choice
        # shows even when the search keeps id 0 (its 3% margin makes that likely).
        calls.append(rows)
        result = original(self, rows, **kw)
        others = [a for a in result["ms"] if a != 0]
        if others:
            self.weight.alg_id_cusparselt = others[0]
            result = {**result, "alg_id": others[0]}
        return result

    monkeypatch.setattr(SemiStructuredLinear, "tune", spy)
    prune.sparsify(model, layout="2:4", tune_rows=96)
    assert calls == [96, 96]  # the two 128 x 128 layers: one timing, one choice
    assert model[2].weight.alg_id_cusparselt == model[4].weight.alg_id_cusparselt
    torch.testing.assert_close(model(x), ref, rtol=2e-2, atol=2e-2)


# The torchao rival of bench_semi_structured (``torchao.sparsity.sparsify_`` with its 2:4 config).

def test_torchao_rival_reports_a_missing_torchao(monkeypatch):
    from pyfinetune.benchmarks.semi_structured import torchao_two_four

    monkeypatch.setitem(__import__("sys").modules, "torchao.sparsity", None)  # import refused
    layer, why = torchao_two_four(torch.randn(8, 16), None)
    assert layer is None and why.startswith("torchao not importable (ModuleNotFoundError"), why


def _torchao_import_fault():
    """None when torchao.sparsity imports; skips without torchao; else the exception of a torchao
    that fails at import (one built for another torch: 0.18 asks torch 2.5 for torch.int1 and
    torch 2.8 for torch.nn.functional.ScalingType)."""
    try:
        import torchao.sparsity  # noqa: F401
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "torchao":
            return e
        pytest.skip("torchao is not installed")
    except Exception as e:
        return e
    return None


def test_torchao_rival_reports_a_refusal():
    from pyfinetune.benchmarks.semi_structured import torchao_two_four

    fault = _torchao_import_fault()
    if fault is not None:  # the rival reports the broken torchao, not a crash of the benchmark
        layer, why = torchao_two_four(torch.randn(8, 16), torch.randn(8))
        assert layer is None and why.startswith(f"torchao not importable ({type(fault).__name__}: "), why
        return
    if HAS_SPARSE_TC:
        pytest.skip("torchao's 2:4 refuses only tensors off a sparse-tensor-core GPU")
    layer, why = torchao_two_four(torch.randn(8, 16), torch.randn(8))
    assert layer is None and why.startswith("torchao sparsify_ failed ("), why


@needs_sparse_tc
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torchao_rival_computes_the_same_product(dtype):
    fault = _torchao_import_fault()
    if fault is not None:
        pytest.skip(f"torchao cannot be imported: {fault!r}")
    from pyfinetune.benchmarks.semi_structured import torchao_two_four

    torch.manual_seed(0)
    w = torch.randn(256, 512, device="cuda", dtype=dtype)
    w = torch.where(two_four_mask(256, 512, seed=3).cuda(), w, torch.zeros((), device="cuda", dtype=dtype))
    b = torch.randn(256, device="cuda", dtype=dtype)
    layer, why = torchao_two_four(w, b)
    assert why is None and layer is not None, why
    x = torch.randn(64, 512, device="cuda", dtype=dtype)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
        torch.testing.assert_close(layer(x).double(), ref, rtol=2 ** -7, atol=2e-2)
