"""LightGCN (He et al., SIGIR 2020) as a CF model of the trainer (letter.cf.train).

The graph is the user-item bipartite graph of the split's training part (each evaluated user's
items[:-2]), with the symmetric normalisation D^-1/2 A D^-1/2 as a sparse matrix. Users and items
have free embeddings (layer 0); K propagation layers multiply by the normalised adjacency with no
weights and no non-linearity; a node's embedding is the mean of its layers 0..K. Training samples
are the graph's (user, item) edges:
- loss "bpr": one uniformly drawn negative item per edge, softplus(-(s_pos - s_neg));
- loss "ce": a softmax over all items per edge (letter_ext.dot_product_cross_entropy, which never
  holds the edges x items logits).
Every step propagates the whole graph (it is small next to the item softmax). A user is scored
against all items by the dot product of their propagated embeddings; the exported item embeddings
are the propagated ones. Training is fp32 (sparse products have no bf16 autocast path).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from letter.cf.config import CFConfig
from letter.cf.train import CFTrainable
from letter.data import Dataset, Split
from letter.training import DistContext, RandomStreams, batch_order, check_not_diverged, epoch_generator, shard
from letter_ext import dot_product_cross_entropy


def training_edges(split: Split, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(user rows, items) of every distinct training interaction; user row r is split.eval_users[r]."""
    users, items = [], []
    for row, user in enumerate(split.eval_users):
        head = np.unique(dataset.sequences[user][:-2])
        users.append(np.full(len(head), row))
        items.append(head)
    return torch.from_numpy(np.concatenate(users)).long(), torch.from_numpy(np.concatenate(items)).long()


def normalized_adjacency(users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int) -> torch.Tensor:
    """The (U + I) x (U + I) sparse D^-1/2 A D^-1/2 of the bipartite graph (nodes: users, then items)."""
    rows = torch.cat([users, items + num_users])
    cols = torch.cat([items + num_users, users])
    degree = torch.bincount(rows, minlength=num_users + num_items).double()
    scale = degree.pow(-0.5)
    values = (scale[rows] * scale[cols]).float()
    size = num_users + num_items
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (size, size), check_invariants=True).coalesce()


class LightGCN(nn.Module):
    def __init__(self, adjacency: torch.Tensor, num_users: int, num_items: int, dim: int, layers: int):
        super().__init__()
        self.num_users, self.num_items, self.layers = num_users, num_items, layers
        self.user_emb = nn.Embedding(num_users, dim)
        self.item_emb = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user_emb.weight, std=0.1)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        self.register_buffer("adjacency", adjacency, persistent=False)  # rebuilt from the data, not saved

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users [U, dim], items [I, dim]): the mean of the layer-0..K embeddings."""
        layer = torch.cat([self.user_emb.weight, self.item_emb.weight])
        total = layer
        for _ in range(self.layers):
            layer = torch.sparse.mm(self.adjacency, layer)
            total = total + layer
        mean = total / (self.layers + 1)
        return mean[: self.num_users], mean[self.num_users :]


class LightGCNTrainable(CFTrainable):
    @classmethod
    def build(cls, dataset: Dataset, split: Split, cfg: CFConfig, ctx: DistContext, rng: RandomStreams):
        users, items = training_edges(split, dataset)
        adjacency = normalized_adjacency(users, items, len(split.eval_users), dataset.num_items)
        model = LightGCN(adjacency, len(split.eval_users), dataset.num_items, cfg.dim, cfg.graph_layers).to(ctx.device)
        # BPR negatives are drawn for the whole global batch, so every world size draws the same ones
        return cls(model, dataset, split, cfg, ctx, (users, items), rng.generator("negatives", cfg.seed))

    def __init__(self, model, dataset, split, cfg, ctx, edges: tuple[torch.Tensor, torch.Tensor],
                 negatives: torch.Generator):
        super().__init__(model, dataset, split, cfg, ctx)
        self.edges, self.negatives = edges, negatives
        # dataset user index -> graph row (the evaluated users are the graph's users)
        self.row_of = torch.full((dataset.num_users,), -1, dtype=torch.long, device=ctx.device)
        self.row_of[torch.tensor(split.eval_users, device=ctx.device)] = torch.arange(len(split.eval_users),
                                                                                     device=ctx.device)

    def batches(self, epoch: int):
        return batch_order(len(self.edges[0]), self.cfg.batch_size, epoch_generator(self.cfg.seed, epoch))

    def step(self, batch):
        ctx = self.ctx
        mine = shard(batch, ctx)
        user_rows, items = self.edges[0][mine].to(ctx.device), self.edges[1][mine].to(ctx.device)
        users_emb, items_emb = self.model()
        u = users_emb[user_rows]
        if self.cfg.loss == "bpr":
            negatives = torch.randint(0, self.dataset.num_items, (len(batch),), generator=self.negatives,
                                      device=self.negatives.device)
            negative = items_emb[shard(negatives, ctx).to(ctx.device)]
            total = F.softplus(-((u * items_emb[items]).sum(-1) - (u * negative).sum(-1))).sum()
        else:
            check_not_diverged("the user or item embeddings", u, items_emb, ctx=ctx)
            total = dot_product_cross_entropy(u, items_emb, items, reduction="sum")
        # gradients are averaged over processes: scaling by world / |global batch| gives the batch mean
        loss = total * ctx.world / len(batch)
        return loss, {"loss": loss}

    def scorer(self):
        users_emb, items_emb = self.model()
        return lambda histories, users: users_emb[self.row_of[users]] @ items_emb.T

    def item_embeddings(self) -> torch.Tensor:
        return self.model()[1]
