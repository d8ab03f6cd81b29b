import numpy as np
import pytest
import torch

from qcore import QcoreError
from qcore_classification.data import adapt, image_folder, load_data
from qcore_classification.loaders import IMAGENET_MEAN, IMAGENET_STD, InputSpec

GREY = InputSpec(1, 28, (0.5,), (0.25,), crop_pct=1.0)
RGB = InputSpec(3, 32, IMAGENET_MEAN, IMAGENET_STD)


def test_adapt_grey_to_rgb_model_and_back():
    x = torch.rand(2, 1, 28, 28)
    y = adapt(x, RGB)
    assert y.shape == (2, 3, 32, 32)
    # the same grey image in each channel
    assert torch.allclose(y[:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0], y[:, 1] * IMAGENET_STD[1] + IMAGENET_MEAN[1],
                          atol=1e-5)
    z = adapt(torch.full((1, 3, 28, 28), 0.75), GREY)
    assert z.shape == (1, 1, 28, 28) and torch.allclose(z, torch.ones_like(z))


def test_embedded_data_seeded_calibration_from_train():
    a = load_data(None, GREY, calib_size=100, eval_size=50, batch=32, seed=1)
    b = load_data("embedded", GREY, calib_size=100, eval_size=50, batch=32, seed=1)
    c = load_data(None, GREY, calib_size=100, eval_size=50, batch=32, seed=2)
    assert sum(x.shape[0] for x in a.calibration) == 100
    assert torch.equal(torch.cat(a.calibration), torch.cat(b.calibration))
    assert not torch.equal(torch.cat(a.calibration), torch.cat(c.calibration))
    assert sum(y.numel() for _, y in a.evaluation()) == 50
    assert "train-split" in a.description["calibration"] and "test split" in a.description["evaluation"]


def test_missing_data_folder(tmp_path):
    with pytest.raises(QcoreError, match="does not exist"):
        load_data(str(tmp_path / "nope"), GREY, 10, None, 8, 0)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(d / f"{i}.png")
    data = image_folder(tmp_path, RGB, calib_size=4, eval_size=None, batch=2, seed=0, workers=0)
    assert data.num_classes == 2 and sum(x.shape[0] for x in data.calibration) == 4
    xs, ys = zip(*data.evaluation(), strict=True)
    assert torch.cat(xs).shape == (6, 3, 32, 32) and torch.cat(ys).tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "val").rename(tmp_path / "validation")
    with pytest.raises(QcoreError, match="no val/ folder"):
        load_data(str(tmp_path), RGB, 4, None, 2, 0)
