"""The in-memory dataset every stage consumes: users' time-ordered item sequences with 0-based ids."""
import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

from letter.errors import DataError

TEXT_FIELDS = ("title", "description", "brand", "categories")


@dataclass
class Dataset:
    """Interactions of one dataset with contiguous 0-based item ids.

    sequences[u] are the items of user_ids[u] in time order; item_ids[i] is the original id of
    internal item i; item_text[i] (or None for CF-only datasets) holds the item's text fields
    (title, description, brand, categories; the synthetic data adds "category").
    """

    name: str
    user_ids: list[str]
    sequences: list[list[int]]
    item_ids: list[str]
    item_text: list[dict] | None = None
    source: str = field(default="", compare=False)  # where it was read from, for error messages

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def fingerprint(self, num_items: int | None = None) -> str:
        """sha256 of the item ids and every user's sequence: equal for equal contents, wherever the
        files are (what resume checks and comparisons key on). num_items: of the first num_items
        item ids and the same sequences, i.e. the fingerprint of the catalog this one grew from by
        appending items (items without interactions) -- when it did."""
        h = hashlib.sha256(json.dumps(self.item_ids[:num_items]).encode())
        for seq in self.sequences:
            h.update(np.asarray(seq, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()

    def is_or_grew_from(self, fingerprint: str | None, num_items=()) -> bool:
        """Whether this is the dataset whose fingerprint() is `fingerprint`, or that dataset grown by
        appending items, when it had one of the item counts `num_items`."""
        return fingerprint == self.fingerprint() or any(
            n < self.num_items and self.fingerprint(n) == fingerprint for n in num_items)

    def items_fingerprint(self) -> str:
        """sha256 of the item ids in row order and of each item's text fields: what per-item files
        (text embeddings, row i = item i, and identifiers made from them) depend on, whatever the
        interactions. The text is in it so that embeddings of other items with the same ids (a
        dataset regenerated or edited in place) are never taken for these items'."""
        h = hashlib.sha256(json.dumps(self.item_ids).encode())
        for text in self.item_text or ():
            h.update(json.dumps(text, sort_keys=True, ensure_ascii=False, default=str).encode())
            h.update(b"|")
        return h.hexdigest()

    def category_labels(self) -> np.ndarray | None:
        """[num_items] integer labels of the items' "category" text field (its distinct values in
        sorted order), for the tokenizer report's purity; None unless every item has one, all
        non-empty strings or all integers (a null, list or missing one: no usable labels)."""
        if not self.item_text:
            return None
        values = [t.get("category") if isinstance(t, dict) else None for t in self.item_text]
        strings = all(isinstance(v, str) and v for v in values)
        integers = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        if not (strings or integers):
            return None
        names = {name: label for label, name in enumerate(sorted(set(values)))}
        return np.array([names[v] for v in values], dtype=np.int64)

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)


_INTEGER = re.compile(r"-?[0-9]+")


def item_order(raw_ids) -> list[str]:
    """Deterministic internal order of original item ids: numeric when all are integers (so ids
    0..N-1 keep their value, matching the authors' index/embedding files; equal values such as
    "007" and "7" by their text), else lexicographic."""
    ids = {str(i) for i in raw_ids}
    if all(_INTEGER.fullmatch(i) for i in ids):
        return sorted(ids, key=lambda i: (int(i), i))
    return sorted(ids)


def build_dataset(
    name: str,
    user_items: dict[str, list[str]],
    item_text: dict[str, dict] | None = None,
    source: str = "",
) -> Dataset:
    """Map original string ids to a Dataset. With item_text, its keys define the item set and
    every history item must be among them. The name prefixes every file written for the dataset."""
    from letter.runs import check_file_name

    check_file_name(name, f"{source or 'dataset'}: dataset name")
    if item_text is not None:
        known = set(item_text)
        for user, items in user_items.items():
            missing = [i for i in items if i not in known]
            if missing:
                raise DataError(
                    f"{source}: user {user!r} has item {missing[0]!r} that is missing from the item "
                    f"text file ({len(missing)} such item(s) in this history)"
                )
        item_ids = item_order(item_text)
    else:
        item_ids = item_order(i for items in user_items.values() for i in items)
    index = {item: k for k, item in enumerate(item_ids)}
    sequences = [[index[i] for i in items] for items in user_items.values()]
    text = [item_text[i] for i in item_ids] if item_text is not None else None
    return Dataset(name, list(user_items), sequences, item_ids, text, source)
