"""Hook implementations of qcore-latticeq (entry point ``latticeq``): quantizer ``lattice``, calibrator
``lattice-search`` and method ``latticeq`` (the plugin's default)."""

from __future__ import annotations

from typing import Any

from qcore import Method, hookimpl

#: The seed's main setting on qcore: W4A8 with 8-bit bases, per-channel bases, per-tensor activations (deployable
#: ranges; the decoded weights are not an integer grid), each output channel's mean kept (core's weight
#: correction ``mean``), first and last layer at 8 bits.
LATTICEQ_DEFAULTS: dict[str, Any] = {
    "w_bits": 4, "a_bits": 8,
    "weight_symmetric": True, "weight_granularity": "channel",
    "act_symmetric": False, "act_granularity": "tensor",
    "weight_correction": "mean",
}


@hookimpl
def qcore_register_quantizers(register: Any) -> None:
    from qcore_latticeq.quantizer import LatticeQuantizer

    register(LatticeQuantizer)


@hookimpl
def qcore_register_calibrators(register: Any) -> None:
    from qcore_latticeq.calibrator import LatticeSearchCalibrator

    register(LatticeSearchCalibrator)


@hookimpl
def qcore_register_methods(register: Any) -> None:
    register(Method(
        name="latticeq", quantizer="lattice", calibrator="lattice-search", allocator="fixed", default=True,
        defaults=dict(LATTICEQ_DEFAULTS),
        description="LatticeQ: per-channel lattice bases (exact bounded closest points, searched from the scalar "
                    "grid, 8-bit bases counted in the size), quantile activation ranges, mean correction; W4A8"))
