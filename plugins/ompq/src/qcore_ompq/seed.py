"""The seed's size and BOPs conventions (spec section 6), to reproduce its published numbers (``-o convention=seed``
adds this report to result.json; qcore's own conventions, :func:`qcore.plan_cost`, stay the ones every method is
measured by).

* **Size** ("Mb", which is MiB): ``sum_i b_i n_i / 8 / 2^20`` where ``n_i`` counts a conv's weight **plus 2 C_out
  for its BatchNorm scale and shift** (at the layer's bits) and a linear layer's weight plus bias; a layer with no
  bit of its own (a ResNet downsample conv) takes the bit of the layer before it in module order (the seed's
  expansion of an 18-entry ResNet-18 list onto 21 modules). With ``fixed_ends`` (the seed's QAT mode) the first and
  last layers are charged at 8 bits and ``bits`` lists the others.
* **BOPs**: ``[MAC_first + MAC_last] * 8 * 8 + sum_i MAC_i * b_i * b_a`` over the other layers, with a conv's MACs
  counting ``5 C_out`` extra per output pixel (BN and ReLU) and a linear layer's ``(2 in + 1) out``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import qcore

MIB = 2**20


def seed_params(info: qcore.LayerInfo, bias: bool = True) -> int:
    """The seed's parameter count of one layer: conv weight + 2 C_out (BN), linear weight + bias."""
    if info.kind.startswith("conv"):
        return info.weight_numel + 2 * info.out_channels
    return info.weight_numel + (info.out_channels if bias else 0)


def seed_macs(info: qcore.LayerInfo) -> int:
    """The seed's MACs of one layer for one sample (``info.macs`` measured): a conv adds 5 per output element
    (BN and ReLU), a linear layer counts ``2 in + 1`` per output."""
    if info.kind.startswith("conv"):
        return info.macs + 5 * (info.macs // max(info.macs_per_out, 1))
    return (2 * info.in_channels + 1) * info.out_channels


def _tied(name: str) -> bool:
    return ".downsample." in f".{name}." or ".shortcut." in f".{name}."


def expand_bits(layers: Mapping[str, qcore.LayerInfo], bits: Sequence[int]) -> dict[str, int]:
    """One bit per layer from the seed's list: as given when it has one entry per layer, else each downsample /
    shortcut layer takes the bit of the layer before it (the seed's ResNet expansion)."""
    names = list(layers)
    if len(bits) == len(names):
        return dict(zip(names, (int(b) for b in bits), strict=True))
    own = [n for n in names if not _tied(n)]
    if len(bits) != len(own):
        raise qcore.QcoreError(f"a seed bit list needs {len(names)} entries (one per layer) or {len(own)} (layers "
                               f"that are not downsample convs), got {len(bits)}")
    out: dict[str, int] = {}
    it = iter(int(b) for b in bits)
    prev = None
    for n in names:
        out[n] = prev if _tied(n) and prev is not None else next(it)
        prev = out[n]
    return out


def _split(layers: Mapping[str, qcore.LayerInfo], bits: Sequence[int], fixed_ends: bool
           ) -> tuple[dict[str, int], list[str]]:
    names = list(layers)
    if fixed_ends:
        inner = {n: layers[n] for n in names[1:-1]}
        per = expand_bits(inner, bits)
        return {names[0]: 8, **per, names[-1]: 8}, [names[0], names[-1]]
    return expand_bits(layers, bits), []


def seed_size_mib(layers: Mapping[str, qcore.LayerInfo], bits: Sequence[int], fixed_ends: bool = False) -> float:
    """Model size in the seed's convention ("Mb" = MiB) for its bit list (PTQ: every layer searched; QAT,
    ``fixed_ends=True``: first and last layer at 8 bits, ``bits`` for the rest)."""
    per, _ = _split(layers, bits, fixed_ends)
    return sum(per[n] * seed_params(info) for n, info in layers.items()) / 8 / MIB


def seed_bops(layers: Mapping[str, qcore.LayerInfo], bits: Sequence[int], a_bits: int, fixed_ends: bool = True
              ) -> float:
    """BOPs in the seed's convention (first and last layer at W8A8 when ``fixed_ends``), in operations."""
    per, ends = _split(layers, bits, fixed_ends)
    return float(sum(seed_macs(info) * (64 if n in ends else per[n] * a_bits) for n, info in layers.items()))


def seed_report(layers: Mapping[str, qcore.LayerInfo], bits: Mapping[str, int], a_bits: int | None) -> dict[str, Any]:
    """A run's plan in the seed's conventions: size (MiB, BN terms counted at the layer's bits) and BOPs
    (first/last at W8A8, the rest at their weight bits times ``a_bits``)."""
    names = list(layers)
    ends = {names[0], names[-1]} if names else set()
    size = sum(bits.get(n, 32) * seed_params(layers[n]) for n in names) / 8 / MIB
    report: dict[str, Any] = {
        "size_mib": size,
        "size_convention": "seed: sum bits x (weight + 2 C_out BN terms per conv, weight + bias per linear) / 8 / "
                           "2^20, layers' own bits (unquantized at 32)"}
    if a_bits is not None:
        bops = sum(seed_macs(layers[n]) * (64 if n in ends else bits.get(n, 32) * a_bits) for n in names)
        report.update(bops_g=bops / 1e9, bops_convention=f"seed: first/last at 8x8, the rest w_bits x {a_bits}; conv "
                      "MACs + 5 C_out per output pixel (BN, ReLU), linear (2 in + 1) out")
    return report
