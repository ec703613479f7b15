"""magnitude_prune: exact counts per layer and over the model, the 2:4 and block patterns, ties,
include/exclude, and the argument errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import device_dtype_params
from prune_harness import LAYERS, ConvNet, as_matrix, block_mask_units, block_norms, ref_unstructured
from pyfinetune import prune
from pyfinetune.prune import MaskedConv2d, MaskedLinear, magnitude_prune

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _weights(model, names=LAYERS):
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


@pytest.mark.parametrize("device, dtype", device_dtype_params(FLOAT_DTYPES))
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_unstructured_exact(device, dtype, scope, sparsity):
    model = ConvNet(dtype, device)
    before = _weights(model)
    norm_before = [p.detach().clone() for p in model.norm.parameters()]
    biases = {n: model.get_submodule(n).bias for n in LAYERS if model.get_submodule(n).bias is not None}
    bias_before = {n: b.detach().clone() for n, b in biases.items()}
    masks = prune.magnitude_prune(model, sparsity, scope=scope, exclude=None)

    assert list(masks) == LAYERS
    expected = ref_unstructured(before, sparsity, scope)
    for name in LAYERS:
        layer = model.get_submodule(name)
        mask = masks[name]
        assert mask is layer.weight_mask and mask.dtype == torch.bool and mask.shape == layer.weight.shape
        assert torch.equal(mask, expected[name]), name
        # pruned weights are exactly zero, kept ones untouched
        assert (layer.weight[~mask] == 0).all()
        assert torch.equal(layer.weight[mask], before[name][mask])
        if scope == "layer":
            assert int((~mask).sum()) == round(sparsity * mask.numel())
    if scope == "global":
        total = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    # biases and norms untouched, not masked
    for name, b in biases.items():
        assert torch.equal(b, bias_before[name])
    assert all(torch.equal(a, b) for a, b in zip(model.norm.parameters(), norm_before))
    assert type(model.norm) is nn.LayerNorm
    assert isinstance(model.conv, MaskedConv2d) and isinstance(model.fc1, MaskedLinear)
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.conv, nn.Conv2d)


def test_global_prunes_the_smallest_over_all_layers():
    # Layers of different scales: global pruning takes almost everything from the small one.
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    with torch.no_grad():
        model[0].weight.uniform_(-1e-3, 1e-3)
        model[1].weight.uniform_(0.5, 1.0).mul_(torch.randn(10, 10).sign())
    masks = prune.magnitude_prune(model, 0.5, scope="global", exclude=None)
    assert int((~masks["0"]).sum()) == 100 and int((~masks["1"]).sum()) == 0


def test_rounding_is_python_round():
    # 0.5 * 9 = 4.5 -> 4 (half to even); 0.3 * 35 = 10.5 -> 10; 0.7 * 35 = 24.5 -> 24
    for n_in, s, k in [(9, 0.5, 4), (35, 0.3, 10), (35, 0.7, 24), (35, 0.31, 11)]:
        layer = nn.Linear(n_in, 1)
        mask = prune.magnitude_prune(layer, s)[""]
        assert int((~mask).sum()) == k == round(s * n_in)


def test_ties_lower_index_first():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(-1.0)   # same magnitude
    masks = prune.magnitude_prune(model, 0.5, scope="layer", exclude=None)
    assert torch.equal(~masks["0"].reshape(-1), torch.arange(12) < 6)
    assert torch.equal(~masks["1"].reshape(-1), torch.arange(8) < 4)

    model2 = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        for p in model2.parameters():
            p.fill_(2.0)
    # round(14) of 20: all 12 of the first + 2
    masks = prune.magnitude_prune(model2, 0.7, scope="global", exclude=None)
    assert not masks["0"].any()
    assert torch.equal(~masks["1"].reshape(-1), torch.arange(8) < 2)


def test_repruning_only_grows_masks():
    # Already-pruned entries rank first, ahead of real zeros and ties, so masks are nested.
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight[:, :3] = 0.0          # real zeros that tie with pruned entries
    m1 = prune.magnitude_prune(layer, 0.4)[""].clone()
    m2 = prune.magnitude_prune(layer, 0.6)[""].clone()
    m3 = prune.magnitude_prune(layer, 0.6)[""].clone()
    assert not (m2 & ~m1).any(), "a pruned weight came back"
    assert torch.equal(m2, m3)
    assert int((~m2).sum()) == round(0.6 * 128)


@pytest.mark.parametrize("device, dtype", device_dtype_params(FLOAT_DTYPES))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_2_4(device, dtype, scope):
    model = ConvNet(dtype, device)
    before = _weights(model)
    masks = prune.magnitude_prune(model, 0.5, scope=scope, pattern="2:4", exclude=None)
    for name in LAYERS:
        groups = as_matrix(masks[name]).reshape(-1, 4)
        assert (groups.sum(dim=1) == 2).all(), name
        w = as_matrix(model.get_submodule(name).weight).reshape(-1, 4)
        assert ((w == 0).sum(dim=1) >= 2).all(), "every group of 4 has at least 2 zeros"
        # the kept two are the two largest of each group (ties: the lower index is pruned)
        mag = as_matrix(before[name]).reshape(-1, 4).double().abs()
        order = torch.sort(mag, dim=1, stable=True).indices
        expected = torch.ones_like(groups).scatter_(1, order[:, :2], False)
        assert torch.equal(groups, expected), name


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("sparsity", [0.2, 0.37])
def test_2_4_below_half(scope, sparsity):
    # Below 0.5, the pruned weights are the lowest-ranked of the 2:4 candidates: no group loses
    # more than 2, and the count is exact.
    model = ConvNet()
    before = _weights(model)
    masks = prune.magnitude_prune(model, sparsity, scope=scope, pattern="2:4", exclude=None)
    for name in LAYERS:
        groups = as_matrix(masks[name]).reshape(-1, 4)
        assert ((~groups).sum(dim=1) <= 2).all()
        if scope == "layer":
            assert int((~groups).sum()) == round(sparsity * groups.numel())
    if scope == "global":
        total = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    # every pruned weight is at most the smallest kept candidate of the same pool (layer: per layer)
    if scope == "layer":
        for name in LAYERS:
            mag = as_matrix(before[name]).reshape(-1, 4).abs()
            m = as_matrix(masks[name]).reshape(-1, 4)
            rank = torch.sort(mag, dim=1, stable=True).indices
            cand = torch.zeros_like(m).scatter_(1, rank[:, :2], True)
            assert mag[~m].max() <= mag[cand & m].min()


def test_n_m_general():
    layer = nn.Linear(12, 5)
    mask = prune.magnitude_prune(layer, 2 / 3, pattern="1:3")[""]
    assert (mask.reshape(-1, 3).sum(dim=1) == 1).all()


@pytest.mark.parametrize("device, dtype", device_dtype_params(FLOAT_DTYPES))
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("rows, cols", [(2, 4), (4, 1), (1, 4), (8, 4)])
def test_block(device, dtype, scope, rows, cols):
    model = ConvNet(dtype, device)
    before = _weights(model)
    sparsity = 0.4
    masks = prune.magnitude_prune(model, sparsity, scope=scope, pattern=f"block:{rows}x{cols}", exclude=None)
    pruned_norms, kept_norms, n_blocks, n_pruned = [], [], 0, 0
    for name in LAYERS:
        kept, uniform = block_mask_units(masks[name], rows, cols)
        assert uniform, f"{name}: a block is partly pruned"
        norms = block_norms(before[name], rows, cols)
        if scope == "layer":
            assert int((~kept).sum()) == round(sparsity * kept.numel())
            assert norms[~kept].max() <= norms[kept].min() * (1 + 1e-6)
        pruned_norms.append(norms[~kept])
        kept_norms.append(norms[kept])
        n_blocks += kept.numel()
        n_pruned += int((~kept).sum())
        assert (model.get_submodule(name).weight[~masks[name]] == 0).all()
    if scope == "global":
        assert n_pruned == round(sparsity * n_blocks)
        assert torch.cat(pruned_norms).max() <= torch.cat(kept_norms).min() * (1 + 1e-6)


def test_block_ties_lower_index_first():
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    mask = prune.magnitude_prune(layer, 0.5, pattern="block:2x2")[""]
    expected = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_include_exclude():
    def fresh():
        return ConvNet()

    assert list(prune.magnitude_prune(fresh(), 0.5, include="fc*", exclude=None)) == ["fc1", "fc2"]
    assert list(prune.magnitude_prune(fresh(), 0.5, include=["conv", "fc2"], exclude=None)) == ["conv", "fc2"]
    assert list(prune.magnitude_prune(fresh(), 0.5, exclude="fc*")) == ["conv", "grouped"]
    assert list(prune.magnitude_prune(fresh(), 0.5, include="*", exclude=("grouped", "fc1"))) == ["conv", "fc2"]
    only_conv = prune.magnitude_prune(fresh(), 0.5, include=lambda name, m: isinstance(m, nn.Conv2d), exclude=None)
    assert list(only_conv) == ["conv", "grouped"]
    model = fresh()
    prune.magnitude_prune(model, 0.5, exclude=lambda name, m: m.weight.ndim == 4)
    assert type(model.conv) is nn.Conv2d and type(model.fc1) is MaskedLinear
    # a generator of globs is read once
    assert list(prune.magnitude_prune(fresh(), 0.5, include=(g for g in ["fc1"]), exclude=None)) == ["fc1"]


def test_nested_names_and_root_layer():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    assert list(prune.magnitude_prune(model, 0.5, include="0.*")) == ["0.0"]
    layer = nn.Linear(8, 2)
    masks = prune.magnitude_prune(layer, 0.25)
    assert list(masks) == [""] and type(layer) is MaskedLinear


def test_subclasses_are_not_pruned():
    # nn.MultiheadAttention's out_proj is a Linear subclass the attention never calls.
    model = nn.ModuleDict(dict(attn=nn.MultiheadAttention(8, 2), fc=nn.Linear(8, 8)))
    assert prune.default_exclusions(model) == ["fc"]
    assert list(prune.magnitude_prune(model, 0.5, exclude=None)) == ["fc"]


def test_default_exclusions_stem_and_classifier():
    # ConvNet: the first Conv2d is the stem, the last Linear the classifier
    assert prune.default_exclusions(ConvNet()) == ["conv", "fc2"]
    model = ConvNet()
    assert list(prune.magnitude_prune(model, 0.5)) == ["grouped", "fc1"]
    assert type(model.conv) is nn.Conv2d and type(model.fc2) is nn.Linear
    for cls in (prune.GradualPruner, prune.MovementPruner):
        assert [name for name, _ in cls(ConvNet(), 0.5, 0, 4, 1).layers] == ["grouped", "fc1"]
    # a pruner saved before the default (every layer) resumes with exclude=None, and says so
    saved = prune.GradualPruner(ConvNet(), 0.5, 0, 4, 1, exclude=None).state_dict()
    with pytest.raises(ValueError, match="layers differ.*exclude=None"):
        prune.GradualPruner(ConvNet(), 0.5, 0, 4, 1).load_state_dict(saved)
    # an explicit exclude replaces the default; None prunes everything
    assert list(prune.magnitude_prune(ConvNet(), 0.5, exclude="fc*")) == ["conv", "grouped"]
    assert list(prune.magnitude_prune(ConvNet(), 0.5, exclude=None)) == LAYERS
    combined = [*prune.default_exclusions(ConvNet()), "grouped"]
    assert list(prune.magnitude_prune(ConvNet(), 0.5, exclude=combined)) == ["fc1"]
    # "default" as a glob, in a list, is a module name
    named = nn.ModuleDict(dict(default=nn.Linear(4, 4), out=nn.Linear(4, 2)))
    assert list(prune.magnitude_prune(named, 0.5, exclude=["default"])) == ["out"]
    # no convolution: only the classifier
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert prune.default_exclusions(mlp) == ["4"]


def test_default_exclusions_tiny_models():
    # a model that is one layer is pruned whole: nothing is excluded
    for layer in (nn.Linear(8, 2), nn.Conv2d(3, 4, 3)):
        assert prune.default_exclusions(layer) == []
        assert list(prune.magnitude_prune(layer, 0.5)) == [""]
    # a container whose only layer is the classifier: a clear error, nothing pruned
    model = nn.Sequential(nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"default exclusions \['0'\].*exclude=None"):
        prune.magnitude_prune(model, 0.5)
    with pytest.raises(ValueError, match=r"default exclusions \['0'\].*exclude=None"):
        prune.GradualPruner(model, 0.5, 0, 4, 1)
    assert type(model[0]) is nn.Linear
    assert list(prune.magnitude_prune(model, 0.5, exclude=None)) == ["0"]
    # stem and classifier are all there is
    with pytest.raises(ValueError, match=r"default exclusions \['0', '2'\]"):
        prune.magnitude_prune(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)), 0.5)


def test_default_classifier_from_model_hooks():
    class WithClassifier(nn.Module):  # timm's convention
        def __init__(self, head):
            super().__init__()
            self.head, self.proj = head, nn.Linear(4, 4)   # the head is not the last Linear

        def forward(self, x):
            return self.head(self.proj(x))

        def get_classifier(self):
            return self.head

    assert prune.default_exclusions(WithClassifier(nn.Linear(4, 3))) == ["head"]
    nested = WithClassifier(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)))
    assert prune.default_exclusions(nested) == ["head.2"]
    # timm with num_classes=0: the classifier is an nn.Identity, nothing is excluded
    assert prune.default_exclusions(WithClassifier(nn.Identity())) == []

    class LM(nn.Module):  # transformers' convention
        def __init__(self):
            super().__init__()
            self.lm_head, self.body = nn.Linear(4, 10), nn.Linear(4, 4)

        def get_output_embeddings(self):
            return self.lm_head

    assert prune.default_exclusions(LM()) == ["lm_head"]
    with pytest.raises(TypeError, match="model"):
        prune.default_exclusions("resnet")


@pytest.mark.parametrize("bad, exc, words", [
    (-0.1, ValueError, "sparsity"), (1.5, ValueError, "sparsity"), (math.nan, ValueError, "sparsity"),
    ("0.5", TypeError, "sparsity"), (True, TypeError, "sparsity"), (None, TypeError, "sparsity"),
])
def test_error_sparsity(bad, exc, words):
    with pytest.raises(exc, match=words):
        prune.magnitude_prune(nn.Linear(4, 4), bad)


@pytest.mark.parametrize("pattern", ["structured", "4:2", "0:4", "2:2", "block:0x4", "block:4", "block:2x2x2",
                                     "2 : 4", "Block:2x2"])
def test_error_unknown_pattern(pattern):
    with pytest.raises(ValueError, match="pattern"):
        prune.magnitude_prune(nn.Linear(8, 8), 0.5, pattern=pattern)


def test_error_pattern_type_and_scope():
    with pytest.raises(TypeError, match="pattern"):
        prune.magnitude_prune(nn.Linear(8, 8), 0.5, pattern=None)
    with pytest.raises(ValueError, match="scope"):
        prune.magnitude_prune(nn.Linear(8, 8), 0.5, scope="model")


def test_error_pattern_does_not_divide():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(6, 8))
    with pytest.raises(ValueError, match=r"pattern '2:4'.*'1'.*multiple of 4, got 6"):
        prune.magnitude_prune(model, 0.5, pattern="2:4", exclude=None)
    with pytest.raises(ValueError, match=r"pattern 'block:4x4' does not divide layer '1'"):
        prune.magnitude_prune(model, 0.5, pattern="block:4x4", exclude=None)
    with pytest.raises(ValueError, match=r"block:3x2.*does not divide"):
        prune.magnitude_prune(nn.Linear(8, 8), 0.5, pattern="block:3x2")
    # a Conv2d's input is in/groups * kh * kw: 3 * 3 * 3 = 27
    with pytest.raises(ValueError, match="multiple of 4, got 27"):
        prune.magnitude_prune(nn.Conv2d(3, 4, 3), 0.5, pattern="2:4")
    # nothing was pruned by the failed calls
    assert type(model[0]) is nn.Linear


def test_error_2_4_sparsity_too_high():
    with pytest.raises(ValueError, match=r"sparsity=0.6 .*'2:4'.*<= 0.5"):
        prune.magnitude_prune(nn.Linear(8, 8), 0.6, pattern="2:4")


def test_error_no_layer_matched():
    with pytest.raises(ValueError, match="no prunable layer"):
        prune.magnitude_prune(nn.Sequential(nn.ReLU(), nn.Embedding(4, 4)), 0.5)
    with pytest.raises(ValueError, match="no prunable layer.*include='head'"):
        prune.magnitude_prune(ConvNet(), 0.5, include="head")
    with pytest.raises(ValueError, match="no prunable layer"):
        prune.magnitude_prune(ConvNet(), 0.5, exclude="*")
    with pytest.raises(TypeError, match="include"):
        prune.magnitude_prune(ConvNet(), 0.5, include=3)
    with pytest.raises(TypeError, match="model"):
        prune.magnitude_prune(torch.zeros(3), 0.5)


def test_error_tied_weights_and_nan():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(ValueError, match="share one weight"):
        prune.magnitude_prune(nn.Sequential(a, b), 0.5, exclude=None)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[0, 0] = math.nan
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="layer '1' contains NaN"):
        prune.magnitude_prune(model, 0.5, exclude=None)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, before), "nothing was pruned"


def test_infinite_magnitude_is_kept():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[math.inf, 1.0, -math.inf, 2.0]]))
    mask = prune.magnitude_prune(layer, 0.5)[""]
    assert mask.tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block:1x2"])
def test_layers_without_outputs(pattern):
    # A layer with 0 outputs (nn.Linear(8, 0), nn.Conv2d(2, 0, 2)) gave ZeroDivisionError: its
    # [out, in] matrix shape was taken as numel // out.
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 0), nn.Conv2d(2, 0, 2), nn.Linear(8, 4))
    masks = magnitude_prune(model, 0.5, scope="global", pattern=pattern, exclude=None)
    assert masks["1"].shape == (0, 8) and masks["2"].shape == (0, 2, 2, 2)
    assert int((~masks["0"]).sum()) + int((~masks["3"]).sum()) == 48  # half of 64 + 32
    pruner = prune.GradualPruner(nn.Sequential(nn.Linear(8, 0), nn.Linear(8, 4)), 0.5, 0, 2, 1, exclude=None,
                                 pattern=pattern)
    for _ in range(3):
        pruner.step()
    assert int((~pruner.layers[1][1].weight_mask).sum()) == 16
    sparse = prune.sparsify(model[:2])
    assert sparse[1].nnz == 0 and sparse(torch.randn(3, 8)).shape == (3, 0)


def test_magnitude_prune_matches_sort_reference_on_large_layer():
    # kthvalue selection against a full stable sort, with many ties (quantized values)
    layer = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-20, 21, (64, 256)).float())
    before = layer.weight.detach().clone()
    mask = prune.magnitude_prune(layer, 0.61)[""]
    assert torch.equal(mask, ref_unstructured({"": before}, 0.61, "layer")[""])


def test_numpy_sparsity_and_non_module_models():
    np = pytest.importorskip("numpy")
    for value in (np.float32(0.5), np.float64(0.5)):
        layer = nn.Linear(8, 8)
        magnitude_prune(layer, value)
        assert int(layer.weight_mask.sum()) == 32
    calls = {
        "magnitude_prune": lambda: magnitude_prune("model", 0.5),
        "sparsify": lambda: prune.sparsify("model"),
        "densify": lambda: prune.densify(3),
        "sparsity_report": lambda: prune.sparsity_report(3),
        "remove_masks": lambda: prune.remove_masks(None),
        "GradualPruner": lambda: prune.GradualPruner([nn.Linear(2, 2)], 0.5, 0, 10, 1),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=f"{name}: model must be an nn.Module"):
            call()


def test_pruner_load_state_dict_refuses_other_states():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    gradual = prune.GradualPruner(model, 0.5, 0, 10, 1, exclude=None)
    with pytest.raises(ValueError, match="lacks 'step_count', 'last_sparsity', 'config'"):
        gradual.load_state_dict({})
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        gradual.load_state_dict([1])
    movement = prune.MovementPruner(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), 0.5, 0, 10, 1, exclude=None)
    with pytest.raises(ValueError, match="lacks 'scores', 'finished'.*GradualPruner's state dict"):
        movement.load_state_dict(gradual.state_dict())


def test_a_model_sharded_by_fsdp2_is_refused_with_advice():
    # fully_shard swaps each module's class for an FSDP subclass (FSDPLinear): not an exact nn.Linear.
    FSDPLinear = type("FSDPLinear", (nn.Linear,), {})
    model = nn.Sequential(FSDPLinear(4, 4), FSDPLinear(4, 2))
    with pytest.raises(ValueError, match="sharded by FSDP2 .*before fully_shard"):
        magnitude_prune(model, 0.5, exclude=None)
