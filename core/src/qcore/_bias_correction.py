"""Weight bias correction (Banner et al., used by ACIQ and RDOQ): quantization shifts each output channel's
mean (and shrinks its spread); matching them back removes a systematic error at almost no cost.

Centred form, per output channel ``c`` of the FP weight ``w`` and its quantized version ``wq``::

    mean:      wq'_c = wq_c - mean(wq_c) + mean(w_c)
    mean+var:  wq'_c = (wq_c - mean(wq_c)) * std(w_c) / std(wq_c) + mean(w_c)

Deployment: ``wq_c`` stays on its integer grid; the correction is a per-channel offset ``mean(w_c) -
mean(wq_c)`` (a fractional zero point of the weight) and, for ``mean+var``, a per-channel factor folded into
the channel's scale. It is data-free. A pruned (0-bit) channel becomes its FP mean.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from qcore._components import WeightCorrection

Mode = Literal["none", "mean", "mean+var"]


def correct_weight(w: Tensor, wq: Tensor, mode: Mode, axis: int = 0) -> Tensor:
    """``wq`` with each channel along ``axis`` matched to ``w``'s mean (and std for ``mean+var``)."""
    if mode == "none":
        return wq
    w2 = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    q2 = wq.movedim(axis, 0).reshape(wq.shape[axis], -1)
    mu_w, mu_q = w2.mean(dim=1, keepdim=True), q2.mean(dim=1, keepdim=True)
    centred = q2 - mu_q
    if mode == "mean+var":
        sd_q = centred.pow(2).mean(dim=1, keepdim=True).sqrt()
        sd_w = (w2 - mu_w).pow(2).mean(dim=1, keepdim=True).sqrt()
        centred = centred * torch.where(sd_q > 0, sd_w / sd_q.clamp_min(1e-12), torch.ones_like(sd_q))
    out = centred + mu_w
    return out.reshape(wq.movedim(axis, 0).shape).movedim(0, axis)


class MeanCorrection(WeightCorrection):
    """``-o weight_correction=mean``: each output channel of the quantized weight gets the FP channel's mean."""

    name = "mean"
    description = "data-free weight bias correction: each output channel keeps its FP mean"
    summary = "mean per output channel (a fractional weight zero point)"
    mode: Mode = "mean"

    def correct(self, w: Tensor, wq: Tensor, axis: int) -> Tensor:
        return correct_weight(w, wq, self.mode, axis)


class MeanVarCorrection(MeanCorrection):
    """``-o weight_correction=mean+var``: each output channel keeps its FP mean and standard deviation."""

    name = "mean+var"
    description = "data-free weight bias correction: each output channel keeps its FP mean and std"
    summary = "mean and std per output channel (a fractional zero point and a scale factor)"
    mode: Mode = "mean+var"
