"""Run outputs are written with the permissions any new file gets (the umask), not mkstemp's private 0600."""

from __future__ import annotations

import os

import pytest

from qcore._outputs import atomic_write_text, write_outputs


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_outputs(tmp_path / "out", {"result.json": {"a": 1}, "plots/x.png": b"\x89PNG"})
        atomic_write_text(tmp_path / "note.txt", "hi")
    finally:
        os.umask(old)
    for path in (tmp_path / "out" / "result.json", tmp_path / "out" / "plots" / "x.png", tmp_path / "note.txt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
