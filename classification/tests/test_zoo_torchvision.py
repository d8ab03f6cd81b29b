"""The torchvision models of the zoo (ResNet-18, MobileNetV2 trained by us on Fashion-MNIST at 32 px RGB): they load
from their float16 safetensors, take the 3x32x32 input the data path makes for them, and classify real test images
(cheap: the first 64 embedded test images; the full-test-set top-1 is in the JSON record and BENCHMARKS.md)."""

import json
from importlib import resources

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qcore_classification import fashion_mnist as fm
from qcore_classification.data import adapt, load_data
from qcore_classification.loaders import InputSpec, load_zoo
from qcore_classification.zoo.train import _fit, _to_tensor

TV_ZOO = ("fmnist_tv_resnet18", "fmnist_tv_mobilenetv2")


def _weights(name: str):
    return resources.files("qcore_classification") / "zoo" / "weights" / name


@pytest.mark.parametrize("name", TV_ZOO)
def test_tv_zoo_model_loads_and_classifies(name):
    loaded = load_zoo(name, None)
    assert loaded.num_classes == 10 and (loaded.input.channels, loaded.input.size) == (3, 32)
    assert loaded.input.mean == (fm.MEAN,) * 3 and loaded.input.std == (fm.STD,) * 3
    record = json.loads(_weights(f"{name}.json").read_text())
    assert record["arch"] == name and record["input"] == "3x32x32" and record["storage"] == "float16"
    with resources.as_file(_weights(f"{name}.safetensors")) as path, safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__ <= {torch.float16, torch.int64}
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())  # run in float32
    data = load_data(None, loaded.input, calib_size=1, eval_size=64, batch=64, seed=0)
    (x, y), = list(data.evaluation())
    assert x.shape == (64, 3, 32, 32)
    with torch.no_grad():
        top1 = 100.0 * float((loaded.model(x).argmax(1) == y).float().mean())
    assert top1 >= 60.0, top1  # chance is 10%; the recorded full-test-set top-1 is far above this floor


def test_training_input_is_the_data_paths_input():
    """The training script resizes after normalising (on 28 px batches); the data path (``adapt``) before: the same
    tensors, so the models are evaluated on exactly the input they were trained on."""
    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    spec = InputSpec(3, 32, (fm.MEAN,) * 3, (fm.STD,) * 3, crop_pct=1.0)
    ref = adapt(torch.from_numpy(images).float().div(255.0).unsqueeze(1), spec)
    got = _fit(_to_tensor(images, torch.device("cpu")), "fmnist_tv_mobilenetv2")
    assert got.shape == ref.shape == (5, 3, 32, 32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_zoo_model_without_shipped_weights_is_a_clear_error(tmp_path, monkeypatch):
    """A registered zoo architecture whose weights are not shipped (every shipped one has them now, so a registered
    stand-in plays that part): asking for it without --weights says how to train it; with --weights it loads."""
    from safetensors.torch import save_file

    from qcore import QcoreError
    from qcore_classification.zoo import models

    name = "fmnist_unshipped"
    monkeypatch.setitem(models.ARCHITECTURES, name, models.ARCHITECTURES["fmnist_tv_resnet18"])
    monkeypatch.setitem(models.INPUTS, name, (3, 32))
    with pytest.raises(QcoreError, match=f"no shipped weights yet.*zoo.train --arch {name}"):
        load_zoo(name, None)
    save_file(models.ARCHITECTURES[name](10).state_dict(), str(tmp_path / "r18.safetensors"))
    loaded = load_zoo(name, tmp_path / "r18.safetensors")
    assert (loaded.input.channels, loaded.input.size) == (3, 32)
    assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
