"""GradualPruner (cubic schedule of Zhu & Gupta 2017) and MovementPruner (Sanh et al. 2020):
schedule values against the formula, exact sparsity along the schedule, movement scores against a
hand-computed reference, pruned weights coming back, state_dict resume, and argument errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prune_harness import LAYERS, ConvNet, as_matrix, block_mask_units, conv_input
from pyfinetune import prune
from pyfinetune.prune import GradualPruner, MovementPruner


def cubic(t, s_i, s_f, start, end):
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3, clamped to [t0, t0 + n dt]."""
    t = min(max(t, start), end)
    return s_f + (s_i - s_f) * (1 - (t - start) / (end - start)) ** 3


@pytest.mark.parametrize("s_i, s_f, start, end, every", [
    (0.0, 0.9, 0, 100, 10), (0.1, 0.5, 7, 30, 4), (0.0, 1.0, 3, 4, 1), (0.3, 0.3, 0, 9, 2)])
@pytest.mark.parametrize("cls", [GradualPruner, MovementPruner])
def test_schedule_values(cls, s_i, s_f, start, end, every):
    pruner = cls(nn.Linear(8, 8), s_f, start, end, every, initial_sparsity=s_i)
    values = [pruner.sparsity_at(t) for t in range(end + 20)]
    for t, v in enumerate(values):
        assert v == pytest.approx(cubic(t, s_i, s_f, start, end), rel=1e-15, abs=1e-15), t
    assert values[0] == s_i and values[start] == s_i and values[end] == s_f and values[-1] == s_f
    assert all(a <= b for a, b in zip(values, values[1:])), "the schedule never decreases"
    if end - start >= 2 and s_f > s_i:
        # cubic: most of the pruning happens early
        mid = (start + end) // 2
        assert values[mid] - s_i > (s_f - s_i) * 0.5


def test_pruning_steps():
    pruner = GradualPruner(nn.Linear(8, 8), 0.5, 10, 35, 10)
    assert [t for t in range(60) if pruner.is_pruning_step(t)] == [10, 20, 30, 35]
    pruner = GradualPruner(nn.Linear(8, 8), 0.5, 0, 6, 3)
    assert [t for t in range(20) if pruner.is_pruning_step(t)] == [0, 3, 6]


def _perturb(model, gen):
    """Stands for a training step with optimizer masking: the kept weights move, the pruned stay 0."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                step = 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
                if name == "weight" and hasattr(module, "weight_mask"):
                    step *= module.weight_mask
                p.add_(step)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("pattern", ["unstructured", "block:2x4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradual_pruning_follows_schedule(scope, pattern, dtype):
    model = ConvNet(dtype)
    weights = {n: model.get_submodule(n).weight for n in LAYERS}
    before = {n: w.detach().clone() for n, w in weights.items()}
    pruner = GradualPruner(model, 0.8, start_step=5, end_step=40, every=5, pattern=pattern, scope=scope, exclude=None)
    # masks attached at construction, all kept, weights untouched
    assert all(torch.equal(weights[n], before[n]) and model.get_submodule(n).weight_mask.all() for n in LAYERS)
    assert all(f"{n}.weight_mask" in model.state_dict() for n in LAYERS)
    gen = torch.Generator().manual_seed(0)
    unit = 8 if pattern == "block:2x4" else 1
    previous = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    applied = None
    for t in range(50):
        _perturb(model, gen)           # the ranking changes
        if pruner.is_pruning_step(t):
            applied = pruner.sparsity_at(t)
        assert pruner.step() == applied
        masks = {n: model.get_submodule(n).weight_mask for n in LAYERS}
        pruned = {n: int((~m).sum()) for n, m in masks.items()}
        if scope == "layer":
            for n, m in masks.items():
                assert pruned[n] == round((applied or 0.0) * m.numel() / unit) * unit, (t, n)
        else:
            total = sum(m.numel() for m in masks.values())
            assert sum(pruned.values()) == round((applied or 0.0) * total / unit) * unit, t
        for n, m in masks.items():
            assert not (m & ~previous[n]).any(), "gradual magnitude pruning never revives a weight"
            assert (weights[n][~m] == 0).all()
            if pattern != "unstructured":
                assert block_mask_units(m, 2, 4)[1]
            previous[n] = m.clone()
    assert pruner.step_count == 50 and pruner.last_sparsity == 0.8


def test_gradual_2_4():
    model = ConvNet()
    pruner = GradualPruner(model, 0.5, 0, 10, 2, pattern="2:4", scope="global", exclude=None)
    for _ in range(11):
        pruner.step()
    for n in LAYERS:
        assert (as_matrix(model.get_submodule(n).weight_mask).reshape(-1, 4).sum(dim=1) == 2).all()


def test_gradual_state_dict_resume():
    model = ConvNet()
    pruner = GradualPruner(model, 0.9, 2, 30, 3, scope="global", initial_sparsity=0.1, exclude=None)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        _perturb(model, gen)
        pruner.step()
    # checkpoint: the model (masks included) and the pruner
    model_sd, pruner_sd = copy.deepcopy(model.state_dict()), copy.deepcopy(pruner.state_dict())
    assert pruner_sd["step_count"] == 12 and pruner_sd["last_sparsity"] == pruner.sparsity_at(11)
    resumed = ConvNet()
    prune.load_pruned_state_dict(resumed, model_sd)
    resumed_pruner = GradualPruner(resumed, 0.9, 2, 30, 3, scope="global", initial_sparsity=0.1, exclude=None)
    resumed_pruner.load_state_dict(pruner_sd)
    gen_b = copy.deepcopy(gen)
    for _ in range(25):
        _perturb(model, gen)
        _perturb(resumed, gen_b)
        assert pruner.step() == resumed_pruner.step()
        for n in LAYERS:
            assert torch.equal(model.get_submodule(n).weight_mask, resumed.get_submodule(n).weight_mask)
    other = GradualPruner(ConvNet(), 0.8, 2, 30, 3, scope="global", initial_sparsity=0.1, exclude=None)
    with pytest.raises(ValueError, match="final_sparsity"):
        other.load_state_dict(pruner_sd)


@pytest.mark.parametrize("cls", [GradualPruner, MovementPruner])
def test_numpy_schedule_steps(cls):
    # start_step / end_step / every from a NumPy config (np.int64) were refused as "not an int" while
    # NumPy sparsities were taken; stored as ints, the schedule is the same as with Python ints.
    np = pytest.importorskip("numpy")
    a = cls(nn.Linear(8, 8), 0.5, np.int64(2), np.int32(12), np.int64(3))
    b = cls(nn.Linear(8, 8), 0.5, 2, 12, 3)
    assert type(a.start_step) is int and type(a.end_step) is int and type(a.every) is int
    assert (a.start_step, a.end_step, a.every) == (b.start_step, b.end_step, b.every)
    assert [a.sparsity_at(s) for s in range(15)] == [b.sparsity_at(s) for s in range(15)]


@pytest.mark.parametrize("cls", [GradualPruner, MovementPruner])
def test_schedule_errors(cls):
    layer = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="end_step"):
        cls(layer, 0.5, 10, 10, 1)
    with pytest.raises(ValueError, match="end_step"):
        cls(layer, 0.5, 10, 5, 1)
    with pytest.raises(ValueError, match="every"):
        cls(layer, 0.5, 0, 10, 0)
    with pytest.raises(ValueError, match="every"):
        cls(layer, 0.5, 0, 10, -2)
    with pytest.raises(TypeError, match="every"):
        cls(layer, 0.5, 0, 10, 1.5)
    with pytest.raises(ValueError, match="start_step"):
        cls(layer, 0.5, -1, 10, 1)
    with pytest.raises(TypeError, match="end_step"):
        cls(layer, 0.5, 0, "10", 1)
    with pytest.raises(TypeError, match="start_step must be an int, got bool"):
        cls(layer, 0.5, True, 10, 1)
    with pytest.raises(ValueError, match="final_sparsity"):
        cls(layer, 1.5, 0, 10, 1)
    with pytest.raises(ValueError, match="initial_sparsity"):
        cls(layer, 0.5, 0, 10, 1, initial_sparsity=-0.5)
    with pytest.raises(ValueError, match="initial_sparsity must be <= final_sparsity"):
        cls(layer, 0.5, 0, 10, 1, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="final_sparsity=0.75 .*'2:4'"):
        cls(layer, 0.75, 0, 10, 1, pattern="2:4")
    with pytest.raises(ValueError, match="pattern"):
        cls(nn.Linear(6, 8), 0.5, 0, 10, 1, pattern="2:4")
    with pytest.raises(ValueError, match="scope"):
        cls(layer, 0.5, 0, 10, 1, scope="all")
    with pytest.raises(ValueError, match="no prunable layer"):
        cls(layer, 0.5, 0, 10, 1, include="fc")
    assert type(layer) is nn.Linear, "failed constructions attach nothing"


# ------------------------------------------------------------------------------ movement
def _reference_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = scores.reshape(-1)
    pruned = torch.zeros_like(flat, dtype=torch.bool)
    pruned[torch.sort(flat, stable=True).indices[: round(sparsity * flat.numel())]] = True
    return ~pruned.reshape(scores.shape)


def test_movement_scores_against_hand_computed_reference():
    # y = x W^T, loss = sum(c * y): the gradient of the effective weight is c^T x at every
    # position, pruned ones included; the score adds -W * (c^T x) each step.
    layer = nn.Linear(6, 4, bias=False, dtype=torch.float64)
    pruner = MovementPruner(layer, 0.5, start_step=2, end_step=8, every=2)
    assert layer.dense_grad and pruner.scores[""].dtype == torch.float64
    W = layer.weight.detach().clone()
    S = torch.zeros_like(W)
    mask = torch.ones_like(W, dtype=torch.bool)
    lr = 0.1
    for t in range(12):
        x = torch.randn(5, 6, dtype=torch.float64)
        c = torch.randn(5, 4, dtype=torch.float64)
        (layer(x) * c).sum().backward()
        G = c.t() @ x
        if t <= 8:
            torch.testing.assert_close(layer.weight.grad, G, rtol=1e-14, atol=1e-14)   # dense
            S -= W * G
        else:
            torch.testing.assert_close(layer.weight.grad, G * mask, rtol=1e-14, atol=1e-14)   # finalized
        pruner.step()
        torch.testing.assert_close(pruner.scores[""], S, rtol=1e-12, atol=1e-14)
        forward_mask = mask
        if pruner.is_pruning_step(t):
            mask = _reference_mask(S, pruner.sparsity_at(t))
        assert torch.equal(layer.weight_mask, mask), t
        # The weights learn with the masked gradient (Sanh et al.), under the mask of the forward;
        # at end_step also under the final mask, so that the pruned weights stay zero from then on.
        grad_mask = forward_mask & mask if t >= 8 else forward_mask
        torch.testing.assert_close(layer.weight.grad, G * grad_mask, rtol=1e-14, atol=1e-14, msg=lambda m: f"t={t}: {m}")
        W -= lr * G * grad_mask
        with torch.no_grad():
            layer.weight -= lr * layer.weight.grad
        layer.weight.grad = None
        if t < 8:
            # pruned weights keep their dense values while the schedule runs
            torch.testing.assert_close(layer.weight.detach(), W, rtol=1e-14, atol=1e-14)
            assert (layer.weight[~mask] != 0).all()
        else:
            # finalized at end_step: zeros baked in, ordinary masked layer
            W *= mask
            torch.testing.assert_close(layer.weight.detach(), W, rtol=1e-14, atol=1e-14)
            assert pruner.finished and not layer.dense_grad
            assert (layer.weight[~mask] == 0).all()
    assert int((~layer.weight_mask).sum()) == 12


def test_movement_revives_a_pruned_weight():
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    pruner = MovementPruner(layer, 0.5, start_step=1, end_step=4, every=1, initial_sparsity=0.5)

    def step(grad):
        layer.weight.grad = torch.tensor([grad])
        pruner.step()

    step([-1.0, 0.0])                     # t=0: scores [1, 0], no pruning yet
    assert layer.weight_mask.all()
    step([0.0, 0.0])                      # t=1: the second weight is pruned
    assert layer.weight_mask.tolist() == [[True, False]]
    assert layer.weight.tolist() == [[1.0, 1.0]], "the pruned weight keeps its value"
    step([0.0, -5.0])                     # t=2: scores [1, 5]: the second weight comes back
    assert layer.weight_mask.tolist() == [[False, True]]
    assert layer.weight.grad.tolist() == [[0.0, 0.0]], "masked with the mask the gradient was computed under"
    assert prune.effective_weight(layer).tolist() == [[0.0, 1.0]], "it comes back with its old value"
    step([0.0, 0.0])
    step([0.0, 0.0])                      # t=4 = end_step: finalized
    assert pruner.finished and layer.weight.tolist() == [[0.0, 1.0]]


def test_movement_skips_non_finite_gradients():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    pruner = MovementPruner(model, 0.5, 0, 10, 1, exclude=None)
    model[0].weight.grad = torch.randn(4, 4)
    model[1].weight.grad = torch.randn(4, 4)
    model[1].weight.grad[2, 1] = float("inf")
    pruner.step()
    assert all((s == 0).all() for s in pruner.scores.values()), "a step with an inf gradient adds nothing"
    model[1].weight.grad = None                 # a layer without gradient is skipped
    model[0].weight.grad = torch.ones(4, 4)
    pruner.step()
    torch.testing.assert_close(pruner.scores["0"], -model[0].weight.detach())
    assert (pruner.scores["1"] == 0).all()


def test_movement_block_scores_are_sums():
    layer = nn.Linear(4, 2, bias=False)
    pruner = MovementPruner(layer, 0.5, 0, 4, 1, pattern="block:1x2", initial_sparsity=0.5)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    # scores -W*G = -G: blocks (row 0: [5, -4] -> 1, [0, 0] -> 0; row 1: [-1, 3] -> 2, [0.5, 0.4] -> 0.9)
    layer.weight.grad = -torch.tensor([[5.0, -4.0, 0.0, 0.0], [-1.0, 3.0, 0.5, 0.4]])
    pruner.step()
    assert layer.weight_mask.tolist() == [[True, True, False, False], [True, True, False, False]]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_movement_training_conv_and_linear(scope):
    model = ConvNet()
    pruner = MovementPruner(model, 0.75, start_step=2, end_step=20, every=3, scope=scope, exclude=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    target = torch.randn(3, 8)
    x = conv_input()
    for t in range(25):
        loss = (model(x) - target).square().mean()
        loss.backward()
        pruner.step()
        opt.step()
        opt.zero_grad()
    counts = {n: model.get_submodule(n).weight_mask.numel() for n in LAYERS}
    pruned = {n: int((~model.get_submodule(n).weight_mask).sum()) for n in LAYERS}
    if scope == "layer":
        assert all(pruned[n] == round(0.75 * counts[n]) for n in LAYERS)
    else:
        assert sum(pruned.values()) == round(0.75 * sum(counts.values()))
    assert pruner.finished
    report = prune.sparsity_report(model)
    assert report.sparsity == pytest.approx(sum(pruned.values()) / sum(counts.values()))


def test_movement_state_dict():
    model = ConvNet()
    pruner = MovementPruner(model, 0.5, 1, 10, 2, exclude=None)
    x = conv_input()
    for _ in range(4):
        model(x).sum().backward()
        pruner.step()
        model.zero_grad()
    sd = copy.deepcopy(pruner.state_dict())
    resumed = ConvNet()
    prune.load_pruned_state_dict(resumed, model.state_dict())
    other = MovementPruner(resumed, 0.5, 1, 10, 2, exclude=None)
    other.load_state_dict(sd)
    assert other.step_count == 4 and not other.finished
    for n in LAYERS:
        assert torch.equal(other.scores[n], pruner.scores[n])
        assert resumed.get_submodule(n).dense_grad
    for _ in range(8):
        for m, p in ((model, pruner), (resumed, other)):
            m(x).sum().backward()
            p.step()
            m.zero_grad()
    assert pruner.finished and other.finished
    for n in LAYERS:
        assert torch.equal(model.get_submodule(n).weight_mask, resumed.get_submodule(n).weight_mask)
        assert not resumed.get_submodule(n).dense_grad


_BAD_PROGRESS = [
    ("step_count", -5, ValueError, r"step_count must be an int >= 0, got -5"),
    ("step_count", 2.5, ValueError, r"step_count must be an int >= 0, got 2.5"),
    ("step_count", True, ValueError, r"step_count must be an int >= 0, got True"),
    ("last_sparsity", float("nan"), ValueError, r"last_sparsity must be in \[0, 1\], got nan"),
    ("last_sparsity", 7.0, ValueError, r"last_sparsity must be in \[0, 1\], got 7.0"),
    ("last_sparsity", "0.5", TypeError, r"last_sparsity must be None or a number, got str"),
    ("config", None, TypeError, r"state_dict\['config'\] must be a dict"),  # was AttributeError: ... 'get'
]
_BAD_MOVEMENT = [  # bool("no") ended the schedule silently
    ("finished", "no", TypeError, r"finished must be a bool, got 'no'"),
    ("finished", None, TypeError, r"finished must be a bool, got None"),
]


@pytest.mark.parametrize("cls, entry, value, exc, match",
                         [(cls, *case) for cls in (GradualPruner, MovementPruner) for case in _BAD_PROGRESS]
                         + [(MovementPruner, *case) for case in _BAD_MOVEMENT])
def test_pruner_state_dict_with_bad_entries_is_refused_unchanged(cls, entry, value, exc, match):
    model = ConvNet()
    pruner = cls(model, 0.5, 1, 10, 2, exclude=None)
    sd = copy.deepcopy(pruner.state_dict())
    sd[entry] = value
    with pytest.raises(exc, match=rf"{cls.__name__}.load_state_dict: {match}"):
        pruner.load_state_dict(sd)
    assert pruner.step_count == 0 and pruner.last_sparsity is None
    if cls is MovementPruner:
        assert not pruner.finished and all(model.get_submodule(n).dense_grad for n in LAYERS)
    if entry == "config":
        gradual = GradualPruner(ConvNet(), 0.5, 1, 10, 2, exclude=None)
        sd = gradual.state_dict()
        sd["config"] = None
        with pytest.raises(TypeError, match=rf"GradualPruner.load_state_dict: {match}"):
            gradual.load_state_dict(sd)
    sd = copy.deepcopy(pruner.state_dict())
    sd["finished"] = torch.tensor(False)  # a bool tensor is fine
    pruner.load_state_dict(sd)


def test_movement_state_dict_with_bad_scores_is_refused_unchanged():
    model = ConvNet()
    pruner = MovementPruner(model, 0.5, 1, 10, 2, exclude=None)
    sd = copy.deepcopy(pruner.state_dict())
    sd["step_count"] = 3
    first = sorted(sd["scores"])[0]
    sd["scores"][first] = sd["scores"][first][:1]
    with pytest.raises(ValueError, match=rf"scores\['{first}'\] must be a float tensor of shape"):
        pruner.load_state_dict(sd)
    sd["scores"] = {first: sd["scores"][first]}
    with pytest.raises(ValueError, match=r"scores must be a dict of the pruner's layers"):
        pruner.load_state_dict(sd)
    assert pruner.step_count == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_movement_pruner_non_finite_weight_leaves_the_scores_alone(bad):
    # -weight * grad of a NaN or inf weight (inf * 0 included) would stay in the scores for good:
    # such a step accumulates nothing, and a pruning step refuses the weight by name before any
    # change (the step count does not move); fixing the weight and stepping again counts the batch once.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    pruner = MovementPruner(model, 0.5, 0, 4, 1, exclude=None)
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    good, g0 = model[0].weight.detach().clone(), model[0].weight.grad.clone()
    with torch.no_grad():
        model[0].weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"the weight of layer '0' contains (NaN|inf)"):
        pruner.step()
    assert all(bool(torch.isfinite(s).all()) and not bool(s.any()) for s in pruner.scores.values())
    assert pruner.step_count == 0
    with torch.no_grad():
        model[0].weight.copy_(good)
    pruner.step()
    assert torch.equal(pruner.scores["0"], -(good * g0))  # this batch's scores, once
    sd = copy.deepcopy(pruner.state_dict())
    sd["scores"]["0"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"scores\['0'\] holds NaN or inf"):
        pruner.load_state_dict(sd)
