"""Bad input to the distillation API: each a clear error naming the argument."""

import pytest
import torch

from pyfinetune.losses import DistillationLoss, fused_linear_kd_loss, kd_loss

S = torch.randn(4, 10)
T = torch.randn(4, 10)
L = torch.tensor([1, 2, -100, 9])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(teacher_logits=torch.randn(4, 11)), ValueError, "teacher_logits must have the shape"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=1e30), ValueError, r"temperature must be a number in \[1e-18, 1e18\], got 1e\+30"),
        (dict(temperature=1e-30), ValueError, "temperature must be a number in"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=1.0), ValueError, "beta"),
        (dict(labels=torch.tensor([1, 2, 3])), ValueError, "labels must have the leading shape"),
        (dict(labels=torch.tensor([1.0, 2.0, 3.0, 4.0])), TypeError, "labels must be an integer"),
        (dict(labels=torch.tensor([1, 2, 10, 3])), RuntimeError, r"labels\[2\] = 10 is outside \[0, V = 10\)"),
        (dict(labels=torch.tensor([1, -1, 0, 3])), RuntimeError, r"labels\[1\] = -1"),
        (dict(divergence="kl"), ValueError, "divergence"),
        (dict(reduction="mean"), ValueError, "reduction"),
        (dict(student_logits=S.long()), TypeError, "student_logits must be float"),
        (dict(ignore_index=2**70), ValueError, r"ignore_index must fit int64 \(labels are int64\), got 1180591620717411303424"),
        (dict(ignore_index=-(2**63) - 1), ValueError, "ignore_index must fit int64"),
    ],
)
def test_kd_loss_bad_input(kwargs, exc, match):
    args = dict(student_logits=S, teacher_logits=T, labels=L)
    args.update(kwargs)
    s, t, lab = args.pop("student_logits"), args.pop("teacher_logits"), args.pop("labels")
    with pytest.raises(exc, match=match):
        kd_loss(s, t, lab, **args)


def test_module_validates_in_init():
    with pytest.raises(ValueError, match="divergence"):
        DistillationLoss(divergence="nope")
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda op: op(S, torch.randn(4, 11), None, **_kw()), "teacher must have the shape of student"),
        (lambda op: op(S, T, None, **_kw(temperature=0.0)), r"temperature must be a number in \[1e-18, 1e18\]"),
        # T^2 overflowed float32 from ~1.8e19: the loss came back NaN.
        (lambda op: op(S, T, None, **_kw(temperature=1e30)), r"temperature must be .*, got 1e\+30"),
        (lambda op: op(S, T, None, **_kw(temperature=float("nan"))), "temperature must be"),
        (lambda op: op(S, T, None, **_kw(alpha=2.0)), "alpha must be in"),
        (lambda op: op(S, T, None, **_kw(beta=1.0)), "beta must be in"),
        (lambda op: op(S, T, None, **_kw(divergence="x")), "divergence must be"),
        (lambda op: op(S, T, L.int(), **_kw()), "labels must be int64"),
        (lambda op: op(S, T, L[:3], **_kw()), "labels must have shape"),
        (lambda op: op(S.t(), T.t(), None, **_kw()), "student must have unit stride"),
        (lambda op: op(S, T, None, **_kw(grad_scale=0.0)), r"grad_scale must be a finite number > 0 in .*, got 0$"),
        (lambda op: op(S, T, None, **_kw(grad_scale=-2.0)), r"grad_scale must be a finite number > 0 in .*, got -2$"),
        (lambda op: op(S, T, None, **_kw(grad_scale=float("nan"))), "grad_scale must be a finite number > 0"),
        (lambda op: op(S, T, None, **_kw(grad_scale=float("inf"))), "grad_scale must be a finite number > 0"),
        (lambda op: op(S, T, None, **_kw(grad_scale=1e39)), r"grad_scale must be .* normal range .*, got 1e\+39"),
        (lambda op: op(S, T, None, **_kw(grad_scale=1e-40)), r"grad_scale must be .* normal range .*, got 1e-40"),
        # each in range, their product overflowed float32: a NaN gradient (found by the CUDA review)
        (lambda op: op(S, T, None, **_kw(temperature=1e4, grad_scale=1e31, need_grad=True)),
         r"temperature\^2 \* grad_scale must fit in float32 .*, got temperature = 10000, grad_scale = 1e\+31"),
    ],
)
def test_raw_op_checks(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(torch.ops.pyfinetune.kd_loss_fwd)


def _kw(**over):
    kw = dict(temperature=1.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100, need_grad=False)
    kw.update(over)
    return kw


def test_fused_linear_bad_input():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="teacher_weight must have V = 10"):
        fused_linear_kd_loss(h, w, h, torch.randn(11, 8))
    with pytest.raises(ValueError, match="student_hidden must have shape"):
        fused_linear_kd_loss(torch.randn(4, 7), w, h, w)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_kd_loss(h, w, h, w, chunk_size=0)
    with pytest.raises(ValueError, match="alpha"):
        fused_linear_kd_loss(h, w, h, w, alpha=3)


def test_fused_linear_bias_and_topk_index_checks():
    from pyfinetune.losses import kd_loss_topk

    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(TypeError, match="student_bias must be None or a float tensor, got torch.int64"):
        fused_linear_kd_loss(h, w, h, w, student_bias=torch.zeros(10, dtype=torch.int64))
    with pytest.raises(TypeError, match="teacher_bias must be None or a float tensor, got list"):
        fused_linear_kd_loss(h, w, h, w, teacher_bias=[0.0] * 10)
    with pytest.raises(ValueError, match=r"student_bias must be None or a tensor of shape \[10\], got \(9,\)"):
        fused_linear_kd_loss(h, w, h, w, student_bias=torch.zeros(9))
    s, v = torch.randn(3, 20), torch.randn(3, 4)
    idx = torch.stack([torch.randperm(20)[:4] for _ in range(3)])
    kd_loss_topk(s, v, idx)  # distinct: fine
    idx[1, 2] = idx[1, 0]
    with pytest.raises(ValueError, match="distinct within each row.*row 1 repeats index"):
        kd_loss_topk(s, v, idx)
    # The raw op checks it too (its gradient counted a repeated index once, its loss twice).
    kw = dict(temperature=1.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100, need_grad=True)
    with pytest.raises(ValueError, match=r"kd_loss_topk_fwd: teacher_indices must be distinct .*row 1 repeats index"):
        torch.ops.pyfinetune.kd_loss_topk_fwd(s, v, idx, None, **kw)
    with pytest.raises(ValueError, match=r"row 0 repeats index 3"):
        torch.ops.pyfinetune.kd_loss_topk_fwd(s[:1], v[:1], torch.tensor([[3, 1, 3, 0]]), None, **kw)
    with pytest.raises(TypeError, match="teacher_topk_indices must be an integer tensor.*torch.bool"):
        kd_loss_topk(s, v, torch.ones(3, 4, dtype=torch.bool))


@pytest.mark.parametrize("which", ["kd_loss_fwd", "kd_loss_fwd_inplace", "kd_loss_topk_fwd"])
def test_raw_ops_refuse_a_meta_tensor_among_real_ones(which):
    # A meta argument sends the call to the fake kernel, which returned uninitialized real tensors.
    kw = dict(temperature=1.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100)
    s = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match=r"must be on cpu like student, got meta"):
        if which == "kd_loss_fwd":
            torch.ops.pyfinetune.kd_loss_fwd(s, T.to("meta"), None, need_grad=True, **kw)
        elif which == "kd_loss_fwd_inplace":
            torch.ops.pyfinetune.kd_loss_fwd_inplace(s, T, L.to("meta"), **kw)
        else:
            v, i = torch.topk(T, 3, dim=-1)
            torch.ops.pyfinetune.kd_loss_topk_fwd(s, v, i.to("meta"), None, need_grad=True, **kw)


def test_large_temperatures_warn_in_float32_only():
    # Above PRECISE_TEMPERATURE_MAX float32 loses the T^2-scaled divergence to cancellation (~4% of
    # the loss at T = 1000 on these inputs; negative KL at 1e6): a RuntimeWarning, not silence.
    import warnings

    from pyfinetune.losses import PRECISE_TEMPERATURE_MAX, kd_loss_topk

    vals, idx = T.topk(3, dim=-1)
    calls = {
        "kd_loss": lambda s, t, temp: kd_loss(s, t, L, temperature=temp),
        "kd_loss_topk": lambda s, t, temp: kd_loss_topk(s, vals.to(t.dtype), idx, L, temperature=temp),
        "fused_linear_kd_loss": lambda s, t, temp: fused_linear_kd_loss(
            s[:, :6], torch.randn(10, 6, dtype=s.dtype), t[:, :5], torch.randn(10, 5, dtype=t.dtype), L,
            temperature=temp),
    }
    for name, call in calls.items():
        with pytest.warns(RuntimeWarning, match=r"temperature=1000 is above 100, where float32 arithmetic loses"):
            call(S, T, 1000.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call(S, T, PRECISE_TEMPERATURE_MAX)          # the verified range: no warning
            call(S.double(), T.double(), 1000.0)           # float64 arithmetic: no warning
    # The warning is right where the loss is a difference of log-partitions: a top-k teacher and jsd
    # (and the CUDA kernels) at T = 1e3 are off by more than 1e-4. The CPU's dense forward_kl /
    # reverse_kl kernels take the gap form from T = 4 on (kd_loss_cpu.cpp, kGapMinTemperature) and
    # keep float32 precision there: 1e-4 at T = 1e3 on the same inputs.
    s, t = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)), torch.randn(4, 7)
    v, i = t.topk(7, dim=-1)

    def rel_err(fn):
        ref = fn(s.double(), v.double()).item()
        return abs(fn(s, v).item() - ref) / ref

    cases = {  # name -> (loss of (student, top-k values), imprecise at T = 1e3)
        "topk forward_kl": (lambda a, b: kd_loss_topk(a, b, i, temperature=1000.0), True),
        "topk jsd": (lambda a, b: kd_loss_topk(a, b, i, temperature=1000.0, divergence="jsd"), True),
        "dense jsd": (lambda a, b: kd_loss(a, t.to(a.dtype), temperature=1000.0, divergence="jsd"), True),
        "dense forward_kl": (lambda a, b: kd_loss(a, t.to(a.dtype), temperature=1000.0), False),
        "dense reverse_kl": (lambda a, b: kd_loss(a, t.to(a.dtype), temperature=1000.0, divergence="reverse_kl"),
                             False),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (fn, imprecise) in cases.items():
            err = rel_err(fn)
            assert (err > 1e-4) if imprecise else (err < 1e-4), (name, err)


def test_empty_vocabularies_and_sparse_logits_are_named():
    from pyfinetune.losses import fused_linear_kd_loss, kd_loss_topk
    with pytest.raises(ValueError, match=r"student_weight must have at least one row \(V >= 1 classes\), got shape \(0, 4\)"):
        fused_linear_kd_loss(torch.randn(3, 4), torch.randn(0, 4), torch.randn(3, 5), torch.randn(0, 5))
    with pytest.raises(ValueError, match=r"teacher_topk_logits must have shape \[\.\.\., k\] with k >= 1"):
        kd_loss_topk(torch.randn(3, 10), torch.randn(3, 0), torch.zeros(3, 0, dtype=torch.long))
    with pytest.raises(TypeError, match=r"student_logits must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        kd_loss(torch.randn(3, 10).to_sparse(), torch.randn(3, 10))


def test_errors_name_the_public_function_and_the_label_position():
    # Each public loss names itself (not kd_loss, not an internal op) and, for a label out of range
    # on the CPU, its position in the labels as given: a multi-index for [..., V] logits, the row of
    # the whole batch in fused_linear_kd_loss (whose kernel sees one chunk at a time).
    from pyfinetune.losses import kd_loss_topk

    h, w = torch.randn(6, 8), torch.randn(10, 8)
    lab = torch.tensor([1, 2, 3, 4, 99, 5])
    with pytest.raises(RuntimeError, match=r"^pyfinetune.fused_linear_kd_loss: labels\[4\] = 99 is outside \[0, V = 10\) "
                                           r"and is not ignore_index = -100$"):
        fused_linear_kd_loss(h, w, torch.randn(6, 6), torch.randn(10, 6), lab, chunk_size=2)
    with pytest.raises(ValueError, match=r"^pyfinetune.fused_linear_kd_loss: labels must have the leading shape of "
                                         r"student_hidden \(6,\), got \(5,\)$"):
        fused_linear_kd_loss(h, w, torch.randn(6, 6), torch.randn(10, 6), lab[:5])
    with pytest.raises(ValueError, match=r"^pyfinetune.fused_linear_kd_loss: alpha must be in \[0, 1\], got 3$"):
        fused_linear_kd_loss(h, w, h, w, alpha=3)
    with pytest.raises(RuntimeError, match=r"^pyfinetune.kd_loss: labels\[1, 2\] = 12 is outside \[0, V = 10\)"):
        kd_loss(torch.randn(2, 3, 10), torch.randn(2, 3, 10), torch.tensor([[1, 2, 3], [4, -100, 12]]))
    with pytest.raises(RuntimeError, match=r"^pyfinetune.kd_loss: labels = -3 is outside \[0, V = 10\)"):
        kd_loss(torch.randn(10), torch.randn(10), torch.tensor(-3))  # one row: 0-d labels
    assert kd_loss(torch.randn(10), torch.randn(10), torch.tensor(-100)) == 0  # ignored, not out of range
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(RuntimeError, match=r"^pyfinetune.kd_loss_topk: labels\[1\] = 10 is outside \[0, V = 10\)"):
        kd_loss_topk(torch.randn(2, 10), torch.randn(2, 3), idx, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"^pyfinetune.kd_loss_topk: temperature must be a number in \[1e-18, 1e18\]"):
        kd_loss_topk(torch.randn(2, 10), torch.randn(2, 3), idx, temperature=-1.0)
    with pytest.raises(TypeError, match=r"^pyfinetune.kd_loss_topk: student_logits must be a tensor, got list"):
        kd_loss_topk([[0.0] * 10] * 2, torch.randn(2, 3), idx)
