"""Checkpoint and resume: the model, a pyfinetune optimizer (with its L2-SP anchors and masks), an
LR scheduler and the RNG state saved with ``torch.save`` and loaded with
``torch.load(weights_only=True)`` into fresh objects continue the run bit for bit (CPU).

The fresh objects start from other weights on purpose: the anchors and masks must come from the
checkpoint, not from the model the new optimizer was built on.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_bitwise_equal, bits, snapshot

from pyfinetune.losses import kd_loss
from pyfinetune.optim import SGD, AdamW

from conftest import hf_unusable

if not hf_unusable():
    import transformers
    from pyfinetune.integrations.hf import l2sp_adamw

STEPS, SPLIT = 8, 3
D_IN, HIDDEN, CLASSES = 12, 16, 9


def _student(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(HIDDEN, CLASSES))


TEACHER_WEIGHT = torch.randn(CLASSES, D_IN, generator=torch.Generator().manual_seed(123))


def _batch(step):
    """The batch of a step depends on the step only: nothing to save for the data."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, D_IN, generator=g)
    labels = torch.randint(0, CLASSES, (8,), generator=g)
    labels[step % 8] = -100
    return x, labels


def _optimizer(kind, model):
    groups = [
        {"params": [model[0].weight], "l2sp": 0.3, "anchor_dtype": torch.bfloat16},
        {"params": [model[0].bias, model[3].bias], "weight_decay": 0.0},
        {"params": [model[3].weight], "l1": 1e-3},
    ]
    if kind == "adamw":
        opt = AdamW(groups, lr=3e-2, weight_decay=1e-2, amsgrad=True)
    else:
        opt = SGD(groups, lr=5e-2, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    return opt


def _scheduler(opt):
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    return torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[2])


def _train(model, opt, sched, steps):
    for step in steps:
        x, labels = _batch(step)
        loss = kd_loss(model(x), x @ TEACHER_WEIGHT.t(), labels, temperature=2.0, alpha=0.6)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def _setup(kind, seed):
    model = _student(seed)
    opt = _optimizer(kind, model)
    mask = torch.arange(model[3].weight.numel()).reshape(model[3].weight.shape) % 4 != 0
    opt.set_mask(model[3].weight, mask)
    return model, opt, _scheduler(opt)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_resume_equals_uninterrupted_run(tmp_path, kind):
    # Dropout draws from the global generator, which _student seeds: its state is checkpointed.
    reference, reference_opt, reference_sched = _setup(kind, seed=0)
    _train(reference, reference_opt, reference_sched, range(STEPS))

    model, opt, sched = _setup(kind, seed=0)
    _train(model, opt, sched, range(SPLIT))
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state()}, path)
    del model, opt, sched

    model, opt, sched = _setup(kind, seed=1)  # other weights, anchors and masks
    opt.set_mask(model[3].weight, None)
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    sched.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"])
    _train(model, opt, sched, range(SPLIT, STEPS))

    assert_bitwise_equal(snapshot(opt), snapshot(reference_opt))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(bits(p), bits(q))
    assert sched.get_last_lr() == reference_sched.get_last_lr()
    assert opt.anchor_of(model[0].weight).dtype == torch.bfloat16
    assert (model[3].weight[~opt.get_mask(model[3].weight)] == 0).all()


def _old_trainer_with_new_torch():
    # transformers < 4.51 (4.46.3 seen) loads its own rng_state.pth, which holds numpy arrays, with
    # torch.load's default, weights_only=True since torch 2.6: resuming fails before our state.
    release = tuple(int("".join(c for c in x if c.isdigit()) or 0) for x in transformers.__version__.split(".")[:2])
    return release < (4, 51) and tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6)


@pytest.mark.skipif(bool(hf_unusable()), reason=f"pyfinetune.integrations.hf cannot be used: {hf_unusable()}")
@pytest.mark.skipif(not hf_unusable() and _old_trainer_with_new_torch(),
                    reason="this transformers cannot resume its own checkpoints under this torch")
def test_trainer_resume_from_checkpoint_with_l2sp_adamw(tmp_path):
    """transformers.Trainer saves and reloads l2sp_adamw's state (anchors included) and the run
    resumed from the checkpoint of step 2 ends bit for bit where the uninterrupted one does."""
    from test_hf import bert_classifier, classification_examples, logged_losses, training_args

    def run(output, max_steps, resume=None, seed=3):
        model = bert_classifier(seed=seed)  # resumed: other weights, so other anchors until the state loads
        opt = l2sp_adamw(model, 1e-2, l2sp=0.5, weight_decay=0.01)
        args = training_args(output, max_steps=max_steps, save_strategy="steps", save_steps=2,
                             per_device_train_batch_size=2, lr_scheduler_type="linear")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=classification_examples(8),
                                       optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return model, opt, logged_losses(trainer)

    full_model, full_opt, full_losses = run(tmp_path / "full", 4)
    model, opt, losses = run(tmp_path / "resumed", 4, resume=str(tmp_path / "full" / "checkpoint-2"), seed=4)
    assert losses == full_losses  # the first two come from the checkpoint's trainer state
    for (name, p), q in zip(model.named_parameters(), full_model.parameters()):
        assert torch.equal(p, q), name
    assert_bitwise_equal(snapshot(opt), snapshot(full_opt))
