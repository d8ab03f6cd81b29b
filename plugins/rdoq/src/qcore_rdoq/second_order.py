"""Second-order RD curves: ``D_g(b) ~ 1/2 dw^T H dw`` with the per-sample Gauss-Newton Hessian of the
distortion target's MSE, so no forward pass is needed per candidate.

The first-order curves measure ``D(dw) = mean_n,c (f_c(x_n; w + dw) - f_c(x_n; w))^2``. Its Gauss-Newton
approximation is ``D(dw) ~ (1 / (N C)) sum_n ||J_n dw||^2`` with ``J_n`` the Jacobian of sample n's outputs with
respect to the weights (the first-order term vanishes: the residual against FP is zero at ``dw = 0``). We
compute every sample's Jacobian for all layers at once (``vmap(jacrev)``, one batched backward per sample
and output), then each candidate costs one small matrix product. This fixes the seed's version, which used
the gradient of the *norm* of a whole batch's logits (a sensitivity proxy, rank K = batches), and paired
activation gradients with the wrong samples.

With ``projections=K`` (for targets with many outputs: 1000 ImageNet logits would need 1000 backward passes),
each sample's ``C`` output directions are replaced by ``K`` random ones: ``||J_n dw||^2`` is estimated by
``||R_n J_n dw||^2`` with ``R_n`` a ``[K, C]`` matrix of independent +-1/sqrt(K) entries, drawn afresh per
sample. ``E[R_n^T R_n] = I``, so the estimate is unbiased; its relative standard deviation per entry is at most
``sqrt(2 / K)`` (one sample dominating the sum) and near ``sqrt(2 / (K N))`` when the ``N`` samples contribute
alike, and the cost drops from ``C`` to ``K`` backward passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qcore import LayerInfo, WeightCorrection, track
from qcore import distributed as qdist
from qcore_rdoq.cache import CurveCache
from qcore_rdoq.curves import Curves, exact_math
from qcore_rdoq.deployment import WEIGHT_CLIP, Clip
from qcore_rdoq.groups import candidate_tables, weight_groups

log = logging.getLogger(__name__)


def output_directions(samples: int, outputs: int, projections: int, generator: torch.Generator
                      ) -> Tensor | None:
    """``[samples, K, outputs]`` random output directions (independent +-1/sqrt(K) entries, so that
    ``E[R^T R] = I`` per sample), or None for the exact expansion (every output is its own direction; also
    when ``projections`` is 0 or not below ``outputs``, where projecting would cost as much)."""
    if projections <= 0 or projections >= outputs:
        return None
    signs = torch.randint(0, 2, (samples, projections, outputs), generator=generator).float() * 2 - 1
    return signs / projections ** 0.5


def _jacobians(model: nn.Module, names: Sequence[str], x: Tensor, dirs: Tensor | None) -> dict[str, Tensor]:
    """Per-sample Jacobians of the flattened model output (or of its projections on ``dirs``, ``[samples, K,
    outputs]``) w.r.t. each named layer's weight: ``{name: [samples, outputs or K, *weight.shape]}``."""
    params = {f"{n}.weight": model.get_submodule(n).weight.detach() for n in names}

    def out(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).flatten()

    if dirs is None:
        jac = torch.func.vmap(torch.func.jacrev(out), in_dims=(None, 0))(params, x)
    else:
        def projected(p: dict[str, Tensor], xi: Tensor, r: Tensor) -> Tensor:
            return r @ out(p, xi)

        jac = torch.func.vmap(torch.func.jacrev(projected), in_dims=(None, 0, 0))(params, x, dirs.to(x.device))
    return {n: jac[f"{n}.weight"] for n in names}


def _by_group(t: Tensor, group_size: int) -> Tensor:
    """``[rows, out_channels, ...]`` as ``[groups, rows, group elements]`` (groups of ``group_size`` output
    channels; a short last group is padded with zeros, which add nothing to its products)."""
    rows, cout = t.shape[0], t.shape[1]
    flat = t.reshape(rows, cout, -1)
    pad = -cout % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, 0, 0, pad))
    return flat.reshape(rows, (cout + pad) // group_size, -1).transpose(0, 1)


def _output_count(model: nn.Module, batch: Tensor) -> int:
    """Outputs per sample of the distortion target."""
    return int(model(batch[:1]).numel())


def second_order_curves(model: nn.Module, batches: Sequence[Any], layers: dict[str, LayerInfo], group_size: int,
                        bits: Sequence[int], sub_batch: int = 0, clip: Clip = WEIGHT_CLIP,
                        cache: CurveCache | None = None, correction: WeightCorrection | None = None,
                        projections: int = 0,
                        seed: int = 0, deadzone: float = 0.0) -> Curves:
    """Gauss-Newton estimates of ``D_g(b)`` for every weight group of ``layers`` (see module docstring).

    ``projections``: 0 for the exact expansion, else ``K`` random output directions per sample (drawn from
    ``seed``, so a run is reproducible). ``deadzone`` > 0 puts the candidates on the dead-zone grid with that
    ratio; ``clip`` is the deployed range estimator and grid symmetry of the candidates. All layers come from one
    set of Jacobians, so ``cache`` is used all or nothing.
    """
    return second_order_curve_set(model, batches, layers, group_size, bits, [deadzone], sub_batch, clip,
                                  [cache], correction, projections, seed)[0]


_CANDIDATE_BYTES = 2**31  # candidate differences held at once; more dead-zone ratios are done in several passes

#: ``measure(layers, ratios) -> [groups of layers, bits] per ratio``: one pass of a second-order engine (in
#: :func:`shared_layer_rows`: any rows per layer, any sets)
Measure = Callable[[dict[str, LayerInfo], Sequence[Any]], list[np.ndarray]]


@torch.no_grad()
def second_order_curve_set(model: nn.Module, batches: Sequence[Any], layers: dict[str, LayerInfo],
                           group_size: int, bits: Sequence[int], deadzones: Sequence[float], sub_batch: int = 0,
                           clip: Clip = WEIGHT_CLIP, caches: Sequence[CurveCache | None] | None = None,
                           correction: WeightCorrection | None = None, projections: int = 0,
                           seed: int = 0) -> list[Curves]:
    """:func:`second_order_curves` for several dead-zone ratios at once, one :class:`Curves` per ratio.

    The candidates of as many ratios as fit in about 2 GiB are projected through one set of Jacobians; further
    ratios take another pass (with the same random directions, so the split changes nothing beyond float rounding).
    Under torchrun each process computes the Jacobians of its share of the layers (:func:`shared_curve_set`).
    """
    t0 = time.perf_counter()
    # samples per Jacobian call from all the layers, not one process's share: every process then draws the
    # random directions a single process draws
    sub_batch = sub_batch or _sub_batch(model, list(layers), batches[0], projections)

    def measure(part: dict[str, LayerInfo], ratios: Sequence[float]) -> list[np.ndarray]:
        return _second_order_pass(model, batches, part, group_size, bits, ratios, sub_batch, clip, correction,
                                  projections, seed)

    return shared_curve_set(model, layers, group_size, bits, deadzones, caches, measure, t0)


def shared_curve_set(model: nn.Module, layers: dict[str, LayerInfo], group_size: int, bits: Sequence[int],
                     deadzones: Sequence[float], caches: Sequence[CurveCache | None] | None, measure: Measure,
                     t0: float) -> list[Curves]:
    """The steps both second-order engines share around ``measure``: this process's share of the layers (round
    robin by rank under torchrun, :func:`qcore.distributed.shard`; all of them in one process), the caches' lock
    and hits, passes of as many dead-zone ratios as fit in :data:`_CANDIDATE_BYTES` of candidate differences,
    the cache writes, and the gathering of every process's layers, so each process returns the same curves
    (:func:`shared_layer_rows` does all but the memory bound).

    ``measure`` gets a share of the layers (never empty) and a slice of ``deadzones``. With every cache given, a
    share all of whose entries are cached is read back, else it is measured (one set of Jacobians or backward
    passes for the share: the caches are used all or nothing per share). The caches' lock is the whole folder's
    in one process (a concurrent run waits for the whole set, then reads it), one per share under torchrun (so
    the processes do not wait on each other). ``seconds`` of each curve set: the wall time over the ratios.
    """
    names = list(layers)
    nb = len(bits)
    groups = {n: weight_groups(layers[n], group_size) for n in names}

    def per_pass(mine: Sequence[str]) -> int:
        weights = sum(model.get_submodule(n).weight.numel() for n in mine)
        return max(1, _CANDIDATE_BYTES // (4 * nb * weights))

    done = shared_layer_rows(layers, {n: len(groups[n]) for n in names}, nb, deadzones, caches, measure, per_pass)
    seconds = (time.perf_counter() - t0) / len(deadzones)
    flat = [g for n in names for g in groups[n]]
    return [Curves(groups=flat, bits=list(bits), dist=np.concatenate([done[n][0][r] for n in names], axis=0),
                   engine="second-order", seconds=seconds, layer_engines={n: done[n][1] for n in names})
            for r in range(len(deadzones))]


def shared_layer_rows(layers: dict[str, LayerInfo], rows: dict[str, int], columns: int, sets: Sequence[Any],
                      caches: Sequence[CurveCache | None] | None, measure: Measure,
                      per_pass: Callable[[Sequence[str]], int] | None = None
                      ) -> dict[str, tuple[list[np.ndarray], str]]:
    """Per layer of ``layers``, its ``[rows[layer], columns]`` distortions in each of ``sets`` (dead-zone ratios;
    one entry for curves with no such parameter) and where they came from (``"second-order"`` or ``"cache"``), on
    every process: this process measures its round-robin share (:func:`qcore.distributed.shard`) with
    ``measure(share, sets[lo:hi])`` -> one ``[rows of the share, columns]`` array per set of the slice, in passes
    of ``per_pass(share)`` sets (all at once when None), or reads it back when ``caches`` (one per set) hold every
    entry of the share; it writes what it measured, and the shares are gathered. Locks as
    :func:`shared_curve_set` says; used by it and by
    :func:`qcore_rdoq.act_curves.second_order_activation_curves`."""
    caches = list(caches) if caches is not None else [None] * len(sets)
    names = list(layers)
    mine = qdist.shard(names)
    lock = None if qdist.world() == 1 else f".share-{qdist.rank()}-of-{qdist.world()}"
    done: dict[str, tuple[list[np.ndarray], str]] = {}  # layer -> (its rows per set, engine)
    if mine:
        with ExitStack() as locks:  # a share's measurement covers all its layers: a concurrent run waits for it
            for folder in sorted({c.dir: c for c in caches if c is not None}.items()):
                locks.enter_context(folder[1].locked(lock))
            if all(c is not None for c in caches):
                hits = [[c.load(n, (rows[n], columns)) for n in mine] for c in caches]  # type: ignore[union-attr]
                if all(h is not None for hit in hits for h in hit):
                    done = {n: ([hit[i] for hit in hits], "cache") for i, n in enumerate(mine)}  # type: ignore[misc]
            if not done:
                part = {n: layers[n] for n in mine}
                step = per_pass(mine) if per_pass is not None else max(1, len(sets))
                dists: list[np.ndarray] = []
                for lo in range(0, len(sets), step):
                    dists += measure(part, sets[lo:lo + step])
                measured: dict[str, list[np.ndarray]] = {n: [] for n in mine}
                for dist, cache in zip(dists, caches, strict=True):
                    at = 0
                    for n in mine:
                        measured[n].append(dist[at:at + rows[n]])
                        if cache is not None:
                            cache.save(n, measured[n][-1])
                        at += rows[n]
                done = {n: (measured[n], "second-order") for n in mine}
    for share in qdist.all_gather_object(done):  # the other processes' layers (a no-op in one process)
        done.update(share)
    return done


def _group_deltas(model: nn.Module, layers: dict[str, LayerInfo], group_size: int, bits: Sequence[int],
                  deadzones: Sequence[float], clip: Clip, correction: WeightCorrection | None) -> dict[str, Tensor]:
    """Per layer, every candidate's weight change by group: ``[groups, ratios * bits, group elements]``."""
    deltas: dict[str, Tensor] = {}
    for n in layers:
        w = model.get_submodule(n).weight.detach()
        tables = candidate_tables(w, layers[n], group_size, list(bits), clip, correction, deadzones)
        deltas[n] = _by_group(torch.stack([tables[d][b] for d in deadzones for b in bits]) - w, group_size)
    return deltas


def projected_curve_set(model: nn.Module, forward: Callable[[nn.Module, Any], Tensor], batches: Sequence[Any],
                        layers: dict[str, LayerInfo], group_size: int, bits: Sequence[int],
                        deadzones: Sequence[float], projections: int, clip: Clip = WEIGHT_CLIP,
                        caches: Sequence[CurveCache | None] | None = None,
                        correction: WeightCorrection | None = None, seed: int = 0,
                        grad_context: Callable[[], AbstractContextManager[Any]] | None = None) -> list[Curves]:
    """Gauss-Newton estimates of ``D_g(b)`` for any batch type (a detector's batch dicts), with random projections
    of the whole batch's distortion target and plain backward passes (no ``vmap``, no tracing).

    For each calibration batch, one forward pass of ``forward`` keeps its graph; each of ``projections`` backward
    passes of ``r . f`` (``r`` independent +-1 entries over the batch's whole target ``f``) gives ``J^T r`` for
    every layer's weight at once, and ``D(dw) ~ (1 / count) mean_r (r . J dw)^2``, unbiased for
    ``||J dw||^2 / count`` (relative standard deviation up to ``sqrt(2 / projections)`` per entry and batch).
    The directions are drawn per batch, so the cross terms between a batch's samples add noise: batches of one
    sample each (the allocator splits them through ``TaskInstance.split`` when the task can) average independent
    estimates instead, about ``sqrt(2 / (projections N))`` over N samples at the same backward passes per sample.
    ``grad_context`` is the task's context for backward passes (spconv's CPU kernels need one). A layer the
    target does not depend on (a detector head when the target is the BEV features) gets zero distortion at every
    candidate (logged once). Caches, memory bound and the split of the layers over torchrun's processes as in
    :func:`second_order_curve_set` (:func:`shared_curve_set`); the directions ``r`` depend on the seed only, so a
    share of the layers gets the curves it gets among all of them.
    """
    t0 = time.perf_counter()
    unused: list[str] = []  # layers the target does not depend on (no gradient), logged once each

    def measure(part: dict[str, LayerInfo], ratios: Sequence[float]) -> list[np.ndarray]:
        return _projected_pass(model, forward, batches, part, group_size, bits, ratios, projections, clip,
                               correction, seed, grad_context, unused)

    return shared_curve_set(model, layers, group_size, bits, deadzones, caches, measure, t0)


def _projected_pass(model: nn.Module, forward: Callable[[nn.Module, Any], Tensor], batches: Sequence[Any],
                    layers: dict[str, LayerInfo], group_size: int, bits: Sequence[int], deadzones: Sequence[float],
                    projections: int, clip: Clip, correction: WeightCorrection | None, seed: int,
                    grad_context: Callable[[], AbstractContextManager[Any]] | None,
                    unused: list[str]) -> list[np.ndarray]:
    """``[groups, bits]`` distortions per ratio of ``deadzones``, from one set of backward passes."""
    t0 = time.perf_counter()
    names = list(layers)
    groups = {n: weight_groups(layers[n], group_size) for n in names}
    deltas = _group_deltas(model, layers, group_size, bits, deadzones, clip, correction)
    nb = len(bits)
    sums = {n: torch.zeros(len(groups[n]), len(deadzones) * nb, dtype=torch.float64) for n in names}
    params = [model.get_submodule(n).weight for n in names]
    saved = [p.requires_grad for p in params]
    gen = torch.Generator().manual_seed(seed)
    context = grad_context or nullcontext
    count = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with exact_math():
            for batch in track(list(batches), desc="RD curves (second-order, projected)", unit="batch"):
                with torch.enable_grad():
                    out = forward(model, batch)
                    count += out.numel()
                    for k in range(projections):
                        r = (torch.randint(0, 2, out.shape, generator=gen) * 2 - 1).to(out)
                        if not out.requires_grad:  # no layer feeds the target
                            grads: Sequence[Tensor | None] = [None] * len(params)
                        else:
                            with context():
                                grads = torch.autograd.grad(out, params, grad_outputs=r, allow_unused=True,
                                                            retain_graph=k < projections - 1)
                        for n, g in zip(names, grads, strict=True):
                            if g is None:  # the target does not read this layer: zero distortion
                                if n not in unused:
                                    unused.append(n)
                                    log.warning("rdoq: the distortion target does not depend on layer %s; its "
                                                "second-order distortion is zero at every bit-width", n)
                                continue
                            proj = torch.bmm(deltas[n], _by_group(g.detach()[None], group_size).transpose(1, 2))
                            sums[n] += proj.double().pow(2).sum(dim=2).cpu() / projections
                del out
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)
    log.info("rdoq: projected Gauss-Newton curves of %d layers from %d backward passes in %.1f s", len(names),
             projections * len(batches), time.perf_counter() - t0)
    return [np.concatenate([(sums[n][:, r * nb:(r + 1) * nb] / count).numpy() for n in names], axis=0)
            for r in range(len(deadzones))]


def _sub_batch(model: nn.Module, names: Sequence[str], batch: Tensor, projections: int) -> int:
    """Samples per Jacobian call: about 64 sample-directions at a time (measured fastest on CPU), and at most
    ~1 GiB of Jacobian entries (samples x directions x weights of ``names``)."""
    outputs = _output_count(model, batch)
    dirs_per_sample = projections if 0 < projections < outputs else outputs
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    return max(1, min(64 // dirs_per_sample, 2**28 // (dirs_per_sample * weights)))


def _second_order_pass(model: nn.Module, batches: Sequence[Any], layers: dict[str, LayerInfo], group_size: int,
                       bits: Sequence[int], deadzones: Sequence[float], sub_batch: int, clip: Clip,
                       correction: WeightCorrection | None, projections: int, seed: int) -> list[np.ndarray]:
    """``[groups, bits]`` distortions per ratio of ``deadzones``, from one set of Jacobians."""
    names = list(layers)
    groups = {n: weight_groups(layers[n], group_size) for n in names}
    nb = len(bits)
    deltas = _group_deltas(model, layers, group_size, bits, deadzones, clip, correction)
    sums = {n: torch.zeros(len(groups[n]), len(deadzones) * nb, dtype=torch.float64) for n in names}
    count = 0
    outputs = _output_count(model, batches[0])
    gen = torch.Generator().manual_seed(seed)
    sub_batch = sub_batch or _sub_batch(model, names, batches[0], projections)
    with exact_math():
        for batch in track(list(batches), desc="RD curves (second-order)", unit="batch"):
            for lo in range(0, batch.shape[0], sub_batch):
                xb = batch[lo:lo + sub_batch]
                dirs = output_directions(xb.shape[0], outputs, projections, gen)
                with torch.enable_grad():
                    jac = _jacobians(model, names, xb, dirs)
                for n in names:
                    j = jac[n].flatten(0, 1)  # [s*C, *weight.shape]
                    proj = torch.bmm(deltas[n], _by_group(j, group_size).transpose(1, 2))  # [groups, R*B, s*C]
                    sums[n] += proj.double().pow(2).sum(dim=2).cpu()
                count += xb.shape[0] * outputs
    return [np.concatenate([(sums[n][:, r * nb:(r + 1) * nb] / count).numpy() for n in names], axis=0)
            for r in range(len(deadzones))]
