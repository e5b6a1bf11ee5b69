"""Index versions of a train-rec run: new items join a trained recommender without retraining.

Version 0 is the run's training index (its codes.npy, never rewritten). `add_items` turns new
items' text embeddings into identifiers with the tokenizer that made the run's codes (its
collision rules; with its `unique` setting the catalog's identifiers stay taken, without it a new
item may share one: the record counts them) and writes
version k+1 = version k's codes plus the new rows:

    RUN/index-versions/v<k>/codes.npy      codes [M_k, L] of items 0..M_k-1 of the run's dataset
    RUN/index-versions/v<k>/version.json   base version, the added item ids, the tokenizer, hashes

A version is built in a temporary folder and renamed into place in one step, so a reader sees a
whole version or none, and a killed add leaves the previous versions as they were (its temporary
folder is ignored and removed by a later add). Items are the dataset's items in catalog order:
a version covers a prefix 0..M_k-1 of the catalog (the cold split puts its cold items last), and
an add covers the next items, so an item can never be added twice; adding when every item of the
dataset has an identifier is a no-op. `evaluate`, `recommend` and `serve` read the newest
version unless given `index_version`.

Items are added from the dataset the run was trained on or from that dataset grown by appending
items (new item ids after the old ones, without interactions: e.g. new items written to the
dataset's item file), never from other data (check_rec_dataset's ADDING_RULE); every reader takes
such a grown catalog as the run's dataset too. A version is served only with a dataset whose items
at the positions each add gave identifiers to are the items it added (check_version_items): not
with the catalog as it was before it grew past the version, nor with one that grew differently.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time

import numpy as np

from letter.data.cold import read_cold_split
from letter.errors import LetterError, SettingError, input_error
from letter.runs import RecRun, check_sidecar, load_npy, read_json, remove_stale_temps, sha256_file

VERSIONS_DIR = RecRun.INDEX_VERSIONS
VERSION_FILE = "version.json"
_NAME = re.compile(r"^v(\d+)$")


def _version_dir(run_dir: str, version: int) -> str:
    return os.path.join(run_dir, VERSIONS_DIR, f"v{version}")


def index_versions(run_dir: str) -> list[int]:
    """Versions of a run's index, oldest first: 0 (the training index) and every finished add."""
    root = os.path.join(run_dir, VERSIONS_DIR)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            match = _NAME.match(name)
            if match and os.path.isfile(os.path.join(root, name, VERSION_FILE)):
                found.append(int(match.group(1)))
    return [0] + sorted(found)


def load_index_codes(run_dir: str, version: int | None = None) -> tuple[np.ndarray, int, dict]:
    """(codes [M, L] of items 0..M-1, the version read, its version.json (empty for 0)) of version
    `version` (default: the newest) of a train-rec run's index."""
    versions = index_versions(run_dir)
    version = versions[-1] if version is None else version
    if version not in versions:
        raise SettingError("index_version", f"{version}: {run_dir} has index versions {', '.join(map(str, versions))}")
    if version == 0:
        return load_npy(os.path.join(run_dir, RecRun.CODES)), 0, {}
    folder = _version_dir(run_dir, version)
    record = read_json(os.path.join(folder, VERSION_FILE), "index version record")
    path = os.path.join(folder, RecRun.CODES)
    if sha256_file(path) != record.get("codes_sha256"):
        raise LetterError(f"{path}: not the file index version {version} wrote (changed or corrupt)")
    return load_npy(path), version, record


def trained_sizes(training_codes: np.ndarray, dataset) -> tuple[int, ...]:
    """The item counts the training dataset of a run whose training codes are `training_codes` can
    have had, when `dataset` is that dataset grown by appending items: one per item (codes cover
    the whole catalog), or the cold split's item count (codes cover its warm items)."""
    cold = read_cold_split(dataset)
    return (len(training_codes),) + ((int(cold["num_items"]),) if cold else ())


def check_version_items(run_dir: str, version: int, dataset, shown: str) -> None:
    """Refuse index version `version` of a run for `dataset` (named `shown`) unless every add up to
    it gave its identifiers to the items the dataset has at those positions."""
    for v in index_versions(run_dir)[1:]:
        if v > version:
            break
        path = os.path.join(_version_dir(run_dir, v), VERSION_FILE)
        record = read_json(path, "index version record")
        end, added, items = (record.get(key) if isinstance(record, dict) else None
                             for key in ("indexed_items", "added", "items"))
        if not (isinstance(end, int) and isinstance(added, int) and 0 <= added <= end and isinstance(items, list)
                and len(items) == added):
            raise LetterError(f"{path}: corrupt index version record (no indexed_items/added/items)")
        start = end - added
        if end > dataset.num_items:
            raise LetterError(f"{shown}: {dataset.num_items} items, but index version {v} of {run_dir} gave "
                              f"identifiers to items up to {end} (added from the catalog as it grew since); use that "
                              f"catalog, or index_version {v - 1}", "index_version")
        if dataset.item_ids[start:end] != items:
            where = next(i for i, (a, b) in enumerate(zip(dataset.item_ids[start:end], items)) if a != b)
            raise LetterError(f"{shown}: item {start + where} is {dataset.item_ids[start + where]!r}, but index "
                              f"version {v} of {run_dir} gave that identifier to item {items[where]!r} (the "
                              f"catalog grew differently); use the catalog it was added from, or index_version {v - 1}",
                              "index_version")


def add_items(run_dir: str, tokenizer_dir: str, embeddings, *, data=None) -> dict:
    """Give identifiers to the dataset items that the newest index version lacks and write them as
    a new version (see the module docstring). `embeddings`: an array or .npy path, either [N, d]
    rows of the whole catalog (rows of items already indexed are ignored; a .npy whose sidecar
    records other items is refused) or [n, d] rows of the next n items not yet indexed. `tokenizer_dir`: the tokenizer run that made the run's training
    codes (checked). `data`: the dataset (a path, or a loaded Dataset) instead of the run's
    recorded one: the training dataset or that dataset grown by appending items (see the module
    docstring). Returns {"version", "added", "items", "identifiers_shared_with_catalog", ...};
    "added" is 0 (and no version is written) when every item already has an identifier."""
    from letter.data import Dataset, load_dataset
    from letter.runs import check_rec_dataset, check_rec_run, read_rec_run_info
    from letter.tokenizer import load_tokenizer

    info = read_rec_run_info(run_dir)
    path, manifest = check_rec_run(run_dir, info, data)
    dataset = path if isinstance(path, Dataset) else load_dataset(path)
    shown = dataset.source if isinstance(path, Dataset) else path
    training_codes = load_npy(os.path.join(run_dir, RecRun.CODES))
    check_rec_dataset(run_dir, manifest, dataset, shown, data is not None,
                      trained_sizes=trained_sizes(training_codes, dataset), adding=True)
    codes, base, _ = load_index_codes(run_dir)
    check_version_items(run_dir, base, dataset, shown)
    indexed, total = codes.shape[0], dataset.num_items
    # the tokenizer is checked also when nothing is to add (adding the same rows twice is a no-op)
    tok = load_tokenizer(tokenizer_dir)
    if tok.catalog_codes is None or not np.array_equal(tok.catalog_codes, training_codes):
        raise input_error("tokenizer", tokenizer_dir, f"its codes are not the identifiers {run_dir} was trained on")
    if indexed >= total:
        return {"version": base, "added": 0, "items": [], "indexed_items": indexed,
                "message": f"every one of the {total} items of {dataset.source} already has an identifier "
                           f"(index version {base}); nothing added"}
    where = f"embeddings {embeddings}" if isinstance(embeddings, (str, os.PathLike)) else "embeddings"
    emb = load_npy(os.fspath(embeddings), "embeddings") if isinstance(embeddings, (str, os.PathLike)) else embeddings
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise LetterError(f"{where}: expected an [items, dim] matrix, got shape {emb.shape}", "embeddings")
    if isinstance(embeddings, (str, os.PathLike)):
        # whole-catalog rows are taken by position: a file made for other items (e.g. a cold split's
        # source catalog, as many rows in another order) is refused by its sidecar's item fingerprint
        made_from = {"items": (dataset.items_fingerprint(), ("data", shown) if data is not None else
                               f"the dataset {shown}")}
        check_sidecar(os.fspath(embeddings), "embeddings", made_from if emb.shape[0] == total else None)
    if emb.shape[0] == total:
        emb = emb[indexed:]
    elif emb.shape[0] > total - indexed:
        raise LetterError(f"{where}: {emb.shape[0]} rows, but {dataset.source} has {total} items of which "
                          f"{total - indexed} lack an identifier: give [{total}, d] catalog rows or at most "
                          f"{total - indexed} rows of the next items", "embeddings")
    tok.catalog_codes = codes  # the newest version's identifiers: fixed (and taken, with `unique`)
    new = tok.encode(emb)
    sizes = info.get("level_sizes") or [int(c) + 1 for c in training_codes.max(0)]
    outside = np.flatnonzero((new >= np.asarray(sizes)).any(1))
    if len(outside):
        raise LetterError(f"{len(outside)} new item(s) got codes outside the recommender's vocabulary (level sizes "
                          f"{sizes}); their tokens were never trained")
    items = list(range(indexed, indexed + len(new)))
    taken = {tuple(c) for c in codes.tolist()}
    record = {
        "version": base + 1,
        "base_version": base,
        "added": len(items),
        "items": [dataset.item_ids[i] for i in items],
        "indexed_items": indexed + len(new),
        "identifiers_shared_with_catalog": sum(tuple(c) in taken for c in new.tolist()),
        "tokenizer": os.path.abspath(tokenizer_dir),
        "embeddings": os.path.abspath(os.fspath(embeddings)) if isinstance(embeddings, (str, os.PathLike)) else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_version(run_dir, np.concatenate([codes, new]).astype(np.int64), record)
    return record


def _write_version(run_dir: str, codes: np.ndarray, record: dict) -> None:
    """Write version record["version"] in a temporary folder, then rename it into place."""
    root = os.path.join(run_dir, VERSIONS_DIR)
    os.makedirs(root, exist_ok=True)
    remove_stale_temps(root)  # folders of killed adds
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-v{record['version']}-")
    try:
        np.save(os.path.join(tmp, RecRun.CODES), codes)
        record = {**record, "codes_sha256": sha256_file(os.path.join(tmp, RecRun.CODES))}
        with open(os.path.join(tmp, VERSION_FILE), "w") as f:
            json.dump(record, f, indent=2)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, _version_dir(run_dir, record["version"]))
        except OSError:
            raise LetterError(f"{run_dir}: index version {record['version']} appeared while this add ran "
                              "(another add-items at the same time?); nothing written") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
