"""The README's code blocks marked ``<!-- runnable -->`` run as they are (in a temporary folder)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re

import pytest
import torch
from conftest import hf_unusable

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
_BLOCK = re.compile(r"<!-- runnable -->\s*\n```python\n(.*?)\n```", re.S)


_NO_HF = hf_unusable()
_HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
_HAS_TRACE_AUTOGRAD = hasattr(torch._dynamo.config, "trace_autograd_ops")


def _blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    out = []
    for i, code in enumerate(_BLOCK.findall(text)):
        marks = []
        if "transformers" in code:
            marks.append(pytest.mark.skipif(bool(_NO_HF), reason=_NO_HF))
        if "torchvision" in code:
            marks.append(pytest.mark.skipif(not _HAS_TORCHVISION, reason="torchvision is not installed"))
        if "trace_autograd_ops" in code:
            marks.append(pytest.mark.skipif(not _HAS_TRACE_AUTOGRAD, reason="this torch has no trace_autograd_ops"))
        out.append(pytest.param(code, marks=marks, id=f"block{i}"))
    return out


def test_readme_has_runnable_examples():
    assert len(_blocks()) >= 4


@pytest.mark.parametrize("code", _blocks())
def test_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch._dynamo.reset()
    with contextlib.ExitStack() as stack:
        if _HAS_TRACE_AUTOGRAD:  # the compile example sets it: undo that afterwards
            stack.enter_context(torch._dynamo.config.patch(trace_autograd_ops=torch._dynamo.config.trace_autograd_ops))
        exec(compile(code, README, "exec"), {"__name__": "__readme__"})
