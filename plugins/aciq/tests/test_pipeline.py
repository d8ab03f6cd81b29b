"""ACIQ's components through the real pipeline on the tiny task."""

import pytest
import torch

from qcore import QcoreError, quant_layers
from qcore.testing import check_allocator, check_calibrator, make_host, run_tiny
from qcore_aciq import plugin
from qcore_aciq.calibrators import DynamicRange, aciq_range
from qcore_aciq.clipping import optimal_alpha


@pytest.fixture(scope="module")
def host():
    return make_host(("aciq", plugin))


def test_default_method_allocates_per_channel_bits_within_budget(host):
    out = run_tiny(host, method="aciq", options={"first_last": "same"})
    r = out.result
    assert r["w_bits_avg"] <= 4.0 + 1e-9 and r["a_bits_avg"] <= 4.0 + 1e-9
    assert all(s.weight.mixed and s.act.mixed for s in out.plan.layers.values())
    assert not r["quantized"]["deployable"]  # per-channel activation scales: simulation only
    assert r["quantized"]["weight_correction"] == "mean"


def test_mean_correction_preserves_every_channel_mean_exactly(host):
    out = run_tiny(host, method="aciq", w_bits=3, options={"first_last": "same"})
    for layer in quant_layers(out.model).values():
        w = layer.module.weight
        wq = layer.quantized_weight()
        torch.testing.assert_close(wq.flatten(1).mean(1), w.flatten(1).mean(1), rtol=0, atol=1e-6)


def test_zero_bit_channels_become_their_mean(host):
    out = run_tiny(host, method="aciq", model="tiny:mlp",
                   options={"first_last": "same", "weight_correction": "none", "w_target": 0.5, "a_target": 0.5})
    zero_w = zero_a = 0
    for layer in quant_layers(out.model).values():
        w = layer.module.weight.flatten(1)
        wq = layer.quantized_weight().flatten(1)
        dead = layer.weight_quantizer.bits == 0
        zero_w += int(dead.sum())
        torch.testing.assert_close(wq[dead], w[dead].mean(1, keepdim=True).expand(-1, w.shape[1]))
        aq = layer.act_quantizer
        dead_a = aq.bits == 0
        zero_a += int(dead_a.sum())
        x = torch.randn(5, aq.channels) * 3
        torch.testing.assert_close(aq(x)[:, dead_a], aq.prune_value[dead_a].expand(5, -1))
    assert zero_w > 0 and zero_a > 0


def test_aciq_calibrator_composes_with_another_method(host):
    opts = {"first_last": "same"}
    out = run_tiny(host, method="uniform", calibrator="aciq", w_bits=2, a_bits=2, options=opts)
    assert out.result["components"]["calibrator"] == "aciq"
    minmax = run_tiny(host, method="uniform", w_bits=2, a_bits=2, options=opts)
    clipped = [(a.act_quantizer.hi - a.act_quantizer.lo, b.act_quantizer.hi - b.act_quantizer.lo)
               for a, b in zip(quant_layers(out.model).values(), quant_layers(minmax.model).values(), strict=True)]
    assert all((c <= m + 1e-6).all() for c, m in clipped)  # ACIQ clips inside the observed range
    assert any((c < 0.9 * m).any() for c, m in clipped)


@pytest.mark.parametrize("name,floor", [("aciq", 95.0), ("nstd", 80.0), ("kl", 80.0)])
def test_calibrator_contract(host, name, floor):
    # nstd (mean +- 2 std) and kl clip whatever the bit-width: 85.9 % and 88.3 % W8A8 agreement on the tiny task
    check_calibrator(host, name, min_agreement=floor)


def test_allocator_contract(host):
    # the target is each free layer's average: pinned layers are not paid from it
    check_allocator(host, "aciq-channel", target_bits=3.0, alloc_acts=False)


def test_dynamic_statistics_are_explicit(host):
    out = run_tiny(host, method="aciq", options={"first_last": "same", "stats": "dynamic"})
    assert out.result["options"]["stats"] == "dynamic"
    assert all(isinstance(q.act_quantizer, DynamicRange) for q in quant_layers(out.model).values())


def test_per_channel_activation_bits_need_channel_scales(host):
    with pytest.raises(QcoreError, match="act_granularity=channel"):
        run_tiny(host, method="aciq", options={"act_granularity": "tensor"})


def test_aciq_range_follows_the_prior_and_per_row_bits():
    g = torch.Generator().manual_seed(0)
    lap = torch.distributions.Laplace(0.5, 2.0)
    torch.manual_seed(0)
    signed = lap.sample((2, 200_000))
    relu = torch.relu(torch.randn(1, 200_000, generator=g))
    x = torch.cat([signed, relu])
    bits = torch.tensor([2.0, 4.0, 3.0])
    lo, hi = aciq_range(x, bits, symmetric=False)
    for r, b in ((0, 2), (1, 4)):
        alpha = (hi[r] - lo[r]) / 2  # inside the observed range: mu +- b * A(M)
        assert float(alpha) == pytest.approx(2.0 * optimal_alpha(b, "laplace"), rel=0.02)
    assert lo[2] == 0 and hi[2] == pytest.approx(float(relu[relu > 0].mean()) * optimal_alpha(3, "laplace", half=True),
                                                 rel=1e-4)
    glo, ghi = aciq_range(x[:2], torch.tensor([2.0, 4.0]), symmetric=False, prior="gauss")
    assert (ghi[1] - glo[1]) > (ghi[0] - glo[0])  # the Gaussian path uses each row's own bits


def test_bin_allocation_reports_entropy_and_respects_bins(host):
    out = run_tiny(host, method="aciq", quantizer="midtread", allocator="fixed",
                   options={"first_last": "same", "bin_target_w": 3.0, "bin_target_a": 4.0})
    ent = out.result["measured"]["aciq_entropy"]
    assert 0 < ent["weights_bits_per_value"] <= 3.0 + 1.0  # at most log2(bins + 1) per value on average
    assert 0 < ent["acts_bits_per_value"] <= 4.0 + 1.0
    assert not out.result["quantized"]["deployable"]
    for layer in quant_layers(out.model).values():
        q = layer.weight_quantizer
        assert abs(float(q.bins.sum()) - q.bins.numel() * 2**3) <= q.bins.numel()  # eq. 10 keeps the bin count
        codes = q.codes(layer.module.weight)
        assert len(torch.unique(codes.flatten(1)[0])) <= int(q.bins[0]) + 1


def test_mid_tread_needs_the_aciq_calibrator(host):
    with pytest.raises(QcoreError, match="bin allocation"):
        run_tiny(host, method="aciq", quantizer="midtread", calibrator="minmax", allocator="fixed",
                 options={"first_last": "same"})


def test_targets_at_or_above_the_clamp_stay_uniform_and_midtread_refuses_allocated_bits(host):
    out = run_tiny(host, method="aciq", w_bits=16, a_bits=16, options={"first_last": "same"})
    assert out.result["w_bits_avg"] == 16.0 and out.result["a_bits_avg"] == 16.0
    with pytest.raises(QcoreError, match="--allocator fixed"):
        run_tiny(host, method="aciq", quantizer="midtread", options={"first_last": "same"})
