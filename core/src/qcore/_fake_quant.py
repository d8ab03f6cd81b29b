"""The uniform fake-quantizer module and the statistics observer calibrators attach to it.

A :class:`UniformFakeQuant` quantizes one tensor as its :class:`~qcore._spec.QuantSpec` says. Its clip range
is held per *row*: one row per tensor, channel or channel group (whatever shares a scale). Calibrators set
the range with :meth:`UniformFakeQuant.set_range`; until then the module refuses to run, so an
uncalibrated model can never produce numbers that look like results.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qcore._errors import QcoreError
from qcore._spec import QuantSpec
from qcore.ops import _channel_shaped, fake_quantize_channels, qparams_from_range


class Observer:
    """Collects, per row, the exact min/max and a uniform random sample of at most ``max_per_row`` values.

    Sampling is a reservoir over everything observed: every value gets a random key and the ``max_per_row``
    largest keys are kept, so each value seen (in any batch) is equally likely to be in the sample.
    ``sample()`` returns ``[rows, n]`` values that include each row's exact min and max, so estimators that look
    at the extremes see the true ones while percentile/MSE search stay cheap.
    """

    def __init__(self, max_per_row: int, seed: int = 0) -> None:
        self.max_per_row = max_per_row
        self.gen = torch.Generator().manual_seed(seed)
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.buf: Tensor | None = None
        self.keys: Tensor | None = None
        self.count = 0

    def update(self, rows: Tensor) -> None:
        rows = rows.detach().float().cpu()
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        keys = torch.rand(rows.shape, generator=self.gen)
        if self.buf is not None and self.keys is not None:
            rows, keys = torch.cat([self.buf, rows], dim=1), torch.cat([self.keys, keys], dim=1)
        if rows.shape[1] > self.max_per_row:
            keys, idx = keys.topk(self.max_per_row, dim=1)
            rows = rows.gather(1, idx)
        self.buf, self.keys = rows, keys
        self.count += 1

    def sample(self) -> Tensor:
        if self.buf is None or self.lo is None or self.hi is None:
            raise QcoreError("no calibration data reached this activation; check the calibration set and "
                             "that the layer is used in the forward pass")
        return torch.cat([self.buf, self.lo[:, None], self.hi[:, None]], dim=1)


class FakeQuantizer(nn.Module):
    """Base of every fake-quantizer module: the protocol calibrators, allocators and core use.

    A fake quantizer maps a tensor to the values its numeric format can represent (in floating point, with
    straight-through gradients). Whatever the format, its parameters are held per *row*: the values that
    share them (the whole tensor, one channel, or a group of ``spec.group_size`` channels along ``axis``).
    This class owns that layout and the calibration state; a format implements:

    * :meth:`quantize` -- the fake-quantized tensor (parameters are set; called by ``forward``);
    * :meth:`set_range` -- when ``uses_range`` is True (the default): take one clip range ``[lo, hi]`` per row;
    * :meth:`fit` -- refine or fit its parameters from the tensor's own rows (weights) or an observed sample
      (activations), after any :meth:`set_range`. A format with ``uses_range = False`` (a lattice, a learned
      codebook) is calibrated by ``fit`` alone.

    A calibrator uses only :meth:`rows_of`, :meth:`row_bits`, :meth:`channel_values`, :meth:`set_range` (where
    ``uses_range``), :meth:`fit`, :meth:`set_prune_value` and :attr:`observer`; it never needs the concrete class.
    Until :meth:`mark_calibrated` (``set_range`` calls it) the module refuses to run, so an uncalibrated model
    can never produce numbers that look like results. While :attr:`observer` is set, ``forward`` records its
    input's rows and passes the input through unchanged.

    :param spec: what to do; ``spec.group_bits`` gives each group of ``spec.group_size`` channels its own
        bit-width.
    :param channels: size of the channel axis (needed for any granularity but ``tensor``).
    :param axis: the channel axis of the tensors this module will see.
    """

    #: True when the format is parametrised by a clip range per row (range calibrators call ``set_range``)
    uses_range: bool = True
    #: boolean attributes saved with the module's state (``state_dict``, ``.qcore`` files); a format with more
    #: flags than ``calibrated`` extends this
    state_flags: tuple[str, ...] = ("calibrated",)

    def __init__(self, spec: QuantSpec, channels: int | None, axis: int) -> None:
        super().__init__()
        self.spec = spec
        self.axis = axis
        self.channels = channels or 1
        per_channel = spec.granularity != "tensor"
        if per_channel and channels is None:
            raise ValueError("per-channel quantization needs the channel count")
        n = self.channels if per_channel else 1
        bits = torch.full((n,), float(spec.bits))
        if spec.group_bits is not None:
            assert spec.group_size
            groups = math.ceil(n / spec.group_size)
            if len(spec.group_bits) != groups:
                raise QcoreError(f"group_bits has {len(spec.group_bits)} entries but {n} channels in groups of "
                                 f"{spec.group_size} make {groups}")
            bits = torch.tensor(spec.group_bits, dtype=torch.float32).repeat_interleave(spec.group_size)[:n]
        self.register_buffer("bits", bits)  # per channel (or one value)
        self.rows = {"tensor": 1, "channel": n, "group": math.ceil(n / (spec.group_size or 1))}[spec.granularity]
        self.register_buffer("prune_value", torch.zeros(n))
        self.calibrated = False
        self.observer: Observer | None = None

    # -- rows: the view calibrators work on ----------------------------------------------------------------
    def _row_index(self) -> Tensor:
        """Channel indices of each row, ``[rows, width]``; a short last group repeats its own last channel."""
        g = self.spec.group_size or 1
        idx = torch.arange(self.rows)[:, None] * g + torch.arange(g)[None, :]
        return torch.clamp(idx, max=self.channels - 1)

    def rows_of(self, x: Tensor) -> Tensor:
        """``x`` rearranged to ``[rows, values]``: each row holds every value that shares one set of parameters."""
        if self.spec.granularity == "tensor":
            return x.reshape(1, -1)
        per_channel = x.movedim(self.axis, 0).reshape(self.channels, -1)
        if self.spec.granularity == "channel":
            return per_channel
        return per_channel[self._row_index()].reshape(self.rows, -1)

    def row_bits(self) -> Tensor:
        """The bit-width of each row."""
        if self.spec.granularity == "tensor":
            return self.bits[:1]
        if self.spec.granularity == "channel":
            return self.bits
        return self.bits[self._row_index()[:, 0]]

    def channel_values(self, row_values: Tensor) -> Tensor:
        """Per-row values (``[rows]``) spread to one value per channel (a scalar for per-tensor rows)."""
        if self.spec.granularity == "group":
            g = self.spec.group_size or 1
            return row_values.repeat_interleave(g)[: self.channels]
        return row_values

    def _shape(self, v: Tensor, ndim: int) -> Tensor:
        """Per-channel values ``v`` shaped to broadcast against an ``ndim``-dimensional input."""
        return _channel_shaped(v, ndim, self.axis)

    # -- calibration -----------------------------------------------------------------------------------------
    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Set the clip range of every row (shape ``[rows]`` or a scalar) and mark the module calibrated."""
        raise QcoreError(f"the {type(self).__name__} format has no clip range (uses_range is False); calibrate it "
                         "with a calibrator that calls fit(), or the calibrator its plugin recommends")

    def fit(self, rows: Tensor) -> None:
        """Fit the parameters from ``rows`` (``rows_of`` of the weight, or an activation sample), after
        :meth:`set_range` when the format uses one. The default does nothing; formats with parameters beyond
        a range (dead-zone thresholds, lattice bases) fit them here and call :meth:`mark_calibrated`."""

    def mark_calibrated(self) -> None:
        """Declare every parameter set: ``forward`` quantizes from now on."""
        self.calibrated = True

    def set_prune_value(self, per_channel: Tensor) -> None:
        """The constant that 0-bit channels take (default 0)."""
        self.prune_value.copy_(torch.as_tensor(per_channel, dtype=torch.float32).reshape(-1)
                               .expand(self.prune_value.numel()))

    # -- run-time bit-width switching (optional) -------------------------------------------------------------
    def bit_choices(self) -> tuple[int, ...]:
        """The bit-widths this quantizer holds parameters for and can switch between at run time
        (:meth:`select_bits`), ascending; ``()`` (the default) for a format fixed at its ``spec.bits``.

        .. versionadded:: 0.1 (plugin API 1, addition)
        """
        return ()

    def select_bits(self, bits: int) -> None:
        """Switch to ``bits`` (one of :meth:`bit_choices`): a switchable format swaps in the parameters it holds
        for that bit-width, with no data and no statistics. A fixed format accepts only its own bits.

        .. versionadded:: 0.1 (plugin API 1, addition)
        """
        if bits != self.spec.bits:
            raise QcoreError(f"{type(self).__name__} holds one bit-width ({self.spec.bits}) and cannot switch to "
                             f"{bits}; only a model calibrated for several bit-widths (e.g. --plugin ptmq) switches")

    def get_extra_state(self) -> Tensor:
        """The :attr:`state_flags` as a ``uint8`` tensor (what ``state_dict`` and ``.qcore`` files store)."""
        return torch.tensor([bool(getattr(self, f)) for f in self.state_flags], dtype=torch.uint8)

    def set_extra_state(self, state: Tensor) -> None:
        for f, v in zip(self.state_flags, torch.as_tensor(state).tolist(), strict=True):
            setattr(self, f, bool(v))

    # -- quantization ------------------------------------------------------------------------------------------
    def quantize(self, x: Tensor) -> Tensor:
        """The fake-quantized ``x`` (called once calibrated); formats implement this."""
        raise NotImplementedError(f"{type(self).__name__} must implement quantize()")

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.update(self.rows_of(x))
            return x
        if not self.calibrated:
            raise QcoreError(f"{type(self).__name__} used before calibration: the run's calibrator set no "
                             "parameters for it; choose a calibrator that supports this quantizer")
        return self.quantize(x)


class UniformFakeQuant(FakeQuantizer):
    """Fake-quantizes a tensor on a uniform grid (symmetric or affine), per tensor / channel / group.

    Parameters: one clip range ``[lo, hi]`` per row (:meth:`set_range`).
    """

    def __init__(self, spec: QuantSpec, channels: int | None, axis: int) -> None:
        super().__init__(spec, channels, axis)
        self.register_buffer("lo", torch.zeros(self.rows))
        self.register_buffer("hi", torch.zeros(self.rows))

    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        """Set the clip range of every row (shape ``[rows]`` or a scalar) and mark the module calibrated."""
        lo = torch.as_tensor(lo, dtype=torch.float32).reshape(-1).expand(self.lo.numel())
        hi = torch.as_tensor(hi, dtype=torch.float32).reshape(-1).expand(self.hi.numel())
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise QcoreError("a calibrated range is not finite (NaN or inf in the weights or activations); "
                             "check the model and the calibration data")
        self.lo.copy_(lo.to(self.lo.device))
        self.hi.copy_(hi.to(self.hi.device))
        self.mark_calibrated()

    def qparams(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per-channel ``(scale, zero_point, qmin, qmax, bits)`` as 1-D tensors."""
        lo, hi = self.channel_values(self.lo), self.channel_values(self.hi)
        scale, zero, qmin, qmax = qparams_from_range(lo, hi, self.bits, self.spec.symmetric)
        return scale, zero, qmin, qmax, self.bits

    def quantize(self, x: Tensor) -> Tensor:
        # through the qcore::fake_quantize_channels op, so a registered device kernel (qcore-cuda) can run it
        return fake_quantize_channels(x, *self.qparams(), self.prune_value, self.axis)

    def extra_repr(self) -> str:
        s = self.spec
        bits = f"bits={s.bits}" if not s.mixed else f"group_bits(avg={self.bits.mean():.2f})"
        return f"{bits}, {'symmetric' if s.symmetric else 'affine'}, {s.granularity}, axis={self.axis}"
