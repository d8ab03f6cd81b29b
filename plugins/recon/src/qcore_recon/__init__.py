"""qcore-recon: block reconstruction (AdaRound, BRECQ, QDrop) as a calibrator family and a Python API.

Other plugins reconstruct with their own quantizers and losses through :func:`reconstruct`::

    from qcore_recon import ReconSettings, reconstruct
    reconstruct(qmodel, ctx.model, ctx, settings=ReconSettings(iters=500), loss=my_loss)
    reconstruct(qmodel, ctx.model, ctx, objective=multi_bit)   # runs each unit itself, e.g. at several bit-widths

A weight quantizer supplies its own differentiable rounding by defining ``recon_rounding(weight)`` returning a
:class:`WeightRounding` (or the caller passes ``weight_rounding=``); an activation quantizer its own learned
parameters with ``recon_act()`` returning an :class:`ActQuant`.
"""

from __future__ import annotations

from qcore_recon.act import ActQuant, LSQAct, act_quant_for
from qcore_recon.blocks import Unit, find_units, is_block
from qcore_recon.recon import (
    LossFn,
    Objective,
    ReconReport,
    ReconSettings,
    SoftWeight,
    UnitReport,
    acts_disabled,
    fisher_weights,
    learning_layers,
    lp_loss,
    mse_loss,
    reconstruct,
)
from qcore_recon.rounding import AdaRound, STERounding, WeightRounding, rectified_sigmoid, rounding_for

__all__ = [
    "reconstruct", "ReconSettings", "ReconReport", "UnitReport", "mse_loss", "lp_loss", "acts_disabled",
    "SoftWeight", "learning_layers",
    "fisher_weights",
    "LossFn", "Objective",
    "Unit", "find_units", "is_block",
    "WeightRounding", "AdaRound", "STERounding", "rounding_for", "rectified_sigmoid",
    "ActQuant", "LSQAct", "act_quant_for",
]
