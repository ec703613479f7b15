"""Masks hold through training: with mask_optimizer, pruned weights and their optimizer state stay
exactly zero after every step of pyfinetune.optim.AdamW / SGD and torch.optim.AdamW / SGD (momentum,
weight decay, amsgrad, Nesterov), also when a pruner raises the sparsity mid-training."""

from __future__ import annotations

import pytest
import torch

import pyfinetune
from conftest import device_params, needs_compiled_step
from prune_harness import LAYERS, ConvNet, conv_input, optimizer_state_tensors
from pyfinetune import prune

OPTIMIZERS = {
    "pyfinetune-adamw": lambda ps: pyfinetune.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "pyfinetune-sgd": lambda ps: pyfinetune.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    "torch-adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "torch-adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "torch-sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1),
    "torch-sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
}
DTYPES = [torch.float32, torch.bfloat16]


class Trainer:
    """ConvNet, a fixed regression batch and one optimizer; ``step()`` is one training step."""

    def __init__(self, kind, dtype=torch.float32, device="cpu"):
        self.model = ConvNet(dtype, device)
        self.x = conv_input(8, dtype, device)
        self.target = torch.randn(8, 8, dtype=dtype, device=device)
        self.kind, self.dtype = kind, dtype
        self.opt = None

    def make_optimizer(self):
        self.opt = OPTIMIZERS[self.kind](self.model.parameters())
        return self.opt

    def backward(self):
        loss = (self.model(self.x) - self.target).float().square().mean()
        loss.backward()

    def step(self, between=None):
        self.backward()
        if between is not None:
            between()
        self.opt.step()
        self.opt.zero_grad()

    def layers(self):
        return [(n, self.model.get_submodule(n)) for n in LAYERS]


def assert_pruned_zero(opt, model, masks=None, where=""):
    """Pruned weights (under ``masks`` or the layers' masks) and their per-element optimizer state
    are exactly zero; the state exists for each weight."""
    for name in LAYERS:
        layer = model.get_submodule(name)
        mask = layer.weight_mask if masks is None else masks[name]
        w = layer.weight
        assert (w[~mask] == 0).all(), f"{where}: pruned weights of {name} are not zero"
        states = optimizer_state_tensors(opt, w)
        assert states, f"{where}: no optimizer state for {name}"
        for key, value in states:
            assert (value[~mask] == 0).all(), f"{where}: {key} of {name} is not zero at pruned positions"


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_masks_hold_for_100_steps(kind, dtype, pattern, device):
    tr = Trainer(kind, dtype, device)
    tr.make_optimizer()
    for _ in range(5):                 # the state is populated before pruning
        tr.step()
    prune.magnitude_prune(tr.model, 0.5, scope="global", pattern=pattern, exclude=None)
    masks = {n: layer.weight_mask.clone() for n, layer in tr.layers()}
    start = {n: layer.weight.detach().clone() for n, layer in tr.layers()}
    prune.mask_optimizer(tr.opt, tr.model)
    for i in range(100):
        tr.step()
        assert_pruned_zero(tr.opt, tr.model, masks, where=f"step {i}")
    for name, layer in tr.layers():
        assert torch.equal(layer.weight_mask, masks[name])
        moved = (layer.weight != start[name])[masks[name]].float().mean()
        assert moved > 0.5, f"{name}: the kept weights must keep training"
    if kind.startswith("pyfinetune"):
        for _, layer in tr.layers():
            assert torch.equal(tr.opt.get_mask(layer.weight), layer.weight_mask)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_gradual_pruning_mid_training_updates_optimizer_masks(kind, dtype, device):
    tr = Trainer(kind, dtype, device)
    pruner = prune.GradualPruner(tr.model, 0.8, start_step=10, end_step=60, every=10, exclude=None)
    tr.make_optimizer()
    prune.mask_optimizer(tr.opt, tr.model)
    for t in range(100):
        tr.step()
        # the masks in effect during this step hold, moments included
        assert_pruned_zero(tr.opt, tr.model, where=f"step {t}")
        pruner.step()
        for _, layer in tr.layers():
            assert (layer.weight[~layer.weight_mask] == 0).all(), "the pruner zeroes what it prunes"
    report = prune.sparsity_report(tr.model)
    assert all(r.sparsity == pytest.approx(0.8, abs=1e-2) for r in report)
    if kind.startswith("pyfinetune"):
        for _, layer in tr.layers():
            assert torch.equal(tr.opt.get_mask(layer.weight), layer.weight_mask)


@pytest.mark.parametrize("kind", ["torch-sgd", "torch-adamw"])
def test_without_mask_optimizer_momentum_revives_pruned_weights(kind):
    # The control for the tests above: a mask raised mid-training leaves momentum behind, which
    # moves the newly pruned weights away from zero unless the optimizer is masked.
    tr = Trainer(kind)
    tr.make_optimizer()
    for _ in range(10):
        tr.step()
    prune.magnitude_prune(tr.model, 0.5, exclude=None)
    tr.step()
    revived = sum(int((layer.weight[~layer.weight_mask] != 0).sum()) for _, layer in tr.layers())
    assert revived > 0


@pytest.mark.parametrize("kind", ["pyfinetune-adamw", "torch-adamw"])
def test_remove_hooks_and_remove_masks(kind):
    tr = Trainer(kind)
    tr.make_optimizer()
    prune.magnitude_prune(tr.model, 0.5, exclude=None)
    handle = prune.mask_optimizer(tr.opt, tr.model)
    for _ in range(5):
        tr.step()
    # export while training: the layers become plain, the optimizer stops masking them
    masks = {n: layer.weight_mask.clone() for n, layer in tr.layers()}
    prune.remove_masks(tr.model)
    grads = {}
    tr.step(between=lambda: grads.update({n: layer.weight.grad.clone() for n, layer in tr.layers()}))
    if kind.startswith("pyfinetune"):
        assert all(tr.opt.get_mask(layer.weight) is None for _, layer in tr.layers())
    for name, layer in tr.layers():
        trained = ~masks[name] & (grads[name] != 0)
        assert trained.any() and (layer.weight[trained] != 0).all(), f"{name}: the pruned weights train again"
    handle.remove()
    prune.magnitude_prune(tr.model, 0.5, exclude=None)
    tr.step()
    if kind.startswith("pyfinetune"):
        assert all(tr.opt.get_mask(layer.weight) is None for _, layer in tr.layers())


def test_optimizer_holding_some_weights():
    tr = Trainer("pyfinetune-sgd")
    prune.magnitude_prune(tr.model, 0.5, exclude=None)
    tr.opt = pyfinetune.optim.SGD(tr.model.fc1.parameters(), lr=0.1, momentum=0.9)
    tr_torch = torch.optim.SGD(tr.model.fc2.parameters(), lr=0.1, momentum=0.9)
    prune.mask_optimizer(tr.opt, tr.model)
    prune.mask_optimizer(tr_torch, tr.model)
    for _ in range(3):
        tr.step(between=tr_torch.step)
    assert tr.opt.get_mask(tr.model.fc1.weight) is not None
    assert (tr.model.fc2.weight[~tr.model.fc2.weight_mask] == 0).all()


@pytest.mark.parametrize("kind", ["pyfinetune-adamw", "torch-adamw"])
def test_loaded_masks_reach_the_optimizer(kind):
    tr = Trainer(kind)
    prune.magnitude_prune(tr.model, 0.3, exclude=None)
    tr.make_optimizer()
    prune.mask_optimizer(tr.opt, tr.model)
    for _ in range(3):
        tr.step()
    other = ConvNet()
    prune.magnitude_prune(other, 0.7, exclude=None)
    tr.model.load_state_dict(other.state_dict())       # masks change in place
    tr.step()
    assert_pruned_zero(tr.opt, tr.model, where="after load")
    if kind.startswith("pyfinetune"):
        assert torch.equal(tr.opt.get_mask(tr.model.fc1.weight), other.fc1.weight_mask)


@pytest.mark.parametrize("kind", ["pyfinetune-adamw", "pyfinetune-sgd", "torch-adamw", "torch-sgd"])
def test_movement_pruning_with_masked_optimizer(kind):
    tr = Trainer(kind)
    pruner = prune.MovementPruner(tr.model, 0.6, start_step=2, end_step=12, every=2, exclude=None)
    tr.make_optimizer()
    prune.mask_optimizer(tr.opt, tr.model)
    for t in range(30):
        tr.step(between=pruner.step)
        if t < 12:
            # the optimizer leaves movement layers alone: pruned weights keep dense values
            for _, layer in tr.layers():
                pruned = layer.weight[~layer.weight_mask]
                assert pruned.numel() > 0 or t < 4
                if pruned.numel():
                    assert (pruned != 0).float().mean() > 0.9
            if kind.startswith("pyfinetune"):
                assert all(tr.opt.get_mask(layer.weight) is None for _, layer in tr.layers())
        else:
            assert pruner.finished
            assert_pruned_zero(tr.opt, tr.model, where=f"step {t}")
    assert prune.sparsity_report(tr.model).sparsity == pytest.approx(0.6, abs=1e-2)


def test_mask_optimizer_errors():
    model = ConvNet()
    with pytest.raises(TypeError, match="optimizer"):
        prune.mask_optimizer([p for p in model.parameters()], model)
    with pytest.raises(TypeError, match="model"):
        prune.mask_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.state_dict())


@needs_compiled_step
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_mask_optimizer_inside_a_fullgraph_compiled_step(kind):
    # The pre-hook is traced into torch.compile(opt.step, fullgraph=True): no branch on version
    # counters there; a mask pruned further in place between compiled steps reaches the step.
    import torch.nn.functional as F
    from torch import nn

    def run(compiled):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = (pyfinetune.optim.AdamW(m.parameters(), lr=0.05, l2sp=0.1) if kind == "adamw"
               else pyfinetune.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
        prune.magnitude_prune(m, 0.5, exclude=None)
        prune.mask_optimizer(opt, m)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        g = torch.Generator().manual_seed(1)
        for i in range(4):
            F.cross_entropy(m(torch.randn(4, 8, generator=g)), torch.tensor([0, 1, 2, 0])).backward()
            step()
            opt.zero_grad()
            if i == 1:
                with torch.no_grad():
                    m[0].weight_mask[0, :] = False  # a pruner pruning further, in place
        return m, opt

    (eager, _), (compiled, opt) = run(False), run(True)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    pruned = ~compiled[0].weight_mask
    assert bool((compiled[0].weight[pruned] == 0).all())
    moments = [t for k, t in optimizer_state_tensors(opt, compiled[0].weight) if k in ("exp_avg", "exp_avg_sq",
                                                                                    "momentum_buffer")]
    assert moments and all(bool((t[pruned] == 0).all()) for t in moments)
