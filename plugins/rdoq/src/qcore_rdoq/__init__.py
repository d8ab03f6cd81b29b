"""qcore-rdoq: rate-distortion optimal channel-group mixed precision (RDOQ), as a qcore plugin.

Public API (for other plugins): :func:`layer_curves`, each layer's RD-curve distortion per bit-width (the curves
``qcore run --plugin rdoq`` measures, from the same cache), and :class:`RDOQOptions`, the options that select them.
"""

from __future__ import annotations

from qcore_rdoq.allocator import RDOQOptions, layer_curves

__all__ = ["RDOQOptions", "layer_curves"]
