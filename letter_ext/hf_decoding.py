"""Constrained decoding the way Hugging Face generate() does it with a prefix_allowed_tokens_fn:
a Python callback per beam over a dict trie. A supported decoder (letter.decoding's `--decoder hf`)
and the reference point constrained_beam_step is benchmarked against. Returns (scores, parent,
token) like the op.
"""
import torch

from .trie import TrieLevels


def dict_trie(trie: TrieLevels) -> dict:
    """The trie as nested dicts {token: subtree}; the last level maps token -> leaf id."""
    root: dict = {}
    for leaf, tokens in enumerate(trie.leaf_tokens().tolist()):
        node = root
        for token in tokens[:-1]:
            node = node.setdefault(token, {})
        node[tokens[-1]] = leaf
    return root


def prefix_allowed_tokens_fn(root: dict):
    """HF `prefix_allowed_tokens_fn(batch_id, prefix)` over a dict trie: the tokens that may follow
    `prefix` (the beam's row of generated tokens, a tensor as HF passes it, or a list); [] for a
    prefix not in the trie."""

    def allowed(batch_id: int, prefix) -> list[int]:
        node = root
        for token in prefix.tolist() if isinstance(prefix, torch.Tensor) else prefix:
            node = node.get(token)
            if not isinstance(node, dict):
                return []
        return list(node)

    return allowed


def hf_style_step(logits, beam_scores, prefixes, allowed_tokens_fn, num_beams: int):
    """What HF generate() does with prefix_allowed_tokens_fn (PrefixConstrainedLogitsProcessor):
    one Python call per beam, given that beam's row of generated tokens, filling a -inf mask
    [B*K_in, V]; then log_softmax + mask + beam score and top-K over K_in * V per row.

    prefixes: [B*K_in, level] tokens generated so far. Returns (scores, parent, token) [B, K];
    slots without a valid candidate have score -inf and an arbitrary token.
    """
    batch, k_in = beam_scores.shape
    vocab = logits.shape[1]
    mask = torch.full_like(logits, float("-inf"), dtype=torch.float32)
    for i in range(prefixes.shape[0]):
        mask[i, allowed_tokens_fn(i // k_in, prefixes[i])] = 0.0
    logp = torch.log_softmax(logits.float(), dim=1) + mask
    candidates = (beam_scores.float().reshape(-1, 1) + logp).view(batch, k_in * vocab)
    scores, flat = torch.topk(candidates, num_beams, dim=1)
    return scores, flat // vocab, flat % vocab
