"""BatchNorm folding: ``bn(conv(x)) == conv'(x)`` with ``W' = W * g / s`` and ``b' = (b - mu) * g / s + beta``
(``s = sqrt(var + eps)``), so weight quantization sees the weights that really run at inference.

Pairs are found on the torch.fx graph: a BatchNorm (with running statistics) whose only input is a Conv/Linear
output that nothing else uses, each module called exactly once (a shared module cannot absorb one caller's
BatchNorm). Models fx cannot trace are left unfolded (logged).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from qcore._wrap import replace_module

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)


@torch.no_grad()
def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (in eval mode, running statistics) into ``layer``'s weight and bias, in place."""
    w = layer.weight
    s = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(s)
    beta = bn.bias if bn.affine else torch.zeros_like(s)
    factor = gamma / s
    w.mul_(factor.reshape([-1] + [1] * (w.dim() - 1)))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(s)
    new_bias = (bias - bn.running_mean) * factor + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module, untraceable: str | None = None) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm of ``model`` into its producer, replacing the BN by ``nn.Identity``.

    Returns the ``(layer, batchnorm)`` name pairs folded. The model must be in eval mode. A model torch.fx cannot
    trace is left unfolded with a warning, or, when the caller expected that (``untraceable``: why), an info
    line.
    """
    if not any(isinstance(m, _BN) for m in model.modules()):
        return []
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # fx cannot trace every model; folding is an optimisation, not a requirement
        if untraceable:
            log.info("BatchNorm folding skipped (%s): %s", untraceable, exc)
        else:
            log.warning("BatchNorm folding skipped: model is not traceable by torch.fx (%s)", exc)
        return []
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BN) or bn.running_var is None or calls[str(node.target)] != 1:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and calls[str(src.target)] == 1
                and isinstance(modules.get(src.target), _LAYERS) and len(src.users) == 1):
            pairs.append((str(src.target), str(node.target)))
    for layer_name, bn_name in pairs:
        fold_into(modules[layer_name], modules[bn_name])
        replace_module(model, bn_name, nn.Identity())
    log.info("folded %d BatchNorm layer(s)", len(pairs))
    return pairs
