"""Every installed component passes its role's contract check (``qcore.testing``), by name.

The host is what ``qcore`` itself loads: built-ins plus every installed plugin's entry point, so a component a
plugin adds is checked here without anyone writing a test for it. A component that needs other settings than
the checks' defaults declares them in the tables below, with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qcore.testing import (
    check_allocator,
    check_calibrator,
    check_correction,
    check_quantizer,
    make_host,
    run_tiny,
)

HOST = make_host(entrypoints=True)  # raises if an installed plugin is broken


def registered(kind: str) -> list[str]:
    return sorted(name for record in HOST.plugins.values() for name in record.provides[kind])


#: quantizer -> (check_quantizer keywords, reason)
QUANTIZERS: dict[str, tuple[dict[str, Any], str]] = {
    "midtread": ({"calibrator": "aciq"},
                 "set by ACIQ bin allocation only: uses_range is False and its fit() refuses, so range calibrators "
                 "cannot set it (its grid is uniform per channel and meets the uniform floors)"),
    "deadzone": ({"grid": "nonuniform",
                  "weight_spec": {"granularity": "group", "group_size": 4, "group_params": (0.25,) * 32}},
                 "the dead-zone grid exists only on per-group weights with a ratio per group (what rdoq-deadzone "
                 "plans; other specs get the plain uniform grid); with 25 % of each group in the dead zone its SQNR "
                 "saturates near 21 dB from 6 bits on"),
}

#: calibrator -> (check_calibrator keywords, reason)
CALIBRATORS: dict[str, tuple[dict[str, Any], str]] = {
    "nstd": ({"min_agreement": 80.0},
             "the ACIQ paper's baseline clips at mean +- 2 std whatever the bit-width, which costs accuracy at 8 bits: "
             "85.9 % W8A8 agreement measured"),
    "kl": ({"min_agreement": 80.0},
           "the KL threshold (TensorRT) is searched on the tiny task's 64 calibration inputs and clips hard at any "
           "bit-width: 88.3 % W8A8 agreement measured"),
    **{name: ({"iters": 20, "cache": "off"},
              "block reconstruction: 20 steps per unit instead of the default (sized for a real model) keeps the check "
              "fast (what is learned still goes through the quantizer's protocol); no resume cache on disk")
       for name in ("adaround", "brecq", "qdrop")},
    "ptmq": ({"iters": 10, "cache": "off"},
             "multi-bit block reconstruction: 10 steps per unit (each at three bit-widths) keeps the check fast; "
             "with a quantizer that holds one bit-width it reconstructs that bit-width (what it learns goes through "
             "the protocol); no resume cache on disk"),
}

#: allocator -> (check_allocator keywords, reason); "plan" also gets a plan file (see test_allocator)
ALLOCATORS: dict[str, tuple[dict[str, Any], str]] = {
    "fixed": ({"target_bits": None, "w_bits": 4}, "fixed bits (--w-bits) for every layer; no average budget"),
    "example-all8": ({"target_bits": None, "w_bits": 8}, "W8A8 whatever the budget says"),
    "plan": ({"target_bits": None, "w_bits": 4}, "re-applies a saved plan.json: here one written by 'fixed' at W4A8"),
    "rdoq": ({"group": 4, "curve_samples": 16, "cache": "off"},
             "RD curves on 16 samples and groups of 4 channels: fast on the tiny task; no curve cache on disk"),
    "aciq-channel": ({"target_bits": 3.0, "alloc_acts": False},
                     "per-channel activation bits need per-channel activation scales, so weights only (its budget "
                     "convention, free_layers, is declared on the class and checked by the pipeline)"),
}


def settings(table: dict[str, tuple[dict[str, Any], str]], name: str) -> dict[str, Any]:
    return dict(table[name][0]) if name in table else {}


def test_tables_name_only_registered_components():
    for kind, table in (("quantizer", QUANTIZERS), ("calibrator", CALIBRATORS), ("allocator", ALLOCATORS)):
        stale = set(table) - set(registered(kind))
        assert not stale, f"{kind} settings for components nobody registers: {sorted(stale)}"
        assert all(reason for _, reason in table.values()), f"every {kind} exception needs a reason"


def test_the_example_plugin_is_installed_for_real():
    record = HOST.plugins["example"]
    assert record.source == "entry point of qcore-example" and record.error is None


@pytest.mark.parametrize("name", registered("quantizer"))
def test_quantizer(name):
    check_quantizer(HOST, name, **settings(QUANTIZERS, name))


@pytest.mark.parametrize("quantizer", ["uniform", "example-pow2"])
@pytest.mark.parametrize("name", registered("calibrator"))
def test_calibrator(name, quantizer):
    """Every calibrator sets core's grid and a third-party one (power-of-two scales) through the protocol."""
    check_calibrator(HOST, name, quantizer=quantizer, **settings(CALIBRATORS, name))


@pytest.mark.parametrize("name", registered("allocator"))
def test_allocator(name, tmp_path: Path):
    kw = settings(ALLOCATORS, name)
    if name == "plan":
        saved = run_tiny(HOST, allocator="fixed", w_bits=4, a_bits=8, options={"first_last": "same"})
        path = tmp_path / "plan.json"
        path.write_text(saved.plan.to_json())
        kw["plan"] = str(path)
    check_allocator(HOST, name, **kw)


@pytest.mark.parametrize("name", registered("correction"))
def test_correction(name):
    check_correction(HOST, name)
