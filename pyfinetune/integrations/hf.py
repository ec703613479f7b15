"""Hugging Face ``transformers`` integration: knowledge distillation and L2-SP fine-tuning.

* :class:`DistillationTrainer`: a :class:`transformers.Trainer` whose loss distils a teacher model
  into the model being trained with pyfinetune's fused losses: :func:`~pyfinetune.losses.kd_loss`
  on the logits, or :func:`~pyfinetune.losses.fused_linear_kd_loss` on the hidden states and the
  output heads, so that the ``[tokens, vocab]`` logits are never materialized.
* :func:`l2sp_adamw`: a :class:`pyfinetune.optim.AdamW` with the param groups fine-tuning wants
  (the body pulled toward its pretrained weights; biases, norms and the new head free), for
  ``Trainer(optimizers=(opt, None))``.

Needs ``transformers>=4.46`` and ``accelerate``: ``pip install "pyfinetune[hf]"``.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

_INSTALL_HINT = 'pip install "pyfinetune[hf]"'
try:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
except ImportError as e:
    raise ImportError(
        f"pyfinetune.integrations.hf needs Hugging Face transformers (>= 4.46) and accelerate: {_INSTALL_HINT}"
    ) from e


def _release(version: str) -> Tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


if _release(transformers.__version__) < (4, 46):
    # compute_loss(..., num_items_in_batch) and the gradient-accumulation contract came with 4.46.
    raise ImportError(
        f"pyfinetune.integrations.hf needs transformers >= 4.46, found {transformers.__version__}: {_INSTALL_HINT}"
    )

if not transformers.utils.is_torch_available():
    # transformers 5 needs torch >= 2.6: with an older torch it imports, and every model then
    # fails to build ("requires PyTorch >= 2.6").
    raise ImportError(
        f"pyfinetune.integrations.hf: transformers {transformers.__version__} cannot use torch {torch.__version__} "
        "(it refuses this release; transformers 5 needs torch >= 2.6): upgrade torch (then rebuild pyfinetune) or "
        "install a transformers release that supports this torch"
    )

from ..losses import _check_options, fused_linear_kd_loss, kd_loss  # noqa: E402
from ..optim import AdamW  # noqa: E402
from .. import ops as _ops  # noqa: E402
from .. import prune as _prune  # noqa: E402
from .._param_groups import shares_trained_parameters, split_parameters  # noqa: E402

__all__ = ["DistillationTrainer", "l2sp_adamw"]

IGNORE_INDEX = -100
_FUSED_CHOICES = ("auto", True, False)


# ------------------------------------------------------------------------------- model helpers
def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model under DDP / torch.compile / PEFT wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)) and model.get_base_model() is not model:
            model = model.get_base_model()
        else:
            return model


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether the model's labels are the inputs (position t predicts label t + 1): the rule the
    Trainer itself uses for label smoothing."""
    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return type(_unwrap(model)).__name__ in names


def _head_weight(head: nn.Linear) -> torch.Tensor:
    """The weight the head's forward computes with: a pruned (masked) head's pruned entries are
    zero there, while its stored weight may still hold them (MovementPruner keeps them, with the
    dense gradient reaching them when the layer has dense_grad)."""
    if isinstance(head, _prune.MaskedLinear):
        return _prune._masked_weight(head.weight, head.weight_mask, head.dense_grad)
    return head.weight


def _linear_output_head(model: nn.Module) -> Optional[nn.Linear]:
    get = getattr(_unwrap(model), "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


def _logits_of(outputs: Any, who: str) -> torch.Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"DistillationTrainer: the {who}'s output has no logits (got {type(outputs).__name__})")
    return logits


class _HeadCapture:
    """What the output head saw during one forward: its inputs, and its outputs when computed."""

    def __init__(self) -> None:
        self.inputs: List[torch.Tensor] = []
        self.outputs: List[torch.Tensor] = []


@contextlib.contextmanager
def _capture_head(head: nn.Linear, compute: bool) -> Iterator[_HeadCapture]:
    """Record the input of ``head`` during a forward. ``compute=False`` skips the head's matmul
    and hands the model zeros of the logits' shape instead: a zero-stride view (no memory) that
    still hangs off the head's input, weight and bias in the autograd graph, so that DDP with
    find_unused_parameters finds every parameter used (the loss itself never reads it)."""
    capture = _HeadCapture()
    original = head.forward
    had_own_forward = "forward" in vars(head)  # e.g. an accelerate hook

    def forward(x: torch.Tensor) -> torch.Tensor:
        capture.inputs.append(x)
        if compute:
            out = original(x)
            capture.outputs.append(out)
            return out
        tie = x.narrow(-1, 0, 1) * head.weight.narrow(0, 0, 1).narrow(1, 0, 1).to(x.dtype)
        if head.bias is not None:
            tie = tie + head.bias.narrow(0, 0, 1).to(x.dtype)
        return (tie.float() * 0).expand(*x.shape[:-1], head.out_features)

    head.forward = forward
    try:
        yield capture
    finally:
        if had_own_forward:
            head.forward = original
        else:
            del head.forward


def _head_is_plain(capture: _HeadCapture, logits: torch.Tensor) -> bool:
    """The model's logits are its head's output, unchanged (no soft-capping, scaling, ...)."""
    if len(capture.outputs) != 1:
        return False
    out = capture.outputs[0]
    return out.shape == logits.shape and torch.equal(out.to(logits.dtype), logits)


# -------------------------------------------------------------------------------- the trainer
try:
    _Trainer = transformers.Trainer  # imported lazily by transformers, with what it loads along
except ImportError as e:
    # e.g. torchao 0.18 installed beside torch 2.8 / 2.9: transformers' Trainer imports it, and it
    # asks torch for names that release lacks ("cannot import name 'ScalingType'").
    raise ImportError(
        f"pyfinetune.integrations.hf: transformers {transformers.__version__} cannot import its Trainer under torch "
        f"{torch.__version__} ({type(e).__name__}: {e}); often a package it loads with it (such as torchao) was "
        "built for another torch: upgrade that package, or uninstall it"
    ) from e


class DistillationTrainer(_Trainer):
    r"""A :class:`transformers.Trainer` that distils ``teacher_model`` into the model it trains.

    For each batch the teacher runs under ``torch.no_grad()`` (in eval mode, on the student's
    device, under the Trainer's mixed-precision autocast), the student runs in training mode, and
    the loss per row (token, or example for sequence classification) is that of
    :func:`pyfinetune.losses.kd_loss`: ``alpha T^2 D(teacher || student) + (1 - alpha) CE(student,
    label)`` with ``D`` chosen by ``divergence``. Rows whose label is -100 count for nothing.

    * Causal LMs (the Trainer's own rule: the model class is a causal LM; override with
      ``shift_labels``): the labels are shifted the way transformers does (position ``t`` is
      scored against ``labels[t + 1]``, the last position against nothing); a ``shift_labels``
      entry in the batch is used as is.
    * Sequence classification: ``labels`` ``[B]``, one row per example. Token-level tasks: no shift.
    * Without labels in the batch the loss is ``T^2 D`` over the rows the ``attention_mask`` keeps.
    * ``use_fused_linear``: ``True`` computes the loss with
      :func:`~pyfinetune.losses.fused_linear_kd_loss` from the inputs of both models' output heads
      (``get_output_embeddings()``, an ``nn.Linear`` each, same vocabulary): the models' head
      matmuls are skipped and the ``[tokens, vocab]`` logits are never materialized, in the forward
      or the backward. ``"auto"`` (default) does so when both heads exist and the first training
      batch shows that each model's logits are exactly its head's output (a model that soft-caps
      or scales its logits keeps the logits path, with a warning). ``False``: always the logits.
      Evaluation (``return_outputs=True``: the caller wants the logits) uses the logits path.
    * Loss normalization and gradient accumulation follow the Trainer's contract (transformers
      >= 4.46): with ``num_items_in_batch`` (the Trainer counts the labels of the whole
      accumulated batch) the loss is the sum over rows divided by it, so the accumulated gradient
      is that of the mean over every counted row; without it (no labels) the loss is the batch
      mean divided by the number of accumulation steps. The Trainer is told the loss is scaled.
      (transformers 4.47 to 4.x count every label of a causal LM, the first of each sequence too,
      which no position predicts: the loss is then smaller by that fraction, as transformers' own
      causal LM loss in those versions. 4.46 and 5.x count the shifted labels.)

    Args:
        *args, **kwargs: those of :class:`transformers.Trainer` (``model`` is the student).
        teacher_model: the teacher, any ``nn.Module`` that takes the batch (without ``labels``)
            and returns logits of the student's shape. It is not trained and not saved.
        temperature: ``T > 0``. alpha: weight of the distillation term in ``[0, 1]``.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``; beta: the JSD mix in ``(0, 1)``.
        use_fused_linear: ``"auto"``, ``True`` or ``False`` (above).
        shift_labels: ``None`` (decide from the model class), ``True`` or ``False``.
        chunk_size: rows per chunk of the fused linear path (default: about 32 MiB of logits).

    Not supported: ``torch.nn.DataParallel`` (several GPUs in one process; launch one process
    per GPU instead), DeepSpeed / FSDP sharding of the teacher.
    """

    def __init__(self, *args: Any, teacher_model: nn.Module, temperature: float = 1.0, alpha: float = 0.5,
                 divergence: str = "forward_kl", beta: float = 0.5, use_fused_linear: Union[str, bool] = "auto",
                 shift_labels: Optional[bool] = None, chunk_size: Optional[int] = None, **kwargs: Any) -> None:
        _check_options(temperature, alpha, divergence, beta, IGNORE_INDEX, "sum")
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(f"DistillationTrainer: teacher_model must be an nn.Module, got {type(teacher_model).__name__}")
        if _ops._is_numpy_bool(use_fused_linear):
            use_fused_linear = bool(use_fused_linear)
        if not any(use_fused_linear is c or (isinstance(c, str) and use_fused_linear == c) for c in _FUSED_CHOICES):
            raise ValueError(f'DistillationTrainer: use_fused_linear must be "auto", True or False, got {use_fused_linear!r}')
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise TypeError(f"DistillationTrainer: shift_labels must be None, True or False, got {shift_labels!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                       or chunk_size < 1):  # numbers.Integral: np.int64 too
            raise ValueError(f"DistillationTrainer: chunk_size must be None or an int >= 1, got {chunk_size!r}")
        chunk_size = None if chunk_size is None else int(chunk_size)
        super().__init__(*args, **kwargs)
        if shares_trained_parameters(teacher_model, self.model):
            raise ValueError("DistillationTrainer: teacher_model shares parameters that the model trains (the "
                             "same model, or layers of it): the teacher must be a separate, frozen model")
        if self.args.n_gpu > 1:
            raise ValueError(
                "DistillationTrainer does not support torch.nn.DataParallel (n_gpu > 1 in one process): launch one "
                "process per GPU (torchrun or accelerate launch), or make one GPU visible"
            )
        self.teacher_model = teacher_model.eval()
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.divergence = divergence
        self.beta = float(beta)
        self.use_fused_linear = use_fused_linear
        self.shift_labels = shift_labels if shift_labels is not None else _is_causal_lm(self.model)
        self.chunk_size = chunk_size
        # None: not checked yet ("auto"); then whether the fused path reproduces the logits.
        self._fused_ok: Optional[bool] = True if use_fused_linear is True else None
        self._teacher_kwargs = (
            {"use_cache": False} if "use_cache" in inspect.signature(teacher_model.forward).parameters else {})
        # The loss is normalized for gradient accumulation here (see compute_loss); the Trainer
        # must neither divide it again (transformers < 5 reads model_accepts_loss_kwargs, later
        # versions loss_is_scaled_for_ga) nor skip counting num_items_in_batch.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        if hasattr(self, "_loss_shifts_labels"):
            # transformers >= 5 counts num_items_in_batch over labels[..., 1:] for the models it
            # knows to shift; count the rows this loss scores (GPT-2 included).
            self._loss_shifts_labels = self.shift_labels

    # ------------------------------------------------------------------------------- helpers
    def _prepare_teacher(self, student: nn.Module) -> nn.Module:
        teacher = self.teacher_model
        param = next(student.parameters(), None)
        tparam = next(teacher.parameters(), None)
        spread = len(set(getattr(teacher, "hf_device_map", {}).values())) > 1  # placed by the user
        if param is not None and tparam is not None and tparam.device != param.device and not spread:
            teacher.to(param.device)
        if teacher.training:
            teacher.eval()
        return teacher

    def _teacher_context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        autocast = getattr(self.accelerator, "autocast", None)
        if callable(autocast):
            stack.enter_context(autocast())
        return stack

    def _heads(self, student: nn.Module, teacher: nn.Module) -> Optional[Tuple[nn.Linear, nn.Linear]]:
        if self.use_fused_linear is False or self._fused_ok is False:
            return None
        s_head, t_head = _linear_output_head(student), _linear_output_head(teacher)
        problem = None
        if s_head is None or t_head is None:
            problem = "the student and the teacher must both have an nn.Linear output head (get_output_embeddings())"
        elif s_head.out_features != t_head.out_features:
            problem = (f"the student's head has {s_head.out_features} outputs and the teacher's "
                       f"{t_head.out_features}; they must share the vocabulary")
        if problem is None:
            return s_head, t_head
        if self.use_fused_linear is True:
            raise ValueError(f"DistillationTrainer(use_fused_linear=True): {problem}")
        self._fused_ok = False
        return None

    def _row_labels(self, labels: Optional[torch.Tensor], shifted: Optional[torch.Tensor],
                    attention_mask: Optional[torch.Tensor], lead_shape: torch.Size) -> Tuple[Optional[torch.Tensor], bool]:
        """(label per row of the loss or None, whether they are real labels). Without labels, the
        rows the attention mask drops get -100 and the others 0 (with alpha = 1 the label is only
        a row mask: the cross-entropy term has weight 0)."""
        if shifted is not None:
            rows, real = shifted, True
        elif labels is not None:
            if labels.is_floating_point():
                raise ValueError(
                    "DistillationTrainer: labels must be class indices (int64); float labels (regression, multi-label "
                    "classification) cannot be distilled with a softmax loss"
                )
            if self.shift_labels and labels.dim() < 2:
                raise ValueError(
                    f"DistillationTrainer: shift_labels=True needs labels per token ([batch, sequence]), got shape "
                    f"{tuple(labels.shape)}; pass shift_labels=False"
                )
            rows = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:] if self.shift_labels else labels
            real = True
        elif attention_mask is not None and tuple(attention_mask.shape) == tuple(lead_shape):
            rows = torch.where(attention_mask != 0, 0, IGNORE_INDEX).to(torch.int64)
            real = False
        else:
            return None, False
        if tuple(rows.shape) != tuple(lead_shape):
            raise ValueError(
                f"DistillationTrainer: labels of shape {tuple(rows.shape)} do not match the logits' rows "
                f"{tuple(lead_shape)} (shift_labels={self.shift_labels})"
            )
        return rows, real

    def _options(self, real_labels: bool) -> Dict[str, Any]:
        return dict(temperature=self.temperature, alpha=self.alpha if real_labels else 1.0,
                    divergence=self.divergence, beta=self.beta, ignore_index=IGNORE_INDEX, reduction="sum")

    def _normalize(self, loss_sum: torch.Tensor, rows: Optional[torch.Tensor], n_rows: int, real_labels: bool,
                   num_items_in_batch: Any, training: bool) -> torch.Tensor:
        if real_labels and num_items_in_batch is not None:
            # An accumulated batch without any label counts 0 items: a zero loss, not 0 / 0.
            items = num_items_in_batch.clamp_min(1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1)
            loss = loss_sum / items
            if getattr(self.args, "average_tokens_across_devices", False) and self.args.world_size > 1:
                # num_items_in_batch counts every process's rows and DDP averages the gradients.
                scale = self.accelerator.num_processes
                get_tp_size = getattr(self, "get_tp_size", None)
                loss = loss * (scale // get_tp_size() if callable(get_tp_size) else scale)
            return loss
        count = (rows != IGNORE_INDEX).sum().clamp_min(1) if rows is not None else max(n_rows, 1)
        loss = loss_sum / count
        if training:
            steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
            loss = loss / steps
        return loss

    # ---------------------------------------------------------------------------- the loss
    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[torch.Tensor, int]] = None):
        """The distillation loss of one batch (see the class docstring).

        Args:
            model: the student, possibly wrapped (DDP, compile, PEFT).
            inputs: the batch; ``labels`` (and ``shift_labels``) are taken out, the rest goes to
                both models.
            return_outputs: also return the student's outputs (then the logits path is used).
            num_items_in_batch: the Trainer's count of labels over the accumulated batch.

        Returns:
            the float32 scalar loss, or ``(loss, student_outputs)``.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shifted = inputs.pop("shift_labels", None)
        student = _unwrap(model)
        teacher = self._prepare_teacher(student)
        heads = None if return_outputs else self._heads(student, teacher)

        if heads is not None:
            s_head, t_head = heads
            check = self._fused_ok is None  # "auto", first training batch: run the heads and compare
            with self._teacher_context(), _capture_head(t_head, compute=check) as t_cap:
                t_out = teacher(**inputs, **self._teacher_kwargs)
            with _capture_head(s_head, compute=check) as s_cap:
                outputs = model(**inputs)
            if check:
                self._fused_ok = _head_is_plain(t_cap, _logits_of(t_out, "teacher")) and _head_is_plain(
                    s_cap, _logits_of(outputs, "student"))
                if not self._fused_ok:
                    warnings.warn(
                        "DistillationTrainer: the logits of the student or the teacher are not the plain output of its "
                        "head (get_output_embeddings()); distilling from the logits instead of fused_linear_kd_loss",
                        stacklevel=2,
                    )
            if self._fused_ok is not False and (len(s_cap.inputs) != 1 or len(t_cap.inputs) != 1):
                raise RuntimeError(
                    "DistillationTrainer(use_fused_linear): the output head ran "
                    f"{len(s_cap.inputs)} times in the student and {len(t_cap.inputs)} times in the teacher, "
                    "expected once each; use use_fused_linear=False"
                )
            if self._fused_ok is not False:
                # Also on the batch that checked the heads: every batch's loss comes from the same
                # computation (the logits path rounds differently under bf16 autocast, so a resumed
                # run would not repeat an uninterrupted one).
                h_s, h_t = s_cap.inputs[0], t_cap.inputs[0]
                rows, real = self._row_labels(labels, shifted, inputs.get("attention_mask"), h_s.shape[:-1])
                loss_sum = fused_linear_kd_loss(
                    h_s, _head_weight(s_head), h_t, _head_weight(t_head), rows, student_bias=s_head.bias,
                    teacher_bias=t_head.bias, chunk_size=self.chunk_size, **self._options(real))
                loss = self._normalize(loss_sum, rows, h_s.shape[:-1].numel(), real, num_items_in_batch, model.training)
                return (loss, outputs) if return_outputs else loss
        else:
            with self._teacher_context():
                t_out = teacher(**inputs, **self._teacher_kwargs)
            outputs = model(**inputs)

        student_logits, teacher_logits = _logits_of(outputs, "student"), _logits_of(t_out, "teacher")
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"DistillationTrainer: the student's logits have shape {tuple(student_logits.shape)} and the "
                f"teacher's {tuple(teacher_logits.shape)}; they must match (same vocabulary / labels)"
            )
        rows, real = self._row_labels(labels, shifted, inputs.get("attention_mask"), student_logits.shape[:-1])
        loss_sum = kd_loss(student_logits, teacher_logits, rows, **self._options(real))
        loss = self._normalize(loss_sum, rows, student_logits.shape[:-1].numel(), real, num_items_in_batch,
                               model.training)
        return (loss, outputs) if return_outputs else loss


# ------------------------------------------------------------------------------- l2sp_adamw
# Children that hold a task head when the model is not a transformers model with a base model.
_HEAD_ATTRS = ("classifier", "score", "lm_head", "fc", "head", "heads", "classification_head", "qa_outputs")


def _head_prefixes(model: nn.Module) -> List[str]:
    """Names of the model's head modules: for a transformers model, every child beside its base
    model (``bert`` in BertForSequenceClassification, ``model`` in LlamaForCausalLM); else the
    output embeddings and the children named like a head."""
    if isinstance(model, transformers.PreTrainedModel):
        base = model.base_model
        if base is model:
            return []  # a bare base model (BertModel, LlamaModel): no head
        return [name for name, child in model.named_children() if child is not base]
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    found = [name for name, child in model.named_children() if (out is not None and child is out) or name in _HEAD_ATTRS]
    if not found:
        raise ValueError(
            f"l2sp_adamw: could not find the head of {type(model).__name__} (no child named one of {_HEAD_ATTRS} and no "
            "get_output_embeddings()); pass head_names=[...] (module or parameter names), or head_names=[] for none"
        )
    return found


def l2sp_adamw(model: nn.Module, lr: Union[float, torch.Tensor], *, l2sp: float, weight_decay: float = 0.0,
               exclude_bias_and_norm: bool = True, head_names: Optional[Sequence[str]] = None,
               **kwargs: Any) -> AdamW:
    """A :class:`pyfinetune.optim.AdamW` for fine-tuning ``model`` with L2-SP, ready for
    ``transformers.Trainer(optimizers=(opt, None))`` (the Trainer adds its LR scheduler).

    The trainable parameters (``requires_grad``; each once, tied weights included) go into up to
    four param groups, each with a ``"name"``; empty groups are left out:

    ===================  ==============================================  ========  ================
    name                 parameters                                      ``l2sp``  ``weight_decay``
    ===================  ==============================================  ========  ================
    ``"body"``           everything else                                 ``l2sp``  ``weight_decay``
    ``"body_no_decay"``  biases and norm weights outside the head        0         0
    ``"head"``           the head's weights                              0         ``weight_decay``
    ``"head_no_decay"``  the head's biases and norm weights              0         0
    ===================  ==============================================  ========  ================

    The body is pulled toward its weights at this call (``anchor="init"``, so load the pretrained
    weights first) or toward ``anchor``. The head has no pretrained counterpart worth keeping, so
    no pull. Biases and norm weights are the parameters of ``nn.LayerNorm`` / ``RMSNorm`` /
    ``BatchNorm*`` / ``GroupNorm`` / ``InstanceNorm*`` modules and of any module whose class name
    contains ``Norm`` (LlamaRMSNorm ...), and every parameter with at most one dimension;
    ``exclude_bias_and_norm=False`` keeps them in ``"body"`` / ``"head"``.

    Args:
        model: the model, with its pretrained weights loaded.
        lr: learning rate (float or scalar tensor).
        l2sp: strength of the pull of the body toward its anchor (``l2sp/2 ||p - p0||^2``).
        weight_decay: AdamW's decoupled weight decay of the body's and the head's weights.
        exclude_bias_and_norm: give biases and norm weights neither L2-SP nor weight decay.
        head_names: module or parameter names of the head (``["classifier"]`` covers
            ``classifier.weight`` and ``classifier.bias``). Default: for a transformers model,
            every child module beside its base model (``classifier``, ``score``, ``lm_head``;
            an ``lm_head`` tied to the input embeddings is the embeddings' parameter and stays
            in the body); for another module, ``get_output_embeddings()`` and the children named
            ``classifier``, ``score``, ``lm_head``, ``fc``, ``head``, ``heads``,
            ``classification_head`` or ``qa_outputs`` (an error when there is none).
        **kwargs: the other arguments of :class:`~pyfinetune.optim.AdamW` (``betas``, ``eps``,
            ``anchor_dtype``, ``penalty_mode``, ``masks`` ...). ``anchor`` may be ``"init"`` or a
            mapping from parameter name to tensor (e.g. the pretrained ``state_dict()``).

    Returns:
        the optimizer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"l2sp_adamw: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(exclude_bias_and_norm, bool):
        raise TypeError(f"l2sp_adamw: exclude_bias_and_norm must be True or False, got {exclude_bias_and_norm!r}")
    if head_names is None:
        heads = _head_prefixes(model)
    elif isinstance(head_names, str):
        raise TypeError("l2sp_adamw: head_names must be a list of names, got a str")
    else:
        heads = [str(h) for h in head_names]
    anchor = kwargs.pop("anchor", "init")
    if not (isinstance(anchor, Mapping) or (isinstance(anchor, str) and anchor == "init")):
        raise TypeError('l2sp_adamw: anchor must be "init" or a mapping from parameter name to tensor')

    named, used_heads = split_parameters(model, heads, exclude_bias_and_norm)
    if head_names is not None:
        unknown = [h for h in heads if h not in used_heads]
        if unknown:
            raise ValueError(f"l2sp_adamw: head_names {unknown} match no trainable parameter of {type(model).__name__}")

    settings = {"body": (l2sp, weight_decay), "body_no_decay": (0.0, 0.0), "head": (0.0, weight_decay),
                "head_no_decay": (0.0, 0.0)}
    groups = []
    for key, members in named.items():
        if not members:
            continue
        group_l2sp, group_wd = settings[key]
        group = {"params": [p for _, p in members], "name": key, "l2sp": group_l2sp, "weight_decay": group_wd}
        if isinstance(anchor, Mapping) and group_l2sp > 0:
            missing = [n for n, _ in members if n not in anchor]
            if missing:
                raise ValueError(f"l2sp_adamw: anchor has no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            group["anchor"] = [anchor[n] for n, _ in members]
        groups.append(group)
    if not groups:
        raise ValueError(f"l2sp_adamw: {type(model).__name__} has no trainable parameter")
    return AdamW(groups, lr=lr, weight_decay=weight_decay, **kwargs)
