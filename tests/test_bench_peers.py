"""bench/peers: the shared data export and loader every peer reads, the FP model loader and the table writer.

Only needs torch and qcore's classification package; the peers themselves never run in CI.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "bench" / "peers"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "peers" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there; run_all's `import common` finds it
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "bench" / "peers"))


def test_export_matches_qcore_calibration_and_evaluation(tmp_path: Path) -> None:
    from qcore_classification.data import fashion_mnist_embedded
    from qcore_classification.loaders import load_zoo

    common = _load("common")
    desc = common.export_data(tmp_path / "d.npz", calib_size=64, seed=3)
    data = common.load_data(tmp_path / "d.npz")
    assert data.calib.shape == (64, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.test_y.dtype == torch.int64 and sorted(set(data.test_y.tolist())) == list(range(10))
    assert data.description == desc and "64 images (seed 3)" in desc["calibration"]
    # the same images, in the same order, as qcore's own pipeline picks for --calib-size 64 --seed 3
    ref = fashion_mnist_embedded(load_zoo("fmnist_resnet", None).input, 64, 100, 50, 3)
    assert torch.equal(data.calib, torch.cat(ref.calibration))
    xs, ys = zip(*ref.evaluation(), strict=True)
    assert torch.equal(data.test_x[:100], torch.cat(xs)) and torch.equal(data.test_y[:100], torch.cat(ys))
    # the shipped FP ResNet through the peers' loader and evaluation loop classifies these images
    data.test_x, data.test_y = data.test_x[:200], data.test_y[:200]
    model = common.load_model("fmnist_resnet")
    assert common.first_last(model) == ("stem.0", "fc")
    assert common.evaluate(model, data, batch=100) > 85.0


def test_table_lists_failures_with_their_error(tmp_path: Path) -> None:
    common = _load("common")
    run_all = _load("run_all")
    ok = common.Result("fmnist_resnet", "qcore", "0.1.0", "uniform", 4, 4, first_last="8-bit (W8A8)",
                       top1=93.5, fp_top1=94.65, calibration_seconds=2.0)
    bad = common.Result("fmnist_resnet", "nncf", "3.4.0", "ptq", 4, 4, fp_top1=94.65, error="ValueError: no 4-bit")
    common.write_result(tmp_path / "fmnist_resnet" / "qcore" / "a", ok)
    common.write_result(tmp_path / "fmnist_resnet" / "nncf" / "b", bad)
    assert set(json.loads((tmp_path / "fmnist_resnet" / "qcore" / "a" / "result.json").read_text())) >= {
        "model", "toolkit", "version", "method", "w_bits", "a_bits", "first_last", "residual_adds", "weights",
        "activations", "deployable", "top1", "calibration_seconds", "error"}
    text = run_all.table(tmp_path, "fmnist_resnet")
    stamp = json.loads((tmp_path / "fmnist_resnet" / "qcore" / "a" / "result.json").read_text())["measured"]
    assert stamp.endswith(" UTC") and f"2 rows measured on {ok.machine}, {stamp}" in text.splitlines()[0]
    assert "| W4A4 | qcore 0.1.0 | uniform | 93.50 | -1.15 | 2.0 | 8-bit (W8A8) |" in text
    assert "failed: ValueError: no 4-bit" in text


def test_torchvision_zoo_models_get_their_own_export(tmp_path: Path) -> None:
    """MobileNetV2 (3x32x32 input) reads data-3x32.npz: the same picked images, adapted by qcore's data path."""
    from qcore_classification.data import fashion_mnist_embedded
    from qcore_classification.loaders import load_zoo

    common = _load("common")
    assert common.data_file(tmp_path, "fmnist_vit") == tmp_path / "data.npz"
    path = common.data_file(tmp_path, "fmnist_tv_mobilenetv2")
    assert path == tmp_path / "data-3x32.npz" and common.data_file(tmp_path, "fmnist_tv_resnet18") == path
    common.export_data(path, calib_size=8, seed=0, model="fmnist_tv_mobilenetv2", eval_size=16)
    data = common.load_data(path)
    assert data.calib.shape == (8, 3, 32, 32) and data.test_x.shape == (16, 3, 32, 32)
    ref = fashion_mnist_embedded(load_zoo("fmnist_tv_mobilenetv2", None).input, 8, 16, 16, 0)
    assert torch.equal(data.calib, torch.cat(ref.calibration))
    assert torch.equal(data.test_x[:16], next(iter(ref.evaluation()))[0])
    model = common.load_model("fmnist_tv_mobilenetv2")  # float16 on disk, float32 here
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert common.first_last(model) == ("features.0.0", "classifier.1")
