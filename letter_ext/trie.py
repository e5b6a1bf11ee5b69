"""Tensor form of a prefix trie over item identifiers, as consumed by `constrained_beam_step`.

Items are code sequences of length L; the token of (level l, code c) is vocab_offsets[l] + c.
Nodes at depth d are the distinct prefixes of length d (depth 0: the root, node 0), numbered in
lexicographic order. Level l holds the edges from depth l to depth l + 1 in CSR form:

    children of node n (depth l) = child_token[l][row_ptr[l][n] : row_ptr[l][n + 1]]

in strictly increasing token order, and the child reached through edge e has node id e at depth
l + 1. So level 0 is a single dense row (every valid first token), and the node ids of the last
level are the leaves: the distinct full code sequences.

Bans: per batch row a CSR (ptr [B + 1], ids [nnz]) of node ids. TrieLevels.banned_nodes turns
banned leaves into what constrained_beam_step takes at each level: the nodes whose whole subtree
is banned, so that a prefix with no allowed leaf left never takes a beam.
"""
import operator
from typing import NamedTuple, Sequence

import torch

from ._checks import has_values


class TrieLevels(NamedTuple):
    """Prefix trie as per-level CSR arrays (see the module docstring).

    row_ptr[l]: int64 [n_l + 1] (n_0 = 1), child_token[l]: int64 [n_{l+1}];
    level_sizes[l]: codes at level l; vocab_offsets[l]: token id of code 0 at level l.
    """

    row_ptr: tuple[torch.Tensor, ...]
    child_token: tuple[torch.Tensor, ...]
    level_sizes: tuple[int, ...]
    vocab_offsets: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        """1 + the largest token id any level may use: logits must be at least this wide."""
        return max(o + s for o, s in zip(self.vocab_offsets, self.level_sizes))

    @property
    def num_levels(self) -> int:
        return len(self.row_ptr)

    @property
    def num_leaves(self) -> int:
        return self.child_token[-1].numel()

    @property
    def device(self) -> torch.device:
        return self.child_token[0].device

    def max_children(self, level: int) -> int:
        """Largest number of children of one node at depth `level`."""
        return int(torch.diff(self.row_ptr[level]).max())

    def leaf_tokens(self) -> torch.Tensor:
        """Token sequence of every leaf, [num_leaves, L] int64 (leaf order = lexicographic)."""
        # Walk up from the leaves: the parent of edge e at level l is the CSR row containing e.
        node = torch.arange(self.num_leaves, device=self.device)
        columns = []
        for level in reversed(range(self.num_levels)):
            columns.append(self.child_token[level][node])
            node = torch.searchsorted(self.row_ptr[level], node, right=True) - 1
        return torch.stack(columns[::-1], 1)

    def banned_nodes(
        self, banned_ptr: torch.Tensor, banned_leaf: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Per-row banned leaves -> per level, the banned nodes to pass to constrained_beam_step.

        Args: banned_ptr int64 [B + 1], banned_leaf int64 [nnz] (a CSR: row b bans the leaves
        banned_leaf[banned_ptr[b]:banned_ptr[b + 1]], any order, duplicates allowed), on the
        trie's device.
        Returns one (ptr [B + 1], node [nnz_l]) per level l: for each row, the nodes at depth
        l + 1 all of whose leaves it bans, sorted and distinct (at the last level: its banned
        leaves). With these at every level a search never spends a beam on a prefix without an
        allowed leaf, so it returns min(K, allowed leaves) identifiers, none banned.
        """
        check_csr("banned_ptr", "banned_leaf", banned_ptr, banned_leaf, self.num_leaves, self.device)
        batch = banned_ptr.numel() - 1
        row = torch.repeat_interleave(
            torch.arange(batch, device=self.device), torch.diff(banned_ptr), output_size=banned_leaf.numel()
        )
        # (row, node) pairs as one int64 key, row-major: B * nodes is far below 2^63 for any trie
        # that fits in memory.
        key = torch.unique(row * self.num_leaves + banned_leaf)
        num_nodes = self.num_leaves
        out = []
        for level in reversed(range(self.num_levels)):
            row, node = key // num_nodes, key % num_nodes
            ptr = torch.zeros(batch + 1, dtype=torch.long, device=self.device)
            ptr[1:] = torch.cumsum(torch.bincount(row, minlength=batch), 0)
            out.append((ptr, node))
            # A parent (depth `level`) is wholly banned when all of its children are; children of
            # one parent are consecutive, so sorted keys give sorted (row, parent) runs.
            level_ptr = self.row_ptr[level]
            parent = torch.searchsorted(level_ptr, node, right=True) - 1
            num_nodes = level_ptr.numel() - 1
            key, banned_children = torch.unique_consecutive(row * num_nodes + parent, return_counts=True)
            degree = torch.diff(level_ptr)[key % num_nodes]
            key = key[banned_children == degree]
        return tuple(out[::-1])

    def to(self, device) -> "TrieLevels":
        return TrieLevels(
            tuple(t.to(device) for t in self.row_ptr),
            tuple(t.to(device) for t in self.child_token),
            self.level_sizes,
            self.vocab_offsets,
        )


def check_csr(ptr_name: str, ids_name: str, ptr, ids, num_ids: int, device: torch.device) -> None:
    """Raise TypeError/ValueError naming the argument unless (ptr, ids) is an int64 CSR on `device`
    with every id in [0, num_ids)."""
    for name, t in ((ptr_name, ptr), (ids_name, ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.long:
            raise TypeError(f"{name} must be an int64 tensor, got dtype {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")
    if ptr.numel() == 0:
        raise ValueError(f"{ptr_name} must be [B + 1], got an empty tensor")
    if not (has_values(ptr) and has_values(ids)):
        return
    nnz = ids.numel()
    if nnz == 0:  # one reduction: an empty CSR's pointer is all zeros
        bad_ptr, bad_id = bool(ptr.any()), False
    else:  # both checks in one device -> host copy
        bad_ptr, bad_id = torch.stack([
            (ptr[0] != 0) | (ptr[-1] != nnz) | (torch.diff(ptr) < 0).any(),
            ((ids < 0) | (ids >= num_ids)).any(),
        ]).tolist()
    if bad_ptr:
        raise ValueError(f"{ptr_name} must be a CSR row pointer: starts at 0, never decreases, ends at nnz = {nnz}")
    if bad_id:
        raise ValueError(f"{ids_name} must hold ids in [0, {num_ids})")


def csr_from_rows(rows, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of B sequences of ints -> (ptr int64 [B + 1], ids int64 [nnz]) on `device`."""
    try:
        rows = [[int(v) for v in row] for row in rows]
    except (TypeError, ValueError) as e:
        raise TypeError(f"expected a list of sequences of integer ids: {e}") from e
    ptr = torch.zeros(len(rows) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.tensor([len(row) for row in rows], dtype=torch.long), 0)
    ids = torch.tensor([v for row in rows for v in row], dtype=torch.long)
    return ptr.to(device), ids.to(device)


def _as_int_list(name: str, values, length: int) -> list[int]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:  # operator.index, not int(): a float (3.5) or a string would be truncated or parsed
        out = [operator.index(v) for v in values]
    except TypeError as e:
        raise TypeError(f"{name} must be a sequence of {length} integers") from e
    if len(out) != length:
        raise ValueError(f"{name} must have one entry per level ({length}), got {len(out)}")
    return out


def check_codes(codes, level_sizes: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """Validate item codes [I, L] against per-level code counts; returns (codes int64, level_sizes)."""
    if not isinstance(codes, torch.Tensor):
        try:
            codes = torch.as_tensor(codes)
        except (ValueError, TypeError) as e:  # ragged nested lists land here
            raise ValueError(f"codes must be a rectangular [I, L] integer array: {e}") from e
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got dtype {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be [I, L] (one row of L codes per item), got shape {tuple(codes.shape)}")
    num_items, num_levels = codes.shape
    if num_items == 0:
        raise ValueError("codes is empty: the catalog needs at least one item")
    if num_levels == 0:
        raise ValueError("codes must have L >= 1 levels")
    sizes = _as_int_list("level_sizes", level_sizes, num_levels)
    if min(sizes) < 1:
        raise ValueError(f"level_sizes must be >= 1, got {sizes}")
    codes = codes.long()
    low = codes.min(0).values.tolist()
    high = codes.max(0).values.tolist()
    for level, (lo, hi, size) in enumerate(zip(low, high, sizes)):
        if lo < 0 or hi >= size:
            raise ValueError(f"codes out of vocabulary at level {level}: values in [{lo}, {hi}], level size {size}")
    return codes, sizes


def default_vocab_offsets(level_sizes: Sequence[int]) -> list[int]:
    """Offsets of consecutive per-level token ranges: [0, n_0, n_0 + n_1, ...]."""
    offsets, total = [], 0
    for size in level_sizes:
        offsets.append(total)
        total += size
    return offsets


def build_trie_levels(codes, level_sizes: Sequence[int], vocab_offsets: Sequence[int] | None = None):
    """Build the trie of item codes on their device, vectorized (no Python loop over items).

    Args:
        codes: [I, L] integer codes, item i = row i; 0 <= codes[:, l] < level_sizes[l].
        level_sizes: codes per level.
        vocab_offsets: token id of (l, c) is vocab_offsets[l] + c (default: cumulative level sizes).

    Returns:
        (trie: TrieLevels, leaf_of_item: int64 [I] — the leaf (node id at depth L) of each item,
        order: int64 [I] — the items sorted by code sequence, ties by item id).
    """
    codes, sizes = check_codes(codes, level_sizes)
    num_items, num_levels = codes.shape
    offsets = default_vocab_offsets(sizes) if vocab_offsets is None else _as_int_list(
        "vocab_offsets", vocab_offsets, num_levels
    )
    if min(offsets) < 0:
        raise ValueError(f"vocab_offsets must be >= 0, got {offsets}")
    device = codes.device
    # Lexicographic order by stable sorts from the last level to the first (radix style): works
    # for any number of levels (a packed key could overflow int64) and keeps item ids ascending
    # among equal sequences.
    order = torch.arange(num_items, device=device)
    for level in reversed(range(num_levels)):
        order = order[torch.sort(codes[order, level], stable=True).indices]
    sorted_codes = codes[order]
    new_prefix = torch.zeros(num_items, dtype=torch.bool, device=device)
    new_prefix[0] = True
    node_of_row = torch.zeros(num_items, dtype=torch.long, device=device)  # node at depth `level`
    row_ptr, child_token = [], []
    for level in range(num_levels):
        # Row i opens a new prefix of length level + 1 when it differs from row i - 1 in any of
        # the first level + 1 codes.
        new_prefix[1:] |= sorted_codes[1:, level] != sorted_codes[:-1, level]
        edge_rows = new_prefix.nonzero().squeeze(1)
        parents = node_of_row[edge_rows]
        num_parents = int(node_of_row[-1]) + 1
        ptr = torch.zeros(num_parents + 1, dtype=torch.long, device=device)
        ptr[1:] = torch.cumsum(torch.bincount(parents, minlength=num_parents), 0)
        row_ptr.append(ptr)
        child_token.append(sorted_codes[edge_rows, level] + offsets[level])
        node_of_row = torch.cumsum(new_prefix.long(), 0) - 1
    leaf_of_item = torch.empty_like(order)
    leaf_of_item[order] = node_of_row
    return TrieLevels(tuple(row_ptr), tuple(child_token), tuple(sizes), tuple(offsets)), leaf_of_item, order
