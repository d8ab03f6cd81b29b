"""Input equalization (SmoothQuant-style scale migration) for layers whose per-tensor input grid is wasted on a
few large channels.

A layer ``y = W x`` (a Linear, or a Conv1d/Conv2d with ``groups=1``) is rewritten, exactly in floating point, as
``y = (W diag(s)) (x / s)``: each input channel ``c`` of the activation is divided by ``s_c`` and the matching
weight column (weight axis 1) multiplied by it. The activation quantizer then sees ``x / s`` (still one scale per
tensor: deployable), the weight quantizer sees ``W diag(s)`` (still one scale per output channel). With

    s_c = max|x_c| ** alpha / max|W_{:,c}| ** (1 - alpha)

(``max|x_c|`` over the calibration set, the FP model's input to the layer), channels whose activation range is
large are shrunk and their weight columns grown, so a 16-level per-tensor input grid covers the many small
channels with more than one or two levels (the ViT's GELU outputs: BENCHMARKS.md "Where the ViT loses").

At run time the ``1 / s`` is a per-channel float multiply of the layer's input before its QuantizeLinear
(:attr:`QuantLayer.input_scale`; the ONNX export writes it as a ``Mul``): after a GELU one multiply per element,
fusable with the GELU; after a LayerNorm it can be folded into the norm's affine weight and bias (free at run
time). The weight is stored and quantized as ``W diag(s)``; nothing else changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qcore._calibration import input_rows
from qcore._errors import QcoreError
from qcore._layers import run_hooked, watch_layers
from qcore._wrap import QuantLayer, quant_layers

log = logging.getLogger(__name__)

#: ``-o equalize`` values: which layers' inputs are equalized
MODES = ("off", "gelu", "all")


def equalizable(layer: QuantLayer) -> str | None:
    """Why ``layer``'s input cannot be equalized, or None when it can: a torch Linear or a Conv1d/Conv2d with
    ``groups=1`` (weight input channels on axis 1), a dense input, and a per-tensor activation quantizer."""
    m = layer.module
    if type(m) is not nn.Linear and not (type(m) in (nn.Conv1d, nn.Conv2d) and m.groups == 1):
        return f"a {type(m).__name__}{' with groups > 1' if hasattr(m, 'groups') else ''} (only Linear and " \
               "Conv1d/Conv2d with groups=1 have one weight column per input channel)"
    if layer.info.quantize_input is not None:
        return "its input is not a dense tensor"
    if layer.packed_shape is not None:
        return "it holds packed weight codes"
    if layer.act_quantizer is None:
        return "its input is not quantized"
    act_spec = getattr(layer.spec, "act", None)
    if getattr(act_spec, "granularity", "tensor") != "tensor" or \
            getattr(getattr(layer.act_quantizer, "spec", None), "granularity", "tensor") != "tensor":
        return "its input is quantized per channel already"
    return None


def gelu_fed_layers(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batch: Any,
                    names: Sequence[str]) -> list[str]:
    """The layers among ``names`` (modules of ``model``) whose input is the output of an ``nn.GELU`` module, found
    on one forward of ``batch``: same storage and shape (so a Dropout/Identity in eval mode between them is
    seen through; a functional ``F.gelu`` is not a module and is not seen)."""
    made: set[tuple[int, tuple[int, ...]]] = set()
    alive: list[Tensor] = []  # held for the pass, so a freed GELU output's storage cannot be reused by another tensor
    fed: set[str] = set()

    def on_gelu(_m: nn.Module, _a: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            alive.append(out)
            made.add((out.untyped_storage().data_ptr(), tuple(out.shape)))

    def on_layer(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, Tensor) and (x.untyped_storage().data_ptr(), tuple(x.shape)) in made:
                fed.add(name)
        return hook

    handles = [m.register_forward_hook(on_gelu) for m in model.modules() if isinstance(m, nn.GELU)]
    handles += [model.get_submodule(n).register_forward_pre_hook(on_layer(n)) for n in names]
    with torch.no_grad():
        run_hooked(model, forward, [batch], handles)
    return [n for n in names if n in fed]


def input_absmax(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Iterable[Any],
                 layers: dict[str, Any]) -> dict[str, Tensor]:
    """Per input channel, the largest ``|x|`` each named layer of ``model`` (``{name: LayerInfo}``) sees over
    ``batches`` (channels on the info's ``act_axis``)."""
    out: dict[str, Tensor] = {}

    def seen(name: str, x: Tensor) -> None:
        m = input_rows(x.detach().float(), layers[name], per_channel=True).abs().amax(dim=1).cpu()
        out[name] = m if name not in out else torch.maximum(out[name], m)

    with torch.no_grad():
        watch_layers(model, forward, batches, layers, on_input=seen)
    return out


def equalization_scales(act_absmax: Tensor, weight: Tensor, alpha: float = 0.5) -> Tensor:
    """``s_c = max|x_c| ** alpha / max|W_{:,c}| ** (1 - alpha)`` per input channel ``c`` (weight axis 1); 1 where
    either maximum is 0 or the result is not finite (a dead channel keeps its column)."""
    if not 0.0 <= alpha <= 1.0:
        raise QcoreError(f"equalize_alpha={alpha} is out of range; use 0..1 (0.5 balances activation and weight)")
    w = weight.detach().float().abs().movedim(1, 0).reshape(weight.shape[1], -1).amax(dim=1).cpu()
    a = act_absmax.detach().float().cpu()
    if a.numel() != w.numel():
        raise QcoreError(f"the input has {a.numel()} channels but the weight {w.numel()} input columns; "
                         "equalization needs one weight column per input channel")
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s))


def equalize_inputs(qmodel: nn.Module, fp_model: nn.Module, forward: Callable[[nn.Module, Any], Any],
                    batches: Iterable[Any], layers: str | Sequence[str] = "gelu",
                    alpha: float = 0.5) -> dict[str, Tensor]:
    """Equalize the inputs of ``qmodel``'s quantized layers (call after ``apply_plan``, before calibration).

    :param qmodel: the wrapped model; each chosen :class:`QuantLayer` gets its weight columns multiplied by ``s``
        and ``1 / s`` in :attr:`QuantLayer.input_scale` (:meth:`QuantLayer.equalize`); FP outputs are unchanged.
    :param fp_model: the FP model ``qmodel`` was made from (same layer names), whose inputs give ``max|x_c|``.
    :param forward: ``forward(model, batch)`` (the task's).
    :param batches: calibration batches (iterated twice for ``"gelu"``: once to find the layers, once for the
        statistics).
    :param layers: ``"gelu"`` (layers whose input is an ``nn.GELU`` output: the MLP's second Linear of a
        transformer), ``"all"`` (every layer :func:`equalizable` accepts) or a list of layer names (each must be
        equalizable, else :class:`QcoreError`).
    :param alpha: the migration strength (see :func:`equalization_scales`).
    :returns: the scales ``s`` by layer name (empty when no layer qualifies).
    """
    wrapped = quant_layers(qmodel)
    batches = list(batches)
    if isinstance(layers, str):
        if layers not in ("gelu", "all"):
            raise QcoreError(f"equalize={layers!r} is not known; use one of {', '.join(MODES)}")
        names = [n for n, layer in wrapped.items() if equalizable(layer) is None]
        if layers == "gelu":  # no nn.GELU module: nothing to look for (and no forward pass spent on it)
            has_gelu = any(isinstance(m, nn.GELU) for m in fp_model.modules())
            names = gelu_fed_layers(fp_model, forward, batches[0], names) if names and batches and has_gelu else []
    else:
        names = list(layers)
        for n in names:
            if n not in wrapped:
                raise QcoreError(f"cannot equalize layer {n!r}: it is not a quantized layer of this model; name "
                                 "layers of the plan")
            why = equalizable(wrapped[n])
            if why is not None:
                raise QcoreError(f"cannot equalize layer {n!r}: {why}; leave it out of the equalized layers")
    if not names:
        log.info("equalize: no layer qualifies; nothing changed")
        return {}
    absmax = input_absmax(fp_model, forward, batches, {n: wrapped[n].info for n in names})
    scales: dict[str, Tensor] = {}
    for n in names:
        if n not in absmax:
            if isinstance(layers, str):  # a mode: a layer the calibration data never reaches is left as it is
                log.info("equalize: layer %s is not reached by the calibration data; left unequalized", n)
                continue
            raise QcoreError(f"cannot equalize layer {n!r}: no calibration data reached it; leave it out of the "
                             "equalized layers")
        s = equalization_scales(absmax[n], wrapped[n].module.weight, alpha)
        wrapped[n].equalize(s)
        scales[n] = s
    log.info("equalize: %d layer input(s) equalized (alpha %.2f): %s", len(scales), alpha,
             ", ".join(list(scales)[:6]) + (" ..." if len(scales) > 6 else ""))
    return scales


__all__ = ["MODES", "equalizable", "equalization_scales", "equalize_inputs", "gelu_fed_layers", "input_absmax"]
