"""Core's own hook implementations: it knows Conv1d/Conv2d/Linear and wraps them with QuantLayer.

Both are ``trylast``, so a plugin that knows better (or knows other layer types) answers first. Core also
registers the ``plan`` allocator, which re-applies a saved plan.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from qcore import hookimpl
from qcore._act_correction import AffineCorrection, LocalCorrection, StaticCorrection
from qcore._bias_correction import MeanCorrection, MeanVarCorrection
from qcore._components import Allocator
from qcore._errors import QcoreError
from qcore._layers import LayerInfo, torch_layer_info
from qcore._outputs import read_text_file
from qcore._spec import Plan
from qcore._wrap import QuantLayer

if TYPE_CHECKING:
    from qcore._components import RunContext
    from qcore._spec import LayerSpec


@hookimpl(trylast=True)
def qcore_layer_info(module: nn.Module, name: str) -> LayerInfo | None:
    return torch_layer_info(module, name)


@hookimpl(trylast=True)
def qcore_wrap_module(module: nn.Module, info: LayerInfo, spec: LayerSpec, ctx: RunContext) -> nn.Module:
    wq = ctx.quantizer.make(spec.weight, "weight", info) if spec.weight is not None else None
    aq = ctx.quantizer.make(spec.act, "act", info) if spec.act is not None else None
    return QuantLayer(module, info, spec, wq, aq, weight_correction=ctx.weight_correction)


def read_plan_file(name: str) -> Plan:
    """The plan saved in file ``name``; a missing, unreadable or malformed file, or a plan that quantizes no layer,
    is a :class:`QcoreError` saying so."""
    path = Path(name)
    text = read_text_file(path, "plan file", "pass --plan PATH to a plan.json written by `qcore run`")
    try:
        plan = Plan.from_json(text)
    except QcoreError as exc:
        raise QcoreError(f"plan file {path}: {exc}") from None
    if not any(s.weight is not None or s.act is not None for s in plan.layers.values()):
        raise QcoreError(f"plan file {path} quantizes no layer, so the run would be the FP model; pass a plan.json "
                         "written by `qcore run`")
    return plan


@dataclass(frozen=True)
class PlanFileOptions:
    plan: str = field(default="", metadata={"help": "path of a plan.json to apply (what `qcore run --plan` sets)"})

    def __post_init__(self) -> None:
        if self.plan:  # a bad plan file is refused with the options, before the model is loaded
            read_plan_file(self.plan)


class PlanFileAllocator(Allocator):
    """Re-applies a plan written earlier by any method: core alone can apply every plan."""

    name = "plan"
    description = "apply a plan.json written by an earlier run (qcore run --plan FILE)"
    Options = PlanFileOptions
    #: the pipeline does not pin first/last layers over a saved plan unless -o first_last is given
    saved_plan = True

    def allocate(self, ctx: RunContext) -> Plan:
        return read_plan_file(self.options.plan)


@hookimpl
def qcore_register_allocators(register: Any) -> None:
    register(PlanFileAllocator)


@hookimpl
def qcore_register_corrections(register: Any) -> None:
    for cls in (MeanCorrection, MeanVarCorrection, StaticCorrection, AffineCorrection, LocalCorrection):
        register(cls)
