"""CFConfig: the settings of the SASRec trainer (letter.cf.train)."""
from dataclasses import dataclass

from letter.settings import Settings, setting


@dataclass
class CFConfig(Settings):
    section = "cf"

    dim: int = setting(32, "Hidden size = exported embedding size.", low=1)
    blocks: int = setting(2, "Self-attention blocks.", low=1)
    heads: int = setting(2, "Attention heads (must divide dim).", low=1)
    # lr 3e-3 / dropout 0.3 rather than RecBole's 1e-3 / 0.5: on Scientific those stalled for the
    # first epochs, these reach a good valid NDCG@10 in ~10 epochs (docs/RESULTS.md)
    dropout: float = setting(0.3, "Dropout rate.", low=0, high=1, high_open=True)
    max_len: int = setting(50, "Longest history the model sees (also the split's history cut).", low=1)
    loss: str = setting("ce", "ce: full-softmax cross-entropy over every item (fused, O(rows) memory); sampled: "
                              "softmax over the target and `negatives` uniform items shared by the batch (for "
                              "catalogs where a full softmax per step is too slow); bce: one sampled negative per "
                              "target.", choices=("ce", "sampled", "bce"))
    negatives: int = setting(1024, "loss sampled: uniform negative items per step.", low=1)
    lr: float = setting(3e-3, "Adam learning rate.", low=0, low_open=True)
    weight_decay: float = setting(0.0, "Adam weight decay.", low=0)
    batch_size: int = setting(256, "Training windows per step (global, over all processes).", low=1)
    epochs: int = setting(200, "Most epochs.", low=1, may_change_on_resume=True)
    patience: int = setting(10, "Stop after this many epochs without a better valid NDCG@10.", low=1,
                            may_change_on_resume=True)
    eval_batch_size: int = setting(1024, "Users per evaluation batch.", low=1, may_change_on_resume=True)
    mask_history: bool = setting(False, "Exclude history items from the ranking (default: not excluded).",
                                 may_change_on_resume=True)
    seed: int = setting(0, "Random seed.")
    precision: str = setting("auto", "Training arithmetic: fp32, bf16 (autocast, fp32 master weights) or auto (bf16 on "
                                     "a bf16-capable GPU, or on a CPU with AMX/AVX512-BF16 from dim 128).",
                             choices=("auto", "fp32", "bf16"), may_change_on_resume=True)

    def check(self) -> None:
        if self.dim % self.heads:
            self.fail("dim", f"({self.dim}) must be divisible by heads ({self.heads})")
