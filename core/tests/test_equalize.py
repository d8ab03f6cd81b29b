"""Input equalization (``-o equalize``, :func:`qcore.equalize_inputs`): exact in FP, saved, exported, refused where
it cannot apply, and it helps a per-tensor 4-bit input whose range a few channels dominate."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qcore
from qcore.testing import tiny_gelu_mlp as gelu_mlp
from qcore.testing import tiny_resnet


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randn(96, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _quantize(calib: torch.Tensor, equalize: str, a_bits: int = 4, **options: object) -> qcore.Quantized:
    """W8, the GELU output (layer 4's input) at ``a_bits``, the other inputs at 8 bits."""
    return qcore.quantize(gelu_mlp(), calib, method="uniform", w_bits=8, a_bits=a_bits,
                          layers={"1": {"a_bits": 8}, "6": {"a_bits": 8}},
                          options={"equalize": equalize, "first_last": "same", **options})


def _fp_view(model: nn.Module) -> nn.Module:
    """``model`` with every quantizer removed (weights and equalization kept)."""
    for layer in qcore.quant_layers(model).values():
        layer.weight_quantizer, layer.act_quantizer = None, None
        layer.unfreeze()
    return model


def test_scales_follow_the_formula_and_dead_channels_keep_one() -> None:
    act = torch.tensor([4.0, 0.25, 0.0, 1.0])
    w = torch.tensor([[1.0, -4.0, 2.0, 0.0], [-0.5, 1.0, 1.0, 0.0]])
    s = qcore.equalization_scales(act, w, alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([4.0 ** 0.5 / 1.0, 0.25 ** 0.5 / 4.0 ** 0.5, 1.0, 1.0]))
    torch.testing.assert_close(qcore.equalization_scales(act, w, alpha=1.0)[:2], act[:2])
    with pytest.raises(qcore.QcoreError, match="equalize_alpha=1.5 is out of range"):
        qcore.equalization_scales(act, w, alpha=1.5)


def test_gelu_mode_equalizes_only_the_gelu_fed_layer_and_is_exact_in_fp(calib) -> None:
    q = _quantize(calib, "gelu")
    eq = q.report["quantized"]["equalized"]
    assert eq["layers"] == ["4"] and eq["mode"] == "gelu" and eq["alpha"] == 0.5  # through the Dropout
    assert "equalized" in q.report["quantized"]["summary"] and q.report["quantized"]["deployable"]
    layer = qcore.quant_layers(q.model)["4"]
    assert layer.input_scale is not None and float(layer.input_scale.min()) < 0.5  # the 30x channels shrink
    fp = gelu_mlp()
    torch.testing.assert_close(layer.module.weight * layer.input_scale, fp[4].weight, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # quantizers off: the equalized model is the FP model
        torch.testing.assert_close(_fp_view(q.model)(calib), fp(calib), rtol=1e-5, atol=1e-5)


def test_equalization_reduces_the_error_of_a_4_bit_per_tensor_input(calib) -> None:
    fp = gelu_mlp()
    with torch.no_grad():
        want = fp(calib)
        err = {mode: float((_quantize(calib, mode).model(calib) - want).pow(2).mean()) for mode in ("off", "gelu")}
    assert err["gelu"] < 0.5 * err["off"], err


def test_all_mode_and_a_model_without_gelu(calib) -> None:
    q = _quantize(calib, "all")
    assert q.report["quantized"]["equalized"]["layers"] == ["1", "4", "6"]
    with torch.no_grad():
        torch.testing.assert_close(_fp_view(q.model)(calib), gelu_mlp()(calib), rtol=1e-5, atol=1e-5)
    # no GELU: -o equalize=gelu changes nothing (the same numbers as off)
    runs = [qcore.quantize(tiny_resnet(), calib, method="uniform", w_bits=4, a_bits=4, options={"equalize": m})
            for m in ("off", "gelu")]
    assert "equalized" not in runs[1].report["quantized"]
    with torch.no_grad():
        assert torch.equal(runs[0].model(calib), runs[1].model(calib))


def test_refused_where_it_cannot_apply(calib) -> None:
    q = qcore.quantize(gelu_mlp(), calib, method="uniform", w_bits=8, a_bits=8,
                       layers={"6": {"a_bits": "fp", "w_bits": 8}}, options={"first_last": "same"})
    assert q.report["quantized"]["equalized"]["layers"] == ["4"]  # equalize=gelu is the default
    host_model = q.model
    with pytest.raises(qcore.QcoreError, match="cannot equalize layer '6': its input is not quantized"):
        qcore.equalize_inputs(host_model, gelu_mlp(), lambda m, b: m(b), [calib], ["6"])
    with pytest.raises(qcore.QcoreError, match="cannot equalize layer '2': it is not a quantized layer"):
        qcore.equalize_inputs(host_model, gelu_mlp(), lambda m, b: m(b), [calib], ["2"])
    with pytest.raises(qcore.QcoreError, match="equalize='some' is not known"):
        qcore.equalize_inputs(host_model, gelu_mlp(), lambda m, b: m(b), [calib], "some")
    with pytest.raises(qcore.QcoreError, match="equalize_alpha=2.0 is out of range"):
        _quantize(calib, "gelu", equalize_alpha=2.0)
    dw = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(64, 3)).eval()
    qd = qcore.quantize(dw, calib, method="uniform", w_bits=8, a_bits=8)
    with pytest.raises(qcore.QcoreError, match="cannot equalize layer '1': a Conv2d with groups > 1"):
        qcore.equalize_inputs(qd.model, dw, lambda m, b: m(b), [calib], ["1"])


def test_save_load_and_packed_layers_reproduce_the_equalized_model(tmp_path, calib) -> None:
    q = _quantize(calib, "gelu", weight_correction="mean")
    layer = qcore.quant_layers(q.model)["4"]
    # the weight correction sees the equalized weight: each output row keeps the mean of W * s
    torch.testing.assert_close(layer.quantized_weight().mean(1), layer.module.weight.mean(1), rtol=1e-4, atol=1e-6)
    path = tmp_path / "m.qcore"
    q.save(path)
    loaded = qcore.load(path, gelu_mlp())
    with torch.no_grad():
        want = q.model(calib)
        torch.testing.assert_close(loaded(calib), want, rtol=0, atol=0)
    q2 = _quantize(calib, "gelu")  # packed codes need a grid-preserving (no) weight correction
    q2.save(tmp_path / "p.qcore", packed=True)
    packed = qcore.load(tmp_path / "p.qcore", gelu_mlp(), packed=True)
    assert qcore.quant_layers(packed)["4"].packed_shape is not None
    with torch.no_grad():
        torch.testing.assert_close(packed(calib), q2.model(calib), rtol=1e-5, atol=1e-5)


def test_onnx_export_writes_a_mul_before_the_quantize_and_equals_the_fake_quant_model(tmp_path, calib) -> None:
    q = _quantize(calib, "gelu")
    path = tmp_path / "m.onnx"
    report = qcore.export_onnx(q.model, calib[:8], path, check=False)  # the test runs onnxruntime itself
    assert report.equalized_inputs == ["4"]
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    quant_inputs = [producers.get(n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"]
    chain = []  # what feeds each input QuantizeLinear, through a Clip
    for p in quant_inputs:
        while p is not None and p.op_type == "Clip":
            p = producers.get(p.input[0])
        chain.append(p.op_type if p is not None else None)
    assert chain.count("Mul") == 1
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = calib[8:13]
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        want = q.model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
