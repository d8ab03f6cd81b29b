import pytest
import torch
import torchvision

from qcore import QcoreError
from qcore_classification.loaders import load_timm, load_torchvision, load_zoo, read_state_dict


def test_zoo_models_load_shipped_weights():
    for name in ("fmnist_resnet", "fmnist_vit"):
        loaded = load_zoo(name, None)
        assert loaded.num_classes == 10 and loaded.input.channels == 1 and loaded.input.size == 28
        assert loaded.model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_checkpoint_sets_class_count(tmp_path):
    ref = torchvision.models.get_model("resnet18", weights=None, num_classes=7)
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "r18.pth")
    loaded = load_torchvision("resnet18", tmp_path / "r18.pth")
    assert loaded.num_classes == 7 and loaded.model.fc.out_features == 7
    assert torch.equal(loaded.model.fc.weight, ref.fc.weight)


def test_timm_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    save_file(ref.state_dict(), str(tmp_path / "m.safetensors"))
    loaded = load_timm("resnet10t", tmp_path / "m.safetensors")
    assert loaded.num_classes == 3 and loaded.input.channels == 3


def test_corrupt_and_mismatched_weights(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(QcoreError, match="cannot read weights file"):
        read_state_dict(bad)
    (tmp_path / "bad.pth").write_bytes(b"\x80\x04garbage")
    with pytest.raises(QcoreError, match="cannot read weights file"):
        read_state_dict(tmp_path / "bad.pth")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(QcoreError, match="do not fit the model"):
        load_zoo("fmnist_resnet", tmp_path / "other.pth")
    with pytest.raises(QcoreError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")


def test_nan_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    state = load_zoo("fmnist_resnet", None).model.state_dict()
    state["fc.weight"] = state["fc.weight"].clone()
    state["fc.weight"][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(QcoreError, match="NaN or infinite"):
        load_zoo("fmnist_resnet", tmp_path / "nan.safetensors")


def test_unknown_models():
    with pytest.raises(QcoreError, match="unknown zoo model"):
        load_zoo("nope", None)
    with pytest.raises(QcoreError, match="unknown torchvision model"):
        load_torchvision("nope", None)
