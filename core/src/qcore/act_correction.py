"""Static activation (output) correction: quantization shifts the mean of each layer's output channels; a
per-channel constant measured once on calibration data moves them back.

For every quantized layer ``L`` and output channel ``c``::

    correction_c = E_calib[y_fp,c] - E_calib[y_q,c]

where ``y_fp`` is the FP model's output of ``L`` and ``y_q`` the quantized model's (with the quantized
upstream). The constant is folded into the layer's bias at deployment, so it is deployable; unlike the
original ACIQ code's ``-bca`` it never looks at the data being evaluated. Corrections of upstream layers
change downstream means, so the measurement is repeated ``passes`` times, each pass adding to the last.

``local`` mode corrects only what each layer's own quantization adds: ``E[layer_fp(x) - layer_q(x)]`` for
the input ``x`` that reaches it in the quantized model (weight and input quantization of that layer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qcore.layers import LayerInfo, run_hooked, watch_layers
from qcore.progress import track
from qcore.wrap import quant_layers

log = logging.getLogger(__name__)


class ChannelMeans:
    """Running per-channel means of tensors, by name (channels on ``axis``)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, y: Tensor, axis: int) -> None:
        rows = y.movedim(axis, 0).reshape(y.shape[axis], -1).double()
        self.sums[name] = self.sums.get(name, 0) + rows.sum(dim=1)
        self.counts[name] = self.counts.get(name, 0) + rows.shape[1]

    def means(self) -> dict[str, Tensor]:
        return {n: (s / max(self.counts[n], 1)).float() for n, s in self.sums.items()}


@torch.no_grad()
def output_means(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Sequence[Any],
                 layers: Mapping[str, LayerInfo]) -> dict[str, Tensor]:
    """Per-output-channel mean of each named module's output over ``batches`` (sparse outputs: over active
    sites)."""
    acc = ChannelMeans()
    watch_layers(model, forward, batches, layers, on_output=lambda n, y: acc.add(n, y, layers[n].act_axis))
    return acc.means()


@torch.no_grad()
def local_gaps(qmodel: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Sequence[Any]
               ) -> dict[str, Tensor]:
    """Per output channel, ``E[layer_fp(x) - layer_q(x)]`` of every quantized layer over ``batches``, where ``x``
    is the input that reaches the layer in the quantized model: the bias the layer's own quantization (weight
    and input) adds, not the drift of the layers before it."""
    acc = ChannelMeans()

    def hook(name: str) -> Callable[..., None]:
        def fn(layer: Any, args: tuple[Any, ...], out: Any) -> None:
            got: list[Tensor] = []
            ref = layer.module(*args)  # FP weight, unquantized input
            layer.info.output_tensor(ref, lambda t: got.append(t) or t)
            layer.info.output_tensor(out, lambda t: got.append(t) or t)
            acc.add(name, got[0] - got[1], layer.info.act_axis)
        return fn

    layers = quant_layers(qmodel)
    run_hooked(qmodel, forward, batches, [q.register_forward_hook(hook(n)) for n, q in layers.items()])
    return acc.means()


def correct_outputs(qmodel: nn.Module, fp_model: nn.Module, forward: Callable[[nn.Module, Any], Any],
                    batches: Sequence[Any], passes: int = 2, mode: str = "static") -> dict[str, Tensor]:
    """Set every quantized layer's ``out_correction`` of ``qmodel`` so its output channel means match
    ``fp_model``'s on ``batches`` (``mode="static"``), or so each layer's own quantization adds no mean shift
    (``mode="local"``, see :func:`local_gaps`); returns the corrections by layer name."""
    layers = {n: q.info for n, q in quant_layers(qmodel).items()}
    target = output_means(fp_model, forward, batches, layers) if mode == "static" else {}
    qlayers = quant_layers(qmodel)
    for _ in track(range(passes), desc="activation correction", unit="pass"):
        if mode == "static":
            current = output_means(qmodel, forward, batches, layers)
            gaps = {n: target[n].to(m.device) - m for n, m in current.items()}
        else:
            gaps = local_gaps(qmodel, forward, batches)
        for name, delta in gaps.items():
            q = qlayers[name]
            delta = delta.to(q.module.weight.device)
            q.out_correction = delta if q.out_correction is None else q.out_correction + delta
    missing = sorted(set(layers) - set(gaps))
    if missing:
        log.warning("no calibration data reached %d layer(s); they get no activation correction: %s", len(missing),
                    ", ".join(missing[:5]))
    return {n: q.out_correction for n, q in qlayers.items() if q.out_correction is not None}
