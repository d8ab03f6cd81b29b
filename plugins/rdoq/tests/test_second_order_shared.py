"""Both second-order engines (Jacobians: tensor batches; projected backward passes: any batch) go through one
cache / lock / memory-bound / rank-split helper (``shared_curve_set``). Ranks are faked without torchrun by
patching :mod:`qcore.distributed`'s ``rank``/``world``/``all_gather_object`` and running each rank in a thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from qcore import discover_layers, measure_layers, torch_layer_info
from qcore import distributed as qdist
from qcore.testing import tiny_mlp
from qcore_rdoq import act_curves, second_order
from qcore_rdoq.cache import CurveCache
from qcore_rdoq.deployment import WEIGHT_CLIP


class FakeRanks:
    """``world`` ranks of one job as threads of this process: ``rank()`` is the calling thread's, and
    ``all_gather_object`` meets the other threads at a barrier."""

    def __init__(self, world: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.size = world
        self.local = threading.local()
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots: list[Any] = [None] * world
        monkeypatch.setattr(qdist, "rank", lambda: self.local.rank)
        monkeypatch.setattr(qdist, "world", lambda: self.size)
        monkeypatch.setattr(qdist, "all_gather_object", self.all_gather_object)

    def all_gather_object(self, obj: Any) -> list[Any]:
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def run(self, fn: Callable[[], Any]) -> list[Any]:
        """``fn()`` on every rank; the results in rank order (an exception on any rank is raised here)."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def one(r: int) -> None:
            self.local.rank = r
            try:
                results[r] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(exc)
                self.barrier.abort()

        flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # exact_math, per thread
        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.size)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        if errors:
            raise errors[0]
        return results


def _setup() -> tuple[torch.nn.Module, list[torch.Tensor], dict[str, Any]]:
    torch.manual_seed(0)
    model = tiny_mlp().eval()
    batches = [torch.randn(6, 1, 8, 8) for _ in range(2)]
    layers = discover_layers(model, torch_layer_info)
    measure_layers(model, layers, lambda m: m(batches[0]))
    return model, batches, layers


def _engines(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, Callable[..., list[Any]]]:
    """Both engines with the same arguments: ``(layers, ratios, caches) -> [Curves per ratio]``."""
    dicts = [{"x": b} for b in batches]
    return {
        "jacobians": lambda layers, ratios, caches=None: second_order.second_order_curve_set(
            model, batches, layers, 4, [2, 4], ratios, projections=2, caches=caches, seed=3),
        "projected": lambda layers, ratios, caches=None: second_order.projected_curve_set(
            model, lambda m, b: m(b["x"]), dicts, layers, 4, [2, 4], ratios, 3, caches=caches, seed=3),
    }


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[list[str], list[float]]]:
    """Record the layers and ratios of every pass of ``second_order.<name>``."""
    calls: list[tuple[list[str], list[float]]] = []
    real = getattr(second_order, name)

    def spy(model: Any, first: Any, *args: Any) -> Any:
        layers, ratios = (args[0], args[3]) if name == "_second_order_pass" else (args[1], args[4])
        calls.append((list(layers), list(ratios)))
        return real(model, first, *args)

    monkeypatch.setattr(second_order, name, spy)
    return calls


PASS = {"jacobians": "_second_order_pass", "projected": "_projected_pass"}


@pytest.mark.parametrize("engine", ["jacobians", "projected"])
def test_one_process_is_one_pass_of_the_engine_and_the_cache_reads_it_back(engine, tmp_path, monkeypatch):
    """In one process the helper adds nothing to the numbers: the curves are the engine's single pass over every
    layer and ratio, bit for bit; a second run reads every layer back from the caches, bit for bit."""
    model, batches, layers = _setup()
    run = _engines(model, batches)[engine]
    ratios = [0.0, 0.4]
    calls = _spy(monkeypatch, PASS[engine])
    caches = [CurveCache(tmp_path, f"{i}" * 40) for i in range(2)]
    first = run(layers, ratios, caches)
    assert calls == [(list(layers), ratios)]
    monkeypatch.undo()
    if engine == "jacobians":
        sub = second_order._sub_batch(model, list(layers), batches[0], 2)
        with torch.no_grad():  # as second_order_curve_set runs it
            direct = second_order._second_order_pass(model, batches, layers, 4, [2, 4], ratios, sub,
                                                     second_order.WEIGHT_CLIP, None, 2, 3)
    else:
        direct = second_order._projected_pass(model, lambda m, b: m(b["x"]), [{"x": b} for b in batches], layers,
                                              4, [2, 4], ratios, 3, second_order.WEIGHT_CLIP, None, 3, None, [])
    again = run(layers, ratios, caches)
    for c, d, a in zip(first, direct, again, strict=True):
        np.testing.assert_array_equal(c.dist, d)
        np.testing.assert_array_equal(a.dist, d)
        assert set(c.layer_engines.values()) == {"second-order"} and set(a.layer_engines.values()) == {"cache"}


@pytest.mark.parametrize("engine", ["jacobians", "projected"])
def test_ratios_beyond_the_memory_bound_take_several_passes(engine, monkeypatch):
    """Before, the projected engine held every ratio's candidates at once (no bound)."""
    model, batches, layers = _setup()
    run = _engines(model, batches)[engine]
    one = run(layers, [0.0, 0.3, 0.6])
    calls = _spy(monkeypatch, PASS[engine])
    monkeypatch.setattr(second_order, "_CANDIDATE_BYTES", 1)  # one ratio per pass
    split = run(layers, [0.0, 0.3, 0.6])
    assert [r for _, r in calls] == [[0.0], [0.3], [0.6]]
    for a, b in zip(one, split, strict=True):
        np.testing.assert_allclose(a.dist, b.dist, rtol=1e-6, atol=0)


@pytest.mark.parametrize("engine", ["jacobians", "projected"])
def test_each_rank_measures_its_share_of_the_layers_and_all_get_every_curve(engine, tmp_path, monkeypatch):
    """Under torchrun (faked: 2 ranks) each rank measures and caches only its round-robin share of the layers,
    and every rank returns the one-process curves (the random directions do not depend on the share: projected,
    bit for bit; Jacobians up to float rounding). Before, every rank measured every layer."""
    model, batches, layers = _setup()
    run = _engines(model, batches)[engine]
    alone = run(layers, [0.0, 0.4])
    calls = _spy(monkeypatch, PASS[engine])
    ranks = FakeRanks(2, monkeypatch)
    caches = [CurveCache(tmp_path, f"{i}" * 40) for i in range(2)]
    per_rank = ranks.run(lambda: run(layers, [0.0, 0.4], caches))
    names = list(layers)
    assert sorted(layer for c in calls for layer in c[0]) == sorted(names) and len(calls) == 2
    assert sorted(tuple(c[0]) for c in calls) == sorted([tuple(names[0::2]), tuple(names[1::2])])
    for curves in per_rank:
        for c, a in zip(curves, alone, strict=True):
            if engine == "projected":
                np.testing.assert_array_equal(c.dist, a.dist)
            else:  # the Jacobians of fewer weights at once: another float summation order
                np.testing.assert_allclose(c.dist, a.dist, rtol=1e-6, atol=0)
            assert c.groups == a.groups and set(c.layer_engines) == set(names)
    assert all(cache.load(n, (len(second_order.weight_groups(layers[n], 4)), 2)) is not None
               for cache in caches for n in names)
    calls.clear()
    cached = ranks.run(lambda: run(layers, [0.0, 0.4], caches))
    assert not calls and all(set(c.layer_engines.values()) == {"cache"} for curves in cached for c in curves)


def _spy_act(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the layers of every pass of the second-order activation curves."""
    calls: list[list[str]] = []
    real = act_curves._second_order_act_pass

    def spy(model: Any, forward: Any, batches: Any, part: list[str], *args: Any) -> Any:
        calls.append(list(part))
        return real(model, forward, batches, part, *args)

    monkeypatch.setattr(act_curves, "_second_order_act_pass", spy)
    return calls


@pytest.mark.parametrize("projections", [0, 2])
def test_second_order_activation_curves_split_over_ranks_equal_one_process(projections, monkeypatch):
    """The activation curves go through the same helper: one process takes one pass over every layer; under
    torchrun (faked: 2 ranks, each on its own copy of the model, as processes are) each rank takes the gradients
    of its share only and every rank returns the one-process curves bit for bit. Before, every rank computed
    every layer."""
    import copy

    model, batches, layers = _setup()
    names = list(layers)
    calls = _spy_act(monkeypatch)

    def run(m: torch.nn.Module) -> np.ndarray:
        return act_curves.second_order_activation_curves(m, lambda mm, b: mm(b), batches, layers, [2, 4, 8],
                                                         seed=3, projections=projections)[0]

    alone = run(model)
    assert calls == [names] and alone.shape == (len(names), 3) and (alone > 0).all()
    calls.clear()
    ranks = FakeRanks(2, monkeypatch)
    copies = [copy.deepcopy(model) for _ in range(2)]  # threads must not share the layers' hooks
    per_rank = ranks.run(lambda: run(copies[ranks.local.rank]))
    assert sorted(tuple(c) for c in calls) == sorted([tuple(names[0::2]), tuple(names[1::2])])
    for dist in per_rank:
        np.testing.assert_array_equal(dist, alone)


def test_second_order_activation_curves_read_a_filled_cache_back(tmp_path, monkeypatch):
    """Before, the activation curves had no cache: a repeated run took every input gradient again."""
    model, batches, layers = _setup()
    calls = _spy_act(monkeypatch)

    def run(cache: CurveCache | None) -> np.ndarray:
        return act_curves.second_order_activation_curves(model, lambda m, b: m(b), batches, layers, [2, 4],
                                                         seed=3, projections=2, cache=cache)[0]

    cache = CurveCache(tmp_path, "a" * 40)
    first = run(cache)
    assert len(calls) == 1 and all(cache.load(n, (1, 2)) is not None for n in layers)
    again = run(cache)
    assert len(calls) == 1  # nothing measured: every layer read back
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(run(None), first)



def _exact_gauss_newton(model: torch.nn.Module, x: torch.Tensor, layers: dict[str, Any]) -> np.ndarray:
    """``||J dw||^2 / outputs`` per group and bit-width (groups of 4, bits 2 and 4) from the full Jacobian: one
    backward pass per output of the (tiny) model, every output its own direction."""
    names = list(layers)
    params = [model.get_submodule(n).weight for n in names]
    with torch.enable_grad():
        out = model(x).flatten()
        rows = [torch.autograd.grad(out[i], params, retain_graph=True) for i in range(out.numel())]
    deltas = second_order._group_deltas(model, layers, 4, [2, 4], [0.0], WEIGHT_CLIP, None)
    dists = []
    for k, n in enumerate(names):
        jac = second_order._by_group(torch.stack([r[k] for r in rows]), 4)  # [groups, outputs, elements]
        dists.append(torch.einsum("gbe,goe->gbo", deltas[n], jac).pow(2).sum(-1).double().numpy() / out.numel())
    return np.concatenate(dists)


def test_projected_directions_per_sample_are_less_noisy_than_per_batch():
    """The projected engine's estimate of ``||J dw||^2`` from K random directions: over one batch of N samples
    the cross terms between samples are noise (relative standard deviation ~ sqrt(2/K)); the same samples as N
    batches of one (what the allocator does through ``task.split``) average N independent estimates (~ sqrt(2/(K
    N))) at the same number of backward passes per sample. Both against the exact Gauss-Newton curves (the full
    Jacobian of the tiny model)."""
    model, batches, layers = _setup()
    x = torch.cat(batches)  # 12 samples
    exact = _exact_gauss_newton(model, x, layers)
    fwd = lambda m, b: m(b["x"])  # noqa: E731
    errors: dict[str, list[float]] = {"batch": [], "sample": []}
    for seed in range(6):
        for kind, dicts in (("batch", [{"x": x}]), ("sample", [{"x": x[i:i + 1]} for i in range(len(x))])):
            est = second_order.projected_curve_set(model, fwd, dicts, layers, 4, [2, 4], [0.0], 2, seed=seed)[0].dist
            errors[kind].append(float(np.abs(np.log(est / exact)).mean()))
    assert np.mean(errors["sample"]) < 0.5 * np.mean(errors["batch"])  # measured: 0.29 against 1.00
    assert np.mean(errors["sample"]) < 0.4  # and close to the exact curves
