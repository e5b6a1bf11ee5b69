"""The one owner of run folders: every artifact's file names (layout), its atomic writers and strict
readers (files), the completion and identity rules (manifest), and the train-rec run reader.

Rules (docs/RUNS.md): a run is finished exactly when its manifest is there (written last, with the
content hashes of its outputs and of every input); every reader requires it and checks the inputs
it is given against it; a writer never writes onto its own inputs, into another kind of run, or
over a finished run without resume/overwrite.
"""
from .files import (STALE_TEMP_SECONDS, atomic_dir, atomic_path, check_file_name, current_umask, file_change, file_state, files_matching,
                    folder_files,
                    load_npy, parse_json, parse_yaml, read_json, read_json_if_valid, read_text, relative_to,
                    remove_stale_temps, resolve, save_npy, sha256_file, torch_save, write_json)
from .layout import INTER_SUFFIX, ITEM_SUFFIX, RecRun, TokenizerRun, cf_output_paths, embedding_stem
from .manifest import (MANIFEST, STARTED, check_inputs, check_manifest, check_not_input, check_output_path,
                       check_sidecar, held_datasets, mark_started, output_change, prepare_output_files, prepare_run_folder, read_manifest, run_kind,
                       sidecar_path, sidecar_record, write_manifest)
from .steps import fingerprint, finished_step, start_step
from .rec_run import OTHER_DATA, check_rec_dataset, check_rec_run, read_rec_run_info, recorded_data

__all__ = [
    "STALE_TEMP_SECONDS", "atomic_dir", "atomic_path", "check_file_name", "current_umask", "file_change", "file_state", "folder_files",
    "load_npy", "parse_json", "parse_yaml", "read_json", "read_json_if_valid", "read_text", "relative_to",
    "remove_stale_temps", "resolve", "save_npy", "sha256_file", "torch_save", "write_json",
    "INTER_SUFFIX", "ITEM_SUFFIX", "RecRun", "TokenizerRun", "cf_output_paths", "embedding_stem",
    "MANIFEST", "STARTED", "check_inputs", "check_manifest", "check_not_input", "check_output_path", "check_sidecar", "held_datasets",
    "mark_started", "output_change", "prepare_output_files", "prepare_run_folder", "read_manifest", "run_kind",
    "sidecar_path", "sidecar_record", "write_manifest",
    "fingerprint", "finished_step", "start_step",
    "OTHER_DATA", "check_rec_dataset", "check_rec_run", "read_rec_run_info", "recorded_data",
]
