"""Split a torch.fx graph at one layer into an *upstream* part (model input -> the layer's input and every
value the rest of the network reads from before the layer) and a *downstream* part (the layer's output plus
those values -> model output), both as generated GraphModules (no per-node interpretation at run time).

Non-tensor values that depend on the batch (``B, N, C = x.shape`` in attention blocks) are recomputed
downstream from their tensors instead of being passed in, so the downstream part can run on several
candidates stacked along the batch dimension. :meth:`Split.run_batched` does that; whether a given graph
really is batch-safe is checked by the caller against the FP output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, fx


def _closure(start: list[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """Every node reachable from ``start`` by repeatedly following ``step`` (users or inputs)."""
    out: set[fx.Node] = set()
    frontier = list(start)
    while frontier:
        for nxt in step(frontier.pop()):
            if nxt not in out:
                out.add(nxt)
                frontier.append(nxt)
    return out


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _closure([node], lambda n: n.users)


def _ancestors(targets: list[fx.Node]) -> set[fx.Node]:
    return _closure(targets, lambda n: n.all_input_nodes) | set(targets)


class Split:
    """The graph of ``gm`` split at ``layer`` (a ``call_module`` node called once with one tensor)."""

    def __init__(self, gm: fx.GraphModule, layer: str, example: Tensor) -> None:
        nodes = list(gm.graph.nodes)
        hits = [n for n in nodes if n.op == "call_module" and n.target == layer]
        if len(hits) != 1:
            raise ValueError(f"layer {layer} is called {len(hits)} times in the traced graph")
        node = hits[0]
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            raise ValueError(f"layer {layer} is not called with a single tensor argument")
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if not placeholders or any(not p.args for p in placeholders[1:]):
            raise ValueError("the model must take one input (further arguments need defaults)")
        batch_dep = _descendants(placeholders[0]) | {placeholders[0]}
        values = self._values(gm, example)
        down = _descendants(node)
        while True:  # pull batch-dependent non-tensors (shapes, sizes) into the downstream part
            needed = [n for n in nodes if n not in down and n is not node and any(u in down for u in n.users)]
            pull = [n for n in needed if n in batch_dep and not isinstance(values[n], Tensor)]
            if not pull:
                break
            down |= set(pull)
        self.needed = needed
        self.batched = [n in batch_dep for n in needed]
        self.layer_input = node.args[0]
        keep = _ancestors([self.layer_input, *needed])  # what the upstream outputs need, and nothing else
        self.upstream = self._build(gm, [n for n in nodes if n in keep], placeholders[:1],
                                    [self.layer_input, *needed])
        out_node = next(n for n in nodes if n.op == "output")
        self.downstream = self._build(gm, [n for n in nodes if n in down and n.op != "output"],
                                      [node, *needed], [out_node.args[0]], single=True)

    @staticmethod
    @torch.no_grad()
    def _values(gm: fx.GraphModule, example: Tensor) -> dict[fx.Node, Any]:
        interp = fx.Interpreter(gm, garbage_collect_values=False)
        interp.run(example)
        return dict(interp.env)

    @staticmethod
    def _build(gm: fx.GraphModule, body: list[fx.Node], inputs: list[fx.Node], outputs: list[Any],
               single: bool = False) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, n in enumerate(inputs):
            env[n] = g.placeholder(f"in_{i}")
        for n in body:
            if n not in env:
                env[n] = g.node_copy(n, lambda a: env[a])
        mapped = [fx.node.map_arg(o, lambda a: env[a]) for o in outputs]
        g.output(mapped[0] if single else tuple(mapped))
        out = fx.GraphModule(gm, g)
        out.graph.eliminate_dead_code()
        out.recompile()
        return out

    @torch.no_grad()
    def capture(self, x: Tensor) -> tuple[Tensor, list[Any]]:
        """The layer's input and the upstream values the downstream part reads, for batch ``x``."""
        out = self.upstream(x)
        return out[0], list(out[1:])

    def run(self, y: Tensor, needed: list[Any]) -> Tensor:
        """Model output when the layer outputs ``y``."""
        return self.downstream(y, *needed)

    def run_batched(self, ys: Tensor, needed: list[Any], k: int) -> Tensor:
        """Model outputs for ``k`` candidate layer outputs stacked along the batch dimension (``ys`` is
        ``[k * N, ...]``); batch-dependent upstream values are repeated ``k`` times."""
        rep = [v.repeat(k, *([1] * (v.dim() - 1))) if b else v for v, b in zip(needed, self.batched, strict=True)]
        return self.downstream(ys, *rep)
