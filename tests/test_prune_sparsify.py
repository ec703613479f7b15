"""sparsify / densify: masked nn.Linear <-> SparseLinear (pyfinetune/_sparse_linear.py, written on
another branch). The round-trip tests are skipped until that module can be imported."""

from __future__ import annotations

import copy
import importlib

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
