"""Readers: LETTER/LC-Rec folders, P5 sequential_data.txt and raw Amazon review dumps -> Dataset."""
import ast
import gzip
import html
import json
import os
import re
import warnings
from collections import Counter, defaultdict

from letter.data.dataset import TEXT_FIELDS, Dataset, build_dataset
from letter.errors import DataError, LetterError, LetterWarning
from letter.runs import (INTER_SUFFIX, ITEM_SUFFIX, check_file_name, files_matching, parse_json, read_text,
                         write_json)
from letter.utils import progress

P5_FILE = "sequential_data.txt"


def _read_json(path: str):
    """Strictly parsed (letter.runs.parse_json: duplicate keys, undecodable text, deep nesting)."""
    try:
        return parse_json(read_text(path), path)
    except LetterError as e:
        raise DataError(str(e).replace(": not valid JSON (", ": malformed json (", 1)) from None


def _is_id(value) -> bool:
    """An integer or a non-empty string: bool (an int subclass) is refused with None, floats, lists, ..."""
    return not isinstance(value, bool) and isinstance(value, (int, str)) and str(value) != ""


def _id(value, path: str, key: str) -> str:
    if not _is_id(value):
        raise DataError(f"{path}: key {key!r}: item id {value!r} is not an integer or non-empty string")
    return str(value)


def _dataset_name(name: str | None, default: str) -> str:
    """The name a reader gives its dataset: `name`, refused before any reading when it is no file
    name (an empty one used to fall back to the default silently), or `default` when it is None."""
    return default if name is None else check_file_name(name, "name")


# ---------------------------------------------------------------- LETTER / LC-Rec folder


def _letter_files(path: str) -> tuple[str, str, str | None]:
    """(name, inter.json path, item.json path or None) for a folder or an inter.json file."""
    if os.path.isdir(path):
        found = files_matching(path, "*" + INTER_SUFFIX)
        if len(found) != 1:
            raise DataError(f"{path}: expected exactly one *{INTER_SUFFIX} file, found {len(found)}")
        inter = found[0]
    elif path.endswith(INTER_SUFFIX):
        inter = path
    else:  # the name is the file name less the suffix
        raise DataError(f"{path}: not a <Name>{INTER_SUFFIX} file (a LETTER dataset's interactions)")
    name = os.path.basename(inter)[: -len(INTER_SUFFIX)]
    item = os.path.join(os.path.dirname(inter), name + ITEM_SUFFIX)
    return name, inter, item if os.path.exists(item) else None


def read_letter(path: str, name: str | None = None) -> Dataset:
    """A LETTER/LC-Rec folder: <Name>.inter.json {user: [item ids]} and optional <Name>.item.json
    (the dataset is called `name`, default Name)."""
    file_name, inter_path, item_path = _letter_files(path)
    name = _dataset_name(name, file_name)
    raw = _read_json(inter_path)
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{inter_path}: expected a non-empty object {{user id: [item ids]}}")
    user_items = {}
    for user, items in raw.items():
        if not isinstance(items, list) or not items:
            raise DataError(f"{inter_path}: key {user!r}: expected a non-empty list of item ids")
        user_items[user] = [_id(i, inter_path, user) for i in items]
    item_text = None
    if item_path is not None:
        raw_text = _read_json(item_path)
        if not isinstance(raw_text, dict):
            raise DataError(f"{item_path}: expected an object {{item id: {{title, description, ...}}}}")
        for key, fields in raw_text.items():
            if not isinstance(fields, dict):
                raise DataError(f"{item_path}: key {key!r}: expected an object of text fields")
        item_text = raw_text
    return build_dataset(name, user_items, item_text, source=inter_path)


def write_letter(dataset: Dataset, out_dir: str) -> str:
    """Write <Name>.inter.json (+ <Name>.item.json) with internal ids as keys; returns the folder.

    Internal ids are written (not the originals) so index and embedding files, whose row i is
    item i, line up with the ids in the files. The item text goes first: <Name>.inter.json makes
    the folder a dataset, so a failed write never leaves one without its text."""
    if dataset.item_text is not None:
        items = {str(i): fields for i, fields in enumerate(dataset.item_text)}
        write_json(os.path.join(out_dir, dataset.name + ITEM_SUFFIX), items)
    inter = {u: seq for u, seq in zip(dataset.user_ids, dataset.sequences)}
    write_json(os.path.join(out_dir, dataset.name + INTER_SUFFIX), inter, indent=None)
    return out_dir


def prepare_dataset_output(out_dir: str, name: str, *, overwrite: bool = False, inputs: dict | None = None,
                           extra: tuple[str, ...] = (), kind: str = "dataset") -> None:
    """Before a command writes the dataset `name` into `out_dir` (plus `extra` file names there,
    written before the dataset, whose <Name>.inter.json comes last): refuse a folder holding a run or another dataset (a LETTER folder holds one), an
    output that is one of the command's `inputs` (argument -> list of paths), and that dataset's
    files already there unless overwrite (then they are removed)."""
    from letter.runs import check_file_name, check_not_input, held_datasets, prepare_output_files

    check_file_name(name, "name")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise LetterError(f"{out_dir}: not a folder")
    others = [found for found in held_datasets(out_dir) if found != name + INTER_SUFFIX]
    if others:
        raise LetterError(f"{out_dir}: holds another dataset ({others[0]}; a dataset folder holds one); "
                          "choose another folder")
    # in the order written (write_letter: the item text, then the interactions that make the folder a dataset)
    files = [os.path.join(out_dir, n) for n in (*extra, name + ITEM_SUFFIX, name + INTER_SUFFIX)]
    for option, paths in (inputs or {}).items():
        for path in paths:
            for file in files:
                check_not_input(file, {option: path}, what="output")
    prepare_output_files(files, kind, overwrite=overwrite, what="output folder")  # also refuses a run folder


# ---------------------------------------------------------------- P5


def read_p5(path: str, name: str | None = None) -> Dataset:
    """P5 `sequential_data.txt`: one line per user, `user item item ...` (1-based integer ids)."""
    file = os.path.join(path, P5_FILE) if os.path.isdir(path) else path
    name = _dataset_name(name, os.path.basename(os.path.dirname(os.path.abspath(file))) or "p5")
    user_items: dict[str, list[str]] = {}
    try:
        with open(file, encoding="utf-8-sig") as f:  # a byte order mark is no part of the first id
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 2:
                    raise DataError(f"{file}: line {lineno}: user {parts[0]!r} has no items")
                bad = [p for p in parts if not (p.isascii() and p.isdigit())]  # int() refuses "²"
                if bad:
                    raise DataError(f"{file}: line {lineno}: id {bad[0]!r} is not a positive integer")
                if parts[0] in user_items:
                    raise DataError(f"{file}: line {lineno}: duplicate user {parts[0]!r}")
                user_items[parts[0]] = parts[1:]
    except OSError as e:
        raise DataError(f"{file}: cannot read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text (byte {e.start} of a block); save it as UTF-8") from None
    if not user_items:
        raise DataError(f"{file}: no users")
    return build_dataset(name, user_items, None, source=file)


# ---------------------------------------------------------------- raw Amazon dumps


def _open_text(path: str):
    # utf-8-sig: a byte order mark is no part of the first record (as for the JSON files, read_text)
    return gzip.open(path, "rt", encoding="utf-8-sig") if path.endswith(".gz") else open(path, encoding="utf-8-sig")


def _json_lines(path: str):
    """Records of a json-lines dump; the 2014 dumps hold Python dict literals, so fall back to those."""
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    try:
                        record = ast.literal_eval(line)
                    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                        raise DataError(f"{path}: line {lineno}: not a json/dict record") from e
                except RecursionError:
                    raise DataError(f"{path}: line {lineno}: nested too deeply to read") from None
                yield lineno, record
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def clean_text(value) -> str:
    """Text field -> one clean line: lists joined, html entities decoded, tags dropped."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(clean_text(v) for v in value)
    text = _TAG.sub(" ", html.unescape(str(value)))
    return _SPACE.sub(" ", text).strip()


def _categories(meta: dict) -> str:
    # 2018 dumps: "category": [..]; 2014 dumps: "categories": [[..], ..] (we keep the first path)
    cats = meta.get("category")
    if cats is None:
        cats = meta.get("categories") or []
        cats = cats[0] if isinstance(cats, list) and cats and isinstance(cats[0], list) else cats
    if not isinstance(cats, (list, tuple)):  # one category as a string or number, not a list of them
        cats = [cats]
    return ",".join(c for c in (clean_text(c) for c in cats) if c)


def k_core(user_items: dict[str, list[str]], k: int) -> dict[str, list[str]]:
    """Repeatedly drop users and items with fewer than k interactions until none is left."""
    while True:
        counts = Counter(i for items in user_items.values() for i in items)
        kept = {}
        for user, items in user_items.items():
            items = [i for i in items if counts[i] >= k]
            if len(items) >= k:
                kept[user] = items
        if kept == user_items:
            return kept
        user_items = kept


def _amazon_files(path: str) -> tuple[str, str | None]:
    if not os.path.isdir(path):
        return path, None
    files = files_matching(path, "*.json*")
    meta = [f for f in files if os.path.basename(f).startswith("meta_")]
    reviews = [f for f in files if f not in meta and f.endswith((".json.gz", ".json", ".jsonl", ".jsonl.gz"))]
    if len(reviews) != 1 or len(meta) > 1:
        raise DataError(
            f"{path}: expected one review dump and at most one meta_* file, found "
            f"{len(reviews)} review and {len(meta)} meta file(s)"
        )
    return reviews[0], (meta[0] if meta else None)


def _dump_name(review_path: str) -> str:
    base = os.path.basename(review_path)
    for ext in (".gz", ".jsonl", ".json"):
        base = base[: -len(ext)] if base.endswith(ext) else base
    return re.sub(r"(^reviews_|_5$)", "", base) or "amazon"


def read_amazon(path: str, meta_path: str | None = None, k: int = 5, name: str | None = None) -> Dataset:
    """Raw Amazon reviews (json lines with reviewerID, asin, unixReviewTime; .gz or plain) and an
    optional meta_*.json.gz. `path` may be the review file or a folder with both. Repeated
    (user, item) pairs keep the first; ties in time keep file order; then k-core filtering. A line
    without reviewerID, asin (each an integer or a non-empty string) or unixReviewTime is refused."""
    review_path, found_meta = _amazon_files(path)
    name = _dataset_name(name, _dump_name(review_path))
    meta_path = meta_path or found_meta
    events: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for order, (lineno, record) in enumerate(progress(_json_lines(review_path), desc="reviews", unit=" lines")):
        try:
            user, item, time = record["reviewerID"], record["asin"], int(record["unixReviewTime"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"{review_path}: line {lineno}: needs reviewerID, asin and integer unixReviewTime ({e!r})"
            ) from e
        for key, value in (("reviewerID", user), ("asin", item)):  # a null one would become the id "None"
            if not _is_id(value):
                raise DataError(f"{review_path}: line {lineno}: {key} {value!r} is not an integer or non-empty string")
        events[str(user)].append((time, order, str(item)))
    user_items = {}
    for user, evs in events.items():
        seen, items = set(), []
        for _, _, item in sorted(evs):
            if item not in seen:
                seen.add(item)
                items.append(item)
        user_items[user] = items
    before = len(user_items)
    user_items = k_core(user_items, k)
    if not user_items:
        raise DataError(f"{review_path}: no user is left after {k}-core filtering ({before} before)")
    item_text = _read_meta(meta_path, user_items) if meta_path else None
    return build_dataset(name, user_items, item_text, source=review_path)


def _read_meta(meta_path: str, user_items: dict[str, list[str]]) -> dict[str, dict]:
    """Text of the interacted items; items without a meta record get empty fields (counted in a warning)."""
    wanted = {i for items in user_items.values() for i in items}
    text = {}
    for lineno, record in _json_lines(meta_path):
        if not isinstance(record, dict) or "asin" not in record:
            raise DataError(f"{meta_path}: line {lineno}: record has no 'asin'")
        item = str(record["asin"])
        if item in wanted:
            text[item] = {
                "title": clean_text(record.get("title")),
                "description": clean_text(record.get("description")),
                "brand": clean_text(record.get("brand")),
                "categories": _categories(record),
            }
    missing = wanted - set(text)
    if missing:
        warnings.warn(LetterWarning(f"{meta_path}: {len(missing)} item(s) have no meta record; their text is empty"),
                      stacklevel=3)
        for item in missing:
            text[item] = dict.fromkeys(TEXT_FIELDS, "")
    return text


# ---------------------------------------------------------------- format detection


def dataset_dir(path: str) -> str:
    """The folder a dataset path lives in (the default place for a stage's outputs)."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))

FORMATS = ("auto", "letter", "p5", "amazon")


def detect_format(path: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if files_matching(path, "*" + INTER_SUFFIX):
            return "letter"
        if os.path.exists(os.path.join(path, P5_FILE)):
            return "p5"
        if files_matching(path, "*.json*"):
            return "amazon"
    elif path.endswith(INTER_SUFFIX):
        return "letter"
    elif path.endswith(".txt"):
        return "p5"
    elif path.endswith((".json.gz", ".json", ".jsonl", ".jsonl.gz")):
        return "amazon"
    raise DataError(
        f"{path}: cannot tell the format: expected a folder with <Name>{INTER_SUFFIX}, a P5 "
        f"{P5_FILE}, or an Amazon review dump (.json[.gz]/.jsonl)"
    )


def source_files(path: str, format: str = "auto") -> list[str]:
    """Absolute paths of the files `load_dataset(path, format)` reads (to fingerprint a dataset)."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "letter":
        _, inter, item = _letter_files(path)
        files = [inter, item]
    elif fmt == "p5":
        files = [os.path.join(path, P5_FILE) if os.path.isdir(path) else path]
    elif fmt == "amazon":
        files = list(_amazon_files(path))
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return [os.path.abspath(f) for f in files if f is not None]


def load_dataset(path: str, format: str = "auto", k: int = 5, name: str | None = None) -> Dataset:
    """Read any supported format (auto-detected by default). `k` (k-core) applies to raw Amazon dumps;
    `name` names the dataset (default: from the file or folder name; an empty one is refused)."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "letter":
        return read_letter(path, name=name)
    if fmt == "p5":
        return read_p5(path, name=name)
    if fmt == "amazon":
        return read_amazon(path, k=k, name=name)
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
