"""Hook implementations of qcore-aciq (entry point ``aciq``): calibrators ``aciq``, ``nstd``, ``kl``, the
allocator ``aciq-channel``, the quantizer ``midtread`` (bin allocation) and the method ``aciq`` (the plugin's
default)."""

from __future__ import annotations

from typing import Any

from qcore import Method, hookimpl

#: The seed's headline recipe "W4A4 + ACIQ + Bit Alloc(A) + Bit Alloc(W) + Bias correction" on qcore's
#: quantizer: GEMMLOWP-style affine grids (integer zero point, exact zero) for weights and activations,
#: per-channel weights (min/max) and per-channel activations (needed by per-channel activation bits).
ACIQ_DEFAULTS: dict[str, Any] = {
    "w_bits": 4, "a_bits": 4,
    "weight_symmetric": False, "act_symmetric": False,
    "weight_granularity": "channel", "act_granularity": "channel",
    "weight_correction": "mean",
}


@hookimpl
def qcore_register_quantizers(register: Any) -> None:
    from qcore_aciq.bins import MidTreadQuantizer

    register(MidTreadQuantizer)


@hookimpl
def qcore_register_calibrators(register: Any) -> None:
    from qcore_aciq.calibrators import ACIQCalibrator, KLCalibrator, NstdCalibrator

    register(ACIQCalibrator)
    register(NstdCalibrator)
    register(KLCalibrator)


@hookimpl
def qcore_register_allocators(register: Any) -> None:
    from qcore_aciq.allocator import ChannelBitAllocator

    register(ChannelBitAllocator)


@hookimpl
def qcore_register_methods(register: Any) -> None:
    register(Method(
        name="aciq", quantizer="uniform", calibrator="aciq", allocator="aciq-channel", default=True,
        defaults=dict(ACIQ_DEFAULTS),
        description="ACIQ: Laplace clipping + per-channel bits of W and A + weight mean correction, W4A4 "
                    "(per-channel activations: simulation only)"))
