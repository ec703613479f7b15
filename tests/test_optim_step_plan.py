"""The cached step plan (the buckets an eager step reuses while nothing changed) never hides a
change: each test takes steps until the plan is in use, changes one thing, and checks the next
step sees it exactly as a fresh validation would."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_bitwise_equal, snapshot

from pyfinetune.optim import SGD, AdamW

OPTS = {"adamw": lambda ps, **kw: AdamW(ps, lr=1e-2, l2sp=0.1, **kw),
        "sgd": lambda ps, **kw: SGD(ps, lr=1e-2, momentum=0.9, l2sp=0.1, **kw)}


def _warm(kind, n=3, **kw):
    ps = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n)]
    opt = OPTS[kind](ps, **kw)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt._plan is not None  # the next step reuses the plan
    return opt, ps


def _reference(kind, opt, ps):
    """A fresh optimizer with opt's state and groups: what the next step must compute."""
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = OPTS[kind](qs)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # loading shares same-device tensors
    for q, p in zip(qs, ps):
        q.grad = None if p.grad is None else p.grad.clone()
        anchor = opt.anchor_of(p)
        if anchor is not None:
            ref.state[q]["anchor"].copy_(anchor)
    return ref, qs


def _same_step(kind, opt, ps):
    ref, qs = _reference(kind, opt, ps)
    opt.step()
    ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _rejected(opt, exc, match):
    """The next step raises `exc` before writing anything."""
    before = snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.step()
    assert_bitwise_equal(snapshot(opt), before)


@pytest.mark.parametrize("kind", list(OPTS))
def test_changed_hyper_parameters_apply(kind):
    opt, ps = _warm(kind)
    opt.param_groups[0]["lr"] = 0.5
    opt.param_groups[0]["weight_decay"] = 0.25
    _same_step(kind, opt, ps)


@pytest.mark.parametrize("kind", list(OPTS))
def test_removed_and_added_gradients(kind):
    opt, ps = _warm(kind)
    ps[1].grad = None
    before = ps[1].detach().clone()
    opt.step()
    assert torch.equal(ps[1], before)
    ps[1].grad = torch.randn_like(ps[1])
    _same_step(kind, opt, ps)


@pytest.mark.parametrize("kind", list(OPTS))
def test_replaced_state_tensor_is_used(kind):
    opt, ps = _warm(kind)
    key = "exp_avg" if kind == "adamw" else "momentum_buffer"
    fresh = torch.zeros_like(ps[0])
    opt.state[ps[0]][key] = fresh
    opt.step()
    assert fresh.abs().sum() > 0


def test_list_betas_changed_in_place_is_validated():
    opt, ps = _warm("adamw")
    opt.param_groups[0]["betas"] = [0.9, 0.99]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["betas"][1] = 1.0
    _rejected(opt, ValueError, r"betas\[1\] \(param group 0\) must be < 1.0")


@pytest.mark.parametrize("kind", list(OPTS))
def test_bool_flag_replaced_by_int_is_rejected(kind):
    opt, _ = _warm(kind)
    opt.param_groups[0]["maximize"] = 0   # equal to False, but not a bool
    _rejected(opt, TypeError, r"maximize \(param group 0\) must be a bool")


@pytest.mark.parametrize("kind", list(OPTS))
def test_parameter_converted_behind_the_optimizer(kind):
    opt, ps = _warm(kind)
    ps[2].data = ps[2].data.double()   # the gradient stays float32
    _rejected(opt, RuntimeError,
              r"the gradient of parameter 2 \(param group 0\) is torch.float32 but the parameter is torch.float64")


@pytest.mark.parametrize("kind", list(OPTS))
def test_transposed_gradient_is_copied(kind):
    opt, ps = _warm(kind)
    ps[0].grad = torch.randn(3, 4).t()   # other strides than the parameter: the full path copies it
    _same_step(kind, opt, ps)


def test_step_counts_packed_into_one_tensor():
    # A cached AdamW plan keeps the parameters' step counts as views of one tensor and increments
    # them with one add_ (torch._foreach_add_ costs one dispatch per parameter on the CPU). The
    # counts stay right through a skipped (inf) step, a new param group and torch's AdamW.
    opt, ps = _warm("adamw", n=4)
    steps = [opt.state[p]["step"] for p in ps]
    assert all(s.dim() == 0 and s.dtype == torch.float32 for s in steps)
    assert len({s.untyped_storage().data_ptr() for s in steps}) == 1, "not packed into one tensor"
    assert [s.item() for s in steps] == [3.0] * 4
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.found_inf = torch.ones(())  # GradScaler's contract: a skipped step does not count
    opt.grad_scale = torch.ones(())
    opt.step()
    del opt.found_inf, opt.grad_scale
    assert [opt.state[p]["step"].item() for p in ps] == [3.0] * 4
    q = torch.nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [q]})
    for p in ps + [q]:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    assert [opt.state[p]["step"].item() for p in ps] == [5.0] * 4
    assert opt.state[q]["step"].item() == 2.0
    # torch's AdamW takes the state (views included) and counts on from it.
    params = [torch.nn.Parameter(p.detach().clone()) for p in ps + [q]]
    torch_opt = torch.optim.AdamW([{"params": params[:4]}, {"params": params[4:]}], lr=1e-2)
    sd = opt.state_dict()
    sd["param_groups"] = [{k: v for k, v in g.items() if k in torch_opt.defaults or k == "params"}
                          for g in sd["param_groups"]]
    for st in sd["state"].values():
        st.pop("anchor", None)
    torch_opt.load_state_dict(sd)
    for p in params:
        p.grad = torch.randn_like(p)
    torch_opt.step()
    assert [torch_opt.state[p]["step"].item() for p in params] == [6.0] * 4 + [3.0]


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("change", ["strides", "sparse"])
def test_gradient_unlike_its_parameter_takes_the_full_path(kind, change):
    # The plan checks every step that each gradient is laid out like its parameter (one C++
    # signature of both lists); a difference takes the full path, which copies a gradient of other
    # strides and names a sparse one. (torch itself refuses a .grad of another dtype or shape;
    # a parameter changed behind the optimizer: test_parameter_converted_behind_the_optimizer.)
    opt, ps = _warm(kind)
    if change == "strides":
        ps[1].grad = torch.randn(3, 4).t()
        _same_step(kind, opt, ps)
    else:
        ps[1].grad = ps[1].grad.to_sparse()
        _rejected(opt, RuntimeError, r"does not support sparse gradients \(parameter 1 \(param group 0\)\)")


def test_layout_signature():
    sig = torch.ops.pyfinetune._layout_signature
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert sig([a, b, None]) == sig([b, a.clone(), None])   # metadata only, not values or storage
    base = sig([a, b])
    variants = {
        "dtype": [a, b.double()], "shape": [a, b.reshape(3, 4)], "strides": [a, torch.randn(3, 4).t()],
        "None": [a, None], "length": [a, b, b], "sparse": [a, b.to_sparse()],
        "device": [a, torch.empty(4, 3, device="meta")],
        "nested": [a, torch.nested.nested_tensor([b, b], layout=torch.jagged)],
    }
    sigs = {name: sig(ts) for name, ts in variants.items()}
    assert all(s != base for s in sigs.values()), sigs
    assert len(set(sigs.values())) == len(sigs), "different metadata must give different signatures"
    assert sig([]) != sig([None])
    assert sig([a, b.double()]) != sig([b.double(), a]), "the order of the tensors matters"
