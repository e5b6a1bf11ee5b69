"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over a user's item sequence."""
import math

import torch
from torch import nn

PAD = 0  # model ids: item i is i + 1, 0 pads


class SASRecBlock(nn.Module):
    """One block as in the SASRec paper: attention with the normalised sequence as query and a
    residual from it, then a point-wise feed-forward layer, both with dropout."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        a, _ = self.attn(q, x, x, attn_mask=blocked, need_weights=False)
        x = self.ffn_norm(q + a)
        return x + self.ffn(x)


class SASRec(nn.Module):
    def __init__(self, num_items: int, dim: int = 32, blocks: int = 2, heads: int = 2, dropout: float = 0.3,
                 max_len: int = 50):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.num_items, self.dim, self.heads, self.max_len = num_items, dim, heads, max_len
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(dim, heads, dropout) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(dim, eps=1e-8)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        # small init (as RecBole's SASRec): with N(0, 1) embeddings the first logits are huge
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, T] model ids (left-padded with 0, T <= max_len) -> hidden states [B, T, dim].

        Positions count from the end (the last column always gets the last position embedding), so
        leading all-pad columns can be cut off without changing the result."""
        length = seq.shape[1]
        pad = seq == PAD
        keep = (~pad).unsqueeze(-1)
        x = self.item_emb(seq) * math.sqrt(self.dim) + self.pos_emb.weight[-length:]
        x = self.emb_dropout(x) * keep
        # no attention to later positions nor to pads; every position may see itself, so pad rows
        # are not fully masked (no NaN). Outputs of real positions then do not depend on padding.
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).triu(1)
        blocked = (causal | pad.unsqueeze(1)) & ~torch.eye(length, dtype=torch.bool, device=seq.device)
        blocked = blocked.repeat_interleave(self.heads, dim=0)
        for block in self.blocks:
            x = block(x, blocked) * keep  # pads stay zero
        return self.final_norm(x)

    def item_embeddings(self) -> torch.Tensor:
        """[num_items, dim]: row i is item i (the padding row dropped)."""
        return self.item_emb.weight[1:]

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Dot-product scores of hidden states [..., dim] against every item: [..., num_items]."""
        return hidden @ self.item_embeddings().T
