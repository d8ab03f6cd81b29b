"""qcore-latticeq: LatticeQ's lattice weight quantization (Metz et al.) for qcore.

The Python pieces other code may use: :func:`closest_points` (exact box-constrained closest-vector search),
:func:`search_bases`, :class:`LatticeFakeQuant`, :func:`quantile_range`.
"""

from __future__ import annotations

from qcore_latticeq.activations import QUANTILE_LEVELS, quantile, quantile_range
from qcore_latticeq.cvp import babai_nearest_plane, brute_force_points, closest_points, decode
from qcore_latticeq.quantizer import LatticeFakeQuant, LatticeQuantizer, lattice_dim, quantize_basis
from qcore_latticeq.search import SearchSettings, search_bases

__all__ = ["closest_points", "babai_nearest_plane", "brute_force_points", "decode", "LatticeFakeQuant",
           "LatticeQuantizer", "lattice_dim", "quantize_basis", "SearchSettings", "search_bases", "quantile",
           "quantile_range", "QUANTILE_LEVELS"]
