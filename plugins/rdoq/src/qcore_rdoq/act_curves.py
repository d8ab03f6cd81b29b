"""First-order RD curves of activations: ``D_L(b)`` = MSE of the distortion target against FP when only the
input activation of layer ``L`` is fake-quantized at ``b`` bits (per tensor, as deployed), over the curve
calibration set.

The clip range of each candidate comes from the estimator and grid symmetry the deployment calibrator uses (a
:class:`~qcore_rdoq.deployment.Clip`: ``-o act_range`` with ``-o percentile``, and ``act_symmetric``; the rdoq
method's default is MSE on the affine grid), applied to a sample of the activation observed on the curve
samples; the deployed range is then recomputed on the full calibration set, so the two agree up to that
sampling. Engines as for weights:
``reference`` quantizes the input with a forward pre-hook and reruns the whole model, ``fast`` runs only the
layer and its downstream part with the candidates stacked along the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qcore import LayerInfo, observe_inputs, track
from qcore import distributed as qdist
from qcore.ops import fake_quantize, qparams_from_range
from qcore_rdoq.cache import CurveCache
from qcore_rdoq.curves import Engine, FastEngine, Forward, ReferenceEngine, make_engine
from qcore_rdoq.deployment import ACT_CLIP, Clip
from qcore_rdoq.replay import ReplayEngine
from qcore_rdoq.second_order import output_directions, shared_layer_rows

log = logging.getLogger(__name__)


def _quantizers(sample: Tensor, bits: Sequence[int], clip: Clip) -> list[Callable[[Tensor], Tensor]]:
    """The per-tensor activation quantizer at each of ``bits``, its range set from ``sample`` (``[1, values]``)
    as the deployment calibrator sets it."""
    rows = sample.expand(len(bits), -1)
    lo, hi = clip.fn()(rows, torch.tensor(bits, dtype=torch.float32), clip.symmetric)
    out = []
    for i, b in enumerate(bits):
        s, z, qmin, qmax = qparams_from_range(lo[i], hi[i], torch.tensor(float(b)), clip.symmetric)
        out.append(lambda x, s=s, z=z, qmin=qmin, qmax=qmax: fake_quantize(
            x, s.to(x.device), z.to(x.device), qmin.to(x.device), qmax.to(x.device)).to(x.dtype))
    return out


def _reference_layer(eng: ReferenceEngine | ReplayEngine, name: str, quants: list[Callable[[Tensor], Tensor]]
                     ) -> np.ndarray:
    """Candidates put in by a forward pre-hook: the reference engine reruns the whole model, replay the layer's
    downstream part."""
    module = eng.model.get_submodule(name)

    @contextmanager
    def quantized_input(i: int) -> Iterator[None]:
        h = module.register_forward_pre_hook(lambda _m, args: (quants[i](args[0]), *args[1:]))
        try:
            yield
        finally:
            h.remove()

    if isinstance(eng, ReplayEngine):
        return eng.measure(name, len(quants), quantized_input)
    return eng.measure(len(quants), quantized_input)


def _fast_layer(eng: FastEngine, name: str, quants: list[Callable[[Tensor], Tensor]]) -> np.ndarray:
    module = eng.model.get_submodule(name)
    return eng.measure(name, len(quants), lambda x, y, lo, hi: torch.cat([module(q(x)) for q in quants[lo:hi]]))


@torch.no_grad()
def activation_curves(model: nn.Module, forward: Forward, batches: Sequence[Any], layers: dict[str, LayerInfo],
                      bits: Sequence[int], engine: str | Engine = "fast", clip: Clip = ACT_CLIP,
                      seed: int = 0) -> tuple[np.ndarray, float]:
    """``[layers, bits]`` activation distortions (rows in ``layers`` order) and the seconds it took; ``clip``
    is the deployed activation range estimator and grid symmetry.

    ``engine`` is a kind or an engine already built on ``batches`` (the weight curves' one can be reused).
    """
    t0 = time.perf_counter()
    names = list(layers)
    samples = observe_inputs(model, forward, batches, layers, seed=seed)
    eng = make_engine(engine, model, forward, batches) if isinstance(engine, str) else engine
    done: dict[str, np.ndarray] = {}
    for name in track(qdist.shard(names), desc=f"activation RD curves ({eng.name})", unit="layer"):
        quants = _quantizers(samples[name], bits, clip)
        if isinstance(eng, FastEngine) and eng.serves(name):
            done[name] = _fast_layer(eng, name, quants)
        else:
            serves = not isinstance(eng, ReplayEngine) or eng.serves(name)
            done[name] = _reference_layer(eng.reference() if isinstance(eng, FastEngine) or not serves else eng,
                                          name, quants)
    for part in qdist.all_gather_object(done):
        done.update(part)
    return np.stack([done[n] for n in names]), time.perf_counter() - t0


def second_order_activation_curves(model: nn.Module, forward: Forward, batches: Sequence[Any],
                                   layers: dict[str, LayerInfo], bits: Sequence[int], clip: Clip = ACT_CLIP,
                                   seed: int = 0, projections: int = 0, cache: CurveCache | None = None
                                   ) -> tuple[np.ndarray, float]:
    """``[layers, bits]`` activation distortions from the Gauss-Newton expansion, no forward per candidate.

    ``D_L(b) ~ (1 / (N C)) sum_n sum_c (J_{n,c} . dx_{n,b})^2`` with ``dx_{n,b}`` the quantization error of layer
    ``L``'s input for sample ``n`` at ``b`` bits and ``J_{n,c}`` the gradient of output ``c`` of sample ``n``
    with respect to that input. One backward pass per output ``c`` gives these gradients for every layer at
    once (samples are independent in an eval-mode model), so the cost is ``C`` backward passes per batch
    instead of a forward per layer and bit. Needs tensor batches and a ``[N, C]`` distortion target.
    ``projections=K`` replaces the ``C`` output directions by ``K`` random ones per sample (unbiased; see
    :mod:`qcore_rdoq.second_order`).

    Under torchrun each process takes the gradients of its round-robin share of the layers only and the shares
    are gathered (:func:`qcore_rdoq.second_order.shared_layer_rows`, as the weights' second-order engines do):
    every layer's rows are those one process computes, the random directions depending on the seed only.
    ``cache`` (one ``[1, bits]`` entry per layer; its key must cover ``bits``, ``clip``, ``seed`` and
    ``projections``) is read back when it holds the whole share, else written, as for the weights' curves.
    """
    t0 = time.perf_counter()
    if not all(isinstance(b, torch.Tensor) and b.is_floating_point() for b in batches):
        raise TypeError("second-order activation curves need floating-point tensor batches")
    names = list(layers)
    if not names:
        return np.zeros((0, len(bits))), time.perf_counter() - t0
    samples = observe_inputs(model, forward, batches, layers, seed=seed)  # every layer: the samples of all

    def measure(part: dict[str, LayerInfo], _sets: Sequence[Any]) -> list[np.ndarray]:
        return [_second_order_act_pass(model, forward, batches, list(part),
                                       {n: _quantizers(samples[n], bits, clip) for n in part}, projections, seed)]

    done = shared_layer_rows(layers, dict.fromkeys(names, 1), len(bits), [None], [cache], measure)
    cached = sum(engine == "cache" for _, engine in done.values())
    if cached:
        log.info("rdoq: second-order activation curves of %d of %d layers read from %s", cached, len(names),
                 cache.dir if cache is not None else None)
    return np.concatenate([done[n][0][0] for n in names], axis=0), time.perf_counter() - t0


def _second_order_act_pass(model: nn.Module, forward: Forward, batches: Sequence[Tensor], names: list[str],
                           quants: dict[str, list[Callable[[Tensor], Tensor]]], projections: int,
                           seed: int) -> np.ndarray:
    """:func:`second_order_activation_curves` of the layers ``names``: ``[layers, bits]``."""
    dist = np.zeros((len(names), len(next(iter(quants.values())))))
    count = 0
    gen = torch.Generator().manual_seed(seed)
    for batch in track(batches, desc="activation RD curves (second-order)", unit="batch"):
        seen: dict[str, Tensor] = {}

        def own_input(_m: nn.Module, args: tuple[Any, ...], n: str, seen: dict[str, Tensor] = seen) -> tuple:
            # a graph node of this layer's own: layers reading the same tensor (q/k/v, conv1 and a shortcut)
            # must not share one gradient
            seen[n] = args[0].view_as(args[0])
            return (seen[n], *args[1:])

        handles = [model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: own_input(m, args, n)) for n in names]
        try:
            with torch.enable_grad():
                y = forward(model, batch.detach().clone().requires_grad_(True))
                y = y.reshape(y.shape[0], -1)
                inputs = [seen[n] for n in names]
                dirs = output_directions(y.shape[0], y.shape[1], projections, gen)
                dirs = dirs.to(y.device) if dirs is not None else None
                steps = y.shape[1] if dirs is None else dirs.shape[1]
                for c in range(steps):
                    scalar = y[:, c].sum() if dirs is None else (y * dirs[:, c]).sum()
                    grads = torch.autograd.grad(scalar, inputs, retain_graph=c + 1 < steps, allow_unused=True)
                    for i, (x, g) in enumerate(zip(inputs, grads, strict=True)):
                        if g is None:  # this output does not depend on the layer
                            continue
                        x = x.detach()
                        for j, q in enumerate(quants[names[i]]):
                            dx = q(x) - x
                            dist[i, j] += float((g * dx).reshape(x.shape[0], -1).sum(dim=1).pow(2).sum())
        finally:
            for h in handles:
                h.remove()
        count += int(y.shape[0] * y.shape[1])
    return dist / max(count, 1)
