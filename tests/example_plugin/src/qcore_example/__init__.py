"""qcore-example: the worked example of ``PLUGINS.md``, written only against qcore's public API.

* quantizer ``example-pow2`` (:mod:`qcore_example.quantizer`): a uniform integer grid whose scales are powers
  of two, calibrated through the :class:`qcore.FakeQuantizer` protocol by any range calibrator;
* calibrator ``example-percentile`` (:mod:`qcore_example.calibrator`): weight and activation clip ranges at
  percentiles of their values;
* allocators ``example-greedy`` (bits per layer, greedily by weight MSE per bit, within ``--target-bits``) and
  ``example-all8`` (every layer W8A8) (:mod:`qcore_example.allocator`);
* methods ``example-pow2`` (the default: the three above) and ``example`` (W8A8 everywhere), and a ``toy`` task
  whose model has no quantizable layer (:mod:`qcore_example.plugin`, :mod:`qcore_example.task`).
"""

from qcore_example.allocator import AllEight, GreedyAllocator
from qcore_example.calibrator import ExamplePercentileCalibrator
from qcore_example.quantizer import PowerOfTwoFakeQuant, PowerOfTwoQuantizer
from qcore_example.task import ToyTask

__all__ = ["AllEight", "ExamplePercentileCalibrator", "GreedyAllocator", "PowerOfTwoFakeQuant",
           "PowerOfTwoQuantizer", "ToyTask"]
