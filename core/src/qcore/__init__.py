"""qcore: post-training quantization with pluggable quantizers, calibrators and allocators.

The public API for plugin authors is re-exported here; everything else is internal.
"""

from __future__ import annotations

from importlib import metadata

import pluggy

try:
    __version__ = metadata.version("qcore")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

#: Decorator for hook implementations: ``@qcore.hookimpl def qcore_register_methods(register): ...``
hookimpl = pluggy.HookimplMarker("qcore")

from qcore.allocation import Pin, PipelineOptions, layer_spec  # noqa: E402
from qcore.components import (  # noqa: E402
    Allocator,
    Budget,
    Calibrator,
    Method,
    ModelLoader,
    Quantizer,
    RunConfig,
    RunContext,
    Task,
    TaskInstance,
)
from qcore.errors import MissingDependencyError, NotImplementedMethodError, QcoreError  # noqa: E402
from qcore.fake_quant import Observer, UniformFakeQuant  # noqa: E402
from qcore.layers import LayerInfo  # noqa: E402
from qcore.spec import LayerSpec, Plan, QuantSpec  # noqa: E402
from qcore.wrap import QuantLayer, iter_quantizers, quant_layers  # noqa: E402

__all__ = [
    "Allocator", "Budget", "Calibrator", "LayerInfo", "LayerSpec", "Method", "MissingDependencyError",
    "ModelLoader", "NotImplementedMethodError", "Observer", "Pin", "PipelineOptions", "Plan", "QcoreError",
    "QuantLayer", "QuantSpec", "Quantizer", "RunConfig", "RunContext", "Task", "TaskInstance",
    "UniformFakeQuant", "__version__", "hookimpl", "iter_quantizers", "layer_spec", "quant_layers",
]
