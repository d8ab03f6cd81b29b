"""Every bad input ends as one line ``qcore: error: ...``, exit status 2, no traceback and nothing in ``--out``;
inputs that used to be accepted silently are refused (or, where a run can go on, warned about and recorded as
they were used).

Each input is checked where it is read, so most of these fail before the model is evaluated."""

from __future__ import annotations

import json
import pickle
import re
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + \
        array.astype(np.uint8).tobytes()


def setup(tmp: Path) -> None:
    """The files the rows below refer to."""
    (tmp / "empty.pt").write_bytes(b"")
    spec = {"bits": 4, "symmetric": True, "granularity": "channel", "group_size": None, "group_bits": None,
            "axis": 7, "quantizer": "uniform", "group_params": None}
    (tmp / "axis7.json").write_text(json.dumps({"version": 1, "meta": {}, "layers": {"fc": {"weight": spec,
                                                                                             "act": None}}}))
    (tmp / "afile").write_text("a file, not a folder")


#: (id, arguments after `qcore run`, a fragment of the one error line, the --out that must stay unwritten).
#: The whole table (~150 rows, these included) is tests/test_bad_input_table.py, run in-process; these few run
#: as real processes, so that what a user's terminal shows (logging, warnings, exit status) is checked too.
BAD = [
    ("0-byte weights", ["--weights", "empty.pt"], "cannot read weights file empty.pt (the file is empty)", "o"),
    ("plan axis 7", ["--plan", "axis7.json", "--eval-size", "8", "--calib-size", "8"],
     "the plan gives layer 'fc' weight axis 7", "o"),
    ("cache path is a file", ["--method", "rdoq", "--target-bits", "4", "-o", "cache=afile"],
     "-o cache=afile cannot hold the RD curve cache: afile is a file", "o"),
]


def _one_error_line(p, message: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("qcore: error: ")]
    assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0], p.stderr
    assert message in errors[0], errors[0]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, qcore_runner) -> dict[str, tuple[Path, list[Path], subprocess.CompletedProcess[str]]]:
    """Every row of BAD run by the real command, each in its own folder, all at once (most of each run is
    importing torch): id -> (folder, its files before the run, the finished process)."""
    def one(row: tuple[str, list[str], str, str]) -> tuple[Path, list[Path], subprocess.CompletedProcess[str]]:
        name, args, _, out = row
        tmp = tmp_path_factory.mktemp("bad")
        setup(tmp)
        before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
        return tmp, before, qcore_runner("run", *args, "--out", out, cwd=tmp,
                                         env={"QCORE_CACHE_DIR": str(tmp / "cache")})

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip([row[0] for row in BAD], pool.map(one, BAD), strict=True))


@pytest.mark.parametrize("name,message", [(b[0], b[2]) for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad_runs, name, message):
    tmp, before, p = bad_runs[name]
    _one_error_line(p, message)
    assert sorted(p.relative_to(tmp) for p in tmp.rglob("*")) == before  # no --out, no cache, nothing


def test_plugin_calling_sys_exit_is_broken_not_fatal(qcore_cli, exiting_plugin_site):
    p = qcore_cli("list", "methods", site=exiting_plugin_site)
    assert p.returncode == 0, p.stderr
    assert "uniform" in {r["name"] for r in json.loads(p.stdout)}
    rows = {r["name"]: r for r in json.loads(qcore_cli("plugins", site=exiting_plugin_site).stdout)}
    assert rows["exiting"]["error"] == "called sys.exit(3) while loading"
    p = qcore_cli("run", "--plugin", "exiting", "--out", "o", site=exiting_plugin_site)
    _one_error_line(p, "plugin 'exiting' is broken")


def test_calib_size_above_the_data_is_warned_and_recorded_as_used(qcore_cli, tmp_path):
    """The embedded calibration pool has 2,048 images: result.json says 2048, not what was asked."""
    p = qcore_cli("run", "--calib-size", "100000", "--eval-size", "16", "--w-bits", "8", "--out", "o")
    assert p.returncode == 0, p.stderr
    assert "--calib-size 100000 asked for, but the task's calibration data has 2048 samples" in p.stderr
    assert json.loads((tmp_path / "o" / "result.json").read_text())["calib_size"] == 2048


def test_default_run_prints_no_python_warning(qcore_cli, tmp_path):
    """A normal run's stderr holds no Python warning (torch's expected notes are silenced where they arise;
    Python's default filters, as a user has them)."""
    p = qcore_cli("run", "--calib-size", "32", "--eval-size", "100", "--out", "o", env={"PYTHONWARNINGS": ""})
    assert p.returncode == 0, p.stderr
    assert not re.search(r"\w+Warning\b", p.stderr), p.stderr


def test_run_on_idx_files_raises_no_warning(qcore_in_process, tmp_path, monkeypatch):
    """Fashion-MNIST IDX files (the read-only bytes torch warned about) and a raw-pickle checkpoint refused
    without torch's note on its pickle protocol."""
    rng = np.random.default_rng(0)
    for images, labels in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                           ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
        (tmp_path / images).write_bytes(_idx(rng.integers(0, 256, (16, 28, 28))))
        (tmp_path / labels).write_bytes(_idx(rng.integers(0, 10, 16)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QCORE_PROGRESS", "0")
    rc, out, err, caught = qcore_in_process("run", "--data", ".", "--calib-size", "16", "--w-bits", "8", "--out", "o")
    assert rc == 0, err
    assert not caught, caught
    assert "top1 *" in out
    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"fc.weight": [[0.0]]}))
    rc, _, err, caught = qcore_in_process("run", "--weights", "raw.pt", "--out", "p")
    assert rc == 2 and "cannot read weights file raw.pt" in err and not caught, (err, caught)
