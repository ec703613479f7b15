"""pyfinetune.ops.scale_kept_gradients: the backward of the losses that keep their gradient from the
forward (kd_loss, kd_loss_topk, fused_linear_kd_loss).

In place (eager; on a GPU only for kept gradients of at least ``_SYNC_SCALE_MIN_BYTES``, patched
to 0 here so that small tensors take that path) it must give exactly the bits of the out-of-place
product ``(g * scale).to(dtype)`` (the product in the scale's dtype), skip the pass for a scale of 1,
and leave a retained graph able to run its backward again with another scale, zero included.
"""

import types

import pytest
import torch

import pyfinetune.ops as pops
from conftest import device_dtype_params, device_params

MATH = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32,
        torch.float16: torch.float32}


@pytest.fixture
def sync_always(monkeypatch):
    monkeypatch.setattr(pops, "_SYNC_SCALE_MIN_BYTES", 0)


def kept(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)


def expected(g, scale, dtype):
    """The out-of-place product of the registered path under tracing."""
    return g.mul(scale).to(dtype)


@pytest.mark.parametrize("device,dtype", device_dtype_params([torch.float32, torch.bfloat16, torch.float16,
                                                               torch.float64]))
@pytest.mark.parametrize("kind", ["scalar", "rows"])
def test_in_place_gives_the_out_of_place_bits(sync_always, device, dtype, kind, seed):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU only for the losses")
    g = kept((37, 129), dtype, device, seed)
    math = MATH[dtype]
    if kind == "scalar":
        # a value whose product rounds differently in float32 and in g's dtype, and 1 / count
        scales = [torch.tensor(1 / 7, dtype=math), torch.tensor(2.5, dtype=math), torch.tensor(-1e-3, dtype=math)]
        scales = [s.view(1, 1).to(device) for s in scales]
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        scales = [(torch.rand(37, 1, generator=gen, dtype=torch.float64) * 3 + 0.1).to(device, math)]
    for scale in scales:
        ref = expected(g.clone(), scale, dtype)
        buf = g.clone()
        ctx = types.SimpleNamespace()
        (out,) = pops.scale_kept_gradients(ctx, (buf,), scale, (dtype,))
        assert out.dtype == dtype and out.data_ptr() == buf.data_ptr(), "expected the kept buffer, scaled in place"
        assert torch.equal(out, ref), (scale, (out.double() - ref.double()).abs().max())
        assert torch.equal(ctx.applied_scale, scale)


@pytest.mark.parametrize("device", device_params())
def test_scale_one_is_no_pass(sync_always, device, seed):
    g = kept((5, 9), torch.bfloat16, device, seed)
    ctx = types.SimpleNamespace()
    before = g.clone()
    (out,) = pops.scale_kept_gradients(ctx, (g,), torch.ones(1, 1, device=device), (torch.bfloat16,))
    assert out is g and torch.equal(out, before)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("second", [0.0, float("inf"), 3.0])
def test_retained_graph_scaled_again(sync_always, device, second, seed):
    # First backward scales in place by 2.5; the second (retain_graph) must give g * second from the
    # original values, whatever second is (0 and inf cannot be undone, so they are never applied in place).
    g0 = kept((6, 11), torch.float32, device, seed)
    buf = g0.clone()
    ctx = types.SimpleNamespace()
    s1 = torch.tensor([[2.5]], device=device)
    (out1,) = pops.scale_kept_gradients(ctx, (buf,), s1, (torch.float32,))
    assert torch.equal(out1, g0 * 2.5)
    s2 = torch.tensor([[second]], device=device)
    (out2,) = pops.scale_kept_gradients(ctx, (buf,), s2, (torch.float32,))
    torch.testing.assert_close(out2, g0 * second, rtol=2e-7, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", device_params())
def test_zero_scale_is_not_applied_in_place(sync_always, device, seed):
    g0 = kept((4, 8), torch.float32, device, seed)
    buf = g0.clone()
    (out,) = pops.scale_kept_gradients(types.SimpleNamespace(), (buf,), torch.zeros(1, 1, device=device),
                                       (torch.float32,))
    assert torch.equal(out, torch.zeros_like(g0)) and torch.equal(buf, g0), "the kept values must survive"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_small_gpu_gradient_is_not_synchronized():
    # Below the threshold a GPU gradient is scaled out of place (no host look at the scale).
    g = torch.randn(16, 16, device="cuda")
    buf = g.clone()
    (out,) = pops.scale_kept_gradients(types.SimpleNamespace(), (buf,), torch.full((1, 1), 2.0, device="cuda"),
                                       (torch.float32,))
    assert out.data_ptr() != buf.data_ptr() and torch.equal(buf, g) and torch.equal(out, g * 2)


def test_traced_gradient_is_not_scaled_in_place(sync_always):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        g = torch.empty(3, 4)
        (out,) = pops.scale_kept_gradients(types.SimpleNamespace(), (g,), torch.ones(1, 1) * 2, (torch.float32,))
        assert out is not g
