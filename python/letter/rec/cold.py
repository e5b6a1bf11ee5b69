"""The cold-split report (`letter evaluate` with cold): a recommender trained on a cold split (letter.data.cold), measured on
cold-target and warm-target test users, before and after its cold items were added
(letter.rec.index_versions), beside baselines on the same users:

  content KNN   cosine between each item's text embedding and the mean of the user's history
                embeddings, over the full catalog (warm and cold), every item of the user's whole
                history excluded (as evaluate's exclude_history), not only the history's window
  popularity    items ranked by their count in the training sequences (cold items count 0)
  SASRec        a train-cf run on the split, ranking the full catalog with its own scores: cold
                items were never a positive in its training, so it scores them as unknown items
                (items appended to the catalog after the split, with no CF vector, are not ranked)

Every method sees the same test users and histories (the split's leave-one-out test part; cold
items are never in a history). Recall/NDCG@5,10 per group: "cold" (target is a cold item),
"warm" (target is a warm item) and "all".
"""
from __future__ import annotations

import glob
import os

import numpy as np
import torch

from letter.cf.train import popularity_counts
from letter.data import drop_leading_padding, pad_left
from letter.data.cold import read_cold_split, test_groups
from letter.errors import SettingError
from letter.metrics import hits_from_topk, metrics_from_hits
from letter.runs import check_output_path, check_sidecar, files_matching, load_npy, write_json
from letter.devices import resolve_device

from .evaluation import _load, check_indexed_histories, evaluate_model
from .index_versions import check_version_items, index_versions, load_index_codes

KS = (5, 10)


def _group_metrics(hits: torch.Tensor, groups: dict[str, np.ndarray]) -> dict:
    out = {name: metrics_from_hits(hits[torch.from_numpy(mask)], KS) for name, mask in groups.items()}
    out["all"] = metrics_from_hits(hits, KS)
    return out


def _exclude(scores: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
    rows = torch.tensor([r for r, h in enumerate(histories) for _ in h], dtype=torch.long)
    cols = torch.tensor([i for h in histories for i in h], dtype=torch.long)
    return scores.index_put((rows, cols), torch.tensor(float("-inf")))


def content_knn_topk(text_emb: np.ndarray, histories: list[list[int]], seen: list[list[int]], k: int,
                     batch: int = 4096) -> torch.Tensor:
    """[U, k] items by cosine between item embeddings and the mean embedding of each history,
    each user's `seen` items (the whole history, Split.seen_items) excluded."""
    emb = torch.from_numpy(np.asarray(text_emb, dtype=np.float32))
    items = torch.nn.functional.normalize(emb, dim=1)
    out = []
    for start in range(0, len(histories), batch):
        users = torch.stack([emb[h].mean(0) for h in histories[start:start + batch]])
        scores = torch.nn.functional.normalize(users, dim=1) @ items.T
        out.append(_exclude(scores, seen[start:start + batch]).topk(k, dim=1).indices)
    return torch.cat(out)


def popularity_topk(counts: np.ndarray, num_users: int, k: int) -> torch.Tensor:
    """[U, k]: the k most frequent training items (ties: lower id first) for every user."""
    top = torch.from_numpy(np.argsort(-counts, kind="stable")[:k])
    return top.expand(num_users, -1)


def sasrec_topk(cf_dir: str, dataset, histories: list[list[int]], k: int, batch: int = 1024) -> torch.Tensor:
    """[U, k] items ranked by the best SASRec of a train-cf run folder (the one checkpoint in it),
    which must have been trained on `dataset` or on the catalog `dataset` grew from by appending
    items: it ranks the items it was trained on (appended items have no CF vector; they have no
    interactions, so they are never a target)."""
    from letter.cf.config import CFConfig
    from letter.cf.model import SASRec
    from letter.runs import read_json
    from letter.training import load_checkpoint

    found = files_matching(cf_dir, f"{glob.escape(dataset.name)}.cf-sasrec*.ckpt.pt")
    if len(found) != 1:
        raise SettingError("cf_dir", f"{cf_dir}: expected one {dataset.name}.cf-sasrec<d>.ckpt.pt (a finished "
                                     f"train-cf run), found {len(found)}")
    metrics_path = found[0][: -len(".ckpt.pt")] + ".json"
    if not os.path.isfile(metrics_path):
        raise SettingError("cf_dir", f"{cf_dir}: unfinished train-cf run (no {os.path.basename(metrics_path)})")
    cfg = CFConfig.from_dict(read_json(metrics_path, "train-cf metrics")["config"])
    ckpt = load_checkpoint(found[0])
    identity = ckpt["identity"]
    trained_items = identity.get("inputs.num_items")
    if not isinstance(trained_items, int) or not dataset.is_or_grew_from(identity.get("inputs.dataset"),
                                                                         (trained_items,)):
        raise SettingError("cf_dir", f"{cf_dir}: trained on other data than {dataset.source}")
    model = SASRec(trained_items, cfg.dim, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len)
    model.load_state_dict(ckpt["trainer"]["best_model"])
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(histories), batch):
            (hist,) = drop_leading_padding(pad_left(histories[start:start + batch], cfg.max_len, -1) + 1)
            out.append(model.scores(model(hist)[:, -1]).topk(k, dim=1).indices)
    return torch.cat(out)


def evaluate_cold(run_dir: str, *, data=None, text_emb=None, cf_dir: str | None = None,
                  max_new_share: float | None = None, num_beams: int = 20, batch_size: int = 256,
                  warm_users: int = 0, device: str = "cpu", out: str | None = None,
                  show_progress: bool = False, allow_other_data: bool = False) -> dict:
    """The cold-start report of a train-rec run on a cold split (module docstring): the recommender
    with its training index (version 0) and with the newest version (the added items), optionally
    with the share control, plus content KNN (`text_emb`: [N, d] array or .npy of the split's
    items), popularity and SASRec (`cf_dir`: a train-cf run on the split). Returns (and with
    `out`, writes) {"users": {...}, "rows": [{"method", "cold", "warm", "all"}, ...]}.
    warm_users > 0: every cold-target user but only a fixed sample (seeded by the split's seed,
    the same for every run on the split) of that many warm-target users, to bound the work.
    allow_other_data: use a dataset whose content is not the one the run was trained on."""
    if out:
        check_output_path(out, {"run_dir": run_dir, "data": data, "text_emb": text_emb, "cf_dir": cf_dir})
    device = resolve_device(device)
    rm, rec, config = _load(run_dir, data, device, 0, allow_other_data)
    cold = read_cold_split(rec.dataset)
    if cold is None:
        raise SettingError("cold", f": {rec.source} is not a cold split (no cold_split.json; make one with "
                                   "`letter data cold-split`)")
    if text_emb is not None:  # checked before anything is evaluated
        emb = load_npy(text_emb, "text_emb") if isinstance(text_emb, (str, os.PathLike)) else np.asarray(text_emb)
        if emb.ndim != 2 or emb.shape[0] != rec.dataset.num_items:
            raise SettingError("text_emb", f": expected [{rec.dataset.num_items}, d] rows of the split's items, "
                                           f"got shape {emb.shape}")
        if isinstance(text_emb, (str, os.PathLike)):  # rows by position: refuse a file made for other items
            shown = ("data", data) if data is not None else f"the dataset {rec.source}"
            check_sidecar(os.fspath(text_emb), "text embedding", {"items": (rec.dataset.items_fingerprint(), shown)})
    histories = [h for h, _ in rec.split.test]
    check_indexed_histories(rec, histories)
    seen = rec.eval_seen_items("test")  # what content KNN excludes, as evaluate's exclude_history
    enc, targets = rm.eval_inputs(rec, "test", 0, config.seed)
    groups = test_groups(targets.numpy(), cold)
    warm = np.flatnonzero(groups["warm"])
    if 0 < warm_users < len(warm):
        keep = np.sort(np.r_[np.flatnonzero(groups["cold"]),
                             np.random.default_rng(cold["seed"]).choice(warm, size=warm_users, replace=False)])
        enc, targets = enc[torch.from_numpy(keep)], targets[torch.from_numpy(keep)]
        histories, seen = [histories[i] for i in keep], [seen[i] for i in keep]
        groups = test_groups(targets.numpy(), cold)
    training_items = len(rec.codes)
    rows = []

    def tiger_row(method, data_v, share=None):
        hits = []
        result = evaluate_model(rm, data_v, enc, targets, num_beams, batch_size, device, show_progress=show_progress,
                                max_new_share=share, training_items=training_items, hits_out=hits)
        rows.append({"method": method, "index_version": data_v.index_version, "indexed_items": len(data_v.codes),
                     **({"max_new_share": share} if share is not None else {}),
                     "wall_s": result["wall_s"], **_group_metrics(hits[0], groups)})

    tiger_row("recommender, training index (before adding)", rec)
    newest = index_versions(run_dir)[-1]
    if newest:
        check_version_items(run_dir, newest, rec.dataset, rec.source)  # as every other reader of a version
        codes, version, _ = load_index_codes(run_dir, newest)
        added = rec.with_index(codes, version)
        tiger_row("recommender + added items", added)
        if max_new_share is not None:
            tiger_row(f"recommender + added items, share <= {max_new_share:g}", added, max_new_share)
    k = max(KS)
    if text_emb is not None:
        topk = content_knn_topk(emb, histories, seen, k)
        rows.append({"method": "content KNN", **_group_metrics(hits_from_topk(topk, targets), groups)})
    topk = popularity_topk(popularity_counts(rec.split, rec.dataset), len(histories), k)
    rows.append({"method": "popularity", **_group_metrics(hits_from_topk(topk, targets), groups)})
    if cf_dir is not None:
        topk = sasrec_topk(cf_dir, rec.dataset, histories, k)
        rows.append({"method": "SASRec", **_group_metrics(hits_from_topk(topk, targets), groups)})
    result = {
        "model": os.path.abspath(run_dir),
        "data": rec.source,
        "split": {key: cold[key] for key in ("fraction", "seed", "num_items", "warm_items")},
        "users": {name: int(mask.sum()) for name, mask in groups.items()} | {"all": len(histories)},
        "warm_users_sampled": bool(0 < warm_users < len(warm)),
        "index_versions": index_versions(run_dir),
        "beams": num_beams,
        "rows": rows,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if out:
        write_json(out, result)
    return result


def cold_table(result: dict) -> str:
    """The report as a markdown table (R/N@5,10 per group)."""
    lines = ["| method | group | users | R@5 | N@5 | R@10 | N@10 |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for group in ("cold", "warm"):
            m = row[group]
            lines.append(f"| {row['method']} | {group}-target | {result['users'][group]} | {m['recall@5']:.4f} | "
                         f"{m['ndcg@5']:.4f} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} |")
    return "\n".join(lines)
