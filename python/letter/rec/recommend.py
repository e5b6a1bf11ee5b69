"""Top-k recommendations from a loaded train-rec run: one history (`recommend`), many in batches
(`RunRecommender.recommend`, used by `letter recommend` for files of histories or users, and by `letter serve`).

The beam width is fixed per loaded run (`beams`, default 20, as evaluation) and each query's k
identifiers are the first k of that search, so a user's list never depends on which other
queries share its batch, nor on their k. Exclusion happens inside the constrained search (the
excluded items' identifiers are pruned, see PrefixIndex.banned_leaves), so a user still gets k
allowed identifiers; an identifier shared with an allowed item stays and lists only that item.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field

import torch

from letter.errors import LetterError, SettingError, input_error
from letter.devices import resolve_device
from letter.runs import atomic_path, read_text

from .data import codes_sha
from .evaluation import _load, added_leaves, generate, max_new_items, training_items
from .index_versions import add_items, load_index_codes
from .recommender import as_recommender

DEFAULT_BEAMS = 20


@dataclass(frozen=True)
class Query:
    """One request: `history` item positions (internal ids, oldest first, non-empty), `k`
    identifiers wanted, whether to exclude the history's items, and other item positions to exclude."""

    history: tuple[int, ...]
    k: int
    exclude_history: bool = False
    exclude: tuple[int, ...] = field(default=())

    def banned(self) -> list[int]:
        return sorted(set(self.exclude) | (set(self.history) if self.exclude_history else set()))


class RunRecommender:
    """A train-rec run (TIGER or LC-Rec) loaded once, answering batches of queries."""

    def __init__(self, run_dir: str, *, data=None, device: str = "cpu", beams: int = DEFAULT_BEAMS,
                 index_version: int | None = None, max_new_share: float | None = None, allow_other_data: bool = False):
        if beams < 1:
            raise SettingError("beams", f"must be >= 1, got {beams}")
        max_new_items(max_new_share, 1)  # checks the share
        self.device = resolve_device(device)
        self.run_dir = os.path.abspath(run_dir)
        self.rm, self.rec, self.config = _load(run_dir, data, self.device, index_version, allow_other_data)
        self.beams = beams
        self.max_new_share = max_new_share
        self.training_items = training_items(run_dir)
        self._adding = threading.Lock()
        self._use(self.rm, self.rec)
        dataset = self.rec.dataset
        self._position = {item: i for i, item in enumerate(dataset.item_ids)}
        self._titles = [t.get("title") for t in dataset.item_text] if dataset.item_text else None

    def _use(self, rm, rec) -> None:
        """Serve `rec`'s index version from now on (one assignment: a running batch keeps its own)."""
        index = rm.prefix_index(rec, self.device)
        self._state = (rm, rec, index, added_leaves(index, self.training_items), codes_sha(rec.codes))
        self.rm, self.rec, self.index = rm, rec, index

    def add_items(self, tokenizer_dir: str, embeddings) -> dict:
        """letter.rec.index_versions.add_items on the served run and the catalog it serves (refused
        for other data, see ADDING_RULE), then serve the new version (what `POST /items` calls; one
        add at a time). With nothing to add, the newest version (which another add may have
        written since this run was loaded) is served from then on."""
        with self._adding:
            # the catalog served (items appended to the dataset's files since it was loaded are not)
            record = add_items(self.run_dir, tokenizer_dir, embeddings, data=self.rec.dataset)
            if record["version"] != self.rec.index_version:
                codes, version, _ = load_index_codes(self.run_dir, record["version"])
                rec = self.rec.with_index(codes, version)
                self._use(as_recommender(self.rm.model, rec=rec), rec)
            return record

    @property
    def num_items(self) -> int:
        return self.rec.dataset.num_items

    def metadata(self) -> dict:
        """What is being served: model, dataset, catalog and identifier index (one version's, read
        from one snapshot while POST /items may swap it)."""
        _, rec, index, _, codes_sha256 = self._state
        dataset = rec.dataset
        return {
            "model": self.config.model,
            "run": self.run_dir,
            "dataset": dataset.name,
            "items": self.num_items,
            "users": dataset.num_users,
            "has_titles": self._titles is not None,
            "beams": self.beams,
            "max_k": self.beams,
            # the identity of the item -> identifier map the run decodes with (sha256 of its codes)
            "index": {"version": codes_sha256[:16], "codes_sha256": codes_sha256,
                      "index_version": rec.index_version, **index.summary()},
            "max_new_share": self.max_new_share,
        }

    def unknown_ids(self, item_ids) -> str | None:
        """None when every id is in the catalog, else what to say about the unknown ones."""
        unknown = [str(i) for i in item_ids if i not in self._position]
        if not unknown:
            return None
        return f"unknown item id(s) {', '.join(unknown[:5])}" + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")

    def unindexed_ids(self, item_ids) -> str | None:
        """None when every (known) id has an identifier in the served index version, else what to say."""
        rec = self.rec
        missing = [str(i) for i in item_ids if self._position.get(i, -1) >= len(rec.codes)]
        if not missing:
            return None
        return (f"item(s) {', '.join(missing[:5])} have no identifier in index version {rec.index_version} "
                "(add them first)")

    def positions(self, item_ids, name: str = "history") -> list[int]:
        """Internal positions of original item ids; unknown ids raise a SettingError naming `name`."""
        problem = self.unknown_ids(item_ids)
        if problem:
            raise SettingError(name, f": {problem}")
        return [self._position[i] for i in item_ids]

    def check_k(self, k: int, name: str = "k") -> None:
        if not 1 <= k <= self.beams:
            raise SettingError(name, f"must be in [1, beams = {self.beams}] (the beam width), got {k}", "beams")

    def recommend(self, queries: list[Query], batch_size: int | None = None,
                  show_progress: bool = False) -> list[list[dict]]:
        """Per query, its top-k identifiers' items [{item_id, title, score, rank, code}], best first
        (rank: the identifier's, 1..k; items sharing an identifier share its rank and score).
        One batched constrained beam search per `batch_size` queries (default: all at once)."""
        if not queries:
            return []
        for q in queries:
            if not q.history:
                raise LetterError("history is empty")
            self.check_k(q.k)
        problem = self.unindexed_ids([self.rec.dataset.item_ids[i] for q in queries for i in q.history])
        if problem:
            raise LetterError(f"history: {problem}")
        rm, rec, index, new_leaves, _ = self._state  # this version or a newer one (versions only grow)
        enc = rm.encode(rec, [list(q.history) for q in queries])
        banned = [[i for i in q.banned() if i < len(rec.codes)] for q in queries]
        quota = {}
        if self.max_new_share is not None:  # the share of each query's own k identifiers
            quota = {"new_leaves": new_leaves,
                     "max_new": torch.tensor([max_new_items(self.max_new_share, q.k) for q in queries])}
        leaves, scores = generate(rm, index, enc, self.beams, batch_size or len(queries), self.device,
                                  show_progress=show_progress, banned_items=banned if any(banned) else None, **quota)
        return [self._items(rec, index, q, set(b), row_leaves[: q.k], row_scores[: q.k])
                for q, b, row_leaves, row_scores in zip(queries, banned, leaves.tolist(), scores.tolist())]

    def _items(self, rec, index, query: Query, banned: set[int], leaves: list[int], scores: list[float]) -> list[dict]:
        out = []
        for rank, (leaf, score) in enumerate(zip(leaves, scores), 1):
            if leaf < 0:
                continue  # fewer than k allowed identifiers exist
            for item in index.items_of_leaf(leaf):
                if item not in banned:  # an identifier shared with a banned item lists only the others
                    out.append({"item_id": rec.dataset.item_ids[item],
                                "title": self._titles[item] if self._titles else None,
                                "score": score, "rank": rank, "code": rec.codes[item].tolist()})
        return out


def recommend(run_dir: str, history: list[str], k: int = 10, *, data=None, device: str = "cpu",
              beams: int | None = None, exclude_history: bool = False, exclude: list[str] = (),
              index_version: int | None = None, max_new_share: float | None = None,
              allow_other_data: bool = False) -> list[dict]:
    """Top-k items for a history of original item ids (oldest first): [{item_id, title, score, rank, code}]
    (title None when the data has no titles). Items sharing a generated identifier are listed
    together under that identifier's rank. beams: the search width (default max(k, 20));
    exclude_history / exclude: items never recommended; index_version: the run's index version
    (default the newest, 0 = the training index); max_new_share: at most floor(share * k) of the
    k identifiers from items added after training; allow_other_data: use a dataset whose content is
    not the one the run was trained on."""
    if k < 1:
        raise SettingError("k", f"must be >= 1, got {k}")
    if not history:
        raise SettingError("history", "is empty")
    run = RunRecommender(run_dir, data=data, device=device, beams=beams or max(k, DEFAULT_BEAMS),
                         index_version=index_version, max_new_share=max_new_share, allow_other_data=allow_other_data)
    query = Query(tuple(run.positions(history)), k, exclude_history, tuple(run.positions(exclude, "exclude")))
    with torch.no_grad():
        return run.recommend([query])[0]


def read_histories_file(histories_file: str) -> list[list[str]]:
    """One history per line: comma-separated item ids, oldest first; an empty line is an error
    (messages name the argument histories_file)."""
    try:
        lines = read_text(histories_file).splitlines()
    except LetterError as e:  # unreadable or not UTF-8: name the argument too
        raise SettingError("histories_file", str(e)) from None
    histories = []
    for number, line in enumerate(lines, 1):
        ids = [i.strip() for i in line.split(",") if i.strip()]
        if not ids:
            raise input_error("histories_file", histories_file, f"line {number} holds no item id")
        histories.append(ids)
    if not histories:
        raise input_error("histories_file", histories_file, "no histories in the file")
    return histories


def recommend_jsonl(run: RunRecommender, rows: list[tuple[dict, list[str]]], out: str, k: int = 10, *,
                    exclude_history: bool = False, batch_size: int = 256, show_progress: bool = True) -> int:
    """Offline batch scoring: for each (key fields, history of original item ids) write one JSON
    line {**key, "items": [...]} to `out` (atomically, all or nothing). Returns the number of lines."""
    run.check_k(k)
    queries = []
    for key, history in rows:
        name = f"history of {json.dumps(key)}"
        queries.append(Query(tuple(run.positions(history, name)), k, exclude_history))
        problem = run.unindexed_ids(history)
        if problem:  # named here: the batched search could only say that some history has it
            raise SettingError(name, f": {problem}")
    with torch.no_grad():
        results = run.recommend(queries, batch_size=batch_size, show_progress=show_progress)
    with atomic_path(out) as tmp, open(tmp, "w") as f:
        for (key, _), items in zip(rows, results):
            f.write(json.dumps({**key, "items": items}) + "\n")
    return len(rows)
