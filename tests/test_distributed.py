"""Distributed training on 2 gloo ranks (CPU): DDP with pyfinetune's optimizers, kd_loss and pruned
/ sparse layers, and FSDP2 (fully_shard) with pyfinetune's optimizers on DTensor shards.

The ranks run once per session (``ranks`` fixture; the runs are in distributed_harness.py) and
each test compares their results with a single-process run of the same code on the same global
batch, computed here.

Tolerance of the single-process comparison: each rank's gradient is the mean over its 4 rows, and
the ranks average those (DDP's all-reduce, FSDP2's reduce-scatter), where one process sums all 8
rows at once: the same gradient summed in another order, a few float32 ulps (~1e-7 relative)
apart. The optimizer steps carry that difference (Adam's m / sqrt(v) can grow it where v is
small); after 6 steps we see at most 3e-8 absolute / 3e-6 relative on parameters of size ~0.3
(relative errors that large only on entries near zero). rtol 2e-5 / atol 3e-7 is ~10x that. The
ranks' parameters must be equal bit for bit: all of them apply the same reduced gradient.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.distributed as dist

import distributed_harness as harness

WORLD = 2
TIMEOUT_S = 240  # the two ranks take ~15 s on 2 busy cores
TOL = dict(rtol=2e-5, atol=3e-7)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The results of every scenario on each rank: ``[rank0, rank1]``, dicts by scenario name."""
    return harness.run_ranks(os.path.join(harness.TESTS, "distributed_harness.py"), tmp_path_factory.mktemp("distributed"),
                             WORLD, TIMEOUT_S)


def _reference(name):
    return harness.SCENARIOS[name](harness.Run())


def _assert_ranks_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what} {k} differs between the ranks"


def _assert_matches(dist_run: dict, ref: dict) -> None:
    torch.testing.assert_close(dist_run["losses"], ref["losses"], **TOL)
    assert dist_run["params"].keys() == ref["params"].keys()
    for k, v in ref["params"].items():
        torch.testing.assert_close(dist_run["params"][k], v, **TOL, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", ["ddp_adamw", "ddp_sgd", "ddp_kd", "ddp_pruned", "ddp_sparse"])
def test_ddp_equals_one_process(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    _assert_ranks_equal(r0["params"], r1["params"], "parameter")
    assert torch.equal(r0["losses"], r1["losses"])
    ref = _reference(name)
    _assert_matches(r0, ref)
    assert r0["plan"] and ref["plan"]  # the steps after the first reused the step plan
    if "masks" in ref:  # GradualPruner chose the same weights everywhere
        _assert_ranks_equal(r0["masks"], r1["masks"], "mask")
        _assert_ranks_equal(r0["masks"], ref["masks"], "mask (vs one process)")
        assert sum(int((~m).sum()) for m in ref["masks"].values()) > 0


needs_fsdp2 = pytest.mark.skipif(not harness.HAS_FSDP2, reason=f"torch {torch.__version__} cannot run FSDP2 "
                                 "(torch.distributed.fsdp.fully_shard) on the CPU")


@needs_fsdp2
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fsdp2_equals_one_process(ranks, kind):
    average = ranks[0]["fsdp_average"]
    if not average["averages"]:  # the other FSDP2 tests do not depend on it and still run
        # (it passed on 2.10 to 2.14; a probe failing there would skip this test silently)
        assert torch.torch_version.TorchVersion(torch.__version__) < (2, 10), average
        pytest.skip(f"torch {torch.__version__}'s FSDP2 sums the ranks' gradients on gloo instead of averaging "
                    f"them (pytorch/pytorch#162338; probe gradient {average['grad'].tolist()}, "
                    f"{(WORLD + 1) / 2} expected)")
    name = f"fsdp_{kind}"
    r0, r1 = ranks[0][name], ranks[1][name]
    _assert_ranks_equal(r0["params"], r1["params"], "gathered parameter")
    ref = _reference(name)
    _assert_matches(r0, ref)
    assert r0["plan"] and r1["plan"]  # sharded buckets reuse the step plan too
    # The mask (set from a full plain tensor) kept the pruned weights at zero.
    mask = torch.rand(ref["params"]["2.weight"].shape, generator=torch.Generator().manual_seed(11)) > 0.3
    assert (r0["params"]["2.weight"][~mask] == 0).all()


@needs_fsdp2
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fsdp2_anchors_are_shards_of_the_initial_weights(ranks, kind):
    name = f"fsdp_{kind}"
    ref = _reference(name)
    for rank, result in enumerate(ranks):
        r = result[name]
        # Gathered, the anchors are the single-process anchors: "init" for layer 0, the explicit
        # full tensors (sharded by the optimizer) for layer 2.
        _assert_ranks_equal(r["anchors"], ref["anchors"], f"rank {rank} anchor")
        for n, local in r["anchors_local"].items():
            pieces = ref["anchors"][n].chunk(WORLD)
            expected = pieces[rank] if rank < len(pieces) else ref["anchors"][n][:0]
            assert torch.equal(local, expected), f"rank {rank}: anchor shard of {n}"
            if n.startswith("0."):
                assert torch.equal(local, r["initial_local"][n]), f"rank {rank}: {n} anchored at its initial shard"
        assert torch.equal(r["mask_local"], (torch.rand(ref["params"]["2.weight"].shape, generator=torch.Generator()
                                                        .manual_seed(11)) > 0.3).chunk(WORLD)[rank])
        for n, (cut, given) in r["cut_pieces"].items():
            assert torch.equal(cut, given) and cut.shape == given.shape, f"rank {rank}: the sliced piece of {n}"


@needs_fsdp2
@pytest.mark.parametrize("how", ["state_dict", "dcp_full", "dcp_sharded"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fsdp2_resume_equals_uninterrupted_run(ranks, kind, how):
    """Each rank's state_dict() through torch.save, torch.distributed.checkpoint's full state dict
    (plain tensors, which load_state_dict shards) and its sharded save / load: a fresh sharded
    optimizer (other anchors, and no mask for state_dict) continues bit for bit."""
    for rank, result in enumerate(ranks):
        r = result[f"fsdp_{kind}"]
        assert r["full_state_is_plain"]
        _assert_ranks_equal(r["resumed"][how], r["params"], f"rank {rank}: resumed ({how})")


@needs_fsdp2
def test_fsdp2_errors_name_the_problem(ranks):
    errors = ranks[0]["fsdp_adamw"]["errors"]
    expected = {
        "anchor_local_shape": r"^ValueError: anchor for parameter 0 \(param group 0\) must have the parameter's shape \(9, 12\)",
        "anchor_other_placement": r"^ValueError: anchor for parameter 0 .* placements \(Replicate\(\),\) .* the parameter's are \(Shard\(dim=0\),\)",
        "partial_param": r"^TypeError: parameter 0 \(param group 0\) is a DTensor with placements \(Partial\(sum\),\).*not Partial",
        "mask_other_placement": r"^ValueError: set_mask: mask is a DTensor with placements \(Replicate\(\),\)",
        "grad_replicated": r"^RuntimeError: the gradient of parameter 0 \(param group 0\) has placements \(Replicate\(\),\)",
        "grad_plain": r"^RuntimeError: the gradient of parameter 0 \(param group 0\) is a Tensor but the parameter is a DTensor",
        "prune_after_shard": r"^ValueError: layers \['0', '1'\] are sharded by FSDP2 \(fully_shard\); prune .*before fully_shard",
    }
    assert errors.keys() == expected.keys()
    for case, pattern in expected.items():
        assert re.search(pattern, errors[case]), f"{case}: {errors[case]}"
