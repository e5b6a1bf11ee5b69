"""letter_ext: the compiled and Triton kernels of LETTER as torch ops.

Standalone: it never imports the `letter` library. Ops:
  residual_quantize   residual nearest-code search over L codebooks (RQ-VAE quantization)
  dot_product_cross_entropy (+ info_nce, codebook_diversity_loss)
                      softmax cross-entropy over dot products without the B x M logits
  constrained_beam_step one fused step of trie-constrained beam search (trie: TrieLevels)

Each op lives in letter_ext/<op>.py (public function, fake and autograd registration), like its
kernels csrc/cpu/<op>.cpp and letter_ext/triton/<op>.py. The package attribute letter_ext.<op> is
the function (it shadows the submodule of the same name; import the module from sys.modules or
with `from letter_ext.<op> import ...`). isa()/set_isa()/supported_isas(): the instruction set of
the C++ CPU kernels (chosen at run time from the CPU; forcing a narrower one is for tests).
"""
from ._version import __version__
from ._backend import BACKENDS, isa, set_isa, supported_isas
from .residual_quantize import residual_quantize
from .dot_product_cross_entropy import codebook_diversity_loss, dot_product_cross_entropy, info_nce
from .constrained_beam_step import constrained_beam_step
from .trie import TrieLevels, build_trie_levels

__all__ = [
    "__version__",
    "BACKENDS",
    "isa",
    "set_isa",
    "supported_isas",
    "residual_quantize",
    "dot_product_cross_entropy",
    "info_nce",
    "codebook_diversity_loss",
    "constrained_beam_step",
    "TrieLevels",
    "build_trie_levels",
]
