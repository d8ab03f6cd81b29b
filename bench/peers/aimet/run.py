"""Qualcomm AIMET rows of the peer comparison, with AIMET's recommended PTQ flow: BatchNorm folding
(``fold_all_batch_norms``), ``QuantizationSimModel`` with the per-channel config shipped with AIMET
(``default_config_per_channel.json``: per-channel symmetric weights, per-tensor asymmetric activations) and the
``tf_enhanced`` (SQNR search) range scheme; then AdaRound (``Adaround.apply_adaround`` + frozen parameter
encodings) or Sequential MSE (``apply_seq_mse``) for the low-bit rows.

AIMET quantizes the *outputs* of ops (the model input, every Conv/Linear (after supergroup fusion with ReLU), the
residual additions, pooling, LayerNorm, GELU, ...) rather than the inputs of Conv/Linear: more tensors are
quantized than in qcore's rows. The first and last layer and the op feeding the last layer run at 8 bits
(weights and activations), as in qcore. AdaRound runs 300 iterations per layer (qcore's CPU budget for its
reconstruction rows) instead of AIMET's default 10,000, on all 512 calibration images. Simulated (QuantSim);
AIMET exports ONNX + encodings for Qualcomm runtimes.

Run in .venvs-peers/aimet: ``python bench/peers/aimet/run.py --data out/data.npz --out DIR``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import aimet_torch  # noqa: E402
import common  # noqa: E402
from aimet_torch.adaround import Adaround, AdaroundParameters  # noqa: E402
from aimet_torch.batch_norm_fold import fold_all_batch_norms  # noqa: E402
from aimet_torch.common.defs import QuantScheme  # noqa: E402
from aimet_torch.quantsim import QuantizationSimModel  # noqa: E402
from aimet_torch.seq_mse import apply_seq_mse  # noqa: E402

CONFIG = str(Path(aimet_torch.__file__).parent / "common" / "quantsim_config" / "default_config_per_channel.json")
ADAROUND_ITERS = 300
#: the op whose output is the last layer's input, per model (its output quantizer is pinned to 8 bits too)
LAST_INPUT = {"ResNet": ("pool", "avgpool"), "VisionTransformer": ("norm",),
              "MobileNetV2": ("features.18.2",)}  # MobileNetV2 pools functionally: its last ReLU6 feeds the head

DESCRIBE = {
    "first_last": "8-bit (W8A8)",
    "residual_adds": "quantized (AIMET quantizes op outputs)",
    "weights": "per-channel symmetric (tf_enhanced)",
    "activations": "per-tensor asymmetric, tf_enhanced, outputs of every op",
    "deployable": "simulated (QuantSim; ONNX + encodings export)",
}


def _pin_8bit(sim: QuantizationSimModel, model: torch.nn.Module) -> None:
    names = list(common.first_last(model))
    names += [n for k, ns in LAST_INPUT.items() if k in type(model).__name__ for n in ns]
    modules = dict(sim.model.named_modules())
    for name in names:
        qm = modules.get(name)
        if qm is None:
            continue
        quantizers = list(getattr(qm, "param_quantizers", {}).values())
        quantizers += list(getattr(qm, "input_quantizers", [])) + list(getattr(qm, "output_quantizers", []))
        for q in quantizers:
            if q is not None:
                q.bitwidth = 8


def _recipe(w_bits: int, a_bits: int, method: str):
    def quantize(model: torch.nn.Module, data: common.Data):
        batches = data.calib_batches(64)
        dummy = batches[0][:1]
        fold_all_batch_norms(model, input_shapes=tuple(dummy.shape))
        first, last = common.first_last(model)
        modules = dict(model.named_modules())
        tmp = tempfile.mkdtemp(prefix="aimet-")
        if method == "adaround":
            params = AdaroundParameters(data_loader=batches, num_batches=len(batches),
                                        default_num_iterations=ADAROUND_ITERS, forward_fn=lambda m, x: m(x))
            model = Adaround.apply_adaround(model, dummy, params, path=tmp, filename_prefix="adaround",
                                            default_param_bw=w_bits, default_config_file=CONFIG,
                                            param_bw_override_list=[(modules[first], 8), (modules[last], 8)],
                                            default_quant_scheme=QuantScheme.post_training_tf_enhanced)
        sim = QuantizationSimModel(model, dummy, quant_scheme=QuantScheme.post_training_tf_enhanced,
                                   default_output_bw=a_bits, default_param_bw=w_bits, config_file=CONFIG)
        _pin_8bit(sim, model)
        if method == "adaround":
            sim.set_and_freeze_param_encodings(str(Path(tmp) / "adaround.encodings"))
        elif method == "seq_mse":
            apply_seq_mse(sim, batches, num_candidates=20, forward_fn=lambda m, x: m(x))

        def forward(m: torch.nn.Module) -> None:
            with torch.no_grad():
                for x in batches:
                    m(x)
        sim.compute_encodings(forward)
        return sim.model
    return quantize


ROWS = [common.Row("quantsim tf_enhanced", 8, 8, _recipe(8, 8, "ptq"), DESCRIBE),
        common.Row("quantsim tf_enhanced", 4, 8, _recipe(4, 8, "ptq"), DESCRIBE),
        common.Row("quantsim tf_enhanced", 4, 4, _recipe(4, 4, "ptq"), DESCRIBE),
        common.Row("adaround", 4, 8, _recipe(4, 8, "adaround"), DESCRIBE),
        common.Row("adaround", 4, 4, _recipe(4, 4, "adaround"), DESCRIBE),
        common.Row("seq_mse", 4, 4, _recipe(4, 4, "seq_mse"), DESCRIBE)]

if __name__ == "__main__":
    common.run_rows("aimet-torch", getattr(aimet_torch, "__version__", "2.42.0"), ROWS)
