"""Brevitas (AMD/Xilinx) rows of the peer comparison, with the recipe of Brevitas' own ImageNet PTQ example
(``brevitas_examples.imagenet_classification.ptq``): BN merged and graph equalization (20 iterations) in
``preprocess_for_quantize``, per-channel symmetric weights from stats, per-tensor activations from the
99.999th percentile (affine since the fourth peer pass, see ROWS), static calibration, then bias correction;
optionally GPTQ before bias correction.

The ``layerwise`` backend is used because it is the one with the example's first/last-layer switch
(``layerwise_first_last_bit_width=8``): it quantizes the weights and the input of every Conv2d/Linear, like qcore,
and leaves residual additions in float. Simulated in PyTorch (fake-quant); Brevitas exports such a model to ONNX QCDQ.

Run in .venvs-peers/brevitas: ``python bench/peers/brevitas/run.py --data out/data.npz --out DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import brevitas  # noqa: E402
import common  # noqa: E402
from brevitas.graph.quantize import preprocess_for_quantize  # noqa: E402
from brevitas_examples.imagenet_classification.ptq.ptq_common import (  # noqa: E402
    apply_bias_correction,
    apply_gptq,
    calibrate,
    quantize_model,
)

DESCRIBE = {
    "first_last": "8-bit (W8A8)",
    "residual_adds": "not quantized",
    "weights": "per-channel symmetric (stats, float scale)",
    "activations": "per-tensor symmetric/unsigned, 99.999 percentile, inputs of every Conv/Linear",
    "deployable": "simulated (fake-quant; ONNX QCDQ export exists)",
}


SIGNED_NOTE = ("per-tensor SIGNED symmetric, 99.999 percentile, inputs of every Conv/Linear (the layerwise backend's "
               "sym input quantizer is signed: on ReLU outputs half its grid is unused)")
AFFINE_ACT = {"activations": "per-tensor affine (asym), 0.001/99.999 percentiles, inputs of every Conv/Linear"}


def _recipe(w_bits: int, a_bits: int, gptq: bool, act_quant_type: str = "asym"):
    def quantize(model: torch.nn.Module, data: common.Data):
        loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in data.calib_batches(64)]
        model = preprocess_for_quantize(model, equalize_iters=20, equalize_merge_bias=True, merge_bn=True)
        qmodel = quantize_model(model, backend="layerwise", weight_bit_width=w_bits, act_bit_width=a_bits,
                                bias_bit_width=32, weight_quant_granularity="per_channel",
                                act_quant_percentile=99.999, act_quant_type=act_quant_type,
                                scale_factor_type="float_scale", quant_format="int", layerwise_first_last_bit_width=8)
        qmodel.eval()
        with torch.no_grad():
            qmodel(loader[0][0])
        calibrate(loader, qmodel)
        if gptq:
            apply_gptq(loader, qmodel, act_order=False, use_quant_activations=False, create_weight_orig=True)
        apply_bias_correction(loader, qmodel)
        return qmodel
    return quantize


# The layerwise backend (the one with the first/last 8-bit switch) puts one input quantizer in front of every
# Conv/Linear. With act_quant_type="sym" that quantizer is signed (it cannot know its input is a ReLU output), so a
# 4-bit activation grid keeps only 8 levels for the non-negative values: the first tables' weak Brevitas A4 rows.
# "asym" (per-tensor affine with a zero point, the example's other choice and what qcore and AIMET use) is the
# recipe now; the signed rows are kept, labelled, to show the difference.
ROWS = [common.Row("ptq+bias_corr, affine act", 8, 8, _recipe(8, 8, False), {**DESCRIBE, **AFFINE_ACT}),
        common.Row("ptq+bias_corr, affine act", 4, 8, _recipe(4, 8, False), {**DESCRIBE, **AFFINE_ACT}),
        common.Row("ptq+bias_corr, affine act", 4, 4, _recipe(4, 4, False), {**DESCRIBE, **AFFINE_ACT}),
        common.Row("ptq+bias_corr, signed sym act", 8, 8, _recipe(8, 8, False, "sym"),
                   {**DESCRIBE, "activations": SIGNED_NOTE}),
        common.Row("ptq+bias_corr, signed sym act", 4, 8, _recipe(4, 8, False, "sym"),
                   {**DESCRIBE, "activations": SIGNED_NOTE}),
        common.Row("ptq+bias_corr, signed sym act", 4, 4, _recipe(4, 4, False, "sym"),
                   {**DESCRIBE, "activations": SIGNED_NOTE}),
        common.Row("gptq+bias_corr, affine act", 4, 8, _recipe(4, 8, True), {**DESCRIBE, **AFFINE_ACT}),
        common.Row("gptq+bias_corr, affine act", 4, 4, _recipe(4, 4, True), {**DESCRIBE, **AFFINE_ACT})]

if __name__ == "__main__":
    common.run_rows("brevitas", brevitas.__version__, ROWS)
