"""The clip tables: the paper's mid-rise optimum, and the optimum for the grid qcore really uses checked
against a Monte-Carlo minimisation of the empirical MSE of core's fake quantizer."""

import math

import numpy as np
import pytest
import torch

from qcore.ops import fake_quantize, qparams_from_range
from qcore_aciq.clipping import grid_levels, grid_mse, midrise_mse, optimal_alpha, optimal_mse

# the paper (eq. 6) and the seed's tables: Laplace alpha/b and Gaussian alpha/sigma at 2, 3, 4 bits
PAPER = {("laplace", 2): 2.83, ("laplace", 3): 3.90, ("laplace", 4): 5.03,
         ("gauss", 2): 1.71, ("gauss", 3): 2.15, ("gauss", 4): 2.56}


@pytest.mark.parametrize(("prior", "bits"), list(PAPER))
def test_midrise_alpha_matches_the_paper(prior, bits):
    assert optimal_alpha(bits, prior, "midrise") == pytest.approx(PAPER[(prior, bits)], abs=0.006)


@pytest.mark.parametrize("prior", ["laplace", "gauss"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_midrise_alpha_is_the_analytic_optimum(prior, bits):
    a = optimal_alpha(bits, prior, "midrise")
    if prior == "laplace":  # eq. 6 holds at the root
        assert a == pytest.approx(3 * 4.0**bits * math.exp(-a), rel=1e-9)
    h = 1e-4 * a  # and it is a minimum of the closed-form MSE
    assert midrise_mse(a, bits, prior) <= min(midrise_mse(a - h, bits, prior), midrise_mse(a + h, bits, prior))


def test_half_range_midrise_is_the_signed_table_one_bit_up():
    for bits in range(1, 8):
        assert optimal_alpha(bits, "laplace", "midrise", half=True) == optimal_alpha(bits + 1, "laplace", "midrise")


def _sample(prior: str, half: bool, n: int, seed: int) -> torch.Tensor:
    """Stratified Monte-Carlo sample: one uniform draw in each of ``n`` equal-probability strata, mapped
    through the inverse CDF (unbiased, and its tails are as well represented as its bulk)."""
    g = torch.Generator().manual_seed(seed)
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
    if half:
        return -torch.log1p(-u) if prior == "laplace" else torch.special.ndtri((1 + u) / 2)
    if prior == "laplace":
        return -torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())
    return torch.special.ndtri(u)


def _empirical_mse(x: torch.Tensor, alpha: float, bits: int, half: bool) -> float:
    lo = torch.tensor(0.0 if half else -alpha, dtype=torch.float64)
    s, z, qmin, qmax = qparams_from_range(lo, torch.tensor(alpha, dtype=torch.float64),
                                          torch.tensor(float(bits)), False)
    xq = fake_quantize(x.float(), s, z, qmin, qmax)
    return float((xq.double() - x).pow(2).mean())


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("prior", ["laplace", "gauss"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_grid_alpha_is_within_2_percent_of_the_monte_carlo_minimum(prior, bits, half):
    x = _sample(prior, half, 200_000, seed=bits)
    a = optimal_alpha(bits, prior, "grid", half=half)
    factors = torch.linspace(0.9, 1.1, 41).tolist()
    errs = [_empirical_mse(x, a * f, bits, half) for f in factors]
    best = factors[min(range(len(errs)), key=errs.__getitem__)]
    assert abs(best - 1.0) <= 0.02


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("prior", ["laplace", "gauss"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_grid_mse_integral_equals_brute_force_quadrature(prior, bits, half):
    a = optimal_alpha(bits, prior, "grid", half=half)
    levels = grid_levels(a, bits, half)
    x = np.linspace(0.0 if half else -40.0, 40.0, 4_000_001)
    nearest = levels[np.clip(np.searchsorted((levels[1:] + levels[:-1]) / 2, x), 0, len(levels) - 1)]
    if prior == "laplace":
        pdf = np.exp(-np.abs(x)) * (1.0 if half else 0.5)
    else:
        pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) * (2.0 if half else 1.0)
    assert grid_mse(a, bits, prior, half) == pytest.approx(np.trapezoid((x - nearest) ** 2 * pdf, x), rel=1e-5)


def test_grid_clip_is_smaller_than_the_paper_at_low_bits():
    for prior in ("laplace", "gauss"):
        for bits in (2, 3):
            assert optimal_alpha(bits, prior, "grid") < optimal_alpha(bits, prior, "midrise")


def test_optimal_mse_decreases_with_bits_and_is_the_variance_at_zero():
    assert optimal_mse(0, "laplace") == 2.0 and optimal_mse(0, "gauss") == 1.0
    for prior in ("laplace", "gauss"):
        vals = [optimal_mse(b, prior) for b in range(0, 9)]
        assert all(a > b for a, b in zip(vals, vals[1:], strict=False))
