"""Range estimators: choose the clip range ``[lo, hi]`` of each row of a 2-D sample ``[rows, values]``.

A row is whatever shares one scale: a weight's output channel or channel group, an activation tensor
(one row) or an activation channel. Estimators are registered by name so calibrators (and the ``-o``
options that pick them) can refer to them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qcore._errors import QcoreError
from qcore.ops import quantize_error

__all__ = ["RangeFn", "minmax_range", "percentile_range", "mse_range", "RANGE_ESTIMATORS", "get_range_estimator"]

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


_PASS_ELEMENTS = 2**21  # values per vectorised pass of the MSE search: large enough to amortise the calls,
# small enough to stay in cache (measured on the zoo models' candidate tables)


def mse_range(x: Tensor, bits: Tensor, symmetric: bool, steps: int = 100, lowest: float = 0.05,
              block: int = 0, p: float = 2.0, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Shrink each row's min/max range by the factor in ``[lowest, 1]`` that minimises the quantization MSE
    (the mean ``|error|^p`` for another ``p``: BRECQ's search is ``steps=80, lowest=0.21, p=2.4``).

    ``weights`` (optional, non-negative, ``[values]`` shared by every row or ``[rows, values]``) weight each
    value's error: the search minimises the mean of ``weights * |error|^p`` (e.g. a weight's error times the
    second moment of the input it multiplies: the diagonal approximation of the output error). ``None``, the
    default, is the unweighted search, arithmetic unchanged.

    ``steps`` candidate factors are tried for every row (a grid search, as in the common MSE observers), ``block``
    factors per vectorised pass (0: as many as fit about 2M values); the bit-width of each row is respected; ties go
    to the smaller factor. Rows are independent: a row's range does not depend on which other rows are passed with
    it.
    """
    x = x.float()
    if weights is not None:
        if weights.dim() not in (1, 2) or weights.shape[-1] != x.shape[1] or \
                (weights.dim() == 2 and weights.shape[0] not in (1, x.shape[0])):
            raise QcoreError(f"mse_range weights of shape {tuple(weights.shape)} do not match rows of shape "
                             f"{tuple(x.shape)}; pass one weight per value ([{x.shape[1]}] or "
                             f"[{x.shape[0]}, {x.shape[1]}])")
        if not bool((weights >= 0).all()):
            raise QcoreError("mse_range weights must be non-negative; clamp them (e.g. weights.clamp_min(0))")
        weights = weights.to(device=x.device, dtype=x.dtype).reshape(1, -1, x.shape[1])  # [1, 1 or rows, values]
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    factors = torch.linspace(lowest, 1.0, steps, device=x.device)
    b = bits.float().reshape(-1, 1).expand(x.shape[0], 1)
    block = block or max(1, min(steps, _PASS_ELEMENTS // max(1, x.numel())))
    buf = torch.empty(block, *x.shape, device=x.device)  # one scratch buffer for every pass
    errs = []
    for i in range(0, steps, block):
        f = factors[i:i + block].reshape(-1, 1, 1)  # [F, 1, 1]
        errs.append(quantize_error(x.unsqueeze(0), lo[None, :, None] * f, hi[None, :, None] * f, b[None], symmetric,
                                   dim=2, out=buf[:len(f)], p=p, weights=weights))  # [F, rows]
    best = torch.cat(errs).argmin(dim=0)  # first minimum: the smallest such factor
    return lo * factors[best], hi * factors[best]


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
