"""The pipeline end to end on the tiny task: options, pins, plans, outputs."""

import json

import pytest
import torch

from qcore._errors import QcoreError
from qcore._spec import Plan
from qcore._wrap import quant_layers
from qcore.testing import make_host, run_tiny


@pytest.fixture(scope="module")
def host():
    return make_host()


def test_w8a8_matches_fp_and_reports_what_was_quantized(host):
    out = run_tiny(host, w_bits=8, a_bits=8)
    r = out.result
    assert r["fp"] == 100.0 and r["quant"] >= 95.0
    q = r["quantized"]
    assert q["weight_layers"] == ["0", "3", "7"] and q["act_layers"] == ["0", "3", "7"]
    assert q["deployable"] is True and q["bn_folded"] == [["0", "1"], ["3", "4"]]
    for key in ("plugin", "method", "task", "model", "metric", "fp", "quant", "w_bits_avg", "a_bits_avg",
                "size_mb", "fp_size_mb", "bops", "quantized", "seconds", "qcore_version", "seed"):
        assert key in r


def test_first_last_pins_and_override(host):
    out = run_tiny(host, w_bits=3, a_bits=4)
    layers = out.plan.layers
    assert layers["0"].weight.bits == 8 and layers["7"].act.bits == 8 and layers["3"].weight.bits == 3
    out = run_tiny(host, w_bits=3, a_bits=4, options={"first_last": "fp"})
    assert set(out.plan.layers) == {"3"}
    out = run_tiny(host, w_bits=3, a_bits=4, options={"first_last": "same"}, layers={"3": {"w_bits": 6}})
    assert out.plan.layers["3"].weight.bits == 6 and out.plan.layers["3"].act.bits == 4


def test_task_last_layers_are_all_pinned():
    """A task naming several last layers (a detector's head outputs) gets each pinned by first_last; names that
    are not quantizable/included are ignored, and with none of them left the last layer counts as before."""
    from qcore._allocation import Pin, PipelineOptions, pinned_layers

    names = ["in", "mid", "head.a", "head.b", "tail"]
    pins = pinned_layers(names, PipelineOptions(), {}, 3, 4, last=("head.a", "head.b", "excluded"))
    assert pins == {"in": Pin(8, 8), "head.a": Pin(8, 8), "head.b": Pin(8, 8)}
    assert set(pinned_layers(names, PipelineOptions(), {}, 3, 4, last=("excluded",))) == {"in", "tail"}
    assert set(pinned_layers(names, PipelineOptions(), {}, 3, 4)) == {"in", "tail"}
    assert pinned_layers(names, PipelineOptions(first_last="same"), {}, 3, 4, last=("head.a",)) == {}


def test_weight_only_and_per_channel_activations(host):
    out = run_tiny(host, w_bits=4, a_bits=8, options={"act_targets": "none"})
    assert out.result["a_bits_avg"] is None and all(s.act is None for s in out.plan.layers.values())
    out = run_tiny(host, w_bits=4, a_bits=8, options={"act_granularity": "channel"})
    assert out.result["quantized"]["deployable"] is False


def test_unknown_option_lists_valid_ones(host):
    with pytest.raises(QcoreError, match="unknown option colour; valid options for this method: .*act_range"):
        run_tiny(host, options={"colour": "red"})
    with pytest.raises(QcoreError, match="not one of minmax, percentile, mse"):
        run_tiny(host, options={"act_range": "max"})


def test_bad_budget(host):
    with pytest.raises(QcoreError, match="--w-bits 33 is out of range"):
        run_tiny(host, w_bits=33)


def test_plan_reapplied_by_core_alone_gives_identical_model(host, tmp_path):
    first = run_tiny(host, w_bits=3, a_bits=5, calibrator="mse", out=tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "result.json").read_text())
    assert saved["quant"] == first.result["quant"]
    second = run_tiny(host, allocator="plan", calibrator="mse", options={"plan": str(tmp_path / "a" / "plan.json")})
    assert Plan.from_json((tmp_path / "a" / "plan.json").read_text()).layers == second.plan.layers
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(first.model(x), second.model(x))


def test_failed_run_writes_nothing(host, tmp_path):
    with pytest.raises(QcoreError):
        run_tiny(host, allocator="plan", options={"plan": str(tmp_path / "missing.json")}, out=tmp_path / "o")
    assert not (tmp_path / "o" / "result.json").exists()


def test_nan_weights_are_refused(host, monkeypatch):
    import qcore.testing.tiny as tiny

    def nan_model(seed=0, classes=4):
        m = tiny.tiny_convnet(seed, classes)
        with torch.no_grad():
            m[0].weight[0, 0, 0, 0] = float("nan")
        return m

    monkeypatch.setitem(tiny._MODELS, "convnet", nan_model)
    with pytest.raises(QcoreError, match="NaN or infinity"):
        run_tiny(host)


def test_lower_bits_hurt_more(host):
    hi = run_tiny(host, w_bits=8, a_bits=8, options={"first_last": "same"}).result["quant"]
    lo = run_tiny(host, w_bits=2, a_bits=2, options={"first_last": "same"}).result["quant"]
    assert lo < hi


def test_quant_layers_replace_original_modules(host):
    out = run_tiny(host, model="tiny:mlp", w_bits=4, a_bits=8)
    assert set(quant_layers(out.model)) == {"1", "3", "5"}
    assert out.result["quantized"]["summary"].startswith("weights of 3 of 3 quantizable layers (linear")


def test_plan_for_another_quantizer_is_refused(host, tmp_path):
    import dataclasses

    from qcore._spec import Plan

    first = run_tiny(host, w_bits=4, a_bits=8, out=tmp_path / "a")
    plan = Plan.from_json((tmp_path / "a" / "plan.json").read_text())
    other = Plan(layers={n: dataclasses.replace(s, weight=dataclasses.replace(s.weight, quantizer="lattice"))
                         for n, s in plan.layers.items()})
    (tmp_path / "b.json").write_text(other.to_json())
    assert first.result["quant"] > 0
    with pytest.raises(QcoreError, match="with quantizer 'lattice' but this run uses 'uniform'"):
        run_tiny(host, allocator="plan", options={"plan": str(tmp_path / "b.json")})


def test_unsupported_device(host):
    with pytest.raises(QcoreError, match="not supported"):
        run_tiny(host, device="meta")


def test_public_apply_plan_then_calibrate_reproduces_the_run(host):
    """qcore.apply_plan (public, for allocators that score candidate plans) + the run's calibrator on the run's
    context gives the model `qcore run` deployed, and leaves the FP model unwrapped."""
    import qcore

    out = run_tiny(host, w_bits=3, a_bits=5, calibrator="mse")
    ctx = out.ctx
    qmodel = qcore.apply_plan(ctx.model, out.plan, ctx)
    assert set(quant_layers(qmodel)) == set(out.plan.layers) and not quant_layers(ctx.model)
    ctx.calibrator.calibrate(qmodel, ctx)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(qmodel.eval()(x), out.model(x))
