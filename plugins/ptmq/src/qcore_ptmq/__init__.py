"""qcore-ptmq: PTMQ (post-training multi-bit quantization, Xu et al., AAAI 2024) for qcore.

One block reconstruction calibrates a model that serves several bit-widths: shared FP weights and one shared
rounding tensor per layer, a frozen weight step set and a learned activation step set per bit-width. Switch a saved
model with ``qcore.load(path, model, bits=(w, a))`` or ``qcore eval model.qcore --w-bits B --a-bits B``.
"""

from __future__ import annotations

from qcore_ptmq.calibrator import PTMQCalibrator, PTMQObjective, PTMQOptions, gd_loss
from qcore_ptmq.quantizer import (
    BitGroupOptions,
    MultiBitFakeQuant,
    MultiBitLSQ,
    MultiBitQuantizer,
    SharedRounding,
    parse_bits,
)

__all__ = ["PTMQCalibrator", "PTMQObjective", "PTMQOptions", "gd_loss", "BitGroupOptions", "MultiBitFakeQuant",
           "MultiBitLSQ", "MultiBitQuantizer", "SharedRounding", "parse_bits"]
