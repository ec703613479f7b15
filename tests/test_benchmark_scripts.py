"""benchmarks/gpu_check.sh runs every benchmarks/bench_*.py with `--device cuda --out DIR`: each
script must accept both options (a GPU session is short; a usage error there wastes it). The
scripts are command lines over pyfinetune.benchmarks, which ships in the package."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")))


def test_scripts_found():
    assert len(SCRIPTS) >= 4, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_accepts_device_and_out(script):
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--device" in out.stdout and "--out" in out.stdout, out.stdout


def test_benchmarks_package_is_packaged():
    # `pyfinetune bench` runs from an installed package: the subpackage must be in the wheel.
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert '"pyfinetune.benchmarks"' in f.read()


def test_results_default_to_the_clone():
    from pyfinetune.benchmarks import common

    assert common.REPO_ROOT == ROOT
    assert common.RESULTS_DIR == os.path.join(ROOT, "benchmarks", "results")


def test_kd_memory_child_runs_as_a_module():
    # bench_kd measures each contender's memory in a child process of the package module.
    from pyfinetune.benchmarks import distill

    res = distill.measure_memory(dict(kind="kd", name=distill.OURS, n=16, v=300, dtype="float32", device="cpu"))
    assert "error" not in res, res.get("error")
    assert res["held_bytes"] >= 16 * 300 * 4, json.dumps(res)  # the gradient buffer is kept for backward
