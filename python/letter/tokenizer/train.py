"""Training the LETTER tokenizer and writing its run folder (letter.tokenizer.inference loads it)."""
import contextlib
import math
import os
import time

import numpy as np
import torch

from letter.data import write_index_json
from letter.errors import LetterError
from letter import runs
from letter.training import (BatchShare, DistContext, RandomStreams, batch_order, check_resume, content_hash, distributed,
                             load_checkpoint, save_checkpoint, seed_everything, shard)
from letter.utils import atomic_path, progress, save_npy, torch_save, write_json

from .clustering import diversity_capacity, inertia, kmeans
from .codes import collision_rate
from .config import TokenizerConfig
from .inference import COMPLETE, MODEL, Tokenizer, check_embeddings, encode_all
from .model import ROW_CHUNK, RQVAE, collaborative_loss, diversity_loss, quantization_loss, row_tensor
from .report import build_report, plot_curves, report_markdown
from .rqkmeans import fit_rqkmeans

CHECKPOINT = "checkpoint.pt"  # resumable training state (latest)
# Everything a run writes; a fresh run removes them first so no file of an earlier run survives it.
OUTPUTS = (runs.COMPLETE, COMPLETE, MODEL, "codes.npy", "config.json", "prefix_index.pt", "curves.png", "report.md")


def _check_inputs(config: TokenizerConfig, text: np.ndarray, cf: np.ndarray | None) -> None:
    num_items = text.shape[0]
    if cf is not None:
        if cf.shape[0] != num_items:
            raise LetterError(f"CF embeddings have {cf.shape[0]} rows but the text embeddings have {num_items}")
        if cf.shape[1] != config.e_dim and not config.cf_projection:
            raise LetterError(
                f"CF embedding dim {cf.shape[1]} != e_dim {config.e_dim}: set e_dim to {cf.shape[1]} or enable "
                "cf_projection (a learned linear map e_dim -> CF dim)"
            )
    elif config.alpha > 0:
        raise LetterError("alpha > 0 needs CF embeddings (pass cf_emb / --cf-emb, or set alpha 0)")
    space = math.prod(config.codebook_sizes)
    if config.unique and space < num_items:
        raise LetterError(
            f"unique identifiers impossible: the code space {'x'.join(map(str, config.codebook_sizes))} = {space} "
            f"is smaller than the {num_items} items"
        )


def _init_codebooks(model: RQVAE, x, config: TokenizerConfig, gen: torch.Generator) -> list[dict]:
    """k-means the encoder's initial outputs level by level into the codebooks; returns inertia per level."""
    model.eval()
    device = model.codebooks[0].device
    with torch.no_grad():
        # a chunk of rows at a time: the encoder's widest layer over the whole catalog would not fit
        r = torch.cat([model.encoder(model.standardize(row_tensor(x, slice(i, i + ROW_CHUNK), device)))
                       for i in range(0, len(x), ROW_CHUNK)])
        out = []
        for cb in model.codebooks:
            n = cb.shape[0]
            cap = math.ceil(2 * len(r) / n) if config.kmeans_balanced else None
            centers, labels = kmeans(r, n, config.kmeans_iters, gen, capacity=cap)
            cb.copy_(centers)
            out.append({"inertia": inertia(r, centers, labels)})
            r = r - centers[labels]
    return out


def _refresh_clusters(model: RQVAE, config: TokenizerConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """K groups per codebook for the diversity loss (size-bounded k-means on the code vectors)."""
    labels = []
    for cb in model.codebooks:
        n = cb.shape[0]
        _, lab = kmeans(cb.detach(), config.clusters, 10, gen, capacity=diversity_capacity(n, config.clusters))
        labels.append(lab)
    return labels


def train_tokenizer(
    config: TokenizerConfig,
    text_emb,
    cf_emb=None,
    out_dir: str = "tokenizer-run",
    *,
    name: str = "items",
    num_items: int | None = None,
    device: str | None = None,
    resume: bool = False,
    item_labels: np.ndarray | None = None,
) -> dict:
    """Train the LETTER tokenizer and write its run folder; returns the report dict.

    Args:
        config: TokenizerConfig (validated here).
        text_emb: [I, text_dim] item text embeddings (row i = item i).
        cf_emb: [I, cf_dim] collaborative embeddings (e.g. SASRec), or None when alpha == 0.
        out_dir: run folder; gets `<name>.index.json` (authors' format), `codes.npy` [I, L],
            `prefix_index.*` (when letter.decoding is present), `model.pt`, `checkpoint.pt`,
            `config.json`, `report.json`, `report.md`, `curves.png` (when matplotlib is present).
        num_items: if given, the embeddings must have this many rows.
        device: 'cpu', 'cuda', 'auto'/None.
        resume: continue from `out_dir/checkpoint.pt` (same config; `epochs` may grow).
        item_labels: optional [I] ints (e.g. latent categories); the report then gives the purity
            of level-1 codes w.r.t. them.
    Bad input raises LetterError before any training. Under torchrun the batches are split over
    the processes (gradients averaged); rank 0 writes the outputs.
    """
    config = config.validate().for_method()
    text = check_embeddings("text embeddings", text_emb, num_items)
    use_cf = cf_emb is not None and config.method != "rqkmeans"  # rqvae keeps it for the report's CF alignment
    cf = check_embeddings("CF embeddings", cf_emb, num_items) if use_cf else None
    _check_inputs(config, text, cf)
    with distributed(device) as ctx:
        if config.method == "rqkmeans":
            return _fit_rqkmeans(config, text, out_dir, name, item_labels, ctx) if ctx.main else {}
        return _train(config, text, cf, out_dir, name, resume, item_labels, ctx)


def _fit_rqkmeans(config: TokenizerConfig, text: np.ndarray, out_dir: str, name: str, item_labels,
                  ctx: DistContext) -> dict:
    """Residual k-means codebooks (no training, so nothing to resume: a rerun refits identically)."""
    os.makedirs(out_dir, exist_ok=True)
    _start_fresh(out_dir, name)
    model = fit_rqkmeans(text, config.codebook_sizes, iters=config.kmeans_iters, standardize=config.standardize,
                         pca_dim=config.pca_dim or None, seed=config.seed, device=ctx.device)
    tok = Tokenizer(model.cpu(), config, name)
    codes_raw, z = tok.raw_codes(text)
    codes, resolution = tok.resolve(codes_raw, z)
    timings = {"kmeans_init_s": model.fit_stats["seconds"], "cluster_refresh_s": [], "epoch_s": []}
    report = build_report(tok, text, None, codes_raw, codes, z, resolution, [],
                          {"epoch": 0, "collision": resolution["collision_before"]}, model.fit_stats["init_stats"],
                          timings, item_labels)
    _write_outputs(out_dir, tok, codes, report, [], cf_dim=None)
    return report


def _start_fresh(out_dir: str, name: str) -> None:
    """A new run in an existing folder: drop the completion marker first, then every other output of
    the earlier run, so an interrupted new run never sits beside the old model and codes."""
    for file in OUTPUTS + (CHECKPOINT, f"{name}.index.json"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, file))


def _train(config: TokenizerConfig, text: np.ndarray, cf: np.ndarray | None, out_dir: str, name: str, resume: bool,
           item_labels, ctx: DistContext) -> dict:
    dev = ctx.device
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    identity = {**config.to_dict(), "inputs.text_emb": content_hash(text), "inputs.cf_emb": None if cf is None else content_hash(cf)}
    state = None
    if resume:
        if not os.path.isfile(ckpt_path):
            raise LetterError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path)
        check_resume(ckpt_path, state.get("identity", {}), identity,
                     config.fixed_on_resume() + ["inputs.text_emb", "inputs.cf_emb"])
        if state["epoch"] > config.epochs:
            raise LetterError(f"--resume: the checkpoint is at epoch {state['epoch']}, past --epochs {config.epochs}")
    elif ctx.main:
        _start_fresh(out_dir, name)
    ctx.barrier()

    seed_everything(config.seed)
    rng = RandomStreams(dev)
    # `codes` draws k-means seeds and diversity positives on the run's device; the batch order has
    # its own CPU stream: under torchrun every process must draw the same permutation, while the
    # positives depend on each process's share of the batch.
    gen = rng.generator("codes", config.seed)
    order_gen = rng.generator("order", config.seed + 1, device="cpu")
    # An in-memory matrix goes to the device once; a memory-mapped one stays on disk and each step
    # reads its batch's rows (row_tensor), so a catalog larger than memory streams.
    x = text if isinstance(text, np.memmap) else torch.from_numpy(text).to(dev)
    h = torch.from_numpy(cf).to(dev) if cf is not None else None
    needs_proj = cf is not None and cf.shape[1] != config.e_dim
    model = RQVAE(text.shape[1], config, cf_dim=cf.shape[1] if needs_proj else None).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    timings = {"kmeans_init_s": 0.0, "cluster_refresh_s": [], "epoch_s": []}
    if state is None:
        if config.standardize:
            model.fit_input_scaling(x)
        t0 = time.perf_counter()
        init_stats = _init_codebooks(model, x, config, gen)
        timings["kmeans_init_s"] = time.perf_counter() - t0
        history, start_epoch, labels = [], 0, None
        best = {"collision": math.inf, "epoch": -1, "state": _state_copy(model)}
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.restore(state["rng"])
        history, start_epoch = state["history"], state["epoch"]
        labels = None if state["labels"] is None else [lab.to(dev) for lab in state["labels"]]
        best, init_stats, timings = state["best"], state["init_stats"], state["timings"]
        if best["epoch"] < config.best_from * config.epochs:
            # More epochs moved the selection window past the stored best: start the selection
            # again, with the checkpoint's own state as first candidate if it is evaluated and
            # inside the window (the last epoch always is).
            own = "collision" in history[-1] and start_epoch >= config.best_from * config.epochs
            best = {"collision": history[-1]["collision"] if own else math.inf, "epoch": start_epoch if own else -1,
                    "state": _state_copy(model)}

    n = len(text)
    timings.setdefault("eval_s", [])
    timings.setdefault("checkpoint_s", [])
    bar = progress(range(start_epoch, config.epochs), desc="train-tokenizer", initial=start_epoch, total=config.epochs,
                   disable=None if ctx.main else True)
    for epoch in bar:
        t_epoch = time.perf_counter()
        if config.beta > 0 and (labels is None or epoch % config.cluster_every == 0):
            t0 = time.perf_counter()
            labels = _refresh_clusters(model, config, gen)
            timings["cluster_refresh_s"].append(time.perf_counter() - t0)
        model.train()
        names = ("loss", "recon", "quant", "cf", "div")
        sums = torch.zeros(len(names), dtype=torch.float64, device=dev)  # on the device: no sync per step
        steps = 0
        for batch in batch_order(n, config.batch_size, order_gen):
            if len(batch) < ctx.world:  # a tail too short to give every process a row (same on all ranks)
                continue
            idx = shard(batch, ctx)
            terms = _batch_losses(model, config, row_tensor(x, idx, dev), None if h is None else h[idx.to(dev)],
                                  labels, gen, BatchShare(len(batch), ctx))
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            ctx.average_gradients(model.parameters())
            opt.step()
            sums += torch.stack([terms[k].detach() for k in names]).double()
            steps += 1
        totals = ctx.sum(sums.tolist())  # each rank holds its weighted share of every term
        if not math.isfinite(totals[0]):  # checked once per epoch, on every rank alike
            raise LetterError(f"training diverged: the loss is {totals[0]} in epoch {epoch + 1}; lower --lr")
        record = {"epoch": epoch + 1, **{k: v / ctx.world / max(steps, 1) for k, v in zip(names, totals)}}
        if (epoch + 1) % config.eval_interval == 0 or epoch + 1 == config.epochs:  # the last epoch is always eligible
            t0 = time.perf_counter()
            codes, _ = encode_all(model, x)
            record["collision"] = collision_rate(codes)
            record["used"] = [int(len(np.unique(codes[:, l]))) for l in range(config.levels)]
            eligible = epoch + 1 >= config.best_from * config.epochs
            if eligible and record["collision"] < best["collision"]:
                best = {"collision": record["collision"], "epoch": epoch + 1, "state": _state_copy(model)}
            timings["eval_s"].append(time.perf_counter() - t0)
        timings["epoch_s"].append(time.perf_counter() - t_epoch)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", collision=f"{history_last(history, 'collision'):.4f}",
                        used1=history_last(history, "used", [0])[0])
        if ctx.main and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs):
            t0 = time.perf_counter()
            save_checkpoint(ckpt_path, {
                "identity": identity, "epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": rng.state(), "labels": labels, "history": history, "best": best, "init_stats": init_stats,
                "timings": timings,
            })
            timings["checkpoint_s"].append(time.perf_counter() - t0)
    bar.close()
    if not ctx.main:
        return {}
    model.load_state_dict(best["state"])
    tok = Tokenizer(model.cpu(), config, name)
    codes_raw, z = tok.raw_codes(text)
    codes, resolution = tok.resolve(codes_raw, z)
    report = build_report(tok, text, cf, codes_raw, codes, z, resolution, history, best, init_stats, timings, item_labels)
    _write_outputs(out_dir, tok, codes, report, history, cf_dim=cf.shape[1] if needs_proj else None)
    return report


def _write_outputs(out_dir: str, tok: "Tokenizer", codes: np.ndarray, report: dict, history: list, cf_dim) -> None:
    """Every file is written atomically; report.json goes last, so its presence means a complete run."""
    extra = {"rqkmeans": tok.model.hparams} if tok.config.method == "rqkmeans" else {}
    torch_save(os.path.join(out_dir, MODEL), {
        "config": tok.config.to_dict(), "name": tok.name, "in_dim": tok.model.in_dim, "cf_dim": cf_dim,
        "model": tok.model.state_dict(), **extra,
    })
    save_npy(os.path.join(out_dir, "codes.npy"), codes.astype(np.int64))
    write_index_json(os.path.join(out_dir, f"{tok.name}.index.json"), codes)
    write_json(os.path.join(out_dir, "config.json"), tok.config.to_dict())
    report["prefix_index"] = _save_prefix_index(out_dir, codes, tok.config.codebook_sizes)
    with atomic_path(os.path.join(out_dir, "curves.png")) as tmp:
        report["curves_png"] = plot_curves(history, tmp)
    if not report["curves_png"]:
        os.remove(os.path.join(out_dir, "curves.png"))
    with atomic_path(os.path.join(out_dir, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(report_markdown(report))
    write_json(os.path.join(out_dir, "report.json"), report)
    runs.mark_complete(out_dir, [MODEL, "codes.npy", f"{tok.name}.index.json", "config.json", "report.json"])


def _save_prefix_index(out_dir: str, codes: np.ndarray, sizes: list[int]) -> str:
    """Save the decoding prefix index next to the codes when letter.decoding is installed."""
    try:
        from letter.decoding import PrefixIndex
    except ImportError:
        return "skipped: letter.decoding not available"
    path = os.path.join(out_dir, "prefix_index.pt")
    PrefixIndex.from_codes(torch.from_numpy(codes), sizes).save(path)
    return os.path.basename(path)


def _state_copy(model: RQVAE) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict (what copy.deepcopy gave, without its overhead)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batch_losses(model: RQVAE, config: TokenizerConfig, x: torch.Tensor, h: torch.Tensor | None,
                  labels: list[torch.Tensor] | None, gen: torch.Generator, share: BatchShare) -> dict[str, torch.Tensor]:
    """One training batch's loss and its terms (the terms with weight 0 are not computed: 0).

    x and h hold this rank's rows of the global batch;
    terms are weighted so that averaging the gradients over ranks gives the one-process loss of the
    whole batch."""
    out = model(x, sinkhorn=True, share=share if share.ctx.world > 1 else None)
    zero = torch.zeros((), device=x.device)
    weight = share.weight()
    terms = {
        "recon": torch.nn.functional.mse_loss(out["recon"], out["target"]) * weight,
        "quant": quantization_loss(out["e"], out["residuals"], config.mu) * weight,
        "cf": zero,
        "div": zero,
    }
    if config.alpha > 0:
        z_hat = model.cf_proj(out["z_hat"]) if model.cf_proj is not None else out["z_hat"]
        terms["cf"] = collaborative_loss(z_hat, share.gather(h), config.cf_temperature, share.positions) * weight
    if config.beta > 0:
        # every rank draws the whole batch's uniforms, so the generator stays in step across ranks
        draws = [torch.rand(share.size, generator=gen, device=gen.device)[share.positions] for _ in model.codebooks]
        level_share = share if share.ctx.world > 1 else None
        terms["div"] = torch.stack([
            diversity_loss(out["e"][:, l], out["codes"][:, l], cb, labels[l], draws[l], config.div_temperature, level_share)
            for l, cb in enumerate(model.codebooks)
        ]).mean()
    terms["loss"] = terms["recon"] + terms["quant"] + config.alpha * terms["cf"] + config.beta * terms["div"]
    return terms


def history_last(history: list[dict], key: str, default=math.nan):
    """The latest value of `key` among the epoch records (evaluation runs every eval_interval epochs)."""
    for rec in reversed(history):
        if key in rec:
            return rec[key]
    return default
