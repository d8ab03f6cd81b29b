"""The KL-divergence threshold (TensorRT / MXNet calibration), the seed's ``kld`` baseline.

For each row: a histogram of ``|x|`` (or of ``x`` for non-negative rows) over ``[0, max]``; for every candidate
threshold ``t`` (a bin edge), the reference distribution ``P`` is the histogram up to ``t`` with the outliers
added to its last bin, and ``Q`` is ``P`` merged into as many bins as the grid has levels on that side and
spread back uniformly over the non-empty bins. The threshold with the smallest ``KL(P || Q)`` wins.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _kl_row(hist: Tensor, levels: int, step: int) -> int:
    """The histogram bin count (threshold index) with the smallest KL divergence."""
    nbins = hist.numel()
    best, best_i = float("inf"), nbins
    for i in range(max(levels, step), nbins + 1, step):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        # merge the first i bins into `levels` chunks, then spread each chunk over its non-empty bins
        chunk = (torch.arange(i, dtype=torch.float64) * levels / i).floor().long()
        nz = (hist[:i] > 0).double()
        mass = torch.zeros(levels, dtype=hist.dtype).index_add_(0, chunk, hist[:i])
        cnt = torch.zeros(levels, dtype=hist.dtype).index_add_(0, chunk, nz)
        q = nz * mass[chunk] / cnt[chunk].clamp(min=1)
        if p.sum() <= 0 or q.sum() <= 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        ok = p > 0
        if (q[ok] == 0).any():
            continue
        kl = float((p[ok] * (p[ok] / q[ok]).log()).sum())
        if kl < best:
            best, best_i = kl, i
    return best_i


def kl_range(x: Tensor, bits: Tensor, symmetric: bool, nbins: int = 2048, step: int = 16
             ) -> tuple[Tensor, Tensor]:
    """KL-threshold clip range of each row of ``x`` (``[rows, values]``) at each row's bit-width.

    Signed rows get ``[-t, t]`` with ``2^(M-1)`` quantized bins per side; non-negative rows ``[0, t]`` with
    ``2^M``. Candidate thresholds are every ``step``-th of ``nbins`` histogram bins.
    """
    x = x.float()
    lo_out, hi_out = torch.empty(x.shape[0]), torch.empty(x.shape[0])
    bits = bits.float().reshape(-1).expand(x.shape[0])
    for r in range(x.shape[0]):
        row = x[r]
        nonneg = bool(row.min() >= 0)
        mag = row if nonneg else row.abs()
        top = float(mag.max())
        m = int(bits[r])
        if top <= 0 or m <= 0:
            lo_out[r], hi_out[r] = float(row.min()), float(row.max())
            continue
        hist = torch.histc(mag, bins=nbins, min=0.0, max=top).double()
        levels = 2**m if nonneg else max(2 ** (m - 1), 1)
        t = _kl_row(hist, levels, step) * top / nbins
        lo_out[r], hi_out[r] = (0.0, t) if nonneg else (-t, t)
    return lo_out, hi_out
