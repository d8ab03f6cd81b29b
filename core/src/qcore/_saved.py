"""The ``.qcore`` file: one safetensors file holding a quantized model's plan, quantizer parameters and weights.

Tensors: the quantized model's ``state_dict`` (weights after BN folding, every quantizer's buffers and flags,
output corrections). Metadata (JSON strings): the plan, the quantizer and weight correction by name with their
options, and the pipeline options that shaped the model (BN folding, include/exclude). Nothing is pickled, so
loading a file runs no code from it. :func:`load_quantized` re-applies the file to a freshly built FP model
through the same plugins, and reproduces the saved model's outputs exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcore import __version__, packing
from qcore._allocation import PipelineOptions
from qcore._apply import apply_plan, freeze
from qcore._components import Budget, RunConfig, RunContext
from qcore._errors import QcoreError
from qcore._fake_quant import FakeQuantizer, UniformFakeQuant
from qcore._fold import fold_batchnorm
from qcore._layers import discover_layers
from qcore._options import build_options
from qcore._plugins import Host, load_host
from qcore._spec import Plan
from qcore._switch import bits_in_effect, select_bits, switchable_bits
from qcore._wrap import QuantLayer, iter_quantizers, quant_layers

log = logging.getLogger(__name__)

FORMAT = "qcore-model"
FORMAT_VERSION = 2
#: format 1: float weights; format 2 adds packed weight codes (``packed_weights``), written only by
#: ``save(..., packed=True)`` so that a qcore that reads format 1 only says "upgrade" instead of failing later
_READS = ("1", "2")


def _options(component: Any) -> dict[str, Any]:
    return dataclasses.asdict(component.options) if dataclasses.is_dataclass(component.options) else {}


def unsaved_reason(qmodel: nn.Module) -> str | None:
    """Why ``qmodel`` cannot be saved as a ``.qcore`` file, or None: every quantizer must be a
    :class:`FakeQuantizer` (a wrapper installed by a calibrator, such as ACIQ's test-time ranges, is not rebuilt
    by :func:`load_quantized`)."""
    odd = [f"{layer}.{role} ({type(q).__name__})" for layer, role, q in iter_quantizers(qmodel)
           if not isinstance(q, FakeQuantizer)]
    if odd:
        return (f"{len(odd)} quantizer(s) are not qcore.FakeQuantizer modules, e.g. {odd[0]}: a calibrator "
                "replaced them (test-time statistics?), and a saved file could not rebuild them")
    return packed_reason(qmodel, "saved")


def packed_reason(qmodel: nn.Module, what: str) -> str | None:
    """Why ``qmodel`` cannot be ``what`` (saved, exported) because layers hold packed codes in memory, or None."""
    held = [name for name, layer in quant_layers(qmodel).items() if layer.packed_shape is not None]
    if not held:
        return None
    return (f"{len(held)} layer(s) hold packed weight codes in memory (e.g. {held[0]}; qcore.packing.pack_layers or "
            f"qcore.load(..., packed=True)), which is for inference only and cannot be {what}; use the unpacked "
            "model (Quantized.save(path, packed=True) writes packed codes to the file)")


def saved_bytes(qmodel: nn.Module, plan: Plan, ctx: RunContext, packed: bool = False) -> bytes:
    """``qmodel`` (as the run ``ctx`` made it from ``plan``) as the bytes of a ``.qcore`` file; a
    :class:`QcoreError` when :func:`unsaved_reason` says it cannot be saved. With ``packed``, the weights of
    the layers :func:`packable_layers` finds are stored as packed integer codes (:mod:`qcore.packing`)."""
    from safetensors.torch import save

    why = unsaved_reason(qmodel)
    if why is not None:
        raise QcoreError(f"this quantized model cannot be saved: {why}")

    wc = ctx.weight_correction
    meta = {"format": FORMAT, "format_version": "2" if packed else "1", "qcore_version": __version__,
            "plan": plan.to_json(), "quantizer": ctx.quantizer.name,
            "quantizer_options": json.dumps(_options(ctx.quantizer), default=str),
            "weight_correction": wc.name if wc is not None else "none",
            "weight_correction_options": json.dumps(_options(wc) if wc is not None else {}, default=str),
            "pipeline": json.dumps(dataclasses.asdict(ctx.pipeline), default=str),
            "switchable_bits": json.dumps(switchable_bits(qmodel)),
            # a multi-bit model may have been switched after the run: the plan keeps the run's bits, this the
            # bits its quantizers hold now (and load restores)
            "bits_in_effect": json.dumps(bits_in_effect(qmodel)), "run": json.dumps(run_record(ctx.config))}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in qmodel.state_dict().items()}
    if packed:
        meta["packed_weights"] = json.dumps(_pack_weights(qmodel, tensors))
    return save(tensors, metadata=meta)


# -- packed weights: the integer codes in their real bits ------------------------------------------------------

def packable_layers(qmodel: nn.Module) -> dict[str, QuantLayer]:
    """The layers whose weight a packed file stores as integer codes: a float32 weight quantized by a plain
    :class:`UniformFakeQuant` (whole bit-widths 0..16) with no weight correction (a correction reads the float
    weight, so those layers keep it). Other layers keep their float weight in the file."""
    out = {}
    for name, layer in quant_layers(qmodel).items():
        wq = layer.weight_quantizer
        w = getattr(layer.module, "weight", None)
        if (type(wq) is UniformFakeQuant and layer.weight_correction is None and isinstance(w, torch.Tensor)
                and w.dtype == torch.float32 and bool(wq.bits.max() <= packing.MAX_BITS)):
            out[name] = layer
        else:
            log.info("packed save: %s keeps its float weight (quantizer %s%s)", name, type(wq).__name__,
                     ", weight correction" if layer.weight_correction is not None else "")
    return out


def _rows_params(wq: UniformFakeQuant, channels: int) -> tuple[Tensor, ...]:
    """``(scale, zero_point, qmin, qmax, bits, prune_value)`` with one value per channel."""
    scale, zero, qmin, qmax, bits = wq.qparams()
    return tuple(t.detach().cpu().float().reshape(-1).expand(channels).contiguous()
                 for t in (scale, zero, qmin, qmax, bits, wq.prune_value))


def _pack_weights(qmodel: nn.Module, tensors: dict[str, Tensor]) -> dict[str, int]:
    """Replace the float weight of every :func:`packable_layers` layer in ``tensors`` by its packed codes
    (key ``<weight key>.packed``); returns ``{weight key: channel axis}`` for the file's metadata."""
    done: dict[str, int] = {}
    for name, layer in packable_layers(qmodel).items():
        wq = layer.weight_quantizer
        assert isinstance(wq, UniformFakeQuant)
        key = f"{name}.module.weight"
        if key not in tensors:  # a wrapper that holds its weight elsewhere keeps it as it is
            continue
        w = tensors.pop(key)
        scale, zero, qmin, qmax, bits, _ = _rows_params(wq, w.shape[wq.axis])
        tensors[key + ".packed"] = packing.pack_weight(w, wq.axis, scale, zero, qmin, qmax, bits)
        done[key] = wq.axis
    return done


def _unpack_weights(qmodel: nn.Module, tensors: dict[str, Tensor], packed: dict[str, int]) -> None:
    """Put back, in ``tensors``, the float weight of each packed layer: its fake-quantized value, decoded from the
    codes with the quantizer parameters of the same file (so the model's outputs are the saved model's)."""
    layers = quant_layers(qmodel)
    for key, axis in packed.items():
        name = key[: -len(".module.weight")]
        layer = layers.get(name)
        codes = tensors.pop(key + ".packed", None)
        if layer is None or type(layer.weight_quantizer) is not UniformFakeQuant or codes is None:
            raise QcoreError(f"packed weight {key} does not fit this model; build the same architecture the file "
                             "was saved from")
        wq = layer.weight_quantizer
        prefix = f"{name}.weight_quantizer."
        try:
            wq.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            shape = layer.module.weight.shape
            scale, zero, qmin, _, bits, prune = _rows_params(wq, shape[axis])
            w = packing.unpack_weight(codes, shape, axis, scale, zero, qmin, bits, prune)
        except (RuntimeError, QcoreError) as exc:  # another width or kernel size than the file's
            raise QcoreError(f"packed weight {key} does not fit this model ({str(exc).splitlines()[0][:120]}); "
                             "build the same architecture the file was saved from") from None
        tensors[key] = w.contiguous()


#: the RunConfig fields that rebuild a run's model and evaluation data (``qcore eval``)
RUN_KEYS = ("task", "model", "weights", "data", "input", "model_args", "calib_size", "batch_size", "eval_size", "seed")


def run_record(config: RunConfig) -> dict[str, Any]:
    """What a ``.qcore`` file records of the run that made it: the task, model, weights, data and input settings
    (enough for ``qcore eval`` to rebuild the FP model and its test data), as JSON values."""
    out: dict[str, Any] = {}
    for key in RUN_KEYS:
        v = getattr(config, key)
        out[key] = str(v) if isinstance(v, Path) else (
            {k: list(x) if isinstance(x, tuple) else x for k, x in v.items()} if isinstance(v, dict) else v)
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a ``.qcore`` file, JSON strings decoded (``plan``, ``run``, ``switchable_bits``, ...)."""
    _, meta = _read(Path(path))
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise QcoreError(f"quantized model file {path} does not exist; pass a .qcore file written by qcore")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (a safetensors handle)
    except (SafetensorError, OSError, ValueError) as exc:
        raise QcoreError(f"cannot read {path} ({exc}); it is not a .qcore file or it is corrupt") from None
    if meta.get("format") != FORMAT:
        raise QcoreError(f"{path} is a safetensors file but not a qcore model (no qcore metadata)")
    if meta.get("format_version") not in _READS:
        raise QcoreError(f"{path} has qcore model format {meta.get('format_version')}; this qcore reads "
                         f"{FORMAT_VERSION}: upgrade qcore")
    return tensors, meta


def _component(host: Host, kind: str, name: str, options: str) -> Any:
    cls = host.get(kind, name)
    return cls(build_options(cls.Options, json.loads(options), f"{kind} {name!r}"))


def load_quantized(path: str | Path, model: nn.Module, host: Host | None = None, device: str = "cpu",
                   bits: tuple[int | None, int | None] | None = None, plan: Plan | dict[str, Any] | None = None,
                   packed: bool = False) -> nn.Module:
    """Re-apply the ``.qcore`` file ``path`` to ``model`` (a freshly built FP model of the same architecture;
    it is copied, not changed) and return the quantized model in eval mode. ``bits=(w, a)`` or ``plan`` (per-layer
    bits) then select a bit-width setting of a multi-bit model (:func:`qcore.select_bits`). With ``packed``, the
    packable layers hold packed codes in memory instead of float weights (:func:`qcore.packing.pack_layers`)."""
    tensors, meta = _read(Path(path))
    host = host or load_host()
    saved_plan = Plan.from_json(meta["plan"])
    pipeline = build_options(PipelineOptions, json.loads(meta["pipeline"]), "pipeline")
    quantizer = _component(host, "quantizer", meta["quantizer"], meta["quantizer_options"])
    wc = None if meta["weight_correction"] == "none" else _component(
        host, "correction", meta["weight_correction"], meta["weight_correction_options"])
    work = copy.deepcopy(model).eval()
    if pipeline.fold_bn:
        fold_batchnorm(work)
    layers = discover_layers(work, lambda m, n: host.hook.qcore_layer_info(module=m, name=n), pipeline.include,
                             pipeline.exclude)
    ctx = RunContext(config=RunConfig(), task=None, model=work, layers=layers, budget=Budget(),  # type: ignore[arg-type]
                     pinned={}, options={}, quantizer=quantizer, pipeline=pipeline, hooks=host.hook,
                     weight_correction=wc)
    qmodel = apply_plan(work, saved_plan, ctx, inplace=True)
    if "packed_weights" in meta:
        _unpack_weights(qmodel, tensors, json.loads(meta["packed_weights"]))
    _restore(qmodel, tensors, path)
    if bits is not None or plan is not None:
        w, a = bits if bits is not None else (None, None)
        if bits is not None and plan is None and not any(switchable_bits(qmodel).values()):
            raise QcoreError(f"{path} holds one bit-width setting (no quantizer switches); load it without bits=")
        select_bits(qmodel, w, a, plan)
    freeze(qmodel)
    if packed:
        packing.pack_layers(qmodel)
    return qmodel.to(device).eval()


def _restore(qmodel: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``tensors`` into ``qmodel``; buffers that are None until a run sets them (output corrections) are
    created from the file first."""
    modules = dict(qmodel.named_modules())
    for key, value in tensors.items():
        owner, _, attr = key.rpartition(".")
        module = modules.get(owner)
        if module is not None and attr in module._buffers and module._buffers[attr] is None:
            module._buffers[attr] = torch.empty_like(value)
    current = qmodel.state_dict()
    expected = set(current)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    wrong = sorted(k for k in expected & set(tensors) if current[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                 (("missing", missing), ("not in the model", unexpected), ("another shape", wrong)) if keys]
        raise QcoreError(f"{path} does not fit this model ({'; '.join(parts)}); build the same architecture the file "
                         "was saved from")
    qmodel.load_state_dict(tensors, strict=True)
