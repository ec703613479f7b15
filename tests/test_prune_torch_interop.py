"""Models pruned with torch.nn.utils.prune: adopt_torch_pruning, sparsify of such a model, loading
their state_dicts (load_pruned_state_dict), and the clear errors of the pyfinetune pruning calls
that would otherwise put a second mask on a torch-pruned weight."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import pyfinetune
from prune_harness import LAYERS, ConvNet, conv_input, one_thread  # noqa: F401  (fixture)
from pyfinetune import prune
from pyfinetune.prune import MaskedConv2d, MaskedLinear

TORCH_METHODS = ["l1_unstructured", "random_unstructured", "ln_structured", "global_unstructured",
                 "custom_from_mask", "combined"]


def _torch_pruned_convnet(method: str, seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    model = ConvNet()
    layers = [model.get_submodule(n) for n in LAYERS]
    if method == "global_unstructured":
        torch_prune.global_unstructured([(m, "weight") for m in layers], pruning_method=torch_prune.L1Unstructured,
                                        amount=0.7)
        return model
    for m in layers:
        if method == "l1_unstructured":
            torch_prune.l1_unstructured(m, "weight", amount=0.6)
        elif method == "random_unstructured":
            torch_prune.random_unstructured(m, "weight", amount=0.45)
        elif method == "ln_structured":
            torch_prune.ln_structured(m, "weight", amount=0.5, n=2, dim=0)
        elif method == "custom_from_mask":
            torch_prune.custom_from_mask(m, "weight", torch.rand_like(m.weight) > 0.3)
        else:  # two methods on one weight: torch keeps a PruningContainer
            torch_prune.l1_unstructured(m, "weight", amount=0.3)
            torch_prune.ln_structured(m, "weight", amount=0.25, n=1, dim=0)
    return model


@pytest.mark.parametrize("method", TORCH_METHODS)
def test_adopt_keeps_weights_masks_parameters_and_outputs(method):
    model = _torch_pruned_convnet(method)
    x = conv_input()
    before = model(x)
    torch_masks = {n: model.get_submodule(n).weight_mask.clone() for n in LAYERS}
    origs = {n: model.get_submodule(n).weight_orig for n in LAYERS}
    effective = {n: (origs[n] * torch_masks[n]).detach().clone() for n in LAYERS}
    assert prune.adopt_torch_pruning(model) is model
    assert not torch_prune.is_pruned(model)
    for n in LAYERS:
        layer = model.get_submodule(n)
        assert type(layer) is (MaskedConv2d if n in ("conv", "grouped") else MaskedLinear)
        assert layer.weight is origs[n], "the same Parameter: optimizers built on weight_orig keep working"
        assert layer.weight_mask.dtype == torch.bool
        assert torch.equal(layer.weight_mask, torch_masks[n] != 0)
        assert torch.equal(layer.weight.detach(), effective[n])
        assert not layer.weight_mask.all(), "the case prunes something"
    assert torch.equal(model(x), before)
    keys = set(model.state_dict())
    assert not any(k.endswith("weight_orig") for k in keys)
    assert {f"{n}.weight_mask" for n in LAYERS} <= keys and {f"{n}.weight" for n in LAYERS} <= keys


def test_adopt_then_train_keeps_pruned_weights_zero():
    model = _torch_pruned_convnet("global_unstructured", seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # built on weight_orig
    prune.adopt_torch_pruning(model)
    prune.mask_optimizer(opt, model)
    fused_model = _torch_pruned_convnet("global_unstructured", seed=1)
    fused = pyfinetune.optim.AdamW(fused_model.parameters(), lr=1e-2, weight_decay=0.1)
    prune.adopt_torch_pruning(fused_model)
    prune.mask_optimizer(fused, fused_model)
    for step in range(20):
        x = conv_input()
        for m, o in ((model, opt), (fused_model, fused)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for m in (model, fused_model):
        for n in LAYERS:
            layer = m.get_submodule(n)
            assert not layer.weight[~layer.weight_mask].any()
            assert layer.weight[layer.weight_mask].abs().min() > 0 or layer.weight_mask.sum() == 0
    torch.testing.assert_close(fused_model(x), model(x), rtol=1e-4, atol=1e-5)


def test_sparsify_adopts_a_torch_pruned_model():
    model = _torch_pruned_convnet("l1_unstructured")
    x = conv_input()
    before = model(x)
    masks = {n: model.get_submodule(n).weight_mask != 0 for n in ("fc1", "fc2")}
    prune.sparsify(model)
    assert type(model.fc1).__name__ == "SparseLinear" and type(model.fc2).__name__ == "SparseLinear"
    assert type(model.conv) is MaskedConv2d and type(model.grouped) is MaskedConv2d
    for n, mask in masks.items():
        assert model.get_submodule(n).nnz == int(mask.sum())
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_a_pyfinetune_masked_layer_pruned_by_torch_adopts_torch_mask():
    layer = nn.Linear(8, 4)
    prune.magnitude_prune(layer, 0.5, exclude=None)
    torch_prune.l1_unstructured(layer, "weight", 0.75)
    torch_mask = layer.weight_mask.clone()
    with pytest.raises(TypeError, match="adopt_torch_pruning"):
        layer(torch.randn(2, 8))
    prune.adopt_torch_pruning(layer)
    assert type(layer) is MaskedLinear and layer.dense_grad is False
    assert torch.equal(layer.weight_mask, torch_mask != 0)
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), x @ (layer.weight * layer.weight_mask).t() + layer.bias)


def test_adopt_leaves_other_pruning_with_a_warning():
    model = nn.Sequential(nn.Conv1d(3, 4, 2), nn.Flatten(), nn.Linear(4 * 4, 6))
    torch_prune.l1_unstructured(model[0], "weight", 0.5)
    torch_prune.l1_unstructured(model[2], "weight", 0.5)
    torch_prune.l1_unstructured(model[2], "bias", 0.5)
    with pytest.warns(UserWarning, match=r"0\.weight \(Conv1d, torch\.nn\.utils\.prune\), 2\.bias \(Linear, torch\.nn\.utils\.prune\)"):
        prune.adopt_torch_pruning(model)
    assert type(model[2]) is MaskedLinear and hasattr(model[2], "bias_orig")
    assert hasattr(model[0], "weight_orig"), "the Conv1d keeps torch's pruning"
    model(torch.randn(2, 3, 5))  # still runs


def test_adopt_refuses_a_mask_that_scales_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    torch_prune.l1_unstructured(model[0], "weight", 0.5)
    torch_prune.custom_from_mask(model[1], "weight", torch.full((4, 4), 0.5))
    with pytest.raises(ValueError, match=r"layer '1'.*other than 0 and 1.*nothing was changed"):
        prune.adopt_torch_pruning(model)
    assert torch_prune.is_pruned(model[0]) and type(model[0]) is nn.Linear, "no layer was adopted"


def test_adopt_of_an_unpruned_model_is_a_no_op():
    model = ConvNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune.adopt_torch_pruning(model)
    assert all(type(model.get_submodule(n)) in (nn.Linear, nn.Conv2d) for n in LAYERS)
    with pytest.raises(TypeError, match="adopt_torch_pruning: model must be an nn.Module"):
        prune.adopt_torch_pruning("model")


@pytest.mark.parametrize("call", ["magnitude_prune", "GradualPruner", "attach_mask", "load_pruned_state_dict"])
def test_pyfinetune_pruning_of_a_torch_pruned_layer_is_refused(call):
    model = _torch_pruned_convnet("l1_unstructured")
    with pytest.raises(ValueError, match=r"\['conv', 'grouped', 'fc1', 'fc2'\]|\['module'\]"):
        try:
            if call == "magnitude_prune":
                prune.magnitude_prune(model, 0.8, exclude=None)
            elif call == "GradualPruner":
                prune.GradualPruner(model, 0.8, 0, 10, 1, exclude=None)
            elif call == "attach_mask":
                prune.attach_mask(model.fc1)
            else:
                prune.load_pruned_state_dict(model, ConvNet().state_dict())
        except ValueError as e:
            assert "adopt_torch_pruning" in str(e)
            raise
    assert all(hasattr(model.get_submodule(n), "weight_orig") for n in LAYERS), "nothing changed"


@pytest.mark.parametrize("method", ["global_unstructured", "combined"])
def test_load_pruned_state_dict_reads_torch_pruning_keys(method):
    src = _torch_pruned_convnet(method)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    keys = list(sd)
    dst = ConvNet()
    result = prune.load_pruned_state_dict(dst, sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(sd) == keys, "the caller's state_dict is not changed"
    x = conv_input()
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    for n in LAYERS:
        assert torch.equal(dst.get_submodule(n).weight_mask, src.get_submodule(n).weight_mask != 0)
    # the same through a live adoption: the same state (torch's remove re-registers the weight
    # after the bias, so the key order differs)
    prune.adopt_torch_pruning(src)
    assert sorted(dst.state_dict()) == sorted(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_pruned_state_dict_torch_keys_errors():
    sd = _torch_pruned_convnet("l1_unstructured").state_dict()
    bad = dict(sd)
    bad["fc1.weight_mask"] = bad["fc1.weight_mask"] * 0.5
    with pytest.raises(ValueError, match="fc1.weight_mask holds values other than 0 and 1"):
        prune.load_pruned_state_dict(ConvNet(), bad)
    bad = dict(sd)
    bad["fc2.weight_mask"] = torch.ones(3, 3)
    with pytest.raises(ValueError, match="fc2.weight_orig and fc2.weight_mask .* one shape"):
        prune.load_pruned_state_dict(ConvNet(), bad)


# ------------------------------------------------------------------ torch.ao.pruning sparsifiers
def _sparsified_convnet(seed: int = 0) -> ConvNet:
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(seed)
    model = ConvNet()
    sparsifier = WeightNormSparsifier(sparsity_level=0.6, sparse_block_shape=(1, 4), zeros_per_block=4)
    sparsifier.prepare(model, config=[{"tensor_fqn": f"{n}.weight"} for n in ("fc1", "fc2")])
    sparsifier.step()
    return model


def test_adopt_a_torch_ao_sparsifier():
    model = _sparsified_convnet()
    x = conv_input()
    before = model(x)
    originals = {n: model.get_submodule(n).parametrizations.weight.original for n in ("fc1", "fc2")}
    masks = {n: model.get_submodule(n).parametrizations.weight[0].mask.clone() for n in ("fc1", "fc2")}
    with pytest.warns(UserWarning, match="adopt_torch_pruning"):   # magnitude_prune names the way
        with pytest.raises(ValueError, match="no prunable layer"):
            prune.magnitude_prune(model, 0.5, include=["fc1", "fc2"], exclude=None)
    prune.adopt_torch_pruning(model)
    for n in ("fc1", "fc2"):
        layer = model.get_submodule(n)
        assert type(layer) is MaskedLinear and layer.weight is originals[n]
        assert torch.equal(layer.weight_mask, masks[n] != 0) and 0 < layer.weight_mask.float().mean() < 1
        assert not layer.weight[~layer.weight_mask].any()
    assert type(model.conv) is nn.Conv2d, "an unpruned layer stays plain"
    assert torch.equal(model(x), before)
    assert "fc1.weight_mask" in model.state_dict() and "fc1.parametrizations.weight.original" not in model.state_dict()


def test_sparsify_adopts_a_torch_ao_sparsifier():
    model = _sparsified_convnet(seed=2)
    x = conv_input()
    before = model(x)
    prune.sparsify(model)
    assert type(model.fc1).__name__ == "SparseLinear" and type(model.fc2).__name__ == "SparseLinear"
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_adopt_leaves_fake_sparsity_mixed_with_other_parametrizations():
    model = _sparsified_convnet()
    torch.nn.utils.parametrizations.weight_norm(model.fc2)
    with pytest.warns(UserWarning, match=r"fc2\.weight \(other parametrizations too, torch\.ao\.pruning FakeSparsity\)"):
        prune.adopt_torch_pruning(model)
    assert type(model.fc1) is MaskedLinear
    assert nn.utils.parametrize.is_parametrized(model.fc2, "weight")


def test_load_pruned_state_dict_reads_a_bool_torch_mask():
    src = _torch_pruned_convnet("l1_unstructured")
    sd = {k: (v.bool() if k.endswith("weight_mask") else v) for k, v in src.state_dict().items()}
    dst = ConvNet()
    prune.load_pruned_state_dict(dst, sd)
    x = conv_input()
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# ------------------------------------------------------------------ review findings
class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, i):
        return self.head(torch.relu(self.body(self.emb(i))))


def test_adopt_warns_for_a_weight_tied_to_another_module():
    model = _TiedLM()
    torch_prune.l1_unstructured(model.head, "weight", 0.5)
    mask = model.head.weight_mask != 0
    with pytest.warns(UserWarning, match=r"layers 'head' \(with \['emb'\]\) share their weight .* zero there too"):
        prune.adopt_torch_pruning(model)
    assert model.emb.weight is model.head.weight and not model.emb.weight[~mask].any()


def test_adopt_refuses_two_torch_pruned_layers_sharing_a_weight():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    torch_prune.l1_unstructured(a, "weight", 0.5)
    torch_prune.l1_unstructured(b, "weight", 0.25)
    with pytest.raises(ValueError, match=r"layers \['0', '1'\] are pruned by torch and share one weight"):
        prune.adopt_torch_pruning(model)
    assert torch_prune.is_pruned(a) and torch_prune.is_pruned(b), "nothing changed"


def test_adopt_leaves_layers_it_cannot_convert_whole():
    # A FakeSparsity on a layer whose bias is parametrized too, and a torch-pruned subclass of
    # MaskedLinear: each used to fail halfway (KeyError) with its mask already removed.
    class Half(nn.Module):
        def forward(self, x):
            return x / 2

    class MyMasked(MaskedLinear):
        pass

    model = _sparsified_convnet()
    nn.utils.parametrize.register_parametrization(model.fc1, "bias", Half())
    mine = MyMasked(4, 4)
    torch_prune.l1_unstructured(mine, "weight", 0.5)
    model.extra = mine
    with pytest.warns(UserWarning, match=r"fc1\.weight \(its other tensors are parametrized too.*extra\.weight \(MyMasked"):
        prune.adopt_torch_pruning(model)
    assert type(model.fc2) is MaskedLinear
    assert nn.utils.parametrize.is_parametrized(model.fc1, "weight"), "left as it was"
    assert hasattr(mine, "weight_orig") and torch_prune.is_pruned(mine)
    model(conv_input())


def test_adopted_parameters_keep_a_fresh_models_order_and_optimizer_state_carries_over():
    src = _torch_pruned_convnet("l1_unstructured")
    prune.adopt_torch_pruning(src)
    fresh = ConvNet()
    assert [n for n, _ in src.named_parameters()] == [n for n, _ in fresh.named_parameters()]
    opt = torch.optim.AdamW(src.parameters(), lr=1e-3)
    src(conv_input()).sum().backward()
    opt.step()
    prune.load_pruned_state_dict(fresh, src.state_dict())
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    fresh(conv_input()).sum().backward()
    opt2.step()  # shapes line up parameter by parameter


def test_load_pruned_state_dict_leaves_torch_pruning_of_other_layers_alone():
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv1d(3, 4, 2), nn.Flatten(), nn.Linear(16, 6))
        torch_prune.l1_unstructured(m[0], "weight", 0.5)
        torch_prune.l1_unstructured(m[2], "weight", 0.5)
        return m

    src = build()
    with pytest.warns(UserWarning, match="Conv1d"):
        prune.adopt_torch_pruning(src)
    dst = build()
    with pytest.warns(UserWarning, match="Conv1d"):
        prune.adopt_torch_pruning(dst)           # a model pruned the same way, adopted the same way
    prune.load_pruned_state_dict(dst, src.state_dict())   # no refusal for the Conv1d torch keeps
    x = torch.randn(2, 3, 5)
    assert torch.equal(dst(x), src(x))
    # into a plain model, the Linear's pair converts and the Conv1d's stays torch's
    result = prune.load_pruned_state_dict(nn.Sequential(nn.Conv1d(3, 4, 2), nn.Flatten(), nn.Linear(16, 6)),
                                          build().state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == ["0.weight_mask", "0.weight_orig"]
    assert result.missing_keys == ["0.weight"]


def test_attach_mask_on_a_sparsifier_layer_names_adoption():
    model = _sparsified_convnet()
    with pytest.raises(TypeError, match="FakeSparsity parametrization.*adopt_torch_pruning"):
        prune.attach_mask(model.fc1)
