"""On CPU, installing qcore-cuda changes nothing: ``qcore run`` gives the same plan and the same outputs with
the plugin loaded and without it (issue 17's acceptance point).

The side without the plugin runs in its own process (a torch op's kernel registration cannot be undone in a
process; this one has loaded qcore-cuda): the tiny pipeline with RDOQ's mixed-precision allocation (weights
and activations quantized, so every fake-quant op and the RD curves run), with ``QCORE_LOAD_PLUGINS=rdoq,cuda``
here and ``QCORE_LOAD_PLUGINS=rdoq`` there. The plan's layers (bits, groups, ranges' layout) and its
allocation metadata are compared, less the seconds it took.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import hashlib, json, torch
from qcore.testing import make_host, run_tiny
host = make_host(entrypoints=True)
out = run_tiny(host, method="rdoq", target_bits=3.0, a_bits=8, options={"cache": "off", "first_last": "same"})
x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    y = out.model(x)
plan = json.loads(out.plan.to_json())
plan["meta"] = {k: v for k, v in plan["meta"].items() if "seconds" not in k}
op = torch.ops.qcore.fake_quantize_channels.default
print(json.dumps({"plugins": sorted(n for n, r in host.plugins.items() if not r.error),
                  "cuda_kernel": op.has_kernel_for_dispatch_key("CUDA"), "plan": plan,
                  "quant": out.result["quant"], "w_bits_avg": out.result["w_bits_avg"],
                  "outputs": hashlib.sha256(y.numpy().tobytes()).hexdigest()}))
"""


def _run_here(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict:
    import qcore_cuda.plugin  # noqa: F401 - loaded in this process (as qcore would load it)

    monkeypatch.setenv("QCORE_LOAD_PLUGINS", "rdoq,cuda")
    monkeypatch.delenv("QCORE_DISABLE_PLUGINS", raising=False)
    capsys.readouterr()
    exec(compile(SCRIPT, "<with qcore-cuda>", "exec"), {})  # noqa: S102 - the same script as the other side
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _run_without() -> dict:
    env = {**os.environ, "QCORE_LOAD_PLUGINS": "rdoq", "QCORE_PROGRESS": "0", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("QCORE_DISABLE_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="a CPU-only check (no CUDA device here)")
def test_plan_and_outputs_are_the_same_with_and_without_qcore_cuda(monkeypatch, capsys):
    with_cuda, without = _run_here(monkeypatch, capsys), _run_without()
    assert "cuda" in with_cuda["plugins"] and "cuda" not in without["plugins"]
    assert with_cuda["cuda_kernel"] and not without["cuda_kernel"]  # the plugin really was (not) loaded
    for key in ("plan", "quant", "w_bits_avg", "outputs"):
        assert with_cuda[key] == without[key], key
