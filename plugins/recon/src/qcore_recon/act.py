"""Activation quantizers during reconstruction: LSQ step sizes on core's uniform grid, the quantizer as is for
any other format, and QDrop's random dropping of quantization.

During reconstruction a layer's input quantizer is replaced by an :class:`ActQuant` wrapping it; afterwards
:meth:`ActQuant.commit` writes what was learned back into the original quantizer through its protocol
(``set_range``), so the deployed model is the quantizer's own, calibrated as usual.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import qcore
from qcore.ops import lsq_fake_quantize
from qcore_recon.rounding import grad_scale, lsq_grad_factor, plain_uniform, scale_of


class ActQuant(nn.Module):
    """One activation quantizer in the reconstruction loop.

    :attr:`enabled` False passes the input through (BRECQ's weight stage); :attr:`keep_prob` set to ``p``
    keeps quantization element-wise with probability ``p`` and passes the FP value otherwise (QDrop), with
    draws from :attr:`generator` so that a run is reproducible; None always quantizes.
    """

    def __init__(self, quantizer: qcore.FakeQuantizer) -> None:
        super().__init__()
        self.base = [quantizer]  # not a submodule: the original stays where it is
        self.enabled = True
        self.keep_prob: float | None = None
        self.generator: torch.Generator | None = None

    def quantize(self, x: Tensor) -> Tensor:
        return self.base[0].quantize(x)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        q = self.quantize(x)
        if self.keep_prob is None:
            return q
        u = torch.rand(x.shape, generator=self.generator, device="cpu").to(x.device)
        return torch.where(u < self.keep_prob, q, x)

    def commit(self) -> None:
        """Write the learned parameters into the original quantizer (nothing to write by default)."""


class LSQAct(ActQuant):
    """LSQ (Esser et al., 2020) step sizes for a :class:`qcore.UniformFakeQuant` activation: one learned step per
    row (per tensor by default), zero points frozen at their calibrated values, gradient scaled by
    1/sqrt(numel · qmax). :meth:`commit` sets the range whose grid has exactly the learned step."""

    def __init__(self, quantizer: qcore.UniformFakeQuant) -> None:
        super().__init__(quantizer)
        scale, zero, qmin, qmax = scale_of(quantizer)
        self.step = nn.Parameter(scale.detach().clone())
        for key, t in (("zero", zero), ("qmin", qmin), ("qmax", qmax)):
            self.register_buffer(key, t.detach().clone())

    def quantize(self, x: Tensor) -> Tensor:
        q = self.base[0]
        rows = self.step.numel()
        g = lsq_grad_factor(x.numel() // rows, float(self.qmax.max()))
        step = torch.clamp(grad_scale(self.step, g), min=1e-8)
        per = [q.channel_values(t).reshape(-1) for t in (step, self.zero, self.qmin, self.qmax)]
        axis = q.axis if q.spec.granularity != "tensor" else 0
        # core's fake quantization with a gradient for the step too (a torch op a device kernel fuses)
        return lsq_fake_quantize(x, *per, q.bits.reshape(-1), q.prune_value.reshape(-1), axis)

    @torch.no_grad()
    def commit(self) -> None:
        q = self.base[0]
        s = torch.clamp(self.step.detach(), min=1e-8)
        if q.spec.symmetric:
            lo, hi = -self.qmax * s, self.qmax * s
        else:
            lo, hi = (self.qmin - self.zero) * s, (self.qmax - self.zero) * s
        q.set_range(lo, hi)


def act_quant_for(quantizer: qcore.FakeQuantizer, learn: bool) -> ActQuant:
    """The reconstruction wrapper of an activation quantizer: its own ``recon_act()`` if it has one, LSQ steps
    on core's uniform grid when ``learn`` (not on a subclass with its own ``quantize``), else the quantizer as
    calibrated."""
    own = getattr(quantizer, "recon_act", None)
    if callable(own):
        act = own()
        if not isinstance(act, ActQuant):
            raise qcore.QcoreError(f"{type(quantizer).__name__}.recon_act() returned {type(act).__name__}, not a "
                                   "qcore_recon.ActQuant")
        return act
    if learn and plain_uniform(quantizer):
        return LSQAct(quantizer)
    return ActQuant(quantizer)
