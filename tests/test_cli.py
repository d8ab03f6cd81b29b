"""``qcore`` end to end: the real command on the embedded model, listing, and every bad input."""

from __future__ import annotations

import json
import re

import pytest

RESULT_KEYS = {"plugin", "method", "task", "model", "metric", "fp", "quant", "w_bits_avg", "a_bits_avg", "size_mb",
               "fp_size_mb", "bops", "quantized", "seconds", "qcore_version", "seed"}


def test_version_and_help(qcore_cli):
    assert qcore_cli("--version").stdout.startswith("qcore ")
    out = qcore_cli("run", "--help").stdout
    for flag in ("--plugin", "--task", "--model", "--weights", "--data", "--w-bits", "--a-bits", "--target-bits",
                 "--calib-size", "--batch-size", "--device", "--seed", "--out", "--config", "-o KEY=VALUE"):
        assert flag in out


def test_run_embedded_cnn_w8a8(qcore_cli, tmp_path):
    p = qcore_cli("run", "--plugin", "uniform", "--w-bits", "8", "--a-bits", "8", "--eval-size", "1000",
                  "--calib-size", "128", "--out", "out")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "out" / "result.json").read_text())
    assert set(r) >= RESULT_KEYS
    assert r["model"] == "zoo:fmnist_resnet" and r["metric"] == "top1"
    assert abs(r["quant"] - r["fp"]) <= 1.0  # 1000 images: 0.1 pt per image
    assert r["w_bits_avg"] == 8.0 and r["a_bits_avg"] == 8.0 and r["size_mb"] < r["fp_size_mb"]
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["version"] == 1 and set(plan["layers"]) == set(r["quantized"]["weight_layers"])
    assert "top1 *" in p.stdout and "deployable yes" in p.stdout

    # the saved model as ONNX QDQ, rebuilt from what model.qcore records (onnxruntime checks it on one batch)
    ex = qcore_cli("export", "out/model.qcore", "--onnx", "m.onnx")
    assert ex.returncode == 0, ex.stderr
    report = json.loads(ex.stdout)
    assert report["layers"] == len(plan["layers"]) and report["int4_weights"] == 0
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] < 0.5 and (tmp_path / "m.onnx").is_file()


def test_yaml_recipe_and_plan_reuse(qcore_cli, tmp_path):
    (tmp_path / "r.yaml").write_text("w_bits: 4\na_bits: 8\neval_size: 200\ncalib_size: 64\n"
                                     "options: {first_last: same}\nlayers: {'layers.0.*': {w_bits: 6}}\n")
    p = qcore_cli("run", "--config", "r.yaml", "--out", "a")
    assert p.returncode == 0, p.stderr
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    assert plan["layers"]["layers.0.conv1"]["weight"]["bits"] == 6 and plan["layers"]["fc"]["weight"]["bits"] == 4
    p = qcore_cli("run", "--plan", "a/plan.json", "--eval-size", "200", "--calib-size", "64", "--out", "b")
    assert p.returncode == 0, p.stderr
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in "ab")
    assert a["quant"] == b["quant"] and a["size_mb"] == b["size_mb"]


def test_plugins_json_lists_builtins_and_third_party(qcore_cli, plugin_site):
    rows = json.loads(qcore_cli("plugins", site=plugin_site).stdout)
    by = {r["name"]: r for r in rows}
    assert "uniform" in by["uniform"]["provides"]["methods"]
    assert by["classification"]["provides"]["tasks"] == ["classification"]
    assert by["example"]["provides"]["allocators"] == ["example-greedy", "example-all8"]
    assert "error" not in by["example"]
    assert by["example"]["provides"]["quantizers"] == ["example-pow2"]
    assert by["example"]["provides"]["calibrators"] == ["example-percentile"]
    assert by["example"]["source"] == "entry point of qcore-example" and by["example"]["version"] == "0.1.0"
    assert "libfoo" in by["broken"]["error"]


def test_third_party_plugin_runs_and_broken_one_fails_only_when_selected(qcore_cli, plugin_site, tmp_path):
    p = qcore_cli("run", "--plugin", "example", "--eval-size", "100", "--calib-size", "32", "--out", "o",
                  site=plugin_site)
    assert p.returncode == 0, p.stderr
    assert ("method example-pow2 (plugin example; quantizer example-pow2, calibrator example-percentile, allocator "
            "example-greedy)") in p.stdout
    r = json.loads((tmp_path / "o" / "result.json").read_text())
    assert r["w_bits_avg"] <= 6.0 and r["budget"]["target_bits"] == 6.0  # the default method's greedy budget
    assert abs(r["quant"] - r["fp"]) <= 3.0  # 100 images: 1 pt per image
    p = qcore_cli("run", "--method", "example", "--eval-size", "100", "--calib-size", "32", "--out", "o8",
                  site=plugin_site)
    assert p.returncode == 0, p.stderr
    assert "method example (plugin example" in p.stdout and "weights 8.00" in p.stdout
    p = qcore_cli("run", "--plugin", "broken", site=plugin_site)
    assert p.returncode == 2 and "plugin 'broken' is broken" in p.stderr and "libfoo" in p.stderr


def test_load_and_disable_switches(qcore_cli, plugin_site):
    names = lambda p: {r["name"] for r in json.loads(p.stdout)}  # noqa: E731
    assert names(qcore_cli("plugins", site=plugin_site, env={"QCORE_LOAD_PLUGINS": "example"})) == {
        "core", "uniform", "example"}
    assert "broken" not in names(qcore_cli("plugins", site=plugin_site, env={"QCORE_DISABLE_PLUGINS": "broken"}))


BAD = [
    (["--plugin", "nosuch"], "unknown plugin 'nosuch'"),
    (["--plugin", "nosuch-paper"], "Plugins are separate distributions: install it (from a qcore checkout"),
    (["-o", "colour=red"], "unknown option colour; valid options"),
    (["--w-bits", "33"], "--w-bits 33 is out of range"),
    (["--data", "no/such/dir"], "data folder no/such/dir does not exist"),
    (["--weights", "corrupt.safetensors"], "cannot read weights file corrupt.safetensors"),
    (["--model", "zoo:nope"], "unknown zoo model 'nope'"),
    (["--model", "resnet18"], "needs the form PREFIX:NAME"),
    (["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["--w-bits", "four"], "invalid int value"),
    (["--device", "cuda:0"] , None),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(qcore_cli, tmp_path, args, message):
    import torch

    if args[:1] == ["--device"]:
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        message = "PyTorch sees no CUDA device"
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage")
    p = qcore_cli("run", *args, "--out", "o")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcore: error: "), p.stderr
    assert message in lines[0]
    assert not (tmp_path / "o").exists()


def test_model_without_quantizable_layer(qcore_cli, plugin_site, tmp_path):
    p = qcore_cli("run", "--task", "toy", "--model", "toy:noquant", "--out", "o", site=plugin_site,
                  env={"QCORE_DISABLE_PLUGINS": "broken"})
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "has no quantizable layer" in p.stderr and not (tmp_path / "o").exists()


def test_stage_lines_when_progress_bars_are_off(qcore_cli):
    """Off a terminal (a log file, CI) a run reports each finished stage instead of nothing until the end."""
    p = qcore_cli("run", "--eval-size", "200", "--calib-size", "64", "--out", "o", env={"QCORE_PROGRESS": "lines"})
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("qcore: stage ")]
    assert [ln.split()[2] for ln in lines] == ["load", "fp_eval", "allocate", "apply", "calibrate", "quant_eval"]
    assert all(re.fullmatch(r"qcore: stage \w+ done in \d+\.\d s", ln) for ln in lines)
    quiet = qcore_cli("run", "--eval-size", "200", "--calib-size", "64", "--out", "q")  # QCORE_PROGRESS=0
    assert "qcore: stage" not in quiet.stderr


def test_list_methods_shows_what_each_method_runs_with(qcore_cli):
    rows = {r["name"]: r for r in json.loads(qcore_cli("list", "methods", "--options").stdout)}
    rdoq = rows["rdoq"]["options"]
    assert rdoq["weight_range"]["default"] == "mse" and rdoq["weight_range"]["set_by"] == "method"
    assert rdoq["act_correction"]["default"] == "affine"
    assert rdoq["group"]["type"] == "int" and "set_by" not in rdoq["group"]


def test_eval_subcommand_errors_are_one_line(qcore_cli, tmp_path):
    """``qcore eval``: a missing or foreign file is a one-line error (the switching itself: core/tests/test_switch.py
    and plugins/ptmq/tests)."""
    p = qcore_cli("eval", "missing.qcore", "--w-bits", "4", "--a-bits", "4")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "qcore: error: quantized model file missing.qcore does not exist; pass a .qcore file written by qcore"]
    (tmp_path / "junk.qcore").write_bytes(b"\x00garbage")
    p = qcore_cli("eval", "junk.qcore")
    assert p.returncode == 2 and "is not a .qcore file or it is corrupt" in p.stderr and p.stderr.count("\n") == 1
    p = qcore_cli("export", "missing.qcore", "--onnx", "m.onnx")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "does not exist" in p.stderr
    assert not (tmp_path / "m.onnx").exists()
    help_ = qcore_cli("eval", "--help")
    assert help_.returncode == 0 and "--w-bits" in help_.stdout and "--bit-plan" in help_.stdout


def test_eval_and_export_check_sizes_and_device_like_run(qcore_cli, tmp_path):
    p = qcore_cli("run", "--plugin", "uniform", "--eval-size", "100", "--calib-size", "32", "--out", "o")
    assert p.returncode == 0, p.stderr
    for args, msg in ((["--batch-size", "0"], "--batch-size 0 is out of range"),
                      (["--eval-size", "0"], "--eval-size 0 is out of range"),
                      (["--device", "tpu"], "unknown device 'tpu'")):
        p = qcore_cli("eval", "o/model.qcore", *args)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("qcore: error: ") and msg in lines[0]
