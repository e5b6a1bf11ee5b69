"""Settings of the TIGER recommender; the defaults are the authors' LETTER-TIGER setup."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from letter.errors import LetterError
from letter.utils import dataclass_from_dict


@dataclass
class RecConfig:
    # Model: the authors' ckpt/TIGER/config.json (T5 with d_model 128, 4+4 layers, 6 heads x 64).
    d_model: int = 128
    num_layers: int = 4
    num_decoder_layers: int = 4
    num_heads: int = 6
    d_kv: int = 64
    d_ff: int = 1024
    dropout: float = 0.1
    relative_buckets: int = 32
    relative_max_distance: int = 128
    # Ranking-guided loss temperature (their code's default is 1.0; the paper's best on Instruments 0.7).
    temperature: float = 1.0
    max_history: int = 20
    # Optimisation: AdamW, cosine schedule with linear warmup over warmup_ratio of all steps.
    # batch_size is global (split across DDP processes); theirs is 256 per GPU x 2 GPUs x 2 accumulation.
    epochs: int = 200
    batch_size: int = 1024
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    # Early stopping on validation NDCG@10 from constrained beam search over a fixed user sample.
    eval_every: int = 1
    patience: int = 20  # evaluations without improvement before stopping (theirs: 20)
    valid_users: int = 2000  # 0 = the whole validation split
    eval_beams: int = 20
    eval_batch_size: int = 256
    device: str = "auto"

    def validate(self) -> "RecConfig":
        positive = ["d_model", "num_layers", "num_decoder_layers", "num_heads", "d_kv", "d_ff", "max_history",
                    "epochs", "batch_size", "eval_every", "patience", "eval_beams", "eval_batch_size"]
        for name in positive:
            if getattr(self, name) < 1:
                raise LetterError(f"rec config: {name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise LetterError(f"rec config: temperature must be > 0, got {self.temperature}")
        if self.lr <= 0:
            raise LetterError(f"rec config: lr must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise LetterError(f"rec config: dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise LetterError(f"rec config: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.valid_users < 0:
            raise LetterError(f"rec config: valid_users must be >= 0, got {self.valid_users}")
        return self

    def model_kwargs(self) -> dict:
        names = ["d_model", "num_layers", "num_decoder_layers", "num_heads", "d_kv", "d_ff", "dropout",
                 "relative_buckets", "relative_max_distance", "temperature"]
        return {n: getattr(self, n) for n in names}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RecConfig":
        return dataclass_from_dict(cls, values, "rec config")
