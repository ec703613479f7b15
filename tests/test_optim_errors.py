"""Bad input gives a clear error that names the argument, and an error during step() leaves
every parameter and every state tensor bitwise unchanged."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import assert_bitwise_equal, bits, device_params, snapshot
from pyfinetune.optim import SGD, AdamW

OPTS = {"adamw": AdamW, "sgd": SGD}


# Either order: two tensors at one address sort in either order.
_SHARED = r"({0}\[{1}\] shares memory with {2}\[{3}\]|{2}\[{3}\] shares memory with {0}\[{1}\]): every parameter"


def _params(n=3, device="cpu", dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(4, 3, device=device, dtype=dtype)) for _ in range(n)]


# ------------------------------------------------------------------------------ construction
COMMON_BAD = [
    (dict(lr=-1e-3), ValueError, r"^lr must be a finite number >= 0"),
    (dict(lr=float("nan")), ValueError, r"^lr must be a finite"),
    (dict(lr=torch.tensor(-1.0)), ValueError, r"^lr must be a finite number >= 0"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, r"^lr as a tensor must hold exactly one value"),
    (dict(lr=torch.tensor(1e-3, dtype=torch.float16)), TypeError, r"^lr as a tensor must be float32 or float64"),
    (dict(lr="0.1"), TypeError, r"^lr must be a number"),
    (dict(weight_decay=-0.1), ValueError, r"^weight_decay must be a finite number >= 0"),
    (dict(l2sp=-0.5), ValueError, r"^l2sp must be a finite number >= 0"),
    (dict(l1=-1.0), ValueError, r"^l1 must be a finite number >= 0"),
    (dict(l1=float("inf")), ValueError, r"^l1 must be a finite"),
    (dict(penalty_mode="L2"), ValueError, r"^penalty_mode must be 'coupled' or 'decoupled', got 'L2'"),
    (dict(anchor_dtype=torch.int32), ValueError, r"^anchor_dtype must be None"),
    (dict(maximize=1), TypeError, r"^maximize must be a bool"),
    (dict(anchor="pretrained"), ValueError, r'^anchor must be "init" or an iterable'),
]
ADAMW_BAD = [
    (dict(eps=-1e-8), ValueError, r"^eps must be a finite number >= 0"),
    (dict(betas=(1.0, 0.999)), ValueError, r"^betas\[0\] must be < 1.0"),
    (dict(betas=(-0.1, 0.999)), ValueError, r"^betas\[0\] must be a finite number >= 0"),
    (dict(betas=(0.9, 1.5)), ValueError, r"^betas\[1\] must be < 1.0"),
    (dict(betas=(0.9,)), ValueError, r"^betas must be a pair"),
    (dict(amsgrad="yes"), TypeError, r"^amsgrad must be a bool"),
]
SGD_BAD = [
    (dict(momentum=-0.9), ValueError, r"^momentum must be a finite number >= 0"),
    (dict(momentum=0.9, dampening=1.5), ValueError, r"^dampening must be <= 1.0"),
    (dict(nesterov=True), ValueError, r"^nesterov=True requires momentum > 0"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, r"^nesterov=True requires .* dampening = 0"),
    (dict(nesterov=1, momentum=0.9), TypeError, r"^nesterov must be a bool"),
]
CASES = ([pytest.param("adamw", *c, id=f"adamw-{i}") for i, c in enumerate(COMMON_BAD + ADAMW_BAD)]
         + [pytest.param("sgd", *c, id=f"sgd-{i}") for i, c in enumerate(COMMON_BAD + SGD_BAD)])
# The same values in the second param group: the message names the group right after the option,
# e.g. "lr (param group 1) must be ...".
GROUP_CASES = [pytest.param(kind, kw, exc, re.sub(r"^\^(\S+) ", r"^\1 \\(param group 1\\) ", match),
                            id=f"{kind}-{i}")
               for kind, bad in (("adamw", COMMON_BAD + ADAMW_BAD), ("sgd", COMMON_BAD + SGD_BAD))
               for i, (kw, exc, match) in enumerate(bad) if "anchor" not in kw]


@pytest.mark.parametrize("kind, kwargs, exc, match", CASES)
def test_bad_hyperparameter(kind, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        OPTS[kind](_params(), **kwargs)


@pytest.mark.parametrize("kind, kwargs, exc, match", GROUP_CASES)
def test_bad_hyperparameter_in_a_param_group(kind, kwargs, exc, match):
    ps = _params()
    with pytest.raises(exc, match=match):
        OPTS[kind]([dict(params=ps[:1]), dict(params=ps[1:], **kwargs)])


@pytest.mark.parametrize("kind", list(OPTS))
def test_anchor_count_and_shape(kind):
    ps = _params(3)
    with pytest.raises(ValueError, match=r"anchor has 2 tensors but the optimizer has at least 3 parameters"):
        OPTS[kind](ps, l2sp=0.1, anchor=[torch.zeros(4, 3)] * 2)
    with pytest.raises(ValueError, match=r"anchor has 4 tensors but the optimizer has 3 parameters"):
        OPTS[kind](ps, l2sp=0.1, anchor=[torch.zeros(4, 3)] * 4)
    with pytest.raises(ValueError, match=r"anchor for parameter 1 \(param group 0\) must have the parameter's "
                                         r"shape \(4, 3\), got \(3, 4\)"):
        OPTS[kind](ps, l2sp=0.1, anchor=[torch.zeros(4, 3), torch.zeros(3, 4), torch.zeros(4, 3)])
    with pytest.raises(TypeError, match=r"anchor\[1\] must be a Tensor \(or None for a parameter whose group has "
                                        r"l2sp=0\), got str"):
        OPTS[kind](ps, l2sp=0.1, anchor=[torch.zeros(4, 3), "pretrained", torch.zeros(4, 3)])
    # None holds the place of a parameter without an anchor: refused where its group has l2sp > 0.
    with pytest.raises(ValueError, match=r"anchor gives no tensor for parameter 1 \(param group 0\), whose group has "
                                         r"l2sp = 0.1 > 0: give its pretrained values, or set the group's l2sp=0"):
        OPTS[kind](ps, l2sp=0.1, anchor=[torch.zeros(4, 3), None, torch.zeros(4, 3)])
    # A mapping {param: tensor}: keyed by the parameters, values tensors, no parameter of an l2sp > 0
    # group left out, no key that is not a parameter.
    with pytest.raises(ValueError, match=r"anchor gives no tensor for parameter 2 \(param group 0\)"):
        OPTS[kind](ps, l2sp=0.1, anchor={ps[0]: torch.zeros(4, 3), ps[1]: torch.zeros(4, 3)})
    with pytest.raises(ValueError, match=r"anchor has 1 entries whose key is not a parameter of this optimizer "
                                         r"\(entry 1 in its order\)"):
        OPTS[kind](ps[:1], l2sp=0.1, anchor={ps[0]: torch.zeros(4, 3), ps[1]: torch.zeros(4, 3)})
    with pytest.raises(TypeError, match=r"anchor as a mapping must be keyed by the parameters \(tensors\), got a str"):
        OPTS[kind](ps, l2sp=0.1, anchor={"weight": torch.zeros(4, 3)})
    with pytest.raises(TypeError, match=r"anchor's value for entry 0 must be a Tensor, got list"):
        OPTS[kind](ps, l2sp=0.1, anchor={ps[0]: [0.0] * 12})
    with pytest.raises(ValueError, match=r"the group's anchor has 1 entries whose key is not a parameter of the group "
                                         r"\(param group 1\)"):
        OPTS[kind]([dict(params=ps[:1]), dict(params=ps[1:], l2sp=0.1, anchor={ps[0]: torch.zeros(4, 3)})])
    with pytest.raises(TypeError, match=r"anchor must be .* got a single Tensor"):
        OPTS[kind](ps, l2sp=0.1, anchor=torch.zeros(4, 3))
    with pytest.raises(TypeError, match=r"anchor for parameter 0 \(param group 0\) must be a floating-point"):
        OPTS[kind](ps, l2sp=0.1, anchor=[torch.zeros(4, 3, dtype=torch.int64)] * 3)
    with pytest.raises(ValueError, match=r"the group's anchor has 1 tensors for 2 parameters \(param group 1\)"):
        OPTS[kind]([dict(params=ps[:1]), dict(params=ps[1:], l2sp=0.1, anchor=[torch.zeros(4, 3)])])
    with pytest.raises(ValueError, match=r"anchor_dtype torch.float16 is not available for torch.float32"):
        OPTS[kind](ps, l2sp=0.1, anchor_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"anchor for parameter 0 \(param group 0\) is a meta tensor"):
        OPTS[kind](ps, l2sp=0.1, anchor=[torch.empty(4, 3, device="meta")] * 3)
    # A group with l2sp = 0 takes no anchor: its entries of the list may be placeholders (a resized head).
    opt = OPTS[kind]([dict(params=ps[:2], l2sp=0.1), dict(params=ps[2:], l2sp=0.0)],
                     anchor=[torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(1000, 3)])
    assert opt.anchor_of(ps[2]) is None
    # A group's anchor: "init" (its current values) or tensors; another string or a lone tensor is refused.
    opt = OPTS[kind](ps[:1], l2sp=0.1)
    opt.add_param_group(dict(params=ps[1:2], l2sp=0.2, anchor="init"))
    assert torch.equal(opt.anchor_of(ps[1]), ps[1])
    # "init" takes the current values even where the constructor was given an anchor list.
    listed = OPTS[kind](ps[:1], l2sp=0.1, anchor=[torch.full((4, 3), 5.0)])
    listed.add_param_group(dict(params=ps[1:2], l2sp=0.2, anchor="init"))
    assert torch.equal(listed.anchor_of(ps[1]), ps[1])
    with pytest.raises(ValueError, match=r'anchor must be "init" or an iterable of tensors, got \'pretrained\''):
        opt.add_param_group(dict(params=ps[2:], l2sp=0.2, anchor="pretrained"))
    with pytest.raises(TypeError, match=r"anchor must be an iterable of tensors \(one per parameter\), got a single"):
        opt.add_param_group(dict(params=ps[2:], l2sp=0.2, anchor=torch.zeros(4, 3)))
    assert len(opt.param_groups) == 2
    # A refused group leaves no anchor behind (the later anchor is the bad one).
    opt = OPTS[kind](ps[:1], l2sp=0.1)
    with pytest.raises(ValueError, match=r"anchor for parameter 1 \(param group 1\)"):
        opt.add_param_group(dict(params=ps[1:], l2sp=0.1, anchor=[torch.zeros(4, 3), torch.zeros(5)]))
    assert len(opt.param_groups) == 1 and all("anchor" not in opt.state.get(p, {}) for p in ps[1:])


@pytest.mark.parametrize("kind", list(OPTS))
def test_bad_masks(kind):
    ps = _params(2)
    with pytest.raises(ValueError, match=r"set_mask: mask must have the parameter's shape \(4, 3\), got \(3, 4\)"):
        OPTS[kind](ps, masks={ps[0]: torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"set_mask: mask must be a bool tensor, got torch.float32"):
        OPTS[kind](ps, masks={ps[0]: torch.ones(4, 3)})
    with pytest.raises(TypeError, match=r"masks must be a mapping"):
        OPTS[kind](ps, masks=[torch.ones(4, 3, dtype=torch.bool)])
    opt = OPTS[kind](ps)
    with pytest.raises(ValueError, match=r"set_mask: param is not one of this optimizer's parameters"):
        opt.set_mask(torch.nn.Parameter(torch.ones(4, 3)), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"set_mask: mask must be a bool Tensor"):
        opt.set_mask(ps[0], [[True] * 3] * 4)
    before = ps[0].detach().clone()
    with pytest.raises(ValueError, match=r"set_mask: mask is a meta tensor \(shape only, no values\)"):
        opt.set_mask(ps[0], torch.ones(4, 3, dtype=torch.bool, device="meta"))
    assert torch.equal(ps[0], before) and opt.get_mask(ps[0]) is None


@pytest.mark.parametrize("kind", list(OPTS))
def test_bad_parameters(kind):
    with pytest.raises(TypeError, match=r"parameters must be float32, bfloat16, float16 or float64, got torch.int64"):
        OPTS[kind]([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"parameters must be dense \(strided\)"):
        OPTS[kind]([torch.nn.Parameter(torch.eye(3).to_sparse())])


# ------------------------------------------------------------------ errors during step()
def _trained(kind, device="cpu", **kw):
    """Two groups with state (two steps done), L2-SP anchors and a mask."""
    ps = _params(4, device)
    groups = [dict(params=ps[:2], l2sp=0.1), dict(params=ps[2:], lr=5e-3)]
    opt = OPTS[kind](groups, lr=1e-2, momentum=0.9, **kw) if kind == "sgd" else OPTS[kind](
        groups, lr=1e-2, amsgrad=True, **kw)
    opt.set_mask(ps[1], torch.rand(4, 3, device=device) > 0.5)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    for p in ps:
        p.grad = torch.randn_like(p)
    return opt, ps


def _expect_unchanged(opt, exc, match):
    before = snapshot(opt)
    assert len(before) > 8
    with pytest.raises(exc, match=match):
        opt.step()
    assert_bitwise_equal(snapshot(opt), before)


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("key, value, exc, match", [
    ("lr", -1.0, ValueError, r"lr \(param group 1\) must be a finite number >= 0(\.0)?, got -1.0"),
    ("lr", torch.tensor(float("nan")), ValueError, r"lr \(param group 1\) must be a finite number >= 0"),
    ("weight_decay", -1.0, ValueError, r"weight_decay \(param group 1\) must be"),
    ("l1", -1.0, ValueError, r"l1 \(param group 1\) must be"),
    ("penalty_mode", "both", ValueError, r"penalty_mode \(param group 1\) must be 'coupled' or 'decoupled'"),
    ("l2sp", 0.5, RuntimeError, r"parameter 0 \(param group 1\) has no L2-SP anchor"),
])
def test_invalid_group_set_after_construction(kind, key, value, exc, match):
    # Group 0 is valid and comes first: it must not be updated when group 1 is rejected.
    opt, _ = _trained(kind)
    opt.param_groups[1][key] = value
    _expect_unchanged(opt, exc, match)


@pytest.mark.parametrize("kind, key, value, match", [
    ("adamw", "betas", (0.9, 1.0), r"betas\[1\] \(param group 1\) must be < 1.0"),
    ("adamw", "eps", -1.0, r"eps \(param group 1\) must be"),
    ("sgd", "nesterov", True, r"nesterov=True \(param group 1\) requires momentum > 0 and dampening = 0"),
    ("sgd", "dampening", 2.0, r"dampening \(param group 1\) must be <= 1.0"),
])
def test_invalid_specific_option_set_after_construction(kind, key, value, match):
    opt, _ = _trained(kind)
    if key == "nesterov":
        opt.param_groups[1]["dampening"] = 0.5
    opt.param_groups[1][key] = value
    _expect_unchanged(opt, ValueError, match)


@pytest.mark.parametrize("kind", list(OPTS))
def test_sparse_gradient_in_last_group(kind):
    opt, ps = _trained(kind)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt.add_param_group(dict(params=[emb.weight]))
    emb(torch.tensor([1, 2, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    _expect_unchanged(opt, RuntimeError, r"does not support sparse gradients \(parameter 0 \(param group 2\)\)")


@pytest.mark.parametrize("kind", list(OPTS))
def test_grad_dtype_mismatch(kind):
    opt, ps = _trained(kind)
    ps[3].grad.data = ps[3].grad.data.double()  # `.data` bypasses the setter's dtype check
    _expect_unchanged(opt, RuntimeError, r"the gradient of parameter 1 \(param group 1\) is torch.float64 but the "
                                         r"parameter is torch.float32")


@pytest.mark.parametrize("kind", list(OPTS))
def test_non_dense_parameter(kind):
    base = torch.randn(4, 6)
    p = torch.nn.Parameter(base[:, ::2])  # every other column: overlapping-free but not dense
    opt = OPTS[kind]([p])
    p.grad = torch.randn(4, 3)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"parameter 0 \(param group 0\) is not dense"):
        opt.step()
    assert torch.equal(p, before)


@pytest.mark.parametrize("kind", list(OPTS))
def test_error_in_op_leaves_nothing_half_updated(kind):
    opt, ps = _trained(kind)
    ps[3].data = ps[3].data.double()   # state stays float32: the op rejects it
    ps[3].grad = torch.randn(4, 3, dtype=torch.float64)
    # step() checks the existing state against the parameters before any bucket is updated.
    _expect_unchanged(opt, RuntimeError, r"parameter 1 \(param group 1\): its optimizer state '(exp_avg|momentum_buffer)' is torch.float32")


@pytest.mark.parametrize("kind", list(OPTS))
@pytest.mark.parametrize("key", ["lr", "weight_decay", "l2sp", "l1", "specific"])
def test_float32_range_refused_before_the_float64_launch(kind, key):
    # A float64 group is launched first; a float32 group whose hyper-parameter exceeds float32's
    # range (valid in float64) is refused by the Python checks before that launch, not by its own
    # launch afterwards (which would leave the float64 parameters stepped).
    if key == "specific":
        key = "eps" if kind == "adamw" else "momentum"
    p64 = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    p32 = torch.nn.Parameter(torch.randn(4, 3))
    opt = OPTS[kind]([dict(params=[p64]), dict(params=[p32], l2sp=0.1)], lr=1e-2)
    opt.param_groups[1][key] = 1e39  # finite and >= 0: the groups' own checks pass it
    for p in (p64, p32):
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in (p64, p32)]
    with pytest.raises(ValueError, match=rf"^{key} \(param group 1\) must be at most 3.40282e\+38 \(float32's largest\) "
                                         r"for torch.float32 parameters"):
        opt.step()
    assert torch.equal(p64, before[0]) and torch.equal(p32, before[1])
    assert not any(isinstance(v, torch.Tensor) and v.numel() == 1 and v.item() != 0
                   for st in opt.state.values() for k, v in st.items() if k == "step")


@pytest.mark.parametrize("kind", list(OPTS))
def test_parameters_sharing_memory_are_refused_when_added(kind):
    # Views of one buffer in groups that would go to different launches (float64 first, then two
    # float32 launches of different flags): each launch's own check would pass the first ones, so
    # the optimizer refuses them when the group is added, before any step.
    buf = torch.zeros(8)
    p64 = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    pa, pb = torch.nn.Parameter(buf), torch.nn.Parameter(buf[2:6])
    with pytest.raises(ValueError, match=r"parameter 0 \(param group 2\) shares memory with parameter 0 "
                                         r"\(param group 1\): every parameter must be a tensor of its own"):
        OPTS[kind]([dict(params=[p64]), dict(params=[pa]), dict(params=[pb], maximize=True)], lr=0.1)
    opt = OPTS[kind]([dict(params=[p64]), dict(params=[pa])], lr=0.1)
    with pytest.raises(ValueError, match="shares memory"):
        opt.add_param_group(dict(params=[pb], maximize=True))
    assert len(opt.param_groups) == 2
    # Disjoint views of one buffer are fine, in one launch or several.
    buf2 = torch.zeros(8)
    qa, qb = torch.nn.Parameter(buf2[:4]), torch.nn.Parameter(buf2[4:])
    opt = OPTS[kind]([dict(params=[qa]), dict(params=[qb], maximize=True)], lr=0.1)
    qa.grad, qb.grad = torch.ones(4), torch.ones(4)
    opt.step()
    assert bool((buf2[:4] != 0).all()) and bool((buf2[4:] != 0).all())


# --------------------------------------------------------------------------- direct op calls
def _adamw_args(n=3, dtype=torch.float32, device="cpu"):
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    shp = (4, 3)
    return dict(
        params=[torch.randn(shp, device=device, dtype=dtype) for _ in range(n)],
        grads=[torch.randn(shp, device=device, dtype=dtype) for _ in range(n)],
        exp_avgs=[torch.randn(shp, device=device, dtype=sd) for _ in range(n)],
        exp_avg_sqs=[torch.rand(shp, device=device, dtype=sd) for _ in range(n)],
        max_exp_avg_sqs=[torch.rand(shp, device=device, dtype=sd) for _ in range(n)],
        anchors=[torch.randn(shp, device=device, dtype=dtype) for _ in range(n)],
        masks=[torch.rand(shp, device=device) > 0.5 for _ in range(n)],
        steps=[torch.tensor(2.0, device=device) for _ in range(n)],
        lrs=[1e-2] * n, lr_tensors=[torch.tensor(1e-2, device=device)] * n, beta1s=[0.9] * n, beta2s=[0.99] * n,
        epss=[1e-8] * n, weight_decays=[1e-2] * n, l2sps=[0.1] * n, l1s=[0.0] * n,
    ), dict(amsgrad=True, maximize=False, decoupled_l2sp=False)


def _sgd_args(n=3, dtype=torch.float32, device="cpu"):
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    shp = (4, 3)
    return dict(
        params=[torch.randn(shp, device=device, dtype=dtype) for _ in range(n)],
        grads=[torch.randn(shp, device=device, dtype=dtype) for _ in range(n)],
        momentum_buffers=[torch.randn(shp, device=device, dtype=sd) for _ in range(n)],
        anchors=[torch.randn(shp, device=device, dtype=dtype) for _ in range(n)],
        masks=[torch.rand(shp, device=device) > 0.5 for _ in range(n)],
        lrs=[1e-2] * n, lr_tensors=[], momentums=[0.9] * n, dampenings=[0.0] * n, weight_decays=[1e-2] * n,
        l2sps=[0.1] * n, l1s=[0.0] * n,
    ), dict(nesterov=False, maximize=False, decoupled_l2sp=False)


def _call(kind, args, kwargs):
    op = torch.ops.pyfinetune.fused_adamw_ if kind == "adamw" else torch.ops.pyfinetune.fused_sgd_
    op(*args.values(), **kwargs)


def _tensors(args, kwargs):
    out = []
    for v in list(args.values()) + list(kwargs.values()):
        for t in (v if isinstance(v, list) else [v]):
            if isinstance(t, torch.Tensor):
                out.append(t.detach().clone())
    return out


def _set(args, key, i, value):
    args[key] = list(args[key])
    args[key][i] = value


ADAMW_OP_ERRORS = {
    "grads-count": (lambda a, k: a.update(grads=a["grads"][:2]),
                    r"pyfinetune.fused_adamw_: grads must have one tensor per parameter \(3\), got 2"),
    "anchors-count": (lambda a, k: a.update(anchors=a["anchors"][:1]),
                      r"anchors must be empty or have one entry per parameter \(3\), got 1"),
    "lrs-count": (lambda a, k: a.update(lrs=[1e-2]), r"lrs must have one value per parameter \(3\), got 1"),
    "exp_avgs-dtype": (lambda a, k: _set(a, "exp_avgs", 1, a["exp_avgs"][1].bfloat16()),
                       r"exp_avgs\[1\] must be Float \(optimizer state of a Float parameter\), got BFloat16"),
    "exp_avg_sqs-shape": (lambda a, k: _set(a, "exp_avg_sqs", 2, torch.rand(3, 4)),
                          r"exp_avg_sqs\[2\] must have the shape of params\[2\]"),
    "max_exp_avg_sqs-count": (lambda a, k: a.update(max_exp_avg_sqs=a["max_exp_avg_sqs"][:2]),
                              r"max_exp_avg_sqs must have one tensor per parameter \(3\), got 2"),
    "max_exp_avg_sqs-not-amsgrad": (lambda a, k: k.update(amsgrad=False),
                                    r"max_exp_avg_sqs must be empty when amsgrad=False, got 3 tensors"),
    "params-dtype": (lambda a, k: (_set(a, "params", 1, a["params"][1].double()),
                                   _set(a, "grads", 1, a["grads"][1].double())),
                     r"all params must have one dtype: params\[0\] is Float, params\[1\] is Double"),
    "grads-dtype": (lambda a, k: _set(a, "grads", 2, a["grads"][2].half()),
                    r"grads\[2\] must have the dtype of params\[2\] \(Float\), got Half"),
    "grads-strides": (lambda a, k: _set(a, "grads", 0, torch.randn(3, 4).t()),
                      r"grads\[0\] must have the strides of params\[0\] \[3, 1\], got \[1, 4\]"),
    "params-int": (lambda a, k: a.update(params=[p.long() for p in a["params"]]),
                   r"params must be float32, bfloat16, float16 or float64, got Long"),
    "params-non-dense": (lambda a, k: _set(a, "params", 0, torch.randn(4, 6)[:, ::2]),
                         r"params\[0\] must be non-overlapping and dense"),
    "steps-dtype": (lambda a, k: _set(a, "steps", 1, torch.tensor(2.0, dtype=torch.float64)),
                    r"steps\[1\] must be float32, got Double"),
    "steps-int": (lambda a, k: _set(a, "steps", 0, torch.tensor(2)), r"steps\[0\] must be float32, got Long"),
    "steps-shape": (lambda a, k: _set(a, "steps", 2, torch.ones(2)), r"steps\[2\] must hold exactly one value"),
    "steps-zero": (lambda a, k: _set(a, "steps", 2, torch.tensor(0.0)), r"steps\[2\] must be >= 1"),
    "anchors-dtype": (lambda a, k: _set(a, "anchors", 1, a["anchors"][1].half()),
                      r"anchors\[1\] must be float32, bfloat16 or the dtype of params\[1\] \(Float\), got Half"),
    "masks-dtype": (lambda a, k: _set(a, "masks", 2, a["masks"][2].float()),
                    r"masks\[2\] must be a bool tensor, got Float"),
    "masks-shape": (lambda a, k: _set(a, "masks", 0, torch.ones(12, dtype=torch.bool)),
                    r"masks\[0\] must have the shape of params\[0\]"),
    "lr_tensors-numel": (lambda a, k: _set(a, "lr_tensors", 1, torch.ones(2)),
                         r"lr_tensors\[1\] must hold exactly one value, got 2 values"),
    "lr_tensors-negative": (lambda a, k: _set(a, "lr_tensors", 2, torch.tensor(-1.0)),
                            r"lr_tensors\[2\] must hold a finite lr >= 0, got -1"),
    "lr_tensors-dtype": (lambda a, k: _set(a, "lr_tensors", 0, torch.tensor(1, dtype=torch.int32)),
                         r"lr_tensors\[0\] must be float32 or float64, got Int"),
    "lrs-negative": (lambda a, k: a.update(lrs=[1e-2, 1e-2, -1.0], lr_tensors=[]),
                     r"lrs\[2\] must be a finite number >= 0, got -1"),
    "beta1s": (lambda a, k: a.update(beta1s=[0.9, 1.0, 0.9]), r"beta1s\[1\] must be in \[0, 1\), got 1"),
    "beta2s": (lambda a, k: a.update(beta2s=[0.9, 0.9, float("nan")]), r"beta2s\[2\] must be in \[0, 1\)"),
    "epss": (lambda a, k: a.update(epss=[-1.0, 0.0, 0.0]), r"epss\[0\] must be a finite number >= 0"),
    "weight_decays": (lambda a, k: a.update(weight_decays=[0.0, -1.0, 0.0]), r"weight_decays\[1\] must be"),
    "l2sps": (lambda a, k: a.update(l2sps=[0.0, 0.0, float("inf")]), r"l2sps\[2\] must be a finite number"),
    "l1s": (lambda a, k: a.update(l1s=[-0.1, 0.0, 0.0]), r"l1s\[0\] must be a finite number >= 0"),
    "grad_scale-dtype": (lambda a, k: k.update(grad_scale=torch.tensor(2.0, dtype=torch.float64)),
                         r"grad_scale must be float32, got Double"),
    "found_inf-shape": (lambda a, k: k.update(found_inf=torch.zeros(2)), r"found_inf must hold exactly one value"),
    # The value inside grad_scale divides the gradients (read on the CPU before any write).
    "grad_scale-zero": (lambda a, k: k.update(grad_scale=torch.tensor(0.0)),
                        r"grad_scale must hold a finite number > 0, got 0"),
    "grad_scale-nan": (lambda a, k: k.update(grad_scale=torch.tensor(float("nan"))),
                       r"grad_scale must hold a finite number > 0, got nan"),
    # Hyper-parameters go to float32 for float32 parameters: 1e300 became inf (a NaN step).
    "lrs-beyond-float32": (lambda a, k: a.update(lrs=[1e-2, 1e-2, 1e300], lr_tensors=[]),
                           r"lrs\[2\] must be at most 3.40282e\+38 \(float32's largest\) for Float parameters"),
    "epss-beyond-float32": (lambda a, k: a.update(epss=[1e39, 0.0, 0.0]), r"epss\[0\] must be at most"),
    # Written tensors sharing memory were updated twice per step, or read after their own update.
    "exp_avgs-is-the-parameter": (lambda a, k: _set(a, "exp_avgs", 1, a["params"][1].detach()),
                                  _SHARED.format("exp_avgs", 1, "params", 1)),
    "exp_avg_sqs-is-exp_avgs": (lambda a, k: _set(a, "exp_avg_sqs", 0, a["exp_avgs"][0]),
                                _SHARED.format("exp_avg_sqs", 0, "exp_avgs", 0)),
    "params-twice": (lambda a, k: _set(a, "params", 2, a["params"][0]), _SHARED.format("params", 2, "params", 0)),
    "exp_avgs-partial-overlap": (lambda a, k: (lambda flat: (_set(a, "exp_avgs", 0, flat[:12].view(4, 3)),
                                                             _set(a, "exp_avgs", 1, flat[6:18].view(4, 3))))(
                                     torch.zeros(24)), _SHARED.format("exp_avgs", 1, "exp_avgs", 0)),
}
SGD_OP_ERRORS = {
    "grads-count": (lambda a, k: a.update(grads=a["grads"][1:]),
                    r"pyfinetune.fused_sgd_: grads must have one tensor per parameter \(3\), got 2"),
    "momentum_buffers-dtype": (lambda a, k: _set(a, "momentum_buffers", 1, a["momentum_buffers"][1].double()),
                               r"momentum_buffers\[1\] must be Float \(optimizer state of a Float parameter\), "
                               r"got Double"),
    "momentum_buffers-count": (lambda a, k: a.update(momentum_buffers=a["momentum_buffers"][:1]),
                               r"momentum_buffers must have one tensor per parameter \(3\), got 1"),
    "momentums-without-buffers": (lambda a, k: a.update(momentum_buffers=[], momentums=[0.0, 0.9, 0.0]),
                                  r"momentums\[1\] is 0.9 but momentum_buffers is empty"),
    "dampenings": (lambda a, k: a.update(dampenings=[0.0, 0.0, 1.5]), r"dampenings\[2\] must be in \[0, 1\]"),
    "momentums-negative": (lambda a, k: a.update(momentums=[0.9, -0.9, 0.9]), r"momentums\[1\] must be"),
    "nesterov-no-momentum": (lambda a, k: (k.update(nesterov=True), a.update(momentums=[0.9, 0.0, 0.9])),
                             r"nesterov=True needs momentum > 0 and dampening = 0; parameter 1"),
    "params-dtype": (lambda a, k: (_set(a, "params", 2, a["params"][2].half()),
                                   _set(a, "grads", 2, a["grads"][2].half())),
                     r"all params must have one dtype: params\[0\] is Float, params\[2\] is Half"),
    "anchors-shape": (lambda a, k: _set(a, "anchors", 2, torch.randn(12)),
                      r"anchors\[2\] must have the shape of params\[2\]"),
    "masks-dtype": (lambda a, k: _set(a, "masks", 1, a["masks"][1].to(torch.uint8)),
                    r"masks\[1\] must be a bool tensor, got Byte"),
    "lr_tensors-count": (lambda a, k: a.update(lr_tensors=[torch.tensor(0.1)]),
                         r"lr_tensors must be empty or have one entry per parameter \(3\), got 1"),
    "found_inf-dtype": (lambda a, k: k.update(found_inf=torch.tensor(0, dtype=torch.int32)),
                        r"found_inf must be float32, got Int"),
    "grad_scale-inf": (lambda a, k: k.update(grad_scale=torch.tensor(float("inf"))),
                       r"grad_scale must hold a finite number > 0, got inf"),
    "grad_scale-negative": (lambda a, k: k.update(grad_scale=torch.tensor(-1.0)),
                            r"grad_scale must hold a finite number > 0, got -1"),
    "momentums-beyond-float32": (lambda a, k: a.update(momentums=[0.9, 1e39, 0.9]), r"momentums\[1\] must be at most"),
    "momentum_buffers-is-the-parameter": (lambda a, k: _set(a, "momentum_buffers", 2, a["params"][2].detach()),
                                          _SHARED.format("momentum_buffers", 2, "params", 2)),
    "momentum_buffers-shared": (lambda a, k: _set(a, "momentum_buffers", 1, a["momentum_buffers"][0]),
                                _SHARED.format("momentum_buffers", 1, "momentum_buffers", 0)),
}


@pytest.mark.parametrize("kind, case", [("adamw", c) for c in ADAMW_OP_ERRORS] + [("sgd", c) for c in SGD_OP_ERRORS])
def test_op_bad_argument(kind, case):
    args, kwargs = _adamw_args() if kind == "adamw" else _sgd_args()
    mutate, match = (ADAMW_OP_ERRORS if kind == "adamw" else SGD_OP_ERRORS)[case]
    mutate(args, kwargs)
    before = _tensors(args, kwargs)
    with pytest.raises(RuntimeError, match=match):
        _call(kind, args, kwargs)
    # Validation runs in full before any write: nothing was touched.
    for x, y in zip(_tensors(args, kwargs), before):
        assert torch.equal(bits(x), bits(y))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_op_sparse_grad_names_the_argument(kind):
    args, kwargs = _adamw_args() if kind == "adamw" else _sgd_args()
    _set(args, "grads", 1, torch.randn(4, 3).to_sparse())
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be a dense \(strided\) tensor.*sparse gradients"):
        _call(kind, args, kwargs)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_op_valid_arguments_run(kind):
    # The baseline of the cases above: unmodified arguments are accepted and update params[2].
    args, kwargs = _adamw_args() if kind == "adamw" else _sgd_args()
    before = args["params"][2].clone()
    _call(kind, args, kwargs)
    assert not torch.equal(args["params"][2], before)


@pytest.mark.cuda
@pytest.mark.parametrize("device", device_params(["cuda"]))
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_op_mismatched_devices(device, kind):
    args, kwargs = _adamw_args(device=device) if kind == "adamw" else _sgd_args(device=device)
    _set(args, "grads", 1, args["grads"][1].cpu())
    with pytest.raises(RuntimeError, match=r"grads\[1\] must be on cuda:0 like params\[1\], got cpu"):
        _call(kind, args, kwargs)
    args, kwargs = _adamw_args(device=device) if kind == "adamw" else _sgd_args(device=device)
    _set(args, "params", 2, args["params"][2].cpu())
    with pytest.raises(RuntimeError, match=r"all params must be on one device: params\[0\] is on cuda:0, params\[2\]"):
        _call(kind, args, kwargs)
    args, kwargs = _adamw_args(device=device) if kind == "adamw" else _sgd_args(device=device)
    kwargs["grad_scale"] = torch.tensor(2.0)
    with pytest.raises(RuntimeError, match=r"grad_scale must be on the parameters' device cuda:0, got cpu"):
        _call(kind, args, kwargs)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_op_accepts_views_of_one_buffer_that_do_not_overlap(kind):
    # Flat-buffer layouts (parameters and states as disjoint views of one allocation) are legal.
    args, kwargs = _adamw_args() if kind == "adamw" else _sgd_args()
    separate = {key: [t.clone() if isinstance(t, torch.Tensor) else t for t in v] for key, v in args.items()}
    flat = torch.cat([p.reshape(-1) for p in args["params"]])
    for i in range(3):
        _set(args, "params", i, flat[12 * i:12 * (i + 1)].view(4, 3))
    _call(kind, args, kwargs)
    _call(kind, separate, dict(kwargs))
    assert torch.equal(flat, torch.cat([p.reshape(-1) for p in separate["params"]]))


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("where", ["grad_scale", "list"])
def test_op_refuses_a_meta_tensor_among_real_ones(kind, where):
    # A meta argument sends the call to the fake kernel, which skipped the step without an error.
    args, kwargs = _adamw_args() if kind == "adamw" else _sgd_args()
    if where == "grad_scale":
        kwargs["grad_scale"] = torch.tensor(1.0, device="meta")
        match = r"grad_scale must be on the parameters' device cpu, got meta"
    else:
        _set(args, "grads", 1, args["grads"][1].to("meta"))
        match = r"grads\[1\] must be on the parameters' device cpu, got meta"
    before = _tensors(args, kwargs)
    with pytest.raises(RuntimeError, match=match):
        _call(kind, args, kwargs)
    for x, y in zip(_tensors(args, kwargs), before):
        if x.device.type != "meta":
            assert torch.equal(bits(x), bits(y))


def test_sgd_positional_arguments_in_torch_order_are_refused_with_the_reason():
    # torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov); ours takes nesterov
    # before weight_decay (the signature): torch's positional order must not pass silently.
    ps = _params(1)
    for args in ((0.1, 0.9, 0.0, 1e-4), (0.1, 0.9, 0.0, 0.0, True)):
        with pytest.raises(TypeError, match=r"^(nesterov must be a bool, got float|weight_decay must be a number, got "
                                            r"bool) \(pyfinetune.optim.SGD takes nesterov before weight_decay when "
                                            r"they are given by position; torch.optim.SGD takes weight_decay first: "
                                            r"pass them by keyword\)$"):
            SGD(ps, *args)
    opt = SGD(ps, 0.1, 0.9, 0.0, True, 1e-4)  # this order: nesterov, weight_decay
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["weight_decay"] == 1e-4


def test_adamw_takes_amsgrad_by_position_as_torch_does():
    ps = _params(1)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = AdamW(ps, 1e-2, (0.9, 0.99), 1e-8, 1e-2, True)
    ref = torch.optim.AdamW(qs, 1e-2, (0.9, 0.99), 1e-8, 1e-2, True)
    assert ours.param_groups[0]["amsgrad"] is True
    for _ in range(4):
        g = torch.randn(4, 3)
        ps[0].grad, qs[0].grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(ps[0], qs[0])
