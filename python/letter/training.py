"""The training machinery every trainer shares (SASRec, LightGCN, the tokenizer, TIGER, LC-Rec).

- `fit(trainable, plan, ctx, rng)`: the one training loop. It owns the epochs, resume (identity
  check, model/optimizer/scheduler/RNG/history restore), the checkpoint's contents, the validation
  cadence, model selection and early stopping, and the log. A model plugs in as a `Trainable`
  adapter of a few hooks (docs/TRAINERS.md).
- `distributed(device)`: the process-group context from torchrun's environment (rank, world size,
  the device each rank uses, nccl for CUDA devices and gloo otherwise, teardown on exit and error).
- `RandomStreams`: seeding, named generators created on the device whose ops consume them, and
  capture/restore of every random state a run uses (Python, NumPy, torch CPU, the CUDA device's,
  each generator) for bit-identical resume.
- `check_resume`: which fields may change when resuming; one error naming the field that differs.
- `save_checkpoint` / `load_checkpoint`: atomic save; a corrupt or truncated file is one line.
- `EarlyStopping` (the noise-aware selection rule, see its doc), `warmup_cosine`, `batch_order`
  (seeded, identical on every rank, optionally grouping rows of similar length) and `shard` (a
  rank's share of a global batch).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import pickle
import random
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from letter.devices import resolve_device
from letter.errors import LetterError
from letter.runs import torch_save
from letter.utils import progress


# -- processes ----------------------------------------------------------------------------------

@dataclass
class DistContext:
    """Where this process trains: rank, world size and device. A plain run is world 1, rank 0."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64 on this rank's device, as nccl needs)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on rank 0 (decisions taken by the main process)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1 and self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        elif self.world > 1:
            dist.barrier()

    def average_gradients(self, parameters) -> None:
        """Mean of every gradient over processes (for trainers that do not wrap the model in DDP)."""
        if self.world == 1:
            return
        for p in parameters:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world


@contextlib.contextmanager
def distributed(device: str | torch.device | None = "auto") -> Iterator[DistContext]:
    """Join torchrun's process group (if started by torchrun) with the backend the device needs,
    and leave it on exit, also on error. Single process: world 1 on the resolved device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world == 1:
        yield DistContext(0, 1, dev)
        return
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # nccl collectives and all_gather_object use the current device
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield DistContext(dist.get_rank() if dist.is_initialized() else rank, world, dev)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


# -- randomness ---------------------------------------------------------------------------------

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix hardware (AMX or AVX512-BF16, from /proc/cpuinfo), where
    oneDNN's bf16 GEMMs outrun fp32 (a 2-core Xeon with AMX: 726 against 123 GFLOP/s)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# On CPU, `auto` picks bf16 from this model width on: measured on a 2-core Xeon with AMX (one
# thread, docs/BENCHMARKS.md), TIGER at d_model 128 / d_ff 1024 trained 1.43x faster in bf16, at
# d_model 64 / d_ff 256 0.91x (its GEMMs are too small for AMX to pay for the casts).
CPU_BF16_MIN_WIDTH = 128


def bf16_autocast(precision: str, device: torch.device, width: int) -> bool:
    """Whether training steps run under bf16 autocast (fp32 master weights and optimizer state;
    the fused ops take the fp32 outputs of LayerNorm and accumulate in fp32). precision: 'fp32',
    'bf16', or 'auto' = bf16 on a CUDA GPU that supports it, and on a CPU with bf16 hardware
    (cpu_has_fast_bf16) for models of width (d_model) >= CPU_BF16_MIN_WIDTH; fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise LetterError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16() and width >= CPU_BF16_MIN_WIDTH


def precision_used(use_amp: bool, model: torch.nn.Module) -> str:
    """The arithmetic an epoch ran in, as every history record names it: 'bf16-autocast', or the
    weights' dtype ('float32'; 'bfloat16' for an LC-Rec base loaded in bf16). Recorded per epoch:
    `auto` may resolve differently when a run is resumed on another machine."""
    return "bf16-autocast" if use_amp else str(next(model.parameters()).dtype).removeprefix("torch.")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RandomStreams:
    """Every random state of a run. `generator(name, seed)` makes a torch.Generator on the run's
    device (the device whose ops draw from it) unless `device` says otherwise (e.g. a CPU stream for
    batch order); `state()` / `restore()` capture all of them with the global states."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.generators: dict[str, torch.Generator] = {}
        self.on_run_device: set[str] = set()  # made on the run's device (not on a device given)

    def generator(self, name: str, seed: int, device: torch.device | str | None = None) -> torch.Generator:
        gen = torch.Generator(device=torch.device(device) if device is not None else self.device)
        gen.manual_seed(seed)
        self.generators[name] = gen
        if device is None:
            self.on_run_device.add(name)
        return gen

    def state(self) -> dict:
        out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "generators": {name: g.get_state() for name, g in self.generators.items()}}
        if self.device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def restore(self, state: dict) -> list[str]:
        """Set every state `state()` captured; returns the run-device streams left as they are because
        the state is of another kind of device (a run resumed on the CPU after CUDA, or back: a CUDA
        generator's state does not fit a CPU one)."""
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
        moved = ("cuda" in state) != (self.device.type == "cuda")
        reseeded = sorted(name for name in state["generators"] if moved and name in self.on_run_device)
        for name, gen_state in state["generators"].items():
            if name in self.generators and name not in reseeded:
                self.generators[name].set_state(gen_state)
        return reseeded


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU stream of one epoch's batch order: a function of (seed, epoch) only, so a resumed or
    multi-process run draws the same order without carrying state."""
    return torch.Generator(device="cpu").manual_seed(seed * 100003 + epoch)


def batch_order(n: int, batch_size: int, generator: torch.Generator, lengths: torch.Tensor | None = None,
                pool_batches: int = 50) -> list[torch.Tensor]:
    """A shuffled split of range(n) into global batches (CPU index tensors; the last may be short).

    With `lengths`, rows of similar length share a batch (sorted within pools of `pool_batches`
    batches, then the batches shuffled), so trimming each batch to its longest row drops most of the
    padding while the order stays seeded and identical on every rank."""
    order = torch.randperm(n, generator=generator, device=generator.device)
    if lengths is None:
        return list(order.split(batch_size))
    batches: list[torch.Tensor] = []
    pool = batch_size * pool_batches
    for start in range(0, n, pool):
        chunk = order[start:start + pool]
        chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]
        batches.extend(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator, device=generator.device)]


def shard(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's interleaved share of a global batch."""
    return batch[ctx.rank::ctx.world]


@dataclass
class BatchShare:
    """This rank's rows (positions rank, rank + world, ...) of a global batch of `size` rows, for
    losses whose terms couple the rows of a batch (in-batch negatives, balanced assignment): gather
    what the whole batch needs, and weight a mean over own rows so that averaging gradients over
    ranks gives the mean over the global batch. With one process it changes nothing."""

    size: int
    ctx: DistContext

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.ctx.rank, self.size, self.ctx.world, device=self.ctx.device)

    def weight(self, own: int | None = None, total: int | None = None) -> float:
        """Factor turning a mean over `own` rows into this rank's share of the mean over `total`
        rows of all ranks, after gradients are averaged over the world (default: the batch rows)."""
        own = len(self.positions) if own is None else own
        total = self.size if total is None else total
        return own * self.ctx.world / total if total else 0.0

    def total(self, own: int) -> int:
        """Sum of a per-rank count over ranks."""
        return own if self.ctx.world == 1 else int(self.ctx.sum([own])[0])

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """[own rows, ...] of every rank -> [size, ...] in global batch order (no gradient)."""
        if self.ctx.world == 1:
            return rows
        width = -(-self.size // self.ctx.world)
        padded = rows.new_zeros((width, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows.detach()
        parts = [torch.empty_like(padded) for _ in range(self.ctx.world)]
        dist.all_gather(parts, padded)
        out = rows.new_empty((self.size, *rows.shape[1:]))
        for rank, part in enumerate(parts):
            out[rank::self.ctx.world] = part[: len(range(rank, self.size, self.ctx.world))]
        return out


# -- schedule and early stopping ----------------------------------------------------------------

def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor per step: linear warmup to 1 over warmup_steps, then cosine decay to 0."""
    warmup_steps = max(1, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class EarlyStopping:
    """Model selection and early stopping on a validation metric (higher is better) that does not
    react to noise. `update(value, epoch, threshold, loss)` classifies one validation against the
    reference level `best`:

    - better: value > best + threshold. It becomes the selected checkpoint, patience restarts.
    - tie: |value - best| <= threshold, i.e. indistinguishable from the best at this noise level.
      The validation loss breaks it: with a lower loss than the selected checkpoint's it becomes the
      selected checkpoint and patience restarts; otherwise it counts as a bad validation. The
      reference level becomes max(best, value), so a chain of ties cannot walk it downwards.
    - worse (value < best - threshold): a bad validation.

    `should_stop`: `patience` bad validations in a row, and the last one at or after epoch
    `stop_from_epoch` (so a decaying learning-rate schedule is not cut before it has annealed).
    threshold 0 and no loss give the plain rule: stop after `patience` validations without a
    strictly higher metric."""

    patience: int
    stop_from_epoch: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    best_loss: float = math.inf
    bad: int = 0
    last_epoch: int = 0

    def update(self, value: float, epoch: int, threshold: float = 0.0, loss: float | None = None) -> bool:
        """Record a validation; True when it becomes the selected checkpoint (see the class doc)."""
        self.last_epoch = epoch
        better = value > self.best + threshold
        tie_won = (not better and value >= self.best - threshold and loss is not None and loss < self.best_loss)
        if better or tie_won:
            self.best = max(self.best, value)
            self.best_epoch, self.bad = epoch, 0
            self.best_loss = loss if loss is not None else math.inf
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience and self.last_epoch >= self.stop_from_epoch

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad, "best_loss": self.best_loss,
                "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Also reads checkpoints written before the loss tie-break existed (no best_loss: no tie won yet)."""
        self.best, self.best_epoch, self.bad = state["best"], state["best_epoch"], state["bad"]
        self.best_loss = state.get("best_loss", math.inf)
        self.last_epoch = state.get("last_epoch", 0)


# -- checkpoints --------------------------------------------------------------------------------

def save_checkpoint(path: str, obj: dict) -> None:
    """torch.save through a temporary file: a reader never sees a half-written checkpoint."""
    torch_save(path, obj)


def load_checkpoint(path: str, map_location="cpu", mmap: bool = False) -> dict:
    """torch.load, with a missing, empty, truncated or foreign file as one LetterError naming it.
    mmap: map the tensors' storage instead of reading it (for a reader of the record only)."""
    if not os.path.isfile(path):
        raise LetterError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise LetterError(f"{path}: corrupt or truncated (empty file)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, ModuleNotFoundError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise LetterError(f"{path}: corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(obj, dict):
        raise LetterError(f"{path}: not a LETTER checkpoint (holds a {type(obj).__name__})")
    return obj


def check_resume(path: str, saved: dict, current: dict, fixed: list[str] | None = None) -> None:
    """Refuse to resume when a fixed setting or an input differs: one LetterError naming it.

    `saved`/`current` are flat mappings (settings plus input fingerprints, e.g. "inputs.text_emb");
    `fixed` names the keys that must match (default: all of `current`)."""
    for key in (fixed if fixed is not None else list(current)):
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if old != new:
            raise LetterError(
                f"cannot resume from {path}: {key} was {_short(old)}, now {_short(new)} "
                "(keep it, or start a new run: not resumed, or in another folder)"
            )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_not_diverged(what: str, *tensors: torch.Tensor, ctx: DistContext | None = None) -> None:
    """LetterError "training diverged: <what> hold NaN/inf; lower lr" when any of `tensors` does:
    the weights diverged inside an epoch, before its loss could be checked (the fused ops would
    stop on such input with a bare ValueError). One host sync.

    `ctx` of several processes (a collective: every process calls it at the same step): every
    process raises when any one's tensors hold NaN/inf, so none is left waiting in the next
    collective for one that left."""
    diverged = not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
    if ctx is not None and ctx.world > 1:
        diverged = ctx.sum([float(diverged)])[0] > 0
    if diverged:
        raise LetterError(f"training diverged: {what} hold NaN/inf; lower lr", "lr")


def content_hash(*arrays) -> str:
    """A short sha256 of arrays' shapes, dtypes and bytes (numpy or torch), to tell inputs apart."""
    h = hashlib.sha256()
    for a in arrays:
        arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
    return h.hexdigest()[:16]


# -- the training loop --------------------------------------------------------------------------

@dataclass
class Validation:
    """One validation of a model-selection epoch: `record` goes into the epoch's history record,
    `score` (higher is better) into model selection, `loss` breaks ties within `threshold`."""

    record: dict
    score: float
    loss: float | None = None
    threshold: float = 0.0


class Trainable:
    """A model as `fit` trains it (see docs/TRAINERS.md). The caller seeds and builds it (model,
    optimizer, optional per-step scheduler, generators registered in the run's RandomStreams);
    `fit` then drives these hooks. Epochs are numbered from 1."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler = None  # stepped after every optimizer step
    step_module: torch.nn.Module  # what `step` calls; fit wraps it in DistributedDataParallel when `ddp`
    ddp = False  # False: gradients are averaged over processes by fit (ctx.average_gradients)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trained parameters (gradient averaging and clipping)."""
        raise NotImplementedError

    def initialize(self) -> None:
        """Set-up of a fresh run only (not on resume), e.g. data-dependent initialisation."""

    def start_epoch(self, epoch: int) -> None:
        """Per-epoch preparation before the batches are drawn."""

    def batches(self, epoch: int) -> Iterable[torch.Tensor]:
        """The epoch's global batches (row-index tensors, identical on every process)."""
        raise NotImplementedError

    def step(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to back-propagate, detached terms fit sums over the epoch's steps) for one global
        batch; the process's share of it is the adapter's business (letter.training.shard)."""
        raise NotImplementedError

    def epoch_record(self, epoch: int, sums: dict[str, float], steps: int) -> dict:
        """The training part of the epoch's history record from the terms summed over steps and
        processes (may raise LetterError, e.g. on a diverged loss)."""
        raise NotImplementedError

    def validate(self, epoch: int, record: dict, select: bool) -> Validation | None:
        """Called every epoch on every process after training; may add per-epoch entries to
        `record`. With `select` (the validation cadence) it returns the Validation model selection
        sees (None on processes that do not validate)."""
        return None

    def keep_best(self, epoch: int, validation: Validation) -> None:
        """This epoch's model became the selected one: keep it (in `extra_state` or on disk)."""

    def model_state(self) -> dict:
        """What the checkpoint's `model` holds (default: the state dict of `self.model`)."""
        return self.model.state_dict()

    def load_model_state(self, state: dict) -> None:
        self.model.load_state_dict(state)

    def extra_state(self) -> dict:
        """Anything else a resume needs (best weights, schedules of the adapter's own)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def checkpointed(self, run: "FitRun", seconds: float) -> None:
        """After each checkpoint (written in `seconds`), on the main process: per-epoch reports."""


@dataclass
class FitPlan:
    """How `fit` trains: the schedule and the run's identity.

    identity: field -> value of everything a resumed run must share with the checkpoint (settings,
    content hashes of the inputs); `may_change` names the fields that may differ on resume.
    validate_every: epochs between model-selection validations (the last epoch always validates).
    select_from: validations before this epoch do not take part in model selection; a resume whose
    longer schedule moves this past the kept model starts the selection again.
    patience: stop after this many validations without a better one (None: never stop early),
    not before `stop_from` (an epoch). stop_after: leave after this many epochs of this call.
    checkpoint_minutes: also checkpoint inside an epoch once this much wall time has passed since the
    last checkpoint (epochs longer than a session: a killed run loses at most this much work); its
    resume replays start_epoch and batches on the weights reached inside the epoch, so they must
    not read the weights (the tokenizer's cluster refresh does)."""

    epochs: int
    checkpoint: str
    identity: dict
    may_change: Iterable[str] = ()
    resume: bool = False
    validate_every: int = 1
    select_from: int = 0
    patience: int | None = None
    stop_from: int = 0
    checkpoint_every: int = 1
    max_grad_norm: float | None = None
    stop_after: int | None = None
    checkpoint_minutes: float | None = None
    log: Callable[[str], None] = print


@dataclass
class FitRun:
    """The state of a run as fit leaves it (also what `Trainable.checkpointed` sees)."""

    epoch: int = 0
    history: list = field(default_factory=list)
    stopping: EarlyStopping | None = None
    last_validation: dict | None = None  # {"epoch", "score", "loss", "threshold"} of the latest
    resumed_from: int | None = None  # the checkpoint's epoch when resumed
    stopped_early: bool = False
    finished: bool = False  # the schedule ran out or early stopping ended it
    within_epoch: dict | None = None  # resumed from a checkpoint written inside epoch `epoch` + 1


CHECKPOINT_KEYS = ("identity", "epoch", "finished", "model", "optimizer", "scheduler", "history", "stopping",
                   "last_validation", "rng", "trainer")
# A checkpoint written inside an epoch also holds "within_epoch": {"steps": batches done, "wall_s",
# "per_rank": [{"epoch_rng": the random state before the epoch drew anything, "sums": {term: float}}]}.


def validation_epochs(every: int, epochs: int) -> int:
    """`every` as the validation interval; 0: a tenth of the epochs."""
    return every or max(1, epochs // 10)


def fit(trainable: Trainable, plan: FitPlan, ctx: DistContext, rng: RandomStreams) -> FitRun:
    """Train `trainable` by `plan`; returns the run's state (history, selection, whether finished).

    Resume: `plan.resume` continues from `plan.checkpoint` and needs it (resuming without a
    checkpoint is an error for every trainer: a silent fresh start would discard what the user
    asked to keep). The checkpoint's identity must equal `plan.identity` field by field, except the
    `may_change` fields; the first difference is one LetterError naming it. A checkpoint is written
    every `checkpoint_every` epochs, at the end (main process, atomically) and, with
    `checkpoint_minutes`, inside epochs; it holds the model, optimizer, scheduler, history, selection
    state and every process's random state, so a resumed run continues exactly as the uninterrupted
    one would (inside an epoch: the epoch's batches are drawn again from its saved random state and
    the done ones skipped)."""
    run = FitRun(stopping=EarlyStopping(plan.patience if plan.patience is not None else math.inf, plan.stop_from))
    checkpoint_finished = False
    if plan.resume:
        checkpoint_finished = _restore(trainable, plan, ctx, rng, run)
    else:
        trainable.initialize()
    step_module = trainable.step_module
    if trainable.ddp and ctx.world > 1:
        trainable.step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    parameters = trainable.parameters()
    started = last_checkpoint = time.time()
    wall_before = run.history[-1].get("wall_s", 0.0) if run.history else 0.0
    epochs_this_call = 0
    try:
        while run.epoch < plan.epochs and not run.stopping.should_stop:
            epoch = run.epoch + 1
            within, run.within_epoch = run.within_epoch, None
            if within:  # replay the epoch's draws of batches, then continue from the saved state
                epoch_rng, now_rng = within["epoch_rng"], rng.state()
                rng.restore(epoch_rng)
                wall_before = within["wall_s"]
            else:  # the state a checkpoint inside this epoch needs (only taken when there can be one)
                epoch_rng = rng.state() if plan.checkpoint_minutes is not None else None
            trainable.start_epoch(epoch)
            batches = list(trainable.batches(epoch))
            sums: dict[str, torch.Tensor] = {}
            done = 0
            if within:
                rng.restore(now_rng)
                done = within["steps"]
                sums = {n: torch.tensor(v, dtype=torch.float64, device=ctx.device) for n, v in within["sums"].items()}
            bar = progress(total=len(batches), initial=done, desc=f"epoch {epoch}/{plan.epochs}", unit="step",
                           leave=False, disable=None if ctx.main else True)
            for step, batch in enumerate(batches[done:], done + 1):
                loss, terms = trainable.step(batch)
                trainable.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if not trainable.ddp:
                    ctx.average_gradients(parameters)
                if plan.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, plan.max_grad_norm)
                trainable.optimizer.step()
                if trainable.scheduler is not None:
                    trainable.scheduler.step()
                for name, value in terms.items():  # float64 sums on the device: no sync per step
                    value = value.detach().double()
                    sums[name] = sums[name] + value if name in sums else value
                bar.update(1)
                if (plan.checkpoint_minutes is not None and step < len(batches)  # one collective a step, only then
                        and ctx.any(time.time() - last_checkpoint >= 60 * plan.checkpoint_minutes)):
                    wall = round(wall_before + time.time() - started, 3)
                    _save(trainable, plan, ctx, rng, run, within_epoch=(step, wall, epoch_rng, sums))
                    last_checkpoint = time.time()
                    if ctx.main:
                        plan.log(f"checkpoint inside epoch {epoch}: step {step} of {len(batches)}")
            bar.close()
            names = list(sums)
            totals = ctx.sum([float(sums[n]) for n in names]) if names else []
            record = {"epoch": epoch, **trainable.epoch_record(epoch, dict(zip(names, totals)), len(batches))}
            select = epoch % plan.validate_every == 0 or epoch == plan.epochs
            validation = trainable.validate(epoch, record, select)
            if validation is not None:
                record.update(validation.record)
                run.last_validation = {"epoch": epoch, "score": validation.score, "loss": validation.loss,
                                       "threshold": validation.threshold}
                if epoch >= plan.select_from:
                    record["selected"] = run.stopping.update(validation.score, epoch, validation.threshold,
                                                             validation.loss)
                    if record["selected"]:
                        trainable.keep_best(epoch, validation)
            record["wall_s"] = round(wall_before + time.time() - started, 3)
            run.history.append(record)
            run.epoch = epoch
            run.stopped_early = ctx.any(run.stopping.should_stop)
            run.finished = run.stopped_early or epoch >= plan.epochs
            if ctx.main:
                plan.log(format_record(record))
            epochs_this_call += 1
            leaving = plan.stop_after is not None and epochs_this_call >= plan.stop_after
            if run.finished or leaving or epoch % plan.checkpoint_every == 0:
                _save(trainable, plan, ctx, rng, run)
                last_checkpoint = time.time()
            if run.finished or leaving:
                break
        else:  # no epoch left: a resume whose patience or epochs end the run where its checkpoint is
            run.finished, run.stopped_early = True, ctx.any(run.stopping.should_stop)
            if not checkpoint_finished:
                _save(trainable, plan, ctx, rng, run)
    finally:
        trainable.step_module = step_module
    return run


def format_record(record: dict) -> str:
    """One history record as the log line every trainer prints."""
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _save(trainable: Trainable, plan: FitPlan, ctx: DistContext, rng: RandomStreams, run: FitRun,
          within_epoch: tuple | None = None) -> None:
    """Checkpoint after epoch `run.epoch`, or inside the next one: within_epoch = (steps done,
    wall_s, the epoch's starting random state, this process's loss sums)."""
    rng_states = ctx.gather(rng.state())
    extra = {}
    if within_epoch is not None:
        steps, wall, epoch_rng, sums = within_epoch
        per_rank = ctx.gather({"epoch_rng": epoch_rng, "sums": {n: float(v) for n, v in sums.items()}})
        extra["within_epoch"] = {"steps": steps, "wall_s": wall, "per_rank": per_rank}
    if ctx.main:
        started = time.perf_counter()
        save_checkpoint(plan.checkpoint, {
            "identity": plan.identity, "epoch": run.epoch, "finished": run.finished,
            "model": trainable.model_state(), "optimizer": trainable.optimizer.state_dict(),
            "scheduler": None if trainable.scheduler is None else trainable.scheduler.state_dict(),
            "history": run.history, "stopping": run.stopping.state_dict(), "last_validation": run.last_validation,
            "rng": rng_states, "trainer": trainable.extra_state(), **extra,
        })
        if within_epoch is None:  # the per-epoch reports describe finished epochs only
            trainable.checkpointed(run, time.perf_counter() - started)
    ctx.barrier()


def _restore(trainable: Trainable, plan: FitPlan, ctx: DistContext, rng: RandomStreams, run: FitRun) -> bool:
    """Load the checkpoint into `trainable`, `rng` and `run`; whether it holds a finished run."""
    if not os.path.isfile(plan.checkpoint):
        raise LetterError(f"cannot resume: no checkpoint at {plan.checkpoint} (start the run without resuming)")
    ckpt = load_checkpoint(plan.checkpoint)  # on the CPU: random states must stay CPU tensors
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise LetterError(f"cannot resume from {plan.checkpoint}: not a checkpoint of this LETTER version "
                          f"(no {missing[0]}); start a new run")
    if ckpt["epoch"] > plan.epochs:
        raise LetterError(f"cannot resume from {plan.checkpoint}: it is at epoch {ckpt['epoch']}, past epochs "
                          f"{plan.epochs}")
    may_change = set(plan.may_change)
    check_resume(plan.checkpoint, ckpt["identity"], plan.identity,
                 [k for k in dict.fromkeys([*ckpt["identity"], *plan.identity]) if k not in may_change])
    trainable.load_model_state(ckpt["model"])
    trainable.optimizer.load_state_dict(ckpt["optimizer"])
    if trainable.scheduler is not None:
        trainable.scheduler.load_state_dict(ckpt["scheduler"])
    trainable.load_extra_state(ckpt["trainer"])
    run.epoch = run.resumed_from = ckpt["epoch"]
    run.history, run.last_validation = ckpt["history"], ckpt["last_validation"]
    run.stopping.load_state_dict(ckpt["stopping"])
    within = ckpt.get("within_epoch")  # absent in checkpoints written at epoch ends only
    if within is not None:
        if len(within["per_rank"]) != ctx.world:
            raise LetterError(f"cannot resume from {plan.checkpoint}: it was written inside epoch {ckpt['epoch'] + 1} "
                              f"by {len(within['per_rank'])} process(es); resume with as many (now {ctx.world})")
        run.within_epoch = {"steps": within["steps"], "wall_s": within["wall_s"], **within["per_rank"][ctx.rank]}
    if len(ckpt["rng"]) == ctx.world:
        reseeded = rng.restore(ckpt["rng"][ctx.rank])
        if reseeded and ctx.main:
            plan.log(f"note: checkpoint written on another kind of device: the random stream(s) {', '.join(reseeded)} "
                     "start again from their seed")
    elif ctx.main:
        plan.log(f"note: checkpoint from {len(ckpt['rng'])} process(es), resuming with {ctx.world}: "
                 "the per-process random streams are reseeded")
    last = run.last_validation
    if run.stopping.best_epoch < plan.select_from:
        # A longer schedule moved the selection window past the kept model: select again, with the
        # checkpoint's own model as first candidate when its validation lies inside the window.
        run.stopping = EarlyStopping(run.stopping.patience, plan.stop_from)
        if last is not None and last["epoch"] == run.epoch and run.epoch >= plan.select_from:
            run.stopping.update(last["score"], last["epoch"], last["threshold"], last["loss"])
            trainable.keep_best(last["epoch"], Validation({}, last["score"], last["loss"], last["threshold"]))
    if ctx.main:
        inside = f", step {run.within_epoch['steps']} of epoch {run.epoch + 1}" if run.within_epoch else ""
        plan.log(f"resumed from {plan.checkpoint} after epoch {run.epoch}{inside}")
    return ckpt["finished"]
