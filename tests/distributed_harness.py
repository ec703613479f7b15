"""The training runs of tests/test_distributed.py, written once for both sides of each comparison:
a rank of a 2-process gloo group (DDP or FSDP2, each rank on its half of the global batch) and a
single process on the whole global batch (the reference, run by pytest itself).

Run as a script, this file is one rank: ``python distributed_harness.py RANK WORLD STORE OUT``
joins the gloo group through the file store ``STORE``, runs every scenario of ``SCENARIOS`` and
saves their results (plain tensors) to ``OUT/rank<RANK>.pt``. An exception saves its traceback
there instead and ends the process with status 1 at once: the other rank may be waiting in a
collective, and the test kills it rather than letting it wait for gloo's timeout.

:func:`run_ranks` (the test side) and :func:`rank_main` (the rank side) serve any such script:
tests/finetune_ranks.py runs pyfinetune.Finetuner's scenarios the same way.
"""

from __future__ import annotations

import copy
import datetime
import io
import os
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.nn import functional as F

import pyfinetune
from pyfinetune import prune
from pyfinetune.losses import kd_loss
from pyfinetune.optim import SGD, AdamW

GLOBAL_BATCH = 8
STEPS, SPLIT = 6, 3           # FSDP2 resume: a checkpoint after SPLIT steps, continued to STEPS
D_IN, HIDDEN, CLASSES = 12, 9, 5  # odd sizes: FSDP2 shards them unevenly over 2 ranks


class Run:
    """Where a scenario runs: rank ``rank`` of ``world`` processes (``distributed``), or alone."""

    def __init__(self, rank: int = 0, world: int = 1, distributed: bool = False, out: str = ""):
        self.rank, self.world, self.distributed, self.out = rank, world, distributed, out

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch."""
        return t.chunk(self.world)[self.rank]

    def mean(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss of the global batch: the mean of the ranks' losses (equal local batch sizes)."""
        loss = loss.detach().clone()
        if self.distributed:
            dist.all_reduce(loss)
            loss /= self.world
        return loss


def batch(step: int):
    """The global batch of a step (inputs [8, D_IN], labels [8]), the same in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, D_IN, generator=g), torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g)


def mlp(seed: int, sizes=(D_IN, HIDDEN, CLASSES)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def near(tensors, seed: int, scale: float = 0.1) -> List[torch.Tensor]:
    """'Pretrained' weights for explicit anchors: the tensors plus seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return [t.detach() + scale * torch.randn(t.shape, generator=g) for t in tensors]


def cross_entropy(net, x, labels):
    return F.cross_entropy(net(x), labels)


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain copy of ``t``; a DTensor is gathered first."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(run: Run, model: nn.Module, opt, loss_fn: Callable = cross_entropy, steps=range(STEPS),
          after_step: Optional[Callable[[], Any]] = None, wrap: bool = True) -> Dict[str, Any]:
    """``steps`` training steps on this run's part of each global batch; DDP wraps ``model`` when
    ``run`` is distributed and ``wrap``. Returns the global losses and the (full) parameters."""
    net = nn.parallel.DistributedDataParallel(model) if run.distributed and wrap else model
    losses = []
    for step in steps:
        x, labels = batch(step)
        loss = loss_fn(net, run.shard(x), run.shard(labels))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step()
        losses.append(run.mean(loss))
    return {"losses": torch.stack(losses), "params": {n: full(p) for n, p in model.named_parameters()},
            "plan": opt._plan is not None}


# ------------------------------------------------------------------------------------- DDP
def ddp_adamw(run: Run) -> Dict[str, Any]:
    model = mlp(0)
    opt = AdamW([{"params": list(model[0].parameters()), "l2sp": 0.5, "anchor": near(model[0].parameters(), 1)},
                 {"params": [model[2].weight], "l2sp": 0.2, "l1": 1e-3},
                 {"params": [model[2].bias], "weight_decay": 0.0}], lr=1e-2, weight_decay=0.01)
    return train(run, model, opt)


def ddp_sgd(run: Run) -> Dict[str, Any]:
    model = mlp(0)
    opt = SGD([{"params": list(model[0].parameters()), "l2sp": 0.5, "penalty_mode": "decoupled"},
               {"params": list(model[2].parameters()), "l2sp": 0.2, "l1": 1e-3}],
              lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.01)
    return train(run, model, opt)


def ddp_kd(run: Run) -> Dict[str, Any]:
    student, teacher = mlp(0), mlp(5, (D_IN, 16, CLASSES))

    def loss_fn(net, x, labels):
        with torch.no_grad():
            teacher_logits = teacher(x)
        return kd_loss(net(x), teacher_logits, labels, temperature=2.0, alpha=0.5)

    opt = AdamW(student.parameters(), lr=1e-2, l2sp=0.1, weight_decay=0.01)
    return train(run, student, opt, loss_fn)


def ddp_pruned(run: Run) -> Dict[str, Any]:
    """Magnitude pruning, then a GradualPruner raising the sparsity during training; the masks
    reach the optimizer through mask_optimizer."""
    model = mlp(0)
    prune.magnitude_prune(model, 0.3, exclude=None)  # every layer, the classifier too
    pruner = prune.GradualPruner(model, 0.6, start_step=1, end_step=5, every=2, exclude=None)
    opt = AdamW(model.parameters(), lr=1e-2, l2sp=0.1, weight_decay=0.01)
    prune.mask_optimizer(opt, model)
    out = train(run, model, opt, after_step=pruner.step)
    out["masks"] = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_mask")}
    return out


def ddp_sparse(run: Run) -> Dict[str, Any]:
    """SparseLinear layers (kept values trainable, pattern fixed) from a pruned model."""
    model = mlp(0)
    prune.magnitude_prune(model, 0.6, exclude=None)
    model = prune.sparsify(model)
    assert all(isinstance(model[i], prune.SparseLinear) for i in (0, 2))
    opt = AdamW(model.parameters(), lr=1e-2, l2sp=0.1, weight_decay=0.01)
    return train(run, model, opt)


# ------------------------------------------------------------------------------------ FSDP2
FSDP_SIZES = (D_IN, HIDDEN, 7, 1)  # the last Linear has one output: rank 1 holds empty shards


def mse(net, x, labels):
    return F.mse_loss(net(x).squeeze(-1), labels.float() / CLASSES)


def fsdp_model(run: Run, seed: int) -> nn.Sequential:
    """An MLP, with fully_shard on each Linear and on the root when ``run`` is distributed."""
    model = mlp(seed, FSDP_SIZES)
    if run.distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (run.world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def fsdp_optimizer(kind: str, model: nn.Sequential, pretrained: List[torch.Tensor]):
    """Layer 0 anchored at its weights ("init"), layer 2 at explicit full (plain) tensors with a
    full mask on its weight, the last layer without anchor."""
    groups = [{"params": list(model[0].parameters()), "l2sp": 0.5},
              {"params": list(model[2].parameters()), "l2sp": 0.3, "anchor": pretrained, "l1": 1e-3},
              {"params": list(model[4].parameters()), "weight_decay": 0.0}]
    if kind == "adamw":
        opt = AdamW(groups, lr=1e-2, weight_decay=0.01)
    else:
        opt = SGD(groups, lr=5e-2, momentum=0.9, weight_decay=0.01)
    mask = torch.rand(model[2].weight.shape, generator=torch.Generator().manual_seed(11)) > 0.3
    opt.set_mask(model[2].weight, mask)
    return opt


def fsdp_train(run: Run, kind: str) -> Dict[str, Any]:
    """FSDP2 (or one process) with pyfinetune's optimizer. Distributed, it also resumes from the
    checkpoint of step SPLIT twice (each rank's own state_dict through torch.save, and
    torch.distributed.checkpoint's full state dict) and records the anchors' local shards."""
    model = fsdp_model(run, 0)
    pretrained = near([full(p) for p in model[2].parameters()], 2)
    initial_local = {n: (p.to_local() if run.distributed else p).detach().clone() for n, p in model.named_parameters()}
    opt = fsdp_optimizer(kind, model, pretrained)
    out = train(run, model, opt, mse, steps=range(SPLIT), wrap=False)
    anchors = {n: opt.anchor_of(p) for n, p in model.named_parameters() if opt.anchor_of(p) is not None}
    out["anchors"] = {n: full(a) for n, a in anchors.items()}
    if run.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        out["anchors_local"] = {n: a.to_local().clone() for n, a in anchors.items()}
        # The slicing that torch 2.6 (no src_data_rank) uses for a full anchor or mask gives each
        # rank the piece distribute_tensor gives (here on a torch that has both, else itself).
        from pyfinetune.optim import _cut_piece, _this_ranks_piece

        out["cut_pieces"] = {n: (_cut_piece(full(p), p), _this_ranks_piece(full(p), p))
                             for n, p in model.named_parameters()}
        out["initial_local"] = initial_local
        out["mask_local"] = opt.get_mask(model[2].weight).to_local().clone()
        model_state = copy.deepcopy(model.state_dict())
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        # A copy: the state dict shares the 'step' tensors, which the next steps increment.
        full_state = copy.deepcopy(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True)))
        checkpoint_dir = os.path.join(run.out, f"dcp_{kind}")
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=checkpoint_dir)
        out["full_state_is_plain"] = all(not hasattr(v, "to_local") for s in full_state["state"].values()
                                         for v in s.values())
    rest = train(run, model, opt, mse, steps=range(SPLIT, STEPS), wrap=False)
    out["losses"] = torch.cat([out["losses"], rest["losses"]])
    out["params"], out["plan"] = rest["params"], rest["plan"]
    if run.distributed:
        out["resumed"] = {"state_dict": resume(run, kind, model_state, lambda opt2, model2: opt2.load_state_dict(
            torch.load(io.BytesIO(buf.getvalue()), weights_only=False)))}
        out["resumed"]["dcp_full"] = resume(run, kind, model_state, lambda opt2, model2: set_full(model2, opt2, full_state))
        out["resumed"]["dcp_sharded"] = resume(run, kind, model_state,
                                               lambda opt2, model2: load_dcp(model2, opt2, checkpoint_dir), keep_mask=True)
        out["errors"] = sharded_errors(model)
    return out


def set_full(model, opt, full_state) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, full_state, options=StateDictOptions(full_state_dict=True))


def load_dcp(model, opt, checkpoint_dir: str) -> None:
    """torch.distributed.checkpoint's recipe: the optimizer's own (sharded) state dict is the
    template that dcp.load fills in place."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_optimizer_state_dict(model, opt, state["optim"])


def resume(run: Run, kind: str, model_state, load: Callable, keep_mask: bool = False) -> Dict[str, torch.Tensor]:
    """A fresh sharded model and optimizer (other weights, so anchors "init" differ) load the
    checkpoint of step SPLIT and train to STEPS: the final full parameters. Without ``keep_mask``
    the fresh optimizer has no mask: it must come from the checkpoint (torch.distributed.checkpoint
    loads only what the optimizer's own state dict holds, so keep it for those)."""
    model = fsdp_model(run, 1)
    model.load_state_dict(model_state)
    opt = fsdp_optimizer(kind, model, near([full(p) for p in model[2].parameters()], 3))
    if not keep_mask:
        opt.set_mask(model[2].weight, None)
    load(opt, model)
    return train(run, model, opt, mse, steps=range(SPLIT, STEPS), wrap=False)["params"]


def sharded_errors(model: nn.Sequential) -> Dict[str, str]:
    """The messages of the cases pyfinetune.optim and pyfinetune.prune reject on DTensor parameters
    (no collectives)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    weight = model[0].weight
    mesh = weight.device_mesh
    cases = {
        "anchor_local_shape": lambda: AdamW([weight], l2sp=0.1, anchor=[weight.to_local().detach().clone()]),
        "anchor_other_placement": lambda: AdamW([weight], l2sp=0.1, anchor=[DTensor.from_local(
            torch.zeros(weight.shape), mesh, [Replicate()], run_check=False)]),
        "partial_param": lambda: AdamW([nn.Parameter(DTensor.from_local(torch.zeros(3), mesh, [Partial()],
                                                                        run_check=False))]),
        "mask_other_placement": lambda: AdamW([weight]).set_mask(weight, DTensor.from_local(
            torch.ones(weight.shape, dtype=torch.bool), mesh, [Replicate()], run_check=False)),
    }

    def wrong_grad(grad):
        opt = AdamW([weight], lr=1e-2)
        weight.grad = grad
        try:
            opt.step()
        finally:
            weight.grad = None

    cases["grad_replicated"] = lambda: wrong_grad(DTensor.from_local(torch.zeros(weight.shape), mesh, [Replicate()],
                                                                     run_check=False))
    cases["grad_plain"] = lambda: wrong_grad(torch.zeros(weight.shape))

    def prune_after_shard():
        # Pruned (masked layers kept), then sharded, then pruned again: each rank holds a piece of
        # the weight; the advice, not torch's DTensor error from deep inside the threshold.
        from torch.distributed.fsdp import fully_shard

        net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
        prune.magnitude_prune(net, 0.5, exclude=None)
        for layer in net:
            fully_shard(layer, mesh=mesh)
        prune.magnitude_prune(net, 0.7, exclude=None)

    cases["prune_after_shard"] = prune_after_shard
    messages = {}
    for name, case in cases.items():
        try:
            case()
            messages[name] = "no error"
        except Exception as e:  # noqa: BLE001 (the test checks type and message)
            messages[name] = f"{type(e).__name__}: {e}"
    return messages


def fsdp_adamw(run: Run) -> Dict[str, Any]:
    return fsdp_train(run, "adamw")


def fsdp_sgd(run: Run) -> Dict[str, Any]:
    return fsdp_train(run, "sgd")


def fsdp_gradient_average(run: Run) -> Dict[str, Any]:
    """Whether this torch's FSDP2 averages the ranks' gradients on gloo, as it does on NCCL: torch
    2.8's sums them on gloo, so gradients come out ``world`` times too large whatever the
    optimizer (pytorch/pytorch#162338). A bias-free Linear(2, 1) of ones; rank r's loss is the sum
    of its output on a row of (r + 1)s, so the averaged weight gradient is the mean of 1 .. world."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    fully_shard(layer, mesh=init_device_mesh("cpu", (run.world,)))
    layer(torch.full((1, 2), float(run.rank + 1))).sum().backward()
    grad = layer.weight.grad.full_tensor()
    return {"grad": grad.clone(), "averages": bool(torch.equal(grad, torch.full_like(grad, (run.world + 1) / 2)))}


def _has_fsdp2() -> bool:
    """FSDP2 on the CPU, as these ranks run it."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:  # torch 2.4 (torch.distributed._composable.fsdp only)
        return False
    # torch 2.6's FSDP2 records events on the device's stream, which the CPU's could not.
    return hasattr(torch.cpu.Stream, "record_event")


HAS_FSDP2 = _has_fsdp2()
SCENARIOS: Dict[str, Callable[[Run], Dict[str, Any]]] = {
    "ddp_adamw": ddp_adamw, "ddp_sgd": ddp_sgd, "ddp_kd": ddp_kd, "ddp_pruned": ddp_pruned, "ddp_sparse": ddp_sparse,
    **({"fsdp_average": fsdp_gradient_average, "fsdp_adamw": fsdp_adamw, "fsdp_sgd": fsdp_sgd} if HAS_FSDP2 else {}),
}


def rank_main(argv: List[str], scenarios: Dict[str, Callable[[Run], Dict[str, Any]]]) -> None:
    """One rank: ``argv`` is ``RANK WORLD STORE OUT``; runs ``scenarios`` in order, saves their
    results (or the traceback of the first failure) to ``OUT/rank<RANK>.pt`` and exits."""
    rank, world, store, out = int(argv[0]), int(argv[1]), argv[2], argv[3]
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    path = os.path.join(out, f"rank{rank}.pt")
    results: Dict[str, Any] = {"pyfinetune": pyfinetune.__file__}
    name = None
    try:
        for name, scenario in scenarios.items():
            results[name] = scenario(Run(rank, world, distributed=True, out=out))
    except BaseException:
        tb = traceback.format_exc()
        sys.stderr.write(f"rank {rank}, scenario {name}:\n{tb}")
        sys.stderr.flush()
        torch.save({"error": f"rank {rank}, scenario {name}:\n{tb}"}, path)
        os._exit(1)
    torch.save(results, path)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # the interpreter's teardown of gloo's threads sometimes aborts (see test_hf.py)


# ------------------------------------------------------------------------------ test side
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _launch(script: str, world: int, out) -> list:
    """Start the ranks; their output goes to files (a full pipe would block them)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, TESTS] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    procs = []
    for rank in range(world):
        log = open(os.path.join(out, f"rank{rank}.log"), "w")
        procs.append((subprocess.Popen([sys.executable, script, str(rank), str(world), os.path.join(out, "store"),
                                        str(out)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(out)), log))
    return procs


def _wait(procs, timeout_s: float) -> str:
    """Wait for all ranks; when one fails (or time runs out) stop the others, which would wait in
    a collective. Returns "" on success, else what went wrong."""
    deadline = time.monotonic() + timeout_s
    problem = ""
    while any(p.poll() is None for p, _ in procs):
        failed = [i for i, (p, _) in enumerate(procs) if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            problem = f"rank(s) {failed} failed" if failed else f"timed out after {timeout_s} s"
            time.sleep(1.0 if failed else 0.0)  # let the others finish writing their reports
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    for p, log in procs:
        p.wait()
        log.close()
    if not problem and any(p.returncode != 0 for p, _ in procs):
        problem = f"exit codes {[p.returncode for p, _ in procs]}"
    return problem


def run_ranks(script: str, out, world: int = 2, timeout_s: float = 240) -> List[Dict[str, Any]]:
    """Run ``script`` (a file whose ``__main__`` calls :func:`rank_main`) as ``world`` gloo ranks
    in the folder ``out``; returns each rank's results, ``[rank0, rank1, ...]``. A failure (or the
    timeout) fails the calling test with the tail of every rank's log."""
    import pytest

    problem = _wait(_launch(script, world, out), timeout_s)
    results = []
    for rank in range(world):
        path = os.path.join(out, f"rank{rank}.pt")
        results.append(torch.load(path, weights_only=False) if os.path.exists(path) else {"error": "no results"})
    if problem or any("error" in r for r in results):
        logs = "\n".join(f"--- rank {r} log (tail) ---\n{open(os.path.join(out, f'rank{r}.log')).read()[-4000:]}"
                         for r in range(world))
        pytest.fail(f"the distributed ranks did not finish: {problem}\n{logs}", pytrace=False)
    assert results[0]["pyfinetune"].startswith(ROOT), results[0]["pyfinetune"]  # the ranks ran this checkout
    return results


if __name__ == "__main__":
    rank_main(sys.argv[1:], SCENARIOS)
