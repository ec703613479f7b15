"""The instructions where a profiled kernel's warps were sampled most, from ncu's source page.

    python benchmarks/ncu_sass_top.py OUT/ncu/ncu_kd_sass.csv [--top 30] [--window 3]

``benchmarks/gpu_profile.sh`` writes ``ncu_WORKLOAD_sass.csv`` with ``ncu -i REPORT --page source
--print-source sass --csv``: one row per SASS instruction, with the warp stall samples that
SourceCounters collected. This prints the instructions holding the most samples (their share of all
samples, the columns of stall reasons that ncu gave for them, and ``--window`` instructions before
each, since a stall is billed to the instruction that waits, not to the load it waits for), and the
samples per opcode class (memory, exponential, arithmetic, synchronization, ...). Reads the file
only: runs anywhere, without a GPU or ncu.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict

SAMPLES = ("Warp Stall Sampling (All Samples)", "Warp Stall Sampling (All Cycles)", "stall_sampling")
CLASSES = (("memory: global", r"^(LDG|STG|LDGSTS|LDGDEPBAR|RED|ATOM)"),
           ("memory: shared / distributed", r"^(LDS|STS|LDSM|ATOMS|LD\b|ST\b)"),
           ("exponential / special function", r"^MUFU"),
           ("synchronization", r"^(BAR|SYNCS|MEMBAR|WARPSYNC|DEPBAR|UCGABAR|CCTL|ERRBAR)"),
           ("warp shuffle / vote", r"^(SHFL|VOTE|MATCH|REDUX)"),
           ("float arithmetic", r"^(FFMA|FADD|FMUL|FMNMX|FSETP|FSEL|FCHK|HADD2|HMUL2|HFMA2|F2F|F2FP|FRND)"),
           ("integer / address", r"^(IMAD|IADD3|LEA|SHF|LOP3|ISETP|IMNMX|SEL|MOV|PRMT|I2F|F2I|S2R|S2UR|CS2R|ULDC|U)"),
           ("branch", r"^(BRA|BSSY|BSYNC|EXIT|CALL|RET|BREAK|JMP|YIELD|NOP)"))


def number(text: str) -> float:
    try:
        return float(text.replace(",", "").strip() or 0)
    except ValueError:
        return 0.0


def opcode(source: str) -> str:
    # "@!P0 LDG.E.128 R4, [R2.64]" -> "LDG.E.128"; predicates and "{ ... }" pairs dropped.
    words = [w for w in source.replace("{", " ").replace("}", " ").split() if not w.startswith("@")]
    return words[0] if words else ""


def opcode_class(op: str) -> str:
    for name, pattern in CLASSES:
        if re.match(pattern, op):
            return name
    return "other"


def read(path: str):
    """(header, rows) of the CSV, skipping anything ncu printed before its header line."""
    with open(path, newline="", errors="replace") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if "Source" in line and "," in line), None)
    if start is None:
        raise ValueError(f"{path}: no CSV header with a 'Source' column (is it ncu's --page source --csv output?)")
    table = list(csv.reader(lines[start:]))
    return table[0], [r for r in table[1:] if len(r) == len(table[0])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--window", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        header, rows = read(args.csv)
    except (OSError, ValueError) as e:
        print(f"ncu_sass_top.py: {e}", file=sys.stderr)
        return 2
    col = {name: i for i, name in enumerate(header)}
    sample_col = next((col[n] for n in SAMPLES if n in col), None)
    if sample_col is None:
        sample_col = next((i for i, n in enumerate(header) if "sampl" in n.lower()), None)
    if sample_col is None:
        print("ncu_sass_top.py: no stall-sampling column; columns are:", ", ".join(header), file=sys.stderr)
        return 2
    src = col["Source"]
    addr = col.get("Address", col.get("# Address"))
    # The stall reasons, where ncu gives them per instruction (columns named after a reason).
    reasons = [i for i, n in enumerate(header) if i != sample_col and re.search(r"stall|Stall", n)]
    samples = [number(r[sample_col]) for r in rows]
    total = sum(samples)
    if total <= 0:
        print("ncu_sass_top.py: no samples in the file")
        return 2
    print(f"{len(rows)} instructions, {total:.0f} samples ({header[sample_col]})\n")
    by_class = defaultdict(float)
    for r, s in zip(rows, samples):
        by_class[opcode_class(opcode(r[src]))] += s
    print("| instruction class | share of samples |\n|---|---|")
    for name, s in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {100 * s / total:.1f}% |")
    print(f"\nthe {args.top} instructions with the most samples (with the {args.window} before each):\n")
    order = sorted(range(len(rows)), key=lambda i: -samples[i])[:args.top]
    for i in order:
        why = ", ".join(f"{header[c]} {rows[i][c]}" for c in reasons if number(rows[i][c]) > 0)
        where = rows[i][addr] if addr is not None else str(i)
        print(f"{100 * samples[i] / total:5.1f}%  {where}  {rows[i][src].strip()}" + (f"   [{why}]" if why else ""))
        for j in range(max(0, i - args.window), i):
            print(f"        {rows[j][addr] if addr is not None else j}  {rows[j][src].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
