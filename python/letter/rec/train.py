"""Training the generative recommender (TIGER, or LC-Rec with `model="lcrec"`) with
letter.training.fit: AdamW + warmup/cosine, model selection and early stopping on validation
NDCG@10 (constrained beam search over the whole validation split by default; the noise-aware rule
of letter.training.EarlyStopping, with a threshold of `min_delta` or `min_delta_se` standard errors,
ties broken by validation loss, no stop before `stop_from` of the schedule), checkpoint + resume,
data parallel under torchrun (gloo on CPU, nccl on GPU). What differs between the models (building
them, a batch's loss, what a checkpoint holds, the best model's format, decoding) sits in their
Recommender adapters (recommender.py, recommender_tiger.py, recommender_lcrec.py);
`RecTrainable` turns any of them into fit's Trainable.

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

from letter.data.split import check_training_samples
from letter.errors import LetterError
from letter.runs import (MANIFEST, RecRun, check_manifest, load_npy, mark_started, prepare_run_folder, read_json, save_npy,
                         write_json, write_manifest)
from letter.training import (DistContext, FitPlan, FitRun, RandomStreams, Trainable, Validation,
                             batch_order, bf16_autocast, distributed, epoch_generator, fit, precision_used,
                             seed_everything, shard, validation_epochs, warmup_cosine)

from .config import RecConfig
from .data import codes_sha, load_rec_data
from .evaluation import evaluate_model
from .recommender import Recommender, recommender_class

CHECKPOINT, RUN_INFO, HISTORY, SUMMARY = RecRun.CHECKPOINT, RecRun.INFO, RecRun.HISTORY, RecRun.SUMMARY


def train_rec(
    config: RecConfig,
    data,
    codes,
    out_dir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    checkpoint_minutes: float | None = None,
) -> dict:
    """Train the recommender `config.model` (TIGER, or LC-Rec on the local causal LM
    `config.base_model`) on `data` (dataset folder/path or `letter.data.Dataset`) with item `codes`
    ([num_items, L] array, an index .json, codes .npy or a tokenizer run folder); write the run to
    `out_dir`. resume=True continues from out_dir/checkpoint.pt (an error without one; the settings
    that may not change, the dataset's content and the codes must equal the checkpoint's; exactly
    the results of an uninterrupted run with the same seed on CPU). overwrite=True replaces a
    train-rec run in out_dir (without it, or resume, a folder holding one is refused; so is one
    holding another kind of run). stop_after=N returns after N epochs of this call, leaving a
    checkpoint to resume; checkpoint_minutes=M also checkpoints inside an epoch every M minutes
    (a killed run resumes from there, with the same results). Returns the summary dict (also
    summary.json)."""
    config.validate()
    with distributed(config.device) as ctx:
        prepare_run_folder(out_dir, RecRun.kind, resume=resume, overwrite=overwrite, checkpoint=CHECKPOINT,
                           main=ctx.main)
        return _train(config, data, codes, out_dir, resume, stop_after, checkpoint_minutes, ctx)


class RecTrainable(Trainable):
    """A Recommender adapter as fit trains it: token-weighted batches, valid loss every epoch,
    beam-search validation on the cadence, the best model written into the run folder."""

    def __init__(self, rm: Recommender, rec, config: RecConfig, out_dir: str, ctx: DistContext, rng: RandomStreams):
        self.rm, self.rec, self.config, self.out_dir, self.ctx = rm, rec, config, out_dir, ctx
        self.step_module, self.ddp = rm.step_module, rm.ddp
        self.optimizer = torch.optim.AdamW(rm.trainable_parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.n_train, self.train_lengths = rm.prepare_training(rng)
        total_steps = math.ceil(self.n_train / config.batch_size) * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total_steps, round(config.warmup_ratio * total_steps)))
        self.valid_inputs, self.valid_targets = rm.eval_inputs(rec, "valid", config.valid_users, config.seed)
        self.index = rm.prefix_index(rec, ctx.device) if ctx.main else None
        self.use_amp = rm.autocast(ctx.device) and bf16_autocast(config.precision, ctx.device, config.d_model)
        self.best_metrics: dict = {}

    def parameters(self) -> list:
        return self.rm.trainable_parameters()

    def start_epoch(self, epoch: int) -> None:
        self.rm.model.train()
        self.rm.start_epoch(epoch - 1)

    def batches(self, epoch: int):
        return batch_order(self.n_train, self.config.batch_size, epoch_generator(self.config.seed, epoch - 1),
                           self.train_lengths if self.config.bucket_by_length else None)

    def step(self, batch):
        ctx = self.ctx
        mine = shard(batch, ctx)
        # Gradients are averaged over processes; scaling by world/|global batch tokens| makes that
        # the mean over the whole global batch, so any world size follows the same trajectory.
        weight = ctx.world / (batch.numel() * self.rec.num_levels)
        if mine.numel() == 0:  # a last batch smaller than the world: join the gradient sync with weight 0
            mine, weight = batch[:1], 0.0
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            summed = self.step_module(*self.rm.batch(mine))
        return summed * weight, ({"loss": summed} if weight else {})

    def epoch_record(self, epoch: int, sums: dict[str, float], steps: int) -> dict:
        return {"train_loss": sums.get("loss", 0.0) / (self.n_train * self.rec.num_levels),
                "lr": self.scheduler.get_last_lr()[0], "precision": precision_used(self.use_amp, self.rm.model)}

    def validate(self, epoch: int, record: dict, select: bool) -> Validation | None:
        if not self.ctx.main:
            return None
        config, started = self.config, time.time()
        record["valid_loss"] = self.rm.mean_loss(self.valid_inputs, self.valid_targets, config.eval_batch_size)
        validation = None
        if select:
            metrics = evaluate_model(self.rm, self.rec, self.valid_inputs, self.valid_targets, config.eval_beams,
                                     config.eval_batch_size, self.ctx.device, index=self.index)
            self.last_metrics = metrics["metrics"]
            threshold = config.improvement_threshold(metrics["standard_errors"]["ndcg@10"])
            validation = Validation({**{f"valid_{k}": v for k, v in metrics["metrics"].items()},
                                     **{f"valid_{k}_se": v for k, v in metrics["standard_errors"].items()},
                                     "valid_threshold": threshold},
                                    metrics["metrics"]["ndcg@10"], record["valid_loss"], threshold)
        record["valid_users"] = int(self.valid_targets.numel())
        record["valid_s"] = round(time.time() - started, 3)
        return validation

    def keep_best(self, epoch: int, validation: Validation) -> None:
        self.best_metrics = self.last_metrics
        self.rm.save_best(self.out_dir, epoch, self.best_metrics)

    def model_state(self) -> dict:
        return self.rm.state_dict()

    def load_model_state(self, state: dict) -> None:
        self.rm.load_state_dict(state)

    def extra_state(self) -> dict:
        return {"best_metrics": self.best_metrics}

    def load_extra_state(self, state: dict) -> None:
        self.best_metrics = state["best_metrics"]

    def checkpointed(self, run: FitRun, seconds: float) -> None:
        write_json(os.path.join(self.out_dir, HISTORY), run.history)
        _write_summary(self.out_dir, self.config, run, self.best_metrics, self.ctx.world, self.n_train)


def _train(config, data, codes, out_dir, resume, stop_after, checkpoint_minutes, ctx: DistContext):
    rec = load_rec_data(data, codes, config.max_history)
    check_training_samples(rec.dataset, rec.source)  # before anything is written into the run folder
    ckpt_path = os.path.join(out_dir, CHECKPOINT)  # prepare_run_folder refused a started run without resume
    seed_everything(config.seed)  # same initial weights on every process
    rm = recommender_class(config.model).build(config, rec, ctx.device)  # a bad base model fails before the run folder
    if resume and ctx.main:  # the files written when the run started must still be its own
        if os.path.isfile(os.path.join(out_dir, MANIFEST)):
            check_manifest(out_dir, RecRun.kind, "out_dir")  # a finished run continues only whole
        started_codes = os.path.join(out_dir, RecRun.CODES)
        if os.path.isfile(started_codes) and codes_sha(load_npy(started_codes)) != codes_sha(rec.codes):
            raise LetterError(f"{started_codes}: differs from codes {codes} (changed since the run started?); "
                              "restore it, or train the run again with overwrite", "codes", "overwrite")
    if not resume and ctx.main:
        info = rec.run_info(config, out_dir)
        if config.model != "tiger":
            info["vocab_offsets"] = list(rm.model.vocab_offsets)
        mark_started(out_dir, RecRun.kind)
        save_npy(os.path.join(out_dir, RecRun.CODES), rec.codes)
        write_json(os.path.join(out_dir, RUN_INFO), info)
    seed_everything(config.seed + 7919 * ctx.rank)  # distinct dropout streams per process
    rng = RandomStreams(ctx.device)
    trainable = RecTrainable(rm, rec, config, out_dir, ctx, rng)
    plan = FitPlan(epochs=config.epochs, checkpoint=ckpt_path, resume=resume,
                   identity={**config.to_dict(), "inputs.dataset": rec.dataset.fingerprint(),
                             "inputs.codes": codes_sha(rec.codes), "inputs.num_items": int(rec.codes.shape[0])},
                   may_change=set(config.to_dict()) - set(config.fixed_on_resume()),
                   validate_every=validation_epochs(config.eval_every, config.epochs), patience=config.patience,
                   stop_from=config.stop_from_epoch, max_grad_norm=config.max_grad_norm, stop_after=stop_after,
                   checkpoint_minutes=checkpoint_minutes)
    fit(trainable, plan, ctx, rng)
    summary = read_json(os.path.join(out_dir, SUMMARY), "train-rec summary")
    if ctx.main and summary.get("finished"):  # the manifest last: what evaluate/recommend check
        info = read_json(os.path.join(out_dir, RUN_INFO), "train-rec run info")
        write_manifest(out_dir, RecRun.kind, [RUN_INFO, RecRun.CODES, os.path.basename(rm.best_model_path(out_dir)),
                                              HISTORY, SUMMARY], {"dataset": info["data_sha"], "codes": info["codes_sha"]})
    return summary


def _write_summary(out_dir, config: RecConfig, run: FitRun, best_metrics, world, n_train) -> None:
    history, stopping = run.history, run.stopping
    write_json(os.path.join(out_dir, SUMMARY), {
        "epochs_trained": len(history), "finished": run.finished, "stopped_early": run.stopped_early,
        "schedule_completed": bool(history) and history[-1]["epoch"] == config.epochs,
        "best_epoch": stopping.best_epoch if best_metrics else -1, "best_valid": best_metrics,
        "selection": {"metric": "ndcg@10", "valid_users": history[-1].get("valid_users") if history else None,
                      "min_delta": config.min_delta, "min_delta_se": config.min_delta_se,
                      "patience": config.patience, "stop_from_epoch": config.stop_from_epoch},
        "train_samples": n_train, "world_size": world, "wall_s": history[-1]["wall_s"] if history else 0.0,
        "last": history[-1] if history else None,
    })
