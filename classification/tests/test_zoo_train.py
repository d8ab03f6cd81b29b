"""The zoo training script's continuation stage (``--init``, ``--train-skip``): it starts from the given weights,
trains on images the first stage did not see, and records both stages (cheap: the 0.17 M-parameter zoo ResNet on a
few hundred synthetic IDX images)."""

import gzip
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qcore import QcoreError
from qcore_classification import fashion_mnist as fm
from qcore_classification.zoo.train import subset_indices, train


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("test", 20)):
        images_stem, labels_stem = fm._FILES[split]
        _write_idx(tmp_path / f"{images_stem}.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{labels_stem}.gz", rng.integers(0, 10, n))
    return tmp_path


def test_train_skip_selects_images_the_first_stage_did_not_see():
    first = subset_indices(60000, 0, 0, 30000)
    rest = subset_indices(60000, 0, 30000, None)
    assert len(first) == len(rest) == 30000
    assert sorted(torch.cat([first, rest]).tolist()) == list(range(60000))  # disjoint halves of one order
    assert subset_indices(60000, 0) is None and subset_indices(60000, 0, 0, 60000) is None


def test_continuation_starts_from_init_and_records_both_stages(idx_dir, tmp_path):
    first = train("fmnist_resnet", idx_dir, tmp_path / "s1", epochs=1, seed=0, device="cpu", train_size=200)
    assert [st["images_seen"] for st in first["stages"]] == [200] and first["stages"][0]["init"] is None
    init = tmp_path / "s1" / "fmnist_resnet.safetensors"
    # lr 0: the weights must stay exactly those of --init (only BN running statistics move), which proves they
    # were loaded rather than freshly initialised
    second = train("fmnist_resnet", idx_dir, tmp_path / "s2", epochs=1, seed=0, device="cpu", train_skip=200,
                   init=init, lr=0.0)
    assert [st["images_seen"] for st in second["stages"]] == [200, 100] and second["images_seen_total"] == 300
    assert second["stages"][0]["command"] == first["command"] and second["stages"][1]["init"].startswith(init.name)
    assert "images 200..300 of 60,000 in seed-0 order" in second["data"]
    assert all(st["cpu_seconds"] >= 0 and st["train_seconds"] >= 0 for st in second["stages"])
    w1, w2 = load_file(str(init)), load_file(str(tmp_path / "s2" / "fmnist_resnet.safetensors"))
    assert torch.equal(w1["stem.0.weight"], w2["stem.0.weight"]) and torch.equal(w1["fc.weight"], w2["fc.weight"])
    assert json.loads((tmp_path / "s2" / "fmnist_resnet.json").read_text())["stages"] == second["stages"]


def test_init_from_another_architecture_is_a_clear_error(idx_dir, tmp_path):
    train("fmnist_resnet", idx_dir, tmp_path / "s1", epochs=1, seed=0, device="cpu", train_size=130)
    with pytest.raises(QcoreError, match="trained as 'fmnist_resnet', not 'fmnist_vit'"):
        train("fmnist_vit", idx_dir, tmp_path / "s2", epochs=1, seed=0, device="cpu",
              init=tmp_path / "s1" / "fmnist_resnet.safetensors")
