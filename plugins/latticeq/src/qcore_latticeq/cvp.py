"""Closest points of a bounded lattice code: exact box-constrained closest-vector search for ``n <= 3``.

Shapes throughout: ``v`` is ``[C, L, n]`` (``L`` vectors of length ``n`` for each of ``C`` rows, a row being an
output channel), ``basis`` is ``[C, n, n]`` with the basis vectors as *rows*, so a code ``z`` (``[C, L, n]``,
integers in ``[qmin, qmax]`` per coordinate, ``qmin``/``qmax`` one value per row) decodes to ``z @ basis``.

:func:`closest_points` is exact: it starts from the feasible point of Babai's nearest-plane algorithm (clipped
*before* the residual update, unlike the seed), projects ``v`` onto the continuous parallelepiped
``{x @ basis : qmin <= x <= qmax}`` (``p``, at distance ``d_p``), and enumerates every integer code in the box
whose decoded point can still beat the best one found (distance ``d``): by convexity every point ``q`` of the
parallelepiped has ``|q - v|^2 >= |q - p|^2 + d_p^2``, so a better code lies within ``sqrt(d^2 - d_p^2)`` of
``p``, which bounds each coordinate by that radius times the norm of the matching column of ``basis^-1``. For
weights far outside the code (clipped outliers) this radius stays small, where a ball around ``v`` would not.
Everything is vectorised over all vectors of a tensor; the only Python loops run over the ``3^n`` active sets
of the projection and the (few) candidate offsets.

Kernels: :func:`closest_points` goes through the torch op ``qcore_latticeq::closest_points`` (registered here,
with ``register_fake``; the reference is its implementation on every device). The op lives in this plugin, not
in core, because the algorithm and its only users are LatticeQ's; ``qcore-cuda`` registers its CUDA
implementation when this plugin is installed: :func:`closest_points_reference` with the enumeration step
(:func:`enumerate_offsets`, the loop over candidate offsets) replaced by a Triton kernel.
``QCORE_KERNELS=reference`` skips the op.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from qcore import ops

__all__ = ["gram_schmidt", "babai_nearest_plane", "project_to_box", "closest_points", "closest_points_reference",
           "enumerate_offsets", "EnumerateFn", "decode", "brute_force_points"]


def _bounds(qmin: Tensor | float, qmax: Tensor | float, v: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row bounds shaped ``[C, 1, 1]`` (or ``[1, 1, 1]`` for one bound) to broadcast against ``[C, L, n]``."""
    lo = torch.as_tensor(qmin, dtype=v.dtype, device=v.device)
    hi = torch.as_tensor(qmax, dtype=v.dtype, device=v.device)
    return lo.reshape(-1, 1, 1), hi.reshape(-1, 1, 1)


def decode(z: Tensor, basis: Tensor) -> Tensor:
    """The points ``z @ basis`` of codes ``z`` (``[C, L, n]``) for bases ``[C, n, n]`` (rows are basis vectors)."""
    return torch.bmm(z.to(basis.dtype), basis)


def gram_schmidt(basis: Tensor) -> Tensor:
    """Unnormalised Gram-Schmidt orthogonalisation of the rows of each ``[n, n]`` basis (``[C, n, n]``)."""
    out = basis.clone()
    n = basis.shape[-1]
    for k in range(1, n):
        for j in range(k):
            bj = out[:, j, :]
            coef = (basis[:, k, :] * bj).sum(-1) / (bj * bj).sum(-1).clamp_min(torch.finfo(basis.dtype).tiny)
            out[:, k, :] = out[:, k, :] - coef[:, None] * bj
    return out


def babai_nearest_plane(v: Tensor, basis: Tensor, qmin: Tensor | float, qmax: Tensor | float) -> Tensor:
    """Babai's nearest-plane code of ``v``, box-constrained: each coordinate is clipped to ``[qmin, qmax]``
    **before** the residual is updated, so later coordinates are chosen for the point the decoder produces
    (the seed updated the residual with the unclipped value). A feasible code, not always the closest."""
    lo, hi = _bounds(qmin, qmax, v)
    bt = gram_schmidt(basis)
    norms = (bt * bt).sum(-1).clamp_min(torch.finfo(v.dtype).tiny)  # [C, n]
    r = v.clone()
    z = torch.zeros_like(v)
    for k in reversed(range(v.shape[-1])):
        c = (r * bt[:, None, k, :]).sum(-1) / norms[:, k, None]
        u = torch.minimum(torch.maximum(torch.round(c), lo[..., 0]), hi[..., 0])
        r = r - u[..., None] * basis[:, None, k, :]
        z[..., k] = u
    return z


def project_to_box(v: Tensor, basis: Tensor, qmin: Tensor | float, qmax: Tensor | float) -> tuple[Tensor, Tensor]:
    """Real coordinates ``x`` (in ``[qmin, qmax]^n``) of the point of the parallelepiped closest to ``v``, and
    the squared distance. Exact: the minimiser of a convex quadratic over a box has some set of coordinates
    at a bound and the rest at the unconstrained minimum given those; all ``3^n`` such sets are tried and the
    best feasible candidate kept. Vectors whose unconstrained coordinates are already inside the box are their
    own projection; only the others (clipped weights, usually a few percent) go through the active sets."""
    lo, hi = _bounds(qmin, qmax, v)
    n = v.shape[-1]
    x = torch.linalg.solve(basis.mT, v.mT).mT  # [C, L, n]: v = x @ basis
    inside = ((x >= lo) & (x <= hi)).all(-1)
    d = torch.zeros(v.shape[:-1], dtype=v.dtype, device=v.device)
    if bool(inside.all()):
        return x, d
    c_idx, l_idx = (~inside).nonzero(as_tuple=True)
    vo = v[c_idx, l_idx]  # [N, n]
    lo_o = lo.expand(basis.shape[0], 1, 1)[c_idx, 0]  # [N, 1]
    hi_o = hi.expand(basis.shape[0], 1, 1)[c_idx, 0]
    gram = basis @ basis.mT  # [C, n, n]
    h = torch.einsum("nk,nmk->nm", vo, basis[c_idx])  # [N, n]: x @ gram = h at the unconstrained minimum
    lo_f, hi_f = lo_o.expand_as(vo), hi_o.expand_as(vo)
    best_x = torch.minimum(torch.maximum(torch.zeros_like(vo), lo_f), hi_f)
    best_d = torch.full(vo.shape[:1], torch.inf, dtype=v.dtype, device=v.device)
    slack = 1e-9 + 1e-6 * (hi_o - lo_o).abs()
    for combo in itertools.product((0, 1, 2), repeat=n):  # 0: free, 1: at qmin, 2: at qmax
        free = [k for k in range(n) if combo[k] == 0]
        fixed = [k for k in range(n) if combo[k] != 0]
        xc = torch.where(torch.tensor([c == 1 for c in combo], device=v.device), lo_f, hi_f).clone()
        ok = torch.ones(vo.shape[:1], dtype=torch.bool, device=v.device)
        if free:
            g = gram[:, free][:, :, free]
            g_inv = torch.linalg.inv(g)[c_idx]  # [N, |F|, |F|]
            rhs = h[:, free]
            if fixed:
                rhs = rhs - torch.einsum("nf,nfg->ng", xc[:, fixed], gram[:, fixed][:, :, free][c_idx])
            sol = torch.einsum("nf,nfg->ng", rhs, g_inv)
            ok = ((sol >= lo_o - slack) & (sol <= hi_o + slack)).all(-1)
            xc[:, free] = torch.minimum(torch.maximum(sol, lo_o), hi_o)
        dc = (torch.einsum("nk,nkm->nm", xc, basis[c_idx]) - vo).pow(2).sum(-1)
        better = ok & (dc < best_d)
        best_x = torch.where(better[:, None], xc, best_x)
        best_d = torch.where(better, dc, best_d)
    x = x.clone()
    x[c_idx, l_idx] = best_x
    d[c_idx, l_idx] = best_d
    return x, d


def closest_points(v: Tensor, basis: Tensor, qmin: Tensor | float, qmax: Tensor | float,
                   max_offsets: int | None = None, *, kernels: str | None = None) -> Tensor:
    """The exact closest code of every vector: ``argmin over integer z in [qmin, qmax]^n of |z @ basis - v|``.

    :param v: ``[C, L, n]`` vectors.
    :param basis: ``[C, n, n]`` invertible bases, rows are basis vectors.
    :param qmin: lowest coordinate per row (``[C]``) or for all.
    :param qmax: highest coordinate per row or for all.
    :param max_offsets: refuse (``ValueError``) when the exact enumeration would need more candidate offsets per
        vector than this (an ill-conditioned basis); None: no limit.
    :param kernels: ``"reference"`` runs :func:`closest_points_reference` directly; ``"auto"`` goes through the
        torch op ``qcore_latticeq::closest_points`` (whose CUDA implementation ``qcore-cuda`` provides). Default:
        the ``QCORE_KERNELS`` environment variable, else ``"auto"``.
    :returns: the codes, ``[C, L, n]`` in ``v``'s dtype (whole numbers).
    """
    lo, hi = _bounds(qmin, qmax, v)
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    if ops.kernels_mode(kernels) == "reference" or v.requires_grad or basis.requires_grad:
        return closest_points_reference(v, basis, lo, hi, max_offsets)
    return torch.ops.qcore_latticeq.closest_points(v, basis, lo, hi, max_offsets)


@torch.library.custom_op("qcore_latticeq::closest_points", mutates_args=())
def _closest_points_op(v: Tensor, basis: Tensor, qmin: Tensor, qmax: Tensor, max_offsets: int | None) -> Tensor:
    """:func:`closest_points` as a torch op (``qmin``/``qmax``: ``[C]`` or one value); implementation on every
    device: :func:`closest_points_reference`."""
    return closest_points_reference(v, basis, qmin, qmax, max_offsets)


@_closest_points_op.register_fake
def _(v: Tensor, basis: Tensor, qmin: Tensor, qmax: Tensor, max_offsets: int | None) -> Tensor:
    return torch.empty_like(v)


#: ``enumerate_fn(vs, bases, start, stop, z, d, width) -> z``: the best code of each gathered vector among
#: ``z`` (distance ``d``) and the codes ``min(start + offset, max(stop, start))`` for every ``offset`` of
#: ``itertools.product(*map(range, width))`` in that order, a candidate replacing the best only when strictly
#: closer (:func:`enumerate_offsets`; ``qcore-cuda``'s Triton kernel replaces it on CUDA)
EnumerateFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[int]], Tensor]


def enumerate_offsets(vs: Tensor, bases: Tensor, start: Tensor, stop: Tensor, z: Tensor, d: Tensor,
                      width: list[int]) -> Tensor:
    """The enumeration step of :func:`closest_points_reference` (see :data:`EnumerateFn`): ``vs`` ``[N, n]``,
    ``bases`` ``[N, n, n]``, ``start``/``stop``/``z`` ``[N, n]``, ``d`` ``[N]``; returns the best codes."""
    for offset in itertools.product(*(range(w) for w in width)):
        off = torch.tensor(offset, dtype=vs.dtype, device=vs.device)
        zc = torch.minimum(start + off, stop.clamp_min(start))
        dc = (torch.einsum("nk,nkm->nm", zc, bases) - vs).pow(2).sum(-1)
        better = dc < d
        z = torch.where(better[:, None], zc, z)
        d = torch.where(better, dc, d)
    return z


@torch.no_grad()
def closest_points_reference(v: Tensor, basis: Tensor, qmin: Tensor | float, qmax: Tensor | float,
                             max_offsets: int | None = None, enumerate_fn: EnumerateFn = enumerate_offsets
                             ) -> Tensor:
    """:func:`closest_points` computed here (the CPU reference, on any device): Babai's code and the rounded
    projection give a first best code, its distance bounds each coordinate's candidates, and ``enumerate_fn``
    (default :func:`enumerate_offsets`) tries every candidate of the vectors that have more than one."""
    lo, hi = _bounds(qmin, qmax, v)
    z_best = babai_nearest_plane(v, basis, lo, hi)
    d_best = (decode(z_best, basis) - v).pow(2).sum(-1)
    x_p, d_p = project_to_box(v, basis, lo, hi)
    z_round = torch.minimum(torch.maximum(torch.round(x_p), lo), hi)
    d_round = (decode(z_round, basis) - v).pow(2).sum(-1)
    better = d_round < d_best
    z_best = torch.where(better[..., None], z_round, z_best)
    d_best = torch.where(better, d_round, d_best)
    # a better code q satisfies |q - p|^2 <= d_best - d_p: bound each coordinate through basis^-1's columns
    radius = (d_best - d_p).clamp_min(0).add(1e-6 * d_best + 1e-12).sqrt()  # [C, L]
    inv_cols = torch.linalg.inv(basis).pow(2).sum(-2).sqrt()  # [C, n]: norm of column k of basis^-1
    r = radius[..., None] * inv_cols[:, None, :] + 1e-6
    start = torch.maximum(torch.ceil(x_p - r), lo.expand_as(x_p))
    stop = torch.minimum(torch.floor(x_p + r), hi.expand_as(x_p))
    counts = (stop - start + 1).clamp_min(1)
    # vectors whose every coordinate interval holds one integer are done (that integer is the best code's);
    # only the others are enumerated, gathered with their own bases
    c_idx, l_idx = (counts > 1).any(-1).nonzero(as_tuple=True)
    if c_idx.numel() == 0:
        return z_best
    vs, bs = v[c_idx, l_idx], basis[c_idx]  # [N, n], [N, n, n]
    start_s, stop_s = start[c_idx, l_idx], stop[c_idx, l_idx]
    zs, ds = z_best[c_idx, l_idx], d_best[c_idx, l_idx]
    width = [int(w) for w in counts[c_idx, l_idx].amax(0).tolist()]
    total = 1
    for w in width:
        total *= w
    if max_offsets is not None and total > max_offsets:
        raise ValueError(f"exact search needs {total} candidate offsets per vector (limit {max_offsets})")
    zs = enumerate_fn(vs, bs, start_s, stop_s, zs, ds, width)
    z_best = z_best.clone()
    z_best[c_idx, l_idx] = zs
    return z_best


@torch.no_grad()
def brute_force_points(v: Tensor, basis: Tensor, qmin: int, qmax: int) -> Tensor:
    """The closest code by trying every one of the ``(qmax - qmin + 1)^n`` codes (the slow reference)."""
    n = v.shape[-1]
    levels = torch.arange(qmin, qmax + 1, dtype=v.dtype, device=v.device)
    codes = torch.cartesian_prod(*([levels] * n)).reshape(-1, n)  # [K, n]
    points = torch.einsum("kn,cnm->ckm", codes, basis)  # [C, K, n]
    dist = torch.cdist(v, points)  # [C, L, K]
    return codes[dist.argmin(-1)]
