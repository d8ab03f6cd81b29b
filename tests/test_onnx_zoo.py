"""ONNX export of the embedded ResNet at W4A4 (4-bit weights and inputs stored as INT4/UINT4) with ``-o bias=int32``:
the graph as written and onnxruntime's integer pipeline (which rounds each bias to int32 at the scale s_x * s_w, as
the int32 mode simulates) classify the test images as the fake-quantized model does."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

import qcore
import qcore.testing
from qcore_classification.data import fashion_mnist_embedded
from qcore_classification.loaders import load_zoo


def _session(path, optimized: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_resnet_w4a4_in_onnxruntime_matches_fake_quant(tmp_path) -> None:
    loaded = load_zoo("fmnist_resnet", None)
    data = fashion_mnist_embedded(loaded.input, 128, 1000, 250, 0)
    q = qcore.quantize(loaded.model, data.calibration, method="uniform", w_bits=4, a_bits=4, options={"bias": "int32"})
    report = qcore.export_onnx(q.model, data.calibration[0][:2], tmp_path / "r.onnx")
    assert len(report.int4_weights) == len(report.layers) - 2  # first and last layer stay at 8 bits
    graph = onnx.load(str(tmp_path / "r.onnx")).graph
    zero_type = {t.name: t.data_type for t in graph.initializer}
    quants = [zero_type[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    four = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    # every 4-bit input is an INT4/UINT4 QDQ pair (no Clip left); the stem's and the classifier's stay 8-bit. The
    # exporter shares one QDQ between layers reading the same tensor with the same grid (conv1 and shortcut)
    assert not [n for n in graph.node if n.op_type == "Clip"]
    assert sum(t not in four for t in quants) == 2 and report.int4_inputs == len(quants) - 2 >= 10
    exact, fused = _session(tmp_path / "r.onnx", False), _session(tmp_path / "r.onnx", True)
    same_exact = same_fused = n = 0
    with torch.no_grad():
        for x, _ in data.evaluation():
            fake = q.model(x).argmax(1)
            same_exact += int((torch.from_numpy(exact.run(None, {"x": x.numpy()})[0]).argmax(1) == fake).sum())
            same_fused += int((torch.from_numpy(fused.run(None, {"x": x.numpy()})[0]).argmax(1) == fake).sum())
            n += len(fake)
    assert n == 1000
    assert same_exact / n >= 0.995  # float QDQ arithmetic: only float summation order differs
    # integer kernels with the int32 biases the simulation used (with float biases, which onnxruntime rounds on
    # its own, this was 98.3 %)
    assert same_fused / n >= 0.995


def test_int32_bias_needs_a_uniform_grid() -> None:
    """A non-uniform format (the example plugin's power-of-two scales) has no int32 bias grid to model."""
    calib = torch.randn(32, 1, 8, 8)
    with pytest.raises(qcore.QcoreError, match="bias=int32 needs a uniform integer grid"):
        qcore.quantize(qcore.testing.tiny_convnet(), calib, method="uniform", w_bits=4, a_bits=4,
                       quantizer="example-pow2", options={"bias": "int32"})
