"""Training loop of the generative recommender (TIGER, or LC-Rec with `model="lcrec"`): AdamW +
warmup/cosine, model selection and early stopping on validation NDCG@10 (constrained beam search
over the whole validation split by default; the noise-aware rule of letter.training.EarlyStopping,
with a threshold of `min_delta` or `min_delta_se` standard errors, ties broken by validation loss,
no stop before `stop_from` of the schedule), checkpoint + resume,
data parallel under torchrun (gloo on CPU, nccl on GPU). What differs between the models (building
them, a batch's loss, what a checkpoint holds, the best model's format, decoding) sits in their
Recommender adapters (recommender.py, recommender_tiger.py, recommender_lcrec.py).

Run folder (`out_dir`):
  run.json        settings, data path, code source, token layout (written once)
  codes.npy       item codes [num_items, L] used by this run
  checkpoint.pt   everything needed to resume (trained weights -- TIGER: the model, LC-Rec: the
                  adapter --, optimizer, schedule, RNG of every process)
  model.pt        TIGER: weights of the best validation epoch
  model/          LC-Rec: the adapter of the best validation epoch (LCRec.save; the base model is
                  read from the folder recorded in model/lcrec.json)
  history.json    per-epoch losses and validation metrics: valid_<metric> and its standard error
                  valid_<metric>_se, valid_users, valid_s (the validation's cost), valid_threshold,
                  selected (this epoch became the kept weights)
  summary.json    best epoch, metrics, how they were selected, wall time (rewritten after every epoch)
"""
from __future__ import annotations

import math
import os
import time

import torch
from torch import nn

from letter.errors import LetterError
from letter.runs import RecRun, mark_started, prepare_run_folder, read_json, save_npy, write_json, write_manifest
from letter.training import (DistContext, EarlyStopping, RandomStreams, batch_order, bf16_autocast, check_resume,
                             distributed, epoch_generator, load_checkpoint, save_checkpoint, seed_everything, shard,
                             warmup_cosine)
from letter.utils import progress

from .config import RecConfig
from .data import load_rec_data
from .evaluation import evaluate_model
from .recommender import recommender_class

CHECKPOINT, RUN_INFO, HISTORY, SUMMARY = RecRun.CHECKPOINT, RecRun.INFO, RecRun.HISTORY, RecRun.SUMMARY


def _identity(info: dict) -> dict:
    """run.json flattened for check_resume: settings (absent ones at their defaults, for runs
    written before a setting existed) plus the inputs (codes, data, item count)."""
    config = RecConfig.from_dict(info["config"], validate=False).to_dict()
    return {**config, **{f"inputs.{k}": info.get(k) for k in ("codes_sha", "num_items", "data", "data_sha")}}


def train_rec(
    config: RecConfig,
    data,
    codes,
    out_dir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
) -> dict:
    """Train the recommender `config.model` (TIGER, or LC-Rec on the local causal LM
    `config.base_model`) on `data` (dataset folder/path or `letter.data.Dataset`) with item `codes`
    ([num_items, L] array, an index .json, codes .npy or a tokenizer run folder); write the run to
    `out_dir`. resume=True continues from out_dir/checkpoint.pt (exactly: same results as an
    uninterrupted run with the same seed on CPU). overwrite=True replaces a train-rec run in out_dir
    (without it, or resume, a folder holding one is refused; so is one holding another kind of
    run). stop_after=N returns after N epochs of this call, leaving a checkpoint to resume. Returns
    the summary dict (also summary.json)."""
    config.validate()
    with distributed(config.device) as ctx:
        prepare_run_folder(out_dir, RecRun.kind, resume=resume, overwrite=overwrite, checkpoint=CHECKPOINT,
                           main=ctx.main)
        return _train(config, data, codes, out_dir, resume, stop_after, ctx)


def _train(config, data, codes, out_dir, resume, stop_after, ctx: DistContext):
    device = ctx.device
    rec = load_rec_data(data, codes, config.max_history)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    info = rec.run_info(config, out_dir)
    if os.path.exists(ckpt_path) and not resume:
        raise LetterError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out")
    if resume and not os.path.exists(ckpt_path):
        raise LetterError(f"--resume: no checkpoint at {ckpt_path}")
    if resume:
        saved_info = read_json(os.path.join(out_dir, RUN_INFO), "train-rec settings")
        check_resume(os.path.join(out_dir, RUN_INFO), _identity(saved_info), _identity(info),
                     config.fixed_on_resume() + ["inputs.codes_sha", "inputs.num_items", "inputs.data_sha"])

    seed_everything(config.seed)  # same initial weights on every process
    rm = recommender_class(config.model).build(config, rec, device)  # a bad base model fails before the run folder
    model = rm.model
    if not resume and ctx.main:
        if config.model != "tiger":
            info["vocab_offsets"] = list(model.vocab_offsets)
        mark_started(out_dir, RecRun.kind)
        save_npy(os.path.join(out_dir, RecRun.CODES), rec.codes)
        write_json(os.path.join(out_dir, RUN_INFO), info)
    seed_everything(config.seed + 7919 * ctx.rank)  # distinct dropout streams per process
    rng = RandomStreams(device)
    step_module = rm.step_module
    if ctx.world > 1 and rm.ddp:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    parameters = rm.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    n_train, train_lengths = rm.prepare_training(rng)
    if n_train == 0:
        raise LetterError(f"{rec.source}: no training samples (every user needs at least 3 interactions)")
    batches_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = batches_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, round(config.warmup_ratio * total_steps))
    )
    valid_inputs, valid_targets = rm.eval_inputs(rec, "valid", config.valid_users, config.seed)
    index = rm.prefix_index(rec, device) if ctx.main else None

    start_epoch, history = 0, []
    stopping = EarlyStopping(config.patience, config.stop_from_epoch)
    best_metrics: dict = {}
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        rm.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, best_metrics = ckpt["epoch"], ckpt["history"], ckpt["best_metrics"]
        stopping.load_state_dict(ckpt["stopping"])
        stopping.patience, stopping.stop_from_epoch = config.patience, config.stop_from_epoch
        if len(ckpt["rng"]) == ctx.world:
            rng.restore(ckpt["rng"][ctx.rank])
        elif ctx.main:
            print(f"note: checkpoint from {len(ckpt['rng'])} process(es), resuming with {ctx.world}: dropout RNG reseeded")
        if ckpt.get("finished"):
            start_epoch = config.epochs  # nothing left to train

    use_amp = rm.autocast(device) and bf16_autocast(config.precision, device, config.d_model)
    started = time.time()
    wall_before = history[-1]["wall_s"] if history else 0.0
    epochs_this_call = 0
    for epoch in range(start_epoch, config.epochs):
        model.train()
        rm.start_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64)
        bar = progress(total=n_train, unit="sample", unit_scale=True,
                       desc=f"epoch {epoch + 1}/{config.epochs}", disable=None if ctx.main else True)
        order = batch_order(n_train, config.batch_size, epoch_generator(config.seed, epoch),
                            train_lengths if config.bucket_by_length else None)
        for batch in order:
            mine = shard(batch, ctx)
            # Gradients are averaged over processes; scaling by world/|global batch tokens| makes that
            # the mean over the whole global batch, so any world size follows the same trajectory.
            weight = ctx.world / (batch.numel() * rec.num_levels)
            if mine.numel() == 0:  # a last batch smaller than the world: join the gradient sync with weight 0
                mine, weight = batch[:1], 0.0
            inputs = rm.batch(mine)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                summed = step_module(*inputs)
            (summed * weight).backward()
            if not rm.ddp:
                ctx.average_gradients(parameters)
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if weight:
                loss_sum += summed.detach().double().cpu()
            bar.update(batch.numel())
            bar.set_postfix(loss=f"{summed.item() / (mine.numel() * rec.num_levels):.4f}")
        bar.close()
        loss_total = ctx.sum([loss_sum.item()])[0]
        record = {"epoch": epoch + 1, "train_loss": loss_total / (n_train * rec.num_levels),
                  "lr": scheduler.get_last_lr()[0]}
        stop = False
        if ctx.main:
            valid_started = time.time()
            record["valid_loss"] = rm.mean_loss(valid_inputs, valid_targets, config.eval_batch_size)
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                metrics = evaluate_model(rm, rec, valid_inputs, valid_targets, config.eval_beams,
                                         config.eval_batch_size, device, index=index)
                record.update({f"valid_{k}": v for k, v in metrics["metrics"].items()})
                record.update({f"valid_{k}_se": v for k, v in metrics["standard_errors"].items()})
                record["valid_threshold"] = config.improvement_threshold(metrics["standard_errors"]["ndcg@10"])
                record["selected"] = stopping.update(metrics["metrics"]["ndcg@10"], epoch + 1,
                                                     record["valid_threshold"], record["valid_loss"])
                if record["selected"]:
                    best_metrics = metrics["metrics"]
                    rm.save_best(out_dir, epoch + 1, metrics["metrics"])
                stop = stopping.should_stop
            record["valid_users"] = int(valid_targets.numel())
            record["valid_s"] = round(time.time() - valid_started, 3)
            record["wall_s"] = round(wall_before + time.time() - started, 3)
            history.append(record)
            print(_format_record(record), flush=True)
        stop = ctx.any(stop)
        finished = stop or epoch + 1 == config.epochs
        rng_states = ctx.gather(rng.state())
        if ctx.main:
            save_checkpoint(ckpt_path, {"model": rm.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                                        "best_metrics": best_metrics, "stopping": stopping.state_dict(),
                                        "rng": rng_states, "finished": finished})
            write_json(os.path.join(out_dir, HISTORY), history)
            _write_summary(out_dir, config, history, stopping, best_metrics, finished, stop, ctx.world, n_train)
        epochs_this_call += 1
        if finished or (stop_after is not None and epochs_this_call >= stop_after):
            break
    ctx.barrier()
    summary = read_json(os.path.join(out_dir, SUMMARY), "train-rec summary")
    if ctx.main and summary.get("finished"):  # the manifest last: what evaluate/recommend check
        write_manifest(out_dir, RecRun.kind, [RUN_INFO, RecRun.CODES, os.path.basename(rm.best_model_path(out_dir)),
                                              HISTORY, SUMMARY], {"dataset": info["data_sha"], "codes": info["codes_sha"]})
    return summary


def _format_record(record: dict) -> str:
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _write_summary(out_dir, config: RecConfig, history, stopping: EarlyStopping, best_metrics, finished,
                   stopped_early, world, n_train) -> None:
    write_json(os.path.join(out_dir, SUMMARY), {
        "epochs_trained": len(history), "finished": finished, "stopped_early": stopped_early,
        "schedule_completed": bool(history) and history[-1]["epoch"] == config.epochs,
        "best_epoch": stopping.best_epoch if best_metrics else -1, "best_valid": best_metrics,
        "selection": {"metric": "ndcg@10", "valid_users": history[-1].get("valid_users") if history else None,
                      "min_delta": config.min_delta, "min_delta_se": config.min_delta_se,
                      "patience": config.patience, "stop_from_epoch": config.stop_from_epoch},
        "train_samples": n_train, "world_size": world, "wall_s": history[-1]["wall_s"] if history else 0.0,
        "last": history[-1] if history else None,
    })
