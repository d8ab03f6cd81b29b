"""The plugin contract is real: no first-party package outside core reaches a private qcore name.

Plugins, tasks, their tests, the example plugin and the benchmark scripts may import from ``qcore`` the names
in ``qcore.__all__`` and the public submodules, and from a public submodule the names in its ``__all__``.
Anything else (a ``qcore._private`` module, a name a module happens to define) fails here, with the file and
line, so the public API stays what plugin authors can rely on.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import qcore

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_SUBMODULES = ("ops", "ranges", "knapsack", "distributed", "testing", "hookspecs", "packing")
CHECKED = ("plugins", "classification", "detection", "cuda", "tests", "bench")


def _exports(module: str) -> set[str]:
    mod = importlib.import_module(module)
    names = set(getattr(mod, "__all__", ()))
    if module == "qcore":
        names |= set(PUBLIC_SUBMODULES)
    elif module == "qcore.hookspecs":  # read for documentation; its hooks are implemented, not imported
        names |= {n for n in dir(mod) if n.startswith("qcore_")}
    return names


def _is_public_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "qcore" and (len(parts) == 1 or (parts[1] in PUBLIC_SUBMODULES and
                                                         not any(p.startswith("_") for p in parts[1:])))


def violations(path: Path, source: str | None = None) -> list[str]:
    """Every reference in ``path`` (or in ``source``, read as that file) to a qcore name that is not public, as
    ``file:line: name``."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    rel = path.relative_to(ROOT)
    bad: list[str] = []
    aliases: dict[str, str] = {}  # local name -> public module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "qcore" or node.module.startswith("qcore.")):
            if not _is_public_module(node.module):
                bad.append(f"{rel}:{node.lineno}: module {node.module}")
                continue
            allowed = _exports(node.module)
            for a in node.names:
                if a.name not in allowed:
                    bad.append(f"{rel}:{node.lineno}: {node.module}.{a.name}")
                elif node.module == "qcore" and a.name in PUBLIC_SUBMODULES:
                    aliases[a.asname or a.name] = f"qcore.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "qcore" or a.name.startswith("qcore."):
                    if not _is_public_module(a.name):
                        bad.append(f"{rel}:{node.lineno}: module {a.name}")
                    else:
                        aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or "qcore"
    for node in ast.walk(tree):  # attribute access: qcore.X, qdist.X
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            if node.attr not in _exports(module):
                bad.append(f"{rel}:{node.lineno}: {module}.{node.attr}")
    return bad


def _files() -> list[Path]:
    return sorted(p for d in CHECKED for p in (ROOT / d).rglob("*.py")
                  if ".venv" not in p.parts and "build" not in p.parts)


def test_no_first_party_package_imports_a_private_qcore_name():
    files = _files()
    assert len(files) > 50, "the scan found too few files; check CHECKED"
    bad = [v for f in files for v in violations(f)]
    assert not bad, "non-public qcore names used (export them or use the public API):\n" + "\n".join(bad)


def test_every_exported_name_exists_and_is_documented():
    for module in ("qcore", *(f"qcore.{m}" for m in PUBLIC_SUBMODULES if m != "hookspecs")):
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)  # AttributeError: __all__ names something that is not there
            if callable(obj) and not name.startswith("_") and getattr(obj, "__module__", "").startswith("qcore"):
                assert (obj.__doc__ or "").strip(), f"{module}.{name} has no docstring"


@pytest.mark.parametrize("source, expected", [
    ("from qcore._pipeline import run\n", "module qcore._pipeline"),
    ("from qcore import _pipeline\n", "qcore._pipeline"),
    ("from qcore.ops import _EPS\n", "qcore.ops._EPS"),
    ("import qcore\nqcore._cli.main()\n", "qcore._cli"),
    ("from qcore import distributed as qdist\nqdist.log\n", "qcore.distributed.log"),
])
def test_the_check_catches_private_references(source, expected):
    found = violations(ROOT / "tests" / "probe.py", source)
    assert any(expected in v for v in found), found


def test_plugin_api_version_is_published():
    assert isinstance(qcore.PLUGIN_API, int) and qcore.PLUGIN_API >= 1
