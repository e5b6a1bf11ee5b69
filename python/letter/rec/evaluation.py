"""Generation and evaluation of a train-rec run (TIGER or LC-Rec, through their Recommender
adapters): trie-constrained beam search over real identifiers, Recall/NDCG@5,10 over the full
catalog, and top-k recommendations with titles.

Hit rule (the authors'): a generated identifier is a hit when it equals the target item's
identifier, so items sharing an identifier (a collision group) are indistinguishable; the report
also counts how many evaluated targets sit in such groups.
"""
from __future__ import annotations

import os
import time

import torch

from letter.decoding import PrefixIndex, constrained_beam_search, hf_style_beam_search
from letter.errors import LetterError
from letter.metrics import metrics_from_hits, standard_errors
from letter.runs import check_rec_run, load_npy, read_rec_run_info
from letter.training import resolve_device
from letter.utils import progress, write_json

from .config import RecConfig
from .data import RecData, load_rec_data
from .recommender import Recommender, as_recommender, recommender_class

DECODERS = ("fused", "hf")


def prefix_index(rec: RecData, device, model=None) -> PrefixIndex:
    """The identifier trie of `rec`'s items over the vocabulary of `model` (default: TIGER's layout)."""
    if model is None:
        return PrefixIndex.from_codes(rec.codes, rec.layout.level_sizes, rec.layout.offsets, device=device)
    return as_recommender(model, rec=rec).prefix_index(rec, device)


@torch.no_grad()
def generate(model, index: PrefixIndex, enc: torch.Tensor, num_beams: int, batch_size: int, device,
             decoder: str = "fused", show_progress: bool = False):
    """Top-`num_beams` identifiers per user. `model`: a Tiger, an LCRec or their Recommender
    adapter; `enc`: the users' model inputs (TIGER: encoder tokens [U, S] as RecData.eval_tensors
    gives; LC-Rec: item-id histories [U, H] as RecData.eval_histories gives).

    Returns (leaves [U, K] identifier ids of `index` (-1: empty slot), scores [U, K] summed
    log-probabilities), best first. decoder='hf' runs the same model through the
    HF-style Python prefix_allowed_tokens_fn baseline (for speed comparisons only)."""
    if decoder not in DECODERS:
        raise LetterError(f"--decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if num_beams < 1:
        raise LetterError(f"--beams must be >= 1, got {num_beams}")
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
        result = search(lambda step, last, st: rm.decode_step(last, st), rows.numel(), index, num_beams,
                        reorder_state=rm.reorder_state, state=state)
        leaves[rows] = result.leaves.cpu()
        scores[rows] = result.scores.cpu().float()
        bar.update(rows.numel())
    bar.close()
    return leaves, scores


def evaluate_model(model, rec: RecData, enc: torch.Tensor, targets: torch.Tensor, num_beams: int,
                   batch_size: int, device, decoder: str = "fused", index: PrefixIndex | None = None,
                   show_progress: bool = False) -> dict:
    """Recall/NDCG@5,10 of constrained beam search on the users' model inputs `enc` (see
    generate) vs target items [U], with each metric's standard error over these users."""
    if num_beams < 10:
        raise LetterError(f"--beams must be >= 10 to compute the @10 metrics, got {num_beams}")
    rm = as_recommender(model, rec=rec)
    index = index if index is not None else rm.prefix_index(rec, device)
    started = time.perf_counter()
    leaves, _ = generate(rm, index, enc, num_beams, batch_size, device, decoder, show_progress)
    wall = time.perf_counter() - started
    target_leaves = index.leaf_of_item.cpu()[targets]
    hits = leaves == target_leaves[:, None]  # [U, K]: generated identifier == the target's
    leaf_sizes = (index.leaf_ptr[1:] - index.leaf_ptr[:-1]).cpu()
    in_collision = leaf_sizes[target_leaves] > 1
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
        "index": index.summary(),
    }


def _load(run_dir: str, data=None, device="cpu") -> tuple[Recommender, RecData, RecConfig]:
    device = torch.device(device)
    info = read_rec_run_info(run_dir)
    config = RecConfig.from_dict(info["config"])
    cls = recommender_class(config.model)
    model_path = cls.best_model_path(run_dir)
    if not os.path.exists(model_path):
        raise LetterError(f"--model {run_dir}: not a train-rec run folder (missing {os.path.basename(model_path)})")
    codes = load_npy(os.path.join(run_dir, "codes.npy"))
    model = cls.load_best(run_dir, config, device).eval()  # a corrupt file is named before the checks below
    data = check_rec_run(run_dir, info, data)  # unfinished or mixed folder; the dataset (relative path first)
    rec = load_rec_data(data, codes, config.max_history)
    return cls.for_decoding(model, rec=rec), rec, config


def load_run(run_dir: str, data=None, device="cpu") -> tuple:
    """(model with the best validation weights -- a Tiger or an LCRec, its data, its settings) of a
    train-rec run folder. `data` overrides the dataset path recorded in run.json (e.g. when the run
    was moved)."""
    rm, rec, config = _load(run_dir, data, device)
    return rm.model, rec, config


def evaluate(run_dir: str, split: str = "test", *, data=None, num_beams: int = 20, batch_size: int = 256,
             max_users: int = 0, decoder: str = "fused", device: str = "cpu", out: str | None = None,
             show_progress: bool = False) -> dict:
    """Evaluate a run on `split` ('valid' or 'test'; max_users > 0: a fixed random sample).
    Returns (and with `out`, writes as JSON) the metrics, users, beams, wall time and users/s."""
    if split not in ("valid", "test"):
        raise LetterError(f"--split must be valid or test, got {split!r}")
    device = resolve_device(device)
    rm, rec, config = _load(run_dir, data, device)
    enc, targets = rm.eval_inputs(rec, split, max_users, config.seed)
    result = {"model": os.path.abspath(run_dir), "split": split,
              **evaluate_model(rm, rec, enc, targets, num_beams, batch_size, device, decoder,
                               show_progress=show_progress),
              "device": str(device), "threads": torch.get_num_threads()}
    if out:
        write_json(out, result)
    return result


def recommend(run_dir: str, history: list[str], k: int = 10, *, data=None, device: str = "cpu") -> list[dict]:
    """Top-k items for a history of original item ids (oldest first): [{item_id, title, score, code}].
    Items sharing a generated identifier are listed together under that identifier's rank."""
    if k < 1:
        raise LetterError(f"-k must be >= 1, got {k}")
    device = resolve_device(device)
    rm, rec, _ = _load(run_dir, data, device)
    position = {item: i for i, item in enumerate(rec.dataset.item_ids)}
    unknown = [h for h in history if h not in position]
    if unknown or not history:
        raise LetterError(f"--history: unknown item id(s) {', '.join(unknown[:5])}" if unknown else "--history is empty")
    index = rm.prefix_index(rec, device)
    enc = rm.encode(rec, [[position[h] for h in history]])
    leaves, scores = generate(rm, index, enc, k, 1, device)
    text = rec.dataset.item_text
    out = []
    for leaf, score in zip(leaves[0].tolist(), scores[0].tolist()):
        if leaf < 0:
            continue  # fewer than k identifiers exist
        for item in index.items_of_leaf(leaf):
            out.append({"item_id": rec.dataset.item_ids[item], "title": text[item].get("title", "") if text else "",
                        "score": score, "code": rec.codes[item].tolist()})
    return out
