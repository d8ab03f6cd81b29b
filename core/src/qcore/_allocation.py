"""What every allocation shares: the pipeline's layer options (granularity, first/last, overrides), the
spec a layer gets for given bits, and pinning user-fixed layers over any plan."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qcore._errors import QcoreError
from qcore._layers import LayerInfo
from qcore._spec import MAX_BITS, LayerSpec, Plan, QuantSpec


@dataclass(frozen=True)
class PipelineOptions:
    """Options every method accepts (``-o key=value``): which tensors are quantized and how."""

    first_last: str = field(default="8", metadata={
        "help": "bits of the first and last quantized layer (weights and input): a number, 'same' (as the "
                "rest) or 'fp' (not quantized)"})
    fold_bn: bool = field(default=True, metadata={"help": "fold BatchNorm into the preceding conv/linear"})
    act_targets: Literal["inputs", "none"] = field(default="inputs", metadata={
        "help": "activations quantized: 'inputs' of every quantized layer, or 'none' (weight-only)"})
    include: tuple[str, ...] = field(default=("*",), metadata={"help": "layer-name globs to quantize"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "layer-name globs to leave in FP"})
    weight_granularity: Literal["channel", "tensor"] = field(default="channel", metadata={
        "help": "one weight scale per output channel or per tensor"})
    weight_symmetric: bool = field(default=True, metadata={"help": "symmetric (no zero point) weight grid"})
    act_granularity: Literal["tensor", "channel"] = field(default="tensor", metadata={
        "help": "activation scales per tensor (deployable) or per channel (simulation only)"})
    act_symmetric: bool = field(default=False, metadata={"help": "symmetric activation grid (default affine)"})
    weight_correction: str = field(default="none", metadata={
        "help": "registered weight correction applied to every quantized weight, or 'none' (core: 'mean' keeps each "
                "output channel's FP mean, 'mean+var' its mean and std; data-free; `qcore list corrections`)"})
    act_correction: str = field(default="none", metadata={
        "help": "registered output correction run after calibration, or 'none'. Core's correct each quantized "
                "layer's output channels on the calibration data, one layer at a time in forward order (deployable: "
                "folds into weight scale and bias): 'static' = add FP minus quantized mean; 'affine' = gain and "
                "shift that give FP's channel mean and std (undoes what MSE clipping shrinks; best from 3 bits "
                "down, see BENCHMARKS.md); 'local' = remove only the mean shift each layer's own quantization adds"})
    bias: Literal["float", "int32"] = field(default="float", metadata={
        "help": "biases of quantized layers: 'float' (as the FP model) or 'int32' (rounded to int32 at input scale x "
                "weight scale, output corrections folded in, as onnxruntime's integer kernels hold them; needs "
                "the uniform quantizer; saved in model.qcore and written so by the ONNX export)"})
    equalize: Literal["off", "gelu", "all"] = field(default="gelu", metadata={
        "help": "input equalization before calibration: per-input-channel scales s move from a layer's input into "
                "its weight columns (x/s quantized per tensor, W*s per output channel; exact in FP; at run time one "
                "float multiply per input element before the quantizer, foldable into a preceding LayerNorm): "
                "'gelu' = layers fed by a GELU (a transformer MLP's fc2), 'all' = every Linear/Conv (groups=1) "
                "with a per-tensor quantized input, 'off'; saved in model.qcore, exported to ONNX as a Mul. "
                "Default 'gelu': it changes nothing on a model without nn.GELU (the ResNet) and lifts the ViT at "
                "A4 (BENCHMARKS.md)"})
    equalize_alpha: float = field(default=0.5, metadata={
        "help": "equalization strength: s = max|x_c|^alpha / max|W_c|^(1-alpha) over the calibration set"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.equalize_alpha <= 1.0:
            raise QcoreError(f"equalize_alpha={self.equalize_alpha} is out of range; use 0..1 (0.5 balances "
                             "activation and weight ranges)")
        if self.first_last not in ("same", "fp"):
            try:
                b = int(self.first_last)
            except ValueError:
                raise QcoreError(f"first_last={self.first_last!r}: use a bit-width, 'same' or 'fp'") from None
            if not 1 <= b <= MAX_BITS:
                raise QcoreError(f"first_last={b} is out of range; use 1..{MAX_BITS}, 'same' or 'fp'")


@dataclass(frozen=True)
class Pin:
    """User-fixed bits of one layer; None means that tensor stays in floating point."""

    w_bits: int | None
    a_bits: int | None


def layer_spec(opts: PipelineOptions, w_bits: int | None, a_bits: int | None,
               quantizer: str = "uniform") -> LayerSpec:
    """The spec of a layer at uniform ``w_bits``/``a_bits`` under the pipeline options (None = FP), for the
    registered quantizer ``quantizer`` (pass ``ctx.quantizer.name``)."""
    weight = None if w_bits is None else QuantSpec(
        bits=w_bits, symmetric=opts.weight_symmetric, granularity=opts.weight_granularity, quantizer=quantizer)
    act = None if (a_bits is None or opts.act_targets == "none") else QuantSpec(
        bits=a_bits, symmetric=opts.act_symmetric, granularity=opts.act_granularity, quantizer=quantizer)
    return LayerSpec(weight=weight, act=act)


def _bits(value: Any, what: str) -> int | None:
    if value is None or value == "fp":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() \
            or not 0 <= int(value) <= MAX_BITS:
        raise QcoreError(f"{what}={value!r} is out of range; use 0..{MAX_BITS} or 'fp'")
    return int(value)


def last_layer_names(layers: Sequence[str], last: Sequence[str] = ()) -> list[str]:
    """The run's last layers: the task's ``last`` among ``layers`` (every head output of a multi-head
    detector), or ``layers[-1]`` when the task names none of them."""
    wanted = set(last)
    return [n for n in layers if n in wanted] or list(layers[-1:])


def pinned_layers(layers: Sequence[str], opts: PipelineOptions, overrides: Mapping[str, Any],
                  w_bits: int | None, a_bits: int | None, last: Sequence[str] = ()) -> dict[str, Pin]:
    """Layers the user fixed: first/last (``first_last``), then YAML ``layers:`` globs (later wins).

    ``overrides`` maps a name glob to ``{"w_bits": 8, "a_bits": 8}`` (missing keys keep the run's bits) or to
    ``"fp"``. ``last``: the task's last layers (``TaskInstance.last_layers``, e.g. every head output of a
    multi-head detector); those among ``layers`` replace ``layers[-1]`` as the last layers.
    """
    pins: dict[str, Pin] = {}
    if layers and opts.first_last != "same":
        b = None if opts.first_last == "fp" else int(opts.first_last)
        for name in {layers[0], *last_layer_names(layers, last)}:
            pins[name] = Pin(b, b)
    for pattern, value in overrides.items():
        matched = [n for n in layers if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise QcoreError(f"layer override {pattern!r} matches no quantizable layer; layers are: "
                             f"{', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}")
        if value == "fp":
            pin = Pin(None, None)
        elif isinstance(value, Mapping):
            unknown = set(value) - {"w_bits", "a_bits"}
            if unknown:
                raise QcoreError(f"layer override {pattern!r}: unknown key(s) {sorted(unknown)}; use w_bits, a_bits")
            pin = Pin(_bits(value.get("w_bits", w_bits), "w_bits"), _bits(value.get("a_bits", a_bits), "a_bits"))
        else:
            raise QcoreError(f"layer override {pattern!r} must be 'fp' or a mapping with w_bits/a_bits")
        for name in matched:
            pins[name] = pin
    return pins


def apply_pins(plan: Plan, pins: Mapping[str, Pin], opts: PipelineOptions,
               layers: Mapping[str, LayerInfo], quantizer: str = "uniform") -> Plan:
    """``plan`` with every pinned layer's spec replaced by its pinned bits (FP pins remove the tensor)."""
    out = dict(plan.layers)
    for name, pin in pins.items():
        if name in layers:
            out[name] = layer_spec(opts, pin.w_bits, pin.a_bits, quantizer)
    out = {n: s for n, s in out.items() if s.weight is not None or s.act is not None}
    return dataclasses.replace(plan, layers=out)
