"""The RQ-VAE of LETTER and its loss terms.

Forward (training): z = encoder(x); codes by residual nearest-code search (letter_ext
residual_quantize; optionally Sinkhorn-balanced on the last level); e_l = C_l[c_l];
z_hat = z + sg(sum_l e_l - z) (straight-through estimator); recon = decoder(z_hat).
Loss = MSE(recon, x) + mean_l [ ||sg(r_l) - e_l||^2 + mu ||r_l - sg(e_l)||^2 ]
       + alpha * InfoNCE(z_hat, h) + beta * mean_l L_div,l
with r_l = z - sg(sum_{k<l} e_k): the commitment term of every level pulls the encoder, never an
earlier level's codebook (squared norms are means over elements, as the authors' F.mse_loss).
"""
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import letter_ext

from letter.training import BatchShare, check_not_diverged

from .clustering import sinkhorn_assign
from .config import TokenizerConfig


def mlp(dims: list[int], dropout: float, batch_norm: bool) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last), Xavier-normal init."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if dropout > 0:
            mods.append(nn.Dropout(dropout))
        lin = nn.Linear(a, b)
        nn.init.xavier_normal_(lin.weight)
        nn.init.zeros_(lin.bias)
        mods.append(lin)
        if i < len(dims) - 2:
            if batch_norm:
                mods.append(nn.BatchNorm1d(b))
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def assign_codes(z: torch.Tensor, codebooks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual nearest-code search -> (codes [B, L], residuals r_0..r_{L-1} [B, L, d]), no grad.

    Equal-sized levels go through one fused residual_quantize call; mixed sizes level by level.
    """
    z = z.detach()
    with torch.no_grad():
        if len({c.shape[0] for c in codebooks}) == 1:
            codes, _, residuals = letter_ext.residual_quantize(
                z, torch.stack([c.detach() for c in codebooks]), return_residuals=True
            )
            return codes, residuals
        codes, residuals, r = [], [], z
        for cb in codebooks:
            c, q = letter_ext.residual_quantize(r, cb.detach().unsqueeze(0))
            codes.append(c[:, 0])
            residuals.append(r)
            r = r - q
        return torch.stack(codes, 1), torch.stack(residuals, 1)


ROW_CHUNK = 16384  # rows read, checked or encoded at a time when streaming an embedding matrix


def row_tensor(x, rows, device=None) -> torch.Tensor:
    """Rows of an embedding matrix (numpy, memory-mapped or not, or a tensor) as a float32 tensor on
    `device`; `rows` a slice or an index array/tensor. A numpy matrix is read only at those rows."""
    if isinstance(x, torch.Tensor):
        return x[rows].to(device)
    if isinstance(rows, torch.Tensor):
        rows = rows.cpu().numpy()
    return torch.from_numpy(np.array(x[rows], dtype=np.float32)).to(device)


class RQVAE(nn.Module):
    """MLP encoder -> residual quantizer (L codebooks) -> MLP decoder."""

    def __init__(self, in_dim: int, config: TokenizerConfig, cf_dim: int | None = None):
        super().__init__()
        self.config = config
        self.in_dim = in_dim
        dims = [in_dim] + list(config.layers) + [config.e_dim]
        self.encoder = mlp(dims, config.dropout, config.batch_norm)
        self.decoder = mlp(dims[::-1], config.dropout, config.batch_norm)
        # Zero until k-means init; the authors' non-k-means init is uniform(-1/N, 1/N).
        self.codebooks = nn.ParameterList(
            nn.Parameter(torch.empty(n, config.e_dim).uniform_(-1.0 / n, 1.0 / n)) for n in config.codebook_sizes
        )
        self.cf_proj = nn.Linear(config.e_dim, cf_dim, bias=False) if cf_dim is not None else None
        # Input standardization x' = (x - mean) / scale (set by fit_input_scaling); identity until then.
        self.register_buffer("x_mean", torch.zeros(in_dim))
        self.register_buffer("x_scale", torch.ones(()))

    @torch.no_grad()
    def fit_input_scaling(self, x: torch.Tensor) -> None:
        """Center the inputs and give them unit mean squared value with one global scale (geometry
        kept). Unit-norm sentence embeddings otherwise have a reconstruction MSE ~1/dim, so small
        that the alpha-weighted InfoNCE term swamps it. `x`: a tensor or a numpy matrix (read a
        chunk of rows at a time, so a memory-mapped one is never loaded whole)."""
        chunks = range(0, len(x), ROW_CHUNK)  # a numpy (memory-mapped) x is read a chunk at a time
        total = sum(row_tensor(x, slice(i, i + ROW_CHUNK), self.x_mean.device).double().sum(0) for i in chunks)
        self.x_mean.copy_(total / len(x))
        squares = sum(((row_tensor(x, slice(i, i + ROW_CHUNK), self.x_mean.device) - self.x_mean).double() ** 2).sum()
                      for i in chunks)
        self.x_scale.copy_((squares / (len(x) * x.shape[1])).sqrt().clamp(min=1e-12))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.x_mean) / self.x_scale

    def quantize(self, z: torch.Tensor, sinkhorn: bool = False, share: BatchShare | None = None):
        """-> codes [B, L], selected code vectors e [B, L, d] (grad to codebooks), residuals r [B, L, d]
        (grad to z only), z_hat [B, d] (straight-through: value sum_l e_l, gradient to z).
        `share`: z holds one rank's rows of a global batch; Sinkhorn balances the whole batch.
        Raises LetterError when z or a codebook holds NaN/inf (training diverged inside an epoch), with
        `share` on every rank when any rank's do."""
        # not residual_quantize's ValueError; the ranks sharing a batch all raise
        check_not_diverged("the latents or codebooks", z, *self.codebooks, ctx=share.ctx if share is not None else None)
        codes, assigned_residuals = assign_codes(z, list(self.codebooks))
        if sinkhorn and self.config.sinkhorn_epsilon > 0:
            # Balanced re-assignment of the last level within the batch (the authors' training rule).
            dist = torch.cdist(assigned_residuals[:, -1], self.codebooks[-1].detach()) ** 2
            if share is not None:
                dist = share.gather(dist)
            if dist.shape[0] > 1:  # one row has nothing to balance (its Sinkhorn is uniform: code 0)
                last = sinkhorn_assign(dist, self.config.sinkhorn_epsilon, self.config.sinkhorn_iters)
                codes[:, -1] = last if share is None else last[share.positions]
        e = torch.stack([cb[codes[:, l]] for l, cb in enumerate(self.codebooks)], 1)
        before = torch.cumsum(e.detach(), 1) - e.detach()  # sum_{k<l} e_k
        residuals = z.unsqueeze(1) - before
        quantized = e.sum(1)
        z_hat = z + (quantized - z).detach()
        return codes, e, residuals, z_hat

    def forward(self, x: torch.Tensor, sinkhorn: bool = False, share: BatchShare | None = None,
                standardized: bool = False) -> dict:
        """x: raw embeddings (already standardized when `standardized`); "target" is the standardized
        input that "recon" reconstructs."""
        target = x if standardized else self.standardize(x)
        z = self.encoder(target)
        codes, e, residuals, z_hat = self.quantize(z, sinkhorn=sinkhorn, share=share)
        return {"target": target, "z": z, "codes": codes, "e": e, "residuals": residuals, "z_hat": z_hat,
                "recon": self.decoder(z_hat)}

    @torch.no_grad()
    def encode(self, x: torch.Tensor, standardized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode codes by plain argmin (no Sinkhorn) -> (codes [B, L], latent z [B, d])."""
        z = self.encoder(x if standardized else self.standardize(x))
        return assign_codes(z, list(self.codebooks))[0], z


def quantization_loss(e: torch.Tensor, residuals: torch.Tensor, mu: float) -> torch.Tensor:
    """mean_l [ ||sg(r_l) - e_l||^2 + mu ||r_l - sg(e_l)||^2 ] (squared norms as element means)."""
    codebook = F.mse_loss(e, residuals.detach())
    commitment = F.mse_loss(residuals, e.detach())
    return codebook + mu * commitment


def collaborative_loss(z_hat: torch.Tensor, cf: torch.Tensor, temperature: float,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE between quantized item vectors and their CF embeddings, in-batch negatives.
    `positions`: z_hat holds these rows of the batch whose CF embeddings are `cf` (one rank's share)."""
    if positions is None:
        return letter_ext.info_nce(z_hat, cf, temperature=temperature)
    return letter_ext.dot_product_cross_entropy(z_hat, cf, positions, temperature=temperature)


def sample_positives(codes: torch.Tensor, labels: torch.Tensor, u: torch.Tensor):
    """For each selected code, a different code of the same codebook cluster, uniformly.

    codes [B] (selected code ids), labels [N] (cluster of each code), u [B] uniform draws in [0, 1).
    Returns (positives [B], valid [B] bool); rows whose code is alone in its cluster have no
    positive (valid False).
    """
    n = labels.numel()
    order = torch.argsort(labels * n + torch.arange(n, device=labels.device))  # members grouped by cluster
    sizes = torch.bincount(labels)
    starts = torch.cumsum(sizes, 0) - sizes
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(n, device=labels.device) - starts[labels[order]]
    cluster = labels[codes]
    size = sizes[cluster]
    valid = size > 1
    # Draw among the size-1 others: j uniform in [0, size-1), skipping the code's own rank.
    j = (u * (size - 1).clamp(min=1)).long()
    j = j + (j >= rank_of[codes]).long()
    j = torch.minimum(j, size - 1)
    return order[starts[cluster] + j], valid


def diversity_loss(
    e: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    labels: torch.Tensor,
    u: torch.Tensor,
    temperature: float,
    share: BatchShare | None = None,
) -> torch.Tensor:
    """One level's code-assignment diversity loss: each selected code e_c against the level's whole
    codebook (c itself excluded), target = a code sampled from c's cluster with the uniform draws u.
    The mean is over rows whose code has a positive; with `share` (one rank's rows) it is weighted
    to be this rank's part of the mean over all ranks' such rows."""
    positives, valid = sample_positives(codes, labels, u)
    if not bool(valid.all()):
        e, codes, positives = e[valid], codes[valid], positives[valid]
    weight = 1.0 if share is None else share.weight(e.shape[0], share.total(e.shape[0]))
    if e.shape[0] == 0:
        return codebook.sum() * 0.0
    return letter_ext.codebook_diversity_loss(e, codebook, positives, codes, temperature=temperature) * weight
