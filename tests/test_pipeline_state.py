"""Pipeline state follows contents, not names: edited data, copied, moved and damaged run folders."""
import json
import os
import shutil

import pytest
import yaml
from click.testing import CliRunner

from letter import pipeline as pipeline_module
from letter.cli.main import main


def invoke(args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.output


def markers(run) -> dict:
    out = {}
    for stage in pipeline_module.STAGES:
        path = os.path.join(run, stage, pipeline_module.MARKER)
        if os.path.exists(path):
            out[stage] = open(path).read()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_config_module, one_thread):
    """(data folder, finished pipeline run folder, config) on LETTER-format synthetic data."""
    root = tmp_path_factory.mktemp("state")
    data = root / "data"
    invoke(["data", "synth", data, "--users", 300, "--items", 120, "--categories", 6])
    run = root / "run"
    invoke(["pipeline", "--data", data, "--config", tiny_config_module, "--out", run])
    return data, run, tiny_config_module


def pipeline(data, run, config):
    return invoke(["pipeline", "--data", data, "--config", config, "--out", run])


def test_outputs_are_recorded_relative_to_the_run_folder(finished):
    _, run, _ = finished
    for stage in pipeline_module.STAGES:
        marker = json.load(open(os.path.join(run, stage, pipeline_module.MARKER)))
        for key, value in marker["results"].items():
            if key in pipeline_module.PATH_KEYS:
                assert not os.path.isabs(value), (stage, key, value)
        assert marker["outputs"] and all(not os.path.isabs(f) for f in marker["outputs"])


def test_stage_records_are_manifests(finished, tmp_path):
    """stage.json is the stage's manifest (letter.runs, written last): its kind, the content hash of
    every file the stage wrote and, as inputs, its fingerprint and the upstream stages' digests. A
    record that is not a stage manifest (here: of another kind) is no finished stage."""
    data, run, config = finished
    for stage in pipeline_module.STAGES:
        marker = json.load(open(os.path.join(run, stage, pipeline_module.MARKER)))
        assert marker["kind"] == "pipeline-stage" and marker["stage"] == stage
        assert all(name.startswith(stage + "/") and len(state["sha256"]) == 64 for name, state in marker["outputs"].items())
        upstream, _ = pipeline_module.DEPENDS[stage]
        assert set(marker["inputs"]) >= {"fingerprint", *upstream}
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / "cf" / pipeline_module.MARKER
    path.write_text(json.dumps({**json.loads(path.read_text()), "kind": "tokenizer"}))
    out = pipeline(data, copy, config)
    assert "[cf] rerunning: " in out and "a tokenizer run folder, not a pipeline-stage run folder" in out, out
    assert "[prepare] up to date" in out and "[embed] up to date" in out
    assert json.loads(path.read_text())["kind"] == "pipeline-stage"


def test_data_edited_in_place_reruns_everything_from_prepare(finished, tmp_path):
    data, run, config = finished
    data2, run2 = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data, data2)
    shutil.copytree(run, run2)
    # the same data in another place: nothing to redo
    out = pipeline(data2, run2, config)
    assert all(f"[{s}] up to date" in out for s in pipeline_module.STAGES), out
    before = markers(run2)
    inter = data2 / "Synth.inter.json"
    seqs = json.loads(inter.read_text())
    user = next(u for u, items in seqs.items() if len(items) > 5)
    seqs[user] = seqs[user][:-1]
    inter.write_text(json.dumps(seqs))  # edited in place, same name
    out = pipeline(data2, run2, config)
    assert "[prepare] rerunning: its settings or inputs changed" in out, out
    after = markers(run2)
    assert all(after[s] != before[s] for s in pipeline_module.STAGES)
    prepared = json.loads((run2 / "prepare" / "Synth.inter.json").read_text())
    assert prepared[user] == seqs[user]

    # run2's rec stage now records run2/prepare; move run2 away: the absolute path is gone, the
    # relative one brings the moved folder's own data
    moved = tmp_path / "elsewhere" / "moved"
    os.makedirs(moved.parent)
    os.rename(run2, moved)
    expected = json.load(open(moved / "evaluate" / "metrics.json"))["metrics"]
    assert json.loads(invoke(["evaluate", "--model", moved / "rec", "--beams", 10]))["metrics"] == expected
    assert all(f"[{s}] up to date" in pipeline(data2, moved, config) for s in pipeline_module.STAGES)
    # a moved rec run without its dataset: one line saying so, and --data fixes it
    shutil.rmtree(moved / "prepare")
    result = CliRunner().invoke(main, ["evaluate", "--model", str(moved / "rec"), "--beams", "10"])
    assert result.exit_code == 1 and "is gone (was the run moved?); pass --data" in result.output, result.output
    assert "Traceback" not in result.output
    fixed = json.loads(invoke(["evaluate", "--model", moved / "rec", "--beams", 10, "--data", data2]))
    assert fixed["metrics"] == expected


def test_copied_run_folder_uses_its_own_files(finished, tmp_path):
    data, run, config = finished
    original, copy = tmp_path / "original", tmp_path / "copy"
    shutil.copytree(run, original)
    shutil.copytree(original, copy)
    expected = json.load(open(run / "evaluate" / "metrics.json"))["metrics"]
    # damage the original's model and prepared data: the copy must not be reading them
    (original / "rec" / "model.pt").write_bytes(b"")
    (original / "prepare" / "Synth.inter.json").write_text("{}")
    result = json.loads(invoke(["evaluate", "--model", copy / "rec", "--beams", 10]))
    assert result["metrics"] == expected
    out = pipeline(data, copy, config)
    assert all(f"[{s}] up to date" in out for s in pipeline_module.STAGES), out
    bad = CliRunner().invoke(main, ["evaluate", "--model", str(original / "rec")])
    assert bad.exit_code == 1 and "model.pt: corrupt or truncated (empty file)" in bad.output


def test_moved_run_folder_still_works(finished, tmp_path):
    data, run, config = finished
    staged, moved = tmp_path / "staged", tmp_path / "elsewhere" / "moved"
    shutil.copytree(run, staged)
    os.makedirs(moved.parent)
    os.rename(staged, moved)
    expected = json.load(open(run / "evaluate" / "metrics.json"))["metrics"]
    assert json.loads(invoke(["evaluate", "--model", moved / "rec", "--beams", 10]))["metrics"] == expected
    out = pipeline(data, moved, config)
    assert all(f"[{s}] up to date" in out for s in pipeline_module.STAGES), out


def test_deleted_or_changed_output_reruns_that_stage(finished, tmp_path):
    data, run, config = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = markers(copy)
    os.remove(copy / "rec" / "model.pt")
    out = pipeline(data, copy, config)
    assert "[rec] rerunning: output rec/model.pt missing" in out, out
    assert all(f"[{s}] up to date" in out for s in ("prepare", "embed", "cf", "tokenizer")), out
    after = markers(copy)
    assert all(after[s] == before[s] for s in ("prepare", "embed", "cf", "tokenizer"))
    assert after["rec"] != before["rec"] and os.path.isfile(copy / "rec" / "model.pt")
    # an output changed in place: same rule
    metrics = copy / "evaluate" / "metrics.json"
    metrics.write_text(metrics.read_text().replace("{", "{ ", 1))
    out = pipeline(data, copy, config)
    assert "[evaluate] rerunning: output evaluate/metrics.json changed" in out, out
    assert "[rec] up to date" in out


def folder_bytes(run, stages) -> dict:
    return {str(path.relative_to(run)): path.read_bytes() for stage in stages for path in (run / stage).rglob("*")
            if path.is_file()}


def test_a_changed_max_history_reruns_only_the_stages_that_read_it(finished, tmp_path):
    """data.max_history is read by the rec stage alone (and evaluate reads rec's model); prepare's
    fingerprint held the whole data section, so a change of it reran every stage."""
    data, run, config = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    kept = ("prepare", "embed", "cf", "tokenizer")
    before, kept_bytes = markers(copy), folder_bytes(copy, kept)
    cfg = yaml.safe_load(open(config))
    cfg["data"]["max_history"] = 7
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    out = pipeline(data, copy, changed)
    assert all(f"[{s}] up to date" in out for s in kept), out
    assert "[rec] rerunning: its settings or inputs changed" in out and "[evaluate] rerunning: " in out, out
    after = markers(copy)
    assert all(after[s] == before[s] for s in kept) and folder_bytes(copy, kept) == kept_bytes
    assert after["rec"] != before["rec"] and after["evaluate"] != before["evaluate"]
    assert json.load(open(copy / "rec" / "run.json"))["config"]["max_history"] == 7
    # the synthetic generator's settings are not read from a data folder: nothing to redo
    cfg["data"]["synthetic"]["seed"] = 1
    changed.write_text(yaml.safe_dump(cfg))
    out = pipeline(data, copy, changed)
    assert all(f"[{s}] up to date" in out for s in pipeline_module.STAGES), out
    # a synthetic source is its generator's settings: they, not max_history, make prepare rerun
    def prepare_fingerprint(data_settings):
        settings = dict(cfg, data={**cfg["data"], **data_settings})
        return pipeline_module.Pipeline(out=str(tmp_path / "x"), config=settings, source={"synthetic": True},
                                        log=lambda line: None).fingerprint("prepare")

    assert prepare_fingerprint({"max_history": 3}) == prepare_fingerprint({"max_history": 4})
    assert prepare_fingerprint({"synthetic": dict(cfg["data"]["synthetic"], seed=2)}) != prepare_fingerprint({})
