"""A whole distillation training step under torch.compile(fullgraph=True), against eager.

The step is: the teacher's forward (no grad), the student's forward, ``kd_loss``, ``backward()``,
``pyfinetune.optim.AdamW.step()`` and clearing the gradients, all in one compiled graph. What it
takes (found by compiling it; each is checked below):

* ``Tensor.backward()`` inside a compiled region needs ``torch._dynamo.config.trace_autograd_ops
  = True``; without that flag (older torch has none) Dynamo refuses it, and the split form (forward
  and loss compiled with fullgraph, eager backward, the optimizer step compiled with fullgraph) is
  what works.
* ``opt.zero_grad()`` cannot be inside: Dynamo never traces ``torch.optim.Optimizer.zero_grad``.
  Set ``p.grad = None`` in the step, or call ``zero_grad()`` outside.
* With an LR scheduler, ``sched.step()`` stays outside (Dynamo never traces torch's
  lr_scheduler.py). The schedulers used to wrap ``opt.step`` in a function from that file, which
  broke the graph; pyfinetune's optimizers now tell them not to (regression tests below).
* A float lr that changes every step recompiles the step; a tensor lr (updated in place by the
  scheduler) does not.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from conftest import assert_close, needs_compiled_step, state_tol

from pyfinetune.losses import kd_loss
from pyfinetune.optim import SGD, AdamW

HAS_TRACE_AUTOGRAD = hasattr(torch._dynamo.config, "trace_autograd_ops")
needs_trace_autograd = pytest.mark.skipif(
    not HAS_TRACE_AUTOGRAD, reason="this torch cannot trace Tensor.backward() (no trace_autograd_ops)")

B, D_IN, HIDDEN, CLASSES = 16, 12, 24, 10


def _models(seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, CLASSES))
    teacher = torch.nn.Sequential(torch.nn.Linear(D_IN, 2 * HIDDEN), torch.nn.Tanh(),
                                  torch.nn.Linear(2 * HIDDEN, CLASSES))
    with torch.no_grad():
        for p in list(student.parameters()) + list(teacher.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return student, teacher.eval()


def _batch(seed):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, D_IN, generator=g)
    labels = torch.randint(0, CLASSES, (B,), generator=g)
    labels[::5] = -100
    return x, labels


def _optimizer(student, tensor_lr):
    lr = torch.tensor(2e-2) if tensor_lr else 2e-2
    opt = AdamW([{"params": student[0].parameters(), "l2sp": 0.1}, {"params": student[2].parameters()}],
                lr=lr, weight_decay=1e-2)
    opt.set_mask(student[0].weight, torch.arange(student[0].weight.numel()).reshape(student[0].weight.shape) % 3 != 0)
    return opt


def _make_step(student, teacher, opt):
    params = list(student.parameters())

    def step(x, labels):
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = kd_loss(student(x), teacher_logits, labels, temperature=2.0, alpha=0.7)
        loss.backward()
        opt.step()
        for p in params:
            p.grad = None
        return loss.detach()

    return step


def _assert_same_training(s1, o1, s2, o2):
    for (name, p), q in zip(s1.named_parameters(), s2.parameters()):
        assert_close(p, q, torch.float32, msg=name)
        for key, v in o2.state[q].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                torch.testing.assert_close(o1.state[p][key], v, **state_tol(torch.float32), msg=f"{name} {key}")


def _graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@needs_trace_autograd
def test_whole_step_fullgraph_matches_eager(seed):
    """Forward, kd_loss, backward and the AdamW step (L2-SP, mask) in one fullgraph region equal
    the eager step over several steps, while an LR scheduler changes the (tensor) lr without a
    recompile."""
    torch._dynamo.reset()
    student, teacher = _models(seed)
    eager_student = copy.deepcopy(student)
    opt, eager_opt = _optimizer(student, True), _optimizer(eager_student, True)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.8) for o in (opt, eager_opt)]
    x, labels = _batch(seed)
    compiled = torch.compile(_make_step(student, teacher, opt), fullgraph=True)
    eager = _make_step(eager_student, teacher, eager_opt)
    start = [p.detach().clone() for p in student.parameters()]
    graphs_before = _graphs()
    losses = []
    with torch._dynamo.config.patch(trace_autograd_ops=True), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. a scheduler that thinks the step was not called
        for _ in range(5):
            loss, eager_loss = compiled(x, labels), eager(x, labels)
            assert_close(loss, eager_loss, torch.float32)
            losses.append(loss.item())
            for s in scheds:
                s.step()
    assert losses[-1] < losses[0]
    # One graph for the first step (it creates the optimizer state), one for the others.
    assert _graphs() - graphs_before <= 2
    assert all(not torch.equal(p, p0) for p, p0 in zip(student.parameters(), start))
    _assert_same_training(student, opt, eager_student, eager_opt)
    assert (student[0].weight[~opt.get_mask(student[0].weight)] == 0).all()
    assert opt.param_groups[0]["lr"].item() == pytest.approx(2e-2 * 0.8**5)


@needs_compiled_step
def test_split_step_fullgraph_matches_eager(seed):
    """Where Tensor.backward() cannot be traced: forward + kd_loss compiled with fullgraph, eager
    backward, the optimizer step compiled with fullgraph (with an LR scheduler and a tensor lr)."""
    torch._dynamo.reset()
    student, teacher = _models(seed)
    eager_student = copy.deepcopy(student)
    opt, eager_opt = _optimizer(student, True), _optimizer(eager_student, True)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)) for o in (opt, eager_opt)]
    x, labels = _batch(seed)

    def forward_loss(model, x, labels):
        with torch.no_grad():
            teacher_logits = teacher(x)
        return kd_loss(model(x), teacher_logits, labels, temperature=2.0, alpha=0.7)

    compiled_loss = torch.compile(forward_loss, fullgraph=True)
    compiled_step = torch.compile(opt.step, fullgraph=True)
    for _ in range(4):
        loss, eager_loss = compiled_loss(student, x, labels), forward_loss(eager_student, x, labels)
        assert_close(loss, eager_loss, torch.float32)
        loss.backward()
        eager_loss.backward()
        compiled_step()
        eager_opt.step()
        opt.zero_grad()
        eager_opt.zero_grad()
        for s in scheds:
            s.step()
    _assert_same_training(student, opt, eager_student, eager_opt)


# ------------------------------------------------------------- LR schedulers and the step (fix)
@pytest.mark.parametrize("cls", [AdamW, SGD])
def test_scheduler_does_not_wrap_step(cls):
    """torch's LR schedulers used to replace ``opt.step`` by a wrapper from a file Dynamo never
    traces; they leave our step alone, and still warn when they step before the optimizer."""
    model = torch.nn.Linear(3, 2)
    opt = cls(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert "step" not in vars(opt)
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        sched.step()

    opt = cls(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_step_record_survives_copy_and_pickle():
    opt = AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt._opt_called = True  # what the wrapper of an older scheduler sets
    assert opt._opt_called
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone._opt_called is False
        torch.optim.lr_scheduler.StepLR(clone, step_size=1)
        assert "step" not in vars(clone)
