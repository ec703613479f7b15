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
needs_sparse_tc = pytest.mark.skipif(not HAS_SPARSE_TC, reason="needs a CUDA GPU with compute capability >= 8.0")


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
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).cuda().half()
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


def test_pick_fastest_times_each_algorithm_until_one_is_refused():
    # The search of SemiStructuredLinear.tune, with a fake product: ids 0..3 exist (id 4 raises, as
    # cuSPARSELt refuses an id past its last), id 2 is the fastest and is left set.
    from pyfinetune._semi_structured import _pick_fastest

    current = {"alg": None}
    seen = []

    def set_alg(a):
        current["alg"] = a

    def run():
        if current["alg"] >= 4:
            raise RuntimeError("CUSPARSE_STATUS_INVALID_VALUE")
        seen.append(current["alg"])

    cost = {0: 3.0, 1: 2.5, 2: 1.0, 3: 4.0}
    result = _pick_fastest(set_alg, run, lambda fn: (fn(), cost[current["alg"]])[1])
    assert result == {"alg_id": 2, "ms": cost} and current["alg"] == 2 and seen == [0, 1, 2, 3]
    # The default id itself failing is an error, not a silent choice.
    current["alg"] = None
    with pytest.raises(RuntimeError, match="INVALID"):
        _pick_fastest(set_alg, lambda: (_ for _ in ()).throw(RuntimeError("INVALID")), lambda fn: fn())
    # A cap on the ids tried.
    assert _pick_fastest(set_alg, lambda: None, lambda fn: 1.0, max_ids=3) == {"alg_id": 0, "ms": {0: 1.0, 1: 1.0,
                                                                                                 2: 1.0}}


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
    assert result["alg_id"] == min(result["ms"], key=result["ms"].get)
    assert layer.weight.alg_id_cusparselt == result["alg_id"]
    # Another algorithm: the same product up to the order of float32 sums.
    torch.testing.assert_close(layer(x), before, rtol=2 ** -7, atol=1e-2)
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
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).cuda().half()
    prune.magnitude_prune(model, 0.5, pattern="2:4", exclude=None)
    x = torch.randn(96, 256, device="cuda", dtype=torch.float16)
    ref = model(x)
    calls = []
    original = SemiStructuredLinear.tune

    def spy(self, rows, **kw):
        calls.append(rows)
        return original(self, rows, **kw)

    monkeypatch.setattr(SemiStructuredLinear, "tune", spy)
    prune.sparsify(model, layout="2:4", tune_rows=96)
    assert calls == [96, 96]
    torch.testing.assert_close(model(x), ref, rtol=2e-2, atol=2e-2)


# The torchao rival of bench_semi_structured (``torchao.sparsity.sparsify_`` with its 2:4 config).

def test_torchao_rival_reports_a_missing_torchao(monkeypatch):
    from pyfinetune.benchmarks.semi_structured import torchao_two_four

    monkeypatch.setitem(__import__("sys").modules, "torchao.sparsity", None)  # import refused
    layer, why = torchao_two_four(torch.randn(8, 16), None)
    assert layer is None and why.startswith("torchao not importable (ModuleNotFoundError"), why


def test_torchao_rival_reports_a_refusal():
    pytest.importorskip("torchao.sparsity")
    from pyfinetune.benchmarks.semi_structured import torchao_two_four

    if HAS_SPARSE_TC:
        pytest.skip("torchao's 2:4 refuses only tensors off a sparse-tensor-core GPU")
    layer, why = torchao_two_four(torch.randn(8, 16), torch.randn(8))
    assert layer is None and why.startswith("torchao sparsify_ failed ("), why


@needs_sparse_tc
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torchao_rival_computes_the_same_product(dtype):
    pytest.importorskip("torchao.sparsity")
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
