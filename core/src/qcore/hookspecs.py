"""Hook specifications: the whole contract between qcore and its plugins.

A plugin is a module (or object) with functions decorated by ``qcore.hookimpl`` whose names are the hooks
below, registered through the entry-point group ``qcore`` in its distribution::

    [project.entry-points.qcore]
    myplugin = "qcore_myplugin"

Registry hooks receive a ``register`` callable; call it once per component. Names are global: two
plugins registering the same name is an error naming both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from qcore._components import RunContext
    from qcore._layers import LayerInfo
    from qcore._spec import LayerSpec

hookspec = pluggy.HookspecMarker("qcore")


# -- registries: collecting; call register(...) zero or more times ------------------------------------------
@hookspec
def qcore_register_quantizers(register: Any) -> None:
    """Register :class:`qcore.Quantizer` subclasses (numeric formats: uniform grid, lattice, ...).

    Called once per run or listing, when the registries are built. ``register(cls)``.

    .. versionadded:: 0.1
    """


@hookspec
def qcore_register_calibrators(register: Any) -> None:
    """Register :class:`qcore.Calibrator` subclasses (min/max, percentile, MSE, ACIQ clipping, ...).

    ``register(cls)``. Any calibrator can be combined with any method: ``qcore run --calibrator NAME``.

    .. versionadded:: 0.1
    """


@hookspec
def qcore_register_allocators(register: Any) -> None:
    """Register :class:`qcore.Allocator` subclasses (fixed bits, rate-distortion, orthogonality, ...).

    ``register(cls)``.

    .. versionadded:: 0.1
    """


@hookspec
def qcore_register_corrections(register: Any) -> None:
    """Register :class:`qcore.WeightCorrection` / :class:`qcore.OutputCorrection` subclasses (weight bias
    correction, per-channel output correction, ...). ``register(cls)``. A run selects at most one of each by
    name: ``-o weight_correction=NAME``, ``-o act_correction=NAME`` (``none``: no correction).

    .. versionadded:: 0.1
    """


@hookspec
def qcore_register_methods(register: Any) -> None:
    """Register :class:`qcore.Method` recipes: quantizer + calibrator + allocator + default options.

    ``register(Method(...))``; the method with ``default=True`` is what ``qcore run --plugin <this plugin>``
    runs.

    .. versionadded:: 0.1
    """


@hookspec
def qcore_register_tasks(register: Any) -> None:
    """Register :class:`qcore.Task` subclasses (classification, detection, ...). ``register(cls)``.

    .. versionadded:: 0.1
    """


@hookspec
def qcore_register_model_loaders(register: Any) -> None:
    """Register :class:`qcore.ModelLoader` values: ``register(ModelLoader("tv", "classification", fn))``
    serves ``--model tv:resnet18`` for the classification task.

    .. versionadded:: 0.1
    """


# -- layers: first result wins ----------------------------------------------------------------------------
@hookspec(firstresult=True)
def qcore_layer_info(module: nn.Module, name: str) -> LayerInfo | None:
    """Describe ``module`` as a quantizable layer, or return None when this plugin does not know its type.

    Called for every submodule during layer discovery. Core answers for Conv1d/Conv2d/Linear (``trylast``);
    a plugin answers for layer types core does not know (qcore-detection: spconv convolutions).

    :param name: the dotted module path.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def qcore_wrap_module(module: nn.Module, info: LayerInfo, spec: LayerSpec, ctx: RunContext
                      ) -> nn.Module | None:
    """Return the quantized replacement of ``module`` as ``spec`` says, or None to let another plugin do it.

    Called once per layer of the plan, after allocation and before calibration. Core's handler
    (``trylast``) returns a :class:`qcore.QuantLayer` with quantizers from ``ctx.quantizer``.

    :param info: the layer's description from ``qcore_layer_info``.
    :param spec: the plan's weight and activation specs for this layer.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def qcore_blocks(model: nn.Module) -> list[str] | None:
    """Name the blocks of ``model`` (dotted submodule paths, in forward order), or return None to let another
    plugin (or the method's own recognition) decide.

    A block is a submodule that takes one tensor and returns one tensor; block-wise methods (qcore-recon's
    ``brecq``/``qdrop``) reconstruct each as a unit and every quantized layer outside them on its own. A task or
    a model plugin answers for architectures whose blocks a method does not recognise by type. Core does not
    implement it. ``model`` is the FP model of the run (``ctx.model``; the wrapped model has the same names).

    .. versionadded:: 0.1
    """


# -- lifecycle observers: return values ignored -------------------------------------------------------------
@hookspec
def qcore_run_start(ctx: RunContext) -> None:
    """A run has its model, layers and components and is about to allocate.

    .. versionadded:: 0.1
    """


@hookspec
def qcore_stage_done(ctx: RunContext, stage: str, seconds: float) -> None:
    """A pipeline stage finished ("load", "fp_eval", "allocate", "apply", "calibrate", "quant_eval").

    .. versionadded:: 0.1
    """


@hookspec
def qcore_run_finish(ctx: RunContext, result: dict[str, Any]) -> None:
    """A run finished; ``result`` is what is written to result.json.

    .. versionadded:: 0.1
    """
