"""Without a GPU, the kernels run on CPU tensors under Triton's interpreter.

``TRITON_INTERPRET`` is read when a kernel is defined (``@triton.jit`` at import of
:mod:`qcore_cuda.fake_quant`), so it is set here, before any test imports the kernels; qcore-cuda's plugin
module imports them only on the first CUDA call, so loading plugins earlier in the session does not fix the mode.
With a GPU the same tests run the compiled kernels on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
