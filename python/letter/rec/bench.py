"""Time-bounded TIGER measurement for machines that cannot run the full schedule (CPU).

    python -m letter.rec.bench --data DATA --index INDEX --train-seconds 1800 --eval-users 1000 --out bench.json

Trains the full-size model (RecConfig defaults + the given temperature) with the real training
step for a wall-time budget (warmup, then cosine decay over the steps the budget is estimated to
allow), reports training samples/s and the implied epoch time, then evaluates a fixed sample of
test users with the fused constrained beam search and with the HF-style prefix_allowed_tokens_fn
baseline (same model, same users), reporting metrics and users/s of each.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from letter.utils import set_seed, write_json

from .config import RecConfig
from .data import load_rec_data
from .evaluation import evaluate_model, prefix_index
from .model import Tiger


def run(data: str, index: str, train_seconds: float, eval_users: int, batch_size: int, temperature: float,
        hf_users: int, seed: int = 42) -> dict:
    config = RecConfig(temperature=temperature, batch_size=batch_size, seed=seed).validate()
    rec = load_rec_data(data, index, config.max_history)
    set_seed(seed)
    model = Tiger(rec.layout.vocab_size, **config.model_kwargs())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    enc, labels = rec.train_tensors()
    order = torch.randperm(enc.shape[0], generator=torch.Generator(device="cpu").manual_seed(seed), device="cpu")
    warmup, planned, steps, started = 20, None, 0, time.time()
    model.train()
    while time.time() - started < train_seconds and (steps + 1) * batch_size <= enc.shape[0]:
        if steps == 5:  # plan the cosine decay from the measured step time
            planned = max(warmup + 1, int(train_seconds / ((time.time() - started) / steps)))
        progress_ = 0.0 if planned is None or steps < warmup else min(1.0, (steps - warmup) / (planned - warmup))
        lr = config.lr * min(1.0, (steps + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress_))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = order[steps * batch_size:(steps + 1) * batch_size]
        loss = model.loss(enc[batch], rec.decoder_inputs(labels[batch]), labels[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        if steps % 10 == 0:
            print(f"step {steps} loss {loss.item():.4f} lr {lr:.2e} {steps * batch_size / (time.time() - started):.1f} samples/s",
                  flush=True)
    train_wall = time.time() - started
    samples_per_s = steps * batch_size / train_wall
    test_enc, targets = rec.eval_tensors("test", eval_users, seed)
    index_ = prefix_index(rec, "cpu")
    fused = evaluate_model(model, rec, test_enc, targets, 20, 256, "cpu", index=index_)
    hf = evaluate_model(model, rec, test_enc[:hf_users], targets[:hf_users], 20, 256, "cpu", "hf", index=index_)
    fused_same = evaluate_model(model, rec, test_enc[:hf_users], targets[:hf_users], 20, 256, "cpu", index=index_)
    return {
        "config": config.to_dict(), "train_samples": int(enc.shape[0]), "steps": steps, "batch_size": batch_size,
        "trained_samples": steps * batch_size, "epochs_fraction": steps * batch_size / enc.shape[0],
        "train_wall_s": round(train_wall, 1), "train_samples_per_s": round(samples_per_s, 2),
        "epoch_estimate_s": round(enc.shape[0] / samples_per_s, 1), "last_loss": loss.item() if steps else None,
        "test_sample": fused, "speed_same_users": {"fused": fused_same, "hf": hf},
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--train-seconds", type=float, default=1800)
    p.add_argument("--eval-users", type=int, default=1000)
    p.add_argument("--hf-users", type=int, default=256, help="users decoded by both decoders for the speed ratio")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = run(args.data, args.index, args.train_seconds, args.eval_users, args.batch_size, args.temperature,
                 args.hf_users)
    write_json(args.out, result)
    print({k: v for k, v in result.items() if k not in ("config", "speed_same_users", "test_sample")})
    print("test sample:", result["test_sample"]["metrics"])
    print("users/s fused", result["speed_same_users"]["fused"]["users_per_s"], "hf",
          result["speed_same_users"]["hf"]["users_per_s"])


if __name__ == "__main__":
    main()
