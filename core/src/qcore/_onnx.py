"""ONNX QDQ export of a quantized model: integer weights, QuantizeLinear/DequantizeLinear activations.

:func:`export_onnx` turns a model that qcore quantized with uniform grids (``UniformFakeQuant`` weights and
activations of at most 8 bits) into an ONNX file that onnxruntime (or any QDQ-aware runtime) runs:

* every quantized layer's **weight** is stored as integers (INT8/UINT8, or INT4/UINT4 where every code fits and
  ``int4`` allows it) with its per-output-channel scale and zero point, read by one ``DequantizeLinear``; a
  per-tensor or per-group weight scale is written per channel (the same values repeated), mixed per-channel
  bit-widths are fine (each channel's codes fit its container);
* every quantized layer's **input** goes through ``QuantizeLinear`` -> ``DequantizeLinear`` with the calibrated
  scale and zero point (per tensor, or per channel when the plan asked for per-channel activations, which is then
  simulation only); grids narrower than 8 bits are held in an 8-bit container behind a ``Clip`` to the grid's
  range, so the values are exactly those of the narrower grid;
* an output correction (``affine``: per-channel scale and shift) folds into the weight's scales and the bias of
  convolutions and linear layers, as qcore's reports say it does.
* an equalized input (``-o equalize``, :attr:`QuantLayer.input_scale`) is a per-channel ``Mul`` before the input's
  ``QuantizeLinear`` (the weight already holds the scaled columns);
* a model quantized with ``-o bias=int32`` gets each such layer's (folded) bias as int32 codes with the scale
  ``s_x * s_w`` read by a ``DequantizeLinear``: the arithmetic qcore simulated, and what onnxruntime's integer
  kernels use as is. A float bias is quantized by onnxruntime on its own where it fuses a layer, which the
  float-bias simulation does not model (ResNet W4A4: 93.35 in onnxruntime vs 93.55 simulated; with int32
  biases 93.58 both: BENCHMARKS.md "ONNX QDQ export").

The exported graph computes what the fake-quantized model computes, up to float rounding order (the test checks
outputs and top-1). Formats without a uniform integer grid, weight corrections that move weights off their grid,
pruned channels with a non-zero value and test-time statistics are refused with a :class:`QcoreError` naming the
layer and what to change. ``onnx`` (and ``onnxscript``, which torch's exporter uses) must be installed; the check
against the PyTorch model needs ``onnxruntime``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcore._errors import MissingDependencyError, QcoreError
from qcore._fake_quant import UniformFakeQuant
from qcore._wrap import QuantLayer, iter_quantizers, output_correction, quant_layers, replace_module
from qcore.ops import _channel_shaped

log = logging.getLogger(__name__)

#: the opset written: 21 is the first with INT4/UINT4 QuantizeLinear/DequantizeLinear
OPSET = 21


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote.

    :param path: the ONNX file.
    :param layers: quantized layers exported with integer weights and QDQ inputs.
    :param int4_weights: the ONNX initializers (weight codes) stored as INT4/UINT4, one per such layer.
    :param int4_inputs: layer inputs quantized as INT4/UINT4 (4-bit grids; without ``int4`` they are held in an
        8-bit type behind a Clip).
    :param per_channel_acts: layers with per-channel input quantization (not deployable on most runtimes).
    :param int32_biases: layers whose bias is written as int32 codes read by a ``DequantizeLinear`` (models
        quantized with ``-o bias=int32``: :meth:`QuantLayer.int32_bias`); other biases stay float, and
        onnxruntime then quantizes them on its own where it fuses a layer into an integer kernel.
    :param max_abs_diff: largest difference between onnxruntime's and PyTorch's outputs on the example input
        (None when not checked).
    """

    path: Path
    layers: list[str] = field(default_factory=list)
    int4_weights: list[str] = field(default_factory=list)
    per_channel_acts: list[str] = field(default_factory=list)
    int4_inputs: int = 0
    int32_biases: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    #: layers whose input is equalized (``-o equalize``): a per-channel ``Mul`` before the input's QuantizeLinear
    equalized_inputs: list[str] = field(default_factory=list)


def _is_uniform(q: nn.Module) -> bool:
    """True when ``q`` quantizes on the uniform grid its :meth:`UniformFakeQuant.qparams` describe: the class's own
    ``quantize``, or a subclass's (a multi-bit format at its selected bits) that gives the same values on a probe
    spanning every row's range and beyond."""
    if not isinstance(q, UniformFakeQuant):
        return False
    if type(q).quantize is UniformFakeQuant.quantize:
        return True
    with torch.no_grad():
        lo, hi = float(q.lo.min()), float(q.hi.max())
        span = max(hi - lo, 1e-6)
        values = torch.linspace(lo - 0.25 * span, hi + 0.25 * span, 4099)
        # every channel (along the quantizer's axis) sees the whole probe, along a last dimension
        x = values.reshape([1] * (q.axis + 1) + [-1]).expand([1] * q.axis + [q.channels, values.numel()])
        mine, ref = q.quantize(x), UniformFakeQuant.quantize(q, x)
    return bool(torch.equal(mine, ref))


def _problems(qmodel: nn.Module) -> list[str]:
    """Why each part of ``qmodel`` cannot be exported (empty when all can)."""
    from qcore._saved import packed_reason

    why = packed_reason(qmodel, "exported")
    out: list[str] = [why] if why is not None else []
    for layer, role, q in iter_quantizers(qmodel):
        if not isinstance(q, UniformFakeQuant):
            out.append(f"{layer}.{role}: {type(q).__name__} is not a uniform integer grid (ONNX QDQ export needs "
                       "qcore's UniformFakeQuant; run with --quantizer uniform)")
            continue
        if role == "act" and not _is_uniform(q):
            out.append(f"{layer}.act: {type(q).__name__} quantizes activations off the uniform grid")
            continue
        bits = q.bits
        if bool((bits > 8).any()) or bool((bits != bits.round()).any()):
            out.append(f"{layer}.{role}: {float(bits.max()):g} bits (ONNX QDQ export supports integer grids of at "
                       "most 8 bits)")
        if role == "act" and bool((bits == 0).any()):
            out.append(f"{layer}.act: pruned input channels are not exportable")
        if role == "weight" and bool((q.prune_value[bits == 0] != 0).any()):
            out.append(f"{layer}.weight: pruned channels keep a non-zero value; export needs -o prune_value=0")
        if not q.calibrated:
            out.append(f"{layer}.{role}: not calibrated")
    for name, layer in quant_layers(qmodel).items():
        if layer.info.quantize_input is not None or layer.info.map_output is not None:
            out.append(f"{name}: {layer.info.kind} layers (sparse tensors) are not exportable to ONNX")
    return out


def _grid(q: UniformFakeQuant) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel ``(scale, zero_point, qmin, qmax)`` of a uniform quantizer (one value when per tensor)."""
    scale, zero, qmin, qmax, _bits = q.qparams()
    return scale.float(), zero.float(), qmin.float(), qmax.float()


def _container(qmin: Tensor, qmax: Tensor) -> torch.dtype:
    """The 8-bit integer type that holds every ``[qmin, qmax]``: uint8 when no code is negative."""
    return torch.uint8 if float(qmin.min()) >= 0 else torch.int8


@torch.library.custom_op("qcore::onnx_qdq", mutates_args=())
def _qdq(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    """QuantizeLinear then DequantizeLinear with ONNX's semantics: the container range is ``zero_point``'s
    integer type (uint8 or int8); ``scale``/``zero_point`` are one value or one per channel along ``axis``."""
    info = torch.iinfo(zero_point.dtype)
    s = _channel_shaped(scale.float(), x.dim(), axis) if scale.dim() else scale.float()
    z = _channel_shaped(zero_point.float(), x.dim(), axis) if zero_point.dim() else zero_point.float()
    return ((torch.clamp(torch.round(x / s) + z, info.min, info.max) - z) * s).to(x.dtype)


@_qdq.register_fake
def _(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return torch.empty_like(x)


def _qdq_onnx(x: Any, scale: Any, zero_point: Any, axis: int) -> Any:
    """``qcore::onnx_qdq`` in ONNX (the exporter's translation for it)."""
    from onnxscript import opset21 as op

    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, axis=axis), scale, zero_point, axis=axis)


class _QDQLayer(nn.Module):
    """A :class:`QuantLayer` written with torch's fake-quantize ops, which the ONNX exporter turns into
    QuantizeLinear/DequantizeLinear; weights are the quantized layer's grid points (folded later into integers)."""

    def __init__(self, name: str, layer: QuantLayer) -> None:
        super().__init__()
        self.module = copy.deepcopy(layer.module)
        self.act_qdq: tuple[Tensor, Tensor, Tensor, Tensor, int, int, int] | None = None
        self.per_channel_act = False
        self.post_scale: Tensor | None = None
        self.post_shift: Tensor | None = None
        self.out_axis = layer.info.act_axis  # output channels lie there, as for QuantLayer's correction
        # input equalization: a per-channel Mul before the input's QuantizeLinear (QuantLayer.input_scale)
        self.register_buffer("input_scale", None if layer.input_scale is None
                             else layer.input_scale.detach().float().clone())
        self.in_axis = layer.info.act_axis
        with torch.no_grad():
            self._weight(name, layer)
            self._input(layer)
            self._int32_bias(layer)

    def _weight(self, name: str, layer: QuantLayer) -> None:
        w = layer.quantized_weight().detach().float()
        q = layer.weight_quantizer
        axis = layer.info.weight_axis
        if q is None:  # a float weight: an output correction stays an explicit scale and shift
            self.module.weight = nn.Parameter(w, requires_grad=False)
            self.post_scale, self.post_shift = layer.out_scale, layer.out_correction
            return
        assert isinstance(q, UniformFakeQuant)
        n = w.shape[axis]
        scale, zero, qmin, qmax = (t.expand(n).clone() if t.numel() == 1 else t for t in _grid(q))
        s, z, lo_q, hi_q, pruned = (_channel_shaped(t, w.dim(), axis) for t in (scale, zero, qmin, qmax, q.bits == 0))
        codes = torch.where(pruned, z, torch.round(w / s) + z)
        off = torch.where(pruned, torch.zeros_like(w), (codes - z) * s - w).abs().amax()
        if float(off) > 1e-5 * float(scale.abs().max()) or bool(((codes < lo_q) | (codes > hi_q)).any()):
            correction = layer.weight_correction.name if layer.weight_correction is not None else "none"
            raise QcoreError(f"{name}: the weight is not on its quantizer's integer grid (weight correction "
                             f"{correction!r}); export needs a grid-preserving correction: -o weight_correction=none")
        if self._foldable(layer):
            if layer.out_scale is not None:
                o = layer.out_scale.float()
                scale = scale * o
                b = self.module.bias
                self._set_bias(b.detach().float() * o if b is not None else torch.zeros_like(o))
            if layer.out_correction is not None:
                b = self.module.bias
                self._set_bias((b.detach().float() if b is not None else 0.0) + layer.out_correction.float())
        else:
            self.post_scale, self.post_shift = layer.out_scale, layer.out_correction
        # the grid points; weight() passes them through Q/DQ, which the export pass folds into integer codes
        self.register_buffer("w_grid", (codes - z) * _channel_shaped(scale, w.dim(), axis))
        self.register_buffer("w_scale", scale.contiguous())
        self.register_buffer("w_zero", zero.round().to(_container(qmin, qmax)).contiguous())
        self.w_axis = axis
        del self.module.weight

    def _foldable(self, layer: QuantLayer) -> bool:
        """An output correction folds into weight scale and bias for torch convolutions and linear layers."""
        m = layer.module
        return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and layer.info.weight_axis == 0

    def _set_bias(self, bias: Tensor) -> None:
        if self.module.bias is not None:
            del self.module.bias
        self.module.register_buffer("bias", bias.detach().clone())

    def _input(self, layer: QuantLayer) -> None:
        q = layer.act_quantizer
        if q is None:
            return
        assert isinstance(q, UniformFakeQuant)
        scale, zero, qmin, qmax = _grid(q)
        info = torch.iinfo(_container(qmin, qmax))
        lo, hi = info.min, info.max
        self.per_channel_act = scale.numel() > 1
        self.register_buffer("a_scale", scale.reshape(-1) if self.per_channel_act else scale.reshape(()))
        self.register_buffer("a_zero", zero.round().to(_container(qmin, qmax)).reshape(self.a_scale.shape))
        clip = bool((qmin > lo).any() or (qmax < hi).any())
        self.register_buffer("a_lo", ((qmin - zero) * scale).reshape(self.a_scale.shape))
        self.register_buffer("a_hi", ((qmax - zero) * scale).reshape(self.a_scale.shape))
        self.a_clip, self.a_axis = clip, layer.info.act_axis
        # per tensor: the clip bounds as Python numbers, so the graph gets one Clip with constant bounds (the
        # exporter's optimiser merged Max/Min on tensors into a Clip whose bound it left undefined)
        self.a_bounds = None if self.per_channel_act else (float(self.a_lo), float(self.a_hi))

    def _int32_bias(self, layer: QuantLayer) -> None:
        """With ``-o bias=int32``: the folded bias as int32 grid points (Q/DQ in the graph, folded into int32
        codes later), scale ``s_x * s_w * out_scale`` -- exactly :meth:`QuantLayer.int32_bias`."""
        qbias = layer.int32_bias()
        self.int32_bias = qbias is not None
        if qbias is None:
            return
        codes, scale = qbias
        self._set_bias(torch.zeros_like(scale))  # replaced in forward; a buffer, so functional_call can swap it
        self.register_buffer("b_grid", (codes * scale).float().contiguous())
        self.register_buffer("b_scale", scale.float().contiguous())
        self.register_buffer("b_zero", torch.zeros(scale.shape, dtype=torch.int32))

    def weight(self) -> Tensor:
        """The weight as Q/DQ of its grid points (exact: every point is on the grid)."""
        return _qdq(self.w_grid, self.w_scale, self.w_zero, self.w_axis)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.input_scale is not None:
            x = x * _channel_shaped(self.input_scale, x.dim(), self.in_axis)
        if hasattr(self, "a_scale"):
            if self.a_clip and self.a_bounds is not None:
                x = torch.clamp(x, self.a_bounds[0], self.a_bounds[1])
            elif self.a_clip:
                lo, hi = (_channel_shaped(t, x.dim(), self.a_axis) for t in (self.a_lo, self.a_hi))
                x = torch.minimum(torch.maximum(x, lo), hi)
            x = _qdq(x, self.a_scale, self.a_zero, self.a_axis)
        params = {"weight": self.weight()} if hasattr(self, "w_grid") else {}
        if self.int32_bias:
            params["bias"] = _qdq(self.b_grid, self.b_scale, self.b_zero, 0)
        out = torch.func.functional_call(self.module, params, (x, *args), kwargs, strict=False)
        if self.post_scale is not None or self.post_shift is not None:
            out = output_correction(out, self.post_scale, self.post_shift, self.out_axis)
        return out


def _require(module: str, what: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependencyError(f"{what} needs the '{module}' package: pip install onnx onnxscript onnxruntime"
                                     ) from None


def _int_tensor(name: str, dtype: int, values: Any) -> Any:
    """An ONNX integer initializer holding ``values`` as raw bytes (4-bit types packed two per byte, the first
    element in the low nibble, as ONNX stores them)."""
    import numpy as np
    import onnx

    flat = np.asarray(values).astype(np.int64).reshape(-1)
    if dtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        nibbles = (flat & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        raw = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
    elif dtype == onnx.TensorProto.INT32:
        raw = flat.astype("<i4").tobytes()
    else:
        raw = flat.astype(np.int8 if dtype == onnx.TensorProto.INT8 else np.uint8).tobytes()
    return onnx.helper.make_tensor(name, dtype, list(np.shape(values)), raw, raw=True)


def _fold_weight_quantize(proto: Any, int4: bool) -> list[str]:
    """Replace every QuantizeLinear of a constant (the weights) by its integer codes, stored as INT4/UINT4 when
    ``int4`` and every code fits, else INT8/UINT8. Returns the initializers stored as 4-bit."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    keep, four = [], []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or not all(i in inits for i in node.input[:3]):
            keep.append(node)
            continue
        w, scale, zero = (numpy_helper.to_array(inits[i]) for i in node.input[:3])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:
            shape[axis] = -1
        z = zero.astype(np.int32).reshape(shape)
        info = np.iinfo(zero.dtype)
        wide = zero.dtype == np.int32  # an int32 bias: codes beyond float32's integers, so divide in float64
        real = np.float64 if wide else np.float32
        codes = np.clip(np.round(w.astype(real) / scale.astype(real).reshape(shape)) + z, info.min, info.max)
        signed = info.min < 0
        lo4, hi4 = (-8, 7) if signed else (0, 15)
        use4 = int4 and not wide and codes.min() >= lo4 and codes.max() <= hi4
        dtype = onnx.TensorProto.INT32 if wide else (onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4) \
            if use4 else (onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8)
        name = node.output[0]
        graph.initializer.append(_int_tensor(name, dtype, codes))
        if use4:
            four.append(name)
            zname = f"{name}_zero_point"
            graph.initializer.append(_int_tensor(zname, dtype, zero))
            for other in graph.node:  # the DequantizeLinear(s) reading these codes take a 4-bit zero point
                if other.op_type == "DequantizeLinear" and other.input[0] == name and len(other.input) > 2:
                    other.input[2] = zname
    del graph.node[:]
    graph.node.extend(keep)
    return four


def _drop_unused(graph: Any) -> None:
    """Remove initializers no node reads (the float weights and 8-bit zero points replaced above)."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def _narrow_activations(proto: Any) -> int:
    """Turn ``Clip -> QuantizeLinear -> DequantizeLinear`` on a 4-bit grid (the Clip bounds are the grid's end
    points) into an INT4/UINT4 QDQ pair without the Clip: saturation to the 4-bit type is the clip, and runtimes
    see a plain QDQ pair. Returns how many inputs were converted."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    drop, converted = [], 0
    for clip in [n for n in graph.node if n.op_type == "Clip"]:
        after = users.get(clip.output[0], [])
        if len(after) != 1 or after[0].op_type != "QuantizeLinear" or len(clip.input) < 3:
            continue
        quant = after[0]
        if not all(i in inits for i in (*clip.input[1:3], *quant.input[1:3])):
            continue
        lo, hi, scale, zero = (numpy_helper.to_array(inits[i]) for i in (*clip.input[1:3], *quant.input[1:3]))
        if scale.ndim or zero.ndim:
            continue
        signed = np.iinfo(zero.dtype).min < 0
        qlo, qhi = (-8, 7) if signed else (0, 15)
        codes = np.round(np.array([lo, hi], dtype=np.float32) / np.float32(scale)) + int(zero)
        if (int(codes[0]), int(codes[1])) != (qlo, qhi):
            continue
        dtype = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
        zname = f"{quant.output[0]}_zero_point4"
        graph.initializer.append(_int_tensor(zname, dtype, zero))
        quant.input[0], quant.input[2] = clip.input[0], zname
        for info in graph.value_info:  # the exporter recorded the 8-bit type of the codes
            if info.name == quant.output[0]:
                info.type.tensor_type.elem_type = dtype
        for deq in users.get(quant.output[0], []):
            if deq.op_type == "DequantizeLinear" and len(deq.input) > 2:
                deq.input[2] = zname
        drop.append(clip)
        converted += 1
    for clip in drop:
        graph.node.remove(clip)
    return converted


def export_onnx(qmodel: nn.Module, example_input: Tensor, path: str | Path, *, int4: bool = True,
                check: bool = True) -> ExportReport:
    """Write the quantized ``qmodel`` as an ONNX QDQ model to ``path`` (opset 21).

    Weights become integer initializers with per-channel scales (INT4/UINT4 when ``int4`` and the codes fit,
    else INT8/UINT8), every quantized layer's input a QuantizeLinear/DequantizeLinear pair; see the module
    docstring for what is refused. ``example_input`` fixes the graph's input shape (the batch dimension stays
    dynamic). With ``check`` (and onnxruntime installed) the file is run on ``example_input`` and the largest
    difference from ``qmodel``'s output is recorded in the report.

    .. versionadded:: 0.1 (plugin API 1)
    """
    onnx = _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    problems = _problems(qmodel)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise QcoreError(f"cannot export to ONNX: {problems[0]}{more}")
    path = Path(path)
    work = copy.deepcopy(qmodel).cpu().eval()
    report = ExportReport(path=path)
    for name, layer in quant_layers(work).items():
        new = _QDQLayer(name, layer)
        replace_module(work, name, new)
        report.layers.append(name)
        if new.int32_bias:
            report.int32_biases.append(name)
        if new.per_channel_act:
            report.per_channel_acts.append(name)
        if new.input_scale is not None:
            report.equalized_inputs.append(name)
    x = example_input.detach().cpu()
    # the batch dimension stays dynamic; torch.export specialises a size of 1, so trace with two samples
    traced = x if x.shape[0] > 1 else torch.cat([x, x])
    dynamic = {"x": {0: torch.export.Dim("batch", min=1)}}
    wrapper = _Single(work).eval()
    sink = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            program = torch.onnx.export(wrapper, (traced,), dynamo=True, opset_version=OPSET, dynamic_shapes=dynamic,
                                        input_names=["x"], output_names=["y"], verbose=False,
                                        custom_translation_table={torch.ops.qcore.onnx_qdq.default: _qdq_onnx})
        except Exception as exc:  # the exporter raises many types; one line with its first line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise QcoreError(f"torch's ONNX exporter failed on this model: {first}") from exc
    log.debug("exporter output: %s", sink.getvalue())
    proto = program.model_proto
    four = _fold_weight_quantize(proto, int4)
    report.int4_inputs = _narrow_activations(proto) if int4 else 0
    _drop_unused(proto.graph)
    for node in proto.graph.node:  # the exporter's per-node stack traces: half the file, nothing a runtime reads
        del node.metadata_props[:]
    names = {n.input[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    report.int4_weights = [n for n in four if n in names]
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        first = (str(exc).strip().splitlines() or ["(no message)"])[0]
        raise QcoreError(f"the exported graph is not valid ONNX ({first}); try int4=False (--no-int4) or report "
                         "this with the model") from None
    tmp = path.with_name(path.name + ".tmp")
    try:
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QcoreError(f"cannot write {path}: {exc.strerror or exc}; choose another path") from None
    if check:
        report.max_abs_diff = _check(path, qmodel, x)
    return report


class _Single(nn.Module):
    """The model with one tensor input and one tensor output (what the exported graph has)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _check(path: Path, qmodel: nn.Module, x: Tensor) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        log.info("onnxruntime is not installed: %s was not checked", path)
        return None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x.numpy()})[0]
    except Exception as exc:  # onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QcoreError(f"onnxruntime {ort.__version__} cannot run the exported {path} ({first[:200]}); 4-bit "
                         "types need onnxruntime >= 1.20: upgrade it or export with int4=False (--no-int4)") from None
    with torch.no_grad():
        want = copy.deepcopy(qmodel).cpu().eval()(x)  # a copy: the caller's model stays on its device
    diff = float((torch.from_numpy(got) - want).abs().max())
    if not math.isfinite(diff):
        raise QcoreError(f"the exported {path} gives non-finite outputs; please report this with the model")
    return diff
