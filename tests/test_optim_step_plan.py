"""The cached step plan (the buckets an eager step reuses while nothing changed) never hides a
change: each test takes steps until the plan is in use, changes one thing, and checks the next
step sees it exactly as a fresh validation would."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_bitwise_equal, needs_compiled_step, snapshot

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


# ----------------------------------------------------------------------------- the C++ step plan
# A cached plan also holds its launches in C++ (csrc/step_plan.cpp, `_plan.native`): a step that
# nothing changed is one call, which reads the gradients and checks their layouts itself. The tests
# above all reach it (each warms a plan first); these pin what only it does.

def _native_only(monkeypatch, opt):
    """The next steps must not take the Python plan or the full path (the native plan ran)."""
    def fail(*_a, **_k):
        raise AssertionError("the step left the native plan")
    monkeypatch.setattr(opt, "_plan_grads", fail)
    monkeypatch.setattr(opt, "_collect", fail)


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("n", [1, 3])  # one parameter: AdamW's step count is not packed
def test_native_plan_runs_the_step(kind, n, monkeypatch):
    opt, ps = _warm(kind, n=n)
    assert opt._plan.native is not None and opt._plan.native.num_launches() == 1
    for p in ps:
        p.grad = torch.randn_like(p)  # new gradient tensors, laid out alike: the plan holds
    ref, qs = _reference(kind, opt, ps)
    _native_only(monkeypatch, opt)
    for _ in range(2):
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    if kind == "adamw":
        assert [opt.state[p]["step"].item() for p in ps] == [5.0] * n


@pytest.mark.parametrize("kind", list(OPTS))
def test_native_plan_two_launches(kind, monkeypatch):
    # float32 and bfloat16 parameters in two groups with their own lr: two launches of one plan.
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    hs = [torch.nn.Parameter(torch.randn(4, 2, dtype=torch.bfloat16)), torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))]

    def make(params, halves):
        return OPTS[kind]([{"params": params}, {"params": halves, "lr": 0.05, "weight_decay": 0.1}])

    opt = make(ps, hs)
    for _ in range(3):
        for p in ps + hs:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt._plan.native.num_launches() == 2
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps + hs]
    ref = make(qs[:2], qs[2:])
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for q, p in zip(qs, ps + hs):
        q.grad = p.grad.clone()
        anchor = opt.anchor_of(p)
        if anchor is not None:
            ref.state[q]["anchor"].copy_(anchor)
    _native_only(monkeypatch, opt)
    opt.step()
    ref.step()
    for p, q in zip(ps + hs, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_native_plan_takes_grad_scaler_tensors(kind, found_inf, monkeypatch):
    # GradScaler's contract (grad_scale / found_inf set on the optimizer) through the native plan
    # equals the full path's: unscaled gradients, and a skipped step that changes nothing.
    opt, ps = _warm(kind)
    for p in ps:
        p.grad = torch.randn_like(p) * 8
    ref, qs = _reference(kind, opt, ps)
    before = snapshot(opt)
    for o in (opt, ref):
        o.grad_scale = torch.tensor(8.0)
        o.found_inf = torch.tensor(found_inf)
    _native_only(monkeypatch, opt)
    opt.step()
    ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    if found_inf:
        assert_bitwise_equal(snapshot(opt), before)


@pytest.mark.parametrize("kind", list(OPTS))
def test_native_plan_error_writes_nothing(kind):
    # An error inside the native plan's run (here: GradScaler tensors that are not scalars) reaches
    # the caller as the full path's would, with nothing written (step counts included).
    opt, ps = _warm(kind)
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.zeros(2)
    _rejected(opt, RuntimeError, r"shape '\[\]' is invalid for input of size 2")
    del opt.grad_scale, opt.found_inf
    _same_step(kind, opt, ps)


@pytest.mark.parametrize("kind", list(OPTS))
def test_parameter_replaced_in_its_group(kind):
    # A parameter swapped in a group's list is compared by identity (comparing tensors with == used
    # to raise "Boolean value of Tensor with more than one value is ambiguous"): the full path then
    # sees a parameter without an anchor.
    opt, ps = _warm(kind)
    q = torch.nn.Parameter(torch.randn(4, 3))
    q.grad = torch.randn_like(q)
    opt.param_groups[0]["params"][0] = q
    _rejected(opt, RuntimeError, r"parameter 0 \(param group 0\) has no L2-SP anchor")


def test_parameter_replaced_in_its_group_without_penalty():
    # Without L2-SP the new parameter simply gets fresh state, as with torch's AdamW.
    ps = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    opt = AdamW(ps, lr=1e-2)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    q = torch.nn.Parameter(torch.randn(4, 3))
    q.grad = torch.randn_like(q)
    opt.param_groups[0]["params"][0] = q
    opt.step()
    assert opt.state[q]["step"].item() == 1.0 and opt.state[ps[1]]["step"].item() == 3.0


@needs_compiled_step
@pytest.mark.parametrize("kind", list(OPTS))
def test_compiled_step_after_the_native_plan(kind):
    # Eager steps build the native plan; a step compiled with fullgraph afterwards must not trace
    # it (the plan is skipped under torch.compile) and must compute what eager steps compute.
    opt, ps = _warm(kind)
    assert opt._plan.native is not None
    ref, qs = _reference(kind, opt, ps)
    compiled = torch.compile(opt.step, fullgraph=True)
    for _ in range(2):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        compiled()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# A launch whose tensors all look exactly as at its last checked call (same tensors, dtypes,
# devices, sizes, strides, data pointers of the written ones) skips the op's per-tensor checks
# (csrc/step_plan.cpp, `Launch::validated`). Whatever changes behind the optimizer's back in place,
# where the plan's identity checks cannot see it, must bring the checks back.

def _checked(opt):
    return opt._plan.native.checked_launches()


@pytest.mark.parametrize("kind", list(OPTS))
def test_unchanged_launch_skips_the_checks(kind, monkeypatch):
    opt, ps = _warm(kind)
    checked = _checked(opt)
    assert checked >= 1  # the plan's first run checked
    ref, qs = _reference(kind, opt, ps)
    _native_only(monkeypatch, opt)
    for _ in range(3):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)  # new gradient tensors, laid out alike
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert _checked(opt) == checked
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(OPTS))
def test_dispatch_mode_brings_the_checks_back(kind):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    opt, _ = _warm(kind)
    checked = _checked(opt)
    with Seen() as mode:
        opt.step()
    assert any("pyfinetune" in op for op in mode.ops), mode.ops
    assert _checked(opt) == checked + 1


@pytest.mark.parametrize("kind", list(OPTS))
def test_a_dry_run_mode_vouches_for_nothing(kind):
    # A step under a TorchDispatchMode that swallows the op ran no check: it must not make the next
    # step trust a state the checks would refuse (two states sharing memory).
    from torch.utils._python_dispatch import TorchDispatchMode

    class DryRun(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "pyfinetune" in str(func):
                return None
            return func(*args, **(kwargs or {}))

    opt, ps = _warm(kind)
    key = _state_key(kind)
    opt.state[ps[0]][key].set_(opt.state[ps[1]][key])
    with DryRun():
        opt.step()
    _rejected(opt, RuntimeError, r"shares memory")


class _Wrapped(torch.Tensor):
    """A tensor subclass whose outer metadata is its parameter's and whose data is another tensor."""

    @staticmethod
    def __new__(cls, inner, like):
        return torch.Tensor._make_wrapper_subclass(cls, like.shape, strides=like.stride(), dtype=like.dtype,
                                                   device=like.device)

    def __init__(self, inner, like):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.inner if isinstance(x, _Wrapped) else x  # noqa: E731
        return func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))


@pytest.mark.parametrize("kind", list(OPTS))
def test_subclass_gradients_are_checked_every_step(kind):
    # The kernel receives the subclass's inner tensors, which the plan never described: laid out
    # unlike the parameters here, they must be refused as a fresh optimizer refuses them.
    opt, ps = _warm(kind)
    checked = _checked(opt)
    for p in ps:
        p.grad = _Wrapped(torch.randn(3, 4).t(), p)
    _rejected(opt, RuntimeError, r"grads\[0\] must have the strides of params\[0\]")
    for p in ps:
        p.grad = _Wrapped(torch.randn_like(p), p)  # valid inner tensors: checked at every step
    opt.step()
    opt.step()
    assert _checked(opt) == checked + 2  # the refused step counts nothing


def _state_key(kind):
    return "exp_avg" if kind == "adamw" else "momentum_buffer"


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("change, match", [
    ("shared", r"exp_avgs\[\d\] shares memory with exp_avgs\[\d\]|momentum_buffers\[\d\] shares memory with "
               r"momentum_buffers\[\d\]"),
    ("resized", r"\[0\] must have the shape of params\[0\] \[4, 3\], got \[5\]"),
    ("restrided", r"\[0\] must have the strides of params\[0\] \[3, 1\], got \[1, 4\]"),
])
def test_state_changed_in_place_is_checked(kind, change, match):
    opt, ps = _warm(kind)
    key = _state_key(kind)
    state = opt.state[ps[0]][key]
    if change == "shared":
        state.set_(opt.state[ps[1]][key])  # the same tensor object, now another state's memory
    elif change == "resized":
        state.resize_(5)
    else:
        state.set_(torch.zeros(3, 4).t())
    _rejected(opt, RuntimeError, match)


@pytest.mark.parametrize("kind", list(OPTS))
def test_anchor_converted_in_place_is_checked(kind):
    opt, ps = _warm(kind)
    anchor = opt.state[ps[2]]["anchor"]
    anchor.data = anchor.data.half()  # float16 anchors are refused for float32 parameters
    _rejected(opt, RuntimeError, r"anchors\[2\] must be float32, bfloat16 or the dtype of params\[2\]")


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("moved", ["state", "param"])
def test_tensor_moved_in_place_is_checked_then_trusted(kind, moved, monkeypatch):
    # A valid change in place (new memory, same layout): one checked launch, then trusted again.
    opt, ps = _warm(kind)
    if moved == "state":
        state = opt.state[ps[1]][_state_key(kind)]
        state.set_(state.clone())
    else:
        ps[1].data = ps[1].data.clone()
    checked = _checked(opt)
    _native_only(monkeypatch, opt)
    _same_step(kind, opt, ps)
    assert _checked(opt) == checked + 1
    _same_step(kind, opt, ps)
    assert _checked(opt) == checked + 1


def test_state_identity_checks():
    from pyfinetune._C import _state_holds

    a, b, c = object(), object(), object()
    d1, d2 = {"x": a}, {"x": b, "y": c}
    state = {1: d1, 2: d2}
    assert _state_holds(state, [1, 2], [d1, d2], [a, b, c])
    assert not _state_holds(state, [2, 1], [d2, d1], [b, c, a])  # order
    assert not _state_holds(state, [1, 2], [d1, dict(d2)], [a, b, c])  # an equal dict, not the same
    assert not _state_holds(state, [1, 2], [d1, d2], [a, b])  # a value more in the state
    assert not _state_holds(state, [1, 2], [d1, d2], [a, b, c, a])  # a value fewer
    assert not _state_holds(state, [1], [d1], [a])
    assert not _state_holds({1: [a]}, [1], [[a]], [a])  # a non-dict entry
    assert not _state_holds([], [], [], [])  # not a dict
    with pytest.raises(TypeError):
        _state_holds(state, (1, 2), [d1, d2], [a, b, c])


def test_group_checks_follow_freeze():
    # _groups_hold(groups, cached, params, keys, hypers) is `_plan_holds`'s group loop in C: the same
    # dicts, the same parameters by identity, hyper-parameters equal to their `_freeze` snapshots.
    from pyfinetune._C import _groups_hold
    from pyfinetune.optim import _freeze

    p, q = torch.zeros(1), torch.zeros(1)
    dtype = torch.bfloat16
    keys = ("a", "b", "c", "d", "e", "f")

    def group(**kw):
        g = {"params": [p, q], "a": 0.1, "b": (0.9, [0.99, 3]), "c": True, "d": "coupled", "e": dtype, "f": None}
        g.update(kw)
        return g

    g = group()
    frozen = tuple(_freeze(g[k]) for k in keys)

    def holds(now, params=(p, q)):
        return _groups_hold([now], [now], [params], keys, [frozen])

    assert holds(g)
    same_values = group()
    assert not _groups_hold([same_values], [g], [(p, q)], keys, [frozen])  # another dict
    assert not holds(g, (q, p)) and not holds(g, (p,))
    changes = {"a": [0.2, 1, True, float("nan")], "b": [(0.9, [0.99, 4]), [0.9, [0.99, 3]], (0.9, (0.99, 3)), (0.9,)],
               "c": [1, False], "d": ["decoupled"], "e": [torch.float16], "f": [0, False]}
    for key, values in changes.items():
        for value in values:
            assert not holds(group(**{key: value})), (key, value)
    assert holds(group(a=0.1, b=(0.9, [0.99, 3]), d="".join(["coup", "led"])))  # equal values, new objects
    g2 = group()
    g2["b"][1][1] = 4  # a list changed in place after the snapshot
    assert not _groups_hold([g2], [g2], [(p, q)], keys, [tuple(_freeze(group()[k]) for k in keys)])
    missing = group()
    del missing["f"]
    assert not holds(missing)
    assert not _groups_hold([g, g], [g], [(p, q)], keys, [frozen])  # lengths
    with pytest.raises(TypeError):
        _groups_hold((g,), [g], [(p, q)], keys, [frozen])


def test_changed_lrs_follow_freeze():
    from pyfinetune._C import _changed_lrs
    from pyfinetune.optim import _freeze

    lrs = [0.1, 0.2, 0.3, 0.4]
    frozen = [_freeze(x) for x in lrs]
    assert _changed_lrs([{"lr": x} for x in (0.1, 0.2, 0.3, 0.4)], frozen) == []
    now = [{"lr": 0.1}, {"lr": 0.25}, {"lr": 1}, {}]  # a new value, an int for a float, no lr at all
    assert _changed_lrs(now, frozen) == [1, 2, 3]
    nan = float("nan")
    assert _changed_lrs([{"lr": nan}], [_freeze(nan)]) == [0]  # NaN never equals: validated (refused)
    assert _changed_lrs([{"lr": torch.tensor(0.1)}], [_freeze(0.1)]) == [0]
    with pytest.raises(TypeError):
        _changed_lrs([{"lr": 0.1}], [])


def test_step_plan_refuses_an_empty_launch():
    plan = torch.classes.pyfinetune.StepPlan([])
    with pytest.raises(RuntimeError, match="a launch needs at least one parameter"):
        plan.add_sgd([], [], [], [], [], [], [], [], [], [], False, False, False)
    assert plan.num_launches() == 0
    assert plan.run(None, None)  # nothing to do


# ------------------------------------------------------------------ learning rates the plan follows
# An LR scheduler changes group["lr"] every step: the plan takes the new values (validated as the
# full path validates them) instead of being rebuilt by a full validation each step.

@pytest.mark.parametrize("kind", list(OPTS))
def test_scheduled_lr_keeps_the_plan(kind, monkeypatch):
    opt, ps = _warm(kind)
    ref, qs = _reference(kind, opt, ps)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k)) for o in (opt, ref)]
    _native_only(monkeypatch, opt)
    for _ in range(4):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(OPTS))
def test_lr_of_one_group_changes_in_its_launch(kind, monkeypatch):
    # float32 and bfloat16 groups (two launches) and a third float32 group sharing the first launch:
    # changing the second and third groups' lr reaches exactly their parameters.
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    hs = [torch.nn.Parameter(torch.randn(4, 2, dtype=torch.bfloat16))]
    rs = [torch.nn.Parameter(torch.randn(6))]

    def make(a, b, c):
        return OPTS[kind]([{"params": a}, {"params": b, "lr": 0.05}, {"params": c, "lr": 0.02}])

    opt = make(ps, hs, rs)
    every = ps + hs + rs
    for _ in range(3):
        for p in every:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt._plan.native.num_launches() == 2
    qs = [torch.nn.Parameter(p.detach().clone()) for p in every]
    ref = make(qs[:2], qs[2:3], qs[3:])
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    for q, p in zip(qs, every):
        q.grad = p.grad.clone()
        anchor = opt.anchor_of(p)
        if anchor is not None:
            ref.state[q]["anchor"].copy_(anchor)
    _native_only(monkeypatch, opt)
    for o in (opt, ref):
        o.param_groups[1]["lr"] = 0.3
        o.param_groups[2]["lr"] = 0.125
    opt.step()
    ref.step()
    for p, q in zip(every, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("lr, exc, match", [
    (float("nan"), ValueError, r"lr \(param group 0\) must be a finite number >= 0.0, got nan"),
    (-1e-3, ValueError, r"lr \(param group 0\) must be a finite number >= 0.0, got -0.001"),
    (True, TypeError, r"lr \(param group 0\) must be a number, got bool"),
    ("0.1", TypeError, r"lr \(param group 0\) must be a number, got str"),
    (1e39, ValueError, r"lr \(param group 0\) must be at most 3.40282e\+38 \(float32's largest\) for torch.float32"),
])
def test_bad_scheduled_lr_is_refused_before_writing(kind, lr, exc, match):
    opt, ps = _warm(kind)
    opt.param_groups[0]["lr"] = lr
    _rejected(opt, exc, match)
    opt.param_groups[0]["lr"] = 0.01  # and the plan works on afterwards
    _same_step(kind, opt, ps)


@pytest.mark.parametrize("kind", list(OPTS))
def test_lr_turned_into_a_tensor_takes_the_full_path(kind):
    opt, ps = _warm(kind)
    for o_lr in (torch.tensor(0.02), 0.03):  # to a tensor and back
        opt.param_groups[0]["lr"] = o_lr
        ref, qs = _reference(kind, opt, ps)
        ref.param_groups[0]["lr"] = o_lr
        opt.step()
        ref.step()
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        for p in ps:
            p.grad = torch.randn_like(p)


@pytest.mark.parametrize("kind", list(OPTS))
def test_groups_differing_in_every_penalty_share_one_launch(kind):
    # Different hyper-parameters per group must not multiply launches (issue #2): groups that differ
    # in lr, l2sp (0 too: no anchor), l1, weight decay and (AdamW) betas / eps or (SGD) momentum /
    # dampening, one dtype: one launch, and the same parameters as one optimizer per group. (The
    # modes amsgrad, maximize, nesterov and penalty_mode split a launch, as the README says.)
    extra = ([dict(betas=(0.8, 0.9)), dict(eps=1e-6)] if kind == "adamw"
             else [dict(momentum=0.5), dict(dampening=0.1)])
    variants = [dict(), dict(lr=0.3), dict(l2sp=0.3), dict(l2sp=0.0), dict(l1=1e-3), dict(weight_decay=0.05)] + extra
    gen = torch.Generator().manual_seed(8)
    start = [torch.randn(6, 2, generator=gen) for _ in variants]
    grads = [[torch.randn(6, 2, generator=gen) for _ in variants] for _ in range(3)]
    ps = [torch.nn.Parameter(t.clone()) for t in start]
    opt = OPTS[kind]([dict(params=[p], **v) for p, v in zip(ps, variants)])
    singles = [torch.nn.Parameter(t.clone()) for t in start]
    alone = [OPTS[kind]([dict(params=[q], **v)]) for q, v in zip(singles, variants)]
    for gs in grads:
        for p, q, g in zip(ps, singles, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for o in alone:
            o.step()
    assert opt._plan.native.num_launches() == 1
    for p, q in zip(ps, singles):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(OPTS))
def test_step_with_a_closure_returns_its_loss(kind):
    # torch's closure protocol: step(closure) re-evaluates the loss with gradients enabled (inside
    # the optimizer's no_grad step), returns it, and steps with the gradients it made.
    torch.manual_seed(3)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    ref_model = copy.deepcopy(model)
    opt = OPTS[kind](model.parameters())
    ref = OPTS[kind](ref_model.parameters())
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        ref.zero_grad()
        ref_loss = torch.nn.functional.mse_loss(ref_model(x), y)
        ref_loss.backward()
        ref.step()
        assert isinstance(loss, torch.Tensor) and torch.equal(loss, ref_loss.detach())
    assert calls == [True] * 3
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
