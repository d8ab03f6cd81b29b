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


def test_bad_input_under_torchrun_env_fails_before_the_process_group_and_once_per_job(qcore_in_process, tmp_path,
                                                                                       monkeypatch):
    """torchrun's environment without a rendezvous (no MASTER_ADDR): joining the process group would fail, so
    these inputs (a setting, and data read by the task) are refused before it; rank 0 prints the one error, the
    other ranks exit 2 silently."""
    import torch.distributed as dist

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QCORE_PROGRESS", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for args, message in ((["--w-bits", "33"], "--w-bits 33 is out of range"),
                          (["--data", "nosuch"], "data folder nosuch does not exist")):
        for rank in ("0", "1"):
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setenv("LOCAL_RANK", rank)
            rc, _, err, _ = qcore_in_process("run", *args, "--out", "o")
            assert rc == 2 and not dist.is_initialized()
            if rank == "0":
                assert err.startswith("qcore: error: ") and err.count("\n") == 1 and message in err, err
            else:
                assert "qcore: error" not in err, err
    assert not (tmp_path / "o").exists()


def test_bad_input_under_torchrun_is_one_error(tmp_path):
    env = dict(os.environ, QCORE_PROGRESS="0", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "qcore", "run", "--data", "nosuch", "--out", "o"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    output = p.stdout + p.stderr
    assert p.returncode != 0
    assert output.count("qcore: error: data folder nosuch does not exist") == 1, output[-3000:]
    assert "exitcode: 2" in output or "exitcode  : 2" in output, output[-3000:]  # torchrun's summary of the workers
    assert not (tmp_path / "o").exists()
