"""Mixed-precision training loops with pyfinetune: ``torch.autocast("cpu", dtype=torch.bfloat16)``
with the L2-SP AdamW and the distillation losses, and on CUDA float16 autocast with
``torch.amp.GradScaler`` (skipped without a GPU). Parameters stay float32; autocast runs the
matmuls and convolutions in low precision.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyfinetune.losses import fused_linear_kd_loss, kd_loss
from pyfinetune.optim import AdamW

STEPS = 30


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 5))


def _mlp(d_in=16, hidden=32, classes=7):
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes))


def _l2sp_adamw(model, lr=1e-2):
    """Body (weights) pulled toward the start, biases / norms free, last layer as the head."""
    *body, head = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    weights = [m.weight for m in body]
    head_params = list(head.parameters())
    others = [p for p in model.parameters() if all(p is not q for q in weights + head_params)]
    return AdamW([{"params": weights, "l2sp": 0.05}, {"params": others, "weight_decay": 0.0},
                  {"params": head_params}], lr=lr, weight_decay=1e-2)


def _train(model, opt, loss_of_step, scaler=None):
    """STEPS optimizer steps on ``loss_of_step(step)`` (through ``scaler`` when given), then the
    checks of ``_check_training``."""
    start = [p.detach().clone() for p in model.parameters()]
    losses = []
    for step in range(STEPS):
        loss = loss_of_step(step)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        losses.append(loss.item())
    _check_training(losses, model, opt, start)


def _check_training(losses, model, opt, start):
    losses = torch.tensor(losses)
    assert torch.isfinite(losses).all(), losses
    assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    for p, p0 in zip(model.parameters(), start):
        anchor = opt.anchor_of(p)
        assert anchor is None or torch.equal(anchor, p0)


def test_cnn_adamw_l2sp_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 6, 6, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    model = _cnn()
    opt = _l2sp_adamw(model)

    def loss_of_step(step):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16
            return F.cross_entropy(logits, y)

    _train(model, opt, loss_of_step)


def test_kd_loss_bf16_student_fp32_teacher():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    teacher, student = _mlp(hidden=64), _mlp()
    with torch.no_grad():
        teacher_logits = teacher(x) * 3  # float32, outside autocast
    labels = teacher_logits.argmax(-1)
    labels[::7] = -100
    opt = _l2sp_adamw(student)

    def loss_of_step(step):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = student(x)
            loss = kd_loss(logits, teacher_logits, labels, temperature=2.0, alpha=0.7)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        if step == 0:
            # The kernel reads the bf16 logits and computes in float32: the loss of the same
            # values upcast, to float32 rounding.
            same = kd_loss(logits.detach().float(), teacher_logits, labels, temperature=2.0, alpha=0.7)
            torch.testing.assert_close(loss.detach(), same, rtol=1e-5, atol=1e-6)
        return loss

    _train(student, opt, loss_of_step)


def test_fused_linear_kd_loss_bf16_autocast_training():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 16, generator=g)
    labels = torch.randint(0, 50, (48,), generator=g)
    body, head = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh()), torch.nn.Linear(24, 50)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 50))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        teacher_hidden = teacher[:2](x)  # bf16 next to a float32 head weight
    model = torch.nn.Sequential(body, head)
    opt = _l2sp_adamw(model)

    def loss_of_step(step):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_linear_kd_loss(body(x), head.weight, teacher_hidden, teacher[2].weight, labels,
                                        student_bias=head.bias, teacher_bias=teacher[2].bias, chunk_size=16,
                                        temperature=2.0)

    _train(model, opt, loss_of_step)


@pytest.mark.cuda
def test_cuda_fp16_autocast_grad_scaler_kd():
    device = "cuda"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=g).to(device)
    teacher, student = _mlp(hidden=64).to(device), _mlp().to(device)
    with torch.no_grad():
        teacher_logits = teacher(x) * 3
    labels = teacher_logits.argmax(-1)
    opt = _l2sp_adamw(student)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)

    def loss_of_step(step):
        with torch.autocast("cuda", dtype=torch.float16):
            logits = student(x)
            assert logits.dtype == torch.float16
            return kd_loss(logits, teacher_logits, labels, temperature=2.0, alpha=0.7)

    _train(student, opt, loss_of_step, scaler)

    # An overflowing step is skipped whole: parameters and state unchanged, the scale halves.
    before = [p.detach().clone() for p in student.parameters()]
    state = [opt.state[p]["exp_avg"].clone() for p in student.parameters()]
    scale = scaler.get_scale()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = kd_loss(student(x), teacher_logits, labels, temperature=2.0)
    scaler.scale(loss).backward()
    student[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    for p, b, s in zip(student.parameters(), before, state):
        assert torch.equal(p, b) and torch.equal(opt.state[p]["exp_avg"], s)
