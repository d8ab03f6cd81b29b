"""The CUDA path of every method, end to end on the tiny task (skipped without a CUDA device; CI has none).
Runs on the lent GPU machine: ``python -m pytest tests/test_cuda.py``."""

import pytest
import torch

from qcore.testing import make_host, run_tiny
from qcore_aciq import plugin as aciq
from qcore_rdoq import plugin as rdoq

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def host():
    return make_host(("rdoq", rdoq), ("aciq", aciq))


@pytest.mark.parametrize(("method", "options"), [
    ("uniform", {}),
    ("uniform", {"act_correction": "static"}),
    ("aciq", {}),
    ("aciq", {"stats": "dynamic"}),
    ("rdoq", {"engine": "fast", "cache": "off"}),
    ("rdoq", {"engine": "reference", "cache": "off"}),
    ("rdoq", {"engine": "second-order", "cache": "off"}),
    ("rdoq", {"budget": "separate", "cache": "off"}),
])
def test_method_runs_on_cuda_like_on_cpu(host, method, options, caplog):
    opts = {"first_last": "same", **options}
    gpu = run_tiny(host, method=method, device="cuda", options=opts)
    cpu = run_tiny(host, method=method, device="cpu", options=opts)
    assert "unavailable" not in caplog.text  # no engine fell back because of a device mismatch
    assert abs(gpu.result["quant"] - cpu.result["quant"]) <= 2.0
    assert gpu.result["w_bits_avg"] == pytest.approx(cpu.result["w_bits_avg"], abs=0.05)
