"""The collaborative-filtering trainer: a CF model (SASRec or LightGCN) trained by letter.training.fit
on the leave-one-out split, selected on full-ranking validation NDCG@10, its item embeddings exported
as the tokenizer's CF signal.

Every CF model trains on the split's training part (each evaluated user's items[:-2]) and is
evaluated the same way: validation/test rank all items for items[:-2] -> items[-2] and
items[:-1] -> items[-1]. Items already in the history are not masked by default (the LETTER/TIGER
evaluation does not mask them either); `mask_history=True` does.

A model is a `CFTrainable` adapter in its own module, registered in MODELS (docs/TRAINERS.md).

Distributed: under torchrun each process takes an interleaved share of every global batch and the
loss is normalised by the global batch, so N processes take the same steps as one (up to float
summation order and dropout randomness).
"""
from __future__ import annotations

import importlib
import json
import math
import os

import numpy as np
import torch

from letter.cf.config import CFConfig
from letter.data import Dataset, Split, drop_leading_padding, leave_one_out, pad_left
from letter.data.cold import check_no_cold_training, read_cold_split
from letter.data.split import check_training_samples
from letter.errors import LetterError
from letter.metrics import hits_from_topk, metric_sums
from letter.runs import cf_output_paths, prepare_output_files, save_npy, sidecar_record, write_json
from letter.training import (DistContext, FitPlan, RandomStreams, Trainable, Validation, distributed, fit,
                             precision_used, seed_everything)

KS = (5, 10)

# CFConfig.model -> (module, adapter class)
MODELS = {
    "sasrec": ("letter.cf.sasrec", "SASRecTrainable"),
    "lightgcn": ("letter.cf.lightgcn", "LightGCNTrainable"),
}


output_paths = cf_output_paths


def popularity_counts(split: Split, dataset: Dataset) -> np.ndarray:
    """How often each item occurs in the training sequences (every evaluated user's items[:-2])."""
    counts = np.zeros(dataset.num_items, dtype=np.int64)
    for user in split.eval_users:
        np.add.at(counts, dataset.sequences[user][:-2], 1)
    return counts


def popularity_metrics(split: Split, dataset: Dataset, part: str = "test", ks=KS,
                       mask_history: bool = False) -> dict[str, float]:
    """Baseline: everyone gets the items most frequent in the training sequences (with
    mask_history: the most frequent ones not in the user's whole history)."""
    counts = popularity_counts(split, dataset)
    samples = split.part(part)
    targets = torch.tensor([t for _, t in samples])
    if not mask_history:
        top = torch.from_numpy(np.argsort(-counts, kind="stable")[: max(ks)])
        hits = hits_from_topk(top.expand(len(samples), -1), targets)
        return {k: v / len(samples) for k, v in metric_sums(hits, ks).items()}
    # rank by count, ties to the lower id (as the stable argsort), history items ruled out: a
    # user's top k is among the k + len(history) most popular items, so each user costs
    # O(k + history) rather than a pass over the catalog
    ranked = np.argsort(-counts, kind="stable")
    k = max(ks)
    seen_lists = split.seen_items(dataset, part, range(len(samples)))
    head = ranked[: k + max((len(seen) for seen in seen_lists), default=0)].tolist()
    top = torch.full((len(samples), k), -1, dtype=torch.long)  # -1: an empty slot, never a hit
    for row, seen in enumerate(seen_lists):
        seen = set(seen)
        kept = [item for item in head if item not in seen][:k]
        top[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
    return {key: v / len(samples) for key, v in metric_sums(hits_from_topk(top, targets), ks).items()}


# From this many items a CPU step of SASRec's full softmax costs several times the sampled
# softmax's (docs/BENCHMARKS.md, "Scale": 4.8x at 100k items, 15x at 1M, 1.25x at 10k)
SAMPLED_ADVISED_FROM_ITEMS = 100_000


def loss_choice(cfg: CFConfig, num_items: int) -> str:
    """One line saying which training loss this run uses on a catalog of num_items and why
    (train-cf and the pipeline's cf stage log it)."""
    if cfg.loss == "ce":
        large = cfg.model == "sasrec" and num_items >= SAMPLED_ADVISED_FROM_ITEMS
        advice = (f"; from {SAMPLED_ADVISED_FROM_ITEMS:,} items on a CPU the sampled loss (setting "
                  "cf.loss) is several times faster per step" if large else "")
        return (f"loss ce: the exact full softmax over all {num_items:,} items (fused, O(rows) memory; its cost per "
                f"target grows linearly with the catalog){advice}; the loss is never switched by itself, since the "
                "two losses train different models")
    if cfg.loss == "sampled" and cfg.negatives >= num_items:
        return (f"loss sampled: {cfg.negatives:,} negatives cover all {num_items:,} items, so every item is one "
                "(the exact full softmax)")
    if cfg.loss == "sampled":
        return (f"loss sampled: softmax over each target and {cfg.negatives:,} uniform negatives of "
                f"{num_items:,} items (cost per target nearly flat in the catalog; an estimate of the full softmax)")
    return f"loss {cfg.loss} over {num_items:,} items"


SCORES_PER_BATCH = 1 << 25  # full ranking scores [rows, items] at most this many at a time (128 MiB of fp32)


def ranking_batch_rows(batch_size: int, num_items: int) -> int:
    """Users per full-ranking batch: `batch_size`, fewer on large catalogs so that the score
    matrix (and the history mask beside it) stays within SCORES_PER_BATCH entries."""
    return max(1, min(batch_size, SCORES_PER_BATCH // num_items))


@torch.no_grad()
def ranking_metrics(scores_of, samples, users: list[int], num_items: int, ctx: DistContext, cfg: CFConfig,
                    mask_history: bool | None = None, seen: list[list[int]] | None = None) -> dict[str, float]:
    """Full-ranking Recall/NDCG@5,10 over `samples` (users[i]: the user of samples[i]), sharded over
    processes and summed, in batches of at most ranking_batch_rows users. scores_of(histories,
    users) -> [B, num_items] scores, histories in model ids (item + 1, left-padded with 0). When
    `mask_history` (default: the config's) the items seen[i] (Split.seen_items: the user's whole
    history, not only the sample's last max_len items) are ruled out for samples[i]."""
    mask_history = cfg.mask_history if mask_history is None else mask_history
    if mask_history and (seen is None or len(seen) != len(samples)):
        raise ValueError("a masked ranking needs the seen items of every sample")
    mine, my_users = samples[ctx.rank :: ctx.world], users[ctx.rank :: ctx.world]
    my_seen = seen[ctx.rank :: ctx.world] if mask_history else None
    sums = dict.fromkeys([f"{m}@{k}" for k in KS for m in ("recall", "ndcg")], 0.0)
    rows = ranking_batch_rows(cfg.eval_batch_size, num_items)
    for start in range(0, len(mine), rows):
        batch = mine[start : start + rows]
        (hist,) = drop_leading_padding(pad_left([h for h, _ in batch], cfg.max_len, -1).to(ctx.device) + 1)
        targets = torch.tensor([t for _, t in batch], device=ctx.device)
        scores = scores_of(hist, torch.tensor(my_users[start : start + rows], device=ctx.device))
        if mask_history:
            batch_seen = my_seen[start : start + rows]
            lengths = torch.tensor([len(s) for s in batch_seen], device=scores.device)
            row_of = torch.repeat_interleave(torch.arange(len(batch_seen), device=scores.device), lengths)
            items = torch.tensor([item for s in batch_seen for item in s], dtype=torch.long, device=scores.device)
            scores[row_of, items] = float("-inf")
        top = scores.topk(max(KS), dim=1)
        # a masked item that still reaches the top k (fewer than k unmasked items) is an empty slot
        topk = top.indices.masked_fill(top.values == float("-inf"), -1) if mask_history else top.indices
        for key, value in metric_sums(hits_from_topk(topk, targets), KS).items():
            sums[key] += value
    totals = ctx.sum(list(sums.values()) + [len(mine)])
    return {key: total / max(totals[-1], 1) for key, total in zip(sums, totals)}


class CFTrainable(Trainable):
    """What every CF model shares on top of its own `batches`/`step`: validation by full-ranking
    NDCG@10 on the split's validation part, the selected weights kept in the checkpoint, the mean
    training loss per step. A model adds `build` (a classmethod, called with the RNG seeded),
    `batches`, `step`, `scorer()` (-> scores_of for ranking_metrics) and `item_embeddings()`."""

    def __init__(self, model: torch.nn.Module, dataset: Dataset, split: Split, cfg: CFConfig, ctx: DistContext):
        self.model, self.dataset, self.split, self.cfg, self.ctx = model, dataset, split, cfg, ctx
        self.step_module = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.best_model: dict | None = None
        self.use_amp = False  # bf16 autocast; a model that supports it sets it from cfg.precision

    @classmethod
    def build(cls, dataset: Dataset, split: Split, cfg: CFConfig, ctx: DistContext, rng: RandomStreams) -> "CFTrainable":
        raise NotImplementedError

    def scorer(self):
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:
        raise NotImplementedError

    def parameters(self) -> list:
        return list(self.model.parameters())

    def epoch_record(self, epoch: int, sums: dict[str, float], steps: int) -> dict:
        # each process added its share of every step's loss
        loss = sums.get("loss", 0.0) / self.ctx.world / max(steps, 1)
        if not math.isfinite(loss):  # the summed loss is the same on every rank: all raise alike
            raise LetterError(f"training diverged: the loss is {loss} in epoch {epoch}; lower lr", "lr")
        return {"loss": loss, "precision": precision_used(self.use_amp, self.model)}

    def ranking(self, part: str, mask_history: bool | None = None, max_users: int = 0) -> dict[str, float]:
        """Full-ranking metrics of `part`'s users, or of a fixed random sample of max_users of them
        (Split.sample_rows, seeded by the config's seed: the same users every epoch)."""
        rows = self.split.sample_rows(part, max_users, self.cfg.seed)
        samples, users = self.split.part(part), self.split.eval_users
        masked = self.cfg.mask_history if mask_history is None else mask_history
        seen = self.split.seen_items(self.dataset, part, rows) if masked else None  # only a masked ranking reads them
        self.model.eval()
        try:
            with torch.no_grad():
                return ranking_metrics(self.scorer(), [samples[i] for i in rows], [users[i] for i in rows],
                                       self.dataset.num_items, self.ctx, self.cfg, masked, seen)
        finally:
            self.model.train()

    def validate(self, epoch: int, record: dict, select: bool) -> Validation | None:
        if not select:
            return None
        valid = self.ranking("valid", max_users=self.cfg.valid_users)
        record["valid_users"] = len(self.split.sample_rows("valid", self.cfg.valid_users, self.cfg.seed))
        return Validation({f"valid_{k}": v for k, v in valid.items()}, valid["ndcg@10"])

    def keep_best(self, epoch: int, validation: Validation) -> None:
        self.best_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def extra_state(self) -> dict:
        return {"best_model": self.best_model}

    def load_extra_state(self, state: dict) -> None:
        self.best_model = state["best_model"]


def trainable_class(name: str) -> type[CFTrainable]:
    module, cls = MODELS[name]
    return getattr(importlib.import_module(module), cls)


def dataset_identity(dataset: Dataset) -> dict:
    """Fingerprints of what a CF run reads: resuming on other data is refused."""
    return {"inputs.dataset": dataset.fingerprint(), "inputs.num_items": dataset.num_items}


def check_catalog(dataset: Dataset) -> None:
    """The metrics rank a top 10: a smaller catalog is refused (before any output is written)."""
    if dataset.num_items < max(KS):
        raise LetterError(f"{dataset.source}: {dataset.num_items} items; train-cf ranks the top {max(KS)} items, so it "
                          f"needs at least {max(KS)}")


def train_cf(dataset: Dataset, out_dir: str, cfg: CFConfig, resume: bool = False, log=print,
             overwrite: bool = False) -> dict:
    """Train the CF model `cfg.model` with early stopping on valid NDCG@10; write its item embeddings
    (<Name>.cf-<model><dim>.npy, [num_items, dim] float32), metrics and a checkpoint.

    resume: continue from the checkpoint (an error without one). A cold split (letter.data.cold)
    holding a cold item outside the test targets is refused; so are finished outputs of the same
    name in `out_dir` without resume (continue: same results) or overwrite (replace them). Returns
    the metrics dict (also written as <Name>.cf-<model><dim>.json, last: the embeddings' sidecar
    manifest, with their state and the dataset's hash)."""
    cfg.validate()
    check_catalog(dataset)
    check_no_cold_training(dataset, read_cold_split(dataset))
    check_training_samples(dataset, dataset.source)
    split = leave_one_out(dataset, max_history=cfg.max_len)
    paths = output_paths(out_dir, dataset.name, cfg.dim, cfg.model)
    with distributed(cfg.device) as ctx:  # the device is checked before overwrite removes anything
        prepare_output_files([paths["embeddings"], paths["checkpoint"], paths["metrics"]], "train-cf", resume=resume,
                             overwrite=overwrite, main=ctx.main)
        return _train(dataset, split, out_dir, cfg, resume, ctx, log)


def _train(dataset: Dataset, split: Split, out_dir: str, cfg: CFConfig, resume: bool, ctx: DistContext, log) -> dict:
    paths = output_paths(out_dir, dataset.name, cfg.dim, cfg.model)
    if ctx.main:
        log(loss_choice(cfg, dataset.num_items))
    seed_everything(cfg.seed)
    rng = RandomStreams(ctx.device)
    trainable = trainable_class(cfg.model).build(dataset, split, cfg, ctx, rng)
    if ctx.main:
        os.makedirs(out_dir, exist_ok=True)
    plan = FitPlan(epochs=cfg.epochs, checkpoint=paths["checkpoint"], resume=resume,
                   identity={**cfg.to_dict(), **dataset_identity(dataset)},
                   may_change=set(cfg.to_dict()) - set(cfg.fixed_on_resume()), patience=cfg.patience,
                   log=log)
    run = fit(trainable, plan, ctx, rng)

    trainable.model.load_state_dict(trainable.best_model)
    # each test protocol ranked once ("test" is the config's): a full ranking is users x items
    test = {masked: trainable.ranking("test", mask_history=masked) for masked in (False, True)}
    result = {
        "dataset": dataset.name,
        "config": cfg.to_dict(),
        "world_size": ctx.world,
        "epochs_run": run.epoch,
        "best_epoch": run.stopping.best_epoch,
        "train_seconds": run.history[-1]["wall_s"] if run.history else 0.0,
        "valid": trainable.ranking("valid", max_users=cfg.valid_users),  # the users model selection saw
        "test": test[cfg.mask_history],
        # both protocols side by side, whichever one early stopping used
        "test_history_kept": test[False],
        "test_history_masked": test[True],
        "popularity_test": popularity_metrics(split, dataset, "test"),
        "popularity_test_history_masked": popularity_metrics(split, dataset, "test", mask_history=True),
        "history": run.history,
    }
    if ctx.main:
        with torch.no_grad():
            save_npy(paths["embeddings"], trainable.item_embeddings().detach().float().cpu().numpy())
        write_json(paths["metrics"], {**result, **sidecar_record(paths["embeddings"], {"dataset": dataset.fingerprint()})})
        log(f"test {json.dumps(result['test'])}\nwrote {paths['embeddings']}")
    ctx.barrier()
    return result
