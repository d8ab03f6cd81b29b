"""What the activation-bit search (``-o act_bits=search``) measures per layer input.

:func:`input_errors` puts a layer's activation (input) quantization error and its weight quantization error in
the same units: the squared error each causes in the layer's own output on one calibration batch, the other
operand in floating point. The allocator divides the activation errors by the weight error at the fewest weight
bits, so an activation term is priced in the units of the layer's weight term (see the README).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

import qcore
from qcore_ompq.orthogonality import layer_features
from qcore_ompq.sensitivity import quantized_weight, range_calibrator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputErrors:
    """``act[i, a]``: summed squared output error of layer i with its input at ``a_choices[a]`` bits (weights FP);
    ``ref[i]``: the same with its weights at ``ref_bits`` (input FP). Both over the same ``samples``."""

    names: list[str]
    a_choices: list[int]
    act: np.ndarray
    ref: np.ndarray
    ref_bits: int
    samples: int

    def ratio(self) -> np.ndarray:
        """``act / ref`` per layer and activation choice (``ref`` floored at the smallest positive float)."""
        return self.act / np.maximum(self.ref, np.finfo(np.float64).tiny)[:, None]


def _layer_call(module: nn.Module, x: Tensor, weight: Tensor | None = None) -> Tensor:
    if weight is None:
        return module(x)
    return functional_call(module, {"weight": weight}, (x,))


def act_quantized(ctx: qcore.RunContext, name: str, x: Tensor, bits: int, generator: torch.Generator) -> Tensor:
    """``x`` (layer ``name``'s input) through a fresh activation quantizer of the run's format at ``bits``, its
    range from the run's activation estimator (:func:`qcore_ompq.range_calibrator`) on a sample of at most the
    calibrator's ``act_samples`` values per row (as core's observers sample), nearest rounding."""
    spec = qcore.layer_spec(ctx.pipeline, None, int(bits), ctx.quantizer.name).act
    if spec is None:
        raise qcore.QcoreError("-o act_bits=search needs quantized layer inputs; the pipeline quantizes none "
                               "(act_targets=none): drop -o act_bits=search")
    q = ctx.quantizer.make(spec, "act", ctx.layers[name])
    if not isinstance(q, qcore.FakeQuantizer):
        raise qcore.QcoreError(f"-o act_bits=search measures input errors through the FakeQuantizer protocol; "
                               f"quantizer {ctx.quantizer.name!r} made a {type(q).__name__}")
    cal = range_calibrator(ctx)
    keep = int(getattr(cal.options, "act_samples", 65536))
    with torch.no_grad():
        rows = q.rows_of(x)
        if rows.shape[1] > keep:
            idx = torch.randperm(rows.shape[1], generator=generator)[:keep].to(rows.device)
            rows = rows[:, idx]
        qcore.calibrate_rows(q, rows, cal.act_estimator())
        return q(x)


def input_errors(ctx: qcore.RunContext, names: Sequence[str], a_choices: Sequence[int], ref_bits: int,
                 batch: Any, samples: int | None = None, inputs: Mapping[str, Tensor] | None = None) -> InputErrors:
    """Each layer's output error from quantizing its input at each of ``a_choices`` and from quantizing its
    weight at ``ref_bits`` (the run's quantizer, weight and activation range estimators, nearest rounding), on
    ``batch`` through the FP model (eval mode), first ``samples`` samples. ``inputs`` (each layer's input as it
    saw it: :func:`qcore_ompq.layer_features` with ``inputs=True, flatten=False``) skips that forward pass. Torch
    ``Linear``/``ConvNd`` layers only (their weight is swapped by ``torch.func.functional_call``)."""
    model = ctx.model
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            raise qcore.QcoreError(f"-o act_bits=search is implemented for torch Linear/Conv layers; {n} is a "
                                   f"{type(m).__name__}: drop -o act_bits=search")
    if inputs is None:
        inputs = layer_features(model, names, batch, ctx.task.forward, layers=ctx.layers, samples=samples,
                                inputs=True, flatten=False)
    missing = [n for n in names if n not in inputs]
    if missing:
        raise qcore.QcoreError(f"ompq: layer(s) {', '.join(missing[:3])} saw no input on the calibration batch; "
                               "the activation search needs every free layer to run in the forward pass")
    gen = torch.Generator().manual_seed(int(ctx.config.seed))
    act = np.zeros((len(names), len(a_choices)))
    ref = np.zeros(len(names))
    with torch.no_grad():
        for i, n in enumerate(qcore.track(list(names), desc="ompq input errors", unit="layer")):
            module = model.get_submodule(n)
            x = inputs[n]
            y = _layer_call(module, x)
            ref[i] = float((_layer_call(module, x, quantized_weight(ctx, n, ref_bits)) - y).double().pow(2).sum())
            for k, a in enumerate(a_choices):
                act[i, k] = float((_layer_call(module, act_quantized(ctx, n, x, a, gen)) - y).double().pow(2).sum())
    n_samples = int(next(iter(inputs.values())).shape[0]) if inputs else 0
    log.debug("ompq: input errors of %d layers on %d samples", len(names), n_samples)
    return InputErrors(list(names), [int(a) for a in a_choices], act, ref, int(ref_bits), n_samples)
