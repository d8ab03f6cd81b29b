"""Values that cross plugin boundaries: :class:`QuantSpec`, :class:`LayerSpec` and :class:`Plan`.

A plan is the allocator's answer (bits per layer, per channel group); core alone can apply it to a model.
Its JSON form carries ``version`` so a plan written by one qcore can be read by a later one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from qcore._errors import QcoreError

Granularity = Literal["tensor", "channel", "group"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
MAX_BITS = 16
PLAN_VERSION = 1


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays in plan metadata."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a layer's weight or its input activation) is quantized.

    :param bits: bit-width, 0..16. 0 means the tensor (or group) is pruned: replaced by a constant, zero by
        default (see ``qcore.ops``).
    :param symmetric: signed grid with no zero point when True; affine (min/max, integer zero point) when False.
    :param granularity: where one scale is shared: the whole tensor, each channel, or each group of
        ``group_size`` consecutive channels along ``axis``.
    :param group_size: channels per group for ``granularity="group"`` and for ``group_bits``.
    :param group_bits: mixed precision: one bit-width per group of ``group_size`` channels (per channel when
        ``group_size`` is 1). Overrides ``bits`` for those groups; ``bits`` then holds their rounded mean.
    :param axis: the channel axis; None lets the layer decide (weights: output channels, dim 0; activations:
        dim 1 of conv inputs [N, C, ...], the last dim of linear inputs [..., C]).
    :param quantizer: name of the registered quantizer that realises the grid ("uniform" is core's).
    :param group_params: one quantizer-specific number per group of ``group_size`` channels (e.g. the dead-zone
        fraction of qcore-rdoq's ``deadzone`` quantizer); None for grids that need none.
    """

    bits: int
    symmetric: bool = True
    granularity: Granularity = "tensor"
    group_size: int | None = None
    group_bits: tuple[int, ...] | None = None
    axis: int | None = None
    quantizer: str = "uniform"
    group_params: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        bits = [self.bits] + list(self.group_bits or ())
        if any(not isinstance(b, int) or isinstance(b, bool) or not 0 <= b <= MAX_BITS for b in bits):
            raise QcoreError(f"bit-width {self.bits if not self.group_bits else self.group_bits} is out of range; "
                             f"use whole numbers from 0 to {MAX_BITS}")
        if not isinstance(self.symmetric, bool):
            raise QcoreError(f"symmetric={self.symmetric!r} must be true or false (a JSON boolean, not a string)")
        for key in ("group_size", "axis"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise QcoreError(f"QuantSpec {key}={value!r} must be a whole number")
        if self.group_size is not None and self.group_size < 1:
            raise QcoreError(f"group_size={self.group_size} must be at least 1 (channels per group)")
        if self.granularity not in GRANULARITIES:
            raise QcoreError(f"unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and not self.group_size:
            raise QcoreError("granularity 'group' needs group_size (channels per group)")
        if self.group_bits is not None:
            if not self.group_size:
                raise QcoreError("group_bits needs group_size (channels per group; 1 for per-channel bits)")
            if self.granularity == "tensor":
                raise QcoreError("per-group bit-widths need per-channel or per-group scales, not one per tensor")
            if not isinstance(self.group_bits, tuple):
                object.__setattr__(self, "group_bits", tuple(self.group_bits))
        if self.group_params is not None:
            if not self.group_size:
                raise QcoreError("group_params needs group_size (channels per group)")
            try:
                object.__setattr__(self, "group_params", tuple(float(v) for v in self.group_params))
            except (TypeError, ValueError):
                raise QcoreError(f"group_params must be a list of numbers, one per group; got {self.group_params!r}"
                                 ) from None
            if self.group_bits is not None and len(self.group_params) != len(self.group_bits):
                raise QcoreError(f"group_params has {len(self.group_params)} entries but group_bits has "
                                 f"{len(self.group_bits)}; give one per group")

    @property
    def mixed(self) -> bool:
        """True when groups carry their own bit-widths."""
        return self.group_bits is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("group_bits", "group_params"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        if not isinstance(d, Mapping):
            raise TypeError(f"a QuantSpec must be a mapping, got {d!r}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise QcoreError(f"unknown QuantSpec field(s) {sorted(unknown)}; known: {sorted(known)}")
        kw = dict(d)
        if kw.get("group_bits") is not None:
            kw["group_bits"] = tuple(int(b) for b in kw["group_bits"])
        return cls(**kw)


@dataclass(frozen=True)
class LayerSpec:
    """Quantization of one layer: its weight, and its input activation (None = kept in floating point)."""

    weight: QuantSpec | None
    act: QuantSpec | None

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.to_dict() if self.weight else None,
                "act": self.act.to_dict() if self.act else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerSpec:
        if not isinstance(d, Mapping):
            raise TypeError(f"a layer entry must be a mapping with 'weight' and 'act', got {d!r}")
        w, a = d.get("weight"), d.get("act")
        return cls(weight=QuantSpec.from_dict(w) if w else None, act=QuantSpec.from_dict(a) if a else None)


@dataclass(frozen=True)
class Plan:
    """Allocator output: layer name (dotted module path) -> :class:`LayerSpec`.

    ``meta`` is free-form provenance (method, budget, solver) written by the allocator.
    """

    layers: Mapping[str, LayerSpec]
    meta: Mapping[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "meta": dict(self.meta),
                           "layers": {k: v.to_dict() for k, v in self.layers.items()}}, indent=1, default=_plain)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise QcoreError(f"plan is not valid JSON ({exc}); pass a plan.json written by `qcore run`") from exc
        if not isinstance(d, dict) or not isinstance(d.get("layers"), dict):
            raise QcoreError("plan JSON has no 'layers' mapping; pass a plan.json written by `qcore run`")
        version = d.get("version")
        if version != PLAN_VERSION:
            raise QcoreError(f"plan version {version!r} is not supported by this qcore (reads {PLAN_VERSION}); "
                             "upgrade qcore or re-create the plan")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise QcoreError("plan 'meta' must be a mapping")
        try:
            layers = {k: LayerSpec.from_dict(v) for k, v in d["layers"].items()}
        except (TypeError, AttributeError, ValueError) as exc:
            raise QcoreError(f"plan layers are malformed ({exc}); pass a plan.json written by `qcore run`") from None
        return cls(layers=layers, meta=meta, version=version)
