"""The ``lattice`` quantizer: each output channel's weights, cut into length-``n`` vectors, are coded as integer
coordinates in a per-channel basis (LatticeQ's bounded lattice), decoded by the exact closest-vector search.

Format of one weight row (an output channel, or the whole tensor with ``-o weight_granularity=tensor``, the
seed's per-layer mode): the row's values in ``rows_of`` order (``C_in, kh, kw``), cut into consecutive vectors
of length ``n`` (zero-padded at the end when the row length is not a multiple of ``n``), each coded by ``n``
integers in qcore's symmetric range ``[-2^(M-1), 2^(M-1) - 1]`` (``M`` the row's bits) times the row's
``n x n`` basis. ``basis = step * I`` is exactly core's symmetric per-channel uniform grid.

``n`` (:func:`lattice_dim`): 3 for 3x3 convolutions (each vector one kernel row), ``-o dim`` (2 by default, or
3) for 1x1 convolutions and linear layers, 1 (a scalar grid with a per-channel step) for the first layer of an
image model (a conv reading at most 3 channels), any other kernel, and layers whose channels are so short that
the basis would cost more than ``-o max_overhead`` (0.5) bits per weight (1x1 convs with 16 or 32 inputs).

Basis storage (``-o basis_bits=B``, 8 by default; 0 keeps it in 32-bit float): each basis entry is one of the
``2^B - 1`` levels ``t * k / (2^(B-1) - 1)``, ``|k| <= 2^(B-1) - 1``, with ``t`` the row's largest ``|entry|``:
a grid that contains 0, so ``step * I`` is stored exactly (the seed's grid had no 0). A row stores ``n^2 * B``
bits plus ``t`` (one 32-bit float, the one core counts as the row's scale); for ``n = 1`` the basis is the
step itself and nothing more is stored. A row whose basis is ``c * I`` (the scalar grid with step ``c``) needs no
basis either: its step is the row's scale. So a tensor is stored in the cheapest of three layouts
(:meth:`LatticeFakeQuant.stored_extra_bits`): every row scalar (0 bits), every row a basis (``n^2 * B`` per
row), or mixed (a 1-bit flag per row plus ``n^2 * B`` per row with a basis). The ``lattice-search`` calibrator
chooses which rows keep a basis, exactly per tensor, by the gain at equal rate with these bits paid.
:meth:`LatticeQuantizer.extra_bits` declares the calibrated tensor's bits (before calibration: the all-basis upper
bound) to qcore's cost accounting, so ``size_mb`` and ``w_bits_avg`` include them.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import qcore
from qcore.ops import int_range, qparams_from_range
from qcore.ranges import mse_range
from qcore_latticeq.cvp import closest_points, decode

__all__ = ["LatticeOptions", "LatticeFakeQuant", "LatticeQuantizer", "lattice_dim", "quantize_basis"]


@dataclass(frozen=True)
class LatticeOptions:
    """``-o`` options of the ``lattice`` quantizer (they shape the stored format, so ``.qcore`` files keep them)."""

    dim: int = field(default=2, metadata={
        "help": "lattice dimension n of 1x1 convolutions and linear layers (1, 2 or 3; 3x3 convs use kernel rows, "
                "n = 3; the first layer is scalar)"})
    basis_bits: int = field(default=8, metadata={
        "help": "bits per basis entry (on a grid containing 0, plus one float scale per channel); 0 = 32-bit float "
                "bases. Counted in size_mb and w_bits_avg"})
    max_overhead: float = field(default=0.5, metadata={
        "help": "a layer whose basis storage would exceed this many bits per weight (n^2 * basis_bits over the "
                "channel's weights: 1x1 convs with few input channels) stays scalar (n = 1)"})

    def __post_init__(self) -> None:
        if self.dim not in (1, 2, 3):
            raise qcore.QcoreError(f"dim={self.dim}: the exact closest-point search supports n = 1, 2 or 3; use "
                                   "-o dim=2 or -o dim=3")
        if self.basis_bits != 0 and not 2 <= self.basis_bits <= 16:
            raise qcore.QcoreError(f"basis_bits={self.basis_bits} is out of range; use 2..16, or 0 for float bases")
        if not self.max_overhead >= 0:
            raise qcore.QcoreError(f"max_overhead={self.max_overhead} must be 0 or more (bits per weight)")


def lattice_dim(info: qcore.LayerInfo, dim: int, basis_bits: int = 8, max_overhead: float = math.inf) -> int:
    """The vector length ``n`` of a layer's weight: 3 for a 3x3 convolution (its kernel rows), ``dim`` for a
    1x1 convolution or a linear layer, 1 for a convolution reading at most 3 channels (the image stem) and for
    any other kernel (a scalar per-channel grid); also 1 when the basis (``n^2 * basis_bits`` bits per output
    channel, 32 per entry for float bases) would cost more than ``max_overhead`` bits per weight."""
    n = 1
    if info.kind == "linear":
        n = dim
    elif info.kind == "conv2d" and info.in_channels > 3:
        if info.macs_per_out == 9 * info.in_channels:
            n = 3
        elif info.macs_per_out == info.in_channels:
            n = dim
    per_channel = info.weight_numel / max(info.out_channels, 1) if info.weight_numel else math.inf
    if n > 1 and n * n * (basis_bits or 32) > max_overhead * per_channel:
        return 1
    return n


def quantize_basis(basis: Tensor, bits: int) -> Tensor:
    """``basis`` (``[C, n, n]``) on each row's ``B``-bit grid containing 0: ``t * round(b / t * K) / K`` with
    ``K = 2^(B-1) - 1`` and ``t`` the row's largest ``|entry|``; ``bits = 0`` returns it unchanged. Straight-
    through gradient."""
    if bits == 0:
        return basis
    k = float(2 ** (bits - 1) - 1)
    t = basis.detach().abs().amax(dim=(1, 2), keepdim=True)
    t = torch.where(t > 0, t, torch.ones_like(t))
    scaled = basis / t * k
    q = scaled + (torch.round(scaled) - scaled).detach()
    return t * (q / k)


class LatticeFakeQuant(qcore.FakeQuantizer):
    """A weight on a bounded lattice code per row (see the module docstring).

    Calibration (``uses_range = False``): :meth:`fit` sets each row's basis to ``step * I`` with the step of the
    MSE-optimal symmetric scalar grid (core's :func:`qcore.ranges.mse_range`), so a ``lattice`` weight calibrated
    by any calibrator is at least that grid; the ``lattice-search`` calibrator then improves the bases
    (:func:`qcore_latticeq.search.search_bases`) and stores them with :meth:`set_basis`.

    ``quantize`` decodes with the exact closest-point search and a straight-through gradient. Without a
    gradient the result is cached for the last tensor seen (same storage and version), so evaluation decodes
    each weight once even outside a frozen :class:`qcore.QuantLayer`.
    """

    uses_range = False

    def __init__(self, spec: qcore.QuantSpec, channels: int, axis: int, n: int, basis_bits: int) -> None:
        if spec.granularity == "group":
            raise qcore.QcoreError("the lattice quantizer keeps one basis per output channel or per tensor; use "
                                   "-o weight_granularity=channel (or tensor), not channel groups")
        super().__init__(spec, channels, axis)
        self.n = n
        self.basis_bits = basis_bits
        self.register_buffer("basis", torch.eye(n).repeat(self.rows, 1, 1))
        self._cache: tuple[Any, Tensor] | None = None

    # -- rows as vectors -----------------------------------------------------------------------------------
    def vectors_of(self, rows: Tensor) -> Tensor:
        """``rows`` (``[rows, values]``) cut into ``[rows, L, n]`` vectors, the last zero-padded."""
        pad = (-rows.shape[1]) % self.n
        if pad:
            rows = torch.cat([rows, rows.new_zeros(rows.shape[0], pad)], dim=1)
        return rows.reshape(rows.shape[0], -1, self.n)

    def code_bounds(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """Per-row integer bounds ``(qmin, qmax)``: qcore's symmetric range for each row's bits."""
        return int_range(self.row_bits().to(device or self.basis.device), symmetric=True)

    def codes(self, rows: Tensor, basis: Tensor | None = None) -> Tensor:
        """The exact closest codes of ``rows`` (``[rows, L, n]``, whole numbers) for ``basis`` (default: the
        stored one)."""
        v = self.vectors_of(rows.detach())
        b = (self.basis if basis is None else basis).to(v)
        qmin, qmax = self.code_bounds(v.device)
        return closest_points(v, b, qmin.to(v), qmax.to(v))

    def decode_rows(self, rows: Tensor, basis: Tensor | None = None) -> Tensor:
        """``rows`` replaced by their closest code points (``[rows, values]``; 0-bit rows by the prune value)."""
        b = (self.basis if basis is None else basis).to(rows)
        out = decode(self.codes(rows, b), b).reshape(rows.shape[0], -1)[:, : rows.shape[1]]
        pruned = self.row_bits().to(rows.device) == 0
        if pruned.any():
            prune = self.prune_value if self.spec.granularity == "channel" else self.prune_value[:1]
            out = torch.where(pruned[:, None], prune.to(rows)[:, None].expand_as(out), out)
        return out

    def _unrows(self, rows: Tensor, like: Tensor) -> Tensor:
        """Inverse of :meth:`rows_of` for tensor and channel rows."""
        if self.spec.granularity == "tensor":
            return rows.reshape(like.shape)
        moved = like.movedim(self.axis, 0)
        return rows.reshape(moved.shape).movedim(0, self.axis)

    # -- storage ----------------------------------------------------------------------------------------------
    def basis_rows(self) -> Tensor:
        """Per row, whether its basis must be stored (``[rows]`` bool): ``False`` for a basis ``c * I`` (a scalar
        grid whose step ``c`` is the row's scale) and for ``n = 1``."""
        if self.n == 1:
            return torch.zeros(self.rows, dtype=torch.bool, device=self.basis.device)
        diag = self.basis.diagonal(dim1=-2, dim2=-1)
        off = self.basis - torch.diag_embed(diag)
        is_scalar = (off == 0).all(dim=(1, 2)) & (diag == diag[:, :1]).all(dim=1)
        return ~is_scalar

    def stored_extra_bits(self) -> float:
        """Bits stored beyond the codes and the rows' scales, in the cheapest layout: 0 when every row is a scalar
        grid; else the smaller of ``rows * n^2 * B`` (every row a basis) and ``rows + k * n^2 * B`` (a 1-bit flag
        per row, ``k`` rows with a basis); ``B`` = ``basis_bits`` (32 for float bases)."""
        k = int(self.basis_rows().sum())
        if k == 0:
            return 0.0
        per_basis = self.n * self.n * (self.basis_bits or 32)
        return float(min(self.rows * per_basis, self.rows + k * per_basis))

    # -- calibration ------------------------------------------------------------------------------------------
    def scalar_step(self, rows: Tensor, extra_bits: int = 0, weights: Tensor | None = None,
                    p: float = 2.0) -> Tensor:
        """Per-row step of the MSE-optimal symmetric scalar grid with this quantizer's bits (plus ``extra_bits``;
        with 0: the search's start): core's :func:`qcore.ranges.mse_range` clip search. ``weights`` (one
        non-negative value per weight of a row) and ``p`` choose the clip minimising ``sum weights * |error|^p``
        instead (the output-aware start of ``-o weighting=input``; ``p=3`` for ``-o loss=cubic``)."""
        bits = self.row_bits().to(rows.device) + extra_bits
        lo, hi = mse_range(rows.float(), bits, True, p=p, weights=weights)
        scale, _, _, _ = qparams_from_range(lo, hi, bits, True)
        return scale

    def fit(self, rows: Tensor) -> None:
        """Set every row's basis to ``step * I`` of the MSE-optimal scalar grid and mark the module calibrated."""
        step = self.scalar_step(rows.detach())
        eye = torch.eye(self.n, device=rows.device)
        self.set_basis(step[:, None, None] * eye)

    def set_basis(self, basis: Tensor) -> None:
        """Store ``basis`` (``[rows, n, n]``) on the ``basis_bits`` grid and mark the module calibrated."""
        basis = torch.as_tensor(basis, dtype=torch.float32)
        if basis.shape != self.basis.shape:
            raise qcore.QcoreError(f"a lattice basis of shape {tuple(basis.shape)} does not fit this quantizer "
                                   f"({tuple(self.basis.shape)})")
        if not torch.isfinite(basis).all():
            raise qcore.QcoreError("a lattice basis is not finite (NaN or inf in the weights?); check the model")
        with torch.no_grad():
            self.basis.copy_(quantize_basis(basis.to(self.basis.device), self.basis_bits))
        self._cache = None
        self.mark_calibrated()

    # -- quantization -----------------------------------------------------------------------------------------
    def quantize(self, x: Tensor) -> Tensor:
        grad = torch.is_grad_enabled() and x.requires_grad
        key = (x.data_ptr(), x._version, tuple(x.shape), x.dtype, self.basis._version, self.basis.data_ptr())
        if not grad and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            out = self._unrows(self.decode_rows(self.rows_of(x.detach().float())), x).to(x.dtype)
        if grad:
            return x + (out - x).detach()
        self._cache = (key, out)
        return out

    def recon_rounding(self, weight: Tensor) -> nn.Module:
        """qcore-recon's learned rounding for this format (:class:`qcore_latticeq.recon.LatticeRounding`)."""
        from qcore_latticeq.recon import LatticeRounding

        return LatticeRounding(self, weight)

    def extra_repr(self) -> str:
        return (f"bits={self.spec.bits}, n={self.n}, basis_bits={self.basis_bits or 'fp32'}, "
                f"{self.spec.granularity}, axis={self.axis}")


class LatticeQuantizer(qcore.Quantizer):
    """``--quantizer lattice``: :class:`LatticeFakeQuant` for weights, core's uniform grid for activations."""

    name = "lattice"
    description = ("LatticeQ weights: per-channel n x n bases on kernel rows / input pairs, exact bounded closest "
                   "points (-o dim, -o basis_bits); activations on core's uniform grid")
    Options = LatticeOptions
    #: the decoded weights are sums of basis entries times integers, not an integer grid: no integer-only GEMM
    integer_grid = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the weight quantizers this component built, by layer name: :meth:`extra_bits` reads their layout
        self._made: dict[str, weakref.ref[LatticeFakeQuant]] = {}

    def make(self, spec: qcore.QuantSpec, role: str, info: qcore.LayerInfo) -> nn.Module:
        if role == "weight":
            axis = info.weight_axis if spec.axis is None else spec.axis
            n = self.dim_of(info)
            fq = LatticeFakeQuant(spec, info.out_channels, axis, n, self.options.basis_bits)
            self._made[info.name] = weakref.ref(fq)
            return fq
        axis = info.act_axis if spec.axis is None else spec.axis
        return qcore.UniformFakeQuant(spec, info.in_channels, axis)

    def dim_of(self, info: qcore.LayerInfo) -> int:
        """``n`` for a layer under this quantizer's options (:func:`lattice_dim`)."""
        o = self.options
        return lattice_dim(info, o.dim, o.basis_bits, o.max_overhead)

    def extra_bits(self, spec: qcore.QuantSpec, role: str, info: qcore.LayerInfo) -> float:
        """Basis storage of a weight: once the weight quantizer this component made for ``info`` is calibrated,
        its :meth:`LatticeFakeQuant.stored_extra_bits` (scalar rows store no basis; mixed tensors pay a 1-bit
        flag per row); before, the upper bound ``n^2 * basis_bits`` per row (32 per entry with float bases) when
        ``n > 1``. The row's scale is the 32-bit scale core already counts."""
        n = self.dim_of(info)
        if role != "weight" or n == 1:
            return 0.0
        ref = self._made.get(info.name)
        fq = ref() if ref is not None else None
        if fq is not None and fq.calibrated and fq.n == n and fq.spec == spec:
            return fq.stored_extra_bits()
        rows = 1 if spec.granularity == "tensor" else info.out_channels
        return float(rows * n * n * (self.options.basis_bits or 32))

