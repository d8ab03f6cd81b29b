"""Kernel 1 (per-channel / per-group mixed-bit fake quantization): Triton vs torch eager vs torch.compile.

    python bench/kernels.py [--repeat 50] [--peak-gbs N]          # on a machine with a CUDA GPU

On a GPU, for realistic layer weights (ResNet-50 and DeiT-B; weights quantized per output channel, mixed bits
0..8 per group of 64 channels, the layout RDOQ produces), times forward and forward+backward of

* ``triton``: qcore-cuda's kernels (what ``qcore::fake_quantize_channels`` runs on CUDA tensors),
* ``eager``: qcore's reference in torch eager (``qcore.ops.fake_quantize_channels(..., kernels="reference")``),
* ``compile``: ``torch.compile`` of that reference,

and reports the median time, the effective bandwidth (forward reads ``x`` and writes the output, backward
also reads the gradient; the per-channel parameters are counted too) and its fraction of the device's peak
(``--peak-gbs``, else ``2 x memory clock x bus width`` from the device properties). Every Triton output is
checked bit for bit against the eager reference before it is timed.

Without a GPU there is nothing to time: the script runs the kernels under Triton's interpreter on CPU tensors
for small slices of the same layers, checks them against the reference and says so. Timings never come from
the interpreter.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

if "--cpu" in sys.argv or not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, so before qcore_cuda imports them

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core/src"), str(ROOT / "cuda/src")]

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from qcore.ops import fake_quantize_channels, fake_quantize_channels_grad, qparams_from_range  # noqa: E402
from qcore.testing import same_bits  # noqa: E402
from qcore_cuda import fake_quant as kernels  # noqa: E402

log = logging.getLogger("bench.kernels")

#: layer weights (output channels first): name -> shape
LAYERS: dict[str, tuple[int, ...]] = {
    "resnet50.conv1": (64, 3, 7, 7),
    "resnet50.layer1.0.conv2": (64, 64, 3, 3),
    "resnet50.layer3.0.conv2": (256, 256, 3, 3),
    "resnet50.layer4.0.conv2": (512, 512, 3, 3),
    "resnet50.layer4.0.conv3": (2048, 512, 1, 1),
    "resnet50.fc": (1000, 2048),
    "deit_b.blocks.0.attn.qkv": (2304, 768),
    "deit_b.blocks.0.attn.proj": (768, 768),
    "deit_b.blocks.0.mlp.fc1": (3072, 768),
    "deit_b.blocks.0.mlp.fc2": (768, 3072),
    "deit_b.head": (1000, 768),
}
GROUP = 64  # channels per bit-width group


def problem(shape: tuple[int, ...], device: str, seed: int = 0) -> tuple[Tensor, tuple[Tensor, ...]]:
    """A weight of ``shape`` and per-channel parameters: symmetric min/max per channel, bits 0..8 per group."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    rows = w.reshape(shape[0], -1)
    groups = -(-shape[0] // GROUP)
    bits = torch.randint(2, 9, (groups,), generator=gen).float()
    bits[torch.rand(groups, generator=gen) < 0.1] = 0.0  # some pruned groups
    bits = bits.repeat_interleave(GROUP)[: shape[0]]
    scale, zero, qmin, qmax = qparams_from_range(rows.amin(1), rows.amax(1), bits, True)
    params = (scale, zero, qmin, qmax, bits, torch.zeros(shape[0]))
    return w.to(device), tuple(p.to(device) for p in params)


def check(w: Tensor, params: tuple[Tensor, ...]) -> None:
    """Triton forward bit for bit, backward within float32 rounding, against the reference."""
    want = fake_quantize_channels(w, *params, 0, kernels="reference")
    if not same_bits(kernels.fake_quantize_channels(w, *params, 0), want):
        raise RuntimeError("the Triton forward differs from the reference")
    grad = torch.randn_like(w)
    torch.testing.assert_close(kernels.fake_quantize_channels_grad(grad, w, *params[:5], 0),
                               fake_quantize_channels_grad(grad, w, *params[:5], 0), rtol=1.2e-7, atol=0.0)


def time_ms(fn: Callable[[], object], repeat: int) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream (after warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_gbs() -> float:
    p = torch.cuda.get_device_properties(0)
    return 2 * p.memory_clock_rate * 1e3 * p.memory_bus_width / 8 / 1e9


def run_gpu(repeat: int, peak: float | None) -> None:
    peak = peak or peak_gbs()
    log.info("device %s, torch %s, peak %.0f GB/s (%s)", torch.cuda.get_device_name(0), torch.__version__, peak,
             "--peak-gbs" if peak != peak_gbs() else "memory clock x bus width")
    reference = lambda w, p: fake_quantize_channels(w, *p, 0, kernels="reference")  # noqa: E731
    compiled = torch.compile(reference, dynamic=False)
    log.info("%-28s %-8s %-8s %10s %9s %7s", "layer", "pass", "impl", "time us", "GB/s", "% peak")
    for name, shape in LAYERS.items():
        w, params = problem(shape, "cuda")
        check(w, params)
        grad = torch.randn_like(w)
        nbytes = w.numel() * w.element_size()
        pbytes = sum(p.numel() * p.element_size() for p in params)
        for impl, fwd in (("triton", lambda w=w, params=params: kernels.fake_quantize_channels(w, *params, 0)),
                          ("eager", lambda w=w, params=params: reference(w, params)),
                          ("compile", lambda w=w, params=params: compiled(w, params))):
            ms = time_ms(fwd, repeat)
            gbs = (2 * nbytes + pbytes) / ms / 1e6
            log.info("%-28s %-8s %-8s %10.1f %9.0f %7.1f", name, "fwd", impl, ms * 1e3, gbs, 100 * gbs / peak)
        ms = time_ms(lambda g=grad, w=w, params=params: kernels.fake_quantize_channels_grad(g, w, *params[:5], 0),
                     repeat)
        gbs = (3 * nbytes + pbytes) / ms / 1e6
        log.info("%-28s %-8s %-8s %10.1f %9.0f %7.1f", name, "bwd", "triton", ms * 1e3, gbs, 100 * gbs / peak)


def run_interpreter() -> None:
    log.info("no CUDA device (%s, torch %s): running the Triton kernels under the interpreter on CPU tensors, "
             "small slices of each layer, for correctness only; no timings (the interpreter says nothing about "
             "GPU speed)", platform.processor() or platform.machine(), torch.__version__)
    if not kernels.interpreted():
        raise RuntimeError("TRITON_INTERPRET=1 was not in effect when the kernels were defined")
    for name, shape in LAYERS.items():
        small = (min(shape[0], 2 * GROUP + 3), *(min(s, 9) for s in shape[1:]))
        w, params = problem(small, "cpu")
        check(w, params)
        log.info("%-28s slice %-18s triton == reference (forward bit for bit, backward within rounding)",
                 name, "x".join(map(str, small)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=50, help="timed runs per measurement (median reported)")
    p.add_argument("--peak-gbs", type=float, default=None, help="the device's peak memory bandwidth, GB/s")
    p.add_argument("--cpu", action="store_true", help="interpreter correctness run even when a GPU is present")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cpu or not torch.cuda.is_available():
        run_interpreter()
    else:
        run_gpu(args.repeat, args.peak_gbs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
