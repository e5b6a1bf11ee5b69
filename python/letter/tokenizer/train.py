"""Training the LETTER tokenizer and writing its run folder; loading it back for cold start."""
import copy
import json
import math
import os
import time

import numpy as np
import torch

from letter.data import write_index_json
from letter.errors import LetterError
from letter.utils import atomic_path, pick_device, progress, save_npy, set_seed, torch_save, write_json

from .clustering import diversity_capacity, inertia, kmeans
from .codes import collision_rate, level_stats, make_unique, sinkhorn_resolve
from .config import TokenizerConfig
from .model import RQVAE, collaborative_loss, diversity_loss, quantization_loss
from .report import build_report, plot_curves, report_markdown

CHECKPOINT = "checkpoint.pt"  # resumable training state (latest)
MODEL = "model.pt"  # the best-collision weights + config, what load_tokenizer reads


def check_embeddings(name: str, emb, num_items: int | None = None) -> np.ndarray:
    """A float32 [I, dim] copy of `emb`, or LetterError naming the problem (shape, NaN rows)."""
    arr = np.asarray(emb)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise LetterError(f"{name}: expected a [num_items, dim] matrix, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise LetterError(f"{name}: expected numbers, got dtype {arr.dtype}")
    if num_items is not None and arr.shape[0] != num_items:
        raise LetterError(f"{name}: has {arr.shape[0]} rows but the dataset has {num_items} items")
    bad = np.flatnonzero(~np.isfinite(arr).all(1))
    if len(bad):
        raise LetterError(f"{name}: {len(bad)} row(s) contain NaN/inf, e.g. item(s) {bad[:5].tolist()}")
    return arr.astype(np.float32, copy=True)


def _check_inputs(config: TokenizerConfig, text: np.ndarray, cf: np.ndarray | None) -> None:
    config.validate()
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


def _init_codebooks(model: RQVAE, x: torch.Tensor, config: TokenizerConfig, gen: torch.Generator) -> list[dict]:
    """k-means the encoder's initial outputs level by level into the codebooks; returns inertia per level."""
    model.eval()
    with torch.no_grad():
        r = model.encoder(model.standardize(x))
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


def _encode_all(model: RQVAE, x: torch.Tensor, batch: int = 8192) -> tuple[np.ndarray, torch.Tensor]:
    model.eval()
    codes, zs = [], []
    for i in range(0, len(x), batch):
        c, z = model.encode(x[i : i + batch])
        codes.append(c.cpu())
        zs.append(z.cpu())
    return torch.cat(codes).numpy(), torch.cat(zs)


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


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
    text = check_embeddings("text embeddings", text_emb, num_items)
    cf = None if cf_emb is None else check_embeddings("CF embeddings", cf_emb, num_items)
    _check_inputs(config, text, cf)
    rank, world = _distributed()
    dev = pick_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    state = None
    if resume:
        if not os.path.isfile(ckpt_path):
            raise LetterError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        # Only the epoch count may change on resume (to extend a finished run).
        if {**state["config"], "epochs": 0} != {**config.to_dict(), "epochs": 0}:
            raise LetterError(f"--resume: {ckpt_path} was trained with another config; rerun with the same settings")
        if state["epoch"] > config.epochs:
            raise LetterError(f"--resume: the checkpoint is at epoch {state['epoch']}, past --epochs {config.epochs}")

    set_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    # Batch order has its own stream: under torchrun every process must draw the same permutation,
    # while the positives drawn from `gen` depend on each process's share of the batch.
    order_gen = torch.Generator().manual_seed(config.seed + 1)
    x = torch.from_numpy(text).to(dev)
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
        best = {"collision": math.inf, "epoch": -1, "state": copy.deepcopy(model.state_dict())}
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        order_gen.set_state(state["order_generator"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch, labels = state["history"], state["epoch"], state["labels"]
        best, init_stats, timings = state["best"], state["init_stats"], state["timings"]
        if best["epoch"] < config.best_from * config.epochs and "collision" in history[-1]:
            # More epochs moved the selection window past the stored best: the checkpoint's own
            # state is the first candidate inside it.
            best = {"collision": history[-1]["collision"], "epoch": start_epoch, "state": copy.deepcopy(model.state_dict())}

    n = len(x)
    bar = progress(range(start_epoch, config.epochs), desc="train-tokenizer", initial=start_epoch, total=config.epochs,
                   disable=None if rank == 0 else True)
    for epoch in bar:
        t_epoch = time.perf_counter()
        if config.beta > 0 and (labels is None or epoch % config.cluster_every == 0):
            t0 = time.perf_counter()
            labels = _refresh_clusters(model, config, gen)
            timings["cluster_refresh_s"].append(time.perf_counter() - t0)
        model.train()
        perm = torch.randperm(n, generator=order_gen).to(dev)
        sums = dict.fromkeys(("loss", "recon", "quant", "cf", "div"), 0.0)
        steps = 0
        for start in range(0, n, config.batch_size):
            batch = perm[start : start + config.batch_size]
            if len(batch) < world:  # a tail too short to give every process a row (same on all ranks)
                continue
            idx = batch[rank::world]
            terms = _batch_losses(model, config, x[idx], None if h is None else h[idx], labels, gen)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise LetterError(f"training diverged: loss is {loss.item()} at epoch {epoch + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                _average_gradients(model, world)
            opt.step()
            for k, v in terms.items():
                sums[k] += v.item()
            steps += 1
        record = {"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in sums.items()}}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:  # the last epoch is always eligible
            codes, _ = _encode_all(model, x)
            record["collision"] = collision_rate(codes)
            record["used"] = [int(len(np.unique(codes[:, l]))) for l in range(config.levels)]
            eligible = epoch + 1 >= config.best_from * config.epochs
            if eligible and record["collision"] < best["collision"]:
                best = {"collision": record["collision"], "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
        timings["epoch_s"].append(time.perf_counter() - t_epoch)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", collision=f"{history_last(history, 'collision'):.4f}",
                        used1=history_last(history, "used", [0])[0])
        if rank == 0 and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs):
            torch_save(ckpt_path, {
                "config": config.to_dict(), "epoch": epoch + 1, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "generator": gen.get_state(), "order_generator": order_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "labels": labels, "history": history, "best": best, "init_stats": init_stats, "timings": timings,
            })
    bar.close()
    if rank != 0:
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
    torch_save(os.path.join(out_dir, MODEL), {
        "config": tok.config.to_dict(), "name": tok.name, "in_dim": tok.model.in_dim, "cf_dim": cf_dim,
        "model": tok.model.state_dict(),
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


def _save_prefix_index(out_dir: str, codes: np.ndarray, sizes: list[int]) -> str:
    """Save the decoding prefix index next to the codes when letter.decoding is installed."""
    try:
        from letter.decoding import PrefixIndex
    except ImportError:
        return "skipped: letter.decoding not available"
    path = os.path.join(out_dir, "prefix_index.pt")
    PrefixIndex.from_codes(torch.from_numpy(codes), sizes).save(path)
    return os.path.basename(path)


def _batch_losses(model: RQVAE, config: TokenizerConfig, x: torch.Tensor, h: torch.Tensor | None,
                  labels: list[torch.Tensor] | None, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One training batch's loss and its terms (the terms with weight 0 are not computed: 0)."""
    out = model(x, sinkhorn=True)
    zero = torch.zeros((), device=x.device)
    terms = {
        "recon": torch.nn.functional.mse_loss(out["recon"], out["target"]),
        "quant": quantization_loss(out["e"], out["residuals"], config.mu),
        "cf": zero,
        "div": zero,
    }
    if config.alpha > 0:
        z_hat = model.cf_proj(out["z_hat"]) if model.cf_proj is not None else out["z_hat"]
        terms["cf"] = collaborative_loss(z_hat, h, config.cf_temperature)
    if config.beta > 0:
        terms["div"] = torch.stack([
            diversity_loss(out["e"][:, l], out["codes"][:, l], cb, labels[l], gen, config.div_temperature)
            for l, cb in enumerate(model.codebooks)
        ]).mean()
    terms["loss"] = terms["recon"] + terms["quant"] + config.alpha * terms["cf"] + config.beta * terms["div"]
    return terms


def history_last(history: list[dict], key: str, default=math.nan):
    """The latest value of `key` among the epoch records (evaluation runs every eval_every epochs)."""
    for rec in reversed(history):
        if key in rec:
            return rec[key]
    return default


def _average_gradients(model: torch.nn.Module, world: int) -> None:
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


class Tokenizer:
    """A trained tokenizer: the RQ-VAE plus the rules that turn embeddings into identifiers."""

    def __init__(self, model: RQVAE, config: TokenizerConfig, name: str, catalog_codes: np.ndarray | None = None):
        self.model = model.eval()
        self.config = config
        self.name = name
        self.catalog_codes = catalog_codes  # the run's codes.npy; cold-start items must avoid them

    @property
    def codebooks(self) -> list[torch.Tensor]:
        return [cb.detach() for cb in self.model.codebooks]

    def raw_codes(self, emb: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Plain argmin codes [I, L] and latents z [I, e_dim], no collision handling."""
        return _encode_all(self.model, torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)))

    def resolve(self, codes: np.ndarray, z: torch.Tensor, movable: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """The authors' Sinkhorn re-assignment of colliding groups, then (config.unique) nearest-free-code moves."""
        info = {"collision_before": collision_rate(codes)}
        eps = self.config.sinkhorn_epsilon or 0.003  # the authors' re-assignment epsilon
        codes, rounds = sinkhorn_resolve(codes, z, self.codebooks, eps, self.config.sinkhorn_iters,
                                         self.config.collision_rounds, movable)
        info["sinkhorn_rounds"] = rounds
        info["collision_after_sinkhorn"] = collision_rate(codes)
        if self.config.unique:
            codes, moves = make_unique(codes, z, self.codebooks, movable)
            info["unique_moves"] = moves
            info["unique_method"] = ("colliding items moved to the nearest unused last-level code under their prefix "
                                     "(backing off to earlier levels only when that prefix is full)")
        info["collision_after"] = collision_rate(codes)
        return codes, info

    def encode(self, emb) -> np.ndarray:
        """Codes [n, L] for new (cold-start) items with the training run's rules: argmin, then the
        collision rules applied to the new items only, the catalog's identifiers counting as taken."""
        new = check_embeddings("embeddings", emb)
        if new.shape[1] != self.model.in_dim:
            raise LetterError(f"embeddings have dim {new.shape[1]} but the tokenizer was trained on dim {self.model.in_dim}")
        codes, z = self.raw_codes(new)
        if self.catalog_codes is None:
            return self.resolve(codes, z)[0]
        all_codes = np.concatenate([self.catalog_codes, codes])
        # Catalog latents are not needed: fixed items never move; give them zeros as placeholders.
        all_z = torch.cat([torch.zeros(len(self.catalog_codes), z.shape[1]), z])
        movable = np.r_[np.zeros(len(self.catalog_codes), bool), np.ones(len(codes), bool)]
        resolved, _ = self.resolve(all_codes, all_z, movable)
        return resolved[len(self.catalog_codes):]


def load_tokenizer(run_dir: str) -> Tokenizer:
    """Load a run folder written by train_tokenizer (model.pt + codes.npy)."""
    path = os.path.join(run_dir, MODEL)
    if not os.path.isfile(path):
        raise LetterError(f"{run_dir}: not a tokenizer run folder (no {MODEL})")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    config = TokenizerConfig.from_dict(blob["config"])
    model = RQVAE(blob["in_dim"], config, cf_dim=blob["cf_dim"])
    model.load_state_dict(blob["model"])
    codes_path = os.path.join(run_dir, "codes.npy")
    catalog = np.load(codes_path) if os.path.isfile(codes_path) else None
    return Tokenizer(model, config, blob["name"], catalog)


def encode(run_dir: str, emb) -> np.ndarray:
    """Cold start: codes [n, L] for unseen items' text embeddings with a trained run's rules."""
    return load_tokenizer(run_dir).encode(emb)

