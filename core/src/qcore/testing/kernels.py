"""Random fake-quantization problems for checking a kernel against the reference, bit for bit.

Core's own op tests and device kernels (qcore-cuda) draw their cases here, so every implementation of
``qcore::fake_quantize_channels`` is held to the same cases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from qcore.ops import qparams_from_range

__all__ = ["FakeQuantCase", "fake_quant_case", "same_bits"]


@dataclass
class FakeQuantCase:
    """One problem in the form of :func:`qcore.ops.fake_quantize_channels`: ``x``, the per-channel parameters
    ``(scale, zero_point, qmin, qmax, bits, prune_value)`` (1-D, one value per channel or one in all) and the
    channel axis; ``granularity`` and ``symmetric`` say how they were made."""

    x: Tensor
    params: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
    axis: int
    granularity: str
    symmetric: bool

    def __repr__(self) -> str:
        return (f"{list(self.x.shape)}-axis{self.axis}-{self.granularity}-"
                f"{'sym' if self.symmetric else 'affine'}-{str(self.x.dtype).removeprefix('torch.')}")


def fake_quant_case(seed: int, max_dim: int = 9, half: float = 0.2) -> FakeQuantCase:
    """A random case: 1 to 4 dimensions of odd and tiny sizes (up to ``max_dim``), any channel axis, per-tensor,
    per-channel or per-group parameters (groups of 2 to 4 channels, a short last group, spread to channels as
    ``UniformFakeQuant`` does), bits 0..16 per row, symmetric or affine grids, about a quarter of the rows with a
    zero-width range and a quarter with a one-point range, values over five decades, float16 ``x`` with
    probability ``half``."""
    rng = random.Random(seed)
    ndim = rng.randint(1, 4)
    shape = [rng.choice([s for s in (1, 2, 3, 5, 7, 9, 13) if s <= max_dim]) for _ in range(ndim)]
    axis = rng.randrange(ndim)
    granularity = rng.choice(["tensor", "channel", "group"])
    symmetric = rng.random() < 0.5
    n = 1 if granularity == "tensor" else shape[axis]
    group = rng.randint(2, 4) if granularity == "group" else 1
    rows = -(-n // group)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    magnitude = 10 ** rng.uniform(-3, 2)
    x = torch.randn(shape, generator=gen) * magnitude
    lo = -torch.rand(rows, generator=gen) * magnitude * 2
    hi = torch.rand(rows, generator=gen) * magnitude * 2
    kind = torch.randint(0, 4, (rows,), generator=gen)
    lo = torch.where(kind == 0, torch.zeros_like(lo), lo)  # zero-width range
    hi = torch.where(kind == 0, torch.zeros_like(hi), hi)
    hi = torch.where(kind == 1, lo, hi)  # one-point range
    bits = torch.randint(0, 17, (rows,), generator=gen).float()

    def spread(v: Tensor) -> Tensor:
        return v.repeat_interleave(group)[:n]

    scale, zero, qmin, qmax = qparams_from_range(spread(lo), spread(hi), spread(bits), symmetric)
    prune = spread(torch.randn(rows, generator=gen))
    dtype = torch.float16 if rng.random() < half else torch.float32
    return FakeQuantCase(x.to(dtype), (scale, zero, qmin, qmax, spread(bits), prune), axis, granularity, symmetric)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """True when two float tensors hold the same bits (so ``-0.0`` differs from ``0.0``; NaNs compare by bits)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}[a.dtype]
    return torch.equal(a.detach().cpu().contiguous().view(ints), b.detach().cpu().contiguous().view(ints))
