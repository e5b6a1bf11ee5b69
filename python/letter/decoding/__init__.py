"""Constrained decoding of item identifiers: the prefix index and beam searches.

PrefixIndex.from_codes(codes [I, L], level_sizes, vocab_offsets=None) builds the trie (token of
(level l, code c) = vocab_offsets[l] + c); constrained_beam_search runs the fused
letter_ext.constrained_beam_step per level, optionally never returning given identifiers
(banned_leaves; PrefixIndex.banned_leaves maps excluded items to them); hf_style_beam_search is
the research-code baseline.
"""
from .prefix_index import PrefixIndex
from .search import BeamSearchResult, constrained_beam_search, hf_style_beam_search

__all__ = ["PrefixIndex", "BeamSearchResult", "constrained_beam_search", "hf_style_beam_search"]
