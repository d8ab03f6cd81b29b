"""qcore-cuda's entry point: registers the Triton kernels as the CUDA implementation of qcore's torch ops.

Importing this module (qcore does when it loads plugins) registers, for CUDA tensors only:

* ``qcore::fake_quantize_channels`` (+ ``_backward``) -> :mod:`qcore_cuda.fake_quant` (kernel 1);
* ``qcore::candidate_quantize`` -> :mod:`qcore_cuda.candidates` (kernel 2, RD-curve candidates);
* ``qcore::lsq_fake_quantize`` and ``qcore::adaround_fake_quantize`` (+ ``_backward``) -> :mod:`qcore_cuda.lsq`,
  :mod:`qcore_cuda.adaround` (kernel 3, block reconstruction);
* ``qcore_latticeq::closest_points`` -> :mod:`qcore_cuda.lattice` (kernel 4; only when qcore-latticeq is
  installed, which owns the op);
* ``qcore::dequant_matmul`` -> :mod:`qcore_cuda.packed` (kernel 5, packed low-bit weights).

Inputs the kernels do not cover (see :func:`qcore_cuda.fake_quant.supports`) and machines without Triton run
qcore's reference on the GPU instead, so registering never changes a number. Triton is imported on the first
CUDA call, not here: loading plugins stays cheap, and tests can choose the interpreter first.
The plugin registers no components, so it implements no hooks.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from types import ModuleType

import torch
from torch import Tensor

from qcore import ops, packing

log = logging.getLogger(__name__)

#: the ops this plugin implements on CUDA
OPS = ("qcore::fake_quantize_channels", "qcore::fake_quantize_channels_backward")

_lazy: dict[str, ModuleType] = {}


@functools.cache
def _have_triton() -> bool:
    """Whether Triton is installed (asked once: the kernels' dispatchers call this on every CUDA op call)."""
    return importlib.util.find_spec("triton") is not None


def _kernel_module(name: str) -> ModuleType | None:
    """``qcore_cuda.<name>``, imported on first use (so tests can choose the interpreter first); None when
    Triton is not installed."""
    if name not in _lazy and _have_triton():
        _lazy[name] = importlib.import_module(f"qcore_cuda.{name}")
        log.info("qcore-cuda: Triton kernels of qcore_cuda.%s active for CUDA tensors", name)
    return _lazy.get(name)


def kernels() -> ModuleType | None:
    """:mod:`qcore_cuda.fake_quant`, imported on first use; None when Triton is not installed."""
    return _kernel_module("fake_quant")


def _forward(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
             prune_value: Tensor, axis: int) -> Tensor:
    params = (scale, zero_point, qmin, qmax, bits, prune_value)
    k = kernels()
    if k is None or not k.supports(x, *params):
        return ops.fake_quantize_channels(x, *params, axis, kernels="reference")
    return k.fake_quantize_channels(x, *params, axis)


def _backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
              bits: Tensor, axis: int) -> Tensor:
    params = (scale, zero_point, qmin, qmax, bits)
    k = kernels()
    if k is None or not k.supports(x, *params):
        return ops.fake_quantize_channels_grad(grad, x, *params, axis)
    return k.fake_quantize_channels_grad(grad, x, *params, axis)


torch.library.register_kernel(OPS[0], "cuda", _forward)
torch.library.register_kernel(OPS[1], "cuda", _backward)


# -- kernel 5: dequantize-matmul on packed low-bit weights (qcore.packing) ---------------------------------------

#: ``qcore::dequant_matmul`` (registered by :mod:`qcore.packing`) -> :func:`qcore_cuda.packed.dequant_matmul`
PACKED_OPS = ("qcore::dequant_matmul",)



def packed_kernels() -> ModuleType | None:
    """:mod:`qcore_cuda.packed`, imported on first use; None when Triton is not installed."""
    return _kernel_module("packed")


def _dequant_matmul(x: Tensor, packed: Tensor, bits: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                    prune_value: Tensor, length: int) -> Tensor:
    args = (packed, bits, scale, zero_point, qmin, prune_value, length)
    k = packed_kernels()
    if k is None or not k.supports(x, packed):
        return packing.dequant_matmul_reference(x, *args)
    return k.dequant_matmul(x, *args)


torch.library.register_kernel(PACKED_OPS[0], "cuda", _dequant_matmul)


# -- kernel 4: LatticeQ's closest-vector enumeration (n <= 3), when qcore-latticeq is installed -----------------

#: ``qcore_latticeq::closest_points`` (registered by :mod:`qcore_latticeq.cvp`) -> :mod:`qcore_cuda.lattice`;
#: the op belongs to qcore-latticeq (the algorithm's only users), so it is registered only when that is installed
LATTICE_OPS = ("qcore_latticeq::closest_points",)


def lattice_kernels() -> ModuleType | None:
    """:mod:`qcore_cuda.lattice`, imported on first use; None when Triton is not installed."""
    return _kernel_module("lattice")


def _closest_points(v: Tensor, basis: Tensor, qmin: Tensor, qmax: Tensor, max_offsets: int | None) -> Tensor:
    from qcore_latticeq.cvp import closest_points_reference

    k = lattice_kernels()
    if k is None or not k.supports(v, basis):
        return closest_points_reference(v, basis, qmin, qmax, max_offsets)
    return k.closest_points(v, basis, qmin, qmax, max_offsets)


if importlib.util.find_spec("qcore_latticeq") is not None:
    import qcore_latticeq.cvp  # noqa: F401 - defines the op

    torch.library.register_kernel(LATTICE_OPS[0], "cuda", _closest_points)


# -- kernel 2: every quantization candidate of a layer (RD curves) ---------------------------------------------

OPS = OPS + ("qcore::candidate_quantize",)

def candidate_kernels() -> ModuleType | None:
    """:mod:`qcore_cuda.candidates`, imported on first use; None when Triton is not installed."""
    return _kernel_module("candidates")


def _candidate_quantize(rows: Tensor, bits: Tensor, symmetric: bool, steps: int, lowest: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    k = candidate_kernels()
    if k is None or not k.supports(rows, bits):
        return ops.candidate_quantize(rows, bits, symmetric, steps, lowest, kernels="reference")
    return k.candidate_quantize(rows, bits, symmetric, steps, lowest)


torch.library.register_kernel("qcore::candidate_quantize", "cuda", _candidate_quantize)


# -- kernel 3: LSQ and AdaRound fake quantization for block reconstruction ---------------------------------------

OPS = OPS + ("qcore::lsq_fake_quantize", "qcore::lsq_fake_quantize_backward", "qcore::adaround_fake_quantize",
             "qcore::adaround_fake_quantize_backward")


def recon_kernels() -> dict[str, ModuleType]:
    """``{"lsq": qcore_cuda.lsq, "adaround": qcore_cuda.adaround}``, imported on first use; empty without Triton."""
    found = {name: _kernel_module(name) for name in ("lsq", "adaround")}
    return {name: m for name, m in found.items() if m is not None}


def _lsq_forward(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, bits: Tensor,
                 prune_value: Tensor, axis: int) -> Tensor:
    params = (scale, zero_point, qmin, qmax, bits, prune_value)
    k = recon_kernels().get("lsq")
    if k is None or not k.supports(x, *params):
        return ops.fake_quantize_channels(x, *params, axis, kernels="reference")
    return k.lsq_fake_quantize(x, *params, axis)


def _lsq_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                  bits: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    params = (scale, zero_point, qmin, qmax, bits)
    k = recon_kernels().get("lsq")
    if k is None or not k.supports(x, *params):
        return ops.lsq_fake_quantize_grad(grad, x, *params, axis)
    return k.lsq_fake_quantize_grad(grad, x, *params, axis)


def _adaround_forward(v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
                      bits: Tensor, prune_value: Tensor, axis: int) -> Tensor:
    params = (scale, zero_point, qmin, qmax, bits, prune_value)
    k = recon_kernels().get("adaround")
    if k is None or not k.supports(v, floor, *params):
        return ops.adaround_fake_quantize(v, floor, *params, axis, kernels="reference")
    return k.adaround_fake_quantize(v, floor, *params, axis)


def _adaround_backward(grad: Tensor, v: Tensor, floor: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                       qmax: Tensor, bits: Tensor, axis: int) -> Tensor:
    params = (scale, zero_point, qmin, qmax, bits)
    k = recon_kernels().get("adaround")
    if k is None or not k.supports(v, floor, *params):
        return ops.adaround_fake_quantize_grad(grad, v, floor, *params, axis)
    return k.adaround_fake_quantize_grad(grad, v, floor, *params, axis)


torch.library.register_kernel("qcore::lsq_fake_quantize", "cuda", _lsq_forward)
torch.library.register_kernel("qcore::lsq_fake_quantize_backward", "cuda", _lsq_backward)
torch.library.register_kernel("qcore::adaround_fake_quantize", "cuda", _adaround_forward)
torch.library.register_kernel("qcore::adaround_fake_quantize_backward", "cuda", _adaround_backward)
