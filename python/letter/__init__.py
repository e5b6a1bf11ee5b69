"""LETTER: learnable item tokenization for generative recommendation.

Stages (each reads and writes files, so each can run alone):
prepare data -> text embeddings -> SASRec CF embeddings -> LETTER tokenizer -> generative
recommender (TIGER) -> evaluation. The hot kernels live in the standalone `letter_ext` package.
"""
from letter_ext import __version__

__all__ = ["__version__"]
