"""Files of run folders: atomic writes, strict reads, content states.

- `atomic_path` / `write_json` / `save_npy` / `torch_save`: a temporary file beside the target,
  renamed into place on success, removed on error; temporary files of killed writes older than
  STALE_TEMP_SECONDS go (`remove_stale_temps` for a whole folder). `atomic_dir`: the same for a
  folder (LC-Rec adapters).
- `parse_json` / `parse_yaml` / `read_json`: strict parsing for every JSON and YAML file the project
  reads: duplicate keys, undecodable bytes and nesting too deep for the parser are one LetterError
  naming the file.
- `file_state` / `file_change` / `sha256_file` / `folder_files`: what a manifest records of a file.
- `relative_to` / `resolve`: how a run folder refers to files.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Iterator

from letter.errors import LetterError, SettingError, input_error

STALE_TEMP_SECONDS = 600  # a temporary file this old was left by a killed write
_CHUNK = 1 << 20


# -- atomic writes --------------------------------------------------------------------------------

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
    """Delete those of `paths` (files or folders) not modified for `max_age` seconds; returns them."""
    removed = []
    now = time.time()
    for path in paths:
        with contextlib.suppress(OSError):
            if now - os.stat(path).st_mtime > max_age:
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed.append(path)
    return removed


def remove_stale_temps(directory: str, prefix: str = ".tmp-", max_age: float = STALE_TEMP_SECONDS) -> list[str]:
    """Delete `prefix`* files and folders under `directory` (recursively) not modified for `max_age`
    seconds: the leftovers of writes killed before their rename. Returns the removed paths."""
    found = []
    for root, dirs, files in os.walk(directory):
        found += [os.path.join(root, name) for name in files + dirs if name.startswith(prefix)]
        dirs[:] = [d for d in dirs if not d.startswith(prefix)]
    return _remove_if_stale(found, max_age)


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
    _remove_if_stale(files_matching(directory, glob.escape(prefix) + "*"), STALE_TEMP_SECONDS)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix or os.path.splitext(path)[1])
    except OSError as e:  # name the file asked for, not the temporary one
        raise OSError(e.errno, e.strerror, path) from None
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


def atomic_dir(path: str):
    """(temporary folder next to `path`, commit()): commit() puts the folder in place of `path`
    (a reader sees the old folder or the whole new one). Temporary folders of `path` left by killed
    saves go at once (one writer per folder: a trainer saving its selected model)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    prefix = f".tmp-{os.path.basename(path)}-"
    _remove_if_stale(files_matching(parent, glob.escape(prefix) + "*"), -1)
    tmp = tempfile.mkdtemp(dir=parent, prefix=prefix)

    def commit():
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix=prefix + "old-")
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    return tmp, commit


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)


def save_npy(path: str, array) -> None:
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def torch_save(path: str, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch reports a failed write (disk full...) as a RuntimeError
            raise LetterError(f"{path}: cannot write ({str(e).splitlines()[0][:160]})") from None


# -- strict reads ---------------------------------------------------------------------------------

def _unique_keys(path: str):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise LetterError(f"{path}: duplicate key {key!r}")
            seen.add(key)
        return dict(pairs)

    return hook


def read_text(path: str) -> str:
    """A UTF-8 text file; undecodable bytes (UTF-16, latin-1, binary) are one LetterError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise LetterError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LetterError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                          "save it as UTF-8") from None


def parse_json(text: str, path: str):
    """JSON with duplicate keys and too-deep nesting as one LetterError naming `path`."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as e:
        raise LetterError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise LetterError(f"{path}: nested too deeply to read") from None


_EXPONENT_NUMBER = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")


def parse_yaml(text: str, path: str):
    """YAML (safe subset) with duplicate keys and too-deep nesting as one LetterError naming `path`."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in keys:
                raise LetterError(f"{path}: duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            keys.add(key)
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    # YAML 1.1 needs a dot in a float, so 1e-3 would be a string; YAML 1.2 and JSON read a number
    StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_NUMBER, list("-+0123456789"))
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise LetterError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise LetterError(f"{path}: nested too deeply to read") from None


def read_json(path: str, what: str) -> dict:
    """A JSON object (strictly parsed), or one LetterError naming the file."""
    if not os.path.isfile(path):
        raise LetterError(f"{path}: no such file ({what})")
    try:
        data = parse_json(read_text(path), path)
    except LetterError as e:
        raise LetterError(f"{path}: corrupt or truncated ({str(e).removeprefix(path + ': ')[:200]})") from None
    if not isinstance(data, dict):
        raise LetterError(f"{path}: corrupt or truncated (expected a JSON object, got {type(data).__name__})")
    return data


def read_json_if_valid(path: str) -> dict | None:
    """A JSON object, or None when the file is missing, unreadable or not an object (for records
    whose absence just means "not done yet")."""
    try:
        return read_json(path, "record")
    except LetterError:
        return None


def load_npy(path: str, what: str = "", mmap: bool = False):
    """np.load without pickles; an unreadable file is '[WHAT ]PATH: corrupt or truncated (...)'
    (`what`: the argument it came from, e.g. "text_emb", see input_error). `mmap`: memory-mapped
    read-only (a large embedding matrix is then read a chunk at a time by its consumer, never held whole)."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise input_error(what, path, "no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise input_error(what, path, f"corrupt or truncated ({type(e).__name__}: {str(e)[:160]})") from None


# -- content states -------------------------------------------------------------------------------

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_state(path: str, previous: dict | None = None) -> dict:
    """{"size", "mtime_ns", "sha256"} of a file; the hash of `previous` is reused when its size and
    mtime still match (no re-reading of unchanged files)."""
    st = os.stat(path)
    if previous and previous.get("size") == st.st_size and previous.get("mtime_ns") == st.st_mtime_ns:
        return dict(previous)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def file_change(path: str, state: dict) -> str | None:
    """None when `path` still holds the content `state` recorded, else why not ("missing", ...).
    A file whose size and mtime are unchanged is taken as unchanged; otherwise its content is
    hashed again (so a copied folder, whose mtimes differ, still matches)."""
    if not os.path.isfile(path):
        return "missing"
    st = os.stat(path)
    if st.st_size != state.get("size"):
        return f"changed (size {state.get('size')} -> {st.st_size})"
    if st.st_mtime_ns == state.get("mtime_ns"):
        return None
    return None if sha256_file(path) == state.get("sha256") else "changed (different content)"


def files_matching(folder: str, name_pattern: str) -> list[str]:
    """Sorted paths in `folder` whose names match the glob `name_pattern`; the folder is taken
    literally (a path holding [, ] or * still finds its files). Escape names put into the pattern
    with glob.escape."""
    return sorted(glob.glob(os.path.join(glob.escape(folder), name_pattern)))


def folder_files(folder: str, skip=lambda name: False) -> list[str]:
    """Relative paths of the regular files under `folder` (no hidden/temporary files), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if not name.startswith(".") and not skip(rel):
                out.append(rel)
    return sorted(out)


def check_file_name(value: str, what: str) -> str:
    """`value` (a dataset name, a tag, a label) as one component of a file name: a LetterError when
    it would write outside the target folder or into a hidden file."""
    if not value or value in (".", "..") or value.startswith(".") or any(c in value for c in "/\\\0"):
        raise SettingError(what, f"{value!r}: not usable in a file name (no '/', '\\', leading '.' or empty name)")
    return value


def relative_to(path: str, base: str) -> str:
    """`path` relative to the folder `base` (what a run folder records about its own files)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base))


def resolve(path: str, base: str) -> str:
    """A recorded path: relative ones are relative to the folder `base`."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
