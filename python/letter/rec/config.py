"""Settings of the generative recommender; the defaults are the authors' LETTER-TIGER setup."""
from __future__ import annotations

from dataclasses import dataclass

from letter.settings import Settings, setting


@dataclass
class RecConfig(Settings):
    section = "rec"

    # Model: the authors' ckpt/TIGER/config.json (T5 with d_model 128, 4+4 layers, 6 heads x 64).
    d_model: int = setting(128, "Model width.", low=1)
    num_layers: int = setting(4, "Encoder layers.", low=1)
    num_decoder_layers: int = setting(4, "Decoder layers.", low=1)
    num_heads: int = setting(6, "Attention heads.", low=1)
    d_kv: int = setting(64, "Width of each attention head.", low=1)
    d_ff: int = setting(1024, "Feed-forward width.", low=1)
    dropout: float = setting(0.1, "Dropout rate.", low=0, high=1, high_open=True)
    relative_buckets: int = setting(32, "T5 relative-position buckets.", low=1)
    relative_max_distance: int = setting(128, "T5 relative-position max distance.", low=1)
    # Their code's default is 1.0; the paper's best on Instruments 0.7.
    temperature: float = setting(1.0, "Ranking-guided loss temperature tau (the paper's best on Instruments: 0.7).",
                                 low=0, low_open=True)
    max_history: int = setting(20, "History items the model reads.", low=1)
    # Optimisation: AdamW, cosine schedule with linear warmup over warmup_ratio of all steps.
    # Theirs is 256 per GPU x 2 GPUs x 2 accumulation.
    epochs: int = setting(200, "Epochs of the cosine schedule (training may stop earlier).", low=1)
    batch_size: int = setting(1024, "Global batch size (split across torchrun processes).", low=1)
    bucket_by_length: bool = setting(False, "Batch training samples of similar history length together (seeded; "
                                            "less padding, faster epochs, a different batch order).")
    lr: float = setting(5e-4, "AdamW learning rate.", low=0, low_open=True)
    weight_decay: float = setting(0.01, "AdamW weight decay.", low=0)
    warmup_ratio: float = setting(0.01, "Fraction of the steps of linear warmup.", low=0, high=1, high_open=True)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", low=0, low_open=True)
    seed: int = setting(42, "Random seed.")
    # Early stopping on validation NDCG@10 from constrained beam search over a fixed user sample.
    eval_every: int = setting(1, "Validate (beam search, NDCG@10) every N epochs.", low=1)
    patience: int = setting(20, "Stop after this many validations without a better NDCG@10 (theirs: 20).", low=1,
                            may_change_on_resume=True)
    valid_users: int = setting(2000, "Validation users sampled for early stopping (0 = all).", low=0)
    eval_beams: int = setting(20, "Beams of the validation beam search.", low=10)
    eval_batch_size: int = setting(256, "Users per validation batch.", low=1, may_change_on_resume=True)
    device: str = setting("auto", "cpu, cuda, cuda:N or auto.", may_change_on_resume=True)

    def model_kwargs(self) -> dict:
        names = ["d_model", "num_layers", "num_decoder_layers", "num_heads", "d_kv", "d_ff", "dropout",
                 "relative_buckets", "relative_max_distance", "temperature"]
        return {n: getattr(self, n) for n in names}
