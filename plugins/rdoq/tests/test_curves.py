"""The fast RD engine gives the reference engine's curves; the candidates are the deployed quantizer."""

import numpy as np
import pytest
import torch

from qcore import QcoreError, discover_layers, measure_layers, torch_layer_info
from qcore.testing import tiny_convnet, tiny_mlp
from qcore_rdoq.curves import first_order_curves
from qcore_rdoq.deployment import Clip
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
    assert curves.engine == "replay"
    ref = first_order_curves(model, lambda m, b: m(b), batches, layers, 2, [2, 4], engine="reference")
    assert np.array_equal(curves.dist, ref.dist)


class _Untraceable(torch.nn.Module):
    """Data-dependent control flow (no torch.fx), a layer called twice, and a head the target ignores."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
        self.body = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(4, 4, 3, padding=1))
        self.shared = torch.nn.Conv2d(4, 4, 1)
        self.head = torch.nn.Linear(4, 3)
        self.seen = {}

    def forward(self, x):
        h = self.stem(x)
        if h.mean() > -1:  # data-dependent: torch.fx cannot trace this
            h = h + self.body(h)
        h = self.shared(self.shared(h))  # called twice: replay leaves it to the reference engine
        self.seen["logits"] = self.head(h.mean((2, 3)))  # not part of the target below
        return h


def test_replay_engine_equals_reference_and_skips_what_the_target_ignores(caplog):
    from qcore_rdoq.replay import ReplayEngine

    model = _Untraceable().eval()
    batches, layers = setup(model)
    fwd = lambda m, b: m(b)  # noqa: E731
    bits = [0, 2, 3, 6]
    ref = first_order_curves(model, fwd, batches, layers, 2, bits, engine="reference")
    eng = ReplayEngine(model, fwd, batches)
    assert eng.upstream("body.2") == ["stem", "body.0", "body.1"]
    assert eng.upstream("stem.0") == []
    with caplog.at_level("INFO"):
        rep = first_order_curves(model, fwd, batches, layers, 2, bits, engine=eng)
    assert rep.layer_engines["shared"] == "reference" and rep.layer_engines["body.2"] == "replay"
    assert np.array_equal(rep.dist, ref.dist)  # the same operations on the same values
    # the target does not read the head, so it is not rerun; what feeds the target is
    assert eng._irrelevant == {"body": False, "shared": False, "head": True}
    assert "called 2 times" in caplog.text
    assert all(m.__dict__.get("forward") is None for m in model.modules())  # every stub removed


def test_replay_refuses_a_model_that_edits_recorded_outputs():
    from qcore_rdoq.replay import ReplayEngine

    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            h = self.a(x.flatten(1))
            h.mul_(0.5)  # edits a's output after its hook recorded it
            return self.b(h)

    model = InPlace().eval()
    batches, layers = setup(model)
    with pytest.raises(QcoreError, match="recorded"):
        first_order_curves(model, lambda m, b: m(b), batches, {"b": layers["b"]}, 2, [2, 4],
                           engine=ReplayEngine(model, lambda m, b: m(b), batches))


class _DictStage(torch.nn.Module):
    """Writes ``layer(d[src])`` into ``d[dst]`` and returns ``d`` itself (OpenPCDet's ``batch_dict`` style)."""

    def __init__(self, layer, src, dst):
        super().__init__()
        self.layer, self.src, self.dst = layer, src, dst

    def forward(self, d):
        d[self.dst] = self.layer(d[self.src])
        return d


class _DictDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.backbone = _DictStage(torch.nn.Linear(64, 8), "x", "bev")
        self.head = _DictStage(torch.nn.Linear(8, 4), "bev", "boxes")

    def forward(self, x):
        d = {"x": x.flatten(1)}
        if x.mean() > -1e9:  # data-dependent: torch.fx cannot trace this
            d = self.head(self.backbone(d))
        return d


def test_replay_refuses_modules_that_pass_their_input_dict_through(caplog):
    """Every recorded output would be the same dict, edited by later modules: replay must not record it. engine=fast
    falls back to the reference engine (logged); engine=replay asked explicitly is a one-line QcoreError."""
    from qcore_rdoq.curves import ReferenceEngine, make_engine

    model = _DictDetector().eval()
    torch.manual_seed(1)
    batches = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    layers = discover_layers(model, torch_layer_info)
    measure_layers(model, layers, lambda m: m(batches[0]))
    fwd = lambda m, b: m(b)["bev"]  # noqa: E731 - the target leaves the head free
    with caplog.at_level("WARNING"):
        eng = make_engine("fast", model, fwd, batches)
    assert isinstance(eng, ReferenceEngine)
    assert "returns its own input dict" in caplog.text and "using the reference engine" in caplog.text
    with pytest.raises(QcoreError, match="module backbone: it returns its own input dict.*engine=reference") as err:
        make_engine("replay", model, fwd, batches)
    assert "\n" not in str(err.value)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # hooks removed
    fast = first_order_curves(model, fwd, batches, layers, 4, [2, 4], engine="fast")
    ref = first_order_curves(model, fwd, batches, layers, 4, [2, 4], engine="reference")
    assert fast.engine == "reference" and np.array_equal(fast.dist, ref.dist)
    assert (ref.dist[:2] > 0).all() and (ref.dist[2:] == 0).all()  # body: 2 groups of 4 rows; the head is free


def test_replay_recording_checks_what_a_module_returns():
    """Passing a non-tensor input object through (also inside a tuple or dict) is refused; a tensor passed through
    (nn.Identity), a fresh container or shared immutable values (None) are fine. A fresh dict edited in place after
    it was returned is refused when the pass ends; one nobody edits is recorded."""
    import types

    from qcore_rdoq.replay import ReplayEngine, _unreplayable

    state, d, t = types.SimpleNamespace(a=1), {"x": torch.zeros(2)}, torch.zeros(2)
    assert "own input SimpleNamespace" in _unreplayable((state,), {}, (t, state))
    assert "own input SimpleNamespace" in _unreplayable((), {"s": state}, state)
    assert "own input dict" in _unreplayable(((d, 1),), {}, {"out": t, "in": d})
    assert _unreplayable((t, None), {}, t) == "" and _unreplayable((state, None), {}, (t * 2, None)) == ""
    assert _unreplayable((d,), {}, {"x": d["x"]}) == ""  # a fresh dict of the same tensors

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 4)

        def forward(self, x):
            return {"logits": self.fc(x.flatten(1))}  # a fresh dict each call

    class Post(torch.nn.Module):
        def forward(self, out):
            out["score"] = out["logits"].softmax(1)  # edits the head's recorded output after it returned
            return out["score"]

    class Net(torch.nn.Module):
        def __init__(self, edit):
            super().__init__()
            self.head, self.post, self.edit = Head(), Post(), edit

        def forward(self, x):
            out = self.head(x)
            return self.post(out) if self.edit else out["logits"]

    batches = [torch.randn(4, 1, 8, 8)]
    assert ReplayEngine(Net(False).eval(), lambda m, b: m(b), batches).upstream("head.fc") == []
    with pytest.raises(QcoreError, match="module head: its output dict is edited in place after it returns"):
        ReplayEngine(Net(True).eval(), lambda m, b: m(b), batches)


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
    modules = _ranged(w, info, group, bits, deadzones=[0.0, 0.3])
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


# -- curves = deployment under the run's clip: estimator (percentile included) and grid symmetry -----------------

#: weight clips other than the default (mse, symmetric): each changes the candidates
WEIGHT_CLIPS = [Clip("minmax"), Clip("percentile", percentile=99.0), Clip("mse", symmetric=False)]


def _deployed_weight(w: torch.Tensor, info, group: int, bits: int, clip: Clip) -> torch.Tensor:
    """The weight as core's range calibrator deploys it with every group at ``bits``: the plan's per-group
    quantizer, its ranges set by ``RangeCalibrator.weight_estimator`` under the run's options."""
    from qcore import RangeCalibrator, RangeOptions, UniformFakeQuant, calibrate_rows
    from qcore_rdoq.groups import weight_spec

    groups = len(weight_groups(info, group))
    fq = UniformFakeQuant(weight_spec(group, [bits] * groups, info.out_channels, symmetric=clip.symmetric),
                          info.out_channels, info.weight_axis)
    cal = RangeCalibrator(RangeOptions(weight_range=clip.estimator, percentile=clip.percentile))
    calibrate_rows(fq, fq.rows_of(w), cal.weight_estimator())
    return fq(w)


def _output_mse(model, batches, ref) -> float:
    with torch.no_grad():
        sse = sum(float((model(b) - r).pow(2).sum()) for b, r in zip(batches, ref, strict=True))
    return sse / sum(r.numel() for r in ref)


@pytest.mark.parametrize("clip", WEIGHT_CLIPS, ids=lambda c: c.describe())
def test_weight_curves_are_the_distortion_of_the_deployed_group(clip):
    """Slow reference: each group deployed alone at each bit-width by core's calibrator (other groups FP), the
    whole model rerun; both first-order engines give exactly that, and it is not what the default clip gives."""
    model = tiny_convnet()
    batches, layers = setup(model)
    fwd = lambda m, b: m(b)  # noqa: E731
    bits, size = [0, 2, 4], 4
    curves = [first_order_curves(model, fwd, batches, layers, size, bits, engine=e, clip=clip)
              for e in ("fast", "reference")]
    with torch.no_grad():
        ref = [model(b) for b in batches]
    expected = []
    for name, info in layers.items():
        module = model.get_submodule(name)
        w = module.weight.detach().clone()
        deployed = {b: _deployed_weight(w, info, size, b, clip) for b in bits}
        for g in weight_groups(info, size):
            row = []
            for b in bits:
                with torch.no_grad():
                    module.weight.copy_(w)
                    module.weight[g.start:g.stop] = deployed[b][g.start:g.stop]
                row.append(_output_mse(model, batches, ref))
            expected.append(row)
        with torch.no_grad():
            module.weight.copy_(w)
    for c in curves:
        np.testing.assert_allclose(c.dist, np.array(expected), rtol=1e-4, atol=1e-12)
    default = first_order_curves(model, fwd, batches, layers, size, bits, engine="fast")
    assert not np.allclose(default.dist[:, 1:], np.array(expected)[:, 1:], rtol=1e-3)


@pytest.mark.parametrize("clip", WEIGHT_CLIPS, ids=lambda c: c.describe())
def test_second_order_candidates_follow_the_clip(clip):
    """On a linear model the Gauss-Newton expansion is exact, so the second-order curves equal the measured ones
    (= deployment, above) only if they quantize with the same clip; with the default clip they do not."""
    from qcore_rdoq.second_order import second_order_curves

    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)).eval()
    batches, layers = setup(lin)
    bits = [1, 2, 4]
    first = first_order_curves(lin, lambda m, b: m(b), batches, layers, 2, bits, engine="reference", clip=clip)
    second = second_order_curves(lin, batches, layers, 2, bits, clip=clip)
    np.testing.assert_allclose(second.dist, first.dist, rtol=1e-5)
    assert not np.allclose(second_order_curves(lin, batches, layers, 2, bits).dist, first.dist, rtol=1e-3)


@pytest.mark.parametrize("clip", [Clip("minmax", symmetric=False), Clip("percentile", True, 99.0),
                                  Clip("mse", symmetric=True)], ids=lambda c: c.describe())
def test_activation_curves_are_the_distortion_of_the_deployed_input(clip):
    """Slow reference: each layer's input quantized alone by a per-tensor quantizer that core's range calibrator
    set (``act_range``, percentile, symmetry) from the observed sample; both engines give exactly that."""
    from qcore import QuantSpec, RangeCalibrator, RangeOptions, UniformFakeQuant, calibrate_rows, observe_inputs
    from qcore_rdoq.act_curves import activation_curves

    model = tiny_convnet()
    batches, layers = setup(model)
    fwd = lambda m, b: m(b)  # noqa: E731
    bits = [2, 4]
    curves = [activation_curves(model, fwd, batches, layers, bits, e, clip)[0] for e in ("fast", "reference")]
    samples = observe_inputs(model, fwd, batches, layers)
    estimator = RangeCalibrator(RangeOptions(act_range=clip.estimator, percentile=clip.percentile)).act_estimator()
    with torch.no_grad():
        ref = [model(b) for b in batches]
    expected = []
    for name, info in layers.items():
        row = []
        for b in bits:
            q = UniformFakeQuant(QuantSpec(bits=b, symmetric=clip.symmetric, granularity="tensor"), info.in_channels,
                                 info.act_axis)
            calibrate_rows(q, samples[name], estimator)
            h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a, q=q: (q(a[0]), *a[1:]))
            try:
                row.append(_output_mse(model, batches, ref))
            finally:
                h.remove()
        expected.append(row)
    for c in curves:
        np.testing.assert_allclose(c, np.array(expected), rtol=1e-4, atol=1e-12)
    default, _ = activation_curves(model, fwd, batches, layers, bits, "fast")  # mse, affine: differs from each
    assert not np.allclose(default, np.array(expected), rtol=1e-3)
