"""The Python API: README's example runs as written; quantize/save/load round-trips bit-identically; bad input is
a QcoreError; `qcore run` writes the same loadable file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import qcore
from qcore.testing import make_host, run_tiny, tiny_convnet

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), env)  # its own assert checks the loaded outputs
    q = env["q"]
    assert (tmp_path / "shufflenet-rdoq.qcore").is_file()
    assert q.report["method"] == "rdoq" and q.report["w_bits_avg"] <= 4.0 + 1e-9
    assert "fp" not in q.report and q.report["quantized"]["weight_layers"]
    assert isinstance(q.plan, qcore.Plan) and not q.model.training


def _data(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_quantize_save_load_is_bit_identical_and_the_input_model_is_untouched(tmp_path):
    model = tiny_convnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _data()
    labels = model(x).argmax(1)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {"agree": 100.0 * float((m(x).argmax(1) == labels).float().mean()), "other": 1.0}

    q = qcore.quantize(model, x, method="uniform", w_bits=4, a_bits=8, evaluate=evaluate, batch_size=16,
                       options={"act_correction": "affine"}, host=make_host())
    assert q.report["metric"] == "agree" and q.report["fp"] == 100.0 and 50.0 <= q.report["quant"] <= 100.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    path = q.save(tmp_path / "m.qcore")
    loaded = qcore.load(path, tiny_convnet(), host=make_host())
    assert torch.equal(loaded(x), q.model(x))
    assert any(layer.out_scale is not None for layer in qcore.quant_layers(loaded).values())


def test_dataloader_tuples_dicts_and_a_custom_forward():
    model = tiny_convnet()
    x = _data(32)
    tuples = [(x[:16], torch.zeros(16)), (x[16:], torch.zeros(16))]
    a = qcore.quantize(model, tuples, w_bits=8, a_bits=8, host=make_host())
    dicts = [{"image": x[:16]}, {"image": x[16:]}]
    with pytest.raises(qcore.QcoreError, match="calibration batches are dicts: pass forward="):
        qcore.quantize(model, dicts, w_bits=8, a_bits=8, host=make_host())
    b = qcore.quantize(model, dicts, w_bits=8, a_bits=8, forward=lambda m, batch: m(batch["image"]),
                       host=make_host())
    assert torch.equal(a.model(x), b.model(x))
    assert a.report["data"]["calibration"].startswith("32 samples in 2 batches")


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"w_bits": 99}, "--w-bits 99 is out of range"),
    ({"options": {"no_such": 1}}, "unknown option no_such"),
])
def test_bad_settings_are_refused_before_the_data_is_read(kwargs, message):
    def never():
        raise AssertionError("calibration data read before the settings were checked")
        yield  # pragma: no cover

    with pytest.raises(qcore.QcoreError, match=message):
        qcore.quantize(tiny_convnet(), never(), **{"w_bits": 8, "a_bits": 8, **kwargs}, host=make_host())


def test_load_refuses_wrong_models_and_corrupt_files(tmp_path):
    q = qcore.quantize(tiny_convnet(), _data(), w_bits=8, a_bits=8, host=make_host())
    path = q.save(tmp_path / "m.qcore")
    with pytest.raises(qcore.QcoreError, match="does not fit this model"):
        qcore.load(path, tiny_convnet(classes=7), host=make_host())  # same layers, another classifier size
    with pytest.raises(qcore.QcoreError, match="the plan names layer.s. this model does not have"):
        qcore.load(path, nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten()), host=make_host())
    bad = tmp_path / "bad.qcore"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(qcore.QcoreError, match="not a .qcore file or it is corrupt"):
        qcore.load(bad, tiny_convnet(), host=make_host())
    with pytest.raises(qcore.QcoreError, match="does not exist"):
        qcore.load(tmp_path / "missing.qcore", tiny_convnet(), host=make_host())


def test_qcore_run_writes_a_loadable_model(tmp_path):
    out = run_tiny(make_host(), w_bits=4, a_bits=8, out=tmp_path / "run")
    assert (tmp_path / "run" / "model.qcore").is_file()
    loaded = qcore.load(tmp_path / "run" / "model.qcore", tiny_convnet(), host=make_host())
    x = _data(16)
    assert torch.equal(loaded(x), out.model(x))


def test_a_dead_zone_plan_round_trips_with_its_fitted_groups(tmp_path):
    from qcore_rdoq import plugin

    host = make_host(("rdoq", plugin))
    q = qcore.quantize(tiny_convnet(), _data(), method="rdoq-deadzone", target_bits=3.0, a_bits=8,
                       options={"group": 4, "first_last": "same", "cache": "off"}, host=host)
    loaded = qcore.load(q.save(tmp_path / "dz.qcore"), tiny_convnet(), host=host)
    x = _data(16)
    assert torch.equal(loaded(x), q.model(x))


def test_the_callers_model_keeps_its_mode_and_errors_of_its_own_forward_reach_it_unchanged():
    model = tiny_convnet().train()
    qcore.quantize(model, _data(32), w_bits=8, a_bits=8, host=make_host())
    assert model.training  # quantize works on copies

    def bad_forward(m, batch):
        raise ValueError("my forward is broken")

    with pytest.raises(ValueError, match="my forward is broken"):
        qcore.quantize(tiny_convnet(), _data(32), w_bits=8, a_bits=8, forward=bad_forward, host=make_host())


def test_a_model_with_test_time_ranges_is_run_but_not_saved(tmp_path, caplog):
    """ACIQ's stats=dynamic replaces activation quantizers by wrappers a saved file could not rebuild: the run
    writes its results without model.qcore (a warning says why) and save() refuses in one line."""
    from qcore_aciq import plugin as aciq

    host = make_host(("aciq", aciq))
    out = run_tiny(host, calibrator="aciq", w_bits=8, a_bits=8, options={"stats": "dynamic"}, out=tmp_path / "run")
    assert (tmp_path / "run" / "result.json").is_file() and not (tmp_path / "run" / "model.qcore").exists()
    assert "model.qcore not written" in caplog.text
    q = qcore.quantize(tiny_convnet(), _data(), calibrator="aciq", w_bits=8, a_bits=8, options={"stats": "dynamic"},
                       host=host)
    with pytest.raises(qcore.QcoreError, match="cannot be saved: 3 quantizer.s. are not qcore.FakeQuantizer"):
        q.save(tmp_path / "m.qcore")
    assert out.result["quant"] is not None
