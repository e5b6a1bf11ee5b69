"""The fingerprinted step `letter pipeline` (its stages) and `letter compare` (its runs) share: a
folder whose work is keyed by a fingerprint of everything it depends on. A started record holds the
fingerprint while the step runs (so an interrupted step resumes only with the same inputs); the
step's manifest (write_manifest, written last, with the fingerprint among its inputs) says it is
done, and `finished_step` whether that work can be reused."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

from letter.errors import LetterError

from .files import read_json_if_valid, write_json
from .manifest import output_change, read_manifest


def fingerprint(payload) -> str:
    """A short sha256 of a JSON-serializable payload (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def finished_step(path: str, kind: str, fp: str, base: str,
                  required: tuple[str, ...] = ()) -> tuple[dict | None, str | None]:
    """(the manifest, None) when the step's manifest `path` (of `kind`) records the fingerprint `fp`
    and every output it records (names relative to `base`; `required` ones among them) is
    unchanged; otherwise (the manifest or None when there is no valid one, why the step must run)."""
    if not os.path.isfile(path):
        return None, "not run yet"
    try:
        done = read_manifest(path, kind, path)
    except LetterError as e:
        return None, str(e)
    recorded = done["inputs"].get("fingerprint")
    if recorded != fp:
        return done, f"its settings or inputs changed (fingerprint {recorded} -> {fp})"
    missing = [name for name in required if name not in done["outputs"]]
    change = output_change(base, done) or (f"{missing[0]} not recorded" if missing else None)
    return done, None if change is None else f"output {change}"


def start_step(folder: str, fp: str, started_name: str, fresh: bool = False, **record) -> bool:
    """Make `folder` the working folder of a step with fingerprint `fp`: kept (to resume) when its
    started record has that fingerprint and not `fresh`, else emptied first. Writes the started
    record ({"fingerprint": fp, **record}). Returns whether an earlier folder was emptied."""
    started = read_json_if_valid(os.path.join(folder, started_name))
    emptied = os.path.isdir(folder) and (fresh or not started or started.get("fingerprint") != fp)
    if emptied:
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, started_name), {"fingerprint": fp, **record})
    return emptied
