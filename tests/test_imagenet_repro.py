"""bench/imagenet_repro.py runs end to end on a tiny fake ImageNet folder (random PNGs, random-weight checkpoints).

Nothing is downloaded: the models get local state dicts (3 classes, read from the checkpoint by the loader).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torchvision = pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("qcore_recon")
pytest.importorskip("qcore_classification")


def _script():
    spec = importlib.util.spec_from_file_location("imagenet_repro", ROOT / "bench" / "imagenet_repro.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_imagenet(root: Path, classes: int = 3, train: int = 4, val: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return root


def _weights(root: Path) -> Path:
    root.mkdir()
    torch.manual_seed(0)
    for name in ("resnet18", "mobilenet_v2"):
        model = torchvision.models.get_model(name, weights=None, num_classes=3)
        torch.save(model.state_dict(), root / f"{name}.pth")
    return root


def test_imagenet_repro_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("QCORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("QCORE_PROGRESS", "0")
    data = _fake_imagenet(tmp_path / "imagenet")
    weights = _weights(tmp_path / "weights")
    out = tmp_path / "out"
    mod = _script()
    base = ["--data", str(data), "--weights-dir", str(weights), "--iters", "2", "--calib-size", "4",
            "--eval-size", "6", "--input-size", "32", "--device", "cpu", "--out", str(out)]
    assert mod.main([*base, "--methods", "qdrop", "brecq", "--settings", "r18-w4a4"]) == 0
    assert mod.main([*base, "--methods", "qdrop", "--settings", "mbv2-w4a4", "--out", str(tmp_path / "out2")]) == 0

    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| q") or line.startswith("| b")]
    assert len(rows) == 2, table
    for method, published in (("qdrop", "69.10 (paper) / 69.13 (README)"), ("brecq", "69.60 (paper)")):
        row = next(r for r in rows if r.startswith(f"| {method} | r18-w4a4 |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2].startswith("`qcore run --plugin " + method) and "--model tv:resnet18" in cells[2]
        assert re.fullmatch(r"\d+\.\d\d", cells[3]) and re.fullmatch(r"\d+\.\d\d", cells[4]), row  # FP, top-1
        assert cells[5] == published and cells[6].startswith("71.08"), row
        assert (out / f"{method}-r18-w4a4" / "result.json").exists()
    assert "BRECQ's own checkpoints" in table

    mbv2 = (tmp_path / "out2" / "results.md").read_text()
    row = next(r for r in mbv2.splitlines() if r.startswith("| qdrop | mbv2-w4a4 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert "--model tv:mobilenet_v2" in cells[2] and re.fullmatch(r"\d+\.\d\d", cells[4]), row
    assert cells[5] == "67.83 (README)", row
