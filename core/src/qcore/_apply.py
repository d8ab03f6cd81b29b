"""Apply a :class:`~qcore._spec.Plan` to a model: every planned layer is replaced through ``qcore_wrap_module``."""

from __future__ import annotations

import copy

import torch
from torch import nn

from qcore._components import RunContext
from qcore._errors import QcoreError
from qcore._fake_quant import UniformFakeQuant
from qcore._layers import LayerInfo
from qcore._spec import LayerSpec, Plan
from qcore._wrap import QuantLayer, quant_layers, replace_module


def apply_plan(model: nn.Module, plan: Plan, ctx: RunContext, inplace: bool = False) -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) with the plan's layers wrapped by fake quantizers.

    Quantizers come uncalibrated: run a calibrator before evaluating.
    """
    unknown = sorted(set(plan.layers) - set(ctx.layers))
    if unknown:
        raise QcoreError(f"the plan names layer(s) this model does not have as quantizable: {', '.join(unknown[:5])}; "
                         "was it written for another model?")
    for name, spec in plan.layers.items():
        for t in (spec.weight, spec.act):
            if t is not None and t.quantizer != ctx.quantizer.name:
                raise QcoreError(f"the plan quantizes layer {name!r} with quantizer {t.quantizer!r} but this run uses "
                                 f"{ctx.quantizer.name!r}; run with --quantizer {t.quantizer}")
    for name, spec in plan.layers.items():
        _check_axes(model.get_submodule(name), name, spec, ctx.layers[name])
    qmodel = model if inplace else copy.deepcopy(model)
    for name, spec in plan.layers.items():
        module = qmodel.get_submodule(name)
        wrapped = ctx.hooks.qcore_wrap_module(module=module, info=ctx.layers[name], spec=spec, ctx=ctx)
        if wrapped is None:
            raise QcoreError(f"no plugin can wrap layer {name!r} of type {type(module).__name__}")
        if isinstance(wrapped, QuantLayer):
            _set_bias_mode(wrapped, name, getattr(ctx.pipeline, "bias", "float"))
        param = next(module.parameters(), None)
        if param is not None:  # new quantizer state lives where the layer does
            wrapped = wrapped.to(param.device)
        replace_module(qmodel, name, wrapped)
    return qmodel


def _set_bias_mode(layer: QuantLayer, name: str, mode: str) -> None:
    """Give ``layer`` the pipeline's bias mode; ``int32`` needs quantizers with a uniform integer grid."""
    if mode == "int32":
        for role, q in (("weight", layer.weight_quantizer), ("act", layer.act_quantizer)):
            if q is not None and not isinstance(q, UniformFakeQuant):
                raise QcoreError(f"-o bias=int32 needs a uniform integer grid, but layer {name!r} quantizes its {role} "
                                 f"with {type(q).__name__}; use --quantizer uniform or -o bias=float")
    layer.bias_mode = mode


def _check_axes(module: nn.Module, name: str, spec: LayerSpec, info: LayerInfo) -> None:
    """A spec's ``axis`` must be the layer's own channel axis (the quantizers keep one scale per channel of it)."""
    weight = getattr(module, "weight", None)
    if spec.weight is not None and spec.weight.axis is not None and isinstance(weight, torch.Tensor):
        ndim = weight.ndim
        if not -ndim <= spec.weight.axis < ndim or spec.weight.axis % ndim != info.weight_axis % ndim:
            raise QcoreError(f"the plan gives layer {name!r} weight axis {spec.weight.axis}, but its {ndim}-D weight "
                             f"has its channels on axis {info.weight_axis}; remove 'axis' (or set it to "
                             f"{info.weight_axis})")
    if spec.act is not None and spec.act.axis is not None and spec.act.axis != info.act_axis:
        raise QcoreError(f"the plan gives layer {name!r} activation axis {spec.act.axis}, but its input has its "
                         f"channels on axis {info.act_axis}; remove 'axis' (or set it to {info.act_axis})")


def freeze(model: nn.Module) -> None:
    """Cache every quantized weight (call after calibration, before evaluation)."""
    for layer in quant_layers(model).values():
        layer.freeze()


def check_finite(model: nn.Module) -> None:
    """Refuse a model whose parameters hold NaN or infinity."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise QcoreError(f"model parameter {name!r} contains NaN or infinity; the weights file is corrupt or "
                             "the model diverged: re-export or retrain it")


__all__ = ["QuantLayer", "apply_plan", "check_finite", "freeze"]
