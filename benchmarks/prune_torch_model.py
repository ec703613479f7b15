"""A whole model pruned with torch.nn.utils.prune, then adopted and sparsified by pyfinetune: inference
time of the same weights three ways, interleaved in one run.

    python benchmarks/prune_torch_model.py                     # torchvision vit_b_16 (random weights), 90%
    python benchmarks/prune_torch_model.py --sparsity 0.7 --batch 4 --reps 10

The model: torchvision's ``vit_b_16`` (randomly initialized: nothing is downloaded), eval mode. Its
24 MLP ``nn.Linear`` layers (768 -> 3072 -> 768 in each of the 12 blocks; 57M of its 86M weights)
are pruned with ``torch.nn.utils.prune.global_unstructured`` (L1) to ``--sparsity`` over all of
them; the attention (``nn.MultiheadAttention``), the patch embedding and the head stay dense.
Contenders, each its own copy of the same pruned weights, ``torch.no_grad()``, round-robin:

* ``dense (pruned weights baked in)``: ``torch.nn.utils.prune.remove`` on every layer: plain
  ``nn.Linear`` layers holding zeros, what a user exports;
* ``torch.nn.utils.prune``: the pruned model as torch leaves it (a forward pre-hook multiplies
  each weight by its mask at every call);
* ``pyfinetune sparsify``: ``pyfinetune.prune.sparsify`` (which adopts torch's masks) turns the
  24 layers into ``SparseLinear``.

All three are checked to give the same logits (float32 tolerance) before timing. Results:
``benchmarks/results/prune-model-<device>-<stamp>.{json,md}``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.utils.prune as torch_prune  # noqa: E402

import pyfinetune  # noqa: E402,F401
from pyfinetune import prune  # noqa: E402
from pyfinetune.benchmarks import common  # noqa: E402


def mlp_layers(model):
    return [m for name, m in model.named_modules() if type(m) is torch.nn.Linear and ".mlp." in name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=8, help="images per forward (default 8: 1576 tokens)")
    common.add_run_options(ap, default_reps=10, repeat_what="the comparison")
    args = ap.parse_args(argv)
    device, reps, warmup = common.resolve_run_options(ap, args, default_reps=10)
    if not 0.0 <= args.sparsity < 1.0:
        ap.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    import torchvision

    def build():
        # Built and pruned afresh for each contender (the same seed: the same weights and masks): a
        # module pruned by torch cannot be deep-copied (its weight is a computed, non-leaf tensor).
        torch.manual_seed(0)
        m = torchvision.models.vit_b_16().eval().to(device)
        torch_prune.global_unstructured([(layer, "weight") for layer in mlp_layers(m)],
                                        pruning_method=torch_prune.L1Unstructured, amount=args.sparsity)
        return m

    model, baked = build(), build()
    for m in mlp_layers(baked):
        torch_prune.remove(m, "weight")
    ours = prune.sparsify(build())
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    models = {"dense (pruned weights baked in)": baked, "torch.nn.utils.prune": model, "pyfinetune sparsify": ours}
    with torch.no_grad():
        ref = baked(x)
        for name, m in models.items():
            err = (m(x) - ref).abs().max().item()
            if not err <= 1e-3 * max(1.0, ref.abs().max().item()):
                raise RuntimeError(f"{name} differs from the dense model by {err:.3g}; not timing it")
        contenders = [common.Contender(name, (lambda m=m: m(x))) for name, m in models.items()]
        for attempt in range(1, args.attempts + 1):  # again while other processes disturb it (CPU)
            if device.type == "cpu":
                common.wait_for_quiet()
            with common.CpuContention() as load:
                timings = common.time_interleaved(contenders, reps=reps, warmup=warmup, device=device)
            if device.type != "cpu" or not common.is_contended(load.result):
                break
    pruned = sum(int((m.weight == 0).sum()) for m in mlp_layers(baked))
    total = sum(m.weight.numel() for m in mlp_layers(baked))
    stamp, when = common.timestamp()
    machine = common.machine_info(device)
    dense = timings["dense (pruned weights baked in)"]
    rows = [[n, common.fmt(t.median), common.fmt(t.p20), common.fmt(t.p80),
             f"{common.paired_ratio(dense, t)['value']:.2f}x"] for n, t in timings.items()]
    md = [f"# vit_b_16 pruned with torch.nn.utils.prune: inference ({device.type}, {when})", "",
          common.machine_summary(machine), "",
          f"{args.batch} images 224 x 224 per forward, torch.no_grad(); the 24 MLP layers pruned to "
          f"{pruned / total:.1%} together ({pruned:,} of {total:,} weights, global L1); {reps} timed rounds after "
          f"{warmup} warm-up rounds, interleaved" + (" QUICK RUN: not a record." if args.quick else ""), "",
          common.markdown_table(["model", "median ms", "p20 ms", "p80 ms", "speed vs dense"], rows), "",
          f"pyfinetune sparsify vs torch.nn.utils.prune: "
          f"{common.paired_ratio(timings['torch.nn.utils.prune'], timings['pyfinetune sparsify'])['value']:.2f}x.", ""]
    if load.result.get("other_share") is not None:
        md.append(f"Other processes used {100 * load.result['other_share']:.1f}% of the CPUs meanwhile"
                  + (" (**not quiet: do not trust these numbers**)." if common.is_contended(load.result) else "."))
    record = {"benchmark": "prune-model", "device": device.type, "when": when, "machine": machine,
              "config": {"model": "vit_b_16", "batch": args.batch, "sparsity": args.sparsity, "reps": reps,
                         "warmup": warmup, "quick": args.quick},
              "pruned_weights": pruned, "mlp_weights": total, "contention": load.result,
              "timings": {n: t.summary() for n, t in timings.items()}}
    common.publish("prune-model", device, record, "\n".join(md), args.out, stamp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
