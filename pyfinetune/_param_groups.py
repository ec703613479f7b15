"""How fine-tuning splits a model's parameters: the body (pulled toward its pretrained weights,
decayed) and the head (new, free), each with its biases and norm weights apart (neither pulled
nor decayed). Shared by :func:`pyfinetune.integrations.hf.l2sp_adamw` and
:class:`pyfinetune.Finetuner`.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

from torch import nn

GROUP_NAMES = ("body", "body_no_decay", "head", "head_no_decay")

_NORM_TYPES = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase,
                                getattr(nn, "RMSNorm", None)) if t is not None)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer: torch's norms, and any class whose name
    contains ``Norm`` (libraries define their own: LlamaRMSNorm, T5LayerNorm, timm's LayerNorm2d)."""
    return isinstance(module, _NORM_TYPES) or "Norm" in type(module).__name__


def _is_sparse_linear(module: nn.Module) -> bool:
    from .prune import _sparse_linear_class  # (imported here: prune imports the optimizers)

    cls = _sparse_linear_class(required=False)
    return cls is not None and isinstance(module, cls)


def split_parameters(model: nn.Module, heads: Sequence[str], exclude_bias_and_norm: bool = True
                     ) -> Tuple[Dict[str, List[Tuple[str, nn.Parameter]]], Set[str]]:
    """The trainable parameters of ``model`` (``requires_grad``, each once) by group.

    Args:
        model: the model.
        heads: module or parameter names of the head; ``"fc"`` covers ``fc.weight`` and ``fc.bias``.
        exclude_bias_and_norm: put biases, norm weights and every other parameter with at most one
            dimension into the ``*_no_decay`` groups; the kept weights of a
            :class:`pyfinetune.prune.SparseLinear` (``values``, one-dimensional) are weights: pulled
            and decayed like the dense weight they replace.

    Returns:
        ``({"body": [(name, param), ...], "body_no_decay": ..., "head": ..., "head_no_decay": ...},
        the names of ``heads`` that matched a parameter)``.
    """
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    sparse_weights = {id(m.values) for m in model.modules() if _is_sparse_linear(m)}
    used_heads: Set[str] = set()
    named: Dict[str, List[Tuple[str, nn.Parameter]]] = {k: [] for k in GROUP_NAMES}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hits = [h for h in heads if name == h or name.startswith(h + ".")]
        used_heads.update(hits)
        free = exclude_bias_and_norm and id(p) not in sparse_weights and (p.ndim <= 1 or id(p) in norm_params)
        named[("head" if hits else "body") + ("_no_decay" if free else "")].append((name, p))
    return named, used_heads


def shares_trained_parameters(teacher: nn.Module, student: nn.Module) -> bool:
    """Whether ``teacher`` holds a parameter (by identity) that ``student`` trains (requires_grad):
    such a "frozen" teacher would move with the student. Shared frozen weights (an embedding) are
    fine. Used by :class:`pyfinetune.Finetuner` and the Hugging Face ``DistillationTrainer``."""
    trained = {id(p) for p in student.parameters() if p.requires_grad}
    return teacher is student or any(id(p) in trained for p in teacher.parameters())
