"""The ``pyfinetune`` command line.

``pyfinetune info``      versions, compiled CPU/CUDA support and the kernels of every op.
``pyfinetune finetune``  fine-tune a classifier on an image folder (``pyfinetune/_finetune_cli.py``).
``pyfinetune bench``     time pyfinetune's ops against their strongest torch baselines on this machine
                         (``pyfinetune/benchmarks/suite.py``).
``pyfinetune calibrate`` measure SparseLinear's dense/sparse crossover here (``pyfinetune/_crossover.py``).
``pyfinetune demo``      transfer learning on scikit-learn's bundled digits, every method (``pyfinetune/demo.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import pyfinetune

    info = pyfinetune.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    archs = ", ".join(info["cuda_archs"]) if info["cuda_built"] else "none (built without CUDA kernels)"
    gpu = info["gpu"] or ("none visible" if torch.version.cuda else "none (CPU-only torch)")
    print(f"pyfinetune   {info['pyfinetune']}")
    print(f"torch        {info['torch_running']} (built against {info['torch_built']})")
    print(f"CUDA kernels {'yes' if info['cuda_built'] else 'no'}; nvcc {info['nvcc_version'] or '-'}; archs: {archs}"
          + (f"; optimizer launch arguments {info['optimizer_launch_arg_bytes']} B"
             if info["optimizer_launch_arg_bytes"] else ""))
    prefetch = info["optimizer_cpu_prefetch"]
    prefetch = {True: "on", False: "off"}.get(prefetch, f"invalid setting: {prefetch}")
    print(f"CPU kernels  vector ISA {info['cpu_isa']}; {info['cpu_threads']} threads; "
          f"optimizer software prefetch {prefetch} (PYFINETUNE_CPU_PREFETCH)")
    print(f"GPU          {gpu}")
    crossover = info["sparse_linear_crossover"]
    if "error" in crossover:
        print(f"SparseLinear kernel='auto': invalid setting: {crossover['error']}")
    from ._sparse_linear import crossover_key

    env_keys = set(info.get("sparse_crossover_env") or ())
    for device, by_dtype in ({} if "error" in crossover else crossover).items():
        # The variable's entries this device's layers read: "cuda=0.5" says nothing of the CPU's.
        read = {crossover_key(device, getattr(torch, dt)) for dt in by_dtype}
        print(f"SparseLinear kernel='auto' on {device}: sparse "
              + ", ".join(("never" if v > 1 else f"from {v:.0%}") + f" ({dt})" for dt, v in by_dtype.items())
              + (f" (PYFINETUNE_SPARSE_CROSSOVER applied: {', '.join(sorted(read & env_keys))})" if read & env_keys
                 else " (defaults; measure this machine's: pyfinetune calibrate)")
              + ("; inference calls of up to 32 rows (8 in 16 bits): sparse at any sparsity" if device == "cpu" else ""))
    pool = info["dense_pool"]
    limit = (f"up to {pool['idle_limit_bytes'] / 2**20:.0f} MB idle" if pool["idle_limit_bytes"] is not None
             else f"invalid limit: {pool['error']}")
    print(f"CPU buffer pool (SparseLinear dense path, kd_loss gradients): {limit} (PYFINETUNE_DENSE_POOL_MB), "
          f"{pool['idle_bytes'] / 2**20:.1f} MB now")
    print("ops:")
    width = max(len(op) for op in info["kernels"])
    for op, devices in info["kernels"].items():
        print(f"  torch.ops.pyfinetune.{op:<{width}}  {', '.join(devices) or 'no kernels!'}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ._finetune_cli import run

    return run(args)


def _add_finetune_parser(sub) -> None:
    from ._finetune_cli import add_arguments

    p = sub.add_parser(
        "finetune", help="fine-tune a classifier on an image folder (baseline, l2sp, distill, prune)",
        description="Fine-tune a torchvision (or your own) classifier on an ImageFolder tree with "
                    "pyfinetune.Finetuner: checkpoints every epoch, --resume, model.pt, metrics.json, training.png.")
    add_arguments(p)
    p.set_defaults(func=_cmd_finetune)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import suite

    return suite.main(op=args.op, quick=args.quick, device=args.device, threads=args.threads, out=args.out)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time pyfinetune's ops against their strongest torch baselines here")
    p.add_argument("--op", choices=("optim", "distill", "prune", "all"), default="all", help="default: all")
    p.add_argument("--quick", action="store_true", help="small shapes, few rounds, no torch.compile (< 1 min)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if torch sees a GPU, else cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--out", metavar="DIR", help="results folder (default: benchmarks/results in a clone, "
                                                "else ./pyfinetune-bench)")
    p.set_defaults(func=_cmd_bench)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from ._crossover import DEFAULT_SPARSITIES, calibrate_crossover
    from ._info import settings_errors

    errors = settings_errors()
    if errors:
        print(f"pyfinetune calibrate: {'; '.join(errors)}", file=sys.stderr)
        return 2
    try:
        cal = calibrate_crossover(args.device, getattr(torch, args.dtype), batch=args.batch,
                                  in_features=args.in_features, out_features=args.out_features, mode=args.mode,
                                  sparsities=args.sparsity or DEFAULT_SPARSITIES, reps=args.reps, apply=False)
    except ValueError as e:
        print(f"pyfinetune calibrate: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as e:  # the allocator: a layer too large for this machine
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower() and "out of memory" not in str(e).lower():
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"pyfinetune calibrate: {first} (--batch {args.batch}, --in-features {args.in_features}, "
              f"--out-features {args.out_features})", file=sys.stderr)
        return 2
    print(cal)
    if args.dtype in ("bfloat16", "float16") and cal.key == cal.device.split(":")[0]:
        print(f"note: on this {cal.key.upper()} {args.dtype} layers share the entry {cal.key!r} with float32 layers "
              "(no 16-bit matrix units): the value below applies to both")
    from ._sparse_linear import SMALL_BATCH_ROWS

    small = SMALL_BATCH_ROWS.get((cal.device.split(":")[0], cal.dtype.itemsize >= 4))
    if args.mode == "inference" and small is not None and args.batch <= small:
        # kernel_for: such calls never read the crossover, so the value measured here does not decide them.
        print(f"note: SparseLinear(kernel='auto') runs inference calls of up to {small} rows on the "
              f"{cal.key.split('-')[0].upper()} with the sparse kernel at any sparsity: the setting below only "
              f"decides larger batches and training calls (measure those: --batch {small + 1} or more, or --mode train)")
    if cal.crossover <= 1.0:
        print(f"to use it: export PYFINETUNE_SPARSE_CROSSOVER={cal.key}={cal.crossover:.3f}  "
              f"(or pyfinetune.prune.CROSSOVER_SPARSITY[{cal.key!r}] = {cal.crossover:.3f})")
    else:
        print(f"the sparse kernel was not faster at any measured sparsity: to keep the dense path, "
              f"export PYFINETUNE_SPARSE_CROSSOVER={cal.key}=2")
    return 0


def _add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure SparseLinear's dense/sparse crossover sparsity on this machine",
                       description="Time SparseLinear's dense path and sparse kernel at your layer's shape across "
                                   "sparsities and print the crossover, and the setting that applies it.")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if torch sees a GPU, else cpu")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32")
    p.add_argument("--batch", type=int, default=256, help="rows of x (default 256)")
    p.add_argument("--in-features", type=int, default=4096, help="default 4096")
    p.add_argument("--out-features", type=int, default=4096, help="default 4096")
    p.add_argument("--mode", choices=("train", "inference"), default="train",
                   help="train: forward + backward (default); inference: forward only")
    p.add_argument("--sparsity", type=float, nargs="+", help="sparsities to measure (default 0.3 .. 0.99)")
    p.add_argument("--reps", type=int, default=10, help="timed rounds per sparsity (>= 10)")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo_report import format_table
    from .demo import run_demo

    try:
        results = run_demo(args.out, quick=args.quick, device=args.device)
    except (ValueError, ImportError) as e:
        print(f"pyfinetune demo: {e}", file=sys.stderr)
        return 2
    print()
    print(format_table(results))
    for check, verdict in results["outcome"].items():
        print(f"{'met    ' if verdict['passed'] else 'NOT MET'}  {check}: {verdict['detail']}")
    print(f"wrote {', '.join(results['files'])} to {args.out} ({results['wall_seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="pyfinetune", description="Fast fine-tuning kernels for PyTorch.")
    parser.add_argument("--version", action="version", version=f"pyfinetune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p_info = sub.add_parser("info", help="show versions, compiled kernels and visible GPUs")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_info.set_defaults(func=_cmd_info)
    _add_finetune_parser(sub)
    _add_bench_parser(sub)
    _add_calibrate_parser(sub)
    p_demo = sub.add_parser("demo", help="transfer learning on bundled digits with every method; table, report, plots",
                            description="Pretrain on digits 0-4, fine-tune on digits 5-9 with few labels (plain, L2-SP, "
                                        "distillation, 90 percent pruning), measure and report (needs pyfinetune[demo]).")
    p_demo.add_argument("--out", default="pyfinetune-demo", help="output folder (default: ./pyfinetune-demo)")
    p_demo.add_argument("--quick", action="store_true", help="fewer epochs and timing runs (under a minute)")
    p_demo.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train (default: cpu)")
    p_demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, not at the interpreter's exit, where a closed pipe cannot be handled
        return status
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket (a data loader's worker, a child process): a real error
        # The reader went away (`pyfinetune info | head`): stop quietly, as a shell tool does. Output
        # still buffered for the closed pipe goes to /dev/null so that the interpreter's final flush
        # does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end is closed (poll reports an error on
    it). Where that cannot be asked (no poll, no file descriptor), True: a BrokenPipeError then
    most likely came from printing."""
    try:
        import select

        fd = sys.stdout.fileno()
        poller = select.poll()
    except (AttributeError, OSError, ValueError, ImportError):  # no poll (Windows), stdout not a file
        return True
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())
