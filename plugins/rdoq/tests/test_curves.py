"""The fast RD engine gives the reference engine's curves; the candidates are the deployed quantizer."""

import numpy as np
import pytest
import torch

from qcore import discover_layers, measure_layers, torch_layer_info
from qcore.testing import tiny_convnet, tiny_mlp
from qcore_rdoq.curves import first_order_curves
from qcore_rdoq.groups import quantize_at, weight_groups


def setup(model):
    torch.manual_seed(1)
    batches = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    layers = discover_layers(model, torch_layer_info)
    measure_layers(model, layers, lambda m: m(batches[0]))
    return batches, layers


@pytest.mark.parametrize("build", [tiny_convnet, tiny_mlp])
def test_fast_equals_reference(build):
    model = build()
    batches, layers = setup(model)
    fwd = lambda m, b: m(b)  # noqa: E731
    bits = [0, 1, 2, 4, 8]
    ref = first_order_curves(model, fwd, batches, layers, 4, bits, engine="reference")
    fast = first_order_curves(model, fwd, batches, layers, 4, bits, engine="fast", chunk=7)
    assert fast.engine == "fast" and set(fast.layer_engines.values()) == {"fast"}
    assert ref.dist.shape == (sum(len(weight_groups(i, 4)) for i in layers.values()), len(bits))
    assert np.allclose(fast.dist, ref.dist, rtol=1e-4, atol=1e-12)
    assert (ref.dist[:, 0] > ref.dist[:, -1]).all()  # pruning a group hurts more than 8 bits


def test_untraceable_model_falls_back_to_reference():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                x = x * 2
            return self.fc(x.flatten(1))

    model = Branchy().eval()
    batches, layers = setup(model)
    curves = first_order_curves(model, lambda m, b: m(b), batches, layers, 2, [2, 4], engine="fast")
    assert curves.engine == "reference"


def test_candidate_is_what_deployment_quantizes():
    from qcore import RangeCalibrator, RangeOptions, UniformFakeQuant
    from qcore_rdoq.groups import weight_spec

    model = tiny_convnet()
    _, layers = setup(model)
    info = layers["3"]
    w = model[3].weight.detach()
    spec = weight_spec(4, [3, 3, 3, 3], info.out_channels)
    fq = UniformFakeQuant(spec, info.out_channels, 0)
    est = RangeCalibrator(RangeOptions(weight_range="mse"))._estimator("mse")
    fq.set_range(*est(fq.rows_of(w), fq.row_bits(), True))
    assert torch.equal(fq(w), quantize_at(w, info, 4, 3))


@pytest.mark.parametrize("shape,group", [((20, 6, 3, 3), 8), ((13, 7), 4), ((16, 5), 16)])
def test_vectorised_tables_equal_the_deployed_modules(shape, group):
    """The plain-grid tables (all bit-widths in one pass) equal the per-bit-width quantizer modules bit for bit,
    short last groups and pruned groups included."""
    from qcore import LayerInfo
    from qcore_rdoq.groups import _ranged, candidate_tables

    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], *[1] * (len(shape) - 1))
    info = LayerInfo("l", "conv", shape[0], shape[1], weight_numel=w.numel())
    bits = list(range(11))
    tables = candidate_tables(w, info, group, bits, deadzones=[0.0, 0.3])
    modules = _ranged(w, info, group, bits, "mse", [0.0, 0.3])
    for d in (0.0, 0.3):
        for b in bits:
            assert torch.equal(tables[d][b], modules[d][b](w)), (d, b)
    assert (tables[0.0][0] == 0).all()


def test_second_order_matches_first_order_in_the_linear_regime():
    """At high bits the perturbation is small and the Gauss-Newton estimate equals the measured MSE."""
    from qcore_rdoq.second_order import second_order_curves

    model = tiny_mlp()
    batches, layers = setup(model)
    bits = [1, 2, 8, 10]
    first = first_order_curves(model, lambda m, b: m(b), batches, layers, 4, bits, engine="reference")
    second = second_order_curves(model, batches, layers, 4, bits, sub_batch=5)
    assert second.dist.shape == first.dist.shape
    assert np.allclose(second.dist[:, 2:], first.dist[:, 2:], rtol=0.05)  # 8 and 10 bits
    assert (second.dist[:, 0] > second.dist[:, -1]).all()
    # a linear model has an exact second-order expansion of its output MSE
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)).eval()
    batches, layers = setup(lin)
    f = first_order_curves(lin, lambda m, b: m(b), batches, layers, 2, bits, engine="reference")
    s = second_order_curves(lin, batches, layers, 2, bits)
    assert np.allclose(s.dist, f.dist, rtol=1e-5)


def test_second_order_batched_products_equal_per_group_sums():
    """The batched per-layer products (short last groups zero-padded) equal a plain loop over groups, samples and
    outputs, on conv and linear layers whose channel counts the group size does not divide."""
    from qcore_rdoq.groups import candidate_table
    from qcore_rdoq.second_order import _jacobians, second_order_curves

    model = tiny_convnet()
    batches, layers = setup(model)
    bits, size = [0, 2, 5], 3
    curves = second_order_curves(model, batches, layers, size, bits, sub_batch=7)
    names = list(layers)
    jacs = [_jacobians(model, names, b, None) for b in batches]
    total = sum(b.shape[0] for b in batches) * int(model(batches[0][:1]).numel())
    rows = []
    for n in names:
        w = model.get_submodule(n).weight.detach()
        table = candidate_table(w, layers[n], size, bits)
        for g in weight_groups(layers[n], size):
            row = []
            for b in bits:
                d = (table[b] - w)[g.start:g.stop].reshape(-1).double()
                row.append(sum(float((j[n][:, :, g.start:g.stop].flatten(2).double() @ d).pow(2).sum())
                               for j in jacs) / total)
            rows.append(row)
    assert any(info.out_channels % size for info in layers.values())
    assert np.allclose(curves.dist, np.array(rows), rtol=1e-5, atol=1e-12)


def test_candidate_with_bias_correction_is_what_deployment_runs():
    """With weight bias correction on, the curve candidates are the corrected weights deployment uses."""
    from qcore.testing import make_host, run_tiny
    from qcore_rdoq import plugin

    host = make_host(("rdoq", plugin))
    out = run_tiny(host, method="rdoq", target_bits=3.0,
                   options={"group": 4, "first_last": "same", "weight_correction": "mean", "cache": "off"})
    layer = dict(out.model.named_modules())["3"]
    w = layer.module.weight.detach()
    spec = out.plan.layers["3"].weight
    assert spec.group_bits is not None
    wq = layer.quantized_weight()
    assert torch.allclose(wq.mean(dim=(1, 2, 3)), w.mean(dim=(1, 2, 3)), atol=1e-6)
    for g, b in enumerate(spec.group_bits):  # each group equals its curve candidate at the chosen bits
        cand = quantize_at(w, layer.info, 4, b, correction=host.get("correction", "mean")())
        assert torch.allclose(wq[4 * g:4 * g + 4], cand[4 * g:4 * g + 4], atol=1e-6)


def test_activation_curves_fast_equals_reference():
    from qcore_rdoq.act_curves import activation_curves

    model = tiny_convnet()
    batches, layers = setup(model)
    fwd = lambda m, b: m(b)  # noqa: E731
    ref, _ = activation_curves(model, fwd, batches, layers, [2, 4, 8], engine="reference")
    fast, _ = activation_curves(model, fwd, batches, layers, [2, 4, 8], engine="fast")
    assert ref.shape == (3, 3) and (ref[:, 0] > ref[:, -1]).all()
    assert np.allclose(fast, ref, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("model", ["tiny:mlp", "tiny:convnet"])
def test_second_order_activation_curves_track_the_measured_ones(model):
    """The Gauss-Newton expansion agrees with the measured (first-order) activation curves where the
    linearisation holds (fine grids) and stays within a small factor everywhere."""
    from qcore import RunConfig, fold_batchnorm
    from qcore.testing import make_host
    from qcore_rdoq.act_curves import activation_curves, second_order_activation_curves

    host = make_host()
    inst = host.get("task", "tiny")().build(RunConfig(task="tiny", model=model, calib_size=64, batch_size=32), host)
    m = inst.model
    fold_batchnorm(m)
    layers = discover_layers(m, torch_layer_info)
    measure_layers(m, layers, lambda mm: inst.forward(mm, inst.example))
    bits = [3, 4, 6, 8]
    first, _ = activation_curves(m, inst.forward, inst.calibration, layers, bits, "reference")
    second, _ = second_order_activation_curves(m, inst.forward, inst.calibration, layers, bits)
    ratio = second / first
    assert np.all((ratio > 0.2) & (ratio < 5.0))
    assert np.all(np.abs(ratio[:, -1] - 1) < 0.25)  # 8 bits: the linearisation is accurate


def test_second_order_activation_curves_separate_layers_that_share_an_input():
    """Two layers reading one tensor (q/k/v, a conv and its shortcut) each get their own sensitivity."""
    from torch import nn

    from qcore import LayerInfo
    from qcore_rdoq.act_curves import activation_curves, second_order_activation_curves

    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            return self.a(x) + 100 * self.b(x)

    model = Fork().eval()
    layers = {n: LayerInfo(name=n, kind="linear", out_channels=4, in_channels=8, act_axis=-1) for n in ("a", "b")}
    batches = [torch.randn(64, 8, generator=torch.Generator().manual_seed(1))]
    fwd = lambda m, x: m(x)  # noqa: E731
    first, _ = activation_curves(model, fwd, batches, layers, [2, 4], "reference")
    second, _ = second_order_activation_curves(model, fwd, batches, layers, [2, 4])
    assert second[1, 0] > 1000 * second[0, 0]  # b matters 10^4 times more than a
    np.testing.assert_allclose(second, first, rtol=0.05)  # linear model: the expansion is exact
