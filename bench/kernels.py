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

The same table then gets rows for kernel 2 (``cand``: every RDOQ candidate of the layer, 6 bit-widths x groups of
8 output channels, the 100-factor MSE clip search included; Triton vs eager) and kernel 3 (``lsq-bwd``,
``ada-fwd``, ``ada-bwd``: LSQ's backward and AdaRound's soft weight and its backward on the layer's weight;
Triton vs eager vs ``torch.compile``), each checked against the reference first (see :func:`check_candidates`
and :func:`check_recon`).

Then kernels 4 and 5 (``bench/kernels_packed.py``: lattice closest points, packed-weight dequant-matmul; their own
tables) and, on a GPU, RDOQ's fast engine against its reference on a ResNet-50 (``bench/rd_curves.py --model
tv:resnet50``: issue 17's 20x target), unless ``--skip-packed`` / ``--skip-rdoq``.

Without a GPU there is nothing to time: the script runs the kernels under Triton's interpreter on CPU tensors
for small slices of the same layers, checks them against the reference and says so. Timings never come from
the interpreter.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
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


# -- kernel 2 (RD-curve candidates) and kernel 3 (LSQ / AdaRound for reconstruction) -----------------------------

from qcore.ops import (  # noqa: E402
    CANDIDATE_LOWEST,
    CANDIDATE_STEPS,
    adaround_fake_quantize,
    adaround_fake_quantize_grad,
    candidate_quantize,
    lsq_fake_quantize_grad,
    quantize_rows,
)
from qcore_cuda import adaround, candidates, lsq  # noqa: E402

#: RDOQ's candidate bit-widths and channels per group (its defaults on the zoo models)
RD_BITS, RD_GROUP = (2, 3, 4, 5, 6, 8), 8


def candidate_problem(shape: tuple[int, ...], device: str, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A weight's group rows (``RD_GROUP`` output channels per row, as RDOQ sees them) and RDOQ's bit-widths."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    rows = w.reshape(-(-shape[0] // RD_GROUP), -1) if shape[0] % RD_GROUP == 0 else w.reshape(shape[0], -1)
    return rows.to(device), torch.tensor(RD_BITS, dtype=torch.float32, device=device)


def check_candidates(rows: Tensor, bits: Tensor, steps: int = CANDIDATE_STEPS) -> int:
    """Kernel 2 against the reference: rows quantized bit for bit on the kernel's ranges, ranges bit for bit
    except where two factors tie within rounding; returns how many (bit-width, row) choices differ."""
    lo, hi, q = candidates.candidate_quantize(rows, bits, True, steps, CANDIDATE_LOWEST)
    want_lo, want_hi, _ = candidate_quantize(rows, bits, True, steps, CANDIDATE_LOWEST, kernels="reference")
    if not same_bits(q, quantize_rows(rows, lo, hi, bits, True)):
        raise RuntimeError("the Triton candidates differ from the reference quantization")
    return int(((lo != want_lo) | (hi != want_hi)).sum())


def recon_problem(shape: tuple[int, ...], device: str) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """A weight, AdaRound's ``V`` and ``floor(W / s)`` and per-channel parameters (kernel 1's problem)."""
    w, params = problem(shape, device)
    v = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device) * 2
    floor = torch.floor(w / params[0].reshape(-1, *([1] * (w.dim() - 1))))
    return w, torch.stack([v, floor]), params


def check_recon(w: Tensor, vf: Tensor, params: tuple[Tensor, ...]) -> None:
    """Kernel 3 against the reference (LSQ backward; AdaRound forward and backward within rounding)."""
    grad = torch.randn_like(w)
    gx, gs = lsq.lsq_fake_quantize_grad(grad, w, *params[:5], 0)
    want_gx, want_gs = lsq_fake_quantize_grad(grad, w, *params[:5], 0)
    if not same_bits(gx, want_gx):
        raise RuntimeError("the Triton LSQ gradient to x differs from the reference")
    torch.testing.assert_close(gs, want_gs, rtol=1e-5, atol=1e-5 * float(want_gs.abs().max()))
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(adaround.adaround_fake_quantize(vf[0], vf[1], *params, 0),
                               adaround_fake_quantize(vf[0], vf[1], *params, 0, kernels="reference"),
                               rtol=2 * eps, atol=float(params[0].max()) * eps)
    want = adaround_fake_quantize_grad(grad, vf[0], vf[1], *params[:5], 0)
    torch.testing.assert_close(adaround.adaround_fake_quantize_grad(grad, vf[0], vf[1], *params[:5], 0), want,
                               rtol=4 * eps, atol=4 * eps * float(want.abs().max()))


def _row(name: str, what: str, impl: str, ms: float, nbytes: float, peak: float) -> None:
    gbs = nbytes / ms / 1e6
    log.info("%-28s %-8s %-8s %10.1f %9.0f %7.1f", name, what, impl, ms * 1e3, gbs, 100 * gbs / peak)


def _compiled(fn: Callable[..., object]) -> Callable[..., object] | None:
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as exc:  # a backend that cannot compile it: the row says n/a
        log.info("torch.compile unavailable for %s: %s", getattr(fn, "__name__", fn), exc)
        return None


def run_gpu_rd_recon(repeat: int, peak: float | None) -> None:
    """Rows for kernels 2 and 3 in the same table. Bytes: kernel 2 counts every read of a row (min/max,
    ``steps`` factors, the final quantization) per bit-width and the quantized rows written; LSQ backward reads
    ``x`` and the gradient and writes ``grad_x`` and the step's two per-element terms; AdaRound reads ``V`` and
    ``floor`` (and the gradient) and writes one tensor."""
    peak = peak or peak_gbs()
    for name, shape in LAYERS.items():
        _gpu_rd_recon_layer(name, shape, repeat, peak)


def _gpu_rd_recon_layer(name: str, shape: tuple[int, ...], repeat: int, peak: float) -> None:
    rows, bits = candidate_problem(shape, "cuda")
    ties = check_candidates(rows, bits)
    nbytes = rows.numel() * 4 * len(RD_BITS) * (CANDIDATE_STEPS + 3)
    _row(name, "cand", "triton", time_ms(lambda: candidates.candidate_quantize(
        rows, bits, True, CANDIDATE_STEPS, CANDIDATE_LOWEST), max(3, repeat // 10)), nbytes, peak)
    _row(name, "cand", "eager", time_ms(lambda: candidate_quantize(rows, bits, True, kernels="reference"),
                                        max(3, repeat // 10)), nbytes, peak)
    if ties:
        log.info("%-28s %d of %d clip choices differ from the reference (float32 ties)", name, ties,
                 rows.shape[0] * len(RD_BITS))
    w, vf, params = recon_problem(shape, "cuda")
    check_recon(w, vf, params)
    grad = torch.randn_like(w)
    n = w.numel() * 4
    rows_ = (("lsq-bwd", 5 * n, lambda: lsq.lsq_fake_quantize_grad(grad, w, *params[:5], 0),
              lambda: lsq_fake_quantize_grad(grad, w, *params[:5], 0)),
             ("ada-fwd", 3 * n, lambda: adaround.adaround_fake_quantize(vf[0], vf[1], *params, 0),
              lambda: adaround_fake_quantize(vf[0], vf[1], *params, 0, kernels="reference")),
             ("ada-bwd", 4 * n, lambda: adaround.adaround_fake_quantize_grad(grad, vf[0], vf[1], *params[:5], 0),
              lambda: adaround_fake_quantize_grad(grad, vf[0], vf[1], *params[:5], 0)))
    for what, nbytes, triton_fn, eager_fn in rows_:
        _row(name, what, "triton", time_ms(triton_fn, repeat), nbytes, peak)
        _row(name, what, "eager", time_ms(eager_fn, repeat), nbytes, peak)
        compiled = _compiled(eager_fn)
        if compiled is not None:
            _row(name, what, "compile", time_ms(compiled, repeat), nbytes, peak)


def run_interpreter_rd_recon() -> None:
    """Kernels 2 and 3 under the interpreter on small slices of the same layers: correctness only."""
    for name, shape in LAYERS.items():
        small = (min(shape[0], 2 * RD_GROUP + 3), *(min(s, 5) for s in shape[1:]))
        # two groups and 3 factors: the interpreter runs each (bit-width, row) program's loops slowly
        rows, bits = candidate_problem((min(shape[0], 2 * RD_GROUP), *small[1:]), "cpu")
        ties = check_candidates(rows, bits, steps=3)
        w, vf, params = recon_problem(small, "cpu")
        check_recon(w, vf, params)
        log.info("%-28s slice %-18s candidates (2 groups, 3 factors; %d float32 ties), LSQ backward, AdaRound: "
                 "triton == reference", name, "x".join(map(str, small)), ties)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=50, help="timed runs per measurement (median reported)")
    p.add_argument("--peak-gbs", type=float, default=None, help="the device's peak memory bandwidth, GB/s")
    p.add_argument("--cpu", action="store_true", help="interpreter correctness run even when a GPU is present")
    p.add_argument("--skip-packed", action="store_true", help="leave out kernels 4 and 5 (bench/kernels_packed.py)")
    p.add_argument("--skip-rdoq", action="store_true",
                   help="leave out RDOQ's fast vs reference engine on ResNet-50 (GPU only; minutes)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu:
        run_interpreter()
        run_interpreter_rd_recon()
    else:
        run_gpu(args.repeat, args.peak_gbs)
        run_gpu_rd_recon(args.repeat, args.peak_gbs)
    if not args.skip_packed:  # kernels 4 and 5: their own tables (other columns), same interpreter/GPU rule
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import kernels_packed

        print()
        if kernels_packed.packed.interpreted():
            kernels_packed.run_interpreter()
        else:
            kernels_packed.run_gpu(args.repeat)
    rd = [sys.executable, str(ROOT / "bench/rd_curves.py"), "--model", "tv:resnet50", "--device", "cuda", "--engines",
          "reference", "fast", "--samples", "32", "--group", "64"]
    if gpu and not args.skip_rdoq:  # issue 17's 20x target: RDOQ's fast engine vs the reference on ResNet-50
        print("\nRDOQ curves, fast vs reference engine, ResNet-50 (seeded random weights): bench/rd_curves.py",
              " ".join(rd[2:]))
        subprocess.run(rd, check=True)
    else:
        print("\nRDOQ fast vs reference engine on ResNet-50 (the 20x target): GPU only, not run here; on a GPU this "
              "script runs: python bench/rd_curves.py " + " ".join(rd[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
