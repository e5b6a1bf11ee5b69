"""TIGER: a T5-style encoder-decoder that generates an item's code sequence token by token.

Architecture (T5 v1.0, like the authors' `ckpt/TIGER/config.json`): pre-norm RMS layer norm, no
biases, ReLU feed-forward, a learned relative position bias (T5 buckets) computed by the first
layer of each stack and shared by the other layers, cross-attention without position bias, and the
output layer tied to the token embedding (decoder states scaled by d_model^-0.5 first, as T5 does).
One difference from T5: attention scores use the usual 1/sqrt(d_kv) scaling (the default of
`F.scaled_dot_product_attention`) with standard-normal-scaled init instead of T5's unscaled scores.

The vocabulary is tiny: PAD, EOS, BOS and one token per (level, code); see `TokenLayout`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from letter.errors import SettingError

PAD, EOS, BOS = 0, 1, 2
NUM_SPECIAL = 3


@dataclass(frozen=True)
class TokenLayout:
    """Token id of (level l, code c) = offsets[l] + c; ids below NUM_SPECIAL are PAD/EOS/BOS."""

    level_sizes: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(NUM_SPECIAL + int(s) for s in np.cumsum((0,) + self.level_sizes[:-1]))

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + sum(self.level_sizes)

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    def item_tokens(self, codes: np.ndarray) -> np.ndarray:
        """codes [I, L] -> token ids [I, L]."""
        return codes + np.asarray(self.offsets, dtype=np.int64)[None, :]


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5 bucketing of (key - query) offsets: exact buckets for short distances, log-spaced up to max_distance."""
    distance = -relative
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = (distance < 0).long() * num_buckets
        distance = distance.abs()
    else:
        distance = distance.clamp(min=0)  # the causal mask hides future keys anyway
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class RelativePositionBias(nn.Module):
    def __init__(self, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """-> [1, H, Tq, Tk] additive attention bias."""
        relative = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_kv: int, dropout: float):
        super().__init__()
        inner = num_heads * d_kv
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.num_heads, self.d_kv, self.dropout = num_heads, d_kv, dropout

    def split_heads(self, x):
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.d_kv).transpose(1, 2)

    def project_kv(self, x):
        return self.split_heads(self.k(x)), self.split_heads(self.v(x))

    def forward(self, x, mask, key_value=None, cache=None, beams_per_memory: int = 1):
        """Self-attention (key_value None; `cache` = previous (k, v) to extend) or cross-attention.

        For cross-attention during beam search the K beams of a user share one encoder memory:
        their queries are folded into the query axis of that memory ([B*K, H, T] -> [B, H, K*T]),
        which is exact (no position bias in cross-attention) and avoids K copies of the memory.
        Returns (output, (k, v) of this call for caching).
        """
        n, t, _ = x.shape
        q = self.split_heads(self.q(x))
        if key_value is None:
            k, v = self.project_kv(x)
            if cache is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        else:
            k, v = key_value
        if beams_per_memory > 1:
            b = n // beams_per_memory
            q = q.view(b, beams_per_memory, self.num_heads, t, self.d_kv).transpose(1, 2)
            q = q.reshape(b, self.num_heads, beams_per_memory * t, self.d_kv)
        if t == 1 and beams_per_memory == 1 and not self.training:
            # one query per row (incremental decoding): elementwise products beat SDPA's per-row
            # kernel launches at beam-search batch sizes (B*K rows, a few cached keys)
            scores = (q * k).sum(-1, keepdim=True).transpose(-1, -2) * self.d_kv**-0.5 + mask.to(q.dtype)
            out = (torch.softmax(scores, -1).transpose(-1, -2) * v).sum(-2, keepdim=True)
        else:
            dropout = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout)  # bf16 autocast
        if beams_per_memory > 1:
            out = out.view(n // beams_per_memory, self.num_heads, beams_per_memory, t, self.d_kv).transpose(1, 2)
            out = out.reshape(n, self.num_heads, t, self.d_kv)
        out = out.transpose(1, 2).reshape(n, t, self.num_heads * self.d_kv)
        return self.o(out), (k, v)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.wo(self.dropout(F.relu(self.wi(x))))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, num_heads, d_kv, d_ff, dropout):
        super().__init__()
        self.norm1, self.attn = RMSNorm(d_model), Attention(d_model, num_heads, d_kv, dropout)
        self.norm2, self.ff = RMSNorm(d_model), FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        x = x + self.dropout(self.attn(self.norm1(x), mask)[0])
        return x + self.dropout(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model, num_heads, d_kv, d_ff, dropout):
        super().__init__()
        self.norm1, self.self_attn = RMSNorm(d_model), Attention(d_model, num_heads, d_kv, dropout)
        self.norm2, self.cross_attn = RMSNorm(d_model), Attention(d_model, num_heads, d_kv, dropout)
        self.norm3, self.ff = RMSNorm(d_model), FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, self_mask, memory_kv, memory_mask, cache=None, beams_per_memory=1):
        h, new_cache = self.self_attn(self.norm1(x), self_mask, cache=cache)
        x = x + self.dropout(h)
        h, _ = self.cross_attn(self.norm2(x), memory_mask, key_value=memory_kv, beams_per_memory=beams_per_memory)
        x = x + self.dropout(h)
        return x + self.dropout(self.ff(self.norm3(x))), new_cache


@dataclass
class DecoderState:
    """Incremental decoding state for B users x K beams (rows ordered user-major)."""

    memory_kv: list  # per layer (k, v) [B, H, S, d_kv] of the encoder output (shared by a user's beams)
    memory_mask: torch.Tensor  # [B, 1, 1, S] additive key-padding mask
    self_kv: list | None  # per layer (k, v) [B*K, H, t, d_kv] ([B, ...] after the first step), None before it
    beams: int
    length: int = 0  # decoder tokens consumed so far


def check_temperature(temperature: float) -> None:
    """SettingError unless temperature is a finite number > 0: the logits are divided by it (0 or
    below, NaN or inf would make every score inf, NaN or 0)."""
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0):
        raise SettingError("temperature", f"must be a finite number > 0, got {temperature!r}")


class Tiger(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        num_layers: int = 4,
        num_decoder_layers: int = 4,
        num_heads: int = 6,
        d_kv: int = 64,
        d_ff: int = 1024,
        dropout: float = 0.1,
        relative_buckets: int = 32,
        relative_max_distance: int = 128,
        temperature: float = 1.0,
    ):
        super().__init__()
        check_temperature(temperature)
        self.hparams = dict(
            vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_decoder_layers=num_decoder_layers,
            num_heads=num_heads, d_kv=d_kv, d_ff=d_ff, dropout=dropout, relative_buckets=relative_buckets,
            relative_max_distance=relative_max_distance, temperature=temperature,
        )
        self.temperature = temperature
        self.embed = nn.Embedding(vocab_size, d_model)
        self.encoder_bias = RelativePositionBias(num_heads, relative_buckets, relative_max_distance, True)
        self.decoder_bias = RelativePositionBias(num_heads, relative_buckets, relative_max_distance, False)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, num_heads, d_kv, d_ff, dropout) for _ in range(num_layers))
        self.decoder = nn.ModuleList(
            DecoderLayer(d_model, num_heads, d_kv, d_ff, dropout) for _ in range(num_decoder_layers)
        )
        self.encoder_norm, self.decoder_norm = RMSNorm(d_model), RMSNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)

    # -- encoder -------------------------------------------------------------------------------

    def encode(self, tokens: torch.Tensor):
        """tokens [B, S] (PAD-padded) -> (memory [B, S, d], key-padding mask [B, 1, 1, S])."""
        s = tokens.shape[1]
        pad_mask = torch.zeros(tokens.shape, dtype=self.embed.weight.dtype, device=tokens.device)
        pad_mask = pad_mask.masked_fill(tokens == PAD, float("-inf"))[:, None, None, :]
        positions = torch.arange(s, device=tokens.device)
        mask = self.encoder_bias(positions, positions) + pad_mask
        x = self.dropout(self.embed(tokens))
        for layer in self.encoder:
            x = layer(x, mask)
        return self.dropout(self.encoder_norm(x)), pad_mask

    def _memory_kv(self, memory):
        return [layer.cross_attn.project_kv(memory) for layer in self.decoder]

    # -- decoder -------------------------------------------------------------------------------

    def _decode(self, tokens, memory_kv, memory_mask, self_kv, start: int, beams_per_memory: int):
        t = tokens.shape[1]
        q_pos = torch.arange(start, start + t, device=tokens.device)
        k_pos = torch.arange(start + t, device=tokens.device)
        self_mask = self.decoder_bias(q_pos, k_pos)
        if t > 1:
            future = k_pos[None, :] > q_pos[:, None]
            self_mask = self_mask.masked_fill(future, float("-inf"))
        x = self.dropout(self.embed(tokens))
        new_kv = []
        for i, layer in enumerate(self.decoder):
            cache = None if self_kv is None else self_kv[i]
            x, kv = layer(x, self_mask, memory_kv[i], memory_mask, cache, beams_per_memory)
            new_kv.append(kv)
        hidden = self.dropout(self.decoder_norm(x)) * self.embed.embedding_dim**-0.5
        return hidden, new_kv

    def forward(self, enc_tokens: torch.Tensor, dec_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: -> decoder states [B, T, d]; logits = states @ embed.weight.T / temperature."""
        memory, memory_mask = self.encode(enc_tokens)
        hidden, _ = self._decode(dec_tokens, self._memory_kv(memory), memory_mask, None, 0, 1)
        return hidden

    def loss(self, enc_tokens, dec_tokens, targets, reduction: str = "mean"):
        """Ranking-guided generation loss: softmax CE over the vocabulary at temperature tau, computed
        by the fused op so the [B*T, V] logit matrix is never built. (On CPU its chunked-GEMM path is
        also faster than materialized logits at TIGER's shapes: 1.4-2.1x for 256-1,024 rows at V 1,027,
        d 128, one thread; docs/BENCHMARKS.md.)"""
        hidden = self(enc_tokens, dec_tokens)
        q, keys, flat = hidden.reshape(-1, hidden.shape[-1]), self.embed.weight, targets.reshape(-1)
        from letter_ext import dot_product_cross_entropy

        return dot_product_cross_entropy(q, keys, flat, temperature=self.temperature, ignore_index=PAD,
                                         reduction=reduction)

    # -- incremental decoding (beam search) ----------------------------------------------------

    @torch.no_grad()
    def start_decoding(self, enc_tokens: torch.Tensor, beams: int) -> DecoderState:
        memory, memory_mask = self.encode(enc_tokens)
        return DecoderState(self._memory_kv(memory), memory_mask, None, beams)

    @torch.no_grad()
    def decode_step(self, last_tokens: torch.Tensor | None, state: DecoderState):
        """last_tokens [B*K] -> (logits [B*K, V], state). At the first step (last_tokens None) every
        beam is the empty prefix, so only BOS of each user is decoded: logits [B, V]."""
        if last_tokens is None:
            users = state.memory_mask.shape[0]
            tokens = torch.full((users, 1), BOS, dtype=torch.long, device=state.memory_mask.device)
            beams_per_memory = 1
        else:
            tokens, beams_per_memory = last_tokens.view(-1, 1), state.beams
        hidden, self_kv = self._decode(
            tokens, state.memory_kv, state.memory_mask, state.self_kv, state.length, beams_per_memory
        )
        # 1/tau scales the [rows, d] states, not the [rows, V] logits: one pass less over the
        # largest tensor of the step (it leaves the cache at serving batch sizes)
        logits = (hidden[:, 0].float() * (1.0 / self.temperature)) @ self.embed.weight.float().T
        state.self_kv, state.length = self_kv, state.length + 1
        return logits, state

    @staticmethod
    def reorder_state(state: DecoderState, flat_parent: torch.Tensor) -> DecoderState:
        """Follow the beams chosen by the search (flat_parent [B*K] rows of the previous step);
        parents never leave their user, so the shared encoder memory needs no reordering."""
        if state.self_kv is not None:
            state.self_kv = [(k.index_select(0, flat_parent), v.index_select(0, flat_parent)) for k, v in state.self_kv]
        return state
