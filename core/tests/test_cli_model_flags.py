"""``--input-size/--mean/--std/--channels`` and ``--model-arg``: parsing, the YAML recipe's ``input:`` and
``model_args:`` (flags win key by key), validation, and refusal by tasks that do not take them."""

import pytest

from qcore._cli import build_parser, config_from_args
from qcore._components import RunConfig
from qcore._errors import QcoreError
from qcore._options import parse_scalar
from qcore.testing import make_host, run_tiny


def _config(*argv: str):
    return config_from_args(build_parser().parse_args(["run", *argv]))


@pytest.mark.parametrize("text,value", [
    ("32", 32), ("-4", -4), ("0.5", 0.5), ("1e-3", 1e-3), (".25", 0.25), ("true", True), ("False", False),
    ("none", None), ("gelu", "gelu"), ("nan", "nan"), ("3x3", "3x3"), ("", ""),
])
def test_model_arg_values_are_typed(text, value):
    got = parse_scalar(text)
    assert got == value and type(got) is type(value)


def test_flags_fill_run_config():
    c = _config("--model-arg", "img_size=32", "--model-arg", "patch-size=4", "--model-arg", "act=gelu",
                "--model-arg", "qkv_bias=false", "--model-arg", "drop_rate=0.0",
                "--input-size", "32", "--mean", "0.2860", "--std", "0.1,0.2,0.3", "--channels", "3")
    assert c.model_args == {"img_size": 32, "patch_size": 4, "act": "gelu", "qkv_bias": False, "drop_rate": 0.0}
    assert type(c.model_args["img_size"]) is int and type(c.model_args["drop_rate"]) is float
    assert c.input == {"size": 32, "mean": (0.286,), "std": (0.1, 0.2, 0.3), "channels": 3}
    assert _config().input == {} and _config().model_args == {}


def test_yaml_input_and_model_args_with_flags_winning(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: timm:vit_tiny_patch16_224\n"
                      "input: {size: 64, mean: [0.5, 0.4, 0.3], std: 0.25}\n"
                      "model_args: {img_size: 64, patch_size: 8, depth: 2}\n")
    c = _config("--config", str(recipe))
    assert c.input == {"size": 64, "mean": (0.5, 0.4, 0.3), "std": (0.25,)}
    assert c.model_args == {"img_size": 64, "patch_size": 8, "depth": 2}
    c = _config("--config", str(recipe), "--input-size", "32", "--std", "0.3530", "--model-arg", "img_size=32")
    assert c.input == {"size": 32, "mean": (0.5, 0.4, 0.3), "std": (0.353,)}
    assert c.model_args == {"img_size": 32, "patch_size": 8, "depth": 2}


@pytest.mark.parametrize("argv,message", [
    (["--mean", "0.1,abc"], "--mean (input.mean) '0.1,abc' must be numbers separated by commas"),
    (["--std", "0.5,0"], "--std (input.std) '0.5,0' must be positive numbers"),
    (["--input-size", "0"], "--input-size (input.size) 0 must be a whole number of at least 1"),
    (["--channels", "-3"], "--channels (input.channels) -3 must be a whole number"),
    (["--model-arg", "img_size"], "--model-arg expects key=value, got 'img_size'"),
    (["--model-arg", "not a name=1"], "model argument 'not a name' is not a valid keyword argument name"),
])
def test_bad_values_are_user_errors(argv, message):
    with pytest.raises(QcoreError) as err:
        _config(*argv)
    assert message in str(err.value)


@pytest.mark.parametrize("text,message", [
    ("input: {size: 32, colour: rgb}\n", "unknown input key(s) colour; valid: size, mean, std, channels"),
    ("input: 32\n", "'input' must be a mapping"),
    ("input: {mean: [0.1, x]}\n", "--mean (input.mean)"),
    ("model_args: [img_size, 32]\n", "model_args must be a mapping"),
])
def test_bad_recipe_values_are_user_errors(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(QcoreError) as err:
        _config("--config", str(tmp_path / "r.yaml"), *(["--input-size", "8"] if text.startswith("input: 32") else []))
    assert message in str(err.value)


def test_run_config_checks_python_api_values_too():
    assert RunConfig(input={"mean": 0.5, "size": "32"}).input == {"mean": (0.5,), "size": 32}
    with pytest.raises(QcoreError, match="--std"):
        RunConfig(input={"std": -1.0})


def test_task_that_does_not_take_them_refuses():
    host = make_host()
    with pytest.raises(QcoreError, match=r"task 'tiny' does not take --input-size/--mean/--std/--channels"):
        run_tiny(host, input={"size": 8})
    with pytest.raises(QcoreError, match=r"task 'tiny' does not take --model-arg"):
        run_tiny(host, model_args={"width": 4})
