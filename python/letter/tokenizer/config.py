"""TokenizerConfig: every knob of the LETTER tokenizer, with the authors' defaults."""
from dataclasses import dataclass

from letter.settings import Settings, setting


@dataclass
class TokenizerConfig(Settings):
    """Hyper-parameters of the RQ-VAE tokenizer and its training.

    Defaults follow the authors' RQ-VAE code (HonghuiBao2000/LETTER, RQ-VAE/main.py and
    train_tokenizer.sh) except where noted: MLP 2048-1024-512-256-128-64 -> e_dim 32, 4 levels of
    256 codes, AdamW lr 1e-3 / wd 1e-4, batch 1024, alpha 0.02 and beta 1e-4 (their best on
    Instruments), commitment weight mu 0.25, Sinkhorn (eps 0.003, 50 iterations) on the last level
    during training, K=10 codebook clusters for the diversity loss refreshed every epoch, collision
    evaluation every tenth of the epochs, seed 42. The authors train up to 20k epochs; `epochs`
    here is a CPU-friendly default. Two deviations:
    inputs are standardized (`standardize`), and the best-collision checkpoint is chosen from the
    second half of training (`best_from`).
    """

    section = "tokenizer"

    method: str = setting("letter", "letter: RQ-VAE with the collaborative and diversity terms; rqvae: the plain RQ-VAE "
                          "(alpha and beta set to 0); rqkmeans: residual k-means on the text embeddings (no training).",
                          choices=("letter", "rqvae", "rqkmeans"))
    pca_dim: int = setting(0, "rqkmeans: PCA-reduce the standardized embeddings to this many dims first (0: no PCA).",
                           low=0)
    # Model
    layers: list[int] = setting([2048, 1024, 512, 256, 128, 64], "MLP encoder widths (the decoder mirrors them).", low=1)
    e_dim: int = setting(32, "Latent/code dimension.", low=1)
    codebook_sizes: list[int] = setting([256, 256, 256, 256], "Codes per level, one entry per level.", low=2)
    dropout: float = setting(0.0, "MLP dropout.", low=0, high=1, high_open=True)
    batch_norm: bool = setting(False, "Batch norm between MLP layers.")
    # Center the text embeddings and scale them to unit mean square (one global factor) before the
    # encoder; not in the authors' code (their LLaMA features are large), needed for unit-norm ones.
    standardize: bool = setting(True, "Center the inputs and scale them to unit mean square first.")
    # Losses
    mu: float = setting(0.25, "Commitment weight.", low=0)
    alpha: float = setting(0.02, "Collaborative regularization weight (InfoNCE between z_hat and the CF embedding).", low=0)
    beta: float = setting(1e-4, "Code-assignment diversity regularization weight.", low=0)
    cf_temperature: float = setting(1.0, "InfoNCE temperature.", low=0, low_open=True)
    div_temperature: float = setting(1.0, "Diversity loss temperature.", low=0, low_open=True)
    clusters: int = setting(10, "Codebook clusters (K) for the diversity loss.", low=2)
    cluster_every: int = setting(1, "Epochs between cluster refreshes.", low=1)
    cf_projection: bool = setting(False, "CF dim != e_dim: learn a linear map e_dim -> CF dim for the collaborative "
                                  "term (else an error).")
    sinkhorn_epsilon: float = setting(0.003, "Sinkhorn-balanced last level during training: epsilon (0 disables).", low=0)
    sinkhorn_iters: int = setting(50, "Sinkhorn iterations.", low=1)
    # Codebook init: k-means++ seeding + Lloyd steps, level by level, on the initial encoder outputs.
    kmeans_iters: int = setting(100, "Lloyd steps of the codebook initialisation.", low=0)
    kmeans_balanced: bool = setting(False, "Size-bounded init clusters (at most ceil(2n/N) items per code).")
    # Optimization
    epochs: int = setting(200, "Training epochs (the authors use up to 20k).", low=1, may_change_on_resume=True)
    batch_size: int = setting(1024, "Items per batch (global, over all processes).", low=1)
    lr: float = setting(1e-3, "AdamW learning rate.", low=0, low_open=True)
    weight_decay: float = setting(1e-4, "AdamW weight decay.", low=0)
    seed: int = setting(42, "Random seed.", low=0, high=2**32 - 1)
    # The authors evaluate every 2,000 of 20,000 epochs. An evaluation is an encoder pass over all
    # items, a sixth of an epoch's work, so evaluating every epoch would cost ~17% of training.
    eval_every: int = setting(0, "Epochs between validations (collision rate: curve, model selection); 0: a tenth "
                              "of the epochs, the authors' cadence. The last epoch always validates.", low=0)
    # The authors first evaluate at 10% of training (epoch 2000 of 20000); in short CPU runs the
    # collision rate first rises while the encoder learns, so an early pick would be undertrained.
    best_from: float = setting(0.5, "Keep the lowest-collision checkpoint among evaluations from this fraction of the epochs on.",
                               low=0, high=1)
    checkpoint_every: int = setting(10, "Epochs between resumable checkpoints.", low=1, may_change_on_resume=True)
    device: str = setting("auto", "cpu, cuda, cuda:N or auto.", may_change_on_resume=True)
    # Codes
    collision_rounds: int = setting(20, "Sinkhorn re-assignment rounds for colliding groups (the authors').", low=0)
    unique: bool = setting(False, "Then move still-colliding items to the nearest unused code (unique identifiers).")

    # Settings a method never reads (selector -> value -> fields): given as options, they are an error.
    UNUSED_BY = {"method": {
        "letter": ("pca_dim",),
        "rqvae": ("pca_dim", "alpha", "beta", "cf_temperature", "div_temperature", "clusters", "cluster_every",
                  "cf_projection"),
        "rqkmeans": ("layers", "e_dim", "dropout", "batch_norm", "mu", "alpha", "beta", "cf_temperature",
                     "div_temperature", "clusters", "cluster_every", "cf_projection", "kmeans_balanced", "epochs",
                     "batch_size", "lr", "weight_decay", "eval_every", "best_from", "checkpoint_every"),
    }}

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    def for_method(self) -> "TokenizerConfig":
        """The settings the method actually uses: rqvae and rqkmeans have no collaborative or
        diversity term (alpha = beta = 0)."""
        return self if self.method == "letter" else self.replace(alpha=0.0, beta=0.0)

    def check(self) -> None:
        if len(self.codebook_sizes) > 26:
            self.fail("codebook_sizes", "may name at most 26 levels (tokens <a_..> to <z_..>)")
        diversity = self.method == "letter" and self.beta > 0  # the other methods have no diversity term
        if diversity and not 2 <= self.clusters <= min(self.codebook_sizes) // 2:
            self.fail("clusters", f"must be in [2, smallest codebook / 2] = [2, {min(self.codebook_sizes) // 2}] so every "
                      f"cluster can hold a positive besides the code itself, got {self.clusters}")
