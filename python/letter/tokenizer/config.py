"""TokenizerConfig: every knob of the LETTER tokenizer, with the authors' defaults."""
import dataclasses
from dataclasses import dataclass, field

from letter.errors import LetterError
from letter.utils import dataclass_from_dict, read_mapping_file


@dataclass
class TokenizerConfig:
    """Hyper-parameters of the RQ-VAE tokenizer and its training.

    Defaults follow the authors' RQ-VAE code (HonghuiBao2000/LETTER, RQ-VAE/main.py and
    train_tokenizer.sh) except where noted: MLP 2048-1024-512-256-128-64 -> e_dim 32, 4 levels of
    256 codes, AdamW lr 1e-3 / wd 1e-4, batch 1024, alpha 0.02 and beta 1e-4 (their best on
    Instruments), commitment weight mu 0.25, Sinkhorn (eps 0.003, 50 iterations) on the last level
    during training, K=10 codebook clusters for the diversity loss refreshed every epoch, seed 42.
    The authors train up to 20k epochs; `epochs` here is a CPU-friendly default.
    """

    # Model
    layers: list[int] = field(default_factory=lambda: [2048, 1024, 512, 256, 128, 64])
    e_dim: int = 32
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256, 256])
    dropout: float = 0.0
    batch_norm: bool = False
    # Center the text embeddings and scale them to unit mean square (one global factor) before the
    # encoder; not in the authors' code (their LLaMA features are large), needed for unit-norm ones.
    standardize: bool = True
    # Losses
    mu: float = 0.25  # commitment weight
    alpha: float = 0.02  # collaborative regularization (InfoNCE between z_hat and the CF embedding)
    beta: float = 1e-4  # code-assignment diversity regularization
    cf_temperature: float = 1.0
    div_temperature: float = 1.0
    clusters: int = 10  # K groups per codebook for the diversity loss
    cluster_every: int = 1  # epochs between cluster refreshes
    # CF dim != e_dim: False -> error; True -> a learned linear map e_dim -> cf_dim before InfoNCE.
    cf_projection: bool = False
    # Sinkhorn-balanced assignment of the last level during training (0 disables).
    sinkhorn_epsilon: float = 0.003
    sinkhorn_iters: int = 50
    # Codebook init: k-means++ seeding + Lloyd steps, level by level, on the initial encoder outputs.
    kmeans_iters: int = 100
    kmeans_balanced: bool = False  # size-bounded clusters (at most ceil(2 * n / N) items per code)
    # Optimization
    epochs: int = 200
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 42
    eval_every: int = 1  # epochs between collision evaluations (live display, curves, best checkpoint)
    # The lowest-collision checkpoint is kept among evaluations from this fraction of the epochs on.
    # The authors first evaluate at 10% of training (epoch 2000 of 20000); in short CPU runs the
    # collision rate first rises while the encoder learns, so an early pick would be undertrained.
    best_from: float = 0.5
    checkpoint_every: int = 10  # epochs between resumable checkpoints
    # Codes
    collision_rounds: int = 20  # the authors' Sinkhorn re-assignment rounds for colliding groups
    unique: bool = False  # then move still-colliding items to the nearest unused code

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    def validate(self) -> "TokenizerConfig":
        """Raise LetterError naming the first bad field."""
        def need(ok: bool, msg: str):
            if not ok:
                raise LetterError(f"tokenizer config: {msg}")

        need(len(self.codebook_sizes) >= 1, "codebook_sizes must name at least one level")
        need(all(int(n) >= 2 for n in self.codebook_sizes), f"every codebook size must be >= 2, got {self.codebook_sizes}")
        need(len(self.codebook_sizes) <= 26, "at most 26 levels (tokens <a_..> to <z_..>)")
        need(all(int(h) >= 1 for h in self.layers), f"layer sizes must be >= 1, got {self.layers}")
        need(self.e_dim >= 1, f"e_dim must be >= 1, got {self.e_dim}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(0.0 <= self.best_from <= 1.0, f"best_from must be in [0, 1], got {self.best_from}")
        for name in ("mu", "alpha", "beta", "weight_decay", "sinkhorn_epsilon"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("cf_temperature", "div_temperature", "lr"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("epochs", "batch_size", "cluster_every", "eval_every", "checkpoint_every", "sinkhorn_iters"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.kmeans_iters >= 0 and self.collision_rounds >= 0, "kmeans_iters and collision_rounds must be >= 0")
        need(
            self.beta == 0 or 2 <= self.clusters <= min(self.codebook_sizes) // 2,
            f"clusters must be in [2, smallest codebook / 2] = [2, {min(self.codebook_sizes) // 2}] so every "
            f"cluster can hold a positive besides the code itself, got {self.clusters}",
        )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return dataclass_from_dict(cls, d, "tokenizer config")

    @classmethod
    def from_file(cls, path: str) -> "TokenizerConfig":
        """Read a .json or YAML file of TokenizerConfig fields."""
        return cls.from_dict(read_mapping_file(path))
