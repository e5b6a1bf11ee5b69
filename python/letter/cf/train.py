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
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from letter.cf.model import SASRec
from letter.data import Dataset, Split, leave_one_out, pad_left
from letter.errors import LetterError
from letter.metrics import hits_from_topk, metric_sums
from letter.utils import pick_device, progress, save_npy, set_seed, torch_save, write_json

KS = (5, 10)
# fields that must match when resuming (the rest, e.g. epochs or patience, may change)
MODEL_FIELDS = ("dim", "blocks", "heads", "max_len", "loss", "seed", "batch_size", "lr", "weight_decay", "dropout")


@dataclass
class CFConfig:
    dim: int = 32
    blocks: int = 2
    heads: int = 2
    # lr 3e-3 / dropout 0.3 rather than RecBole's 1e-3 / 0.5: on Scientific those stalled for the
    # first epochs, these reach a good valid NDCG@10 in ~10 epochs (docs/RESULTS.md)
    dropout: float = 0.3
    max_len: int = 50
    loss: str = "ce"  # "ce": full softmax cross-entropy; "bce": one sampled negative per target
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 200
    patience: int = 10  # epochs without a better valid NDCG@10 before stopping
    eval_batch_size: int = 1024
    mask_history: bool = False
    seed: int = 0

    def validate(self) -> "CFConfig":
        if self.loss not in ("ce", "bce"):
            raise LetterError(f"loss must be 'ce' or 'bce', got {self.loss!r}")
        for name in ("dim", "blocks", "heads", "max_len", "batch_size", "epochs", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise LetterError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise LetterError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not 0 <= self.dropout < 1:
            raise LetterError(f"dropout must be in [0, 1), got {self.dropout}")
        return self


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


def epoch_batches(lengths: torch.Tensor, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Shuffled batches of window indices; windows of similar length are batched together (sorted
    within pools of 50 batches), so trimming the padding saves most of the work."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(len(lengths), generator=gen)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]
        batches.extend(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen)]


def popularity_metrics(split: Split, dataset: Dataset, part: str = "test", ks=KS) -> dict[str, float]:
    """Baseline: everyone gets the items most frequent in the training sequences."""
    counts = np.zeros(dataset.num_items, dtype=np.int64)
    for user in split.eval_users:
        np.add.at(counts, dataset.sequences[user][:-2], 1)
    top = torch.from_numpy(np.argsort(-counts, kind="stable")[: max(ks)])
    samples = split.part(part)
    targets = torch.tensor([t for _, t in samples])
    hits = hits_from_topk(top.expand(len(samples), -1), targets)
    return {k: v / len(samples) for k, v in metric_sums(hits, ks).items()}


class _Dist:
    """Process-group facts; a single process is world 1, rank 0."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1:
            use_cuda = torch.cuda.is_available() and device in (None, "auto", "cuda")
            self.device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
            if use_cuda:
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")
        else:
            self.device = pick_device(device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self):
        if self.world > 1:
            dist.barrier()


@torch.no_grad()
def evaluate(model: SASRec, samples, ctx: _Dist, cfg: CFConfig) -> dict[str, float]:
    """Full-ranking Recall/NDCG@5,10 over `samples`, sharded over processes and summed."""
    model.eval()
    mine = samples[ctx.rank :: ctx.world]
    sums = dict.fromkeys([f"{m}@{k}" for k in KS for m in ("recall", "ndcg")], 0.0)
    for start in range(0, len(mine), cfg.eval_batch_size):
        batch = mine[start : start + cfg.eval_batch_size]
        (hist,) = trim_padding(pad_left([h for h, _ in batch], cfg.max_len, -1).to(ctx.device) + 1)
        targets = torch.tensor([t for _, t in batch], device=ctx.device)
        scores = model.scores(model(hist)[:, -1])
        if cfg.mask_history:
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


def _step_loss(model, inputs, targets, num_items: int, loss: str, global_targets: int, world: int):
    hidden = model(inputs)  # through the DDP wrapper when distributed, so gradients get synced
    model = getattr(model, "module", model)
    valid = targets > 0
    h, t = hidden[valid], targets[valid] - 1
    if loss == "ce":
        total = F.cross_entropy(model.scores(h), t, reduction="sum")
    else:
        emb = model.item_embeddings()
        negatives = torch.randint(0, num_items, t.shape, device=t.device)
        pos, neg = (h * emb[t]).sum(-1), (h * emb[negatives]).sum(-1)
        total = F.softplus(-pos).sum() + F.softplus(neg).sum()
    # DDP averages gradients over processes; scaling by world makes the result sum / global count
    return total * world / max(global_targets, 1)


def train_cf(dataset: Dataset, out_dir: str, cfg: CFConfig, resume: bool = False, device: str | None = None,
             log=print) -> dict:
    """Train SASRec with early stopping on valid NDCG@10; write embeddings, metrics and a checkpoint.

    Returns the metrics dict (also written as <Name>.cf-sasrec<d>.json)."""
    cfg.validate()
    ctx = _Dist(device)
    paths = output_paths(out_dir, dataset.name, cfg.dim)
    split = leave_one_out(dataset, max_history=cfg.max_len)
    if not split.train:
        raise LetterError(f"{dataset.name}: no training samples (every user has fewer than 4 items)")
    inputs, targets = training_windows(split, dataset, cfg.max_len)

    set_seed(cfg.seed)
    model = SASRec(dataset.num_items, cfg.dim, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"epoch": 0, "best_ndcg": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": [], "train_seconds": 0.0}
    best_weights = None
    if resume and os.path.exists(paths["checkpoint"]):
        ckpt = torch.load(paths["checkpoint"], map_location=ctx.device, weights_only=False)
        saved = ckpt["config"]
        changed = [f for f in MODEL_FIELDS if saved.get(f) != getattr(cfg, f)]
        if changed:
            raise LetterError(f"{paths['checkpoint']}: cannot resume, settings differ: "
                              + ", ".join(f"{f} {saved.get(f)} -> {getattr(cfg, f)}" for f in changed))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state, best_weights = ckpt["state"], ckpt["best_model"]
        torch.set_rng_state(ckpt["rng"])
        log(f"resumed from {paths['checkpoint']} after epoch {state['epoch']}")
    elif resume:
        log(f"no checkpoint at {paths['checkpoint']}; starting fresh")

    train_model = model
    if ctx.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    lengths = (inputs > 0).sum(1)
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"] + 1
        started = time.time()
        total_loss = 0.0
        steps = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        for batch in progress(steps, desc=f"epoch {epoch}", leave=False, disable=None if ctx.main else True):
            global_targets = int((targets[batch] > 0).sum())
            mine = batch[ctx.rank :: ctx.world]
            seq, tgt = trim_padding(inputs[mine], targets[mine])
            loss = _step_loss(train_model, seq.to(ctx.device), tgt.to(ctx.device), dataset.num_items, cfg.loss,
                              global_targets, ctx.world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() / ctx.world
        total_loss = ctx.sum([total_loss])[0]  # each process added its share of every step's loss
        valid = evaluate(model, split.valid, ctx, cfg)
        state["epoch"] = epoch
        state["train_seconds"] += time.time() - started
        state["history"].append({"epoch": epoch, "loss": total_loss / len(steps), **{f"valid_{k}": v for k, v in valid.items()}})
        if valid["ndcg@10"] > state["best_ndcg"]:
            state.update(best_ndcg=valid["ndcg@10"], best_epoch=epoch, bad_epochs=0)
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        if ctx.main:
            log(f"epoch {epoch}: loss {total_loss / len(steps):.4f} valid ndcg@10 {valid['ndcg@10']:.4f} "
                f"recall@10 {valid['recall@10']:.4f} (best epoch {state['best_epoch']}) {time.time() - started:.1f}s")
            torch_save(paths["checkpoint"], {
                "config": dataclasses.asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "state": state, "best_model": best_weights, "rng": torch.get_rng_state(),
            })
        ctx.barrier()

    model.load_state_dict(best_weights)
    result = {
        "dataset": dataset.name,
        "config": dataclasses.asdict(cfg),
        "world_size": ctx.world,
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"],
        "train_seconds": state["train_seconds"],
        "valid": evaluate(model, split.valid, ctx, cfg),
        "test": evaluate(model, split.test, ctx, cfg),
        "popularity_test": popularity_metrics(split, dataset, "test"),
        "history": state["history"],
    }
    if ctx.main:
        save_npy(paths["embeddings"], model.item_embeddings().detach().float().cpu().numpy())
        write_json(paths["metrics"], result)
        log(f"test {json.dumps(result['test'])}\nwrote {paths['embeddings']}")
    ctx.barrier()
    return result
