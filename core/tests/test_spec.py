import pytest

from qcore._errors import QcoreError
from qcore._spec import LayerSpec, Plan, QuantSpec


def test_plan_json_round_trip():
    plan = Plan(layers={
        "conv": LayerSpec(QuantSpec(4, granularity="channel"), QuantSpec(8, symmetric=False)),
        "fc": LayerSpec(QuantSpec(3, granularity="group", group_size=2, group_bits=(2, 4, 0)), None),
    }, meta={"allocator": "test"})
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.layers["fc"].weight.group_bits == (2, 4, 0)


@pytest.mark.parametrize("bits", [-1, 17, 33])
def test_bits_out_of_range(bits):
    with pytest.raises(QcoreError, match="out of range"):
        QuantSpec(bits)


def test_spec_consistency_checks():
    with pytest.raises(QcoreError, match="group_size"):
        QuantSpec(4, granularity="group")
    with pytest.raises(QcoreError, match="per-channel"):
        QuantSpec(4, granularity="tensor", group_size=2, group_bits=(4, 4))
    with pytest.raises(QcoreError, match="out of range"):
        QuantSpec(4, granularity="channel", group_size=1, group_bits=(4, 20))


def test_plan_version_and_garbage():
    with pytest.raises(QcoreError, match="version"):
        Plan.from_json('{"version": 99, "layers": {}}')
    with pytest.raises(QcoreError, match="not valid JSON"):
        Plan.from_json("{nope")
    with pytest.raises(QcoreError, match="unknown QuantSpec field"):
        Plan.from_json('{"version": 1, "layers": {"a": {"weight": {"bits": 4, "colour": 1}, "act": null}}}')


@pytest.mark.parametrize("text", [
    '{"version": 1, "layers": []}',
    '{"version": 1, "layers": {"fc": null}}',
    '{"version": 1, "layers": {"fc": {"weight": 8, "act": null}}}',
    '{"version": 1, "layers": {"fc": {"weight": {"bits": 4, "group_size": "4"}, "act": null}}}',
    '{"version": 1, "layers": {}, "meta": [1]}',
])
def test_malformed_plans_are_clear_errors(text):
    with pytest.raises(QcoreError):
        Plan.from_json(text)


def test_numpy_metadata_serialises():
    import numpy as np

    plan = Plan(layers={}, meta={"n": np.int64(3), "a": np.arange(2)})
    assert '"n": 3' in plan.to_json()
