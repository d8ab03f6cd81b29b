"""Activation (output) correction: quantization shifts the mean (and scales the spread) of each layer's output
channels; per-channel constants measured once on calibration data move them back.

For every quantized layer ``L`` and output channel ``c``::

    correction_c = E_calib[y_fp,c] - E_calib[y_q,c]

where ``y_fp`` is the FP model's output of ``L`` and ``y_q`` the quantized model's, its upstream quantized
*and already corrected*. The constant is folded into the layer's bias at deployment, so it is deployable;
unlike the original ACIQ code's ``-bca`` it never looks at the data being evaluated.

Corrections of upstream layers change downstream means, so the layers are corrected one at a time in the order
the forward pass reaches them, each measured with every earlier correction in place (one calibration pass per
layer, each stopped as soon as the layer has run). After the sweep every layer's channel means equal FP's on
the calibration data (a layer the forward pass calls more than once, e.g. a shared block, is moved again by the
corrections of the layers between its calls: it is left approximately corrected). Measuring all layers at once
and repeating, as a first version did, corrects a downstream layer for a shift its upstream correction also
removes: after two such passes the zoo ResNet's means were still off, and uniform W4A4 lost 1.4 points where
the sweep changes nothing.

``affine`` mode matches each output channel's standard deviation as well as its mean: ``y_corr = a_c * y_q +
b_c`` with ``a_c = std(y_fp,c) / std(y_q,c)`` (the seed's ``-bcw`` rule for weights, applied to outputs).
MSE-chosen clip ranges shrink what a layer outputs (on the zoo ResNet at 3 bits its outputs are ~0.6x FP's): a
ReLU network passes a shrinkage on unchanged (it is positively homogeneous), but a shift alone (``static``) then
moves the shrunk outputs across the ReLUs' zero and compounds layer after layer, which destroyed such models in
our measurements (BENCHMARKS.md). Two other gains were measured and not kept: least squares ``Cov(y_fp, y_q) /
Var(y_q)`` shrinks noisy outputs further, which compounds the same way (uniform W3A3 78 % where this gets 89 %);
undoing the signal's gain, ``Var(y_fp) / Cov(y_fp, y_q)``, was as accurate but divides by a covariance that can
be near zero. Gain and shift fold into the per-channel weight scale (a per-channel requantization multiplier
under per-tensor weights) and the bias, so the correction is deployable.

``local`` mode corrects only what each layer's own quantization adds: ``E[layer_fp(x) - layer_q(x)]`` for
the input ``x`` that reaches it in the quantized model (weight and input quantization of that layer), in the
same order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qcore._components import OutputCorrection, RunContext
from qcore._layers import LayerInfo, run_hooked, watch_layers
from qcore._progress import track
from qcore._wrap import quant_layers

log = logging.getLogger(__name__)


class ChannelMeans:
    """Running per-channel means (and, with ``variances``, variances) of tensors, by name (channels on ``axis``)."""

    def __init__(self, variances: bool = False) -> None:
        self.sums: dict[str, Tensor] = {}
        self.squares: dict[str, Tensor] | None = {} if variances else None
        self.counts: dict[str, int] = {}

    def add(self, name: str, y: Tensor, axis: int) -> None:
        rows = y.movedim(axis, 0).reshape(y.shape[axis], -1).double()
        self.sums[name] = self.sums.get(name, 0) + rows.sum(dim=1)
        if self.squares is not None:
            self.squares[name] = self.squares.get(name, 0) + rows.square().sum(dim=1)
        self.counts[name] = self.counts.get(name, 0) + rows.shape[1]

    def means(self) -> dict[str, Tensor]:
        return {n: (s / max(self.counts[n], 1)).float() for n, s in self.sums.items()}

    def moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``(mean, variance)`` per channel, by name (float64); needs ``variances=True``."""
        if self.squares is None:
            raise ValueError("ChannelMeans(variances=True) is needed for moments()")
        out = {}
        for n, s in self.sums.items():
            mean = s / max(self.counts[n], 1)
            out[n] = (mean, (self.squares[n] / max(self.counts[n], 1) - mean * mean).clamp(min=0))
        return out


@torch.no_grad()
def output_moments(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Sequence[Any],
                   layers: Mapping[str, LayerInfo]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-output-channel ``(mean, variance)`` (float64) of each named module's output over ``batches`` (sparse
    outputs: over active sites)."""
    acc = ChannelMeans(variances=True)
    watch_layers(model, forward, batches, layers, on_output=lambda n, y: acc.add(n, y, layers[n].act_axis))
    return acc.moments()


@torch.no_grad()
def output_means(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Sequence[Any],
                 layers: Mapping[str, LayerInfo]) -> dict[str, Tensor]:
    """Per-output-channel mean of each named module's output over ``batches`` (sparse outputs: over active
    sites)."""
    acc = ChannelMeans()
    watch_layers(model, forward, batches, layers, on_output=lambda n, y: acc.add(n, y, layers[n].act_axis))
    return acc.means()


@torch.no_grad()
def local_gaps(qmodel: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Sequence[Any],
               names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Per output channel, ``E[layer_fp(x) - layer_q(x)]`` of every quantized layer (or those in ``names``) over
    ``batches``, where ``x`` is the input that reaches the layer in the quantized model: the bias the layer's own
    quantization (weight and input) adds, not the drift of the layers before it."""
    acc = ChannelMeans()

    def hook(name: str) -> Callable[..., None]:
        def fn(layer: Any, args: tuple[Any, ...], out: Any) -> None:
            got: list[Tensor] = []
            ref = layer.module(*args)  # FP weight, unquantized input
            layer.info.output_tensor(ref, lambda t: got.append(t) or t)
            layer.info.output_tensor(out, lambda t: got.append(t) or t)
            acc.add(name, got[0] - got[1], layer.info.act_axis)
        return fn

    layers = {n: q for n, q in quant_layers(qmodel).items() if names is None or n in names}
    run_hooked(qmodel, forward, batches, [q.register_forward_hook(hook(n)) for n, q in layers.items()])
    return acc.means()


def std_gain(var_fp: Tensor, var_q: Tensor) -> Tensor:
    """Per channel, the gain ``std_fp / std_q`` of the ``affine`` correction; 1 (the shift alone) for channels
    without spread (pruned, dead) or whose quantized spread is under 1 % of FP's (a gain above 100 would amplify
    what little is left)."""
    ok = (var_q > 1e-4 * var_fp) & (var_fp > 0)
    return torch.where(ok, (var_fp / torch.where(ok, var_q, torch.ones_like(var_q))).sqrt(), torch.ones_like(var_q))


@torch.no_grad()
def layer_calls(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Sequence[Any]
                ) -> dict[str, list[int]]:
    """For each quantized layer of ``model`` that ``forward`` reaches over ``batches``: how many times it is called
    in each batch (0 where a batch does not reach it), in the order of the layers' first calls (a layer that only
    a later batch reaches comes after those the earlier ones reach; layers none reaches are left out)."""
    calls: dict[str, list[int]] = {}  # insertion order = order of first calls
    at = 0  # the batch being run

    def seen(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            calls.setdefault(name, [0] * len(batches))[at] += 1
        return hook

    def numbered() -> Iterator[Any]:
        nonlocal at
        for i, batch in enumerate(batches):
            at = i  # the hooks count into this batch's slot
            yield batch

    run_hooked(model, forward, numbered(), [q.register_forward_pre_hook(seen(n)) for n, q in
                                            quant_layers(model).items()])
    return calls


class _Reached(Exception):
    """Ends a forward pass early: the layer being measured has produced all its outputs for this batch."""


@torch.no_grad()
def _layer_moments(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Sequence[Any], name: str,
                   info: LayerInfo, calls: Sequence[int]) -> tuple[Tensor, Tensor] | None:
    """Per-channel ``(mean, variance)`` of layer ``name``'s output over ``batches``, like :func:`output_moments`,
    but each batch's forward pass stops once the layer has run its ``calls[i]`` times (nothing after it can change
    its output), which halves the cost of a sweep over the layers on average."""
    acc = ChannelMeans(variances=True)
    left = 0

    def on_output(n: str, y: Tensor) -> None:
        nonlocal left
        acc.add(n, y, info.act_axis)
        left -= 1
        if left == 0:
            raise _Reached

    for batch, expected in zip(batches, calls, strict=True):
        if expected == 0:
            continue
        left = expected
        with contextlib.suppress(_Reached):  # the layer's last expected call was observed: stop the batch
            watch_layers(model, forward, [batch], {name: info}, on_output=on_output)
    return acc.moments().get(name)


def correct_outputs(qmodel: nn.Module, fp_model: nn.Module, forward: Callable[[nn.Module, Any], Any],
                    batches: Sequence[Any], mode: str = "static") -> dict[str, Tensor]:
    """Set every quantized layer's ``out_correction`` of ``qmodel`` so its output channel means match
    ``fp_model``'s on ``batches`` (``mode="static"``), match their standard deviations too (``mode="affine"``,
    which sets ``out_scale`` as well), or so each layer's own quantization adds no mean shift
    (``mode="local"``, see :func:`local_gaps`), one layer at a time in execution order (see the module
    docstring); returns the corrections by layer name."""
    qlayers = quant_layers(qmodel)
    layers = {n: q.info for n, q in qlayers.items()}
    target = output_moments(fp_model, forward, batches, layers) if mode != "local" else {}
    calls = layer_calls(qmodel, forward, batches)
    order = list(calls)
    log.info("activation correction (%s): %d layers, one calibration pass each", mode, len(order))
    for name in track(order, desc="activation correction", unit="layer"):
        q = qlayers[name]
        dev = q.module.weight.device
        if mode == "local":
            gap = local_gaps(qmodel, forward, batches, [name]).get(name)
            gain = None
            shift = None if gap is None else gap.double()
        else:
            current = _layer_moments(qmodel, forward, batches, name, layers[name], calls[name])
            if current is None or name not in target:
                continue
            (mean_fp, var_fp), (mean_q, var_q) = target[name], current
            gain = std_gain(var_fp, var_q) if mode == "affine" else None
            shift = mean_fp - (mean_q if gain is None else gain * mean_q)
        if shift is None:
            continue
        # compose with what the layer already does: a * (s * y + c) + b
        if gain is not None:
            gain = gain.float().to(dev)
            q.out_scale = gain if q.out_scale is None else gain * q.out_scale
            if q.out_correction is not None:
                q.out_correction = gain * q.out_correction
        shift = shift.float().to(dev)
        q.out_correction = shift if q.out_correction is None else q.out_correction + shift
    corrected = {n: q.out_correction for n, q in qlayers.items() if q.out_correction is not None}
    missing = sorted(set(layers) - set(corrected))
    if missing:
        log.warning("no calibration data reached %d layer(s); they get no activation correction: %s", len(missing),
                    ", ".join(missing[:5]))
    return corrected


class StaticCorrection(OutputCorrection):
    """``-o act_correction=static``: each quantized layer's output channels get FP's mean (a constant)."""

    name = "static"
    description = "output correction: per-channel constant giving FP's channel mean on calibration data"
    summary = "a per-output-channel constant from the calibration data"

    def correct(self, qmodel: nn.Module, fp_model: nn.Module, ctx: RunContext) -> None:
        correct_outputs(qmodel, fp_model, ctx.task.forward, list(ctx.calibration_batches()), mode=self.name)


class AffineCorrection(StaticCorrection):
    """``-o act_correction=affine``: each quantized layer's output channels get FP's mean and std."""

    name = "affine"
    description = "output correction: per-channel gain and shift giving FP's channel mean and std (folds into scale)"
    summary = "a per-output-channel gain and constant from the calibration data"


class LocalCorrection(StaticCorrection):
    """``-o act_correction=local``: removes only the mean shift each layer's own quantization adds."""

    name = "local"
    description = "output correction: per-channel constant removing the shift each layer's own quantization adds"
    summary = "a per-output-channel constant from the calibration data"
