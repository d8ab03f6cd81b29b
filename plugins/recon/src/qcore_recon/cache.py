"""Per-unit resume: after each unit is reconstructed its learned state is written to disk, so a run killed
mid-way (or repeated) skips the units already done.

Entries live under ``root/<key>/``, keyed by everything that determines them: the quantized model's state when the
pass starts (weights and every quantizer's calibrated parameters), the FP model's state, the calibration batches,
the :class:`~qcore_recon.ReconSettings`, the units and the pass's name -- as RDOQ's curve cache keys its curves.
Because a pass is deterministic (seeded per unit), a unit restored from disk is exactly the unit recomputed. Files
are written atomically (temporary file, then rename), so a kill mid-write never leaves a corrupt entry.
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

import torch
from torch import nn

from qcore import cache_root, hash_update

log = logging.getLogger(__name__)

#: bump when what a unit's entry holds, or how it is computed, changes
VERSION = 1


def default_cache_root() -> Path:
    """``$QCORE_CACHE_DIR`` or ``$XDG_CACHE_HOME/qcore`` (``~/.cache/qcore``), plus ``recon``."""
    return cache_root("recon")


def fingerprint(model: nn.Module, fp_model: nn.Module, batches: Sequence[Any], settings: dict[str, Any]) -> str:
    """Hex digest of both models' states, the batches and ``settings``."""
    h = hashlib.sha256()
    for m in (model, fp_model):
        hash_update(h, dict(m.state_dict()))
    hash_update(h, list(batches))
    h.update(json.dumps({**settings, "version": VERSION}, sort_keys=True, default=str).encode())
    return h.hexdigest()


class UnitCache:
    """One pass's unit entries under ``root/<key[:32]>/``."""

    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key[:32]
        self.hits = 0
        self.writes = 0

    def _path(self, index: int, unit: str) -> Path:
        return self.dir / f"{index:03d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', unit)}.pt"

    def load(self, index: int, unit: str) -> dict[str, Any] | None:
        path = self._path(index, unit)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is recomputed
            log.warning("ignoring unreadable reconstruction cache entry %s: %s", path, exc)
            return None
        self.hits += 1
        return entry

    def save(self, index: int, unit: str, entry: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(entry, fh)
            os.replace(tmp, self._path(index, unit))
            self.writes += 1
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
