"""qcore-example through qcore.testing: each component's contract, plus what makes each one what it is."""

from __future__ import annotations

import pytest
import torch

import qcore
from qcore.ranges import minmax_range
from qcore.testing import check_allocator, check_calibrator, check_quantizer, make_host, run_tiny
from qcore_example import plugin
from qcore_example.quantizer import PowerOfTwoFakeQuant


@pytest.fixture(scope="module")
def host():
    return make_host(("example", plugin))


def _weight_quantizer(bits: int, symmetric: bool = True) -> PowerOfTwoFakeQuant:
    spec = qcore.QuantSpec(bits=bits, symmetric=symmetric, granularity="channel", quantizer="example-pow2")
    return PowerOfTwoFakeQuant(spec, channels=16, axis=0)


# -- quantizer -------------------------------------------------------------------------------------------------
def test_pow2_quantizer_contract_and_cost_of_its_scales(host):
    pow2 = check_quantizer(host, "example-pow2")
    uniform = check_quantizer(host, "uniform")
    for b in (3, 4, 6, 8):  # a scale at most twice the covering one costs at most ~6 dB (fit() may even gain,
        assert pow2[b] >= uniform[b] - 6.1  # by clipping where min/max ranges do not)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pow2_values_are_integers_times_a_power_of_two(symmetric):
    w = torch.randn(16, 40) * torch.rand(16, 1) * 3
    q = _weight_quantizer(4, symmetric)
    qcore.calibrate_rows(q, q.rows_of(w), minmax_range)
    assert torch.equal(q.exponent, q.exponent.round())
    codes = q(w) / torch.exp2(q.exponent)[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    assert (codes.max(1).values - codes.min(1).values <= 15 + 1e-5).all()  # 16 levels at 4 bits


def test_pow2_fit_never_loses_to_the_covering_scale():
    w = torch.randn(16, 40)
    covering = _weight_quantizer(3)
    lo, hi = minmax_range(w, covering.row_bits(), True)
    covering.set_range(lo, hi)  # the protocol's first step alone: usable, clips nothing
    assert covering.calibrated and (covering(w).abs() <= w.abs().amax(1, keepdim=True) * 2).all()
    fitted = _weight_quantizer(3)
    qcore.calibrate_rows(fitted, fitted.rows_of(w), minmax_range)  # set_range, then fit
    err = lambda q: (q(w) - w).pow(2).sum(1)  # noqa: E731
    assert (err(fitted) <= err(covering) + 1e-6).all() and (err(fitted) < err(covering)).any()


def test_pow2_refuses_to_run_uncalibrated_and_non_finite_ranges():
    q = _weight_quantizer(4)
    with pytest.raises(qcore.QcoreError, match="before calibration"):
        q(torch.randn(16, 4))
    with pytest.raises(qcore.QcoreError, match="not finite"):
        q.set_range(torch.full((16,), float("nan")), torch.ones(16))


@pytest.mark.parametrize("calibrator", ["minmax", "mse", "percentile", "example-percentile"])
def test_pow2_is_calibrated_by_any_range_calibrator(host, calibrator):
    check_calibrator(host, calibrator, quantizer="example-pow2")


# -- calibrator ------------------------------------------------------------------------------------------------
def test_percentile_calibrator_contract(host):
    check_calibrator(host, "example-percentile")


def test_percentile_calibrator_clips_weights_at_its_percentile(host):
    full = run_tiny(host, calibrator="example-percentile", w_bits=8, a_bits=8,
                    options={"first_last": "same", "weight_percentile": 100.0})
    clipped = run_tiny(host, calibrator="example-percentile", w_bits=8, a_bits=8,
                       options={"first_last": "same", "weight_percentile": 90.0})
    for name, layer in qcore.quant_layers(full.model).items():
        peak = layer.module.weight.detach().flatten(1).abs().amax(1)
        assert torch.allclose(layer.quantized_weight().flatten(1).abs().amax(1), peak, rtol=0.01)
        kept = qcore.quant_layers(clipped.model)[name].quantized_weight().flatten(1).abs().amax(1)
        assert (kept <= peak * 1.001).all() and (kept < 0.99 * peak).float().mean() >= 0.5


def test_percentile_options_are_checked(host):
    with pytest.raises(qcore.QcoreError, match=r"act_percentile=40.0 must be in \(50, 100\]"):
        run_tiny(host, calibrator="example-percentile", options={"act_percentile": 40})


# -- allocators ------------------------------------------------------------------------------------------------
def test_greedy_allocator_contract(host):
    check_allocator(host, "example-greedy", target_bits=4.0)
    check_allocator(host, "example-greedy", target_bits=6.0, model="tiny:mlp")  # its first layer: 64 % of weights


def test_greedy_spends_more_bits_for_a_larger_budget_and_never_exceeds_it(host):
    avgs = []
    for target in (2.5, 3.5, 5.0, 7.0):
        out = run_tiny(host, allocator="example-greedy", target_bits=target, a_bits=8, options={"first_last": "same"})
        assert out.result["w_bits_avg"] <= target + 1e-9
        avgs.append(out.result["w_bits_avg"])
    assert avgs == sorted(avgs) and avgs[-1] > avgs[0]


def test_greedy_gives_the_bit_to_the_layer_that_gains_most():
    # two layers of equal size; the one whose weights spread more gains more from each bit
    class Two(qcore.Task):
        name = "two"

        def build(self, config, host):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)).eval()
            with torch.no_grad():
                model[0].weight.mul_(10.0)
            x = torch.randn(8, 32)
            return qcore.TaskInstance(model=model, model_name="two", metric="top1", forward=lambda m, b: m(b),
                                      evaluate=lambda m: {"top1": 100.0}, calibration=[x], example=x)

    from types import SimpleNamespace

    task = SimpleNamespace(qcore_register_tasks=qcore.hookimpl(lambda register: register(Two)))
    host = make_host(("example", plugin), ("two", task))
    out = run_tiny(host, task="two", model="two", allocator="example-greedy", target_bits=3.0, a_bits=8,
                   options={"first_last": "same"})
    bits = out.plan.meta["bits"]
    assert out.result["w_bits_avg"] == 3.0 and bits["0"] >= bits["1"]


def test_greedy_refuses_an_impossible_budget(host):
    with pytest.raises(qcore.QcoreError, match="impossible bit budget"):
        run_tiny(host, allocator="example-greedy", target_bits=1.5, a_bits=8, options={"first_last": "same"})
    with pytest.raises(qcore.QcoreError, match="needs a budget"):
        run_tiny(host, method="example", allocator="example-greedy", a_bits=8)  # a method without budget defaults


def test_all8_contract(host):
    check_allocator(host, "example-all8", target_bits=None, w_bits=8)


# -- the plugin ------------------------------------------------------------------------------------------------
def test_default_method_is_the_worked_example(host):
    out = run_tiny(host, plugin="example")
    r = out.result
    assert r["plugin"] == "example" and r["method"] == "example-pow2"
    assert r["components"] == {"quantizer": "example-pow2", "calibrator": "example-percentile",
                               "allocator": "example-greedy"}
    assert r["w_bits_avg"] <= 6.0 and r["quantized"]["deployable"]
    assert all(isinstance(q, PowerOfTwoFakeQuant) for _, _, q in qcore.iter_quantizers(out.model))


def test_toy_task_has_no_quantizable_layer(host):
    with pytest.raises(qcore.QcoreError, match="no quantizable layer"):
        run_tiny(host, task="toy", model="toy:noquant")


def test_registered_through_the_entry_point():
    host = make_host(entrypoints=True)
    record = host.plugins["example"]
    assert record.source == "entry point of qcore-example" and record.error is None
    assert host.default_method("example").name == "example-pow2"
