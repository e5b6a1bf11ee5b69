"""A trained tokenizer as an object: load a run folder, turn item embeddings into identifiers with
the run's collision rules (cold start: the catalog's identifiers count as taken)."""
import os

import numpy as np
import torch

from letter.errors import LetterError
from letter.runs import TokenizerRun, check_manifest, load_npy
from letter.training import load_checkpoint

from .codes import collision_rate, make_unique, sinkhorn_resolve
from .config import TokenizerConfig
from .model import ROW_CHUNK, RQVAE, row_tensor
from .rqkmeans import RQKMeans



def check_embeddings(name: str, emb, num_items: int | None = None) -> np.ndarray:
    """A float32 [I, dim] matrix of `emb`, or LetterError naming the problem (shape, NaN rows).

    A float32 memory-mapped matrix (np.load(..., mmap_mode=...)) is checked a chunk of rows at a
    time and returned as it is: the tokenizer then streams it and never holds it whole. Anything
    else is copied to a float32 array."""
    arr = emb if isinstance(emb, np.memmap) else np.asarray(emb)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise LetterError(f"{name}: expected a [num_items, dim] matrix, got shape {arr.shape}")
    # complex is a number too, but the float32 copy would drop its imaginary parts
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise LetterError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    if num_items is not None and arr.shape[0] != num_items:
        raise LetterError(f"{name}: has {arr.shape[0]} rows but the dataset has {num_items} items")
    # checked as float32, the dtype the tokenizer computes in: a float64 beyond its range becomes inf
    # (reported below as such, not as numpy's overflow warning)
    with np.errstate(over="ignore"):
        bad = np.concatenate([start + np.flatnonzero(~np.isfinite(np.asarray(arr[start : start + ROW_CHUNK], np.float32)).all(1))
                              for start in range(0, len(arr), ROW_CHUNK)])
    if len(bad):
        raise LetterError(f"{name}: {len(bad)} row(s) contain NaN/inf (as float32), e.g. item(s) {bad[:5].tolist()}")
    if isinstance(arr, np.memmap) and arr.dtype == np.float32:
        return arr
    return arr.astype(np.float32, copy=True)


def encode_all(model: RQVAE, x, batch: int = 8192,
               standardized: bool = False) -> tuple[np.ndarray, torch.Tensor]:
    """Eval-mode codes [I, L] (numpy) and latents [I, d] (CPU) of all rows of x (a tensor or a numpy
    matrix, streamed a chunk at a time), in chunks (x already standardized when `standardized`)."""
    model.eval()
    device = model.codebooks[0].device
    codes, zs = [], []
    for i in range(0, len(x), batch):
        c, z = model.encode(row_tensor(x, slice(i, i + batch), device), standardized=standardized)
        codes.append(c.cpu())
        zs.append(z.cpu())
    return torch.cat(codes).numpy(), torch.cat(zs)


class Tokenizer:
    """A trained tokenizer: the RQ-VAE plus the rules that turn embeddings into identifiers."""

    def __init__(self, model: RQVAE, config: TokenizerConfig, name: str, catalog_codes: np.ndarray | None = None):
        self.model = model.eval()
        self.config = config
        self.name = name
        self.catalog_codes = catalog_codes  # the run's codes.npy; fixed when cold-start items are resolved

    @property
    def codebooks(self) -> list[torch.Tensor]:
        return [cb.detach() for cb in self.model.codebooks]

    def raw_codes(self, emb: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Plain argmin codes [I, L] and latents z [I, e_dim], no collision handling."""
        return encode_all(self.model, emb)

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
        collision rules applied to the new items only (the catalog's codes never move). With
        config.unique the catalog's identifiers count as taken; without it a new item may share one."""
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


def check_tokenizer_run(run_dir: str, what: str = "tokenizer") -> dict:
    """The manifest of a finished tokenizer run whose files are the ones it wrote, else LetterError
    (naming the run folder by the argument `what`, see input_error)."""
    return check_manifest(run_dir, TokenizerRun.kind, what)


def _model_record(run_dir: str, mmap: bool = False) -> tuple[str, dict]:
    """(path, contents) of the model.pt of a finished tokenizer run folder (checked)."""
    path = os.path.join(run_dir, TokenizerRun.MODEL)
    blob = load_checkpoint(path, mmap=mmap) if os.path.isfile(path) else None  # a corrupt file is named as such first
    check_tokenizer_run(run_dir)
    return path, blob if blob is not None else load_checkpoint(path, mmap=mmap)


def tokenizer_input_dim(run_dir: str) -> int:
    """The embedding width a finished tokenizer run encodes (its model.pt's in_dim), read with the
    weights memory-mapped, not read or built (what a server sizes its POST /items limit by)."""
    path, blob = _model_record(run_dir, mmap=True)
    in_dim = blob.get("in_dim")
    if isinstance(in_dim, bool) or not isinstance(in_dim, int):
        raise LetterError(f"{path}: not a tokenizer model file (no integer in_dim)")
    return in_dim


def load_tokenizer(run_dir: str) -> Tokenizer:
    """Load a finished run folder written by train_tokenizer (model.pt + codes.npy)."""
    path, blob = _model_record(run_dir)
    try:
        config = TokenizerConfig.from_dict(blob["config"])
        if config.method == "rqkmeans":
            model = RQKMeans.from_state(blob["rqkmeans"], blob["model"])
        else:
            model = RQVAE(blob["in_dim"], config, cf_dim=blob["cf_dim"])
            model.load_state_dict(blob["model"])
        name = blob["name"]
    except (KeyError, RuntimeError, TypeError) as e:
        raise LetterError(f"{path}: not a tokenizer model file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return Tokenizer(model, config, name, load_npy(os.path.join(run_dir, TokenizerRun.CODES)))


def encode(run_dir: str, emb) -> np.ndarray:
    """Cold start: codes [n, L] for unseen items' text embeddings with a trained run's rules."""
    return load_tokenizer(run_dir).encode(emb)

