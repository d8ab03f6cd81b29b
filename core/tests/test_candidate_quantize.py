"""``qcore.ops.candidate_quantize``: the public reference of the RD-curve candidates (kernel 2's contract)."""

import pytest
import torch

from qcore import QcoreError, QuantSpec, UniformFakeQuant
from qcore.ops import candidate_quantize, quantize_rows
from qcore.ranges import mse_range
from qcore.testing import same_bits


@pytest.mark.parametrize("symmetric", [True, False])
def test_each_candidate_is_the_range_estimator_and_the_deployed_quantizer(symmetric):
    w = torch.randn(10, 7, generator=torch.Generator().manual_seed(0))
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="group", group_size=4, group_bits=(4, 4, 4))
    fq = UniformFakeQuant(spec, 10, 0)
    rows = fq.rows_of(w)
    bits = torch.tensor([0.0, 2.0, 5.0])
    lo, hi, q = candidate_quantize(rows, bits, symmetric)
    via_op = torch.ops.qcore.candidate_quantize(rows, bits, symmetric, 100, 0.05)
    assert all(same_bits(a, b) for a, b in zip((lo, hi, q), via_op, strict=True))
    assert not q[0].any()  # 0 bits: pruned
    for k, b in enumerate(bits.tolist()[1:], start=1):
        want_lo, want_hi = mse_range(rows, torch.full((rows.shape[0],), b), symmetric)
        assert same_bits(lo[k], want_lo) and same_bits(hi[k], want_hi)
        spec_b = QuantSpec(bits=int(b), symmetric=symmetric, granularity="group", group_size=4,
                           group_bits=(int(b),) * 3)
        deployed = UniformFakeQuant(spec_b, 10, 0)
        deployed.set_range(lo[k], hi[k])
        assert same_bits(q[k], deployed.rows_of(deployed(w)))
    assert same_bits(q, quantize_rows(rows, lo, hi, bits, symmetric))


def test_bad_shapes_and_searches_are_one_line_errors():
    with pytest.raises(QcoreError, match="rows"):
        candidate_quantize(torch.zeros(3), torch.tensor([4.0]), True)
    with pytest.raises(QcoreError, match="steps"):
        candidate_quantize(torch.zeros(3, 2), torch.tensor([4.0]), True, steps=0)


def test_op_passes_torch_library_checks():
    rows = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(torch.ops.qcore.candidate_quantize.default, (rows, torch.tensor([0.0, 3.0]), False, 7, 0.2))


def test_the_candidate_search_defaults_are_mse_ranges():
    """ops cannot import qcore.ranges (ranges builds on ops), so the defaults are written twice: keep them equal."""
    import inspect

    from qcore.ops import CANDIDATE_LOWEST, CANDIDATE_STEPS

    params = inspect.signature(mse_range).parameters
    assert (params["steps"].default, params["lowest"].default) == (CANDIDATE_STEPS, CANDIDATE_LOWEST)
