"""Run-time bit-width switching: select, in a quantized model, one of the bit-widths its switchable quantizers
hold (:meth:`qcore.FakeQuantizer.bit_choices`), uniformly or per layer from a plan. Only the quantizers' own
parameters change (a multi-bit format swaps its step sizes); weights, roundings and everything else stay."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from qcore._errors import QcoreError
from qcore._spec import Plan
from qcore._wrap import quant_layers


def switchable_bits(model: nn.Module) -> dict[str, list[int]]:
    """The bit-widths every switchable weight (``"weight"``) and activation (``"act"``) quantizer of ``model``
    can take (the intersection over quantizers; empty lists when none switches). Quantizers with one bit-width
    (``bit_choices() == ()``, e.g. a first/last layer kept at 8 bits) are not counted.

    .. versionadded:: 0.1 (plugin API 1, addition)
    """
    sets: dict[str, set[int] | None] = {"weight": None, "act": None}
    for layer in quant_layers(model).values():
        for role, q in (("weight", layer.weight_quantizer), ("act", layer.act_quantizer)):
            choices = _choices(q)
            if len(choices) > 1:
                prev = sets[role]
                sets[role] = set(choices) if prev is None else prev & set(choices)
    return {role: sorted(s or ()) for role, s in sets.items()}


def bits_in_effect(model: nn.Module) -> dict[str, list[int]]:
    """The bit-widths ``model``'s weight (``"weight"``) and activation (``"act"``) quantizers run at now, sorted
    and without repeats (read from each quantizer's rows, so a selection made after the run shows; pruned rows
    count as 0)."""
    found: dict[str, set[int]] = {"weight": set(), "act": set()}
    for layer in quant_layers(model).values():
        for role, q in (("weight", layer.weight_quantizer), ("act", layer.act_quantizer)):
            if q is not None:
                found[role].update(int(b) for b in q.row_bits().unique().tolist())
    return {role: sorted(v) for role, v in found.items()}


def _holds(q: Any, bits: int) -> bool:
    """True when the single-setting quantizer ``q`` quantizes every row at ``bits``."""
    return bool((q.row_bits() == bits).all())


def _choices(q: Any) -> tuple[int, ...]:
    fn = getattr(q, "bit_choices", None)
    return tuple(fn()) if callable(fn) else ()


def select_bits(model: nn.Module, w_bits: int | None = None, a_bits: int | None = None,
                plan: Plan | Mapping[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """Switch every switchable quantizer of ``model`` to ``w_bits`` (weights) and ``a_bits`` (activations), or
    each layer named in ``plan`` to its bits there (a :class:`qcore.Plan` or its JSON dict, e.g. an RDOQ/OMPQ
    ``plan.json``; per-channel-group bits are not supported: the plan's ``bits`` per tensor is used) and the other
    layers to ``w_bits``/``a_bits``. ``None`` leaves that role as it is. Quantizers with a single bit-width keep it
    (a first/last layer pinned at 8 bits). Cached quantized weights are recomputed. Returns ``{layer: {"weight":
    bits, "act": bits}}`` for what was switched. A :class:`qcore.QcoreError` (before anything is changed) names a
    bit-width a quantizer does not hold, a ``w_bits``/``a_bits`` for a role where no quantizer switches (unless all
    already hold it), and a plan's bits for a single-setting quantizer that holds other bits.

    .. versionadded:: 0.1 (plugin API 1, addition)
    """
    if plan is not None and not isinstance(plan, Plan):
        import json

        if not isinstance(plan, Mapping):
            raise QcoreError(f"a bit plan is a JSON object (a plan.json), not {type(plan).__name__}; pass the "
                             "plan.json a run wrote")
        plan = Plan.from_json(json.dumps(dict(plan)))
    layers = quant_layers(model)
    todo: list[tuple[str, str, Any, int]] = []
    if plan is not None:
        unknown = sorted(set(plan.layers) - set(layers))
        if unknown:
            raise QcoreError(f"the bit plan names layer(s) the model does not quantize: {', '.join(unknown[:5])}; "
                             "pass a plan written for this model")
    for role, bits in (("weight", w_bits), ("act", a_bits)):
        qs = [q for layer in layers.values() for q in (layer.weight_quantizer if role == "weight"
                                                      else layer.act_quantizer,) if q is not None]
        if bits is not None and not any(len(_choices(q)) > 1 for q in qs) and not all(_holds(q, bits) for q in qs):
            flag = "--w-bits" if role == "weight" else "--a-bits"
            raise QcoreError(f"no {role} quantizer of this model switches bit-width, so {flag} {bits} cannot be "
                             f"selected; omit {flag} (the model runs as saved)")
    for name, layer in layers.items():
        for role, q in (("weight", layer.weight_quantizer), ("act", layer.act_quantizer)):
            if q is None:
                continue
            choices = _choices(q)
            from_plan = plan is not None and name in plan.layers
            if from_plan:
                spec = plan.layers[name]
                qs = None if spec is None else (spec.weight if role == "weight" else spec.act)
                bits = None if qs is None else qs.bits  # a role the plan does not quantize: left as saved
            else:
                bits = w_bits if role == "weight" else a_bits
            if bits is None:
                continue
            if len(choices) < 2:
                if from_plan and not _holds(q, bits):
                    raise QcoreError(f"layer {name!r} holds one {role} bit-width, not {bits} from the bit plan; pass "
                                     "a plan that keeps its bits (e.g. 8 for a pinned first or last layer)")
                continue
            if bits not in choices:
                how = "the bit plan" if from_plan else ("--w-bits" if role == "weight" else "--a-bits")
                raise QcoreError(f"layer {name!r} holds {role} bit-widths {', '.join(map(str, choices))}, not {bits}; "
                                 f"choose one of those ({how})")
            todo.append((name, role, q, bits))
    done: dict[str, dict[str, int]] = {}
    for name, role, q, bits in todo:
        q.select_bits(bits)
        done.setdefault(name, {})[role] = bits
    for name in done:
        layer = layers[name]
        frozen = layer._wq is not None
        layer.unfreeze()
        if frozen:
            layer.freeze()
    return done
