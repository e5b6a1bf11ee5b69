"""PrefixIndex: the trie of item identifiers that constrained decoding walks, plus leaf -> items."""
import warnings
from typing import Sequence

import torch

from letter.errors import DataError
from letter.runs import torch_save
from letter_ext.hf_decoding import dict_trie
from letter_ext.trie import TrieLevels, build_trie_levels, csr_from_rows

_FORMAT = "letter.prefix_index"
_VERSION = 1


class PrefixIndex:
    """Which tokens may follow each identifier prefix, and which items each full identifier names.

    Vocabulary contract (shared with the recommender): the token id of (level l, code c) is
    `vocab_offsets[l] + c`; the model's vocabulary may hold more ids (PAD/EOS/BOS, ...), which are
    never valid continuations. Item i is row i of the codes the index was built from.

    Attributes:
        trie: letter_ext.TrieLevels (CSR per level; node ids in lexicographic prefix order). The
            node ids after the last level are the leaves: the distinct identifiers.
        num_levels, num_items, num_leaves; level_sizes, vocab_offsets: lists of ints.
        leaf_of_item: int64 [I], the leaf of each item (two items share an identifier iff their
            leaves are equal: the evaluation rule "hit when the generated identifier equals the
            target's" is `leaf == leaf_of_item[target]`).
        leaf_ptr, leaf_items: CSR leaf -> items; leaf_items[leaf_ptr[f]:leaf_ptr[f + 1]] are the
            items of leaf f in increasing id order. first_item_of_leaf: int64 [num_leaves].
        duplicate_leaves: int64 ids of the leaves shared by several items (empty if none).
    """

    def __init__(self, trie: TrieLevels, leaf_of_item: torch.Tensor, leaf_items: torch.Tensor):
        self.trie = trie
        self.leaf_of_item = leaf_of_item
        self.leaf_items = leaf_items
        counts = torch.bincount(leaf_of_item, minlength=trie.num_leaves)
        self.leaf_ptr = torch.zeros(trie.num_leaves + 1, dtype=torch.long, device=leaf_of_item.device)
        self.leaf_ptr[1:] = torch.cumsum(counts, 0)
        self.first_item_of_leaf = leaf_items[self.leaf_ptr[:-1]]
        self.duplicate_leaves = (counts > 1).nonzero().squeeze(1)
        self._dict_trie = None

    @classmethod
    def from_codes(cls, codes, level_sizes: Sequence[int], vocab_offsets: Sequence[int] | None = None, *, device=None):
        """Build from item codes [I, L] (0 <= codes[:, l] < level_sizes[l]) on `device` (default:
        the codes' device; CPU and GPU give the same index). 1M items x 4 levels: about a second.

        vocab_offsets default to the cumulative level sizes (a vocabulary without special tokens).
        Identifiers shared by several items are allowed; see `duplicate_leaves`/`items_of_leaf`.
        Bad codes (out of vocabulary, ragged rows, empty catalog, wrong rank or dtype) raise
        DataError (a ValueError) or TypeError naming the argument.
        """
        try:
            if not isinstance(codes, torch.Tensor):
                codes = torch.as_tensor(codes)
        except (ValueError, TypeError) as e:  # ragged rows land here
            raise DataError(f"codes must be a rectangular [I, L] integer array: {e}") from e
        if device is not None:
            codes = codes.to(device)
        try:
            trie, leaf_of_item, order = build_trie_levels(codes, level_sizes, vocab_offsets)
        except ValueError as e:
            raise DataError(f"cannot build a PrefixIndex from codes: {e}") from e
        index = cls(trie, leaf_of_item, order)
        if index.duplicate_leaves.numel():
            info = index.summary()
            warnings.warn(
                f"{info['items_sharing_a_leaf']} items share {info['shared_leaves']} identifiers; decoding "
                "returns the first item of each and lists the others in BeamSearchResult.item_groups",
                stacklevel=2,
            )
        return index

    @property
    def num_levels(self) -> int:
        return self.trie.num_levels

    @property
    def num_items(self) -> int:
        return self.leaf_of_item.numel()

    @property
    def num_leaves(self) -> int:
        return self.trie.num_leaves

    @property
    def level_sizes(self) -> list[int]:
        return list(self.trie.level_sizes)

    @property
    def vocab_offsets(self) -> list[int]:
        return list(self.trie.vocab_offsets)

    @property
    def device(self) -> torch.device:
        return self.trie.device

    def items_of_leaf(self, leaf: int) -> list[int]:
        """All item ids whose identifier is leaf `leaf`, in increasing order."""
        leaf = int(leaf)
        if not 0 <= leaf < self.num_leaves:
            raise ValueError(f"leaf must be in [0, {self.num_leaves}), got {leaf}")
        return self.leaf_items[int(self.leaf_ptr[leaf]) : int(self.leaf_ptr[leaf + 1])].tolist()

    def banned_leaves(self, items_per_row) -> tuple[torch.Tensor, torch.Tensor]:
        """Items to exclude per batch row -> the leaves to ban, as constrained_beam_search's
        `banned_leaves` takes them.

        items_per_row: a list of B sequences of item ids (duplicates allowed). Collision rule: a
        leaf named by several items (a shared identifier) is banned only when ALL its items are
        excluded for that row; while one of them is still allowed the identifier can be
        recommended (it stands for that item too). Returns (ptr int64 [B + 1], leaf int64 [nnz])
        on the index's device, each row's leaves sorted and distinct. Item ids outside
        [0, num_items) raise ValueError naming the row.
        """
        ptr, items = csr_from_rows(items_per_row, self.device)
        bad = ((items < 0) | (items >= self.num_items)).nonzero()
        if bad.numel():
            position = int(bad[0, 0])
            row = int(torch.searchsorted(ptr, position, right=True)) - 1
            raise ValueError(
                f"items_per_row[{row}] holds item id {int(items[position])}, outside [0, {self.num_items})"
            )
        batch = ptr.numel() - 1
        row = torch.repeat_interleave(
            torch.arange(batch, device=self.device), torch.diff(ptr), output_size=items.numel()
        )
        # Distinct (row, item) pairs, then per (row, leaf) how many of the leaf's items are excluded.
        pairs = torch.unique(row * self.num_items + items)
        row, items = pairs // self.num_items, pairs % self.num_items
        keys, excluded = torch.unique(row * self.num_leaves + self.leaf_of_item[items], return_counts=True)
        leaf = keys % self.num_leaves
        keep = excluded == self.leaf_ptr[leaf + 1] - self.leaf_ptr[leaf]
        keys, leaf = keys[keep], leaf[keep]
        out_ptr = torch.zeros(batch + 1, dtype=torch.long, device=self.device)
        out_ptr[1:] = torch.cumsum(torch.bincount(keys // self.num_leaves, minlength=batch), 0)
        return out_ptr, leaf

    def leaf_codes(self) -> torch.Tensor:
        """Per-level codes of every leaf, [num_leaves, L] int64."""
        return self.trie.leaf_tokens() - torch.tensor(self.vocab_offsets, device=self.device)

    def dict_trie(self) -> dict:
        """The trie as nested dicts {token: subtree}, last level token -> leaf id (HF-style
        decoding); built once per index."""
        if self._dict_trie is None:
            self._dict_trie = dict_trie(self.trie)
        return self._dict_trie

    def to(self, device) -> "PrefixIndex":
        return PrefixIndex(self.trie.to(device), self.leaf_of_item.to(device), self.leaf_items.to(device))

    def summary(self) -> dict:
        """Counts for logs and reports, including identifier collisions."""
        return {
            "items": self.num_items,
            "levels": self.num_levels,
            "leaves": self.num_leaves,
            "shared_leaves": self.duplicate_leaves.numel(),
            "items_sharing_a_leaf": int((self.leaf_ptr[self.duplicate_leaves + 1] - self.leaf_ptr[self.duplicate_leaves]).sum()),
        }

    def save(self, path: str) -> None:
        """Atomic save (torch format, CPU tensors); load with PrefixIndex.load."""
        cpu = self.to("cpu")
        torch_save(
            path,
            {
                "format": _FORMAT,
                "version": _VERSION,
                "row_ptr": list(cpu.trie.row_ptr),
                "child_token": list(cpu.trie.child_token),
                "level_sizes": self.level_sizes,
                "vocab_offsets": self.vocab_offsets,
                "leaf_of_item": cpu.leaf_of_item,
                "leaf_items": cpu.leaf_items,
            },
        )

    @classmethod
    def load(cls, path: str, device=None) -> "PrefixIndex":
        """Load an index written by `save`; a file of another kind raises DataError naming it."""
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load fails in many ways on a foreign or truncated file
            raise DataError(f"{path}: cannot read a PrefixIndex ({e})") from e
        if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
            raise DataError(f"{path}: not a PrefixIndex file (format key {_FORMAT!r} missing)")
        if blob.get("version") != _VERSION:
            raise DataError(f"{path}: PrefixIndex version {blob.get('version')}, this code reads {_VERSION}")
        try:
            trie = TrieLevels(
                tuple(blob["row_ptr"]), tuple(blob["child_token"]), tuple(blob["level_sizes"]), tuple(blob["vocab_offsets"])
            )
            index = cls(trie, blob["leaf_of_item"], blob["leaf_items"])
        except (KeyError, TypeError, RuntimeError, IndexError) as e:
            raise DataError(f"{path}: corrupt PrefixIndex ({e})") from e
        return index if device is None else index.to(device)
