"""Shared calibration machinery: running calibration data through a wrapped model with observers, and
the range calibrator family (min/max, percentile, MSE) built on it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from qcore._components import Calibrator, RunContext
from qcore._errors import QcoreError
from qcore._fake_quant import FakeQuantizer, Observer
from qcore._layers import LayerInfo, watch_layers
from qcore._progress import track
from qcore._wrap import quant_layers
from qcore.ranges import RangeFn, get_range_estimator

log = logging.getLogger(__name__)

RangeName = Literal["minmax", "percentile", "mse"]


def fake_quantizer(q: nn.Module, who: str) -> FakeQuantizer:
    """``q`` as a :class:`FakeQuantizer`, or an error saying the calibrator cannot handle it."""
    if not isinstance(q, FakeQuantizer):
        raise QcoreError(f"calibrator {who!r} calibrates qcore.FakeQuantizer modules and cannot calibrate "
                         f"{type(q).__name__}; its quantizer must subclass qcore.FakeQuantizer")
    return q


def calibrate_rows(q: FakeQuantizer, rows: torch.Tensor, estimator: RangeFn) -> None:
    """Calibrate ``q`` from ``rows`` (``[rows, values]``, its tensor's :meth:`~FakeQuantizer.rows_of` or a sample):
    a clip range per row from ``estimator`` when the format uses one, then the format's own :meth:`fit`."""
    if q.uses_range:
        lo, hi = estimator(rows, q.row_bits().to(rows.device), q.spec.symmetric)
        q.set_range(lo, hi)
    q.fit(rows)
    if not q.calibrated:
        raise QcoreError(f"{type(q).__name__} was not calibrated by a clip range and its fit(): its format needs "
                         "another calibrator (see its plugin's README)")


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


def input_rows(x: torch.Tensor, info: LayerInfo, per_channel: bool) -> torch.Tensor:
    """A layer's input values as ``[rows, values]``: one row, or one row per input channel (the channel axis
    ``info.act_axis`` moved first; what per-channel observers and input statistics reduce over)."""
    if not per_channel:
        return x.reshape(1, -1)
    return x.movedim(info.act_axis, 0).reshape(info.in_channels, -1)


@torch.no_grad()
def observe_inputs(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Sequence[Any],
                   layers: Mapping[str, LayerInfo], per_channel: bool = False, samples: int = 65536,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Sample the inputs of the named layers of an unwrapped model over ``batches``.

    Returns, per layer, ``[rows, n]`` values (one row per tensor, or per input channel when ``per_channel``):
    a uniform sample of at most ``samples`` values per row plus the exact extremes (see
    :class:`~qcore._fake_quant.Observer`). The input is read the way the layer's activation quantizer would see
    it (``LayerInfo.quantize_input``: a sparse tensor's active features, not a dense view).
    """
    obs = {n: Observer(samples, seed + i) for i, n in enumerate(layers)}
    watch_layers(model, forward, batches, layers,
                 on_input=lambda n, t: obs[n].update(input_rows(t, layers[n], per_channel)))
    return {n: o.sample() for n, o in obs.items()}


@dataclass(frozen=True)
class WeightRangeOptions:
    """Options of every range-based calibrator: how weights are clipped and how much activation is kept."""

    weight_range: RangeName = field(default="minmax", metadata={"help": "weight clip-range estimator"})
    percentile: float = field(default=99.99, metadata={"help": "percentile for the 'percentile' estimator"})
    act_samples: int = field(default=65536, metadata={"help": "activation values kept per scale (sampled)"})

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise QcoreError(f"percentile={self.percentile} must be in (50, 100]")
        if self.act_samples < 16:
            raise QcoreError("act_samples must be at least 16")


@dataclass(frozen=True)
class RangeOptions(WeightRangeOptions):
    act_range: RangeName = field(default="minmax", metadata={"help": "activation clip-range estimator"})


class RangeCalibrator(Calibrator):
    """Clip ranges from weight values and observed activations with a range estimator.

    Works with any :class:`~qcore.FakeQuantizer`: a clip range per row where the format ``uses_range``, then the
    format's own ``fit`` on the same rows. Subclasses change how activations are clipped by overriding
    :meth:`act_estimator` (ACIQ's analytical clipping, KL thresholds), and set ``prune_to_mean`` to make 0-bit
    channels their mean instead of zero.
    """

    name = "minmax"
    description = "weights per their granularity, activations per tensor: full observed range"
    Options = RangeOptions
    #: 0-bit (pruned) channels take their mean (weights: the FP channel mean; activations: the observed one)
    prune_to_mean: bool = False

    def _estimator(self, name: str) -> RangeFn:
        fn = get_range_estimator(name)
        if name == "percentile":
            return functools.partial(fn, q=self.options.percentile)
        return fn

    def weight_estimator(self) -> RangeFn:
        return self._estimator(self.options.weight_range)

    def act_estimator(self) -> RangeFn:
        return self._estimator(self.options.act_range)

    def calibrate_weights(self, model: nn.Module) -> None:
        """Set every weight quantizer's range (and prune values) from the weights themselves."""
        west = self.weight_estimator()
        for layer in quant_layers(model).values():
            if layer.weight_quantizer is not None:
                q = fake_quantizer(layer.weight_quantizer, self.name)
                with torch.no_grad():
                    rows = q.rows_of(layer.module.weight.detach())
                    calibrate_rows(q, rows, west)
                if self.prune_to_mean:
                    q.set_prune_value(q.channel_values(rows.mean(dim=1)))

    def calibrate(self, model: nn.Module, ctx: RunContext) -> None:
        self.calibrate_weights(model)
        aest = self.act_estimator()
        layers = quant_layers(model)
        observers = observe_activations(model, ctx, self.options.act_samples)
        for name, obs in observers.items():
            q = fake_quantizer(layers[name].act_quantizer, self.name)
            sample = obs.sample()
            with torch.no_grad():
                calibrate_rows(q, sample, aest)
            if self.prune_to_mean:
                q.set_prune_value(q.channel_values(sample.mean(dim=1)))


@dataclass(frozen=True)
class PercentileOptions(RangeOptions):
    act_range: RangeName = field(default="percentile", metadata={"help": "activation clip-range estimator"})


@dataclass(frozen=True)
class MSEOptions(RangeOptions):
    act_range: RangeName = field(default="mse", metadata={"help": "activation clip-range estimator"})


class PercentileCalibrator(RangeCalibrator):
    """:class:`RangeCalibrator` with activation ranges at a percentile of the observed values."""

    name = "percentile"
    description = "activation ranges at a percentile of observed values (weights: min/max)"
    Options = PercentileOptions


class MSECalibrator(RangeCalibrator):
    """:class:`RangeCalibrator` with the activation ranges that minimise the quantization MSE."""

    name = "mse"
    description = "activation ranges that minimise quantization MSE on calibration data (weights: min/max)"
    Options = MSEOptions
