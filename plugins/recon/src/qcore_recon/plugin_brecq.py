"""Entry point ``brecq`` of qcore-recon: the method ``brecq`` (its only one, so ``qcore run --plugin brecq`` runs
it); its calibrator is registered by the ``recon`` entry point."""

from __future__ import annotations

from typing import Any

from qcore import hookimpl
from qcore_recon.plugin import _method


@hookimpl
def qcore_register_methods(register: Any) -> None:
    register(_method("brecq", "BRECQ block reconstruction (AdaRound weights with acts off, then LSQ act steps), "
                             "uniform grid, W4A4", True))
