"""The fingerprinted step `letter pipeline` (its stages) and `letter compare` (its runs) share: a
folder whose work is keyed by a fingerprint of everything it depends on. A started record holds the
fingerprint while the step runs (so an interrupted step resumes only with the same inputs); the
caller's completion record, written last, holds it when the step is done."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

from .files import read_json_if_valid, write_json


def fingerprint(payload) -> str:
    """A short sha256 of a JSON-serializable payload (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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
