"""On-disk cache of per-layer RD curves, so an interrupted run resumes and a repeated one is instant.

Entries are keyed by everything that determines a curve: the model's weights (a hash of every parameter and
buffer), the calibration samples, the engine, the group size, the candidate bits and the clip estimator.

A cache must never poison a run, so every entry is checked before it is used:

* one file per layer (``<layer>.rdc``): a magic line, a JSON header (shape, dtype, byte count, SHA-256 of the
  values), then the float64 values; an entry that cannot be read, is empty or truncated, has another shape than
  the run needs, fails its checksum or holds NaN/inf is ignored with a warning naming the file, and the layer is
  measured again (and its entry rewritten);
* entries are written to a temporary file in the same folder, flushed and ``fsync``-ed, renamed into place and
  the folder ``fsync``-ed, so a run killed mid-write (even ``kill -9`` or a power cut) leaves at most a
  ``.tmp-*`` file, which is never read; non-finite curves are never written;
* files get the usual permissions (``0666`` less the process umask), not ``mkstemp``'s private ``0600``, so a
  cache shared by a group stays shared;
* two runs on one cache take a lock per entry (``fcntl.flock`` on ``<layer>.rdc.lock``): the second waits for
  the first to finish that layer and then reuses it instead of measuring it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from qcore import cache_root, hash_update, new_file_mode

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux: no locking, concurrent runs may measure a layer twice
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAGIC = b"QCORE-RD-CURVES 1\n"
SUFFIX = ".rdc"
_DTYPE = np.dtype("<f8")


def default_cache_root() -> Path:
    """``$QCORE_CACHE_DIR`` or ``$XDG_CACHE_HOME/qcore`` (``~/.cache/qcore``), plus ``rdoq``."""
    return cache_root("rdoq")


def fingerprints(model: nn.Module, batches: Sequence[Any], settings: Sequence[dict[str, Any]]) -> list[str]:
    """Hex digest of the model's state, the calibration batches and each of ``settings`` (the model and the
    batches are hashed once for all of them)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        hash_update(h, t)
    for b in batches:
        hash_update(h, b)
    out = []
    for s in settings:
        hs = h.copy()
        hs.update(json.dumps(s, sort_keys=True, default=str).encode())
        out.append(hs.hexdigest())
    return out


def encode_entry(arr: np.ndarray) -> bytes:
    """The bytes of one cache entry: magic line, JSON header with the checksum, float64 values."""
    values = np.ascontiguousarray(arr, dtype=_DTYPE)
    body = values.tobytes()
    header = {"shape": list(values.shape), "dtype": _DTYPE.str, "bytes": len(body),
              "sha256": hashlib.sha256(body).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body


def decode_entry(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The values of an entry written by :func:`encode_entry`; ``ValueError`` saying what is wrong otherwise."""
    if not raw:
        raise ValueError("the file is empty")
    if not raw.startswith(MAGIC):
        raise ValueError("not an RD curve cache entry (bad magic; written by another qcore-rdoq?)")
    end = raw.find(b"\n", len(MAGIC))
    if end < 0:
        raise ValueError("truncated header")
    try:
        header = json.loads(raw[len(MAGIC):end])
        stored_shape = tuple(int(v) for v in header["shape"])
        dtype, size, digest = np.dtype(header["dtype"]), int(header["bytes"]), str(header["sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable header ({exc})") from None
    body = raw[end + 1:]
    if len(body) != size:
        raise ValueError(f"truncated: {len(body)} of {size} bytes")
    if hashlib.sha256(body).hexdigest() != digest:
        raise ValueError("checksum mismatch (the values were changed or damaged)")
    if dtype != _DTYPE or stored_shape != tuple(shape) or size != _DTYPE.itemsize * int(np.prod(shape)):
        raise ValueError(f"holds {dtype} values of shape {stored_shape}, this run needs float64 {tuple(shape)}")
    arr = np.frombuffer(body, dtype=_DTYPE).reshape(shape).copy()
    if not np.isfinite(arr).all():
        raise ValueError("holds NaN or infinite values")
    return arr


class CurveCache:
    """Per-layer curve files under ``root/<fingerprint>/`` (see the module docstring)."""

    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key[:32]
        self.hits = 0
        self.writes = 0

    def _stem(self, layer: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", layer)

    def _path(self, layer: str) -> Path:
        return self.dir / (self._stem(layer) + SUFFIX)

    @contextlib.contextmanager
    def locked(self, layer: str | None = None) -> Iterator[None]:
        """Hold the lock of ``layer``'s entry (None: of the whole folder) while the block runs: another run
        that wants the same entry waits, then finds it written."""
        path = self.dir / (".all.lock" if layer is None else self._stem(layer) + SUFFIX + ".lock")
        with contextlib.ExitStack() as stack:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                fh = stack.enter_context(open(path, "a+b"))
            except OSError as exc:  # the cache went away or read-only mid-run: measure without it, do not fail
                log.warning("cannot lock RD curve cache entry %s (%s); measuring without the lock", path,
                            exc.strerror or exc)
                fh = None
            if fh is not None and fcntl is not None:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("RD cache: waiting for another run to finish %s", path.name[:-len(".lock")])
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                stack.callback(fcntl.flock, fh.fileno(), fcntl.LOCK_UN)
            yield

    def load(self, layer: str, shape: tuple[int, int]) -> np.ndarray | None:
        """``layer``'s cached curves of ``shape``, or None when there is no usable entry (a damaged or
        inconsistent one is reported with a warning naming its file, and the layer is measured again)."""
        path = self._path(layer)
        if not path.is_file():
            return None
        try:
            arr = decode_entry(path.read_bytes(), shape)
        except (OSError, ValueError) as exc:
            log.warning("ignoring RD curve cache entry %s (%s); measuring layer %s again", path, exc, layer)
            return None
        self.hits += 1
        return arr

    def save(self, layer: str, arr: np.ndarray) -> None:
        """Write ``layer``'s curves durably and atomically; non-finite curves are refused (not cached), and a
        cache that cannot be written costs a warning, not the run."""
        if not np.isfinite(arr).all():
            log.warning("not caching the RD curves of layer %s: they hold NaN or infinite values", layer)
            return
        data = encode_entry(arr)
        tmp: str | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=self.dir)
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), new_file_mode())
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path(layer))
            tmp = None
            _fsync_dir(self.dir)
            self.writes += 1
        except OSError as exc:
            log.warning("could not write RD curve cache entry %s (%s); the run goes on without it",
                        self._path(layer), exc.strerror or exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)
