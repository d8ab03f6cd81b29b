"""torchao rows of the peer comparison: PyTorch 2 Export (PT2E) static quantization with torchao's
``X86InductorQuantizer``, the PTQ path torchao has for Conv2d (its ``quantize_`` configs are for Linear layers).
Recipe: ``torch.export`` -> ``prepare_pt2e`` -> calibration -> ``convert_pt2e``; default config = per-channel
symmetric int8 weights (min/max), per-tensor affine uint8 activations from a HistogramObserver (L2 search).
The W4 rows use the same observers with a 4-bit range (weights -8..7, activations 0..15) through a
QuantizationConfig (torchao has no 4-bit static-activation preset; the 4-bit model runs as reference
quantize/dequantize ops, simulation only); first and last layer stay at the int8 config, by module name.
The quantizer places activation quantizers by its x86 fusion patterns (inputs of Conv/Linear; conv+add patterns
quantize the residual add's inputs). W8A8 is deployable through Inductor on x86.

torchvision's ``BasicBlock`` calls one ``nn.ReLU`` module twice (after conv1 and after the residual add), which the
quantizer's conv+add+relu pattern refuses (``ValueError: Input partition has more than one output node``, on
ResNet-18 at every bit-width); :func:`_own_relu_per_call` gives each block a second ``nn.ReLU`` for the add (the
same function, FP outputs unchanged) before export, the edit a torchao user would make.

Run in .venvs-peers/torchao: ``python bench/peers/torchao/run.py --data out/data.npz --out DIR``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import torchao  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq  # noqa: E402

DESCRIBE = {
    "first_last": "8-bit (W8A8)",
    "residual_adds": "inputs quantized where conv+add is fused",
    "weights": "per-channel symmetric (min/max)",
    "activations": "per-tensor affine, histogram (L2) ranges",
    "deployable": "W8A8 deployable (Inductor x86); W4: simulated",
}


def _low_bit(w_bits: int, a_bits: int):
    cfg = xiq.get_default_x86_inductor_quantization_config()
    act = cfg.input_activation
    if a_bits != 8:
        act = type(act)(**{**act.__dict__, "quant_min": 0, "quant_max": 2 ** a_bits - 1})
    w = cfg.weight
    if w_bits != 8:
        w = type(w)(**{**w.__dict__, "quant_min": -(2 ** (w_bits - 1)), "quant_max": 2 ** (w_bits - 1) - 1})
    return type(cfg)(act, act, w, cfg.bias, cfg.is_qat)


def _own_relu_per_call(model: torch.nn.Module) -> torch.nn.Module:
    """Give every torchvision ``BasicBlock`` its own ReLU module after the residual add (see the module docstring);
    other models are returned unchanged."""
    from torchvision.models.resnet import BasicBlock

    def forward(block: BasicBlock, x: torch.Tensor) -> torch.Tensor:
        identity = x if block.downsample is None else block.downsample(x)
        out = block.relu(block.bn1(block.conv1(x)))
        return block.relu_add(block.bn2(block.conv2(out)) + identity)

    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.relu_add = torch.nn.ReLU(inplace=True)
            block.forward = types.MethodType(forward, block)
    return model


def _recipe(w_bits: int, a_bits: int):
    def quantize(model: torch.nn.Module, data: common.Data):
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(_low_bit(w_bits, a_bits))
        if (w_bits, a_bits) != (8, 8):
            for name in common.first_last(model):
                quantizer.set_module_name_qconfig(name, xiq.get_default_x86_inductor_quantization_config())
        model = _own_relu_per_call(model)
        batches = data.calib_batches(64)
        exported = torch.export.export(model, (batches[0],), dynamic_shapes=(
            {0: torch.export.Dim("batch", min=1, max=1024)},)).module()
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for x in batches:
                prepared(x)
        return convert_pt2e(prepared)
    return quantize


ROWS = [common.Row("pt2e x86 (default)", 8, 8, _recipe(8, 8), DESCRIBE),
        common.Row("pt2e x86", 4, 8, _recipe(4, 8), DESCRIBE),
        common.Row("pt2e x86", 4, 4, _recipe(4, 4), DESCRIBE)]

if __name__ == "__main__":
    common.run_rows("torchao", torchao.__version__, ROWS)
