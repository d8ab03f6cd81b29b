"""Per-channel bit allocation (paper eq. 10-11), solved exactly as an integer problem.

The paper minimises the total quantization noise ``sum_i D_i(M_i)`` of a tensor's channels under a quota. Its
continuous solution gives channel ``i`` a share of the bins proportional to ``alpha_i^(2/3)`` (eq. 10); the
seed rounds ``log2`` of it (eq. 11) and re-targets the average in up to ten approximate steps, which can end
above the budget. Here the same objective is solved exactly over integers with qcore's knapsack DP: the
average bit-width never exceeds the target and no other integer allocation has less modelled noise.

Distortion models per channel (``scale_i`` is the channel's spread):

* ``rule`` (the paper's): ``D_i(M) = scale_i^2 4^-M`` — uniform noise of ``2^M`` bins on a window
  proportional to the spread (its continuous optimum is the ``alpha^(2/3)`` rule);
* ``noise``: the expected MSE of the quantizer that will really run: for activations ACIQ's optimal-clip MSE
  of the fitted prior on qcore's grid (clipping noise included), for min/max weights the rounding noise
  ``range_i^2 / (12 (2^M - 1)^2)``. A 0-bit channel becomes its mean: ``D_i(0)`` is its variance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qcore import QcoreError
from qcore.knapsack import solve_dp
from qcore_aciq.clipping import optimal_mse


def rule_distortion(scale: np.ndarray, bits: Sequence[int]) -> np.ndarray:
    """``[channels, bits]``: ``scale^2 4^-M`` (eq. 10's objective)."""
    b = np.asarray(bits, dtype=np.float64)
    return np.asarray(scale, dtype=np.float64)[:, None] ** 2 * 4.0 ** (-b)[None, :]


def prior_distortion(scale: np.ndarray, half: np.ndarray, bits: Sequence[int], prior: str, model: str = "grid",
                     symmetric: bool = False) -> np.ndarray:
    """``[channels, bits]``: expected MSE of each channel at its ACIQ-optimal clip (a scale-``scale`` prior)."""
    scale = np.asarray(scale, dtype=np.float64)
    half = np.asarray(half, dtype=bool)
    out = np.empty((len(scale), len(bits)))
    for k, b in enumerate(bits):
        full = optimal_mse(int(b), prior, model, False, symmetric)
        pos = optimal_mse(int(b), prior, model, True, symmetric)
        out[:, k] = scale**2 * np.where(half, pos, full)
    return out


def minmax_distortion(lo: np.ndarray, hi: np.ndarray, var: np.ndarray, bits: Sequence[int]) -> np.ndarray:
    """``[channels, bits]``: rounding noise of a min/max grid; the variance at 0 bits."""
    rng = np.asarray(hi, dtype=np.float64) - np.asarray(lo, dtype=np.float64)
    b = np.asarray(bits, dtype=np.float64)
    steps = np.maximum(2.0**b - 1, 1.0)
    out = rng[:, None] ** 2 / (12.0 * steps[None, :] ** 2)
    return np.where(b[None, :] == 0, np.asarray(var, dtype=np.float64)[:, None], out)


def allocate_channel_bits(dist: np.ndarray, bits: Sequence[int], target: float) -> np.ndarray:
    """Integer bits per channel minimising ``sum_i dist[i, M_i]`` with ``mean(M_i) <= target``.

    :param dist: ``[channels, len(bits)]`` modelled distortion of each channel at each allowed bit-width.
    :param bits: the allowed bit-widths (the clamp), e.g. ``range(0, 9)``.
    :returns: the chosen bit-width per channel (int array).
    """
    dist = np.asarray(dist, dtype=np.float64)
    rates = np.asarray(bits, dtype=np.float64)
    channels = dist.shape[0]
    budget = float(np.floor(channels * target + 1e-9))
    if budget < channels * rates.min():
        raise QcoreError(f"impossible bit budget: an average of {target:g} bits is below the minimum of "
                         f"{rates.min():g} bits per channel; raise the target or lower alloc_min_bits")
    if budget >= channels * rates.max():
        return np.full(channels, int(rates.max()), dtype=np.int64)
    alloc = solve_dp(np.ones(channels), dist, rates, budget, unit=1.0)
    return alloc.bits.astype(np.int64)
