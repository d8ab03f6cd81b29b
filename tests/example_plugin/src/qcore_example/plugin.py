"""Hook implementations of qcore-example (entry point ``example``): each registry hook calls ``register``
once per component; the method with ``default=True`` is what ``qcore run --plugin example`` runs."""

from __future__ import annotations

from typing import Any

import qcore
from qcore_example.allocator import AllEight, GreedyAllocator
from qcore_example.calibrator import ExamplePercentileCalibrator
from qcore_example.quantizer import PowerOfTwoQuantizer
from qcore_example.task import ToyTask


@qcore.hookimpl
def qcore_register_quantizers(register: Any) -> None:
    register(PowerOfTwoQuantizer)


@qcore.hookimpl
def qcore_register_calibrators(register: Any) -> None:
    register(ExamplePercentileCalibrator)


@qcore.hookimpl
def qcore_register_allocators(register: Any) -> None:
    register(GreedyAllocator)
    register(AllEight)


@qcore.hookimpl
def qcore_register_methods(register: Any) -> None:
    register(qcore.Method(
        "example-pow2", quantizer="example-pow2", calibrator="example-percentile", allocator="example-greedy",
        defaults={"target_bits": 6.0, "a_bits": 8}, default=True,
        description="power-of-two scales, percentile ranges, greedy bits per layer at a 6-bit average, A8"))
    register(qcore.Method("example", quantizer="uniform", calibrator="minmax", allocator="example-all8",
                          description="W8A8 everywhere on core's uniform grid"))


@qcore.hookimpl
def qcore_register_tasks(register: Any) -> None:
    register(ToyTask)
