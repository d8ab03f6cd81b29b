"""Fashion-MNIST readers: the IDX files (Debian's ``dataset-fashion-mnist``, the original release)
and the subset that ships inside this package.

Fashion-MNIST is (c) Zalando SE, released under the MIT licence
(https://github.com/zalandoresearch/fashion-mnist). The embedded subset in ``data/`` is a copy of its
10,000-image test split and a seeded calibration sample of its training split, under that licence.
"""

from __future__ import annotations

import gzip
import logging
import math
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from qcore import QcoreError

log = logging.getLogger(__name__)

#: Per-pixel statistics of the Fashion-MNIST training split (pixels scaled to [0, 1]).
MEAN = 0.2860
STD = 0.3530
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EMBEDDED_FILE = "fashion_mnist_subset.npz"


@dataclass(frozen=True)
class Split:
    """Images as uint8 ``[N, 28, 28]`` and labels as int64 ``[N]``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _read_idx(path: Path) -> np.ndarray:
    """The array in an unsigned-byte IDX file (gzipped when its name ends in ``.gz``); anything else is a
    :class:`QcoreError` naming the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut-off .gz an EOFError
        raise QcoreError(f"cannot read {path} ({type(exc).__name__}: {exc or 'truncated'}); replace it with the "
                         "Fashion-MNIST IDX file") from None
    fix = "replace it with the Fashion-MNIST IDX file"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise QcoreError(f"{path} is not an unsigned-byte IDX file; {fix}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise QcoreError(f"{path} is truncated in its header; {fix}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise QcoreError(f"{path} is damaged: its header promises {math.prod(dims)} values, the file holds "
                         f"{body.size}; {fix}")
    return body.reshape(dims).copy()  # frombuffer views the read-only bytes; torch wants a writable array


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def has_idx_files(directory: Path) -> bool:
    """True when ``directory`` holds the four Fashion-MNIST IDX files (gzipped or not)."""
    return all(_find(directory, stem) for pair in _FILES.values() for stem in pair)


def read_idx_split(directory: Path, split: str) -> Split:
    """Read ``split`` ("train" or "test") from the IDX files in ``directory``."""
    img_stem, lbl_stem = _FILES[split]
    img_path, lbl_path = _find(directory, img_stem), _find(directory, lbl_stem)
    if img_path is None or lbl_path is None:
        raise QcoreError(f"no Fashion-MNIST {split} IDX files in {directory}")
    images, labels = _read_idx(img_path), _read_idx(lbl_path)
    if images.ndim != 3 or 0 in images.shape:
        raise QcoreError(f"{img_path} holds an array of shape {list(images.shape)}; Fashion-MNIST IDX images are "
                         "[N, rows, cols] (e.g. [10000, 28, 28]): write them with 3 dimensions")
    if labels.ndim != 1:
        raise QcoreError(f"{lbl_path} holds an array of shape {list(labels.shape)}; IDX labels are one number per "
                         "image, [N]")
    if images.shape[0] != labels.shape[0]:
        raise QcoreError(f"{directory}: {images.shape[0]} {split} images but {labels.shape[0]} labels; the IDX "
                         "files do not belong together")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise QcoreError(f"{lbl_path} has labels up to {int(labels.max())}, but Fashion-MNIST has {len(CLASSES)} "
                         f"classes (0..{len(CLASSES) - 1}); these are not Fashion-MNIST labels")
    return Split(images=np.ascontiguousarray(images), labels=labels.astype(np.int64))


def read_embedded() -> dict[str, Split]:
    """The shipped subset: ``{"test": 10,000 test images, "calib": seeded train sample}``."""
    ref = resources.files("qcore_classification") / "data" / EMBEDDED_FILE
    with resources.as_file(ref) as path, np.load(path) as npz:
        return {
            "test": Split(npz["test_images"], npz["test_labels"].astype(np.int64)),
            "calib": Split(npz["calib_images"], npz["calib_labels"].astype(np.int64)),
        }


def make_embedded_subset(source: Path, out: Path, calib_size: int = 2048, seed: int = 0) -> None:
    """Write the embedded subset from the full IDX files (how ``data/`` was made)."""
    train, test = read_idx_split(source, "train"), read_idx_split(source, "test")
    idx = np.sort(np.random.default_rng(seed).choice(len(train), size=calib_size, replace=False))
    np.savez_compressed(
        out,
        test_images=test.images, test_labels=test.labels.astype(np.uint8),
        calib_images=train.images[idx], calib_labels=train.labels[idx].astype(np.uint8),
        calib_indices=idx.astype(np.int32),
    )
    log.info("wrote %s (%d test, %d calibration images)", out, len(test), calib_size)
