"""letter_ext: the compiled and Triton kernels of LETTER as torch ops.

Standalone: it never imports the `letter` library. Ops:
  residual_quantize   residual nearest-code search over L codebooks (RQ-VAE quantization)
  dot_product_cross_entropy (+ info_nce, codebook_diversity_loss)
                      softmax cross-entropy over dot products without the B x M logits
  constrained_beam_step one fused step of trie-constrained beam search (trie: TrieLevels)
"""
from ._version import __version__
from ._backend import BACKENDS
from .ops import residual_quantize
from .ops import codebook_diversity_loss, dot_product_cross_entropy, info_nce
from .ops import constrained_beam_step
from .trie import TrieLevels, build_trie_levels

__all__ = [
    "__version__",
    "BACKENDS",
    "residual_quantize",
    "dot_product_cross_entropy",
    "info_nce",
    "codebook_diversity_loss",
    "constrained_beam_step",
    "TrieLevels",
    "build_trie_levels",
]
