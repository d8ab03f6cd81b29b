"""What the curves must model: the clip ranges and grids the run's calibrator will deploy.

RDOQ's curves price each candidate with the quantizer deployment will use, so the allocation and the deployed
model agree. The clip range comes from the run's calibrator: a range calibrator (``minmax``, ``percentile``,
``mse``) clips weights with the estimator named by ``-o weight_range`` and activations with ``-o act_range``
(both :mod:`qcore.ranges` estimators, ``-o percentile`` included); the grids' symmetry comes from the pipeline
options ``weight_symmetric`` and ``act_symmetric``. :func:`deployment` reads these off the run and refuses, with
one line naming the combination and the fix, what the curves cannot model:

* a calibrator whose weight ranges are not a named estimator (anything but a :class:`~qcore.RangeCalibrator`
  using its own ``weight_estimator``);
* a calibrator that sets pruned (0-bit) groups to their mean (``prune_to_mean``: ACIQ's family) while groups
  may be pruned (``min_bits=0``): the curves price a pruned group as zeros;
* per-tensor weight scales (``weight_granularity=tensor``): RDOQ gives every group its own bits and scale;
* the asymmetric weight grid with the dead-zone quantizer (its grid is symmetric);
* with activation curves (``budget=joint|separate``): activation ranges that are not a named estimator
  (``aciq``, ``kl``, ``nstd``) or per-channel activation scales (the curves are per tensor).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from qcore import QcoreError, RangeCalibrator, RunContext
from qcore.ranges import RangeFn, get_range_estimator

#: the range calibrators whose ranges the curves model
RANGE_CALIBRATORS = "mse, minmax or percentile"


@dataclass(frozen=True)
class Clip:
    """How deployment quantizes one kind of tensor: the :mod:`qcore.ranges` estimator that sets its clip
    range (by name; ``percentile`` is that estimator's percentile) and whether its grid is symmetric."""

    estimator: str = "mse"
    symmetric: bool = True
    percentile: float = 99.99

    def __post_init__(self) -> None:
        get_range_estimator(self.estimator)  # an unknown name is a one-line error listing the valid ones

    def fn(self) -> RangeFn:
        """The estimator as a range calibrator calls it (:meth:`RangeCalibrator.weight_estimator
        <qcore.RangeCalibrator.weight_estimator>`: the percentile bound for ``percentile``)."""
        est = get_range_estimator(self.estimator)
        return functools.partial(est, q=self.percentile) if self.estimator == "percentile" else est

    def key(self) -> dict[str, Any]:
        """The settings that change the candidates, for the curve cache key (the percentile only where used)."""
        out: dict[str, Any] = {"estimator": self.estimator, "symmetric": self.symmetric}
        if self.estimator == "percentile":
            out["percentile"] = self.percentile
        return out

    def describe(self) -> str:
        """``mse, symmetric`` / ``percentile 99.9, affine``: for logs and plan metadata."""
        name = f"percentile {self.percentile:g}" if self.estimator == "percentile" else self.estimator
        return f"{name}, {'symmetric' if self.symmetric else 'affine'}"


#: the weight candidates of the rdoq method's defaults (``mse`` calibrator, ``weight_range=mse``)
WEIGHT_CLIP = Clip("mse", symmetric=True)
#: the activation candidates of the rdoq method's defaults (``mse`` calibrator, affine activations)
ACT_CLIP = Clip("mse", symmetric=False)


@dataclass(frozen=True)
class Deployment:
    """The weight and activation quantizers the curves model (see module docstring)."""

    weights: Clip = WEIGHT_CLIP
    acts: Clip = ACT_CLIP


def _own(cal: RangeCalibrator, method: str) -> bool:
    """Whether ``cal`` uses :class:`~qcore.RangeCalibrator`'s own ``method`` (not an override)."""
    return getattr(type(cal), method) is getattr(RangeCalibrator, method)


def deployment(ctx: RunContext, min_bits: int, activations: bool, deadzone: bool) -> Deployment:
    """The quantizers the run's calibrator will deploy, or a :class:`~qcore.QcoreError` naming a combination the
    curves cannot model and what to use instead.

    ``min_bits``: the lowest bit-width a group may get; ``activations``: whether activation curves are measured
    (``budget=joint|separate``); ``deadzone``: weights on the dead-zone grid.
    """
    p = ctx.pipeline
    cal = ctx.calibrator
    if p.weight_granularity != "channel":
        raise QcoreError(f"rdoq gives every group of output channels its own bits and scale, so -o "
                         f"weight_granularity={p.weight_granularity} (one scale per tensor) is not modelled: use "
                         "weight_granularity=channel (the default)")
    if deadzone and not p.weight_symmetric:
        raise QcoreError("the dead-zone grid is symmetric; -o weight_symmetric=false is not modelled with "
                         "--quantizer deadzone: drop the option or use --quantizer uniform")
    if cal is None:  # a context built without the pipeline: the options say what a range calibrator would do
        o = ctx.options
        pct = float(o.get("percentile", 99.99))
        return Deployment(Clip(str(o.get("weight_range", WEIGHT_CLIP.estimator)), p.weight_symmetric, pct),
                          Clip(str(o.get("act_range", ACT_CLIP.estimator)), p.act_symmetric, pct))
    if not isinstance(cal, RangeCalibrator) or not (_own(cal, "weight_estimator") and _own(cal, "calibrate_weights")):
        raise QcoreError(f"rdoq's curves model weight ranges set by a named range estimator; calibrator "
                         f"{cal.name!r} sets them another way: use --calibrator {RANGE_CALIBRATORS}")
    if cal.prune_to_mean and min_bits == 0:
        raise QcoreError(f"calibrator {cal.name!r} sets pruned (0-bit) weight groups to their mean, but rdoq's curves "
                         f"price a pruned group as zeros: add -o min_bits=1 or use --calibrator {RANGE_CALIBRATORS}")
    o = cal.options
    weights = Clip(o.weight_range, p.weight_symmetric, o.percentile)
    if not activations:  # activation curves are not measured: the activation calibration does not enter them
        return Deployment(weights, ACT_CLIP)
    if not (_own(cal, "act_estimator") and _own(cal, "calibrate")) or not hasattr(o, "act_range"):
        raise QcoreError(f"calibrator {cal.name!r} clips activations with its own rule, not a named range estimator, "
                         f"which rdoq's activation curves cannot model: use -o budget=weights or --calibrator "
                         f"{RANGE_CALIBRATORS}")
    if p.act_granularity != "tensor":
        raise QcoreError(f"rdoq's activation curves model per-tensor activation scales; -o act_granularity="
                         f"{p.act_granularity} is not modelled with budget=joint|separate: use "
                         "act_granularity=tensor or budget=weights")
    return Deployment(weights, Clip(o.act_range, p.act_symmetric, o.percentile))
