"""The dead-zone grid (``--quantizer deadzone``) and rdoq's dead-zone search."""

import contextlib
import json

import numpy as np
import pytest
import torch

from qcore import Plan, QcoreError, QuantSpec, UniformFakeQuant
from qcore.testing import make_host, run_tiny
from qcore_rdoq import plugin
from qcore_rdoq.deadzone import DeadZoneFakeQuant, deadzone_quantize, fit_deadzone, magnitudes, row_quantile
from qcore_rdoq.groups import weight_spec


@pytest.fixture(scope="module")
def host():
    return make_host(("rdoq", plugin))


def _fitted(w: torch.Tensor, bits: list[int], ratios: list[float], group: int = 4) -> DeadZoneFakeQuant:
    spec = weight_spec(group, bits, w.shape[0], ratios)
    fq = DeadZoneFakeQuant(spec, w.shape[0], 0)
    rows = fq.rows_of(w)
    fq.set_range(rows.amin(dim=1), rows.amax(dim=1))
    fq.fit(rows)
    return fq


def test_levels_fit_in_the_bits_and_the_ratio_is_zeroed():
    torch.manual_seed(0)
    w = torch.randn(28, 3, 5, 5)  # 7 groups of 4 channels, 300 weights each
    bits = [2, 3, 4, 5, 6, 8, 10]
    ratios = [0.1, 0.3, 0.5, 0.2, 0.9, 0.4, 0.6]
    q = _fitted(w, bits, ratios)(w)
    for g, (b, r) in enumerate(zip(bits, ratios, strict=True)):
        group = q[4 * g:4 * g + 4]
        assert len(torch.unique(group)) <= 2**b - 1  # 2K + 1 levels, addressable with b bits
        zeroed = float((group == 0).float().mean())
        assert r - 1e-6 <= zeroed <= r + 1 / 300 + 1e-6  # the ratio quantile of |w| and nothing else


def test_nonzero_weights_go_to_their_nearest_level():
    torch.manual_seed(1)
    rows = torch.randn(3, 500)
    bits = torch.tensor([2.0, 3.0, 5.0])
    phi, step = fit_deadzone(rows, bits, torch.tensor([0.2, 0.4, 0.3]))
    k = magnitudes(bits)
    q = deadzone_quantize(rows, phi[:, None], step[:, None], k[:, None])
    for i in range(3):
        levels = phi[i] + (torch.arange(int(k[i])) + 0.5) * step[i]
        above = rows[i].abs() > phi[i]
        nearest = levels[(rows[i].abs()[above][:, None] - levels[None]).abs().argmin(dim=1)]
        assert torch.allclose(q[i][above].abs(), nearest)
        assert (q[i][~above] == 0).all() and (torch.sign(q[i][above]) == torch.sign(rows[i][above])).all()


def test_step_is_the_best_of_the_search_grid():
    torch.manual_seed(2)
    rows = torch.randn(2, 400)
    bits, ratio = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.3])
    phi, step = fit_deadzone(rows, bits, ratio)
    k = magnitudes(bits)
    top = (rows.abs().amax(dim=1) - phi) / (k - 0.5)
    for f in torch.linspace(0.05, 1.0, 100):
        err = (deadzone_quantize(rows, phi[:, None], (top * f)[:, None], k[:, None]) - rows).pow(2).mean(dim=1)
        best = (deadzone_quantize(rows, phi[:, None], step[:, None], k[:, None]) - rows).pow(2).mean(dim=1)
        assert (best <= err + 1e-9).all()


def test_row_quantile_matches_torch():
    x = torch.rand(4, 333)
    q = torch.tensor([0.0, 0.25, 0.7, 1.0])
    want = torch.stack([torch.quantile(x[i], q[i]) for i in range(4)])
    assert torch.allclose(row_quantile(x, q), want)


def test_ratio_zero_and_one_bit_groups_are_the_plain_grid():
    torch.manual_seed(3)
    w = torch.randn(12, 6)
    fq = _fitted(w, [4, 1, 4], [0.0, 0.5, 0.3])
    plain = UniformFakeQuant(weight_spec(4, [4, 1, 4], 12), 12, 0)
    rows = plain.rows_of(w)
    plain.set_range(rows.amin(dim=1), rows.amax(dim=1))
    q, p = fq(w), plain(w)
    assert torch.equal(q[:8], p[:8])  # ratio 0; and 1 bit leaves no magnitude for a dead zone
    assert not torch.equal(q[8:], p[8:])


def test_unfitted_dead_zone_refuses_to_run():
    w = torch.randn(8, 4)
    fq = DeadZoneFakeQuant(weight_spec(4, [4, 4], 8, [0.2, 0.0]), 8, 0)
    fq.set_range(torch.full((2,), -1.0), torch.ones(2))
    with pytest.raises(QcoreError, match="never fitted"):
        fq(w)
    with pytest.raises(QcoreError, match="ratios must lie"):
        DeadZoneFakeQuant(weight_spec(4, [4, 4], 8, [1.0, 0.0]), 8, 0)


def test_group_params_survive_the_plan_json():
    spec = weight_spec(4, [3, 5], 8, [0.2, 0.0])
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(QcoreError, match="group_size"):
        QuantSpec(bits=4, granularity="channel", group_params=(0.1,))


def test_rdoq_deadzone_search_keeps_the_best_ratio(host, tmp_path):
    opts = {"group": 4, "curve_samples": 32, "first_last": "same", "cache": "off"}
    plain = run_tiny(host, method="rdoq", target_bits=3.0, options=opts)
    dz = run_tiny(host, method="rdoq-deadzone", target_bits=3.0, options={**opts, "deadzones": 4})
    assert dz.result["w_bits_avg"] <= 3.0 + 1e-9
    assert dz.plan.meta["deadzone_ratios"] == 4
    # the plain grid is ratio 0 of the search, so the best-of curves can only predict less distortion
    assert dz.plan.meta["predicted_distortion"] <= plain.plan.meta["predicted_distortion"] + 1e-12
    specs = [s.weight for s in dz.plan.layers.values()]
    assert all(s.quantizer == "deadzone" and s.group_params is not None for s in specs)
    assert set(r for s in specs for r in s.group_params) <= {0.0, 0.25, 0.5, 0.75}
    assert dz.result["quantized"]["deployable"] is False
    # the plan applies again on its own (core alone, with the quantizer installed) and gives the same model
    path = tmp_path / "plan.json"
    path.write_text(dz.plan.to_json())
    assert Plan.from_json(path.read_text()).layers == dz.plan.layers
    again = run_tiny(host, method="rdoq-deadzone", allocator="plan", options={"plan": str(path)})
    assert again.result["quant"] == dz.result["quant"]


def test_deadzone_search_needs_the_deadzone_quantizer(host):
    with pytest.raises(QcoreError, match="--quantizer deadzone"):
        run_tiny(host, method="rdoq", target_bits=3.0, options={"group": 4, "deadzones": 3, "cache": "off"})


def _measured(build, seed: int, batches: int, size: int):
    """A tiny model, seeded random batches and its measured layers."""
    from qcore import discover_layers, measure_layers, torch_layer_info

    model = build()
    torch.manual_seed(seed)
    data = [torch.randn(size, 1, 8, 8) for _ in range(batches)]
    layers = discover_layers(model, torch_layer_info)
    measure_layers(model, layers, lambda m: m(data[0]))
    return model, data, layers


def test_second_order_projections_are_unbiased():
    """Random output directions estimate the exact Gauss-Newton curves without bias."""
    from qcore.testing import tiny_mlp
    from qcore_rdoq.second_order import second_order_curves

    model, batches, layers = _measured(tiny_mlp, 1, 2, 16)
    bits = [2, 4]
    exact = second_order_curves(model, batches, layers, 4, bits).dist
    runs = np.stack([second_order_curves(model, batches, layers, 4, bits, projections=1, seed=s).dist
                     for s in range(40)])
    assert not np.allclose(runs[0], exact)  # a single draw is an estimate...
    # ...whose mean is the exact value: every entry within 4 standard errors over 40 draws (seeded: deterministic)
    z = (runs.mean(axis=0) - exact) / (runs.std(axis=0) / np.sqrt(len(runs)))
    assert np.abs(z).max() < 4.0
    assert abs(runs.mean() / exact.mean() - 1) < 0.05
    same = second_order_curves(model, batches, layers, 4, bits, projections=1, seed=0).dist
    assert np.array_equal(same, runs[0])  # reproducible from the seed


def test_second_order_set_equals_one_ratio_at_a_time(host):
    from qcore.testing import tiny_convnet
    from qcore_rdoq.second_order import second_order_curve_set, second_order_curves

    model, batches, layers = _measured(tiny_convnet, 1, 1, 8)
    both = second_order_curve_set(model, batches, layers, 4, [2, 4], [0.0, 0.5])
    for d, c in zip([0.0, 0.5], both, strict=True):
        alone = second_order_curves(model, batches, layers, 4, [2, 4], deadzone=d)
        assert np.allclose(c.dist, alone.dist, rtol=1e-6)
    assert not np.allclose(both[0].dist, both[1].dist)
    out = run_tiny(host, method="rdoq-deadzone", target_bits=3.0,
                   options={"group": 4, "first_last": "same", "engine": "second-order", "deadzones": 2,
                            "cache": "off"})
    assert out.plan.meta["engine"] == "second-order" and out.result["w_bits_avg"] <= 3.0 + 1e-9


def test_second_order_activation_projections_are_unbiased():
    from qcore.testing import tiny_mlp
    from qcore_rdoq.act_curves import second_order_activation_curves

    model, batches, layers = _measured(tiny_mlp, 2, 2, 16)
    fwd = lambda m, b: m(b)  # noqa: E731
    # the seed also draws the observed activation sample, so compare each draw with the exact value of its seed
    exact = np.stack([second_order_activation_curves(model, fwd, batches, layers, [2, 4], seed=s)[0]
                      for s in range(30)])
    runs = np.stack([second_order_activation_curves(model, fwd, batches, layers, [2, 4], seed=s, projections=1)[0]
                     for s in range(30)])
    rel = runs / exact - 1
    z = rel.mean(axis=0) / (rel.std(axis=0) / np.sqrt(len(rel)))
    assert np.abs(rel).max() > 0.05 and np.abs(z).max() < 4.0


def test_fit_is_row_independent():
    """Fitting many groups in one search gives each group what fitting it alone gives."""
    torch.manual_seed(4)
    rows = torch.randn(6, 700) * torch.rand(6, 1)
    bits, ratio = torch.tensor([2.0, 3, 4, 5, 8, 10]), torch.tensor([0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
    phi, step = fit_deadzone(rows, bits, ratio)
    for i in range(6):
        p1, s1 = fit_deadzone(rows[i:i + 1], bits[i:i + 1], ratio[i:i + 1])
        assert torch.equal(p1[0], phi[i]) and torch.equal(s1[0], step[i])


def test_second_order_ratio_passes_do_not_change_the_curves(monkeypatch):
    """Ratios split over several Jacobian passes (to bound memory) give the one-pass curves."""
    from qcore.testing import tiny_convnet
    from qcore_rdoq import second_order

    model, batches, layers = _measured(tiny_convnet, 0, 1, 8)
    one = second_order.second_order_curve_set(model, batches, layers, 4, [2, 4], [0.0, 0.3, 0.6], projections=2)
    monkeypatch.setattr(second_order, "_CANDIDATE_BYTES", 1)  # one ratio per pass
    split = second_order.second_order_curve_set(model, batches, layers, 4, [2, 4], [0.0, 0.3, 0.6], projections=2)
    for a, b in zip(one, split, strict=True):
        assert np.allclose(a.dist, b.dist, rtol=1e-5, atol=0)


def test_bad_group_params_and_stray_projections_are_one_line_errors(host):
    with pytest.raises(QcoreError, match="one per group"):
        weight_spec(4, [3, 5], 8, [0.2])
    with pytest.raises(QcoreError, match="list of numbers"):
        QuantSpec(bits=4, granularity="group", group_size=4, group_params=0.2)
    with pytest.raises(QcoreError, match="engine=second-order"):
        run_tiny(host, method="rdoq", target_bits=3.0, options={"projections": 2})


def test_projected_curves_for_any_batch_type_estimate_the_exact_expansion():
    """The backward-pass estimate (batches that are not tensors, e.g. a detector's dicts) is unbiased for the
    Gauss-Newton curves, which on a linear model are the measured ones; it is reproducible from its seed, runs the
    backward passes inside the task's grad_context, and restores requires_grad."""
    from qcore import discover_layers, measure_layers, torch_layer_info
    from qcore_rdoq.curves import first_order_curves
    from qcore_rdoq.second_order import projected_curve_set

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.Linear(8, 4)).eval()
    batches = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    layers = discover_layers(model, torch_layer_info)
    measure_layers(model, layers, lambda m: m(batches[0]))
    bits = [2, 4]
    exact = first_order_curves(model, lambda m, b: m(b), batches, layers, 4, bits, engine="reference").dist
    dicts = [{"x": b} for b in batches]
    fwd = lambda m, b: m(b["x"])  # noqa: E731
    entered = []

    @contextlib.contextmanager
    def guard():
        entered.append(1)
        yield

    model[1].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    runs = np.stack([projected_curve_set(model, fwd, dicts, layers, 4, bits, [0.0], 16, seed=s,
                                         grad_context=guard)[0].dist for s in range(12)])
    assert len(entered) == 12 * 16 * len(batches)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not np.allclose(runs[0], exact)  # an estimate...
    z = (runs.mean(axis=0) - exact) / (runs.std(axis=0) / np.sqrt(len(runs)))
    assert np.abs(z).max() < 4.0 and abs(runs.mean() / exact.mean() - 1) < 0.1  # ...unbiased (seeded: deterministic)
    again = projected_curve_set(model, fwd, dicts, layers, 4, bits, [0.0], 16, seed=0)[0].dist
    assert np.array_equal(again, runs[0])


def test_projected_curves_give_zero_distortion_to_a_layer_the_target_does_not_read(caplog):
    """A free layer that does not feed the distortion target (a detector head with target=bev) has no gradient:
    it gets zero distortion (logged once), and the other layers' curves are those computed without it."""
    from qcore import discover_layers, measure_layers, torch_layer_info
    from qcore_rdoq.second_order import projected_curve_set

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.body, self.head = torch.nn.Linear(64, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            bev = self.body(x.flatten(1))
            return {"bev": bev, "boxes": self.head(bev)}

    model = TwoHeads().eval()
    batches = [{"x": torch.randn(16, 1, 8, 8)} for _ in range(2)]
    layers = discover_layers(model, torch_layer_info)
    measure_layers(model, layers, lambda m: m(batches[0]["x"]))
    fwd = lambda m, b: m(b["x"])["bev"]  # noqa: E731
    with caplog.at_level("WARNING"):
        both = projected_curve_set(model, fwd, batches, layers, 4, [2, 4], [0.0], 4, seed=1)[0]
    assert caplog.text.count("does not depend on layer head") == 1
    heads = len(both.dist) - 2  # body: 8 rows in groups of 4
    assert (both.dist[2:] == 0).all() and heads == 1 and (both.dist[:2] > 0).all()
    alone = projected_curve_set(model, fwd, batches, {"body": layers["body"]}, 4, [2, 4], [0.0], 4, seed=1)[0]
    np.testing.assert_array_equal(both.dist[:2], alone.dist)
    none = projected_curve_set(model, fwd, batches, {"head": layers["head"]}, 4, [2, 4], [0.0], 2, seed=1)[0]
    assert (none.dist == 0).all()  # no layer feeds the target at all
