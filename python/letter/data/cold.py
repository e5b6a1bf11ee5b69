"""The cold-start split: a seeded share of the catalog is withheld from every training stage and
appears only as test targets, so a trained recommender can be measured on items it never saw.

Protocol (`cold_split`, `letter data cold-split`):

1. Cold items: `round(fraction * num_items)` items (at least 1) drawn uniformly without
   replacement from the whole catalog by `numpy.random.default_rng(seed)`.
2. Renumbering: warm items keep their relative order and become ids 0..W-1, cold items follow as
   W..N-1 (in their original order). So every identifier set trained on the split covers the
   catalog prefix 0..W-1, and items added later (`letter add-items`) extend it at the end. The
   original id of each item is kept in cold_split.json ("original_ids", position = new id).
3. Sequences: each user's last item stays the test target (warm or cold); every cold item is
   removed from the rest of the sequence, so cold items are never in a training history, a
   training target, a validation target or a test history. A user left with fewer than 3 items
   (leave_one_out's minimum) is dropped.
4. Two test sets: users whose test target is cold ("cold-target") and users whose test target is
   warm ("warm-target"); both come from the split's leave-one-out test part (`test_groups`).

The output folder is a LETTER dataset folder (`<Name>.inter.json`, `<Name>.item.json`, written
last: a split cut short is no dataset) plus `cold_split.json` (the protocol, its parameters, the
warm count, the cold ids, the original ids and the counts). Every training stage reads it next to its data: train-cf and
train-rec refuse a dataset where a cold item occurs anywhere but as a user's last item
(`check_no_cold_training`), train-tokenizer trains on the warm rows only (`warm_rows`), and
train-rec refuses codes that cover cold items.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from letter.data.dataset import Dataset
from letter.data.readers import dataset_dir, prepare_dataset_output, source_files, write_letter
from letter.errors import DataError, LetterError, SettingError, input_error
from letter.runs import save_npy, write_json

SPLIT_FILE = "cold_split.json"
PROTOCOL = ("cold items: round(fraction * items) drawn uniformly by numpy default_rng(seed); warm items renumbered "
            "0..W-1, cold items W..N-1; cold items removed from every sequence except as the user's last (test) item; "
            "users with < 3 items left dropped")


def cold_split(dataset: Dataset, fraction: float = 0.05, seed: int = 0) -> tuple[Dataset, dict]:
    """Split `dataset` by the protocol in the module docstring. Returns (the renumbered dataset,
    the split record written as cold_split.json)."""
    if not 0 < fraction < 1:
        raise SettingError("fraction", f"must be in (0, 1), got {fraction}")
    n = dataset.num_items
    num_cold = max(1, int(round(fraction * n)))
    if num_cold >= n:
        raise SettingError("fraction", f"{fraction} leaves no warm item of {n}")
    cold = np.zeros(n, dtype=bool)
    cold[np.random.default_rng(seed).choice(n, size=num_cold, replace=False)] = True
    order = np.r_[np.flatnonzero(~cold), np.flatnonzero(cold)]  # new id -> old id
    new_id = np.empty(n, dtype=np.int64)
    new_id[order] = np.arange(n)
    users, sequences, dropped, removed = [], [], 0, 0
    for user, seq in zip(dataset.user_ids, dataset.sequences):
        head = [i for i in seq[:-1] if not cold[i]]
        removed += len(seq) - 1 - len(head)
        if len(head) + 1 < 3:
            dropped += 1
            continue
        users.append(user)
        sequences.append([int(new_id[i]) for i in head + [seq[-1]]])
    if not sequences:
        raise LetterError(f"{dataset.source}: no user keeps 3 items after the cold items are removed; nothing to split")
    warm = n - num_cold
    cold_targets = sum(s[-1] >= warm for s in sequences)
    text = [dataset.item_text[i] for i in order] if dataset.item_text is not None else None
    split = Dataset(dataset.name, users, sequences, [str(i) for i in range(n)], text, dataset.source)
    record = {
        "protocol": PROTOCOL,
        "source": dataset.source,
        "source_fingerprint": dataset.fingerprint(),
        "fraction": fraction,
        "seed": seed,
        "num_items": n,
        "warm_items": warm,
        "cold_items": list(range(warm, n)),
        "original_ids": [dataset.item_ids[i] for i in order],
        "users": {"cold_target": int(cold_targets), "warm_target": len(sequences) - int(cold_targets),
                  "dropped": dropped},
        "cold_interactions_removed": removed,
    }
    return split, record


def write_cold_split(dataset: Dataset, out_dir: str, fraction: float = 0.05, seed: int = 0,
                     embeddings: list[str] = (), overwrite: bool = False) -> dict:
    """Split `dataset` and write the split folder: cold_split.json, each of `embeddings` ([N, d]
    .npy of the source catalog, row = item) with its rows in the split's item order under the same
    file name, and the LETTER files last. A split already in `out_dir` is refused unless overwrite;
    an output onto one of the inputs always, and so is a dataset that is itself a split (its cold
    items would become warm items of the new one). Returns the record."""
    if read_cold_split(dataset) is not None:
        raise LetterError(f"{dataset.source}: already a cold split ({SPLIT_FILE}); split the dataset it was split "
                          "from instead")
    split, record = cold_split(dataset, fraction, seed)
    from letter.runs import check_sidecar, load_npy, sidecar_path, sidecar_record

    arrays = []  # checked before overwrite removes an earlier split
    made_from = {"items": (dataset.items_fingerprint(), ("the dataset", dataset.source)),
                 "dataset": (dataset.fingerprint(), ("the dataset", dataset.source))}
    names = [os.path.basename(p) for p in embeddings]
    for position, (path, name) in enumerate(zip(embeddings, names)):
        if name in names[:position]:  # each is written under its own file name
            raise input_error("embeddings", path, f"the file name {name} is given twice; the split writes each "
                              "embedding under its own file name")
        # as every reader does: the split writes them a sidecar vouching for the split's items
        check_sidecar(path, "embeddings", made_from)
        arr = load_npy(path, "embeddings")
        if arr.ndim != 2 or arr.shape[0] != dataset.num_items:
            raise input_error("embeddings", path, f"expected [{dataset.num_items}, dim] rows of {dataset.source}'s "
                              f"items, got shape {arr.shape}")
        arrays.append((path, arr))
    sources = source_files(dataset.source) if isinstance(dataset.source, str) and os.path.exists(dataset.source) else []
    prepare_dataset_output(out_dir, dataset.name, overwrite=overwrite,
                           inputs={"data_path": sources, "embeddings": list(embeddings)},
                           extra=(SPLIT_FILE, *names, *(os.path.basename(sidecar_path(n)) for n in names)),
                           kind="cold-split")
    os.makedirs(out_dir, exist_ok=True)
    # the dataset last (write_letter: its <Name>.inter.json last), so that a split cut short is no
    # dataset, never one without its record that the stages would take for an ordinary dataset
    record["embeddings"] = names
    write_json(os.path.join(out_dir, SPLIT_FILE), record)
    # the items as their readers will see them (the text after its round trip through item.json)
    written = dataclasses.replace(split, item_text=json.loads(json.dumps(split.item_text))).items_fingerprint()
    order = _old_rows(dataset, record)
    for path, arr in arrays:
        target = os.path.join(out_dir, os.path.basename(path))
        save_npy(target, np.ascontiguousarray(arr[order]))
        write_json(sidecar_path(target),
                   {"source": os.path.abspath(path), "rows": "reordered by the cold split (cold_split.json)",
                    **sidecar_record(target, {"items": written})})
    write_letter(split, out_dir)
    return record


def _old_rows(dataset: Dataset, record: dict) -> np.ndarray:
    """Row of the source catalog of each split item (new id order)."""
    position = {item: i for i, item in enumerate(dataset.item_ids)}
    return np.array([position[i] for i in record["original_ids"]], dtype=np.int64)


def read_cold_split(path) -> dict | None:
    """The cold_split.json record next to a dataset path (folder or file; a Dataset: where it was
    read from), None for an ordinary dataset."""
    if isinstance(path, Dataset):
        path = path.source
    if not path or not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        return None
    folder = dataset_dir(os.fspath(path))
    if not os.path.isfile(os.path.join(folder, SPLIT_FILE)):
        return None
    from letter.runs import read_json

    record = read_json(os.path.join(folder, SPLIT_FILE), "cold split record")
    counts = [record.get(key) for key in ("warm_items", "num_items", "seed")]
    if not (all(isinstance(c, int) and not isinstance(c, bool) for c in counts) and 0 < counts[0] < counts[1]
            and isinstance(record.get("cold_items"), list)):  # what the stages read, checked once here
        raise DataError(f"{os.path.join(folder, SPLIT_FILE)}: corrupt cold split record (needs integers "
                        "0 < warm_items < num_items, a seed and the list cold_items)")
    return record


def check_no_cold_training(dataset: Dataset, record: dict | None, grown: bool = False) -> None:
    """Refuse a cold-split dataset whose training or validation data hold a cold item: a cold item
    may only be a user's last (test) item. Also checks the record matches the dataset. grown: the
    dataset may have items appended after the split's (a trained run's catalog that grew since)."""
    if record is None:
        return
    warm, cold, total = record["warm_items"], record["cold_items"], record["num_items"]
    fits = dataset.num_items >= total if grown else dataset.num_items == total
    if not fits or cold != list(range(warm, total)):
        raise DataError(f"{dataset.source}: {SPLIT_FILE} describes {total} items with cold ids "
                        f"{warm}..{total - 1}, but the dataset has {dataset.num_items} items")
    for user, seq in zip(dataset.user_ids, dataset.sequences):
        leaked = [i for i in seq[:-1] if warm <= i < total]
        if leaked:
            raise DataError(f"{dataset.source}: cold item {dataset.item_ids[leaked[0]]} is in user {user}'s "
                            "training/validation sequence; a cold split may hold cold items only as test targets")


def warm_rows(array: np.ndarray, record: dict | None, what: str) -> np.ndarray:
    """The rows of a catalog-aligned [N, d] array that a stage may train on: all of them for an
    ordinary dataset, the warm items 0..W-1 for a cold split ([W, d] input is taken as is)."""
    if record is None or array.ndim == 0:  # a scalar: the consumer's shape check names it
        return array
    warm = record["warm_items"]
    if array.shape[0] == record["num_items"]:
        return array[:warm]
    if array.shape[0] == warm:
        return array
    raise LetterError(f"{what}: {array.shape[0]} rows, but the cold split has {record['num_items']} items "
                      f"({warm} warm)")


def test_groups(targets, record: dict) -> dict[str, np.ndarray]:
    """Boolean masks over test targets (item ids): {"cold": target is cold, "warm": target is warm}."""
    targets = np.asarray(targets)
    is_cold = targets >= record["warm_items"]
    return {"cold": is_cold, "warm": ~is_cold}
