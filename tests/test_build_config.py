"""setup.py's build choices that do not need a build: the kernel-argument size of the multi-tensor
optimizer launches (csrc/include/pyfinetune/multi_tensor_apply.cuh), and whether nvcc can build for
the installed torch's CUDA."""

from __future__ import annotations

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

SETUP = pathlib.Path(__file__).resolve().parents[1] / "setup.py"


def _constant(node):
    # A module-level NAME = <literal> of setup.py (the constants its functions read).
    return (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id.isupper() and isinstance(node.value, ast.Constant))


def _setup_functions(*names):
    # setup.py builds the extension when imported: compile just the named functions (and the
    # module's constants).
    tree = ast.parse(SETUP.read_text())
    module = ast.Module(body=[n for n in tree.body
                              if (isinstance(n, ast.FunctionDef) and n.name in names) or _constant(n)],
                        type_ignores=[])
    namespace = {"os": os, "re": re, "shutil": shutil, "subprocess": subprocess, "sys": sys}
    exec(compile(module, str(SETUP), "exec"), namespace)
    return [namespace[n] for n in names]


@pytest.fixture
def mta_arg_bytes(monkeypatch):
    monkeypatch.delenv("PYFINETUNE_MTA_ARG_BYTES", raising=False)
    fn, _ = _setup_functions("_mta_arg_bytes", "_arch_major")  # the second: called by the first
    return fn


@pytest.mark.parametrize("nvcc, archs, expected", [
    ("13.0.88", ["8.0", "9.0+PTX"], 32764),   # the default build
    ("12.1.66", ["7.0"], 32764),
    ("12.0.76", ["8.0", "9.0"], 4096),        # nvcc before 12.1: 4 KB arguments only
    ("11.8.89", ["8.0"], 4096),
    ("12.4.99", ["6.1", "8.0"], 4096),        # a pre-Volta arch in the list
    ("12.4.99", ["9.0a"], 32764),
    ("12.4.99", ["Ampere"], 4096),            # an arch name: not parsed, the safe size
    (None, ["8.0"], 4096),                    # nvcc version unknown
])
def test_kernel_argument_size_follows_nvcc_and_archs(mta_arg_bytes, nvcc, archs, expected):
    assert mta_arg_bytes(nvcc, archs) == expected


@pytest.mark.parametrize("nvcc, torch_cuda, builds", [
    ("13.0.88", "13.0", True),    # CI: torch 2.14.1+cu130
    ("13.0.88", "13.2", True),    # torch 2.15.0+cu132: torch warns about the minor version only
    ("12.4.131", "12.1", True),
    ("13.0.88", "12.4", False),   # torch 2.4-2.9 from PyPI (CUDA 12) beside a CUDA 13 toolkit
    ("12.8.93", "13.0", False),
    (None, "13.0", False),        # nvcc that does not say its version: torch's own check fails too
])
def test_nvcc_major_version_must_match_torch(nvcc, torch_cuda, builds):
    (mismatch,) = _setup_functions("_cuda_major_mismatch")
    reason = mismatch(nvcc, torch_cuda, "/usr/local/cuda", "2.4.1+cu124")
    assert (reason is None) == builds
    if not builds:
        assert "/usr/local/cuda" in reason
        if nvcc is not None:
            assert f"nvcc {nvcc}" in reason and "2.4.1+cu124" in reason and f"CUDA {torch_cuda}" in reason


def test_kernel_argument_size_environment_override(mta_arg_bytes, monkeypatch):
    monkeypatch.setenv("PYFINETUNE_MTA_ARG_BYTES", "4096")
    assert mta_arg_bytes("13.0.88", ["9.0"]) == 4096
    monkeypatch.setenv("PYFINETUNE_MTA_ARG_BYTES", "8192")
    assert mta_arg_bytes("11.8.89", ["8.0"]) == 8192
    for bad in ("4095", "32765", "4k", "-1"):
        monkeypatch.setenv("PYFINETUNE_MTA_ARG_BYTES", bad)
        with pytest.raises(RuntimeError, match="PYFINETUNE_MTA_ARG_BYTES must be an integer in \\[4096, 32764\\]"):
            mta_arg_bytes("13.0.88", ["9.0"])


def test_the_ops_that_write_are_the_ones_with_autograd_rules():
    # csrc/inplace_autograd.cpp gives each op that writes to an argument torch's in-place rules
    # (refuse a tracked tensor in grad mode, bump versions); a new writing op must be added there
    # (and to this list, with a test of its rules: _scale_kept_ in tests/test_kd_device_scale.py).
    import torch

    from pyfinetune._info import OPS

    registered = {name.split("::", 1)[1].split(".", 1)[0] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("pyfinetune::")}
    writing = {op for op in registered if any(a.alias_info is not None and a.alias_info.is_write
                                              for a in getattr(torch.ops.pyfinetune, op).default._schema.arguments)}
    assert writing == {"fused_adamw_", "fused_sgd_", "kd_loss_fwd_inplace", "csr_to_dense_into", "_scale_kept_"}
    for op in writing:  # both layers registered (the ADInplaceOrView one has no fallback kernel to hide behind)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfinetune::{op}", "ADInplaceOrView"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyfinetune::{op}", "Autograd"), op
    assert set(OPS) == {name for name in registered if not name.startswith("_")}  # OPS lists every public op


def test_pip_cuda_headers_never_shadow_the_toolkit(tmp_path):
    # torch's pip wheels carry the CUDA runtime headers of torch's CUDA release beside cusparse.h
    # and cublas: only what the toolkit lacks may reach the include path, or nvcc 13.0 meets
    # torch 2.15.0's CUDA 13.2 headers ("CUDA compiler and CUDA toolkit headers are incompatible").
    (link_missing,) = _setup_functions("_link_missing_headers")
    toolkit, cu13, cu12rt, out = (tmp_path / n for n in ("toolkit", "cu13", "cu12rt", "out"))
    for d, names in ((toolkit, ["cuda_runtime.h", "cuda_fp16.h", "cccl/"]),
                     (cu13, ["cuda_runtime.h", "cusparse.h", "cublas_v2.h", "cccl/", "nv/"]),
                     (cu12rt, ["cusparse.h", "cusolverDn.h"])):
        d.mkdir()
        for n in names:
            if n.endswith("/"):
                (d / n).mkdir()
            else:
                (d / n).write_text(f"// {d.name}/{n}\n")
    (out).mkdir()
    (out / "stale.h").write_text("// from an earlier build\n")
    linked = link_missing([str(cu13), str(cu12rt)], str(toolkit), str(out))
    assert linked == ["cublas_v2.h", "cusparse.h", "nv", "cusolverDn.h"]
    assert sorted(p.name for p in out.iterdir()) == sorted(linked)   # rebuilt: nothing stale
    assert (out / "cusparse.h").read_text() == "// cu13/cusparse.h\n"  # the first source wins
    assert (out / "nv").is_dir()
    # a toolkit folder that does not exist: everything is taken from the wheels
    assert len(link_missing([str(cu13)], str(tmp_path / "none"), str(out))) == 5


@pytest.mark.parametrize("version, ok", [
    ("58.1.0", False),       # a new Python 3.9 virtual environment
    ("59.6.0", False),       # Ubuntu 22.04's python3-setuptools
    ("63.4.3", False),       # PEP 621 metadata but no PEP 660 editable installs
    ("64.0.0", True),
    ("80.9.0", True),
    ("100.0.0.post1", True),
    ("unknown", False),
])
def test_setuptools_older_than_64_is_refused_with_the_fix(version, ok):
    """setuptools < 61 ignores pyproject.toml's [project] table and builds a package named UNKNOWN
    0.0.0 (no dependencies, no `pyfinetune` command; seen with Python 3.9's setuptools 58.1 and
    `pip install --no-build-isolation -e .`): setup.py stops first and says how to upgrade."""
    (too_old,) = _setup_functions("_setuptools_too_old")
    message = too_old(version)
    if ok:
        assert message is None
    else:
        assert f"setuptools {version}" in message and 'pip install -U "setuptools>=64"' in message


def test_setup_py_stops_before_building_under_an_old_setuptools(tmp_path):
    """The check runs before anything is compiled: setup.py under a setuptools that says it is 58.1.0
    exits with the message (and builds nothing)."""
    fake = tmp_path / "fake"
    (fake / "setuptools").mkdir(parents=True)
    (fake / "setuptools" / "__init__.py").write_text(
        "__version__ = '58.1.0'\n\ndef setup(**kwargs):\n    raise AssertionError('setup() reached')\n")
    env = dict(os.environ, PYTHONPATH=str(fake), PYFINETUNE_FORCE_CPU="1")
    out = subprocess.run([sys.executable, str(SETUP), "--version"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "needs setuptools>=64" in out.stderr and "setuptools 58.1.0" in out.stderr, out.stderr[-2000:]
    assert "setup() reached" not in out.stderr
    assert not (tmp_path / "build").exists()


@pytest.mark.parametrize("env_torch, allow, refused", [
    (("2.11.0+cu130", "/venv/lib/site-packages/torch/__init__.py"), "", True),   # pip would replace it
    (("2.14.1", "/venv/lib/site-packages/torch/__init__.py"), "", False),        # the same release
    (None, "", False),                                                             # no torch: a fresh install
    (("2.11.0+cu130", "/venv/lib/site-packages/torch/__init__.py"), "1", False),  # asked for
    (("2.11.0+cu130", "/tmp/pip-build-env-x/overlay/torch/__init__.py"), "", False),  # the same torch
])
def test_isolated_build_against_another_torch_is_refused(monkeypatch, env_torch, allow, refused):
    """pip's default (isolated) build compiles against a torch from the index in a temporary
    environment, and the package then pins that release: pip would replace the user's torch (a CUDA
    build by the index's, for one). setup.py refuses when the environment's own torch is another
    release, names both and the fix (--no-build-isolation), unless PYFINETUNE_ALLOW_ISOLATED_BUILD=1."""
    monkeypatch.setenv("PYFINETUNE_ALLOW_ISOLATED_BUILD", allow)
    (conflict,) = _setup_functions("_isolated_build_conflict")
    message = conflict("2.14.1", "/tmp/pip-build-env-x/overlay/torch/__init__.py", env_torch)
    if not refused:
        assert message is None
    else:
        assert "torch 2.14.1" in message and "torch 2.11.0+cu130" in message
        assert "pip install --no-build-isolation" in message and "PYFINETUNE_ALLOW_ISOLATED_BUILD=1" in message


def test_the_environment_torch_is_read_without_pythonpath(tmp_path, monkeypatch):
    """_environment_torch starts this Python with -E: a torch that only PYTHONPATH provides (as pip's
    isolated build environment provides its own) is not the environment's."""
    fake = tmp_path / "overlay" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.0.1+fake'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "overlay"))
    (environment_torch,) = _setup_functions("_environment_torch")
    got = environment_torch()
    import torch

    assert got is not None and got[0] == torch.__version__ and got[0] != "0.0.1+fake"
    assert os.path.realpath(got[1]) == os.path.realpath(torch.__file__)
