"""pyfinetune.integrations.hf: DistillationTrainer and l2sp_adamw on tiny random transformers
models built from configs (no downloads), trained for a few steps on the CPU.

Skipped without transformers, except the import checks.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from pyfinetune.losses import kd_loss
from pyfinetune.optim import SGD, AdamW

from conftest import hf_unusable

if not hf_unusable():
    import transformers
    from pyfinetune.integrations.hf import DistillationTrainer, l2sp_adamw
needs_hf = pytest.mark.skipif(bool(hf_unusable()), reason=f"pyfinetune.integrations.hf cannot be used: {hf_unusable()}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, S, B = 101, 10, 4


@pytest.fixture(autouse=True)
def _restore_accelerate_environment():
    """TrainingArguments(bf16=True) exports ACCELERATE_MIXED_PRECISION=bf16 (transformers 4.x):
    left set, a later float32 Trainer in the same process would still autocast."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_")}
    yield
    for k in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[k]
    os.environ.update(saved)


# ----------------------------------------------------------------------------------- import
def _import_hf_after(prelude: str) -> str:
    """stdout of a fresh interpreter that runs ``prelude`` and then imports the hf module, printing
    IMPORT-ERROR and the message if that fails."""
    code = prelude + (
        "try:\n"
        "    import pyfinetune.integrations.hf\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_without_transformers():
    # A fresh interpreter: `import pyfinetune` does not import transformers; where transformers
    # cannot be imported, the hf module says what to install.
    out = _import_hf_after(
        "import sys\n"
        "import pyfinetune, pyfinetune.integrations\n"
        "assert 'transformers' not in sys.modules, 'import pyfinetune imported transformers'\n"
        "sys.modules['transformers'] = None\n"
    )
    assert "IMPORT-ERROR" in out and 'pip install "pyfinetune[hf]"' in out, out


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
@pytest.mark.parametrize("prelude, expected", [
    # transformers 5 imports under torch < 2.6 and then refuses to build any model (simulated:
    # is_torch_available() False).
    ("import transformers, transformers.utils\ntransformers.utils.is_torch_available = lambda: False\n",
     [f"cannot use torch {torch.__version__}", "transformers 5 needs torch >= 2.6"]),
    # torchao 0.18 beside torch 2.8 / 2.9: transformers imports, its lazily imported Trainer does
    # not (simulated: the transformers.trainer module refused).
    ("import sys, transformers\nsys.modules['transformers.trainer'] = None\n",
     [f"cannot import its Trainer under torch {torch.__version__}", "such as torchao"]),
], ids=["refuses-torch", "trainer-fails"])
def test_import_with_a_transformers_that_cannot_serve_this_torch(prelude, expected):
    # The hf module says so at import, naming both releases.
    out = _import_hf_after(prelude)
    assert "IMPORT-ERROR" in out and all(e in out for e in expected), out

# ----------------------------------------------------------------------------------- models
def llama(hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def gpt2(hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=hidden, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def gemma2(hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64, final_logit_softcapping=5.0)
    return transformers.Gemma2ForCausalLM(cfg)


def bert_classifier(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, max_position_embeddings=64)
    return transformers.BertForSequenceClassification(cfg)


def distilbert_classifier(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.DistilBertConfig(vocab_size=V, dim=48, n_layers=2, n_heads=4, hidden_dim=96, num_labels=3,
                                        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
                                        max_position_embeddings=64)
    return transformers.DistilBertForSequenceClassification(cfg)


def lm_examples(n=B, seed=0):
    """Right-padded sequences of different lengths; the labels are the inputs, -100 on padding
    and on the first token (no position predicts it, and transformers 4.47 to 4.x counts it in
    num_items_in_batch while 4.46 and 5.x do not: so every version counts the same)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, V, (S,), generator=g)
        length = S - 2 * (i % 3)
        mask = (torch.arange(S) < length).long()
        labels = torch.where(mask.bool(), ids, -100)
        labels[0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def classification_examples(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, V, (S,), generator=g), "attention_mask": torch.ones(S, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(n)]


def collate(examples):
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def training_args(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
              disable_tqdm=True, per_device_train_batch_size=B, max_steps=5, learning_rate=1e-2,
              lr_scheduler_type="constant", seed=0)
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def trainer_for(tmp_path, student, teacher, data=None, **kw):
    options = {k: kw.pop(k) for k in list(kw) if k in ("temperature", "alpha", "divergence", "beta", "use_fused_linear",
                                                       "shift_labels", "chunk_size", "optimizers")}
    return DistillationTrainer(model=student, args=training_args(tmp_path, **kw), train_dataset=data,
                               teacher_model=teacher, **options)


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def by_hand_causal(student, teacher, batch, **kw):
    """kd_loss with the labels shifted as transformers does, batchmean over the labelled rows."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t = teacher(**inputs).logits
    s = student(**inputs).logits
    return kd_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:], **kw)


# ----------------------------------------------------------------------- distillation loss
@needs_hf
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_causal_lm_loss_equals_shifted_kd_loss(tmp_path, divergence):
    student, teacher = llama(32, seed=1), llama(48, seed=2)
    trainer = trainer_for(tmp_path, student, teacher, temperature=2.0, alpha=0.3, divergence=divergence, beta=0.3,
                          use_fused_linear=False)
    batch = collate(lm_examples())
    loss, outputs = trainer.compute_loss(student, dict(batch), return_outputs=True)
    expected = by_hand_causal(student, teacher, batch, temperature=2.0, alpha=0.3, divergence=divergence, beta=0.3)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert outputs.logits.shape == (B, S, V)
    assert teacher.training is False
    # With the Trainer's count of labels (over an accumulated batch), the sum is divided by it.
    count = (batch["labels"][:, 1:] != -100).sum()
    loss2 = trainer.compute_loss(student, dict(batch), num_items_in_batch=count * 3)
    torch.testing.assert_close(loss2, expected / 3, rtol=1e-5, atol=1e-6)
    # No label anywhere in the accumulated batch: 0, not NaN.
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    assert trainer.compute_loss(student, empty, num_items_in_batch=torch.tensor(0)).item() == 0.0


@needs_hf
def test_without_labels_the_attention_mask_selects_rows(tmp_path):
    student, teacher = llama(32, seed=1), llama(48, seed=2)
    trainer = trainer_for(tmp_path, student, teacher, temperature=1.5, alpha=0.3, use_fused_linear=False)
    batch = collate(lm_examples())
    del batch["labels"]
    mask = batch["attention_mask"].bool()
    student.eval()  # compute_loss only divides by accumulation steps in training
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        t = teacher(**batch).logits
    rows = kd_loss(student(**batch).logits, t, None, temperature=1.5, reduction="none").reshape(B, S)
    torch.testing.assert_close(loss, rows[mask].sum() / mask.sum(), rtol=1e-5, atol=1e-6)


@needs_hf
@pytest.mark.parametrize("model_fn", [llama, gpt2], ids=["llama", "gpt2_tied"])
def test_fused_linear_equals_logits_path(tmp_path, model_fn):
    batch = collate(lm_examples())

    def run(use_fused_linear, calls=1):
        student, teacher = model_fn(32, seed=1), model_fn(48, seed=2)
        trainer = trainer_for(tmp_path, student, teacher, temperature=2.0, alpha=0.6, use_fused_linear=use_fused_linear,
                              chunk_size=7)
        head_outputs = []
        student.get_output_embeddings().register_forward_hook(lambda m, i, o: head_outputs.append(o))
        for _ in range(calls):
            student.zero_grad()
            loss = trainer.compute_loss(student, dict(batch))
            loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        return loss.detach(), grads, head_outputs, trainer

    loss, grads, _, _ = run(False)
    for mode, calls in ((True, 1), ("auto", 2)):
        fused_loss, fused_grads, head_outputs, trainer = run(mode, calls)
        torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
        assert trainer._fused_ok is True
        # The last call never computed the student's logits: its head handed out a zero-stride view.
        assert head_outputs[-1].shape == (B, S, V) and head_outputs[-1].stride()[-1] == 0


@needs_hf
def test_auto_checks_on_its_first_batch_and_still_uses_the_fused_loss(tmp_path):
    # The batch that checks the heads used to take its loss from the logits path: under bf16
    # autocast it rounds differently, so a resumed run did not repeat an uninterrupted one.
    student, teacher = llama(32, seed=1), llama(48, seed=2)
    batch = collate(lm_examples())
    auto = trainer_for(tmp_path, student, teacher, temperature=2.0, use_fused_linear="auto", bf16=True)
    fused = trainer_for(tmp_path, student, teacher, temperature=2.0, use_fused_linear=True, bf16=True)
    with torch.no_grad(), auto.accelerator.autocast():
        first, second = auto.compute_loss(student, dict(batch)), auto.compute_loss(student, dict(batch))
        expected = fused.compute_loss(student, dict(batch))
    assert auto._fused_ok is True
    assert torch.equal(first, second) and torch.equal(first, expected)


@needs_hf
@pytest.mark.parametrize("mode", [True, "auto"])
def test_fused_path_uses_a_masked_heads_effective_weight(tmp_path, mode):
    # A MovementPruner keeps the pruned values in the head's weight (the forward masks them): the
    # fused loss read the raw weight and counted them.
    from pyfinetune import prune

    student, teacher = llama(32, seed=1), llama(48, seed=2)
    head = student.get_output_embeddings()
    prune.attach_mask(head, torch.rand(head.weight.shape) > 0.5)
    head.dense_grad = True
    with torch.no_grad():
        head.weight.add_(torch.randn_like(head.weight))  # nonzero values at the pruned positions
    batch = collate(lm_examples())
    ref = trainer_for(tmp_path, student, teacher, temperature=2.0, use_fused_linear=False)
    ours = trainer_for(tmp_path, student, teacher, temperature=2.0, use_fused_linear=mode)
    grads = []
    for trainer in (ref, ours, ours):
        student.zero_grad()
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        grads.append((loss.detach(), head.weight.grad.clone()))
    for loss, grad in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grads[0][1], rtol=1e-4, atol=1e-6)
    assert ours._fused_ok is True


@needs_hf
def test_auto_keeps_logits_when_the_model_post_processes_them(tmp_path):
    # Gemma 2 soft-caps its logits: the fused path would distil the uncapped ones.
    student, teacher = gemma2(32, seed=1), gemma2(32, seed=2)
    trainer = trainer_for(tmp_path, student, teacher, temperature=2.0, use_fused_linear="auto")
    batch = collate(lm_examples())
    with pytest.warns(UserWarning, match="not the plain output of its head"):
        first = trainer.compute_loss(student, dict(batch))
    assert trainer._fused_ok is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = trainer.compute_loss(student, dict(batch))
    expected = by_hand_causal(student, teacher, batch, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)


@needs_hf
def test_sequence_classification_loss_and_training(tmp_path):
    student, teacher = bert_classifier(seed=1), distilbert_classifier(seed=2)
    data = classification_examples()
    trainer = trainer_for(tmp_path, student, teacher, data, temperature=3.0, alpha=0.5, max_steps=6,
                          learning_rate=5e-3)
    batch = collate(data)
    loss = trainer.compute_loss(student, dict(batch))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t = teacher(**inputs).logits
    expected = kd_loss(student(**inputs).logits, t, batch["labels"], temperature=3.0, alpha=0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    # The first logged loss is the loss of the first (whole) batch, before any update.
    assert losses[0] == pytest.approx(expected.item(), rel=1e-3)


@needs_hf
def test_causal_lm_training_with_l2sp_adamw(tmp_path):
    student, teacher = llama(32, seed=1), llama(48, seed=2)
    data = lm_examples()
    expected_first = by_hand_causal(student, teacher, collate(data), temperature=2.0, alpha=0.5).item()
    opt = l2sp_adamw(student, 1e-2, l2sp=0.1, weight_decay=0.01)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = trainer_for(tmp_path, student, teacher, data, temperature=2.0, alpha=0.5, optimizers=(opt, None),
                          max_steps=8)
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0]
    assert losses[0] == pytest.approx(expected_first, rel=1e-3)
    assert trainer._fused_ok is True
    for n, p in student.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, start[n]), n
        anchor = opt.anchor_of(p)
        if anchor is not None:
            assert torch.equal(anchor, start[n])


@needs_hf
def test_bf16_mixed_precision_fused_and_logits_paths_agree(tmp_path):
    # bf16=True: the student runs under accelerate's autocast, the teacher under the trainer's.
    runs, fused = {}, {}
    for mode in ("auto", False):
        student, teacher = llama(32, seed=1), llama(48, seed=2)
        trainer = trainer_for(tmp_path, student, teacher, lm_examples(), bf16=True, max_steps=4, use_fused_linear=mode,
                              temperature=2.0)
        trainer.train()
        runs[mode], fused[mode] = logged_losses(trainer), trainer._fused_ok
        assert all(torch.isfinite(torch.tensor(runs[mode]))) and runs[mode][-1] < runs[mode][0]
    assert fused == {"auto": True, False: None}
    assert runs["auto"] == pytest.approx(runs[False], rel=2e-2)


@needs_hf
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # Examples with different numbers of labels: the accumulated gradient must be that of the mean
    # over all labelled tokens, not the mean of the two micro-batch means. SGD keeps the update
    # proportional to the gradient (Adam's first step would hide a scale error).
    data = lm_examples(4, seed=3)
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        student, teacher = llama(32, seed=1), llama(48, seed=2)
        opt = SGD(student.parameters(), lr=0.5)
        trainer = trainer_for(tmp_path, student, teacher, data, optimizers=(opt, None), max_steps=1,
                              per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                              use_fused_linear=False)
        trainer.train()
        results.append(({n: p.detach().clone() for n, p in student.named_parameters()}, logged_losses(trainer)[0]))
    (one, loss_one), (acc, loss_acc) = results
    assert loss_acc == pytest.approx(loss_one, rel=1e-4)
    for name in one:
        torch.testing.assert_close(acc[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


_DDP_SCRIPT = """
import json, os, sys, torch, transformers
sys.path[:0] = [{root!r}, {tests!r}]
from test_hf import llama, lm_examples, logged_losses, training_args
from pyfinetune.integrations.hf import DistillationTrainer
student, teacher = llama(32, seed=1), llama(48, seed=2)
args = training_args({out!r}, ddp_backend="gloo", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=3)
trainer = DistillationTrainer(model=student, args=args, train_dataset=lm_examples(16), teacher_model=teacher,
                              use_fused_linear={mode!r})
trainer.train()
with open(os.path.join({out!r}, "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(dict(wrapper=type(trainer.model_wrapped).__name__, fused=trainer._fused_ok,
                   losses=logged_losses(trainer), weights=student.lm_head.weight[0, :4].tolist()), f)
os._exit(0)  # the interpreter's teardown of gloo's threads sometimes aborts ("terminate called ...")
"""


@needs_hf
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PYFINETUNE_SLOW"), reason="slow (two processes): set PYFINETUNE_SLOW=1")
def test_ddp_two_processes_fused_equals_logits(tmp_path):
    # The fused path hands DDP placeholder logits tied to the head's input and weight: with the
    # Trainer's find_unused_parameters=True DDP must still see every parameter used.
    runs = {}
    for mode in (True, False):
        script, out_dir = tmp_path / f"ddp_{mode}.py", tmp_path / f"out_{mode}"
        out_dir.mkdir()
        script.write_text(_DDP_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"), out=str(out_dir), mode=mode))
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              str(script)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
        assert out.returncode == 0, out.stderr[-3000:]
        ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0] == ranks[1], ranks  # the ranks hold the same weights
        assert ranks[0]["wrapper"] == "DistributedDataParallel" and ranks[0]["fused"] == (True if mode else None)
        runs[mode] = ranks[0]
    for key in ("losses", "weights"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-4, abs=1e-6)


@needs_hf
def test_evaluate_uses_the_logits_path(tmp_path):
    student, teacher = llama(32, seed=1), llama(48, seed=2)
    data = lm_examples()
    trainer = trainer_for(tmp_path, student, teacher, data, per_device_eval_batch_size=B)
    metrics = trainer.evaluate(eval_dataset=data)
    student.eval()
    expected = by_hand_causal(student, teacher, collate(data), temperature=1.0, alpha=0.5)
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-4)


@needs_hf
def test_argument_errors(tmp_path):
    student, teacher = bert_classifier(seed=1), distilbert_classifier(seed=2)
    with pytest.raises(ValueError, match="use_fused_linear"):
        trainer_for(tmp_path, student, teacher, use_fused_linear="yes")
    with pytest.raises(ValueError, match="temperature"):
        trainer_for(tmp_path, student, teacher, temperature=0.0)
    with pytest.raises(TypeError, match="teacher_model"):
        trainer_for(tmp_path, student, "teacher")
    for bad in (0, -5, "x", 1.5, True):
        with pytest.raises(ValueError, match=r"chunk_size must be None or an int >= 1"):
            trainer_for(tmp_path, student, teacher, chunk_size=bad)
    with pytest.raises(ValueError, match="teacher_model shares parameters that the model trains"):
        trainer_for(tmp_path, student, student)
    # NumPy scalars (np.int64 is no int, np.bool_ no bool) used to be refused as not an int / not True
    np = pytest.importorskip("numpy")
    trainer = trainer_for(tmp_path, student, teacher, chunk_size=np.int64(4), use_fused_linear=np.bool_(False))
    assert trainer.chunk_size == 4 and type(trainer.chunk_size) is int and trainer.use_fused_linear is False
    with pytest.raises(TypeError, match="exclude_bias_and_norm must be True or False"):
        l2sp_adamw(student, 1e-3, l2sp=0.1, exclude_bias_and_norm="no")
    batch = collate(classification_examples())
    trainer = trainer_for(tmp_path, student, teacher, use_fused_linear=True)
    with pytest.raises(ValueError, match="nn.Linear output head"):
        trainer.compute_loss(student, dict(batch))
    trainer = trainer_for(tmp_path, student, teacher)
    with pytest.raises(ValueError, match="class indices"):
        trainer.compute_loss(student, dict(batch, labels=batch["labels"].float()))
    with pytest.raises(ValueError, match="must match"):
        trainer_for(tmp_path, llama(32), llama(32)).compute_loss(student, dict(batch))
    with pytest.raises(ValueError, match="labels per token"):
        trainer_for(tmp_path, student, teacher, shift_labels=True).compute_loss(student, dict(batch))


# ------------------------------------------------------------------------------ l2sp_adamw
def _groups(opt):
    return {g["name"]: g for g in opt.param_groups}


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


@needs_hf
def test_l2sp_adamw_groups_causal_lm():
    model = llama(32)
    opt = l2sp_adamw(model, 1e-3, l2sp=0.5, weight_decay=0.1, betas=(0.8, 0.9))
    assert isinstance(opt, AdamW)
    groups = _groups(opt)
    assert set(groups) == {"body", "body_no_decay", "head"}
    assert _names(model, groups["head"]) == ["lm_head.weight"]
    assert all("norm" in n for n in _names(model, groups["body_no_decay"]))
    assert "model.embed_tokens.weight" in _names(model, groups["body"])
    assert (groups["body"]["l2sp"], groups["body"]["weight_decay"]) == (0.5, 0.1)
    assert (groups["body_no_decay"]["l2sp"], groups["body_no_decay"]["weight_decay"]) == (0.0, 0.0)
    assert (groups["head"]["l2sp"], groups["head"]["weight_decay"]) == (0.0, 0.1)
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    # Every trainable parameter exactly once; anchors (the current weights) for the body only.
    assert sorted(n for g in opt.param_groups for n in _names(model, g)) == sorted(n for n, _ in model.named_parameters())
    for n, p in model.named_parameters():
        anchor = opt.anchor_of(p)
        assert (anchor is not None) == (n in _names(model, groups["body"]))
        assert anchor is None or torch.equal(anchor, p)


@needs_hf
def test_l2sp_adamw_groups_classifier_and_tied_lm():
    model = bert_classifier()
    groups = _groups(l2sp_adamw(model, 1e-3, l2sp=0.1))
    assert _names(model, groups["head"]) == ["classifier.weight"]
    assert _names(model, groups["head_no_decay"]) == ["classifier.bias"]
    assert "bert.pooler.dense.weight" in _names(model, groups["body"])
    assert "bert.embeddings.LayerNorm.weight" in _names(model, groups["body_no_decay"])
    # GPT-2 ties lm_head to the input embeddings: one pretrained parameter, in the body.
    model = gpt2()
    groups = _groups(l2sp_adamw(model, 1e-3, l2sp=0.1))
    assert "head" not in groups and "transformer.wte.weight" in _names(model, groups["body"])
    # exclude_bias_and_norm=False: biases and norms keep the pull and the decay.
    model = bert_classifier()
    groups = _groups(l2sp_adamw(model, 1e-3, l2sp=0.1, exclude_bias_and_norm=False))
    assert set(groups) == {"body", "head"} and "classifier.bias" in _names(model, groups["head"])


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.proj = torch.nn.Linear(4, 4)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.proj(self.bn(self.conv(x)).mean((2, 3))))


@needs_hf
def test_l2sp_adamw_plain_module_head_names_anchor_and_frozen():
    net = _Net()
    groups = _groups(l2sp_adamw(net, 1e-3, l2sp=0.1))
    assert _names(net, groups["head"]) == ["fc.weight"] and _names(net, groups["head_no_decay"]) == ["fc.bias"]
    assert _names(net, groups["body"]) == ["conv.weight", "proj.weight"]
    assert _names(net, groups["body_no_decay"]) == ["bn.bias", "bn.weight", "conv.bias", "proj.bias"]
    groups = _groups(l2sp_adamw(net, 1e-3, l2sp=0.1, head_names=["proj", "fc.weight"]))
    assert _names(net, groups["head"]) == ["fc.weight", "proj.weight"]
    assert set(groups) == {"body", "body_no_decay", "head", "head_no_decay"}
    assert _names(net, groups["body_no_decay"]) == ["bn.bias", "bn.weight", "conv.bias", "fc.bias"]
    assert "head" not in _groups(l2sp_adamw(net, 1e-3, l2sp=0.1, head_names=[]))
    with pytest.raises(ValueError, match="match no trainable parameter"):
        l2sp_adamw(net, 1e-3, l2sp=0.1, head_names=["classifier"])
    with pytest.raises(ValueError, match="could not find the head"):
        l2sp_adamw(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1e-3, l2sp=0.1)
    # Anchors from a state dict by name; frozen parameters are left out.
    pretrained = {k: v + 1.0 for k, v in net.state_dict().items()}
    net.conv.weight.requires_grad_(False)
    opt = l2sp_adamw(net, 1e-3, l2sp=0.1, anchor=pretrained)
    assert all(p is not net.conv.weight for g in opt.param_groups for p in g["params"])
    assert torch.equal(opt.anchor_of(net.proj.weight), pretrained["proj.weight"])
    with pytest.raises(ValueError, match="anchor has no tensor"):
        l2sp_adamw(net, 1e-3, l2sp=0.1, anchor={})
    with pytest.raises(TypeError, match="anchor"):
        l2sp_adamw(net, 1e-3, l2sp=0.1, anchor=[torch.zeros(1)])


@needs_hf
def test_l2sp_adamw_with_trainer(tmp_path):
    model = bert_classifier(seed=3)
    start = copy.deepcopy(model.state_dict())
    opt = l2sp_adamw(model, 1e-2, l2sp=1.0, weight_decay=0.01)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, max_steps=6),
                                   train_dataset=classification_examples(), optimizers=(opt, None))
    trainer.train()
    losses = logged_losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt  # accelerate wraps it
    assert all(g["lr"] == pytest.approx(1e-2) for g in opt.param_groups)
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all()
        if opt.anchor_of(p) is not None:
            assert torch.equal(opt.anchor_of(p), start[n])
