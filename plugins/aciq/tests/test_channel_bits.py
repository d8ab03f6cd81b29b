"""Per-channel bit allocation: exact (equals brute force), never over budget, clamp respected."""

import itertools

import numpy as np
import pytest

from qcore import QcoreError
from qcore_aciq.channel_bits import allocate_channel_bits, minmax_distortion, prior_distortion, rule_distortion


def _brute(dist, bits, target):
    budget = int(np.floor(len(dist) * target + 1e-9))
    best_d = np.inf
    for combo in itertools.product(range(len(bits)), repeat=len(dist)):
        if sum(bits[k] for k in combo) > budget:
            continue
        d = sum(dist[i, k] for i, k in enumerate(combo))
        if d < best_d - 1e-15:
            best_d = d
    return best_d, budget


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("target", [0.5, 1.0, 2.25, 3.0, 3.8])
@pytest.mark.parametrize("model", ["rule", "prior", "minmax"])
def test_allocation_equals_brute_force_and_fits_the_budget(seed, target, model):
    rng = np.random.default_rng(seed)
    bits = [0, 1, 2, 3, 4, 5]
    scale = rng.lognormal(0.0, 1.0, size=5)
    if model == "rule":
        dist = rule_distortion(scale, bits)
    elif model == "prior":
        dist = prior_distortion(scale, rng.random(5) < 0.5, bits, "laplace")
    else:
        dist = minmax_distortion(-3 * scale, 2 * scale, scale**2, bits)
    got = allocate_channel_bits(dist, bits, target)
    best_d, budget = _brute(dist, bits, target)
    assert got.sum() <= budget
    assert dist[np.arange(5), got - bits[0]].sum() == pytest.approx(best_d, rel=1e-12)


def test_clamp_and_spreads():
    scale = np.array([1.0, 10.0, 100.0, 0.01])
    bits = list(range(2, 7))
    got = allocate_channel_bits(rule_distortion(scale, bits), bits, 4.0)
    assert got.min() >= 2 and got.max() <= 6 and got.sum() <= 16
    assert got[2] >= got[1] >= got[0] >= got[3]  # wider channels get more bits (the alpha^(2/3) rule's direction)


def test_zero_bit_distortion_is_the_variance_and_budget_errors():
    d = minmax_distortion(np.array([-1.0]), np.array([1.0]), np.array([0.3]), [0, 1, 2])
    assert d[0, 0] == 0.3 and d[0, 2] == pytest.approx(4 / (12 * 9))
    with pytest.raises(QcoreError, match="impossible bit budget"):
        allocate_channel_bits(rule_distortion(np.ones(3), [2, 3]), [2, 3], 1.5)
    assert (allocate_channel_bits(rule_distortion(np.ones(3), [0, 8]), [0, 8], 9.0) == 8).all()
