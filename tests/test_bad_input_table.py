"""The bad-input regression table: 156 inputs a hostile user would try (issue "Hardening"), each of which must end
as exactly one line ``qcore: error: ...`` naming the problem, exit status 2, no traceback, no Python warning and
nothing written (no --out, no cache, no file a payload would create).

The command is the real one: the ``qcore`` console-script entry point, called as a function in this process
(one subprocess per row would cost ~3 s of importing torch each). ``tests/test_bad_inputs.py`` runs a few of
these rows as real processes too, so the in-process harness cannot hide what a user would see.

Most rows fail before the model is built (the table runs in seconds); rows that fail only after the FP model is
evaluated use ``--eval-size 8 --calib-size 8``.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

CUDA = torch.cuda.is_available()
LONG = "o" * 300
IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SMALL = ["--eval-size", "8", "--calib-size", "8"]


@dataclass
class Row:
    """One bad input: ``qcore COMMAND ARGS --out OUT`` must fail with ``message`` in its one error line."""

    name: str
    args: list[str]
    message: str
    out: str | None = "o"  # None: no --out (commands other than run)
    env: dict[str, str] = field(default_factory=dict)
    command: str = "run"
    site: str | None = None  # "broken" / "exiting": a third-party plugin installed through an entry point


def R(name: str, args: list[str], message: str, **kw: object) -> Row:
    return Row(name, args, message, **kw)  # type: ignore[arg-type]


ROWS = [
    # --- what to run: plugins, methods, components, tasks
    R("unknown plugin", ["--plugin", "nosuch"], "unknown plugin 'nosuch'"),
    R("plugin not installed", ["--plugin", "hawq"], "install it (from a qcore checkout"),  # no such distribution
    R("empty plugin name", ["--plugin", ""], "--plugin is empty"),
    R("empty method name", ["--method", ""], "--method is empty"),
    R("empty task name", ["--task", ""], "--task is empty"),
    R("unknown method", ["--method", "nosuch"], "unknown method 'nosuch'"),
    R("unknown quantizer", ["--quantizer", "nosuch"], "unknown quantizer 'nosuch'"),
    R("unknown calibrator", ["--calibrator", "nosuch"], "unknown calibrator 'nosuch'"),
    R("unknown allocator", ["--allocator", "nosuch"], "unknown allocator 'nosuch'"),
    R("unknown task", ["--task", "nosuch"], "unknown task 'nosuch'"),
    R("unknown weight correction", ["-o", "weight_correction=nosuch"], "unknown correction 'nosuch'"),
    R("unknown act correction", ["-o", "act_correction=nosuch"], "unknown correction 'nosuch'"),
    R("output correction as weight correction", ["-o", "weight_correction=affine"],
      "correction 'affine' is not a WeightCorrection"),
    R("broken third-party plugin", ["--plugin", "broken"], "plugin 'broken' is broken", site="broken"),
    R("plugin that calls sys.exit", ["--plugin", "exiting"], "plugin 'exiting' is broken", site="exiting"),
    R("disabled plugin", ["--plugin", "aciq"], "plugin 'aciq' is not loaded; it is disabled by QCORE_DISABLE_PLUGINS",
      env={"QCORE_DISABLE_PLUGINS": "aciq"}),
    R("default plugin disabled", [], "plugin 'uniform' is not loaded; it is disabled by QCORE_DISABLE_PLUGINS",
      env={"QCORE_DISABLE_PLUGINS": "uniform"}),
    R("task plugin disabled", [], "unknown task 'classification'",
      env={"QCORE_DISABLE_PLUGINS": "classification"}),
    R("misspelt QCORE_LOAD_PLUGINS", [], "unknown task 'classification'; available: (none); "
      "QCORE_LOAD_PLUGINS=clasification loads only the plugins it names", env={"QCORE_LOAD_PLUGINS": "clasification"}),
    R("QCORE_LOAD_PLUGINS without the method's plugin", ["--plugin", "rdoq"],
      "plugin 'rdoq' is not loaded; QCORE_LOAD_PLUGINS=classification loads only the plugins it names",
      env={"QCORE_LOAD_PLUGINS": "classification"}),
    # --- method options
    R("unknown option", ["-o", "colour=red"], "unknown option colour; valid options"),
    R("option of another method", ["-o", "curve_samples=4"], "unknown option curve_samples"),
    R("option without =", ["-o", "first_last"], "-o expects key=value, got 'first_last'"),
    R("option without a key", ["-o", "=5"], "-o expects key=value, got '=5'"),
    R("bad enum value", ["-o", "first_last=maybe"], "first_last='maybe': use a bit-width, 'same' or 'fp'"),
    R("bad bool value", ["-o", "fold_bn=perhaps"], "option fold_bn='perhaps' is not a boolean"),
    R("int option given text", ["--plugin", "rdoq", "-o", "group=abc"], "option group='abc' is not an integer"),
    R("negative int option", ["--plugin", "rdoq", "-o", "group=-1"], "-o group=-1 is out of range; use 0 or more"),
    R("zero curve samples", ["--plugin", "rdoq", "-o", "curve_samples=0"], "-o curve_samples=0 is out of range"),
    R("unknown solver", ["--plugin", "rdoq", "-o", "solver=simplex"], "option solver='simplex' is not one of dp, "
      "lagrangian"),
    R("zero DP resolution", ["--plugin", "rdoq", "-o", "resolution=0"], "-o resolution=0.0 is out of range"),
    R("NaN option value", ["--plugin", "rdoq", "-o", "resolution=nan"], "option resolution='nan' must be a finite"),
    R("inf option value", ["--calibrator", "percentile", "-o", "percentile=inf"], "must be a finite number"),
    R("YAML true as a number", ["--plugin", "rdoq", "--config", "booloption.yaml"], "option group=True is not an "
      "integer"),
    R("unknown weight range", ["--plugin", "rdoq", "-o", "weight_range=nosuch"], "option weight_range='nosuch' is "
      "not one of minmax, percentile, mse"),
    R("cache path is a file", ["--plugin", "rdoq", "-o", "cache=afile"], "-o cache=afile cannot hold the RD curve "
      "cache: afile is a file"),
    R("cache path below a file", ["--plugin", "rdoq", "-o", "cache=afile/sub"], "afile is a file"),
    R("include matching no layer", ["-o", "include=nomatch*", *SMALL], "has no quantizable layer"),
    R("exclude of every layer", ["-o", "exclude=*", *SMALL], "has no quantizable layer"),
    R("percentile above 100", ["--calibrator", "percentile", "-o", "percentile=150"], "percentile=150.0 must be in "
      "(50, 100]"),
    R("min_bits above max_bits", ["--plugin", "rdoq", "-o", "min_bits=6", "-o", "max_bits=2"],
      "need 0 <= min_bits <= max_bits <= 16, got 6, 2"),
    # --- budgets
    R("--w-bits too high", ["--w-bits", "33"], "--w-bits 33 is out of range"),
    R("--w-bits negative", ["--w-bits", "-1"], "--w-bits -1 is out of range"),
    R("--a-bits too high", ["--a-bits", "17"], "--a-bits 17 is out of range"),
    R("--a-bits negative", ["--a-bits", "-3"], "--a-bits -3 is out of range"),
    R("--w-bits text", ["--w-bits", "four"], "invalid int value: 'four'"),
    R("--w-bits fractional", ["--w-bits", "4.5"], "invalid int value: '4.5'"),
    R("--a-bits empty", ["--a-bits", ""], "invalid int value: ''"),
    R("--target-bits too high", ["--plugin", "rdoq", "--target-bits", "17"], "--target-bits 17.0 is out of range"),
    R("--target-bits negative", ["--plugin", "rdoq", "--target-bits", "-2"], "--target-bits -2.0 is out of range"),
    R("--target-bits NaN", ["--plugin", "rdoq", "--target-bits", "nan"], "--target-bits nan is out of range"),
    R("--target-bits inf", ["--plugin", "rdoq", "--target-bits", "inf"], "--target-bits inf is out of range"),
    R("--target-bits text", ["--plugin", "rdoq", "--target-bits", "four"], "invalid float value: 'four'"),
    R("target below the minimum bits", ["--plugin", "rdoq", "--target-bits", "1", "-o", "min_bits=4", *SMALL],
      "impossible bit budget"),
    # --- sizes, seed, device
    R("--calib-size 0", ["--calib-size", "0"], "--calib-size 0 is out of range; use 1 or more"),
    R("--calib-size negative", ["--calib-size", "-5"], "--calib-size -5 is out of range"),
    R("--calib-size text", ["--calib-size", "all"], "invalid int value: 'all'"),
    R("--batch-size 0", ["--batch-size", "0"], "--batch-size 0 is out of range"),
    R("--eval-size 0", ["--eval-size", "0"], "--eval-size must be at least 1"),
    R("--eval-size negative", ["--eval-size", "-1"], "--eval-size must be at least 1"),
    R("--seed negative", ["--seed", "-1"], "--seed -1 is out of range"),
    R("--seed huge", ["--seed", "1180591620717411303424"], "--seed 1180591620717411303424 is out of range"),
    R("--seed text", ["--seed", "abc"], "invalid int value: 'abc'"),
    R("unknown device", ["--device", "tpu"], "unknown device 'tpu'; use cpu, cuda or cuda:N"),
    R("empty device", ["--device", ""], "--device is empty"),
    R("unsupported device", ["--device", "meta"], "device 'meta' is not supported"),
    R("CUDA device out of range", ["--device", "cuda:99"],
      "only" if CUDA else "PyTorch sees no CUDA device"),
    # --- model and weights
    R("unknown zoo model", ["--model", "zoo:nope"], "unknown zoo model 'nope'"),
    R("model without prefix", ["--model", "resnet18"], "needs the form PREFIX:NAME"),
    R("model with empty name", ["--model", "zoo:"], "needs the form PREFIX:NAME"),
    R("unknown model prefix", ["--model", "hf:bert"], "unknown model prefix 'hf' for task 'classification'; "
      "available: py:, timm:, tv:, zoo:"),
    R("unknown torchvision model", ["--model", "tv:nosuchnet"], "unknown torchvision model 'nosuchnet'"),
    R("zoo model with --model-arg", ["--model-arg", "depth=3"], "zoo models are built as trained"),
    R("--model-arg without =", ["--model-arg", "depth"], "--model-arg expects key=value, got 'depth'"),
    R("py: file missing", ["--model", "py:missing.py:build"], "model file missing.py does not exist"),
    R("py: without function", ["--model", "py:net.py"], "needs the form py:path/to/file.py:function"),
    R("py: unknown function", ["--model", "py:net.py:nosuch"], "net.py defines no function 'nosuch'; functions "
      "defined there: build"),
    R("py: returns no module", ["--model", "py:net.py:not_a_module"], "not a torch.nn.Module"),
    R("py: file with a syntax error", ["--model", "py:syntax.py:build"], "running syntax.py failed (SyntaxError"),
    R("py: function raising", ["--model", "py:net.py:raises", "--channels", "1"],
      "could not build py:net.py:raises with no arguments (ValueError: this model needs a GPU cluster)"),
    R("py: model failing on its input", ["--model", "py:net.py:wrong_input", "--input-size", "28", "--channels", "1",
                                         "--mean", "0.5", "--std", "0.5", *SMALL], "fails on 1x28x28 inputs"),
    R("weights missing", ["--weights", "missing.pt"], "weights file missing.pt does not exist"),
    R("weights empty path", ["--weights", ""], "--weights is empty"),
    R("weights a folder", ["--weights", "emptydir"], "weights file emptydir does not exist"),
    R("0-byte weights", ["--weights", "empty.pt"], "cannot read weights file empty.pt (the file is empty)"),
    R("random-byte weights", ["--weights", "random.pt"], "cannot read weights file random.pt"),
    R("corrupt safetensors", ["--weights", "corrupt.safetensors"], "cannot read weights file corrupt.safetensors"),
    R("pickle payload in weights", ["--weights", "payload.pt"], "cannot read weights file payload.pt"),
    R("raw pickle weights", ["--weights", "rawpickle.pt"], "cannot read weights file rawpickle.pt"),
    R("torch pickle with a payload", ["--weights", "torchpayload.pt"], "cannot read weights file torchpayload.pt"),
    R("weights a bare tensor", ["--weights", "tensor.pt"], "holds no state dict of tensors"),
    R("weights with other keys", ["--weights", "wrongkeys.pt"], "do not fit the model"),
    R("weights with a wrong shape", ["--weights", "wrongshape.safetensors"], "do not fit the model"),
    R("NaN weights", ["--weights", "nan.safetensors"], "has NaN or infinite values"),
    R("inf weights", ["--weights", "inf.pt"], "has NaN or infinite values"),
    R("--input-size 0", ["--input-size", "0"], "--input-size (input.size) 0 must be a whole number of at least 1"),
    R("--mean not a number", ["--mean", "a,b"], "--mean (input.mean) 'a,b' must be numbers separated by commas"),
    R("--mean with 2 values for 1 channel", ["--mean", "0.1,0.2"], "--mean has 2 values but the model takes 1"),
    R("--std zero", ["--std", "0"], "--std (input.std) '0' must be positive numbers"),
    R("--channels 2", ["--channels", "2"], "--channels 2: images can be fed to 1-channel (grey) or 3-channel"),
    # --- the detection task's loader
    R("detection: unknown zoo model", ["--task", "detection", "--model", "zoo:nope"],
      "unknown detection zoo model 'nope'"),
    R("detection: weights missing", ["--task", "detection", "--weights", "missing.safetensors"],
      "--weights missing.safetensors does not exist"),
    R("detection: weights without their record", ["--task", "detection", "--weights", "corrupt.safetensors"],
      "corrupt.json (the model record written next to corrupt.safetensors by training) is missing"),
    R("detection: 0-byte weights", ["--task", "detection", "--weights", "det/empty.safetensors"],
      "cannot load detector weights det/empty.safetensors"),
    R("detection: real data for the embedded detector", ["--task", "detection", "--data", "emptydir"],
      "the embedded detector runs on synthetic LiDAR"),
    R("detection: curve_tiles not 1, 2 or 4", ["--task", "detection", "-o", "curve_tiles=3"],
      "option curve_tiles='3' is not one of 1, 2, 4"),
    # --- data
    R("data folder missing", ["--data", "no/such/dir"], "data folder no/such/dir does not exist"),
    R("data is a file", ["--data", "afile"], "--data afile is a file, not a folder"),
    R("empty data folder", ["--data", "emptydir"], "emptydir has no train/ folder"),
    R("image folder without class folders", ["--data", "noclass"], "noclass/train has no class folders"),
    R("image folder with an empty class", ["--data", "emptyclass"], "no image for the classes a"),
    R("train and val with other classes", ["--data", "otherclasses"], "different class folders"),
    R("corrupt image", ["--data", "corrupt", "--calib-size", "1"], "cannot read image corrupt/train/a/x.png"),
    R("IDX of random bytes", ["--data", "idxrand"], "is not an unsigned-byte IDX file"),
    R("IDX.gz of random bytes", ["--data", "idxrandgz"], "cannot read idxrandgz/train-images-idx3-ubyte.gz "
      "(BadGzipFile"),
    R("IDX.gz cut off", ["--data", "idxcutgz"], "cannot read idxcutgz/train-images-idx3-ubyte.gz (EOFError"),
    R("IDX images [N, 784]", ["--data", "idx784"], "holds an array of shape [8, 784]"),
    R("IDX labels outside the classes", ["--data", "idxlabels"],
      "has labels up to 39, but Fashion-MNIST has 10 classes"),
    R("IDX shorter than its header", ["--data", "idxtrunc"], "its header promises"),
    R("IDX images and labels of different counts", ["--data", "idxcount"], "8 train images but 6 labels"),
    # --- config (YAML) files
    R("config missing", ["--config", "missing.yaml"], "config file missing.yaml does not exist"),
    R("binary config", ["--config", "binary.yaml"], "cannot read config file binary.yaml (UnicodeDecodeError)"),
    R("config a folder", ["--config", "emptydir"], "config file emptydir is a folder, not a file"),
    R("config empty path", ["--config", ""], "the config file path is empty"),
    R("config with a syntax error", ["--config", "syntax.yaml"], "is not valid YAML"),
    R("config holding a list", ["--config", "list.yaml"], "must hold a mapping of options"),
    R("config with an unknown key", ["--config", "unknown.yaml"], "unknown key(s) in unknown.yaml: colour"),
    R("config with a bad value", ["--config", "badvalue.yaml"], "in badvalue.yaml"),
    R("config options not a mapping", ["--config", "optionslist.yaml"], "'options' and 'layers' must be mappings"),
    R("config input not a mapping", ["--config", "inputscalar.yaml", "--input-size", "28"],
      "'input' must be a mapping"),
    R("YAML payload", ["--config", "evil.yaml"], "is not valid YAML"),
    R("config with an unknown option", ["--config", "badoption.yaml"], "unknown option colour"),
    # --- plan files
    R("plan missing", ["--plan", "missing.json"], "missing.json does not exist"),
    R("plan not JSON", ["--plan", "notjson.json"], "plan file notjson.json: plan is not valid JSON"),
    R("binary plan", ["--plan", "binary.yaml"], "cannot read plan file binary.yaml (UnicodeDecodeError)"),
    R("plan empty path", ["--plan", ""], "the plan file path is empty"),
    R("plan a JSON list", ["--plan", "list.json"], "plan file list.json: plan JSON has no 'layers' mapping"),
    R("plan of another version", ["--plan", "version99.json"], "plan version 99 is not supported by this qcore"),
    R("plan without layers key", ["--plan", "nolayerskey.json"], "plan JSON has no 'layers' mapping"),
    R("plan axis 7", ["--plan", "axis7.json", *SMALL], "the plan gives layer 'fc' weight axis 7"),
    R("plan negative group_size", ["--plan", "neggroup.json"], "group_size=-4 must be at least 1"),
    R("plan symmetric 'no'", ["--plan", "symno.json"], "symmetric='no' must be true or false"),
    R("plan bits 99", ["--plan", "bits99.json"], "plan file bits99.json: bit-width 99 is out of range"),
    R("plan bits as text", ["--plan", "bitstext.json"], "plan file bitstext.json: bit-width four is out of range"),
    R("plan granularity unknown", ["--plan", "diagonal.json"], "unknown granularity 'diagonal'; use one of tensor, "
      "channel, group"),
    R("plan without layers", ["--plan", "nolayers.json"], "quantizes no layer"),
    R("plan for another model", ["--plan", "otherlayer.json", *SMALL], "the plan names layer(s) this model does "
      "not have as quantizable: nosuch"),
    R("plan with an unknown quantizer", ["--plan", "quantizer.json", *SMALL], "the plan quantizes layer 'fc' with "
      "quantizer 'nosuch' but this run uses 'uniform'"),
    # --- output folder
    R("empty --out", [], "--out is empty", out=""),
    R("300-character --out", [], "--out has a name of 300 bytes", out=LONG),
    R("--out below a file", [], "afile is a file, so it cannot hold the output folder", out="afile/o"),
    R("--out is a file", [], "--out afile exists and is not a directory", out="afile"),
    # --- the command line itself
    R("unknown command", [], "invalid choice: 'nosuch'", out=None, command="nosuch"),
    R("unknown flag", ["--nosuch"], "unrecognized arguments: --nosuch"),
    R("stray positional argument", ["extra"], "unrecognized arguments: extra"),
    R("list of an unknown kind", ["nosuch"], "invalid choice: 'nosuch'", out=None, command="list"),
    R("flag without its value", ["--model"], "argument --model: expected one argument", out=None),
]


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + \
        array.astype(np.uint8).tobytes()


def _idx_folder(root: Path, images: np.ndarray, labels: np.ndarray, cut: int = 0) -> None:
    root.mkdir()
    for img, lbl in IDX.values():
        data = _idx(images)
        (root / img).write_bytes(data[:len(data) - cut])
        (root / lbl).write_bytes(_idx(labels))


def _plan(path: Path, layer: str = "fc", **weight: object) -> None:
    spec = {"bits": 4, "symmetric": True, "granularity": "channel", "group_size": None, "group_bits": None,
            "axis": None, "quantizer": "uniform", "group_params": None, **weight}
    path.write_text(json.dumps({"version": 1, "meta": {}, "layers": {layer: {"weight": spec, "act": None}}}))


class _Payload:
    """Unpickling this creates the file ``pwned``: a loader that runs pickles would leave it behind."""

    def __reduce__(self):
        return (open, ("pwned", "w"))


NET_PY = """\
import torch

def build():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))

def not_a_module():
    return 42

def raises():
    raise ValueError("this model needs a GPU cluster")

def wrong_input():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, 10))
"""


def make_inputs(tmp: Path) -> None:
    """Every file the table refers to (a few hundred KiB, most of it the zoo weights modified)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp / "noclass" / split).mkdir(parents=True)
        for cls, content in (("a", None), ("b", b"\x89PNG not really")):
            (tmp / "emptyclass" / split / cls).mkdir(parents=True)
            if content:
                (tmp / "emptyclass" / split / cls / "x.png").write_bytes(content)
        (tmp / "corrupt" / split / "a").mkdir(parents=True)
        (tmp / "corrupt" / split / "a" / "x.png").write_bytes(b"garbage, not an image")
        other = tmp / "otherclasses" / split / ("a" if split == "train" else "b")
        other.mkdir(parents=True)
        Image.new("L", (4, 4)).save(other / "x.png")
    for name, gz in (("idxrand", False), ("idxrandgz", True)):
        (tmp / name).mkdir()
        for pair in IDX.values():
            for f in pair:
                (tmp / name / (f + (".gz" if gz else ""))).write_bytes(rng.bytes(1000))
    (tmp / "idxcutgz").mkdir()
    for pair in IDX.values():
        for f in pair:
            (tmp / "idxcutgz" / (f + ".gz")).write_bytes(gzip.compress(_idx(np.zeros((8, 28, 28))))[:40])
    images, labels = rng.integers(0, 256, (8, 28, 28)), rng.integers(0, 10, 8)
    _idx_folder(tmp / "idx784", images.reshape(8, 784), labels)
    _idx_folder(tmp / "idxlabels", images, np.arange(32, 40))
    _idx_folder(tmp / "idxtrunc", images, labels, cut=100)
    _idx_folder(tmp / "idxcount", images, labels[:6])
    (tmp / "emptydir").mkdir()
    (tmp / "afile").write_text("a file, not a folder")
    (tmp / "net.py").write_text(NET_PY)
    (tmp / "syntax.py").write_text("def build(:\n")
    # weights
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "det").mkdir()
    (tmp / "det" / "empty.safetensors").write_bytes(b"")
    (tmp / "det" / "empty.json").write_text("{}")
    (tmp / "random.pt").write_bytes(rng.bytes(4096))
    (tmp / "corrupt.safetensors").write_bytes(b"\x00garbage")
    (tmp / "payload.pt").write_bytes(pickle.dumps(_Payload()))
    (tmp / "rawpickle.pt").write_bytes(pickle.dumps({"fc.weight": [[0.0]]}))
    torch.save({"fc.weight": torch.zeros(1), "x": _Payload()}, tmp / "torchpayload.pt")
    torch.save(torch.zeros(3), tmp / "tensor.pt")
    torch.save({"x": torch.zeros(3)}, tmp / "wrongkeys.pt")
    with resources.as_file(resources.files("qcore_classification") / "zoo" / "weights"
                           / "fmnist_resnet.safetensors") as path:
        state = load_file(str(path))
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    save_file({**state, key: state[key][:1].contiguous()}, str(tmp / "wrongshape.safetensors"))
    save_file({**state, key: state[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))},
              str(tmp / "nan.safetensors"))
    torch.save({**state, key: state[key].clone().index_fill_(0, torch.tensor([0]), float("inf"))}, tmp / "inf.pt")
    # YAML
    (tmp / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp / "syntax.yaml").write_text("w_bits: [4, 8\n")
    (tmp / "list.yaml").write_text("- w_bits\n- 4\n")
    (tmp / "unknown.yaml").write_text("colour: red\n")
    (tmp / "badvalue.yaml").write_text("w_bits: four\n")
    (tmp / "optionslist.yaml").write_text("options: [1, 2]\n")
    (tmp / "inputscalar.yaml").write_text("input: 28\n")
    (tmp / "evil.yaml").write_text("w_bits: !!python/object/apply:builtins.open ['pwned', 'w']\n")
    (tmp / "badoption.yaml").write_text("options: {colour: red}\n")
    (tmp / "booloption.yaml").write_text("options: {group: true}\n")
    # plans
    (tmp / "notjson.json").write_text("{not json")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "version99.json").write_text(json.dumps({"version": 99, "meta": {}, "layers": {}}))
    (tmp / "nolayerskey.json").write_text(json.dumps({"version": 1, "meta": {}}))
    (tmp / "nolayers.json").write_text(json.dumps({"version": 1, "meta": {"method": "uniform"}, "layers": {}}))
    _plan(tmp / "axis7.json", axis=7)
    _plan(tmp / "neggroup.json", granularity="group", group_size=-4)
    _plan(tmp / "symno.json", symmetric="no")
    _plan(tmp / "bits99.json", bits=99)
    _plan(tmp / "bitstext.json", bits="four")
    _plan(tmp / "diagonal.json", granularity="diagonal")
    _plan(tmp / "otherlayer.json", layer="nosuch")
    _plan(tmp / "quantizer.json", quantizer="nosuch")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad-table")
    make_inputs(tmp)
    return tmp


@pytest.fixture(scope="module")
def sites(plugin_site, exiting_plugin_site) -> dict[str, Path]:
    """Site folders with a third-party plugin installed through an entry point (conftest.py): ``broken``, whose
    import fails, and ``exiting``, whose import calls ``sys.exit(3)``."""
    return {"broken": plugin_site, "exiting": exiting_plugin_site}


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(row, inputs, sites, qcore_in_process, monkeypatch):
    monkeypatch.chdir(inputs)
    for var in ("QCORE_LOAD_PLUGINS", "QCORE_DISABLE_PLUGINS", "QCORE_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QCORE_PROGRESS", "0")
    monkeypatch.setenv("QCORE_CACHE_DIR", str(inputs / "cache"))
    for k, v in row.env.items():
        monkeypatch.setenv(k, v)
    if row.site:
        monkeypatch.syspath_prepend(str(sites[row.site]))
    before = _listing(inputs)
    argv = [row.command, *row.args] + ([] if row.out is None else ["--out", row.out])
    rc, _, err, caught = qcore_in_process(*argv)
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("qcore: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert row.message in errors[0], errors[0]
    assert not caught, caught
    assert _listing(inputs) == before  # no --out, no cache, no file a payload would write
