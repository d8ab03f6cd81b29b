"""Model surgery: :class:`QuantLayer` wraps a layer with a weight and an input-activation quantizer.

The wrapper is generic: it runs the original module through ``torch.func.functional_call`` with the
quantized weight substituted, so any layer whose forward reads ``self.weight`` works (torch convs and
linears, spconv's sparse convolutions). How the input is quantized comes from the layer's
:class:`~qcore._layers.LayerInfo` (a dense tensor by default; a plugin can quantize only a sparse tensor's
features).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from qcore._components import WeightCorrection
from qcore._layers import LayerInfo
from qcore._spec import LayerSpec


class QuantLayer(nn.Module):
    """A layer with fake-quantized weight and (optionally) fake-quantized input.

    The quantized weight is computed once and cached while the model is frozen (:meth:`freeze`), so
    evaluation pays for weight quantization once; calibrators that change weight ranges call
    :meth:`unfreeze` or simply run before freezing.
    """

    def __init__(self, module: nn.Module, info: LayerInfo, spec: LayerSpec,
                 weight_quantizer: nn.Module | None, act_quantizer: nn.Module | None,
                 weight_correction: WeightCorrection | None = None) -> None:
        super().__init__()
        self.weight_correction = weight_correction
        self.module = module
        self.info = info
        self.spec = spec
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self._wq: Tensor | None = None
        #: static output correction per output channel, added to the output (see
        #: :func:`qcore._act_correction.correct_outputs`); with ``out_scale`` set, the output is first multiplied
        #: by it (the ``affine`` correction). Both fold into the layer's per-channel weight scale and bias.
        self.register_buffer("out_correction", None)
        self.register_buffer("out_scale", None)

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight (the float weight when weights are not quantized)."""
        if self._wq is not None:
            return self._wq
        w = self.module.weight
        if self.weight_quantizer is None:
            return w
        wq = self.weight_quantizer(w)
        if self.weight_correction is None:
            return wq
        return self.weight_correction.correct(w, wq, self.info.weight_axis)

    def freeze(self) -> None:
        """Cache the quantized weight (no gradient) for fast evaluation."""
        with torch.no_grad():
            self._wq = None
            self._wq = self.quantized_weight().detach()

    def unfreeze(self) -> None:
        self._wq = None

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.act_quantizer is not None:
            q = self.info.quantize_input
            x = q(x, self.act_quantizer) if q is not None else self.act_quantizer(x)
        params = {"weight": self.quantized_weight()}
        out = torch.func.functional_call(self.module, params, (x, *args), kwargs, strict=False)
        if self.out_correction is not None or self.out_scale is not None:
            out = self.info.output_tensor(out, self._add_correction)
        return out

    def _add_correction(self, y: Tensor) -> Tensor:
        return output_correction(y, self.out_scale, self.out_correction, self.info.act_axis)


def output_correction(y: Tensor, scale: Tensor | None, shift: Tensor | None, axis: int) -> Tensor:
    """``y * scale + shift`` with per-channel ``scale``/``shift`` (either may be None) along ``axis`` of ``y``."""
    shape = [1] * y.dim()
    shape[axis] = -1
    if scale is not None:
        y = y * scale.to(y.dtype).reshape(shape)
    return y if shift is None else y + shift.to(y.dtype).reshape(shape)


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The :class:`QuantLayer` modules of ``model`` by the name of the layer they replaced."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(layer name, "weight" | "act", quantizer)`` for every quantizer in ``model``."""
    for name, layer in quant_layers(model).items():
        if layer.weight_quantizer is not None:
            yield name, "weight", layer.weight_quantizer
        if layer.act_quantizer is not None:
            yield name, "act", layer.act_quantizer


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
