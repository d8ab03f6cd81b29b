import gzip

import numpy as np
import pytest

from qcore import QcoreError
from qcore_classification import fashion_mnist as fm


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_embedded_subset_is_the_test_split_and_a_train_sample():
    parts = fm.read_embedded()
    assert parts["test"].images.shape == (10000, 28, 28) and parts["test"].images.dtype == np.uint8
    assert parts["calib"].images.shape == (2048, 28, 28)
    assert np.bincount(parts["test"].labels, minlength=10).tolist() == [1000] * 10
    assert set(np.unique(parts["calib"].labels)) == set(range(10))


def test_idx_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28))
    labels = rng.integers(0, 10, 5)
    for i, lbl in fm._FILES.values():
        _write_idx(tmp_path / f"{i}.gz", imgs)
        _write_idx(tmp_path / f"{lbl}.gz", labels)
    assert fm.has_idx_files(tmp_path)
    s = fm.read_idx_split(tmp_path, "train")
    assert np.array_equal(s.images, imgs) and np.array_equal(s.labels, labels)


def test_truncated_idx_is_refused(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(QcoreError, match="is damaged: its header promises 10 values, the file holds 2"):
        fm._read_idx(p)
