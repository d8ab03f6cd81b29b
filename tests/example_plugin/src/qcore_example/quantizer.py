"""The ``example-pow2`` quantizer: a uniform integer grid whose scales are powers of two.

A power-of-two scale turns rescaling into a bit shift on integer hardware. The grid is qcore's (``qcore.ops``:
symmetric ``[-2^(b-1), 2^(b-1) - 1]`` or affine ``[0, 2^b - 1]`` with an integer zero point); only the scale is
restricted. Calibration goes through the :class:`qcore.FakeQuantizer` protocol, so any range calibrator
(``minmax``, ``mse``, ``example-percentile``, ``aciq``, ...) can set it:

1. :meth:`PowerOfTwoFakeQuant.set_range` takes a clip range per row and rounds the scale that covers it *up* to a
   power of two (nothing inside the range is clipped); the module is usable from here on;
2. :meth:`PowerOfTwoFakeQuant.fit` then tries the next power of two down as well (a finer grid that clips the
   extremes) and keeps, per row, whichever gives the lower squared error on the rows it is given.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import qcore
from qcore.ops import fake_quantize, int_range, qparams_from_range


class PowerOfTwoFakeQuant(qcore.FakeQuantizer):
    """Fake-quantizes a tensor on an integer grid with one power-of-two scale per row.

    Buffers (per row): ``exponent`` (the scale is ``2 ** exponent``), ``zero`` (integer zero point; 0 when
    symmetric) and ``lo`` (the calibrated range's lower end, which places the affine zero point).
    """

    def __init__(self, spec: qcore.QuantSpec, channels: int | None, axis: int) -> None:
        super().__init__(spec, channels, axis)
        self.register_buffer("exponent", torch.zeros(self.rows))
        self.register_buffer("zero", torch.zeros(self.rows))
        self.register_buffer("lo", torch.zeros(self.rows))

    # -- calibration: the protocol ----------------------------------------------------------------------------
    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Cover ``[lo, hi]`` per row with the smallest power-of-two scale that clips nothing."""
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1).expand(self.rows).to(self.lo.device)
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1).expand(self.rows).to(self.lo.device)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise qcore.QcoreError("a calibrated range is not finite (NaN or inf in the weights or activations); "
                                   "check the model and the calibration data")
        scale, _, _, _ = qparams_from_range(lo, hi, self.row_bits().to(lo.device), self.spec.symmetric)
        self.lo.copy_(torch.clamp(lo, max=0.0))
        self._set_exponent(torch.ceil(torch.log2(scale)))
        self.mark_calibrated()

    def fit(self, rows: Tensor) -> None:
        """Per row, keep the power of two (the covering one or the next one down) with the lower squared error
        on ``rows`` (``[rows, values]``)."""
        if not self.calibrated:  # fit refines a range; without one there is nothing to refine
            raise qcore.QcoreError("example-pow2 is fitted after set_range(); calibrate it with a range calibrator")
        rows = rows.detach().float().to(self.exponent.device)
        up = self.exponent.clone()
        err_up = self._row_error(rows, up)
        self._set_exponent(up - 1)
        err_down = self._row_error(rows, up - 1)
        self._set_exponent(torch.where(err_down < err_up, up - 1, up))

    def _set_exponent(self, exponent: Tensor) -> None:
        """Set the exponents and the integer zero points that keep ``lo`` on the grid (affine rows)."""
        self.exponent.copy_(exponent)
        if not self.spec.symmetric:
            _, qmax = int_range(self.row_bits().to(exponent.device), symmetric=False)
            self.zero.copy_(torch.clamp(torch.round(-self.lo / torch.exp2(exponent)), torch.zeros_like(qmax), qmax))

    def _row_error(self, rows: Tensor, exponent: Tensor) -> Tensor:
        """Squared error per row of quantizing ``rows`` with ``exponent`` (and the current zero points)."""
        bits = self.row_bits().to(rows.device)[:, None]
        qmin, qmax = int_range(bits, self.spec.symmetric)
        out = fake_quantize(rows, torch.exp2(exponent)[:, None], self.zero[:, None], qmin, qmax, bits=bits)
        return (out - rows).pow(2).sum(dim=1)

    # -- quantization ---------------------------------------------------------------------------------------------
    def quantize(self, x: Tensor) -> Tensor:
        dims = x.dim()
        scale = self._shape(self.channel_values(torch.exp2(self.exponent)), dims)
        zero = self._shape(self.channel_values(self.zero), dims)
        qmin, qmax = (self._shape(t, dims) for t in int_range(self.bits, self.spec.symmetric))
        bits = self._shape(self.bits, dims)
        prune = self._shape(self.prune_value, dims)
        return fake_quantize(x, scale, zero, qmin, qmax, bits=bits, prune_value=prune).to(x.dtype)

    def extra_repr(self) -> str:
        grid = "symmetric" if self.spec.symmetric else "affine"
        return f"bits={self.spec.bits}, {grid}, {self.spec.granularity}, power-of-two scales, axis={self.axis}"


class PowerOfTwoQuantizer(qcore.Quantizer):
    """``--quantizer example-pow2``: :class:`PowerOfTwoFakeQuant` for weights and activations."""

    name = "example-pow2"
    description = "uniform integer grid with power-of-two scales (rescaling is a shift); any range calibrator"

    def make(self, spec: qcore.QuantSpec, role: str, info: qcore.LayerInfo) -> nn.Module:
        if role == "weight":
            return PowerOfTwoFakeQuant(spec, info.out_channels, info.weight_axis if spec.axis is None else spec.axis)
        return PowerOfTwoFakeQuant(spec, info.in_channels, info.act_axis if spec.axis is None else spec.axis)
