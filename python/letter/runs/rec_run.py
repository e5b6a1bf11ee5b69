"""Reading a train-rec run folder: its run.json, its manifest, the dataset it records."""
from __future__ import annotations

import os

from letter.errors import input_error

from .files import read_json, resolve
from .layout import RecRun, TokenizerRun
from .manifest import check_inputs, check_manifest

OTHER_DATA = "allow_other_data"  # the argument that accepts another dataset


def _tokenizer_hint(folder: str) -> str:
    if any(os.path.isfile(os.path.join(folder, n)) for n in (TokenizerRun.REPORT, TokenizerRun.CONFIG)):
        return " (it looks like a tokenizer run folder)"
    return ""


def read_rec_run_info(run_dir: str) -> dict:
    """run.json of a train-rec run folder, checked (one LetterError per problem, naming run_dir)."""
    if not os.path.isdir(run_dir):
        raise input_error("run_dir", run_dir, "not a train-rec run folder (no such folder)")
    path = os.path.join(run_dir, RecRun.INFO)
    if not os.path.exists(path):
        raise input_error("run_dir", run_dir,
                          f"not a train-rec run folder (missing {RecRun.INFO}){_tokenizer_hint(run_dir)}")
    info = read_json(path, "train-rec settings")
    if not isinstance(info.get("config"), dict):
        raise input_error("", path, "corrupt or truncated (no 'config' mapping)")
    return info


def check_rec_run(run_dir: str, info: dict, data=None) -> tuple[str, dict]:
    """After its files were read: refuse an unfinished or mixed train-rec run folder; returns the
    dataset path to use (`data`, else the one run.json records, see recorded_data) and the manifest."""
    manifest = check_manifest(run_dir, RecRun.kind, "run_dir")
    return (data if data is not None else recorded_data(info, run_dir)), manifest


ADDING_RULE = ("items are added only to the dataset the run was trained on or to that dataset grown by appending "
               "items (the same items first, in the same order, and the same interactions), so that no identifier "
               "goes to another item; data only allowed as other data can be served but not added to")


def check_rec_dataset(run_dir: str, manifest: dict, dataset, path: str, given: bool,
                      allow_other_data: bool = False, trained_sizes=(), adding: bool = False) -> bool:
    """Refuse a dataset (read from `path`; `given`: by the argument data, else the run's recorded
    one) whose content is neither the one the run was trained on nor that dataset grown by
    appending items (Dataset.is_or_grew_from the recorded fingerprint, for an n of `trained_sizes`,
    the item counts the training dataset can have had), unless allow_other_data. adding: the
    dataset new items are added from, where allow_other_data does not apply (ADDING_RULE). Returns
    whether the dataset was taken as other data."""
    recorded = manifest["inputs"].get("dataset")
    if recorded is None or dataset.is_or_grew_from(recorded, trained_sizes):
        return False  # the training dataset, or it with items appended
    shown = ("data", path) if given else ("the dataset", path)
    allowed = {} if adding else {"dataset": True if allow_other_data else OTHER_DATA}
    check_inputs(f"run_dir {run_dir}", manifest["inputs"], {"dataset": (dataset.fingerprint(), shown)}, allowed,
                 names=("run_dir",), refused=ADDING_RULE if adding else "")
    return True


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
    raise input_error("run_dir", run_dir, f"its dataset {shown} is gone (was the run moved?); pass data PATH", "data")
