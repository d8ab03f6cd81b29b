"""Entry point ``qdrop`` of qcore-recon: the method ``qdrop`` (its only one, so ``qcore run --plugin qdrop`` runs
it); its calibrator is registered by the ``recon`` entry point."""

from __future__ import annotations

from typing import Any

from qcore import hookimpl
from qcore_recon.plugin import _method


@hookimpl
def qcore_register_methods(register: Any) -> None:
    register(_method("qdrop", "QDrop block reconstruction (AdaRound + LSQ steps, act quantization randomly dropped), "
                             "uniform grid, W4A4", True))
