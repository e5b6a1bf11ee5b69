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

from letter.errors import LetterError, input_error

from .files import file_change, file_state, folder_files, read_json, read_json_if_valid, write_json
from .layout import INTER_SUFFIX, ITEM_SUFFIX, reserved_names

MANIFEST = "manifest.json"
STARTED = "started.json"  # written when a run begins: the folder's kind before the manifest exists
# Files that show a folder holds some run (of any kind, any version) even without our markers.
RUN_FILES = (MANIFEST, STARTED, "complete.json", "checkpoint.pt", "run.json", "model.pt", "codes.npy", "report.json")


def write_manifest(folder: str, kind: str, outputs: list[str], inputs: dict, *, name: str = MANIFEST,
                   **extra) -> dict:
    """Write `folder`/`name` (manifest.json; call it last): the state of each of `outputs` (relative
    to `folder`; a folder among them stands for every file in it) and the `inputs` hashes."""
    names = []
    for output in outputs:
        path = os.path.join(folder, output)
        if os.path.isdir(path):
            names += [os.path.join(output, rel) for rel in folder_files(path)]
        elif os.path.isfile(path):
            names.append(output)
    manifest = {"kind": kind, "finished_at": time.time(),
                "outputs": {n: file_state(os.path.join(folder, n)) for n in names},
                "inputs": dict(inputs), **extra}
    write_json(os.path.join(folder, name), manifest)
    return manifest


def read_manifest(path: str, kind: str, where: str, what: str = "") -> dict:
    """The manifest file `path` of a `kind` run (messages name the run `where`, given by the
    argument `what` as in input_error), or one LetterError: unreadable, another kind, no
    outputs/inputs mappings."""
    manifest = read_json(path, f"{kind} manifest")
    if manifest.get("kind") != kind:
        raise input_error(what, where, f"a {manifest.get('kind')} run folder, not a {kind} run folder")
    if not isinstance(manifest.get("outputs"), dict) or not isinstance(manifest.get("inputs"), dict):
        raise LetterError(f"{path}: corrupt or truncated (no 'outputs'/'inputs' mapping)")
    return manifest


def output_change(folder: str, manifest: dict) -> str | None:
    """None when every output `manifest` records is in `folder` with the recorded content, else
    "NAME why" of the first that is not ("model.pt missing", "codes.npy changed (...)")."""
    for name, state in sorted(manifest["outputs"].items()):
        change = file_change(os.path.join(folder, name), state)
        if change is not None:
            return f"{name} {change}"
    return None


def check_manifest(folder: str, kind: str, what: str = "") -> dict:
    """The manifest of the finished `kind` run in `folder`, or one LetterError: no manifest
    (unfinished), another kind, or a recorded output missing or changed (a mixed folder).
    `what`: the argument naming the folder in messages (e.g. "run_dir"; see input_error)."""
    if not os.path.isdir(folder):
        raise input_error(what, folder, f"not a {kind} run folder (no such folder)")
    found = run_kind(folder)
    if found not in (None, kind, "unknown"):
        raise input_error(what, folder, f"a {found} run folder, not a {kind} run folder")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise input_error(what, folder, f"unfinished {kind} run (no {MANIFEST}; folders written before manifests "
                          "count as unfinished too); resume its training or train it again")
    manifest = read_manifest(path, kind, folder, what)
    change = output_change(folder, manifest)
    if change is not None:
        raise input_error(what, folder, f"mixed {kind} run folder: {change} since the run finished "
                          "(files from different runs?); train it again or restore the folder")
    return manifest


def _resume_and_overwrite() -> LetterError:
    return LetterError("resume and overwrite exclude each other: continue the run or replace it", "resume", "overwrite")


def check_inputs(source: str, recorded: dict, current: dict, allowed: dict | None = None,
                 names: tuple[str, ...] = (), refused: str = "") -> None:
    """Refuse when an input differs from the one `source` recorded: `current` maps an input name to
    (its hash, how the user named it: words, or (argument, value) as in input_error); `allowed`
    maps input names to True or to the argument that overrides (named in the message). `names`:
    arguments `source` names (see LetterError). `refused`: why no argument overrides (appended)."""
    allowed = allowed or {}
    for name, (digest, shown) in current.items():
        old = recorded.get(name)
        if old is None or old == digest:
            continue
        if allowed.get(name) is True:
            continue
        override = allowed.get(name)
        if isinstance(override, str):
            hint = f"; pass {override} to use it anyway"
        else:
            hint = f"; {refused}" if refused else ""
        problem = f"not the {name} {source} was made from (its content differs from the one recorded){hint}"
        what, value = shown if isinstance(shown, tuple) else ("", shown)
        raise input_error(what, value, problem, *names, *([override] if isinstance(override, str) else []))


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
                       checkpoint: str | None = None, main: bool = True, what: str = "out_dir") -> None:
    """Check `folder` before a `kind` run writes anything. Refused: a folder holding another kind of
    run (or run files this version did not write); a `kind` run (finished, or with its
    `checkpoint`) without resume or overwrite; resume and overwrite together. overwrite: the
    earlier run is removed (its manifest first). `main`: False on the other processes of a
    torchrun, which only check. The trainer calls `mark_started` when it first writes. `what`:
    the argument naming the folder in messages (see input_error)."""
    if resume and overwrite:
        raise _resume_and_overwrite()
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise input_error(what, folder, "not a folder")
    datasets = held_datasets(folder)
    if datasets:
        raise input_error(what, folder, f"holds the dataset {datasets[0]}, not a {kind} run; choose another folder")
    found = run_kind(folder) if os.path.isdir(folder) else None
    if found is not None and found != kind:
        held = "files of a run this version did not write" if found == "unknown" else f"a {found} run"
        raise input_error(what, folder, f"holds {held}, not a {kind} run; choose another folder")
    finished = os.path.isfile(os.path.join(folder, MANIFEST))
    started = checkpoint is not None and os.path.isfile(os.path.join(folder, checkpoint))
    if found == kind and (finished or started) and not (resume or overwrite):
        state = "a finished" if finished else "an unfinished"
        raise input_error(what, folder, f"already holds {state} {kind} run; pass resume to continue it, overwrite "
                          "to replace it, or choose another folder", "resume", "overwrite")
    if main and found == kind and overwrite:
        if finished:
            os.remove(os.path.join(folder, MANIFEST))  # first: an interrupted removal leaves an unfinished run
        shutil.rmtree(folder)


def prepare_output_files(paths: list[str], kind: str, *, resume: bool | None = None, overwrite: bool = False,
                         what: str = "out_dir", what_names: tuple[str, ...] = (), main: bool = True) -> None:
    """Check the files a `kind` command that writes single files is about to write (`paths`, its sidecar
    manifest last). Any of them already there is refused unless overwrite (they are removed, the
    manifest first, so an interrupted removal leaves nothing finished-looking) or resume (continue:
    the caller's checkpoint; None: the command cannot resume). `what`: the argument choosing the
    place (see input_error), or words naming the arguments `what_names`, e.g. "tag or out_dir".
    `main`: False on the other processes of a torchrun, which only check (rank 0 removes)."""
    if resume and overwrite:
        raise _resume_and_overwrite()
    names = what_names or ((what,) if what.isidentifier() else ())
    for folder in sorted({os.path.dirname(os.path.abspath(path)) for path in paths}):
        found = run_kind(folder) if os.path.isdir(folder) else None
        if found is not None:
            held = "files of a run" if found == "unknown" else f"a {found} run folder"
            raise LetterError(f"{what} {folder}: {held}; write the {kind} output elsewhere", *names)
    for path in paths:
        if os.path.exists(path) and not os.path.isfile(path):
            raise LetterError(f"{path}: a folder where the {kind} output file goes; choose another {what}", *names)
    present = [path for path in paths if os.path.isfile(path)]
    if present and not (resume or overwrite):
        state = "a finished" if os.path.isfile(paths[-1]) else "an unfinished (or another tool's)"
        options = "resume to continue its run, overwrite" if resume is not None else "overwrite"
        raise LetterError(f"{present[0]}: {state} {kind} output is already there; pass {options} to replace it, "
                          f"or choose another {what}", *names, "resume", "overwrite")
    if overwrite and main:
        for path in reversed(present):
            os.remove(path)


def held_datasets(folder: str) -> list[str]:
    """The <Name>.inter.json files of the datasets `folder` holds: no run is written into a dataset
    folder, no dataset into a run folder or beside another dataset."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder) if name.endswith(INTER_SUFFIX))


def mark_started(folder: str, kind: str) -> None:
    """Create `folder` for a `kind` run and record its kind (started.json) unless recorded."""
    os.makedirs(folder, exist_ok=True)
    if not os.path.isfile(os.path.join(folder, STARTED)):
        write_json(os.path.join(folder, STARTED), {"kind": kind, "started_at": time.time()})


def check_not_input(out: str, inputs: dict[str, str | None], what: str = "out") -> None:
    """Refuse an output file that is one of the command's inputs (`inputs`: argument -> path) or the
    sidecar manifest of an input .npy. `what`: the argument naming the output (see input_error)."""
    target = os.path.realpath(out)
    for argument, path in inputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if target == real:
            raise input_error(what, out, f"is the command's input {argument} {path}; choose another file", argument)
        if real.endswith(".npy") and target == os.path.realpath(sidecar_path(real)) and os.path.isfile(target):
            raise input_error(what, out, f"is the record of the command's input {argument} {path}; choose another "
                              "file", argument)


def check_output_path(out: str, inputs: dict[str, str | None], what: str = "out") -> None:
    """Refuse an output file that is one of the command's inputs (`inputs`: argument -> path) or the
    sidecar manifest of one, a file of any run folder (a recorded output, or a name its layout
    uses), or a dataset's file. A new file of another name inside a run folder (e.g.
    RUN/test-metrics.json) is allowed."""
    check_not_input(out, inputs, what)
    target = os.path.realpath(out)
    if os.path.basename(target).endswith((INTER_SUFFIX, ITEM_SUFFIX)) and os.path.exists(target):
        raise input_error(what, out, "a dataset's file; choose another file")
    folder = os.path.dirname(target)
    while folder != os.path.dirname(folder):  # the innermost run folder holding the target, if any
        kind = run_kind(folder) if os.path.isdir(folder) else None
        if kind is not None:
            rel = os.path.relpath(target, folder)
            manifest = read_json_if_valid(os.path.join(folder, MANIFEST)) or {}
            recorded = manifest.get("outputs") if isinstance(manifest.get("outputs"), dict) else {}
            if rel in recorded or rel.split(os.sep)[0] in reserved_names() | set(RUN_FILES):
                argument = next((argument for argument, path in inputs.items()
                                 if path is not None and os.path.realpath(path) == folder), None)
                named = f"{argument} {inputs[argument]}" if argument else folder
                raise input_error(what, out, f"a file of the run folder {named}; write elsewhere",
                                  *([argument] if argument else []))
            return
        folder = os.path.dirname(folder)


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
