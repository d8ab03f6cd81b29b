"""A third-party qcore plugin, written only against qcore's public API (tests install it through a real
entry point). It adds an allocator, a method and a ``toy`` task whose model has no quantizable layer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import qcore
from qcore import Allocator, Method, Plan, RunConfig, Task, TaskInstance, layer_spec


class AllEight(Allocator):
    """Every layer at 8 bits, whatever the budget says."""

    name = "example-all8"
    description = "every layer W8A8"

    def allocate(self, ctx: qcore.RunContext) -> Plan:
        return Plan(layers={n: layer_spec(ctx.pipeline, 8, 8, ctx.quantizer.name) for n in ctx.layers},
                    meta={"allocator": self.name})


class ToyTask(Task):
    """``--model toy:noquant``: a model with no quantizable layer."""

    name = "toy"

    def build(self, config: RunConfig, host: Any) -> TaskInstance:
        model = nn.Sequential(nn.ReLU(), nn.Flatten())
        x = torch.randn(4, 1, 2, 2)
        return TaskInstance(model=model, model_name=config.model or "toy:noquant", metric="top1",
                            forward=lambda m, b: m(b), evaluate=lambda m: {"top1": 100.0}, calibration=[x],
                            example=x)


@qcore.hookimpl
def qcore_register_allocators(register: Any) -> None:
    register(AllEight)


@qcore.hookimpl
def qcore_register_methods(register: Any) -> None:
    register(Method("example", quantizer="uniform", calibrator="minmax", allocator="example-all8", default=True,
                    description="third-party example: W8A8 everywhere"))


@qcore.hookimpl
def qcore_register_tasks(register: Any) -> None:
    register(ToyTask)
