"""Hook implementations of qcore-ptmq: the quantizer ``ptmq`` (multi-bit step sets), the calibrator ``ptmq``
(per-bit ranges, then one reconstruction for every bit-width) and the method ``ptmq`` (what ``qcore run --plugin
ptmq`` runs: the model is calibrated once and evaluated at W4A4; ``qcore eval model.qcore --w-bits B --a-bits B``
evaluates any other setting of the same file)."""

from __future__ import annotations

from typing import Any

from qcore import Method, hookimpl

#: the papers' grids (QDrop's, for parity): weights affine per output channel, activations affine per tensor;
#: first and last layer (weights and inputs) at 8 bits; the run evaluates W4A4. ``equalize=gelu``: core's input
#: equalization of GELU-fed layers (a ViT's fc2), which lets one default serve both zoo models: it closes the ViT's
#: W4A4 gap (the 4-bit per-tensor GELU output) and is a no-op on models without GELU (the ResNet; BENCHMARKS.md)
PTMQ_DEFAULTS: dict[str, Any] = {"w_bits": 4, "a_bits": 4, "weight_symmetric": False, "equalize": "gelu"}


@hookimpl
def qcore_register_quantizers(register: Any) -> None:
    from qcore_ptmq.quantizer import MultiBitQuantizer

    register(MultiBitQuantizer)


@hookimpl
def qcore_register_calibrators(register: Any) -> None:
    from qcore_ptmq.calibrator import PTMQCalibrator

    register(PTMQCalibrator)


@hookimpl
def qcore_register_methods(register: Any) -> None:
    register(Method(name="ptmq", quantizer="ptmq", calibrator="ptmq", allocator="fixed", defaults=dict(PTMQ_DEFAULTS),
                    default=True, description="PTMQ: one reconstruction serving bit-widths 3..8 (groups low 3-4, mid "
                    "5-6, high 7-8), switched at run time (qcore eval --w-bits B --a-bits B); GELU-fed inputs "
                    "equalized; evaluated at W4A4"))
