"""Settings of the generative recommender: TIGER (the default; the authors' LETTER-TIGER setup) or
LC-Rec (a local causal LM + LoRA, `model="lcrec"`). The model-size fields d_model ... d_ff, dropout
and the relative-position ones are TIGER's; base_model, lora_*, bf16 and gradient_checkpointing are
LC-Rec's; everything else (optimisation, early stopping, temperature, max_history) drives both."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from letter.settings import Settings, setting


MODEL_NAMES = {"tiger": "TIGER", "lcrec": "LC-Rec"}  # how reports name each RecConfig.model


def model_summary(config: dict) -> str:
    """The trained recommender in a report's words, from RecConfig.to_dict(): its name and size."""
    name = MODEL_NAMES[config["model"]]
    if config["model"] == "lcrec":
        return f"{name} (LoRA r {config['lora_r']} on {os.path.basename(config['base_model'])})"
    return f"{name} (d_model {config['d_model']}, {config['num_layers']}+{config['num_decoder_layers']} layers)"


@dataclass
class RecConfig(Settings):
    section = "rec"

    model: str = setting("tiger", "Recommender: tiger (T5-style, trained from scratch) or lcrec (a local causal LM "
                                  "fine-tuned with LoRA; needs base_model and pip install -e .[llm]).",
                         choices=("tiger", "lcrec"))
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
    # LC-Rec (model lcrec): LoRA on the attention and MLP projections + the new identifier-token rows.
    base_model: str = setting("", "Local Hugging Face causal LM folder (lcrec; nothing is downloaded).")
    lora_r: int = setting(8, "LoRA rank (lcrec).", low=1)
    lora_alpha: int = setting(32, "LoRA alpha (lcrec).", low=1)
    lora_dropout: float = setting(0.05, "LoRA dropout (lcrec).", low=0, high=1, high_open=True)
    bf16: bool = setting(True, "Load the base model in bfloat16 (lcrec, on GPU only; float32 on CPU).")
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward to save memory (lcrec, on "
                                                  "GPU only; same results, so a resumed run may change it).",
                                           may_change_on_resume=True)
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
    seed: int = setting(42, "Random seed.", low=0, high=2**32 - 1)
    # Model selection and early stopping on validation NDCG@10 from constrained beam search, by the
    # rule of letter.training.EarlyStopping (README, "Model selection and early stopping").
    eval_every: int = setting(1, "Epochs between validations (beam search, NDCG@10; model selection); 0: a tenth "
                                 "of the epochs. The last epoch always validates.", low=0)
    patience: int = setting(20, "Stop after this many validations without a better NDCG@10 (theirs: 20).", low=1,
                            may_change_on_resume=True)
    valid_users: int = setting(0, "Validation users for model selection: 0 = the whole validation split; N: a fixed "
                                  "random sample of N users (noisier; its standard error is printed and stored).",
                               low=0)
    min_delta: float = setting(0.0, "NDCG@10 gain a validation needs to count as better; 0: min_delta_se standard "
                                    "errors of its NDCG@10. Within it, the lower validation loss wins.", low=0,
                               may_change_on_resume=True)
    min_delta_se: float = setting(1.0, "With min_delta 0: the improvement threshold in standard errors of the "
                                       "validation NDCG@10 (0: any gain counts).", low=0,
                                  may_change_on_resume=True)
    # With a fixed-horizon cosine schedule, stopping before it has decayed keeps weights trained at
    # a high learning rate (issue 26: a run stopped at epoch 6 of 12 kept its epoch-3 weights).
    stop_from: float = setting(0.75, "Early stopping may end a run only from this fraction of the epochs on (the "
                                     "cosine learning rate is then below 15 % of its peak); 0: at any validation.",
                               low=0, high=1, may_change_on_resume=True)
    eval_beams: int = setting(20, "Beams of the validation beam search.", low=10)
    eval_batch_size: int = setting(256, "Users per validation batch.", low=1, may_change_on_resume=True)
    device: str = setting("auto", "cpu, cuda, cuda:N or auto.", may_change_on_resume=True)
    precision: str = setting("auto", "Training arithmetic (tiger): fp32, bf16 (autocast, fp32 master weights) or auto "
                                     "(bf16 on a bf16-capable GPU, or on a CPU with AMX/AVX512-BF16 from d_model 128).",
                             choices=("auto", "fp32", "bf16"), may_change_on_resume=True)

    # Settings a model never reads (selector -> value -> fields): given as options, they are an error.
    UNUSED_BY = {"model": {
        "tiger": ("base_model", "lora_r", "lora_alpha", "lora_dropout", "bf16", "gradient_checkpointing"),
        "lcrec": ("d_model", "num_layers", "num_decoder_layers", "num_heads", "d_kv", "d_ff", "dropout",
                  "relative_buckets", "relative_max_distance", "precision"),
    }}

    def check(self) -> None:
        if self.model == "lcrec" and not self.base_model:
            self.fail("base_model", "is required with model lcrec (a local Hugging Face causal LM folder)")

    @property
    def stop_from_epoch(self) -> int:
        """First epoch at which early stopping may end the run."""
        return math.ceil(self.stop_from * self.epochs)

    def improvement_threshold(self, ndcg_se: float | None) -> float:
        """The NDCG@10 gain a validation with standard error `ndcg_se` (None: one user) needs to
        count as better."""
        if self.min_delta > 0:
            return self.min_delta
        return self.min_delta_se * ndcg_se if ndcg_se is not None else 0.0

    def model_kwargs(self) -> dict:
        names = ["d_model", "num_layers", "num_decoder_layers", "num_heads", "d_kv", "d_ff", "dropout",
                 "relative_buckets", "relative_max_distance", "temperature"]
        return {n: getattr(self, n) for n in names}
