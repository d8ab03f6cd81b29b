"""Errors name the component and its plugin; broken contracts are named errors; corrections are components."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import qcore
from qcore import Allocator, Calibrator, LayerSpec, OutputCorrection, Plan, QcoreError, layer_spec
from qcore._cli import main
from qcore.testing import make_host, run_tiny


def _plugin(**hooks: Any) -> SimpleNamespace:
    return SimpleNamespace(**{k: qcore.hookimpl(v) for k, v in hooks.items()})


def _allocator(name: str, allocate: Any, **attrs: Any) -> type[Allocator]:
    return type(name.title(), (Allocator,), {"name": name, "allocate": allocate, **attrs})


def _host_with_allocator(cls: type[Allocator]) -> Any:
    return make_host(("bad", _plugin(qcore_register_allocators=lambda register: register(cls))))


def test_an_exception_inside_a_component_names_it_and_its_plugin():
    def allocate(self, ctx):
        raise TypeError("unsupported operand")

    host = _host_with_allocator(_allocator("boom", allocate))
    with pytest.raises(QcoreError, match=r"allocator 'boom' \(plugin 'bad'\): TypeError: unsupported operand") as e:
        run_tiny(host, allocator="boom", target_bits=4.0)
    assert isinstance(e.value.__cause__, TypeError)  # --traceback shows the original


def test_a_non_plan_return_is_a_named_error():
    host = _host_with_allocator(_allocator("dicty", lambda self, ctx: {"layers": {}}))
    with pytest.raises(QcoreError, match=r"allocator 'dicty' \(plugin 'bad'\) returned dict, not a qcore.Plan"):
        run_tiny(host, allocator="dicty", w_bits=8, a_bits=8)


def test_a_free_layer_missing_from_the_plan_is_named():
    def allocate(self, ctx):
        names = list(ctx.layers)
        return Plan(layers={n: layer_spec(ctx.pipeline, 8, 8) for n in names[1:]})

    host = _host_with_allocator(_allocator("partial", allocate))
    with pytest.raises(QcoreError, match=r"allocator 'partial' \(plugin 'bad'\) left 1 layer\(s\) out of its plan: 0;"):
        run_tiny(host, allocator="partial", w_bits=8, a_bits=8, options={"first_last": "same"})
    # an explicit FP entry is how an allocator keeps a layer in floating point
    def explicit(self, ctx):
        names = list(ctx.layers)
        return Plan(layers={names[0]: LayerSpec(None, None)} | {n: layer_spec(ctx.pipeline, 8, 8) for n in names[1:]})

    out = run_tiny(_host_with_allocator(_allocator("explicit", explicit)), allocator="explicit", w_bits=8, a_bits=8,
                   options={"first_last": "same"})
    assert "0" in out.result["quantized"]["fp_layers"]


def test_an_over_budget_plan_is_refused_unless_the_allocator_checks_its_own_budget():
    def allocate(self, ctx):
        return Plan(layers={n: layer_spec(ctx.pipeline, 8, 8) for n in ctx.layers})

    with pytest.raises(QcoreError, match=r"went over the budget: its layers, pinned ones included, average 8.000 "
                                         r"weight bits, more than --target-bits 4"):
        run_tiny(_host_with_allocator(_allocator("greedy8", allocate)), allocator="greedy8", target_bits=4.0,
                 a_bits=8, options={"first_last": "same"})
    own = _allocator("own8", allocate, budget_convention=None)
    out = run_tiny(_host_with_allocator(own), allocator="own8", target_bits=4.0, a_bits=8,
                   options={"first_last": "same"})
    assert out.result["w_bits_avg"] == 8.0


def test_a_calibrator_that_leaves_quantizers_uncalibrated_is_named():
    class Lazy(Calibrator):
        name = "lazy"

        def calibrate(self, model, ctx):
            for _, role, q in qcore.iter_quantizers(model):
                if role == "weight":
                    q.set_range(torch.tensor(-1.0), torch.tensor(1.0))

    host = make_host(("lazyplug", _plugin(qcore_register_calibrators=lambda register: register(Lazy))))
    with pytest.raises(QcoreError, match=r"calibrator 'lazy' \(plugin 'lazyplug'\) left 3 quantizer\(s\) "
                                         r"uncalibrated: 0.act, 3.act, 7.act"):
        run_tiny(host, calibrator="lazy", w_bits=8, a_bits=8, options={"first_last": "same"})


def test_measured_values_must_be_dicts_and_nothing_is_written(tmp_path):
    def allocate(self, ctx):
        ctx.measured["note"] = "a string"
        return Plan(layers={n: layer_spec(ctx.pipeline, 8, 8) for n in ctx.layers})

    out = tmp_path / "run"
    with pytest.raises(QcoreError, match=r"ctx.measured values must be dicts of facts; got \{'note': 'str'\}"):
        run_tiny(_host_with_allocator(_allocator("noter", allocate)), allocator="noter", w_bits=8, a_bits=8,
                 out=out)
    assert not out.exists()


class Marker(OutputCorrection):
    """A third-party output correction: scales every quantized layer's output by 1 (a no-op with a trace)."""

    name = "marker"
    description = "test correction"
    summary = "a marker"
    seen: list[str] = []

    def correct(self, qmodel, fp_model, ctx):
        Marker.seen = sorted(qcore.quant_layers(qmodel))


def test_a_plugin_correction_is_selected_by_name():
    host = make_host(("mark", _plugin(qcore_register_corrections=lambda register: register(Marker))))
    out = run_tiny(host, w_bits=8, a_bits=8, options={"act_correction": "marker"})
    assert Marker.seen == ["0", "3", "7"]
    assert "marker output correction: a marker" in out.result["quantized"]["summary"]
    with pytest.raises(QcoreError, match="correction 'marker' is not a WeightCorrection; -o weight_correction takes "
                                         "mean, mean.var or none"):
        run_tiny(host, w_bits=8, a_bits=8, options={"weight_correction": "marker"})
    with pytest.raises(QcoreError, match="unknown correction 'afine'"):
        run_tiny(host, w_bits=8, a_bits=8, options={"act_correction": "afine"})


def test_core_corrections_are_registered_components():
    host = make_host()
    assert {"mean", "mean+var", "static", "affine", "local"} <= set(host.tables["correction"])
    assert host.plugins["core"].provides["correction"] == ["mean", "mean+var", "static", "affine", "local"]


def test_name_clashes_show_in_the_plugin_listing():
    clash = _plugin(qcore_register_allocators=lambda register: register(_allocator("fixed", lambda s, c: None)))
    host = make_host(("clash", clash))
    listing = {p.name: p.to_json() for p in host.plugins.values()}
    assert "allocator 'fixed' is also registered by 'uniform'" in listing["clash"]["error"]
    assert "allocator 'fixed' is also registered by 'clash'" in listing["uniform"]["error"]


def test_unknown_names_in_the_plugin_switches_are_warned(monkeypatch, caplog):
    monkeypatch.setenv("QCORE_DISABLE_PLUGINS", "rdoqq")
    with caplog.at_level(logging.WARNING, logger="qcore"):
        qcore.load_host()
    assert "QCORE_DISABLE_PLUGINS names 'rdoqq', which is no installed plugin" in caplog.text


def test_cli_one_line_for_an_internal_error_and_the_traceback_on_request(monkeypatch, capsys):
    def boom(config, host):
        exc = ZeroDivisionError("division by zero")
        exc.qcore_stage = "allocate"
        raise exc

    monkeypatch.setattr("qcore._pipeline.run", boom)
    with pytest.raises(SystemExit) as e:
        main(["run", "--out", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("qcore: error: internal error in stage 'allocate': ZeroDivisionError: division by zero; "
                          "rerun with --traceback")
    with pytest.raises(SystemExit):
        main(["run", "--out", "x", "--traceback"])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("qcore: error:")
    monkeypatch.setenv("QCORE_DEBUG", "1")
    with pytest.raises(SystemExit):
        main(["run", "--out", "x"])
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_pins_below_the_target_leave_more_bits_to_the_free_layers():
    """qcore's convention pays pins from the budget: a layer pinned at 2 bits lets the others average more than
    the target, and that plan is within budget (a check on the unpinned average alone refused it)."""
    def allocate(self, ctx):
        return Plan(layers={n: layer_spec(ctx.pipeline, 5, 8) for n in ctx.layers if n not in ctx.pinned})

    out = run_tiny(_host_with_allocator(_allocator("spender", allocate)), allocator="spender", target_bits=4.95,
                   a_bits=8, layers={"0": {"w_bits": 2, "a_bits": 8}}, options={"first_last": "same"})
    assert out.result["w_bits_avg"] <= 4.95  # 4.904: the free layers at 5 bits, over the target themselves


def test_a_fixed_allocator_is_not_held_to_a_method_default_target():
    from qcore_rdoq import plugin as rdoq  # rdoq's method default is --target-bits 4

    host = make_host(("rdoq", rdoq))
    out = run_tiny(host, method="rdoq", allocator="fixed", w_bits=8, a_bits=8, options={"first_last": "same"})
    assert out.result["w_bits_avg"] == 8.0


def test_a_plan_naming_a_layer_the_run_does_not_quantize_is_named():
    def allocate(self, ctx):
        return Plan(layers={n: layer_spec(ctx.pipeline, 8, 8) for n in [*ctx.layers, "head.extra"]})

    with pytest.raises(QcoreError, match=r"allocator 'wide' \(plugin 'bad'\) planned layer\(s\) this run does not "
                                         r"quantize: head.extra"):
        run_tiny(_host_with_allocator(_allocator("wide", allocate)), allocator="wide", w_bits=8, a_bits=8)
