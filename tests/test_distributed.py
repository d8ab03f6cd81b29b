"""``torchrun --nproc_per_node=2 -m qcore run`` (gloo on CPU) gives the one-process plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ARGS = ["run", "--plugin", "rdoq", "--calib-size", "64", "--eval-size", "200", "-o", "curve_samples=16",
        "-o", "group=16", "-o", "cache=off"]


def test_two_process_gloo_run_gives_the_one_process_plan(tmp_path):
    env = dict(os.environ, QCORE_PROGRESS="0", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "qcore", *ARGS, "--out", "one"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "qcore", *ARGS, "--out", "two"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    p1, p2 = (json.loads((tmp_path / d / "plan.json").read_text()) for d in ("one", "two"))
    assert p1["layers"] == p2["layers"]
    r1, r2 = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert r2["processes"] == 2 and r1["processes"] == 1
    assert r1["quant"] == r2["quant"]
    assert two.stdout.count("top1 *") == 1  # only rank 0 prints
