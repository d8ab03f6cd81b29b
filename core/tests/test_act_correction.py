"""Static activation correction: quantized output channel means moved back to FP's on calibration data."""

import torch

from qcore.act_correction import correct_outputs, output_means
from qcore.components import RunConfig
from qcore.fold import fold_batchnorm
from qcore.testing import make_host, run_tiny
from qcore.wrap import quant_layers


def _gap(qmodel, fp_model, batches, forward):
    layers = {n: q.info for n, q in quant_layers(qmodel).items()}
    fp = output_means(fp_model, forward, batches, layers)
    q = output_means(qmodel, forward, batches, layers)
    return {n: float((fp[n] - q[n]).abs().mean()) for n in layers}


def test_correction_matches_fp_channel_means():
    host = make_host()
    out = run_tiny(host, w_bits=3, a_bits=3, options={"first_last": "same"})
    inst = host.get("task", "tiny")().build(
        RunConfig(task="tiny", model="tiny:convnet", calib_size=64, batch_size=32, eval_size=128), host)
    fp = inst.model
    fold_batchnorm(fp)  # the pipeline quantized the folded model
    batches = list(inst.calibration)
    before = _gap(out.model, fp, batches, inst.forward)
    corr = correct_outputs(out.model, fp, inst.forward, batches, passes=3)
    after = _gap(out.model, fp, batches, inst.forward)
    first = next(iter(before))
    assert after[first] < 1e-5  # the first layer's input does not depend on any correction: exact
    assert all(after[n] <= 0.2 * before[n] + 1e-6 for n in before)
    assert set(corr) == set(before)


def test_pipeline_option_is_reported():
    out = run_tiny(make_host(), w_bits=4, a_bits=4, options={"act_correction": "static"})
    assert out.result["quantized"]["act_correction"] == "static"
    assert all(q.out_correction is not None for q in quant_layers(out.model).values())
    with torch.no_grad():
        assert torch.isfinite(out.model(torch.randn(2, 1, 8, 8))).all()


def test_local_correction_removes_each_layers_own_mean_shift():
    from qcore.act_correction import local_gaps

    host = make_host()
    out = run_tiny(host, w_bits=3, a_bits=3, options={"first_last": "same"})
    inst = host.get("task", "tiny")().build(
        RunConfig(task="tiny", model="tiny:convnet", calib_size=64, batch_size=32, eval_size=128), host)
    batches = list(inst.calibration)
    before = {n: float(g.abs().mean()) for n, g in local_gaps(out.model, inst.forward, batches).items()}
    correct_outputs(out.model, inst.model, inst.forward, batches, passes=3, mode="local")
    after = {n: float(g.abs().mean()) for n, g in local_gaps(out.model, inst.forward, batches).items()}
    assert all(after[n] <= 0.05 * before[n] + 1e-6 for n in before)
