"""The ``replay`` RD engine: exact first-order curves for models torch.fx cannot trace (sparse-convolution
detectors), without re-running what a candidate cannot change.

One FP pass per calibration batch records, through forward hooks on every submodule, the order of the module
calls and each call's output. To measure a candidate of layer ``L``, the task's forward runs again with

* every *upstream* module (a call that ended before ``L`` was called, taken at the outermost level, whose
  module is not called again later) replaced by its recorded FP output, so only ``L``, the code around it and
  what follows it compute; recorded sparse tensors keep their rule books, so downstream submanifold
  convolutions reuse them instead of rebuilding them;
* every top-level module called after ``L`` that the distortion target does not depend on (a detector's head
  when the target is the backbone's BEV features) replaced by its recorded output too. Whether the target
  depends on such a module is tested once, by perturbing a layer and comparing the target with and without it.

Nothing is traced, so data-dependent control flow and custom tensor types (spconv's ``SparseConvTensor``) are
fine. The candidates' numbers equal the reference engine's (the same operations on the same values); this is
checked once on FP (the replayed target must reproduce the recorded one) and, after every layer, the recorded
outputs are checked to be unchanged (a model that edits a module's output in place would corrupt the replay).
A layer called more than once per forward pass is measured by the reference engine instead (logged). A model
whose modules return a non-tensor input object (OpenPCDet's modules edit ``batch_dict`` in place and return it:
every recorded output would be the same dict), or whose container outputs (dicts, lists) are edited after they
are returned, cannot be recorded: recording raises :class:`qcore.QcoreError` (``engine=fast`` then falls back to
the reference engine, logged). A fresh dict that nobody edits (a detector head's outputs) is fine.

Memory: the recorded outputs of every module on the curve batches (about 320 MB for 4 scenes of the embedded
detector).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, MutableMapping, MutableSequence, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qcore import QcoreError
from qcore_rdoq.curves import Candidates, ReferenceEngine, _sse, candidate_weight, exact_math

log = logging.getLogger(__name__)

Forward = Callable[[nn.Module, Any], Tensor]


@dataclass(frozen=True)
class _Call:
    """One module call of the recorded FP pass: ``start``/``end`` are event ticks (pre-hook, hook)."""

    name: str
    start: int
    end: int


def _tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors an output holds (a tensor, a sparse tensor's ``features``, or containers of those)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(getattr(obj, "features", None), Tensor):
        yield obj.features


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, tuple, torch.Size, torch.dtype, torch.device)


def _objects(obj: Any) -> Iterator[Any]:
    """The non-tensor objects an input or output holds (itself, and inside dicts, lists and tuples) that could be
    edited in place (immutable values such as ``None`` or ints are shared by identity, so they are left out)."""
    if isinstance(obj, Tensor):
        return
    if not isinstance(obj, _IMMUTABLE):
        yield obj
    if isinstance(obj, (dict, MutableMapping)):
        for v in obj.values():
            yield from _objects(v)
    elif isinstance(obj, (list, tuple, MutableSequence)):
        for v in obj:
            yield from _objects(v)


def _layout(obj: Any) -> Any:
    """What a container output holds, by identity: equal before and after unless it was edited in place."""
    if isinstance(obj, (dict, MutableMapping)):
        return ("dict", tuple((k, _layout(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple, MutableSequence)):
        return (type(obj).__name__, tuple(_layout(v) for v in obj))
    return id(obj)


def _unreplayable(args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> str:
    """Why a module call's output cannot be recorded for replay ('' if it can): it is, or holds, a non-tensor
    object of its own input (OpenPCDet's modules edit ``batch_dict`` in place and return it, so every recorded
    output would be the same dict). Tensors passed through (``nn.Identity``) are fine: in-place edits of recorded
    tensors are caught by the FP and checksum checks."""
    inputs = {id(o) for a in (*args, *kwargs.values()) for o in _objects(a)}
    shared = [o for o in _objects(out) if id(o) in inputs]
    if shared:
        return f"returns its own input {type(shared[0]).__name__} (passed through, edited in place)"
    return ""


def _checksum(outputs: dict[str, list[Any]]) -> list[float]:
    return [float(t.double().sum()) for outs in outputs.values() for o in outs for t in _tensors(o)]


class ReplayEngine:
    """Hook-based cached upstream, downstream-only evaluation, no tracing (see module docstring)."""

    name = "replay"

    def __init__(self, model: nn.Module, forward: Forward, batches: Sequence[Any]) -> None:
        self.model, self.forward, self.batches = model, forward, batches
        self.ref: list[Tensor] = []
        self.outputs: list[dict[str, list[Any]]] = []  # per batch: module name -> outputs of its calls in order
        calls: list[_Call] = []
        for b in batches:
            ref, outs, calls = self._record(b)
            self.ref.append(ref)
            self.outputs.append(outs)
        self.calls = calls
        self.count = sum(r.numel() for r in self.ref)
        self._children = {n for n, _ in model.named_children()}
        self._irrelevant: dict[str, bool] = {}
        self._checked = False
        self._reference: ReferenceEngine | None = None

    @torch.no_grad()
    def _record(self, batch: Any) -> tuple[Tensor, dict[str, list[Any]], list[_Call]]:
        tick = [0]
        starts: dict[str, list[int]] = {}
        calls: list[_Call] = []
        outs: dict[str, list[Any]] = {}
        layouts: list[tuple[str, Any, Any]] = []  # container outputs and what they held when recorded

        def pre(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _args: Any) -> None:
                starts.setdefault(name, []).append(tick[0])
                tick[0] += 1
            return hook

        def post(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
                problem = _unreplayable(args, kwargs, out)
                if problem:
                    raise QcoreError(f"the replay RD engine cannot record module {name}: it {problem}; use "
                                     "-o engine=reference or -o engine=second-order")
                calls.append(_Call(name, starts[name].pop(), tick[0]))
                tick[0] += 1
                outs.setdefault(name, []).append(out)
                if any(True for _ in _objects(out)):  # a container: check after the pass that nobody edited it
                    layouts.append((name, out, _layout(out)))
            return hook

        handles = []
        for name, m in self.model.named_modules():
            if name:
                handles += [m.register_forward_pre_hook(pre(name)),
                            m.register_forward_hook(post(name), with_kwargs=True)]
        try:
            with exact_math():
                ref = self.forward(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        for name, out, layout in layouts:
            if _layout(out) != layout:
                raise QcoreError(f"the replay RD engine cannot record module {name}: its output "
                                 f"{type(out).__name__} is edited in place after it returns; use -o engine=reference "
                                 "or -o engine=second-order")
        return ref, outs, sorted(calls, key=lambda c: c.start)

    def reference(self) -> ReferenceEngine:
        """The reference engine on the same data (sharing the FP outputs), for layers replay cannot serve."""
        if self._reference is None:
            self._reference = ReferenceEngine(self.model, self.forward, self.batches, self.ref)
        return self._reference

    def _layer_call(self, name: str) -> _Call:
        hits = [c for c in self.calls if c.name == name]
        if len(hits) != 1:
            raise QcoreError(f"layer {name} is called {len(hits)} times per forward pass; the replay engine cannot "
                             "measure it alone (use -o engine=reference)")
        return hits[0]

    def upstream(self, name: str) -> list[str]:
        """The outermost modules whose every call ends before layer ``name`` is called: their recorded outputs
        stand in for them when a candidate of ``name`` is measured."""
        layer = self._layer_call(name)
        before = [c for c in self.calls if c.end < layer.start]
        later = {c.name for c in self.calls if c.end >= layer.start}
        chosen: list[_Call] = []
        for c in before:  # sorted by start: an enclosing call comes before the calls it contains
            if c.name in later or any(o.start < c.start and c.end < o.end for o in chosen):
                continue
            chosen.append(c)
        return list(dict.fromkeys(c.name for c in chosen))

    def _after(self, name: str) -> list[str]:
        """Top-level modules called only after layer ``name`` (candidates for skipping)."""
        layer = self._layer_call(name)
        tops = [c for c in self.calls if c.name in self._children]
        return list(dict.fromkeys(t.name for t in tops if t.start > layer.end
                                  and all(c.start > layer.end for c in tops if c.name == t.name)))

    @contextmanager
    def _stubbed(self, batch: int, names: Sequence[str]) -> Iterator[None]:
        """Modules ``names`` return their recorded outputs on ``batch`` (in call order, again on every forward
        pass) instead of computing."""
        saved: dict[str, Any] = {}
        try:
            for n in names:
                m = self.model.get_submodule(n)
                saved[n] = m.__dict__.get("forward")
                it = itertools.cycle(self.outputs[batch][n])  # the same calls on every forward pass
                m.forward = lambda *_a, _it=it, **_k: next(_it)  # type: ignore[method-assign]
            yield
        finally:
            for n, f in saved.items():
                m = self.model.get_submodule(n)
                if f is None:
                    del m.forward
                else:
                    m.forward = f  # type: ignore[method-assign]

    @contextmanager
    def _noise(self, name: str) -> Iterator[None]:
        """Layer ``name``'s weight plus seeded noise of a tenth of its standard deviation (restored on exit)."""
        w = self.model.get_submodule(name).weight
        w0 = w.detach().clone()
        g = torch.Generator().manual_seed(0)
        w.data.add_(torch.randn(w.shape, generator=g).to(w) * (0.1 * float(w0.std()) + 1e-3))
        try:
            yield
        finally:
            w.data.copy_(w0)

    def _skipped(self, name: str) -> list[str]:
        """The top-level modules after ``name`` that the target does not depend on (tested once each, with
        layer ``name`` perturbed, on the first batch)."""
        up = self.upstream(name)
        todo = [t for t in self._after(name) if t not in self._irrelevant]
        if todo:
            with torch.no_grad(), exact_math(), self._noise(name):
                with self._stubbed(0, up):
                    full = self.forward(self.model, self.batches[0])
                for t in todo:
                    with self._stubbed(0, [*up, t]):
                        out = self.forward(self.model, self.batches[0])
                    same = out.shape == full.shape and torch.allclose(out, full, rtol=1e-6, atol=1e-12)
                    self._irrelevant[t] = bool(same and not torch.equal(full, self.ref[0]))
                    log.info("replay engine: the distortion target %s on %s", "does not depend" if
                             self._irrelevant[t] else "depends", t)
        return [t for t in self._after(name) if self._irrelevant.get(t)]

    def _check_fp(self, name: str, stubs: list[str]) -> None:
        """The replay reproduces the recorded FP target (once per engine)."""
        with torch.no_grad(), exact_math(), self._stubbed(0, stubs):
            out = self.forward(self.model, self.batches[0])
        if not torch.allclose(out, self.ref[0], rtol=1e-5, atol=1e-7):
            raise QcoreError(f"replaying from the recorded outputs does not reproduce the FP target at layer {name} "
                             "(a module edits its input or output in place); use -o engine=reference")
        self._checked = True

    @torch.no_grad()
    def measure(self, name: str, n: int, perturb: Callable[[int], AbstractContextManager[Any]]) -> np.ndarray:
        """Distortion of each of ``n`` candidates of layer ``name``; ``perturb(i)`` puts candidate ``i`` into the
        model while its context is open (and restores it on exit). Only ``name`` and what follows it run."""
        stubs = self.upstream(name) + self._skipped(name)
        if not self._checked:
            self._check_fp(name, stubs)
        before = _checksum(self.outputs[0])
        sse = np.zeros(n)
        with exact_math():
            for j, (batch, ref) in enumerate(zip(self.batches, self.ref, strict=True)):
                with self._stubbed(j, stubs):
                    for i in range(n):
                        with perturb(i):
                            sse[i] += float(_sse(self.forward(self.model, batch)[None], ref)[0])
        if _checksum(self.outputs[0]) != before:
            raise QcoreError(f"a module edited a recorded output in place while layer {name} was measured; "
                             "use -o engine=reference for this model")
        return sse / self.count

    def layer(self, name: str, candidates: Candidates) -> np.ndarray:
        return self.measure(name, len(candidates), candidate_weight(self.model.get_submodule(name), candidates))

    def serves(self, name: str) -> bool:
        """Whether replay works for ``name`` (otherwise use :meth:`reference` for it)."""
        try:
            self._layer_call(name)
        except QcoreError as exc:
            log.info("%s; using the reference engine for it", exc)
            return False
        return True
