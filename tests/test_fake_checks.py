"""The fake (meta) kernels refuse what the real kernels refuse.

A meta or fake call (torch.compile's tracing, shape inference on the meta device) that the real
kernel would refuse must raise too, not return outputs of a plausible shape: each bad call below
raises a RuntimeError on the CPU kernel and on meta tensors. (Checks that need the data, like an
index out of range, are the kernels' alone.)
"""

import pytest
import torch

from pyfinetune import ops

P = torch.ops.pyfinetune
N, M, K, V = 4, 5, 6, 7


def _case_table():
    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    x, w = t(N, K), t(M, K)
    mask = torch.rand(M, K, generator=g) < 0.5
    pat = ops.compressed_pattern(mask)
    vals = t(pat.col_indices.shape[0])
    s, te = t(N, V), t(N, V)
    lab = torch.zeros(N, dtype=torch.long)
    kd = dict(temperature=2.0, alpha=0.5, divergence="forward_kl", beta=0.5, ignore_index=-100, need_grad=True)
    tv, ti = t(N, 3), torch.zeros(N, 3, dtype=torch.long)
    cases = {
        "masked_matmul bias [M+1]": (P.masked_matmul, (x, w, mask, t(M + 1)), {}),
        "masked_matmul bias 2-D": (P.masked_matmul, (x, w, mask, t(1, M)), {}),
        "masked_matmul int x": (P.masked_matmul, (x.long(), w.long(), mask, None), {}),
        "masked_matmul_backward grad_out [N, M+1]": (P.masked_matmul_backward, (t(N, M + 1), x, w, mask, [True] * 3, False), {}),
        "masked_matmul_backward mask shape": (P.masked_matmul_backward, (t(N, M), x, w, mask[:, :2], [True] * 3, False), {}),
        "masked_matmul_backward int mask": (P.masked_matmul_backward, (t(N, M), x, w, mask.int(), [True] * 3, False), {}),
        "masked_matmul_backward weight K": (P.masked_matmul_backward,
                                            (t(N, M), x, t(M, K + 2), torch.ones(M, K + 2, dtype=torch.bool),
                                             [True] * 3, False), {}),
        "csr_linear bias [M+1]": (P.csr_linear, (x, vals, *pat[:3], t(M + 1)), {}),
        "csr_linear row_order short": (P.csr_linear, (x, vals, pat[0], pat[1], pat[2][:-1], None), {}),
        "csr_linear int64 crow": (P.csr_linear, (x, vals, pat[0].long(), pat[1], pat[2], None), {}),
        "csr_linear 2-D values": (P.csr_linear, (x, vals[:, None], pat[0], pat[1][:, None], pat[2], None), {}),
        "csr_linear int x": (P.csr_linear, (x.long(), vals.long(), *pat[:3], None), {}),
        "csr_linear_backward grad_out [N+1, M]": (P.csr_linear_backward, (t(N + 1, M), x, vals, *pat, [True] * 3), {}),
        "csr_linear_backward ccol short": (P.csr_linear_backward,
                                           (t(N, M), x, vals, *pat[:3], pat[3][:-1], *pat[4:], [True] * 3), {}),
        "kd_loss_fwd V = 0": (P.kd_loss_fwd, (t(N, 0), t(N, 0), None), kd),
        "kd_loss_fwd labels int32": (P.kd_loss_fwd, (s, te, lab.int()), kd),
        "kd_loss_fwd labels [N+1]": (P.kd_loss_fwd, (s, te, torch.zeros(N + 1, dtype=torch.long)), kd),
        "kd_loss_fwd temperature 0": (P.kd_loss_fwd, (s, te, None), {**kd, "temperature": 0.0}),
        "kd_loss_fwd alpha 2": (P.kd_loss_fwd, (s, te, None), {**kd, "alpha": 2.0}),
        "kd_loss_fwd beta 0": (P.kd_loss_fwd, (s, te, None), {**kd, "beta": 0.0}),
        "kd_loss_fwd divergence": (P.kd_loss_fwd, (s, te, None), {**kd, "divergence": "foo"}),
        "kd_loss_fwd grad_scale 0": (P.kd_loss_fwd, (s, te, None), {**kd, "grad_scale": 0.0}),
        "kd_loss_fwd strided V": (P.kd_loss_fwd, (t(V, N).t(), te, None), kd),
        "kd_loss_fwd int student": (P.kd_loss_fwd, (s.long(), te, None), kd),
        "kd_loss_topk_fwd reverse_kl": (P.kd_loss_topk_fwd, (s, tv, ti, None), {**kd, "divergence": "reverse_kl"}),
        "kd_loss_topk_fwd rows": (P.kd_loss_topk_fwd, (s, t(N + 1, 3), torch.zeros(N + 1, 3, dtype=torch.long), None), kd),
        "kd_loss_topk_fwd k > V": (P.kd_loss_topk_fwd, (s, t(N, V + 1), torch.zeros(N, V + 1, dtype=torch.long), None), kd),
        "kd_loss_topk_fwd int32 indices": (P.kd_loss_topk_fwd, (s, tv, ti.int(), None), kd),
    }
    return cases


CASES = _case_table()


@pytest.mark.parametrize("name", list(CASES))
def test_meta_calls_refuse_what_the_kernels_refuse(name):
    op, args, kwargs = CASES[name]
    with pytest.raises(RuntimeError):
        op(*args, **kwargs)  # the CPU kernel
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError):
        op(*meta, **kwargs)


def test_meta_calls_of_good_arguments_still_give_outputs():
    x, w = torch.randn(N, K, device="meta"), torch.randn(M, K, device="meta")
    mask = torch.ones(M, K, dtype=torch.bool, device="meta")
    assert P.masked_matmul(x, w, mask, torch.randn(M, device="meta")).shape == (N, M)
    loss, grad = P.kd_loss_fwd(torch.randn(N, V, device="meta"), torch.randn(N, V, device="meta"),
                               torch.zeros(N, dtype=torch.long, device="meta"), temperature=2.0, alpha=0.5,
                               divergence="jsd", beta=0.3, ignore_index=-100, need_grad=True, grad_scale=0.25)
    assert loss.shape == (N,) and grad.shape == (N, V)


def _adamw_args(p, **change):
    args = dict(params=[p], grads=[torch.randn_like(p)], exp_avgs=[torch.zeros(p.shape)],
                exp_avg_sqs=[torch.zeros(p.shape)], max_exp_avg_sqs=[], anchors=[], masks=[],
                steps=[torch.tensor(1.0)], lrs=[0.1], lr_tensors=[], beta1s=[0.9], beta2s=[0.999], epss=[1e-8],
                weight_decays=[0.0], l2sps=[0.0], l1s=[0.0])
    args.update(change)
    return args


def _sgd_args(p, **change):
    args = dict(params=[p], grads=[torch.randn_like(p)], momentum_buffers=[torch.zeros(p.shape)], anchors=[],
                masks=[], lrs=[0.1], lr_tensors=[], momentums=[0.9], dampenings=[0.0], weight_decays=[0.0],
                l2sps=[0.0], l1s=[0.0])
    args.update(change)
    return args


_P = torch.randn(3, 4)
OPTIM_CASES = {
    "adamw grad dtype": ("adamw", _adamw_args(_P, grads=[_P.double()])),
    "adamw grad strides": ("adamw", _adamw_args(_P, grads=[torch.randn(4, 3).t()])),
    "adamw state dtype": ("adamw", _adamw_args(_P.bfloat16(), grads=[_P.bfloat16()],
                                               exp_avgs=[torch.zeros(3, 4, dtype=torch.bfloat16)])),
    "adamw lrs short": ("adamw", _adamw_args(_P, lrs=[])),
    "adamw negative lr": ("adamw", _adamw_args(_P, lrs=[-1.0])),
    "adamw beta 1": ("adamw", _adamw_args(_P, beta1s=[1.0])),
    "adamw l2sp without anchor": ("adamw", _adamw_args(_P, l2sps=[0.1])),
    "adamw int mask": ("adamw", _adamw_args(_P, masks=[torch.ones(3, 4, dtype=torch.int32)])),
    "adamw steps f64": ("adamw", _adamw_args(_P, steps=[torch.tensor(1.0, dtype=torch.float64)])),
    "adamw max_exp_avg_sqs without amsgrad": ("adamw", _adamw_args(_P, max_exp_avg_sqs=[torch.zeros(3, 4)])),
    "sgd dampening 2": ("sgd", _sgd_args(_P, dampenings=[2.0])),
    "sgd momentum without buffers": ("sgd", _sgd_args(_P, momentum_buffers=[])),
    "sgd buffer dtype": ("sgd", _sgd_args(_P, momentum_buffers=[torch.zeros(3, 4, dtype=torch.float64)])),
    "sgd nesterov with dampening": ("sgd", {**_sgd_args(_P, dampenings=[0.5]), "nesterov": True}),
}


@pytest.mark.parametrize("name", list(OPTIM_CASES))
def test_meta_optimizer_steps_refuse_what_the_kernels_refuse(name):
    kind, args = OPTIM_CASES[name]
    if kind == "adamw":
        op, flags = P.fused_adamw_, dict(amsgrad=False, maximize=False, decoupled_l2sp=False)
    else:
        op, flags = P.fused_sgd_, dict(nesterov=False, maximize=False, decoupled_l2sp=False)
    flags.update({k: args.pop(k) for k in ("nesterov",) if k in args})

    def clone(v, device):
        if isinstance(v, torch.Tensor):
            return v.clone().to(device)
        return [clone(t, device) for t in v] if isinstance(v, list) else v

    with pytest.raises(RuntimeError):
        op(**{k: clone(v, "cpu") for k, v in args.items()}, **flags)
    with pytest.raises(RuntimeError):
        op(**{k: clone(v, "meta") for k, v in args.items()}, **flags)
