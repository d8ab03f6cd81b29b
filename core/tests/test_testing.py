"""qcore.testing catches what it exists to catch: each check fails a component that breaks its contract, with a
message naming what is wrong, and passes core's own components."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import qcore
from qcore.ranges import minmax_range
from qcore.testing import (
    W8A8_AGREEMENT_FLOOR,
    check_allocator,
    check_calibrator,
    check_quantizer,
    make_host,
    run_tiny,
    uniform_sqnr_floor,
)


def plugin(**hooks):
    return SimpleNamespace(**{k: qcore.hookimpl(v) for k, v in hooks.items()})


def registering(items: list) -> Any:
    """A registry hook that registers ``items``."""
    def hook(register):
        for item in items:
            register(item)
    return hook


def with_components(*components: type, methods: tuple[qcore.Method, ...] = ()) -> Any:
    """A host with a plugin ``t`` registering ``components`` (by role) and ``methods``."""
    roles = {qcore.Quantizer: "quantizers", qcore.Calibrator: "calibrators", qcore.Allocator: "allocators"}
    hooks: dict[str, list] = {}
    for c in components:
        role = next(r for base, r in roles.items() if issubclass(c, base))
        hooks.setdefault(role, []).append(c)
    impls = {f"qcore_register_{role}": registering(cs) for role, cs in hooks.items()}
    if methods:
        impls["qcore_register_methods"] = registering(list(methods))
    return make_host(("t", plugin(**impls)))


# -- run_tiny and make_host --------------------------------------------------------------------------------------
class Sixes(qcore.Allocator):
    name = "sixes"

    def allocate(self, ctx):
        return qcore.Plan(layers={n: qcore.layer_spec(ctx.pipeline, 6, 8, ctx.quantizer.name) for n in ctx.layers})


def test_run_tiny_runs_the_plugins_default_method_and_refuses_unknown_keywords():
    host = with_components(Sixes, methods=(qcore.Method("six", "uniform", "minmax", "sixes", default=True),))
    out = run_tiny(host, plugin="t", options={"first_last": "same"})
    assert out.result["plugin"] == "t" and out.result["method"] == "six" and out.result["w_bits_avg"] == 6.0
    assert run_tiny(host).result["method"] == "uniform"  # neither plugin nor method: the baseline
    with pytest.raises(TypeError, match="unknown keyword.*colour.*options="):
        run_tiny(host, colour="red")


def test_make_host_raises_on_a_broken_plugin_unless_allowed():
    def boom(register):
        raise RuntimeError("kaput")

    with pytest.raises(qcore.QcoreError, match="'bad': qcore_register_allocators raised RuntimeError: kaput"):
        make_host(("bad", plugin(qcore_register_allocators=boom)))
    host = make_host(("bad", plugin(qcore_register_allocators=boom)), allow_broken=True)
    assert "kaput" in host.plugins["bad"].error


# -- check_allocator -------------------------------------------------------------------------------------------
class SkipsLast(qcore.Allocator):
    """Leaves the last layer out: core would silently keep it in floating point."""

    name = "skips-last"

    def allocate(self, ctx):
        names = [n for n in ctx.layers if n not in ctx.pinned][:-1]
        return qcore.Plan(layers={n: qcore.layer_spec(ctx.pipeline, 2, 8, ctx.quantizer.name) for n in names})


class ReturnsDict(qcore.Allocator):
    name = "returns-dict"

    def allocate(self, ctx):
        return {n: qcore.layer_spec(ctx.pipeline, 4, 8, ctx.quantizer.name) for n in ctx.layers}


class IgnoresPins(qcore.Allocator):
    """Spends the whole average on every layer as if none were pinned: over budget once the pin is applied."""

    name = "ignores-pins"

    def allocate(self, ctx):
        b = int(ctx.budget.target_bits)
        return qcore.Plan(layers={n: qcore.layer_spec(ctx.pipeline, b, 8, ctx.quantizer.name) for n in ctx.layers})


def test_check_allocator_names_a_free_layer_left_out():
    with pytest.raises(AssertionError, match="left 1 layer\\(s\\) out of its plan: 7"):
        check_allocator(with_components(SkipsLast), "skips-last")


def test_check_allocator_fails_a_return_that_is_not_a_plan():
    with pytest.raises(AssertionError, match="returned dict, not a qcore.Plan"):
        check_allocator(with_components(ReturnsDict), "returns-dict")


def test_check_allocator_fails_an_allocator_whose_budget_ignores_the_pins():
    host = with_components(IgnoresPins)
    with pytest.raises(AssertionError, match="went over the budget: its layers, pinned ones included, average 4.128 "
                                             "weight bits, more than --target-bits 4"):
        check_allocator(host, "ignores-pins")
    check_allocator(host, "ignores-pins", pin=None)  # without a pin it is within budget


def test_check_allocator_fixed_budget():
    check_allocator(make_host(), "fixed", target_bits=None, w_bits=4)
    with pytest.raises(AssertionError, match="layer\\(s\\) 3, 7 exceed the fixed budget W3A8"):  # 0 is pinned
        check_allocator(with_components(Sixes), "sixes", target_bits=None, w_bits=3)


# -- check_quantizer -------------------------------------------------------------------------------------------
class WideGrid(qcore.UniformFakeQuant):
    """A uniform grid that wastes 2 bits: it spreads 2^(b-2) levels over the range."""

    def quantize(self, x):
        scale, zero, qmin, qmax, bits = (self._shape(t, x.dim()) for t in self.qparams())
        return qcore.ops.fake_quantize(x, scale * 4, zero, qmin, qmax).to(x.dtype)


class LogGrid(qcore.FakeQuantizer):
    """Non-uniform: sign(x) * 2^round(log2|x|), clipped to the range and 2^(b-1) octaves below it."""

    def __init__(self, spec, channels, axis):
        super().__init__(spec, channels, axis)
        self.register_buffer("top", torch.zeros(self.rows))

    def set_range(self, lo, hi):
        self.top.copy_(torch.maximum(torch.as_tensor(lo).abs(), torch.as_tensor(hi).abs()).reshape(-1))
        self.mark_calibrated()

    def quantize(self, x):
        top = self._shape(self.channel_values(self.top), x.dim())
        octaves = self._shape(2.0 ** (self.bits - 1), x.dim())
        e = torch.round(torch.log2(x.abs().clamp(min=1e-30))).clamp(max=torch.log2(top).ceil())
        e = torch.maximum(e, torch.log2(top).ceil() - octaves)
        return torch.sign(x) * torch.exp2(e)


def quantizer_for(module: type, qname: str) -> type:
    class Q(qcore.Quantizer):
        name = qname

        def make(self, spec, role, info):
            channels, axis = (info.out_channels, 0) if role == "weight" else (info.in_channels, info.act_axis)
            return module(spec, channels, axis)

    return Q


class NotAFakeQuantizer(qcore.Quantizer):
    name = "identity"

    def make(self, spec, role, info):
        return nn.Identity()


class RunsUncalibrated(qcore.Quantizer):
    name = "eager"

    def make(self, spec, role, info):
        class Eager(qcore.UniformFakeQuant):
            def forward(self, x):  # skips FakeQuantizer.forward's calibration guard
                return x

        return Eager(spec, info.out_channels if role == "weight" else info.in_channels, 0)


def test_check_quantizer_floors_pass_uniform_and_are_honest():
    sqnr = check_quantizer(make_host(), "uniform")
    for b, s in sqnr.items():  # uniform sits well above every floor, and gains about 6 dB per bit
        assert s >= uniform_sqnr_floor(b) + 2.5
    assert 5.5 <= (sqnr[8] - sqnr[4]) / 4 <= 6.5


def test_check_quantizer_fails_a_grid_below_its_floor():
    with pytest.raises(AssertionError, match="below the uniform-grid floor"):
        check_quantizer(with_components(quantizer_for(WideGrid, "wide")), "wide")


def test_check_quantizer_accepts_a_non_uniform_grid_when_told():
    host = with_components(quantizer_for(LogGrid, "log"))
    with pytest.raises(AssertionError, match="below the uniform-grid floor"):
        check_quantizer(host, "log")
    sqnr = check_quantizer(host, "log", grid="nonuniform")
    assert sqnr[8] - sqnr[4] < 3.0  # a log grid saturates: what the uniform floors would refuse


def test_check_quantizer_protocol_failures():
    with pytest.raises(AssertionError, match="returned Identity, not a qcore.FakeQuantizer"):
        check_quantizer(with_components(NotAFakeQuantizer), "identity")
    with pytest.raises(AssertionError, match="ran before calibration"):
        check_quantizer(with_components(RunsUncalibrated), "eager")


# -- check_calibrator ------------------------------------------------------------------------------------------
class WeightsOnly(qcore.RangeCalibrator):
    """Forgets the activations."""

    name = "weights-only"

    def calibrate(self, model, ctx):
        self.calibrate_weights(model)


class Squeezed(qcore.RangeCalibrator):
    """Clips everything at a tenth of its range."""

    name = "squeezed"

    def weight_estimator(self):
        return lambda x, bits, sym: tuple(v * 0.1 for v in minmax_range(x, bits, sym))

    act_estimator = weight_estimator


def test_check_calibrator_passes_core_and_fails_broken_calibrators():
    for name in ("minmax", "mse", "percentile"):
        assert check_calibrator(make_host(), name).result["quant"] >= W8A8_AGREEMENT_FLOOR
    with pytest.raises(AssertionError, match="left 3 quantizer\\(s\\) uncalibrated: 0.act, 3.act, 7.act"):
        check_calibrator(with_components(WeightsOnly), "weights-only")
    with pytest.raises(AssertionError, match="W8A8 agreement with FP .* is below 95.0%"):
        check_calibrator(with_components(Squeezed), "squeezed")
