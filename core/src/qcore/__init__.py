"""qcore: post-training quantization with pluggable quantizers, calibrators and allocators.

This module is the public API (plugin API version :data:`PLUGIN_API`). Plugins, tasks and users import from
``qcore`` and from these public submodules only:

* :mod:`qcore.ops` -- fake-quantization arithmetic with straight-through gradients (the CPU reference);
* :mod:`qcore.ranges` -- clip-range estimators (min/max, percentile, MSE) by name;
* :mod:`qcore.knapsack` -- multiple-choice knapsack solvers for bit allocation (exact DP, Lagrangian);
* :mod:`qcore.distributed` -- sharding work over ``torchrun`` processes;
* :mod:`qcore.testing` -- tiny models, a data-free task and contract checks for plugin tests;
* :mod:`qcore.hookspecs` -- the hooks a plugin implements (read it; implement with :data:`hookimpl`).

Every other module (those whose names start with ``_``) is private and may change without notice; a test
fails the build if a first-party plugin imports one. ``PLUGINS.md`` documents the contract of each role.
"""

from __future__ import annotations

from importlib import metadata

import pluggy

try:
    __version__ = metadata.version("qcore")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

#: Version of the plugin API in this module's ``__all__`` and the public submodules. A plugin written for
#: API 1 depends on ``qcore>=0.1,<0.2``; additions keep the number, removals or changes raise it.
PLUGIN_API = 1

#: Decorator for hook implementations: ``@qcore.hookimpl def qcore_register_methods(register): ...``
hookimpl = pluggy.HookimplMarker("qcore")

# The public names, grouped in __all__ below; the modules they come from are private.
from qcore._allocation import Pin, PipelineOptions, layer_spec  # noqa: E402
from qcore._api import Quantized, default_forward, load, quantize  # noqa: E402
from qcore._apply import apply_plan  # noqa: E402
from qcore._caching import cache_root, cache_root_problem, hash_update  # noqa: E402
from qcore._calibration import (  # noqa: E402
    MSECalibrator,
    PercentileCalibrator,
    RangeCalibrator,
    RangeOptions,
    WeightRangeOptions,
    calibrate_rows,
    input_rows,
    observe_activations,
    observe_inputs,
)
from qcore._components import (  # noqa: E402
    Allocator,
    Budget,
    Calibrator,
    Component,
    Correction,
    Method,
    ModelLoader,
    OutputCorrection,
    Quantizer,
    RunConfig,
    RunContext,
    Task,
    TaskInstance,
    WeightCorrection,
)
from qcore._cost import Cost, mean_bits, plan_cost  # noqa: E402
from qcore._devices import module_device, to_device  # noqa: E402
from qcore._equalize import equalization_scales, equalize_inputs  # noqa: E402
from qcore._errors import MissingDependencyError, NotImplementedMethodError, QcoreError  # noqa: E402
from qcore._fake_quant import FakeQuantizer, Observer, UniformFakeQuant  # noqa: E402
from qcore._fold import fold_batchnorm  # noqa: E402
from qcore._layers import LayerInfo, discover_layers, measure_layers, torch_layer_info, watch_layers  # noqa: E402
from qcore._onnx import OPSET as ONNX_OPSET  # noqa: E402
from qcore._onnx import ExportReport, export_onnx  # noqa: E402
from qcore._outputs import new_file_mode  # noqa: E402
from qcore._pipeline import RunOutcome, run  # noqa: E402
from qcore._plugins import load_host  # noqa: E402
from qcore._progress import track  # noqa: E402
from qcore._spec import MAX_BITS, LayerSpec, Plan, QuantSpec  # noqa: E402
from qcore._switch import select_bits, switchable_bits  # noqa: E402
from qcore._wrap import QuantLayer, iter_quantizers, quant_layers, replace_module  # noqa: E402

__all__ = [
    # values
    "MAX_BITS", "LayerSpec", "Plan", "QuantSpec", "LayerInfo", "Pin", "PipelineOptions", "layer_spec",
    # the Python API
    "quantize", "load", "Quantized", "default_forward", "select_bits", "switchable_bits", "export_onnx",
    "ExportReport", "ONNX_OPSET",
    # roles
    "Component", "Allocator", "Calibrator", "Quantizer", "Correction", "WeightCorrection", "OutputCorrection",
    "Method", "ModelLoader", "Task", "TaskInstance",
    "RunConfig", "RunContext", "Budget",
    # errors
    "QcoreError", "MissingDependencyError", "NotImplementedMethodError",
    # fake quantizers and wrapped layers
    "FakeQuantizer", "UniformFakeQuant", "Observer", "QuantLayer", "quant_layers", "iter_quantizers",
    # calibration
    "RangeCalibrator", "RangeOptions", "WeightRangeOptions", "MSECalibrator", "PercentileCalibrator",
    "calibrate_rows", "observe_activations", "observe_inputs", "watch_layers",
    "input_rows",
    # model helpers
    "discover_layers", "measure_layers", "torch_layer_info", "fold_batchnorm", "replace_module", "module_device",
    "to_device", "equalize_inputs", "equalization_scales", "apply_plan",
    # cost
    "Cost", "mean_bits", "plan_cost",
    # running
    "run", "RunOutcome", "load_host", "track", "new_file_mode", "cache_root", "cache_root_problem", "hash_update",
    # plugin machinery
    "PLUGIN_API", "__version__", "hookimpl",
]
