"""Units of reconstruction: residual blocks found by type, every other quantized layer on its own.

A *unit* is a submodule of the quantized model that takes one tensor and returns one tensor, reconstructed
as a whole. Blocks are recognised by class: torchvision/timm ResNet ``BasicBlock``/``Bottleneck``, MobileNetV2
``InvertedResidual`` (and MNASNet's ``_InvertedResidual``), RegNet's ``ResBottleneckBlock``, timm's ViT
``Block`` and qcore's zoo ``BasicBlock``. Quantized layers outside any block are units of their own (the stem,
the classifier): layer-wise reconstruction, the fallback for any architecture this module does not know. A
caller can name its own blocks instead (``reconstruct(..., blocks=[...])``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import qcore

#: class names that are reconstruction blocks wherever they come from
BLOCK_CLASSES = frozenset({"BasicBlock", "Bottleneck", "InvertedResidual", "_InvertedResidual",
                           "ResBottleneckBlock"})
#: class names that are blocks only when defined in these packages (``Block`` is too generic otherwise)
BLOCK_CLASSES_IN = {"Block": ("timm.",)}


@dataclass
class Unit:
    """One reconstruction unit: the submodule ``name`` of the quantized model and its quantized layers."""

    name: str
    layers: list[str]
    kind: str  # "block" or "layer"
    depthwise: bool = False  # holds a depthwise convolution (MobileNet-style): AdaRound's lambda is 0.1


def is_block(module: nn.Module) -> bool:
    """Whether ``module`` is one of the recognised block types."""
    cls = type(module)
    if cls.__name__ in BLOCK_CLASSES:
        return True
    prefixes = BLOCK_CLASSES_IN.get(cls.__name__)
    return bool(prefixes) and cls.__module__.startswith(prefixes)


def _depthwise(layer: qcore.QuantLayer) -> bool:
    m = layer.module
    groups = getattr(m, "groups", 1)
    return groups > 1 and groups == getattr(m, "in_channels", -1)


def find_units(model: nn.Module, blocks: Sequence[str] | None = None) -> list[Unit]:
    """The units of ``model`` (wrapped by qcore) in module order: the named ``blocks`` (or the recognised block
    types when None), then every quantized layer outside them on its own."""
    layers = qcore.quant_layers(model)
    if not layers:
        raise qcore.QcoreError("the model has no quantized layer to reconstruct; run it through qcore first")
    modules = dict(model.named_modules())
    if blocks is not None:
        missing = [b for b in blocks if b not in modules]
        if missing:
            raise qcore.QcoreError(f"blocks {missing[:3]} are not submodules of the model; name them as "
                                   "model.named_modules() does (e.g. 'layer1.0')")
        chosen = list(blocks)
    else:
        chosen = []
        for name, m in modules.items():
            if name and is_block(m) and not any(name.startswith(c + ".") for c in chosen):
                chosen.append(name)
    units: list[Unit] = []
    taken: set[str] = set()
    order = {n: i for i, n in enumerate(modules)}
    for b in chosen:
        inside = [n for n in layers if n.startswith(b + ".") and n not in taken]
        if not inside:
            continue
        taken.update(inside)
        units.append(Unit(b, inside, "block", any(_depthwise(layers[n]) for n in inside)))
    for n, layer in layers.items():
        if n not in taken:
            units.append(Unit(n, [n], "layer", _depthwise(layer)))
    units.sort(key=lambda u: order[u.name])
    return units


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needed was seen."""


def call_order(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batch: Any,
               units: Iterable[Unit]) -> list[Unit]:
    """``units`` sorted by when the forward pass first calls them (units never called go last, in module
    order): reconstruction must follow the data flow, which module order does not always give."""
    units = list(units)
    seen: dict[str, int] = {}
    handles = []
    for u in units:
        def hook(_m: nn.Module, _args: Any, name: str = u.name) -> None:
            seen.setdefault(name, len(seen))
        handles.append(model.get_submodule(u.name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return sorted(units, key=lambda u: seen.get(u.name, len(units)))
