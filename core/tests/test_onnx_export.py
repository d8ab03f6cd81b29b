"""ONNX QDQ export: integer weights, QDQ inputs, outputs equal to the fake-quantized model in onnxruntime."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

import qcore
from qcore.testing import tiny_convnet


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _run(path, x: torch.Tensor, optimized: bool) -> torch.Tensor:
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize(("w_bits", "a_bits", "options"), [
    (8, 8, {}),
    (4, 4, {"act_correction": "affine"}),  # 4-bit codes as INT4, the output correction folded into scale and bias
    (3, 6, {"weight_symmetric": "false"}),  # affine weights: UINT codes with zero points; 6-bit inputs clipped
])
def test_onnxruntime_computes_the_fake_quantized_model(tmp_path, calib, w_bits, a_bits, options) -> None:
    q = qcore.quantize(tiny_convnet(), calib, method="uniform", w_bits=w_bits, a_bits=a_bits, options=options)
    path = tmp_path / "m.onnx"
    report = qcore.export_onnx(q.model, calib[:16], path)
    assert report.layers == list(qcore.quant_layers(q.model))
    x = calib[16:21]  # another batch size than the example's: the batch dimension is dynamic
    with torch.no_grad():
        want = q.model(x)
    exact = _run(path, x, optimized=False)  # the graph as written: QDQ arithmetic in float
    torch.testing.assert_close(exact, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    fused = _run(path, x, optimized=True)  # onnxruntime's integer kernels: accumulation order differs
    assert float((fused.argmax(1) == want.argmax(1)).float().mean()) >= 0.9
    with torch.no_grad():  # the report's check: onnxruntime (optimised) against PyTorch on the example input
        on_example = float((_run(path, calib[:16], optimized=True) - q.model(calib[:16])).abs().max())
    assert report.max_abs_diff == pytest.approx(on_example, rel=1e-4, abs=1e-6)

    graph = onnx.load(str(path)).graph
    ints = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    inits = {t.name: t for t in graph.initializer}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == len(report.layers)  # every quantized weight is stored as integer codes
    for node in weight_dq:
        assert inits[node.input[0]].data_type in ints
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == len(report.layers)  # one per layer input
    four = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    stored4 = [n for n in weight_dq if inits[n.input[0]].data_type in four]
    if w_bits <= 4:  # the middle layer (first and last stay at 8 bits)
        assert len(stored4) == len(report.int4_weights) >= 1
    else:
        assert not stored4


def test_int8_only_keeps_4_bit_codes_in_int8(tmp_path, calib) -> None:
    q = qcore.quantize(tiny_convnet(), calib, method="uniform", w_bits=4, a_bits=8)
    report = qcore.export_onnx(q.model, calib[:1], tmp_path / "m.onnx", int4=False)  # a one-sample example
    assert _run(tmp_path / "m.onnx", calib[:3], optimized=False).shape == (3, 4)  # still any batch size
    assert report.int4_weights == []
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert not [t for t in graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)]


def test_off_grid_weights_are_refused(tmp_path, calib) -> None:
    q = qcore.quantize(tiny_convnet(), calib, method="uniform", w_bits=4, a_bits=8,
                       options={"weight_correction": "mean+var"})
    with pytest.raises(qcore.QcoreError, match="not on its quantizer's integer grid.*weight_correction=none"):
        qcore.export_onnx(q.model, calib[:4], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_more_than_8_bits_is_refused(tmp_path, calib) -> None:
    q = qcore.quantize(tiny_convnet(), calib, method="uniform", w_bits=10, a_bits=8, options={"first_last": "same"})
    with pytest.raises(qcore.QcoreError, match="at most 8 bits"):
        qcore.export_onnx(q.model, calib[:4], tmp_path / "m.onnx")


def test_rdoq_mixed_group_bits_export_exactly(tmp_path, calib) -> None:
    """RDOQ's plan: per-group bit-widths inside a layer, and its affine output correction folded."""
    q = qcore.quantize(tiny_convnet(), calib, method="rdoq", target_bits=3, a_bits=8,
                       options={"cache": "off", "first_last": "same"})
    bits = {layer: s.weight.group_bits for layer, s in q.plan.layers.items() if s.weight is not None}
    assert any(b is not None and len(set(b)) > 1 for b in bits.values())  # really mixed inside a layer
    qcore.export_onnx(q.model, calib[:8], tmp_path / "m.onnx")
    with torch.no_grad():
        want = q.model(calib[:8])
    torch.testing.assert_close(_run(tmp_path / "m.onnx", calib[:8], optimized=False), want, rtol=1e-5,
                               atol=1e-5 * float(want.abs().max()))


def _agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of outputs equal up to float summation order."""
    return float(((a - b).abs() <= 1e-5 * float(b.abs().max())).float().mean())


def test_int32_bias_is_what_onnxruntime_computes(tmp_path, calib) -> None:
    """``-o bias=int32``: the simulation rounds each (folded) bias to int32 at s_x * s_w, the export writes those
    codes, and onnxruntime's fused integer kernels give the simulated outputs (a float bias they quantize on
    their own). With float biases (qcore's default simulation) they do not. 4-bit inputs: this CPU's 8-bit u8s8
    kernels may saturate 16-bit pair sums (AVX2), which no simulation models. The affine output correction is
    folded into the bias first (and gives the bias-free convolutions a bias)."""
    x = calib[16:80]
    agree = {}
    for bias in ("float", "int32"):
        q = qcore.quantize(tiny_convnet(), calib, method="uniform", w_bits=4, a_bits=4,
                           options={"act_correction": "affine", "bias": bias, "first_last": "same"})
        report = qcore.export_onnx(q.model, calib[:16], tmp_path / f"{bias}.onnx")
        with torch.no_grad():
            want = q.model(x)
        exact = _run(tmp_path / f"{bias}.onnx", x, optimized=False)  # the graph as written
        torch.testing.assert_close(exact, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        agree[bias] = _agree(_run(tmp_path / f"{bias}.onnx", x, optimized=True), want)
        if bias == "int32":
            assert report.int32_biases == list(qcore.quant_layers(q.model))
            graph = onnx.load(str(tmp_path / "int32.onnx")).graph
            inits = {t.name: t for t in graph.initializer}
            bias_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                       and inits[n.input[0]].data_type == onnx.TensorProto.INT32]
            assert len(bias_dq) == len(report.layers)
        else:
            assert report.int32_biases == []
    # measured: 0.98 (the rest: inputs on a rounding tie, where float summation order picks the code) vs 0.07
    assert agree["int32"] >= 0.95 > 0.5 > agree["float"]


def test_int32_bias_rounds_at_input_times_weight_scale_and_survives_save(tmp_path, calib) -> None:
    """The simulated bias is the folded float bias rounded on the grid s_x * s_w (per output channel); the
    .qcore file keeps the mode, so a loaded model computes the same."""
    q = qcore.quantize(tiny_convnet(), calib, method="uniform", w_bits=4, a_bits=4,
                       options={"bias": "int32", "act_correction": "affine"})
    for name, layer in qcore.quant_layers(q.model).items():
        codes, scale = layer.int32_bias()
        s_x = layer.act_quantizer.qparams()[0]
        s_w = layer.weight_quantizer.qparams()[0]
        torch.testing.assert_close(scale, s_x * s_w * layer.out_scale, rtol=1e-6, atol=0)
        folded = (layer.module.bias if layer.module.bias is not None else 0) * layer.out_scale + layer.out_correction
        assert torch.equal(codes, torch.round(folded / scale)), name
        assert float((codes * scale - folded).detach().abs().max()) <= 0.5 * float(scale.abs().max()) + 1e-7
    assert "int32" in q.report["quantized"]["summary"] and q.report["quantized"]["bias"] == "int32"
    path = q.save(tmp_path / "m.qcore")
    loaded = qcore.load(path, tiny_convnet())
    assert all(layer.bias_mode == "int32" for layer in qcore.quant_layers(loaded).values())
    with torch.no_grad():
        assert torch.equal(loaded(calib[:8]), q.model(calib[:8]))
        float_bias = qcore.quantize(tiny_convnet(), calib, method="uniform", w_bits=4, a_bits=4,
                                    options={"act_correction": "affine"})
        assert not torch.equal(float_bias.model(calib[:8]), q.model(calib[:8]))

