"""sparsify / densify: masked nn.Linear <-> SparseLinear (pyfinetune/_sparse_linear.py, written on
another branch). The round-trip tests are skipped until that module can be imported."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

from prune_harness import ConvNet, conv_input
from pyfinetune import prune
from pyfinetune.prune import MaskedConv2d, MaskedLinear

try:
    _sparse_linear = importlib.import_module("pyfinetune._sparse_linear")
    _IMPORT_ERROR = None
except ImportError as e:
    _sparse_linear = None
    _IMPORT_ERROR = e

needs_sparse_linear = pytest.mark.skipif(
    _sparse_linear is None,
    reason=f"pyfinetune._sparse_linear (SparseLinear) cannot be imported: {_IMPORT_ERROR}; it comes with the "
           "sparse kernels branch")


def _pruned_model():
    model = ConvNet()
    prune.magnitude_prune(model, 0.6, exclude="fc2")
    return model


@pytest.mark.skipif(_sparse_linear is not None, reason="pyfinetune._sparse_linear is present")
def test_without_sparse_linear_module():
    assert not hasattr(prune, "SparseLinear")
    with pytest.raises(ImportError, match="SparseLinear"):
        from pyfinetune.prune import SparseLinear  # noqa: F401
    with pytest.raises(ImportError, match="SparseLinear is not available"):
        prune.sparsify(_pruned_model())
    with pytest.raises(ImportError, match="SparseLinear is not available"):
        prune.densify(_pruned_model())
    # everything else works without it
    assert len(prune.sparsity_report(_pruned_model())) == 4


@needs_sparse_linear
def test_reexport():
    assert prune.SparseLinear is _sparse_linear.SparseLinear
    from pyfinetune.prune import SparseLinear
    assert SparseLinear is _sparse_linear.SparseLinear


@needs_sparse_linear
def test_sparsify_replaces_masked_linears():
    model = _pruned_model()
    masked = copy.deepcopy(model)
    x = conv_input()
    assert prune.sparsify(model) is model
    assert isinstance(model.fc1, prune.SparseLinear)
    assert type(model.fc2) is nn.Linear, "unmasked Linear layers stay"
    assert type(model.conv) is MaskedConv2d and type(model.grouped) is MaskedConv2d, "Conv2d layers stay masked"
    sparse = model.fc1
    assert (sparse.in_features, sparse.out_features) == (200, 24)
    assert torch.equal(sparse.dense_mask(), masked.fc1.weight_mask)
    assert torch.equal(sparse.to_dense(), prune.effective_weight(masked.fc1))
    assert torch.equal(prune.effective_weight(sparse), sparse.to_dense())
    assert torch.equal(sparse.bias, masked.fc1.bias)
    assert sparse.values.numel() == int(masked.fc1.weight_mask.sum())
    torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-5)
    report = prune.sparsity_report(model)
    assert report["fc1"].kind == type(sparse).__name__ and report["fc1"].kept == int(masked.fc1.weight_mask.sum())
    assert report.sparsity == prune.sparsity_report(masked).sparsity


@needs_sparse_linear
def test_densify_round_trip():
    model = _pruned_model()
    reference = copy.deepcopy(model)
    prune.sparsify(model)
    assert prune.densify(model) is model
    assert type(model.fc1) is MaskedLinear
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)
    for key in sd:
        if key == "fc1.weight":
            assert torch.equal(sd[key], ref_sd[key] * reference.fc1.weight_mask)
        else:
            assert torch.equal(sd[key], ref_sd[key]), key
    x = conv_input()
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


@needs_sparse_linear
def test_densify_for_export_and_root_layers():
    model = _pruned_model()
    mask = model.fc1.weight_mask.clone()
    prune.densify(prune.sparsify(model), keep_masks=False)
    assert type(model.fc1) is nn.Linear and (model.fc1.weight[~mask] == 0).all()
    layer = nn.Linear(16, 8)
    prune.magnitude_prune(layer, 0.5)
    sparse = prune.sparsify(layer)
    assert isinstance(sparse, prune.SparseLinear)
    dense = prune.densify(sparse)
    assert type(dense) is MaskedLinear and torch.equal(dense.weight_mask, layer.weight_mask)
    nested = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)), nn.Linear(4, 4))
    prune.magnitude_prune(nested, 0.5, exclude="0.0")
    prune.sparsify(nested)
    assert [n for n, m in nested.named_modules() if isinstance(m, prune.SparseLinear)] == ["0.1", "1"]


def test_sparsify_and_densify_keep_frozen_parameters_mode_and_shared_layers():
    # A frozen layer stays frozen, eval mode stays, a layer registered at two places is converted
    # once and stays shared; hooks, which the new layer does not carry, are named in a warning.
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(8, 8))
    prune.magnitude_prune(model, 0.5, exclude=[])
    model[0].requires_grad_(False)
    model[5].bias.requires_grad_(False)
    model.eval()
    x = torch.randn(3, 8)
    before = model(x)
    sparse_cls = type(prune.sparsify(nn.Sequential(copy.deepcopy(model[0])))[0])
    model = prune.sparsify(model)
    assert all(isinstance(model[i], sparse_cls) for i in (0, 2, 4, 5))
    assert model[2] is model[4]
    assert not any(m.training for m in model.modules())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads == {"0.values": False, "0.bias": False, "2.values": True, "2.bias": True, "5.values": True,
                     "5.bias": False}
    torch.testing.assert_close(model(x), before)
    model = prune.densify(model)
    assert all(isinstance(model[i], MaskedLinear) for i in (0, 2, 4, 5)) and model[2] is model[4]
    assert not any(m.training for m in model.modules())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads == {"0.weight": False, "0.bias": False, "2.weight": True, "2.bias": True, "5.weight": True,
                     "5.bias": False}
    torch.testing.assert_close(model(x), before)
    model[0].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"layer at '0' has hooks \(forward_hooks\)"):
        prune.sparsify(model)


class _TiedLM(nn.Module):
    """An input embedding and an output head holding one weight (tie_word_embeddings)."""

    def __init__(self, vocab=40, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))))


def test_tied_head_is_pruned_with_a_warning_and_stays_tied_through_sparsify():
    model = _TiedLM()
    with pytest.warns(UserWarning, match=r"layer 'head' shares its weight with \['embed'\].*zeroes the same entries"):
        prune.magnitude_prune(model, 0.5, exclude=None)
    assert model.head.weight is model.embed.weight
    ids = torch.randint(0, 40, (3, 5))
    before = model(ids)
    with pytest.warns(UserWarning, match=r"sparsify: 'head' \(with 'embed'\) share their weight .* stay masked dense"):
        prune.sparsify(model)
    # The untied SparseLinear would have trained apart from the embedding: the head stays masked.
    assert isinstance(model.head, prune.MaskedLinear) and model.head.weight is model.embed.weight
    assert isinstance(model.body, prune.SparseLinear)
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-6)


def test_transformers_conv1d_layers_are_named_as_not_pruned():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(nn.Linear(8, 8), Conv1D(8, 8), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"1 transformers Conv1D layers \(1\) are not pruned"):
        prune.magnitude_prune(model, 0.5, exclude=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an excluded Conv1D layer is not reported
        prune.magnitude_prune(nn.Sequential(nn.Linear(8, 8), Conv1D(8, 8), nn.Linear(8, 2)), 0.5, exclude=["1"])
    only = nn.Sequential(Conv1D(8, 8))
    with pytest.raises(ValueError, match=r"no prunable layer .*; 1 transformers Conv1D layers \(0\) are not pruned"):
        prune.magnitude_prune(only, 0.5, exclude=None)
    del transformers


def test_a_layer_that_cannot_be_converted_leaves_the_model_unchanged():
    # Every replacement is built before any is put in place: when the second layer's conversion
    # fails (on a GPU, a mask that is not 2:4 for layout="2:4"), the first is not replaced either.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    calls = []

    def convert(module):
        calls.append(module)
        if len(calls) == 2:
            raise ValueError("cannot convert this one")
        return nn.Identity()

    with pytest.raises(ValueError, match=r"test: the layer at '2': cannot convert this one"):  # named
        prune._replace_layers(model, nn.Linear, convert, "test")
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear] and len(calls) == 2
