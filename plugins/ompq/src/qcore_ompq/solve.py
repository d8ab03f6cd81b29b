"""One bit-width per layer under a size budget and an optional BOPs budget.

* :func:`solve_ilp`: the exact integer program with ``scipy.optimize.milp`` (HiGHS): binary ``x[i, k]`` (layer i
  takes ``bits[k]``), one choice per layer, ``sum n_i b x <= size_budget`` and ``sum m_i b x <= bops_budget``,
  minimising ``sum D[i, k] x[i, k]``. The answer is checked in exact integer arithmetic and never exceeds a budget.
* :func:`solve_joint`: the same program with a weight and an activation bit-width per layer (``-o act_bits=search``):
  binary ``x[i, k, a]`` (layer i takes weight ``w_bits[k]`` and input ``a_bits[a]``), the size budget on the weight
  bits and the BOPs budget on ``sum m_i w a x`` (BOPs are bilinear in the two bit-widths, so each pair is one
  variable), minimising ``sum (Dw[i, k] + Da[i, a]) x[i, k, a]``; checked in exact arithmetic like the weight path.
* :func:`brute_force` / :func:`brute_force_joint`: every assignment (the references for tests on small problems).
* :func:`solve_seed`: the seed's path for comparison (spec section 4-5): SLSQP from ``x0 = 1`` on bit fractions in
  ``[min/8, max/8]`` with the linear objective, then a DFS over floor/ceil of each layer's continuous bits that
  stays within the continuous solution's bit budget and comes closest to it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

import qcore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Solution:
    """Bits per layer (``bits[i]``), the objective value, the totals it spends and which solver found it."""

    bits: list[int]
    objective: float
    size_bits: int
    bops: float
    solver: str
    a_bits: list[int] | None = None  # per layer, when activation bits were searched (solve_joint)


def _totals(sizes: Sequence[int], macs: Sequence[float] | None, bits: Sequence[int]) -> tuple[int, float]:
    size = sum(int(n) * int(b) for n, b in zip(sizes, bits, strict=True))
    bops = sum(float(m) * int(b) for m, b in zip(macs, bits, strict=True)) if macs is not None else 0.0
    return size, bops


def _check_inputs(sizes: Sequence[int], dist: np.ndarray, choices: Sequence[int]) -> np.ndarray:
    d = np.asarray(dist, dtype=np.float64)
    if d.shape != (len(sizes), len(choices)):
        raise ValueError(f"dist must be [layers, choices] = [{len(sizes)}, {len(choices)}], got {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("dist must be finite")
    return d


def _storage(sizes: Sequence[int], extra: np.ndarray | None, choices: Sequence[int], picks: Sequence[int]) -> int:
    """Stored weight bits of an assignment (``picks``: indices into ``choices``): elements plus the format's extra
    bits (integers, so the budget check is exact)."""
    total = sum(int(n) * int(choices[j]) for n, j in zip(sizes, picks, strict=True))
    if extra is not None:
        total += sum(int(extra[i, j]) for i, j in enumerate(picks))
    return total


def _infeasible(size_budget: float, bops_budget: float | None, sizes: Sequence[int], macs: Sequence[float] | None,
                choices: Sequence[int], storage_budget: float | None = None,
                extra: np.ndarray | None = None) -> qcore.QcoreError:
    low = min(choices)
    need, need_bops = _totals(sizes, macs, [low] * len(sizes))
    what = f"{need} weight bits at {low} bits everywhere > budget {int(size_budget)}"
    if storage_budget is not None:
        stored = _storage(sizes, extra, choices, [choices.index(low)] * len(sizes))
        if stored > storage_budget:
            what = f"{stored} stored weight bits at {low} bits everywhere > budget {int(storage_budget)}"
    if bops_budget is not None and need_bops > bops_budget:
        what = f"{need_bops / 1e9:.4g} G BOPs at {low} bits everywhere > budget {bops_budget / 1e9:.4g} G"
    return qcore.QcoreError(f"ompq: impossible budget ({what}); raise --target-bits / -o size_mb / -o bops_g, add "
                            "lower -o bit_choices or pin fewer layers (-o first_last=same)")


def _extra_matrix(extra: np.ndarray | None, n: int, k: int) -> np.ndarray | None:
    if extra is None:
        return None
    e = np.asarray(extra)
    if e.shape != (n, k) or not np.isfinite(e).all() or (e < 0).any() or (e != np.round(e)).any():
        raise ValueError(f"extra must be [layers, choices] = [{n}, {k}] non-negative integers (bits), got {e.shape}")
    return e.astype(np.int64)


def solve_ilp(sizes: Sequence[int], dist: np.ndarray, choices: Sequence[int], size_budget: float,
              macs: Sequence[float] | None = None, bops_budget: float | None = None,
              extra: np.ndarray | None = None, storage_budget: float | None = None) -> Solution:
    """Exact minimum of ``sum D[i, choice_i]`` with ``sum sizes_i * bits`` <= ``size_budget`` (weight bits) and,
    when given, ``sum macs_i * bits <= bops_budget`` (``macs_i`` already multiplied by the layer's activation
    bits) and ``sum sizes_i * bits + extra[i, choice_i] <= storage_budget`` (``extra``: ``[layers, choices]``
    integer bits a format stores beyond the elements, :meth:`qcore.Quantizer.extra_bits`; zeros when None).
    Raises :class:`qcore.QcoreError` when no assignment fits."""
    d = _check_inputs(sizes, dist, choices)
    n, k = d.shape
    ex = _extra_matrix(extra, n, k)
    cap = math.floor(size_budget + 1e-9)
    store_cap = math.floor(storage_budget + 1e-9) if storage_budget is not None else None
    lowest = _totals(sizes, macs, [min(choices)] * n)
    low_pick = [list(choices).index(min(choices))] * n
    nothing_fits = functools.partial(_infeasible, size_budget, bops_budget, sizes, macs, list(choices),
                                     storage_budget, ex)
    if lowest[0] > cap or (bops_budget is not None and lowest[1] > bops_budget * (1 + 1e-12)) or (
            store_cap is not None and _storage(sizes, ex, choices, low_pick) > store_cap):
        raise nothing_fits()
    if n == 0:
        return Solution([], 0.0, 0, 0.0, "milp")
    b = np.asarray(choices, dtype=np.float64)
    size_row = (np.asarray(sizes, dtype=np.float64)[:, None] * b[None, :]).reshape(1, -1)
    store_row = None
    if store_cap is not None:
        store_row = size_row + (ex.reshape(1, -1).astype(np.float64) if ex is not None else 0.0)
    bops_row = None
    if bops_budget is not None:
        if macs is None:
            raise ValueError("a BOPs budget needs macs")
        bops_row = (np.asarray(macs, dtype=np.float64)[:, None] * b[None, :]).reshape(1, -1)

    def fits(pick: np.ndarray) -> bool:
        bits = [int(choices[j]) for j in pick]
        size, bops = _totals(sizes, macs, bits)
        return size <= cap and (bops_budget is None or bops <= bops_budget * (1 + 1e-12)) and (
            store_cap is None or _storage(sizes, ex, choices, list(pick)) <= store_cap)

    pick = _milp_pick(d, size_row, cap, bops_row, bops_budget, store_row, store_cap, fits, float(min(sizes)))
    if pick is None:
        raise nothing_fits()
    bits = [int(choices[j]) for j in pick]
    size, bops = _totals(sizes, macs, bits)
    return Solution(bits, float(d[np.arange(n), pick].sum()), size, bops, "milp (HiGHS)")


def _milp_pick(d: np.ndarray, size_row: np.ndarray, cap: int, bops_row: np.ndarray | None,
               bops_budget: float | None, store_row: np.ndarray | None, store_cap: int | None,
               fits: Callable[[np.ndarray], bool], step: float) -> np.ndarray | None:
    """The MILP both solvers share: one option per row of ``d`` ([n, K]; rows of the constraint matrices are
    flattened the same way), minimising the summed ``d``; returns each row's option index, None when infeasible.
    ``fits`` checks an answer in exact arithmetic; an answer over budget by the solver's tolerance is retried with
    the size (and storage) caps tightened by ``step``, doubling."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, k = d.shape
    one = np.zeros((n, n * k))
    for i in range(n):
        one[i, i * k:(i + 1) * k] = 1.0
    # centre each layer's row: same optimum (one choice per layer), better conditioned for HiGHS
    c = (d - d.min(axis=1, keepdims=True)).reshape(-1)
    scale = float(np.abs(c).max()) or 1.0
    shrink = 0.0
    for _attempt in range(4):
        rows = [LinearConstraint(one, 1.0, 1.0), LinearConstraint(size_row, -np.inf, float(cap) - shrink)]
        if store_row is not None and store_cap is not None:
            rows.append(LinearConstraint(store_row, -np.inf, float(store_cap) - shrink))
        if bops_row is not None and bops_budget is not None:
            rows.append(LinearConstraint(bops_row, -np.inf, float(bops_budget)))
        res = milp(c / scale, constraints=rows, integrality=np.ones(n * k), bounds=Bounds(0, 1),
                   options={"mip_rel_gap": 0.0})
        if res.x is None:
            return None
        pick = np.asarray(res.x).reshape(n, k).argmax(axis=1)
        if fits(pick):
            return pick
        shrink = max(shrink * 2, step)  # the solver's tolerance let it over: tighten and retry
        log.debug("ompq: milp answer over budget by tolerance, retrying %d bits tighter", shrink)
    raise qcore.QcoreError("ompq: the MILP solver kept answering over budget; report this with the command")


def _joint_totals(sizes: Sequence[int], macs: Sequence[float], w: Sequence[int], a: Sequence[int]) -> tuple[int, float]:
    size = sum(int(n) * int(b) for n, b in zip(sizes, w, strict=True))
    bops = sum(float(m) * int(b) * int(c) for m, b, c in zip(macs, w, a, strict=True))
    return size, bops


def solve_joint(sizes: Sequence[int], w_dist: np.ndarray, a_dist: np.ndarray, w_choices: Sequence[int],
                a_choices: Sequence[int], size_budget: float, macs: Sequence[float], bops_budget: float,
                extra: np.ndarray | None = None, storage_budget: float | None = None) -> Solution:
    """Exact minimum of ``sum Dw[i, w_i] + Da[i, a_i]`` over a weight bit ``w_i`` (from ``w_choices``) and an
    input bit ``a_i`` (from ``a_choices``) per layer, with ``sum sizes_i w_i <= size_budget``,
    ``sum macs_i w_i a_i <= bops_budget`` (``macs_i``: the layer's MACs, not yet multiplied by any bits) and, when
    given, ``sum sizes_i w_i + extra[i, w_i] <= storage_budget``. Raises :class:`qcore.QcoreError` when nothing
    fits. The answer's ``a_bits`` holds the activation bits."""
    wd = _check_inputs(sizes, w_dist, w_choices)
    ad = np.asarray(a_dist, dtype=np.float64)
    n, kw = wd.shape
    ka = len(a_choices)
    if ad.shape != (n, ka) or not np.isfinite(ad).all():
        raise ValueError(f"a_dist must be finite [layers, act choices] = [{n}, {ka}], got {ad.shape}")
    if len(macs) != n:
        raise ValueError(f"macs must have one entry per layer ({n}), got {len(macs)}")
    ex = _extra_matrix(extra, n, kw)
    cap = math.floor(size_budget + 1e-9)
    store_cap = math.floor(storage_budget + 1e-9) if storage_budget is not None else None
    wl, al = list(w_choices).index(min(w_choices)), list(a_choices).index(min(a_choices))
    low_size, low_bops = _joint_totals(sizes, macs, [w_choices[wl]] * n, [a_choices[al]] * n)
    # the error names the lowest plan's cost: every layer at the fewest weight and input bits
    nothing_fits = functools.partial(_infeasible, size_budget, bops_budget, sizes,
                                     [float(m) * a_choices[al] for m in macs], list(w_choices), storage_budget, ex)
    if low_size > cap or low_bops > bops_budget * (1 + 1e-12) or (
            store_cap is not None and _storage(sizes, ex, w_choices, [wl] * n) > store_cap):
        raise nothing_fits()
    if n == 0:
        return Solution([], 0.0, 0, 0.0, "milp (HiGHS), joint weight/activation bits", [])
    wb = np.asarray(w_choices, dtype=np.float64)
    ab = np.asarray(a_choices, dtype=np.float64)
    # option index o = k * ka + a (weight choice k, activation choice a)
    d = (wd[:, :, None] + ad[:, None, :]).reshape(n, kw * ka)
    size_row = np.repeat(np.asarray(sizes, dtype=np.float64)[:, None] * wb[None, :], ka, axis=1).reshape(1, -1)
    bops_row = (np.asarray(macs, dtype=np.float64)[:, None, None] * wb[None, :, None] * ab[None, None, :]
                ).reshape(1, -1)
    store_row = None
    if store_cap is not None:
        store_row = size_row + (np.repeat(ex, ka, axis=1).reshape(1, -1).astype(np.float64) if ex is not None
                                else 0.0)

    def split(pick: np.ndarray) -> tuple[list[int], list[int]]:
        return [int(p) // ka for p in pick], [int(p) % ka for p in pick]

    def fits(pick: np.ndarray) -> bool:
        kk, aa = split(pick)
        size, bops = _joint_totals(sizes, macs, [w_choices[j] for j in kk], [a_choices[j] for j in aa])
        return size <= cap and bops <= bops_budget * (1 + 1e-12) and (
            store_cap is None or _storage(sizes, ex, w_choices, kk) <= store_cap)

    pick = _milp_pick(d, size_row, cap, bops_row, bops_budget, store_row, store_cap, fits, float(min(sizes)))
    if pick is None:
        raise nothing_fits()
    kk, aa = split(pick)
    w = [int(w_choices[j]) for j in kk]
    a = [int(a_choices[j]) for j in aa]
    size, bops = _joint_totals(sizes, macs, w, a)
    return Solution(w, float(d[np.arange(n), pick].sum()), size, bops, "milp (HiGHS), joint weight/activation bits",
                    a)


def brute_force_joint(sizes: Sequence[int], w_dist: np.ndarray, a_dist: np.ndarray, w_choices: Sequence[int],
                      a_choices: Sequence[int], size_budget: float, macs: Sequence[float], bops_budget: float,
                      extra: np.ndarray | None = None, storage_budget: float | None = None) -> Solution | None:
    """Every (weight, activation) assignment in turn: the reference :func:`solve_joint` is tested against (same
    arguments); None when nothing fits."""
    wd = _check_inputs(sizes, w_dist, w_choices)
    ad = np.asarray(a_dist, dtype=np.float64)
    ex = _extra_matrix(extra, *wd.shape)
    best: Solution | None = None
    n = len(sizes)
    for kk in itertools.product(range(len(w_choices)), repeat=n):
        if sum(int(s) * int(w_choices[j]) for s, j in zip(sizes, kk, strict=True)) > size_budget + 1e-9:
            continue
        if storage_budget is not None and _storage(sizes, ex, w_choices, kk) > storage_budget + 1e-9:
            continue
        for aa in itertools.product(range(len(a_choices)), repeat=n):
            w = [int(w_choices[j]) for j in kk]
            a = [int(a_choices[j]) for j in aa]
            size, bops = _joint_totals(sizes, macs, w, a)
            if bops > bops_budget * (1 + 1e-12):
                continue
            obj = float(sum(wd[i, kk[i]] + ad[i, aa[i]] for i in range(n)))
            if best is None or obj < best.objective - 1e-12:
                best = Solution(w, obj, size, bops, "brute force", a)
    return best


def brute_force(sizes: Sequence[int], dist: np.ndarray, choices: Sequence[int], size_budget: float,
                macs: Sequence[float] | None = None, bops_budget: float | None = None,
                extra: np.ndarray | None = None, storage_budget: float | None = None) -> Solution | None:
    """Every assignment in turn (``len(choices) ** layers``): the reference :func:`solve_ilp` is tested against
    (same arguments); None when nothing fits."""
    d = _check_inputs(sizes, dist, choices)
    ex = _extra_matrix(extra, *d.shape)
    best: Solution | None = None
    for pick in itertools.product(range(len(choices)), repeat=len(sizes)):
        bits = [int(choices[j]) for j in pick]
        size, bops = _totals(sizes, macs, bits)
        if size > size_budget + 1e-9 or (bops_budget is not None and bops > bops_budget * (1 + 1e-12)):
            continue
        if storage_budget is not None and _storage(sizes, ex, choices, pick) > storage_budget + 1e-9:
            continue
        obj = float(sum(d[i, j] for i, j in enumerate(pick)))
        if best is None or obj < best.objective - 1e-12:
            best = Solution(bits, obj, size, bops, "brute force")
    return best


def solve_seed(sizes: Sequence[int], omega: Sequence[float], min_bits: int, max_bits: int,
               size_budget: float) -> Solution:
    """The seed's solver: SLSQP maximising ``sum omega_i x_i`` over ``x_i = b_i / 8 in [min/8, max/8]`` with
    ``sum x_i n_i <= size_budget / 8`` from ``x0 = 1`` (scipy defaults), then the DFS over floor/ceil of
    ``8 x_i`` within the continuous bit total. Kept for comparison (``-o solver=seed``); it optimises the seed's
    linear objective only and ignores any BOPs budget."""
    from scipy.optimize import minimize

    n = len(sizes)
    if n == 0:
        return Solution([], 0.0, 0, 0.0, "seed (SLSQP + DFS)")
    w = np.asarray(omega, dtype=np.float64)
    s = np.asarray(sizes, dtype=np.float64)
    if min_bits * s.sum() > size_budget + 1e-9:
        raise _infeasible(size_budget, None, sizes, None, list(range(min_bits, max_bits + 1)))
    res = minimize(lambda x: float(-(w * x).sum()), np.ones(n), jac=lambda x: -w, method="SLSQP",
                   bounds=[(min_bits / 8, max_bits / 8)] * n,
                   constraints=[{"type": "ineq", "fun": lambda x: size_budget / 8 - float((x * s).sum()),
                                 "jac": lambda x: -s}])
    cont = np.clip(8 * np.asarray(res.x), min_bits, max_bits)
    threshold = min(float((cont * s).sum()), float(size_budget))
    lo = np.floor(cont + 1e-9).astype(int)
    hi = np.ceil(cont - 1e-9).astype(int)
    # DFS (the seed's, with pruning of partial sums above the threshold; floor of the remaining layers as bound)
    best_bits: list[int] | None = None
    best_gap = math.inf
    floor_rest = np.concatenate([np.cumsum((lo * s)[::-1])[::-1], [0.0]])
    stack: list[tuple[int, float, list[int]]] = [(0, 0.0, [])]
    visited = 0
    while stack and visited < 2_000_000:
        i, total, chosen = stack.pop()
        visited += 1
        if i == n:
            gap = threshold - total
            if 0 <= gap < best_gap:
                best_gap, best_bits = gap, chosen
            continue
        for b in {int(lo[i]), int(hi[i])}:
            t = total + b * s[i]
            if t + floor_rest[i + 1] <= threshold + 1e-6:
                stack.append((i + 1, t, chosen + [b]))
    if best_bits is None:  # cannot happen when the floors fit; keep the floors
        best_bits = [int(v) for v in lo]
    size, _ = _totals(sizes, None, best_bits)
    return Solution(best_bits, float(-(w * np.asarray(best_bits)).sum()), size, 0.0, "seed (SLSQP + DFS)")
