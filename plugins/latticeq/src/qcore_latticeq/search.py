"""Data-free basis search: improve every row's lattice basis from the MSE-optimal scalar grid, vectorised over rows.

Per row (an output channel) independently, with a shared random stream:

1. start from the quantizer's fitted basis ``step * I`` (the MSE-optimal scalar grid), so the result is never
   worse than that grid on the chosen loss;
2. ``restarts`` times: a (1+1) evolution strategy: ``steps`` proposals at each relative noise level of
   ``noise`` (Gaussian perturbation of every entry with a standard deviation of ``level`` times the current
   basis' RMS entry, so steps scale with each channel's own basis), each proposal quantized to the stored
   ``basis_bits`` grid and accepted per row on a strict decrease of the loss; a basis whose orthogonality
   defect exceeds ``max_defect`` is refused (it would make the exact search enumerate many codes for little
   gain);
3. ``refine`` rounds of straight-through refinement: with the codes held fixed (the rounding's STE), the loss
   ``|Z B - V|^2`` is quadratic in the basis and its gradient vanishes at the least-squares basis
   ``B = (Z^T Z)^-1 Z^T V``, which is taken directly (then quantized, re-coded and accepted on improvement:
   Lloyd's iteration for a lattice);
4. keep each row's best basis over all restarts;
5. with ``select`` (default): decide which rows keep the searched basis and which go back to the scalar grid they
   started from, exactly for the whole tensor, by its gain over the scalar grid at the same total rate with every
   stored bit paid (:func:`select_rows`): a basis costs ``n^2 * B`` bits, a tensor mixing both kinds a 1-bit flag
   per row, a scalar row nothing beyond its scale; keeping no basis (gain 0) is always a candidate.

The loss is the squared error (``mse``, default) or the seed's cubic error ``sum |w_hat - w|^3`` (``cubic``),
of the decoded weights in the layer's own units; with ``weights`` (one non-negative value per weight of a row,
e.g. the second moment ``E[x_j^2]`` of the input each weight multiplies: the diagonal of ``E[x x^T]``, so the
loss is the diagonal approximation of the output error ``E|(W - W_hat) x|^2``) each weight's error counts that
much, in the scalar start (:meth:`LatticeFakeQuant.scalar_step` with ``weights``: core's weighted
:func:`qcore.ranges.mse_range`), the search, the refinement (weighted least squares)
and the basis choice. The codes stay the Euclidean closest points (the stored format decodes them so). Every
step is a tensor operation over all rows, on whatever device the weight is.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

import qcore
from qcore.ops import int_range
from qcore_latticeq.cvp import closest_points, decode
from qcore_latticeq.quantizer import LatticeFakeQuant, quantize_basis

log = logging.getLogger(__name__)

__all__ = ["SearchSettings", "search_bases", "row_loss", "select_rows", "loss_power"]


@dataclass(frozen=True)
class SearchSettings:
    """How :func:`search_bases` searches (see the module docstring)."""

    steps: int = 20
    restarts: int = 1
    refine: int = 8
    noise: tuple[float, ...] = (0.3, 0.15, 0.08, 0.04)
    loss: Literal["mse", "cubic"] = "mse"
    max_defect: float = 4.0
    seed: int = 0
    select: bool = True


def loss_power(loss: str) -> float:
    """The exponent ``p`` of a search loss (``mse``: 2, ``cubic``: 3), for :func:`qcore.ranges.mse_range`."""
    return 2.0 if loss == "mse" else 3.0


def row_loss(err: Tensor, mask: Tensor, loss: str) -> Tensor:
    """Per-row loss of decoding errors ``err`` (``[R, L, n]``) over the real (unpadded) entries ``mask`` (0/1,
    or each entry's non-negative weight, 0 on padding)."""
    e = err.abs()
    return ((e.pow(2) if loss == "mse" else e.pow(3)) * mask).sum(dim=(1, 2))


def _defect(basis: Tensor) -> Tensor:
    """Orthogonality defect ``prod |b_k| / |det B|`` per row (1 for orthogonal bases, inf for singular ones)."""
    det = torch.linalg.det(basis).abs()
    prod = basis.pow(2).sum(-1).sqrt().prod(-1)
    return torch.where(det > 0, prod / det.clamp_min(torch.finfo(basis.dtype).tiny), torch.full_like(det, torch.inf))


class _Scorer:
    """Loss of candidate bases on fixed vectors (exact closest codes), ``inf`` for refused bases."""

    def __init__(self, q: LatticeFakeQuant, rows: Tensor, settings: SearchSettings,
                 weights: Tensor | None = None) -> None:
        self.v = q.vectors_of(rows.detach().float())
        n, length = q.n, rows.shape[1]
        idx = torch.arange(self.v.shape[1] * n, device=rows.device).reshape(1, -1, n)
        self.mask = (idx < length).to(self.v.dtype)
        #: per-weight loss weights (``[1, L, n]``, 0 on padding), None: every weight counts once
        self.weights = None if weights is None else q.vectors_of(weights.to(self.v).reshape(1, -1)) * self.mask
        qmin, qmax = q.code_bounds(rows.device)
        self.qmin, self.qmax = qmin.to(self.v), qmax.to(self.v)
        self.settings = settings
        self.evaluations = 0

    @property
    def loss_mask(self) -> Tensor:
        """What each entry's error counts in the loss: its weight, or 1 (0 on padding)."""
        return self.mask if self.weights is None else self.weights

    def codes(self, basis: Tensor) -> Tensor:
        return closest_points(self.v, basis, self.qmin, self.qmax)

    def __call__(self, basis: Tensor) -> Tensor:
        ok = _defect(basis) <= self.settings.max_defect
        safe = torch.where(ok[:, None, None], basis, torch.eye(basis.shape[-1], device=basis.device) * basis.abs()
                           .amax(dim=(1, 2), keepdim=True).clamp_min(1e-12))
        z = self.codes(safe)
        self.evaluations += 1
        loss = row_loss(decode(z, safe) - self.v, self.loss_mask, self.settings.loss)
        return torch.where(ok & torch.isfinite(loss), loss, torch.full_like(loss, torch.inf))


def _least_squares(z: Tensor, v: Tensor) -> Tensor:
    """Per row, the basis minimising ``|z B - v|^2`` (a small ridge keeps rows with few distinct codes finite)."""
    ztz = z.mT @ z
    eye = torch.eye(z.shape[-1], device=z.device, dtype=z.dtype)
    ridge = 1e-6 * ztz.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1.0)[:, None, None]
    return torch.linalg.solve(ztz + ridge * eye, z.mT @ v)


def _weighted_least_squares(z: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """Per row, the basis minimising ``sum w * (z B - v)^2`` with per-entry weights ``w`` (``[1, L, n]``): each
    column ``k`` of ``B`` is its own weighted least-squares problem (same ridge as :func:`_least_squares`)."""
    ztz = torch.einsum("rli,lk,rlj->rkij", z, w[0], z)  # [R, n(k), n, n]
    rhs = torch.einsum("rli,lk,rlk->rki", z, w[0], v)  # [R, n(k), n]
    eye = torch.eye(z.shape[-1], device=z.device, dtype=z.dtype)
    ridge = 1e-6 * ztz.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1.0)[..., None, None]
    cols = torch.linalg.solve(ztz + ridge * eye, rhs.unsqueeze(-1)).squeeze(-1)  # [R, k, i] = B[i, k]
    return cols.mT


def select_rows(scalar_loss: Tensor, lattice_loss: Tensor, slope_db: float, length: int,
                basis_bits: float) -> tuple[Tensor, dict]:
    """Per row, keep the searched basis (``True``) or the scalar grid (``False``), chosen exactly for the whole
    tensor: the choice whose distortion beats the scalar grid's at the same total rate by the most dB.

    The scalar grid at equal rate is extrapolated at the tensor's own slope: ``slope_db`` dB per bit per weight
    (measured between ``M`` and ``M + 1`` bits), so ``E`` stored bits on a tensor of ``R`` rows of ``length``
    weights are worth ``slope_db * E / (R * length)`` dB. Only the number ``k`` of rows keeping a basis sets the
    rate (:meth:`LatticeFakeQuant.stored_extra_bits`: ``E = 0`` for ``k = 0``, else the cheaper of every row a
    basis, ``R * basis_bits``, and mixed, ``R + k * basis_bits`` with a 1-bit flag per row), so for each ``k``
    the best rows are the ``k`` with the largest loss reductions: rows sorted once, every ``k`` scored by a
    cumulative sum, the best taken (``k = 0``, the scalar grid itself at 0 dB, is always a candidate, so the
    chosen gain is never negative). Returns the per-row choice and a report (``layout``, ``k``, the predicted
    ``gain_equal_rate_db`` and the stored ``extra_bits``).
    """
    rows = scalar_loss.shape[0]
    s = scalar_loss.detach().double()
    gain = (s - lattice_loss.detach().double()).clamp_min(0.0)  # the search never ends above its start
    order = torch.argsort(gain, descending=True)
    total = s.sum()
    distortion = total - torch.cat([gain.new_zeros(1), torch.cumsum(gain[order], 0)])  # keep the k best: [R + 1]
    k = torch.arange(rows + 1, device=s.device, dtype=s.dtype)
    extra = torch.minimum(torch.full_like(k, rows * basis_bits), rows + k * basis_bits)
    extra[0] = 0.0
    tiny = torch.finfo(s.dtype).tiny
    db = 10 * torch.log10(total.clamp_min(tiny) / distortion.clamp_min(tiny)) - slope_db * extra / (rows * length)
    db[0] = 0.0
    best = int(torch.argmax(db))  # first maximum: the fewest bases among equal gains
    keep = torch.zeros(rows, dtype=torch.bool, device=scalar_loss.device)
    keep[order[:best]] = True
    layout = "scalar" if best == 0 else ("basis" if extra[best] == rows * basis_bits else "mixed")
    return keep, {"layout": layout, "k": best, "gain_equal_rate_db": float(db[best]), "extra_bits": float(extra[best])}


def _scalar_loss(q: LatticeFakeQuant, rows: Tensor, score: _Scorer, extra_bits: int,
                 weights: Tensor | None = None) -> Tensor:
    """Per-row loss of the MSE-optimal scalar grid (optimal for the ``weights``' loss, when given) with
    ``extra_bits`` more bits than ``q``'s (exact search on the basis ``step * I``, so it is the uniform symmetric
    grid)."""
    bits = q.row_bits().to(rows.device) + extra_bits
    if weights is None:
        step = q.scalar_step(rows, extra_bits).to(score.v)
    else:
        step = q.scalar_step(rows, extra_bits, weights, loss_power(score.settings.loss)).to(score.v)
    basis = step[:, None, None] * torch.eye(q.n, device=score.v.device, dtype=score.v.dtype)
    qmin, qmax = int_range(bits, symmetric=True)
    z = closest_points(score.v, basis, qmin.to(score.v), qmax.to(score.v))
    return row_loss(decode(z, basis) - score.v, score.loss_mask, score.settings.loss)


@torch.no_grad()
def search_bases(q: LatticeFakeQuant, rows: Tensor, settings: SearchSettings | None = None,
                 weights: Tensor | None = None) -> tuple[Tensor, dict]:
    """Search better bases for ``q`` from its weight ``rows`` (``q.rows_of(weight)``); ``q`` must be fitted
    (its basis is the start: with ``weights``, set it to ``q.scalar_step(rows, weights=weights)`` first). ``weights``
    (``[values]``, one per weight of a row, non-negative; None: all 1) weight each weight's error in the loss.
    Returns the bases (``[rows, n, n]``, on the ``basis_bits`` grid) and a report: loss at the start and at the
    end (summed over rows), evaluations, and rows improved."""
    s = settings or SearchSettings()
    if weights is not None and (weights.shape != rows.shape[1:] or not bool((weights >= 0).all())):
        raise qcore.QcoreError(f"search weights of shape {tuple(weights.shape)} must be one non-negative value per "
                               f"weight of a row ({rows.shape[1]})")
    score = _Scorer(q, rows, s, weights)
    start = q.basis.detach().to(score.v)
    start_loss = score(start)
    best, best_loss = start.clone(), start_loss.clone()
    bits = q.basis_bits
    gen = torch.Generator(device=score.v.device).manual_seed(s.seed)
    if q.n > 1:
        for _ in range(s.restarts):
            cur, cur_loss = start.clone(), start_loss.clone()
            for level in s.noise:
                for _ in range(s.steps):
                    rms = cur.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
                    noise = torch.randn(cur.shape, generator=gen, device=cur.device, dtype=cur.dtype)
                    cand = quantize_basis(cur + level * rms * noise, bits)
                    cand_loss = score(cand)
                    take = cand_loss < cur_loss
                    cur = torch.where(take[:, None, None], cand, cur)
                    cur_loss = torch.where(take, cand_loss, cur_loss)
            for _ in range(s.refine):
                z = score.codes(cur)
                if score.weights is None:
                    cand = _least_squares(z, score.v * score.mask)
                else:
                    cand = _weighted_least_squares(z, score.v, score.weights)
                cand = quantize_basis(torch.where(torch.isfinite(cand), cand, cur), bits)
                cand_loss = score(cand)
                take = cand_loss < cur_loss
                cur = torch.where(take[:, None, None], cand, cur)
                cur_loss = torch.where(take, cand_loss, cur_loss)
            better = cur_loss < best_loss
            best = torch.where(better[:, None, None], cur, best)
            best_loss = torch.where(better, cur_loss, best_loss)
    report = {"loss_start": float(start_loss.sum()), "loss_searched": float(best_loss.sum()),
              "evaluations": score.evaluations, "rows_improved": int((best_loss < start_loss).sum()),
              "rows": int(best.shape[0]), "n": q.n}
    if q.n > 1 and s.select and bool((best_loss < start_loss).any()):
        more = _scalar_loss(q, rows, score, 1, weights)
        slope = 10 * math.log10(float(start_loss.sum()) / max(float(more.sum()), 1e-300))
        keep, rep = select_rows(start_loss, best_loss, slope, rows.shape[1], q.n * q.n * (bits or 32))
        best = torch.where(keep[:, None, None], best, start)
        best_loss = torch.where(keep, best_loss, start_loss)
        report.update(rep, slope_db=round(slope, 3), rows_with_basis=int(keep.sum()))
    if s.select:  # no row improved (or n = 1): the scalar grid, 0 dB at equal rate
        report.setdefault("gain_equal_rate_db", 0.0)
    report["loss_end"] = float(best_loss.sum())
    return best, report
