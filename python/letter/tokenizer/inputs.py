"""What a tokenizer trains on, found and checked beside its dataset: the stage preparation that
`letter train-tokenizer` and the pipeline's tokenizer stage share.

    inputs = prepare_tokenizer_inputs("data/Scientific", TokenizerConfig())
    report = inputs.train("runs/tokenizer-Scientific")
"""
from __future__ import annotations

import dataclasses
import glob
import os
import warnings
from typing import Callable

import numpy as np

from letter.errors import LetterError, LetterWarning
from letter.runs import files_matching

from .config import TokenizerConfig
from .train import train_tokenizer


@dataclasses.dataclass
class TokenizerInputs:
    """A tokenizer's inputs: `config` as it will train (alpha 0 without CF embeddings), the rows of
    the text and CF embeddings it trains on (a cold split's warm items only), the dataset's name,
    category labels and item fingerprint, and the embedding files they were read from."""

    config: TokenizerConfig
    text_emb: np.ndarray
    cf_emb: np.ndarray | None
    name: str
    num_items: int
    item_labels: np.ndarray | None
    made_from: dict
    text_path: str
    cf_path: str | None

    def train(self, out_dir: str, *, resume: bool = False, overwrite: bool = False) -> dict:
        """train_tokenizer on these inputs into `out_dir`; its report (empty on other torchrun ranks)."""
        return train_tokenizer(self.config, self.text_emb, self.cf_emb, out_dir, name=self.name,
                               num_items=self.num_items, resume=resume, overwrite=overwrite,
                               item_labels=self.item_labels, made_from=self.made_from)


def find_beside(data_dir: str, pattern: str, what: str) -> str | None:
    """The single file matching `pattern` in the dataset folder, None if none; several are an error
    (which one is meant cannot be guessed)."""
    hits = files_matching(data_dir, pattern)
    if len(hits) > 1:
        raise LetterError(f"several {what} files in {data_dir} ({', '.join(map(os.path.basename, hits))}); pick one")
    return hits[0] if hits else None


def prepare_tokenizer_inputs(data_dir: str, config: TokenizerConfig, text_emb: str | None = None,
                             cf_emb: str | None = None, *, alpha_fallback: bool = False,
                             log: Callable[[str], None] = print) -> TokenizerInputs:
    """Read and check what a tokenizer run on the dataset `data_dir` trains on.

    text_emb / cf_emb: .npy paths; by default the one <Name>.emb-*.npy / <Name>.cf-*.npy in the
    dataset's folder (`letter embed` / `letter train-cf` write them there). CF embeddings are read
    for the methods that have a collaborative term or report one (not rqkmeans). Without any and
    with alpha > 0: `alpha_fallback` trains with alpha 0 after a LetterWarning; otherwise a
    LetterError naming alpha. Embeddings whose sidecar records another dataset are refused. On a
    cold split (cold_split.json beside the data) only the warm items' rows and labels are used, and
    `log` says so. The embeddings are checked against the dataset when training starts.
    """
    from letter.data import load_dataset
    from letter.data.cold import read_cold_split, warm_rows
    from letter.data.readers import dataset_dir
    from letter.runs import check_sidecar, load_npy

    dataset = load_dataset(data_dir)
    folder = dataset_dir(data_dir)
    text_emb = text_emb or find_beside(folder, f"{glob.escape(dataset.name)}.emb-*.npy", "text embedding")
    if text_emb is None:
        raise LetterError(f"no text_emb given and no {dataset.name}.emb-*.npy in {data_dir} (run `letter embed`)",
                          "text_emb")
    if config.method == "rqkmeans":  # text embeddings only
        cf_emb = None
    else:
        cf_emb = cf_emb or find_beside(folder, f"{glob.escape(dataset.name)}.cf-*.npy", "CF embedding")
    if cf_emb is None and config.for_method().alpha > 0:
        if not alpha_fallback:
            raise LetterError(f"alpha needs CF embeddings (cf_emb, or one {dataset.name}.cf-*.npy in data_dir)",
                              "alpha", "cf_emb", "data_dir")
        warnings.warn(LetterWarning(f"no CF embeddings (cf_emb, {dataset.name}.cf-*.npy): training with alpha 0",
                                    "cf_emb"), stacklevel=2)
        config = config.replace(alpha=0.0)
    made_from = {"items": (dataset.items_fingerprint(), ("data_dir", data_dir)),  # text: rows = items
                 "dataset": (dataset.fingerprint(), ("data_dir", data_dir))}  # CF: also the interactions
    check_sidecar(text_emb, "text embedding", made_from)
    if cf_emb:
        check_sidecar(cf_emb, "CF embedding", made_from)
    categories = dataset.category_labels()
    cold = read_cold_split(data_dir)  # a cold split: train on the warm items only
    if cold is not None:
        log(f"cold split: training on the {cold['warm_items']} warm items, {len(cold['cold_items'])} cold items "
            "left for `letter add-items`")
        if categories is not None:
            categories = categories[: cold["warm_items"]]
    return TokenizerInputs(
        config=config,
        text_emb=warm_rows(load_npy(text_emb, "text_emb", mmap=True), cold, text_emb),
        cf_emb=warm_rows(load_npy(cf_emb, "cf_emb"), cold, cf_emb) if cf_emb else None,
        name=dataset.name,
        num_items=cold["warm_items"] if cold is not None else dataset.num_items,
        item_labels=categories,
        made_from={"items": dataset.items_fingerprint()},
        text_path=text_emb,
        cf_path=cf_emb,
    )
