"""The ``toy`` task: a model with no quantizable layer (tests use it to check that error)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import qcore


class ToyTask(qcore.Task):
    """``--task toy --model toy:noquant``: ReLU and Flatten only, and a constant metric."""

    name = "toy"
    description = "a model with no quantizable layer (for tests of that error)"

    def build(self, config: qcore.RunConfig, host: Any) -> qcore.TaskInstance:
        model = nn.Sequential(nn.ReLU(), nn.Flatten())
        x = torch.randn(4, 1, 2, 2)
        return qcore.TaskInstance(model=model, model_name=config.model or "toy:noquant", metric="top1",
                                  forward=lambda m, b: m(b), evaluate=lambda m: {"top1": 100.0}, calibration=[x],
                                  example=x, data={"calibration": "4 random inputs", "evaluation": "none"})
