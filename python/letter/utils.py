"""Small shared helpers: progress bars, plots, config-file reading (file writers live in letter.runs)."""
import os

from letter.errors import LetterError
from letter.runs.files import parse_json, parse_yaml, read_text


def progress(iterable=None, **kwargs):
    """A tqdm progress bar that stays quiet when output is not a terminal unless forced by LETTER_PROGRESS=1."""
    from tqdm.auto import tqdm

    disable = kwargs.pop("disable", None)
    if disable is None:
        forced = os.environ.get("LETTER_PROGRESS")
        disable = (forced == "0") if forced is not None else None  # None: tqdm decides (off for non-tty)
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None when matplotlib is not installed
    (plots are optional: the `plots` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def read_mapping_file(path: str) -> dict:
    """A config file whose top level is a mapping: JSON for *.json, YAML otherwise; {} if empty.
    Strictly parsed (duplicate keys, undecodable text and too-deep nesting are errors)."""
    if not os.path.isfile(path):
        raise LetterError(f"config file not found: {path}")
    text = read_text(path)
    data = parse_json(text, path) if path.endswith(".json") else parse_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LetterError(f"{path}: the top level must be a mapping of setting -> value")
    return data
