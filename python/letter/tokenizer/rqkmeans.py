"""RQ-KMeans: residual k-means item tokenization, a training-free baseline tokenizer.

Level 1 clusters the (optionally standardized and PCA-reduced) text embeddings with k-means
(k-means++ seeding, Lloyd steps whose assignment is letter_ext.residual_quantize); each item's
residual after subtracting its level-1 center is clustered for level 2, and so on. Codes are then
the plain residual nearest-code search over the fitted codebooks, exactly like RQVAE.encode, so
the RQ-VAE tokenizer's collision rules (Tokenizer.resolve: Sinkhorn re-assignment, `unique`) and
cold start (Tokenizer.encode) apply unchanged:

    model = fit_rqkmeans(text, [256, 256, 256], iters=100, standardize=True, pca_dim=64, seed=42)
    tok = Tokenizer(model, TokenizerConfig(codebook_sizes=[256, 256, 256], unique=True), "Scientific")
    codes_raw, z = tok.raw_codes(text)
    codes, info = tok.resolve(codes_raw, z)

The module mirrors RQVAE's interface: standardize(x) -> encoder(.) -> z; decoder(quantized)
maps back to the standardized input space (the PCA reconstruction), so the report's
reconstruction MSE is the error of the whole pipeline.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from letter.errors import LetterError
from letter.devices import resolve_device

from .clustering import inertia, kmeans, nearest
from .model import assign_codes


def check_pca_dim(in_dim: int, pca_dim: int | None) -> None:
    """LetterError naming pca_dim unless it is None (no PCA) or in [1, in_dim]."""
    if pca_dim is not None and not 1 <= pca_dim <= in_dim:
        raise LetterError(f"rqkmeans: pca_dim must be in [1, {in_dim}] (the input dim), got {pca_dim}", "pca_dim")


class RQKMeans(nn.Module):
    """Preprocessing buffers + L fixed codebooks; `encode(x) -> (codes [B, L], z [B, d])`.

    Buffers: x_mean [in_dim] and x_scale [] (x' = (x - x_mean) / x_scale; zeros/one when unused),
    components [in_dim, pca_dim] (the PCA projection; absent without PCA). Codebooks are
    parameters without gradient (nn.ParameterList), one [N_l, d] per level.
    """

    def __init__(self, in_dim: int, codebook_sizes: list[int], *, standardize: bool = False,
                 pca_dim: int | None = None):
        super().__init__()
        if in_dim < 1:
            raise LetterError(f"rqkmeans: in_dim must be >= 1, got {in_dim}")
        if not codebook_sizes or any(int(n) < 1 for n in codebook_sizes):
            raise LetterError(f"rqkmeans: codebook sizes must be >= 1, got {codebook_sizes}")
        check_pca_dim(in_dim, pca_dim)
        self.in_dim = int(in_dim)
        self.codebook_sizes = [int(n) for n in codebook_sizes]
        self.standardize_inputs = bool(standardize)
        self.pca_dim = None if pca_dim is None else int(pca_dim)
        self.e_dim = self.pca_dim or self.in_dim
        self.register_buffer("x_mean", torch.zeros(self.in_dim))
        self.register_buffer("x_scale", torch.ones(()))
        self.register_buffer("components", torch.zeros(self.in_dim, self.pca_dim) if self.pca_dim else None)
        self.codebooks = nn.ParameterList(
            nn.Parameter(torch.zeros(n, self.e_dim), requires_grad=False) for n in self.codebook_sizes
        )
        self.fit_stats: dict = {}  # filled by fit_rqkmeans (not part of the state dict)

    @property
    def hparams(self) -> dict:
        """Constructor arguments: RQKMeans(**hparams) then load_state_dict(state) rebuilds the model."""
        return {"in_dim": self.in_dim, "codebook_sizes": list(self.codebook_sizes),
                "standardize": self.standardize_inputs, "pca_dim": self.pca_dim}

    @classmethod
    def from_state(cls, hparams: dict, state_dict: dict) -> "RQKMeans":
        model = cls(**hparams)
        model.load_state_dict(state_dict)
        return model.eval()

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_scale

    def encoder(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized inputs -> latent z (the PCA projection, or the identity)."""
        return x @ self.components if self.components is not None else x

    def decoder(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> standardized input space (the PCA reconstruction, or the identity)."""
        return z @ self.components.T if self.components is not None else z

    @torch.no_grad()
    def encode(self, x: torch.Tensor, standardized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes by residual nearest-code search -> (codes [B, L], latent z [B, d]); as RQVAE.encode."""
        x = x.to(self.x_mean.dtype)
        z = self.encoder(x if standardized else self.standardize(x))
        return assign_codes(z, list(self.codebooks))[0], z

    @torch.no_grad()
    def fit_preprocessing(self, x: torch.Tensor) -> dict:
        """Set x_mean / x_scale / components from x [n, in_dim]; returns PCA statistics."""
        stats: dict = {}
        if self.standardize_inputs or self.pca_dim:
            self.x_mean.copy_(x.mean(0))
        if self.standardize_inputs:
            # One global factor (geometry kept), as RQVAE.fit_input_scaling.
            self.x_scale.copy_(((x - self.x_mean) ** 2).mean().sqrt().clamp(min=1e-12))
        if self.pca_dim:
            xc = self.standardize(x).double()
            cov = xc.T @ xc / max(len(xc) - 1, 1)
            values, vectors = torch.linalg.eigh(cov)  # ascending
            values, vectors = values.flip(0), vectors.flip(1)
            top = vectors[:, : self.pca_dim]
            # Fix each component's sign (largest-magnitude entry positive): eigh's sign is arbitrary.
            pivot = top.abs().argmax(0)
            signs = torch.sign(top[pivot, torch.arange(self.pca_dim, device=top.device)])
            top = top * torch.where(signs == 0, torch.ones_like(signs), signs)
            self.components.copy_(top.to(self.components.dtype))
            total = float(values.clamp(min=0).sum())
            stats["pca_explained_variance"] = float(values[: self.pca_dim].clamp(min=0).sum()) / total if total else 1.0
        return stats


def fit_rqkmeans(
    text: np.ndarray,
    codebook_sizes: list[int],
    *,
    iters: int = 100,
    standardize: bool = False,
    pca_dim: int | None = None,
    seed: int = 42,
    device: str | None = "cpu",
) -> RQKMeans:
    """Fit RQ-KMeans on item text embeddings [I, dim]; returns the model (on `device`, eval mode).

    Level l runs k-means (k-means++ seeding, up to `iters` Lloyd steps) with N_l centers on the
    residuals left by levels < l; the residual passed on is the one of the nearest center (what
    `encode` assigns), so fitting and encoding agree. One torch.Generator seeded with `seed`, on
    the data's device, drives every level: same seed and input -> identical codebooks.
    model.fit_stats holds per-level inertia ("init_stats", the shape build_report reads), the
    seconds taken and the PCA explained variance.
    """
    arr = np.asarray(text)
    if arr.ndim != 2 or 0 in arr.shape:
        raise LetterError(f"rqkmeans: expected a [num_items, dim] embedding matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise LetterError("rqkmeans: the embeddings contain NaN/inf")
    if iters < 0:
        raise LetterError(f"rqkmeans: iters must be >= 0, got {iters}")
    dev = resolve_device(device)
    # k-means passes over every row many times: the matrix is held in memory (a copy, as a
    # memory-mapped input is read-only)
    x = torch.from_numpy(np.array(arr, dtype=np.float32)).to(dev)
    model = RQKMeans(x.shape[1], list(codebook_sizes), standardize=standardize, pca_dim=pca_dim).to(dev)
    started = time.perf_counter()
    stats = model.fit_preprocessing(x)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    with torch.no_grad():
        r = model.encoder(model.standardize(x))
        init_stats = []
        for cb in model.codebooks:
            centers, _ = kmeans(r, cb.shape[0], iters, gen)
            cb.copy_(centers)
            labels = nearest(r, centers)
            init_stats.append({"inertia": inertia(r, centers, labels)})
            r = r - centers[labels]
    model.fit_stats = {"init_stats": init_stats, "seconds": time.perf_counter() - started, **stats}
    return model.eval()
