"""The pipeline's one configuration: every setting of every stage, with the authors' defaults.

A config file (YAML or JSON) holds any subset of the sections below; what it leaves out keeps its
default. Synthetic runs start from the SYNTHETIC_PRESET overrides (sized for a 2-core CPU),
runs with a preset from a named preset of PRESETS (`cpu`: one recipe for real datasets on a CPU),
before the file is applied.

    data:       history length, synthetic generator settings (DataSettings, letter.data.SyntheticSettings)
    embed:      text encoder for item embeddings (letter.embed.EmbedSettings)
    cf:         SASRec or LightGCN (letter.cf.CFConfig)
    tokenizer:  LETTER RQ-VAE (letter.tokenizer.TokenizerConfig)
    rec:        TIGER (letter.rec.RecConfig)
    evaluate:   split, beams, batch size, exclude_history (letter.rec.EvaluateSettings; the pipeline also
                measures the protocol with history items excluded)

Every section is a letter.settings.Settings class: its defaults, ranges and help are written
once there, and `letter config show` prints them.
"""
import copy
from dataclasses import dataclass

from letter.data.synth import SyntheticSettings
from letter.errors import LetterError, SettingError, input_error
from letter.settings import Settings, nested, setting
from letter.utils import read_mapping_file

SECTIONS = ("data", "embed", "cf", "tokenizer", "rec", "evaluate")


@dataclass
class DataSettings(Settings):
    """The pipeline's data section: the history length of the recommender's inputs and the
    generator's settings for the synthetic dataset."""

    section = "data"

    max_history: int = setting(20, "Most recent items of a history the recommender reads (rec.max_history).", low=1)
    synthetic: SyntheticSettings = nested(SyntheticSettings, "The generator's settings (used for the synthetic dataset).")


def section_classes() -> dict:
    """The Settings class of every section of the pipeline config."""
    from letter.cf import CFConfig
    from letter.embed import EmbedSettings
    from letter.rec import EvaluateSettings, RecConfig
    from letter.tokenizer import TokenizerConfig

    return {"data": DataSettings, "embed": EmbedSettings, "cf": CFConfig, "tokenizer": TokenizerConfig,
            "rec": RecConfig, "evaluate": EvaluateSettings}


def default_config() -> dict:
    """The full default config: every section's Settings defaults (the authors' where the paper has
    them), except that the pipeline's evaluation also measures the history-excluded protocol."""
    config = {name: cls().to_dict() for name, cls in section_classes().items()}
    config["evaluate"]["exclude_history"] = True  # the report shows both protocols side by side
    return config


# Sized so that a synthetic pipeline run finishes in minutes on a 2-core CPU.
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
        raise SettingError("preset", f": unknown preset {name!r} (known: {', '.join(sorted(PRESETS))})")
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
        raise input_error("config_file", config_file, str(e)) from None


def validate_config(cfg: dict) -> dict:
    """Every section checked by its Settings class (one LetterError naming section and key)."""
    for name, cls in section_classes().items():
        cls.from_dict(cfg[name])
    return cfg


def dump_yaml(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
