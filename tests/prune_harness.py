"""Models and float64 references shared by the pruning tests (tests/test_prune_*.py)."""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for a test module of small models (import it there): their batches
    give a second thread little work, and on a busy machine its synchronization made the forward
    of resnet18 at 32x32 50x slower (2.4 s vs 0.05 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ConvNet(nn.Module):
    """A Conv2d, a grouped Conv2d, a LayerNorm and two Linear layers: every prunable kind, plus
    parameters that pruning must leave alone (biases, the norm). Input [N, 4, 6, 6]."""

    def __init__(self, dtype=torch.float32, device="cpu"):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.conv = nn.Conv2d(4, 8, 3, padding=1, **kw)            # flattened input 4*3*3 = 36
        self.grouped = nn.Conv2d(8, 8, 2, groups=2, **kw)           # flattened input 4*2*2 = 16
        self.norm = nn.LayerNorm(8 * 5 * 5, **kw)
        self.fc1 = nn.Linear(8 * 5 * 5, 24, **kw)
        self.fc2 = nn.Linear(24, 8, bias=False, **kw)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = torch.relu(self.grouped(x))
        x = self.norm(x.flatten(1))
        return self.fc2(torch.relu(self.fc1(x)))


LAYERS = ["conv", "grouped", "fc1", "fc2"]


def conv_input(n=3, dtype=torch.float32, device="cpu"):
    return torch.randn(n, 4, 6, 6, dtype=dtype, device=device)


def as_matrix(w: torch.Tensor) -> torch.Tensor:
    """[out, in] view of a Linear / Conv2d weight (Conv2d: input flattened)."""
    return w.reshape(w.shape[0], -1)


def ref_unstructured(weights: Dict[str, torch.Tensor], sparsity: float, scope: str) -> Dict[str, torch.Tensor]:
    """Keep-masks by magnitude with a float64 stable sort (ties: lower index, layers in order)."""
    if scope == "layer":
        return {name: ref_unstructured({name: w}, sparsity, "global")[name] for name, w in weights.items()}
    flat = torch.cat([w.detach().double().abs().reshape(-1) for w in weights.values()])
    order = torch.sort(flat, stable=True).indices
    pruned = torch.zeros_like(flat, dtype=torch.bool)
    pruned[order[: round(sparsity * flat.numel())]] = True
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = ~pruned[start:start + w.numel()].reshape(w.shape)
        start += w.numel()
    return out


def block_norms(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """L2 norms (float64) of the rows x cols blocks of the [out, in] matrix: [out/rows, in/cols]."""
    m = as_matrix(w.detach()).double()
    return m.reshape(m.shape[0] // rows, rows, m.shape[1] // cols, cols).square().sum(dim=(1, 3)).sqrt()


def block_mask_units(mask: torch.Tensor, rows: int, cols: int) -> Tuple[torch.Tensor, bool]:
    """(kept blocks [out/rows, in/cols], whether every block is all-kept or all-pruned)."""
    m = as_matrix(mask)
    b = m.reshape(m.shape[0] // rows, rows, m.shape[1] // cols, cols)
    kept = b.all(dim=3).all(dim=1)
    uniform = bool((b.any(dim=3).any(dim=1) == kept).all())
    return kept, uniform


def optimizer_state_tensors(opt: torch.optim.Optimizer, p: torch.Tensor) -> List[Tuple[str, torch.Tensor]]:
    """The per-element state tensors of ``p`` (same shape), e.g. exp_avg, momentum_buffer."""
    return [(k, v) for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor) and v.shape == p.shape]
