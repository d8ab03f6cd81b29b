"""``qcore run`` on the user's own model: a timm ViT built with ``--model-arg`` and fine-tuned (here: trained in
the test) on Fashion-MNIST IDX files at 3x32x32 with the data's mean/std, ``py:file.py:function`` models, and
the mistakes there as one line with exit status 2 (classification/tests/test_own_model.py checks the rest of
them in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qcore_classification import fashion_mnist as fm

MEAN, STD = 0.2860, 0.3530
VIT = "timm:vit_tiny_patch16_224"
# img_size/patch_size as in the user's fine-tuning; depth/embed_dim/global_pool keep the test model small and
# quick to train (and show int and str values reaching timm)
VIT_ARGS = {"img_size": 32, "patch_size": 4, "depth": 1, "embed_dim": 48, "global_pool": "avg"}
N_TEST = 400


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _preprocess(images: np.ndarray) -> torch.Tensor:
    """What the user did when fine-tuning: grey -> 3 channels, resize to 32, normalise with the data's stats."""
    x = torch.from_numpy(images).float().div(255.0).unsqueeze(1).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return (x - MEAN) / STD


@pytest.fixture(scope="module")
def fmnist_vit(tmp_path_factory) -> dict[str, object]:
    """A Fashion-MNIST IDX folder (the embedded train sample and test images) and a small timm ViT trained on it
    for a few hundred steps, saved as safetensors; its FP top-1 on the first evaluation images, computed here."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("own_model")
    data = root / "fmnist"
    data.mkdir()
    parts = fm.read_embedded()
    train, test = parts["calib"], parts["test"]
    for split, (img_name, lbl_name) in fm._FILES.items():
        src = train if split == "train" else fm.Split(test.images[:N_TEST], test.labels[:N_TEST])
        _write_idx(data / img_name, src.images)
        _write_idx(data / lbl_name, src.labels)

    torch.manual_seed(0)
    model = timm.create_model(VIT[5:], pretrained=False, num_classes=10, **VIT_ARGS)
    x, y = _preprocess(train.images), torch.from_numpy(train.labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    n_eval = 200
    with torch.no_grad():
        pred = model(_preprocess(test.images[:n_eval])).argmax(1)
    top1 = 100.0 * float((pred == torch.from_numpy(test.labels[:n_eval])).float().mean())
    weights = root / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return {"data": data, "weights": weights, "top1": top1, "n_eval": n_eval}


def test_timm_vit_with_model_args_and_input_flags(qcore_cli, tmp_path, fmnist_vit):
    assert fmnist_vit["top1"] >= 50.0  # the test model has learnt something: chance is 10%
    margs = [a for k, v in VIT_ARGS.items() for a in ("--model-arg", f"{k}={v}")]
    p = qcore_cli("run", "--model", VIT, *margs, "--weights", str(fmnist_vit["weights"]),
                  "--data", str(fmnist_vit["data"]), "--input-size", "32", "--mean", str(MEAN), "--std", str(STD),
                  "--w-bits", "8", "--a-bits", "8", "--eval-size", str(fmnist_vit["n_eval"]), "--calib-size", "32",
                  "--out", "out")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "out" / "result.json").read_text())
    # qcore feeds the model what it was trained on: its FP accuracy is the one measured in the test (a
    # different resize or normalisation would move it), far above chance
    assert abs(r["fp"] - fmnist_vit["top1"]) <= 1.0, (r["fp"], fmnist_vit["top1"])
    assert r["fp"] >= 50.0 and abs(r["quant"] - r["fp"]) <= 5.0
    assert r["data"]["input"].startswith("3x32x32, normalised with mean (0.286, 0.286, 0.286) "
                                         "std (0.353, 0.353, 0.353)")
    assert r["data"]["model_args"] == "img_size=32, patch_size=4, depth=1, embed_dim=48, global_pool='avg'"
    assert "Fashion-MNIST test split" in r["data"]["evaluation"]


def test_timm_vit_from_yaml_recipe(qcore_cli, tmp_path, fmnist_vit):
    """The same run from a recipe's ``input:`` and ``model_args:``; a flag overrides one input key."""
    (tmp_path / "r.yaml").write_text(
        f"model: {VIT}\nweights: {fmnist_vit['weights']}\ndata: {fmnist_vit['data']}\n"
        f"input: {{size: 48, mean: {MEAN}, std: [{STD}, {STD}, {STD}]}}\n"
        f"model_args: {json.dumps(VIT_ARGS)}\n"
        f"eval_size: {fmnist_vit['n_eval']}\ncalib_size: 32\nw_bits: 8\na_bits: 8\n")
    p = qcore_cli("run", "--config", "r.yaml", "--input-size", "32", "--out", "out")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "out" / "result.json").read_text())
    assert abs(r["fp"] - fmnist_vit["top1"]) <= 1.0 and r["data"]["input"].startswith("3x32x32")


NET = '''
from torch import nn


def grey_net(width=4, classes=10):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))


def rgb_net(width=4):
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def not_a_model():
    return {"layers": 3}


def broken():
    raise ValueError("no GPU here")


SIZE = 3
'''


def test_python_file_builds_the_model(qcore_cli, tmp_path):
    (tmp_path / "net.py").write_text(NET)
    p = qcore_cli("run", "--model", "py:net.py:grey_net", "--model-arg", "width=6", "--channels", "1",
                  "--input-size", "28", "--mean", str(MEAN), "--std", str(STD), "--w-bits", "8", "--a-bits", "8",
                  "--eval-size", "64", "--calib-size", "16", "--out", "out")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "out" / "result.json").read_text())
    assert r["model"] == "py:net.py:grey_net" and r["quantized"]["weight_layers"] == ["0", "4"]
    params = (1 * 6 * 9 + 6) + (6 * 10 + 10)  # width=6 reached the function (4 would give 90)
    assert r["fp_size_mb"] == pytest.approx(params * 4 / 2**20)
    assert r["data"]["input"].startswith("1x28x28") and r["data"]["model_args"] == "width=6"


BAD = [
    (["--model", "py:nosuch.py:build"], "model file nosuch.py does not exist"),
    (["--model", "py:net.py:build"], "net.py defines no function 'build'; functions defined there: broken, "
                                     "grey_net, not_a_model, rgb_net"),
    (["--model", "py:net.py:not_a_model"], "not_a_model() in net.py returned dict, not a torch.nn.Module"),
    (["--model", VIT, "--model-arg", "img_size=32", "--model-arg", "patchsize=4"],
     "timm:vit_tiny_patch16_224 takes no constructor argument 'patchsize'"),
    (["--model", "py:net.py:rgb_net", "--mean", "0.1,0.2"], "--mean has 2 values but the model takes 3 channel(s)"),
    (["--model", "py:net.py:rgb_net", "--input-size", "2"], "model py:net.py:rgb_net fails on 3x2x2 inputs"),
    (["--task", "detection", "--model-arg", "voxel=0.1"], "task 'detection' does not take --model-arg"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_model_input_is_one_line_exit_2(qcore_cli, tmp_path, args, message):
    (tmp_path / "net.py").write_text(NET)
    p = qcore_cli("run", *args, "--eval-size", "8", "--calib-size", "8", "--out", "o")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcore: error: "), p.stderr
    assert message in lines[0], lines[0]
    assert not (tmp_path / "o").exists()
