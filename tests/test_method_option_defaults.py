"""A method's option defaults belong to its own components: a component swapped in on the command line that does
not declare one of them runs without it, while the same key typed by the user is still refused."""

from __future__ import annotations

from typing import Any

import pytest

import qcore
from qcore.testing import make_host, run_tiny


class _Plugin:
    """A method on the example plugin's calibrator whose defaults set that calibrator's own option."""

    @qcore.hookimpl
    def qcore_register_methods(self, register: Any) -> None:
        register(qcore.Method(name="tuned", quantizer="uniform", calibrator="example-percentile", allocator="fixed",
                              defaults={"w_bits": 4, "a_bits": 8, "weight_percentile": 99.0}, default=True,
                              description="test method with a calibrator option among its defaults"))


@pytest.fixture(scope="module")
def host():
    from qcore_example import plugin

    return make_host(("example", plugin), ("tuned", _Plugin()))


def test_own_components_get_the_method_option_default(host):
    assert run_tiny(host, plugin="tuned").result["options"]["weight_percentile"] == 99.0


def test_a_swapped_in_component_without_that_option_runs_without_it(host):
    result = run_tiny(host, plugin="tuned", calibrator="minmax").result  # minmax has no weight_percentile
    assert result["components"]["calibrator"] == "minmax" and "weight_percentile" not in result["options"]


def test_the_same_key_typed_by_the_user_is_still_refused(host):
    with pytest.raises(qcore.QcoreError, match="unknown option weight_percentile"):
        run_tiny(host, plugin="tuned", calibrator="minmax", options={"weight_percentile": 99.5})
