"""qcore-ompq: OMPQ (orthogonality-driven mixed precision) as a qcore allocator, solved exactly.

The pieces are usable on their own::

    from qcore_ompq import cka_matrix, importance, solve_ilp
    mat = cka_matrix([feats_a, feats_b, feats_c])          # [N, p_i] each
    gamma, theta = importance(mat, beta=1.0)
    sol = solve_ilp(sizes, dist, choices=[2, 3, 4], size_budget=3 * sum(sizes))
"""

from __future__ import annotations

from qcore_ompq.activations import InputErrors, act_quantized, input_errors
from qcore_ompq.allocator import OMPQAllocator, OMPQOptions
from qcore_ompq.orthogonality import (
    Orthogonality,
    cka_matrix,
    downstream_mean,
    flat_features,
    importance,
    layer_features,
    linear_cka,
    orthogonality,
)
from qcore_ompq.qat import OMPQFinetune, QATOptions, distill_loss, finetune
from qcore_ompq.seed import expand_bits, seed_bops, seed_macs, seed_params, seed_report, seed_size_mib
from qcore_ompq.sensitivity import (
    hessian_traces,
    objective_matrix,
    plan_distortion,
    plan_of,
    quantized_weight,
    range_calibrator,
    weight_errors,
)
from qcore_ompq.solve import Solution, brute_force, brute_force_joint, solve_ilp, solve_joint, solve_seed

__all__ = [
    "OMPQAllocator", "OMPQOptions",
    "Orthogonality", "cka_matrix", "downstream_mean", "flat_features", "importance", "layer_features", "linear_cka",
    "orthogonality",
    "expand_bits", "seed_bops", "seed_macs", "seed_params", "seed_report", "seed_size_mib",
    "hessian_traces", "objective_matrix", "plan_distortion", "plan_of", "quantized_weight",
    "range_calibrator", "weight_errors",
    "Solution", "brute_force", "solve_ilp", "solve_seed", "solve_joint", "brute_force_joint",
    "InputErrors", "act_quantized", "input_errors",
    "OMPQFinetune", "QATOptions", "distill_loss", "finetune",
]
