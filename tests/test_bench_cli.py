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
