"""state_dict / load_state_dict: a resumed run equals an uninterrupted one bit for bit."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

from conftest import assert_bitwise_equal, assert_close, device_dtype_params, snapshot, state_tol
from pyfinetune.optim import SGD, AdamW

KINDS = ["adamw", "sgd"]
SHAPES = [[(7,), (6, 5)], [(3, 4, 2)], [(5,), (1,)]]


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _groups(kind, params, anchors):
    """Three groups: L2-SP + L1 with explicit anchors stored in bf16, L2-SP anchored at init (with
    amsgrad / momentum and dampening), and a head without anchor."""
    g0 = dict(params=params[0], l2sp=0.3, anchor=anchors, anchor_dtype=torch.bfloat16, l1=0.01)
    g1 = dict(params=params[1], l2sp=0.1)
    g2 = dict(params=params[2], l2sp=0.0, lr=3e-3)
    if kind == "adamw":
        g1["amsgrad"] = True
        g2["betas"] = (0.8, 0.95)
    else:
        g1.update(momentum=0.5, dampening=0.2)
        g2.update(momentum=0.0)
    return [g0, g1, g2]


def _make(kind, params, anchors, masks):
    groups = _groups(kind, params, anchors)
    if kind == "adamw":
        return AdamW(groups, lr=1e-2, weight_decay=0.05, masks=masks)
    return SGD(groups, lr=2e-2, momentum=0.9, nesterov=False, weight_decay=0.05, masks=masks)


def _apply(params, grads):
    for ps, gs in zip(params, grads):
        for p, g in zip(ps, gs):
            p.grad = g.clone()


@pytest.mark.parametrize("device, dtype", device_dtype_params())
@pytest.mark.parametrize("kind", KINDS)
def test_resume_equals_uninterrupted_run(device, dtype, kind):
    params = [[torch.nn.Parameter((0.3 * torch.randn(s, device=device)).to(dtype)) for s in shapes]
              for shapes in SHAPES]
    anchors = [torch.randn(s, device=device) for s in SHAPES[0]]
    masks = {params[0][1]: torch.rand(6, 5, device=device) > 0.3,
             params[1][0]: torch.rand(3, 4, 2, device=device) > 0.5}
    opt = _make(kind, params, anchors, masks)
    grads = [[[torch.randn(s, device=device).to(dtype) for s in shapes] for shapes in SHAPES] for _ in range(12)]
    for k in range(6):
        _apply(params, grads[k])
        opt.step()

    saved_params = _roundtrip([[p.detach().clone() for p in ps] for ps in params])
    saved_state = _roundtrip(opt.state_dict())
    # torch.load(weights_only=True) gives back the anchor dtype (by name, which
    # torch.distributed.checkpoint accepts) and the lr of each group.
    assert saved_state["param_groups"][0]["anchor_dtype"] == "bfloat16"

    for k in range(6, 12):
        _apply(params, grads[k])
        opt.step()
    uninterrupted = snapshot(opt)

    # A fresh optimizer: its anchors are taken at the checkpoint's values ("init") and it has no
    # masks; everything must come from the state dict.
    fresh = [[torch.nn.Parameter(v.clone()) for v in vs] for vs in saved_params]
    opt2 = _make(kind, fresh, [a + 5 for a in anchors], masks=None)
    opt2.load_state_dict(saved_state)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for ps in fresh:
        for p in ps:
            st = opt2.state[p]
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                if st.get(key) is not None:
                    assert st[key].dtype == state_dtype, f"{key} must stay {state_dtype}"
            if "step" in st:
                assert st["step"].dtype == torch.float32
    assert opt2.anchor_of(fresh[0][0]).dtype == torch.bfloat16
    assert torch.equal(opt2.anchor_of(fresh[0][0]), anchors[0].to(torch.bfloat16))
    assert opt2.anchor_of(fresh[2][0]) is None
    assert torch.equal(opt2.get_mask(fresh[0][1]), masks[params[0][1]])
    if kind == "adamw":
        assert "max_exp_avg_sq" in opt2.state[fresh[1][0]]
    for k in range(6, 12):
        _apply(fresh, grads[k])
        opt2.step()
    resumed = snapshot(opt2)
    assert_bitwise_equal(resumed, uninterrupted)
    # The steps after the checkpoint did something.
    assert not torch.equal(uninterrupted[(0, 0, "param")], saved_params[0][0])


@pytest.mark.parametrize("device, dtype", device_dtype_params())
def test_state_dict_before_first_step(device, dtype):
    # Anchors and masks exist before any step; they survive a round trip on their own.
    p = torch.nn.Parameter(torch.randn(8, device=device).to(dtype))
    mask = torch.arange(8, device=device) % 2 == 0
    opt = AdamW([p], lr=1e-2, l2sp=0.5, masks={p: mask})
    sd = _roundtrip(opt.state_dict())
    q = torch.nn.Parameter(p.detach().clone() + 1)
    opt2 = AdamW([q], lr=1e-2, l2sp=0.5)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.anchor_of(q), opt.anchor_of(p))
    assert torch.equal(opt2.get_mask(q), mask)


@pytest.mark.parametrize("device, dtype", device_dtype_params([torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("kind", KINDS)
def test_load_torch_state_dict(device, dtype, kind):
    # torch's optimizer (on a float32 master for bf16) runs 5 steps; ours loads its state and
    # both continue: they stay equal to the tolerance of the dtype.
    master_dtype = torch.float32
    shapes = [(7,), (4, 6)]
    ours = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().to(master_dtype).clone()) for p in ours]
    if kind == "adamw":
        ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, amsgrad=True)
        opt = AdamW(ours, lr=1e-3, weight_decay=0.0)
    else:
        ref = torch.optim.SGD(theirs, lr=1e-2, momentum=0.9, weight_decay=0.1)
        opt = SGD(ours, lr=1e-3)

    def step_both(n, with_ours):
        for _ in range(n):
            gs = [torch.randn(s, device=device).to(dtype) for s in shapes]
            for p, t, g in zip(ours, theirs, gs):
                p.grad, t.grad = g, g.to(master_dtype)
            ref.step()
            with torch.no_grad():
                for t in theirs:
                    t.copy_(t.to(dtype))
            if with_ours:
                opt.step()
                for p, t in zip(ours, theirs):
                    assert_close(p, t, dtype)
                    with torch.no_grad():
                        t.copy_(p)

    step_both(5, with_ours=False)
    with torch.no_grad():
        for p, t in zip(ours, theirs):
            p.copy_(t)
    opt.load_state_dict(_roundtrip(ref.state_dict()))
    assert opt.param_groups[0]["lr"] == 1e-2
    step_both(5, with_ours=True)
    for p, t in zip(ours, theirs):
        for key, v in ref.state[t].items():
            if key != "step" and v is not None:
                assert opt.state[p][key].dtype == torch.float32
                torch.testing.assert_close(opt.state[p][key], v, **state_tol(dtype))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_loading_a_torch_state_keeps_anchors_masks_and_group_penalties(kind):
    # A torch optimizer's state dict has no anchors, no masks and no penalty keys: loading it must
    # not drop this optimizer's (the anchors were lost and the next step raised; a set_mask mask was
    # lost and the pruned weights revived).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(10, 6)
    torch_cls, ours_cls = (torch.optim.AdamW, AdamW) if kind == "adamw" else (torch.optim.SGD, SGD)
    extra = {} if kind == "adamw" else {"momentum": 0.9}
    body, head = list(model[0].parameters()), list(model[2].parameters())
    theirs = torch_cls([{"params": body}, {"params": head}], lr=0.01, **extra)
    for _ in range(2):
        theirs.zero_grad()
        model(x).square().mean().backward()
        theirs.step()
    anchors = [p.detach().clone() - 0.25 for p in body]
    ours = ours_cls([{"params": body, "l2sp": 0.5, "anchor": anchors}, {"params": head, "l1": 1e-3}], lr=0.01,
                    **extra)
    mask = torch.rand(model[2].weight.shape) > 0.5
    ours.set_mask(model[2].weight, mask)
    ours.load_state_dict(theirs.state_dict())
    for p, a in zip(body, anchors):
        assert torch.equal(ours.anchor_of(p), a)
    assert torch.equal(ours.get_mask(model[2].weight), mask)
    assert ours.param_groups[0]["l2sp"] == 0.5 and ours.param_groups[1]["l1"] == 1e-3
    moment = "exp_avg" if kind == "adamw" else "momentum_buffer"
    assert (ours.state[model[2].weight][moment][~mask] == 0).all()
    for _ in range(3):
        ours.zero_grad()
        model(x).square().mean().backward()
        ours.step()
    assert (model[2].weight[~mask] == 0).all()
    assert (ours.state[model[2].weight][moment][~mask] == 0).all()
    # What the loaded state holds wins: an anchor in it replaces ours.
    state = ours.state_dict()
    state["state"][0]["anchor"] = torch.zeros_like(body[0])
    ours.load_state_dict(state)
    assert torch.equal(ours.anchor_of(body[0]), torch.zeros_like(body[0]))


def _dampened_sgd_pair():
    """torch's SGD and ours (init_state done) on copies of one layer, with dampening, and an input."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    ours_model = copy.deepcopy(ref)
    theirs = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    ours = SGD(ours_model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    ours.init_state()
    return ref, ours_model, torch.randn(5, 4), theirs, ours


def _step_both(ref, ours_model, x, theirs, ours):
    for model, opt in ((ref, theirs), (ours_model, ours)):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    for a, b in zip(ref.parameters(), ours_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_sgd_buffers_of_init_state_start_from_the_gradient():
    # init_state() (done at construction for FSDP2 parameters) creates zero momentum buffers; the
    # first step must still start them from the gradient, as torch's SGD does (with dampening the
    # update was (1 - dampening) times too small), and a loaded state is taken as started.
    ref, ours_model, x, theirs, ours = _dampened_sgd_pair()
    for _ in range(3):
        _step_both(ref, ours_model, x, theirs, ours)
    resumed = SGD(copy.deepcopy(ours_model).parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    resumed.init_state()
    resumed.load_state_dict(ours.state_dict())
    assert not resumed._unstarted()


def test_a_rolled_back_load_keeps_init_state_buffers_unstarted():
    # A caller that loads the optimizer first and more after it (Finetuner's resume) rolls the
    # optimizer back with _state_snapshot / _restore_state when a later part is refused: SGD's zero buffers
    # of init_state must still start from the gradient afterwards (with dampening they differ).
    ref, ours_model, x, theirs, ours = _dampened_sgd_pair()
    other_model = copy.deepcopy(ref)
    other = SGD(other_model.parameters(), lr=0.1, momentum=0.9, dampening=0.5)
    other_model(x).sum().backward()
    other.step()  # its buffers are started
    snap = ours._state_snapshot()
    ours.load_state_dict(other.state_dict())
    assert not ours._unstarted()
    ours._restore_state(snap)
    assert len(ours._unstarted()) == 2
    _step_both(ref, ours_model, x, theirs, ours)


@pytest.mark.parametrize("step", [5, 5.0])
def test_a_step_saved_as_a_number_loads_as_a_tensor(step):
    # Older checkpoints keep "step" as a Python number; torch's AdamW turns it into a tensor, ours
    # left the number in place and the next step failed inside the fused update.
    def state(p):
        return {"state": {0: {"step": step, "exp_avg": torch.full_like(p, 0.1), "exp_avg_sq": torch.full_like(p, 0.01)}},
                "param_groups": [{"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
                                  "amsgrad": False, "maximize": False, "params": [0]}]}

    ours_p, torch_p = (torch.nn.Parameter(torch.linspace(-1, 1, 7)) for _ in range(2))
    ours, ref = AdamW([ours_p]), torch.optim.AdamW([torch_p])
    ours.load_state_dict(state(ours_p))
    ref.load_state_dict(state(torch_p))
    st = ours.state[ours_p]["step"]
    assert isinstance(st, torch.Tensor) and st.dtype == torch.float32 and st.item() == 5
    for _ in range(2):
        ours_p.grad = torch.linspace(0.5, -0.5, 7)
        torch_p.grad = torch.linspace(0.5, -0.5, 7)
        ours.step()
        ref.step()
    assert ours.state[ours_p]["step"].item() == 7
    torch.testing.assert_close(ours_p.detach(), torch_p.detach(), rtol=1e-6, atol=1e-7)
    # An old pickle of the optimizer itself (its state with a number step) too.
    pickled = copy.deepcopy(ours)
    pickled.state[pickled.param_groups[0]["params"][0]]["step"] = 9
    restored = copy.copy(pickled)
    restored.__setstate__(pickled.__getstate__())
    assert isinstance(restored.state[restored.param_groups[0]["params"][0]]["step"], torch.Tensor)


@pytest.mark.parametrize("kind", KINDS)
def test_a_parameter_listed_twice_is_refused(kind):
    # torch's optimizers warn and update it once per listing; the fused step would apply two
    # updates from one state: refused, naming both positions, and the optimizer is left unchanged.
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    make = (lambda params: AdamW(params)) if kind == "adamw" else (lambda params: SGD(params, lr=0.1, momentum=0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own "duplicate parameters" warning comes first
        with pytest.raises(ValueError, match=r"parameter 2 \(param group 0\) is the same tensor as parameter 0"):
            make([p, q, p])
    opt = make([q])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"parameter 1 \(param group 1\) is the same tensor as parameter 0"):
            opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1 and p not in opt.state


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("planned", [False, True], ids=["first-step", "planned-step"])
def test_a_step_that_raises_leaves_no_trace(monkeypatch, kind, planned):
    # The fused op checks everything before it writes; the optimizer around it must not move
    # anything either: AdamW had counted the step (its next update then used the wrong bias
    # correction), SGD had marked new momentum buffers as started (with dampening, the next first
    # update was (1 - dampening) times too small). Two dtypes: two launches per step.
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3).to(torch.bfloat16))
    ref_model = copy.deepcopy(model)
    x = torch.randn(5, 4)

    def run(m):
        return m[1](m[0](x).to(torch.bfloat16)).float().square().sum()

    if kind == "adamw":
        make = lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, l2sp=0.5)  # noqa: E731
    else:
        make = lambda ps: SGD(ps, lr=1e-2, momentum=0.9, dampening=0.5, l2sp=0.5)  # noqa: E731
    ours, ref = make(model.parameters()), make(ref_model.parameters())
    steps = 2 if planned else 1
    for opt, m in ((ours, model), (ref, ref_model)):
        for _ in range(steps - 1):  # a step before, so that the failing one runs a saved plan
            opt.zero_grad()
            run(m).backward()
            opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = copy.deepcopy(ours.state_dict())
    ours.zero_grad()
    run(model).backward()
    monkeypatch.setenv("PYFINETUNE_CPU_PREFETCH", "maybe")
    with pytest.raises(ValueError, match="PYFINETUNE_CPU_PREFETCH must be 0 or 1"):
        ours.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    after = ours.state_dict()
    for i, st in state_before["state"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(after["state"][i][key]), torch.as_tensor(value)), (i, key)
    if kind == "sgd" and not planned:
        assert all(p in ours._unstarted() for p in model.parameters())
    monkeypatch.delenv("PYFINETUNE_CPU_PREFETCH")
    ours.step()  # the same gradients, now accepted
    ref.zero_grad()
    run(ref_model).backward()
    ref.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    for i, st in ref.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(ours.state_dict()["state"][i][key]), torch.as_tensor(value)), (i, key)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_refused_state_dict_leaves_the_optimizer_as_it_was(kind):
    cls = {"adamw": AdamW, "sgd": SGD}[kind]
    kw = dict(momentum=0.9) if kind == "sgd" else {}
    p = torch.nn.Parameter(torch.randn(3))
    opt = cls([p], lr=1e-2, l2sp=0.1, **kw)
    p.grad = torch.randn(3)
    opt.step()
    moment = "momentum_buffer" if kind == "sgd" else "exp_avg"
    before, lr = snapshot(opt), opt.param_groups[0]["lr"]

    bad_group = copy.deepcopy(opt.state_dict())
    bad_group["param_groups"][0]["lr"] = float("nan")
    bad_group["state"][0][moment] = torch.full((3,), 7.0)
    with pytest.raises(ValueError, match=r"lr \(param group 0\) must be a finite number"):
        opt.load_state_dict(bad_group)
    assert_bitwise_equal(snapshot(opt), before)
    assert opt.param_groups[0]["lr"] == lr

    # State saved for a parameter of another shape, and an anchor of an integer dtype: refused at
    # the load (naming what does not fit), not at the next step.
    q = torch.nn.Parameter(torch.randn(3, 4))
    other = cls([q], lr=1e-2, **kw)
    q.grad = torch.randn(3, 4)
    other.step()
    with pytest.raises(ValueError, match=rf"load_state_dict: the loaded state does not fit parameter 0 \(param group 0\): "
                                         rf"its optimizer state '{moment}' has shape \(3, 4\)"):
        opt.load_state_dict(other.state_dict())
    bad_anchor = copy.deepcopy(opt.state_dict())
    bad_anchor["state"][0]["anchor"] = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"its anchor is torch.int32"):
        opt.load_state_dict(bad_anchor)
    assert_bitwise_equal(snapshot(opt), before)
    p.grad = torch.randn(3)
    opt.step()  # still usable


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_unstarted_sgd_buffers_survive_a_copy(how):
    # init_state's zero buffers (FSDP2 parameters get them at construction): a copied optimizer
    # lost which were unstarted (torch pickles defaults, state and groups only), so its first step
    # was dampened. (A state_dict does not carry it: torch.distributed.checkpoint loads into the
    # keys of a fresh optimizer's state_dict, see SGD._init_state.)
    ref, ours_model, x, theirs, ours = _dampened_sgd_pair()
    if how == "deepcopy":
        ours_model, ours = copy.deepcopy((ours_model, ours))
    else:
        ours_model, ours = pickle.loads(pickle.dumps((ours_model, ours)))
    assert len(ours._unstarted()) == 2
    for _ in range(2):
        _step_both(ref, ours_model, x, theirs, ours)
    assert not ours._unstarted()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_add_param_group_after_deepcopy_and_pickle(kind):
    model = torch.nn.Linear(3, 2)
    cls = AdamW if kind == "adamw" else SGD
    opt = cls([model.weight], lr=0.1, l2sp=0.1, **({"momentum": 0.9} if kind == "sgd" else {}))
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        copied.add_param_group({"params": [copied.param_groups[0]["params"][0].new_zeros(2, requires_grad=True)]})
        assert len(copied.param_groups) == 2


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_state_follows_a_parameter_whose_memory_format_changed(kind):
    # model.to(memory_format=torch.channels_last) after the optimizer was made (or a state saved from
    # a contiguous model loaded into a channels_last one): the state tensors had the old strides,
    # every step was refused by the kernel, and a refused step had already updated the parameters
    # of earlier launches (a bfloat16 bias here). torch's optimizers carry on; so do ours now.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3)
    bias16 = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    ref_w, ref_b = copy.deepcopy(conv.weight), copy.deepcopy(bias16)  # ours, the layout unchanged
    kw = {"momentum": 0.9} if kind == "sgd" else {}
    cls = AdamW if kind == "adamw" else SGD
    ours = cls([{"params": [bias16]}, {"params": [conv.weight]}], lr=0.1, **kw)
    theirs = cls([{"params": [ref_b]}, {"params": [ref_w]}], lr=0.1, **kw)

    def step(opt, w, b, seed):
        g = torch.Generator().manual_seed(seed)
        w.grad = torch.randn(w.shape, generator=g).contiguous(memory_format=torch.channels_last)
        b.grad = torch.randn(b.shape, generator=g).to(b.dtype)
        opt.step()

    step(ours, conv.weight, bias16, 1)
    step(theirs, ref_w, ref_b, 1)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    for seed in (2, 3):
        step(ours, conv.weight, bias16, seed)
        step(theirs, ref_w, ref_b, seed)
    assert torch.equal(conv.weight, ref_w) and torch.equal(bias16, ref_b)  # each stepped 3 times, once each
    key = "exp_avg" if kind == "adamw" else "momentum_buffer"
    assert ours.state[conv.weight][key].stride() == conv.weight.stride()
    # A state saved from the contiguous layout loads laid out like the channels_last parameter.
    contiguous = torch.nn.Parameter(conv.weight.detach().contiguous())
    saver = cls([{"params": [bias16.detach().clone().requires_grad_()]}, {"params": [contiguous]}], lr=0.1, **kw)
    saver.load_state_dict(ours.state_dict())
    assert saver.state[contiguous][key].is_contiguous()
    ours.load_state_dict(saver.state_dict())
    assert ours.state[conv.weight][key].stride() == conv.weight.stride()


def test_numpy_hyper_parameters_and_a_scheduler_returning_them():
    # An LR lambda returning np.float32 (NumPy 2 keeps the type) left lr a NumPy scalar: refused.
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    ours = AdamW(a.parameters(), lr=np.float32(0.1), weight_decay=np.float64(0.01), l2sp=np.float32(0.5))
    theirs = AdamW(b.parameters(), lr=0.1, weight_decay=0.01, l2sp=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(ours, lambda e: np.float32(0.5) ** e)
    tsched = torch.optim.lr_scheduler.LambdaLR(theirs, lambda e: 0.5 ** e)
    x = torch.randn(4, 3)
    for _ in range(3):
        for m, opt, sch in ((a, ours, sched), (b, theirs, tsched)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
            sch.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_numpy_flags_and_float16_hyper_parameters():
    # NumPy bools for the flags (a sweep's np.array([True, False]) entries) were refused as "not a
    # bool"; a np.float16 weight decay warned of an overflow when compared with float32's largest.
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = [(SGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=np.bool_(True), weight_decay=np.float16(0.01),
                      maximize=np.bool_(False)),
                  SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=float(np.float16(0.01)),
                      maximize=False))]
        x = torch.randn(4, 3)
        for _ in range(2):
            for m, opt in ((a, pairs[0][0]), (b, pairs[0][1])):
                opt.zero_grad()
                m(x).square().sum().backward()
                opt.step()
        adam = AdamW([torch.nn.Parameter(torch.ones(2))], amsgrad=np.bool_(True), weight_decay=np.float16(60000.0))
        adam.param_groups[0]["params"][0].grad = torch.ones(2)
        adam.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert type(pairs[0][0].param_groups[0]["nesterov"]) is bool
    assert type(adam.param_groups[0]["amsgrad"]) is bool
    for bad in (1, "True", torch.tensor(True)):
        with pytest.raises(TypeError, match=r"^nesterov must be a bool"):
            SGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=bad)


def test_refusals_of_a_tensor_lr_beyond_float32_and_a_malformed_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=torch.tensor(1e39, dtype=torch.float64))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"lr \(param group 0\) must be at most 3.40282e\+38"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state[p]
    good = AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    good.step()
    sd = good.state_dict()
    sd["state"][0]["step"] = torch.tensor([1.0, 2.0])
    before = copy.deepcopy(good.state_dict())
    with pytest.raises(ValueError, match=r"state 'step' of parameter 0 must hold one value, got shape \(2,\)"):
        good.load_state_dict(sd)
    assert torch.equal(good.state_dict()["state"][0]["exp_avg"], before["state"][0]["exp_avg"])


def test_a_loaded_mask_holds_at_once():
    p = torch.nn.Parameter(torch.ones(4))
    mask = torch.tensor([True, False, True, False])
    saver = AdamW([torch.nn.Parameter(torch.ones(4))], lr=0.1)
    saver.set_mask(saver.param_groups[0]["params"][0], mask)
    opt = AdamW([p], lr=0.1)
    opt.load_state_dict(saver.state_dict())
    assert torch.equal(p.detach(), mask.float())  # as set_mask does, not only at the next step


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("full", [False, True], ids=["sharded", "full"])
def test_anchor_dtype_through_torch_distributed_state_dict_functions(kind, full):
    # torch.distributed.checkpoint's get_optimizer_state_dict accepts tensors, numbers and strings
    # only ("Unexpected value type <class 'torch.dtype'>" when a group held anchor_dtype as a
    # dtype): state_dict() stores it by name, load_state_dict / set_optimizer_state_dict read it back.
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    make = (lambda ps: AdamW(ps, lr=1e-2, l2sp=0.2, anchor_dtype=torch.bfloat16)) if kind == "adamw" else \
        (lambda ps: SGD(ps, lr=1e-2, momentum=0.9, l2sp=0.2, anchor_dtype=torch.bfloat16))
    opt = make(model.parameters())
    model(torch.randn(3, 5)).sum().backward()
    opt.step()
    options = StateDictOptions(full_state_dict=full)
    sd = get_optimizer_state_dict(model, opt, options=options)
    assert sd["param_groups"][0]["anchor_dtype"] == "bfloat16"
    assert opt.param_groups[0]["anchor_dtype"] is torch.bfloat16  # the optimizer's own group unchanged
    anchors = [opt.anchor_of(p).clone() for p in model.parameters()]

    model2 = copy.deepcopy(model)
    opt2 = make(model2.parameters())
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # "init" anchors that differ: they must come from the state dict
    opt2.init_state()  # the documented step before torch.distributed.checkpoint loads plain parameters
    set_optimizer_state_dict(model2, opt2, copy.deepcopy(sd), options=options)
    assert opt2.param_groups[0]["anchor_dtype"] is torch.bfloat16
    for p, a in zip(model2.parameters(), anchors):
        assert opt2.anchor_of(p).dtype == torch.bfloat16
        assert torch.equal(opt2.anchor_of(p), a)


def test_anchor_dtype_by_name():
    # A config file's "bfloat16" / "torch.bfloat16" names the dtype; other names are refused.
    p = torch.nn.Parameter(torch.randn(3, 2))
    for name in ("bfloat16", "torch.bfloat16"):
        opt = AdamW([p], l2sp=0.1, anchor_dtype=name)
        assert opt.param_groups[0]["anchor_dtype"] is torch.bfloat16
        assert opt.anchor_of(p).dtype == torch.bfloat16
    for bad in ("bf16", "int32", "torch.int8", "dtype"):
        with pytest.raises(ValueError, match=rf"anchor_dtype must be None .*got '{bad}'"):
            SGD([p], lr=0.1, l2sp=0.1, anchor_dtype=bad)
    # An older checkpoint holds the dtype itself: still loaded.
    opt = AdamW([p], l2sp=0.1, anchor_dtype=torch.bfloat16)
    sd = opt.state_dict()
    sd["param_groups"][0]["anchor_dtype"] = torch.bfloat16
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["anchor_dtype"] is torch.bfloat16
    sd["param_groups"][0]["anchor_dtype"] = "float128"
    with pytest.raises(ValueError, match=r"anchor_dtype \(param group 0\) must be None"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["anchor_dtype"] is torch.bfloat16  # a refused load leaves the optimizer as it was
