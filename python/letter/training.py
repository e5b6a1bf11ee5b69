"""The training machinery every trainer shares (SASRec, the tokenizer, TIGER, LC-Rec).

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
import zipfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from letter.errors import LetterError
from letter.runs import torch_save


# -- devices and processes ---------------------------------------------------------------------

def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """'auto'/None: this rank's GPU when CUDA is available, else the CPU; 'cuda' under torchrun:
    the rank's own GPU. A device this torch cannot use is a LetterError."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise LetterError(f"--device {text!r}: not a device name ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LetterError(f"--device {text}: this torch has no usable CUDA device (torch {torch.__version__})")
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise LetterError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise LetterError(f"--device {text}: only cpu and cuda devices are supported")
    return dev


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

    def generator(self, name: str, seed: int, device: torch.device | str | None = None) -> torch.Generator:
        gen = torch.Generator(device=torch.device(device) if device is not None else self.device)
        gen.manual_seed(seed)
        self.generators[name] = gen
        return gen

    def state(self) -> dict:
        out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "generators": {name: g.get_state() for name, g in self.generators.items()}}
        if self.device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def restore(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)
        for name, gen_state in state["generators"].items():
            if name in self.generators:
                self.generators[name].set_state(gen_state)


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


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load, with a missing, empty, truncated or foreign file as one LetterError naming it."""
    if not os.path.isfile(path):
        raise LetterError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise LetterError(f"{path}: corrupt or truncated (empty file)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
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
                "(keep it, or start a new run without --resume / in another folder)"
            )


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def content_hash(*arrays) -> str:
    """A short sha256 of arrays' shapes, dtypes and bytes (numpy or torch), to tell inputs apart."""
    h = hashlib.sha256()
    for a in arrays:
        arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
    return h.hexdigest()[:16]
