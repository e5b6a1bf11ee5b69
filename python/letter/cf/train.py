"""Training and full-ranking evaluation of SASRec; export of its item embeddings as the CF signal.

Training uses the leave-one-out split's training part (each user's items[:-2]) as sequence-to-
sequence windows: every position predicts the next item, which covers the same (prefix -> next
item) samples as the paper's split. Validation/test rank all items for items[:-2] -> items[-2] and
items[:-1] -> items[-1]. Items already in the history are not masked by default (the LETTER/TIGER
evaluation does not mask them either); `mask_history=True` does.

Distributed: under torchrun each process takes an interleaved share of every global batch and the
loss is normalised by the global number of targets, so N processes take the same steps as one
(up to float summation order and dropout randomness).
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from letter_ext import dot_product_cross_entropy

from letter.cf.config import CFConfig
from letter.cf.model import SASRec
from letter.data import Dataset, Split, leave_one_out, pad_left
from letter.data.cold import check_no_cold_training, read_cold_split
from letter.errors import LetterError
from letter.metrics import hits_from_topk, metric_sums
from letter.training import (DistContext, EarlyStopping, RandomStreams, batch_order, bf16_autocast, check_resume,
                             distributed, epoch_generator, load_checkpoint, save_checkpoint, seed_everything, shard)
from letter.runs import sidecar_record
from letter.utils import progress, save_npy, write_json

KS = (5, 10)


def output_paths(out_dir: str, name: str, dim: int) -> dict[str, str]:
    stem = os.path.join(out_dir, f"{name}.cf-sasrec{dim}")
    return {"embeddings": stem + ".npy", "metrics": stem + ".json", "checkpoint": stem + ".ckpt.pt"}


def training_windows(split: Split, dataset: Dataset, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [N, max_len] in model ids (item + 1; 0 = pad / no target) from every
    evaluated user's items[:-2]; sequences longer than max_len + 1 are cut into windows from the end."""
    inputs, targets = [], []
    for user in split.eval_users:
        head = dataset.sequences[user][:-2]
        end = len(head) - 1  # last input position (exclusive end of inputs is end)
        while end > 0:
            start = max(0, end - max_len)
            inputs.append([i + 1 for i in head[start:end]])
            targets.append([i + 1 for i in head[start + 1 : end + 1]])
            end = start
    return pad_left(inputs, max_len, 0), pad_left(targets, max_len, 0)


def trim_padding(seq: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the leading columns that are padding (0) in every row of `seq`, in all tensors."""
    nonempty = (seq != 0).any(0).nonzero()
    start = int(nonempty[0]) if len(nonempty) else seq.shape[1] - 1
    return tuple(t[:, start:] for t in (seq, *others))


def popularity_counts(split: Split, dataset: Dataset) -> np.ndarray:
    """How often each item occurs in the training sequences (every evaluated user's items[:-2])."""
    counts = np.zeros(dataset.num_items, dtype=np.int64)
    for user in split.eval_users:
        np.add.at(counts, dataset.sequences[user][:-2], 1)
    return counts


def popularity_metrics(split: Split, dataset: Dataset, part: str = "test", ks=KS,
                       mask_history: bool = False) -> dict[str, float]:
    """Baseline: everyone gets the items most frequent in the training sequences (with
    mask_history: the most frequent ones not in the user's history sample)."""
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
    head = ranked[: k + max((len(history) for history, _ in samples), default=0)].tolist()
    top = torch.full((len(samples), k), -1, dtype=torch.long)  # -1: an empty slot, never a hit
    for row, (history, _) in enumerate(samples):
        seen = set(history)
        kept = [item for item in head if item not in seen][:k]
        top[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
    return {key: v / len(samples) for key, v in metric_sums(hits_from_topk(top, targets), ks).items()}


SCORES_PER_BATCH = 1 << 25  # full ranking scores [rows, items] at most this many at a time (128 MiB of fp32)


def ranking_batch_rows(batch_size: int, num_items: int) -> int:
    """Users per full-ranking batch: `batch_size`, fewer on large catalogs so that the score
    matrix (and the history mask beside it) stays within SCORES_PER_BATCH entries."""
    return max(1, min(batch_size, SCORES_PER_BATCH // num_items))


@torch.no_grad()
def full_ranking_metrics(model: SASRec, samples, ctx: DistContext, cfg: CFConfig,
                         mask_history: bool | None = None) -> dict[str, float]:
    """Full-ranking Recall/NDCG@5,10 over `samples`, sharded over processes and summed; history items
    ruled out when `mask_history` (default: the config's)."""
    mask_history = cfg.mask_history if mask_history is None else mask_history
    model.eval()
    mine = samples[ctx.rank :: ctx.world]
    sums = dict.fromkeys([f"{m}@{k}" for k in KS for m in ("recall", "ndcg")], 0.0)
    rows = ranking_batch_rows(cfg.eval_batch_size, model.num_items)
    for start in range(0, len(mine), rows):
        batch = mine[start : start + rows]
        (hist,) = trim_padding(pad_left([h for h, _ in batch], cfg.max_len, -1).to(ctx.device) + 1)
        targets = torch.tensor([t for _, t in batch], device=ctx.device)
        scores = model.scores(model(hist)[:, -1])
        if mask_history:
            # count history occurrences per item (pads add 0 at item 0) and rule those items out
            seen = torch.zeros_like(scores, dtype=torch.int32)
            seen.scatter_add_(1, (hist - 1).clamp(min=0), (hist > 0).int())
            scores.masked_fill_(seen > 0, float("-inf"))
        topk = scores.topk(max(KS), dim=1).indices
        for key, value in metric_sums(hits_from_topk(topk, targets), KS).items():
            sums[key] += value
    totals = ctx.sum(list(sums.values()) + [len(mine)])
    model.train()
    return {key: total / max(totals[-1], 1) for key, total in zip(sums, totals)}


def sampled_softmax_loss(h: torch.Tensor, emb: torch.Tensor, t: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Summed softmax cross-entropy of each target against a shared set of uniformly drawn negative
    items (a negative equal to the row's target is left out). Uniform draws need no log-Q
    correction: every item has the same proposal probability, which cancels in the softmax."""
    pos = (h * emb[t]).sum(-1, keepdim=True)
    neg = (h @ emb[negatives].T).masked_fill(negatives.unsqueeze(0) == t.unsqueeze(1), float("-inf"))
    return (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos.squeeze(1)).sum()


def _step_loss(model, inputs, targets, num_items: int, loss: str, global_targets: int, world: int, negatives: int = 0):
    hidden = model(inputs)  # through the DDP wrapper when distributed, so gradients get synced
    model = getattr(model, "module", model)
    valid = targets > 0
    h, t = hidden[valid], targets[valid] - 1
    if loss == "ce":
        # fused: the [targets x items] logits are never built (O(rows) memory at any catalog size)
        total = dot_product_cross_entropy(h.float(), model.item_embeddings().float(), t, reduction="sum")
    elif loss == "sampled":
        drawn = torch.randint(0, num_items, (min(negatives, num_items),), device=t.device)
        total = sampled_softmax_loss(h, model.item_embeddings(), t, drawn)
    else:
        emb = model.item_embeddings()
        negatives = torch.randint(0, num_items, t.shape, device=t.device)
        pos, neg = (h * emb[t]).sum(-1), (h * emb[negatives]).sum(-1)
        total = F.softplus(-pos).sum() + F.softplus(neg).sum()
    # DDP averages gradients over processes; scaling by world makes the result sum / global count
    return total * world / max(global_targets, 1)


def _inputs(dataset: Dataset) -> dict:
    """Fingerprints of what the run reads: resuming on other data is refused."""
    return {"inputs.dataset": dataset.fingerprint(), "inputs.num_items": dataset.num_items}


def train_cf(dataset: Dataset, out_dir: str, cfg: CFConfig, resume: bool = False, device: str | None = None,
             log=print) -> dict:
    """Train SASRec with early stopping on valid NDCG@10; write embeddings, metrics and a checkpoint.

    A cold split (letter.data.cold) holding a cold item outside the test targets is refused.
    Returns the metrics dict (also written as <Name>.cf-sasrec<d>.json)."""
    cfg.validate()
    check_no_cold_training(dataset, read_cold_split(dataset))
    with distributed(device) as ctx:
        return _train(dataset, out_dir, cfg, resume, ctx, log)


def _train(dataset: Dataset, out_dir: str, cfg: CFConfig, resume: bool, ctx: DistContext, log) -> dict:
    paths = output_paths(out_dir, dataset.name, cfg.dim)
    split = leave_one_out(dataset, max_history=cfg.max_len)
    if not split.train:
        raise LetterError(f"{dataset.name}: no training samples (every user has fewer than 4 items)")
    inputs, targets = training_windows(split, dataset, cfg.max_len)

    seed_everything(cfg.seed)
    rng = RandomStreams(ctx.device)
    model = SASRec(dataset.num_items, cfg.dim, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stopping = EarlyStopping(cfg.patience)
    state = {"epoch": 0, "history": [], "train_seconds": 0.0}
    best_weights = None
    identity = {**cfg.to_dict(), **_inputs(dataset)}
    if resume and os.path.exists(paths["checkpoint"]):
        ckpt = load_checkpoint(paths["checkpoint"], map_location=ctx.device)
        check_resume(paths["checkpoint"], ckpt.get("identity", {}), identity, cfg.fixed_on_resume() + list(_inputs(dataset)))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state, best_weights = ckpt["state"], ckpt["best_model"]
        stopping.load_state_dict(ckpt["stopping"])
        stopping.patience = cfg.patience
        rng.restore(ckpt["rng"])
        log(f"resumed from {paths['checkpoint']} after epoch {state['epoch']}")
    elif resume:
        log(f"no checkpoint at {paths['checkpoint']}; starting fresh")

    train_model = model
    if ctx.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    lengths = (inputs > 0).sum(1)
    use_amp = bf16_autocast(cfg.precision, ctx.device, cfg.dim)
    while state["epoch"] < cfg.epochs and not stopping.should_stop:
        epoch = state["epoch"] + 1
        started = time.time()
        total_loss = 0.0
        steps = batch_order(len(lengths), cfg.batch_size, epoch_generator(cfg.seed, epoch), lengths)
        for batch in progress(steps, desc=f"epoch {epoch}", leave=False, disable=None if ctx.main else True):
            global_targets = int((targets[batch] > 0).sum())
            seq, tgt = trim_padding(inputs[shard(batch, ctx)], targets[shard(batch, ctx)])
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = _step_loss(train_model, seq.to(ctx.device), tgt.to(ctx.device), dataset.num_items, cfg.loss,
                                  global_targets, ctx.world, cfg.negatives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() / ctx.world
        total_loss = ctx.sum([total_loss])[0]  # each process added its share of every step's loss
        valid = full_ranking_metrics(model, split.valid, ctx, cfg)
        state["epoch"] = epoch
        state["train_seconds"] += time.time() - started
        state["history"].append({"epoch": epoch, "loss": total_loss / len(steps), **{f"valid_{k}": v for k, v in valid.items()}})
        if stopping.update(valid["ndcg@10"], epoch):
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if ctx.main:
            log(f"epoch {epoch}: loss {total_loss / len(steps):.4f} valid ndcg@10 {valid['ndcg@10']:.4f} "
                f"recall@10 {valid['recall@10']:.4f} (best epoch {stopping.best_epoch}) {time.time() - started:.1f}s")
            save_checkpoint(paths["checkpoint"], {
                "identity": identity, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "state": state, "stopping": stopping.state_dict(), "best_model": best_weights, "rng": rng.state(),
            })
        ctx.barrier()

    model.load_state_dict(best_weights)
    result = {
        "dataset": dataset.name,
        "config": cfg.to_dict(),
        "world_size": ctx.world,
        "epochs_run": state["epoch"],
        "best_epoch": stopping.best_epoch,
        "train_seconds": state["train_seconds"],
        "valid": full_ranking_metrics(model, split.valid, ctx, cfg),
        "test": full_ranking_metrics(model, split.test, ctx, cfg),
        # both protocols side by side, whichever one early stopping used
        "test_history_kept": full_ranking_metrics(model, split.test, ctx, cfg, mask_history=False),
        "test_history_masked": full_ranking_metrics(model, split.test, ctx, cfg, mask_history=True),
        "popularity_test": popularity_metrics(split, dataset, "test"),
        "popularity_test_history_masked": popularity_metrics(split, dataset, "test", mask_history=True),
        "history": state["history"],
    }
    if ctx.main:
        save_npy(paths["embeddings"], model.item_embeddings().detach().float().cpu().numpy())
        write_json(paths["metrics"], {**result, **sidecar_record(paths["embeddings"])})  # last: the marker
        log(f"test {json.dumps(result['test'])}\nwrote {paths['embeddings']}")
    ctx.barrier()
    return result
