"""Hook implementations of qcore-recon.

The distribution has three entry points so that ``qcore run --plugin NAME`` works for each method: ``recon``
(this module: calibrators ``adaround``, ``brecq``, ``qdrop`` and the method ``recon``, QDrop's recipe), ``qdrop``
(:mod:`qcore_recon.plugin_qdrop`: method ``qdrop``) and ``brecq`` (:mod:`qcore_recon.plugin_brecq`: method
``brecq``). Every method: core's uniform grid, the ``fixed`` allocator, W4A4, AdaRound's rate ``round_lr=0.005``
(:data:`CPU_ROUND_LR`).
"""

from __future__ import annotations

from typing import Any

from qcore import Method, hookimpl

#: the papers' grids: weights asymmetric per channel, activations asymmetric per tensor, W4A4; first and last
#: layer (weights and their inputs) at 8 bits (qcore's default -o first_last=8)
RECON_DEFAULTS: dict[str, Any] = {"w_bits": 4, "a_bits": 4, "weight_symmetric": False}
#: AdaRound's Adam rate for the methods' CPU-sized 300 steps per unit: 5x the papers' 1e-3 (tuned for 20,000
#: steps), so that the rounding variables can travel far enough in 300 steps (BENCHMARKS.md "Block reconstruction,
#: fourth session"). A *method* default: the ``qdrop``/``brecq`` calibrators keep the papers' 1e-3, so methods that
#: only borrow them (ompq, ``--calibrator qdrop`` under another method) are unchanged; ``-o round_lr=0.001`` restores
#: the papers' rate.
CPU_ROUND_LR = 5e-3


@hookimpl
def qcore_register_calibrators(register: Any) -> None:
    from qcore_recon.calibrators import AdaRoundCalibrator, BRECQCalibrator, QDropCalibrator

    register(AdaRoundCalibrator)
    register(BRECQCalibrator)
    register(QDropCalibrator)


def _method(name: str, description: str, default: bool) -> Method:
    return Method(name=name, quantizer="uniform", calibrator=name if name != "recon" else "qdrop", allocator="fixed",
                  defaults={**RECON_DEFAULTS, "round_lr": CPU_ROUND_LR}, default=default, description=description)


@hookimpl
def qcore_register_methods(register: Any) -> None:
    register(_method("recon", "the qdrop method's recipe (what --plugin recon runs; --plugin qdrop is the same)",
                     True))
