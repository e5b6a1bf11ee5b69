"""Inputs of the recommender: the dataset's leave-one-out split turned into token tensors.

Encoder input: the codes of the last <= max_history history items, flattened in time order, then
EOS, right-padded with PAD. Decoder: BOS + the target's first L-1 tokens, predicting its L tokens
(no EOS: every identifier has exactly L tokens, and decoding stops after L steps).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from letter.data import Dataset, Split, leave_one_out, load_dataset, read_index_json
from letter.data.cold import check_no_cold_training, read_cold_split
from letter.errors import DataError, LetterError

from .model import BOS, EOS, PAD, TokenLayout

ENCODE_CHUNK = 65536  # histories turned into encoder tokens at a time (a few MB of int64 per chunk)


def _index_json_codes(path: str, dataset: Dataset) -> np.ndarray:
    """Rows of an authors'-format index (keyed by original item id) in the dataset's item order."""
    raw = read_index_json(path)
    try:
        rows = [int(i) for i in dataset.item_ids]
    except ValueError:
        raise DataError(f"{path}: index files are keyed by integer item ids, but {dataset.source} has "
                        f"non-integer ids such as {dataset.item_ids[0]!r}") from None
    missing = [i for i in rows if not 0 <= i < raw.shape[0]]
    if missing:
        raise DataError(f"{path}: no codes for item id(s) {missing[:5]} of {dataset.source} ({len(missing)} missing)")
    return raw[rows]


def codes_sha(codes: np.ndarray) -> str:
    """sha256 of item codes as int64 (what run.json and comparisons key a code set on)."""
    return hashlib.sha256(np.ascontiguousarray(codes, dtype=np.int64).tobytes()).hexdigest()


def resolve_codes(codes, dataset: Dataset, cold: dict | None = None, what: str = "codes",
                  prefix: bool = False) -> tuple[np.ndarray, str]:
    """Item codes [num_items, L] from an array, an index .json, a codes .npy, or a tokenizer run
    folder (its codes.npy, else its single <Name>.index.json). Returns (codes, description).
    On a cold split (`cold`, its cold_split.json record) the codes cover the warm items 0..W-1 only.
    prefix: codes of items 0..M-1 for any M <= num_items (a trained run's index on a catalog that
    grew since). `what`: the argument messages name a run folder by ("" when the caller names it;
    see input_error)."""
    source = "array"
    if isinstance(codes, (str, os.PathLike)):
        path = os.fspath(codes)
        source = os.path.abspath(path)
        if os.path.isdir(path):
            from letter.runs import TokenizerRun, check_inputs, files_matching, run_kind

            if run_kind(path) is not None:
                from letter.tokenizer.inference import check_tokenizer_run

                manifest = check_tokenizer_run(path, what)  # a run folder: a finished tokenizer run, not mixed
                check_inputs(f"the tokenizer run {what} {path}".replace("  ", " "), manifest["inputs"],
                             {"items": (dataset.items_fingerprint(), f"the dataset {dataset.source}")},
                             names=(what,) if what else ())
            if os.path.exists(os.path.join(path, TokenizerRun.CODES)):
                path = os.path.join(path, TokenizerRun.CODES)
            else:
                found = files_matching(path, "*.index.json")
                if len(found) != 1:
                    raise LetterError(f"{path}: expected codes.npy or exactly one <Name>.index.json, found {len(found)} index files")
                path = found[0]
        if path.endswith(".json"):
            codes = _index_json_codes(path, dataset)
        elif path.endswith(".npy"):
            try:
                codes = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise DataError(f"{path}: cannot read codes: {e}") from e
        elif not os.path.exists(path):
            raise LetterError(f"{path}: no such codes file or tokenizer run folder")
        else:
            raise LetterError(f"{path}: codes must be an index .json, a codes .npy or a tokenizer run folder")
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] < 1 or not np.issubdtype(codes.dtype, np.integer):
        raise DataError(f"{source}: codes must be an integer array [num_items, levels], got {codes.dtype} {codes.shape}")
    if prefix:
        if codes.shape[0] > dataset.num_items:
            raise DataError(f"{source}: codes cover {codes.shape[0]} items but {dataset.source} has "
                            f"{dataset.num_items}")
    elif cold is not None and codes.shape[0] != cold["warm_items"]:
        raise DataError(f"{source}: codes cover {codes.shape[0]} items but the cold split {dataset.source} has "
                        f"{cold['warm_items']} warm items; a recommender on a cold split trains on the warm items' "
                        "codes only (a tokenizer trained on the split folder), cold items come in with `letter add-items`")
    elif cold is None and codes.shape[0] != dataset.num_items:
        raise DataError(f"{source}: codes cover {codes.shape[0]} items but {dataset.source} has {dataset.num_items}")
    if codes.min() < 0:
        raise DataError(f"{source}: codes must be non-negative")
    return codes.astype(np.int64), source


@dataclass
class RecData:
    dataset: Dataset
    split: Split
    codes: np.ndarray  # [num_items, L]; a cold split's or an index version's: [M <= num_items, L]
    layout: TokenLayout
    source: str
    codes_source: str
    item_tokens: torch.Tensor = field(init=False)  # [num_items, L] token ids
    index_version: int = 0  # which version of the run's index `codes` is (letter.rec.index_versions)

    def __post_init__(self):
        self.item_tokens = torch.from_numpy(self.layout.item_tokens(self.codes))

    def with_index(self, codes: np.ndarray, version: int) -> "RecData":
        """This data with the codes of another index version (same token layout): items 0..M-1."""
        return dataclasses.replace(self, codes=np.asarray(codes, dtype=np.int64), index_version=version)

    @property
    def num_levels(self) -> int:
        return self.codes.shape[1]

    def run_info(self, config, out_dir: str | None = None) -> dict:
        """run.json: settings and inputs; with `out_dir`, also the dataset's path relative to the run
        folder ("data_relative", preferred when the folder is moved or copied along with its data)."""
        extra = {}
        if out_dir is not None and os.path.exists(self.source):
            extra["data_relative"] = os.path.relpath(self.source, os.path.abspath(out_dir))
        return {
            "config": config.to_dict(),
            "data": self.source,
            **extra,
            "codes_source": self.codes_source,
            "codes_sha": codes_sha(self.codes),
            "data_sha": self.dataset.fingerprint(),
            "num_items": int(self.codes.shape[0]),
            "level_sizes": list(self.layout.level_sizes),
            "vocab_offsets": list(self.layout.offsets),
        }

    @property
    def token_dtype(self) -> torch.dtype:
        """The narrowest integer type holding every token id: training samples are stored in it
        (int16 for vocabularies up to 32,768 tokens, a quarter of int64's bytes) and widened per batch."""
        return torch.int16 if self.layout.vocab_size <= 1 << 15 else torch.int32

    def encode(self, histories: list[list[int]], dtype: torch.dtype = torch.long) -> torch.Tensor:
        """Encoder token ids [N, max_history * L + 1] as `dtype`, built ENCODE_CHUNK rows at a time
        (vectorized: a million users' samples are millions of rows)."""
        levels, keep = self.num_levels, self.split.max_history
        width = keep * levels + 1
        out = torch.full((len(histories), width), PAD, dtype=dtype)
        item_tokens = self.item_tokens.numpy()
        for start in range(0, len(histories), ENCODE_CHUNK):
            tails = [history[-keep:] for history in histories[start:start + ENCODE_CHUNK]]
            lengths = np.fromiter(map(len, tails), dtype=np.int64, count=len(tails))
            items = np.fromiter(itertools.chain.from_iterable(tails), dtype=np.int64, count=int(lengths.sum()))
            rows = np.repeat(np.arange(len(tails)), lengths)
            position = np.arange(items.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # within the history
            block = np.full((len(tails), width), PAD, dtype=np.int64)
            block[rows[:, None], position[:, None] * levels + np.arange(levels)] = item_tokens[items]
            block[np.arange(len(tails)), lengths * levels] = EOS
            out[start:start + len(tails)] = torch.from_numpy(block)
        return out

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder tokens [N, S], target tokens [N, L]) of every training sample, both in
        token_dtype (compact: N is about 5.5 per user); widen a batch with .long()."""
        dtype = self.token_dtype
        enc = self.encode([h for h, _ in self.split.train], dtype)
        targets = torch.from_numpy(np.fromiter((t for _, t in self.split.train), dtype=np.int64, count=len(self.split.train)))
        return enc, self.item_tokens[targets].to(dtype)

    def _sample(self, part: str, max_users: int, seed: int) -> list:
        samples = self.split.part(part)
        return [samples[i] for i in self.split.sample_rows(part, max_users, seed)]

    def eval_seen_items(self, part: str, max_users: int = 0, seed: int = 0) -> list[list[int]]:
        """Every item each evaluated user interacted with before the target (the whole history,
        not only the last max_history items the model reads), in the order of eval_tensors."""
        return self.split.seen_items(self.dataset, part, self.split.sample_rows(part, max_users, seed))

    def eval_tensors(self, part: str, max_users: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder tokens [U, S], target item ids [U]) of `part`, or of a fixed random sample of
        max_users of its users (0 = all)."""
        samples = self._sample(part, max_users, seed)
        return self.encode([h for h, _ in samples]), torch.tensor([t for _, t in samples], dtype=torch.long)

    def history_tensor(self, histories: list[list[int]]) -> torch.Tensor:
        """Item ids of the last <= max_history items of each history [N, max_history], oldest first,
        right-padded with -1 (the input form of models that build their own prompts, LC-Rec)."""
        out = torch.full((len(histories), self.split.max_history), -1, dtype=torch.long)
        for row, history in enumerate(histories):
            kept = list(history)[-self.split.max_history:]
            out[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        return out

    def train_histories(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(item-id histories [N, max_history] (-1 padded), target item ids [N]) of every training sample."""
        return (self.history_tensor([h for h, _ in self.split.train]),
                torch.tensor([t for _, t in self.split.train], dtype=torch.long))

    def eval_histories(self, part: str, max_users: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """As eval_tensors, with item-id histories [U, max_history] (-1 padded) in place of tokens."""
        samples = self._sample(part, max_users, seed)
        return self.history_tensor([h for h, _ in samples]), torch.tensor([t for _, t in samples], dtype=torch.long)

    @staticmethod
    def decoder_inputs(labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: BOS followed by all but the last target token."""
        bos = torch.full_like(labels[:, :1], BOS)
        return torch.cat([bos, labels[:, :-1]], dim=1)


def drop_trailing_padding(enc: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns that are PAD in every row (inputs are right-padded): the model's
    outputs for the real tokens do not change (pads are masked keys), only the work shrinks."""
    lengths = (enc != PAD).sum(1)
    return enc[:, : max(1, int(lengths.max())) if lengths.numel() else 1]


def input_lengths(enc: torch.Tensor) -> torch.Tensor:
    """Real (non-PAD) tokens per row of encoder inputs [N, S]."""
    return (enc != PAD).sum(1)


def load_rec_data(data, codes, max_history: int, prefix: bool = False) -> RecData:
    """`data`: a dataset path (any format `letter.data.load_dataset` reads) or a Dataset. A cold
    split (letter.data.cold) is refused when a cold item is in its training or validation data.
    prefix: `codes` may cover only the first items (see resolve_codes)."""
    if isinstance(data, Dataset):
        dataset, source = data, data.source
    else:
        dataset, source = load_dataset(os.fspath(data)), os.path.abspath(os.fspath(data))
    cold = read_cold_split(dataset)
    check_no_cold_training(dataset, cold, grown=prefix)
    codes, codes_source = resolve_codes(codes, dataset, cold, prefix=prefix)
    layout = TokenLayout(tuple(int(c) + 1 for c in codes.max(axis=0)))
    return RecData(dataset, leave_one_out(dataset, max_history), codes, layout, source, codes_source)
