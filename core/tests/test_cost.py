import torch
from torch import nn

from qcore._cost import plan_cost
from qcore._layers import discover_layers, measure_layers, torch_layer_info
from qcore._spec import LayerSpec, Plan, QuantSpec


def test_size_bops_and_average_bits_by_hand():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    layers = discover_layers(model, torch_layer_info)
    measure_layers(model, layers, lambda m: m(torch.zeros(2, 2, 5, 5)))
    conv, fc = layers["0"], layers["2"]
    assert conv.macs == 4 * 25 * 2 * 9 and conv.act_numel == 50 and conv.weight_numel == 72
    assert fc.macs == 3 * 100 and fc.act_numel == 100
    plan = Plan(layers={
        "0": LayerSpec(QuantSpec(4, granularity="channel", group_size=2, group_bits=(2, 6)),
                       QuantSpec(8, symmetric=False)),
        "2": LayerSpec(QuantSpec(8, granularity="tensor"), None),
    })
    c = plan_cost(model, layers, plan)
    fp_params = 72 + 300 + 3
    assert c.fp_size_mb == fp_params * 32 / 8 / 2**20
    # conv: 72 weights at mean 4 bits + 4 scales; fc: 300 at 8 + 1 scale; act: scale + zero point; bias fp32
    bits = 72 * 4 + 4 * 32 + 300 * 8 + 32 + 2 * 32 + 3 * 32
    assert abs(c.size_mb - bits / 8 / 2**20) < 1e-12
    assert c.bops == conv.macs * 4 * 8 + fc.macs * 8 * 32
    assert c.w_bits_avg == (72 * 4 + 300 * 8) / 372
    assert c.a_bits_avg == 8.0


def test_layers_may_count_their_own_macs():
    """A layer info with ``count_macs`` (sparse convolutions: rule-book pairs) gets its count, per sample."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    layers = discover_layers(model, torch_layer_info)
    seen = []

    def count(x, out):
        seen.append((tuple(x.shape), tuple(out.shape)))
        return 1000

    layers["0"].count_macs = count
    measure_layers(model, layers, lambda m: m(torch.zeros(2, 2, 5, 5)))
    assert layers["0"].macs == 500 and seen == [((2, 2, 5, 5), (2, 4, 5, 5))]
    assert layers["2"].macs == 3 * 100


def test_extra_bits_a_quantizer_declares_count_in_size_and_average_bits():
    """``Quantizer.extra_bits`` (a lattice basis, a codebook): added to size_mb and spread over the tensor's
    elements in w_bits_avg; BOPs keep the element bits; the default declares nothing."""
    import qcore

    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    layers = discover_layers(model, torch_layer_info)
    measure_layers(model, layers, lambda m: m(torch.zeros(2, 2, 5, 5)))
    plan = Plan(layers={"0": LayerSpec(QuantSpec(4, granularity="channel"), None),
                        "2": LayerSpec(QuantSpec(8, granularity="tensor"), None)})
    base = plan_cost(model, layers, plan)
    assert qcore.Quantizer().extra_bits(plan.layers["0"].weight, "weight", layers["0"]) == 0.0
    assert plan_cost(model, layers, plan, qcore.Quantizer().extra_bits) == base

    def extra(spec, role, info):
        return 36.0 * info.out_channels if (role == "weight" and info.name == "0") else 0.0

    c = plan_cost(model, layers, plan, extra)
    assert abs(c.size_mb - base.size_mb - 4 * 36 / 8 / 2**20) < 1e-12
    assert abs(c.w_bits_avg - (72 * 4 + 4 * 36 + 300 * 8) / 372) < 1e-12
    assert c.bops == base.bops and c.a_bits_avg == base.a_bits_avg
