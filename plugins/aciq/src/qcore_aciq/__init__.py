"""qcore-aciq: ACIQ (Banner, Nahshan, Soudry, NeurIPS 2019) done right: analytical clipping for the grid that
is really used, exact per-channel bit allocation, data-free weight bias correction, frozen calibration
statistics."""

__version__ = "0.1.0"
