"""First-order rate-distortion curves: ``D_g(b)`` = MSE of the distortion target (the task's ``forward``
output) against FP when only weight group ``g`` is quantized at ``b`` bits, over the curve calibration set.

Two engines that give the same numbers:

* ``reference``: put the candidate weight into the model and rerun the whole model (the seed's method);
* ``fast``: trace the model with torch.fx once; per layer, cache the layer's FP input and every value the
  downstream part reads from upstream, then run only the layer and its downstream part, with many
  candidates batched into one call through ``torch.func.vmap``. Falls back to one candidate at a time if a
  downstream op cannot be vmapped, and to the reference engine if the model cannot be traced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qcore import LayerInfo, QcoreError, WeightCorrection, track
from qcore import distributed as qdist
from qcore_rdoq.cache import CurveCache
from qcore_rdoq.deployment import WEIGHT_CLIP, Clip
from qcore_rdoq.downstream import Split
from qcore_rdoq.groups import WeightGroup, candidate_table, weight_groups

log = logging.getLogger(__name__)

Forward = Callable[[nn.Module, Any], Tensor]


@dataclass
class Curves:
    """Distortion per group and candidate bit-width, plus how they were made."""

    groups: list[WeightGroup]
    bits: list[int]
    dist: np.ndarray  # [groups, bits]
    engine: str
    seconds: float
    layer_engines: dict[str, str] = field(default_factory=dict)


class Candidates:
    """Full-layer weights, one per (group, bit) in group-major order, where only that group is quantized.

    Built lazily, a chunk at a time, so a large layer never holds all its candidates in memory.
    """

    def __init__(self, weight: Tensor, table: dict[int, Tensor], groups: Sequence[WeightGroup],
                 bits: Sequence[int]) -> None:
        self.weight, self.table = weight, table
        self.pairs = [(g, b) for g in groups for b in bits]

    def __len__(self) -> int:
        return len(self.pairs)

    def stack(self, lo: int, hi: int) -> Tensor:
        out = self.weight.unsqueeze(0).repeat(hi - lo, *([1] * self.weight.dim()))
        for k, (g, b) in enumerate(self.pairs[lo:hi]):
            out[k, g.start:g.stop] = self.table[b][g.start:g.stop]
        return out


@contextmanager
def exact_math() -> Iterator[None]:
    """Full fp32 convolutions and matmuls (no TF32), so both engines compute the same numbers on a GPU."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _sse(out: Tensor, ref: Tensor) -> Tensor:
    """Sum of squared errors per candidate: ``out`` is ``[K, ...]``, ``ref`` broadcasts against ``out[k]``."""
    return (out.float() - ref.float()).pow(2).flatten(1).sum(1)


def candidate_weight(module: nn.Module, candidates: Candidates) -> Callable[[int], AbstractContextManager[None]]:
    """``perturb(i)`` for the engines' ``measure``: while open, ``module.weight`` holds candidate ``i``; the FP
    weight is restored on exit."""

    @contextmanager
    def weight(i: int) -> Iterator[None]:
        w0 = module.weight.detach().clone()
        module.weight.copy_(candidates.stack(i, i + 1)[0])
        try:
            yield
        finally:
            module.weight.copy_(w0)

    return weight


class ReferenceEngine:
    """Perturb one candidate, rerun the whole model on every calibration batch, restore."""

    name = "reference"

    def __init__(self, model: nn.Module, forward: Forward, batches: Sequence[Any],
                 ref: list[Tensor] | None = None) -> None:
        self.model, self.forward, self.batches = model, forward, batches
        if ref is None:
            with torch.no_grad(), exact_math():
                ref = [forward(model, b) for b in batches]
        self.ref = ref
        self.count = sum(r.numel() for r in self.ref)

    @torch.no_grad()
    def measure(self, n: int, perturb: Callable[[int], AbstractContextManager[Any]]) -> np.ndarray:
        """Distortion of each of ``n`` candidates; ``perturb(i)`` puts candidate ``i`` into the model while
        its context is open (and must restore the model on exit)."""
        out = np.zeros(n)
        with exact_math():
            for i in range(n):
                with perturb(i):
                    out[i] = sum(float(_sse(self.forward(self.model, b)[None], r)[0])
                                 for b, r in zip(self.batches, self.ref, strict=True)) / self.count
        return out

    def layer(self, name: str, candidates: Candidates) -> np.ndarray:
        return self.measure(len(candidates), candidate_weight(self.model.get_submodule(name), candidates))


class _RowOutputs:
    """Candidate outputs of a Conv1d/Conv2d (groups=1) or Linear layer, computing only the perturbed channels.

    For a chunk of k candidates, the quantized rows of every candidate's group are gathered into one weight,
    one conv/linear call computes them, and they are scattered into k copies of the FP output. Each output
    channel is computed from its own weight row exactly as the full layer computes it.
    """

    def __init__(self, module: nn.Module, cands: Candidates) -> None:
        self.module = module
        w = cands.weight
        bits = sorted({b for _, b in cands.pairs})
        pos = {b: i for i, b in enumerate(bits)}
        cout = w.shape[0]
        table = torch.stack([cands.table[b] for b in bits]).reshape(len(bits) * cout, *w.shape[1:])
        self.rows = torch.cat([table, torch.zeros_like(w[:1])])  # last row: padding
        gs = max(g.stop - g.start for g, _ in cands.pairs)
        ridx, cidx = [], []
        for g, b in cands.pairs:
            n = g.stop - g.start
            ridx.append([pos[b] * cout + g.start + j if j < n else len(self.rows) - 1 for j in range(gs)])
            cidx.append([g.start + j if j < n else cout for j in range(gs)])  # channel cout: scratch
        self.ridx = torch.tensor(ridx, device=w.device)
        self.cidx = torch.tensor(cidx, device=w.device)
        bias = module.bias.detach() if module.bias is not None else torch.zeros(cout, device=w.device)
        self.bias = torch.cat([bias, bias.new_zeros(1)])
        self.gs, self.cout = gs, cout
        self.linear = isinstance(module, nn.Linear)

    @staticmethod
    def supports(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or (isinstance(module, (nn.Conv1d, nn.Conv2d))
                                                 and module.groups == 1 and module.padding_mode == "zeros")

    def __call__(self, x: Tensor, y: Tensor, lo: int, hi: int) -> Tensor:
        k = hi - lo
        ridx, cidx = self.ridx[lo:hi], self.cidx[lo:hi]
        w = self.rows[ridx.reshape(-1)]
        b = self.bias[cidx.reshape(-1)]
        m = self.module
        if self.linear:
            part = F.linear(x, w, b)  # [..., k*gs]
        else:
            conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
            part = conv(x, w, b, m.stride, m.padding, m.dilation, 1).movedim(1, -1)  # [N, ..., k*gs]
        part = part.reshape(*part.shape[:-1], k, self.gs).movedim(-2, 0)  # [k, N, ..., gs]
        base = y if self.linear else y.movedim(1, -1)  # channels last
        full = torch.cat([base, base.new_zeros(*base.shape[:-1], 1)], dim=-1)
        full = full.unsqueeze(0).repeat(k, *([1] * full.dim()))
        idx = cidx.reshape(k, *([1] * (full.dim() - 2)), self.gs).expand_as(part)
        full.scatter_(-1, idx, part)
        full = full[..., : self.cout]
        if not self.linear:
            full = full.movedim(-1, 2)
        return full.reshape(k * y.shape[0], *y.shape[1:]).contiguous()


class FastEngine:
    """Cached upstream, downstream-only evaluation, candidates batched (see module docstring)."""

    name = "fast"

    def __init__(self, model: nn.Module, forward: Forward, batches: Sequence[Any], chunk: int = 32) -> None:
        self.model, self.batches = model, batches
        if not all(isinstance(b, Tensor) for b in batches):
            raise ValueError("fast engine needs tensor batches")
        n = max(1, int(batches[0].shape[0]))
        # candidates per pass: on a CPU keep a pass near 256 samples (cache-sized), on a GPU fill the device
        self.chunk = chunk or max(1, (256 if batches[0].device.type == "cpu" else 16384) // n)
        self.gm = fx.symbolic_trace(model)
        with torch.no_grad(), exact_math():
            self.ref = [forward(model, b) for b in batches]
            traced = self.gm(batches[0])
        if not torch.allclose(traced, self.ref[0], rtol=1e-5, atol=1e-6):
            raise ValueError("the traced graph does not reproduce the task's forward output")
        self.forward = forward
        self.count = sum(r.numel() for r in self.ref)
        self.modes: dict[str, str] = {}
        self._splits: dict[str, Split] = {}
        self._reference: ReferenceEngine | None = None

    def reference(self) -> ReferenceEngine:
        """The reference engine on the same data (sharing the FP outputs), for layers the split cannot serve."""
        if self._reference is None:
            self._reference = ReferenceEngine(self.model, self.forward, self.batches, self.ref)
        return self._reference

    def split(self, name: str) -> Split:
        if name not in self._splits:
            self._splits[name] = Split(self.gm, name, self.batches[0])
        return self._splits[name]

    def _mode(self, split: Split, y: Tensor, needed: list[Any], ref: Tensor) -> str:
        """Pick the fastest way to run candidates through ``split`` that reproduces FP: batch, vmap or loop."""
        try:
            out = split.run_batched(torch.cat([y, y]), needed, 2)
            if torch.allclose(out, torch.cat([ref, ref]), rtol=1e-4, atol=1e-6):
                return "batch"
        except Exception as exc:  # shape logic that assumes the batch size: try the next mode
            log.debug("batched downstream failed: %s", exc)
        try:
            out = torch.func.vmap(lambda t: split.run(t, needed))(torch.stack([y, y]))
            if torch.allclose(out, torch.stack([ref, ref]), rtol=1e-4, atol=1e-6):
                return "vmap"
        except Exception as exc:
            log.debug("vmap downstream failed: %s", exc)
        return "loop"

    def _outputs(self, mode: str, split: Split, ys: Tensor, needed: list[Any], k: int) -> Tensor:
        if mode == "batch":
            out = split.run_batched(ys, needed, k)
            return out.reshape(k, -1, *out.shape[1:])
        per = ys.reshape(k, -1, *ys.shape[1:])
        if mode == "vmap":
            return torch.func.vmap(lambda t: split.run(t, needed))(per)
        return torch.stack([split.run(t, needed) for t in per])

    @torch.no_grad()
    def measure(self, name: str, n: int, outputs: Callable[[Tensor, Tensor, int, int], Tensor]) -> np.ndarray:
        """Distortion of each of ``n`` candidates of layer ``name``; ``outputs(x, y, lo, hi)`` returns the
        layer's outputs for candidates ``lo..hi`` stacked along the batch, given its FP input ``x`` and output
        ``y`` on one calibration batch. Only the layer's downstream part runs."""
        split = self.split(name)
        module = self.model.get_submodule(name)
        sse = torch.zeros(n, dtype=torch.float64, device=self.ref[0].device)
        with exact_math():
            for batch, ref in zip(self.batches, self.ref, strict=True):
                x, needed = split.capture(batch)
                y = module(x)
                if name not in self.modes:
                    self.modes[name] = self._mode(split, y, needed, ref)
                for lo in range(0, n, self.chunk):
                    hi = min(lo + self.chunk, n)
                    out = self._outputs(self.modes[name], split, outputs(x, y, lo, hi), needed, hi - lo)
                    sse[lo:hi] += _sse(out, ref).double()
        return (sse / self.count).cpu().numpy()

    def layer(self, name: str, candidates: Candidates) -> np.ndarray:
        module = self.model.get_submodule(name)
        rows = _RowOutputs(module, candidates) if _RowOutputs.supports(module) else None

        def outputs(x: Tensor, y: Tensor, lo: int, hi: int) -> Tensor:
            if rows is not None:
                return rows(x, y, lo, hi)
            call = lambda w: torch.func.functional_call(module, {"weight": w}, (x,))  # noqa: E731
            return torch.func.vmap(call)(candidates.stack(lo, hi)).reshape(-1, *y.shape[1:])

        return self.measure(name, len(candidates), outputs)

    def serves(self, name: str) -> bool:
        """Whether the fx split works for ``name`` (otherwise use :meth:`reference` for it)."""
        try:
            self.split(name)
        except ValueError as exc:
            log.info("layer %s: %s; using the reference engine for it", name, exc)
            return False
        return True


def make_engine(kind: str, model: nn.Module, forward: Forward, batches: Sequence[Any], chunk: int = 0
                ) -> Engine:
    """Build the engine ``kind``; ``fast`` falls back to ``replay`` (hook-based, the same curves) when the model
    cannot be traced, and to ``reference`` if replay cannot record it either (both logged)."""
    from qcore_rdoq.replay import ReplayEngine

    if kind == "reference":
        return ReferenceEngine(model, forward, batches)
    if kind == "replay":
        return ReplayEngine(model, forward, batches)
    if kind == "fast":
        try:
            return FastEngine(model, forward, batches, chunk)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            log.info("fast RD engine unavailable (torch.fx: %s)", reason)
        try:
            eng = ReplayEngine(model, forward, batches)
        except Exception as exc:  # noqa: BLE001 - any failure to record: the reference engine still works
            log.warning("replay RD engine unavailable (%s); using the reference engine", exc)
            return ReferenceEngine(model, forward, batches)
        log.warning("rdoq: the model cannot be traced by torch.fx; RD curves from the replay engine (hooks: "
                    "recorded upstream outputs, only each layer's downstream part reruns; the reference's curves)")
        return eng
    raise QcoreError(f"unknown RD curve engine {kind!r}")


if TYPE_CHECKING:
    from qcore_rdoq.replay import ReplayEngine

Engine = Union[ReferenceEngine, FastEngine, "ReplayEngine"]


def first_order_curves(model: nn.Module, forward: Forward, batches: Sequence[Any], layers: dict[str, LayerInfo],
                       group_size: int, bits: Sequence[int], engine: str | Engine = "fast", chunk: int = 0,
                       clip: Clip = WEIGHT_CLIP, cache: CurveCache | None = None,
                       correction: WeightCorrection | None = None, deadzone: float = 0.0) -> Curves:
    """Measure ``D_g(b)`` for every weight group of ``layers`` (see module docstring); the candidates are
    clipped and gridded as ``clip`` says (the deployed estimator and symmetry); ``deadzone`` > 0 puts them on
    the dead-zone grid with that ratio.

    With ``cache``, layers already measured are read back and every new layer is written as soon as it is done,
    so an interrupted run resumes where it stopped. Under torchrun, layers are sharded over the processes and
    gathered, so every process returns the same curves. ``engine`` is a kind or an engine already built on
    ``batches``.
    """
    t0 = time.perf_counter()
    eng = make_engine(engine, model, forward, batches, chunk) if isinstance(engine, str) else engine
    names = list(layers)
    groups = {n: weight_groups(layers[n], group_size) for n in names}
    done: dict[str, tuple[np.ndarray, str]] = {}
    for name in track(qdist.shard(names), desc=f"RD curves ({eng.name})", unit="layer"):
        gs = groups[name]
        # the entry's lock: a concurrent run on the same cache waits here, then reads what this one wrote
        with cache.locked(name) if cache is not None else nullcontext():
            cached = cache.load(name, (len(gs), len(bits))) if cache is not None else None
            if cached is not None:
                done[name] = (cached, "cache")
                continue
            weight = model.get_submodule(name).weight.detach().clone()  # engines write into the module weight
            table = candidate_table(weight, layers[name], group_size, list(bits), clip, correction, deadzone)
            cands = Candidates(weight, table, gs, bits)
            layer_eng = eng.reference() if hasattr(eng, "serves") and not eng.serves(name) else eng
            d = layer_eng.layer(name, cands).reshape(len(gs), len(bits))
            if cache is not None:
                cache.save(name, d)
        done[name] = (d, layer_eng.name)
    for part in qdist.all_gather_object(done):  # other processes' layers (a no-op in one process)
        done.update(part)
    rows = [done[n][0] for n in names]
    used = {n: done[n][1] for n in names}
    groups_flat = [g for n in names for g in groups[n]]
    return Curves(groups=groups_flat, bits=list(bits), dist=np.concatenate(rows, axis=0), engine=eng.name,
                  seconds=time.perf_counter() - t0, layer_engines=used)
