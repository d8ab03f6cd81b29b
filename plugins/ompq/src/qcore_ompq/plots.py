"""The orthogonality heat map (``-o plots=true``; needs matplotlib: ``pip install qcore-ompq[plots]``), written
with the run's outputs as ``plots/ompq_orm.png``: the CKA matrix, and theta and the chosen bits per layer."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from qcore import MissingDependencyError
from qcore_ompq.orthogonality import Orthogonality


def orm_png(orm: Orthogonality, bits: Mapping[str, int]) -> bytes:
    """PNG bytes: the CKA matrix as a heat map (left) and theta with the chosen bits per layer (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError("matplotlib", "pip install qcore-ompq[plots]", "OMPQ's heat map") from exc
    n = len(orm.names)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1.1, 1]})
    im = ax.imshow(orm.matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_title(f"linear CKA between layer outputs ({orm.samples} samples)")
    ticks = np.arange(n)
    ax.set_xticks(ticks, [str(i) for i in ticks], fontsize=6)
    ax.set_yticks(ticks, orm.names, fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046)
    bx.bar(ticks, orm.theta, color="tab:blue", label="theta")
    bx.set_ylabel("theta = exp(-beta (gamma - min gamma))")
    bx.set_xlabel("layer (row of the matrix)")
    cx = bx.twinx()
    cx.plot(ticks, [bits.get(name, np.nan) for name in orm.names], "o-", color="tab:red", label="bits")
    cx.set_ylabel("weight bits")
    bx.set_title(f"importance and chosen bits (beta {orm.beta:g})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
