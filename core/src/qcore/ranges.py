"""Range estimators: choose the clip range ``[lo, hi]`` of each row of a 2-D sample ``[rows, values]``.

A row is whatever shares one scale: a weight's output channel or channel group, an activation tensor
(one row) or an activation channel. Estimators are registered by name so calibrators (and the ``-o``
options that pick them) can refer to them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qcore.errors import QcoreError
from qcore.ops import quantize_error

RangeFn = Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor]]


def minmax_range(x: Tensor, bits: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """The full observed range of each row."""
    return x.amin(dim=1), x.amax(dim=1)


def percentile_range(x: Tensor, bits: Tensor, symmetric: bool, q: float = 99.99) -> tuple[Tensor, Tensor]:
    """The ``100 - q`` and ``q`` percentiles of each row (``|x|``'s q-th percentile when symmetric)."""
    x = x.float()
    if symmetric:
        c = torch.quantile(x.abs(), q / 100.0, dim=1)
        return -c, c
    return torch.quantile(x, 1 - q / 100.0, dim=1), torch.quantile(x, q / 100.0, dim=1)


def mse_range(x: Tensor, bits: Tensor, symmetric: bool, steps: int = 100, lowest: float = 0.05
              ) -> tuple[Tensor, Tensor]:
    """Shrink each row's min/max range by the factor in ``[lowest, 1]`` that minimises the quantization MSE.

    ``steps`` candidate factors are tried for every row at once (a grid search, as in the common MSE
    observers); the bit-width of each row is respected.
    """
    x = x.float()
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    factors = torch.linspace(lowest, 1.0, steps, device=x.device)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    b = bits.float().reshape(-1, 1).expand(x.shape[0], 1)
    for f in factors:
        clo, chi = (lo * f).unsqueeze(1), (hi * f).unsqueeze(1)
        err = quantize_error(x, clo, chi, b, symmetric, dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, clo.squeeze(1), best_lo)
        best_hi = torch.where(better, chi.squeeze(1), best_hi)
    return best_lo, best_hi


RANGE_ESTIMATORS: dict[str, RangeFn] = {
    "minmax": minmax_range,
    "percentile": percentile_range,
    "mse": mse_range,
}


def get_range_estimator(name: str) -> RangeFn:
    """Look up a range estimator by name, with the list of valid names in the error."""
    try:
        return RANGE_ESTIMATORS[name]
    except KeyError:
        raise QcoreError(f"unknown range estimator {name!r}; use one of {', '.join(RANGE_ESTIMATORS)}") from None
