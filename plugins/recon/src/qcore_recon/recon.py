"""The reconstruction engine shared by ``adaround``, ``brecq`` and ``qdrop`` (and by other plugins).

:func:`reconstruct` walks the units of a wrapped model (:mod:`qcore_recon.blocks`) in forward order. For each
unit it caches, over the calibration batches, the unit's input in the quantized model (everything before it
already reconstructed), its input in the FP model and the FP output (the target); then it learns, on random
mini-batches of that cache, the weight rounding of the unit's layers (:mod:`qcore_recon.rounding`) and/or the
step sizes of their input quantizers (:mod:`qcore_recon.act`), minimising ``loss(unit(x), target)`` plus the
rounding regulariser; and finally bakes the result into the layers through the quantizers' protocol. What the
three methods differ in is only :class:`ReconSettings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

import qcore
from qcore_recon.act import ActQuant, act_quant_for
from qcore_recon.blocks import Unit, _Stop, call_order, find_units
from qcore_recon.cache import UnitCache, fingerprint
from qcore_recon.rounding import RoundingFactory, WeightRounding, rounding_for

log = logging.getLogger(__name__)

#: ``loss(prediction, target) -> scalar``: the reconstruction loss of one unit's output
LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``objective(module, x, target, unit) -> scalar``: one step's loss computed by the caller, who runs the unit
#: itself (PTMQ runs it at several bit-widths and sums the losses); the default is ``loss(module(x), target)``
Objective = Callable[[nn.Module, Tensor, Tensor, "Unit"], Tensor]
#: ``(quantizer, learn_steps) -> ActQuant``: how an input quantizer takes part in reconstruction
ActFactory = Callable[[qcore.FakeQuantizer, bool], ActQuant]


def lp_loss(pred: Tensor, target: Tensor, p: float = 2.0, weight: Tensor | None = None) -> Tensor:
    """|error|^p summed over channels (dim 1 of a 4-D feature map, the last dim otherwise), averaged over
    everything else: QDrop's block loss (p = 2) and BRECQ's activation-stage loss (p = 2.4). ``weight`` (the
    shape of ``pred``) weights each element's error: BRECQ's Fisher-diagonal loss (:func:`fisher_weights`)."""
    d = (pred - target).float().abs().pow(p)
    if weight is not None:
        d = d * weight
    if d.dim() == 4:
        return d.sum(dim=1).mean()
    return d.sum(dim=-1).mean() if d.dim() > 1 else d.mean()


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """:func:`lp_loss` with p = 2: BRECQ's (weight stage) and QDrop's block loss."""
    return lp_loss(pred, target, 2.0)


def fn_name(f: Any) -> str:
    """A stable name of a callable for cache keys: its qualified name, with a partial's arguments."""
    if isinstance(f, functools.partial):
        return f"{fn_name(f.func)}{f.args!r}{sorted(f.keywords.items())!r}"
    return str(getattr(f, "__qualname__", type(f).__qualname__))


@dataclass(frozen=True)
class ReconSettings:
    """What one reconstruction pass learns and from what.

    :param iters: optimisation steps per unit (the papers: 20,000 for weights, BRECQ 5,000 for activations).
    :param batch_size: samples per step, drawn with replacement from the cached calibration set.
    :param round_lr: Adam learning rate of the weight roundings (AdaRound's V; 1e-3 in the papers).
    :param act_lr: Adam learning rate of the activation steps, decayed to 0 by a cosine (QDrop 4e-5, BRECQ 4e-4).
    :param reg_weight: AdaRound's lambda; None = 0.01, or 0.1 for units holding a depthwise conv (MobileNet).
    :param warmup: fraction of the steps without the rounding regulariser.
    :param beta: the regulariser's exponent, annealed linearly from the first value to the second after warm-up.
    :param learn_weights: learn the weight rounding (else weights stay as they are).
    :param acts: activation quantization in the loop, in the unit and upstream of it (off: BRECQ's weight stage).
    :param learn_acts: learn the step sizes of the unit's input quantizers (LSQ).
    :param keep_prob: QDrop: each activation quantizer in the unit keeps quantization element-wise with this
        probability and passes the FP value otherwise; None always quantizes.
    :param inputs: where the unit's input comes from: the quantized model, the FP model, or ``mixed``
        element-wise between them with probability ``keep_prob`` (QDrop).
    :param seed: seeds the mini-batch draws and the QDrop masks (unit ``i`` uses ``seed + i``).
    :param fisher: BRECQ's Fisher-diagonal loss instead of the plain squared error: each element of the unit's
        output error is weighted by ``(|g| + 1)^2``, ``g`` the gradient at that output of the KL divergence between
        the FP model's and the quantized model's predictions (:func:`fisher_weights`); classifiers only.
    """

    iters: int = 500
    batch_size: int = 32
    round_lr: float = 1e-3
    act_lr: float = 4e-5
    reg_weight: float | None = None
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    learn_weights: bool = True
    acts: bool = True
    learn_acts: bool = True
    keep_prob: float | None = 0.5
    inputs: Literal["quantized", "fp", "mixed"] = "mixed"
    seed: int = 0
    fisher: bool = False

    def __post_init__(self) -> None:
        if self.iters < 0 or self.batch_size < 1:
            raise qcore.QcoreError(f"iters={self.iters} must be 0 or more and batch size {self.batch_size} at least 1")
        if self.keep_prob is not None and not 0.0 <= self.keep_prob <= 1.0:
            raise qcore.QcoreError(f"drop_prob={self.keep_prob} (the probability of keeping quantization) must be "
                                   "in [0, 1]")
        if not 0.0 <= self.warmup < 1.0:
            raise qcore.QcoreError(f"warmup={self.warmup} must be in [0, 1)")

    def lam(self, unit: Unit) -> float:
        if self.reg_weight is not None:
            return self.reg_weight
        return 0.1 if unit.depthwise else 0.01

    def beta_at(self, it: int) -> float | None:
        """The regulariser's beta at step ``it``, None during warm-up."""
        warm = int(self.warmup * self.iters)
        if it < warm:
            return None
        frac = (it - warm) / max(self.iters - warm, 1)
        return self.beta[0] + (self.beta[1] - self.beta[0]) * frac


@dataclass
class UnitReport:
    """What reconstructing one unit did."""

    name: str
    kind: str
    layers: int
    seconds: float
    loss_start: float
    loss_end: float
    samples: int
    resumed: bool = False  # restored from the per-unit cache instead of recomputed


@dataclass
class ReconReport:
    """Every unit of one :func:`reconstruct` pass."""

    units: list[UnitReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "units": len(self.units),
            "seconds": round(sum(u.seconds for u in self.units), 2),
            "seconds_per_unit": {u.name: round(u.seconds, 2) for u in self.units},
            "loss_start_per_unit": {u.name: round(u.loss_start, 6) for u in self.units},
            "loss_end_per_unit": {u.name: round(u.loss_end, 6) for u in self.units},
            "resumed_units": [u.name for u in self.units if u.resumed],
        }


class SoftWeight(nn.Module):
    """Stands in for a layer's weight quantizer while its rounding (AdaRound, STE, ...) is learned: the layer's
    forward then uses ``rounding.soft()`` as its weight. Also used by qcore-ompq's QAT fine-tuning."""

    def __init__(self, rounding: WeightRounding) -> None:
        super().__init__()
        self.rounding = rounding

    def forward(self, w: Tensor) -> Tensor:
        return self.rounding.soft().to(w.dtype)


@contextlib.contextmanager
def learning_layers(layers: dict[str, Any], make_rounding: Callable[[Any, Tensor], WeightRounding | None] | None,
                    make_act: Callable[[Any], ActQuant | None] | None, commit_acts: bool = True
                    ) -> Iterator[tuple[dict[str, WeightRounding], dict[str, ActQuant]]]:
    """Swap trainable stand-ins into ``layers`` (``{name: qcore.QuantLayer}``) for the block: each weight quantizer
    for which ``make_rounding(quantizer, weight)`` returns a rounding is replaced by :class:`SoftWeight` (and the
    layer's weight correction is switched off: what is learned is deployed as is, and a correction would see the
    baked weight as FP), each activation quantizer for which ``make_act(quantizer)`` returns one by that
    :class:`ActQuant`; ``None`` factories (or results) leave the role alone. Yields ``(roundings, acts)`` by layer
    name. On exit, also after an error: every learned weight is written to the layer (``final_weight()``), the
    activation steps are committed (when ``commit_acts``) and the original quantizers and corrections restored.
    Layers are unfrozen on entry and left unfrozen. Used by :func:`reconstruct` and qcore-ompq's QAT."""
    saved: dict[str, tuple[Any, Any, Any]] = {}
    roundings: dict[str, WeightRounding] = {}
    acts: dict[str, ActQuant] = {}
    for n, layer in layers.items():
        layer.unfreeze()
        saved[n] = (layer.weight_quantizer, layer.act_quantizer, layer.weight_correction)
        device = layer.module.weight.device
        r = None if make_rounding is None or layer.weight_quantizer is None else make_rounding(
            layer.weight_quantizer, layer.module.weight)
        if r is not None:
            roundings[n] = r.to(device)
            layer.weight_quantizer = SoftWeight(roundings[n])
            layer.weight_correction = None
        a = None if make_act is None or layer.act_quantizer is None else make_act(layer.act_quantizer)
        if a is not None:
            acts[n] = a.to(device)
            layer.act_quantizer = acts[n]
    try:
        yield roundings, acts
    finally:
        with torch.no_grad():
            for n, layer in layers.items():
                wq, aq, corr = saved[n]
                if n in roundings:
                    layer.module.weight.data.copy_(roundings[n].final_weight().to(layer.module.weight.dtype))
                if n in acts and commit_acts:
                    acts[n].commit()
                layer.weight_quantizer, layer.act_quantizer, layer.weight_correction = wq, aq, corr


@contextlib.contextmanager
def acts_disabled(model: nn.Module) -> Iterator[None]:
    """Every activation quantizer of ``model`` off (inputs pass unquantized) inside the block."""
    saved = {n: layer.act_quantizer for n, layer in qcore.quant_layers(model).items()}
    for layer in qcore.quant_layers(model).values():
        layer.act_quantizer = None
    try:
        yield
    finally:
        for n, layer in qcore.quant_layers(model).items():
            layer.act_quantizer = saved[n]


@contextlib.contextmanager
def _frozen_params(*models: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for m in models for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


#: bytes of cached unit inputs and targets (each tensor) held in memory before they go to a file on disk
DEFAULT_MEMORY_LIMIT = 4 << 30


class _Held:
    """Tensors captured batch by batch and concatenated along dim 0: in memory up to ``limit`` bytes; beyond it,
    written to an unlinked temporary file (``$TMPDIR``) and returned memory-mapped on the CPU (read-only use)."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.parts, self.bytes, self.count = limit, [], 0, 0
        self.file: Any = None
        self.rows, self.shape, self.dtype = 0, None, None

    def __len__(self) -> int:
        return self.count  # tensors appended so far

    def append(self, t: Tensor) -> None:
        if self.shape is None:
            self.shape, self.dtype = tuple(t.shape[1:]), t.dtype
        elif tuple(t.shape[1:]) != self.shape or t.dtype != self.dtype:
            self.limit = None  # ragged batches: torch.cat decides (and reports) as before
            if self.file is not None:
                raise qcore.QcoreError("captured batches differ in shape or dtype; reconstruction needs equal ones")
        self.parts.append(t)
        self.count += 1
        self.bytes += t.numel() * t.element_size()
        if self.limit is not None and self.bytes > self.limit:
            self._spill()

    def trim(self, n: int) -> None:
        """Keep the first ``n`` captured parts (drop extra captures of one forward pass)."""
        if self.file is None:
            del self.parts[n:]

    def _spill(self) -> None:
        if self.file is None:
            # open across appends, closed and unlinked in result()
            self.file = tempfile.NamedTemporaryFile(prefix="qcore-recon-", suffix=".bin", delete=False)  # noqa: SIM115
        for t in self.parts:
            self.file.write(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
            self.rows += int(t.shape[0])
        self.parts = []

    def discard(self) -> None:
        """Drop what was captured and delete the file, if any (capture failed)."""
        self.parts = []
        if self.file is not None:
            self.file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.file.name)
            self.file = None

    def result(self) -> Tensor:
        if self.file is None:
            return torch.cat(self.parts)
        self._spill()
        self.file.close()
        nbytes = os.path.getsize(self.file.name)
        try:
            flat = torch.from_file(self.file.name, shared=False, size=nbytes, dtype=torch.uint8)
        finally:
            os.unlink(self.file.name)  # the mapping stays valid; nothing is left on disk after the run
        log.debug("%.1f MB of cached unit data memory-mapped from disk", nbytes / 2**20)
        return flat.view(self.dtype).view(self.rows, *self.shape)


@torch.no_grad()
def capture(model: nn.Module, forward: Callable[[nn.Module, Any], Any], batches: Sequence[Any], name: str,
            output: bool, memory_limit: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The input (and output, when ``output``) of submodule ``name`` over ``batches``, concatenated along the
    batch dimension; each forward pass stops once the submodule has run. A tensor over ``memory_limit`` bytes
    (None: no limit) is written to disk batch by batch and returned memory-mapped on the CPU."""
    module = model.get_submodule(name)
    ins = _Held(memory_limit)
    outs = _Held(memory_limit)

    def take_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
            raise qcore.QcoreError(f"unit {name!r} is called with {len(args)} positional and {len(kwargs)} keyword "
                                   "arguments; reconstruction needs units that take one tensor: name other blocks "
                                   "(blocks=[...]) or use -o recon_granularity=layer")
        ins.append(args[0].detach())

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        take_input(args, kwargs)
        if not output:
            raise _Stop

    def post(_m: nn.Module, _args: Any, _kwargs: Any, out: Any) -> None:
        if not isinstance(out, Tensor):
            raise qcore.QcoreError(f"unit {name!r} returns {type(out).__name__}, not a tensor; name other blocks "
                                   "(blocks=[...]) or use -o recon_granularity=layer")
        outs.append(out.detach())
        raise _Stop

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True)]
    if output:
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        for batch in batches:
            n, m = len(ins.parts), len(outs.parts)
            before = len(ins)
            with contextlib.suppress(_Stop):
                forward(model, batch)
            if len(ins) == before:
                raise qcore.QcoreError(f"the calibration data never reached unit {name!r}")
            ins.trim(n + 1)
            outs.trim(m + 1)
    except BaseException:
        ins.discard()
        outs.discard()
        raise
    finally:
        for h in handles:
            h.remove()
    return ins.result(), (outs.result() if output else None)


def reconstruct(model: nn.Module, fp_model: nn.Module, data: qcore.RunContext | Sequence[Any], *,
                settings: ReconSettings | None = None, forward: Callable[[nn.Module, Any], Any] | None = None,
                blocks: Sequence[str] | None = None, units: Sequence[Unit] | None = None,
                loss: LossFn | None = None, objective: Objective | None = None,
                weight_rounding: RoundingFactory | None = None,
                act_quant: ActFactory | None = None, desc: str = "recon", cache: Path | str | None = None,
                memory_limit: int | None = DEFAULT_MEMORY_LIMIT) -> ReconReport:
    """Reconstruct ``model`` (wrapped by qcore, every quantizer calibrated) towards ``fp_model`` unit by unit.

    :param model: the quantized model; its weights and input quantizers are updated in place.
    :param fp_model: the FP model with the same module names (``ctx.model`` in a run); never modified.
    :param data: a run context (its calibration batches and task forward) or a sequence of batches.
    :param settings: what to learn (:class:`ReconSettings`; the defaults are QDrop's).
    :param forward: ``forward(model, batch)`` (default: the context's task forward, or ``qcore.default_forward``).
    :param blocks: names of the submodules to reconstruct as blocks (default: the recognised block types).
    :param units: the units themselves (overrides ``blocks``), e.g. ``find_units(model, ...)`` filtered.
    :param loss: ``loss(prediction, target)`` (default :func:`mse_loss`): another distance between outputs.
    :param objective: ``objective(module, x, target, unit)``: the whole step's loss, running the unit ``module``
        on the (mixed) input ``x`` itself, e.g. at several bit-widths for a multi-bit loss; overrides ``loss``.
    :param weight_rounding: ``(quantizer, weight) -> WeightRounding`` (default :func:`rounding_for`: AdaRound on
        the uniform grid, the quantizer's own ``recon_rounding`` or a straight-through rounding otherwise).
    :param act_quant: ``(quantizer, learn) -> ActQuant`` (default: LSQ steps on the uniform grid).
    :param desc: names the pass in logs, progress bars and the cache key.
    :param cache: a folder for per-unit resume (:mod:`qcore_recon.cache`); None for none. Custom ``loss``,
        ``objective``, ``weight_rounding`` and ``act_quant`` enter the key by their qualified names only.
    :param memory_limit: bytes each of a unit's cached tensors (quantized-model input, FP input, FP output) may
        hold in memory; a larger one is written to a temporary file and read memory-mapped (None: no limit). The
        result does not depend on it.
    :returns: per unit, the seconds and the loss before and after.
    """
    s = settings or ReconSettings()
    if isinstance(data, qcore.RunContext):
        batches = list(data.calibration_batches())
        forward = forward or data.task.forward
    else:
        batches = list(data)
    forward = forward or qcore.default_forward
    if not batches:
        raise qcore.QcoreError("reconstruction needs calibration data; pass --calib-size above 0")
    if s.fisher and (objective is not None or loss is not None):
        raise qcore.QcoreError("the Fisher-diagonal loss (fisher=True, -o loss=fisher) replaces the loss: pass no "
                               "loss= or objective= with it")
    if objective is None:
        dist = loss or mse_loss

        def objective(module: nn.Module, x: Tensor, target: Tensor, unit: Unit) -> Tensor:
            return dist(module(x), target)

        objective.__qualname__ = f"loss:{fn_name(dist)}"
    make_rounding = weight_rounding or rounding_for
    make_act = act_quant or act_quant_for
    model.eval()
    fp_model.eval()
    for layer in qcore.quant_layers(model).values():
        layer.unfreeze()  # a frozen layer would keep serving its cached weight while its rounding changes
    todo = list(units) if units is not None else find_units(model, blocks)
    report = ReconReport()
    off = contextlib.nullcontext() if s.acts else acts_disabled(model)
    with off, _frozen_params(model, fp_model):
        todo = call_order(model, forward, batches[0], todo)
        store = None
        if cache is not None:
            key = {"settings": dataclasses.asdict(s), "units": [(u.name, u.layers) for u in todo], "pass": desc,
                   "fns": [fn_name(f) for f in (objective, make_rounding, make_act)]}
            store = UnitCache(Path(cache), fingerprint(model, fp_model, batches, key))
        for i, unit in enumerate(todo):
            entry = store.load(i, unit.name) if store is not None else None
            if entry is not None:
                model.get_submodule(unit.name).load_state_dict(entry["state"])
                report.units.append(UnitReport(**{**entry["report"], "resumed": True}))
                log.info("%s %s: restored from %s", desc, unit.name, store.dir)
                continue
            later = [n for u in todo[i + 1:] for n in u.layers]
            rep = _reconstruct_unit(model, fp_model, batches, forward, unit, s, i, objective, make_rounding,
                                    make_act, desc, later, memory_limit)
            report.units.append(rep)
            if store is not None:
                state = {k: v.detach().cpu() for k, v in model.get_submodule(unit.name).state_dict().items()}
                store.save(i, unit.name, {"state": state, "report": dataclasses.asdict(rep)})
    return report


def _reconstruct_unit(model: nn.Module, fp_model: nn.Module, batches: Sequence[Any],
                      forward: Callable[[nn.Module, Any], Any], unit: Unit, s: ReconSettings, index: int,
                      objective: Objective, make_rounding: RoundingFactory, make_act: ActFactory, desc: str,
                      later: Sequence[str] = (), memory_limit: int | None = None) -> UnitReport:
    start = time.perf_counter()
    fp_in, target = capture(fp_model, forward, batches, unit.name, output=True, memory_limit=memory_limit)
    assert target is not None
    fisher = fisher_weights(model, fp_model, forward, batches, unit.name, later) if s.fisher else None
    q_in = fp_in if s.inputs == "fp" else capture(model, forward, batches, unit.name, output=False,
                                                   memory_limit=memory_limit)[0]
    if q_in.shape != fp_in.shape:
        raise qcore.QcoreError(f"unit {unit.name!r} sees inputs of shape {tuple(q_in.shape)} in the quantized model "
                               f"and {tuple(fp_in.shape)} in the FP model; the models do not match")
    qlayers = qcore.quant_layers(model)
    layers = {n: qlayers[n] for n in unit.layers}
    drop_gen = torch.Generator().manual_seed(s.seed * 1000003 + 2 * index + 1)

    def unit_act(q: Any) -> ActQuant | None:
        if not s.acts:
            return None
        a = make_act(q, s.learn_acts)
        a.keep_prob, a.generator = s.keep_prob, drop_gen
        return a

    module = model.get_submodule(unit.name)
    losses: list[float] = []
    with learning_layers(layers, make_rounding if s.learn_weights else None, unit_act,
                         commit_acts=s.learn_acts) as (roundings, acts):
        w_params = [p for r in roundings.values() for p in r.parameters() if p.requires_grad]
        a_params = [p for a in acts.values() for p in a.parameters() if p.requires_grad] if s.learn_acts else []
        opts: list[torch.optim.Optimizer] = []
        scheds: list[Any] = []
        if w_params:
            opts.append(torch.optim.Adam(w_params, lr=s.round_lr))
        if a_params:
            opt = torch.optim.Adam(a_params, lr=s.act_lr)
            opts.append(opt)
            scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(s.iters, 1), eta_min=0.0))
        lam = s.lam(unit)
        gen = torch.Generator().manual_seed(s.seed * 1000003 + 2 * index)
        n_samples = fp_in.shape[0]
        device = fisher.device if fisher is not None else _device_of(module, fp_in)
        mixed = s.inputs == "mixed" and s.keep_prob is not None
        iters = s.iters if opts else 0
        for it in qcore.track(range(iters), desc=f"{desc} {unit.name}", unit="it",
                              postfix=lambda: f"loss {losses[-1]:.4g}" if losses else ""):
            idx = torch.randint(n_samples, (min(s.batch_size, n_samples),), generator=gen)
            x = q_in[idx].to(device)  # .to: no-op unless the tensor was spilled to disk (memory_limit)
            if mixed:
                u = torch.rand(x.shape, generator=drop_gen).to(device)
                x = torch.where(u < s.keep_prob, x, fp_in[idx].to(device))
            y = target[idx].to(device)
            if fisher is not None:
                rec = lp_loss(module(x), y, 2.0, weight=fisher[idx])
            else:
                rec = objective(module, x, y, unit)
            total = rec
            beta = s.beta_at(it)
            if beta is not None and roundings:
                total = total + lam * sum(r.regularizer(beta) for r in roundings.values())
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            total.backward()
            for opt in opts:
                opt.step()
            for sch in scheds:
                sch.step()
            losses.append(float(rec.detach()))
    seconds = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10):] if losses else [math.nan]
    rep = UnitReport(unit.name, unit.kind, len(layers), seconds, losses[0] if losses else math.nan,
                     sum(tail) / len(tail), n_samples)
    log.info("%s %s (%s, %d layer(s)): %d steps, loss %.5g -> %.5g, %.1f s", desc, unit.name, unit.kind,
             len(layers), iters, rep.loss_start, rep.loss_end, seconds)
    return rep


def _device_of(module: nn.Module, fallback: Tensor) -> torch.device:
    """Where the unit computes: its first parameter's or buffer's device, else ``fallback``'s."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return fallback.device


@contextlib.contextmanager
def _fp_layers(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """The named layers of ``model`` run in floating point (no quantizers, no output correction) inside."""
    layers = qcore.quant_layers(model)
    keys = ("weight_quantizer", "act_quantizer", "weight_correction", "out_correction", "out_scale")
    saved = {n: {k: getattr(layers[n], k) for k in keys} for n in names}
    for n in names:
        layers[n].unfreeze()
        for k in keys:
            setattr(layers[n], k, None)
    try:
        yield
    finally:
        for n in names:
            for k, v in saved[n].items():
                setattr(layers[n], k, v)


def fisher_weights(model: nn.Module, fp_model: nn.Module, forward: Callable[[nn.Module, Any], Any],
                   batches: Sequence[Any], name: str, later: Sequence[str] = ()) -> Tensor:
    """BRECQ's diagonal-Fisher weights of unit ``name``'s output, concatenated over ``batches``: ``(|g| + 1)^2``
    with ``g`` the gradient, at the unit's output, of KL(FP predictions || predictions of ``model`` quantized up
    to and including the unit), the layers in ``later`` in floating point. ``forward`` must return logits
    ``[batch, classes]``."""
    module = model.get_submodule(name)
    held: dict[str, Tensor] = {}

    def hook(_m: nn.Module, _args: Any, out: Any) -> Tensor:
        held["z"] = out.detach().requires_grad_(True)
        return held["z"]

    grads: list[Tensor] = []
    handle = module.register_forward_hook(hook)
    try:
        with _fp_layers(model, later):
            for batch in batches:
                with torch.no_grad():
                    ref = forward(fp_model, batch)
                with torch.enable_grad():
                    logits = forward(model, batch)
                    if not (isinstance(logits, Tensor) and logits.dim() == 2 and isinstance(ref, Tensor)):
                        raise qcore.QcoreError("the Fisher-diagonal loss needs a forward that returns logits "
                                               "[batch, classes]; use the squared error (-o loss=mse)")
                    kl = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), 1),
                                                    torch.softmax(ref.float(), 1), reduction="batchmean")
                    (g,) = torch.autograd.grad(kl, held["z"])
                grads.append((g.abs() + 1.0).square())
    finally:
        handle.remove()
    return torch.cat(grads)
