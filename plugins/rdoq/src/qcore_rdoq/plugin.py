"""Hook implementations of qcore-rdoq (entry point ``rdoq``)."""

from __future__ import annotations

from typing import Any

from qcore import Method, hookimpl

#: Both RDOQ methods: 4-bit average weights, A4, MSE ranges, and each quantized layer's output channels given
#: FP's mean and std on the calibration data (``act_correction=affine``, deployable). The correction undoes
#: what MSE clipping shrinks: on the zoo ViT at 4 bits 85.52 -> 90.69 top-1, on the zoo ResNet at 3 bits
#: 88.56 -> 92.60, and no change beyond noise on the ResNet at 4 bits (BENCHMARKS.md). ``-o
#: act_correction=none`` measures the allocation alone, as the accuracy tables do.
RDOQ_DEFAULTS: dict[str, Any] = {"target_bits": 4.0, "a_bits": 4, "weight_range": "mse", "act_correction": "affine"}


@hookimpl
def qcore_register_allocators(register: Any) -> None:
    from qcore_rdoq.allocator import RDOQAllocator

    register(RDOQAllocator)


@hookimpl
def qcore_register_quantizers(register: Any) -> None:
    from qcore_rdoq.deadzone import DeadZoneQuantizer

    register(DeadZoneQuantizer)


@hookimpl
def qcore_register_methods(register: Any) -> None:
    register(Method(
        name="rdoq", quantizer="uniform", calibrator="mse", allocator="rdoq", default=True,
        defaults=dict(RDOQ_DEFAULTS),
        description="RDOQ: RD-optimal bits per weight channel group at --target-bits (default 4) average; "
                    "activations uniform at --a-bits (default 4), MSE ranges, affine output correction"))
    register(Method(
        name="rdoq-deadzone", quantizer="deadzone", calibrator="mse", allocator="rdoq",
        defaults=dict(RDOQ_DEFAULTS),
        description="RDOQ with the seed's dead-zone search: each weight group and bit-width also tries 9 dead-zone "
                    "ratios (10-90 % of the group zeroed) and keeps the best; simulation only (non-integer levels)"))
