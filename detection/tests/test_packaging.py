"""qcore-detection installs exactly one spconv build, chosen by an extra, and loads without any."""

import re
import sys
from pathlib import Path

import pytest
import tomllib
from torch import nn

from qcore_detection import plugin

ROOT = Path(__file__).resolve().parents[2]


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


def test_each_extra_installs_one_spconv_build_and_none_is_required():
    project = tomllib.loads((ROOT / "detection" / "pyproject.toml").read_text())["project"]
    assert not [r for r in project["dependencies"] if _dist(r).startswith("spconv")]
    extras = project["optional-dependencies"]
    assert {"cpu", "cu118", "cu121", "cu124", "cu126"} <= set(extras)
    for name, requirements in extras.items():
        builds = [_dist(r) for r in requirements if _dist(r).startswith("spconv")]
        assert builds == (["spconv"] if name == "cpu" else [f"spconv-{name}"]), name
    # README's test command installs the CPU build
    assert "-e ./detection[cpu]" in (ROOT / "requirements-test.txt").read_text()


def test_layer_hooks_step_aside_without_spconv(monkeypatch: pytest.MonkeyPatch):
    for name in [m for m in sys.modules if m == "spconv" or m.startswith("spconv.")]:
        monkeypatch.setitem(sys.modules, name, None)
    import qcore_detection

    monkeypatch.delitem(sys.modules, "qcore_detection.spconv_layers", raising=False)
    monkeypatch.delattr(qcore_detection, "spconv_layers", raising=False)
    find = plugin._spconv_layers.__wrapped__  # the uncached lookup
    assert find() is None
    monkeypatch.setattr(plugin, "_spconv_layers", find)
    assert plugin.qcore_layer_info(module=nn.Linear(2, 2), name="fc") is None
    from qcore import MissingDependencyError

    with pytest.raises(MissingDependencyError, match=r"qcore-detection\[cpu\]"):
        import qcore_detection.spconv_layers  # noqa: F401
