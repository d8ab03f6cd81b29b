"""Per-row statistics ACIQ fits its priors with: mean, the prior's scale (Laplace ``b`` or Gaussian ``sigma``),
the extremes, and whether a row is non-negative (the input of a layer that follows a ReLU).

Rows are ``[rows, values]`` samples: one row per tensor or per channel (see
:meth:`qcore.UniformFakeQuant.rows_of`). Signed rows fit the prior to all values; non-negative rows
fit its positive half (exponential or half-normal) to the positive values, because the zeros a ReLU makes are
exactly representable and cost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from qcore import QcoreError

BEstimator = Literal["mean", "median"]


@dataclass(frozen=True)
class RowStats:
    """Statistics of each row, all ``[rows]`` tensors.

    :param scale: the prior's scale: ``b`` (Laplace) or ``sigma`` (Gaussian); for ``half`` rows the scale of
        the positive part's exponential / half-normal fit.
    :param half: the row is non-negative (its clip window starts at 0).
    """

    mean: Tensor
    scale: Tensor
    lo: Tensor
    hi: Tensor
    half: Tensor
    std: Tensor


def row_stats(x: Tensor, prior: str = "laplace", b_estimator: BEstimator = "mean", half_range: bool = True
              ) -> RowStats:
    """Fit ``prior`` to each row of ``x``.

    Laplace ``b``: ``mean |x - mean(x)|`` (the seed's estimator) or ``mean |x - median(x)|`` (the maximum-likelihood
    fit). Gaussian ``sigma``: the standard deviation. Non-negative rows (when ``half_range``): exponential scale =
    mean of the positive values (median / ln 2 with ``b_estimator="median"``); half-normal ``sigma`` = root mean
    square of the positive values.
    """
    if prior not in ("laplace", "gauss"):
        raise QcoreError(f"unknown prior {prior!r}; use laplace or gauss")
    x = x.double()
    mean = x.mean(dim=1)
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    centred = x - mean[:, None]
    std = centred.pow(2).mean(dim=1).sqrt()
    if prior == "gauss":
        scale = std
    elif b_estimator == "median":
        scale = (x - x.median(dim=1).values[:, None]).abs().mean(dim=1)
    elif b_estimator == "mean":
        scale = centred.abs().mean(dim=1)
    else:
        raise QcoreError(f"unknown b estimator {b_estimator!r}; use mean or median")
    half = (lo >= 0) & torch.tensor(half_range)
    if half.any():
        pos = x > 0
        count = pos.sum(dim=1).clamp(min=1)
        if prior == "gauss":
            pscale = (x.pow(2) * pos).sum(dim=1).div(count).sqrt()
        elif b_estimator == "median":
            masked = torch.where(pos, x, torch.full_like(x, math.nan))
            pscale = masked.nanmedian(dim=1).values.nan_to_num(0.0) / math.log(2.0)
        else:
            pscale = (x * pos).sum(dim=1) / count
        scale = torch.where(half, pscale, scale)
    return RowStats(mean=mean.float(), scale=scale.float(), lo=lo.float(), hi=hi.float(), half=half,
                    std=std.float())
