"""The component roles plugins implement, and the values the pipeline hands them.

* :class:`Quantizer`: the numeric format: builds the fake-quant module for a tensor.
* :class:`Calibrator`: sets ranges / rounding / steps of a wrapped model from calibration data.
* :class:`Allocator`: chooses bits per layer (and per channel group) under a budget: returns a
  :class:`~qcore._spec.Plan`.
* :class:`WeightCorrection`, :class:`OutputCorrection` (role ``correction``): fix what quantization shifts in
  each channel (data-free on weights; from calibration data on outputs).
* :class:`Method`: a named recipe: one of each, plus default options. ``--plugin X`` runs X's default.
* :class:`Task`: brings a model, calibration batches, a forward function and an evaluation.
* :class:`ModelLoader`: resolves ``--model PREFIX:NAME`` for a task.

Each component class declares ``name``, a one-line ``description`` and an ``Options`` dataclass; it is
constructed with an instance of its ``Options``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from qcore._errors import QcoreError
from qcore._options import NoOptions, convert_value

if TYPE_CHECKING:
    from qcore._allocation import Pin
    from qcore._layers import LayerInfo
    from qcore._spec import Plan, QuantSpec


class Component:
    """Base of every registered component."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()


class Quantizer(Component):
    """A numeric format. ``make`` returns a module ``x -> fake_quant(x)`` that a calibrator can set up."""

    def make(self, spec: QuantSpec, role: str, info: LayerInfo) -> nn.Module:
        """Build the fake-quantizer of one tensor.

        :param role: "weight" or "act".
        :param info: the layer the tensor belongs to (channel counts and axes).
        """
        raise NotImplementedError

    def extra_bits(self, spec: QuantSpec, role: str, info: LayerInfo) -> float:
        """Bits the format stores for one tensor beyond ``bits`` per element and core's 32-bit scale (and zero
        point) per row: a codebook, a lattice basis. Counted in ``size_mb`` and in ``w_bits_avg`` /
        ``a_bits_avg`` (spread over the tensor's elements). The default is 0.

        .. versionadded:: 0.1 (plugin API 1, an addition)
        """
        return 0.0


class Calibrator(Component):
    """Chooses quantization parameters of an already wrapped model from calibration data."""

    def calibrate(self, model: nn.Module, ctx: RunContext) -> None:
        """Set the parameters of every quantizer in ``model`` (see :func:`qcore._wrap.iter_quantizers`)."""
        raise NotImplementedError


class Allocator(Component):
    """Chooses a :class:`~qcore.LayerSpec` for every layer in ``ctx.layers`` under ``ctx.budget``.

    The pipeline checks what ``allocate`` returns: a :class:`~qcore.Plan` naming only layers of ``ctx.layers``,
    with an entry for every layer not in ``ctx.pinned`` (``LayerSpec(None, None)`` keeps one in FP; pins are
    applied over the plan by core), and, when the run has ``--target-bits``, the average weight bits the
    allocator's ``budget_convention`` promises.
    """

    #: what ``--target-bits`` bounds, checked by the pipeline on the final plan: ``"pins_included"`` (qcore's
    #: convention: the element-weighted average weight bits of every quantized layer, pinned ones included, as
    #: result.json's ``w_bits_avg``), ``"free_layers"`` (the same average over the unpinned layers: pins are not
    #: paid from the budget), or None (the allocator does not spend ``--target-bits`` -- fixed bits -- or
    #: measures its budget another way, jointly with activations or as an entropy, and checks it itself)
    budget_convention: ClassVar[str | None] = "pins_included"

    def allocate(self, ctx: RunContext) -> Plan:
        raise NotImplementedError


class Correction(Component):
    """Base of the ``correction`` role: fixes a systematic error quantization leaves (a channel's mean or
    spread). Subclass :class:`WeightCorrection` or :class:`OutputCorrection`; select one of each per run
    (``-o weight_correction=NAME``, ``-o act_correction=NAME``).

    :cvar summary: what the correction does, in words, for result.json's ``quantized.summary``.
    """

    summary: ClassVar[str] = ""


class WeightCorrection(Correction):
    """A data-free correction of each quantized weight, applied wherever the quantized weight is computed
    (deployment, and allocators that model it, such as RDOQ's curves)."""

    def correct(self, w: Tensor, wq: Tensor, axis: int) -> Tensor:
        """``wq`` (the quantized ``w``) corrected; ``axis`` is the weight's output-channel axis."""
        raise NotImplementedError


class OutputCorrection(Correction):
    """A correction of the calibrated quantized model from calibration data, run after calibration.

    It may set each :class:`~qcore.QuantLayer`'s ``out_scale`` / ``out_correction`` (per output channel; they
    fold into the weight scale and the bias, so the model stays deployable) or anything else it documents.
    """

    def correct(self, qmodel: nn.Module, fp_model: nn.Module, ctx: RunContext) -> None:
        """Correct ``qmodel`` in place, comparing with ``fp_model`` (the FP model it was quantized from)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Method:
    """A recipe: the names of one quantizer, calibrator and allocator, plus default option values.

    :param default: this is the method ``--plugin <owner>`` runs.
    """

    name: str
    quantizer: str
    calibrator: str
    allocator: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    default: bool = False


@dataclass
class TaskInstance:
    """A ready task: an FP model in eval mode, calibration data and evaluation.

    :param forward: runs a model on one batch and returns the *distortion target* (the tensor allocators
        compare against FP: logits for classification).
    :param evaluate: computes the metrics of a model on the evaluation set (``{"top1": 94.6, ...}``).
    :param calibration: batches accepted by ``forward`` (drawn from the training split, never evaluation).
    :param example: one batch for shape inference and MAC counting.
    :param data: what the calibration and evaluation data are, in words (written into result.json).
    """

    model: nn.Module
    model_name: str
    metric: str
    forward: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    calibration: Sequence[Any]
    example: Any
    data: dict[str, str] = field(default_factory=dict)
    #: why torch.fx cannot trace this task's models, when the task knows (BatchNorm folding then skips them with
    #: an info line instead of a warning on every run); None: a failed trace is worth a warning
    untraceable: str | None = None
    #: names of the layers ``first_last`` treats as the model's last layers (a detector with several heads has
    #: one output layer per head branch); those that are quantizable and included are pinned. Empty, or none of
    #: them included: the last quantizable layer in forward order, as for any model
    last_layers: tuple[str, ...] = ()
    #: a context manager factory that backward passes through this task's models must run inside, when they need
    #: one (spconv's CPU kernels do: the detection task gives its ``spconv_cpu_guard``); None: none needed
    grad_context: Callable[[], AbstractContextManager[Any]] | None = None
    #: splits a calibration batch into pieces of one sample each, or of part of one sample (the detection task's
    #: embedded detectors: one batch_dict per scene, or per tile of a scene with ``-o curve_tiles``; a
    #: batch_dict is not a tensor that slices); estimators whose noise falls with the number of independent
    #: batches use it (RDOQ's projected second-order curves draw their random directions per piece). A piece's
    #: ``forward`` must stay on its sample's scale: the pieces of one sample together carry that sample's
    #: distortion (the detection task scales a tile's target by sqrt(tiles)). None: batches are used as they are
    split: Callable[[Any], Sequence[Any]] | None = None
    #: what one piece of ``split`` is, in words for plans and results (``"per sample"``; the detection task with
    #: ``-o curve_tiles=4``: ``"per tile (4 per scene)"``)
    split_unit: str = "per sample"
    #: the task's settings that change what ``forward`` returns for the same model and batch (the detection
    #: task's ``target``: ``{"target": "head"}``), JSON-serializable; caches of quantities measured through
    #: ``forward`` (RDOQ's curve caches) include them in their keys. Empty: none
    forward_key: dict[str, Any] = field(default_factory=dict)


class Task(Component):
    """A task plugin: turns the run configuration into a :class:`TaskInstance`.

    Its ``Options`` (``-o key=value``, e.g. the detection task's distortion ``target``) are validated with the
    other components' options. ``--calib-size`` and ``--batch-size`` default to the task's own values.
    """

    default_calib_size: ClassVar[int] = 512
    default_batch_size: ClassVar[int] = 256
    #: The model settings of :class:`RunConfig` this task interprets: ``"input"`` (``--input-size``, ``--mean``,
    #: ``--std``, ``--channels``) and/or ``"model_args"`` (``--model-arg``). Core refuses a run that sets one
    #: the task does not take, instead of silently ignoring it.
    accepts: ClassVar[frozenset[str]] = frozenset()

    def build(self, config: RunConfig, host: Any) -> TaskInstance:
        """Load model and data as ``config`` says; ``host`` resolves model loaders
        (``host.model_loader(task, prefix)``)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ModelLoader:
    """Resolves ``--model PREFIX:NAME`` for ``task``: ``load(name, weights, config)`` returns what that task
    expects (classification: a ``LoadedModel`` with the model and its input spec)."""

    prefix: str
    task: str
    load: Callable[[str, Path | None, RunConfig], Any]
    description: str = ""

    @property
    def name(self) -> str:
        """The registry key: ``task/prefix`` (two tasks may both have a ``zoo:``)."""
        return f"{self.task}/{self.prefix}"


@dataclass(frozen=True)
class Budget:
    """The user's bit budget: fixed bits (``w_bits``/``a_bits``) and/or an average target."""

    w_bits: int | None = None
    a_bits: int | None = None
    target_bits: float | None = None


@dataclass
class RunConfig:
    """Everything ``qcore run`` was asked for, after YAML and CLI were merged."""

    plugin: str | None = None
    method: str | None = None
    task: str = "classification"
    model: str | None = None
    weights: Path | None = None
    data: str | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    target_bits: float | None = None
    calib_size: int | None = None  # None: the task's default (Task.default_calib_size)
    batch_size: int | None = None  # None: the task's default (Task.default_batch_size)
    eval_size: int | None = None
    device: str = "cpu"
    seed: int = 0
    out: Path | None = None
    quantizer: str | None = None
    calibrator: str | None = None
    allocator: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: overrides of the model's preprocessing, keys of :data:`INPUT_FLAGS`: ``size`` and ``channels`` (ints),
    #: ``mean`` and ``std`` (tuples of floats, one per channel or one for all); the task interprets them
    input: dict[str, Any] = field(default_factory=dict)
    #: keyword arguments for the model's constructor (``--model-arg key=value``); the model loader passes them on
    model_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input = check_input(self.input)
        self.model_args = check_model_args(self.model_args)


#: ``RunConfig.input`` keys and the command-line flags that set them (the YAML recipe's ``input:`` takes the keys).
INPUT_FLAGS = {"size": "--input-size", "mean": "--mean", "std": "--std", "channels": "--channels"}


def _where(key: str) -> str:
    return f"{INPUT_FLAGS[key]} (input.{key})"


def check_input(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate and convert preprocessing overrides: ``size``/``channels`` to positive ints, ``mean``/``std`` to
    non-empty tuples of finite floats (``std`` positive). A number or a ``"a,b,c"`` string is accepted for
    ``mean``/``std``; None values are dropped. Raises a :class:`QcoreError` naming the flag."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise QcoreError(f"input must be a mapping with keys {', '.join(INPUT_FLAGS)} "
                         f"(e.g. input: {{size: 32, mean: 0.286, std: 0.353}}), got {values!r}")
    unknown = sorted(str(k) for k in values if k not in INPUT_FLAGS)
    if unknown:
        raise QcoreError(f"unknown input key(s) {', '.join(unknown)}; valid: {', '.join(INPUT_FLAGS)}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in ("size", "channels"):
            try:
                number = convert_value(key, value, int) if not isinstance(value, bool) else None
            except QcoreError:
                number = None
            if number is None or number < 1:
                raise QcoreError(f"{_where(key)} {value!r} must be a whole number of at least 1, e.g. "
                                 f"{INPUT_FLAGS[key]} {32 if key == 'size' else 3}")
            out[key] = number
            continue
        items = (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        try:
            if isinstance(items, bool) or not isinstance(items, (str, list, tuple)):
                raise QcoreError("not a list")
            floats = convert_value(key, items, tuple[float, ...])
        except QcoreError:
            floats = ()
        if not floats or not all(math.isfinite(f) for f in floats) or (key == "std" and min(floats) <= 0):
            raise QcoreError(f"{_where(key)} {value!r} must be {'positive ' if key == 'std' else ''}numbers "
                             f"separated by commas, one per channel or one for all, e.g. {INPUT_FLAGS[key]} "
                             + ("0.485,0.456,0.406" if key == "mean" else "0.229,0.224,0.225"))
        out[key] = floats
    return out


def check_model_args(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check constructor arguments: a mapping whose keys are Python identifiers (values are passed as given)."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise QcoreError(f"model_args must be a mapping of constructor arguments (e.g. model_args: {{img_size: 32}}), "
                         f"got {values!r}")
    bad = [str(k) for k in values if not str(k).isidentifier()]
    if bad:
        raise QcoreError(f"model argument {bad[0]!r} is not a valid keyword argument name; use --model-arg name=value")
    return {str(k): v for k, v in values.items()}


@dataclass
class RunContext:
    """What components see during a run.

    :param model: the FP model (BN folded when the pipeline folds), never modified by allocators.
    :param layers: the quantizable layers, by name, with shapes measured.
    :param pinned: layers whose bits the user fixed (first/last, per-layer overrides), as :class:`qcore.Pin`
        (``w_bits``/``a_bits``, None = floating point): allocators keep them out of the optimisation (and may
        count their bits against the budget); core applies them over any plan.
    :param options: all option values of this run (validated), by key.
    :param pipeline: the pipeline options (granularity, first/last, ...) as a
        :class:`qcore.PipelineOptions`.
    :param calibrator: the calibrator that will calibrate the allocated plan (None when a context is built
        without one): allocators that model deployment read its estimators and options from it.
    :param measured: facts components measured during the run, copied into result.json's ``measured``.
    :param artifacts: files (``{"plots/rd.png": b"..."}``) written next to result.json when the run succeeds.
    """

    config: RunConfig
    task: TaskInstance
    model: nn.Module
    layers: dict[str, LayerInfo]
    budget: Budget
    pinned: dict[str, Pin]
    options: dict[str, Any]
    quantizer: Quantizer
    pipeline: Any = None
    hooks: Any = None
    cache_dir: Path | None = None
    calibrator: Calibrator | None = None
    #: measurements components add to the run's result (written to result.json under ``"measured"``), e.g. a
    #: calibrator's entropy of the quantized codes; keys should name the component
    measured: dict[str, Any] = field(default_factory=dict)
    #: extra files written with the run's outputs (atomically, only if the run succeeds), by relative path
    artifacts: dict[str, bytes] = field(default_factory=dict)
    #: the run's weight correction (``-o weight_correction``), None for none: wrapped layers apply it, allocators
    #: that price candidate weights apply it too
    weight_correction: WeightCorrection | None = None
    #: the run's output correction (``-o act_correction``), run after calibration; None for none
    output_correction: OutputCorrection | None = None

    def calibration_batches(self) -> Iterable[Any]:
        return self.task.calibration
