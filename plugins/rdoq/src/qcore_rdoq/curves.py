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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from qcore.errors import QcoreError
from qcore.layers import LayerInfo
from qcore.progress import track
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


def _sse(out: Tensor, ref: Tensor) -> Tensor:
    """Sum of squared errors per candidate: ``out`` is ``[K, ...]``, ``ref`` broadcasts against ``out[k]``."""
    return (out.float() - ref.float()).pow(2).flatten(1).sum(1)


class ReferenceEngine:
    """Perturb one group, rerun the whole model on every calibration batch, restore."""

    name = "reference"

    def __init__(self, model: nn.Module, forward: Forward, batches: Sequence[Any]) -> None:
        self.model, self.forward, self.batches = model, forward, batches
        with torch.no_grad():
            self.ref = [forward(model, b) for b in batches]
        self.count = sum(r.numel() for r in self.ref)

    @torch.no_grad()
    def layer(self, name: str, candidates: Candidates) -> np.ndarray:
        module = self.model.get_submodule(name)
        w0 = module.weight.detach().clone()
        out = np.zeros(len(candidates))
        try:
            for i in range(len(candidates)):
                module.weight.copy_(candidates.stack(i, i + 1)[0])
                out[i] = sum(float(_sse(self.forward(self.model, b)[None], r)[0])
                             for b, r in zip(self.batches, self.ref)) / self.count
        finally:
            module.weight.copy_(w0)
        return out


class _Downstream:
    """The part of an fx graph that depends on one layer's output, runnable from cached upstream values."""

    def __init__(self, gm: fx.GraphModule, layer: str) -> None:
        nodes = list(gm.graph.nodes)
        hits = [n for n in nodes if n.op == "call_module" and n.target == layer]
        if len(hits) != 1:
            raise ValueError(f"layer {layer} is called {len(hits)} times in the traced graph")
        self.node = hits[0]
        if len(self.node.args) != 1 or self.node.kwargs or not isinstance(self.node.args[0], fx.Node):
            raise ValueError(f"layer {layer} is not called with a single tensor argument")
        desc: set[fx.Node] = set()
        frontier = [self.node]
        while frontier:
            for user in frontier.pop().users:
                if user not in desc:
                    desc.add(user)
                    frontier.append(user)
        self.order = [n for n in nodes if n in desc]
        self.needed = [n for n in nodes if n not in desc and n is not self.node and any(u in desc for u in n.users)]
        self.input = self.node.args[0]
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.output = next(n for n in self.order if n.op == "output")

    @torch.no_grad()
    def capture(self, x: Any) -> tuple[Tensor, dict[fx.Node, Any]]:
        """Run the whole graph once; return the layer's input and the upstream values downstream reads."""
        interp = fx.Interpreter(self.gm, garbage_collect_values=False)
        interp.run(x)
        return interp.env[self.input], {n: interp.env[n] for n in self.needed}

    def run(self, y: Tensor, env: dict[fx.Node, Any]) -> Tensor:
        """The model output when the layer outputs ``y`` (upstream values from ``env``)."""
        vals = dict(env)
        vals[self.node] = y
        for n in self.order:
            args = fx.node.map_arg(n.args, lambda a: vals[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: vals[a])
            if n.op == "call_module":
                vals[n] = self.modules[str(n.target)](*args, **kwargs)
            elif n.op == "call_function":
                vals[n] = n.target(*args, **kwargs)  # type: ignore[operator]
            elif n.op == "call_method":
                vals[n] = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            elif n.op == "output":
                return args[0]  # type: ignore[return-value]
            else:  # pragma: no cover - placeholders and attributes are never downstream of a layer
                raise ValueError(f"unexpected node {n.op} downstream")
        raise ValueError("graph has no output")


class FastEngine:
    """Cached upstream, downstream-only evaluation, candidates batched with vmap (see module docstring)."""

    name = "fast"

    def __init__(self, model: nn.Module, forward: Forward, batches: Sequence[Any], chunk: int = 32) -> None:
        self.model, self.batches, self.chunk = model, batches, chunk
        self.gm = fx.symbolic_trace(model)
        with torch.no_grad():
            self.ref = [forward(model, b) for b in batches]
            if not all(isinstance(b, Tensor) for b in batches):
                raise ValueError("fast engine needs tensor batches")
            traced = self.gm(batches[0])
        if not torch.allclose(traced, self.ref[0], rtol=1e-5, atol=1e-6):
            raise ValueError("the traced graph does not reproduce the task's forward output")
        self.count = sum(r.numel() for r in self.ref)
        self.vmap_ok = True

    def _layer_out(self, module: nn.Module, x: Tensor, ws: Tensor) -> Tensor:
        call = lambda w: torch.func.functional_call(module, {"weight": w}, (x,))  # noqa: E731
        if self.vmap_ok:
            return torch.func.vmap(call)(ws)
        return torch.stack([call(w) for w in ws])

    def _downstream(self, ds: _Downstream, ys: Tensor, env: dict[fx.Node, Any]) -> Tensor:
        if self.vmap_ok:
            try:
                return torch.func.vmap(lambda y: ds.run(y, env))(ys)
            except Exception as exc:  # an op without a batching rule: go one candidate at a time
                log.info("vmap over candidates failed (%s); evaluating candidates one by one", exc)
                self.vmap_ok = False
        return torch.stack([ds.run(y, env) for y in ys])

    @torch.no_grad()
    def layer(self, name: str, candidates: Candidates) -> np.ndarray:
        ds = _Downstream(self.gm, name)
        module = self.model.get_submodule(name)
        sse = torch.zeros(len(candidates), dtype=torch.float64)
        for batch, ref in zip(self.batches, self.ref):
            x, env = ds.capture(batch)
            for lo in range(0, len(candidates), self.chunk):
                ws = candidates.stack(lo, min(lo + self.chunk, len(candidates)))
                out = self._downstream(ds, self._layer_out(module, x, ws), env)
                sse[lo:lo + len(ws)] += _sse(out, ref).double()
        return (sse / self.count).numpy()


def make_engine(kind: str, model: nn.Module, forward: Forward, batches: Sequence[Any], chunk: int
                ) -> ReferenceEngine | FastEngine:
    """Build the engine ``kind``; ``fast`` falls back to ``reference`` (logged) when the model cannot be traced."""
    if kind == "reference":
        return ReferenceEngine(model, forward, batches)
    if kind == "fast":
        try:
            return FastEngine(model, forward, batches, chunk)
        except Exception as exc:
            log.warning("fast RD engine unavailable (%s); using the reference engine", exc)
            return ReferenceEngine(model, forward, batches)
    raise QcoreError(f"unknown RD curve engine {kind!r}")


def first_order_curves(model: nn.Module, forward: Forward, batches: Sequence[Any], layers: dict[str, LayerInfo],
                       group_size: int, bits: Sequence[int], engine: str = "fast", chunk: int = 32,
                       weight_range: str = "mse") -> Curves:
    """Measure ``D_g(b)`` for every weight group of ``layers`` (see module docstring)."""
    t0 = time.perf_counter()
    eng = make_engine(engine, model, forward, batches, chunk)
    groups: list[WeightGroup] = []
    rows: list[np.ndarray] = []
    used: dict[str, str] = {}
    fallback: ReferenceEngine | None = None
    for name in track(list(layers), desc=f"RD curves ({eng.name})", unit="layer"):
        info = layers[name]
        weight = model.get_submodule(name).weight.detach().clone()  # engines write into the module weight
        gs = weight_groups(info, group_size)
        table = candidate_table(weight, info, group_size, list(bits), weight_range)
        cands = Candidates(weight, table, gs, bits)
        layer_eng: ReferenceEngine | FastEngine = eng
        if isinstance(eng, FastEngine):
            try:
                _Downstream(eng.gm, name)
            except ValueError as exc:
                log.info("layer %s: %s; using the reference engine for it", name, exc)
                fallback = fallback or ReferenceEngine(model, forward, batches)
                layer_eng = fallback
        d = layer_eng.layer(name, cands).reshape(len(gs), len(bits))
        used[name] = layer_eng.name
        groups.extend(gs)
        rows.append(d)
    return Curves(groups=groups, bits=list(bits), dist=np.concatenate(rows, axis=0), engine=eng.name,
                  seconds=time.perf_counter() - t0, layer_engines=used)
