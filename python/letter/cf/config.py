"""CFConfig: the settings of the collaborative-filtering trainer (letter.cf.train): SASRec or LightGCN."""
from dataclasses import dataclass

from letter.settings import Settings, setting


@dataclass
class CFConfig(Settings):
    section = "cf"

    model: str = setting("sasrec", "sasrec: causal self-attention over each user's sequence; lightgcn: graph "
                                   "propagation over the user-item graph.", choices=("sasrec", "lightgcn"))
    dim: int = setting(32, "Hidden size = exported embedding size.", low=1)
    blocks: int = setting(2, "Self-attention blocks (sasrec).", low=1)
    heads: int = setting(2, "Attention heads (sasrec; must divide dim).", low=1)
    graph_layers: int = setting(3, "Propagation layers K (lightgcn); the embedding is the mean of layers 0..K.",
                                low=1)
    # lr 3e-3 / dropout 0.3 rather than RecBole's 1e-3 / 0.5: on Scientific those stalled for the
    # first epochs, these reach a good valid NDCG@10 in ~10 epochs (docs/RESULTS.md)
    dropout: float = setting(0.3, "Dropout rate (sasrec).", low=0, high=1, high_open=True)
    max_len: int = setting(50, "Longest history the model sees (also the split's history cut).", low=1)
    loss: str = setting("ce", "ce: full-softmax cross-entropy over every item (fused, O(rows) memory); sampled "
                              "(sasrec): softmax over the target and `negatives` uniform items shared by the batch (every item when "
                              "negatives >= items) "
                              "(for catalogs where a full softmax per step is too slow); bce (sasrec): one sampled "
                              "negative per target, binary; bpr (lightgcn): one sampled negative per interaction, "
                              "pairwise.", choices=("ce", "sampled", "bce", "bpr"))
    negatives: int = setting(1024, "loss sampled: uniform negative items per step.", low=1)
    lr: float = setting(3e-3, "Adam learning rate.", low=0, low_open=True)
    weight_decay: float = setting(0.0, "Adam weight decay.", low=0)
    batch_size: int = setting(256, "Training windows (sasrec) or interactions (lightgcn) per step (global, over "
                                   "all processes).", low=1)
    epochs: int = setting(200, "Most epochs.", low=1, may_change_on_resume=True)
    patience: int = setting(10, "Stop after this many epochs without a better valid NDCG@10.", low=1,
                            may_change_on_resume=True)
    valid_users: int = setting(0, "Validation users for model selection (every epoch): 0 = the whole validation split; "
                                  "N: a fixed random sample of N users (seeded by seed; full ranking costs users x items, "
                                  "hours per epoch at a million of each on a CPU).", low=0)
    eval_batch_size: int = setting(1024, "Users per evaluation batch.", low=1, may_change_on_resume=True)
    # fixed on resume: early stopping reads this protocol's NDCG@10, and the two are not comparable
    # (the test reports both anyway)
    mask_history: bool = setting(False, "Exclude history items from the validation ranking early stopping reads and "
                                        "from the reported test (default: not excluded; both test protocols are "
                                        "always in the metrics file).")
    seed: int = setting(0, "Random seed.", low=0, high=2**32 - 1)
    precision: str = setting("auto", "Training arithmetic: fp32, bf16 (autocast, fp32 master weights) or auto (bf16 on "
                                     "a bf16-capable GPU, or on a CPU with AMX/AVX512-BF16 from dim 128).",
                             choices=("auto", "fp32", "bf16"), may_change_on_resume=True)
    device: str = setting("auto", "cpu, cuda, cuda:N or auto.", may_change_on_resume=True)

    LOSSES = {"sasrec": ("ce", "sampled", "bce"), "lightgcn": ("ce", "bpr")}
    # Settings a choice never reads (selector -> value -> fields): given as options, they are an error.
    UNUSED_BY = {"model": {"sasrec": ("graph_layers",), "lightgcn": ("blocks", "heads", "dropout")},
                 "loss": {"ce": ("negatives",), "bce": ("negatives",), "bpr": ("negatives",)}}

    def check(self) -> None:
        if self.loss not in self.LOSSES[self.model]:
            self.fail("loss", f"{self.loss} is not a {self.model} loss (one of {', '.join(self.LOSSES[self.model])})")
        if self.model == "sasrec" and self.dim % self.heads:
            self.fail("dim", f"({self.dim}) must be divisible by heads ({self.heads})")
