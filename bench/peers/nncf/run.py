"""OpenVINO NNCF rows of the peer comparison: ``nncf.quantize`` on the PyTorch model, NNCF's recommended PTQ
(default preset PERFORMANCE: symmetric weights and activations, per-channel weights, per-tensor activations,
MinMax ranges over the calibration subset, fast bias correction), ``subset_size`` = all 512 calibration images.

NNCF's PTQ targets 8 bits; the W4 rows set ``AdvancedQuantizationParameters(weights_quantization_params=
QuantizationParameters(num_bits=4), activations_quantization_params=...)``, NNCF's own knob for other bit-widths,
with ``target_device=NPU`` (the only NNCF hardware config that admits 4-bit quantizers).
NNCF places quantizers from its hardware config (inputs of Conv/Linear and of the residual additions), the first
and last layer at the same bits as the rest (NNCF has no per-layer bit override; ignoring them would keep them FP).
Simulated in PyTorch (NNCF FakeQuantize); the 8-bit model is deployable through OpenVINO.

Run in .venvs-peers/nncf: ``python bench/peers/nncf/run.py --data out/data.npz --out DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# NNCF compiles its fake-quant C++ extension on first use and gives up after 60 s, which a loaded 2-core VM
# exceeds; 0 = no limit (the build is cached in ~/.cache/nncf and happens once).
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import nncf  # noqa: E402
from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters  # noqa: E402

DESCRIBE = {
    "first_last": "same bits as the rest",
    "residual_adds": "quantized (NNCF hardware config)",
    "weights": "per-channel symmetric (min/max)",
    "activations": "per-tensor symmetric/unsigned, min/max over 512 images",
    "deployable": "simulated (8-bit: deployable via OpenVINO)",
}


def _recipe(w_bits: int, a_bits: int):
    def quantize(model: torch.nn.Module, data: common.Data):
        advanced = None
        if (w_bits, a_bits) != (8, 8):
            advanced = AdvancedQuantizationParameters(
                weights_quantization_params=QuantizationParameters(num_bits=w_bits),
                activations_quantization_params=QuantizationParameters(num_bits=a_bits))
        dataset = nncf.Dataset(data.calib_batches(64))
        # Only NNCF's NPU hardware config admits 4-bit quantizers (CPU/ANY refuse them: "Quantization parameter
        # constraints specified in NNCF config are incompatible with HW capabilities as specified in HW config
        # type 'ANY'"), so the W4 rows target the NPU config.
        # The NPU config has no 4-bit quantizer for the global pooling's input: NNCF refuses the whole setup
        # ("incompatible with HW capabilities ... pool/adaptive_avg_pool2d/0") unless pooling is ignored.
        device = nncf.TargetDevice.ANY if advanced is None else nncf.TargetDevice.NPU
        ignored = None if advanced is None else nncf.IgnoredScope(types=["adaptive_avg_pool2d"], validate=False)
        return nncf.quantize(model, dataset, subset_size=len(data.calib), fast_bias_correction=True,
                             target_device=device, ignored_scope=ignored, advanced_parameters=advanced)
    return quantize


ROWS = [common.Row("ptq (default)", 8, 8, _recipe(8, 8), DESCRIBE),
        common.Row("ptq (default)", 4, 8, _recipe(4, 8), DESCRIBE),
        common.Row("ptq (default)", 4, 4, _recipe(4, 4), DESCRIBE)]

if __name__ == "__main__":
    common.run_rows("nncf", nncf.__version__, ROWS)
