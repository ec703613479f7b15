"""Pruning workflow: masks on ``nn.Linear`` / ``nn.Conv2d`` weights, one-shot magnitude pruning,
gradual (Zhu & Gupta 2017) and movement (Sanh et al. 2020) pruning, masks that hold through
training, and conversion to :class:`SparseLinear` for inference.

How a mask attaches
-------------------
Pruning a layer swaps its class, in place, to a masked subclass (``nn.Linear`` ->
:class:`MaskedLinear`, ``nn.Conv2d`` -> :class:`MaskedConv2d`) and registers a bool buffer
``weight_mask`` of the weight's shape (True = kept). The masked forward multiplies the weight by the
mask, so the layer computes with ``weight * weight_mask`` whatever is stored at pruned positions.
Why a class swap (and not a forward pre-hook or ``torch.nn.utils.parametrize``):

* the parameter stays ``<layer>.weight`` (same tensor, same name): optimizers built before pruning
  keep working, and ``state_dict`` gains exactly one key per layer, ``<layer>.weight_mask``;
* the masked classes are plain module-level ``nn.Module`` subclasses: ``pickle``, ``copy.deepcopy``
  and ``torch.compile`` treat them like any module (parametrized modules refuse to pickle);
* ``isinstance(layer, nn.Linear)`` still holds, and :func:`remove_masks` swaps back.

Only modules whose type is exactly ``nn.Linear`` or ``nn.Conv2d`` are pruned: a subclass may have
its own forward, which the masked forward would replace (``nn.MultiheadAttention.out_proj`` is
such a subclass, and the attention reads its weight without calling it; ``in_proj_weight`` is a
bare parameter: the attention of ``nn.MultiheadAttention``, hence of torchvision's ViT, stays
dense).

What is pruned by default
-------------------------
The first convolution (the stem, which reads the image; a ViT's patch embedding) and the
classifier (the last linear layer, which produces the logits) are left dense unless asked for:
they hold few of the weights and pruning them costs the most accuracy. ``exclude="default"``, the
default of :func:`magnitude_prune` and the pruners, excludes :func:`default_exclusions` of the
model; ``exclude=None`` prunes every layer. A model that is itself one ``nn.Linear`` /
``nn.Conv2d`` has no default exclusion.

Layers whose parent reads ``.weight`` instead of calling the layer (torchvision's Swin attention
calls ``F.linear(x, self.qkv.weight, ...)``) compute with the stored weight: magnitude pruning
zeroes it and :func:`mask_optimizer` keeps it zero, so they are pruned correctly; a running
:class:`MovementPruner` keeps the pruned values there, so those layers see them until it
finalizes. After :func:`sparsify` such a parent reads ``SparseLinear.weight``, the dense weight
rebuilt from the kept values (right, at dense speed).

Magnitude pruning (:func:`magnitude_prune`, :class:`GradualPruner`) also writes zeros into the
pruned weights; :func:`mask_optimizer` keeps them, and their optimizer state, exactly zero through
training. Movement pruning (:class:`MovementPruner`) keeps the dense weight values at pruned
positions until its schedule ends, so that a pruned weight can come back; see that class.

Typical use::

    model = build_model()
    pyfinetune.prune.magnitude_prune(model, 0.5, scope="global")   # stem and classifier stay dense
    opt = pyfinetune.optim.AdamW(model.parameters(), lr=1e-4)
    pyfinetune.prune.mask_optimizer(opt, model)       # pruned weights and moments stay 0
    ...train...
    print(pyfinetune.prune.sparsity_report(model))
    torch.save(pyfinetune.prune.remove_masks(model).state_dict(), "pruned.pt")   # zeros baked in
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops as _ops
from . import optim as _optim

__all__ = [
    "MaskedLinear", "MaskedConv2d", "attach_mask", "remove_masks", "adopt_torch_pruning", "load_pruned_state_dict",
    "effective_weight", "magnitude_prune", "GradualPruner", "MovementPruner", "mask_optimizer",
    "sparsity_report", "SparsityReport", "LayerSparsity", "sparsify", "densify", "default_exclusions",
]  # and SparseLinear, imported on first access (module __getattr__), so not in a star import

# A module name glob ("encoder.*"), several globs, or a predicate (name, module) -> bool.
LayerFilter = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]

# The value of ``exclude`` that stands for default_exclusions(model) (the default).
DEFAULT_EXCLUDE = "default"


# ------------------------------------------------------------------------ masked forward
def _masked_weight(weight: Tensor, mask: Tensor, dense_grad: bool) -> Tensor:
    """``weight * mask``; with ``dense_grad`` the gradient reaching ``weight`` is the full gradient
    of the effective weight (straight-through the mask) instead of the masked one."""
    if dense_grad:
        # Exact in every float dtype: masked entries give w + (-w) = 0, kept ones w + 0 = w.
        return weight + (weight * mask - weight).detach()
    return weight * mask


def _masked_linear(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor], dense_grad: bool) -> Tensor:
    """``F.linear(x, weight * mask, bias)``: x [..., in], weight [out, in], mask bool [out, in],
    bias [out] or None -> [..., out], in the dtype of x / weight.

    With ``dense_grad=False`` ``weight.grad`` receives ``(dy^T x) * mask``, the gradient of the
    masked layer. With ``dense_grad=True`` it receives the full ``dy^T x``, the gradient of the
    loss with respect to the effective weight ``weight * mask`` at every position, pruned ones
    included (what movement pruning scores need).

    This is :func:`pyfinetune.ops.masked_matmul`. Under ``torch.autocast`` or with operands of
    different dtypes (which the op refuses: it has no autocast rule) the same contract runs through
    ``F.linear`` on the effective weight, the dense gradient passed straight through:
    ``weight + (weight * mask - weight).detach()`` has the value ``weight * mask`` and hands
    d(loss)/d(weight * mask) unchanged to ``weight``.
    """
    same = x.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype) and x.device == weight.device
    if same and not _ops._autocast_enabled(x.device.type) and mask.shape == weight.shape:
        return _ops.masked_matmul(x, weight, mask, bias, dense_grad=dense_grad)
    return F.linear(x, _masked_weight(weight, mask, dense_grad), bias)


class _MaskedWeight:
    """Shared by the masked layers: the ``weight_mask`` buffer and the ``dense_grad`` flag."""

    weight_mask: Tensor
    dense_grad: bool

    def _init_mask(self) -> None:
        self.register_buffer("weight_mask", torch.ones_like(self.weight, dtype=torch.bool,
                                                            memory_format=torch.contiguous_format))
        self.dense_grad = False

    def extra_repr(self) -> str:
        return super().extra_repr() + (", masked, dense_grad" if self.dense_grad else ", masked")


def _check_mask_dtype(module: nn.Module) -> None:
    mask = module.weight_mask
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{type(module).__name__}: weight_mask must be a bool tensor, got {mask.dtype}; was "
            "torch.nn.utils.prune applied to this pyfinetune-masked layer? Both keep a 'weight_mask': prune it "
            "with pyfinetune.prune (attach_mask, magnitude_prune), or remove_masks() before using torch's; "
            "pyfinetune.prune.adopt_torch_pruning(model) turns torch's mask (which replaced pyfinetune's) into "
            "pyfinetune's")


class MaskedLinear(_MaskedWeight, nn.Linear):
    """``nn.Linear`` computing with ``weight * weight_mask``.

    Attributes (besides those of ``nn.Linear``):
        weight_mask: bool buffer [out_features, in_features], True where the weight is kept.
        dense_grad: bool; when True ``weight.grad`` is the dense gradient of the effective weight
            (set by :class:`MovementPruner`), see ``_masked_linear``.

    Usually made by pruning (the class of an existing ``nn.Linear`` is swapped in place);
    constructing one directly takes ``nn.Linear``'s arguments and starts with an all-True mask.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_mask()

    def forward(self, input: Tensor) -> Tensor:
        """input [..., in_features] -> [..., out_features], dtype of the weight."""
        _check_mask_dtype(self)
        return _masked_linear(input, self.weight, self.weight_mask, self.bias, self.dense_grad)


class MaskedConv2d(_MaskedWeight, nn.Conv2d):
    """``nn.Conv2d`` computing with ``weight * weight_mask``.

    ``weight_mask`` is a bool buffer [out_channels, in_channels / groups, kh, kw]; ``dense_grad`` as
    in :class:`MaskedLinear`. Constructing one directly takes ``nn.Conv2d``'s arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_mask()

    def forward(self, input: Tensor) -> Tensor:
        """input [N, C_in, H, W] (or [C_in, H, W]) -> [N, C_out, H', W'], dtype of the weight."""
        _check_mask_dtype(self)
        return self._conv_forward(input, _masked_weight(self.weight, self.weight_mask, self.dense_grad), self.bias)


_MASKED_CLASS = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}
_PLAIN_CLASS = {MaskedLinear: nn.Linear, MaskedConv2d: nn.Conv2d}
_MASKED_TYPES = (MaskedLinear, MaskedConv2d)


def _is_masked(module: nn.Module) -> bool:
    return isinstance(module, _MASKED_TYPES)


def _weight_parametrized(module: nn.Module) -> bool:
    return nn.utils.parametrize.is_parametrized(module, "weight")


def _set_mask(module: nn.Module, keep: Tensor, zero_weight: bool) -> None:
    """Attach ``keep`` (bool, weight's shape) to a prunable module, or overwrite its mask in place
    (in place so that optimizers and compiled graphs holding the buffer see the change)."""
    with torch.no_grad():
        if _is_masked(module):
            module.weight_mask.copy_(keep)
        else:
            module.__class__ = _MASKED_CLASS[type(module)]
            module.register_buffer("weight_mask", keep.to(device=module.weight.device, dtype=torch.bool,
                                                          memory_format=torch.contiguous_format, copy=True))
            module.dense_grad = False
        if zero_weight:
            module.weight.masked_fill_(~module.weight_mask, 0)


def attach_mask(module: nn.Module, mask: Optional[Tensor] = None) -> nn.Module:
    """Attach (or replace) the mask of one layer, in place, and zero its weight where pruned.

    Args:
        module: an ``nn.Linear`` / ``nn.Conv2d`` (its class becomes :class:`MaskedLinear` /
            :class:`MaskedConv2d`) or an already masked layer (its mask is overwritten in place).
        mask: bool tensor of the weight's shape, True = kept; None keeps everything.

    Returns:
        ``module`` itself.
    """
    if not (_is_masked(module) or type(module) in _MASKED_CLASS):
        hint = ("; its weight has a torch.ao.pruning FakeSparsity parametrization: "
                "pyfinetune.prune.adopt_torch_pruning(model) turns it into a pyfinetune mask"
                if isinstance(module, nn.Module) and _fake_sparsity_masks(module) is not None else "")
        raise TypeError(f"attach_mask: module must be an nn.Linear or nn.Conv2d, got {type(module).__name__}{hint}")
    if mask is None:
        mask = torch.ones_like(module.weight, dtype=torch.bool)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"attach_mask: mask must be a bool Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != module.weight.shape:
        raise ValueError(f"attach_mask: mask must have the weight's shape {tuple(module.weight.shape)}, "
                         f"got {tuple(mask.shape)}")
    _refuse_torch_pruned("attach_mask", [("module", module)])
    _set_mask(module, mask, zero_weight=True)
    return module


def remove_masks(model: nn.Module) -> nn.Module:
    """Turn every masked layer of ``model`` back into a plain ``nn.Linear`` / ``nn.Conv2d``, in
    place, with the pruned weights set to zero: the export form (``state_dict`` keys as before
    pruning). The weight parameters are the same tensors, so optimizers keep working.

    Returns:
        ``model`` itself.
    """
    _check_model("remove_masks", model)
    for name, module in model.named_modules():
        if _is_masked(module) and _weight_parametrized(module):
            raise ValueError(
                f"remove_masks: layer {name!r} has a parametrization of its weight (torch.nn.utils.parametrize, e.g. "
                "weight_norm), so its stored weight cannot be zeroed where pruned; remove the parametrization first "
                f"(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')), then call remove_masks")
    for module in model.modules():
        if _is_masked(module):
            with torch.no_grad():
                module.weight.masked_fill_(~module.weight_mask, 0)
            del module.weight_mask
            del module.dense_grad
            module.__class__ = _PLAIN_CLASS[type(module)]
    return model


def _torch_pruning_hooks(module: nn.Module) -> List[Any]:
    """The ``torch.nn.utils.prune`` methods (forward pre-hooks) attached to ``module`` itself."""
    from torch.nn.utils import prune as torch_prune

    return [h for h in module._forward_pre_hooks.values() if isinstance(h, torch_prune.BasePruningMethod)]


def _torch_pruned_weight(module: nn.Module) -> bool:
    """Whether ``torch.nn.utils.prune`` prunes ``module.weight`` (``weight_orig`` + a hook) of a
    layer :func:`adopt_torch_pruning` converts (exactly ``nn.Linear`` / ``nn.Conv2d``, or exactly
    one of pyfinetune's masked classes)."""
    return _adoptable_class(type(module)) and any(h._tensor_name == "weight" for h in _torch_pruning_hooks(module))


def _adoptable_class(cls: type) -> bool:
    return cls in _MASKED_CLASS or cls in _PLAIN_CLASS


def _refuse_torch_pruned(fn: Optional[str], named: Iterable[Tuple[str, nn.Module]]) -> None:
    """ValueError naming the layers of ``named`` whose weight torch.nn.utils.prune prunes: masking
    them too would put two masks (and two ``weight_mask``) on one weight."""
    names = [name for name, module in named if _torch_pruned_weight(module)]
    if names:
        raise ValueError(
            f"{fn + ': ' if fn else ''}layers {names} are pruned with torch.nn.utils.prune (a weight_orig parameter and a forward "
            "pre-hook): call pyfinetune.prune.adopt_torch_pruning(model) first, which turns torch's masks into "
            "pyfinetune's (same weights, same masks)")


def _fake_sparsity_masks(module: nn.Module) -> Optional[List[Tensor]]:
    """The masks of ``module.weight``'s parametrizations when every one of them is a
    ``torch.ao.pruning`` (or torchao) sparsifier's ``FakeSparsity`` (``weight = mask * original``);
    None when the weight has no parametrization or another kind among them."""
    if not _weight_parametrized(module):
        return None
    plist = module.parametrizations["weight"]
    masks = [getattr(p, "mask", None) for p in plist]
    if not all(type(p).__name__ == "FakeSparsity" for p in plist) or not all(isinstance(m, Tensor) for m in masks):
        return None
    return masks


def _has_torch_pruning(module: nn.Module) -> bool:
    return bool(_torch_pruning_hooks(module)) or _fake_sparsity_masks(module) is not None


def adopt_torch_pruning(model: nn.Module) -> nn.Module:
    """Turn the layers that PyTorch's pruning tools pruned into pyfinetune masked layers, in place.

    Two kinds are adopted, on the ``weight`` of ``nn.Linear`` / ``nn.Conv2d`` layers:

    * ``torch.nn.utils.prune`` (any of its methods, ``l1_unstructured``, ``global_unstructured``,
      ``ln_structured``, ``custom_from_mask``, ... and their combinations): torch's pruning is
      removed (``torch.nn.utils.prune.remove``, which writes ``weight_orig * weight_mask`` into the
      parameter and renames it back to ``weight``: the same ``Parameter`` object, so an optimizer
      built on ``weight_orig`` keeps working);
    * a ``torch.ao.pruning`` sparsifier's ``FakeSparsity`` parametrizations
      (``WeightNormSparsifier`` and others, torchao's too, after ``prepare`` and ``step`` and
      before ``squash_mask``): the parametrization is removed, leaving ``mask * original`` in the
      same ``original`` parameter; the sparsifier no longer controls the layer.

    Then the mask is attached as pyfinetune's (:func:`attach_mask`: a bool ``weight_mask``, True
    where the torch mask is nonzero). The layer computes what it computed before, and the rest of
    :mod:`pyfinetune.prune` (:func:`mask_optimizer`, :func:`sparsify`, the pruners,
    :func:`sparsity_report`) applies to it. :func:`sparsify` calls this itself. The weight goes
    back to its place before the bias in ``parameters()`` (torch's pruning had moved it last), so
    the model lists its parameters as a freshly built one does (an optimizer ``state_dict`` saved
    with one loads into the other).

    A weight that another module also holds (a head tied to the input embedding) gets the zeros
    of the mask too, so that module's outputs change: a warning names it (as
    :func:`magnitude_prune` warns). Two torch-pruned layers holding one weight are refused.

    A pyfinetune-masked layer that ``torch.nn.utils.prune`` pruned afterwards had its
    ``weight_mask`` replaced by torch's (torch's first method on a weight starts from an all-ones
    mask); it is torch's mask that is adopted.

    Left as they are, with a warning naming them: torch's pruning of another tensor (``bias``), of
    layers pyfinetune does not mask (``nn.Conv1d``, ``nn.Embedding``, subclasses of ``nn.Linear``),
    weights whose parametrizations mix ``FakeSparsity`` with others (``weight_norm``), layers with
    parametrizations of other tensors too, and a ``FakeSparsity`` on a layer pyfinetune already
    masks.

    Args:
        model: the model (or one layer).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a torch mask holds values other than 0 and 1 (a custom pruning method that
            scales weights cannot become a bool mask), or two torch-pruned layers share one
            weight; nothing is changed then.
    """
    _check_model("adopt_torch_pruning", model)
    from torch.nn.utils import parametrize
    from torch.nn.utils import prune as torch_prune

    adopt: List[Tuple[str, nn.Module, str, List[Tensor]]] = []  # (name, module, kind, masks)
    left = []
    for name, module in model.named_modules():
        label = name or type(module).__name__
        for hook in _torch_pruning_hooks(module):
            tensor = hook._tensor_name
            if tensor == "weight" and _adoptable_class(type(module)):
                adopt.append((name, module, "hook", [module.weight_mask]))
            else:
                left.append(f"{label}.{tensor} ({type(module).__name__}, torch.nn.utils.prune)")
        if _weight_parametrized(module) and any(type(p).__name__ == "FakeSparsity"
                                                for p in module.parametrizations["weight"]):
            base = type(module).__bases__[0]  # parametrize subclasses the layer's class
            masks = _fake_sparsity_masks(module)
            if masks is None:
                why = "other parametrizations too"
            elif set(module.parametrizations.keys()) != {"weight"}:
                why = "its other tensors are parametrized too"
            elif base not in _MASKED_CLASS:
                why = "already masked by pyfinetune" if base in _PLAIN_CLASS else base.__name__
            elif _torch_pruning_hooks(module):
                why = "torch.nn.utils.prune too"
            else:
                adopt.append((name, module, "parametrization", masks))
                continue
            left.append(f"{label}.weight ({why}, torch.ao.pruning FakeSparsity)")
    # Every check before anything changes.
    for name, module, kind, masks in adopt:
        for mask in masks:
            if mask.shape != module.weight.shape:
                raise ValueError(f"adopt_torch_pruning: the torch mask of layer {name!r} has shape {tuple(mask.shape)}, "
                                 f"not the weight's {tuple(module.weight.shape)} (nothing was changed)")
            if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
                raise ValueError(f"adopt_torch_pruning: the torch mask of layer {name!r} holds values other than 0 "
                                 "and 1; only a 0/1 mask becomes a pyfinetune mask (nothing was changed)")
    stored = {}  # what each adopted layer's weight will be: the Parameter torch's pruning keeps
    for name, module, kind, _ in adopt:
        stored[name] = (module.weight_orig if kind == "hook" else module.parametrizations["weight"].original)
    by_param: Dict[int, List[str]] = {}
    for name, p in stored.items():
        by_param.setdefault(id(p), []).append(name)
    shared = [names for names in by_param.values() if len(names) > 1]
    if shared:
        raise ValueError(f"adopt_torch_pruning: layers {shared[0]} are pruned by torch and share one weight; one "
                         "weight cannot carry two pyfinetune masks (nothing was changed)")
    sharers = _weight_sharers(model)
    tied = []
    for name, p in stored.items():
        own = {id(m) for m in model.get_submodule(name).modules()}  # the layer, its parametrization list
        others = [n for n, m in sharers.get(id(p), []) if id(m) not in own]
        if others:
            tied.append(f"{name!r} (with {others})")

    for name, module, kind, masks in adopt:
        keep = masks[0] != 0
        for mask in masks[1:]:
            keep &= mask != 0
        dense_grad = False
        if kind == "hook":
            torch_prune.remove(module, "weight")  # also deletes the buffer 'weight_mask'
            if _is_masked(module):
                # torch's prune of a pyfinetune-masked layer replaced our 'weight_mask' buffer by
                # its own (its first method starts from an all-ones mask): what the layer's hook
                # computes with, and all that is left of a mask, is torch's.
                dense_grad = module.dense_grad
                module.__class__ = _PLAIN_CLASS[type(module)]
                del module.dense_grad
        else:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        # Both removals re-register the weight last; nn.Linear / nn.Conv2d register it first.
        params = module._parameters
        reordered = {"weight": params["weight"], **{k: v for k, v in params.items() if k != "weight"}}
        params.clear()
        params.update(reordered)
        _set_mask(module, keep, zero_weight=True)
        module.dense_grad = dense_grad
    if tied:
        warnings.warn(f"adopt_torch_pruning: layers {', '.join(tied)} share their weight with other modules (tied "
                      "weights, e.g. an input embedding and the output head): the pruned entries are now zero there "
                      "too", stacklevel=2)
    if left:
        warnings.warn(f"adopt_torch_pruning: the pruning of {', '.join(left)} is left as it is: pyfinetune masks the "
                      "weights of nn.Linear and nn.Conv2d layers", stacklevel=2)
    return model


def _from_torch_pruning_keys(model: nn.Module, state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``state_dict`` with torch.nn.utils.prune's ``<p>weight_orig`` + ``<p>weight_mask`` (0/1)
    pairs replaced by pyfinetune's ``<p>weight`` + bool ``<p>weight_mask`` (a new dict, same order
    otherwise; ``state_dict`` itself unchanged), for the pairs whose layer in ``model`` is one
    pyfinetune masks (exactly ``nn.Linear`` / ``nn.Conv2d`` or a masked one); other pairs (a
    ``Conv1d``, an ``Embedding``) stay torch's."""
    def masks_layer(prefix: str) -> bool:
        try:
            return _adoptable_class(type(model.get_submodule(prefix.rstrip("."))))
        except AttributeError:
            return False

    pairs = [key[: -len("weight_orig")] for key in state_dict if key == "weight_orig" or key.endswith(".weight_orig")]
    # pyfinetune's own state has no weight_orig: a pair is torch's whatever its mask's dtype
    pairs = [p for p in pairs if isinstance(state_dict.get(p + "weight_mask"), Tensor) and masks_layer(p)]
    if not pairs:
        return state_dict
    out = type(state_dict)() if isinstance(state_dict, dict) else {}
    converted = {}
    for p in pairs:
        orig, mask = state_dict[p + "weight_orig"], state_dict[p + "weight_mask"]
        if not isinstance(orig, Tensor) or orig.shape != mask.shape:
            raise ValueError(f"load_pruned_state_dict: {p}weight_orig and {p}weight_mask (torch.nn.utils.prune's form) "
                             f"must be tensors of one shape, got {getattr(orig, 'shape', type(orig).__name__)} and "
                             f"{tuple(mask.shape)}")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"load_pruned_state_dict: {p}weight_mask holds values other than 0 and 1; only a 0/1 "
                             "mask becomes a pyfinetune mask")
        keep = mask != 0
        converted[p + "weight_orig"] = (p + "weight", torch.where(keep.to(orig.device), orig, orig.new_zeros(())))
        converted[p + "weight_mask"] = (p + "weight_mask", keep)
    for key, value in state_dict.items():
        if key in converted:
            key, value = converted[key]
        out[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out


def load_pruned_state_dict(model: nn.Module, state_dict: Dict[str, Any], strict: bool = True):
    """Load a pruned model's ``state_dict`` (with ``<layer>.weight_mask`` entries) into ``model``,
    pruned or not: layers that have a mask in ``state_dict`` but none in ``model`` get one first.

    A ``state_dict`` saved from a model pruned with ``torch.nn.utils.prune`` (``<layer>.weight_orig``
    and a 0/1 ``<layer>.weight_mask``) loads too: each such pair of an ``nn.Linear`` /
    ``nn.Conv2d`` of ``model`` becomes pyfinetune's ``<layer>.weight`` (``weight_orig *
    weight_mask``) and bool ``<layer>.weight_mask``, as :func:`adopt_torch_pruning` does to a live
    model. torch's pruning of other tensors (``bias_orig``) and of other layer types is not
    converted: such keys load only into a model pruned the same way by torch.

    Args:
        model: the module to load into (not itself pruned with ``torch.nn.utils.prune``: adopt it
            first, or use ``model.load_state_dict``).
        state_dict: as produced by ``model.state_dict()`` of a pruned model.
        strict: as ``nn.Module.load_state_dict``.

    Returns:
        what ``model.load_state_dict`` returns (missing and unexpected keys).
    """
    _check_model("load_pruned_state_dict", model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_pruned_state_dict: state_dict must be a mapping of names to tensors (a model's "
                        f"state_dict()), got {type(state_dict).__name__}")
    _refuse_torch_pruned("load_pruned_state_dict", model.named_modules())
    state_dict = _from_torch_pruning_keys(model, state_dict)
    # Every mask is checked before any layer of the model is changed (masked to receive one).
    to_mask = []
    for key in state_dict:
        if key != "weight_mask" and not key.endswith(".weight_mask"):
            continue
        name = key[: -len("weight_mask")].rstrip(".")
        if key[: -len("weight_mask")] + "weight_orig" in state_dict:
            continue  # torch.nn.utils.prune's pair of a layer it keeps pruning (see _from_torch_pruning_keys)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            if strict:
                raise ValueError(f"state_dict has the mask {key!r} but model has no module {name!r}") from None
            continue
        if not _is_masked(module) and type(module) not in _MASKED_CLASS:
            raise TypeError(f"state_dict has the mask {key!r} but model.{name} is a {type(module).__name__}, "
                            "not an nn.Linear or nn.Conv2d")
        mask = state_dict[key]
        if not isinstance(mask, Tensor):
            raise TypeError(f"load_pruned_state_dict: {key} must be a tensor, got {type(mask).__name__}")
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"load_pruned_state_dict: {key} has shape {tuple(mask.shape)}, model.{name}.weight "
                             f"{tuple(weight.shape)} (nothing was changed)")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"load_pruned_state_dict: {key} holds values other than 0 and 1; a mask is bool or 0/1 "
                             "(nothing was changed)")
        if not _is_masked(module):
            to_mask.append(module)
    for module in to_mask:
        _set_mask(module, torch.ones_like(module.weight, dtype=torch.bool), zero_weight=False)
    return model.load_state_dict(state_dict, strict=strict)


def effective_weight(layer: nn.Module) -> Tensor:
    """The weight as the layer's forward sees it: ``weight * weight_mask`` for a masked layer, the
    weight of a plain ``nn.Linear`` / ``nn.Conv2d``, ``to_dense()`` of a :class:`SparseLinear`.

    Returns:
        Tensor of the weight's shape ([out, in] or [out, in / groups, kh, kw]) and dtype, zero at
        pruned positions; differentiable with respect to the weight.
    """
    if _is_masked(layer):
        return layer.weight * layer.weight_mask
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return layer.weight
    sparse_cls = _sparse_linear_class(required=False)
    if sparse_cls is not None and isinstance(layer, sparse_cls):
        return layer.to_dense()
    raise TypeError(f"effective_weight: layer must be an nn.Linear, nn.Conv2d or SparseLinear, got {type(layer).__name__}")


# ------------------------------------------------------------------------ argument checks
@dataclass(frozen=True)
class _Pattern:
    """A parsed ``pattern``: unstructured, N:M (keep n of every m consecutive inputs) or RxC blocks."""

    text: str
    kind: str  # "unstructured" | "nm" | "block"
    n: int = 0
    m: int = 0
    rows: int = 1
    cols: int = 1

    @property
    def max_sparsity(self) -> float:
        return (self.m - self.n) / self.m if self.kind == "nm" else 1.0


def _parse_pattern(pattern: Any) -> _Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    if pattern == "unstructured":
        return _Pattern(pattern, "unstructured")
    nm = re.fullmatch(r"(\d+):(\d+)", pattern)
    if nm and 0 < int(nm.group(1)) < int(nm.group(2)):
        return _Pattern(pattern, "nm", n=int(nm.group(1)), m=int(nm.group(2)))
    block = re.fullmatch(r"block:(\d+)x(\d+)", pattern)
    if block and int(block.group(1)) > 0 and int(block.group(2)) > 0:
        return _Pattern(pattern, "block", rows=int(block.group(1)), cols=int(block.group(2)))
    raise ValueError("pattern must be 'unstructured', 'N:M' with 0 < N < M (e.g. '2:4') or 'block:RxC' "
                     f"(e.g. 'block:4x4'), got {pattern!r}")


def _check_scope(scope: Any) -> None:
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")


def _check_pruner_state(pruner: Any, state_dict: Any, keys: Tuple[str, ...]) -> None:
    """A pruner's state dict holds ``keys`` (a ValueError naming the missing ones: another pruner's
    state, or not a pruner's)."""
    name = type(pruner).__name__
    if not isinstance(state_dict, dict):
        raise TypeError(f"{name}.load_state_dict: state_dict must be a dict from {name}.state_dict(), "
                        f"got {type(state_dict).__name__}")
    missing = [k for k in keys if k not in state_dict]
    if missing:
        other = " (a GradualPruner's state dict? its pruner has no scores)" if "scores" in missing and len(missing) <= 2 else ""
        raise ValueError(f"{name}.load_state_dict: state_dict lacks {', '.join(repr(k) for k in missing)}: not the "
                         f"state_dict() of a {name}{other}")


def _checked_progress(pruner: Any, state_dict: Dict[str, Any]) -> Tuple[int, Optional[float]]:
    """(step_count, last_sparsity) of a pruner's state dict: an int >= 0 (a one-element integer
    tensor too) and None or a sparsity in [0, 1] (ValueError / TypeError naming the entry otherwise).
    ``pruner``: the pruner, or its class name."""
    name = pruner if isinstance(pruner, str) else type(pruner).__name__
    step_count, last = state_dict["step_count"], state_dict["last_sparsity"]
    if isinstance(step_count, Tensor) and step_count.numel() == 1 and not step_count.is_floating_point():
        step_count = int(step_count)
    if isinstance(last, Tensor) and last.numel() == 1 and last.is_floating_point():
        last = float(last)
    if isinstance(step_count, bool) or not isinstance(step_count, numbers.Integral) or step_count < 0:
        raise ValueError(f"{name}.load_state_dict: step_count must be an int >= 0, got {step_count!r}")
    if last is not None:
        if isinstance(last, bool) or not isinstance(last, numbers.Real):
            raise TypeError(f"{name}.load_state_dict: last_sparsity must be None or a number, got "
                            f"{type(last).__name__}")
        if not 0.0 <= float(last) <= 1.0:  # also refuses NaN
            raise ValueError(f"{name}.load_state_dict: last_sparsity must be in [0, 1], got {last!r}")
        last = float(last)
    return int(step_count), last


def _check_model(fn: str, model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")


def _check_sparsity(name: str, value: Any, pat: _Pattern) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    if value > pat.max_sparsity + 1e-12:
        raise ValueError(f"{name}={value} is more than pattern {pat.text!r} can prune: {pat.n} of every {pat.m} "
                         f"weights are kept, so {name} must be <= {pat.max_sparsity}")


def _check_int(name: str, value: Any) -> int:
    """``value`` as an int: an int or another integral number (np.int64 from a config), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def _as_predicate(spec: LayerFilter, arg: str) -> Optional[Callable[[str, nn.Module], bool]]:
    """``include`` / ``exclude`` as a predicate (name, module) -> bool; None stays None."""
    if spec is None or callable(spec):
        return spec
    globs = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, Iterable) else None
    if globs is None or not all(isinstance(g, str) for g in globs):
        raise TypeError(f"{arg} must be a module-name glob, a list of globs or a callable (name, module) -> bool, "
                        f"got {spec!r}")
    return lambda name, module: any(fnmatch.fnmatchcase(name, g) for g in globs)


def _head_layers(head: Any) -> List[nn.Module]:
    """The layers a model's ``get_classifier()`` / ``get_output_embeddings()`` result stands for:
    a linear / conv layer itself, else the last one inside each module (a tuple: each entry)."""
    out = []
    for module in head if isinstance(head, (tuple, list)) else [head]:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out.append(module)
        elif isinstance(module, nn.Module):
            inner = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            out.extend(inner[-1:])
    return out


def _classifier_layers(model: nn.Module) -> List[nn.Module]:
    """The layers producing ``model``'s logits; see :func:`default_exclusions`."""
    for getter in ("get_classifier", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        head = fn() if callable(fn) else None
        if head is not None:
            # An empty answer (timm's nn.Identity when num_classes=0) means: no classifier.
            return _head_layers(head)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def default_exclusions(model: nn.Module) -> List[str]:
    """The names of the layers that :func:`magnitude_prune`, :class:`GradualPruner` and
    :class:`MovementPruner` leave dense by default (``exclude="default"``), in ``named_modules``
    order:

    * the stem: the first ``nn.Conv2d`` in module order (a CNN's first convolution, a ViT's patch
      embedding ``conv_proj`` / ``patch_embed.proj``); none in a model without convolutions;
    * the classifier: the layer(s) that ``model.get_classifier()`` returns (timm models; none when
      it is an ``nn.Identity``), else ``model.get_output_embeddings()`` (transformers' ``lm_head``)
      when it returns a module, else the last ``nn.Linear`` in module order (torchvision's
      ``fc``, ``heads.head``, ``head``, ``classifier[-1]``).

    A model that is itself an ``nn.Linear`` / ``nn.Conv2d`` has none: passing a layer prunes it.
    Module order is the order in which the layers were assigned in ``__init__``; check the
    result on a custom model, and pass an explicit ``exclude`` where it guesses wrong.

    Args:
        model: the model.

    Returns:
        a list of module names (``[]`` when nothing is excluded). To exclude more layers than the
        default, pass ``exclude=[*default_exclusions(model), "blocks.0.*"]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"default_exclusions: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.Linear, nn.Conv2d)):
        return []
    stem = [next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)]
    chosen = {id(m) for m in stem + _classifier_layers(model) if m is not None}
    return [name for name, m in model.named_modules() if id(m) in chosen]


def _select_layers(model: nn.Module, include: LayerFilter, exclude: LayerFilter) -> List[Tuple[str, nn.Module]]:
    """The prunable layers of ``model`` (exact ``nn.Linear`` / ``nn.Conv2d``, or already masked)
    that ``include`` matches and ``exclude`` does not, in ``named_modules`` order.
    ``exclude="default"`` stands for :func:`default_exclusions`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    defaults: Optional[List[str]] = None
    if isinstance(exclude, str) and exclude == DEFAULT_EXCLUDE:
        defaults = default_exclusions(model)
        drop_if = lambda name, module: name in defaults  # noqa: E731  (exact names, not globs)
    else:
        drop_if = _as_predicate(exclude, "exclude")
    keep_if = _as_predicate(include, "include")
    candidates = [(name, module) for name, module in model.named_modules()
                  if (_is_masked(module) or type(module) in _MASKED_CLASS)
                  and (keep_if is None or keep_if(name, module))]
    layers = [(name, module) for name, module in candidates if drop_if is None or not drop_if(name, module)]
    parametrized = [name for name, module in model.named_modules()
                    if not _is_masked(module) and isinstance(module, tuple(_MASKED_CLASS))
                    and _weight_parametrized(module) and (keep_if is None or keep_if(name, module))
                    and (drop_if is None or not drop_if(name, module))]
    if parametrized:
        warnings.warn(f"layers {parametrized} are not pruned: their weight has a parametrization "
                      "(torch.nn.utils.parametrize, e.g. weight_norm); prune before adding it, or remove it first"
                      + ("; a torch.ao.pruning sparsifier's FakeSparsity becomes a pyfinetune mask with "
                         "pyfinetune.prune.adopt_torch_pruning(model)"
                         if any(_fake_sparsity_masks(model.get_submodule(n)) is not None for n in parametrized) else ""),
                      stacklevel=3)
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"
              and hasattr(module, "nf") and (keep_if is None or keep_if(name, module))
              and (drop_if is None or not drop_if(name, module))]
    if conv1d:
        # transformers' Conv1D (GPT-2, GPT-J's ancestors): a linear layer with its weight stored
        # [in, out], not an nn.Linear.
        note = (f"{len(conv1d)} transformers Conv1D layers ({', '.join(conv1d[:3])}{', ...' if len(conv1d) > 3 else ''}) "
                "are not pruned: pyfinetune prunes nn.Linear and nn.Conv2d layers (GPT-2-style models keep their "
                "attention and MLP projections in Conv1D)")
        if layers:
            warnings.warn(note, stacklevel=3)
    if not layers:
        if candidates and defaults is not None:
            raise ValueError(
                f"no prunable layer is left after the default exclusions {defaults} (the first convolution and "
                f"the classifier stay dense, see prune.default_exclusions) with include={include!r}; pass "
                "exclude=None to prune every layer, or exclude=[...] to choose"
                + (f". Note: {note}" if conv1d else ""))
        if any(type(m).__name__.startswith("FSDP") for m in model.modules()):
            raise ValueError("no prunable layer found: the model is sharded by FSDP2 (fully_shard); prune it "
                             "(magnitude_prune, pruners) before fully_shard, as the README's Distributed section says")
        raise ValueError(f"no prunable layer (nn.Linear / nn.Conv2d) matched include={include!r}, exclude={exclude!r}"
                         + (f"; {note}" if conv1d else ""))
    _refuse_torch_pruned(None, layers)
    sharded = [name for name, module in layers if _is_sharded_tensor(module.weight)]
    if sharded:
        # A model pruned (its masked layers kept) and then sharded: each rank holds a piece of the
        # weight, so a magnitude threshold over the whole layer cannot be taken locally.
        raise ValueError(f"layers {sharded[:3]}{' ...' if len(sharded) > 3 else ''} are sharded by FSDP2 (fully_shard); "
                         "prune (magnitude_prune, pruners) before fully_shard, as the README's Distributed section "
                         "says")
    seen: Dict[int, str] = {}
    for name, module in layers:
        if id(module.weight) in seen:
            raise ValueError(f"layers {seen[id(module.weight)]!r} and {name!r} share one weight; tied weights cannot "
                             "carry two masks: exclude one of them")
        seen[id(module.weight)] = name
        if not module.weight.is_floating_point():
            raise TypeError(f"the weight of layer {name!r} must be floating point, got {module.weight.dtype}")
    sharers = _weight_sharers(model)
    for name, module in layers:
        others = [n for n, m in sharers.get(id(module.weight), []) if m is not module]
        if others:
            warnings.warn(f"layer {name!r} shares its weight with {others} (tied weights, e.g. an input embedding "
                          "and the output head): pruning it zeroes the same entries there too",
                          stacklevel=3)
    return layers


def _matrix_shape(module: nn.Module) -> Tuple[int, int]:
    """The weight as a matrix [out, in], a Conv2d's input flattened (in / groups * kh * kw)."""
    w = module.weight
    return w.shape[0], math.prod(w.shape[1:])  # not numel // out: a layer may have 0 outputs


def _check_pattern_fits(layers: Sequence[Tuple[str, nn.Module]], pat: _Pattern) -> None:
    for name, module in layers:
        rows, cols = _matrix_shape(module)
        if pat.kind == "nm" and cols % pat.m:
            raise ValueError(f"pattern {pat.text!r} needs the input size of layer {name!r} to be a multiple of "
                             f"{pat.m}, got {cols} (weight shape {tuple(module.weight.shape)})")
        if pat.kind == "block" and (rows % pat.rows or cols % pat.cols):
            raise ValueError(f"pattern {pat.text!r} does not divide layer {name!r}: its weight is {rows} x {cols} "
                             f"(outputs x inputs, weight shape {tuple(module.weight.shape)})")


# ------------------------------------------------------------------------ selecting what to prune
def _lowest_k(keys: Tensor, k: int) -> Tensor:
    """Bool [n]: True at the ``k`` smallest of ``keys`` [n]; among equal keys the lower index
    first. O(n) memory (a selection, not a sort)."""
    n = keys.numel()
    out = torch.zeros(n, dtype=torch.bool, device=keys.device)
    if k <= 0:
        return out
    if k >= n:
        return out.fill_(True)
    v = torch.kthvalue(keys, k).values
    out = keys < v
    extra = k - int(out.sum())
    if extra > 0:
        out[torch.nonzero(keys == v).reshape(-1)[:extra]] = True
    return out


def _nm_candidates(keys: Tensor, n: int, m: int) -> Tensor:
    """Bool, keys' shape [rows, cols]: in every group of ``m`` consecutive inputs, the ``m - n``
    entries with the smallest keys (ties: lower index)."""
    groups = keys.reshape(-1, m)
    idx = torch.sort(groups, dim=1, stable=True).indices[:, : m - n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True).reshape(keys.shape)


@dataclass
class _Units:
    """One layer's ranking units: ``keys`` [units] (entries, N:M candidates or blocks), ``count``
    (what ``sparsity`` is a fraction of), and what is needed to map the units back to entries."""

    keys: Tensor
    count: int
    shape: Tuple[int, int]
    cand: Optional[Tensor] = None                       # N:M: bool [out, in], the candidates
    shape4: Optional[Tuple[int, int, int, int]] = None  # blocks: [out/R, R, in/C, C]

    def keep(self, pruned: Tensor) -> Tensor:
        """Bool [out, in], True = kept, from ``pruned`` [units]."""
        if self.shape4 is not None:
            r4 = self.shape4
            pruned = pruned.reshape(r4[0], 1, r4[2], 1).expand(r4)
        elif self.cand is not None:
            full = torch.zeros_like(self.cand)
            full[self.cand] = pruned
            pruned = full
        return ~pruned.reshape(self.shape)


def _units(keys: Tensor, mask: Optional[Tensor], pat: _Pattern, block_reduce: str, prefer_pruned: bool) -> _Units:
    """The units of one layer from its entry keys [out, in] (float32 / float64).

    Args:
        mask: the layer's present mask [out, in] or None.
        block_reduce: a block's key from its entries' keys: "l2" (sum of squares, ordered as the
            L2 norm) or "sum".
        prefer_pruned: units already fully pruned rank lowest (so masks only grow with sparsity).
    """
    dead = None if mask is None or not prefer_pruned else ~mask
    if pat.kind == "block":
        shape4 = (keys.shape[0] // pat.rows, pat.rows, keys.shape[1] // pat.cols, pat.cols)
        blocks = keys.reshape(shape4)
        unit = blocks.square().sum(dim=(1, 3)) if block_reduce == "l2" else blocks.sum(dim=(1, 3))
        if dead is not None:
            unit = unit.masked_fill(dead.reshape(shape4).all(dim=3).all(dim=1), -math.inf)
        return _Units(unit.reshape(-1), unit.numel(), tuple(keys.shape), shape4=shape4)
    if dead is not None:
        keys = keys.masked_fill(dead, -math.inf)
    if pat.kind == "nm":
        cand = _nm_candidates(keys, pat.n, pat.m)
        return _Units(keys[cand], keys.numel(), tuple(keys.shape), cand=cand)
    return _Units(keys.reshape(-1), keys.numel(), tuple(keys.shape))


def _prune_layers(layers: Sequence[Tuple[str, nn.Module]], key_fn: Callable[[str, nn.Module], Tensor],
                  sparsity: float, pat: _Pattern, scope: str, block_reduce: str, prefer_pruned: bool,
                  zero_weight: Callable[[nn.Module], bool]) -> None:
    """Set the masks of ``layers``: the ``round(sparsity * count)`` units with the smallest keys
    are pruned, per layer or over all layers; among equal keys the lower index (layers in order,
    then row-major) goes first.

    ``key_fn(name, module)`` gives a layer's entry keys [out, in]. With ``scope="layer"`` one
    layer's keys are alive at a time; ``"global"`` holds all units at once (4 bytes per weight,
    float32 keys, or one key per block).
    """
    def units_of(name, module):
        mask = module.weight_mask.reshape(_matrix_shape(module)) if _is_masked(module) else None
        return _units(key_fn(name, module), mask, pat, block_reduce, prefer_pruned)

    def apply(module, units, pruned):
        _set_mask(module, units.keep(pruned).reshape(module.weight.shape), zero_weight(module))

    if scope == "layer":
        for name, module in layers:
            units = units_of(name, module)
            apply(module, units, _lowest_k(units.keys, round(sparsity * units.count)))
        return
    all_units = [units_of(name, module) for name, module in layers]
    device = all_units[0].keys.device
    chosen = _lowest_k(torch.cat([u.keys.to(device) for u in all_units]),
                       round(sparsity * sum(u.count for u in all_units)))
    for (_, module), units, pruned in zip(layers, all_units, chosen.split([u.keys.numel() for u in all_units])):
        apply(module, units, pruned.to(units.keys.device))


def _key_dtype(layers: Sequence[Tuple[str, nn.Module]]) -> torch.dtype:
    return torch.float64 if any(m.weight.dtype == torch.float64 for _, m in layers) else torch.float32


def _magnitude_keys(dtype: torch.dtype) -> Callable[[str, nn.Module], Tensor]:
    """``key_fn`` of magnitude pruning: |effective weight| as [out, in] in ``dtype``."""
    def keys(name: str, module: nn.Module) -> Tensor:
        w = module.weight.detach()
        if _is_masked(module):
            w = w * module.weight_mask
        return w.reshape(_matrix_shape(module)).to(dtype).abs()
    return keys


def _check_no_nan(layers: Sequence[Tuple[str, nn.Module]]) -> None:
    """Before any mask is set, so that a NaN weight leaves the model as it was."""
    for name, module in layers:
        if torch.isnan(module.weight).any():
            raise ValueError(f"the weight of layer {name!r} contains NaN; it cannot be pruned by rank")


def magnitude_prune(model: nn.Module, sparsity: float, *, scope: str = "layer", pattern: str = "unstructured",
                    include: LayerFilter = None, exclude: LayerFilter = DEFAULT_EXCLUDE) -> Dict[str, Tensor]:
    """Prune the weights of ``model``'s ``nn.Linear`` / ``nn.Conv2d`` layers with the smallest
    magnitude: attach masks (see the module docstring) and zero the pruned weights. Biases, norms
    and other parameters are untouched.

    Args:
        model: the model (or a single layer), pruned in place.
        sparsity: fraction pruned, in [0, 1]. Exactly ``round(sparsity * count)`` units are pruned
            (Python's ``round``: half to even), per layer (``scope="layer"``) or over all selected
            layers together (``scope="global"``); a unit is a weight, or a block for ``block:RxC``.
        scope: ``"layer"`` or ``"global"``.
        pattern: ``"unstructured"``; ``"N:M"`` (e.g. ``"2:4"``): in every group of M consecutive
            inputs (for a Conv2d, of the flattened in / groups * kh * kw) at most M - N are pruned,
            so ``sparsity`` must be <= (M - N) / M; at exactly (M - N) / M every group has M - N
            pruned weights, below it the pruned weights are the lowest-ranked of those candidates;
            ``"block:RxC"``: whole blocks of R outputs x C inputs, ranked by their L2 norm.
        include: which layers may be pruned: a glob on the module name from ``named_modules``
            (``"encoder.*"``), a list of globs, or a predicate ``(name, module) -> bool``. None: all.
        exclude: the layers left alone: ``"default"`` (the default): the stem convolution and the
            classifier, see :func:`default_exclusions`; None: none; or the same form as
            ``include`` (which replaces the default: ``exclude="head"`` prunes the stem; a glob
            that is literally ``"default"`` is written ``["default"]``). When the default
            exclusions leave no layer (``nn.Sequential(nn.Linear(...))``: its one layer is the
            classifier) a ValueError says so; pass ``exclude=None``.

    The ranking is by the magnitude of the effective weight (zero where already pruned). Ties are
    deterministic: units already pruned go first, then the lower index (layers in
    ``named_modules`` order, entries in row-major order of the [out, in] matrix). Masks therefore
    only grow when a pruned model is pruned again at a higher sparsity.

    Returns:
        ``{layer name: mask}``, the bool ``weight_mask`` buffers (weight's shape, True = kept).
    """
    _check_model("magnitude_prune", model)
    pat = _parse_pattern(pattern)
    _check_scope(scope)
    _check_sparsity("sparsity", sparsity, pat)
    layers = _select_layers(model, include, exclude)
    _check_pattern_fits(layers, pat)
    _check_no_nan(layers)
    _prune_layers(layers, _magnitude_keys(_key_dtype(layers)), sparsity, pat, scope, block_reduce="l2",
                  prefer_pruned=True, zero_weight=lambda module: True)
    return {name: module.weight_mask for name, module in layers}


# ------------------------------------------------------------------------ schedules
class GradualPruner:
    r"""Gradual magnitude pruning with the cubic schedule of Zhu and Gupta (2017).

    The target sparsity at step ``t`` is

    .. math:: s_t = s_f + (s_i - s_f) \left(1 - \frac{t - t_0}{n \Delta t}\right)^3

    with ``t0 = start_step`` and ``n * dt = end_step - start_step`` (``s_i`` before ``start_step``,
    ``s_f`` from ``end_step`` on). Masks are recomputed at ``start_step``, every ``every`` steps
    after it, and at ``end_step``; in between they stay fixed.

    Call :meth:`step` once per training step, after ``optimizer.step()``. The layers get all-True
    masks at construction, so ``model.state_dict()`` has its final keys from the start and
    :func:`mask_optimizer` can be called right after; masks are then updated in place, and the
    optimizer hooks pick up every change (the pruned weights and their moments are zeroed).

    Args:
        model: the model, pruned in place.
        final_sparsity: ``s_f`` in [0, 1].
        start_step: ``t0`` >= 0, the first pruning step.
        end_step: the step at which ``final_sparsity`` is reached, > ``start_step``.
        every: ``dt`` > 0, steps between mask updates.
        pattern, scope, include, exclude: as :func:`magnitude_prune`.
        initial_sparsity: ``s_i`` in [0, ``final_sparsity``].

    Example::

        pruner = GradualPruner(model, 0.9, start_step=1000, end_step=20000, every=100)
        mask_optimizer(opt, model)
        for batch in data:
            loss(model, batch).backward(); opt.step(); opt.zero_grad(); pruner.step()
    """

    _block_reduce = "l2"
    _prefer_pruned = True

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int, every: int, *,
                 pattern: str = "unstructured", scope: str = "layer", initial_sparsity: float = 0.0,
                 include: LayerFilter = None, exclude: LayerFilter = DEFAULT_EXCLUDE):
        _check_model(type(self).__name__, model)
        pat = _parse_pattern(pattern)
        _check_scope(scope)
        _check_sparsity("final_sparsity", final_sparsity, pat)
        _check_sparsity("initial_sparsity", initial_sparsity, pat)
        if initial_sparsity > final_sparsity:
            raise ValueError(f"initial_sparsity must be <= final_sparsity, got {initial_sparsity} > {final_sparsity}")
        start_step, end_step, every = (_check_int(name, value) for name, value in (
            ("start_step", start_step), ("end_step", end_step), ("every", every)))
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if end_step <= start_step:
            raise ValueError(f"end_step must be > start_step, got end_step={end_step}, start_step={start_step}")
        if every <= 0:
            raise ValueError(f"every must be > 0, got {every}")
        self.layers = _select_layers(model, include, exclude)
        _check_pattern_fits(self.layers, pat)
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.start_step, self.end_step, self.every = start_step, end_step, every
        self.pattern, self.scope = pattern, scope
        self._pattern = pat
        self._key_dtype = _key_dtype(self.layers)
        self.step_count = 0
        self.last_sparsity: Optional[float] = None
        for _, module in self.layers:
            if not _is_masked(module):
                _set_mask(module, torch.ones_like(module.weight, dtype=torch.bool), zero_weight=False)

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity at ``step``: the cubic formula between ``start_step`` and
        ``end_step``, ``initial_sparsity`` before, ``final_sparsity`` after."""
        if step <= self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def is_pruning_step(self, step: int) -> bool:
        """Whether the masks are recomputed at ``step``: ``start_step + j * every`` up to
        ``end_step``, and ``end_step`` itself."""
        return self.start_step <= step <= self.end_step and (
            (step - self.start_step) % self.every == 0 or step == self.end_step)

    def step(self) -> Optional[float]:
        """Advance one training step (the first call is step 0); on a pruning step recompute the
        masks at :meth:`sparsity_at` and zero the newly pruned weights.

        Returns:
            the sparsity of the last mask update so far (None before the first one).
        """
        t = self.step_count
        if self.is_pruning_step(t):
            self._prune(self.sparsity_at(t))
        self.step_count = t + 1
        return self.last_sparsity

    def _prune(self, sparsity: float) -> None:
        _check_no_nan(self.layers)
        _prune_layers(self.layers, self._entry_keys, sparsity, self._pattern, self.scope,
                      block_reduce=self._block_reduce, prefer_pruned=self._prefer_pruned,
                      zero_weight=lambda module: not module.dense_grad)
        self.last_sparsity = sparsity

    def _entry_keys(self, name: str, module: nn.Module) -> Tensor:
        return _magnitude_keys(self._key_dtype)(name, module)

    def _config(self) -> Dict[str, Any]:
        return dict(final_sparsity=self.final_sparsity, initial_sparsity=self.initial_sparsity,
                    start_step=self.start_step, end_step=self.end_step, every=self.every, pattern=self.pattern,
                    scope=self.scope, layers=[name for name, _ in self.layers])

    def state_dict(self) -> Dict[str, Any]:
        """The pruner's progress (``step_count``, ``last_sparsity``) and its configuration. The
        masks themselves are in ``model.state_dict()``."""
        return dict(step_count=self.step_count, last_sparsity=self.last_sparsity, config=self._config())

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the pruner must have been built with the same arguments
        (a difference raises ValueError naming it)."""
        _check_pruner_state(self, state_dict, ("step_count", "last_sparsity", "config"))
        if not isinstance(state_dict["config"], dict):
            raise TypeError(f"{type(self).__name__}.load_state_dict: state_dict['config'] must be a dict (from "
                            f"state_dict()), got {type(state_dict['config']).__name__}")
        differ = [k for k, v in self._config().items() if state_dict["config"].get(k) != v]
        if differ:
            hint = ""
            if "layers" in differ:
                hint = (" (the pruner's layers come from include / exclude; exclude defaults to the stem and the "
                        "classifier, see prune.default_exclusions, and pruners saved before that default pruned "
                        "every layer: build this one with exclude=None to resume them)")
            raise ValueError(f"state_dict is from a pruner with other arguments: {', '.join(differ)} differ{hint}")
        step_count, last = _checked_progress(self, state_dict)
        self.step_count = step_count
        self.last_sparsity = last


class MovementPruner(GradualPruner):
    r"""Movement pruning (Sanh, Wolf and Rush 2020) on the cubic schedule of :class:`GradualPruner`.

    Each :meth:`step` adds ``-weight * grad`` to a float32 score per weight (float64 for float64
    weights), where ``grad`` is the gradient of the effective weight at *every* position, pruned
    ones included: the pruner sets ``dense_grad=True`` on its layers, so ``weight.grad`` is dense
    after ``backward`` (see ``_masked_linear``). The step then masks ``weight.grad`` (the weights
    learn with the gradient of the masked layer, as in the paper) and, on a pruning step, keeps
    the weights with the highest scores (top-k, per layer or global; for ``block:RxC`` the score of
    a block is the sum of its scores; ties: lower index first).

    Weights at pruned positions keep their dense values while the schedule runs, and the forward
    applies the mask, so a pruned weight whose score rises comes back with its old value. Optimizer
    masking (:func:`mask_optimizer`) leaves these layers alone meanwhile. At ``end_step``, after the
    final mask update, the pruner calls :meth:`finalize`: pruned weights are set to zero and the
    layers become ordinary masked layers (masked gradient, zeros held by the optimizer hooks).

    Call :meth:`step` once per training step, after ``loss.backward()`` and before
    ``optimizer.step()``. With ``torch.amp.GradScaler`` call ``scaler.unscale_(optimizer)`` first; a
    step whose gradients hold inf/NaN adds nothing to the scores.

    Arguments as :class:`GradualPruner`.
    """

    _block_reduce = "sum"
    _prefer_pruned = False

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int, every: int, *,
                 pattern: str = "unstructured", scope: str = "layer", initial_sparsity: float = 0.0,
                 include: LayerFilter = None, exclude: LayerFilter = DEFAULT_EXCLUDE):
        super().__init__(model, final_sparsity, start_step, end_step, every, pattern=pattern, scope=scope,
                         initial_sparsity=initial_sparsity, include=include, exclude=exclude)
        self.scores: Dict[str, Tensor] = {
            name: torch.zeros_like(module.weight, dtype=self._key_dtype, memory_format=torch.contiguous_format)
            for name, module in self.layers}
        self.finished = False
        for _, module in self.layers:
            module.dense_grad = True

    def step(self) -> Optional[float]:
        """Accumulate the scores from the current gradients, mask the gradients, update the masks
        on a pruning step, and finalize at ``end_step``.

        Returns:
            the sparsity of the last mask update so far (None before the first one).
        """
        if self.finished:
            self.step_count += 1
            return self.last_sparsity
        if self.is_pruning_step(self.step_count):
            self._check_weights_finite()  # before the scores change: a refused step leaves them as they were
        self._accumulate()
        super().step()
        if self.step_count > self.end_step:
            self.finalize()
        return self.last_sparsity

    @torch.no_grad()
    def _accumulate(self) -> None:
        with_grad = [(name, m) for name, m in self.layers if m.weight.grad is not None]
        if not with_grad:
            return
        # One flag for the whole step, as GradScaler skips a whole step; no host synchronization.
        finite = torch.stack([torch.isfinite(m.weight.grad).all().to(with_grad[0][1].weight.device)
                              for _, m in with_grad]).all()
        for name, module in with_grad:
            score = self.scores[name]
            grad = module.weight.grad
            delta = module.weight.to(score.dtype) * grad.to(score.dtype)
            # Entries whose -w * g is not finite (a NaN or inf weight, inf * 0 included) add nothing:
            # they would stay in the score for good; the next pruning step refuses such a weight by name.
            keep = torch.isfinite(delta) & finite.to(score.device)
            score.sub_(torch.where(keep, delta, torch.zeros((), dtype=score.dtype, device=score.device)))
            grad.masked_fill_(~module.weight_mask, 0)

    def _entry_keys(self, name: str, module: nn.Module) -> Tensor:
        return self.scores[name].reshape(_matrix_shape(module))

    def _check_weights_finite(self) -> None:
        _check_no_nan(self.layers)
        for name, module in self.layers:  # inf has no movement score either
            if torch.isinf(module.weight).any():
                raise ValueError(f"the weight of layer {name!r} contains inf; movement pruning cannot rank it "
                                 "(its score -weight * grad is not finite)")

    def _prune(self, sparsity: float) -> None:
        self._check_weights_finite()
        super()._prune(sparsity)

    @torch.no_grad()
    def finalize(self) -> None:
        """End movement pruning now: zero the pruned weights (and their gradients, for the
        optimizer step that follows) and turn ``dense_grad`` off, so the layers train (and keep
        their zeros under :func:`mask_optimizer`) as magnitude-pruned ones. Called by :meth:`step`
        at ``end_step``."""
        for _, module in self.layers:
            pruned = ~module.weight_mask
            module.weight.masked_fill_(pruned, 0)
            if module.weight.grad is not None:
                module.weight.grad.masked_fill_(pruned, 0)
            module.dense_grad = False
        self.finished = True

    def state_dict(self) -> Dict[str, Any]:
        """As :meth:`GradualPruner.state_dict`, plus the scores (``{layer name: Tensor}``) and
        whether the pruner has finished."""
        out = super().state_dict()
        out.update(scores={k: v.clone() for k, v in self.scores.items()}, finished=self.finished)
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (scores copied in place, ``dense_grad`` restored)."""
        _check_pruner_state(self, state_dict, ("step_count", "last_sparsity", "config", "scores", "finished"))
        scores = state_dict["scores"]
        if not isinstance(scores, dict) or set(scores) != set(self.scores):
            raise ValueError(f"MovementPruner.load_state_dict: scores must be a dict of the pruner's layers "
                             f"{sorted(self.scores)}, got {sorted(scores) if isinstance(scores, dict) else type(scores).__name__}")
        for name, score in self.scores.items():
            saved = scores[name]
            if isinstance(saved, Tensor) and saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
                raise ValueError(f"MovementPruner.load_state_dict: scores[{name!r}] holds NaN or inf")
            if not isinstance(saved, Tensor) or saved.shape != score.shape or not saved.is_floating_point():
                raise ValueError(f"MovementPruner.load_state_dict: scores[{name!r}] must be a float tensor of shape "
                                 f"{tuple(score.shape)}, got "
                                 f"{f'{saved.dtype} of shape {tuple(saved.shape)}' if isinstance(saved, Tensor) else type(saved).__name__}")
        finished = state_dict["finished"]
        if isinstance(finished, Tensor) and finished.numel() == 1 and finished.dtype == torch.bool:
            finished = bool(finished)
        if not (isinstance(finished, bool) or _ops._is_numpy_bool(finished)):
            # bool("no") is True: a wrong value would end the schedule silently
            raise TypeError(f"MovementPruner.load_state_dict: finished must be a bool, got {finished!r}")
        _checked_progress(self, state_dict)  # before anything changes (super() sets them)
        super().load_state_dict(state_dict)
        for name, score in self.scores.items():
            score.copy_(scores[name])
        self.finished = bool(finished)
        for _, module in self.layers:
            module.dense_grad = not self.finished


# ------------------------------------------------------------------------ optimizers
class _OptimizerMasking:
    """The hooks installed by :func:`mask_optimizer`; ``remove()`` uninstalls them."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.optimizer, self.model = optimizer, model
        self.fused = isinstance(optimizer, (_optim.AdamW, _optim.SGD))
        # fused: param -> (module mask we synced from, its _version, the optimizer's copy)
        self._synced: Dict[Tensor, Tuple[Tensor, int, Tensor]] = {}
        if self.fused:
            self._handles = [optimizer.register_step_pre_hook(self._sync_fused)]
            self._sync_fused(optimizer, (), {})
        else:
            self._handles = [optimizer.register_step_pre_hook(self._mask_grads),
                             optimizer.register_step_post_hook(self._zero_pruned)]
            self._zero_pruned(optimizer, (), {})

    def remove(self) -> None:
        """Stop masking (masks already set in a pyfinetune optimizer stay until changed)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pairs(self, optimizer: torch.optim.Optimizer) -> Iterator[Tuple[Tensor, Tensor]]:
        """(weight, mask) of the hard-masked layers whose weight this optimizer updates."""
        params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for module in self.model.modules():
            if _is_masked(module) and not module.dense_grad and id(module.weight) in params:
                yield module.weight, module.weight_mask

    def _sync_fused(self, optimizer, args, kwargs) -> None:
        if torch.compiler.is_compiling():
            self._sync_fused_traced(optimizer)
            return
        # Masks change in place (pruners, load_state_dict): the version counter tells when.
        live = dict(self._pairs(optimizer))
        for p, (_, _, ours) in list(self._synced.items()):
            if p not in live:
                if optimizer.get_mask(p) is ours:
                    optimizer.set_mask(p, None)
                del self._synced[p]
        for p, mask in live.items():
            seen = self._synced.get(p)
            if seen is None or seen[0] is not mask or seen[1] != mask._version or optimizer.get_mask(p) is not seen[2]:
                optimizer.set_mask(p, mask)
                self._synced[p] = (mask, mask._version, optimizer.get_mask(p))

    @torch.no_grad()
    def _sync_fused_traced(self, optimizer) -> None:
        """The pre-hook inside a compiled step (torch.compile(opt.step) or a compiled training step):
        no branch on version counters (data-dependent there). Each layer's mask was handed to the
        optimizer by an eager step before; its current values are copied into the optimizer's copy,
        and the fused step zeroes what they newly prune. Which layers are pruned cannot change
        inside a compiled step: that needs one eager step first (a clear error, not a wrong mask)."""
        for p, mask in self._pairs(optimizer):
            seen = self._synced.get(p)
            ours = optimizer.get_mask(p)
            if seen is None or seen[0] is not mask or ours is not seen[2] or _is_sharded_tensor(ours):
                raise RuntimeError(
                    "mask_optimizer: a pruned layer's mask reached the optimizer only in a compiled step; run "
                    "opt.step() once eagerly after pruning a layer, changing which layers are pruned or loading "
                    "the optimizer's or the model's state, before the compiled steps")
            ours.copy_(mask)

    @torch.no_grad()
    def _mask_grads(self, optimizer, args, kwargs) -> None:
        for p, mask in self._pairs(optimizer):
            if p.grad is not None:
                p.grad.masked_fill_(~mask, 0)

    @torch.no_grad()
    def _zero_pruned(self, optimizer, args, kwargs) -> None:
        for p, mask in self._pairs(optimizer):
            pruned = ~mask
            p.masked_fill_(pruned, 0)
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.masked_fill_(pruned, 0)


def _is_sharded_tensor(t: Any) -> bool:
    return t is not None and type(t).__name__ == "DTensor"


def mask_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> _OptimizerMasking:
    """Keep the pruned weights of ``model`` and their optimizer state exactly zero through
    training with ``optimizer``; momentum and weight decay never revive a pruned weight.

    Call it once per optimizer, before or after pruning: the hooks read the layers' masks at
    every step, so every later change (pruning, pruners, ``load_state_dict``, :func:`remove_masks`)
    is followed. Each call installs its own hooks.

    * ``pyfinetune.optim.AdamW`` / ``SGD``: a step pre-hook hands each mask to ``opt.set_mask``
      whenever it changed (the fused kernel then keeps the masked weights and state zero).
    * any other ``torch.optim.Optimizer``: a step pre-hook zeroes the gradients at pruned
      positions; a step post-hook zeroes the pruned weights and, in ``optimizer.state``, every
      tensor of the weight's shape (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
      ``momentum_buffer``, ...).

    Only the weights that ``optimizer`` holds are handled. Layers of a running
    :class:`MovementPruner` (``dense_grad=True``) are skipped until it finalizes.

    Returns:
        a handle; ``handle.remove()`` uninstalls the hooks.
    """
    _check_model("mask_optimizer", model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _OptimizerMasking(optimizer, model)


# ------------------------------------------------------------------------ report
@dataclass(frozen=True)
class LayerSparsity:
    """One row of a :class:`SparsityReport`.

    Attributes:
        name: module name (``""`` for the model itself).
        kind: class name (``"MaskedLinear"``, ``"Linear"``, ``"Conv2d"``, ``"SparseLinear"`` ...).
        shape: the weight's shape.
        numel: number of weights.
        kept: weights kept: the mask's True entries (masked layers, SparseLinear), the nonzero
            weights of a plain layer.
        masked: whether the layer carries a mask (or is a SparseLinear).
    """

    name: str
    kind: str
    shape: Tuple[int, ...]
    numel: int
    kept: int
    masked: bool

    @property
    def pruned(self) -> int:
        """Weights pruned (``numel - kept``)."""
        return self.numel - self.kept

    @property
    def sparsity(self) -> float:
        """Fraction pruned, in [0, 1]."""
        return self.pruned / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer sparsity of a model (from :func:`sparsity_report`) with totals.

    ``report["encoder.0"]`` is a layer's :class:`LayerSparsity`; iterating yields the rows;
    ``str(report)`` is an aligned text table and :meth:`to_markdown` a Markdown one.
    """

    layers: Tuple[LayerSparsity, ...]

    @property
    def numel(self) -> int:
        """Weights of all reported layers."""
        return sum(r.numel for r in self.layers)

    @property
    def kept(self) -> int:
        """Weights kept over all reported layers."""
        return sum(r.kept for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of all reported weights that is pruned."""
        return (self.numel - self.kept) / self.numel if self.numel else 0.0

    def __getitem__(self, name: str) -> LayerSparsity:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def __iter__(self) -> Iterator[LayerSparsity]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def _table(self) -> List[List[str]]:
        rows = [["layer", "type", "shape", "weights", "kept", "sparsity"]]
        for r in self.layers:
            rows.append([r.name or "(model)", r.kind, "x".join(map(str, r.shape)), str(r.numel), str(r.kept),
                         f"{100 * r.sparsity:.2f}%"])
        rows.append(["total", "", "", str(self.numel), str(self.kept), f"{100 * self.sparsity:.2f}%"])
        return rows

    def __str__(self) -> str:
        rows = self._table()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for j, r in enumerate(rows):
            cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
            lines.append("  ".join(cells).rstrip())
            if j == 0 or j == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The table in Markdown (numbers right-aligned), the totals as the last row."""
        rows = self._table()
        out = ["| " + " | ".join(rows[0]) + " |", "| --- | --- | --- | ---: | ---: | ---: |"]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(out)


def sparsity_report(model: nn.Module) -> SparsityReport:
    """The sparsity of every ``nn.Linear``, ``nn.Conv2d`` (masked or not) and :class:`SparseLinear`
    of ``model``: name, type, weight shape, number of weights, kept, sparsity, plus totals.

    Returns:
        a :class:`SparsityReport` (``print`` it, or ``.to_markdown()``).
    """
    _check_model("sparsity_report", model)
    sparse_cls = _sparse_linear_class(required=False)
    rows = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if _is_masked(module):
                shape, kept, masked = module.weight.shape, int(module.weight_mask.sum()), True
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                shape, kept, masked = module.weight.shape, int(torch.count_nonzero(module.weight)), False
            elif sparse_cls is not None and isinstance(module, sparse_cls):
                mask = module.dense_mask()
                shape, kept, masked = mask.shape, int(mask.sum()), True
            else:
                continue
            rows.append(LayerSparsity(name, type(module).__name__, tuple(shape), math.prod(shape), kept, masked))
    return SparsityReport(tuple(rows))


# ------------------------------------------------------------------------ SparseLinear
def _sparse_linear_class(required: bool = True):
    """``pyfinetune._sparse_linear.SparseLinear``, imported on first use (it is a separate module
    that may be absent); None when absent and not ``required``, else ImportError."""
    try:
        from ._sparse_linear import SparseLinear
    except ImportError as e:
        if required:
            raise ImportError(f"SparseLinear is not available: pyfinetune._sparse_linear could not be imported ({e})") from e
        return None
    return SparseLinear


def __getattr__(name: str):
    # `pyfinetune.prune.SparseLinear` without importing it with this module. AttributeError when
    # it is absent, so that hasattr() works and `from pyfinetune.prune import SparseLinear` raises
    # ImportError.
    if name == "SparseLinear":
        try:
            return _sparse_linear_class()
        except ImportError as e:
            raise AttributeError(str(e)) from e
    if name in ("calibrate_crossover", "CrossoverCalibration"):  # measures SparseLinear's kernels
        try:
            from . import _crossover
        except ImportError as e:
            raise AttributeError(str(e)) from e
        return getattr(_crossover, name)
    if name == "CROSSOVER_SPARSITY":  # the dict itself: changes to it are what kernel="auto" reads
        try:
            from ._sparse_linear import CROSSOVER_SPARSITY
        except ImportError as e:
            raise AttributeError(str(e)) from e
        return CROSSOVER_SPARSITY
    if name == "release_dense_buffers":  # SparseLinear's dense-path buffers (pyfinetune._sparse_linear)
        try:
            from ._sparse_linear import release_dense_buffers
        except ImportError as e:
            raise AttributeError(str(e)) from e
        return release_dense_buffers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the (possibly new) root."""
    if not name:
        return new
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return model


def _weight_sharers(model: nn.Module) -> Dict[int, List[Tuple[str, nn.Module]]]:
    """id of each parameter -> the (name, module) pairs that register it directly."""
    out: Dict[int, List[Tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            entry = out.setdefault(id(p), [])
            if all(m is not module for _, m in entry):
                entry.append((name, module))
    return out


def _replace_layers(model: nn.Module, old_cls, convert, where: str, skip: Optional[set] = None) -> nn.Module:
    """Replace every ``old_cls`` module of ``model`` by ``convert(module)``: one new module per old
    one, put at each place the old one is registered (a layer shared by two places stays shared),
    with the old one's train / eval mode and, per parameter the two have in common (the kept values
    for a weight), its requires_grad (a frozen layer stays frozen). Hooks registered on the old
    module are not carried over (they may read attributes the new layer lacks): a warning names them."""
    # Every replacement is built before the first is put in place: a layer that cannot be converted
    # (a mask that is not 2:4, a dtype the layout refuses) leaves the model as it was.
    new_of = {}
    places = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, old_cls) or (skip is not None and id(module) in skip):
            continue
        new = new_of.get(id(module))
        if new is None:
            try:
                new = convert(module)
            except (ValueError, TypeError) as e:  # name the layer that cannot be converted
                raise type(e)(f"{where}: the layer at {name!r}: {e}") from None
            new.train(module.training)
            frozen = {n for n, p in module.named_parameters(recurse=False) if not p.requires_grad}
            if type(module).__name__ == "SemiStructuredLinear":
                frozen.discard("weight")  # frozen by its layout, not by the user
            if frozen & {"weight", "values"}:
                frozen |= {"weight", "values"}  # the weight is "values" in a SparseLinear
            for n, p in new.named_parameters(recurse=False):
                if n in frozen:
                    p.requires_grad_(False)
            hooks = [kind for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
                     if getattr(module, kind, None)]
            if hooks:
                warnings.warn(f"{where}: the layer at {name!r} has hooks ({', '.join(h.lstrip('_') for h in hooks)}) "
                              "that its replacement does not carry; register them again on the new layer",
                              stacklevel=3)
            new_of[id(module)] = new
        places.append((name, new))
    for name, new in places:
        model = _replace_module(model, name, new)
    return model


def sparsify(model: nn.Module, layout: str = "csr", *, tune_rows: Optional[int] = None) -> nn.Module:
    """Replace every masked ``nn.Linear`` of ``model`` by a layer holding only the kept weights,
    for fast sparse fine-tuning and inference. Masked ``nn.Conv2d`` layers stay as they are. In place.

    Args:
        model: the model, pruned with :func:`magnitude_prune` (or a pruner), or with
            ``torch.nn.utils.prune`` (its layers are adopted first: :func:`adopt_torch_pruning`).
        layout: ``"csr"``: :class:`SparseLinear` (compressed rows, trainable values; CPU and CUDA);
            ``"2:4"``: :class:`pyfinetune._semi_structured.SemiStructuredLinear` (PyTorch's 2:4
            semi-structured sparse tensors on sparse tensor cores: CUDA sm80+, float16/bfloat16,
            masks from ``pattern="2:4"``; the sparse weight is frozen).
        tune_rows: ``"2:4"`` only: tune each new layer for inputs of this many rows (the flattened
            batch, e.g. batch x sequence length): ``SemiStructuredLinear.tune`` times PyTorch's
            cuSPARSELt algorithms on this GPU and keeps the fastest (PyTorch runs algorithm 0 for
            every shape); layers of the same shape, dtype and bias are timed once and share the
            choice. None (default): no tuning.

    Returns:
        the model (a new module when ``model`` itself is a masked ``nn.Linear``).
    """
    _check_model("sparsify", model)
    if layout not in ("csr", "2:4"):
        raise ValueError(f'sparsify: layout must be "csr" or "2:4", got {layout!r}')
    if tune_rows is not None:
        if not isinstance(tune_rows, int) or isinstance(tune_rows, bool) or tune_rows < 1:
            raise ValueError(f"sparsify: tune_rows must be None or a positive int, got {tune_rows!r}")
        if layout != "2:4":
            raise ValueError(f'sparsify: tune_rows applies to layout="2:4" (cuSPARSELt algorithms), got layout={layout!r}')
    if any(_has_torch_pruning(m) for m in model.modules()):
        adopt_torch_pruning(model)
    if layout == "csr":
        sparse_cls = _sparse_linear_class()
    elif layout == "2:4":
        from ._semi_structured import SemiStructuredLinear as sparse_cls
    else:
        raise ValueError(f'sparsify: layout must be "csr" or "2:4", got {layout!r}')
    tuned = {}  # (out, in, dtype, bias, device) -> the algorithm tune() chose for that product

    def convert(module):
        bias = None if module.bias is None else module.bias.detach()
        new = sparse_cls.from_dense(effective_weight(module).detach(), module.weight_mask, bias)
        if tune_rows is not None:
            # Layers of one shape share the product, so one timing: the repeated blocks of a
            # transformer are tuned once per shape (and get the same choice, not one by noise each).
            w = new.weight
            key = (new.out_features, new.in_features, w.dtype, bias is not None, w.device)
            if key not in tuned:
                tuned[key] = new.tune(tune_rows)["alg_id"]
            elif tuned[key] is not None:
                w.alg_id_cusparselt = tuned[key]
        return new

    # A layer whose weight another module also holds (tied input embedding and output head) stays
    # masked and dense: a SparseLinear has a weight of its own, which would silently untie them.
    sharers = _weight_sharers(model)
    tied, skip = [], set()
    for name, module in model.named_modules():
        if isinstance(module, MaskedLinear):
            others = [n for n, m in sharers.get(id(module.weight), []) if m is not module]
            if others:
                tied.append(f"{name!r} (with {', '.join(map(repr, others))})")
                skip.add(id(module))
    if tied:
        warnings.warn(f"sparsify: {', '.join(tied)} share their weight with another module (tied weights): they stay "
                      "masked dense layers, as a SparseLinear would untie them", stacklevel=2)
    return _replace_layers(model, MaskedLinear, convert, "sparsify", skip)


def densify(model: nn.Module, keep_masks: bool = True) -> nn.Module:
    """Replace every :class:`SparseLinear` (or 2:4 ``SemiStructuredLinear``) of ``model`` by an ``nn.Linear`` with the dense weight
    (zeros at pruned positions, same dtype and device), the reverse of :func:`sparsify`. In place.

    Args:
        model: the model.
        keep_masks: True: the layers become :class:`MaskedLinear` with the SparseLinear's mask
            (training can go on); False: plain ``nn.Linear`` (export; as :func:`remove_masks`).

    Returns:
        the model (a new module when ``model`` itself is a SparseLinear).
    """
    _check_model("densify", model)
    from ._semi_structured import SemiStructuredLinear

    sparse_cls = (_sparse_linear_class(required=False), SemiStructuredLinear)
    sparse_cls = tuple(c for c in sparse_cls if c is not None)

    def convert(module):
        weight = module.to_dense().detach()
        new = torch.nn.utils.skip_init(nn.Linear, module.in_features, module.out_features,
                                       bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            if module.bias is not None:
                new.bias.copy_(module.bias)
        if keep_masks:
            _set_mask(new, module.dense_mask(), zero_weight=True)
        return new

    return _replace_layers(model, sparse_cls, convert, "densify")
