"""`letter pipeline` end to end on a tiny synthetic config, resume after an interruption, config."""
import json
import os
import re

import pytest
import yaml
from click.testing import CliRunner

from letter import pipeline as pipeline_module
from letter.cli.main import main
from letter.config import effective_config
from letter.errors import LetterError, SettingError

STAGES = pipeline_module.STAGES


def markers(run):
    return {s: os.stat(os.path.join(run, s, pipeline_module.MARKER)).st_mtime_ns
            for s in STAGES if os.path.exists(os.path.join(run, s, pipeline_module.MARKER))}


def test_pipeline_end_to_end_then_resume(tmp_path, tiny_config, monkeypatch):
    run = str(tmp_path / "run")
    runner = CliRunner()

    # First attempt: interrupted (Ctrl-C) when the recommender stage starts.
    def interrupted(p, directory):
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline_module.STAGE_FUNCTIONS, "rec", interrupted)
    result = runner.invoke(main, ["pipeline", "--synthetic", "--config", tiny_config, "--out", run])
    assert result.exit_code != 0
    done = markers(run)
    assert set(done) == {"prepare", "embed", "cf", "tokenizer"}
    assert not os.path.exists(os.path.join(run, "report.md"))
    monkeypatch.undo()

    # Rerun: the finished stages are skipped (their markers untouched), the rest runs.
    result = runner.invoke(main, ["pipeline", "--synthetic", "--config", tiny_config, "--out", run])
    assert result.exit_code == 0, result.output
    for stage in done:
        assert f"[{stage}] up to date" in result.output
    after = markers(run)
    assert all(after[s] == done[s] for s in done)
    assert set(after) == set(STAGES)

    report = json.loads(open(os.path.join(run, "report.json")).read())
    table = {row["model"]: row for row in report["metrics"]}
    assert set(table) == {"Popularity", "SASRec", "LETTER-TIGER"}
    for row in table.values():
        assert 0.0 <= row["recall@5"] <= row["recall@10"] <= 1.0
    assert report["dataset"]["items"] == 120
    assert os.path.isfile(os.path.join(run, "report.md"))
    assert "| LETTER-TIGER |" in result.output

    # A changed tokenizer setting reruns the tokenizer and everything after it, not before.
    cfg = yaml.safe_load(open(tiny_config))
    cfg["tokenizer"]["epochs"] = 11
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(main, ["pipeline", "--synthetic", "--config", str(changed), "--out", run])
    assert result.exit_code == 0, result.output
    final = markers(run)
    assert all(final[s] == after[s] for s in ("prepare", "embed", "cf"))
    assert all(final[s] != after[s] for s in ("tokenizer", "rec", "evaluate"))


def test_failing_stage_is_named_and_keeps_earlier_outputs(tmp_path, tiny_config):
    cfg = yaml.safe_load(open(tiny_config))
    # valid settings that fail only once the stage sees the data: 16 identifiers for 1000 items
    cfg["tokenizer"].update(codebook_sizes=[4, 4], clusters=2, unique=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    run = str(tmp_path / "run")
    result = CliRunner().invoke(main, ["pipeline", "--synthetic", "--config", str(bad), "--out", run])
    assert result.exit_code == 1
    assert "stage 'tokenizer' failed" in result.output and "Traceback" not in result.output
    assert set(markers(run)) == {"prepare", "embed", "cf"}


@pytest.mark.parametrize("section,key,value,message", [
    ("tokenizer", "clusters", 50, "tokenizer: clusters must be in"),
    ("rec", "lr", "fast", "rec: lr must be a number"),
    ("cf", "dropout", float("nan"), "cf: dropout must be a finite number"),
    ("rec", "max_grad_norm", -1, "rec: max_grad_norm must be > 0"),
])
def test_bad_config_values_fail_before_any_stage(tmp_path, tiny_config, section, key, value, message):
    cfg = yaml.safe_load(open(tiny_config))
    cfg[section][key] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    for args in (["config", "show"], ["pipeline", "--synthetic", "--out", str(tmp_path / "run")]):
        result = CliRunner().invoke(main, [*args, "--config", str(bad)])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_config_show_and_unknown_keys(tmp_path):
    result = CliRunner().invoke(main, ["config", "show", "--synthetic"])
    assert result.exit_code == 0
    shown = yaml.safe_load(result.output)
    assert shown["tokenizer"]["alpha"] == 0.02 and shown["rec"]["lr"] > 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tokenizer": {"alpah": 1}}))
    with pytest.raises(LetterError, match="tokenizer.alpah"):
        effective_config(str(bad))
    result = CliRunner().invoke(main, ["pipeline", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "exactly one of" in result.output


def test_cpu_preset_loads_validates_and_yields_to_files_and_options(tmp_path, monkeypatch):
    from letter import config as config_module
    from letter.cli.options import settings_from_options
    from letter.rec import RecConfig
    from letter.tokenizer import TokenizerConfig

    cfg = effective_config(preset="cpu")
    assert (cfg["rec"]["d_model"], cfg["rec"]["epochs"], cfg["rec"]["valid_users"]) == (128, 6, 0)
    assert cfg["tokenizer"]["layers"] == [512, 256, 128] and cfg["tokenizer"]["alpha"] == 0.02
    result = CliRunner().invoke(main, ["config", "show", "--preset", "cpu"])
    assert result.exit_code == 0 and yaml.safe_load(result.output) == cfg
    overrides = tmp_path / "rec.yaml"
    overrides.write_text("epochs: 3\n")
    rec = settings_from_options(RecConfig, {"lr": 1e-3}, str(overrides), "cpu")
    assert (rec.d_model, rec.temperature, rec.epochs, rec.lr) == (128, 0.7, 3, 1e-3)
    assert settings_from_options(TokenizerConfig, {}, None, "cpu").epochs == 80
    result = CliRunner().invoke(main, ["train-rec", "--data", "x", "--index", "y", "--out", "z", "--preset", "gpu"])
    assert result.exit_code == 2 and "Invalid value for '--preset'" in result.output
    with pytest.raises(LetterError, match="unknown preset 'gpu'"):
        effective_config(preset="gpu")
    monkeypatch.setitem(config_module.PRESETS["cpu"]["rec"], "lr", -1.0)  # a preset is validated like a file
    with pytest.raises(LetterError, match="rec: lr must be > 0"):
        effective_config(preset="cpu")


def test_data_embed_and_evaluate_sections_are_settings(tmp_path):
    """The pipeline's data, embed and evaluate sections are Settings classes, as the trainers' are:
    their defaults are the pipeline's (evaluate also measures the history-excluded protocol), the
    commands' options are generated from them, and a bad value names section and key."""
    from letter.cli.data import synth
    from letter.cli.embed import embed_command
    from letter.cli.rec import evaluate_cmd
    from letter.config import DataSettings, default_config
    from letter.data import SyntheticSettings
    from letter.embed import EmbedSettings
    from letter.rec import EvaluateSettings

    cfg = default_config()
    assert cfg["data"] == DataSettings().to_dict() and cfg["data"]["synthetic"] == SyntheticSettings().to_dict()
    assert cfg["embed"] == EmbedSettings().to_dict() and cfg["embed"]["fields"] == ["title", "description"]
    assert cfg["evaluate"] == dict(EvaluateSettings().to_dict(), exclude_history=True)
    assert EvaluateSettings().exclude_history is False  # `letter evaluate`'s default: the authors' protocol only
    options = {p.name: p for command in (synth, embed_command, evaluate_cmd) for p in command.params}
    for name, flag, default in (("num_beams", "--beams", 20), ("num_categories", "--categories", 20),
                                ("dim", "--dim", 384), ("max_users", "--max-users", 0)):
        assert options[name].opts == [flag] and options[name].help.endswith(f"[default: {default}]")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"synthetic": {"num_items": 8, "num_categories": 3}}}))
    # the bad value named with the file it came from (the library: its argument; the CLI: --config)
    with pytest.raises(LetterError, match=rf"^config_file {re.escape(str(config))}: data.synthetic: num_categories <= "
                                          r"num_items / 4 is required, got 3 and 8$"):
        effective_config(str(config))
    for args in (["config", "show"], ["pipeline", "--synthetic", "--out", str(tmp_path / "run")]):
        result = CliRunner().invoke(main, [*args, "--config", str(config)])
        assert result.exit_code == 1 and result.output == (f"Error: --config {config}: data.synthetic: num_categories "
                                                           "<= num_items / 4 is required, got 3 and 8\n")
    config.write_text(yaml.safe_dump({"data": {"synthetic": {"seed": -1}}, "embed": {"mode": "st"}}))
    with pytest.raises(LetterError, match=rf"^config_file {re.escape(str(config))}: data.synthetic: seed must be >= 0"):
        effective_config(str(config))


def test_library_errors_name_settings_and_the_cli_names_its_options(tmp_path):
    """A library function names the setting it was given; the CLI names the option it came from."""
    from letter.compare import compare
    from letter.data import make_synthetic
    from letter.rec import RecConfig

    with pytest.raises(SettingError, match=r"^num_beams must be >= 10 to compute the @10 metrics, got 5$"):
        compare(str(tmp_path), ["a=b"], str(tmp_path / "out"), RecConfig(), num_beams=5)
    result = CliRunner().invoke(main, ["compare", "--data", str(tmp_path), "--set", "a=b", "--out", str(tmp_path / "o"),
                                       "--beams", "5"])
    assert result.exit_code == 1 and "Error: --beams must be >= 10 to compute the @10 metrics, got 5" in result.output
    with pytest.raises(SettingError, match=r"^seeds must be >= 1, got 0$"):
        compare(str(tmp_path), ["a=b"], str(tmp_path / "out"), RecConfig(), seeds=0)
    with pytest.raises(SettingError, match=r"min_length <= max_length is required, got 9 and 4"):
        make_synthetic(min_length=9, max_length=4)
    result = CliRunner().invoke(main, ["data", "synth", str(tmp_path / "d"), "--min-length", "9", "--max-length", "4"])
    assert result.exit_code == 1 and ("Error: --min-length: data.synthetic: min_length <= max_length is required, "
                                      "got 9 and 4") in result.output
    with pytest.raises(SettingError, match=r"^from_stage must be one of prepare, "):
        pipeline_module.Pipeline(out=str(tmp_path / "run"), config={}, source={"synthetic": True}).run("nope")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_report_names_the_rec_stage_model(tmp_path):
    # The rec section may train LC-Rec (rec.model lcrec): the table row is then LETTER-LC-Rec.
    from types import SimpleNamespace

    from letter.pipeline_report import metric_table

    cf_metrics = tmp_path / "cf.json"
    cf_metrics.write_text(json.dumps({"test_history_kept": {"recall@10": 0.2}, "popularity_test": {"recall@10": 0.1}}))
    for model, row in (("tiger", "LETTER-TIGER"), ("lcrec", "LETTER-LC-Rec")):
        p = SimpleNamespace(config={"rec": {"model": model}},
                            outputs={"cf": {"metrics": str(cf_metrics)}, "evaluate": {"result": {"metrics": {"recall@10": 0.3}}}})
        assert [r["model"] for r in metric_table(p)] == ["Popularity", "SASRec", row]


def test_cold_split_data_leaves_no_run_folder(tmp_path):
    # The pipeline refuses a cold split (its copy would lose the record); like other data it
    # refuses, that is found before the run folder is made.
    from letter.data import make_synthetic
    from letter.data.cold import write_cold_split

    split = str(tmp_path / "split")
    write_cold_split(make_synthetic(num_users=60, num_items=40, num_categories=4, min_length=5, max_length=8, seed=0),
                     split)
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["pipeline", "--data", split, "--out", str(run)])
    assert result.exit_code == 1 and "is a cold split" in result.output and "Traceback" not in result.output
    assert not run.exists()


def test_a_missing_lcrec_base_model_fails_before_any_stage(tmp_path, tiny_config):
    cfg = yaml.safe_load(open(tiny_config))
    cfg["rec"] = {"model": "lcrec", "base_model": str(tmp_path / "missing")}
    bad = tmp_path / "lcrec.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["pipeline", "--synthetic", "--config", str(bad), "--out", str(run)])
    assert result.exit_code == 1 and "no such folder" in result.output and "Traceback" not in result.output
    assert not run.exists()


REFUSED_INPUTS = pytest.mark.parametrize("source, settings, message", [
    ("data", {}, "no training samples"),  # users of 3 items: validation and test targets only
    ("synthetic", {"data": {"synthetic": {"num_items": 8, "num_categories": 2}}}, "needs at least 10"),
    ("synthetic", {"data": {"synthetic": {"num_users": 20, "num_items": 40, "num_categories": 4, "min_length": 3,
                                          "max_length": 3}}}, "no training samples"),
    ("synthetic", {"embed": {"model": "/nonexistent/model"}}, "cannot load model '/nonexistent/model'"),
    ("synthetic", {"embed": {"model": "hash", "dim": 8, "fields": ["title", "nope"]}}, "'nope': no item of Synth"),
])


def refused_pipeline(tmp_path, source, settings, run):
    """`letter pipeline` into `run` on the refused input (a --data folder or --synthetic) and settings."""
    from letter.data import Dataset, write_letter

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"embed": {"model": "hash", "dim": 8}, **settings}))
    args = ["--synthetic"]
    if source == "data":
        ds = Dataset("Three", [f"u{u}" for u in range(12)], [[u, (u + 1) % 12, (u + 2) % 12] for u in range(12)],
                     [str(i) for i in range(12)], [{"title": f"item {i}"} for i in range(12)])
        write_letter(ds, str(tmp_path / "data"))
        args = ["--data", str(tmp_path / "data")]
    return CliRunner().invoke(main, ["pipeline", *args, "--config", str(config), "--out", str(run)])


@REFUSED_INPUTS
def test_inputs_the_stages_refuse_leave_no_run_folder(tmp_path, source, settings, message):
    # found before the run folder is made, not by the embed or cf stage after the stages before it ran
    run = tmp_path / "run"
    result = refused_pipeline(tmp_path, source, settings, run)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert not run.exists()


@REFUSED_INPUTS
def test_inputs_the_stages_refuse_stop_a_rerun_before_any_stage(tmp_path, monkeypatch, source, settings, message):
    # the pre-checks ran only when --out did not exist yet: on an existing run folder prepare ran
    # again and the embed or cf stage found the problem
    def interrupted(p, directory):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    config = tmp_path / "good.yaml"
    config.write_text(yaml.safe_dump({"data": {"synthetic": {"num_users": 300, "num_items": 120, "num_categories": 6}},
                                      "embed": {"model": "hash", "dim": 8}}))
    monkeypatch.setitem(pipeline_module.STAGE_FUNCTIONS, "embed", interrupted)
    CliRunner().invoke(main, ["pipeline", "--synthetic", "--config", str(config), "--out", str(run)])
    monkeypatch.undo()
    prepared = markers(run)
    assert set(prepared) == {"prepare"}
    result = refused_pipeline(tmp_path, source, settings, run)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert "running" not in result.output and markers(run) == prepared, result.output


def test_a_trainer_section_device_this_torch_lacks_leaves_no_run_folder(tmp_path):
    # --device auto leaves each trainer its section's device: one torch cannot use is found before
    # any stage, naming the setting (it failed in the cf stage, after prepare and embed wrote)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"embed": {"model": "hash", "dim": 8}, "tokenizer": {"device": "cuda:99"}}))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["pipeline", "--synthetic", "--config", str(config), "--out", str(run)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.startswith("Error: config: tokenizer.device cuda:99: "), result.output
    assert not run.exists()


def test_report_plot_is_written_atomically(tmp_path, full_disk_savefig):
    # it wrote training_curves.png.tmp.png and renamed it: a failed write left that file behind
    from types import SimpleNamespace

    from letter.pipeline_report import _plot_curves

    (tmp_path / "cf.json").write_text(json.dumps({"history": [{"epoch": 1, "valid_ndcg@10": 0.1}]}))
    (tmp_path / "history.json").write_text(json.dumps([{"epoch": 1, "train_loss": 2.0}]))
    (tmp_path / "tokenizer").mkdir()
    p = SimpleNamespace(out=str(tmp_path / "run"), config={"rec": {"model": "tiger"}},
                        outputs={"tokenizer": {"run": str(tmp_path / "tokenizer")}, "cf": {"metrics": str(tmp_path / "cf.json")},
                                 "rec": {"history": str(tmp_path / "history.json")}})
    (tmp_path / "run").mkdir()
    assert _plot_curves(p) == [str(tmp_path / "run" / "training_curves.png")]
    earlier = (tmp_path / "run" / "training_curves.png").read_bytes()
    assert earlier.startswith(b"\x89PNG") and len(earlier) > 1000
    full_disk_savefig()
    with pytest.raises(OSError, match="No space left"):
        _plot_curves(p)
    assert os.listdir(tmp_path / "run") == ["training_curves.png"]
    assert (tmp_path / "run" / "training_curves.png").read_bytes() == earlier


def test_evaluate_stage_measures_the_index_the_pipeline_built(tmp_path, monkeypatch):
    # an index version added later into the rec folder (`letter add-items`) is no input of the stage: a
    # rerun for another reason must not measure it in its place (that is `letter evaluate`'s default)
    import types

    import letter.rec
    from letter.rec import EvaluateSettings

    calls = []
    monkeypatch.setattr(letter.rec, "evaluate", lambda run, **kwargs: calls.append((run, kwargs)) or {"ok": 1})
    p = types.SimpleNamespace(outputs={"rec": {"run": "R"}, "prepare": {"dataset": "D"}}, device="cpu",
                              config={"evaluate": EvaluateSettings().to_dict()})
    outputs = pipeline_module._evaluate(p, str(tmp_path))
    assert outputs["result"] == {"ok": 1} and len(calls) == 1
    run, kwargs = calls[0]
    assert run == "R" and kwargs["data"] == "D" and kwargs["index_version"] == 0
