"""The RD curve cache cannot poison a run: damaged, inconsistent or half-written entries are measured again with a
warning naming the file, concurrent runs share the work, and files get the usual permissions."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from qcore import QcoreError
from qcore.testing import make_host, run_tiny
from qcore_rdoq import plugin
from qcore_rdoq.cache import SUFFIX, CurveCache, decode_entry, encode_entry

OPTS = {"group": 4, "curve_samples": 32, "first_last": "same"}
FREE = ["0", "3", "7"]  # the tiny convnet's layers


@pytest.fixture(scope="module")
def host():
    return make_host(("rdoq", plugin))


@pytest.fixture(scope="module")
def clean(host):
    """The plan of a run without a cache."""
    return run_tiny(host, method="rdoq", target_bits=3.0, options={**OPTS, "cache": "off"}).plan


def _run(host, cache: Path):
    return run_tiny(host, method="rdoq", target_bits=3.0, options={**OPTS, "cache": str(cache)})


def _entries(cache: Path) -> dict[str, Path]:
    return {p.name.removesuffix(SUFFIX): p for p in cache.glob(f"*/*{SUFFIX}") if not p.name.startswith(".")}


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    values = decode_entry(raw, _shape(raw))
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) - 5])
    elif how == "checksum":  # other values under the original header
        header = raw[: len(raw) - values.nbytes]
        path.write_bytes(header + (values * 0.5).tobytes())
    elif how == "nan":  # a well-formed entry (checksum and all) of NaN values
        path.write_bytes(encode_entry(np.full_like(values, np.nan)))
    elif how == "shape":
        path.write_bytes(encode_entry(values[:, :-1]))
    elif how == "garbage":
        path.write_bytes(os.urandom(200))


def _shape(raw: bytes) -> tuple[int, ...]:
    return tuple(json.loads(raw.split(b"\n")[1])["shape"])


@pytest.mark.parametrize("how", ["empty", "truncated", "checksum", "nan", "shape", "garbage"])
def test_damaged_entry_is_measured_again_with_a_warning(host, clean, tmp_path, caplog, how):
    first = _run(host, tmp_path / "c")
    assert first.plan.layers == clean.layers and first.plan.meta["cached_layers"] == []
    entry = _entries(tmp_path / "c")["3"]
    _damage(entry, how)
    with caplog.at_level(logging.WARNING, logger="qcore_rdoq"):
        again = _run(host, tmp_path / "c")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(entry) in warnings[0] and "measuring layer 3 again" in warnings[0]
    assert again.plan.meta["cached_layers"] == ["0", "7"]  # layer 3 was measured, not read
    assert again.plan.layers == clean.layers
    caplog.clear()
    third = _run(host, tmp_path / "c")  # the entry was rewritten, whole
    assert third.plan.meta["cached_layers"] == FREE and not caplog.records


def test_half_written_entry_of_a_killed_run_is_never_read(host, clean, tmp_path):
    """``kill -9`` during a write leaves the temporary file of :meth:`CurveCache.save`, never a final entry."""
    _run(host, tmp_path / "c")
    entry = _entries(tmp_path / "c")["7"]
    raw = entry.read_bytes()
    entry.unlink()
    (entry.parent / f".tmp-x1y2z3{SUFFIX}").write_bytes(raw[: len(raw) // 2])
    again = _run(host, tmp_path / "c")
    assert again.plan.meta["cached_layers"] == ["0", "3"] and again.plan.layers == clean.layers


def test_interrupted_write_leaves_no_entry_and_no_temporary_file(tmp_path, monkeypatch):
    cache = CurveCache(tmp_path, "k" * 32)

    def killed(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.save("fc", np.ones((2, 3)))
    assert list(cache.dir.iterdir()) == []


def test_non_finite_curves_are_refused_at_write(tmp_path, caplog):
    cache = CurveCache(tmp_path, "k" * 32)
    with caplog.at_level(logging.WARNING, logger="qcore_rdoq"):
        cache.save("fc", np.array([[1.0, np.inf], [np.nan, 0.0]]))
    assert "not caching the RD curves of layer fc" in caplog.text
    assert cache.load("fc", (2, 2)) is None and cache.writes == 0
    cache.save("fc", np.array([[1.0, 2.0], [3.0, 0.0]]))
    assert cache.load("fc", (2, 2)).tolist() == [[1.0, 2.0], [3.0, 0.0]]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_entries_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        cache = CurveCache(tmp_path, "k" * 32)
        cache.save("fc", np.ones((2, 3)))
    finally:
        os.umask(old)
    assert (cache.dir / f"fc{SUFFIX}").stat().st_mode & 0o777 == 0o666 & ~umask


def test_cache_path_that_cannot_be_a_folder_is_refused_before_any_work(host, tmp_path):
    (tmp_path / "afile").write_text("x")
    for bad in ("afile", "afile/sub"):
        with pytest.raises(QcoreError, match=f"-o cache={tmp_path / bad} cannot hold the RD curve cache: .* is a "
                                             "file"):
            run_tiny(host, method="rdoq", target_bits=3.0, options={**OPTS, "cache": str(tmp_path / bad)})


_WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from qcore.testing import make_host, run_tiny
    from qcore_rdoq import plugin

    host = make_host(("rdoq", plugin))
    go = Path(sys.argv[2])
    go.with_name(go.name + "." + sys.argv[3]).touch()  # ready
    while not go.exists():  # start both runs together
        time.sleep(0.01)
    out = run_tiny(host, method="rdoq", target_bits=3.0,
                   options={"group": 4, "curve_samples": 32, "first_last": "same", "cache": sys.argv[1]})
    print(json.dumps({"plan": json.loads(out.plan.to_json())["layers"], "cached": out.plan.meta["cached_layers"]}))
""")


def test_concurrent_runs_share_the_work_and_agree(clean, tmp_path):
    """Two processes on one cache: each layer is measured by one of them and read by the other."""
    go = tmp_path / "go"
    env = dict(os.environ, OMP_NUM_THREADS="1", QCORE_PROGRESS="0")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "c"), str(go), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        while not all(go.with_name(f"go.{i}").exists() for i in range(2)) and all(p.poll() is None for p in procs):
            time.sleep(0.01)  # both workers have built their hosts: start them together
        go.touch()
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    a, b = (json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert a["plan"] == b["plan"] == json.loads(clean.to_json())["layers"]
    measured_a = set(FREE) - set(a["cached"])
    measured_b = set(FREE) - set(b["cached"])
    assert not measured_a & measured_b  # no layer measured twice
    assert measured_a | measured_b == set(FREE)


def test_unwritable_cache_folder_is_refused_even_for_root(host):
    """``os.access`` says yes to root: the check writes an anonymous file to be sure (/proc takes none)."""
    with pytest.raises(QcoreError, match="-o cache=/proc/qcore-cache cannot hold the RD curve cache: cannot write in "
                                         "/proc"):
        run_tiny(host, method="rdoq", target_bits=3.0, options={**OPTS, "cache": "/proc/qcore-cache"})


def test_cache_lost_mid_run_costs_warnings_not_the_run(tmp_path, caplog):
    (tmp_path / "gone").write_text("the cache folder was replaced by a file")
    cache = CurveCache(tmp_path / "gone", "k" * 32)
    with caplog.at_level(logging.WARNING, logger="qcore_rdoq"), cache.locked("fc"):
        assert cache.load("fc", (2, 3)) is None
        cache.save("fc", np.ones((2, 3)))
    assert "cannot lock RD curve cache entry" in caplog.text and "could not write RD curve cache entry" in caplog.text
    assert cache.writes == 0
