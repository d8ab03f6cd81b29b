"""Allocators: ``example-greedy`` (bits per layer, greedily, within ``--target-bits``) and ``example-all8``.

What an allocator owes (``PLUGINS.md``): a :class:`qcore.Plan` with a spec for every layer of ``ctx.layers``
that is not in ``ctx.pinned``; pinned layers may be left out (core applies ``ctx.pinned`` over any plan) and
their bits count against the budget; the budget is never exceeded; an impossible request is a
:class:`qcore.QcoreError` that says what to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

import qcore
from qcore.ranges import minmax_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GreedyOptions:
    """``-o`` options of ``example-greedy``."""

    min_bits: int = field(default=2, metadata={"help": "fewest weight bits a layer may get"})
    max_bits: int = field(default=8, metadata={"help": "most weight bits a layer may get"})

    def __post_init__(self) -> None:
        if not 1 <= self.min_bits <= self.max_bits <= qcore.MAX_BITS:
            raise qcore.QcoreError(f"need 1 <= min_bits <= max_bits <= {qcore.MAX_BITS}, got min_bits={self.min_bits}, "
                                   f"max_bits={self.max_bits}")


def weight_error(ctx: qcore.RunContext, name: str, bits: int) -> float:
    """Summed squared error of layer ``name``'s weight on the run's own quantizer at ``bits`` bits, with
    min/max ranges: the quantizer is made and calibrated through the :class:`qcore.FakeQuantizer` protocol,
    so the error is that of whatever grid the run uses."""
    spec = qcore.layer_spec(ctx.pipeline, bits, None, ctx.quantizer.name).weight
    assert spec is not None
    q = ctx.quantizer.make(spec, "weight", ctx.layers[name])
    if not isinstance(q, qcore.FakeQuantizer):
        raise qcore.QcoreError(f"example-greedy measures errors through the FakeQuantizer protocol; quantizer "
                               f"{ctx.quantizer.name!r} made a {type(q).__name__}")
    weight = ctx.model.get_submodule(name).weight.detach()
    q = q.to(weight.device)
    with torch.no_grad():
        qcore.calibrate_rows(q, q.rows_of(weight), minmax_range)
        return float((q(weight) - weight).double().pow(2).sum())


class GreedyAllocator(qcore.Allocator):
    """Weight bits per layer: start every free layer at ``min_bits``, then repeatedly give one more bit to the
    layer whose weight error falls the most per bit spent, while the budget allows.

    Budget: ``--target-bits`` (or ``--w-bits`` without it) is the average over all quantized weights, pinned
    layers included (their bits are paid first, as ``rdoq`` does). Activations get ``--a-bits``.
    """

    name = "example-greedy"
    description = "weight bits per layer, greedily by weight-MSE reduction per bit, within --target-bits"
    Options = GreedyOptions

    def allocate(self, ctx: qcore.RunContext) -> qcore.Plan:
        o, budget = self.options, ctx.budget
        target = budget.target_bits if budget.target_bits is not None else budget.w_bits
        if target is None:
            raise qcore.QcoreError("example-greedy needs a budget: pass --target-bits (e.g. 4)")
        free = [n for n in ctx.layers if n not in ctx.pinned]
        pinned = {n: p.w_bits for n, p in ctx.pinned.items() if n in ctx.layers and p.w_bits is not None}
        size = {n: ctx.layers[n].weight_numel for n in ctx.layers}
        total = sum(size[n] for n in free) + sum(size[n] for n in pinned)
        left = target * total - sum(size[n] * b for n, b in pinned.items()) - sum(size[n] * o.min_bits for n in free)
        if left < -1e-6 * total:
            raise qcore.QcoreError(f"impossible bit budget: --target-bits {target} cannot give every unpinned layer "
                                   f"min_bits={o.min_bits} after the pinned layers; raise the target, lower "
                                   "-o min_bits or pin fewer layers (-o first_last=same)")
        bits = {n: o.min_bits for n in free}
        errors = {n: {b: weight_error(ctx, n, b) for b in range(o.min_bits, o.max_bits + 1)}
                  for n in qcore.track(free, desc="example-greedy errors", unit="layer")}
        while True:
            # the error removed per bit spent by one more bit on each layer that can take one and still fits
            gains = {n: (errors[n][bits[n]] - errors[n][bits[n] + 1]) / size[n] for n in free
                     if bits[n] < o.max_bits and size[n] <= left + 1e-9}
            if not gains:
                break
            best = max(gains, key=lambda n: (gains[n], -size[n]))
            bits[best] += 1
            left -= size[best]
        used = sum(size[n] * b for n, b in bits.items()) + sum(size[n] * b for n, b in pinned.items())
        avg = used / total if total else 0.0
        log.info("example-greedy: %d layers, %.3f average weight bits (target %s)", len(free), avg, target)
        layers = {n: qcore.layer_spec(ctx.pipeline, b, budget.a_bits, ctx.quantizer.name) for n, b in bits.items()}
        return qcore.Plan(layers=layers, meta={"allocator": self.name, "target_bits": target, "w_bits_avg": avg,
                                               "bits": bits})


class AllEight(qcore.Allocator):
    """Every unpinned layer at W8A8, whatever the budget says (the smallest allocator there is)."""

    name = "example-all8"
    budget_convention = None  # W8A8 whatever the budget says: it does not spend --target-bits
    description = "every layer W8A8"

    def allocate(self, ctx: qcore.RunContext) -> qcore.Plan:
        return qcore.Plan(layers={n: qcore.layer_spec(ctx.pipeline, 8, 8, ctx.quantizer.name)
                                  for n in ctx.layers if n not in ctx.pinned},
                          meta={"allocator": self.name})
