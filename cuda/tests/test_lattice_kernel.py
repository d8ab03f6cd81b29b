"""Kernel 4 (LatticeQ's closest-vector enumeration, n <= 3) against qcore-latticeq's reference.

The op ``qcore_latticeq::closest_points`` on CUDA is the reference with its enumeration step done by the
Triton kernel; here the kernel's step and the whole search are compared with the reference on random skewed
float32 bases, odd vector counts, per-row bit-widths, and vectors far outside the code (clipping at the box):
codes equal, hence decoded points equal. Without a GPU it runs under Triton's interpreter (``conftest.py``).
"""

from __future__ import annotations

import pytest
import torch
from qcore_latticeq.cvp import brute_force_points, closest_points, closest_points_reference, decode

import qcore_cuda.plugin as plugin
from qcore.ops import int_range
from qcore_cuda import lattice as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int, n: int, rows: int, count: int, spread: float):
    gen = torch.Generator().manual_seed(seed)
    while True:  # skewed bases (identity plus a large random part), away from singular
        basis = torch.eye(n) + 0.6 * torch.randn(rows, n, n, generator=gen)
        if (torch.linalg.det(basis).abs() > 0.2).all():
            break
    bits = torch.randint(1, 5, (rows,), generator=gen).float()
    qmin, qmax = int_range(bits, symmetric=True)
    v = torch.randn(rows, count, n, generator=gen) * (2.0 ** (bits - 1))[:, None, None] * spread
    return v, basis, qmin, qmax


CASES = [(1, 1, 3, 37, 1.5), (2, 2, 5, 101, 1.5), (3, 3, 4, 63, 1.5), (4, 3, 3, 51, 6.0), (5, 2, 2, 9, 20.0),
         (6, 3, 7, 33, 0.7)]


def test_kernel_runs_where_the_tests_think():
    assert kernels.interpreted() == (DEVICE == "cpu")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[1]}-rows{c[2]}-L{c[3]}-spread{c[4]}")
def test_codes_and_points_equal_the_reference(case):
    v, basis, qmin, qmax = _case(*case)
    want = closest_points_reference(v, basis, qmin, qmax)
    on = [t.to(DEVICE) for t in (v, basis, qmin, qmax)]
    got = closest_points_reference(*on, enumerate_fn=kernels.enumerate_offsets).cpu()
    assert torch.equal(got, want)
    assert torch.equal(decode(got, basis), decode(want, basis))
    assert (got >= qmin[:, None, None]).all() and (got <= qmax[:, None, None]).all()  # clipped to the box
    if case[1] <= 2:  # and both are the exact closest code (brute force; ties aside, by distance)
        lo, hi = int(qmin.min()), int(qmax.max())
        if (qmin == lo).all() and (qmax == hi).all():
            ref = brute_force_points(v, basis, lo, hi)
            torch.testing.assert_close((decode(got, basis) - v).norm(dim=-1), (decode(ref, basis) - v).norm(dim=-1))


def test_the_enumeration_step_alone_matches_on_odd_widths():
    from qcore_latticeq.cvp import enumerate_offsets

    gen = torch.Generator().manual_seed(11)
    n, count = 3, 45
    vs = torch.randn(count, n, generator=gen) * 3
    bases = torch.eye(n) + 0.5 * torch.randn(count, n, n, generator=gen)
    start = torch.randint(-4, 1, (count, n), generator=gen).float()
    stop = start + torch.randint(-1, 3, (count, n), generator=gen).float()  # some empty: clamped to start
    z = start.clone()
    d = (torch.einsum("nk,nkm->nm", z, bases) - vs).pow(2).sum(-1)
    width = [3, 2, 4]
    want = enumerate_offsets(vs, bases, start, stop, z, d, width)
    assert (want != z).any(-1).sum() > count // 2  # the step matters: most vectors find a closer code
    got = kernels.enumerate_offsets(*(t.to(DEVICE) for t in (vs, bases, start, stop, z, d)), width).cpu()
    assert torch.equal(got, want)


def test_the_plugin_registers_the_kernel_for_cuda_only():
    op = torch.ops.qcore_latticeq.closest_points.default
    assert op.has_kernel_for_dispatch_key("CUDA") and "qcore_latticeq::closest_points" in plugin.LATTICE_OPS
    v, basis, qmin, qmax = _case(7, 2, 3, 20, 2.0)
    assert torch.equal(closest_points(v, basis, qmin, qmax), closest_points(v, basis, qmin, qmax,
                                                                            kernels="reference"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_op_on_cuda_runs_the_kernel():
    v, basis, qmin, qmax = _case(8, 3, 16, 513, 2.0)
    got = closest_points(*(t.cuda() for t in (v, basis, qmin, qmax))).cpu()
    assert torch.equal(got, closest_points_reference(v, basis, qmin, qmax))
