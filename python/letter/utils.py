"""Small shared helpers: atomic file writes, progress bars, config-file reading."""
import contextlib
import glob
import json
import os
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch

from letter.errors import LetterError


STALE_TEMP_SECONDS = 600  # a temporary file this old was left by a killed write


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_if_stale(paths, max_age: float) -> list[str]:
    """Delete those of `paths` not modified for `max_age` seconds; returns the removed ones."""
    removed = []
    now = time.time()
    for path in paths:
        with contextlib.suppress(OSError):
            if now - os.stat(path).st_mtime > max_age:
                os.remove(path)
                removed.append(path)
    return removed


def remove_stale_temps(directory: str, prefix: str = ".tmp-", max_age: float = STALE_TEMP_SECONDS) -> list[str]:
    """Delete `prefix`* files in `directory` (recursively) not modified for `max_age` seconds: the
    leftovers of writes killed before their rename. Returns the removed paths."""
    return _remove_if_stale((os.path.join(root, name) for root, _, files in os.walk(directory)
                             for name in files if name.startswith(prefix)), max_age)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    On error the temporary file is removed, so a reader never sees a half-written output. The
    result gets the permissions of a plain open() under the umask (mkstemp makes 0600 files), and
    temporary files of the same target left by a killed write (older than STALE_TEMP_SECONDS) go.
    """
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    prefix = f".tmp-{os.path.basename(path)}-"
    _remove_if_stale(glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*")), STALE_TEMP_SECONDS)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix or os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        if os.path.exists(tmp):
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)


def save_npy(path: str, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def torch_save(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def progress(iterable=None, **kwargs):
    """A tqdm progress bar that stays quiet when output is not a terminal unless forced by LETTER_PROGRESS=1."""
    from tqdm.auto import tqdm

    disable = kwargs.pop("disable", None)
    if disable is None:
        forced = os.environ.get("LETTER_PROGRESS")
        disable = (forced == "0") if forced is not None else None  # None: tqdm decides (off for non-tty)
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)


def read_mapping_file(path: str) -> dict:
    """A config file whose top level is a mapping: JSON for *.json, YAML otherwise; {} if empty."""
    if not os.path.isfile(path):
        raise LetterError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    is_json = path.endswith(".json")
    try:
        if is_json:
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise different types; the message is what matters
        raise LetterError(f"{path}: not valid {'JSON' if is_json else 'YAML'}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LetterError(f"{path}: the top level must be a mapping of setting -> value")
    return data
