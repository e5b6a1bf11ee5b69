"""File names of every run folder, in one place (docs/RUNS.md describes each layout)."""
from __future__ import annotations

import os


INTER_SUFFIX = ".inter.json"  # a LETTER dataset folder's <Name>.inter.json (its item text: <Name>.item.json)
ITEM_SUFFIX = ".item.json"


class RecRun:
    """A train-rec run folder (TIGER or LC-Rec)."""

    kind = "train-rec"
    INFO = "run.json"  # settings, data path, code source, token layout (written once)
    CODES = "codes.npy"  # item codes [num_items, L] the run was trained on (index version 0)
    CHECKPOINT = "checkpoint.pt"  # everything needed to resume
    TIGER_MODEL = "model.pt"  # TIGER: weights of the selected epoch
    LCREC_MODEL = "model"  # LC-Rec: the adapter folder of the selected epoch
    HISTORY = "history.json"
    SUMMARY = "summary.json"
    INDEX_VERSIONS = "index-versions"  # v<k>/codes.npy + v<k>/version.json, one per add-items


class TokenizerRun:
    """A train-tokenizer run folder."""

    kind = "tokenizer"
    MODEL = "model.pt"  # the selected weights + config, what load_tokenizer reads
    CODES = "codes.npy"
    CONFIG = "config.json"
    REPORT = "report.json"
    REPORT_MD = "report.md"
    CURVES = "curves.png"
    PREFIX_INDEX = "prefix_index.pt"
    CHECKPOINT = "checkpoint.pt"

    @staticmethod
    def index_json(name: str) -> str:
        """The authors'-format index <Name>.index.json."""
        return f"{name}.index.json"


def cf_output_paths(out_dir: str, name: str, dim: int, model: str = "sasrec") -> dict[str, str]:
    """train-cf's files in `out_dir`: embeddings .npy, metrics .json (its sidecar manifest), checkpoint."""
    stem = os.path.join(out_dir, f"{name}.cf-{model}{dim}")
    return {"embeddings": stem + ".npy", "metrics": stem + ".json", "checkpoint": stem + ".ckpt.pt"}


def embedding_stem(out_dir: str, name: str, tag: str) -> str:
    """`letter embed`'s <Name>.emb-<tag> (.npy + its sidecar .json) in `out_dir`."""
    return os.path.join(out_dir, f"{name}.emb-{tag}")


def reserved_names() -> set[str]:
    """Every file or folder name a run folder's layout uses (no other command may write them there)."""
    return {value for cls in (RecRun, TokenizerRun) for key, value in vars(cls).items()
            if key.isupper() and isinstance(value, str)}
