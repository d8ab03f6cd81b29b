"""Bit allocation as a multiple-choice knapsack: every item (a layer, or a channel group) picks one rate from a
list, paying ``size x rate`` bits and incurring a distortion; minimise total distortion under a bit budget.

Two solvers, usable by any allocator:

* :func:`solve_dp`: exact dynamic programming over a budget grid (``unit`` bits per step; costs are rounded
  *up* to the grid, so the solution never exceeds the budget in true bits, and with ``unit=1`` and integer
  sizes x rates it is the exact optimum). fp64 throughout.
* :func:`solve_lagrangian`: for a multiplier ``lam`` every item independently minimises
  ``D_i(b) + lam * size_i * b`` (the textbook Lagrangian of the total-bit constraint); :func:`lagrangian_for_budget`
  bisects ``lam`` for the largest rate within the budget. Its solutions lie on the lower convex hull of the
  rate-distortion frontier, so they are optimal for the rate they reach.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qcore.errors import QcoreError


@dataclass(frozen=True)
class Allocation:
    """The chosen rate index per item, with the total rate (bits) and distortion it gives."""

    choice: np.ndarray  # int, index into ``rates`` per item
    bits: np.ndarray  # the chosen rate (bits per element) per item
    total_bits: float
    distortion: float


def _check(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray) -> None:
    if dists.ndim != 2 or dists.shape != (sizes.shape[0], rates.shape[0]):
        raise ValueError(f"dists must be [items, rates] = [{sizes.shape[0]}, {rates.shape[0]}], got {dists.shape}")
    if (sizes <= 0).any():
        raise ValueError("item sizes must be positive")


def _result(choice: np.ndarray, sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray) -> Allocation:
    bits = rates[choice]
    return Allocation(choice=choice, bits=bits, total_bits=float((sizes * bits).sum()),
                      distortion=float(dists[np.arange(len(choice)), choice].sum()))


def solve_dp(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray, budget_bits: float,
             unit: float | None = None, resolution: float = 1e-3) -> Allocation:
    """Minimise ``sum_i dists[i, k_i]`` subject to ``sum_i sizes[i] * rates[k_i] <= budget_bits``.

    :param sizes: elements per item, ``[N]``.
    :param dists: distortion per item and rate, ``[N, B]`` (``inf`` forbids a rate).
    :param rates: bits per element of each choice, ``[B]``.
    :param unit: budget grid step in bits; default ``resolution x sum(sizes)`` (i.e. ``resolution`` bits of
        average bit-width), at least 1.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    dists = np.asarray(dists, dtype=np.float64)
    rates = np.asarray(rates, dtype=np.float64)
    _check(sizes, dists, rates)
    if unit is None:
        unit = max(1.0, math.floor(resolution * sizes.sum()))
    cost = np.ceil(sizes[:, None] * rates[None, :] / unit - 1e-9).astype(np.int64)  # [N, B] grid units
    cap = int(math.floor(budget_bits / unit + 1e-9))
    if cap < 0 or cost.min(axis=1).sum() > cap or not np.isfinite(dists.min(axis=1)).all():
        raise QcoreError(f"impossible bit budget: the smallest allowed rates need "
                         f"{float((sizes * rates[np.argmin(cost, axis=1)]).sum()):.0f} bits but the budget is "
                         f"{budget_bits:.0f}; raise the target or lower the minimum bits")
    n, b = dists.shape
    inf = np.inf
    best = np.full(cap + 1, inf)  # best[s]: min distortion of items so far with cost exactly <= s
    best[0] = 0.0
    back = np.zeros((n, cap + 1), dtype=np.uint8)
    idx = np.arange(cap + 1)
    for i in range(n):
        cand = np.full((b, cap + 1), inf)
        for k in range(b):
            c = cost[i, k]
            if c <= cap and np.isfinite(dists[i, k]):
                cand[k, c:] = best[: cap + 1 - c] + dists[i, k]
        back[i] = np.argmin(cand, axis=0)
        best = cand[back[i], idx]
    # best is non-decreasing budget-wise only after a running min: take the best budget <= cap
    s = int(np.argmin(best))
    if not np.isfinite(best[s]):
        raise QcoreError("impossible bit budget: no allocation fits; raise the target bits")
    choice = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        k = int(back[i, s])
        choice[i] = k
        s -= int(cost[i, k])
    return _result(choice, sizes, dists, rates)


def solve_lagrangian(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray, lam: float) -> Allocation:
    """Each item picks ``argmin_k dists[i, k] + lam * sizes[i] * rates[k]`` (ties: the lower rate)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    dists = np.asarray(dists, dtype=np.float64)
    rates = np.asarray(rates, dtype=np.float64)
    _check(sizes, dists, rates)
    obj = dists + lam * sizes[:, None] * rates[None, :]
    order = np.argsort(rates, kind="stable")  # argmin takes the first minimum: make that the lowest rate
    choice = order[np.argmin(obj[:, order], axis=1)]
    return _result(choice, sizes, dists, rates)


def lagrangian_for_budget(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray, budget_bits: float,
                          iters: int = 200) -> tuple[Allocation, float]:
    """Bisect ``lam`` (in log space) for the lowest-distortion Lagrangian solution within ``budget_bits``.

    Returns the allocation and its multiplier. Never exceeds the budget; may leave some budget unused (the
    next hull point may not fit), which is the price of the Lagrangian relaxation.
    """
    lo, hi = -60.0, 60.0  # log2 lam: 2^60 makes every item take its lowest rate
    top = solve_lagrangian(sizes, dists, rates, 2.0**hi)
    if top.total_bits > budget_bits:
        raise QcoreError(f"impossible bit budget: even the lowest rates need {top.total_bits:.0f} bits but the "
                         f"budget is {budget_bits:.0f}")
    best, best_lam = top, 2.0**hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        a = solve_lagrangian(sizes, dists, rates, 2.0**mid)
        if a.total_bits <= budget_bits:
            if a.distortion <= best.distortion:
                best, best_lam = a, 2.0**mid
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-9:
            break
    return best, best_lam
