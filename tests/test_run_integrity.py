"""letter.runs: the completion rule, the identity check, who may write where, strict parsing and the
fingerprinted step (the commands' behaviour on damaged runs is in test_bad_inputs.py)."""
import json
import os

import pytest

from letter.errors import LetterError
from letter.runs import (MANIFEST, check_inputs, check_manifest, check_output_path, mark_started, parse_json,
                         parse_yaml, prepare_output_files, prepare_run_folder, read_json, start_step, write_manifest)


def _finished(folder, kind="tokenizer", inputs=None):
    mark_started(str(folder), kind)
    (folder / "codes.npy").write_bytes(b"0123456789")
    write_manifest(str(folder), kind, ["codes.npy"], inputs or {"text_emb": "aa"})
    return folder


def test_manifest_is_the_only_completion_rule(tmp_path):
    run = _finished(tmp_path / "run")
    assert check_manifest(str(run), "tokenizer")["inputs"] == {"text_emb": "aa"}
    (run / MANIFEST).unlink()
    with pytest.raises(LetterError, match="unfinished tokenizer run"):
        check_manifest(str(run), "tokenizer")


def test_same_size_swap_and_other_kind_are_refused(tmp_path):
    run = _finished(tmp_path / "run")
    (run / "codes.npy").write_bytes(b"9876543210")  # same size, other content
    with pytest.raises(LetterError, match="mixed tokenizer run folder: codes.npy changed"):
        check_manifest(str(run), "tokenizer")
    with pytest.raises(LetterError, match="a tokenizer run folder, not a train-rec run folder"):
        check_manifest(str(run), "train-rec")


def test_inputs_are_compared_by_content_with_an_override(tmp_path):
    check_inputs("RUN", {"dataset": "aa"}, {"dataset": ("aa", "--data D")})
    with pytest.raises(LetterError, match=r"--data D: not the dataset RUN was made from.*--allow-other-data"):
        check_inputs("RUN", {"dataset": "aa"}, {"dataset": ("bb", "--data D")}, {"dataset": "--allow-other-data"})
    check_inputs("RUN", {"dataset": "aa"}, {"dataset": ("bb", "--data D")}, {"dataset": True})


def test_writers_never_destroy_a_run_without_being_asked(tmp_path):
    run = _finished(tmp_path / "run")
    with pytest.raises(LetterError, match="holds a finished tokenizer run"):
        prepare_run_folder(str(run), "tokenizer")
    with pytest.raises(LetterError, match="holds a tokenizer run, not a train-rec run"):
        prepare_run_folder(str(run), "train-rec", overwrite=True)
    with pytest.raises(LetterError, match="exclude each other"):
        prepare_run_folder(str(run), "tokenizer", resume=True, overwrite=True)
    prepare_run_folder(str(run), "tokenizer", resume=True)
    assert (run / MANIFEST).exists()
    prepare_run_folder(str(run), "tokenizer", overwrite=True)
    assert not run.exists()
    old = tmp_path / "old"  # a folder of an earlier layout: run files, no record of its kind
    old.mkdir()
    (old / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(LetterError, match="files of a run this version did not write"):
        prepare_run_folder(str(old), "tokenizer")


def test_outputs_never_land_on_inputs(tmp_path):
    run = _finished(tmp_path / "run")
    emb = tmp_path / "e.npy"
    emb.write_bytes(b"x")
    with pytest.raises(LetterError, match="is the command's input --embeddings"):
        check_output_path(str(tmp_path / "." / "e.npy"), {"--embeddings": str(emb)})
    for name in ("codes.npy", "model.pt", "manifest.json"):  # recorded, or a name of the layout
        with pytest.raises(LetterError, match="a file of the run folder --tokenizer"):
            check_output_path(str(run / name), {"--tokenizer": str(run)})
    check_output_path(str(run / "new-metrics.json"), {"--tokenizer": str(run)})
    check_output_path(str(tmp_path / "out.json"), {"--embeddings": str(emb), "--tokenizer": str(run)})


def test_no_output_lands_on_any_run_or_dataset_file(tmp_path):
    other = _finished(tmp_path / "other")  # not among the command's inputs
    with pytest.raises(LetterError, match=f"a file of the run folder {other}; write elsewhere"):
        check_output_path(str(other / "codes.npy"), {})
    data = tmp_path / "data"
    data.mkdir()
    (data / "X.inter.json").write_text("{}")
    with pytest.raises(LetterError, match="a dataset's file"):
        check_output_path(str(data / "X.inter.json"), {})
    emb = data / "X.emb-a.npy"
    emb.write_bytes(b"x")
    (data / "X.emb-a.json").write_text("{}")
    with pytest.raises(LetterError, match="is the record of the command's input --embeddings"):
        check_output_path(str(data / "X.emb-a.json"), {"--embeddings": str(emb)})
    check_output_path(str(data / "X.emb-a.index.json"), {"--embeddings": str(emb)})


def test_single_file_outputs_are_replaced_only_when_asked(tmp_path):
    npy, sidecar = tmp_path / "e.npy", tmp_path / "e.json"
    outputs = [str(npy), str(sidecar)]  # the sidecar manifest last
    prepare_output_files(outputs, "embed")
    npy.write_bytes(b"x")
    with pytest.raises(LetterError, match=r"e.npy: an unfinished \(or another tool's\) embed output is already there; "
                                          "pass overwrite to replace it"):  # the CLI: --overwrite (test_bad_inputs)
        prepare_output_files(outputs, "embed")
    sidecar.write_text("{}")
    with pytest.raises(LetterError, match="e.npy: a finished train-cf output is already there; pass resume to continue "
                                          "its run, overwrite to replace it"):
        prepare_output_files(outputs, "train-cf", resume=False)
    prepare_output_files(outputs, "train-cf", resume=True)
    assert npy.exists() and sidecar.exists()
    prepare_output_files(outputs, "embed", overwrite=True)
    assert not npy.exists() and not sidecar.exists()
    run = _finished(tmp_path / "run")
    with pytest.raises(LetterError, match="a tokenizer run folder; write the embed output elsewhere"):
        prepare_output_files([str(run / "e.npy")], "embed")


def test_only_the_main_process_replaces_single_file_outputs(tmp_path):
    """Under torchrun every process checks the outputs, rank 0 alone removes them for overwrite
    (train-cf's processes all removed them: the later one's os.remove failed on a removed file)."""
    outputs = [str(tmp_path / "e.npy"), str(tmp_path / "e.json")]
    for path in outputs:
        open(path, "w").close()
    prepare_output_files(outputs, "train-cf", overwrite=True, main=False)
    assert all(os.path.exists(path) for path in outputs)
    prepare_output_files(outputs, "train-cf", overwrite=True)
    assert not any(os.path.exists(path) for path in outputs)
    prepare_output_files(outputs, "train-cf", overwrite=True, main=False)  # rank 0 was first: nothing left


def test_runs_are_not_written_into_dataset_folders(tmp_path):
    (tmp_path / "X.inter.json").write_text("{}")
    with pytest.raises(LetterError, match="holds the dataset X.inter.json, not a tokenizer run"):
        prepare_run_folder(str(tmp_path), "tokenizer")


@pytest.mark.parametrize("text,message", [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"a": ', "not valid JSON"),
])
def test_strict_json(text, message):
    with pytest.raises(LetterError, match=message):
        parse_json(text, "F.json")


def test_strict_yaml():
    assert parse_yaml("a: 1\nb: {c: 2}\n", "F.yaml") == {"a": 1, "b": {"c": 2}}
    with pytest.raises(LetterError, match=r"F.yaml: duplicate key 'c' \(line 3\)"):
        parse_yaml("b:\n  c: 1\n  c: 2\n", "F.yaml")


def test_yaml_numbers_in_exponent_notation_are_numbers():
    # YAML 1.1 (PyYAML) reads 1e-3 as a string, so `lr: 1e-3` was refused as "must be a number,
    # got '1e-3'"; JSON and YAML 1.2 read it as the number it is
    assert parse_yaml("lr: 1e-3\nsteps: 2E+3\nw: -5e2\nname: '1e-3'\nv: 1.5e-3\n", "F.yaml") == {
        "lr": 1e-3, "steps": 2000.0, "w": -500.0, "name": "1e-3", "v": 1.5e-3}


def test_undecodable_json_file_names_the_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(json.dumps({"a": "é"}).encode("utf-16"))
    with pytest.raises(LetterError, match="r.json: corrupt or truncated"):
        read_json(str(path), "record")


def test_fingerprinted_step_keeps_only_its_own_work(tmp_path):
    step = tmp_path / "step"
    assert not start_step(str(step), "f1", "started.json")
    (step / "work").write_text("partial")
    assert not start_step(str(step), "f1", "started.json")  # same fingerprint: resume
    assert (step / "work").exists()
    assert start_step(str(step), "f2", "started.json")  # other inputs: from scratch
    assert not (step / "work").exists()
    assert json.loads((step / "started.json").read_text())["fingerprint"] == "f2"
    assert start_step(str(step), "f2", "started.json", fresh=True)
    assert os.listdir(step) == ["started.json"]
