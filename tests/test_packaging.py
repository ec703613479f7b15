"""The sdist carries everything a build needs: every header and source under csrc/ (CUDA ones
included, whatever the building machine compiles), and no machine-specific build record."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sdist_holds_every_source_and_header(tmp_path):
    tree = tmp_path / "tree"
    ignore = shutil.ignore_patterns("*.so", "*.o", "__pycache__", "_build_info.py")
    for name in ("csrc", "pyfinetune"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    env = dict(os.environ, PYFINETUNE_FORCE_CPU="1")  # the sdist must still hold the .cu files
    env.pop("PYFINETUNE_FORCE_CUDA", None)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                   cwd=tree, env=env, check=True, capture_output=True)
    (sdist,) = (tmp_path / "dist").glob("pyfinetune-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
              if p.suffix in (".h", ".cuh", ".cpp", ".cu")}
    assert wanted and not wanted - names, sorted(wanted - names)
    assert {"setup.py", "pyproject.toml", "README.md", "LICENSE"} <= names
    assert "pyfinetune/_build_info.py" not in names


def test_cli_version():
    import pyfinetune

    out = subprocess.run([sys.executable, "-m", "pyfinetune", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"pyfinetune {pyfinetune.__version__}"
