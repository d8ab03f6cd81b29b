"""On-disk cache of per-layer RD curves, so an interrupted run resumes and a repeated one is instant.

Entries are keyed by everything that determines a curve: the model's weights (a hash of every parameter and
buffer), the calibration samples, the engine, the group size, the candidate bits and the clip estimator.
Each layer's curves are one ``.npy`` file written atomically (temporary file, then rename), so a run killed
mid-write never leaves a corrupt entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """``$QCORE_CACHE_DIR`` or ``$XDG_CACHE_HOME/qcore`` (``~/.cache/qcore``), plus ``rdoq``."""
    base = os.environ.get("QCORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qcore")
    return Path(base) / "rdoq"


def _update(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _update_batch(h: Any, b: Any) -> None:
    """Hash a batch: tensors by content, nested in dicts / lists / tuples (a detection batch_dict), the rest
    by ``repr``."""
    if isinstance(b, torch.Tensor):
        _update(h, b)
    elif isinstance(b, dict):
        for k in sorted(b, key=str):
            h.update(str(k).encode())
            _update_batch(h, b[k])
    elif isinstance(b, (list, tuple)):
        for v in b:
            _update_batch(h, v)
    else:
        h.update(repr(b).encode())


def fingerprints(model: nn.Module, batches: Sequence[Any], settings: Sequence[dict[str, Any]]) -> list[str]:
    """Hex digest of the model's state, the calibration batches and each of ``settings`` (the model and the
    batches are hashed once for all of them)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        _update(h, t)
    for b in batches:
        _update_batch(h, b)
    out = []
    for s in settings:
        hs = h.copy()
        hs.update(json.dumps(s, sort_keys=True, default=str).encode())
        out.append(hs.hexdigest())
    return out


class CurveCache:
    """Per-layer curve files under ``root/<fingerprint>/``."""

    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key[:32]
        self.hits = 0
        self.writes = 0

    def _path(self, layer: str) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", layer) + ".npy")

    def load(self, layer: str, shape: tuple[int, int]) -> np.ndarray | None:
        path = self._path(layer)
        if not path.is_file():
            return None
        try:
            arr = np.load(path)
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable RD cache entry %s: %s", path, exc)
            return None
        if arr.shape != shape:
            return None
        self.hits += 1
        return arr

    def save(self, layer: str, arr: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, arr)
            os.replace(tmp, self._path(layer))
            self.writes += 1
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
