"""TIGER training throughput (samples/s): padded vs trimmed vs trimmed+bucketed batches, and the
bucketed batches in bf16 autocast (fp32 master weights) against fp32.

Arms, all with the real training step (loss summed over tokens and scaled to the batch mean,
backward, gradient clipping, AdamW), on the same training samples:
  padded    every batch padded to max_history * L + 1 tokens (the old path), shuffled order
  trimmed   the same batches, each trimmed to its longest row (`letter.rec.data.drop_trailing_padding`)
  bucketed  batches of similar history length (`letter.training.batch_order(..., lengths)`), trimmed
  bucketed_bf16  the bucketed batches under torch.autocast(bfloat16) (`--precision bf16` of train-rec)
The arms run step by step in turn (rotating which goes first) from identical initial weights;
samples/s = samples / summed step time after warm-up steps. The timed batches of each arm sit at
evenly spaced quantiles of its epoch's batch widths (see `_schedule`), so that bucketed steps, whose
cost follows their width, represent a whole epoch. Sizes: the authors' TIGER (RecConfig
defaults: d_model 128, 4+4 layers, 6 heads x 64, d_ff 1024, max_history 20) and the CPU preset
(letter.config.SYNTHETIC_PRESET rec sizes, max_history 10). Data: Instruments histories with the
authors' index (/work/shared/data/instruments or --rec-data/--rec-index) when present, else
synthetic samples whose history lengths follow Instruments' distribution (mean 5.6 items).
"""
from __future__ import annotations

import copy
import os
import statistics

import numpy as np
import torch

NAME = "rec_throughput"
ARMS = ("padded", "trimmed", "bucketed", "bucketed_bf16")
DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "shared", "data", "instruments")
# Training samples per history length 1..20 (items) of Instruments with max_history 20 (the last
# bin holds every longer history): the synthetic fallback draws lengths from it.
INSTRUMENTS_LENGTHS = [24772, 24772, 16913, 12216, 9119, 7000, 5503, 4360, 3564, 2957, 2467, 2085, 1807, 1561,
                       1318, 1139, 970, 862, 770, 7682]


def add_arguments(p) -> None:
    from . import count

    g = p.add_argument_group(NAME)
    g.add_argument("--rec-sizes", nargs="+", default=["authors", "cpu"], choices=["authors", "cpu"])
    g.add_argument("--rec-steps", type=count(), default=20, help="timed steps per arm")
    g.add_argument("--rec-warmup", type=count(0), default=2, help="untimed steps per arm first")
    g.add_argument("--rec-batch-size", type=count(), default=256)
    g.add_argument("--rec-data", default=None, help="dataset folder (default: Instruments when present)")
    g.add_argument("--rec-index", default=None, help="index .json (default: <data>/Instruments.index.json)")
    g.add_argument("--rec-synthetic", action="store_true", help="use synthetic histories even if data exist")


def size_config(size: str):
    """RecConfig of a model size: 'authors' (the defaults) or 'cpu' (the synthetic preset)."""
    from letter.config import SYNTHETIC_PRESET
    from letter.rec import RecConfig

    if size == "authors":
        return RecConfig()
    keys = set(RecConfig().to_dict())
    preset = {k: v for k, v in SYNTHETIC_PRESET["rec"].items() if k in keys}
    return RecConfig(**preset, max_history=SYNTHETIC_PRESET["data"]["max_history"])


def _synthetic(max_history: int, levels: int = 4, codes: int = 256, samples: int = 131837, seed: int = 0):
    """(encoder tokens, labels, vocab size) with Instruments' history-length distribution."""
    from letter.rec.model import EOS, PAD, TokenLayout

    rng = np.random.default_rng(seed)
    p = np.asarray(INSTRUMENTS_LENGTHS, dtype=np.float64)
    lengths = np.minimum(rng.choice(np.arange(1, len(p) + 1), size=samples, p=p / p.sum()), max_history)
    layout = TokenLayout((codes,) * levels)
    item_tokens = torch.from_numpy(layout.item_tokens(rng.integers(0, codes, size=(9922, levels))))
    enc = torch.full((samples, max_history * levels + 1), PAD, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = item_tokens[rng.integers(0, 9922, size=n)].reshape(-1)
        enc[row, : tokens.numel()] = tokens
        enc[row, tokens.numel()] = EOS
    labels = item_tokens[rng.integers(0, 9922, size=samples)]
    return enc, labels, layout.vocab_size


def load_samples(args, max_history: int):
    """(encoder tokens [N, S], labels [N, L], vocab size, description)."""
    from letter.rec.data import load_rec_data

    data = args.rec_data or DEFAULT_DATA
    index = args.rec_index or os.path.join(data, "Instruments.index.json")
    if not args.rec_synthetic and os.path.isdir(data) and os.path.exists(index):
        rec = load_rec_data(data, index, max_history)
        enc, labels = rec.train_tensors()
        return enc, labels, rec.layout.vocab_size, f"{os.path.abspath(data)} with {os.path.abspath(index)}"
    enc, labels, vocab = _synthetic(max_history)
    return enc, labels, vocab, "synthetic, Instruments' history-length distribution"


def _orders(n: int, batch_size: int, lengths: torch.Tensor, seed: int) -> dict[str, list[torch.Tensor]]:
    from letter.training import batch_order, epoch_generator

    plain = batch_order(n, batch_size, epoch_generator(seed, 0))
    bucketed = batch_order(n, batch_size, epoch_generator(seed, 0), lengths)
    return {"padded": plain, "trimmed": plain, "bucketed": bucketed, "bucketed_bf16": bucketed}


def _widths(batches, lengths: torch.Tensor, full: int, trimmed: bool) -> list[int]:
    return [int(lengths[b].max()) if trimmed else full for b in batches]


def _schedule(batches: list[torch.Tensor], widths: list[int], warmup: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The batches an arm runs: `warmup` from the start of the epoch order, then `steps` batches at
    evenly spaced quantiles of the epoch's batch widths (in a seeded shuffled order), so that a few
    dozen steps represent the whole epoch's mix of short and long batches."""
    by_width = sorted(range(len(batches)), key=lambda i: (widths[i], i))
    picks = [by_width[min(len(batches) - 1, int((k + 0.5) * len(batches) / steps))] for k in range(steps)]
    shuffled = torch.randperm(steps, generator=torch.Generator(device="cpu").manual_seed(seed), device="cpu").tolist()
    return batches[:warmup] + [batches[picks[k]] for k in shuffled]


def measure(size: str, args, device: torch.device) -> dict:
    from letter.rec.data import RecData, drop_trailing_padding, input_lengths
    from letter.rec.model import Tiger

    config = size_config(size)
    enc, labels, vocab, source = load_samples(args, config.max_history)
    n, levels = enc.shape[0], labels.shape[1]
    lengths = input_lengths(enc)
    orders = _orders(n, args.rec_batch_size, lengths, config.seed)
    torch.manual_seed(config.seed)
    base = Tiger(vocab, **config.model_kwargs())
    models, optims = {}, {}
    for arm in ARMS:
        models[arm] = copy.deepcopy(base).to(device).train()
        optims[arm] = torch.optim.AdamW(models[arm].parameters(), lr=config.lr, weight_decay=config.weight_decay)
    from . import clock

    timer = clock("wall" if device.type == "cuda" else args.clock)  # CPU time says nothing about a GPU's work
    epoch_widths = {arm: _widths(orders[arm], lengths, enc.shape[1], arm != "padded") for arm in ARMS}
    schedules = {arm: _schedule(orders[arm], epoch_widths[arm], args.rec_warmup, args.rec_steps, config.seed)
                 for arm in ARMS}
    torch.manual_seed(config.seed)
    times = {arm: [] for arm in ARMS}
    widths = {arm: [] for arm in ARMS}
    samples = dict.fromkeys(ARMS, 0)
    total = args.rec_warmup + args.rec_steps
    for step in range(total):
        rotation = ARMS[step % len(ARMS):] + ARMS[:step % len(ARMS)]
        for arm in rotation:
            batch = schedules[arm][step]
            e, y = enc[batch], labels[batch]
            if arm != "padded":
                e = drop_trailing_padding(e)
            e, y = e.to(device).long(), y.to(device).long()  # train_tensors holds them compact
            model, opt = models[arm], optims[arm]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = timer()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=arm.endswith("_bf16")):
                loss = model.loss(e, RecData.decoder_inputs(y), y, reduction="sum") / y.numel()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.rec_warmup:
                times[arm].append(timer() - t0)
                widths[arm].append(e.shape[1])
                samples[arm] += len(batch)
    out = {"size": size, "model": config.model_kwargs(), "max_history": config.max_history, "data": source,
           "train_samples": n, "levels": levels, "batch_size": args.rec_batch_size, "steps": args.rec_steps,
           "warmup_steps": args.rec_warmup, "full_width": int(enc.shape[1]),
           "mean_history_items": round(float(((lengths - 1) / levels).float().mean()), 3), "arms": {}}
    for arm in ARMS:
        out["arms"][arm] = {
            "samples_per_s": round(samples[arm] / sum(times[arm]), 2),
            "median_step_s": round(statistics.median(times[arm]), 4),
            "step_s": [round(t, 4) for t in times[arm]],
            "mean_width_timed": round(statistics.mean(widths[arm]), 2),
            "mean_width_epoch": round(statistics.mean(epoch_widths[arm]), 2),
        }
    base_rate = out["arms"]["padded"]["samples_per_s"]
    out["speedup_vs_padded"] = {arm: round(out["arms"][arm]["samples_per_s"] / base_rate, 3) for arm in ARMS}
    rates = {arm: out["arms"][arm]["samples_per_s"] for arm in ("bucketed_bf16", "bucketed")}
    out["bf16_vs_fp32"] = round(rates["bucketed_bf16"] / rates["bucketed"], 3)
    return out


def run(args) -> dict:
    from letter.devices import resolve_device

    device = resolve_device(args.device)
    result = {"benchmark": NAME, "device": str(device), "threads": torch.get_num_threads(), "clock": "wall" if device.type == "cuda" else args.clock,
              "sizes": {}}
    for size in args.rec_sizes:
        result["sizes"][size] = measure(size, args, device)
        print("  " + _line(result["sizes"][size]), flush=True)
    return result


def _line(r: dict) -> str:
    arms = ", ".join(f"{arm} {r['arms'][arm]['samples_per_s']:.1f}/s (width {r['arms'][arm]['mean_width_timed']:.0f})"
                     for arm in ARMS)
    return (f"{r['size']}: {arms}; bucketed/padded {r['speedup_vs_padded']['bucketed']:.2f}x, "
            f"bf16/fp32 {r['bf16_vs_fp32']:.2f}x")


def summary(result: dict) -> str:
    return f"{NAME}: " + "; ".join(_line(r) for r in result["sizes"].values())
