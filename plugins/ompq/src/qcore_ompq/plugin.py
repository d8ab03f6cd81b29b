"""Hook implementations of qcore-ompq (entry point ``ompq``)."""

from __future__ import annotations

from typing import Any

from qcore import Method, hookimpl

#: OMPQ's default: bits per layer from orthogonality at a 4-bit average (2..8 bits per layer, first and last layer
#: at 8 bits, paid from the budget), activations at 4 bits per tensor, then QDrop reconstruction (qcore-recon's
#: ``qdrop`` calibrator, its papers' affine per-channel weight grid); deployable integer grids.
#: ``act_correction=ompq-qat`` is the QAT stage, a no-op unless ``-o finetune_epochs=N`` (see qcore_ompq.qat).
OMPQ_DEFAULTS: dict[str, Any] = {"target_bits": 4.0, "a_bits": 4, "weight_symmetric": False,
                                 "act_correction": "ompq-qat"}


@hookimpl
def qcore_register_allocators(register: Any) -> None:
    from qcore_ompq.allocator import OMPQAllocator

    register(OMPQAllocator)


@hookimpl
def qcore_register_corrections(register: Any) -> None:
    from qcore_ompq.qat import OMPQFinetune

    register(OMPQFinetune)


@hookimpl
def qcore_register_methods(register: Any) -> None:
    register(Method(
        name="ompq", quantizer="uniform", calibrator="qdrop", allocator="ompq", default=True,
        defaults=dict(OMPQ_DEFAULTS),
        description="OMPQ: orthogonality-driven bits per layer (exact ILP) at --target-bits (default 4), A4, "
                    "QDrop reconstruction; -o finetune_epochs=N adds QAT fine-tuning"))
