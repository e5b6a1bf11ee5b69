"""Item code files in the LETTER authors' format: {"<item id>": ["<a_12>", "<b_201>", ...]}."""
import re
import string

import numpy as np

from letter.errors import DataError, LetterError
from letter.runs import parse_json, read_text, write_json

_TOKEN = re.compile(r"<([a-z])_([0-9]+)>")
MAX_CODE = 2**63 - 1  # codes are int64
LEVEL_LETTERS = string.ascii_lowercase


def read_index_json(path: str, num_items: int | None = None) -> np.ndarray:
    """Codes as int64 [I, L]; row i is the item with id "i". Level l must use letter l (a, b, ...).
    With num_items, ids 0..num_items-1 must all be present and no others."""
    try:
        raw = parse_json(read_text(path), path)
    except LetterError as e:
        raise DataError(f"cannot read index json: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a non-empty object {{item id: [tokens]}}")
    rows: dict[int, list[int]] = {}
    levels = None
    for key, tokens in raw.items():
        if not (key.isascii() and key.isdigit() and str(int(key)) == key):  # "01" would overwrite "1"
            raise DataError(f"{path}: key {key!r} is not a non-negative integer item id")
        if not isinstance(tokens, list) or not tokens:
            raise DataError(f"{path}: key {key!r}: expected a non-empty list of tokens")
        if levels is None:
            levels = len(tokens)
            if levels > len(LEVEL_LETTERS):
                raise DataError(f"{path}: key {key!r} has {levels} tokens, at most {len(LEVEL_LETTERS)} (levels a..z)")
        elif len(tokens) != levels:
            raise DataError(f"{path}: key {key!r} has {len(tokens)} tokens, expected {levels}")
        codes = []
        for level, token in enumerate(tokens):
            m = _TOKEN.fullmatch(token) if isinstance(token, str) else None
            if m is None or m.group(1) != LEVEL_LETTERS[level] or int(m.group(2)) > MAX_CODE:
                raise DataError(
                    f"{path}: key {key!r}: token {token!r} at level {level} is not "
                    f"'<{LEVEL_LETTERS[level]}_N>' (N from 0 to {MAX_CODE})"
                )
            codes.append(int(m.group(2)))
        rows[int(key)] = codes
    expected = num_items if num_items is not None else len(rows)
    missing = [i for i in range(expected) if i not in rows]
    if missing:
        raise DataError(f"{path}: missing item id(s) {missing[:5]} ({len(missing)} of {expected})")
    if len(rows) != expected:
        extra = sorted(k for k in rows if k >= expected)
        raise DataError(f"{path}: unexpected item id(s) {extra[:5]} (expected ids 0..{expected - 1})")
    return np.array([rows[i] for i in range(expected)], dtype=np.int64)


def write_index_json(path: str, codes) -> None:
    """Write codes [I, L] (array-like of non-negative ints) in the authors' format, atomically."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] > len(LEVEL_LETTERS):
        raise ValueError(f"codes must be [items, levels<=26], got shape {codes.shape}")
    if codes.size and codes.min() < 0:
        raise ValueError("codes must be non-negative")
    obj = {
        str(i): [f"<{LEVEL_LETTERS[l]}_{c}>" for l, c in enumerate(row)] for i, row in enumerate(codes.tolist())
    }
    write_json(path, obj, indent=None)
