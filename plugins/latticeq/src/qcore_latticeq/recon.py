"""The lattice's learned rounding for qcore-recon (imported only when reconstruction runs)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qcore_latticeq.quantizer import LatticeFakeQuant
from qcore_recon import WeightRounding


class LatticeRounding(WeightRounding):
    """Learn, per length-``n`` vector, an offset of at most one basis vector along each coordinate:
    ``w' = w + clip(delta, -1, 1) @ B_c``, quantized by the lattice's exact closest-point search with a
    straight-through gradient. ``delta`` starts at 0 (the calibrated code); :meth:`final_weight` is ``w'``, which
    the unchanged quantizer maps onto the learned code at run time."""

    def __init__(self, quantizer: LatticeFakeQuant, weight: Tensor) -> None:
        super().__init__()
        self.quantizer = [quantizer]  # a list: not a submodule, its basis is not learned here
        w = weight.detach().clone()
        self.register_buffer("w", w)
        rows = quantizer.rows_of(w)
        self.length = rows.shape[1]
        vecs = quantizer.vectors_of(rows)
        self.delta = nn.Parameter(torch.zeros_like(vecs))

    def weight(self) -> Tensor:
        q = self.quantizer[0]
        step = torch.bmm(torch.clamp(self.delta, -1.0, 1.0), q.basis.to(self.delta))
        offset = step.reshape(step.shape[0], -1)[:, : self.length]
        return self.w + q._unrows(offset, self.w)

    def soft(self) -> Tensor:
        return self.quantizer[0].quantize(self.weight())

    def final_weight(self) -> Tensor:
        with torch.no_grad():
            return self.weight()
