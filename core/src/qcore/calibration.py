"""Shared calibration machinery: running calibration data through a wrapped model with observers, and
the range calibrator family (min/max, percentile, MSE) built on it."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from qcore.components import Calibrator, RunContext
from qcore.errors import QcoreError
from qcore.fake_quant import Observer, UniformFakeQuant
from qcore.progress import track
from qcore.ranges import RangeFn, get_range_estimator
from qcore.wrap import quant_layers

log = logging.getLogger(__name__)

RangeName = Literal["minmax", "percentile", "mse"]


def uniform_quantizer(q: nn.Module, who: str) -> UniformFakeQuant:
    """``q`` as a :class:`UniformFakeQuant`, or an error saying the calibrator cannot handle its type."""
    if not isinstance(q, UniformFakeQuant):
        raise QcoreError(f"calibrator {who!r} sets uniform-grid ranges and cannot calibrate {type(q).__name__}; "
                         "choose the calibrator that belongs to that quantizer")
    return q


@torch.no_grad()
def observe_activations(model: nn.Module, ctx: RunContext, max_per_row: int) -> dict[str, Observer]:
    """Run the calibration batches through ``model`` with every activation quantizer observing (passing its
    input through unquantized) and return the observers by layer name."""
    observers: dict[str, Observer] = {}
    for i, (name, layer) in enumerate(quant_layers(model).items()):
        if layer.act_quantizer is not None:
            obs = Observer(max_per_row, seed=ctx.config.seed + i)
            layer.act_quantizer.observer = obs
            observers[name] = obs
    if not observers:
        return observers
    model.eval()
    try:
        for batch in track(ctx.calibration_batches(), desc="calibrate activations", unit="batch"):
            ctx.task.forward(model, batch)
    finally:
        for layer in quant_layers(model).values():
            if layer.act_quantizer is not None:
                layer.act_quantizer.observer = None
    return observers


@dataclass(frozen=True)
class RangeOptions:
    weight_range: RangeName = field(default="minmax", metadata={"help": "weight clip-range estimator"})
    act_range: RangeName = field(default="minmax", metadata={"help": "activation clip-range estimator"})
    percentile: float = field(default=99.99, metadata={"help": "percentile for the 'percentile' estimator"})
    act_samples: int = field(default=65536, metadata={"help": "activation values kept per scale (sampled)"})

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise QcoreError(f"percentile={self.percentile} must be in (50, 100]")
        if self.act_samples < 16:
            raise QcoreError("act_samples must be at least 16")


class RangeCalibrator(Calibrator):
    """Clip ranges from weight values and observed activations with a range estimator."""

    name = "minmax"
    description = "weights per their granularity, activations per tensor: full observed range"
    Options = RangeOptions

    def _estimator(self, name: str) -> RangeFn:
        fn = get_range_estimator(name)
        if name == "percentile":
            return functools.partial(fn, q=self.options.percentile)
        return fn

    def calibrate(self, model: nn.Module, ctx: RunContext) -> None:
        west, aest = self._estimator(self.options.weight_range), self._estimator(self.options.act_range)
        layers = quant_layers(model)
        for layer in layers.values():
            if layer.weight_quantizer is not None:
                q = uniform_quantizer(layer.weight_quantizer, self.name)
                with torch.no_grad():
                    lo, hi = west(q.rows_of(layer.module.weight.detach()), q.row_bits(), q.spec.symmetric)
                q.set_range(lo, hi)
        observers = observe_activations(model, ctx, self.options.act_samples)
        for name, obs in observers.items():
            q = uniform_quantizer(layers[name].act_quantizer, self.name)
            lo, hi = aest(obs.sample(), q.row_bits().cpu(), q.spec.symmetric)
            q.set_range(lo, hi)


@dataclass(frozen=True)
class PercentileOptions(RangeOptions):
    act_range: RangeName = field(default="percentile", metadata={"help": "activation clip-range estimator"})


@dataclass(frozen=True)
class MSEOptions(RangeOptions):
    act_range: RangeName = field(default="mse", metadata={"help": "activation clip-range estimator"})


class PercentileCalibrator(RangeCalibrator):
    name = "percentile"
    description = "activation ranges at a percentile of observed values (weights: min/max)"
    Options = PercentileOptions


class MSECalibrator(RangeCalibrator):
    name = "mse"
    description = "activation ranges that minimise quantization MSE on calibration data (weights: min/max)"
    Options = MSEOptions
