"""SASRec as a CF model of the trainer (letter.cf.train): next-item prediction over sequence windows.

Training uses the split's training part as sequence-to-sequence windows: every position predicts
the next item, which covers the same (prefix -> next item) samples as the paper's split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from letter.cf.config import CFConfig
from letter.cf.model import SASRec
from letter.cf.train import CFTrainable
from letter.data import Dataset, Split, drop_leading_padding, pad_left
from letter.training import (DistContext, RandomStreams, batch_order, bf16_autocast, check_not_diverged,
                             epoch_generator, shard)
from letter_ext import dot_product_cross_entropy


def training_windows(split: Split, dataset: Dataset, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [N, max_len] in model ids (item + 1; 0 = pad / no target) from every
    evaluated user's items[:-2]; sequences longer than max_len + 1 are cut into windows from the end."""
    inputs, targets = [], []
    for user in split.eval_users:
        head = dataset.sequences[user][:-2]
        end = len(head) - 1  # last input position (exclusive end of inputs is end)
        while end > 0:
            start = max(0, end - max_len)
            inputs.append([i + 1 for i in head[start:end]])
            targets.append([i + 1 for i in head[start + 1 : end + 1]])
            end = start
    return pad_left(inputs, max_len, 0), pad_left(targets, max_len, 0)


def sampled_softmax_loss(h: torch.Tensor, emb: torch.Tensor, t: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Summed softmax cross-entropy of each target against a shared set of uniformly drawn negative
    items (a negative equal to the row's target is left out). Uniform draws need no log-Q
    correction: every item has the same proposal probability, which cancels in the softmax."""
    pos = (h * emb[t]).sum(-1, keepdim=True)
    neg = (h @ emb[negatives].T).masked_fill(negatives.unsqueeze(0) == t.unsqueeze(1), float("-inf"))
    return (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos.squeeze(1)).sum()


def step_loss(model, inputs, targets, num_items: int, loss: str, global_targets: int, world: int, negatives: int = 0,
              ctx: DistContext | None = None):
    """The loss of one process's share of a batch, scaled so that DDP's gradient average gives the
    sum over the global batch divided by its number of targets. `negatives`: loss "sampled"'s
    uniform negative items per step. `ctx`: the processes that stop together when one diverges."""
    hidden = model(inputs)  # through the DDP wrapper when distributed, so gradients get synced
    model = getattr(model, "module", model)
    valid = targets > 0
    h, t = hidden[valid], targets[valid] - 1
    if loss == "ce":
        # fused: the [targets x items] logits are never built (O(rows) memory at any catalog size)
        check_not_diverged("the hidden states or item embeddings", h, model.item_embeddings(), ctx=ctx)
        total = dot_product_cross_entropy(h.float(), model.item_embeddings().float(), t, reduction="sum")
    elif loss == "sampled":
        # draws are with replacement: as many as the catalog would miss about a third of it, so
        # negatives >= items takes every item (the exact full softmax)
        drawn = (torch.randint(0, num_items, (negatives,), device=t.device) if negatives < num_items
                 else torch.arange(num_items, device=t.device))
        total = sampled_softmax_loss(h, model.item_embeddings(), t, drawn)
    else:
        emb = model.item_embeddings()
        negatives = torch.randint(0, num_items, t.shape, device=t.device)
        pos, neg = (h * emb[t]).sum(-1), (h * emb[negatives]).sum(-1)
        total = F.softplus(-pos).sum() + F.softplus(neg).sum()
    return total * world / max(global_targets, 1)


def sasrec_scorer(model: SASRec):
    """scores_of for letter.cf.train.ranking_metrics: every item's score after each history."""
    return lambda histories, users: model.scores(model(histories)[:, -1])


class SASRecTrainable(CFTrainable):
    ddp = True

    @classmethod
    def build(cls, dataset: Dataset, split: Split, cfg: CFConfig, ctx: DistContext, rng: RandomStreams):
        model = SASRec(dataset.num_items, cfg.dim, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len).to(ctx.device)
        return cls(model, dataset, split, cfg, ctx)

    def __init__(self, model, dataset, split, cfg, ctx):
        super().__init__(model, dataset, split, cfg, ctx)
        self.inputs, self.targets = training_windows(split, dataset, cfg.max_len)
        self.lengths = (self.inputs > 0).sum(1)
        self.use_amp = bf16_autocast(cfg.precision, ctx.device, cfg.dim)

    def batches(self, epoch: int):
        return batch_order(len(self.lengths), self.cfg.batch_size, epoch_generator(self.cfg.seed, epoch), self.lengths)

    def step(self, batch):
        ctx = self.ctx
        global_targets = int((self.targets[batch] > 0).sum())
        seq, tgt = drop_leading_padding(self.inputs[shard(batch, ctx)], self.targets[shard(batch, ctx)])
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            loss = step_loss(self.step_module, seq.to(ctx.device), tgt.to(ctx.device), self.dataset.num_items,
                             self.cfg.loss, global_targets, ctx.world, self.cfg.negatives, ctx)
        return loss, {"loss": loss}

    def scorer(self):
        return sasrec_scorer(self.model)

    def item_embeddings(self) -> torch.Tensor:
        return self.model.item_embeddings()
