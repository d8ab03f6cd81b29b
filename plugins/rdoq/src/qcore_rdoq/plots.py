"""PNG plots of an RDOQ allocation (``-o plots=true``; needs the ``plots`` extra: ``pip install
qcore-rdoq[plots]``, i.e. matplotlib): the RD curves of sample weight groups with the chosen bits marked, and
the bits per layer. They are written with the run's outputs (``plots/*.png`` next to result.json).
Accuracy against average bits over several targets needs several runs: ``bench/rdoq_accuracy_plot.py``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from qcore import MissingDependencyError
from qcore_rdoq.groups import WeightGroup


def pyplot():  # type: ignore[no-untyped-def]
    """matplotlib's pyplot on the non-interactive Agg backend, or a one-line install hint."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError("matplotlib", "pip install qcore-rdoq[plots]", "RDOQ plots") from exc
    return plt


def png(fig) -> bytes:  # type: ignore[no-untyped-def]
    """The figure as PNG bytes (the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def rd_curves_png(groups: Sequence[WeightGroup], bits: Sequence[int], dist: np.ndarray, chosen: np.ndarray,
                  samples: int = 6) -> bytes:
    """RD curves (distortion against bits, log scale) of up to ``samples`` groups spread over the layers, each
    with its chosen bit-width marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    pick = np.unique(np.linspace(0, len(groups) - 1, min(samples, len(groups))).round().astype(int))
    for i in pick:
        d = np.maximum(dist[i], 1e-30)
        line, = ax.plot(bits, d, marker=".", label=f"{groups[i].layer}[{groups[i].start}:{groups[i].stop}]")
        k = list(bits).index(int(chosen[i]))
        ax.plot([bits[k]], [d[k]], "o", ms=9, mfc="none", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("bits of the group")
    ax.set_ylabel("distortion of the target (MSE vs FP)")
    ax.set_title("RD curves of sample groups (circle: allocated)")
    ax.legend(fontsize=7)
    return png(fig)


def bits_per_layer_png(layer_bits: dict[str, float], pinned: dict[str, float]) -> bytes:
    """Average weight bits of every layer (allocated in one colour, pinned in another)."""
    plt = pyplot()
    names = list(layer_bits)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.28 * len(names)), 4.0))
    colours = ["tab:gray" if n in pinned else "tab:blue" for n in names]
    ax.bar(range(len(names)), [layer_bits[n] for n in names], color=colours)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("average weight bits")
    ax.set_title("bits per layer (grey: pinned)")
    return png(fig)
