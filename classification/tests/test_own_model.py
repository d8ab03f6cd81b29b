"""The user's own model in-process: preprocessing overrides, constructor arguments for torchvision/timm, and
``py:file.py:function`` models (with their weights and their mistakes)."""

import pytest
import torch
import torchvision

from qcore import QcoreError
from qcore_classification.loaders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputSpec,
    load_python,
    load_timm,
    load_torchvision,
    load_zoo,
)

RGB = InputSpec(3, 224, IMAGENET_MEAN, IMAGENET_STD)
GREY = InputSpec(1, 28, (0.286,), (0.353,), crop_pct=1.0)

NET = '''
import torch
from torch import nn

from helper import WIDTH  # the user's file may import its neighbours


def build(width=WIDTH, classes=10, act="relu", bias=True):
    torch.manual_seed(0)
    act_layer = {"relu": nn.ReLU, "gelu": nn.GELU}[act]
    return nn.Sequential(nn.Conv2d(3, width, 3, bias=bias), act_layer(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))


def broken():
    raise ValueError("no GPU here")


SIZE = 3
'''


@pytest.fixture
def net_file(tmp_path):
    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "helper.py").write_text("WIDTH = 5\n")
    return tmp_path / "net.py"


def test_input_overrides():
    assert RGB.override({}) is RGB
    s = RGB.override({"size": 32, "mean": (0.286,), "std": (0.353,)})
    assert s == InputSpec(3, 32, (0.286,) * 3, (0.353,) * 3, RGB.crop_pct)  # one value: every channel
    assert RGB.override({"std": (0.1, 0.2, 0.3)}).std == (0.1, 0.2, 0.3)
    assert GREY.override({"channels": 3}).mean == (0.286,) * 3
    assert RGB.override({"channels": 1, "mean": (0.5,), "std": (0.5,)}) == InputSpec(1, 224, (0.5,), (0.5,))
    with pytest.raises(QcoreError, match=r"--mean has 2 values but the model takes 3 channel\(s\); give one value"):
        RGB.override({"mean": (0.1, 0.2)})
    with pytest.raises(QcoreError, match=r"model's mean .* has 3 values but --channels is 1; give --mean and --std"):
        RGB.override({"channels": 1})
    with pytest.raises(QcoreError, match="--channels 2: images can be fed to 1-channel"):
        RGB.override({"channels": 2})


def test_python_model_with_arguments_and_weights(net_file, tmp_path):
    loaded = load_python(f"{net_file}:build", None, {"width": 6, "act": "gelu", "bias": False})
    model = loaded.model
    assert model[0].out_channels == 6 and model[0].bias is None and isinstance(model[1], torch.nn.GELU)
    assert loaded.num_classes == 10 and loaded.input == RGB and not model.training
    assert load_python(f"{net_file}:build", None).model[0].out_channels == 5  # the default from helper.py
    trained = load_python(f"{net_file}:build", None, {"classes": 4}).model
    with torch.no_grad():
        trained[-1].weight.add_(1.0)
    torch.save(trained.state_dict(), tmp_path / "net.pth")
    again = load_python(f"{net_file}:build", tmp_path / "net.pth", {"classes": 4})
    assert torch.equal(again.model[-1].weight, trained[-1].weight) and again.weights == str(tmp_path / "net.pth")
    with pytest.raises(QcoreError, match="do not fit the model"):
        load_python(f"{net_file}:build", tmp_path / "net.pth")  # 10 classes built, 4 in the checkpoint


@pytest.mark.parametrize("name,args,message", [
    ("{f}:SIZE", {}, r"net.py has a non-callable 'SIZE'; functions defined there: broken, build"),
    ("{f}:broken", {}, r"could not build py:.*net.py:broken with no arguments \(ValueError: no GPU here\)"),
    ("{f}:build", {"depth": 3}, r"py:.*net.py:build takes no constructor argument 'depth'"),
    ("{f}:build", {"act": "swish"}, r"could not build .* with act='swish' \(KeyError: 'swish'\)"),
    ("{f}", {}, r"needs the form py:path/to/file.py:function"),
    ("{d}/syntax.py:build", {}, r"running .*syntax.py failed \(SyntaxError: "),
])
def test_python_model_mistakes(net_file, name, args, message):
    (net_file.parent / "syntax.py").write_text("def build(:\n")
    with pytest.raises(QcoreError, match=message):
        load_python(name.format(f=net_file, d=net_file.parent), None, args)


def test_torchvision_and_timm_constructor_arguments(tmp_path):
    from safetensors.torch import save_file

    ref = torchvision.models.get_model("mobilenet_v2", weights=None, num_classes=5, width_mult=0.5)
    torch.save(ref.state_dict(), tmp_path / "mnv2.pth")
    loaded = load_torchvision("mobilenet_v2", tmp_path / "mnv2.pth", {"width_mult": 0.5})
    assert loaded.num_classes == 5 and torch.equal(loaded.model.features[0][0].weight, ref.features[0][0].weight)
    with pytest.raises(QcoreError, match="do not fit the model"):  # built without the argument: other shapes
        load_torchvision("mobilenet_v2", tmp_path / "mnv2.pth")
    with pytest.raises(QcoreError, match="tv:mobilenet_v2 takes no constructor argument 'width'"):
        load_torchvision("mobilenet_v2", tmp_path / "mnv2.pth", {"width": 0.5})
    with pytest.raises(QcoreError, match="--model-arg weights is set by qcore"):
        load_torchvision("mobilenet_v2", None, {"weights": "DEFAULT"})

    import timm

    vit_args = {"img_size": 32, "patch_size": 4, "depth": 1, "embed_dim": 48}
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **vit_args)
    save_file(ref.state_dict(), str(tmp_path / "vit.safetensors"))
    loaded = load_timm("vit_tiny_patch16_224", tmp_path / "vit.safetensors", vit_args)
    assert loaded.num_classes == 10 and loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(QcoreError, match="timm:vit_tiny_patch16_224 takes no constructor argument 'patchsize'"):
        load_timm("vit_tiny_patch16_224", None, {"patchsize": 4})  # refused before any download
    with pytest.raises(QcoreError, match="--model-arg pretrained is set by qcore"):
        load_timm("vit_tiny_patch16_224", None, {"pretrained": True})


def test_zoo_models_take_no_constructor_arguments():
    with pytest.raises(QcoreError, match="zoo models are built as trained and take no --model-arg"):
        load_zoo("fmnist_resnet", None, {"width": 3})
