"""The ``uniform`` baseline every plugin is compared with.

Quantizer ``uniform`` (uniform grid, symmetric or affine, any granularity, per-group bits), calibrators
``minmax``, ``percentile`` and ``mse``, allocator ``fixed`` (the same bits for every layer), and the method
``uniform``: per-channel symmetric min/max weights, per-tensor affine min/max activations, W4A8 with the
first and last layer at 8 bits unless told otherwise.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qcore import hookimpl
from qcore._allocation import layer_spec
from qcore._calibration import MSECalibrator, PercentileCalibrator, RangeCalibrator
from qcore._components import Allocator, Method, Quantizer, RunContext
from qcore._errors import QcoreError
from qcore._fake_quant import UniformFakeQuant
from qcore._layers import LayerInfo
from qcore._spec import Plan, QuantSpec


class UniformQuantizer(Quantizer):
    """Uniform integer grid: :class:`qcore._fake_quant.UniformFakeQuant`."""

    name = "uniform"
    description = "uniform integer grid, symmetric or affine, per tensor / channel / group, per-group bits"

    def make(self, spec: QuantSpec, role: str, info: LayerInfo) -> nn.Module:
        if role == "weight":
            axis = info.weight_axis if spec.axis is None else spec.axis
            return UniformFakeQuant(spec, info.out_channels, axis)
        axis = info.act_axis if spec.axis is None else spec.axis
        return UniformFakeQuant(spec, info.in_channels, axis)


class FixedAllocator(Allocator):
    """Every layer gets the run's ``--w-bits`` / ``--a-bits``."""

    name = "fixed"
    budget_convention = None  # fixed bits: it does not spend --target-bits
    description = "the same weight and activation bits for every layer (--w-bits, --a-bits)"

    def allocate(self, ctx: RunContext) -> Plan:
        b = ctx.budget
        if b.w_bits is None or b.a_bits is None:
            raise QcoreError("the fixed allocator needs --w-bits and --a-bits")
        return Plan(layers={name: layer_spec(ctx.pipeline, b.w_bits, b.a_bits, ctx.quantizer.name)
                            for name in ctx.layers},
                    meta={"allocator": self.name, "w_bits": b.w_bits, "a_bits": b.a_bits})


@hookimpl
def qcore_register_quantizers(register: Any) -> None:
    register(UniformQuantizer)


@hookimpl
def qcore_register_calibrators(register: Any) -> None:
    register(RangeCalibrator)
    register(PercentileCalibrator)
    register(MSECalibrator)


@hookimpl
def qcore_register_allocators(register: Any) -> None:
    register(FixedAllocator)


@hookimpl
def qcore_register_methods(register: Any) -> None:
    register(Method(name="uniform", quantizer="uniform", calibrator="minmax", allocator="fixed",
                    defaults={"w_bits": 4, "a_bits": 8}, default=True,
                    description="baseline: fixed bits, per-channel min/max weights, per-tensor activations"))
