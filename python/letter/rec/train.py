"""Training loop of the TIGER recommender: AdamW + warmup/cosine, early stopping on validation
NDCG@10 (constrained beam search), checkpoint + resume, DDP under torchrun (gloo on CPU, nccl on GPU).

Run folder (`out_dir`):
  run.json        settings, data path, code source, token layout (written once)
  codes.npy       item codes [num_items, L] used by this run
  checkpoint.pt   everything needed to resume (model, optimizer, schedule, RNG of every process)
  model.pt        weights of the best validation epoch
  history.json    per-epoch losses and validation metrics
  summary.json    best epoch, metrics, wall time (rewritten after every epoch)
"""
from __future__ import annotations

import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from letter.errors import LetterError
from letter.utils import pick_device, progress, save_npy, set_seed, torch_save, write_json

from .config import RecConfig
from .data import RecData, load_rec_data
from .evaluate import evaluate_model, prefix_index
from .model import Tiger

CHECKPOINT, BEST_MODEL, RUN_INFO, HISTORY, SUMMARY = "checkpoint.pt", "model.pt", "run.json", "history.json", "summary.json"


class _LossStep(nn.Module):
    """What DDP wraps: its forward returns the loss, so gradient sync hooks fire on backward."""

    def __init__(self, model: Tiger):
        super().__init__()
        self.model = model

    def forward(self, enc, dec, labels):
        return self.model.loss(enc, dec, labels, reduction="sum")


def _cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return factor


def _distributed(device_arg: str):
    """(rank, world, device, created_group) from torchrun's environment; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(device_arg), False
    created = not dist.is_initialized()
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if created:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)  # nccl collectives (and all_gather_object) use the current device
    return dist.get_rank(), dist.get_world_size(), device, created


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # dropout on the GPU draws from here
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _check_run_info(path: str, info: dict) -> None:
    with open(path) as f:
        saved = json.load(f)
    without_device = lambda config: {k: v for k, v in config.items() if k != "device"}  # noqa: E731
    saved["config"], info = without_device(saved["config"]), {**info, "config": without_device(info["config"])}
    for key in ("config", "codes_sha", "num_items", "data"):  # the device may change between calls
        if saved.get(key) != info.get(key):
            raise LetterError(
                f"{path}: the run in this folder was started with a different {key}; resume needs the same "
                "settings (or choose a new --out)"
            )


def train_rec(
    config: RecConfig,
    data,
    codes,
    out_dir: str,
    *,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Train TIGER on `data` (dataset folder/path or `letter.data.Dataset`) with item `codes`
    ([num_items, L] array, an index .json, codes .npy or a tokenizer run folder); write the run to
    `out_dir`. resume=True continues from out_dir/checkpoint.pt (exactly: same results as an
    uninterrupted run with the same seed on CPU). stop_after=N returns after N epochs of this call,
    leaving a checkpoint to resume. Returns the summary dict (also summary.json)."""
    config.validate()
    rank, world, device, created_group = _distributed(config.device)
    try:
        return _train(config, data, codes, out_dir, resume, stop_after, rank, world, device)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(config, data, codes, out_dir, resume, stop_after, rank, world, device):
    rec = load_rec_data(data, codes, config.max_history)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    info = rec.run_info(config)
    if os.path.exists(ckpt_path) and not resume:
        raise LetterError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out")
    if resume and not os.path.exists(ckpt_path):
        raise LetterError(f"--resume: no checkpoint at {ckpt_path}")
    if rank == 0:
        if resume:
            _check_run_info(os.path.join(out_dir, RUN_INFO), info)
        else:
            os.makedirs(out_dir, exist_ok=True)
            save_npy(os.path.join(out_dir, "codes.npy"), rec.codes)
            write_json(os.path.join(out_dir, RUN_INFO), info)

    set_seed(config.seed)  # same initial weights on every process
    model = Tiger(rec.layout.vocab_size, **config.model_kwargs()).to(device)
    torch.manual_seed(config.seed + 7919 * rank)  # distinct dropout streams per process
    step_module = _LossStep(model)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_enc, train_labels = rec.train_tensors()
    n_train = train_enc.shape[0]
    if n_train == 0:
        raise LetterError(f"{rec.source}: no training samples (every user needs at least 3 interactions)")
    batches_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = batches_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(total_steps, max(1, round(config.warmup_ratio * total_steps)))
    )
    valid_enc, valid_targets = rec.eval_tensors("valid", config.valid_users, config.seed)
    index = prefix_index(rec, device) if rank == 0 else None

    start_epoch, history = 0, []
    best = {"epoch": -1, "ndcg@10": -1.0}
    evals_since_best = 0
    if resume:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        evals_since_best = ckpt["evals_since_best"]
        if len(ckpt["rng"]) == world:
            _set_rng_state(ckpt["rng"][rank])
        elif rank == 0:
            print(f"note: checkpoint from {len(ckpt['rng'])} process(es), resuming with {world}: dropout RNG reseeded")
        if ckpt.get("finished"):
            start_epoch = config.epochs  # nothing left to train

    use_amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    started = time.time()
    wall_before = history[-1]["wall_s"] if history else 0.0
    epochs_this_call = 0
    finished = False
    for epoch in range(start_epoch, config.epochs):
        model.train()
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
        loss_sum = torch.zeros((), dtype=torch.float64)
        bar = progress(total=n_train, unit="sample", unit_scale=True,
                       desc=f"epoch {epoch + 1}/{config.epochs}", disable=None if rank == 0 else True)
        for b in range(batches_per_epoch):
            batch = order[b * config.batch_size:(b + 1) * config.batch_size]
            mine = batch[rank::world]
            # DDP averages gradients over processes; scaling by world/|global batch tokens| makes that
            # the mean over the whole global batch, so any world size follows the same trajectory.
            weight = world / (batch.numel() * rec.num_levels)
            if mine.numel() == 0:  # a last batch smaller than the world: join the gradient sync with weight 0
                mine, weight = batch[:1], 0.0
            enc, labels = train_enc[mine].to(device), train_labels[mine].to(device)
            dec = rec.decoder_inputs(labels)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                summed = step_module(enc, dec, labels)
            (summed * weight).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if weight:
                loss_sum += summed.detach().double().cpu()
            bar.update(batch.numel())
            bar.set_postfix(loss=f"{summed.item() / labels.numel():.4f}")
        bar.close()
        if world > 1:
            loss_sum = loss_sum.to(device)  # nccl reduces device tensors only
            dist.all_reduce(loss_sum)
        record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / (n_train * rec.num_levels),
                  "lr": scheduler.get_last_lr()[0]}
        stop = False
        if rank == 0:
            record["valid_loss"] = _mean_loss(model, rec, valid_enc, valid_targets, config.eval_batch_size, device)
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                metrics = evaluate_model(model, rec, valid_enc, valid_targets, config.eval_beams,
                                         config.eval_batch_size, device, index=index)
                record.update({f"valid_{k}": v for k, v in metrics["metrics"].items()})
                if metrics["metrics"]["ndcg@10"] > best["ndcg@10"]:
                    best = {"epoch": epoch + 1, **metrics["metrics"]}
                    evals_since_best = 0
                    torch_save(os.path.join(out_dir, BEST_MODEL), {"hparams": model.hparams, "state_dict": model.state_dict(),
                                                                   "epoch": epoch + 1, "valid": metrics["metrics"]})
                else:
                    evals_since_best += 1
                stop = evals_since_best >= config.patience
            record["wall_s"] = round(wall_before + time.time() - started, 3)
            history.append(record)
            print(_format_record(record), flush=True)
        if world > 1:
            flag = torch.tensor([int(stop)], device=device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        finished = stop or epoch + 1 == config.epochs
        rng = [None] * world
        if world > 1:
            dist.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        if rank == 0:
            torch_save(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                                   "best": best, "evals_since_best": evals_since_best, "rng": rng, "finished": finished})
            write_json(os.path.join(out_dir, HISTORY), history)
            _write_summary(out_dir, history, best, finished, stop, world, n_train)
        epochs_this_call += 1
        if finished or (stop_after is not None and epochs_this_call >= stop_after):
            break
    if world > 1:
        dist.barrier()
    with open(os.path.join(out_dir, SUMMARY)) as f:
        return json.load(f)


@torch.no_grad()
def _mean_loss(model: Tiger, rec: RecData, enc: torch.Tensor, targets: torch.Tensor, batch_size: int, device) -> float:
    """Mean per-token generation loss (eval mode) of the given samples."""
    model.eval()
    total = 0.0
    for start in range(0, enc.shape[0], batch_size):
        labels = rec.item_tokens[targets[start:start + batch_size]].to(device)
        total += model.loss(enc[start:start + batch_size].to(device), rec.decoder_inputs(labels), labels,
                            reduction="sum").item()
    return total / max(1, targets.numel() * rec.num_levels)


def _format_record(record: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _write_summary(out_dir, history, best, finished, stopped_early, world, n_train) -> None:
    write_json(os.path.join(out_dir, SUMMARY), {
        "epochs_trained": len(history), "finished": finished, "stopped_early": stopped_early,
        "best_epoch": best["epoch"], "best_valid": {k: v for k, v in best.items() if k != "epoch"},
        "train_samples": n_train, "world_size": world, "wall_s": history[-1]["wall_s"] if history else 0.0,
        "last": history[-1] if history else None,
    })
