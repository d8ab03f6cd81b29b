"""Writing run outputs atomically: every file goes to a temporary name in the target folder and is renamed
into place only after all of them were written, so a failed run leaves no half-written result."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qcore._errors import QcoreError


def _serialise(value: Any) -> str | bytes:
    if isinstance(value, bytes):  # a binary artifact (a PNG plot) is written as it is
        return value
    if hasattr(value, "to_json"):
        return str(value.to_json()) + "\n"
    return json.dumps(value, indent=1, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)) + "\n"


def _read_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``); elsewhere by
    setting and restoring it (a moment in which another thread's new file would get ``022``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits a newly created file gets in this process: ``0666`` less the umask (``mkstemp`` files
    start at ``0600``; give them these with ``os.fchmod``)."""
    return 0o666 & ~_read_umask()


def _usual_mode(fd: int) -> None:
    """Give a ``mkstemp`` file (created ``0600``) the mode any new file gets: ``0666`` less the umask."""
    os.fchmod(fd, new_file_mode())


def read_text_file(path: Path, what: str, fix: str) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or binary file is a :class:`QcoreError` naming ``what``
    it should have been and the ``fix``."""
    if not str(path) or str(path) == ".":  # Path("") is "."
        raise QcoreError(f"the {what} path is empty; {fix}")
    if path.is_dir():
        raise QcoreError(f"{what} {path} is a folder, not a file; {fix}")
    if not path.is_file():
        raise QcoreError(f"{what} {path} does not exist; {fix}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QcoreError(f"cannot read {what} {path} ({type(exc).__name__}); {fix}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        _usual_mode(fd)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(out: Path, files: Mapping[str, Any]) -> None:
    """Write JSON documents (dicts or objects with ``to_json``) and binary files (``bytes``) into ``out``, all or
    none. Names may contain sub-folders (``plots/rd.png``)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QcoreError(f"cannot create output folder {out}: {exc.strerror}; choose another --out") from None
    texts = {name: _serialise(value) for name, value in files.items()}  # fail before touching the disk
    staged: list[tuple[str, Path]] = []
    try:
        for name, text in texts.items():
            final = out / name
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
            staged.append((tmp, final))
            _usual_mode(fd)
            with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as fh:
                fh.write(text)
        for tmp, final in staged:
            os.replace(tmp, final)
    except OSError as exc:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise QcoreError(f"cannot write results into {out}: {exc.strerror or exc}; choose another --out") from None
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
