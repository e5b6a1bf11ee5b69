"""Training the LETTER tokenizer and writing its run folder (letter.tokenizer.inference loads it)."""
import contextlib
import math
import os
import time

import numpy as np
import torch

from letter.data import write_index_json
from letter.errors import LetterError, SettingError
from letter import runs
from letter.training import (BatchShare, DistContext, FitPlan, FitRun, RandomStreams, Trainable, Validation, batch_order,
                             content_hash, distributed, fit, seed_everything, shard, validation_epochs)
from letter.runs import atomic_path, save_npy, torch_save, write_json

from .clustering import diversity_capacity, inertia, kmeans
from .codes import collision_rate
from .config import TokenizerConfig
from .inference import Tokenizer, check_embeddings, encode_all
from .model import ROW_CHUNK, RQVAE, collaborative_loss, diversity_loss, quantization_loss, row_tensor
from .report import build_report, plot_curves, report_markdown
from .rqkmeans import check_pca_dim, fit_rqkmeans

T = runs.TokenizerRun
CHECKPOINT = T.CHECKPOINT  # resumable training state (latest)
# Everything a run writes; a fresh run removes them first so no file of an earlier run survives it.
OUTPUTS = (T.REPORT, T.MODEL, T.CODES, T.CONFIG, T.PREFIX_INDEX, T.CURVES, T.REPORT_MD)


def _check_inputs(config: TokenizerConfig, text: np.ndarray, cf: np.ndarray | None) -> None:
    num_items = text.shape[0]
    if cf is not None:
        if cf.shape[0] != num_items:
            raise LetterError(f"CF embeddings have {cf.shape[0]} rows but the text embeddings have {num_items}")
        # only the collaborative term reads CF embeddings at e_dim (rqvae keeps them for the report)
        if config.alpha > 0 and cf.shape[1] != config.e_dim and not config.cf_projection:
            raise LetterError(
                f"CF embedding dim {cf.shape[1]} != e_dim {config.e_dim}: set e_dim to {cf.shape[1]} or enable "
                "cf_projection (a learned linear map e_dim -> CF dim)", "e_dim", "cf_projection")
    elif config.alpha > 0:
        raise SettingError("alpha", "> 0 needs CF embeddings (give cf_emb, or set alpha 0)", "cf_emb")
    if config.method == "rqkmeans":  # before the run folder is made, not when fitting starts
        check_pca_dim(text.shape[1], config.pca_dim or None)
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
    resume: bool = False,
    overwrite: bool = False,
    item_labels: np.ndarray | None = None,
    made_from: dict | None = None,
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
        resume: continue from `out_dir/checkpoint.pt` (an error without one; same config and
            inputs, `epochs` may grow).
        overwrite: replace a tokenizer run in `out_dir` (without it, or resume, a folder holding
            one is refused; so is a folder holding another kind of run).
        item_labels: optional [I] ints (e.g. latent categories); the report then gives the purity
            of level-1 codes w.r.t. them.
        made_from: content hashes of further inputs the manifest records, e.g. {"items": the
            dataset's items_fingerprint()} (train_rec on these codes then refuses a dataset of other items;
            a resume, other hashes).
    Bad input raises LetterError before any training. Under torchrun the batches are split over
    the processes (gradients averaged); rank 0 writes the outputs.
    """
    config = config.validate().for_method()
    text = check_embeddings("text embeddings", text_emb, num_items)
    use_cf = cf_emb is not None and config.method != "rqkmeans"  # rqvae keeps it for the report's CF alignment
    cf = check_embeddings("CF embeddings", cf_emb, num_items) if use_cf else None
    _check_inputs(config, text, cf)
    with distributed(config.device) as ctx:
        runs.prepare_run_folder(out_dir, T.kind, resume=resume, overwrite=overwrite,
                                checkpoint=None if config.method == "rqkmeans" else CHECKPOINT, main=ctx.main)
        inputs = {"text_emb": content_hash(text), "cf_emb": None if cf is None else content_hash(cf),
                  **(made_from or {})}
        if config.method == "rqkmeans":
            return _fit_rqkmeans(config, text, out_dir, name, item_labels, inputs, ctx) if ctx.main else {}
        return _train(config, text, cf, out_dir, name, resume, item_labels, inputs, ctx)


def _fit_rqkmeans(config: TokenizerConfig, text: np.ndarray, out_dir: str, name: str, item_labels, inputs: dict,
                  ctx: DistContext) -> dict:
    """Residual k-means codebooks (no training, so nothing to resume: a rerun refits identically)."""
    runs.mark_started(out_dir, T.kind)
    _start_fresh(out_dir)
    model = fit_rqkmeans(text, config.codebook_sizes, iters=config.kmeans_iters, standardize=config.standardize,
                         pca_dim=config.pca_dim or None, seed=config.seed, device=ctx.device)
    tok = Tokenizer(model.cpu(), config, name)
    codes_raw, z = tok.raw_codes(text)
    codes, resolution = tok.resolve(codes_raw, z)
    timings = {"kmeans_init_s": model.fit_stats["seconds"], "cluster_refresh_s": [], "epoch_s": []}
    report = build_report(tok, text, None, codes_raw, codes, z, resolution, [],
                          {"epoch": 0, "collision": resolution["collision_before"]}, model.fit_stats["init_stats"],
                          timings, item_labels)
    _write_outputs(out_dir, tok, codes, report, [], None, inputs)
    return report


def _start_fresh(out_dir: str) -> None:
    """A new run in a folder of an unfinished one (prepare_run_folder already removed any manifest):
    drop the earlier outputs, so an interrupted new run never sits beside the old model and codes
    (the earlier index file whatever dataset name it had)."""
    paths = [os.path.join(out_dir, file) for file in OUTPUTS + (CHECKPOINT,)]
    for path in paths + runs.files_matching(out_dir, T.index_json("*")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


class TokenizerTrainable(Trainable):
    """The RQ-VAE tokenizer as `fit` trains it: k-means codebook initialisation on a fresh run,
    diversity clusters refreshed every `cluster_every` epochs, model selection on the lowest
    collision rate of the evaluated epochs in the selection window."""

    def __init__(self, config: TokenizerConfig, text: np.ndarray, cf: np.ndarray | None, ctx: DistContext,
                 rng: RandomStreams):
        dev = ctx.device
        self.config, self.ctx = config, ctx
        # `codes` draws k-means seeds and diversity positives on the run's device; the batch order has
        # its own CPU stream: under torchrun every process must draw the same permutation, while the
        # positives depend on each process's share of the batch.
        self.gen = rng.generator("codes", config.seed)
        self.order_gen = rng.generator("order", config.seed + 1, device="cpu")
        # An in-memory matrix goes to the device once; a memory-mapped one stays on disk and each step
        # reads its batch's rows (row_tensor), so a catalog larger than memory streams.
        self.x = text if isinstance(text, np.memmap) else torch.from_numpy(text).to(dev)
        # an in-memory matrix is also standardized once (after the scaling is fitted or restored):
        # the values the model would compute per batch, without that work in every step
        self.xs: torch.Tensor | None = None
        self.h = torch.from_numpy(cf).to(dev) if cf is not None else None
        # a projection only where the collaborative term trains it (an untrained one aligns nothing)
        self.needs_proj = cf is not None and config.alpha > 0 and cf.shape[1] != config.e_dim
        self.model = self.step_module = RQVAE(text.shape[1], config, cf_dim=cf.shape[1] if self.needs_proj else None).to(dev)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.timings = {"kmeans_init_s": 0.0, "cluster_refresh_s": [], "epoch_s": [], "eval_s": [], "checkpoint_s": []}
        self.labels: list[torch.Tensor] | None = None
        self.init_stats: list[dict] = []
        self.best_state: dict | None = None

    def parameters(self) -> list:
        return list(self.model.parameters())

    def initialize(self) -> None:
        if self.config.standardize:
            self.model.fit_input_scaling(self.x)
        t0 = time.perf_counter()
        self.init_stats = _init_codebooks(self.model, self.x, self.config, self.gen)
        self.timings["kmeans_init_s"] = time.perf_counter() - t0

    def start_epoch(self, epoch: int) -> None:
        config = self.config
        self.epoch_started = time.perf_counter()
        if config.beta > 0 and (self.labels is None or (epoch - 1) % config.cluster_every == 0):
            t0 = time.perf_counter()
            self.labels = _refresh_clusters(self.model, config, self.gen)
            self.timings["cluster_refresh_s"].append(time.perf_counter() - t0)
        if self.xs is None and isinstance(self.x, torch.Tensor):
            self.xs = self.model.standardize(self.x) if config.standardize else self.x
        self.model.train()

    def batches(self, epoch: int):
        # a tail too short to give every process a row is skipped (the same on every rank)
        return [b for b in batch_order(len(self.x), self.config.batch_size, self.order_gen) if len(b) >= self.ctx.world]

    def step(self, batch):
        idx, dev = shard(batch, self.ctx), self.ctx.device
        x, standardized = self._inputs()
        terms = _batch_losses(self.model, self.config, row_tensor(x, idx, dev),
                              None if self.h is None else self.h[idx.to(dev)], self.labels, self.gen,
                              BatchShare(len(batch), self.ctx), standardized=standardized)
        return terms["loss"], terms

    def _inputs(self):
        """(the rows the model reads, whether they are standardized already): the once-standardized
        matrix when in memory, else the memory-mapped raw rows (standardized per batch)."""
        if self.xs is not None:
            return self.xs, self.config.standardize
        return self.x, False

    def epoch_record(self, epoch: int, sums: dict[str, float], steps: int) -> dict:
        totals = [sums.get(k, 0.0) for k in LOSS_TERMS]  # each rank holds its weighted share of every term
        if not math.isfinite(totals[0]):  # checked once per epoch, on every rank alike
            raise LetterError(f"training diverged: the loss is {totals[0]} in epoch {epoch}; lower lr")
        return {k: v / self.ctx.world / max(steps, 1) for k, v in zip(LOSS_TERMS, totals)}

    def validate(self, epoch: int, record: dict, select: bool) -> Validation | None:
        validation = None
        if select:
            t0 = time.perf_counter()
            x, standardized = self._inputs()
            codes, _ = encode_all(self.model, x, standardized=standardized)
            rate = collision_rate(codes)
            used = [int(len(np.unique(codes[:, level]))) for level in range(self.config.levels)]
            validation = Validation({"collision": rate, "used": used}, -rate)
            self.timings["eval_s"].append(time.perf_counter() - t0)
        self.timings["epoch_s"].append(time.perf_counter() - self.epoch_started)
        return validation

    def keep_best(self, epoch: int, validation: Validation) -> None:
        self.best_state = _state_copy(self.model)

    def extra_state(self) -> dict:
        return {"labels": self.labels, "best_state": self.best_state, "init_stats": self.init_stats,
                "timings": self.timings}

    def load_extra_state(self, state: dict) -> None:
        self.labels = None if state["labels"] is None else [lab.to(self.ctx.device) for lab in state["labels"]]
        self.best_state, self.init_stats, self.timings = state["best_state"], state["init_stats"], state["timings"]

    def checkpointed(self, run: FitRun, seconds: float) -> None:
        self.timings["checkpoint_s"].append(seconds)


LOSS_TERMS = ("loss", "recon", "quant", "cf", "div")


def _train(config: TokenizerConfig, text: np.ndarray, cf: np.ndarray | None, out_dir: str, name: str, resume: bool,
           item_labels, inputs: dict, ctx: DistContext) -> dict:
    runs.mark_started(out_dir, T.kind)
    if not resume and ctx.main:
        _start_fresh(out_dir)
    ctx.barrier()
    seed_everything(config.seed)
    rng = RandomStreams(ctx.device)
    trainable = TokenizerTrainable(config, text, cf, ctx, rng)
    plan = FitPlan(epochs=config.epochs, checkpoint=os.path.join(out_dir, CHECKPOINT), resume=resume,
                   identity={**config.to_dict(), **{f"inputs.{k}": v for k, v in inputs.items()}},
                   may_change=set(config.to_dict()) - set(config.fixed_on_resume()),
                   validate_every=validation_epochs(config.eval_every, config.epochs),
                   select_from=math.ceil(config.best_from * config.epochs), checkpoint_every=config.checkpoint_every)
    run = fit(trainable, plan, ctx, rng)
    if not ctx.main:
        return {}
    trainable.model.load_state_dict(trainable.best_state)
    tok = Tokenizer(trainable.model.cpu(), config, name)
    codes_raw, z = tok.raw_codes(text)
    codes, resolution = tok.resolve(codes_raw, z)
    best = {"collision": -run.stopping.best, "epoch": run.stopping.best_epoch}
    report = build_report(tok, text, cf, codes_raw, codes, z, resolution, run.history, best, trainable.init_stats,
                          trainable.timings, item_labels)
    _write_outputs(out_dir, tok, codes, report, run.history, cf.shape[1] if trainable.needs_proj else None, inputs)
    return report


def _write_outputs(out_dir: str, tok: "Tokenizer", codes: np.ndarray, report: dict, history: list, cf_dim,
                   inputs: dict) -> None:
    """Every file is written atomically; the manifest (with the inputs' hashes) goes last."""
    extra = {"rqkmeans": tok.model.hparams} if tok.config.method == "rqkmeans" else {}
    torch_save(os.path.join(out_dir, T.MODEL), {
        "config": tok.config.to_dict(), "name": tok.name, "in_dim": tok.model.in_dim, "cf_dim": cf_dim,
        "model": tok.model.state_dict(), **extra,
    })
    save_npy(os.path.join(out_dir, T.CODES), codes.astype(np.int64))
    write_index_json(os.path.join(out_dir, T.index_json(tok.name)), codes)
    write_json(os.path.join(out_dir, T.CONFIG), tok.config.to_dict())
    report["prefix_index"] = _save_prefix_index(out_dir, codes, tok.config.codebook_sizes)
    with atomic_path(os.path.join(out_dir, T.CURVES)) as tmp:
        report["curves_png"] = plot_curves(history, tmp)
    if not report["curves_png"]:
        os.remove(os.path.join(out_dir, T.CURVES))
    with atomic_path(os.path.join(out_dir, T.REPORT_MD)) as tmp, open(tmp, "w") as f:
        f.write(report_markdown(report))
    write_json(os.path.join(out_dir, T.REPORT), report)
    runs.write_manifest(out_dir, T.kind, [T.MODEL, T.CODES, T.index_json(tok.name), T.CONFIG, T.PREFIX_INDEX, T.CURVES,
                                          T.REPORT_MD, T.REPORT], inputs)


def _save_prefix_index(out_dir: str, codes: np.ndarray, sizes: list[int]) -> str:
    """Save the decoding prefix index next to the codes when letter.decoding is installed."""
    try:
        from letter.decoding import PrefixIndex
    except ImportError:
        return "skipped: letter.decoding not available"
    path = os.path.join(out_dir, T.PREFIX_INDEX)
    PrefixIndex.from_codes(torch.from_numpy(codes), sizes).save(path)
    return os.path.basename(path)


def _state_copy(model: RQVAE) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict (what copy.deepcopy gave, without its overhead)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batch_losses(model: RQVAE, config: TokenizerConfig, x: torch.Tensor, h: torch.Tensor | None,
                  labels: list[torch.Tensor] | None, gen: torch.Generator, share: BatchShare,
                  standardized: bool = False) -> dict[str, torch.Tensor]:
    """One training batch's loss and its terms (the terms with weight 0 are not computed: 0).

    x and h hold this rank's rows of the global batch (x already standardized when `standardized`);
    terms are weighted so that averaging the gradients over ranks gives the one-process loss of the
    whole batch."""
    out = model(x, sinkhorn=True, share=share if share.ctx.world > 1 else None, standardized=standardized)
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
