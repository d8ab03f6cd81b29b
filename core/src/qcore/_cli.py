"""The ``qcore`` command line: ``qcore run``, ``qcore plugins``, ``qcore list``, ``qcore --version``.

A thin layer over :mod:`qcore._pipeline`. User mistakes end with one line ``qcore: error: ...`` on stderr and
exit status 2; nothing is written for a run that failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn, get_type_hints

from qcore import __version__
from qcore._components import RunConfig, WeightCorrection
from qcore._errors import ComponentError, ContractError, QcoreError
from qcore._options import convert_value, describe_options, parse_assignments, parse_scalar
from qcore._outputs import read_text_file
from qcore._plugins import KINDS, Host, load_host
from qcore._progress import show_stage_lines, stage_lines_enabled

log = logging.getLogger("qcore")

EPILOG = """examples:
  qcore run --plugin uniform                       # embedded Fashion-MNIST ResNet, W4A8 baseline
  qcore run --plugin uniform --w-bits 8 --a-bits 8 --model zoo:fmnist_vit
  qcore run --plugin uniform --calibrator mse -o first_last=same
  qcore run --model tv:resnet18 --weights r18.pth --data /data/imagenet --w-bits 4 --a-bits 8
  qcore run --model timm:vit_tiny_patch16_224 --model-arg img_size=32 --model-arg patch_size=4 \\
      --weights vit.safetensors --data /usr/share/datasets/fashion-mnist --input-size 32 --mean 0.2860 --std 0.3530
  qcore run --model py:mynet.py:build --weights mynet.pth --input-size 32 --channels 1   # runs mynet.py
  qcore eval out/model.qcore --w-bits 4 --a-bits 4 # a saved model (a multi-bit one at any setting it holds)
  qcore export out/model.qcore --onnx model.onnx   # the saved model as ONNX QDQ for onnxruntime
  qcore plugins                                    # installed plugins and what they provide, as JSON
  qcore list methods --options                     # every method and the -o options it takes
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(message)


def _other_rank() -> int | None:
    """This process's rank when it is not rank 0 of a ``torchrun`` job (from torchrun's ``RANK``/``WORLD_SIZE``,
    set before any process group exists), else None."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return rank if world > 1 and rank != 0 else None


def _group_started() -> bool:
    """True once this process has joined a torch.distributed process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _fail(message: str, every_rank: bool = False) -> NoReturn:
    """Print ``qcore: error: MESSAGE`` and exit 2. Under torchrun every rank reads the same command line and
    inputs, so a user's mistake is printed by rank 0 only (the others exit 2 silently): one error per job.
    ``every_rank``: an error that may be this rank's own (an internal one), printed with the rank."""
    other = _other_rank()
    if other is None:
        sys.stderr.write(f"qcore: error: {message}\n")
    elif every_rank:
        sys.stderr.write(f"qcore: error: (rank {other}) {message}\n")
    raise SystemExit(2)


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="quantize a model and evaluate it",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Quantize a model with a method and compare it with the FP model on the same data. "
                       "Writes result.json, plan.json and model.qcore (the quantized model, for qcore.load) into "
                       "--out and prints a summary table. With no options it runs the uniform baseline (W4A8, "
                       "first/last layer 8-bit) on the embedded Fashion-MNIST ResNet.",
                       epilog=EPILOG)
    g = p.add_argument_group("what to run")
    g.add_argument("--plugin", help="run this plugin's default method (see `qcore plugins`); default: uniform")
    g.add_argument("--method", help="run a method by name instead (see `qcore list methods`)")
    g.add_argument("--quantizer", help="override the method's quantizer")
    g.add_argument("--calibrator", help="override the method's calibrator (e.g. mse, percentile)")
    g.add_argument("--allocator", help="override the method's allocator")
    g.add_argument("--plan", type=Path, help="apply this plan.json instead of allocating (core applies any plan)")
    g.add_argument("--config", type=Path, help="YAML recipe with any of these options, plus `options:` and "
                   "`layers:` (per-layer overrides: {glob: {w_bits: 8, a_bits: 8}} or {glob: fp}); flags win")
    g.add_argument("-o", dest="options", action="append", default=None, metavar="KEY=VALUE",
                   help="method option (repeatable); `qcore list methods --options` shows the valid keys")
    g = p.add_argument_group("model and data")
    g.add_argument("--task", help="task plugin (default: classification)")
    g.add_argument("--model", help="PREFIX:NAME, e.g. zoo:fmnist_resnet (default), zoo:fmnist_vit, tv:resnet18, "
                   "timm:deit_tiny_patch16_224, or py:path/to/file.py:function to build your own model: this RUNS "
                   "that Python file (only use files you trust); the function gets the --model-arg values as "
                   "keyword arguments and returns a torch.nn.Module")
    g.add_argument("--model-arg", dest="model_arg", action="append", default=None, metavar="KEY=VALUE",
                   help="keyword argument for the model's constructor (repeatable; YAML model_args:), passed to "
                   "the torchvision/timm builder or the py: function, e.g. --model-arg img_size=32; values are "
                   "read as int, float, true/false, none, else text")
    g.add_argument("--input-size", dest="input_size", type=int, metavar="N",
                   help="square input size the model takes, in pixels; images are resized to it (default: the "
                   "model's own, e.g. 224 for tv: and timm:, 28 for zoo:; YAML input: {size: N})")
    g.add_argument("--mean", metavar="A[,B,C]",
                   help="mean of [0, 1] pixels to normalise with: one value for every channel or one per channel "
                   "(default: the model's own, ImageNet for tv:/timm:; YAML input: {mean: ...})")
    g.add_argument("--std", metavar="A[,B,C]",
                   help="standard deviation to normalise with, like --mean (YAML input: {std: ...})")
    g.add_argument("--channels", type=int, metavar="C",
                   help="input channels the model takes (1 or 3): grey images are repeated to 3 channels, colour "
                   "ones averaged to 1 (default: the model's own; YAML input: {channels: C})")
    g.add_argument("--weights", help="weights file (safetensors or a torch state dict)")
    g.add_argument("--data", help="data: an ImageNet-style folder with train/ and val/, a folder with the "
                   "Fashion-MNIST IDX files, or 'embedded' (default for zoo models)")
    g.add_argument("--calib-size", type=int,
                   help="calibration samples from the training split (default: the task's; 512 images, 16 scenes)")
    g.add_argument("--eval-size", type=int, help="evaluate on the first N evaluation samples (default: all)")
    g.add_argument("--batch-size", type=int, help="batch size (default: the task's; 256 images, 4 LiDAR scenes)")
    g = p.add_argument_group("budget")
    g.add_argument("--w-bits", type=int, help="weight bits for fixed allocators (0..16)")
    g.add_argument("--a-bits", type=int, help="activation bits for fixed allocators (0..16)")
    g.add_argument("--target-bits", type=float, help="average bit budget for mixed-precision allocators")
    g = p.add_argument_group("run")
    g.add_argument("--device", help="cpu (default), cuda or cuda:N")
    g.add_argument("--seed", type=int, help="seed for calibration sampling and methods (default 0)")
    g.add_argument("--out", help="output folder (default qcore-runs/<method>-<model>-<time>)")
    g.add_argument("-v", "--verbose", action="store_true", help="log progress of each stage")
    g.add_argument("--traceback", action="store_true",
                   help="on an error, print the full Python traceback too (also QCORE_DEBUG=1); for bug reports")


def _saved_model_args(parser: argparse.ArgumentParser, data_help: str) -> None:
    """The arguments every command reading a saved ``.qcore`` model shares (``qcore eval``, ``qcore export``)."""
    parser.add_argument("file", type=Path, help="a .qcore file (qcore run writes OUT/model.qcore)")
    parser.add_argument("--w-bits", type=int, help="weight bits to select (a multi-bit model; default: as saved)")
    parser.add_argument("--a-bits", type=int,
                        help="activation bits to select (a multi-bit model; default: as saved)")
    parser.add_argument("--bit-plan", type=Path, help="plan.json whose per-layer bits to select (e.g. from rdoq)")
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--weights", help="FP weights file (default: the run's)")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, print the full Python traceback too")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcore", description="qcore: post-training quantization toolkit (RDOQ, ACIQ, OMPQ, PTMQ, "
                "LatticeQ and a uniform baseline) with pluggable quantizers, calibrators and allocators.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--version", action="version", version=f"qcore {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_run(sub)
    pl = sub.add_parser("plugins", help="list installed plugins and their components as JSON")
    pl.add_argument("--broken", action="store_true", help="list only plugins that failed to load")
    ev = sub.add_parser("eval", help="evaluate a saved .qcore model (a multi-bit one at any setting it holds)",
                        description="Evaluate MODEL.qcore (written by qcore run) on its task's evaluation data, "
                        "rebuilt from what the file records; nothing is recalibrated. A multi-bit model (e.g. "
                        "--plugin ptmq) is switched first to --w-bits/--a-bits or to the per-layer bits of "
                        "--bit-plan. Prints the metrics as JSON.")
    _saved_model_args(ev, data_help="evaluation data (default: the run's)")
    ev.add_argument("--eval-size", type=int, help="evaluate on the first N evaluation samples (default: all)")
    ev.add_argument("--batch-size", type=int, help="batch size (default: the run's)")
    ev.add_argument("--device", help="cpu (default: the run's) or cuda")
    ex = sub.add_parser("export", help="write a saved .qcore model as ONNX QDQ (integer weights, QDQ inputs)",
                        description="Write MODEL.qcore (written by qcore run) as an ONNX QDQ model (opset 21) that "
                        "onnxruntime runs: weights as INT8/INT4 codes with per-channel scales, every quantized "
                        "input as QuantizeLinear/DequantizeLinear. The FP model is rebuilt from what the file "
                        "records; one calibration batch traces it. Needs uniform grids of at most 8 bits and "
                        "pip install onnx onnxscript onnxruntime. Prints a JSON report.")
    _saved_model_args(ex, data_help="data for the example batch (default: the run's)")
    ex.add_argument("--onnx", type=Path, required=True, help="the ONNX file to write")
    ex.add_argument("--no-int4", action="store_true",
                    help="store 4-bit codes in 8-bit types (onnxruntime has no fast 4-bit kernels)")
    ls = sub.add_parser("list", help="list registered components of one kind")
    ls.add_argument("kind", choices=[k + "s" for k in KINDS], help="what to list")
    ls.add_argument("--options", action="store_true", help="show each component's options")
    return p


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        raise QcoreError("--config needs PyYAML: pip install pyyaml") from None
    text = read_text_file(path, "config file", "--config takes a YAML text file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QcoreError(f"config file {path} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise QcoreError(f"config file {path} must hold a mapping of options")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


#: ``RunConfig.input`` key -> the argparse destination of its flag
INPUT_DESTS = {"size": "input_size", "mean": "mean", "std": "std", "channels": "channels"}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Merge the YAML recipe (if any) and the flags (flags win) into a :class:`RunConfig`."""
    values: dict[str, Any] = _load_yaml(args.config) if args.config else {}
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - fields - {"plan"})
    if unknown:
        raise QcoreError(f"unknown key(s) in {args.config}: {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    options, layers = values.pop("options", None) or {}, values.pop("layers", None) or {}
    if not isinstance(options, dict) or not isinstance(layers, dict):
        raise QcoreError(f"in {args.config}: 'options' and 'layers' must be mappings (key: value)")
    options = {str(k).replace("-", "_"): v for k, v in options.items()}
    layers = {str(k): v for k, v in layers.items()}
    hints = get_type_hints(RunConfig)
    for key in list(values):
        if key in hints and key != "plan":
            try:
                values[key] = convert_value(key, values[key], hints[key])
            except QcoreError as exc:
                raise QcoreError(f"in {args.config}: {exc}") from None
    for name in fields | {"plan"}:
        v = getattr(args, name, None)
        if v is not None and name not in ("options", "layers"):
            values[name] = v
    if args.options:
        options.update(parse_assignments(args.options))
    flag_input = {key: getattr(args, dest, None) for key, dest in INPUT_DESTS.items()}
    flag_input = {k: v for k, v in flag_input.items() if v is not None}
    flag_args = {k: parse_scalar(v) for k, v in parse_assignments(getattr(args, "model_arg", None) or [],
                                                                  "--model-arg").items()}
    for key, flagged in (("input", flag_input), ("model_args", flag_args)):
        if flagged:  # flags win key by key over the recipe's mapping
            recipe = values.get(key) or {}
            if not isinstance(recipe, dict):
                raise QcoreError(f"in {args.config}: '{key}' must be a mapping (key: value)")
            values[key] = {**recipe, **flagged}
    plan = values.pop("plan", None)
    if plan is not None:
        values["allocator"] = "plan"
        options["plan"] = str(plan)
    for key in ("plugin", "method", "quantizer", "calibrator", "allocator", "task", "model", "data", "device"):
        if values.get(key) is not None and not str(values[key]).strip():  # "" would silently mean the default
            raise QcoreError(f"--{key} is empty; give a name (or leave --{key} out for the default)")
    for key in ("weights", "out"):
        if values.get(key) is not None and not str(values[key]).strip():  # Path("") would be the current folder
            raise QcoreError(f"--{key} is empty; give a path (or leave --{key} out)")
        if values.get(key) is not None:
            values[key] = Path(values[key])
    if values.get("out") is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        label = values.get("method") or values.get("plugin") or "uniform"
        model = str(values.get("model") or "default").replace(":", "-").replace("/", "-")
        values["out"] = Path("qcore-runs") / f"{label}-{model}-{stamp}"
    try:
        return RunConfig(**values, options=options, layers=layers)
    except TypeError as exc:
        raise QcoreError(f"bad configuration: {exc}") from None


def _fmt_bops(v: float) -> str:
    return f"{v / 1e9:.3f} G" if v >= 1e8 else f"{v / 1e6:.2f} M"


def summary_table(result: dict[str, Any], out: Path | None) -> str:
    """The human-readable summary of a result (what ``qcore run`` prints)."""
    r = result
    lines = [f"qcore {r['qcore_version']}: method {r['method']} (plugin {r['plugin']}; "
             + ", ".join(f"{k} {v}" for k, v in r["components"].items()) + ")",
             f"task {r['task']}, model {r['model']}"]
    for k, v in r["data"].items():
        lines.append(f"  {k}: {v}")
    lines.append("")
    shown = [k for k in r["fp_metrics"] if "@" not in k]  # per-threshold details stay in result.json
    width = max([len("metric")] + [len(k) + 2 for k in shown]) + 1
    lines.append(f"  {'metric':<{width}}{'FP':>9}{'quant':>10}{'delta':>10}")
    for k in shown:
        fp, q = r["fp_metrics"][k], r["quant_metrics"].get(k)
        star = " *" if k == r["metric"] else ""
        lines.append(f"  {k + star:<{width}}{fp:>9.2f}{q:>10.2f}{q - fp:>+10.2f}")
    wb = "-" if r["w_bits_avg"] is None else f"{r['w_bits_avg']:.2f}"
    ab = "-" if r["a_bits_avg"] is None else f"{r['a_bits_avg']:.2f}"
    lines += ["",
              f"  avg bits   weights {wb}, activations {ab}",
              f"  size       {r['size_mb']:.3f} MiB (FP {r['fp_size_mb']:.3f} MiB, "
              f"{r['fp_size_mb'] / max(r['size_mb'], 1e-12):.1f}x smaller)",
              f"  BOPs       {_fmt_bops(r['bops'])} per sample (FP {_fmt_bops(r['fp_bops'])})",
              f"  quantized  {r['quantized']['summary']}",
              f"  deployable {'yes' if r['quantized']['deployable'] else 'no (simulation only)'}",
              "  time       " + ", ".join(f"{k} {v:.1f}s" for k, v in r["seconds"].items())]
    for key, facts in r.get("measured", {}).items():  # e.g. an entropy-coded rate next to the container bits
        rates = {k.removesuffix("_bits_per_value"): v for k, v in facts.items()
                 if k.endswith("_bits_per_value") and v is not None}
        if rates:
            lines.append(f"  measured   {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items())
                         + " bits/value")
    if out is not None:
        lines.append(f"  wrote      {out / 'result.json'}, {out / 'plan.json'}, {out / 'model.qcore'}")
    return "\n".join(lines)


def _cmd_plugins(host: Host, broken_only: bool) -> None:
    rows = [p.to_json() for p in host.plugins.values() if p.error or not broken_only]
    print(json.dumps(rows, indent=1))


def _cmd_list(host: Host, kind: str, with_options: bool) -> None:
    kind = kind[:-1]
    rows = []
    for name, entry in sorted(host.tables[kind].items()):
        row: dict[str, Any] = {"name": name, "owner": entry.owner}
        obj = entry.obj
        if kind == "method":
            row.update(quantizer=obj.quantizer, calibrator=obj.calibrator, allocator=obj.allocator,
                       default=obj.default, defaults=dict(obj.defaults), description=obj.description)
            if with_options:
                from qcore._allocation import PipelineOptions

                opts: dict[str, Any] = {}
                for k in ("quantizer", "calibrator", "allocator"):
                    cls = host.tables[k].get(getattr(obj, k))
                    if cls is not None:
                        opts.update(describe_options(cls.obj.Options))
                opts.update(describe_options(PipelineOptions))
                for key, value in obj.defaults.items():  # what this method runs with, not the classes' defaults
                    if key in opts:
                        opts[key] = {**opts[key], "default": value, "set_by": "method"}
                row["options"] = opts
        elif kind == "correction":
            row.update(stage="weight" if issubclass(obj, WeightCorrection) else "output", description=obj.description)
            if with_options:
                row["options"] = describe_options(obj.Options)
        elif kind == "model_loader":
            row.update(task=obj.task, description=obj.description)
        else:
            row["description"] = getattr(obj, "description", "")
            if with_options and hasattr(obj, "Options"):
                row["options"] = describe_options(obj.Options)
        rows.append(row)
    print(json.dumps(rows, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "run" and stage_lines_enabled() and not getattr(args, "verbose", False):
        show_stage_lines()
    try:
        host = load_host()
        if args.command == "plugins":
            _cmd_plugins(host, args.broken)
        elif args.command == "list":
            _cmd_list(host, args.kind, args.options)
        elif args.command == "export":
            from qcore._evaluate import export_saved

            print(json.dumps(export_saved(args.file, args.onnx, host, args.w_bits, args.a_bits, args.bit_plan,
                                          not args.no_int4, args.data, args.weights), indent=1, default=str))
        elif args.command == "eval":
            from qcore._evaluate import evaluate_saved

            print(json.dumps(evaluate_saved(args.file, host, args.w_bits, args.a_bits, args.bit_plan,
                                            args.eval_size, args.batch_size, args.device, args.data, args.weights),
                             indent=1, default=str))
        else:
            from qcore._pipeline import run
            from qcore.distributed import is_main

            outcome = run(config_from_args(args), host)
            if is_main():
                print(summary_table(outcome.result, outcome.out))
    except KeyboardInterrupt:
        sys.stderr.write("qcore: interrupted\n")
        return 130
    except BrokenPipeError:  # `qcore plugins | head`: the reader left; not an error of qcore's
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        _report(exc, getattr(args, "traceback", False) or os.environ.get("QCORE_DEBUG", "") not in ("", "0"))
    return 0


def _report(exc: Exception, traceback_wanted: bool) -> NoReturn:
    """One line for any error (a :class:`QcoreError` as it is; anything else named with the stage it broke in and
    a bug-report hint), after the full traceback when asked for."""
    if traceback_wanted:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, QcoreError):  # a component's bug may be one rank's own: every rank reports those, and so
        # does any error once the process group is up (then it may be this rank's data alone, and rank 0 waits)
        _fail(str(exc), every_rank=isinstance(exc, (ComponentError, ContractError)) or _group_started())
    stage = getattr(exc, "qcore_stage", None)
    first = (str(exc).splitlines() or [""])[0][:300]
    _fail(f"internal error{f' in stage {stage!r}' if stage else ''}: {type(exc).__name__}: {first or '(no message)'}"
          + ("" if traceback_wanted else "; rerun with --traceback and report it with the command line"),
          every_rank=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
