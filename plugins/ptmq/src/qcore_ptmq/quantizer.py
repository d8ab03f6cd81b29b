"""The multi-bit quantizer: one tensor, several bit-widths, switched at run time through the
:class:`qcore.FakeQuantizer` protocol (``bit_choices`` / ``select_bits``).

A :class:`MultiBitFakeQuant` is core's uniform grid (:class:`qcore.UniformFakeQuant`) holding one clip range per
row **for every bit-width** it serves (``lo_set``/``hi_set``, ``[bits, rows]``): the step-size set S_w of a weight
(frozen after its MSE initialisation) or S_a of an activation (learned by LSQ during reconstruction). The active
bit-width's range sits in the base class's ``lo``/``hi``, so calibrators, LSQ and the saved file see an ordinary
uniform quantizer. A weight quantizer also holds the **shared rounding** R (one 0/1 tensor for all bit-widths,
learned by :class:`SharedRounding`): a weight W is quantized at bit b as s_b·(clip(⌊W/s_b⌋ + R + z_b) − z_b), so
switching bits changes only which step set is read, never the weight or R.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import qcore
from qcore_recon import ActQuant, LSQAct, WeightRounding, rectified_sigmoid
from qcore_recon.rounding import broadcast, inverse_rectified_sigmoid


def parse_bits(text: str, what: str) -> tuple[int, ...]:
    """``"2,3,4"`` -> ``(2, 3, 4)``; a :class:`qcore.QcoreError` for anything else."""
    try:
        bits = tuple(sorted({int(b) for b in str(text).replace(" ", "").split(",") if b}))
    except ValueError:
        raise qcore.QcoreError(f"{what}={text!r}: give bit-widths separated by commas, e.g. 2,3,4") from None
    if not bits or any(not 1 <= b <= qcore.MAX_BITS for b in bits):
        raise qcore.QcoreError(f"{what}={text!r}: give at least one bit-width, each 1..{qcore.MAX_BITS}")
    return bits


@dataclass(frozen=True)
class BitGroupOptions:
    """The bit groups (``-o low_bits=3,4 -o mid_bits=5,6 -o high_bits=7,8``): every bit-width a PTMQ model
    serves; during reconstruction one bit is drawn per group per step, for weights and activations together."""

    low_bits: str = field(default="3,4", metadata={
        "help": "low-bit group (comma-separated bit-widths; 2,3,4 adds 2 bits at a cost to 3 bits, see the README)"})
    mid_bits: str = field(default="5,6", metadata={"help": "middle-bit group"})
    high_bits: str = field(default="7,8", metadata={"help": "high-bit group (the distillation teacher)"})

    def __post_init__(self) -> None:
        self.groups()

    def groups(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(low, mid, high)`` bit-widths."""
        return (parse_bits(self.low_bits, "low_bits"), parse_bits(self.mid_bits, "mid_bits"),
                parse_bits(self.high_bits, "high_bits"))

    def all_bits(self) -> tuple[int, ...]:
        """Every bit-width of the three groups, ascending."""
        return tuple(sorted({b for g in self.groups() for b in g}))


class MultiBitFakeQuant(qcore.UniformFakeQuant):
    """Core's uniform grid with one clip range per bit-width in ``choices`` (plus ``spec.bits``).

    * :meth:`select_bits` swaps the active range in (no data, no statistics);
    * :meth:`set_range` sets the active bit-width's range (a calibrator calls it once per bit, after
      :meth:`select_bits`); quantizing at a bit-width that has no range yet is an error;
    * :meth:`restrict` keeps one bit-width only (a first/last layer held at 8 bits): then it does not switch;
    * weights: ``rounding`` (None until reconstruction sets it) is the shared learned rounding R.
    """

    def __init__(self, spec: qcore.QuantSpec, channels: int | None, axis: int, choices: tuple[int, ...],
                 role: str = "weight") -> None:
        if spec.group_bits is not None:
            raise qcore.QcoreError("the ptmq quantizer switches whole tensors between bit-widths; a plan with "
                                   "per-channel-group bits needs another quantizer")
        super().__init__(spec, channels, axis)
        self.role = role
        bits = tuple(sorted(set(choices) | {spec.bits}))
        self.register_buffer("choice_bits", torch.tensor(bits, dtype=torch.int64))
        self.register_buffer("allowed", torch.ones(len(bits), dtype=torch.bool))
        self.register_buffer("ranged", torch.zeros(len(bits), dtype=torch.bool))
        self.register_buffer("lo_set", torch.zeros(len(bits), self.rows))
        self.register_buffer("hi_set", torch.zeros(len(bits), self.rows))
        self.register_buffer("active", torch.tensor(bits.index(spec.bits), dtype=torch.int64))
        self.register_buffer("rounding", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # a learned rounding in the state (a resumed unit, a saved file) creates the buffer it is loaded into
        key = prefix + "rounding"
        if self.rounding is None and key in state_dict:
            self.rounding = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- switching -----------------------------------------------------------------------------------------
    def _index(self, bits: int) -> int:
        hit = (self.choice_bits == bits).nonzero()
        if hit.numel() == 0 or not bool(self.allowed[int(hit[0])]):
            held = ", ".join(str(int(b)) for b, ok in zip(self.choice_bits, self.allowed, strict=True) if ok)
            raise qcore.QcoreError(f"this quantizer holds bit-widths {held}, not {bits}; choose one of those")
        return int(hit[0])

    def bit_choices(self) -> tuple[int, ...]:
        held = tuple(int(b) for b, ok in zip(self.choice_bits, self.allowed, strict=True) if ok)
        return held if len(held) > 1 else ()

    def held_bits(self) -> tuple[int, ...]:
        """Every bit-width held, also when there is only one (a restricted quantizer)."""
        return tuple(int(b) for b, ok in zip(self.choice_bits, self.allowed, strict=True) if ok)

    @property
    def active_bits(self) -> int:
        """The bit-width in use."""
        return int(self.choice_bits[int(self.active)])

    @torch.no_grad()
    def select_bits(self, bits: int) -> None:
        k = self._index(bits)
        self.active.fill_(k)
        self.bits.fill_(float(bits))
        self.lo.copy_(self.lo_set[k])
        self.hi.copy_(self.hi_set[k])

    @torch.no_grad()
    def restrict(self, bits: int) -> None:
        """Hold only ``bits`` from now on (it must be one of the choices)."""
        k = self._index(bits)
        self.allowed.zero_()
        self.allowed[k] = True
        self.select_bits(bits)
        self.mark_calibrated()

    # -- calibration ---------------------------------------------------------------------------------------
    def set_range(self, lo: Tensor, hi: Tensor) -> None:
        k = int(self.active)
        with torch.no_grad():
            self.lo_set[k] = torch.as_tensor(lo, dtype=torch.float32).reshape(-1).expand(self.rows).to(self.lo.device)
            self.hi_set[k] = torch.as_tensor(hi, dtype=torch.float32).reshape(-1).expand(self.rows).to(self.hi.device)
            self.ranged[k] = True
        super().set_range(lo, hi)


    # -- quantization --------------------------------------------------------------------------------------
    def quantize(self, x: Tensor) -> Tensor:
        if not bool(self.ranged[self.active]):
            raise qcore.QcoreError(f"{type(self).__name__} has no range for {self.active_bits} bits: calibrate every "
                                   "bit-width it holds (the ptmq calibrator does)")
        r = self.rounding
        if r is None or r.shape != x.shape:
            return super().quantize(x)
        scale, zero, qmin, qmax, _ = self.qparams()
        s, z, lo, hi = (broadcast(t.to(x.device, torch.float32), x.dim(), self.axis) for t in (scale, zero, qmin, qmax))
        q = torch.clamp(torch.floor(x.float() / s) + r + z, lo, hi)
        return ((q - z) * s).to(x.dtype)

    # -- reconstruction (qcore-recon's protocol) -----------------------------------------------------------
    def recon_rounding(self, weight: Tensor) -> SharedRounding:
        return SharedRounding(self, weight)

    def recon_act(self) -> MultiBitLSQ:
        return MultiBitLSQ(self)

    def extra_repr(self) -> str:
        return (f"bits={self.active_bits} of {list(self.held_bits())}, "
                f"{'symmetric' if self.spec.symmetric else 'affine'}, {self.spec.granularity}, axis={self.axis}")


class SharedRounding(WeightRounding):
    """AdaRound's rectified-sigmoid rounding h(V), **one V per weight shared by every bit-width**: the soft weight
    at the quantizer's active bit b is s_b·(clip(⌊W/s_b⌋ + h(V) + z_b, qmin, qmax_b) − z_b) with the frozen step
    set S_w. V starts at the fractional part of W/s at ``init_bits`` (so that bit-width starts at the FP weight).
    :meth:`final_weight` stores the hard rounding 1[V ≥ 0] in the quantizer's ``rounding`` buffer and returns the
    FP weight unchanged: the layer keeps W, the quantizer applies R at whatever bit-width is selected."""

    def __init__(self, quantizer: MultiBitFakeQuant, weight: Tensor, init_bits: int | None = None) -> None:
        super().__init__()
        self.quantizer = [quantizer]  # not a submodule
        w = weight.detach().float()
        self.register_buffer("w", w)
        current = quantizer.active_bits
        held = quantizer.held_bits()
        b0 = init_bits if init_bits in held else current
        quantizer.select_bits(b0)
        scale = broadcast(quantizer.qparams()[0].float().to(w.device), w.dim(), quantizer.axis)
        quantizer.select_bits(current)
        frac = w / scale - torch.floor(w / scale)
        self.v = nn.Parameter(inverse_rectified_sigmoid(frac))

    def h(self) -> Tensor:
        return rectified_sigmoid(self.v)

    def soft(self) -> Tensor:
        q = self.quantizer[0]
        scale, zero, qmin, qmax, _ = q.qparams()
        s, z, lo, hi = (broadcast(t.float().to(self.w.device), self.w.dim(), q.axis) for t in (scale, zero, qmin, qmax))
        x = torch.clamp(torch.floor(self.w / s) + self.h() + z, lo, hi)
        return (x - z) * s

    def regularizer(self, beta: float) -> Tensor:
        return (1.0 - (2.0 * self.h() - 1.0).abs().pow(beta)).sum()

    def final_weight(self) -> Tensor:
        with torch.no_grad():
            q = self.quantizer[0]
            q.rounding = (self.v.detach() >= 0).float().to(q.lo.device)
            return self.w.clone()


class MultiBitLSQ(ActQuant):
    """LSQ step sizes for every bit-width of a :class:`MultiBitFakeQuant` activation (one :class:`qcore_recon.LSQAct`
    per held bit-width, each its own parameters, so Adam updates only the ones a step used); the active
    bit-width's steps quantize. :meth:`commit` writes every bit-width's learned range back."""

    def __init__(self, quantizer: MultiBitFakeQuant) -> None:
        super().__init__(quantizer)
        current = quantizer.active_bits
        self.held = quantizer.held_bits()
        per: list[LSQAct] = []
        for b in self.held:
            quantizer.select_bits(b)
            per.append(LSQAct(quantizer))
        quantizer.select_bits(current)
        self.per_bit = nn.ModuleList(per)

    def quantize(self, x: Tensor) -> Tensor:
        q = self.base[0]
        return self.per_bit[self.held.index(q.active_bits)].quantize(x)

    @torch.no_grad()
    def commit(self) -> None:
        q = self.base[0]
        current = q.active_bits
        for b, act in zip(self.held, self.per_bit, strict=True):
            q.select_bits(b)
            act.commit()
        q.select_bits(current)


class MultiBitQuantizer(qcore.Quantizer):
    """``--quantizer ptmq``: :class:`MultiBitFakeQuant` for weights and activations, holding every bit-width of
    the bit groups (``-o low_bits/mid_bits/high_bits``) plus the plan's own."""

    name = "ptmq"
    description = "uniform grid with one step set per bit-width (run-time switchable); the bit groups' bit-widths"
    Options = BitGroupOptions

    def make(self, spec: qcore.QuantSpec, role: str, info: qcore.LayerInfo) -> nn.Module:
        choices = self.options.all_bits()
        if role == "weight":
            axis = info.weight_axis if spec.axis is None else spec.axis
            return MultiBitFakeQuant(spec, info.out_channels, axis, choices, role)
        axis = info.act_axis if spec.axis is None else spec.axis
        return MultiBitFakeQuant(spec, info.in_channels, axis, choices, role)


__all__ = ["BitGroupOptions", "MultiBitFakeQuant", "MultiBitLSQ", "MultiBitQuantizer", "SharedRounding", "parse_bits"]
