"""rdoq through the real pipeline on the tiny task."""

import numpy as np
import pytest

from qcore import QcoreError
from qcore.testing import check_allocator, make_host, run_tiny
from qcore_rdoq import plugin


@pytest.fixture(scope="module")
def host():
    return make_host(("rdoq", plugin))


@pytest.mark.parametrize("target", [2.0, 3.3, 5.0])
@pytest.mark.parametrize("solver", ["dp", "lagrangian"])
def test_plan_never_exceeds_budget(host, target, solver):
    out = run_tiny(host, method="rdoq", target_bits=target, options={"group": 4, "solver": solver,
                                                                      "curve_samples": 32, "first_last": "same"})
    assert out.result["w_bits_avg"] <= target + 1e-9
    assert out.plan.meta["solver"] == solver
    assert any(s.weight.mixed for s in out.plan.layers.values())


def test_dp_beats_or_matches_lagrangian_prediction(host):
    opts = {"group": 2, "curve_samples": 32, "first_last": "same"}
    dp = run_tiny(host, method="rdoq", target_bits=3.0, options={**opts, "solver": "dp"})
    lg = run_tiny(host, method="rdoq", target_bits=3.0, options={**opts, "solver": "lagrangian"})
    assert dp.plan.meta["predicted_distortion"] <= lg.plan.meta["predicted_distortion"] + 1e-12
    assert dp.plan.meta["solver_optimal"] and dp.plan.meta["solver_used"].startswith("dp (exact grid")
    assert lg.plan.meta["solver_used"] == "lagrangian" and not lg.plan.meta["solver_optimal"]


def test_contract(host):
    check_allocator(host, "rdoq", target_bits=4.0, group=4, curve_samples=16)


def test_impossible_budget_and_missing_target(host):
    with pytest.raises(QcoreError, match="impossible bit budget"):
        run_tiny(host, method="rdoq", target_bits=0.5, options={"min_bits": 2, "group": 4})



def test_interrupted_run_resumes_from_cache_with_the_same_plan(host, monkeypatch, tmp_path):
    from qcore_rdoq import curves

    opts = {"group": 4, "curve_samples": 32, "first_last": "same", "cache": str(tmp_path / "c")}
    fresh = run_tiny(host, method="rdoq", target_bits=3.0, options={**opts, "cache": "off"})
    real = curves.FastEngine.layer
    calls = {"n": 0}

    def dying(self, name, cands):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the run is killed while measuring the third layer
        return real(self, name, cands)

    monkeypatch.setattr(curves.FastEngine, "layer", dying)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(host, method="rdoq", target_bits=3.0, options=opts)
    monkeypatch.setattr(curves.FastEngine, "layer", real)
    resumed = run_tiny(host, method="rdoq", target_bits=3.0, options=opts)
    assert resumed.plan.meta["cached_layers"] == ["0", "3"]
    assert resumed.plan.layers == fresh.plan.layers
    again = run_tiny(host, method="rdoq", target_bits=3.0, options=opts)
    assert again.plan.meta["cached_layers"] == ["0", "3", "7"] and again.plan.layers == fresh.plan.layers


@pytest.mark.parametrize("budget", ["joint", "separate"])
def test_activation_budgets_are_respected(host, budget):
    out = run_tiny(host, method="rdoq", target_bits=3.0, a_bits=4,
                   options={"group": 4, "first_last": "same", "budget": budget, "cache": "off"})
    r, layers = out.result, out.plan.layers
    w_n = {"0": 72, "3": 1152, "7": 1024}  # weights of each layer of the tiny convnet
    a_n = {"0": 64, "3": 512, "7": 256}  # elements per sample of each layer's input
    a_avg = sum(a_n[n] * layers[n].act.bits for n in layers) / sum(a_n.values())
    assert r["a_bits_avg"] == pytest.approx(a_avg)
    if budget == "joint":
        total = r["w_bits_avg"] * sum(w_n.values()) + a_avg * sum(a_n.values())
        assert total <= 3.0 * (sum(w_n.values()) + sum(a_n.values())) + 1e-6
    else:
        assert r["w_bits_avg"] <= 3.0 + 1e-9 and a_avg <= 4.0 + 1e-9
    assert all(s.act.bits >= 2 for s in layers.values())


def test_plots_are_written_with_the_outputs(host, tmp_path):
    pytest.importorskip("matplotlib")
    out = run_tiny(host, method="rdoq", target_bits=3.0, out=tmp_path / "run",
                   options={"group": 4, "curve_samples": 16, "plots": True, "first_last": "same"})
    for name in ("rd_curves.png", "bits_per_layer.png"):
        data = (out.out / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert (out.out / "result.json").is_file()


@pytest.mark.parametrize("budget", ["weights", "joint"])
def test_entropy_rate_budget_holds_the_entropy(host, budget):
    opts = {"group": 4, "curve_samples": 16, "first_last": "same", "rate": "entropy", "budget": budget,
            "cache": "off"}
    out = run_tiny(host, method="rdoq", target_bits=3.0, a_bits=8, options=opts)
    meta = out.plan.meta
    measured = out.result["measured"]["rdoq_rate"]
    assert measured["weights_bits_per_value"] == pytest.approx(meta["w_entropy_avg"])
    if budget == "weights":
        assert meta["w_entropy_avg"] <= 3.0 + 1e-9
        # an entropy never exceeds the code width: the same budget buys more fixed-length bits
        assert out.result["w_bits_avg"] >= meta["w_entropy_avg"] - 1e-9


def test_group_entropy_is_bounded_by_the_width():
    import torch

    from qcore import LayerInfo
    from qcore_rdoq.groups import group_entropy

    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    info = LayerInfo(name="c", kind="conv2d", out_channels=8, in_channels=4, weight_numel=w.numel())
    ent = group_entropy(w, info, 4, [0, 1, 2, 4, 8])
    assert ent.shape == (2, 5) and (ent[:, 0] == 0).all()
    assert (ent[:, 1:] <= np.array([1, 2, 4, 8]) + 1e-9).all() and (np.diff(ent, axis=1) >= 0).all()


def test_second_order_engine_allocates_activations_without_forward_passes(host, tmp_path, monkeypatch):
    from qcore_rdoq import act_curves

    opts = {"group": 4, "curve_samples": 16, "first_last": "same", "engine": "second-order",
            "budget": "separate", "cache": str(tmp_path)}
    out = run_tiny(host, method="rdoq", target_bits=4.0, a_bits=4, options=opts)
    assert out.plan.meta["act_engine"] == "second-order"
    assert out.result["a_bits_avg"] <= 4.0 + 1e-9

    def measured(*args, **kwargs):
        raise AssertionError("the activation curves were measured again")

    monkeypatch.setattr(act_curves, "_second_order_act_pass", measured)  # a repeat reads them from the cache
    assert run_tiny(host, method="rdoq", target_bits=4.0, a_bits=4, options=opts).plan.layers == out.plan.layers


def test_default_adds_the_affine_output_correction_after_the_same_allocation(host):
    from qcore import quant_layers

    opts = {"group": 4, "curve_samples": 16, "first_last": "same", "cache": "off"}
    default = run_tiny(host, method="rdoq", target_bits=3.0, options=opts)
    alone = run_tiny(host, method="rdoq", target_bits=3.0, options={**opts, "act_correction": "none"})
    assert default.result["quantized"]["act_correction"] == "affine"
    assert alone.result["quantized"]["act_correction"] == "none"
    assert default.plan.layers == alone.plan.layers  # the correction comes after the allocation
    corrected = quant_layers(default.model).values()
    assert corrected and all(q.out_scale is not None and q.out_correction is not None for q in corrected)
    assert all(q.out_scale is None and q.out_correction is None for q in quant_layers(alone.model).values())


def test_curve_cache_tells_constructor_arguments_apart(tmp_path):
    """``--model-arg`` can change what a model computes without changing its weights (an activation, the
    pooling): its curves must not be served from the cache of the model built otherwise."""
    from types import SimpleNamespace

    import torch

    from qcore import RunConfig
    from qcore.testing import tiny_convnet
    from qcore_rdoq.allocator import RDOQAllocator, RDOQOptions

    alloc = RDOQAllocator(RDOQOptions(cache=str(tmp_path)))
    model, batches = tiny_convnet(0), [torch.zeros(2, 1, 8, 8)]

    def cache_dirs(**model_args):
        ctx = SimpleNamespace(model=model, config=RunConfig(model_args=model_args),
                              task=SimpleNamespace(split=None, forward_key={}))
        return [c.dir for c in alloc._caches(ctx, batches, 4, [2, 4], "none", [0.0])]

    assert cache_dirs() == cache_dirs() and cache_dirs(act="gelu") == cache_dirs(act="gelu")
    assert len({cache_dirs()[0], cache_dirs(act="gelu")[0], cache_dirs(act="relu")[0]}) == 3


@pytest.mark.parametrize("engine", ["fast", "second-order"])
def test_curve_caches_tell_distortion_targets_apart(tmp_path, engine):
    """The detection task's ``-o target=bev|head`` changes what ``forward`` returns for the same model and data:
    a ``head`` run must not be served ``bev`` curves, neither the weights' nor the activations'
    (``TaskInstance.forward_key`` is in both keys)."""
    from types import SimpleNamespace

    import torch

    from qcore import RunConfig
    from qcore.testing import tiny_convnet
    from qcore_rdoq.allocator import RDOQAllocator, RDOQOptions
    from qcore_rdoq.deployment import WEIGHT_CLIP

    alloc = RDOQAllocator(RDOQOptions(cache=str(tmp_path), engine=engine,
                                     projections=4 if engine == "second-order" else 0))
    model, batches = tiny_convnet(0), [torch.zeros(2, 1, 8, 8)]

    def keys(**forward_key):
        ctx = SimpleNamespace(model=model, config=RunConfig(), task=SimpleNamespace(split=None,
                                                                                    forward_key=forward_key))
        weights = alloc._caches(ctx, batches, 4, [2, 4], "none", [0.0])[0].dir
        return weights, alloc._act_cache(ctx, batches, [2, 4], WEIGHT_CLIP).dir

    bev, head = keys(target="bev"), keys(target="head")
    assert bev == keys(target="bev")  # the same settings: the same cache
    assert bev[0] != head[0] and bev[1] != head[1]


def test_target_above_max_bits_is_warned_before_the_curves(host, caplog):
    """--target-bits 12 with -o max_bits=4 cannot be used up: say so, rather than report 4.x bits without a word."""
    import logging

    with caplog.at_level(logging.WARNING, logger="qcore_rdoq"):
        out = run_tiny(host, method="rdoq", target_bits=12.0,
                       options={"group": 4, "curve_samples": 16, "max_bits": 4, "cache": "off"})
    warned = [r.getMessage() for r in caplog.records if "cannot be used up" in r.getMessage()]
    assert len(warned) == 1 and "-o max_bits=4" in warned[0]
    assert f"at most {out.result['w_bits_avg']:.2f} bits" in warned[0]  # what the run then reports
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qcore_rdoq"):
        run_tiny(host, method="rdoq", target_bits=4.0, options={"group": 4, "curve_samples": 16, "cache": "off"})
    assert "cannot be used up" not in caplog.text


def test_layer_curves_are_the_groups_curves_summed_and_exact_for_one_group(host, tmp_path):
    """The public per-layer curves: with one group per layer, D[i, k] is the measured output MSE with that whole
    layer at bits[k] (everything else FP); with several groups it is the sum of the groups' curves (RDOQ's
    additive model); a second call reads the shared cache and returns the same numbers."""
    import torch

    from qcore_rdoq import RDOQOptions, layer_curves
    from qcore_rdoq.allocator import _curve_batches
    from qcore_rdoq.deployment import deployment
    from qcore_rdoq.groups import quantize_at

    ctx = run_tiny(host, w_bits=4, a_bits=8, calibrator="minmax").ctx  # any run's context (uniform grid)
    assert ctx is not None
    names, bits = list(ctx.layers)[:3], [2, 4, 8]
    one = layer_curves(ctx, names, bits, options=RDOQOptions(group=4096, curve_samples=16, cache="off",
                                                                  min_bits=2, max_bits=8))
    batches = _curve_batches(list(ctx.calibration_batches()), 16)
    clip = deployment(ctx, 0, False, False).weights
    with torch.no_grad():
        ref = [ctx.task.forward(ctx.model, b) for b in batches]
        for i, name in enumerate(names):
            module = ctx.model.get_submodule(name)
            w0 = module.weight.detach().clone()
            for k, b in enumerate(bits):
                module.weight.copy_(quantize_at(w0, ctx.layers[name], 4096, b, clip))
                mse = sum(float((ctx.task.forward(ctx.model, x) - r).pow(2).sum())
                          for x, r in zip(batches, ref, strict=True))
                mse /= sum(r.numel() for r in ref)
                module.weight.copy_(w0)
                assert one[i, k] == pytest.approx(mse, rel=1e-4, abs=1e-12)
    assert (one[:, 0] > one[:, 2]).all()  # 2 bits distort more than 8
    opts = RDOQOptions(group=4, curve_samples=16, cache=str(tmp_path / "curves"), min_bits=2, max_bits=8)
    grouped = layer_curves(ctx, names, bits, options=opts)
    assert grouped.shape == (3, 3) and np.isfinite(grouped).all() and (grouped >= 0).all()
    assert any((tmp_path / "curves").rglob("*"))  # written to rdoq's cache ...
    assert np.array_equal(layer_curves(ctx, names, bits, options=opts), grouped)  # ... and read back
    with pytest.raises(QcoreError, match="outside"):
        layer_curves(ctx, names, [9], options=opts)
