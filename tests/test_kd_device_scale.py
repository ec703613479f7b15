"""The backward's scale of a kept distillation gradient read on the device (`_scale_kept_`,
PYFINETUNE_KD_DEVICE_SCALE=1): the same bits as the host path's `grad.mul_(float)`, nothing written
for a scale of 1, no host synchronization on a GPU, and a clear error, not a wrong gradient, for the
one case it cannot serve (a later backward through a retained graph after a scale of 0 or inf).

Tolerances: none. Every comparison is bitwise (NaN payloads aside: ATen's vectorized CPU conversion
makes every NaN its canonical one), against the product computed by ATen's mul_ (the host path) or
against the losses with the variable unset, because the op rounds the same float32 (float64 for
float64) product once, as ATen does.
"""

import math

import pytest
import torch
from conftest import bits, device_params

from pyfinetune import ops
from pyfinetune.losses import fused_linear_kd_loss, kd_loss
from pyfinetune.ops import DEVICE_SCALE_ENV

OP = torch.ops.pyfinetune._scale_kept_
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OPMATH = {torch.float64: torch.float64}


def _same(a, b):
    """Bit-identical, NaN where NaN (any payload), -0.0 apart from 0.0."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(bits(a[~nan_a]), bits(b[~nan_b]))


def _scale(value, dtype, device):
    return torch.tensor([[value]], dtype=OPMATH.get(dtype, torch.float32), device=device)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1037,), (7, 131), (3, 8), (0, 5)])
@pytest.mark.parametrize("value", [3.7, 0.5, -2.0, 1e-30, 0.0, math.inf, math.nan, 1.0])
def test_same_bits_as_mul(device, dtype, shape, value):
    g = (torch.randn(shape, dtype=torch.float64) * 1e3).to(device, dtype)
    if g.numel():
        g.view(-1)[0] = -0.0
        if g.numel() > 2:
            g.view(-1)[1] = math.nan
    want = g.clone()
    if value != 1.0:
        want.mul_(value)  # what the host path does with the scale's value (float32 / float64 exact)
    OP(g, _scale(value, dtype, device))
    assert _same(g, want), (dtype, value)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("offset", [1, 3])
def test_unaligned_buffer(device, offset):
    # A buffer starting mid-vector (a view into a larger one) goes element by element on a GPU.
    base = torch.randn(2000, device=device).to(torch.bfloat16)
    g = base[offset:offset + 1501]
    rest = base.clone()
    want = g.clone().mul_(0.375)
    OP(g, _scale(0.375, torch.bfloat16, device))
    assert _same(g, want)
    assert torch.equal(base[:offset], rest[:offset]) and torch.equal(base[offset + 1501:], rest[offset + 1501:])


@pytest.mark.parametrize("device", device_params())
def test_errors_name_the_argument(device):
    g = torch.randn(4, 6, device=device)
    s = _scale(2.0, torch.float32, device)
    cases = [
        ((g.t(), s), r"grad must be a contiguous dense tensor, got strides \[1, 6\]"),
        ((g.to(torch.int32), s), r"grad must be float32, float64, bfloat16 or float16, got Int"),
        ((g, torch.ones(2, device=device)), r"scale must hold exactly one value, got 2 values"),
        ((g, s.double()), r"scale must be Float \(the arithmetic dtype of a Float grad\), got Double"),
        ((g.double(), s), r"scale must be Double \(the arithmetic dtype of a Double grad\), got Float"),
        ((g.half(), s.half()), r"scale must be Float \(the arithmetic dtype of a Half grad\), got Half"),
        ((g, g[0, 1:2]), r"scale must not share memory with grad"),
    ]
    if device == "cuda":
        cases.append(((g, s.cpu()), r"scale must be on grad's device cuda:0, got cpu"))
    for args, match in cases:
        before = args[0].clone()
        with pytest.raises(RuntimeError, match=match):
            OP(*args)
        assert torch.equal(bits(args[0]), bits(before))


def test_autograd_layer():
    g = torch.randn(5, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"_scale_kept_: grad requires grad"):
        OP(g, _scale(2.0, torch.float32, "cpu"))
    h = torch.randn(5)
    v = h._version
    OP(h, _scale(2.0, torch.float32, "cpu"))
    assert h._version == v + 1


@pytest.mark.parametrize("device", device_params())
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.randn(3, 70, device=device, dtype=dtype)
        torch.library.opcheck(OP, (g, _scale(1.5, dtype, device)))


def test_bad_variable_is_refused(monkeypatch):
    x = torch.randn(3, 10, requires_grad=True)
    loss = kd_loss(x, torch.randn(3, 10))
    monkeypatch.setenv(DEVICE_SCALE_ENV, "yes")
    with pytest.raises(ValueError, match=rf"{DEVICE_SCALE_ENV} must be 0 or 1 \(or unset: 0\), got 'yes'"):
        loss.backward()


@pytest.fixture
def on_cpu_too(monkeypatch):
    """The variable applies to CUDA tensors only; these tests take the CPU too, to run its logic."""
    monkeypatch.setattr(ops, "_DEVICE_SCALE_DEVICES", ("cuda", "cpu"))


def _grads_of(setting, monkeypatch, make, upstreams):
    """The gradients of `make()`'s loss for each upstream gradient in turn (one retained graph)."""
    if setting is None:
        monkeypatch.delenv(DEVICE_SCALE_ENV, raising=False)
    else:
        monkeypatch.setenv(DEVICE_SCALE_ENV, setting)
    loss, leaves = make()
    out = []
    for k, up in enumerate(upstreams):
        out.append(torch.autograd.grad(loss, leaves, up, retain_graph=k + 1 < len(upstreams)))
    return out


def _assert_paths_agree(monkeypatch, make, upstreams):
    """The gradients of each backward are the same with the variable unset and set to 1."""
    host = _grads_of(None, monkeypatch, make, upstreams)
    dev = _grads_of("1", monkeypatch, make, upstreams)
    for a, b in zip(host, dev):
        for x, y in zip(a, b):
            assert _same(x, y)


def _kd_case(device, dtype, reduction):
    gen = torch.Generator().manual_seed(5)
    s = (torch.randn(9, 300, generator=gen) * 3).to(device, dtype)
    t = (torch.randn(9, 300, generator=gen) * 3).to(device, dtype)
    lab = torch.randint(0, 300, (9,), generator=gen).to(device)
    lab[::4] = -100

    def make():
        x = s.clone().requires_grad_(True)
        return kd_loss(x * 1.0, t, lab, temperature=2.0, alpha=0.6, reduction=reduction), [x]
    return make


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_kd_loss_same_gradients(device, dtype, reduction, monkeypatch, on_cpu_too):
    make = _kd_case(device, dtype, reduction)
    ups = [torch.tensor(1.0, device=device), torch.tensor(0.375, device=device), torch.tensor(1.0, device=device)]
    _assert_paths_agree(monkeypatch, make, ups)


@pytest.mark.parametrize("device", device_params())
def test_fused_linear_same_gradients(device, monkeypatch, on_cpu_too):
    gen = torch.Generator().manual_seed(9)
    hs, ht = torch.randn(12, 16, generator=gen), torch.randn(12, 16, generator=gen)
    ws, wt = torch.randn(70, 16, generator=gen), torch.randn(70, 16, generator=gen)
    lab = torch.randint(0, 70, (12,), generator=gen)

    def make():
        leaves = [hs.to(device).requires_grad_(True), ws.to(device).requires_grad_(True)]
        return fused_linear_kd_loss(leaves[0], leaves[1], ht.to(device), wt.to(device), lab.to(device),
                                    temperature=1.5), leaves
    ups = [torch.tensor(2.0, device=device), torch.tensor(1.0, device=device)]
    _assert_paths_agree(monkeypatch, make, ups)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("first", [0.0, math.inf])
def test_retained_graph_after_a_scale_that_cannot_be_undone(device, first, monkeypatch, on_cpu_too):
    make = _kd_case(device, torch.float32, "batchmean")
    monkeypatch.setenv(DEVICE_SCALE_ENV, "1")
    loss, (x,) = make()
    (g1,) = torch.autograd.grad(loss, x, torch.tensor(first, device=device), retain_graph=True)
    (ref,) = _grads_of(None, monkeypatch, make, [torch.tensor(first, device=device)])[0]
    assert _same(g1, ref)  # the first backward is right
    monkeypatch.setenv(DEVICE_SCALE_ENV, "1")
    for _ in range(2):  # every later backward raises: none divides by the scale that was applied
        with pytest.raises(RuntimeError, match=rf"upstream gradient of {first} \(zero or not finite\).*"
                                               rf"{DEVICE_SCALE_ENV}=0"):
            torch.autograd.grad(loss, x, torch.tensor(1.0, device=device), retain_graph=True)


@pytest.mark.parametrize("device", device_params())
def test_retained_graph_after_an_invertible_scale(device, monkeypatch, on_cpu_too):
    make = _kd_case(device, torch.float32, "batchmean")
    ups = [torch.tensor(0.25, device=device), torch.tensor(3.0, device=device), torch.tensor(1.0, device=device)]
    _assert_paths_agree(monkeypatch, make, ups)


def test_the_cpu_keeps_the_host_read(monkeypatch):
    # On the CPU the variable changes nothing: the host read is free and keeps a retained graph
    # differentiable after a scale of 0.
    make = _kd_case("cpu", torch.float32, "batchmean")
    ups = [torch.tensor(0.0), torch.tensor(1.0)]
    _assert_paths_agree(monkeypatch, make, ups)


@pytest.mark.parametrize("device", device_params())
def test_per_row_scales_take_the_host_path(device, monkeypatch, on_cpu_too):
    # reduction="none": one scale per row, which the op does not take; the host path serves it.
    make = _kd_case(device, torch.float32, "none")
    ups = [torch.rand(9, device=device) + 0.5, torch.rand(9, device=device)]
    _assert_paths_agree(monkeypatch, make, ups)


@pytest.mark.cuda
def test_no_host_synchronization(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv(DEVICE_SCALE_ENV, "1")
    # Large enough that the host path would read the scale on the host (ops._SYNC_SCALE_MIN_BYTES).
    s = torch.randn(512, 65536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(512, 65536, device="cuda", dtype=torch.bfloat16)
    loss = kd_loss(s * 1.0, t, temperature=2.0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(s.grad.float()).all()


@pytest.mark.cuda
def test_captured_in_a_cuda_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g0 = torch.randn(3000, device="cuda", dtype=torch.float16)
    g = g0.clone()
    scale = _scale(1.0, torch.float16, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        OP(g, scale)  # warm-up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            OP(g, scale)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(bits(g), bits(g0))
    scale.fill_(2.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(bits(g), bits(g0.clone().mul_(2.5)))
