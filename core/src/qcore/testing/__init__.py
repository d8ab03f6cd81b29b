"""What a plugin author imports to test a plugin: tiny models, a tiny task that needs no data, a host
builder, and contract checks for each component role.

    from qcore.testing import check_allocator, make_host, run_tiny

    def test_my_allocator():
        host = make_host(("mine", my_plugin_module))
        check_allocator(host, "my-allocator", target_bits=4.0)

``PLUGINS.md`` (repository root) states each role's contract and what each check asserts.

The ``pytest11`` entry point also provides fixtures (``qcore_host``, ``tiny_convnet``); see
:mod:`qcore.testing.fixtures`.
"""

from qcore.testing.contracts import (
    CORRECTION_TOLERANCE,
    W8A8_AGREEMENT_FLOOR,
    check_allocator,
    check_calibrator,
    check_correction,
    check_quantizer,
    run_tiny,
    uniform_sqnr_floor,
)
from qcore.testing.kernels import FakeQuantCase, fake_quant_case, same_bits
from qcore.testing.tiny import (
    TINY_TASK_PLUGIN,
    TinyResNet,
    TinyTask,
    make_host,
    tiny_convnet,
    tiny_gauss,
    tiny_gelu_mlp,
    tiny_mlp,
    tiny_resnet,
)

__all__ = ["CORRECTION_TOLERANCE", "TINY_TASK_PLUGIN", "TinyTask", "W8A8_AGREEMENT_FLOOR", "check_allocator",
           "check_calibrator", "check_correction", "check_quantizer", "FakeQuantCase", "fake_quant_case", "same_bits",
           "make_host", "run_tiny", "tiny_convnet", "tiny_gauss", "tiny_gelu_mlp", "tiny_mlp", "tiny_resnet",
           "TinyResNet", "uniform_sqnr_floor"]
