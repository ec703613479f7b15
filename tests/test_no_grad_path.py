"""The products' wrappers call their op below autograd when nothing is to be differentiated
(torch.no_grad(), torch.inference_mode(), or inputs that do not require grad): the op's Python
autograd kernel (torch.library.register_autograd) would only redispatch there, at ~20 us a call.
These pin that the shortcut computes what the autograd path computes, returns a tensor that does
not require grad, never applies where a gradient is wanted, and stays out of torch.compile."""

import pytest
import torch

from pyfinetune import ops


def _case(seed=0, n=5, k=70, m=130, sparsity=0.8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, k, generator=g)
    w = torch.randn(m, k, generator=g)
    mask = torch.rand(m, k, generator=g) > sparsity
    b = torch.randn(m, generator=g)
    return x, w, mask, b


def _products(x, w, mask, b):
    pat = ops.compressed_pattern(mask)
    tiled = ops.tiled_pattern(pat.crow_indices, pat.col_indices, w.shape[1])
    vals = w[mask]
    return {
        "masked_matmul": lambda: ops.masked_matmul(x, w, mask, b),
        "csr_linear": lambda: ops.csr_linear(x, vals, *pat, bias=b),
        "tiled_csr_linear": lambda: ops.tiled_csr_linear(x, vals, pat, tiled, bias=b),
    }


@pytest.mark.parametrize("name", ["masked_matmul", "csr_linear", "tiled_csr_linear"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "nothing_requires_grad"])
def test_no_grad_call_equals_the_autograd_call(name, mode):
    x, w, mask, b = _case()
    ref = _products(x.requires_grad_(), w, mask, b)[name]()
    assert ref.requires_grad
    x = x.detach()
    if mode == "nothing_requires_grad":
        y = _products(x, w, mask, b)[name]()
    else:
        ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        x.requires_grad_()  # ignored under the context
        with ctx:
            y = _products(x, w, mask, b)[name]()
    assert not y.requires_grad
    torch.testing.assert_close(y, ref.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["masked_matmul", "csr_linear", "tiled_csr_linear"])
def test_gradient_still_flows_where_wanted(name):
    # Only x requires grad (the weight and bias do not): the autograd path, with x's gradient.
    x, w, mask, b = _case(1)
    x.requires_grad_()
    y = _products(x, w, mask, b)[name]()
    y.sum().backward()
    wm = torch.where(mask, w, 0.0)
    torch.testing.assert_close(x.grad, torch.ones(3, 5, 130) @ wm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["masked_matmul", "csr_linear"])
def test_no_grad_call_under_torch_compile(name):
    x, w, mask, b = _case(2)
    fns = _products(x, w, mask, b)
    compiled = torch.compile(lambda: fns[name](), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(), fns[name](), rtol=1e-6, atol=1e-6)
