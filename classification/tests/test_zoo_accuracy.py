"""The shipped zoo weights reach the FP accuracy recorded next to them (full 10k test set)."""

import json
from importlib import resources

import pytest

from qcore_classification.data import load_data
from qcore_classification.loaders import load_zoo
from qcore_classification.task import evaluate


@pytest.mark.slow
@pytest.mark.parametrize("name,floor", [("fmnist_resnet", 92.0), ("fmnist_vit", 88.0),
                                       ("fmnist_tv_resnet18", 85.0), ("fmnist_tv_mobilenetv2", 85.0)])
def test_zoo_fp_accuracy(name, floor):
    loaded = load_zoo(name, None)
    data = load_data(None, loaded.input, calib_size=1, eval_size=None, batch=500, seed=0)
    top1 = evaluate(loaded.model, data)["top1"]
    record = json.loads((resources.files("qcore_classification") / "zoo" / "weights" / f"{name}.json").read_text())
    assert top1 >= floor
    assert abs(top1 - record["test_top1_fp32_cpu"]) < 0.05  # the same number the training run recorded
