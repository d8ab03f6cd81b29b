"""Activation (output) correction: quantized output channels moved back to FP's mean (and spread) on
calibration data, one layer at a time."""

import pytest
import torch

from qcore._act_correction import correct_outputs, output_means
from qcore._components import RunConfig
from qcore._fold import fold_batchnorm
from qcore._wrap import quant_layers
from qcore.testing import make_host, run_tiny


def _tiny_quantized(**options):
    """The tiny convnet quantized at W3A3 by the pipeline, the BN-folded FP model it was quantized from, the
    task instance and its calibration batches."""
    host = make_host()
    out = run_tiny(host, w_bits=3, a_bits=3, options={"first_last": "same", **options})
    inst = host.get("task", "tiny")().build(
        RunConfig(task="tiny", model="tiny:convnet", calib_size=64, batch_size=32, eval_size=128), host)
    fp = inst.model
    fold_batchnorm(fp)  # the pipeline quantized the folded model
    return out, fp, inst, list(inst.calibration)


def _gap(qmodel, fp_model, batches, forward):
    layers = {n: q.info for n, q in quant_layers(qmodel).items()}
    fp = output_means(fp_model, forward, batches, layers)
    q = output_means(qmodel, forward, batches, layers)
    return {n: float((fp[n] - q[n]).abs().mean()) for n in layers}


def test_correction_matches_fp_channel_means():
    out, fp, inst, batches = _tiny_quantized()
    before = _gap(out.model, fp, batches, inst.forward)
    corr = correct_outputs(out.model, fp, inst.forward, batches)
    after = _gap(out.model, fp, batches, inst.forward)
    # one layer at a time in execution order, each with its upstream corrected: every layer's means are FP's
    assert all(after[n] <= 1e-4 * before[n] + 1e-6 for n in before), (before, after)
    assert set(corr) == set(before)


@pytest.mark.parametrize("mode", ["static", "affine", "local"])
def test_pipeline_option_is_reported(mode):
    out = run_tiny(make_host(), w_bits=4, a_bits=4, options={"act_correction": mode})
    assert out.result["quantized"]["act_correction"] == mode
    assert all((q.out_scale is not None) == (mode == "affine") for q in quant_layers(out.model).values())
    assert all(q.out_correction is not None for q in quant_layers(out.model).values())
    with torch.no_grad():
        assert torch.isfinite(out.model(torch.randn(2, 1, 8, 8))).all()


def test_local_correction_removes_each_layers_own_mean_shift():
    from qcore._act_correction import local_gaps

    out, fp, inst, batches = _tiny_quantized()
    before = {n: float(g.abs().mean()) for n, g in local_gaps(out.model, inst.forward, batches).items()}
    correct_outputs(out.model, fp, inst.forward, batches, mode="local")
    after = {n: float(g.abs().mean()) for n, g in local_gaps(out.model, inst.forward, batches).items()}
    assert all(after[n] <= 1e-4 * before[n] + 1e-6 for n in before), (before, after)


def test_affine_correction_matches_each_channels_mean_and_spread():
    """After the sweep every layer's output channels carry FP's mean and standard deviation, each measured with
    its upstream corrected."""
    from qcore._layers import watch_layers

    out, fp, inst, batches = _tiny_quantized(weight_range="mse")
    layers = {n: q.info for n, q in quant_layers(out.model).items()}

    def outputs(model):
        got = {n: [] for n in layers}
        watch_layers(model, inst.forward, batches, layers,
                     on_output=lambda n, y: got[n].append(y.movedim(layers[n].act_axis, 0).flatten(1).double()))
        return {n: torch.cat(v, dim=1) for n, v in got.items()}

    def std(t):
        return t.std(1, correction=0)

    f_out, before = outputs(fp), outputs(out.model)
    assert any((std(before[n]) / std(f_out[n]) - 1).abs().max() > 0.05 for n in layers)  # quantization moved them
    corr = correct_outputs(out.model, fp, inst.forward, batches, mode="affine")
    after = outputs(out.model)
    assert set(corr) == set(layers)
    for n in layers:
        assert torch.allclose(after[n].mean(1), f_out[n].mean(1), atol=1e-4), n
        assert torch.allclose(std(after[n]), std(f_out[n]), rtol=1e-4, atol=1e-6), n
        assert quant_layers(out.model)[n].out_scale is not None


def test_a_layer_only_a_later_batch_reaches_is_corrected():
    """The correction order comes from every calibration batch, not the first alone."""
    import copy

    from torch import nn

    from qcore._fake_quant import UniformFakeQuant
    from qcore._layers import torch_layer_info
    from qcore._spec import LayerSpec, QuantSpec
    from qcore._wrap import QuantLayer

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            y = self.a(x)
            return self.b(torch.relu(y)) if x.mean() > 0 else y  # b only sees positive batches

    torch.manual_seed(0)
    fp = Branchy().eval()
    q = copy.deepcopy(fp)
    for name in ("a", "b"):
        module = getattr(q, name)
        spec = QuantSpec(bits=2, symmetric=True, granularity="channel")
        fq = UniformFakeQuant(spec, 6, 0)
        rows = fq.rows_of(module.weight.detach())
        fq.set_range(rows.amin(dim=1), rows.amax(dim=1))
        setattr(q, name, QuantLayer(module, torch_layer_info(module, name), LayerSpec(spec, None), fq, None))
    batches = [torch.randn(32, 6) - 3, torch.randn(32, 6) + 3]
    forward = lambda m, x: m(x)  # noqa: E731
    corr = correct_outputs(q, fp, forward, batches, mode="affine")
    assert set(corr) == {"a", "b"}
    layers = {n: m.info for n, m in quant_layers(q).items()}
    fp_means, q_means = output_means(fp, forward, batches, layers), output_means(q, forward, batches, layers)
    assert torch.allclose(q_means["b"], fp_means["b"], atol=1e-4)


def test_early_exit_moments_equal_a_full_pass():
    """Stopping each forward pass once the measured layer has run gives the full pass's statistics."""
    from qcore._act_correction import _layer_moments, layer_calls, output_moments

    out, _, inst, batches = _tiny_quantized()
    layers = {n: q.info for n, q in quant_layers(out.model).items()}
    calls = layer_calls(out.model, inst.forward, batches)
    assert list(calls) == list(layers) and all(c == [1] * len(batches) for c in calls.values())
    full = output_moments(out.model, inst.forward, batches, layers)
    for n in layers:
        mean, var = _layer_moments(out.model, inst.forward, batches, n, layers[n], calls[n])
        assert torch.equal(mean, full[n][0]) and torch.equal(var, full[n][1])
