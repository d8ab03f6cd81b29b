"""rdoq's curves model the run's deployment: the calibrator's range estimators and the grids' symmetry reach the
curves and their cache key, and what the curves cannot model is refused with one line."""

import os
import subprocess
import sys

import pytest
import torch

from qcore import QcoreError
from qcore.testing import make_host, run_tiny
from qcore_rdoq import plugin
from qcore_rdoq.deployment import Clip
from qcore_rdoq.groups import quantize_at

TINY = {"group": 4, "first_last": "same", "curve_samples": 32}


@pytest.fixture(scope="module")
def host():
    aciq = pytest.importorskip("qcore_aciq.plugin")
    return make_host(("rdoq", plugin), ("aciq", aciq))


@pytest.mark.parametrize("options,calibrator,clip", [
    ({"weight_range": "minmax"}, None, Clip("minmax")),
    ({"weight_range": "percentile", "percentile": "99.0"}, None, Clip("percentile", percentile=99.0)),
    ({"weight_symmetric": "false"}, None, Clip("mse", symmetric=False)),
    ({}, "minmax", Clip("mse")),  # the method's weight_range=mse reaches any range calibrator
    ({"min_bits": 1}, "aciq", Clip("mse")),  # ACIQ's weights are core's estimators; pruning is off
], ids=["minmax", "percentile", "affine", "minmax-calibrator", "aciq-weights"])
def test_every_deployed_group_is_its_curve_candidate(host, options, calibrator, clip):
    """Through the real pipeline: the allocator prices the candidates of the clip the calibrator then deploys."""
    out = run_tiny(host, method="rdoq", calibrator=calibrator, target_bits=3.0,
                   options={**TINY, "cache": "off", "act_correction": "none", **options})
    assert out.plan.meta["weight_clip"] == clip.describe()
    checked = 0
    for name, layer in ((n, m) for n, m in out.model.named_modules() if n in out.plan.layers):
        spec = out.plan.layers[name].weight
        assert spec.symmetric == clip.symmetric and spec.group_bits is not None
        w, wq = layer.module.weight.detach(), layer.quantized_weight()
        for g, b in enumerate(spec.group_bits):
            cand = quantize_at(w, layer.info, 4, b, clip)
            assert torch.equal(wq[4 * g:4 * g + 4], cand[4 * g:4 * g + 4]), (name, g, b)
            checked += 1
    assert checked > 4


@pytest.mark.parametrize("options,calibrator,clip", [
    ({"act_range": "minmax"}, None, Clip("minmax", symmetric=False)),
    ({"act_range": "percentile", "percentile": "99.0", "act_symmetric": "true"}, None,
     Clip("percentile", symmetric=True, percentile=99.0)),
    ({}, "percentile", Clip("percentile", symmetric=False)),  # that calibrator's own act_range default
], ids=["minmax", "percentile-symmetric", "percentile-calibrator"])
def test_activation_curves_use_the_deployed_act_range(host, monkeypatch, options, calibrator, clip):
    from qcore_rdoq import allocator

    seen = []
    real = allocator.activation_curves

    def spy(*args, **kwargs):
        seen.append(args[6])  # the clip, after model, forward, batches, layers, bits, engine
        return real(*args, **kwargs)

    monkeypatch.setattr(allocator, "activation_curves", spy)
    out = run_tiny(host, method="rdoq", calibrator=calibrator, target_bits=3.0, a_bits=4,
                   options={**TINY, "cache": "off", "budget": "separate", **options})
    assert seen == [clip] and out.plan.meta["act_clip"] == clip.describe()
    assert all(s.act.symmetric == clip.symmetric for s in out.plan.layers.values())


def test_curve_cache_key_holds_the_estimator_percentile_and_symmetry(host, tmp_path):
    """A run reuses cached curves only when the deployed clip is the same."""
    def cached(**options):
        out = run_tiny(host, method="rdoq", target_bits=3.0, options={**TINY, "cache": str(tmp_path), **options})
        return out.plan.meta["cached_layers"]

    layers = ["0", "3", "7"]
    assert cached() == [] and cached() == layers
    assert cached(weight_range="minmax") == [] and cached(weight_range="minmax") == layers
    assert cached(weight_range="percentile", percentile="99.0") == []
    assert cached(weight_range="percentile", percentile="99.9") == []
    assert cached(weight_range="percentile", percentile="99.0") == layers
    assert cached(weight_symmetric="false") == []
    assert cached(percentile="99.0") == layers  # the percentile is no part of another estimator's key
    assert cached(act_range="minmax") == layers  # weight curves do not see the activation calibration


@pytest.mark.parametrize("calibrator,options,match", [
    ("aciq", {}, "calibrator 'aciq' sets pruned \\(0-bit\\) weight groups to their mean"),
    ("kl", {"min_bits": 1, "budget": "joint"}, "calibrator 'kl' clips activations with its own rule"),
    ("aciq", {"min_bits": 1, "budget": "separate"}, "calibrator 'aciq' clips activations with its own rule"),
    (None, {"weight_granularity": "tensor"}, "weight_granularity=tensor .* is not modelled"),
    (None, {"act_granularity": "channel", "budget": "joint"}, "act_granularity=channel is not modelled"),
], ids=["aciq-pruning", "kl-activations", "aciq-activations", "tensor-weights", "channel-activations"])
def test_combinations_the_curves_cannot_model_are_refused(host, calibrator, options, match):
    with pytest.raises(QcoreError, match=match) as exc:
        run_tiny(host, method="rdoq", calibrator=calibrator, target_bits=3.0, a_bits=4,
                 options={**TINY, "cache": "off", **options})
    assert "\n" not in str(exc.value) and "use" in str(exc.value)


def test_asymmetric_dead_zone_grid_is_refused(host):
    with pytest.raises(QcoreError, match="dead-zone grid is symmetric"):
        run_tiny(host, method="rdoq-deadzone", target_bits=3.0,
                 options={**TINY, "cache": "off", "weight_symmetric": "false"})


def test_per_channel_activations_with_uniform_activations_still_run(host):
    """budget=weights measures no activation curve: per-channel activation scales do not concern the curves."""
    out = run_tiny(host, method="rdoq", target_bits=3.0, options={**TINY, "cache": "off", "act_granularity": "channel"})
    assert all(s.act.granularity == "channel" for s in out.plan.layers.values())


def test_cli_refusal_is_one_line_and_exit_2(tmp_path):
    """The user's view: ``qcore run`` with a calibrator the activation curves cannot model."""
    pytest.importorskip("qcore_aciq")
    env = dict(os.environ, QCORE_PROGRESS="0", QCORE_CACHE_DIR=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "qcore", "run", "--plugin", "rdoq", "--calibrator", "kl",
                        "-o", "budget=joint", "-o", "min_bits=1", "--eval-size", "100", "--calib-size", "32",
                        "--out", "out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcore: error: calibrator 'kl' clips activations"), p.stderr
    assert "--calibrator mse, minmax or percentile" in lines[0] and not (tmp_path / "out").exists()


def test_context_without_a_calibrator_reads_the_range_options():
    """A context built by hand (no pipeline, so no calibrator) models what a range calibrator would deploy under
    its options; an unknown estimator name is a one-line error listing the valid ones."""
    from types import SimpleNamespace

    from qcore import PipelineOptions
    from qcore_rdoq.deployment import Deployment, deployment

    ctx = SimpleNamespace(pipeline=PipelineOptions(act_symmetric=True), calibrator=None,
                          options={"weight_range": "percentile", "percentile": "99.5"})
    assert deployment(ctx, 0, True, False) == Deployment(Clip("percentile", True, 99.5), Clip("mse", True, 99.5))
    ctx.options = {"weight_range": "kl"}
    with pytest.raises(QcoreError, match="unknown range estimator 'kl'; use one of minmax, percentile, mse"):
        deployment(ctx, 0, False, False)
