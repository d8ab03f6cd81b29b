"""qcore-cuda: GPU kernels for qcore's torch ops.

Importing :mod:`qcore_cuda.plugin` (qcore does when it loads plugins; ``import qcore_cuda.plugin`` does it by
hand) registers the Triton kernels of :mod:`qcore_cuda.fake_quant` as the CUDA implementation of
``qcore::fake_quantize_channels`` and its backward. CPU tensors keep qcore's reference implementation; the
kernels are tested on CPU with Triton's interpreter, bit for bit against the reference.
"""

__version__ = "0.1.0"
