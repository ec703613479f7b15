"""`pyfinetune bench`: the table on stdout, the CSV / JSON / PNG files, and the option errors."""

import csv
import glob
import json
import os
import sys

import pytest
import torch

from pyfinetune.benchmarks import suite
from pyfinetune.cli import main


@pytest.fixture(autouse=True)
def keep_threads():
    # `--threads` sets torch's thread count for the whole process; give the other tests theirs back.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def only_file(folder, ext):
    paths = glob.glob(os.path.join(folder, f"bench-cpu-*{ext}"))
    assert len(paths) == 1, paths
    return paths[0]


@pytest.mark.timeout(180)
def test_quick_all_prints_the_table_and_writes_csv_json_png(tmp_path, capsys):
    # One thread: on the shared 2-core CI machine a 2-thread run waits for busy cores (slow, and noisy).
    assert main(["bench", "--quick", "--op", "all", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "pyfinetune bench on cpu (quick" in lines[0]
    for name in ("machine", "threads", "torch", "pyfinetune", "loaded from"):
        assert any(line.startswith(f"{name} ") for line in lines), (name, out)
    assert "1 torch thread" in out and torch.__version__ in out
    header = next(i for i, line in enumerate(lines) if line.startswith("op "))
    for col in ("case", "pyfinetune ms", "best torch baseline", "torch ms", "speed-up", "note"):
        assert col in lines[header], lines[header]
    table = [line for line in lines[header + 2:] if line.split(" ", 1)[0] in suite.OPS]
    assert [line.split()[0] for line in table] == ["optim", "distill", "distill", "prune", "prune", "prune"], out
    assert "torch.compile skipped (--quick)" in out
    assert "wrote " in out

    with open(only_file(tmp_path, ".csv"), newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == suite.CSV_COLUMNS
    assert [r["op"] for r in rows] == ["optim", "distill", "distill", "prune", "prune", "prune"]
    for r in rows:
        assert r["ours"].startswith("ours") and r["baseline"].startswith(("torch", "dense")), r
        assert float(r["ours_ms"]) > 0 and float(r["baseline_ms"]) > 0
        assert float(r["speedup"]) == pytest.approx(float(r["baseline_ms"]) / float(r["ours_ms"]))
        assert float(r["p20"]) <= float(r["p80"])

    with open(only_file(tmp_path, ".json")) as f:
        record = json.load(f)
    assert record["device"] == "cpu" and record["quick"] is True and record["skipped"] == []
    assert record["machine"]["torch"] == torch.__version__ and record["machine"]["torch_threads"] == 1
    assert [r["case"] for r in record["rows"]] == [r["case"] for r in rows]
    for r in record["rows"]:
        # The baseline is the fastest torch contender of the same rounds.
        assert r["baseline"] in r["baselines"] and r["baseline_ms"] == min(r["baselines"].values())
    for distill_row in record["rows"][1:3]:
        assert set(distill_row["baselines"]) == {"torch eager"}  # no torch.compile with --quick
    assert record["rows"][2]["case"] == "kd_loss_topk fwd+bwd, 256x32000 top-64 fp32"

    from PIL import Image

    with Image.open(only_file(tmp_path, ".png")) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 200


def test_op_must_be_known(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--op", "quantize"])
    assert e.value.code == 2
    assert "invalid choice: 'quantize'" in capsys.readouterr().err


def test_threads_must_be_positive(tmp_path, capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_unusable_out_and_bad_settings_stop_before_timing(tmp_path, capsys, monkeypatch):
    # Found before any timing, in one line with exit status 2 (an --out that is a file once ended a
    # whole run in a traceback; a bad PYFINETUNE_* value in the middle of it).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["bench", "--quick", "--op", "optim", "--device", "cpu", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"pyfinetune bench: --out {blocker} cannot be created" in err and "Traceback" not in err
    monkeypatch.setenv("PYFINETUNE_CPU_PREFETCH", "2")
    monkeypatch.setenv("PYFINETUNE_TILED_CUDA_ASYNC", "yes")
    assert main(["bench", "--quick", "--op", "optim", "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "PYFINETUNE_CPU_PREFETCH must be 0 or 1 (or unset), got '2'" in err
    assert "PYFINETUNE_TILED_CUDA_ASYNC must be 0 or 1" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "sees no CUDA device" in err and "--device cpu" in err
    assert os.listdir(tmp_path) == []


def fake_record():
    row = dict(op="optim", case="AdamW L2-SP step, small", ours="ours AdamW L2-SP", ours_ms=1.0,
               baseline="torch AdamW fused", baseline_ms=2.0, speedup=2.0, p20=1.9, p80=2.1,
               baselines={"torch AdamW fused": 2.0}, other_cpu_share=0.0, note="")
    machine = dict(cpu_model="cpu", torch_threads=2, torch=torch.__version__)
    return {"device": "cpu", "stamp": "20260101-0000", "quick": True, "machine": machine, "rows": [row], "skipped": []}


def test_without_matplotlib_csv_and_json_are_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    paths = suite.write_outputs(fake_record(), str(tmp_path))
    assert "png" not in paths and "matplotlib is not installed" in paths["png_error"]
    assert sorted(os.listdir(tmp_path)) == ["bench-cpu-20260101-0000.csv", "bench-cpu-20260101-0000.json"]


def test_a_second_run_in_the_same_minute_keeps_the_first(tmp_path):
    first = suite.write_outputs(fake_record(), str(tmp_path))
    second = suite.write_outputs(fake_record(), str(tmp_path))
    assert second["csv"].endswith("-2.csv") and os.path.exists(first["csv"]) and os.path.exists(second["png"])


def test_info_command_text_and_json(capsys, monkeypatch):
    # `pyfinetune info`: versions, the CUDA build, the optimizer's launch-argument size when built
    # with CUDA, SparseLinear's crossover per device and dtype, its dense-path pool, and every op
    # with its devices.
    monkeypatch.delenv("PYFINETUNE_DENSE_POOL_MB", raising=False)
    monkeypatch.setenv("PYFINETUNE_CPU_PREFETCH", "0")
    import json

    import pyfinetune
    from pyfinetune import cli

    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    info = pyfinetune.build_info()
    assert f"torch        {torch.__version__}" in text
    from pyfinetune._sparse_linear import CROSSOVER_SPARSITY

    cpu = CROSSOVER_SPARSITY["cpu"]
    assert f"SparseLinear kernel='auto' on cpu: sparse from {cpu:.0%} (float32)" in text
    for op in info["kernels"]:
        assert f"torch.ops.pyfinetune.{op}" in text
    assert ("optimizer launch arguments" in text) == bool(info["cuda_built"])
    assert "optimizer software prefetch off (PYFINETUNE_CPU_PREFETCH)" in text
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sparse_linear_crossover"]["cpu"]["float32"] == cpu
    assert data["dense_pool"]["idle_limit_bytes"] == 1024 * 2**20 and data["dense_pool"]["idle_bytes"] >= 0
    assert "CPU buffer pool (SparseLinear dense path, kd_loss gradients): up to 1024 MB idle" in text
    assert set(data["sparse_linear_crossover"]["cpu"]) == {"float32", "bfloat16", "float16"}
    size = data["optimizer_launch_arg_bytes"]
    assert size is None if not data["cuda_built"] else 4096 <= size <= 32764
    assert data["optimizer_cpu_prefetch"] is False
    monkeypatch.setenv("PYFINETUNE_CPU_PREFETCH", "on")
    assert cli.main(["info"]) == 0
    assert "optimizer software prefetch invalid setting: pyfinetune._optim_cpu_prefetch: PYFINETUNE_CPU_PREFETCH " \
           "must be 0 or 1" in capsys.readouterr().out


@pytest.mark.parametrize("buffering", ["line", "block"])
def test_cli_output_into_a_closed_pipe_ends_quietly(monkeypatch, buffering):
    # `pyfinetune info | head -1`: the reader closes the pipe; the command stops with the shell's
    # status for SIGPIPE instead of a BrokenPipeError traceback, also when the output is still in
    # the buffer when the command returns (block-buffered stdout, the default for a pipe).
    import io

    from pyfinetune import cli

    read_end, write_end = os.pipe()
    os.close(read_end)
    out = io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_end, "w"), buffer_size=1 << 16),
                           line_buffering=buffering == "line")
    monkeypatch.setattr("sys.stdout", out)
    try:
        assert cli.main(["info"]) == 141
        out.write("x" * 100000)  # whatever is still written goes nowhere, without an error
        out.flush()
    finally:
        monkeypatch.undo()
        out.close()


def test_cli_broken_pipe_elsewhere_is_an_error(monkeypatch):
    # A BrokenPipeError that is not about standard output (a worker's pipe, a socket) is raised.
    from pyfinetune import cli

    def broken(args):
        raise BrokenPipeError("a worker's pipe")

    monkeypatch.setattr(cli, "_cmd_info", broken)
    read_end, write_end = os.pipe()  # stdout is an open pipe
    try:
        with open(write_end, "w") as out:
            monkeypatch.setattr("sys.stdout", out)
            with pytest.raises(BrokenPipeError, match="a worker's pipe"):
                cli.main(["info"])
            monkeypatch.undo()
    finally:
        os.close(read_end)


def test_threads_beyond_the_cpus_and_an_empty_out_are_refused_before_timing(tmp_path, capsys, monkeypatch):
    # A thread count past the machine's CPUs was applied and timed (a huge one crashed torch's thread
    # pool with a segmentation fault); `--out ""` silently wrote to the default folder.
    monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("timing started"))
    before = torch.get_num_threads()
    too_many = (os.cpu_count() or 1) + 1
    assert main(["bench", "--quick", "--device", "cpu", "--threads", str(too_many), "--out", str(tmp_path)]) == 2
    assert f"--threads must be at most this machine's {os.cpu_count()} logical CPUs, got {too_many}" in \
        capsys.readouterr().err
    assert torch.get_num_threads() == before and os.listdir(tmp_path) == []
    assert main(["bench", "--quick", "--device", "cpu", "--out", ""]) == 2
    assert "--out must name a folder" in capsys.readouterr().err


def test_loosely_read_settings_are_refused(tmp_path, capsys, monkeypatch):
    # The kernels read these without refusing a bad value: PYFINETUNE_CPU_AVX512=off kept AVX-512 on,
    # and a PYFINETUNE_KD_CUDA_THREADS that is not a multiple of 32 in [32, 512] was ignored, while
    # the record named the setting as if it had applied.
    monkeypatch.setattr(suite, "run", lambda *a, **k: pytest.fail("timing started"))
    monkeypatch.setenv("PYFINETUNE_CPU_AVX512", "off")
    monkeypatch.setenv("PYFINETUNE_KD_CUDA_THREADS", "100")
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "PYFINETUNE_CPU_AVX512 must be 0 or 1 (or unset), got 'off'" in err
    assert "PYFINETUNE_KD_CUDA_THREADS must be a multiple of 32 in [32, 512] (or unset), got '100'" in err
    from pyfinetune._info import settings_errors

    monkeypatch.setenv("PYFINETUNE_CPU_AVX512", "0")
    monkeypatch.setenv("PYFINETUNE_KD_CUDA_THREADS", "256")
    assert not [e for e in settings_errors() if "AVX512" in e or "KD_CUDA_THREADS" in e]
    # A non-ASCII digit ("²".isdigit() is True, int("²") raises) is refused, not a crash.
    monkeypatch.setenv("PYFINETUNE_KD_CUDA_THREADS", "²")
    assert "PYFINETUNE_KD_CUDA_THREADS must be a multiple of 32 in [32, 512] (or unset), got '²'" in settings_errors()


@pytest.mark.parametrize("value, ok", [("auto", True), ("1", True), ("4", True), ("65535", True), ("0", False),
                                       ("65536", False), ("-2", False), ("AUTO", False), ("2.0", False),
                                       ("²", False)])
def test_split_k_setting_is_checked_before_timing(monkeypatch, value, ok):
    # The CUDA forward reads PYFINETUNE_TILED_CUDA_SPLIT_K at each call (a bad value: ValueError
    # there); settings_errors() refuses the same values on any machine, before a benchmark starts.
    from pyfinetune._info import settings_errors

    monkeypatch.setenv("PYFINETUNE_TILED_CUDA_SPLIT_K", value)
    errors = [e for e in settings_errors() if "SPLIT_K" in e]
    assert errors == ([] if ok else [f"PYFINETUNE_TILED_CUDA_SPLIT_K must be auto or an integer in [1, 65535] "
                                     f"(or unset: auto), got {value!r}"])


@pytest.mark.parametrize("value, ok", [("1", True), ("16", True), ("3", False), ("32", False), ("08", False)])
def test_kd_split_setting_is_checked(monkeypatch, value, ok):
    from pyfinetune._info import settings_errors

    monkeypatch.setenv("PYFINETUNE_KD_CUDA_SPLIT", value)
    errors = [e for e in settings_errors() if "KD_CUDA_SPLIT" in e]
    assert errors == ([] if ok else [f"PYFINETUNE_KD_CUDA_SPLIT must be one of 1, 2, 4, 8, 16 (or unset), got {value!r}"])


@pytest.mark.parametrize("name", ["PYFINETUNE_OPTIM_NATIVE_PLAN", "PYFINETUNE_KD_CUDA_PERSISTENT",
                                  "PYFINETUNE_KD_CUDA_L2_PREFETCH"])
@pytest.mark.parametrize("value", ["2", "x"])
def test_on_off_settings_are_checked(monkeypatch, name, value):
    from pyfinetune._info import settings_errors

    monkeypatch.setenv(name, value)
    assert f"{name} must be 0 or 1 (or unset), got {value!r}" in settings_errors()
    monkeypatch.setenv(name, "1")
    assert not [e for e in settings_errors() if name in e]


def test_info_says_which_crossover_entries_the_variable_set(capsys, monkeypatch):
    # PYFINETUNE_SPARSE_CROSSOVER=cuda=0.5 once marked the CPU's line "applied" too (any entry did).
    from pyfinetune import _sparse_linear, cli

    monkeypatch.setattr(_sparse_linear, "_env_entries", {"cuda": 0.5})
    assert cli.main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("SparseLinear kernel='auto' on cpu"))
    assert "applied" not in line and "(defaults; measure this machine's" in line
    monkeypatch.setattr(_sparse_linear, "_env_entries", {"cpu": _sparse_linear.CROSSOVER_SPARSITY["cpu"]})
    assert cli.main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("SparseLinear kernel='auto' on cpu"))
    assert "(PYFINETUNE_SPARSE_CROSSOVER applied: cpu)" in line


def test_numbers_keep_their_digits_when_rounding_carries():
    # fmt(999.7) printed "1e+03" in the bench table: "g" switches to an exponent when rounding to 3
    # significant digits adds a fourth.
    from pyfinetune.benchmarks.common import fmt

    assert fmt(999.7) == "1000" and fmt(-999.8) == "-1000" and fmt(99.96, 2) == "100"
    assert fmt(999.4) == "999" and fmt(1.2345) == "1.23" and fmt(0.012345) == "0.0123" and fmt(12345.6) == "12346"
    assert fmt(None) is None and fmt(1e-5) == "1e-05"


def test_percentiles_and_medians_match_numpy():
    import random
    import statistics

    import numpy as np

    from pyfinetune.benchmarks.common import Timing, percentile

    rng = random.Random(0)
    for _ in range(2000):
        xs = [rng.choice([rng.random(), rng.uniform(-1e6, 1e6), float(rng.randint(0, 3))])
              for _ in range(rng.randint(1, 30))]
        q = rng.choice([0, 20, 50, 80, 100, rng.uniform(0, 100)])
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-9)
        assert Timing("t", xs).median == pytest.approx(statistics.median(xs), rel=1e-12, abs=1e-9)
    # Outside [0, 100] the interpolation extrapolated past the extreme samples (q=-10 of [1, 2]: 0.9).
    for q in (-10, 100.5, float("nan")):
        with pytest.raises(ValueError, match="q must be in"):
            percentile([1.0, 2.0], q)
