"""Cross-package fixtures: run the real ``qcore`` command, and install a broken plugin through a real entry point.

The example plugin (``tests/example_plugin``, distribution ``qcore-example``) is pip-installed by
``requirements-test.txt`` like any third-party plugin; only the broken one is faked here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _install(site: Path, dist: str, entry: str, module_src: str | None = None, module_name: str = "") -> None:
    """Write what an installer writes: a .dist-info with METADATA and entry_points.txt, plus the module."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[qcore]\n{entry}\n")
    if module_src is not None:
        (site / f"{module_name}.py").write_text(module_src)


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A site folder with an installed plugin ``broken`` that fails to import (``example`` is installed for real)."""
    site = tmp_path_factory.mktemp("site")
    _install(site, "qcore-broken", "broken = qcore_broken",
             "raise ImportError('qcore_broken needs libfoo, which is not installed')\n", "qcore_broken")
    return site


def run_qcore(*args: str, cwd: Path, site: Path | None = None, env: dict[str, str] | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qcore ARGS`` as a user would, returning the finished process."""
    e = dict(os.environ, QCORE_PROGRESS="0")
    if site is not None:
        e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), e.get("PYTHONPATH", "")]))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "qcore", *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def qcore_cli(tmp_path):
    def call(*args: str, **kw):
        return run_qcore(*args, cwd=tmp_path, **kw)
    return call


@pytest.fixture(scope="session")
def exiting_plugin_site(tmp_path_factory) -> Path:
    """A site folder with an installed plugin ``exiting`` whose import calls ``sys.exit(3)``."""
    site = tmp_path_factory.mktemp("site-exit")
    _install(site, "qcore-exiting", "exiting = qcore_exiting", "import sys\nsys.exit(3)\n", "qcore_exiting")
    return site


@pytest.fixture(scope="session")
def qcore_runner():
    """:func:`run_qcore` itself, for module-scoped fixtures that run the command in folders of their own."""
    return run_qcore
