"""What a run folder holds, checked by content: file states, completion markers, relative paths.

- `file_state(path)` / `same_file(path, state)`: size, mtime and sha256 of a file; a file whose size
  and mtime are unchanged is taken as unchanged, otherwise its content is hashed again (so a copied
  folder, whose mtimes differ, still matches).
- `mark_complete(folder, files)`: written last by a trainer; records the state of the files a
  reader needs. `check_complete(folder, what, ...)`: one LetterError when the folder is unfinished
  (no marker) or mixed (a recorded file is missing or no longer the one the run wrote).
- `relative_to(path, base)` / `resolve(path, base)`: how a run folder refers to its own files.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from letter.errors import LetterError

COMPLETE = "complete.json"
_CHUNK = 1 << 20


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
    """None when `path` still holds the content `state` recorded, else why not ("missing", ...)."""
    if not os.path.isfile(path):
        return "missing"
    st = os.stat(path)
    if st.st_size != state.get("size"):
        return f"changed (size {state.get('size')} -> {st.st_size})"
    if st.st_mtime_ns == state.get("mtime_ns"):
        return None
    return None if sha256_file(path) == state.get("sha256") else "changed (different content)"


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


def mark_complete(folder: str, files: list[str], **extra) -> None:
    """Write `folder`/complete.json (last): the state of each of `files` (relative to `folder`;
    a folder among them stands for every file in it)."""
    from letter.utils import write_json

    names = []
    for name in files:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            names += [os.path.join(name, rel) for rel in folder_files(path)]
        elif os.path.isfile(path):
            names.append(name)
    states = {name: file_state(os.path.join(folder, name)) for name in names}
    write_json(os.path.join(folder, COMPLETE), {"finished_at": time.time(), "files": states, **extra})


def check_complete(folder: str, what: str, finished_without_marker: bool = False) -> dict | None:
    """LetterError when `folder` (a `what` run folder) is unfinished or mixed; returns the marker.

    `finished_without_marker`: the run predates complete.json but its own record says it finished
    (then nothing can be checked and None is returned)."""
    path = os.path.join(folder, COMPLETE)
    if not os.path.isfile(path):
        if finished_without_marker:
            return None
        raise LetterError(f"{folder}: unfinished {what} run (no {COMPLETE}); finish it (--resume) or retrain")
    marker = read_json(path, f"{what} completion marker")
    files = marker.get("files")
    if not isinstance(files, dict):
        raise LetterError(f"{path}: corrupt or truncated (no 'files' mapping)")
    for name, state in sorted(files.items()):
        change = file_change(os.path.join(folder, name), state)
        if change is not None:
            raise LetterError(
                f"{folder}: mixed {what} run folder: {name} {change} since the run finished "
                "(files from different runs?); retrain or restore the folder")
    return marker


def relative_to(path: str, base: str) -> str:
    """`path` relative to the folder `base` (what a run folder records about its own files)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base))


def resolve(path: str, base: str) -> str:
    """A recorded path: relative ones are relative to the folder `base`."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def read_json_if_valid(path: str) -> dict | None:
    """A JSON object, or None when the file is missing, unreadable or not an object (for records
    whose absence just means "not done yet")."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_json(path: str, what: str) -> dict:
    """A JSON object, or one LetterError naming the file."""
    if not os.path.isfile(path):
        raise LetterError(f"{path}: no such file ({what})")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise LetterError(f"{path}: corrupt or truncated ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(data, dict):
        raise LetterError(f"{path}: corrupt or truncated (expected a JSON object, got {type(data).__name__})")
    return data


# -- train-rec run folders -----------------------------------------------------------------------

def _tokenizer_hint(folder: str) -> str:
    if os.path.isfile(os.path.join(folder, "report.json")) or os.path.isfile(os.path.join(folder, "config.json")):
        return " (it looks like a tokenizer run folder)"
    return ""


def read_rec_run_info(run_dir: str) -> dict:
    """run.json of a train-rec run folder, checked (one LetterError per problem)."""
    if not os.path.isdir(run_dir):
        raise LetterError(f"--model {run_dir}: not a train-rec run folder (no such folder)")
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        raise LetterError(f"--model {run_dir}: not a train-rec run folder (missing run.json){_tokenizer_hint(run_dir)}")
    info = read_json(path, "train-rec settings")
    if not isinstance(info.get("config"), dict):
        raise LetterError(f"{path}: corrupt or truncated (no 'config' mapping)")
    return info


def load_npy(path: str, what: str = "", mmap: bool = False):
    """np.load without pickles; an unreadable file is '[WHAT ]PATH: corrupt or truncated (...)'
    (`what`: the option or input it came from, e.g. "--text-emb"). `mmap`: memory-mapped read-only
    (a large embedding matrix is then read a chunk at a time by its consumer, never held whole)."""
    import numpy as np

    where = f"{what} {path}" if what else path
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise LetterError(f"{where}: no such file") from None
    except (OSError, ValueError, EOFError) as e:
        raise LetterError(f"{where}: corrupt or truncated ({type(e).__name__}: {str(e)[:160]})") from None


def check_rec_run(run_dir: str, info: dict, data=None):
    """After its files were read: refuse an unfinished or mixed train-rec run folder; returns the
    dataset to use (`data`, else the one run.json records, see recorded_data)."""
    summary_path = os.path.join(run_dir, "summary.json")
    summary = read_json(summary_path, "train-rec summary") if os.path.isfile(summary_path) else {}
    check_complete(run_dir, "train-rec", finished_without_marker=summary.get("finished") is True)
    return data if data is not None else recorded_data(info, run_dir)


def recorded_data(info: dict, run_dir: str) -> str:
    """The dataset a train-rec run recorded: its path relative to the run folder when that exists
    (a moved or copied pipeline folder brings its data along), else the absolute path."""
    candidates = []
    if isinstance(info.get("data_relative"), str):
        candidates.append(resolve(info["data_relative"], run_dir))
    if isinstance(info.get("data"), str):
        candidates.append(info["data"])
    for path in candidates:
        if os.path.exists(path):
            return path
    shown = info.get("data", "<none recorded>")
    raise LetterError(f"--model {run_dir}: its dataset {shown} is gone (was the run moved?); pass --data PATH")


# -- single-file outputs with a JSON sidecar (embeddings, CF embeddings) -------------------------

def sidecar_record(path: str) -> dict:
    """What a sidecar JSON written after `path` records about it: {"files": {name: state}}."""
    return {"files": {os.path.basename(path): file_state(path)}}


def check_sidecar(path: str, what: str) -> None:
    """`path` (e.g. <Name>.cf-sasrec32.npy) against its sidecar <stem>.json, written after it: a
    sidecar recording other content means a mixed output (a later run died between the two writes,
    or the file was replaced). Files without a sidecar (made elsewhere) are taken as they are."""
    sidecar = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(sidecar):
        return
    record = read_json(sidecar, f"sidecar of {what}").get("files", {})
    state = record.get(os.path.basename(path)) if isinstance(record, dict) else None
    if state is None:
        return  # written before sidecars recorded file states
    change = file_change(path, state)
    if change is not None:
        raise LetterError(f"{path}: {change} since {os.path.basename(sidecar)} was written (an unfinished or "
                          f"mixed {what} output); rerun the command that makes it")
