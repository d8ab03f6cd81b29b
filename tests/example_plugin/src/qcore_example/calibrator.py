"""The ``example-percentile`` calibrator: weight and activation clip ranges at percentiles of their values.

Core's ``percentile`` calibrator clips activations only (weights at min/max, one ``-o percentile`` for
activations). This one clips both, each at its own percentile. It is a :class:`qcore.RangeCalibrator`, which
does the work every range calibrator shares: for every weight quantizer, :func:`qcore.calibrate_rows` on the
weight's rows; then :func:`qcore.observe_activations` over the calibration batches and
:func:`qcore.calibrate_rows` on each activation quantizer's sample. ``calibrate_rows`` uses only the
:class:`qcore.FakeQuantizer` protocol (``set_range`` per row where the format ``uses_range``, then ``fit``),
so this calibrator sets any such format (``uniform``, ``example-pow2``, ``deadzone``, ...). A calibrator
chooses only *how* ranges are estimated, here with :func:`qcore.ranges.percentile_range`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import qcore
from qcore.ranges import RangeFn, percentile_range


@dataclass(frozen=True)
class ExamplePercentileOptions:
    """``-o`` options of ``example-percentile`` (checked and converted by qcore before construction)."""

    weight_percentile: float = field(default=99.9, metadata={
        "help": "weights: clip each row at this percentile of |w| (symmetric grid) or at it and 100 minus it"})
    act_percentile: float = field(default=99.99, metadata={
        "help": "activations: clip at this percentile of the observed values (and 100 minus it, affine grid)"})
    act_samples: int = field(default=65536, metadata={"help": "activation values kept per scale (sampled)"})

    def __post_init__(self) -> None:
        for key in ("weight_percentile", "act_percentile"):
            value = getattr(self, key)
            if not 50.0 < value <= 100.0:
                raise qcore.QcoreError(f"{key}={value} must be in (50, 100]; 100 keeps the full range")
        if self.act_samples < 16:
            raise qcore.QcoreError(f"act_samples={self.act_samples} must be at least 16")


class ExamplePercentileCalibrator(qcore.RangeCalibrator):
    """Clip weights at ``weight_percentile`` and activations at ``act_percentile`` of their values."""

    name = "example-percentile"
    description = "weight and activation ranges at their own percentiles (-o weight_percentile, act_percentile)"
    Options = ExamplePercentileOptions

    def weight_estimator(self) -> RangeFn:
        return functools.partial(percentile_range, q=self.options.weight_percentile)

    def act_estimator(self) -> RangeFn:
        return functools.partial(percentile_range, q=self.options.act_percentile)
