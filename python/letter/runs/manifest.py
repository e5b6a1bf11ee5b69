"""The one completion rule of every run folder and single-file artifact, and who may write where.

A run is finished exactly when its manifest exists; the manifest is written last and records

    {"kind": "train-rec" | "tokenizer" | ...,      what made it
     "finished_at": <unix time>,
     "outputs": {relative path: {"size", "mtime_ns", "sha256"}},   the files a reader needs
     "inputs": {name: content hash}}                every input it read (dataset, embeddings, codes...)

Writers record the kind in started.json when they first write (`mark_started`). Readers call
`check_manifest` (no manifest: unfinished, always -- also for folders written before
manifests existed; a recorded output missing or changed: a mixed folder) and then `check_inputs`
with the hashes of what they were given (a different input: refused naming it, unless the caller
allows that input). Writers call `prepare_run_folder` before anything else (a folder holding
another kind of run, or a finished run of the same kind without resume/overwrite, is refused) and
`check_output_path` for a single output file (never one of the command's own inputs, never into an
input run folder). Single-file artifacts (embeddings, CF embeddings) carry their manifest in the
sidecar `<stem>.json` next to them (`write_sidecar` / `check_sidecar`).
"""
from __future__ import annotations

import os
import shutil
import time

from letter.errors import LetterError

from .files import file_change, file_state, folder_files, read_json, read_json_if_valid, write_json
from .layout import reserved_names

MANIFEST = "manifest.json"
STARTED = "started.json"  # written when a run begins: the folder's kind before the manifest exists
# Files that show a folder holds some run (of any kind, any version) even without our markers.
RUN_FILES = (MANIFEST, STARTED, "complete.json", "checkpoint.pt", "run.json", "model.pt", "codes.npy", "report.json")


def write_manifest(folder: str, kind: str, outputs: list[str], inputs: dict, **extra) -> dict:
    """Write `folder`/manifest.json (call it last): the state of each of `outputs` (relative to
    `folder`; a folder among them stands for every file in it) and the `inputs` hashes."""
    names = []
    for name in outputs:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            names += [os.path.join(name, rel) for rel in folder_files(path)]
        elif os.path.isfile(path):
            names.append(name)
    manifest = {"kind": kind, "finished_at": time.time(),
                "outputs": {name: file_state(os.path.join(folder, name)) for name in names},
                "inputs": dict(inputs), **extra}
    write_json(os.path.join(folder, MANIFEST), manifest)
    return manifest


def check_manifest(folder: str, kind: str, what: str = "") -> dict:
    """The manifest of the finished `kind` run in `folder`, or one LetterError: no manifest
    (unfinished), another kind, or a recorded output missing or changed (a mixed folder).
    `what`: the option naming the folder in messages (e.g. "--model")."""
    where = f"{what} {folder}" if what else folder
    if not os.path.isdir(folder):
        raise LetterError(f"{where}: not a {kind} run folder (no such folder)")
    found = run_kind(folder)
    if found not in (None, kind, "unknown"):
        raise LetterError(f"{where}: a {found} run folder, not a {kind} run folder")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise LetterError(f"{where}: unfinished {kind} run (no {MANIFEST}; folders written before manifests "
                          "count as unfinished too); finish it with --resume or train it again")
    manifest = read_json(path, f"{kind} manifest")
    if manifest.get("kind") != kind:
        raise LetterError(f"{where}: a {manifest.get('kind')} run folder, not a {kind} run folder")
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict) or not isinstance(manifest.get("inputs"), dict):
        raise LetterError(f"{path}: corrupt or truncated (no 'outputs'/'inputs' mapping)")
    for name, state in sorted(outputs.items()):
        change = file_change(os.path.join(folder, name), state)
        if change is not None:
            raise LetterError(f"{where}: mixed {kind} run folder: {name} {change} since the run finished "
                              "(files from different runs?); train it again or restore the folder")
    return manifest


def check_inputs(source: str, recorded: dict, current: dict, allowed: dict | None = None) -> None:
    """Refuse when an input differs from the one `source` recorded: `current` maps an input name to
    (its hash, how the user named it); `allowed` maps input names to the flag that overrides."""
    allowed = allowed or {}
    for name, (digest, shown) in current.items():
        old = recorded.get(name)
        if old is None or old == digest:
            continue
        if allowed.get(name) is True:
            continue
        flag = allowed.get(name)
        hint = f"; pass {flag} to use it anyway" if isinstance(flag, str) else ""
        raise LetterError(f"{shown}: not the {name} {source} was made from (its content differs from the one "
                          f"recorded){hint}")


def run_kind(folder: str) -> str | None:
    """The kind of run `folder` holds: from its manifest or started record; "unknown" for a folder
    holding run files without them (another version or tool); None when it holds no run."""
    for name in (MANIFEST, STARTED):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            kind = read_json(path, "run record").get("kind")
            return kind if isinstance(kind, str) else "unknown"
    if any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES):
        return "unknown"
    return None


def prepare_run_folder(folder: str, kind: str, *, resume: bool = False, overwrite: bool = False,
                       checkpoint: str | None = None, main: bool = True, what: str = "--out") -> None:
    """Check `folder` before a `kind` run writes anything. Refused: a folder holding another kind of
    run (or run files this version did not write); a `kind` run (finished, or with its
    `checkpoint`) without resume or overwrite; resume and overwrite together. overwrite: the
    earlier run is removed (its manifest first). `main`: False on the other processes of a
    torchrun, which only check. The trainer calls `mark_started` when it first writes."""
    if resume and overwrite:
        raise LetterError("--resume and --overwrite exclude each other: continue the run or replace it")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise LetterError(f"{what} {folder}: not a folder")
    found = run_kind(folder) if os.path.isdir(folder) else None
    if found is not None and found != kind:
        held = "files of a run this version did not write" if found == "unknown" else f"a {found} run"
        raise LetterError(f"{what} {folder}: holds {held}, not a {kind} run; choose another folder")
    finished = os.path.isfile(os.path.join(folder, MANIFEST))
    started = checkpoint is not None and os.path.isfile(os.path.join(folder, checkpoint))
    if found == kind and (finished or started) and not (resume or overwrite):
        state = "a finished" if finished else "an unfinished"
        raise LetterError(f"{what} {folder}: already holds {state} {kind} run; pass --resume to continue it, --overwrite "
                          "to replace it, or choose another folder")
    if main and found == kind and overwrite:
        if finished:
            os.remove(os.path.join(folder, MANIFEST))  # first: an interrupted removal leaves an unfinished run
        shutil.rmtree(folder)


def mark_started(folder: str, kind: str) -> None:
    """Create `folder` for a `kind` run and record its kind (started.json) unless recorded."""
    os.makedirs(folder, exist_ok=True)
    if not os.path.isfile(os.path.join(folder, STARTED)):
        write_json(os.path.join(folder, STARTED), {"kind": kind, "started_at": time.time()})


def check_output_path(out: str, inputs: dict[str, str | None], what: str = "--out") -> None:
    """Refuse an output file that is one of the command's inputs (`inputs`: option -> path), or a
    file of an input run folder (a recorded output, or a name its layout uses). A new file of
    another name inside a run folder (e.g. RUN/test-metrics.json) is allowed."""
    target = os.path.realpath(out)
    for option, path in inputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if target == real:
            raise LetterError(f"{what} {out}: is the command's input {option} {path}; choose another file")
        if not (os.path.isdir(real) and target.startswith(real.rstrip(os.sep) + os.sep) and run_kind(real)):
            continue
        rel = os.path.relpath(target, real)
        manifest = read_json_if_valid(os.path.join(real, MANIFEST)) or {}
        recorded = manifest.get("outputs") if isinstance(manifest.get("outputs"), dict) else {}
        if rel in recorded or rel.split(os.sep)[0] in reserved_names() | set(RUN_FILES):
            raise LetterError(f"{what} {out}: a file of the run folder {option} {path}; write elsewhere")


# -- single-file artifacts: the manifest is the sidecar <stem>.json --------------------------------

def sidecar_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def sidecar_record(path: str, inputs: dict | None = None) -> dict:
    """What a sidecar JSON written after `path` records about it: its state and inputs."""
    return {"files": {os.path.basename(path): file_state(path)}, "inputs": dict(inputs or {})}


def check_sidecar(path: str, what: str, current: dict | None = None, allowed: dict | None = None) -> None:
    """`path` (e.g. <Name>.cf-sasrec32.npy) against its sidecar <stem>.json, written after it: a
    sidecar recording other content means a mixed output (a later run died between the two writes,
    or the file was replaced); `current` (input -> (hash, shown)) is checked against the inputs it
    recorded (see check_inputs). Files without a sidecar (made elsewhere) are taken as they are."""
    sidecar = sidecar_path(path)
    if not os.path.isfile(sidecar):
        return
    record = read_json(sidecar, f"sidecar of {what}")
    files = record.get("files")
    state = files.get(os.path.basename(path)) if isinstance(files, dict) else None
    if state is None:
        raise LetterError(f"{sidecar}: corrupt or truncated (no state of {os.path.basename(path)})")
    change = file_change(path, state)
    if change is not None:
        raise LetterError(f"{path}: {change} since {os.path.basename(sidecar)} was written (an unfinished or "
                          f"mixed {what} output); rerun the command that makes it")
    if current:
        check_inputs(f"the {what} {os.path.basename(path)}", record.get("inputs") or {}, current, allowed)
