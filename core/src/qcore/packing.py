"""Packed low-bit weights: the reference for storing a per-group plan's integer codes in their real bits.

Layout. A weight is viewed as ``[C, K]`` rows (``C`` channels along the quantizer's axis, moved first; ``K``
values each). Channel ``c`` has ``bits[c]`` bits (0..16, per-group plans repeat a group's value over its
channels, as :meth:`qcore.UniformFakeQuant.qparams` gives them). Its values are stored as unsigned codes
``q - qmin`` (``0 .. 2^b - 1``) in one little-endian bitstream per row: code ``k`` of the row occupies bits
``k*b .. k*b + b - 1`` counted from the least significant bit of the row's first byte. Each row starts on a
byte (``ceil(K * b / 8)`` bytes, so a row of odd length wastes under one byte) and the rows follow each other
in one flat ``uint8`` tensor; 0-bit rows take no byte. int4 is then two codes per byte (low nibble first), int2
four, int3 eight codes in three bytes.

Values. The codes are those of :func:`qcore.ops.fake_quantize` (``q = clamp(round(w / s) + zp, qmin, qmax)``),
and :func:`dequantize` gives back ``(q - zp) * s`` in float32 (the prune value on 0-bit rows): exactly the
fake-quantized weight, bit for bit.

Matmul. :func:`dequant_matmul` (``x @ W^T`` with ``W`` dequantized from its packed codes) runs through the torch
op ``qcore::dequant_matmul``, whose implementation on every device is :func:`dequant_matmul_reference`;
``qcore-cuda`` registers a Triton kernel for CUDA tensors that unpacks the codes inside the matmul.
``QCORE_KERNELS=reference`` skips the op.

.. versionadded:: 0.1 (plugin API 1, addition)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qcore._errors import QcoreError
from qcore.ops import kernels_mode

__all__ = ["MAX_BITS", "row_bytes", "row_offsets", "codes_from_weight", "pack_codes", "unpack_codes",
           "dequantize", "pack_weight", "unpack_weight", "dequant_matmul", "dequant_matmul_reference",
           "packed_nbytes", "pack_layers"]

#: the widest code :func:`pack_codes` stores
MAX_BITS = 16


def _int_bits(bits: Tensor) -> Tensor:
    b = torch.as_tensor(bits).reshape(-1)
    if b.numel() and (b.min() < 0 or b.max() > MAX_BITS or (b != b.round()).any()):
        raise QcoreError(f"packed codes take whole bit-widths 0..{MAX_BITS}; got {b.unique().tolist()}")
    return b.to(torch.int64)


def row_bytes(bits: Tensor, length: int) -> Tensor:
    """Bytes each row takes: ``ceil(length * bits / 8)`` (``[C]`` int64; 0 for 0-bit rows)."""
    return (_int_bits(bits) * length + 7) // 8


def row_offsets(bits: Tensor, length: int) -> Tensor:
    """Byte offset of each row in the packed tensor, ``[C + 1]`` int64 (the last entry is the total)."""
    nb = row_bytes(bits, length)
    return torch.cat([torch.zeros(1, dtype=torch.int64), nb.cumsum(0)])


def codes_from_weight(w: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor) -> Tensor:
    """Unsigned codes ``clamp(round(w / s) + zp, qmin, qmax) - qmin`` of ``w`` (``[C, K]``) with per-row
    parameters (``[C]``), as int32: the integers :func:`qcore.ops.fake_quantize` puts on its grid."""
    p = [t.reshape(-1, 1).to(torch.float32) for t in (scale, zero_point, qmin, qmax)]
    q = torch.clamp(torch.round(w.float() / p[0]) + p[1], p[2], p[3])
    return (q - p[2]).to(torch.int32)


def pack_codes(codes: Tensor, bits: Tensor) -> Tensor:
    """Pack unsigned codes ``[C, K]`` (row ``c`` holding values below ``2^bits[c]``) into the flat ``uint8``
    layout of this module (row bitstreams, least significant bit first, each row starting on a byte)."""
    if codes.dim() != 2:
        raise QcoreError(f"pack_codes takes codes shaped [rows, values], got {tuple(codes.shape)}")
    b = _int_bits(bits).to(codes.device)
    if b.numel() != codes.shape[0]:
        raise QcoreError(f"pack_codes got {b.numel()} bit-widths for {codes.shape[0]} rows; give one per row")
    c64 = codes.to(torch.int64)
    if c64.numel() and (c64.min() < 0 or (c64 >= (1 << b)[:, None]).any()):
        raise QcoreError("a code does not fit its row's bit-width; codes must lie in [0, 2^bits - 1]")
    length = codes.shape[1]
    offs = row_offsets(b.cpu(), length).to(codes.device)
    out = torch.zeros(int(offs[-1]), dtype=torch.uint8, device=codes.device)
    for width in b.unique().tolist():  # rows of one width are packed together
        if width == 0:
            continue
        rows = (b == width).nonzero().reshape(-1)
        nb = (length * width + 7) // 8
        stream = ((c64[rows, :, None] >> torch.arange(width, device=codes.device)) & 1).reshape(rows.numel(), -1)
        stream = torch.nn.functional.pad(stream, (0, nb * 8 - stream.shape[1])).reshape(rows.numel(), nb, 8)
        byte = (stream << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)  # [R, nb]
        out[(offs[rows][:, None] + torch.arange(nb, device=codes.device)).reshape(-1)] = byte.reshape(-1)
    return out


def unpack_codes(packed: Tensor, bits: Tensor, length: int) -> Tensor:
    """The codes ``[C, length]`` (int32) that :func:`pack_codes` packed into ``packed`` with ``bits``; 0-bit rows
    come back as zeros."""
    b = _int_bits(bits).to(packed.device)
    offs = row_offsets(b.cpu(), length).tolist()
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != offs[-1]:
        raise QcoreError(f"packed codes must be a flat uint8 tensor of {offs[-1]} bytes for these bit-widths and "
                         f"rows of {length}; got {packed.dtype} {tuple(packed.shape)}")
    out = torch.zeros(b.numel(), length, dtype=torch.int32, device=packed.device)
    offs_t = torch.tensor(offs, device=packed.device)
    for width in b.unique().tolist():
        if width == 0:
            continue
        rows = (b == width).nonzero().reshape(-1)
        nb = (length * width + 7) // 8
        byte = packed[(offs_t[rows][:, None] + torch.arange(nb, device=packed.device)).reshape(-1)]
        stream = (byte.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1
        stream = stream.reshape(rows.numel(), -1)
        digits = stream[:, : length * width].reshape(rows.numel(), length, width)
        out[rows] = (digits << torch.arange(width, device=packed.device)).sum(-1).to(torch.int32)
    return out


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, bits: Tensor,
               prune_value: Tensor) -> Tensor:
    """``((codes + qmin) - zp) * s`` per row in float32, ``prune_value`` on 0-bit rows: the fake-quantized
    weight ``[C, K]`` bit for bit (``q - zp`` and the product are the reference's own operations)."""
    p = [t.reshape(-1, 1).to(torch.float32) for t in (scale, zero_point, qmin, bits, prune_value)]
    q = codes.to(torch.float32) + p[2]
    out = (q - p[1]) * p[0]
    return torch.where(p[3] == 0, p[4], out)


def pack_weight(w: Tensor, axis: int, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                bits: Tensor) -> Tensor:
    """The packed codes of a whole weight ``w`` (any shape) quantized per channel along ``axis`` (one value per
    channel in each parameter): its rows ``[C, K]`` (channels moved first) through :func:`codes_from_weight` and
    :func:`pack_codes`. :func:`unpack_weight` is the inverse up to quantization.

    .. versionadded:: 0.1 (plugin API 1, addition)
    """
    rows = w.movedim(axis, 0).reshape(w.shape[axis], -1)
    return pack_codes(codes_from_weight(rows, scale, zero_point, qmin, qmax), bits)


def unpack_weight(packed: Tensor, shape: Sequence[int], axis: int, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                  bits: Tensor, prune_value: Tensor) -> Tensor:
    """The fake-quantized weight of ``shape`` (float32) that :func:`pack_weight` packed along ``axis``: the rows
    decoded by :func:`unpack_codes` and :func:`dequantize`, moved back to their axis.

    .. versionadded:: 0.1 (plugin API 1, addition)
    """
    moved = list(shape)
    moved.insert(0, moved.pop(axis))
    rows = dequantize(unpack_codes(packed, bits, int(torch.Size(moved[1:]).numel())), scale, zero_point, qmin, bits,
                      prune_value)
    return rows.reshape(moved).movedim(0, axis)


def dequant_matmul_reference(x: Tensor, packed: Tensor, bits: Tensor, scale: Tensor, zero_point: Tensor,
                             qmin: Tensor, prune_value: Tensor, length: int) -> Tensor:
    """``x @ W^T`` (float32) with ``W = dequantize(unpack_codes(packed, bits, length), ...)``: ``x`` is
    ``[..., length]``, the result ``[..., C]``."""
    w = dequantize(unpack_codes(packed, bits, length), scale, zero_point, qmin, bits, prune_value)
    return x.to(torch.float32) @ w.t()


@torch.library.custom_op("qcore::dequant_matmul", mutates_args=())
def _dequant_matmul_op(x: Tensor, packed: Tensor, bits: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                       prune_value: Tensor, length: int) -> Tensor:
    """``x @ W^T`` with ``W`` held as packed codes; implementation on every device:
    :func:`dequant_matmul_reference`."""
    return dequant_matmul_reference(x, packed, bits, scale, zero_point, qmin, prune_value, length)


@_dequant_matmul_op.register_fake
def _(x: Tensor, packed: Tensor, bits: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
      prune_value: Tensor, length: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], bits.shape[0]), dtype=torch.float32)


def dequant_matmul(x: Tensor, packed: Tensor, bits: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                   prune_value: Tensor, length: int, *, kernels: str | None = None) -> Tensor:
    """``x @ W^T`` in float32 for a weight ``W`` (``[C, length]``) stored as packed codes with per-row ``bits``,
    ``scale``, ``zero_point``, ``qmin`` and ``prune_value`` (``[C]`` each): through the op
    ``qcore::dequant_matmul`` (a registered device kernel runs), or the reference with ``kernels="reference"``
    (default: the ``QCORE_KERNELS`` environment variable). No gradient: this is for deployment."""
    if x.shape[-1] != length:
        raise QcoreError(f"dequant_matmul: x has {x.shape[-1]} features but the packed rows hold {length}")
    args = (x, packed, bits.float(), scale.float(), zero_point.float(), qmin.float(), prune_value.float(), length)
    if kernels_mode(kernels) == "reference":
        return dequant_matmul_reference(*args)
    return torch.ops.qcore.dequant_matmul(*args)


def packed_nbytes(bits: Tensor, length: int) -> int:
    """Bytes of the packed codes of ``[C, length]`` rows with ``bits`` (what the file and memory hold for the
    integers; per-row scales and zero points come on top)."""
    return int(row_bytes(bits, length).sum())


def pack_layers(qmodel: torch.nn.Module) -> dict[str, int]:
    """Make ``qmodel``'s weights really hold their bits in memory: every layer that a packed file would pack
    (:func:`qcore._saved.packable_layers`: plain :class:`qcore.UniformFakeQuant` weight, no weight correction)
    drops its float weight and keeps only its packed codes (a ``uint8`` buffer) and per-row parameters
    (:meth:`qcore.QuantLayer.hold_packed`); its forward decodes the fake-quantized weight, so outputs are the
    unpacked model's (a Conv's bit for bit; a Linear on 2-D/3-D input goes through :func:`dequant_matmul`, the
    Triton kernel on CUDA with ``qcore-cuda``, equal within float32 rounding). Changes ``qmodel`` in place, for
    inference only (no training, saving or recalibration afterwards); returns ``{layer name: packed bytes}``.
    ``qcore.load(path, model, packed=True)`` calls it.

    .. versionadded:: 0.1 (plugin API 1, addition)
    """
    from qcore._saved import _rows_params, packable_layers

    done: dict[str, int] = {}
    for name, layer in packable_layers(qmodel).items():
        if layer.packed_shape is not None:  # already packed
            continue
        wq = layer.weight_quantizer
        w = layer.module.weight.detach()
        axis = int(wq.axis) % w.dim()  # type: ignore[union-attr]
        scale, zero, qmin, qmax, bits, prune = (t.to(w.device) for t in _rows_params(wq, w.shape[axis]))  # type: ignore[arg-type]
        codes = pack_weight(w, axis, scale, zero, qmin, qmax, bits)
        layer.hold_packed(codes, scale, zero, qmin, bits, prune, axis)
        done[name] = codes.numel()
    return done
