"""Hook implementations of qcore-rdoq (entry point ``rdoq``)."""

from __future__ import annotations

from typing import Any

from qcore import Method, hookimpl


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
        defaults={"target_bits": 4.0, "a_bits": 4, "weight_range": "mse"},
        description="RDOQ: RD-optimal bits per weight channel group at --target-bits (default 4) average; "
                    "activations uniform at --a-bits (default 4), MSE ranges"))
    register(Method(
        name="rdoq-deadzone", quantizer="deadzone", calibrator="mse", allocator="rdoq",
        defaults={"target_bits": 4.0, "a_bits": 4, "weight_range": "mse"},
        description="RDOQ with the seed's dead-zone search: each weight group and bit-width also tries 9 dead-zone "
                    "ratios (10-90 % of the group zeroed) and keeps the best; simulation only (non-integer levels)"))
