"""qcore-ptmq: the multi-bit quantizer, the GD loss's stop-gradient, the MFM mask, switching a saved model (only
steps change; no data needed), first/last layers held at 8 bits, per-unit resume."""

from __future__ import annotations

import pytest
import torch
from qcore_ptmq import MultiBitFakeQuant, PTMQObjective, SharedRounding, gd_loss, plugin
from safetensors.torch import load_file

import qcore
from qcore.ranges import minmax_range
from qcore.testing import make_host, run_tiny, tiny_gelu_mlp, tiny_resnet


@pytest.fixture(scope="module")
def host():
    return make_host(("ptmq", plugin))


CALIB = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(5))
BITS = (3, 4, 5, 6, 7, 8)  # the default groups: low {3,4}, mid {5,6}, high {7,8}


def quantize_tiny(host, seed: int = 0, **options):
    options = {"iters": 12, "cache": "off", **options}
    return qcore.quantize(tiny_resnet(), CALIB, "ptmq", w_bits=4, a_bits=4, seed=seed, batch_size=32, host=host,
                          options=options)


@pytest.fixture(scope="module")
def tiny(host, tmp_path_factory):
    out = quantize_tiny(host)
    path = out.save(tmp_path_factory.mktemp("ptmq") / "m.qcore")
    return out, path


# -- the quantizer --------------------------------------------------------------------------------------------------
def test_one_range_per_bit_and_switching_swaps_only_the_range():
    w = torch.randn(6, 4, 3, 3)
    q = MultiBitFakeQuant(qcore.QuantSpec(4, symmetric=False, granularity="channel"), 6, 0, (2, 3, 8))
    assert q.bit_choices() == (2, 3, 4, 8) and not q.calibrated
    qcore.calibrate_rows(q, q.rows_of(w), minmax_range)  # the active bit-width (4) only
    q.select_bits(2)
    with pytest.raises(qcore.QcoreError, match="no range for 2 bits"):
        q(w)
    for b in q.held_bits():
        q.select_bits(b)
        qcore.calibrate_rows(q, q.rows_of(w), minmax_range)
    assert q.calibrated
    for b in (2, 3, 4, 8):
        q.select_bits(b)
        ref = qcore.UniformFakeQuant(qcore.QuantSpec(b, symmetric=False, granularity="channel"), 6, 0)
        qcore.calibrate_rows(ref, ref.rows_of(w), minmax_range)
        assert torch.equal(q(w), ref(w))  # before any rounding is learned: core's grid at that bit-width
        assert len(torch.unique(q(w)[0])) <= 2 ** b
    q.restrict(8)
    assert q.bit_choices() == () and q.held_bits() == (8,)
    with pytest.raises(qcore.QcoreError, match="holds bit-widths 8, not 3"):
        q.select_bits(3)


def test_shared_rounding_starts_at_the_fp_weight_and_is_one_tensor_for_every_bit():
    w = torch.randn(6, 4, 3, 3)
    q = MultiBitFakeQuant(qcore.QuantSpec(4, symmetric=False, granularity="channel"), 6, 0, (3, 8))
    for b in q.held_bits():
        q.select_bits(b)
        qcore.calibrate_rows(q, q.rows_of(w), minmax_range)
    r = SharedRounding(q, w, init_bits=4)
    q.select_bits(4)
    d = (r.soft() - w).abs().detach()
    step = float(q.qparams()[0].max())
    assert float((d < 1e-5).float().mean()) > 0.9 and float(d.max()) <= 0.5 * step + 1e-6  # h = frac(W/s_4): the FP
    # weight, except where the affine grid (integer zero point) clips an extreme by at most half a step
    with torch.no_grad():
        r.v.normal_()
    assert torch.equal(r.final_weight(), w) and q.rounding is not None  # the layer keeps W; R is the quantizer's
    for b in (3, 4, 8):
        q.select_bits(b)
        scale, zero, lo, hi, _ = q.qparams()
        s, z = scale[:, None, None, None], zero[:, None, None, None]
        expect = (torch.clamp(torch.floor(w / s) + (r.v >= 0).float() + z, lo[0], hi[0]) - z) * s
        assert torch.allclose(q(w), expect, atol=1e-6)


# -- the loss and the mixer -----------------------------------------------------------------------------------------
def test_stop_gradient_keeps_the_teacher_out_of_the_distillation_terms():
    fp = torch.randn(4, 3, 5, 5)
    feats = [torch.randn(4, 3, 5, 5, requires_grad=True) for _ in range(3)]
    loss, _ = gd_loss(feats, fp, (1 / 3, 1 / 3, 1 / 3), (0.0, 1.0, 1.0))
    loss.backward()
    low, mid, high = feats
    assert high.grad is None or not high.grad.any()  # only sg(f_high) enters: no gradient reaches the teacher
    assert low.grad is not None and low.grad.abs().sum() > 0 and mid.grad.abs().sum() > 0
    feats2 = [f.detach().clone().requires_grad_() for f in feats]
    loss2, mix = gd_loss(feats2, fp, (0.2, 0.3, 0.5), (1.0, 1.0, 1.0))
    loss2.backward()
    assert torch.allclose(mix, 0.2 * feats2[0] + 0.3 * feats2[1] + 0.5 * feats2[2])
    # the teacher's gradient is exactly the FP-vs-mix term's (sum over channels: d/dmix = 2(mix - fp))
    assert torch.allclose(feats2[2].grad, 0.5 * 2 * (mix - fp).detach() / (4 * 5 * 5), atol=1e-6)


def test_the_teachers_own_parameters_get_no_gradient_in_a_real_unit(host, monkeypatch):
    """Inside reconstruction: with only the teacher terms, the LSQ step of the drawn high bit gets no gradient."""
    grads: list[tuple[int, float | None]] = []
    original = PTMQObjective.__call__

    def spy(self, module, x, target, unit):
        loss = original(self, module, x, target, unit)
        data = self._data
        if data.switch:
            act = next(layer.act_quantizer for layer in qcore.quant_layers(module).values()
                       if hasattr(layer.act_quantizer, "per_bit"))
            high = self.last_bits[2]
            step = act.per_bit[act.held.index(high)].step
            g = torch.autograd.grad(loss, step, retain_graph=True, allow_unused=True)[0]
            grads.append((high, None if g is None else float(g.abs().sum())))
        return loss

    monkeypatch.setattr(PTMQObjective, "__call__", spy)
    quantize_tiny(host, iters=3, gammas="0,1,1", gamma_bits=0.0, drop_prob=1.0)
    assert grads and all(g in (None, 0.0) for _, g in grads)
    grads.clear()
    quantize_tiny(host, iters=3, gammas="1,1,1", gamma_bits=0.0, drop_prob=1.0)  # the FP-vs-mix term does reach it
    assert any(g not in (None, 0.0) for _, g in grads)


def test_the_mixer_mask_is_resampled_every_step_and_bits_are_drawn_per_group(host, monkeypatch):
    seen: list[tuple[torch.Tensor, tuple[int, ...]]] = []
    original = PTMQObjective.mfm_input

    def spy(self, data, idx, bits):
        out = original(self, data, idx, bits)
        seen.append((self.last_mask.clone(), tuple(bits)))
        return out

    monkeypatch.setattr(PTMQObjective, "mfm_input", spy)
    quantize_tiny(host, iters=6)
    masks = [m for m, _ in seen if m.dim() == 4 and m.shape[1] == 8]
    assert len(masks) >= 12
    assert all(not torch.equal(a, b) for a, b in zip(masks, masks[1:], strict=False))
    frac = torch.stack([m.float().mean() for m in masks]).mean()
    assert 0.4 < float(frac) < 0.6  # replace_prob 0.5
    for _, (low, mid, high) in seen:
        assert low in (3, 4) and mid in (5, 6) and high in (7, 8)
    assert len({b for _, b in seen}) > 1  # drawn anew, not fixed


# -- the calibrated model and its file ------------------------------------------------------------------------------
def test_first_and_last_layer_are_held_at_8_bits_and_the_rest_switches(tiny):
    out, _ = tiny
    layers = qcore.quant_layers(out.model)
    for name in ("stem.0", "fc"):
        for q in (layers[name].weight_quantizer, layers[name].act_quantizer):
            assert q.bit_choices() == () and q.held_bits() == (8,)
    assert qcore.switchable_bits(out.model) == {"weight": list(BITS), "act": list(BITS)}
    assert out.report["measured"]["ptmq"]["evaluated_setting"] == {"w_bits": 4, "a_bits": 4, "switched_layers": 4}


def test_switching_a_saved_model_changes_only_steps(tiny, host):
    out, path = tiny
    saved = load_file(str(path))
    for name in ("blocks.0.conv1", "blocks.1.conv2"):
        assert saved[f"{name}.weight_quantizer.lo_set"].shape[0] == len(BITS)  # every bit's steps are in the file
        assert saved[f"{name}.act_quantizer.lo_set"].shape[0] == len(BITS)
        assert set(saved[f"{name}.weight_quantizer.rounding"].unique().tolist()) <= {0.0, 1.0}  # one R, hard
    states = {b: qcore.load(path, tiny_resnet(), host=host, bits=(b, b)).state_dict() for b in (3, 8)}
    differ = {k for k in states[3]
              if isinstance(states[3][k], torch.Tensor) and not torch.equal(states[3][k], states[8][k])}
    assert differ and all(k.rsplit(".", 1)[1] in {"lo", "hi", "bits", "active"} for k in differ)
    for k in saved:  # weights, roundings and every step set are the file's, at any setting
        if k.rsplit(".", 1)[1] not in {"lo", "hi", "bits", "active", "_extra_state"}:
            assert torch.equal(states[3][k], saved[k]) and torch.equal(states[8][k], saved[k]), k


def test_every_setting_evaluates_without_data_and_matches_switching_in_memory(tiny, host):
    out, path = tiny
    fp = tiny_resnet()
    with torch.no_grad():
        ref = fp(CALIB)
    errors = {}
    for b in BITS:
        loaded = qcore.load(path, tiny_resnet(), host=host, bits=(b, b))  # no calibration data anywhere
        qcore.select_bits(out.model, b, b)
        with torch.no_grad():
            y = loaded(CALIB)
            assert torch.equal(y, out.model(CALIB))
        errors[b] = float((y - ref).pow(2).mean())
    assert errors[8] < errors[4] < errors[3]
    with pytest.raises(qcore.QcoreError, match="not 9"):
        qcore.load(path, tiny_resnet(), host=host, bits=(9, 9))
    plan = {"version": 1, "layers": {"blocks.0.conv1": {"weight": {"bits": 3}, "act": {"bits": 5}},
                                     "blocks.1.conv2": {"weight": {"bits": 8}, "act": {"bits": 8}}}}
    mixed = qcore.load(path, tiny_resnet(), host=host, bits=(6, 6), plan=plan)
    layers = qcore.quant_layers(mixed)
    assert layers["blocks.0.conv1"].weight_quantizer.active_bits == 3
    assert layers["blocks.0.conv1"].act_quantizer.active_bits == 5
    assert layers["blocks.0.conv2"].weight_quantizer.active_bits == 6  # not in the plan: bits=(6, 6)
    assert qcore.quant_layers(qcore.load(path, tiny_resnet(), host=host, plan=plan))[
        "blocks.0.conv2"].weight_quantizer.active_bits == 4  # no bits: as saved (W4A4)


def test_a_killed_run_resumes_unit_by_unit(host, tmp_path):
    full = quantize_tiny(host, cache=str(tmp_path))
    assert full.report["measured"]["ptmq"]["recon"]["resumed_units"] == []
    entries = sorted(tmp_path.rglob("*.pt"))
    assert [p.name for p in entries] == ["000-stem.0.pt", "001-blocks.0.pt", "002-blocks.1.pt", "003-fc.pt"]
    for p in entries[2:]:  # killed while reconstructing the third unit
        p.unlink()
    again = quantize_tiny(host, cache=str(tmp_path))
    assert again.report["measured"]["ptmq"]["recon"]["resumed_units"] == ["stem.0", "blocks.0"]
    a, b = full.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    other = quantize_tiny(host, cache=str(tmp_path), lambdas="0.5,0.25,0.25")  # another objective: another key
    assert other.report["measured"]["ptmq"]["recon"]["resumed_units"] == []


def test_runs_by_plugin_name_and_refuses_bad_input(host):
    result = run_tiny(host, plugin="ptmq", options={"iters": 3, "cache": "off"}).result
    assert result["method"] == "ptmq" and result["components"]["quantizer"] == "ptmq"
    assert result["measured"]["ptmq"]["switchable_bits"]["weight"] == list(BITS)
    with_2 = run_tiny(host, plugin="ptmq", options={"iters": 1, "cache": "off", "low_bits": "2,3,4"}).result
    assert with_2["measured"]["ptmq"]["switchable_bits"]["act"] == [2, *BITS]  # 2 bits only when asked for
    for bad in ({"lambdas": "0.5,0.5,0.5"}, {"low_bits": "two"}, {"replace_prob": 2.0}, {"gammas": "1,1"}):
        with pytest.raises(qcore.QcoreError):
            run_tiny(host, plugin="ptmq", options={"iters": 1, "cache": "off", **bad})
    with pytest.raises(qcore.QcoreError, match="not in the bit groups"):
        run_tiny(host, plugin="ptmq", w_bits=9, options={"iters": 1, "cache": "off"})
    single = run_tiny(host, plugin="ptmq", quantizer="uniform", options={"iters": 2, "cache": "off"})  # one bit-width:
    assert single.result["measured"]["ptmq"]["switchable_bits"] == {"weight": [], "act": []}  # composes, no switch


def test_multibit_stem_and_fc_switch_weights_but_keep_8_bit_inputs(host):
    out = quantize_tiny(host, iters=3, stem_fc="multibit")
    layers = qcore.quant_layers(out.model)
    assert layers["fc"].weight_quantizer.bit_choices() == BITS
    assert layers["fc"].act_quantizer.held_bits() == (8,) and layers["fc"].act_quantizer.bit_choices() == ()


def test_a_switched_setting_exports_to_onnx_exactly(tiny, tmp_path):
    """Each bit setting of one PTMQ model is an ordinary uniform-grid model: qcore.export_onnx writes it, and the
    graph as written computes what the switched model computes."""
    import onnxruntime as ort

    model = tiny[0].model
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for bits in (4, 8):
        qcore.select_bits(model, bits, bits)
        path = qcore.export_onnx(model, CALIB[:4], tmp_path / f"w{bits}.onnx", check=False).path
        got = ort.InferenceSession(str(path), so).run(None, {"x": CALIB[:6].numpy()})[0]
        with torch.no_grad():
            want = model(CALIB[:6])
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    qcore.select_bits(model, 4, 4)  # the fixture's setting, for the tests after this one


# -- input equalization (the method's default -o equalize=gelu) -----------------------------------------------------
def test_the_default_equalization_leaves_a_model_without_gelu_unchanged(tiny, host):
    """``equalize=gelu`` is ptmq's default; on a model without GELU (the ResNet) no layer qualifies, so the run is
    the ``equalize=off`` run exactly: same weights, roundings and every bit's steps."""
    out, _ = tiny
    assert "equalized" not in out.report["quantized"]
    assert all(layer.input_scale is None for layer in qcore.quant_layers(out.model).values())
    off = quantize_tiny(host, equalize="off")
    a, b = out.model.state_dict(), off.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_the_default_equalizes_the_gelu_fed_input_and_every_bit_keeps_it(host, tmp_path):
    """On a GELU MLP the default equalizes the GELU-fed layer's input (before the per-bit ranges are set); the
    saved file holds the scales once, every switched setting loads them, and the low-bit settings gain from it."""
    calib = CALIB
    ref = tiny_gelu_mlp()(calib).detach()

    def run(**options):
        return qcore.quantize(tiny_gelu_mlp(), calib, "ptmq", w_bits=4, a_bits=4, seed=0, batch_size=32, host=host,
                              options={"iters": 12, "cache": "off", **options})

    eq, off = run(), run(equalize="off")
    assert eq.report["quantized"]["equalized"]["layers"] == ["4"] and "equalized" not in off.report["quantized"]
    path = eq.save(tmp_path / "eq.qcore")
    saved = load_file(str(path))
    assert "4.input_scale" in saved and "1.input_scale" not in saved
    errors: dict[str, dict[int, float]] = {"eq": {}, "off": {}}
    for b in (3, 4, 8):
        loaded = qcore.load(path, tiny_gelu_mlp(), host=host, bits=(b, b))
        assert torch.equal(loaded.get_submodule("4").input_scale, saved["4.input_scale"])
        qcore.select_bits(eq.model, b, b)
        qcore.select_bits(off.model, b, b)
        with torch.no_grad():
            y = loaded(calib)
            assert torch.equal(y, eq.model(calib))
            errors["eq"][b] = float((y - ref).pow(2).mean())
            errors["off"][b] = float((off.model(calib) - ref).pow(2).mean())
    assert errors["eq"][3] < errors["off"][3] and errors["eq"][4] < errors["off"][4], errors
