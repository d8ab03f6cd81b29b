"""Bit allocation as a multiple-choice knapsack: every item (a layer, or a channel group) picks one rate from a
list, paying ``size x rate`` bits and incurring a distortion; minimise total distortion under a bit budget.

Two solvers, usable by any allocator:

* :func:`solve_dp`: dynamic programming over a budget grid. By default it first solves the Lagrangian, then
  fixes every item whose other choices cannot appear in any allocation better than the Lagrangian's (reduced-cost
  fixing with the dual bound) and runs an exact DP (grid: the greatest common divisor of the remaining cost
  differences) over the few items left: the exact optimum, in milliseconds at DeiT-B scale. When even that core
  is too large for ``max_work``, the core's grid is rounded up and the budget left topped up greedily (never
  worse than the Lagrangian; the answer says so). Never exceeds the budget. fp64 throughout.
* :func:`solve_lagrangian`: for a multiplier ``lam`` every item independently minimises
  ``D_i(b) + lam * size_i * b`` (the textbook Lagrangian of the total-bit constraint); :func:`lagrangian_for_budget`
  bisects ``lam`` for the largest rate within the budget. Its solutions lie on the lower convex hull of the
  rate-distortion frontier, so they are optimal for the rate they reach.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from qcore._errors import QcoreError

__all__ = ["Allocation", "solve_dp", "solve_lagrangian", "lagrangian_for_budget"]


@dataclass(frozen=True)
class Allocation:
    """The chosen rate index per item, with the total rate (bits) and distortion it gives.

    :param solver: which algorithm's answer this is (``dp (exact grid)``, ``dp (grid of U bits, topped up)``,
        ``lagrangian``): :func:`solve_dp` may return the Lagrangian's answer when that is better.
    :param lower_bound: the Lagrangian dual bound on the optimal distortion for this budget (no allocation within
        the budget can do better); ``distortion - lower_bound`` bounds how far from optimal this answer is.
    :param optimal: True when this answer is proven to be the exact optimum (an exact DP), whatever ``gap`` says
        (the dual bound of a knapsack is not tight in general).
    """

    choice: np.ndarray  # int, index into ``rates`` per item
    bits: np.ndarray  # the chosen rate (bits per element) per item
    total_bits: float
    distortion: float
    solver: str = ""
    lower_bound: float | None = None
    optimal: bool = False

    @property
    def gap(self) -> float | None:
        """Relative distance to the lower bound, ``(distortion - bound) / distortion`` (0 when optimal)."""
        if self.lower_bound is None:
            return None
        return 0.0 if self.distortion <= 0 else max(0.0, (self.distortion - self.lower_bound) / self.distortion)


def _rate_matrix(sizes: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """``[items, choices]`` bits per element: ``rates`` as given when 2-D (per-item rates, e.g. entropies),
    else the shared ``[choices]`` row repeated."""
    return rates if rates.ndim == 2 else np.broadcast_to(rates[None, :], (sizes.shape[0], rates.shape[0]))


def _check(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray) -> None:
    if dists.ndim != 2 or dists.shape != (sizes.shape[0], rates.shape[-1]) or (
            rates.ndim == 2 and rates.shape != dists.shape):
        raise ValueError(f"dists must be [items, rates] = [{sizes.shape[0]}, {rates.shape[-1]}] and 2-D rates the "
                         f"same shape, got dists {dists.shape}, rates {rates.shape}")
    if (sizes <= 0).any():
        raise ValueError("item sizes must be positive")


def _result(choice: np.ndarray, sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray, solver: str = "",
            lower_bound: float | None = None, optimal: bool = False) -> Allocation:
    bits = _rate_matrix(sizes, rates)[np.arange(len(choice)), choice]
    return Allocation(choice=choice, bits=bits, total_bits=float((sizes * bits).sum()),
                      distortion=float(dists[np.arange(len(choice)), choice].sum()), solver=solver,
                      lower_bound=lower_bound, optimal=optimal)


def _dp(cost: np.ndarray, dists: np.ndarray, cap: int) -> np.ndarray | None:
    """Exact DP over integer costs: the choice per item minimising distortion with total cost <= cap."""
    n, b = dists.shape
    best = np.full(cap + 1, np.inf)  # best[s]: min distortion of the items so far at total cost exactly s
    best[0] = 0.0
    back = np.zeros((n, cap + 1), dtype=np.uint8)
    idx = np.arange(cap + 1)
    for i in range(n):
        cand = np.full((b, cap + 1), np.inf)
        for k in range(b):
            c = cost[i, k]
            if 0 <= c <= cap and np.isfinite(dists[i, k]):
                cand[k, c:] = best[: cap + 1 - c] + dists[i, k]
        back[i] = np.argmin(cand, axis=0)
        best = cand[back[i], idx]
    s = int(np.argmin(best))
    if not np.isfinite(best[s]):
        return None
    choice = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        choice[i] = int(back[i, s])
        s -= int(cost[i, choice[i]])
    return choice


def _top_up(choice: np.ndarray, true_cost: np.ndarray, dists: np.ndarray, budget_bits: float) -> np.ndarray:
    """Spend budget left by grid rounding: repeatedly take the single-item change with the best distortion
    decrease per extra bit that still fits."""
    choice = choice.copy()
    rows = np.arange(len(choice))
    while True:
        used = true_cost[rows, choice].sum()
        extra = true_cost - true_cost[rows, choice][:, None]
        gain = dists[rows, choice][:, None] - dists
        ok = (extra > 0) & (extra <= budget_bits - used) & (gain > 0) & np.isfinite(dists)
        if not ok.any():
            return choice
        ratio = np.where(ok, gain / np.where(extra > 0, extra, 1.0), -np.inf)
        i, k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        choice[i] = k


def solve_dp(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray, budget_bits: float,
             unit: float | None = None, resolution: float = 1e-3, max_work: float = 2e7) -> Allocation:
    """Minimise ``sum_i dists[i, k_i]`` subject to ``sum_i sizes[i] * rates[k_i] <= budget_bits``.

    By default (``unit=None``) the Lagrangian is solved first (:func:`lagrangian_for_budget`: a feasible answer
    with distortion ``UB`` and the dual bound ``LB`` at multiplier ``lam``). An allocation within the budget
    has distortion at least ``LB + sum_i r_i`` where ``r_ik = d_ik + lam c_ik - min_j (d_ij + lam c_ij) >= 0`` is
    choice ``k``'s reduced cost; so a choice with ``r_ik > UB - LB`` is in no allocation better than the
    Lagrangian's, and an item left with one choice is fixed. The exact DP then runs over the items left (the
    core), on the greatest common divisor of their cost differences: the result is the exact optimum
    (``optimal=True``, solver ``dp (exact grid, ...)``). When costs are fractional (entropy rates) or the core
    times its grid exceeds ``max_work``, the core's costs are rounded *up* on a grid fine enough that rounding
    wastes at most ``resolution`` average bits in total (coarser if ``max_work`` demands), the budget left is spent
    by a greedy top-up, and the Lagrangian's answer is returned instead when it is better (both are feasible;
    ``solver`` says which).

    :param sizes: elements per item, ``[N]``.
    :param dists: distortion per item and rate, ``[N, B]`` (``inf`` forbids a rate).
    :param rates: bits per element of each choice, ``[B]``, or per item and choice, ``[N, B]`` (an entropy
        rate); ``Allocation.bits`` is then each item's rate, and ``choice`` indexes the columns.
    :param unit: force a DP over all items on a grid of ``unit`` bits (exact when every cost is a multiple of
        it, e.g. ``unit=1`` with integer costs; otherwise costs rounded up and topped up as above).
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    dists = np.asarray(dists, dtype=np.float64)
    rates = np.asarray(rates, dtype=np.float64)
    _check(sizes, dists, rates)
    true_cost = sizes[:, None] * _rate_matrix(sizes, rates)
    allowed = np.where(np.isfinite(dists), true_cost, np.inf)
    if not np.isfinite(dists.min(axis=1)).all() or allowed.min(axis=1).sum() > budget_bits:
        raise QcoreError(f"impossible bit budget: the smallest allowed rates need {allowed.min(axis=1).sum():.0f} "
                         f"bits but the budget is {budget_bits:.0f}; raise the target or lower the minimum bits")
    hull, _, lam, dual = _lagrangian_search(sizes, dists, rates, budget_bits)  # milliseconds: bound and core
    if unit is None:
        return _core_dp(sizes, dists, rates, true_cost, budget_bits, hull, lam, dual, resolution, max_work)
    exact = bool(np.allclose(true_cost / unit, np.rint(true_cost / unit)))
    cost = np.rint(true_cost / unit).astype(np.int64) if exact else np.ceil(true_cost / unit - 1e-9).astype(np.int64)
    cap = int(math.floor(budget_bits / unit + 1e-9))
    choice = _dp(cost, dists, cap)
    if choice is None:
        raise QcoreError("impossible bit budget: no allocation fits on the budget grid; raise the target bits")
    if exact:
        return _result(choice, sizes, dists, rates, "dp (exact grid)", hull.lower_bound, optimal=True)
    best = _result(_top_up(choice, true_cost, dists, budget_bits), sizes, dists, rates,
                   f"dp (grid of {unit:g} bits, topped up)", hull.lower_bound)
    return hull if hull.distortion < best.distortion else best


def _core_dp(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray, true_cost: np.ndarray, budget_bits: float,
             hull: Allocation, lam: float, dual: float, resolution: float, max_work: float) -> Allocation:
    """:func:`solve_dp`'s default: reduced-cost fixing around the Lagrangian answer ``hull``, then a DP over the
    items whose choice is still open."""
    n = len(sizes)
    rows = np.arange(n)
    obj = np.where(np.isfinite(dists), dists + lam * true_cost, np.inf)
    best_obj = obj.min(axis=1, keepdims=True)
    reduced = obj - best_obj
    slack = hull.distortion - dual  # no allocation better than the hull's has reduced costs summing above this
    tol = 1e-9 * (np.abs(dists) + lam * true_cost + np.abs(best_obj)) + 1e-12 * abs(hull.distortion)
    open_ = np.isfinite(obj) & (reduced <= max(slack, 0.0) + tol)
    open_[rows, hull.choice] = True
    free = np.flatnonzero(open_.sum(axis=1) > 1)
    if len(free) == 0:  # every other choice is provably worse: the Lagrangian's answer is the optimum
        return dataclasses.replace(hull, solver="dp (exact grid, every item fixed by its reduced cost)",
                                   optimal=True)
    fixed = np.setdiff1d(rows, free)
    c = np.where(open_[free], true_cost[free], np.inf)
    base = c.min(axis=1, keepdims=True)
    delta = np.where(open_[free], c - base, 0.0)
    room = budget_bits - float(true_cost[fixed, hull.choice[fixed]].sum()) - float(base.sum())
    d_core = np.where(open_[free], dists[free], np.inf)
    ints = np.rint(delta).astype(np.int64)
    grid = 0.0
    if np.allclose(delta, ints, rtol=0, atol=1e-6) and (ints > 0).any():
        g = int(np.gcd.reduce(ints[ints > 0]))
        if len(free) * room / g <= max_work:
            grid = float(g)
    exact = grid > 0
    if not exact:
        # each open item wastes less than one grid step of budget: together at most `resolution` average bits
        grid = max(resolution * float(sizes.sum()) / len(free), len(free) * room / max_work, 1e-12)
    cost = np.rint(delta / grid).astype(np.int64) if exact else np.ceil(delta / grid - 1e-9).astype(np.int64)
    cap = int(math.floor(room / grid + 1e-9))
    core = _dp(cost, d_core, cap)
    choice = hull.choice.copy()
    if core is not None:
        choice[free] = core
    label = f"dp (exact grid, {len(free)} of {n} items open after reduced-cost fixing, grid {grid:g} bits)"
    if exact and core is not None:
        return _result(choice, sizes, dists, rates, label, hull.lower_bound, optimal=True)
    best = _result(_top_up(choice, true_cost, dists, budget_bits), sizes, dists, rates,
                   f"dp ({len(free)} of {n} items open after reduced-cost fixing, grid of {grid:g} bits rounded "
                   "up, topped up)", hull.lower_bound)
    return hull if hull.distortion < best.distortion or core is None else best


def solve_lagrangian(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray, lam: float) -> Allocation:
    """Each item picks ``argmin_k dists[i, k] + lam * sizes[i] * rates[k]`` (ties: the lower rate)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    dists = np.asarray(dists, dtype=np.float64)
    rates = np.asarray(rates, dtype=np.float64)
    _check(sizes, dists, rates)
    rm = _rate_matrix(sizes, rates)
    obj = dists + lam * sizes[:, None] * rm
    if rates.ndim == 1:
        order = np.argsort(rates, kind="stable")  # argmin takes the first minimum: make that the lowest rate
        choice = order[np.argmin(obj[:, order], axis=1)]
    else:  # per-item rates: among equal objectives take the lowest rate
        best = obj.min(axis=1, keepdims=True)
        choice = np.argmin(np.where(obj <= best, rm, np.inf), axis=1)
    return _result(choice, sizes, dists, rates)


def _log2_lambda_range(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray) -> tuple[float, float]:
    """``log2`` bounds of the multipliers at which some item changes its choice: below the lower one every item
    takes its lowest-distortion rate, above the upper one its lowest rate. Taken from the data, so distortions
    of any magnitude (1e-20 as well as 1e6) are searched at full resolution. Memory: ``[items, choices]``."""
    cost = sizes[:, None] * _rate_matrix(sizes, rates)
    d = np.where(np.isfinite(dists), dists, np.nan)
    lo, hi = np.inf, -np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        for j in range(d.shape[1]):  # slopes between choice j and every other choice of each item
            dc = cost - cost[:, j:j + 1]
            slopes = (d[:, j:j + 1] - d) / dc
            ok = np.isfinite(slopes) & (slopes > 0) & (dc > 0)
            if ok.any():
                lo, hi = min(lo, float(slopes[ok].min())), max(hi, float(slopes[ok].max()))
    if not np.isfinite(lo):
        return -60.0, 60.0
    return float(np.log2(lo)) - 2.0, float(np.log2(hi)) + 2.0


def lagrangian_for_budget(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray, budget_bits: float,
                          iters: int = 200) -> tuple[Allocation, float]:
    """Bisect ``lam`` (in log space, over the range where choices change) for the lowest-distortion Lagrangian
    solution within ``budget_bits``.

    Returns the allocation and its multiplier. Never exceeds the budget; may leave some budget unused (the
    next hull point may not fit), which is the price of the Lagrangian relaxation. The allocation carries the
    dual bound ``max_lam sum_i min_k (d_ik + lam c_ik) - lam B`` over the multipliers tried.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    dists = np.asarray(dists, dtype=np.float64)
    rates = np.asarray(rates, dtype=np.float64)
    _check(sizes, dists, rates)
    alloc, lam, _, _ = _lagrangian_search(sizes, dists, rates, budget_bits, iters)
    return alloc, lam


def _lagrangian_search(sizes: np.ndarray, dists: np.ndarray, rates: np.ndarray, budget_bits: float,
                       iters: int = 200) -> tuple[Allocation, float, float, float]:
    """:func:`lagrangian_for_budget`, also returning the multiplier with the best dual bound and that bound."""
    lo, hi = _log2_lambda_range(sizes, dists, rates)
    finite = np.where(np.isfinite(dists), dists, np.inf)
    bound, bound_lam = float(finite.min(axis=1).sum()), 0.0  # the dual at lam = 0: exact when the budget does not bind

    def at(log_lam: float) -> Allocation:
        nonlocal bound, bound_lam
        a = solve_lagrangian(sizes, dists, rates, 2.0**log_lam)
        value = a.distortion + 2.0**log_lam * (a.total_bits - budget_bits)
        if value > bound:
            bound, bound_lam = value, 2.0**log_lam
        return a

    top = at(hi)
    if top.total_bits > budget_bits:
        raise QcoreError(f"impossible bit budget: even the lowest rates need {top.total_bits:.0f} bits but the "
                         f"budget is {budget_bits:.0f}")
    best, best_lam = top, 2.0**hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        a = at(mid)
        if a.total_bits <= budget_bits:
            if a.distortion <= best.distortion:
                best, best_lam = a, 2.0**mid
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-9:
            break
    at(lo)
    bound = min(float(bound), best.distortion)
    return (_result(best.choice, sizes, dists, rates, "lagrangian", bound), best_lam, bound_lam, bound)
