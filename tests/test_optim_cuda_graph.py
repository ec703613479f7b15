"""A whole optimizer step captured in a CUDA graph (lr as a device tensor) replays like eager."""

import pytest
import torch

from conftest import needs_caching_allocator
from pyfinetune.optim import SGD, AdamW

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@needs_caching_allocator
@pytest.mark.parametrize("layout", ["classic", "wide", "flat"])  # PYFINETUNE_OPTIM_CUDA_LAYOUT's kernels
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_captured_in_cuda_graph(monkeypatch, kind, dtype, layout):
    monkeypatch.setenv("PYFINETUNE_OPTIM_CUDA_LAYOUT", layout)
    torch.manual_seed(1234)
    shapes = [(37,), (64, 33), (5, 7, 9), (70000,)]  # 70000 > one chunk: several blocks per tensor
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    initial = [p.detach().clone() for p in ps]

    def make(params):
        lr = torch.tensor(1e-2, device="cuda")
        if kind == "adamw":
            return AdamW(params, lr=lr, l2sp=0.1, l1=1e-3, amsgrad=True)
        return SGD(params, lr=lr, momentum=0.9, weight_decay=1e-3, l2sp=0.1)

    opt, opt_ref = make(ps), make(ref)
    for p, r in zip(ps, ref):
        p.grad = torch.randn_like(p)
        r.grad = p.grad.clone()
    opt.step()  # eager warm-up creates the state outside the capture
    opt_ref.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(4):
        for p, r in zip(ps, ref):
            g = torch.randn_like(p)
            p.grad.copy_(g)
            r.grad.copy_(g)
        # A scheduler-style change of the device lr must be seen by the replay.
        opt.param_groups[0]["lr"].mul_(0.9)
        opt_ref.param_groups[0]["lr"].mul_(0.9)
        graph.replay()
        opt_ref.step()
    torch.cuda.synchronize()
    for p, r, p_init in zip(ps, ref, initial):
        assert not torch.equal(p, p_init), "the replays did not update the parameter"
        torch.testing.assert_close(p, r, rtol=0, atol=0)
    if kind == "adamw":
        for p, r in zip(ps, ref):
            # one eager warm-up step + 4 replays (the capture itself runs nothing)
            assert opt.state[p]["step"].item() == opt_ref.state[r]["step"].item() == 5
