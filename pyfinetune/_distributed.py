"""What :class:`pyfinetune.Finetuner` needs from ``torch.distributed`` (DDP under ``torchrun``):
the process group it runs in, the sharding of its data loaders, and the few collectives of the
training loop (starting weights, metrics, the stop flag of Ctrl-C, per-rank checkpoint state).

Data sharding:

* training: a ``DataLoader`` over a map-style dataset is re-created with a
  ``DistributedSampler`` (``shuffle`` as the original sampler: random or sequential), the same
  ``batch_size`` per rank, so one optimizer step sees ``batch_size x world`` examples. The
  sampler pads the data set with its first (shuffled) examples to a multiple of the world size,
  as every DDP loop does, so that all ranks run the same number of steps. A loader whose sampler
  is already distributed (it has ``num_replicas``) is used as it is; so is any other iterable
  (an ``IterableDataset`` the user shards): the ranks must then yield the same number of batches.
* evaluation: a ``DataLoader`` over a map-style dataset is re-created with the strided indices
  ``rank, rank + world, ...`` of the whole dataset (no padding: every example is evaluated once)
  and the sums are all-reduced. Any other loader is evaluated whole on every rank.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler,
                              SequentialSampler)


class Group:
    """The default process group as the training loop sees it: ``rank``, ``world`` and the
    collectives it uses. The stop flag and object gathers travel on a gloo group (the default
    group itself when its backend is gloo), so that checking them needs no GPU synchronization."""

    def __init__(self) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()
        self._cpu = None if self.backend == "gloo" else _cpu_group()

    @staticmethod
    def current() -> Optional["Group"]:
        """The running group, or None outside ``torch.distributed`` (or with one process)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return Group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``module`` (in place)."""
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0)

    def sum(self, t: Tensor) -> Tensor:
        """The sum of ``t`` over the ranks (a new tensor, on ``t``'s device)."""
        t = t.clone()
        dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank."""
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._cpu)
        return bool(t.item())

    def same(self, value: int) -> bool:
        """Whether every rank holds the same ``value``."""
        t = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._cpu)
        return int(t[0]) == -int(t[1])

    def gather(self, obj: Any) -> List[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects, CPU tensors)."""
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self._cpu)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self._cpu)


_CPU_GROUP: List[Any] = [None, None]  # (default group, its gloo twin): one twin per process group


def _cpu_group() -> Any:
    """A gloo group of all ranks next to a NCCL default group (created once: every rank must
    create it at the same point, here the first Finetuner)."""
    world = dist.group.WORLD
    if _CPU_GROUP[0] is not world:
        _CPU_GROUP[:] = [world, dist.new_group(backend="gloo")]
    return _CPU_GROUP[1]


def _sampler_of(loader: Any) -> Optional[Sampler]:
    if not isinstance(loader, DataLoader):
        return None
    batch_sampler = getattr(loader, "batch_sampler", None)
    return getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)


def set_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's sampler when it has one (``DistributedSampler``:
    another shuffle every epoch, the same one on every rank and on resume)."""
    sampler = _sampler_of(loader)
    if sampler is not None and callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)


def _map_style(loader: Any) -> bool:
    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) \
        and loader.batch_size is not None


def _rebuild(loader: DataLoader, sampler: Sampler, batch_size: Optional[int] = None,
             drop_last: Optional[bool] = None) -> DataLoader:
    """``loader`` with another sampler (and, for a loader of a batch sampler, that one's batch size
    and drop_last), everything else kept."""
    options = dict(batch_size=loader.batch_size if batch_size is None else batch_size,
                   num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                   drop_last=loader.drop_last if drop_last is None else drop_last, timeout=loader.timeout,
                   worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                   persistent_workers=loader.persistent_workers)
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, sampler=sampler, **options)


def shard_train_loader(loader: Any, group: Group, seed: int) -> Any:
    """This rank's part of ``train_loader`` (see the module docs).

    Raises:
        ValueError: a ``DataLoader`` with a sampler that is neither random, sequential nor
            distributed (e.g. weighted), or a distributed one for another number of ranks.
    """
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) \
            and loader.batch_size is None and loader.batch_sampler is not None:
        return _shard_batch_sampler_loader(loader, group, seed)
    if not _map_style(loader):
        return loader
    sampler = _sampler_of(loader)
    if _already_split(sampler, group):
        return loader
    if type(sampler) not in (RandomSampler, SequentialSampler):
        raise ValueError(f"Finetuner: train_loader's sampler {type(sampler).__name__} cannot be split over "
                         f"{group.world} processes; use shuffle=True/False or a DistributedSampler")
    return _rebuild(loader, DistributedSampler(loader.dataset, num_replicas=group.world, rank=group.rank,
                                               shuffle=type(sampler) is RandomSampler, seed=seed))


def _already_split(sampler: Any, group: Group) -> bool:
    """Whether ``sampler`` is a distributed one (the user's own split), for this number of ranks
    (ValueError for another)."""
    replicas = getattr(sampler, "num_replicas", None)
    if replicas is None:
        return False
    if replicas != group.world:
        raise ValueError(f"Finetuner: train_loader's sampler is for num_replicas={replicas}, but "
                         f"{group.world} processes train")
    return True


def _shard_batch_sampler_loader(loader: DataLoader, group: Group, seed: int) -> DataLoader:
    """A ``DataLoader(dataset, batch_sampler=...)``: torch's ``BatchSampler`` over a random or
    sequential sampler is rebuilt over a ``DistributedSampler`` with its batch size and drop_last;
    over a distributed sampler it is kept; any other batch sampler cannot be split (ValueError:
    every rank would go through the whole dataset)."""
    batches = loader.batch_sampler
    inner = getattr(batches, "sampler", None)
    if type(batches) is BatchSampler:
        if _already_split(inner, group):
            return loader
        if type(inner) in (RandomSampler, SequentialSampler):
            sampler = DistributedSampler(loader.dataset, num_replicas=group.world, rank=group.rank,
                                         shuffle=type(inner) is RandomSampler, seed=seed)
            return _rebuild(loader, sampler, batch_size=batches.batch_size, drop_last=batches.drop_last)
    raise ValueError(f"Finetuner: train_loader's batch_sampler {type(batches).__name__} (over "
                     f"{type(inner).__name__}) cannot be split over {group.world} processes; use batch_size= with "
                     "shuffle=True/False, or a batch sampler over a DistributedSampler")


class _Strided(Sampler):
    """Indices ``rank, rank + world, ...`` below ``n``: the ranks share ``range(n)`` without padding."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def shard_eval_loader(loader: Any, group: Group) -> Optional[DataLoader]:
    """This rank's part of an evaluation loader: every example once over all ranks; None when the
    loader cannot be split (then every rank evaluates all of it)."""
    if not _map_style(loader) or type(_sampler_of(loader)) not in (RandomSampler, SequentialSampler,
                                                                    DistributedSampler):
        return None
    return _rebuild(loader, _Strided(len(loader.dataset), group.rank, group.world))


def leave(timeout_s: float = 120.0) -> None:
    """Leave the process group that :func:`init_from_env` joined: wait for every rank (so that no
    rank tears down its connections while another still talks on them, which can abort the
    other's process at exit), then destroy the group. A rank that does not arrive within
    ``timeout_s`` (it failed) does not keep the others waiting longer than that."""
    if not dist.is_initialized():
        return
    try:
        group = _CPU_GROUP[1] if _CPU_GROUP[0] is dist.group.WORLD else None
        if dist.get_backend(group) == "gloo":
            dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except RuntimeError:
        pass  # another rank failed or left: nothing left to wait for
    finally:
        dist.destroy_process_group()
        _CPU_GROUP[:] = [None, None]


def init_from_env(device: torch.device) -> Optional[torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1,
    ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL for a CUDA ``device`` (this
    rank's GPU is ``cuda:LOCAL_RANK``, made the current device), gloo otherwise. Returns this
    rank's device, or None when the environment asks for one process (or the group exists already)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or dist.is_initialized():
        return None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend)
    except (ValueError, RuntimeError) as e:  # no MASTER_ADDR, an unreachable rendezvous ...
        raise RuntimeError(f"could not join the process group of WORLD_SIZE={os.environ['WORLD_SIZE']} "
                           f"({backend}): {e}; launch with torchrun --nproc_per_node N") from None
    if backend != "gloo":
        # The gloo twin now, at a point every rank reaches: leave() then always has a barrier
        # with a time limit, even when a rank fails before its first Finetuner.
        _cpu_group()
    return device
