"""The Finetuner runs of tests/test_finetune_distributed.py, written once for both sides of each
comparison: a rank of a 2-process gloo group (Finetuner wraps DDP and splits the loaders itself)
and one process that sees the same global batches (the reference, run by pytest).

Run as a script, this file is one rank (``distributed_harness.rank_main``): ``python
finetune_ranks.py RANK WORLD STORE OUT`` runs every scenario of ``SCENARIOS``.

One process sees the ranks' global batches through :class:`GlobalOrder`: ``DistributedSampler``
gives rank ``r`` the positions ``r, r + world, ...`` of its (padded) permutation, so the ranks'
``j``-th batches of ``B`` examples are together the positions ``world*j*B ... world*(j+1)*B - 1``:
one process reading the padded permutation in order with batches of ``world*B`` meets the same
examples at each step. Since the ranks' batches have equal sizes (the sampler pads), the mean of
their mean losses (DDP averages the gradients) is the mean over the global batch.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Dict, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

import distributed_harness as harness
from pyfinetune.finetuning import Finetuner

D_IN, HIDDEN, CLASSES = 8, 16, 3
TRAIN, VAL = 91, 37  # odd: the training sampler pads (46 per rank); evaluation must count 37, not 38
BATCH = 8            # per rank; one process takes WORLD * BATCH
WORLD = 2
SEED = 3
EPOCHS = 2
_W = torch.randn(D_IN, CLASSES, generator=torch.Generator().manual_seed(7))


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    return x, (x @ _W).argmax(1)


def mlp(seed: int, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.LayerNorm(HIDDEN), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def method_kwargs(method: str, rank: int) -> Dict[str, Any]:
    """Each rank builds its model and teacher from another seed: the Finetuner must start every
    rank from rank 0's weights."""
    if method == "distill":
        torch.manual_seed(100 + rank)
        return {"teacher": nn.Sequential(nn.Linear(D_IN, 32), nn.ReLU(), nn.Linear(32, CLASSES))}
    return {"l2sp": {"l2sp": 0.1}, "prune": {"sparsity": 0.6}}[method]


class GlobalOrder(Sampler):
    """The order in which ``world`` ranks' ``DistributedSampler(shuffle=True, seed=seed)`` visit
    the dataset, for one process (see the module docs); ``set_epoch`` like theirs."""

    def __init__(self, dataset, world: int, seed: int):
        self.parts = [DistributedSampler(dataset, num_replicas=world, rank=r, seed=seed) for r in range(world)]

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        lists = [list(p) for p in self.parts]
        return iter([idx for row in zip(*lists) for idx in row])

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)


def loaders(run: harness.Run):
    """Training and validation loaders: per rank as a user writes them (Finetuner splits them),
    or in one process the global batches of ``WORLD`` ranks."""
    train, val = TensorDataset(*data(TRAIN, 0)), TensorDataset(*data(VAL, 1))
    if run.distributed:
        return DataLoader(train, batch_size=BATCH, shuffle=True), DataLoader(val, batch_size=10)
    return DataLoader(train, batch_size=WORLD * BATCH, sampler=GlobalOrder(train, WORLD, SEED)), \
        DataLoader(val, batch_size=10)


def summary(tuner: Finetuner) -> Dict[str, Any]:
    return {"params": {n: p.detach().clone() for n, p in tuner.model.state_dict().items()},
            "history": [{k: v for k, v in h.items() if k != "seconds"} for h in tuner.history],
            "step": tuner.step}


def train(run: harness.Run, method: str) -> Dict[str, Any]:
    """``EPOCHS`` epochs of ``method``, then an evaluation of the validation loader."""
    tuner = Finetuner(mlp(run.rank), method, lr=1e-2, epochs=EPOCHS, seed=SEED, progress=False,
                      **method_kwargs(method, run.rank))
    train_loader, val_loader = loaders(run)
    tuner.fit(train_loader, val_loader)
    out = summary(tuner)
    out["evaluate"] = tuner.evaluate(val_loader)
    if method == "distill":
        out["teacher"] = {n: p.clone() for n, p in tuner.teacher.state_dict().items()}
        out["teacher_grads"] = [p.grad for p in tuner.teacher.parameters()]
    return out


class Noisy(Dataset):
    """The training data plus noise drawn from the global RNG while loading, rank 1 drawing twice
    as much (so the ranks' RNG states differ, as with random augmentations of images of other
    sizes); ``interrupt_at``: this process gets a SIGINT (Ctrl-C) at that read."""

    def __init__(self, rank: int, interrupt_at: Optional[int] = None):
        self.x, self.y = data(TRAIN, 0)
        self.rank, self.interrupt_at, self.reads = rank, interrupt_at, 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.reads += 1
        if self.reads == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        noise = torch.randn(D_IN)
        if self.rank == 1:
            noise = noise + torch.randn(D_IN)
        return self.x[i] + 0.01 * noise, self.y[i]


def resume(run: harness.Run) -> Dict[str, Any]:
    """Prune with dropout over 3 epochs, uninterrupted; the same run interrupted by a SIGINT
    that reaches rank 1 alone in the middle of epoch 2, then resumed from the checkpoint by fresh
    Finetuners built from other weights."""
    def tuner(seed):
        return Finetuner(mlp(seed, dropout=0.2), "prune", sparsity=0.6, lr=1e-2, epochs=3, seed=SEED, progress=False)

    def loader(interrupt_at=None):
        return DataLoader(Noisy(run.rank, interrupt_at if run.rank == 1 else None), batch_size=BATCH, shuffle=True)

    full = tuner(0)
    full.fit(loader())
    interrupted = tuner(0)
    checkpoints = os.path.join(run.out, "resume_checkpoints")
    try:
        interrupted.fit(loader(interrupt_at=46 + 19), checkpoint_dir=checkpoints)  # epoch 2, batch 3
        stopped = None
    except KeyboardInterrupt:
        stopped = (interrupted.epoch, interrupted.step, interrupted.interrupted_checkpoint)
    resumed = tuner(5)
    resumed.fit(loader(), resume=os.path.join(checkpoints, "last.pt"))
    return {"full": summary(full), "resumed": summary(resumed), "stopped": stopped,
            "files": sorted(os.listdir(checkpoints))}


def dropout(run: harness.Run) -> Dict[str, Any]:
    """One epoch with dropout 0.5, seeded and not: the dropout mask of the first training step of
    each, and the weights at the end (which must still be identical on the ranks)."""
    out: Dict[str, Any] = {}
    for name, seed in (("seeded", SEED), ("unseeded", None)):
        torch.manual_seed(run.rank)  # other starting weights per rank (the Finetuner broadcasts rank 0's)
        # Dropout first: its input (the data, never exactly 0) makes o == 0 exactly its mask.
        model = nn.Sequential(nn.Dropout(0.5), nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
        masks = []
        model[0].register_forward_hook(lambda m, i, o: masks.append((o == 0).clone()) if m.training else None)
        # Both ranks' global generators in one state, as in processes that start from torch's
        # default seed: only the Finetuner's seeding can set them apart.
        torch.manual_seed(1234)
        tuner = Finetuner(model, "l2sp", l2sp=0.1, lr=1e-2, epochs=1, seed=seed, progress=False)
        tuner.fit(loaders(run)[0])
        out[name] = {"first_mask": masks[0], "params": summary(tuner)["params"]}
    return out


SCENARIOS = {"l2sp": lambda run: train(run, "l2sp"), "prune": lambda run: train(run, "prune"),
             "distill": lambda run: train(run, "distill"), "resume": resume, "dropout": dropout}

if __name__ == "__main__":
    harness.rank_main(sys.argv[1:], SCENARIOS)
