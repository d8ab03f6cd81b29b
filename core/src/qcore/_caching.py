"""What plugins that cache results on disk share: where caches live and how their keys hash tensors.

RDOQ's curve cache and qcore-recon's per-block cache key their entries by the content of the model, the
calibration data and the settings; both use :func:`hash_update`, so two plugins (or two versions of one) never
disagree on what "the same model and data" means.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def cache_root(name: str) -> Path:
    """The cache folder of ``name`` (a plugin's cache): ``$QCORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/qcore``
    (``~/.cache/qcore``), plus ``name``."""
    base = os.environ.get("QCORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qcore")
    return Path(base) / name


def cache_root_problem(root: Path) -> str | None:
    """Why ``root`` cannot hold a cache (a file is in the way, or the nearest existing folder is not writable),
    or None when it can; checks without creating anything that stays."""
    probe = root
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return (f"{probe} is a file, not a folder" if probe == root
                else f"{probe} is a file, so {root} cannot be a folder")
    try:  # an anonymous file (O_TMPFILE: nothing appears in the folder); access() says yes to root
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        return f"cannot write in {probe} ({exc.strerror or exc})"
    return None


def hash_update(h: Any, value: Any) -> None:
    """Feed ``value`` into the hash object ``h`` (``hashlib``): tensors by shape, dtype and content, nested in
    dicts (keys sorted), lists and tuples (a detection batch_dict, a state dict); anything else by ``repr``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            hash_update(h, value[k])
    elif isinstance(value, (list, tuple)):
        for v in value:
            hash_update(h, v)
    else:
        h.update(repr(value).encode())
