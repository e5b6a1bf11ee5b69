"""letter_ext: the compiled and Triton kernels of LETTER as torch ops.

Standalone: it never imports the `letter` library. Ops:
  residual_quantize   residual nearest-code search over L codebooks (RQ-VAE quantization)
"""
from ._version import __version__
from ._backend import BACKENDS
from .ops import residual_quantize

__all__ = ["__version__", "BACKENDS", "residual_quantize"]
