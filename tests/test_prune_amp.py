"""Pruning under mixed precision: ``torch.autocast`` (bfloat16 on CPU and CUDA, float16 on CPU and
CUDA) with ``torch.amp.GradScaler`` for float16, for one-shot magnitude pruning, GradualPruner and
MovementPruner. Parameters and masks stay float32 / bool; autocast runs the masked matmuls and
convolutions in low precision. CUDA cases are skipped without a GPU.

What the masked layers do under autocast: ``pyfinetune.ops.masked_matmul`` has no autocast rule,
so ``MaskedLinear`` computes ``F.linear(x, weight * mask)`` there (autocast casts both operands),
with the dense-gradient variant for movement pruning; ``MaskedConv2d`` always convolves with
``weight * mask``. ``test_masked_layers_under_autocast`` checks both against F.linear / F.conv2d
on the effective weight, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfinetune
from prune_harness import one_thread  # noqa: F401  (autouse fixture)
from pyfinetune import prune
from pyfinetune.prune import MaskedConv2d, MaskedLinear

STEPS = 50
SPARSITY = 0.7


class Net(nn.Module):
    """A stem, two convolutions, a hidden linear layer and a classifier: by default the middle
    three are pruned. Input [N, 3, 8, 8]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(64, 128)
        self.head = nn.Linear(128, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv1(x)) + x
        x = F.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(F.relu(self.fc1(x)))


PRUNED = ["conv1", "conv2", "fc1"]
PRECISIONS = [
    pytest.param("cpu", torch.bfloat16, False, id="cpu-bf16"),
    pytest.param("cpu", torch.float16, True, id="cpu-fp16-scaler"),
    pytest.param("cuda", torch.bfloat16, False, id="cuda-bf16", marks=pytest.mark.cuda),
    pytest.param("cuda", torch.float16, True, id="cuda-fp16-scaler", marks=pytest.mark.cuda),
]


def _pruner(method, model):
    if method == "magnitude":
        prune.magnitude_prune(model, SPARSITY)
        return None
    cls = prune.GradualPruner if method == "gradual" else prune.MovementPruner
    # Masks move every step from 10 to 30: movement pruning from a random start changes many
    # masks at each update, and rarer, larger updates made its loss jump and recover slowly.
    return cls(model, SPARSITY, start_step=10, end_step=30, every=1)


@pytest.mark.parametrize("device, dtype, use_scaler", PRECISIONS)
@pytest.mark.parametrize("method", ["magnitude", "gradual", "movement"])
def test_pruned_training_under_autocast(method, device, dtype, use_scaler):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=g)
    # a learnable task: the class is the quintile of (red - green) mean intensity
    score = x[:, 0].mean(dim=(1, 2)) - x[:, 1].mean(dim=(1, 2))
    y = torch.bucketize(score, score.quantile(torch.tensor([0.2, 0.4, 0.6, 0.8]))).to(device)
    x = x.to(device)
    model = Net().to(device)
    pruner = _pruner(method, model)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, (MaskedLinear, MaskedConv2d))) == PRUNED
    opt = pyfinetune.optim.AdamW(model.parameters(), lr=1e-2)
    prune.mask_optimizer(opt, model)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12) if use_scaler else None
    losses = []
    for _ in range(STEPS):
        with torch.autocast(device, dtype=dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        assert logits.dtype == dtype
        if scaler is None:
            loss.backward()
            if method == "movement":
                pruner.step()     # between backward and the optimizer step
            opt.step()
        else:
            scaler.scale(loss).backward()
            if method == "movement":
                scaler.unscale_(opt)   # the scores need the true gradients
                pruner.step()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        if method == "gradual":
            pruner.step()         # after the optimizer step
        losses.append(loss.item())

    losses = torch.tensor(losses)
    assert torch.isfinite(losses).all(), losses
    assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    report = prune.sparsity_report(model)
    for name in PRUNED:
        layer = model.get_submodule(name)
        assert not layer.dense_grad, name
        assert not layer.weight[~layer.weight_mask].any(), f"{name}: a pruned weight is nonzero"
        assert report[name].pruned == round(SPARSITY * report[name].numel), name
    for name in ("stem", "head"):
        assert type(model.get_submodule(name)) in (nn.Conv2d, nn.Linear), name
    if pruner is not None:
        assert pruner.last_sparsity == SPARSITY


@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_layers_under_autocast(dtype, dense_grad):
    torch.manual_seed(0)
    cases = [(nn.Linear(24, 16), torch.randn(5, 24), F.linear),
             (nn.Conv2d(4, 8, 3), torch.randn(2, 4, 6, 6), F.conv2d)]
    for layer, x, fn in cases:
        prune.magnitude_prune(layer, 0.6)
        with torch.no_grad():   # values at pruned positions that the forward must not see
            layer.weight.copy_(torch.where(layer.weight_mask, layer.weight, torch.randn_like(layer.weight)))
        layer.dense_grad = dense_grad
        effective = (layer.weight * layer.weight_mask).detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            out = layer(x)
            ref = fn(x, effective, layer.bias)
        assert out.dtype == ref.dtype == dtype
        assert torch.equal(out, ref), type(layer).__name__
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        expected = effective.grad if dense_grad else effective.grad * layer.weight_mask
        assert layer.weight.grad.dtype == torch.float32
        assert torch.equal(layer.weight.grad, expected), type(layer).__name__
