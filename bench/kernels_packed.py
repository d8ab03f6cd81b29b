"""Kernels 4 and 5 of qcore-cuda: lattice closest points and the packed-weight dequant-matmul, on a GPU.

    python bench/kernels_packed.py [--repeat 50]          # on a machine with a CUDA GPU (and qcore-latticeq)

Kernel 5 (``qcore::dequant_matmul``): for ResNet-50 / DeiT-B linear layers with per-channel int4, int3, int2 and
a mixed 2/3/4-bit plan, ``y = x @ W^T`` for ``M`` = 1, 16 and 256 input rows, median time of

* ``triton``: qcore-cuda's kernel (reads only the packed codes),
* ``eager``: qcore's reference (unpack, dequantize, matmul in torch),
* ``fp32``: a plain float32 matmul with the dequantized weight already in memory (cuBLAS, TF32 off),

with the weight bytes each reads and the triton kernel's weight traffic in GB/s. Outputs are checked against
the reference (1e-5 relative) before timing.

Kernel 4 (``qcore_latticeq::closest_points``, n = 2 and 3): the exact closest codes of a ResNet-50-size weight
(512 x 4608, per-row 3- and 4-bit codes, skewed bases), the reference on the GPU (Python loop over candidate
offsets) against the reference with the Triton enumeration; the codes must be equal.

Without a GPU there is nothing to time: the kernels run under Triton's interpreter on small CPU cases, are
checked against the references, and the script says so. Timings never come from the interpreter.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

if "--cpu" in sys.argv or not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, so before qcore_cuda imports them

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "core/src"), str(ROOT / "cuda/src"), str(ROOT / "plugins/latticeq/src")]

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from qcore import packing  # noqa: E402
from qcore.ops import int_range, qparams_from_range  # noqa: E402
from qcore_cuda import lattice, packed  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from kernels import time_ms  # noqa: E402  (bench/kernels.py: median CUDA-event time after warm-up)

#: (name, N, K) of the linear layers kernel 5 is timed on
LINEAR = [("resnet50.fc", 1000, 2048), ("deit_b.qkv", 2304, 768), ("deit_b.fc1", 3072, 768),
          ("deit_b.fc2", 768, 3072)]
PLANS = {"int4": (4,), "int3": (3,), "int2": (2,), "mixed 2/3/4": (2, 3, 4)}


def packed_problem(n: int, k: int, group_bits: tuple[int, ...], device: str, seed: int = 0
                   ) -> tuple[Tensor, tuple]:
    """A per-channel symmetric weight ``[n, k]`` with bits repeated over groups of channels, packed."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    bits = torch.tensor(group_bits, dtype=torch.float32).repeat_interleave(-(-n // len(group_bits)))[:n]
    amax = w.abs().amax(1)
    scale, zero, qmin, qmax = qparams_from_range(-amax, amax, bits, True)
    codes = packing.pack_codes(packing.codes_from_weight(w, scale, zero, qmin, qmax), bits)
    args = (codes, bits, scale, zero, qmin, torch.zeros(n), k)
    return w, tuple(a.to(device) if isinstance(a, Tensor) else a for a in args)


def lattice_problem(n: int, rows: int, length: int, device: str, seed: int = 0) -> tuple[Tensor, ...]:
    """Vectors ``[rows, length / n, n]`` of a Gaussian weight, skewed bases, per-row 3/4-bit symmetric bounds."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.eye(n) * 0.3 + 0.15 * torch.randn(rows, n, n, generator=g)
    bits = torch.tensor([3.0, 4.0]).repeat(rows // 2 + 1)[:rows]
    qmin, qmax = int_range(bits, symmetric=True)
    v = torch.randn(rows, length // n, n, generator=g)
    return tuple(t.to(device) for t in (v, basis, qmin, qmax))


def run_gpu(repeat: int) -> None:
    from qcore_latticeq.cvp import closest_points_reference

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = False
    print("| layer | plan | M | triton ms | eager ms | fp32 ms | weight MB packed / fp32 | triton weight GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, k in LINEAR:
        for plan, group_bits in PLANS.items():
            w, args = packed_problem(n, k, group_bits, "cuda")
            dense = packing.dequantize(packing.unpack_codes(*args[:2], k), *args[2:5], args[1], args[5])
            for m in (1, 16, 256):
                x = torch.randn(m, k, device="cuda")
                ref = packing.dequant_matmul_reference(x, *args)
                torch.testing.assert_close(packed.dequant_matmul(x, *args), ref, rtol=1e-5,
                                           atol=1e-5 * float(ref.abs().max()))
                t_tr = time_ms(lambda x=x, args=args: packed.dequant_matmul(x, *args), repeat)
                t_ref = time_ms(lambda x=x, args=args: packing.dequant_matmul_reference(x, *args), repeat)
                t_fp = time_ms(lambda x=x, dense=dense: x @ dense.t(), repeat)
                mb_p, mb_f = args[0].numel() / 1e6, dense.numel() * 4 / 1e6
                print(f"| {name} | {plan} | {m} | {t_tr:.4f} | {t_ref:.4f} | {t_fp:.4f} | {mb_p:.2f} / {mb_f:.2f} "
                      f"| {mb_p / t_tr:.0f} |", flush=True)
    print("\n| lattice n | vectors | reference ms | triton enumeration ms | speed-up | codes equal |")
    print("|---|---|---|---|---|---|")
    for n in (2, 3):
        prob = lattice_problem(n, 512, 4608 - 4608 % n, "cuda")
        ref = closest_points_reference(*prob)
        got = lattice.closest_points(*prob, None)
        t_ref = time_ms(lambda prob=prob: closest_points_reference(*prob), max(repeat // 10, 3))
        t_tr = time_ms(lambda prob=prob: lattice.closest_points(*prob, None), max(repeat // 10, 3))
        print(f"| {n} | {prob[0].shape[0] * prob[0].shape[1]} | {t_ref:.2f} | {t_tr:.2f} | {t_ref / t_tr:.1f}x | "
              f"{'yes' if torch.equal(got, ref) else 'NO'} |", flush=True)


def run_interpreter() -> None:
    from qcore_latticeq.cvp import closest_points_reference

    print(f"no CUDA device ({platform.machine()}): Triton interpreter on CPU tensors, correctness only, no timings")
    for name, n, k in LINEAR:
        for group_bits in PLANS.values():
            _, args = packed_problem(n // 16, k // 16, group_bits, "cpu")
            x = torch.randn(5, k // 16)
            ref = packing.dequant_matmul_reference(x, *args)
            torch.testing.assert_close(packed.dequant_matmul(x, *args), ref, rtol=1e-5,
                                       atol=1e-5 * float(ref.abs().max()))
        print(f"dequant_matmul {name} (1/16 slice, {len(PLANS)} plans): agrees with the reference")
    for n in (2, 3):
        v, basis, qmin, qmax = lattice_problem(n, 8, 96, "cpu")
        same = torch.equal(lattice.closest_points(v, basis, qmin, qmax, None),
                           closest_points_reference(v, basis, qmin, qmax))
        print(f"lattice closest points n={n} (8 x {v.shape[1]} vectors): codes equal the reference: {same}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--cpu", action="store_true", help="use the interpreter even when a GPU is present")
    args = ap.parse_args()
    if packed.interpreted():
        run_interpreter()
    else:
        run_gpu(args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
