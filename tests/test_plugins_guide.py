"""PLUGINS.md stays true: its quoted code is the real code, and it covers every hook and every public name."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from qcore import hookspecs

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "PLUGINS.md").read_text()
#: fenced code blocks whose first line is ``# <path of a file in this repository>``
QUOTES = [(m.group(1), m.group(2)) for m in re.finditer(r"```\w*\n# (\S+)\n(.*?)\n```", GUIDE, re.S)
          if (ROOT / m.group(1)).is_file()]


def test_the_guide_quotes_the_worked_example():
    quoted = {path for path, _ in QUOTES}
    for part in ("quantizer", "calibrator", "allocator", "plugin"):
        assert f"tests/example_plugin/src/qcore_example/{part}.py" in quoted
    assert "tests/example_plugin/pyproject.toml" in quoted


@pytest.mark.parametrize("path,code", QUOTES, ids=[f"{p}:{i}" for i, (p, _) in enumerate(QUOTES)])
def test_quoted_code_is_verbatim(path, code):
    assert code in (ROOT / path).read_text(), f"PLUGINS.md quotes {path} but the file no longer says this"


def test_every_hook_and_public_name_is_documented():
    hooks = [n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("qcore_")]
    missing = [h for h in hooks if f"`{h}(" not in GUIDE]
    public = importlib.import_module("qcore").__all__  # the list itself, as tests/test_public_api.py reads it
    missing += [n for n in public if f"`{n}`" not in GUIDE]
    assert not missing, f"PLUGINS.md does not document: {missing}"


def test_readme_links_the_guide():
    readme = (ROOT / "README.md").read_text()
    assert "](PLUGINS.md)" in readme
