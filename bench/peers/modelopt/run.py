"""NVIDIA ModelOpt rows of the peer comparison: ``mtq.quantize`` with ModelOpt's INT8 recipe
(``INT8_DEFAULT_CFG``: per-channel (axis 0) weights, per-tensor inputs of every Conv/Linear, signed symmetric,
``max`` calibration), the same config with 4-bit weights and/or inputs for the W4 rows, and ModelOpt's ``mse``
range search as its best low-bit PTQ for CNNs (AWQ/SmoothQuant/GPTQ target Linear layers of LLMs; ModelOpt's docs
restrict CNNs to INT8). The first and last layer are pinned to 8 bits by name, as in qcore. BatchNorm stays
unfolded (ModelOpt leaves folding to TensorRT; per-channel weight scales absorb the BN scale). Residual additions
are not quantized. Simulated (fake-quant); the INT8 model exports to ONNX QDQ for TensorRT.

Run in .venvs-peers/modelopt: ``python bench/peers/modelopt/run.py --data out/data.npz --out DIR``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import modelopt  # noqa: E402
import modelopt.torch.quantization as mtq  # noqa: E402

DESCRIBE = {
    "first_last": "8-bit (W8A8)",
    "residual_adds": "not quantized",
    "weights": "per-channel symmetric (max or mse)",
    "activations": "per-tensor signed symmetric, inputs of every Conv/Linear",
    "deployable": "simulated (W8A8: ONNX QDQ -> TensorRT)",
}


def _config(model: torch.nn.Module, w_bits: int, a_bits: int, algorithm: str) -> dict:
    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    entries = cfg["quant_cfg"]
    for e in entries:
        if e.get("quantizer_name") == "*weight_quantizer":
            e["cfg"] = {**e["cfg"], "num_bits": w_bits}
        elif e.get("quantizer_name") == "*input_quantizer":
            e["cfg"] = {**e["cfg"], "num_bits": a_bits}
    for name in common.first_last(model):  # later entries win
        entries.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}})
        entries.append({"quantizer_name": f"{name}.input_quantizer", "cfg": {"num_bits": 8, "axis": None}})
    cfg["algorithm"] = algorithm
    return cfg


def _recipe(w_bits: int, a_bits: int, algorithm: str):
    def quantize(model: torch.nn.Module, data: common.Data):
        batches = data.calib_batches(64)

        def forward_loop(m: torch.nn.Module) -> None:
            with torch.no_grad():
                for x in batches:
                    m(x)
        return mtq.quantize(model, _config(model, w_bits, a_bits, algorithm), forward_loop)
    return quantize


ROWS = [common.Row("int8 default (max)", 8, 8, _recipe(8, 8, "max"), DESCRIBE),
        common.Row("max", 4, 8, _recipe(4, 8, "max"), DESCRIBE),
        common.Row("max", 4, 4, _recipe(4, 4, "max"), DESCRIBE),
        common.Row("mse", 4, 8, _recipe(4, 8, "mse"), DESCRIBE),
        common.Row("mse", 4, 4, _recipe(4, 4, "mse"), DESCRIBE)]

if __name__ == "__main__":
    common.run_rows("modelopt", modelopt.__version__, ROWS)
