"""The dead-zone weight grid of the RDOQ seed, made consistent with its rate (``--quantizer deadzone``).

Per group of output channels, with ``b`` bits, a dead-zone threshold ``phi`` and a step ``delta``:
``Q(w) = 0`` where ``|w| <= phi``, else ``sign(w) * (phi + (k + 1/2) * delta)`` with
``k = clamp(floor((|w| - phi) / delta), 0, K - 1)`` and ``K = 2^(b-1) - 1`` magnitudes per sign. Each level is
the centre of its bin, so every weight goes to its nearest non-zero level. That is ``2K + 1 = 2^b - 1`` levels,
which ``b`` bits can address. (The seed keeps ``2^(b-1)`` magnitudes, ``2^b + 1`` levels charged ``b`` bits, and
rounds instead of flooring, which puts weights half a step above their nearest level.)

``phi`` is the ``ratio`` quantile of the group's ``|w|`` (so about that fraction of the weights is zeroed; the
seed's bisection bracketed by ``max(w)`` instead of ``max|w|``), and ``delta`` minimises the group's weight MSE
over 100 candidate steps, as core's MSE range estimator does for the plain grid. A group with ratio 0, or with
fewer than 2 bits (``K = 0``), uses the plain symmetric grid of :class:`~qcore.UniformFakeQuant`.
A short last group is fitted on its padded row (its last channel repeated, as for the plain grid's range), so
its zeroed share can differ from the ratio; curves and deployment fit it the same way.

The levels are not an integer grid (codes map to ``sign * (phi + delta / 2 + k * delta)``), so runs with this
quantizer are reported as simulation only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qcore import LayerInfo, QcoreError, Quantizer, QuantSpec, UniformFakeQuant


def magnitudes(bits: Tensor) -> Tensor:
    """``K``: non-zero magnitudes per sign of the dead-zone grid at ``bits`` (0 below 2 bits)."""
    return torch.clamp(torch.pow(2.0, bits.float() - 1) - 1, min=0).floor()


def deadzone_quantize(x: Tensor, phi: Tensor, step: Tensor, k: Tensor) -> Tensor:
    """Dead-zone quantize ``x`` (all parameters broadcast against it; ``k`` = magnitudes per sign, >= 1)."""
    mag = x.abs()
    idx = torch.clamp(torch.floor((mag - phi) / step), torch.zeros_like(k), k - 1)
    out = torch.sign(x) * (phi + (idx + 0.5) * step)
    return torch.where(mag <= phi, torch.zeros_like(out), out)


def row_quantile(x: Tensor, q: Tensor) -> Tensor:
    """The ``q[i]`` quantile of row ``i`` of ``x`` (linear interpolation, as ``torch.quantile``; any size)."""
    srt = x.sort(dim=1).values
    pos = q.float().clamp(0, 1) * (x.shape[1] - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=x.shape[1] - 1)
    frac = pos - lo.float()
    a, b = srt.gather(1, lo[:, None])[:, 0], srt.gather(1, hi[:, None])[:, 0]
    return a + (b - a) * frac


_PASS_ELEMENTS = 2**21  # values per vectorised pass of the step search (as core's MSE range search)


@torch.no_grad()
def fit_deadzone(rows: Tensor, bits: Tensor, ratio: Tensor, steps: int = 100, lowest: float = 0.05
                 ) -> tuple[Tensor, Tensor]:
    """``(phi, delta)`` per row of ``rows`` ``[rows, values]`` (see module docstring).

    ``delta`` is searched over ``f * (max|w| - phi) / (K - 1/2)`` for ``steps`` factors ``f`` in ``[lowest, 1]``
    (``f = 1`` puts the top level at ``max|w|``); ties go to the smaller step. Rows are independent:
    a row's result does not depend on the other rows passed with it.
    """
    rows = rows.float()
    mag = rows.abs()
    phi = row_quantile(mag, ratio.to(rows.device))
    k = magnitudes(bits).to(rows.device).clamp(min=1)
    top = (mag.amax(dim=1) - phi).clamp(min=1e-12) / (k - 0.5)
    factors = torch.linspace(lowest, 1.0, steps, device=rows.device)
    block = max(1, min(steps, _PASS_ELEMENTS // max(1, rows.numel())))
    # the error is symmetric in the sign, so search on magnitudes: the dead zone's share of the error does not
    # depend on the step, the rest is (phi + (idx + 1/2) delta - |w|)^2, computed in place per pass
    inside = mag > phi[:, None]
    zero_err = torch.where(inside, torch.zeros_like(mag), mag * mag)
    p3, top_idx = phi[None, :, None], (k - 1)[None, :, None]
    errs = []
    for i in range(0, steps, block):
        step = (top[None, :] * factors[i:i + block, None])[..., None]  # [F, rows, 1]
        t = torch.div(mag[None] - p3, step).floor_().clamp_(min=0)
        torch.minimum(t, top_idx, out=t)
        t.add_(0.5).mul_(step).add_(p3).sub_(mag[None]).square_().mul_(inside).add_(zero_err)
        errs.append(t.mean(dim=2))  # [F, rows]
    best = torch.cat(errs).argmin(dim=0)  # first minimum: the smallest step
    return phi, top * factors[best]


def fit_layers(parts: list[tuple[DeadZoneFakeQuant, Tensor]]) -> None:
    """Fit the dead-zone groups of several quantizers (each with its weight's ``rows_of``) in one search."""
    todo = [(q, rows, q._dead()) for q, rows in parts]
    dead_rows = [rows[dead.to(rows.device)] for _, rows, dead in todo]
    if sum(len(r) for r in dead_rows):
        phi, step = fit_deadzone(torch.cat(dead_rows), torch.cat([q.row_bits()[d] for q, _, d in todo]),
                                 torch.cat([q.ratio[d] for q, _, d in todo]))
        at = 0
        for (q, _, dead), r in zip(todo, dead_rows, strict=True):
            q.phi[dead] = phi[at:at + len(r)].to(q.phi.device)
            q.step[dead] = step[at:at + len(r)].to(q.step.device)
            at += len(r)
    for q, _, _ in todo:
        q.fitted = True


class DeadZoneFakeQuant(UniformFakeQuant):
    """Weights on the dead-zone grid, one ``(phi, delta)`` per group (see module docstring).

    ``spec.group_params`` holds each group's dead-zone ratio. The range set by a calibrator serves the groups
    on the plain grid; :meth:`fit` (called by weight calibration) fits the others.
    """

    state_flags = ("calibrated", "fitted")  # saved with the buffers, so a loaded model needs no refit

    def __init__(self, spec: QuantSpec, channels: int | None, axis: int) -> None:
        super().__init__(spec, channels, axis)
        rows = self.lo.numel()
        ratios = spec.group_params if spec.group_params is not None else (0.0,) * rows
        if spec.granularity != "group" or len(ratios) != rows:
            raise QcoreError(f"the dead-zone quantizer needs per-group weights with one ratio per group "
                             f"({rows} groups, got {len(ratios)} ratios)")
        if any(not 0.0 <= r < 1.0 for r in ratios):
            raise QcoreError(f"dead-zone ratios must lie in [0, 1), got {sorted(set(ratios))}")
        self.register_buffer("ratio", torch.tensor(ratios, dtype=torch.float32))
        self.register_buffer("phi", torch.zeros(rows))
        self.register_buffer("step", torch.ones(rows))
        self.fitted = not bool(self._dead().any())

    def _dead(self) -> Tensor:
        """Rows on the dead-zone grid: a positive ratio and at least 2 bits."""
        return (self.ratio > 0) & (magnitudes(self.row_bits()).to(self.ratio.device) >= 1)

    def fit(self, rows: Tensor) -> None:
        fit_layers([(self, rows)])

    def forward(self, x: Tensor) -> Tensor:
        plain = super().forward(x)
        if self.observer is not None or not bool(self._dead().any()):
            return plain
        if not self.fitted:
            raise QcoreError("the dead-zone quantizer's groups were never fitted: its calibrator set the ranges only; "
                             "use a range calibrator (--calibrator mse, minmax or percentile)")
        dims = x.dim()
        phi, step, dead = (self._shape(self.channel_values(t), dims)
                           for t in (self.phi, self.step, self._dead().float()))
        k = self._shape(self.channel_values(magnitudes(self.row_bits())), dims).clamp(min=1)
        dz = deadzone_quantize(x.float(), phi, step, k).to(x.dtype)
        return torch.where(dead > 0, dz, plain)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dead-zone groups={int(self._dead().sum())}"


class DeadZoneQuantizer(Quantizer):
    """``--quantizer deadzone``: weights on the dead-zone grid per group, activations on the uniform grid."""

    name = "deadzone"
    description = ("weights: per-group dead-zone grid (2^b - 1 levels, RDOQ seed's quantizer made consistent); "
                   "activations: uniform; simulation only")
    #: non-zero levels sit at phi + (k + 1/2) delta: not an integer-GEMM grid
    integer_grid = False

    def make(self, spec: QuantSpec, role: str, info: LayerInfo) -> nn.Module:
        if role == "weight":
            axis = info.weight_axis if spec.axis is None else spec.axis
            if spec.granularity == "group":
                return DeadZoneFakeQuant(spec, info.out_channels, axis)
            if spec.group_params is not None:
                raise QcoreError("dead-zone ratios need per-group weight scales (granularity 'group')")
            return UniformFakeQuant(spec, info.out_channels, axis)
        return UniformFakeQuant(spec, info.in_channels, info.act_axis if spec.axis is None else spec.axis)
