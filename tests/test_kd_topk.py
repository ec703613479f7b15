"""kd_loss_topk against the dense reference with the teacher scattered into a -inf row."""

import pytest
import torch

from pyfinetune.losses import kd_loss_topk
from reference_kd import assert_grad_close, assert_loss_close, kd_reference, topk_to_full

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def case(shape, k, device, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    s = (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)
    full_t = torch.randn(shape, generator=g) * scale
    v, i = torch.topk(full_t, k, dim=-1)
    perm = torch.randperm(k, generator=g)  # top-k entries in any order
    v, i = v[..., perm].to(device=device, dtype=dtype), i[..., perm].to(device)
    lab = torch.randint(0, V, shape[:-1], generator=g)
    lab.view(-1)[::4] = -100
    return s, v, i, lab.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("k", [1, 7, 100])
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_matches_scattered_reference(device, divergence, k, labels, reduction):
    s, v, i, lab = case((3, 5, 301), k, device, seed=k)
    lab = lab if labels else None
    kw = dict(temperature=1.7, alpha=0.4, divergence=divergence, beta=0.3, reduction=reduction)
    x = s.clone().requires_grad_(True)
    loss = kd_loss_topk(x, v, i, lab, **kw)
    go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)).to(device) + 0.5
    loss.backward(go)
    ref_loss, ref_grad = kd_reference(s, topk_to_full(v, i, 301), lab, grad_output=go, **kw)
    assert_loss_close(loss, ref_loss, torch.float32, msg=str(kw))
    assert_grad_close(x.grad, ref_grad, torch.float32, msg=str(kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.05, 1.0, 2.0, 3.0, 100.0])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_temperature_extremes_and_large_logits(device, temperature, divergence):
    s, v, i, lab = case((4, 2000), 50, device, seed=3, scale=1500.0)
    x = s.clone().requires_grad_(True)
    kw = dict(temperature=temperature, divergence=divergence)
    loss = kd_loss_topk(x, v, i, lab, **kw)
    loss.backward()
    ref_loss, ref_grad = kd_reference(s, topk_to_full(v, i, 2000), lab, **kw)
    torch_loss, _ = kd_reference(s, topk_to_full(v, i, 2000).float(), lab, compute_dtype=torch.float32, **kw)
    assert_loss_close(loss, ref_loss, torch.float32, torch_same_dtype=torch_loss)
    assert_grad_close(x.grad, ref_grad, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("sliced", [False, True])
def test_cuda_cluster_split(divergence, sliced):
    # Rows of 50257 with k = 64: each row is split over a cluster of blocks on sm_90, and the
    # gradient fix-ups of the top-k entries fall to the blocks that own them. `sliced`: a student
    # misaligned against its gradient.
    V = 50257
    s, v, i, _ = case((3, V), 64, "cuda", seed=5)
    if sliced:
        buf = torch.zeros(3, V + 3, device="cuda")
        buf[:, 3:] = s
        s = buf[:, 3:]
    lab = torch.tensor([7, -100, V - 1], device="cuda")
    x = s.detach().requires_grad_(True)
    kw = dict(temperature=1.7, alpha=0.4, divergence=divergence)
    kd_loss_topk(x, v, i, lab, **kw).backward()
    loss = kd_loss_topk(s, v, i, lab, **kw)
    ref_loss, ref_grad = kd_reference(s, topk_to_full(v, i, V), lab, **kw)
    assert_loss_close(loss, ref_loss, torch.float32, msg=str(kw))
    assert_grad_close(x.grad, ref_grad, torch.float32, msg=str(kw))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16(device):
    s, v, i, lab = case((6, 400), 20, device, dtype=torch.bfloat16, seed=4)
    x = s.clone().requires_grad_(True)
    kd_loss_topk(x, v, i, lab, temperature=2.0).backward()
    ref_loss, ref_grad = kd_reference(s, topk_to_full(v, i, 400), lab, temperature=2.0)
    assert x.grad.dtype == torch.bfloat16
    assert_grad_close(x.grad, ref_grad, torch.bfloat16)


def test_reverse_kl_refused():
    s, v, i, lab = case((2, 50), 5, "cpu")
    with pytest.raises(ValueError, match="reverse_kl"):
        kd_loss_topk(s, v, i, lab, divergence="reverse_kl")
    with pytest.raises(RuntimeError, match="reverse_kl"):
        torch.ops.pyfinetune.kd_loss_topk_fwd(s, v, i, lab, temperature=1.0, alpha=0.5, divergence="reverse_kl",
                                              beta=0.5, ignore_index=-100, need_grad=False)


def test_index_out_of_range():
    s, v, i, lab = case((2, 50), 5, "cpu")
    i[1, 2] = 50
    with pytest.raises(RuntimeError, match=r"teacher_indices\[1, 2\] = 50"):
        kd_loss_topk(s, v, i, lab)


def test_gradcheck_double():
    s, v, i, lab = case((3, 12), 4, "cpu", dtype=torch.float64)
    x = s.clone().requires_grad_(True)
    for div in ("forward_kl", "jsd"):
        assert torch.autograd.gradcheck(lambda y: kd_loss_topk(y, v, i, lab, temperature=1.3, divergence=div), (x,))
