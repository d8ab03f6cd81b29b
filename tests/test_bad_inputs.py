"""Every bad input ends as one line ``qcore: error: ...``, exit status 2, no traceback and nothing in ``--out``;
inputs that used to be accepted silently are refused (or, where a run can go on, warned about and recorded as
they were used).

Each input is checked where it is read, so most of these fail before the model is evaluated."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + \
        array.astype(np.uint8).tobytes()


def _idx_folder(root: Path, images: Callable[[np.random.Generator], np.ndarray],
                labels: Callable[[np.random.Generator], np.ndarray]) -> None:
    root.mkdir()
    rng = np.random.default_rng(0)
    for img, lbl in IDX_NAMES.values():
        (root / img).write_bytes(_idx(images(rng)))
        (root / lbl).write_bytes(_idx(labels(rng)))


def _random_idx(root: Path, gz: bool) -> None:
    root.mkdir()
    for pair in IDX_NAMES.values():
        for name in pair:
            (root / (name + (".gz" if gz else ""))).write_bytes(os.urandom(1000))


def _image_folders(root: Path, per_class: dict[str, bytes | None]) -> None:
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for cls, content in per_class.items():
            (root / split / cls).mkdir()
            if content is not None:
                (root / split / cls / "x.png").write_bytes(content)


def _plan(path: Path, **weight: object) -> None:
    spec = {"bits": 4, "symmetric": True, "granularity": "channel", "group_size": None, "group_bits": None,
            "axis": None, "quantizer": "uniform", "group_params": None, **weight}
    path.write_text(json.dumps({"version": 1, "meta": {}, "layers": {"fc": {"weight": spec, "act": None}}}))


def setup(tmp: Path) -> None:
    """Every file the table below refers to (cheap: a few KiB)."""
    _image_folders(tmp / "noclass", {})
    _image_folders(tmp / "emptyclass", {"a": None, "b": b"\x89PNG not really"})
    _image_folders(tmp / "corrupt", {"a": b"garbage, not an image"})
    _random_idx(tmp / "idxrand", gz=False)
    _random_idx(tmp / "idxrandgz", gz=True)
    _idx_folder(tmp / "idx784", lambda r: r.integers(0, 256, (8, 784)), lambda r: r.integers(0, 10, 8))
    _idx_folder(tmp / "idxlabels", lambda r: r.integers(0, 256, (8, 28, 28)), lambda r: np.arange(32, 40))
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    _plan(tmp / "axis7.json", axis=7)
    _plan(tmp / "neggroup.json", granularity="group", group_size=-4)
    _plan(tmp / "symno.json", symmetric="no")
    (tmp / "nolayers.json").write_text(json.dumps({"version": 1, "meta": {"method": "uniform"}, "layers": {}}))
    (tmp / "afile").write_text("a file, not a folder")


LONG = "o" * 300
#: (id, arguments after `qcore run`, a fragment of the one error line, the --out that must stay unwritten)
BAD = [
    ("huge seed", ["--seed", "1180591620717411303424"], "--seed 1180591620717411303424 is out of range", "o"),
    ("image folder without class folders", ["--data", "noclass"], "noclass/train has no class folders", "o"),
    ("image folder with an empty class", ["--data", "emptyclass"], "no image for the classes a", "o"),
    ("corrupt image", ["--data", "corrupt", "--calib-size", "1"], "cannot read image corrupt/train/a/x.png", "o"),
    ("IDX of random bytes", ["--data", "idxrand"], "is not an unsigned-byte IDX file", "o"),
    ("IDX.gz of random bytes", ["--data", "idxrandgz"], "(BadGzipFile", "o"),
    ("IDX images [N, 784]", ["--data", "idx784"], "holds an array of shape [8, 784]", "o"),
    ("IDX labels outside the classes", ["--data", "idxlabels"],
     "has labels up to 39, but Fashion-MNIST has 10 classes", "o"),
    ("0-byte weights", ["--weights", "empty.pt"], "cannot read weights file empty.pt (the file is empty)", "o"),
    ("binary config", ["--config", "binary.yaml"], "cannot read config file binary.yaml (UnicodeDecodeError)", "o"),
    ("plan axis 7", ["--plan", "axis7.json", "--eval-size", "8", "--calib-size", "8"],
     "the plan gives layer 'fc' weight axis 7", "o"),
    ("plan negative group_size", ["--plan", "neggroup.json"], "group_size=-4 must be at least 1", "o"),
    ("plan symmetric 'no'", ["--plan", "symno.json"], "symmetric='no' must be true or false", "o"),
    ("plan without layers", ["--plan", "nolayers.json"], "quantizes no layer", "o"),
    ("300-character --out", [], "--out has a name of 300 bytes", LONG),
    ("empty --out", [], "--out is empty", ""),
    ("--out below a file", [], "afile is a file, so it cannot hold the output folder", "afile/o"),
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
    """Every row of BAD run by the real command, each in its own folder, three at a time (most of each run is
    importing torch): id -> (folder, its files before the run, the finished process)."""
    def one(row: tuple[str, list[str], str, str]) -> tuple[Path, list[Path], subprocess.CompletedProcess[str]]:
        name, args, _, out = row
        tmp = tmp_path_factory.mktemp("bad")
        setup(tmp)
        before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
        return tmp, before, qcore_runner("run", *args, "--out", out, cwd=tmp, env={"QCORE_CACHE_DIR": str(tmp / "cache")})

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
