"""A slower decoding step that constrained_beam_step is measured against in benchmarks (the
HF-style one, also a supported decoder, is in hf_decoding.py). Returns (scores, parent, token,
node) like the op.
"""
import torch

from .trie import TrieLevels


def torch_gather_step(logits, beam_scores, nodes, trie: TrieLevels, level: int, num_beams: int, max_children: int):
    """Vectorized pure torch (STATIC-style): log_softmax, gather each beam's children padded to
    `max_children` (trie.max_children(level)), top-K over K_in * max_children per row.

    Returns (scores, parent, token, node) [B, K]; empty slots (-inf, *, -1, -1).
    """
    row_ptr, child_token = trie.row_ptr[level], trie.child_token[level]
    batch, k_in = beam_scores.shape
    logp = torch.log_softmax(logits.float(), dim=1)
    node = nodes.reshape(-1).clamp(0, row_ptr.numel() - 2)
    first = row_ptr[node]
    rank = torch.arange(max_children, device=logits.device)
    valid = rank < (row_ptr[node + 1] - first)[:, None]
    edge = (first[:, None] + rank).clamp(max=child_token.numel() - 1)
    candidates = beam_scores.float().reshape(-1, 1) + logp.gather(1, child_token[edge])
    candidates = candidates.masked_fill(~valid, float("-inf")).view(batch, k_in * max_children)
    scores, flat = torch.topk(candidates, num_beams, dim=1)
    chosen = edge.view(batch, -1).gather(1, flat)
    alive = scores > float("-inf")
    token = torch.where(alive, child_token[chosen], -1)
    return scores, flat // max_children, token, torch.where(alive, chosen, -1)
