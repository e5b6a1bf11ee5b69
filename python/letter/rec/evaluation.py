"""Generation and evaluation of a train-rec run (TIGER or LC-Rec, through their Recommender
adapters): trie-constrained beam search over real identifiers and Recall/NDCG@5,10 over the full
catalog (top-k recommendations: recommend.py).

Hit rule (the authors'): a generated identifier is a hit when it equals the target item's
identifier, so items sharing an identifier (a collision group) are indistinguishable; the report
also counts how many evaluated targets sit in such groups.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from letter.decoding import PrefixIndex, constrained_beam_search, hf_style_beam_search
from letter.errors import LetterError, SettingError, input_error
from letter.metrics import metrics_from_hits, standard_errors
from letter.data.cold import read_cold_split
from letter.runs import (RecRun, check_output_path, check_rec_dataset, check_rec_run, load_npy, read_rec_run_info,
                         recorded_data, write_json)
from letter.devices import resolve_device
from letter.settings import Settings, setting
from letter.utils import progress

from .config import RecConfig
from .data import RecData, load_rec_data
from .index_versions import check_version_items, load_index_codes, trained_sizes
from .recommender import Recommender, as_recommender, recommender_class

DECODERS = ("fused", "hf")


@dataclass
class EvaluateSettings(Settings):
    """How a train-rec run is evaluated (`letter evaluate`, the pipeline's evaluate section)."""

    section = "evaluate"

    split: str = setting("test", "Split of the leave-one-out protocol.", choices=("valid", "test"))
    num_beams: int = setting(20, "Beam width K (top-K list per user; >= 10 for the @10 metrics).", low=10, flag="beams")
    batch_size: int = setting(256, "Users per beam search batch.", low=1)
    max_users: int = setting(0, "Evaluate a fixed random sample of users (0 = all).", low=0)
    decoder: str = setting("fused", "fused: the beam step op; hf: the HF-style prefix_allowed_tokens_fn baseline.",
                           choices=DECODERS)
    exclude_history: bool = setting(False, "Also measure with every item the user had before the target excluded from "
                                           "the search (as SASRec's mask_history): metrics_exclude_history next to "
                                           "metrics (history kept); fused decoder only.")

    def check(self) -> None:
        if self.exclude_history and self.decoder != "fused":  # else refused only after a whole first search
            self.fail("decoder", f"{self.decoder}: exclude_history needs the fused decoder (it prunes the excluded "
                                 "items inside the search)")


def prefix_index(rec: RecData, device, model=None) -> PrefixIndex:
    """The identifier trie of `rec`'s items over the vocabulary of `model` (default: TIGER's layout)."""
    if model is None:
        return PrefixIndex.from_codes(rec.codes, rec.layout.level_sizes, rec.layout.offsets, device=device)
    return as_recommender(model, rec=rec).prefix_index(rec, device)


def added_leaves(index: PrefixIndex, training_items: int) -> torch.Tensor:
    """bool [num_leaves]: identifiers all of whose items were added after training (item id >=
    `training_items`); an identifier shared with a training item counts as a training one."""
    old = torch.bincount(index.leaf_of_item[:training_items].cpu(), minlength=index.num_leaves)
    return old == 0


def max_new_items(share: float | None, k: int) -> int | None:
    """The share control's quota: at most floor(share * k) added items in a list of k (None: no control)."""
    if share is None:
        return None
    if not 0 <= share <= 1:
        raise SettingError("max_new_share", f"must be in [0, 1], got {share}")
    return int(share * k + 1e-9)


@torch.no_grad()
def generate(model, index: PrefixIndex, enc: torch.Tensor, num_beams: int, batch_size: int, device,
             decoder: str = "fused", show_progress: bool = False, banned_items: list[list[int]] | None = None,
             new_leaves: torch.Tensor | None = None, max_new: int | None = None):
    """Top-`num_beams` identifiers per user. `model`: a Tiger, an LCRec or their Recommender
    adapter; `enc`: the users' model inputs (TIGER: encoder tokens [U, S] as RecData.eval_tensors
    gives; LC-Rec: item-id histories [U, H] as RecData.eval_histories gives). `banned_items`: per
    user, item ids never to return; the search prunes their identifiers (one shared by several
    items only when all of them are banned, see PrefixIndex.banned_leaves), so every user still
    gets up to `num_beams` allowed identifiers.

    Returns (leaves [U, K] identifier ids of `index` (-1: empty slot), scores [U, K] summed
    log-probabilities), best first. decoder='hf' runs the same model through the
    HF-style Python prefix_allowed_tokens_fn baseline (for speed comparisons only). new_leaves and
    max_new (an int, or int64 [U] per user): at most max_new identifiers per list from the flagged
    leaves (the share control, applied inside the fused search; see
    letter.decoding.constrained_beam_search)."""
    if decoder not in DECODERS:
        raise SettingError("decoder", f"must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if max_new is not None and decoder != "fused":
        raise SettingError("max_new_share", "needs the fused decoder")
    if num_beams < 1:
        raise SettingError("num_beams", f"must be >= 1, got {num_beams}")
    if banned_items is not None and decoder != "fused":
        raise SettingError("decoder", f"{decoder}: excluding items needs the fused decoder")
    search = hf_style_beam_search if decoder == "hf" else constrained_beam_search
    rm = as_recommender(model, index=index)
    rm.model.eval()
    # users of similar history length share a batch (TIGER trims it to its longest history)
    order = torch.sort(rm.input_lengths(enc), stable=True).indices
    leaves = torch.full((enc.shape[0], num_beams), -1, dtype=torch.long)
    scores = torch.full((enc.shape[0], num_beams), float("-inf"))
    bar = progress(total=enc.shape[0], unit="user", unit_scale=True, desc="beam search",
                   disable=None if show_progress else True)
    for start in range(0, enc.shape[0], batch_size):
        rows = order[start:start + batch_size]
        state = rm.start_decoding(enc[rows], num_beams, device)
        extra = {}
        if max_new is not None:  # one quota for all, or one per user
            extra = {"new_leaves": new_leaves,
                     "max_new": max_new[rows] if isinstance(max_new, torch.Tensor) else max_new}
        if banned_items is not None:
            extra["banned_leaves"] = index.banned_leaves([banned_items[r] for r in rows.tolist()])
        result = search(lambda step, last, st: rm.decode_step(last, st), rows.numel(), index, num_beams,
                        reorder_state=rm.reorder_state, state=state, **extra)
        leaves[rows] = result.leaves.cpu()
        scores[rows] = result.scores.cpu().float()
        bar.update(rows.numel())
    bar.close()
    return leaves, scores


def target_hits(index: PrefixIndex, leaves: torch.Tensor, targets: torch.Tensor,
                banned_items: list[list[int]] | None = None) -> torch.Tensor:
    """[U, K] bool: generated identifier == the target's (authors' rule); a target without an
    identifier in `index` (a cold item not added yet) is never hit, nor is one among its user's
    `banned_items` (an identifier it shares with an allowed item stays in the search, but there it
    stands for the allowed items only)."""
    known = targets < index.num_items
    if banned_items is not None:
        known &= torch.tensor([int(t) not in set(b) for t, b in zip(targets.tolist(), banned_items)], dtype=torch.bool)
    target_leaves = torch.where(known, index.leaf_of_item.cpu()[targets.clamp(max=index.num_items - 1)], -2)
    return leaves == target_leaves[:, None]


def evaluate_model(model, rec: RecData, enc: torch.Tensor, targets: torch.Tensor, num_beams: int,
                   batch_size: int, device, decoder: str = "fused", index: PrefixIndex | None = None,
                   show_progress: bool = False, banned_items: list[list[int]] | None = None,
                   max_new_share: float | None = None, training_items: int | None = None,
                   hits_out: list | None = None) -> dict:
    """Recall/NDCG@5,10 of constrained beam search on the users' model inputs `enc` (see
    generate) vs target items [U], with each metric's standard error over these users;
    `banned_items` (per user) are never generated. max_new_share: at most that share of each user's
    `num_beams` identifiers from items added after training (ids >= `training_items`). hits_out: a
    list that gets the [U, K] hit matrix appended (for per-group metrics)."""
    if num_beams < 10:
        raise SettingError("num_beams", f"must be >= 10 to compute the @10 metrics, got {num_beams}")
    rm = as_recommender(model, rec=rec)
    index = index if index is not None else rm.prefix_index(rec, device)
    max_new = max_new_items(max_new_share, num_beams)
    new_leaves = added_leaves(index, training_items if training_items is not None else index.num_items) \
        if max_new is not None else None
    started = time.perf_counter()
    leaves, _ = generate(rm, index, enc, num_beams, batch_size, device, decoder, show_progress, banned_items,
                         new_leaves, max_new)
    wall = time.perf_counter() - started
    hits = target_hits(index, leaves, targets, banned_items)
    if hits_out is not None:
        hits_out.append(hits)
    known = targets[targets < index.num_items]
    leaf_sizes = (index.leaf_ptr[1:] - index.leaf_ptr[:-1]).cpu()
    in_collision = leaf_sizes[index.leaf_of_item.cpu()[known]] > 1
    users = int(targets.numel())
    return {
        "metrics": metrics_from_hits(hits, ks=(5, 10)),
        "standard_errors": standard_errors(hits, ks=(5, 10)),
        "users": users,
        "beams": num_beams,
        "decoder": decoder,
        "wall_s": round(wall, 3),
        "users_per_s": round(users / wall, 2) if wall > 0 else None,
        "targets_in_collision_groups": int(in_collision.sum()),
        "targets_without_identifier": users - int(known.numel()),
        "index": index.summary(),
        "index_version": rec.index_version,
        **({"max_new_share": max_new_share, "max_new_per_list": max_new} if max_new is not None else {}),
    }


def check_indexed_histories(rec: RecData, histories) -> None:
    """Refuse histories (item ids) holding an item without an identifier in `rec`'s index version:
    the model cannot read it. Only other data can have one (a cold split keeps its cold items out
    of histories, a grown catalog's appended items have no interactions)."""
    indexed = len(rec.codes)
    late = next((max(h) for h in histories if h and max(h) >= indexed), None)
    if late is not None:
        raise LetterError(f"{rec.source}: item {rec.dataset.item_ids[late]} is in a history to evaluate but has no "
                          f"identifier in index version {rec.index_version} (other data: the run reads only the items it "
                          "has identifiers for)",
                          "data")


def training_items(run_dir: str) -> int:
    """Items of a run's training index (version 0): ids at or above it were added later."""
    return len(load_npy(os.path.join(run_dir, RecRun.CODES)))


def _check_item_numbering(run_dir: str, info: dict, rec: RecData, path: str, given: bool, training_items: int) -> None:
    """Refuse other data whose items are numbered by another cold split than the run's training
    data (or by none where that had one, or the reverse): a cold split renumbers the catalog (warm
    items first) and identifiers go by position, so they would go to other items. The training
    data's split is read beside its recorded path; where that is gone, a cold split is still
    refused to a run whose training index covers more than the split's warm items (a run trained
    on a split indexes exactly those)."""
    served, what = read_cold_split(rec.dataset), "data" if given else "the dataset"
    if served is not None and training_items != served["warm_items"]:
        raise input_error(what, path, f"a cold split ({served['warm_items']} warm items, renumbered first), but the "
                                      f"run's training index covers {training_items} items: the run was not trained on "
                                      "this split, and its identifiers would go to other items (even as other data)")
    try:
        recorded = recorded_data(info, run_dir)
    except LetterError:
        return  # the training data is gone: its split cannot be compared
    trained = read_cold_split(recorded)
    if served != trained:
        problem = ("not a cold split, but the run was trained on the cold split" if served is None else
                   "a cold split, but the run was trained on a catalog that is not one," if trained is None else
                   "another cold split than the run was trained on,")
        raise input_error(what, path, f"{problem} {recorded}: its items are numbered otherwise, and the run's "
                                      "identifiers would go to other items (even as other data)")


def _load(run_dir: str, data=None, device="cpu", index_version: int | None = None, allow_other_data: bool = False
          ) -> tuple[Recommender, RecData, RecConfig]:
    device = torch.device(device)
    info = read_rec_run_info(run_dir)
    config = RecConfig.from_dict(info["config"])
    cls = recommender_class(config.model)
    model_path = cls.best_model_path(run_dir)
    if not os.path.exists(model_path):
        raise input_error("run_dir", run_dir, f"not a train-rec run folder (missing {os.path.basename(model_path)})")
    codes = load_npy(os.path.join(run_dir, RecRun.CODES))
    model = cls.load_best(run_dir, config, device).eval()  # a corrupt file is named before the checks below
    path, manifest = check_rec_run(run_dir, info, data)  # unfinished or mixed folder; the dataset (relative path first)
    rec = load_rec_data(path, codes, config.max_history, prefix=True)  # the catalog may have grown since
    if check_rec_dataset(run_dir, manifest, rec.dataset, path, data is not None, allow_other_data,
                         trained_sizes(codes, rec.dataset)):
        _check_item_numbering(run_dir, info, rec, path, data is not None, len(codes))
    version_codes, version, _ = load_index_codes(run_dir, index_version)
    check_version_items(run_dir, version, rec.dataset, path)
    if version:
        rec = rec.with_index(version_codes, version)
    return cls.for_decoding(model, rec=rec), rec, config


def load_run(run_dir: str, data=None, device="cpu", index_version: int | None = None,
             allow_other_data: bool = False) -> tuple:
    """(model with the best validation weights -- a Tiger or an LCRec, its data, its settings) of a
    train-rec run folder. `data` overrides the dataset path recorded in run.json (e.g. when the run
    was moved); a dataset whose content is not the one the run was trained on is refused unless
    allow_other_data. The data's codes are those of index version `index_version` (default the
    newest; 0 = the training index, see letter.rec.index_versions)."""
    rm, rec, config = _load(run_dir, data, device, index_version, allow_other_data)
    return rm.model, rec, config


def evaluate(run_dir: str, split: str | None = None, *, settings: EvaluateSettings | None = None, data=None,
             device: str = "cpu", out: str | None = None, show_progress: bool = False, index_version: int | None = None,
             max_new_share: float | None = None, allow_other_data: bool = False, **values) -> dict:
    """Evaluate a run by `settings` (EvaluateSettings) with `split` and `values` (its fields)
    replaced: on the split ('valid' or 'test'; max_users > 0: a fixed random sample) with index
    version `index_version` (default the newest). max_new_share: at most that share of each list
    from items added after training. Returns (and with `out`, writes as JSON) the metrics, users,
    beams, wall time and users/s, and the data path.

    exclude_history: also measure the second protocol, on the same users: every item the user had
    before the target is excluded from the search (as SASRec's mask_history), reported as
    `metrics_exclude_history` next to `metrics` (history kept, the authors' protocol), with its own
    wall time and `targets_in_history` (targets that protocol can never hit).

    A dataset whose content is not the one the run was trained on is refused unless
    allow_other_data; `out` may not be one of the inputs or lie inside the run folder."""
    settings = (settings or EvaluateSettings()).replace(split=split, **values)
    split, num_beams, batch_size = settings.split, settings.num_beams, settings.batch_size
    max_users, decoder, exclude_history = settings.max_users, settings.decoder, settings.exclude_history
    if out:
        check_output_path(out, {"run_dir": run_dir, "data": data})
    device = resolve_device(device)
    rm, rec, config = _load(run_dir, data, device, index_version, allow_other_data)
    seen = rec.eval_seen_items(split, max_users, config.seed)
    check_indexed_histories(rec, seen)
    enc, targets = rm.eval_inputs(rec, split, max_users, config.seed)
    index = rm.prefix_index(rec, device)
    quota = {"max_new_share": max_new_share, "training_items": training_items(run_dir)}
    result = {"model": os.path.abspath(run_dir), "data": rec.source, "split": split,
              **evaluate_model(rm, rec, enc, targets, num_beams, batch_size, device, decoder, index,
                               show_progress=show_progress, **quota)}
    if exclude_history:
        excluded = evaluate_model(rm, rec, enc, targets, num_beams, batch_size, device, decoder, index,
                                  show_progress=show_progress, banned_items=seen, **quota)
        result.update({
            "metrics_exclude_history": excluded["metrics"],
            "wall_s_exclude_history": excluded["wall_s"],
            "users_per_s_exclude_history": excluded["users_per_s"],
            "targets_in_history": sum(int(t) in set(h) for t, h in zip(targets.tolist(), seen)),
        })
    result.update({"device": str(device), "threads": torch.get_num_threads()})
    if out:
        write_json(out, result)
    return result
