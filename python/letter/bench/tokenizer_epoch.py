"""One epoch of `train_tokenizer` vs one epoch of the bare MLP autoencoder of the same shape.

The floor: forward + backward + AdamW of encoder and decoder MLPs (in_dim -> layers -> e_dim ->
mirrored) on the same batches, nothing else (MSE reconstruction, inputs standardized once,
batches gathered from a shuffled order like the trainer's). The tokenizer adds the quantizer
(residual nearest-code search, Sinkhorn on the last level), the InfoNCE and diversity losses, the
codebook-cluster refresh, the collision evaluation (an encoder pass over all items, every
`eval_interval` epochs) and a checkpoint every `checkpoint_every` epochs.

Both arms run in the same process, alternating (bare, ours, ours, bare, ...), each for `epochs`
epochs per round. The timed tokenizer runs evaluate every epoch, so each epoch splits exactly
into its training steps and its evaluation; an epoch at a cadence of k epochs per evaluation
costs median(steps) + median(evaluation) / k + mean(checkpoint) / checkpoint_every. The headline
ratio is at the default config's cadence (a tenth of the epochs, the authors' 2,000 of 20,000);
k = 1 is reported too. Input: Instruments-shaped, 9,922 items x 4,096-d Gaussian text embeddings
(or --text FILE.npy) and the authors' 32-d SASRec embeddings when
/work/shared/data/instruments/Instruments.sasrec32.npy (or --cf) exists, else Gaussian.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch

NAME = "tokenizer_epoch"
DEFAULT_CF = os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "shared", "data", "instruments",
                          "Instruments.sasrec32.npy")
RESEARCH_CODE = {
    "epoch_s": "20-23",
    "note": "quoted from issue 13: '20–23 s per epoch measured in a separate run on this machine' "
            "(the authors' RQ-VAE code, same config and input shape); not measured by this benchmark",
}


def add_arguments(p) -> None:
    from . import count

    g = p.add_argument_group(NAME)
    g.add_argument("--tok-items", type=count(), default=9922)
    g.add_argument("--tok-text-dim", type=count(), default=4096)
    g.add_argument("--tok-text", default=None, help="a [items, dim] .npy of text embeddings (default: Gaussian)")
    g.add_argument("--tok-cf", default=None, help="a [items, 32] .npy of CF embeddings (default: the authors' "
                                                  "Instruments SASRec ones when present, else Gaussian)")
    g.add_argument("--tok-epochs", type=count(), default=3, help="epochs per arm per round")
    g.add_argument("--tok-rounds", type=count(), default=2, help="rounds (each: both arms, alternating order)")
    g.add_argument("--tok-kmeans-iters", type=count(), default=20,
                   help="Lloyd steps of the codebook init (before the timed epochs; default config: 100)")


def _inputs(items: int, dim: int, text_path: str | None, cf_path: str | None):
    rng = np.random.default_rng(0)
    if text_path:
        text = np.load(text_path).astype(np.float32)
        source = os.path.abspath(text_path)
    else:
        text = rng.standard_normal((items, dim), dtype=np.float32)
        source = f"Gaussian [{items}, {dim}] (seed 0)"
    cf_path = cf_path or (DEFAULT_CF if os.path.exists(DEFAULT_CF) else None)
    if cf_path:
        cf = np.load(cf_path).astype(np.float32)
        cf_source = os.path.abspath(cf_path)
        if cf.shape[0] != text.shape[0]:
            cf = cf[np.arange(text.shape[0]) % cf.shape[0]]
            cf_source += f" (rows cycled to {text.shape[0]})"
    else:
        cf = rng.standard_normal((text.shape[0], 32), dtype=np.float32)
        cf_source = f"Gaussian [{text.shape[0]}, 32] (seed 0)"
    return text, cf, source, cf_source


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareAutoencoder:
    """The MLP autoencoder of the tokenizer's shape with its optimizer: the epoch-time floor."""

    def __init__(self, in_dim: int, config, device: torch.device, seed: int):
        from letter.tokenizer.model import mlp

        torch.manual_seed(seed)
        dims = [in_dim] + list(config.layers) + [config.e_dim]
        self.model = torch.nn.Sequential(mlp(dims, config.dropout, config.batch_norm),
                                         mlp(dims[::-1], config.dropout, config.batch_norm)).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.config, self.device = config, device
        self.order = torch.Generator(device="cpu").manual_seed(seed + 1)

    def epoch(self, xs: torch.Tensor, timer) -> float:
        from letter.training import batch_order

        _sync(self.device)
        t0 = timer()
        for batch in batch_order(len(xs), self.config.batch_size, self.order):
            xb = xs[batch.to(self.device)]
            loss = torch.nn.functional.mse_loss(self.model(xb), xb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        _sync(self.device)
        return timer() - t0


def run(args) -> dict:
    from letter.tokenizer import TokenizerConfig
    import letter.tokenizer.train as trainer
    from letter.devices import resolve_device
    from letter.training import validation_epochs

    from . import clock, module_clock

    device = resolve_device(args.device)
    clock_name = "wall" if device.type == "cuda" else args.clock  # CPU time says nothing about a GPU's work
    text, cf, text_source, cf_source = _inputs(args.tok_items, args.tok_text_dim, args.tok_text, args.tok_cf)
    default = TokenizerConfig()
    # every epoch evaluated, so that each epoch's time splits into steps + evaluation
    config = default.replace(epochs=args.tok_epochs, kmeans_iters=args.tok_kmeans_iters, eval_every=1)
    bare = BareAutoencoder(text.shape[1], config, device, config.seed)
    x = torch.from_numpy(text).to(device)  # shares memory with `text` on the CPU: not modified
    centered = x - x.mean(0)
    xs = centered / (centered**2).mean().sqrt()  # standardized once, as the trainer does for in-memory inputs
    del x, centered
    bare_s, steps_s, eval_s, refresh_s, checkpoint_s, train_wall = [], [], [], [], [], []
    for r in range(args.tok_rounds):
        for arm in (("bare", "ours") if r % 2 == 0 else ("ours", "bare")):
            if arm == "bare":
                bare_s += [bare.epoch(xs, clock(clock_name)) for _ in range(args.tok_epochs)]
                print(f"  bare MLP epochs: {[round(t, 2) for t in bare_s[-args.tok_epochs:]]} s", flush=True)
                continue
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                with module_clock(trainer, clock_name):  # its epoch/eval/checkpoint timings on --clock
                    timings = trainer.train_tokenizer(config.replace(device=str(device)), text, cf, out)["timing"]
                train_wall.append(time.perf_counter() - t0)
            steps_s += [e - v for e, v in zip(timings["epoch_s"], timings["eval_s"], strict=True)]
            eval_s += timings["eval_s"]
            refresh_s.append(timings["cluster_refresh_mean_s"])
            checkpoint_s += timings["checkpoint_s"]
            print(f"  train_tokenizer epochs: {[round(t, 2) for t in timings['epoch_s']]} s "
                  f"(eval {[round(t, 2) for t in timings['eval_s']]} s, checkpoint {timings['checkpoint_s']})", flush=True)
    bare_med, steps_med, eval_med = statistics.median(bare_s), statistics.median(steps_s), statistics.median(eval_s)
    ckpt_amortized = statistics.mean(checkpoint_s) / config.checkpoint_every if checkpoint_s else 0.0

    def ratio(every: int) -> float:
        return round((steps_med + eval_med / every + ckpt_amortized) / bare_med, 4)

    return {
        "benchmark": NAME,
        "device": str(device), "threads": torch.get_num_threads(), "clock": clock_name,
        "inputs": {"text": text_source, "cf": cf_source, "items": int(text.shape[0]), "text_dim": int(text.shape[1])},
        "config": config.to_dict(),
        "default_eval_interval": validation_epochs(default.eval_every, default.epochs), "default_epochs": default.epochs,
        "epochs_per_arm": len(steps_s), "rounds": args.tok_rounds,
        "bare_mlp_epoch_s": [round(t, 4) for t in bare_s],
        "tokenizer_steps_s": [round(t, 4) for t in steps_s],
        "tokenizer_eval_s": [round(t, 4) for t in eval_s],
        "tokenizer_cluster_refresh_mean_s": refresh_s,
        "tokenizer_checkpoint_s": [round(t, 4) for t in checkpoint_s],
        "tokenizer_run_wall_s": [round(t, 2) for t in train_wall],
        "bare_mlp_epoch_median_s": round(bare_med, 4),
        "tokenizer_steps_median_s": round(steps_med, 4),
        "tokenizer_eval_median_s": round(eval_med, 4),
        "checkpoint_amortized_s": round(ckpt_amortized, 4),
        "ratio": ratio(validation_epochs(default.eval_every, default.epochs)),
        "ratio_authors_cadence": ratio(2000),
        "ratio_eval_every_epoch": ratio(1),
        "ratio_steps_only": round(steps_med / bare_med, 4),
        "research_code": RESEARCH_CODE,
        "note": "ratio = (median steps + median evaluation / eval_interval + mean checkpoint / checkpoint_every) / "
                "median bare MLP epoch, at the default config's eval_interval (a tenth of its epochs); "
                "ratio_authors_cadence uses 2000 (their eval_step), ratio_eval_every_epoch 1",
    }


def summary(result: dict) -> str:
    return (f"{NAME}: bare MLP {result['bare_mlp_epoch_median_s']:.2f} s/epoch, train_tokenizer steps "
            f"{result['tokenizer_steps_median_s']:.2f} s/epoch + evaluation {result['tokenizer_eval_median_s']:.2f} s "
            f"every {result['default_eval_interval']} epochs + checkpoint {result['checkpoint_amortized_s']:.2f} s "
            f"amortized: ratio {result['ratio']:.3f} (evaluating every epoch: {result['ratio_eval_every_epoch']:.3f}); "
            f"research code: {RESEARCH_CODE['epoch_s']} s/epoch (quoted, separate run)")
