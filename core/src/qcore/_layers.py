"""Quantizable layers: what core knows about a layer (:class:`LayerInfo`), and how layers are found.

Core describes ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Linear``. Other layer types (spconv's sparse
convolutions) are described by plugins through the ``qcore_layer_info`` hook.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class LayerInfo:
    """What allocators and the cost model need to know about one quantizable layer.

    :param name: dotted module path in the model.
    :param kind: short type name ("conv2d", "linear", "subm3d", ...).
    :param out_channels: size of the weight's output-channel axis (``weight_axis``).
    :param in_channels: channels of the layer input (the activation quantizer's channel count).
    :param weight_axis: output-channel axis of the weight (0 for torch layers; spconv 2.x too).
    :param act_axis: channel axis of the input activation as the quantizer sees it.
    :param macs_per_out: multiply-accumulates per output element (``in/groups * kernel volume``).
    :param macs: MACs for one sample, filled by :func:`measure_layers`.
    :param act_numel: input elements for one sample, filled by :func:`measure_layers`.
    :param weight_numel: weight elements, filled by :func:`discover_layers`.
    :param quantize_input: how to apply an activation quantizer to this layer's first argument
        (default: call it on the tensor; spconv layers quantize the features of a sparse tensor).
    :param map_output: how to apply a tensor function to this layer's output (default: call it on the tensor;
        spconv layers apply it to the features); used by output corrections. Output channels lie on
        ``act_axis`` of the result.
    :param count_macs: ``count_macs(input, output)``: the MACs of one call for the whole batch, for layers whose
        cost is not ``macs_per_out`` per output element (sparse convolutions count the input/output neighbour
        pairs of their rule book); None: output elements x ``macs_per_out``. Used by :func:`measure_layers`.
    """

    name: str
    kind: str
    out_channels: int
    in_channels: int
    weight_axis: int = 0
    act_axis: int = 1
    macs_per_out: int = 0
    macs: int = 0
    act_numel: int = 0
    weight_numel: int = 0
    quantize_input: Callable[[Any, nn.Module], Any] | None = field(default=None, repr=False)
    map_output: Callable[[Any, Callable[[torch.Tensor], torch.Tensor]], Any] | None = field(default=None, repr=False)
    count_macs: Callable[[Any, Any], int] | None = field(default=None, repr=False)

    def input_tensor(self, x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """``x`` with ``fn`` applied to its tensor the way the activation quantizer sees it (a sparse input's
        features)."""
        return self.quantize_input(x, fn) if self.quantize_input is not None else fn(x)

    def output_tensor(self, out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """``out`` with ``fn`` applied to its tensor (a sparse output's features)."""
        return self.map_output(out, fn) if self.map_output is not None else fn(out)


def weight_numel_of(module: nn.Module) -> int:
    """Number of weight elements of a layer."""
    w = getattr(module, "weight", None)
    return int(w.numel()) if isinstance(w, torch.Tensor) else 0


def torch_layer_info(module: nn.Module, name: str) -> LayerInfo | None:
    """Describe core's layer types (Conv1d, Conv2d, Linear); None for anything else."""
    if type(module) in (nn.Conv1d, nn.Conv2d):
        kvol = int(torch.tensor(module.kernel_size).prod())
        return LayerInfo(name=name, kind=type(module).__name__.lower(), out_channels=module.out_channels,
                         in_channels=module.in_channels, act_axis=1,
                         macs_per_out=module.in_channels // module.groups * kvol)
    if type(module) is nn.Linear:  # subclasses (MultiheadAttention's out_proj) are not called as modules
        return LayerInfo(name=name, kind="linear", out_channels=module.out_features,
                         in_channels=module.in_features, act_axis=-1, macs_per_out=module.in_features)
    return None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def discover_layers(model: nn.Module, describe: Callable[[nn.Module, str], LayerInfo | None],
             include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> dict[str, LayerInfo]:
    """Find the quantizable layers of ``model`` in forward-definition order.

    :param describe: returns a :class:`LayerInfo` for a module it knows, else None (the hook relay).
    :param include: name globs a layer must match (``fnmatch`` syntax, e.g. ``layers.*.conv1``).
    :param exclude: name globs that remove a layer.
    """
    found: dict[str, LayerInfo] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        info = describe(module, name)
        if info is None or not _matches(name, include) or _matches(name, exclude):
            continue
        info.weight_numel = weight_numel_of(module)
        found[name] = info
    return found


@torch.no_grad()
def watch_layers(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Iterable[Any],
                 layers: Mapping[str, LayerInfo],
                 on_input: Callable[[str, torch.Tensor], None] | None = None,
                 on_output: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Run ``forward(model, batch)`` over ``batches`` while ``on_input(name, tensor)`` sees each named layer's
    input and ``on_output(name, tensor)`` its output, as tensors (a sparse tensor's features); hooks are
    removed afterwards, also on error."""
    def pre_hook(name: str, info: LayerInfo, fn: Callable[[str, torch.Tensor], None]) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            info.input_tensor(args[0], lambda t: fn(name, t.detach()) or t)
        return hook

    def post_hook(name: str, info: LayerInfo, fn: Callable[[str, torch.Tensor], None]) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            info.output_tensor(out, lambda t: fn(name, t.detach()) or t)
        return hook

    handles = []
    for name, info in layers.items():
        module = model.get_submodule(name)
        if on_input is not None:
            handles.append(module.register_forward_pre_hook(pre_hook(name, info, on_input)))
        if on_output is not None:
            handles.append(module.register_forward_hook(post_hook(name, info, on_output)))
    run_hooked(model, forward, batches, handles)


def run_hooked(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Iterable[Any],
               handles: Sequence[Any]) -> None:
    """Run ``forward(model, batch)`` over ``batches`` and remove the hook ``handles`` afterwards, also on
    error."""
    try:
        for b in batches:
            forward(model, b)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def measure_layers(model: nn.Module, layers: dict[str, LayerInfo], run_forward: Callable[[nn.Module], Any]
                   ) -> None:
    """Fill ``macs`` and ``act_numel`` (per sample) of each layer by one forward pass with hooks; layers the
    forward pass never calls (their weights may be read directly, as in MultiheadAttention) are removed.

    ``run_forward`` runs the model on an example batch; the batch size is read from each input's first
    dimension (or ``batch_size`` for inputs that carry one, such as spconv tensors).
    """
    modules = dict(model.named_modules())
    handles = []

    def hook(info: LayerInfo) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = args[0]
            feats = getattr(x, "features", x)
            out_feats = getattr(out, "features", out)
            batch = int(getattr(x, "batch_size", 0) or (x.shape[0] if x.dim() > 1 else 1))
            out_numel = out_feats.numel() // max(batch, 1)
            if info.count_macs is not None:
                info.macs = int(info.count_macs(x, out)) // max(batch, 1)
            else:
                info.macs = int(out_numel * info.macs_per_out)
            info.act_numel = int(feats.numel() // max(batch, 1))
        return fn

    for name, info in layers.items():
        handles.append(modules[name].register_forward_hook(hook(info)))
    try:
        run_forward(model)
    finally:
        for h in handles:
            h.remove()
    unused = [n for n, i in layers.items() if i.act_numel == 0]
    if unused:
        log.warning("%d quantizable layer(s) not called by the forward pass are left in floating point: %s",
                    len(unused), ", ".join(unused))
        for n in unused:
            del layers[n]
