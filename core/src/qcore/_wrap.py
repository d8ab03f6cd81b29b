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
from qcore._errors import QcoreError
from qcore._fake_quant import UniformFakeQuant
from qcore._layers import LayerInfo
from qcore._spec import LayerSpec


class QuantLayer(nn.Module):
    """A layer with fake-quantized weight and (optionally) fake-quantized input.

    The quantized weight is computed once and cached while the model is frozen (:meth:`freeze`), so
    evaluation pays for weight quantization once; calibrators that change weight ranges call
    :meth:`unfreeze` or simply run before freezing.

    :attr:`bias_mode` (``-o bias``, set by ``apply_plan``) says how the layer's bias is simulated: ``"float"`` as
    in the FP model, or ``"int32"``: rounded to int32 codes at the scale ``s_x * s_w`` (input scale times each
    output channel's weight scale), as integer runtimes (onnxruntime's QDQ kernels) store it; see
    :meth:`int32_bias`.
    """

    #: ``"float"`` or ``"int32"``; an instance attribute once ``apply_plan`` sets it from the pipeline options
    bias_mode: str = "float"
    #: the float weight's shape while the layer holds packed codes instead (:meth:`hold_packed`), else None
    packed_shape: tuple[int, ...] | None = None
    #: the weight axis of the packed rows (the weight quantizer's channel axis)
    packed_axis: int = 0

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
        #: input equalization (:meth:`equalize`): per input channel, the factor the input is multiplied by before
        #: its quantizer (``1 / s``, the weight's input columns hold ``W * s``); None when not equalized
        self.register_buffer("input_scale", None)
        #: :meth:`int32_bias`'s last result and what it was computed from (see :meth:`_int32_inputs`)
        self._qbias: tuple[tuple[Any, ...], tuple[Tensor, Tensor] | None] | None = None
        self.register_load_state_dict_post_hook(_refreeze_after_load)

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight (the float weight when weights are not quantized)."""
        if self._wq is not None:
            return self._wq
        if self.packed_shape is not None:
            return self._decoded_weight()
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
            self._qbias = None
            if self.packed_shape is None:  # a packed layer decodes at each call: caching would hold a float copy
                self._wq = self.quantized_weight().detach()

    def unfreeze(self) -> None:
        """Drop the cached quantized weight (and int32 bias): the next forward quantizes again."""
        self._wq = None
        self._qbias = None

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, pickle) starts without the cached int32 bias: the cache's key holds the
        version counters of this layer's tensors, which a copy's tensors do not continue (they count anew)."""
        return {**super().__getstate__(), "_qbias": None}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        """Load as torch does, after creating the optional buffers (registered as None until equalization or an
        output correction sets them: ``input_scale``, ``out_correction``, ``out_scale``) that ``state_dict``
        holds, so a fresh layer takes them instead of refusing (or, non-strict, silently dropping) them. A frozen
        layer drops its cached weight here and quantizes it again once its children are loaded too."""
        device = next((t.device for t in (*self._buffers.values(), *self.module.parameters()) if t is not None),
                      None)
        sizes = {"input_scale": self.info.in_channels, "out_correction": self.info.out_channels,
                 "out_scale": self.info.out_channels}
        for name, value in self._buffers.items():
            key = prefix + name
            given = state_dict.get(key)
            if value is None and name not in self._non_persistent_buffers_set and isinstance(given, Tensor):
                if name in sizes and tuple(given.shape) != (sizes[name],):  # one value per channel, as torch checks
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(given.shape)} "
                                      f"from checkpoint, the shape in current model is ({sizes[name]},).")
                    continue
                self._buffers[name] = torch.empty_like(given, device=device)
        self._refreeze = self._wq is not None
        self.unfreeze()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def hold_packed(self, codes: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, bits: Tensor,
                    prune_value: Tensor, axis: int) -> None:
        """Drop the module's float weight and hold it as packed codes (:mod:`qcore.packing`, rows along weight
        ``axis``) with per-row ``scale``, ``zero_point``, ``qmin``, ``bits``, ``prune_value`` (``[C]`` buffers);
        the forward decodes the fake-quantized weight from them (a Linear on 2-D/3-D float32 input multiplies
        through :func:`qcore.packing.dequant_matmul`). For inference: nothing trains, saves or recalibrates the
        float weight afterwards. Used by :func:`qcore.packing.pack_layers`."""
        self.packed_shape = tuple(self.module.weight.shape)
        self.packed_axis = axis
        self.register_buffer("packed_codes", codes)
        for name, t in (("scale", scale), ("zero_point", zero_point), ("qmin", qmin), ("bits", bits),
                        ("prune_value", prune_value)):
            self.register_buffer(f"packed_{name}", t.float().reshape(-1).contiguous())
        self.module.weight = None  # the parameter stays registered, as None (torch's way of "no weight")
        self._wq = None

    def _packed_rows(self) -> tuple[Tensor, ...]:
        return (self.packed_codes, self.packed_bits, self.packed_scale, self.packed_zero_point, self.packed_qmin,
                self.packed_prune_value)

    def _decoded_weight(self) -> Tensor:
        assert self.packed_shape is not None
        from qcore import packing

        codes, bits, scale, zero, qmin, prune = self._packed_rows()
        return packing.unpack_weight(codes, self.packed_shape, self.packed_axis, scale, zero, qmin, bits, prune)

    def _packed_linear(self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this call multiplies through :func:`qcore.packing.dequant_matmul`."""
        return (self.packed_shape is not None and type(self.module) is nn.Linear and self.packed_axis == 0
                and isinstance(x, Tensor) and x.dim() in (2, 3) and x.dtype == torch.float32
                and not args and not kwargs)

    def _call(self, params: dict[str, Tensor], x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if "weight" in params:
            return torch.func.functional_call(self.module, params, (x, *args), kwargs, strict=False)
        from qcore import packing

        codes, bits, scale, zero, qmin, prune = self._packed_rows()
        out = packing.dequant_matmul(x, codes, bits, scale, zero, qmin, prune, self.packed_shape[1])  # type: ignore[index]
        bias = params.get("bias", self.module.bias)
        return out if bias is None else out + bias

    def equalize(self, s: Tensor) -> None:
        """Migrate per-input-channel scales ``s`` from the input into the weight, exactly in floating point: the
        weight's input columns (axis 1: Linear, Conv with ``groups=1``) are multiplied by ``s`` and the input by
        ``1 / s`` (:attr:`input_scale`, applied in :meth:`forward` before the activation quantizer). Repeated calls
        compose. Call before calibration (quantizer ranges are not touched; a frozen weight is dropped)."""
        w = self.module.weight
        if self.packed_shape is not None or not isinstance(w, Tensor) or w.dim() < 2 or w.shape[1] != s.numel():
            raise QcoreError(f"cannot equalize a {type(self.module).__name__} with weight "
                             f"{None if not isinstance(w, Tensor) else tuple(w.shape)} by {s.numel()} input scales")
        with torch.no_grad():
            s = s.detach().to(device=w.device, dtype=torch.float32).reshape(-1)
            shape = [1] * w.dim()
            shape[1] = -1
            w.mul_(s.reshape(shape).to(w.dtype))
            inv = 1.0 / s
            self.input_scale = inv if self.input_scale is None else self.input_scale * inv
        self._wq = None

    def _scaled_input(self, x: Any) -> Any:
        """``x`` times :attr:`input_scale` along the input's channel axis (``x`` itself when not equalized)."""
        if self.input_scale is None or not isinstance(x, Tensor):
            return x
        shape = [1] * x.dim()
        shape[self.info.act_axis] = -1
        return x * self.input_scale.to(x.dtype).reshape(shape)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        x = self._scaled_input(x)
        if self.act_quantizer is not None:
            q = self.info.quantize_input
            x = q(x, self.act_quantizer) if q is not None else self.act_quantizer(x)
        params = {} if self._packed_linear(x, args, kwargs) else {"weight": self.quantized_weight()}
        qbias = self.int32_bias()
        if qbias is not None:  # the whole bias (corrections folded in) is added on its int32 grid
            codes, scale = qbias
            if getattr(self.module, "bias", None) is not None:
                params["bias"] = torch.zeros_like(self.module.bias)
            out = self._call(params, x, args, kwargs)
            return output_correction(out, self.out_scale, codes * scale, self.info.act_axis)
        out = self._call(params, x, args, kwargs)
        if self.out_correction is not None or self.out_scale is not None:
            out = self.info.output_tensor(out, self._add_correction)
        return out

    def int32_bias(self) -> tuple[Tensor, Tensor] | None:
        """With :attr:`bias_mode` ``"int32"``: the layer's bias as an integer runtime holds it, ``(codes, scale)``
        per output channel, so that the layer adds ``codes * scale``.

        The bias is the folded one, ``bias * out_scale + out_correction`` (output corrections fold into weight
        scale and bias, as at export), and ``scale = s_x * s_w * out_scale`` (``s_x`` the input's per-tensor scale,
        ``s_w`` the output channel's weight scale, both from :meth:`UniformFakeQuant.qparams`): the grid of the
        int32 accumulator of an integer convolution or matmul. ``codes`` are ``round(bias / scale)`` clamped to
        int32 (float tensors holding integers; 0 where the scale is 0). None where a runtime keeps a float
        bias, and the layer then runs as in ``"float"`` mode: ``bias_mode`` ``"float"``; not a torch
        Conv1d/2d/3d or Linear with output channels on weight axis 0; weight or input not quantized on a uniform
        grid; per-channel input scales; quantizers not calibrated yet or observing; no bias and no correction.

        The result is cached (so a forward does not compute it again) and computed anew once anything it reads
        changes: the bias, ``out_scale``/``out_correction``, a quantizer's parameters or buffers (in place or
        replaced), its calibration or observing state, :attr:`bias_mode`; :meth:`freeze`/:meth:`unfreeze` drop it.
        An in-place write through ``.data`` (``bias.data.add_(...)``) or a fused optimizer step
        (``torch.optim.Adam(..., fused=True)``) bypasses the version counters the cache follows: call
        :meth:`unfreeze` after one. A copy (``copy.deepcopy``, pickle) starts without the cache.
        """
        if self.bias_mode != "int32":
            return None
        key = self._int32_inputs()
        if key is not None and self._qbias is not None and _same_inputs(self._qbias[0], key):
            return self._qbias[1]
        qbias = self._compute_int32_bias()
        self._qbias = None if key is None else (key, qbias)
        return qbias

    def _int32_inputs(self) -> tuple[Any, ...] | None:
        """What :meth:`int32_bias` depends on: the mode, the quantizers' state and, for every tensor it reads
        (bias, output corrections, each quantizer's parameters and buffers), the tensor itself and its version
        counter, so an in-place change or a new tensor invalidates the cached result. None (do not cache) when a
        version counter cannot be read (inference-mode tensors)."""
        wq, aq = self.weight_quantizer, self.act_quantizer
        tensors = [getattr(self.module, "bias", None), self.out_scale, self.out_correction]
        for q in (wq, aq):
            if isinstance(q, nn.Module):
                tensors += [*q.parameters(), *q.buffers()]
        try:
            # device, dtype and shape too: assigning ``.data`` (``module.to`` on parameters) keeps tensor and version
            # and the storage: assigning ``.data`` a tensor of the same device, dtype and shape keeps the version
            versions = tuple((t, t._version, t.device, t.dtype, tuple(t.shape), t.data_ptr()) if t is not None
                             else None for t in tensors)
        except RuntimeError:
            return None
        flags = tuple((q, getattr(q, "calibrated", None), getattr(q, "observer", None) is None) for q in (wq, aq))
        return (self.bias_mode, self.module, self.packed_shape, self.info.weight_axis, flags, versions)

    def _compute_int32_bias(self) -> tuple[Tensor, Tensor] | None:
        """:meth:`int32_bias`, computed (no cache)."""
        m, wq, aq = self.module, self.weight_quantizer, self.act_quantizer
        if self.bias_mode != "int32" or not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) \
                or self.info.weight_axis != 0 or not isinstance(wq, UniformFakeQuant) \
                or not isinstance(aq, UniformFakeQuant):
            return None
        if not (wq.calibrated and aq.calibrated) or aq.observer is not None or wq.observer is not None:
            return None
        bias = m.bias
        if bias is None and self.out_correction is None:
            return None
        with torch.no_grad():
            s_x = aq.qparams()[0].float()
            if s_x.numel() != 1:
                return None
            n = m.weight.shape[0] if self.packed_shape is None else self.packed_shape[0]
            s_w = wq.qparams()[0].float().expand(n)
            folded = bias.detach().float() if bias is not None else torch.zeros(n, device=s_w.device)
            if self.out_scale is not None:  # the folded weight scale, as the export writes it
                s_w = s_w * self.out_scale.float()
                folded = folded * self.out_scale.float()
            scale = s_x.reshape(()) * s_w
            if self.out_correction is not None:
                folded = folded + self.out_correction.float()
            safe = torch.where(scale == 0, torch.ones_like(scale), scale)
            codes = torch.clamp(torch.round(folded / safe), -2.0 ** 31, 2.0 ** 31 - 128)  # largest float32 below 2^31
            codes = torch.where(scale == 0, torch.zeros_like(codes), codes)
        return codes, scale

    def _add_correction(self, y: Tensor) -> Tensor:
        return output_correction(y, self.out_scale, self.out_correction, self.info.act_axis)


def _same_inputs(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two :meth:`QuantLayer._int32_inputs` keys are equal, objects by identity (tensors are not
    compared by value: their version counters say whether they changed)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tuple) and isinstance(y, tuple):
            if not _same_inputs(x, y):
                return False
        elif isinstance(x, (Tensor, nn.Module)) or isinstance(y, (Tensor, nn.Module)):
            if x is not y:
                return False
        elif x != y:
            return False
    return True


def _refreeze_after_load(layer: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post hook of :class:`QuantLayer`: a layer that was frozen before loading caches its
    quantized weight again, from the loaded values."""
    if getattr(layer, "_refreeze", False):
        layer._refreeze = False
        layer.freeze()


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
