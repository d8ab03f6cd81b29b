"""Cross-package fixtures: run the real ``qcore`` command, and install a broken plugin through a real entry point.

The example plugin (``tests/example_plugin``, distribution ``qcore-example``) is pip-installed by
``requirements-test.txt`` like any third-party plugin; only the broken one is faked here."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import warnings
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


def qcore_entry_point():
    """The function behind the installed ``qcore`` command (its console-script entry point)."""
    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "qcore"]
    return ep.load()


@pytest.fixture
def qcore_in_process(capsys):
    """``qcore ARGV`` through the real entry point, called in this process (no torch import per call): returns
    (exit status, stdout, stderr, the Python warnings a user would see: deprecation warnings are hidden by
    Python's default filters outside ``__main__``). Set the environment with monkeypatch before calling."""
    def call(*argv: str) -> tuple[int, str, str, list[str]]:
        main = qcore_entry_point()
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rc = main(list(argv))
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
        shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
        out = capsys.readouterr()
        return rc, out.out, out.err, [f"{w.category.__name__}: {w.message}" for w in shown]
    return call
