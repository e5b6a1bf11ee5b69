"""TIGER behind the shared recommender trainer and evaluation (see recommender.py)."""
from __future__ import annotations

import os

import torch
from torch import nn

from letter.decoding import PrefixIndex
from letter.errors import LetterError
from letter.runs import RecRun
from letter.training import load_checkpoint, save_checkpoint

from .data import drop_trailing_padding, input_lengths
from .model import Tiger
from .recommender import Recommender

BEST_MODEL = RecRun.TIGER_MODEL


class _LossStep(nn.Module):
    """What DDP wraps: its forward returns the loss, so gradient sync hooks fire on backward."""

    def __init__(self, model: Tiger):
        super().__init__()
        self.model = model

    def forward(self, enc, dec, labels):
        return self.model.loss(enc, dec, labels, reduction="sum")


class TigerRecommender(Recommender):
    """Encoder input: the history's identifier tokens + EOS; decoder: BOS + the target's tokens.
    Checkpoint: the full state dict; best model: model.pt (hparams + weights)."""

    name = "tiger"
    ddp = True

    def __init__(self, model: Tiger, rec=None):
        super().__init__(model, rec)
        self._step = _LossStep(model)

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def build(cls, config, rec, device) -> "TigerRecommender":
        return cls(Tiger(rec.layout.vocab_size, **config.model_kwargs()).to(device), rec)

    @staticmethod
    def wraps(model) -> bool:
        return isinstance(model, Tiger)

    @classmethod
    def for_decoding(cls, model, *, rec=None, index=None) -> "TigerRecommender":
        return cls(model, rec)

    @staticmethod
    def best_model_path(run_dir: str) -> str:
        return os.path.join(run_dir, BEST_MODEL)

    @classmethod
    def load_best(cls, run_dir: str, config, device) -> Tiger:
        path = cls.best_model_path(run_dir)
        saved = load_checkpoint(path)  # corrupt, truncated, empty or foreign: one line naming the file
        try:
            model = Tiger(**saved["hparams"])
            model.load_state_dict(saved["state_dict"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise LetterError(f"{path}: not a TIGER model file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        return model.to(device)

    # -- training --------------------------------------------------------------------------------

    @property
    def step_module(self) -> nn.Module:
        return self._step

    def trainable_parameters(self) -> list:
        return list(self.model.parameters())

    def autocast(self, device) -> bool:
        return device.type == "cpu" or torch.cuda.is_bf16_supported()

    def prepare_training(self, rng):
        self.train_enc, self.train_labels = self.rec.train_tensors()  # compact (RecData.token_dtype)
        return self.train_enc.shape[0], input_lengths(self.train_enc)

    def batch(self, rows: torch.Tensor):
        device = self.model.embed.weight.device
        enc = drop_trailing_padding(self.train_enc[rows]).to(device).long()
        labels = self.train_labels[rows].to(device).long()
        return enc, self.rec.decoder_inputs(labels), labels

    @torch.no_grad()
    def mean_loss(self, enc: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
        """Mean per-token generation loss (eval mode) of the given samples."""
        model, rec = self.model, self.rec
        device = model.embed.weight.device
        model.eval()
        total = 0.0
        for start in range(0, enc.shape[0], batch_size):
            labels = rec.item_tokens[targets[start:start + batch_size]].to(device)
            total += model.loss(drop_trailing_padding(enc[start:start + batch_size]).to(device), rec.decoder_inputs(labels),
                                labels, reduction="sum").item()
        return total / max(1, targets.numel() * rec.num_levels)

    def save_best(self, out_dir: str, epoch: int, metrics: dict) -> None:
        save_checkpoint(os.path.join(out_dir, BEST_MODEL), {
            "hparams": self.model.hparams, "state_dict": self.model.state_dict(), "epoch": epoch, "valid": metrics})

    # -- decoding --------------------------------------------------------------------------------

    @staticmethod
    def eval_inputs(rec, part: str, max_users: int = 0, seed: int = 0):
        return rec.eval_tensors(part, max_users, seed)

    @staticmethod
    def encode(rec, histories: list[list[int]]) -> torch.Tensor:
        return rec.encode(histories)

    @staticmethod
    def input_lengths(inputs: torch.Tensor) -> torch.Tensor:
        return input_lengths(inputs)

    def prefix_index(self, rec, device) -> PrefixIndex:
        return PrefixIndex.from_codes(rec.codes, rec.layout.level_sizes, rec.layout.offsets, device=device)

    def start_decoding(self, inputs: torch.Tensor, beams: int, device):
        if inputs.dim() != 2:
            raise LetterError(f"TIGER decodes encoder tokens [users, length], got shape {tuple(inputs.shape)}")
        return self.model.start_decoding(drop_trailing_padding(inputs).to(device), beams)
