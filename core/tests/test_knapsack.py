"""The allocation solvers against brute force."""

import itertools

import numpy as np
import pytest

from qcore._errors import QcoreError
from qcore.knapsack import lagrangian_for_budget, solve_dp, solve_lagrangian


def brute(sizes, dists, rates, budget):
    best = (np.inf, None)
    for combo in itertools.product(range(len(rates)), repeat=len(sizes)):
        bits = sum(s * rates[k] for s, k in zip(sizes, combo, strict=True))
        if bits <= budget:
            d = sum(dists[i, k] for i, k in enumerate(combo))
            if d < best[0]:
                best = (d, combo)
    return best


def problem(seed, n=5, rates=(0, 1, 2, 3, 4, 6)):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, n)
    rates = np.array(rates, dtype=float)
    # decreasing, roughly exponential curves with noise, as RD curves are
    scale = rng.uniform(0.5, 5.0, n)[:, None]
    dists = scale * 2.0 ** (-rates[None, :]) + rng.uniform(0, 0.05, (n, len(rates)))
    return sizes, dists, rates


@pytest.mark.parametrize("seed", range(8))
def test_dp_equals_brute_force(seed):
    sizes, dists, rates = problem(seed)
    for target in (0.5, 1.7, 3.0):
        budget = target * sizes.sum()
        want, _ = brute(sizes, dists, rates, budget)
        got = solve_dp(sizes, dists, rates, budget, unit=1)
        assert got.total_bits <= budget
        assert got.distortion == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_coarse_grid_never_exceeds_budget(seed):
    sizes, dists, rates = problem(seed, n=30)
    sizes = sizes * 37
    for target in (1.0, 2.5, 4.0):
        got = solve_dp(sizes, dists, rates, target * sizes.sum())  # default grid: 1e-3 bit average
        assert got.total_bits <= target * sizes.sum()
        exact = solve_dp(sizes, dists, rates, target * sizes.sum(), unit=1)
        assert got.distortion <= exact.distortion * 1.02 + 1e-12


@pytest.mark.parametrize("seed", range(6))
def test_lagrangian_points_lie_on_the_dp_frontier(seed):
    sizes, dists, rates = problem(seed)
    for lam in (1e-3, 1e-2, 0.05, 0.2, 1.0):
        lg = solve_lagrangian(sizes, dists, rates, lam)
        dp = solve_dp(sizes, dists, rates, lg.total_bits, unit=1)
        assert lg.distortion == pytest.approx(dp.distortion, rel=1e-12)


def test_lagrangian_for_budget_respects_budget():
    sizes, dists, rates = problem(3, n=40)
    for target in (0.8, 2.0, 3.5):
        a, lam = lagrangian_for_budget(sizes, dists, rates, target * sizes.sum())
        assert a.total_bits <= target * sizes.sum() and lam > 0
        assert a.distortion >= solve_dp(sizes, dists, rates, target * sizes.sum(), unit=1).distortion - 1e-12


def test_impossible_budget():
    sizes, dists, rates = problem(0)
    dists[:, 0] = np.inf  # 0 bits not allowed
    with pytest.raises(QcoreError, match="impossible bit budget"):
        solve_dp(sizes, dists, rates, 0.5 * sizes.sum(), unit=1)


def brute_matrix(sizes, dists, rate_matrix, budget):
    best = np.inf
    for combo in itertools.product(range(dists.shape[1]), repeat=len(sizes)):
        if sum(s * rate_matrix[i, k] for i, (s, k) in enumerate(zip(sizes, combo, strict=True))) <= budget:
            best = min(best, sum(dists[i, k] for i, k in enumerate(combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_per_item_rates_dp_matches_brute_force_and_lagrangian_stays_feasible(seed):
    """Entropy rates: every item has its own (non-integer) rate per choice."""
    sizes, dists, rates = problem(seed)
    rng = np.random.default_rng(100 + seed)
    rm = rates[None, :] * rng.uniform(0.5, 1.0, (len(sizes), len(rates)))  # an entropy is at most the width
    for target in (0.8, 2.0, 3.1):
        budget = target * sizes.sum()
        want = brute_matrix(sizes, dists, rm, budget)
        got = solve_dp(sizes, dists, rm, budget, resolution=1e-4)
        assert got.total_bits <= budget + 1e-9
        assert got.distortion <= want * (1 + 0.02) + 1e-12  # a fine grid: within rounding of the optimum
        np.testing.assert_allclose(got.bits, rm[np.arange(len(sizes)), got.choice])
        lg, _ = lagrangian_for_budget(sizes, dists, rm, budget)
        assert lg.total_bits <= budget + 1e-9 and lg.distortion >= want - 1e-12


def test_lagrangian_searches_the_multipliers_where_choices_change():
    """Distortions of 1e-20..1e-10 and an 8-bit target: a fixed log2(lambda) range of [-60, 60] stopped at 4.59
    bits with 100x the distortion; the range now comes from the data."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(100, 1000, 50).astype(float)
    rates = np.arange(0, 11, dtype=float)
    dists = np.exp(-0.7 * rates)[None, :] * rng.uniform(1e-20, 1e-10, (50, 1))
    a, _ = lagrangian_for_budget(sizes, dists, rates, 8 * sizes.sum())
    assert 7.99 <= a.total_bits / sizes.sum() <= 8.0
    exact = solve_dp(sizes, dists, rates, 8 * sizes.sum())
    assert exact.solver.startswith("dp (exact grid") and exact.optimal and a.solver == "lagrangian"
    assert a.distortion <= exact.distortion * 1.01


@pytest.mark.parametrize("seed", range(5))
def test_every_answer_names_its_solver_and_respects_the_dual_bound(seed):
    sizes, dists, rates = problem(seed, n=6)
    sizes = sizes * 7.3  # fractional costs: the DP runs on a rounded grid and tops up
    budget = 2.5 * sizes.sum()
    optimum, _ = brute(sizes, dists, rates, budget)
    for sol in (solve_dp(sizes, dists, rates, budget, max_work=10),
                lagrangian_for_budget(sizes, dists, rates, budget)[0]):
        assert sol.solver and sol.lower_bound is not None
        assert sol.lower_bound <= optimum + 1e-9 <= sol.distortion + 1e-9  # a true lower bound; feasible
        assert sol.gap == pytest.approx((sol.distortion - sol.lower_bound) / sol.distortion)


def test_the_dual_bound_is_exact_when_the_budget_does_not_bind():
    sizes, dists, rates = problem(3, n=6)
    sol, _ = lagrangian_for_budget(sizes, dists, rates, 100.0 * sizes.sum())  # every item can take its best rate
    assert sol.distortion == pytest.approx(dists.min(axis=1).sum()) and sol.gap == 0.0


@pytest.mark.parametrize("seed", range(8))
def test_default_dp_is_the_brute_force_optimum(seed):
    """The default: reduced-cost fixing around the Lagrangian answer, then an exact DP over the open items."""
    sizes, dists, rates = problem(seed)
    for target in (0.5, 1.7, 3.0):
        want, _ = brute(sizes, dists, rates, target * sizes.sum())
        got = solve_dp(sizes, dists, rates, target * sizes.sum())
        assert got.total_bits <= target * sizes.sum() and got.optimal and got.solver.startswith("dp (exact grid")
        assert got.distortion == pytest.approx(want, rel=1e-12)


def deit_like(seed, n=120):
    """DeiT-B-like group sizes (multiples of 6,144 weights) and noisy exponential curves."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([49_152, 49_152, 196_608, 30_720], size=n).astype(float)
    rates = np.arange(11, dtype=float)
    dists = rng.uniform(1e-6, 1e-2, (n, 1)) * 2.0 ** (-2 * rates[None, :]) * rng.uniform(0.8, 1.2, (n, 11))
    return sizes, dists, rates


@pytest.mark.parametrize("seed", range(4))
def test_default_dp_equals_the_full_exact_grid_and_beats_the_lagrangian(seed):
    """Against a DP over every item on the exact (gcd) grid: the same optimum; the Lagrangian's hull point is
    worse whenever the budget falls between two hull points, and the default DP does not return it then."""
    sizes, dists, rates = deit_like(seed)
    beaten = 0
    for target in (2.3, 4.0, 5.7):
        budget = target * sizes.sum()
        full = solve_dp(sizes, dists, rates, budget, unit=6144.0)
        got = solve_dp(sizes, dists, rates, budget)
        lg, _ = lagrangian_for_budget(sizes, dists, rates, budget)
        assert got.optimal and got.total_bits <= budget
        assert got.distortion == pytest.approx(full.distortion, rel=1e-12)
        assert got.lower_bound <= got.distortion <= lg.distortion
        beaten += got.distortion < lg.distortion * (1 - 1e-9)
    assert beaten >= 1


def test_fractional_costs_fall_back_to_a_rounded_core_grid_and_say_so():
    sizes, dists, rates = deit_like(0, n=40)
    sizes = sizes * 1.37  # no common grid: the open items' costs are rounded up, then topped up
    budget = 3.3 * sizes.sum()
    got = solve_dp(sizes, dists, rates, budget)
    lg, _ = lagrangian_for_budget(sizes, dists, rates, budget)
    assert got.total_bits <= budget and not got.optimal
    assert got.solver == "lagrangian" or "rounded up, topped up" in got.solver
    assert got.distortion <= lg.distortion
