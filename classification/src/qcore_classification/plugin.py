"""Hook implementations of qcore-classification (entry point ``classification``)."""

from __future__ import annotations

from typing import Any

from qcore import ModelLoader, hookimpl


@hookimpl
def qcore_register_tasks(register: Any) -> None:
    from qcore_classification.task import ClassificationTask

    register(ClassificationTask)


@hookimpl
def qcore_register_model_loaders(register: Any) -> None:
    from qcore_classification.loaders import LOADERS

    for prefix, (fn, description) in LOADERS.items():
        register(ModelLoader(prefix=prefix, task="classification",
                             load=lambda name, weights, config, fn=fn: fn(name, weights, config.model_args),
                             description=description))
