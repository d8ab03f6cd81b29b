"""ONNX QDQ export of qcore-quantized zoo models: onnxruntime top-1 vs the fake-quantized model, and latency.

For each setting the zoo model is quantized with ``qcore.quantize`` (embedded Fashion-MNIST: 512 calibration
images from the train split), exported with ``qcore.export_onnx`` and evaluated on the 10,000 test images by
PyTorch (fake quantization) and by onnxruntime (CPU, graph optimisations on, so its QDQ fusions run integer
kernels). Latency: onnxruntime on one thread, the FP model exported the same way vs the quantized one,
interleaved and repeated; median milliseconds per batch.

    OMP_NUM_THREADS=1 python bench/onnx_export.py [--model zoo:fmnist_resnet] [--settings W8A8,W4A4] [--bias float]

``--bias int32`` (the default here) quantizes with ``-o bias=int32``: biases rounded to int32 at input scale x weight
scale in the simulation and written so in the file, the arithmetic onnxruntime's integer kernels use.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import qcore
from qcore_classification.data import fashion_mnist_embedded
from qcore_classification.loaders import load_zoo


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _top1_ort(session: ort.InferenceSession, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    right = total = 0
    for x, y in data:
        out = session.run(None, {"x": x.numpy()})[0]
        right += int((np.argmax(out, 1) == y.numpy()).sum())
        total += len(y)
    return 100.0 * right / total


def _top1_torch(model: torch.nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    right = total = 0
    with torch.no_grad():
        for x, y in data:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * right / total


def _latency(sessions: dict[str, ort.InferenceSession], x: np.ndarray, repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"x": x})  # warm-up
    for _ in range(repeat):
        for k, s in sessions.items():  # interleaved, so load on the machine hits both alike
            t = time.perf_counter()
            s.run(None, {"x": x})
            times[k].append(1000 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:fmnist_resnet")
    ap.add_argument("--settings", default="W8A8,W4A8,W4A4")
    ap.add_argument("--method", default="uniform")
    ap.add_argument("--bias", choices=("int32", "float"), default="int32",
                    help="-o bias: int32 (default here) simulates and exports the int32 biases onnxruntime's integer "
                         "kernels use; float is qcore's default simulation (onnxruntime then rounds biases itself)")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--no-int4", action="store_true", help="keep 4-bit codes in 8-bit types (export_onnx(int4=False))")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_zoo(args.model.removeprefix("zoo:"), None)
    data = fashion_mnist_embedded(loaded.input, 512, None, 100, 0)
    test = list(data.evaluation())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp_path = Path(tmp) / "fp.onnx"
        torch.onnx.export(loaded.model, (test[0][0],), str(fp_path), dynamo=True, opset_version=qcore.ONNX_OPSET,
                          input_names=["x"], output_names=["y"], verbose=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
        fp_top1 = _top1_ort(_session(fp_path), test)
        for setting in args.settings.split(","):
            w, a = (int(v) for v in setting[1:].split("A"))
            t = time.perf_counter()
            q = qcore.quantize(loaded.model, data.calibration, method=args.method, w_bits=w, a_bits=a,
                               options={"bias": args.bias})
            seconds = time.perf_counter() - t
            path = Path(tmp) / f"{setting}.onnx"
            report = qcore.export_onnx(q.model, test[0][0], path, int4=not args.no_int4)
            row = {"model": args.model, "method": args.method, "setting": setting, "bias": args.bias,
                   "int32_bias_layers": len(report.int32_biases), "fp_onnx_top1": fp_top1,
                   "fake_quant_top1": _top1_torch(q.model, test), "onnxruntime_top1": _top1_ort(_session(path), test),
                   "max_abs_diff_first_batch": report.max_abs_diff, "int4_weight_tensors": len(report.int4_weights),
                   "int4_inputs": report.int4_inputs,
                   "onnx_bytes": path.stat().st_size, "fp_onnx_bytes": fp_path.stat().st_size,
                   "calibration_s": round(seconds, 1)}
            x = test[0][0].numpy()
            for b in (1, 100):
                lat = _latency({"fp": _session(fp_path), "q": _session(path)}, x[:b], args.repeat)
                row[f"latency_ms_b{b}"] = {k: round(v, 3) for k, v in lat.items()}
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
