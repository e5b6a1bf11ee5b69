"""letter.tokenizer.prepare_tokenizer_inputs: the tokenizer stage's preparation that train-tokenizer
and the pipeline share (embeddings found beside the data, CF fallback, sidecar checks, cold splits),
and how its errors and warning reach a CLI user (naming the options)."""
import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from letter.cli.main import main
from letter.data import make_synthetic, write_letter
from letter.data.cold import write_cold_split
from letter.errors import LetterError, LetterWarning
from letter.runs import sidecar_path, sidecar_record, write_json
from letter.tokenizer import TokenizerConfig, prepare_tokenizer_inputs

ITEMS = 40
TEXT, CF = "Synth.emb-test8.npy", "Synth.cf-test4.npy"


@pytest.fixture
def data(tmp_path):
    """A dataset folder with one text and one CF embedding file (rows = items, distinct values)."""
    folder = tmp_path / "data"
    write_letter(make_synthetic(num_users=60, num_items=ITEMS, num_categories=4, min_length=3, max_length=6, seed=1),
                 str(folder))
    np.save(folder / TEXT, np.arange(ITEMS * 8, dtype=np.float32).reshape(ITEMS, 8))
    np.save(folder / CF, -np.arange(ITEMS * 4, dtype=np.float32).reshape(ITEMS, 4))
    return folder


def test_finds_the_embeddings_beside_the_data(data):
    from letter.data import load_dataset

    inputs = prepare_tokenizer_inputs(str(data), TokenizerConfig(alpha=0.5))
    dataset = load_dataset(str(data))
    assert inputs.text_path == str(data / TEXT) and inputs.cf_path == str(data / CF)
    assert np.array_equal(inputs.text_emb, np.load(data / TEXT)) and np.array_equal(inputs.cf_emb, np.load(data / CF))
    assert inputs.config.alpha == 0.5 and inputs.name == "Synth" and inputs.num_items == ITEMS
    assert np.array_equal(inputs.item_labels, dataset.category_labels())
    assert inputs.made_from == {"items": dataset.items_fingerprint()}


def test_given_files_win_and_rqkmeans_reads_no_cf(data, tmp_path):
    other = tmp_path / "other.npy"
    np.save(other, np.ones((ITEMS, 8), np.float32))
    inputs = prepare_tokenizer_inputs(str(data), TokenizerConfig(), text_emb=str(other))
    assert inputs.text_path == str(other) and inputs.text_emb.sum() == ITEMS * 8
    kmeans = prepare_tokenizer_inputs(str(data), TokenizerConfig(method="rqkmeans"), cf_emb=str(data / CF))
    assert kmeans.cf_emb is None and kmeans.cf_path is None


def test_missing_or_ambiguous_embeddings_name_the_argument(data):
    np.save(data / "Synth.emb-second.npy", np.zeros((ITEMS, 8), np.float32))
    with pytest.raises(LetterError, match=r"several text embedding files .*Synth.emb-second.npy, Synth.emb-test8.npy"):
        prepare_tokenizer_inputs(str(data), TokenizerConfig())
    for name in ("Synth.emb-second.npy", TEXT):
        (data / name).unlink()
    with pytest.raises(LetterError, match=r"no text_emb given and no Synth.emb-\*.npy in ") as raised:
        prepare_tokenizer_inputs(str(data), TokenizerConfig())
    assert raised.value.names == ("text_emb",)


def test_names_and_folders_with_glob_characters_find_only_their_own_files(tmp_path):
    """A dataset "S[1]" in a folder "d[1]*" finds S[1].emb-*.npy and never S1.emb-*.npy (which the
    unescaped pattern S[1].emb-*.npy would match)."""
    dataset = make_synthetic(num_users=60, num_items=ITEMS, num_categories=4, min_length=3, max_length=6, seed=1)
    dataset.name = "S[1]"
    folder = tmp_path / "d[1]*"
    write_letter(dataset, str(folder))
    np.save(folder / "S1.emb-other.npy", np.zeros((ITEMS, 8), np.float32))
    with pytest.raises(LetterError, match=r"no text_emb given and no S\[1\].emb-\*.npy in "):
        prepare_tokenizer_inputs(str(folder), TokenizerConfig(method="rqkmeans"))
    np.save(folder / "S[1].emb-mine.npy", np.ones((ITEMS, 8), np.float32))
    inputs = prepare_tokenizer_inputs(str(folder), TokenizerConfig(method="rqkmeans"))
    assert inputs.text_path == str(folder / "S[1].emb-mine.npy") and inputs.name == "S[1]"


def test_without_cf_embeddings_alpha_falls_back_only_when_allowed(data):
    (data / CF).unlink()
    with pytest.raises(LetterError, match=r"alpha needs CF embeddings \(cf_emb, or one Synth.cf-\*.npy in data_dir\)") as e:
        prepare_tokenizer_inputs(str(data), TokenizerConfig(alpha=0.1))
    assert e.value.names == ("alpha", "cf_emb", "data_dir")
    with pytest.warns(LetterWarning, match=r"no CF embeddings \(cf_emb, Synth.cf-\*.npy\): training with alpha 0"):
        inputs = prepare_tokenizer_inputs(str(data), TokenizerConfig(alpha=0.1), alpha_fallback=True)
    assert inputs.config.alpha == 0.0 and inputs.cf_emb is None
    with warnings.catch_warnings():  # methods without a collaborative term need none: no warning
        warnings.simplefilter("error")
        assert prepare_tokenizer_inputs(str(data), TokenizerConfig(method="rqvae")).config.alpha == 0.02


def test_embeddings_of_another_dataset_are_refused(data):
    write_json(sidecar_path(str(data / CF)), sidecar_record(str(data / CF), {"dataset": "another dataset's hash"}))
    with pytest.raises(LetterError, match=r"data_dir .*data: not the dataset the CF embedding Synth.cf-test4.npy was "
                                          "made from") as raised:
        prepare_tokenizer_inputs(str(data), TokenizerConfig())
    assert "data_dir" in raised.value.names


def test_embeddings_of_items_regenerated_under_the_same_ids_are_refused(tmp_path):
    # `data synth --overwrite` with another seed keeps the item ids 0..N-1 but not their text: the
    # embeddings left in the folder describe the old items and must not be taken for the new ones.
    folder = tmp_path / "data"
    runner = CliRunner()
    for args in (["data", "synth", str(folder), "--items", "60", "--users", "80", "--categories", "4", "--seed", "0"],
                 ["embed", str(folder), "--model", "hash", "--dim", "8"]):
        assert runner.invoke(main, args).exit_code == 0
    assert prepare_tokenizer_inputs(str(folder), TokenizerConfig(alpha=0.0)).num_items == 60
    regenerated = runner.invoke(main, ["data", "synth", str(folder), "--items", "60", "--users", "80", "--categories", "4", "--seed", "1",
                                       "--overwrite"])
    assert regenerated.exit_code == 0, regenerated.output
    result = runner.invoke(main, ["train-tokenizer", "--data", str(folder), "--alpha", "0", "--epochs", "1",
                                  "--out", str(tmp_path / "tok")])
    assert result.exit_code == 1 and "not the items the text embedding Synth.emb-hash8.npy was made from" in \
        result.output, result.output
    assert not (tmp_path / "tok").exists()


def test_a_cold_split_trains_on_its_warm_rows(data, tmp_path):
    from letter.data import load_dataset

    split = tmp_path / "split"
    record = write_cold_split(load_dataset(str(data)), str(split), fraction=0.25, seed=3,
                              embeddings=[str(data / TEXT)])
    said = []
    inputs = prepare_tokenizer_inputs(str(split), TokenizerConfig(method="rqkmeans"), log=said.append)
    warm = record["warm_items"]
    assert inputs.num_items == warm < ITEMS and inputs.text_emb.shape == (warm, 8)
    assert np.array_equal(inputs.text_emb, np.load(split / TEXT)[:warm])
    assert len(inputs.item_labels) == warm
    assert said == [f"cold split: training on the {warm} warm items, {ITEMS - warm} cold items left for "
                    "`letter add-items`"]


def test_train_tokenizer_names_the_options(data, tmp_path):
    """The CLI prints the library's warning and errors with its own option names."""
    nocf = tmp_path / "nocf"
    shutil.copytree(data, nocf)
    (nocf / CF).unlink()
    args = ["train-tokenizer", "--data", str(nocf), "--layers", "16", "--e-dim", "4", "--codebook-sizes", "4,4",
            "--epochs", "1", "--clusters", "2", "--kmeans-iters", "2", "--batch-size", "64"]
    result = CliRunner().invoke(main, [*args, "--alpha", "0.1", "--out", str(tmp_path / "t1")])
    assert result.exit_code == 1, result.output
    assert "Error: --alpha needs CF embeddings (--cf-emb, or one Synth.cf-*.npy in --data)" in result.output
    assert not (tmp_path / "t1").exists()
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "t2")])
    assert result.exit_code == 0, result.output
    assert "warning: no CF embeddings (--cf-emb, Synth.cf-*.npy): training with alpha 0" in result.stderr
    assert "collision" in result.stdout and (tmp_path / "t2" / "manifest.json").exists()
    (nocf / TEXT).unlink()
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "t3")])
    assert result.exit_code == 1 and f"Error: no --text-emb given and no Synth.emb-*.npy in {nocf}" in result.output


def test_the_cli_names_options_but_not_words_inside_paths():
    import click

    from letter.cli.errors import letter_message
    from letter.errors import input_error

    @click.command()
    @click.argument("data_path")
    @click.option("--model", "run_dir")
    @click.option("--out")
    @click.option("--resume", is_flag=True)
    def command(data_path, run_dir, out, resume):
        """A stand-in command."""

    error = input_error("out", "/x/out/run_dir.json", "is the command's input run_dir /x/out; pass resume",
                        "run_dir", "resume", "data_path")
    assert str(error) == "out /x/out/run_dir.json: is the command's input run_dir /x/out; pass resume"
    assert letter_message(error, command) == "--out /x/out/run_dir.json: is the command's input --model /x/out; pass --resume"
    assert letter_message(LetterError("data_path: unreadable", "data_path"), command) == "DATA_PATH: unreadable"
    assert letter_message(LetterError("data x: gone", "data"), command) == "data x: gone"  # no such option: kept


def test_the_pipeline_stage_prepares_its_inputs_the_same_way(data, tmp_path):
    """The pipeline's tokenizer stage goes through prepare_tokenizer_inputs: it reads its stages'
    files with the same checks (CF embeddings recording another dataset are refused) and trains on
    the dataset's category labels."""
    from letter.pipeline import Pipeline, _tokenizer

    tokenizer = {"layers": [16], "e_dim": 4, "codebook_sizes": [4, 4], "epochs": 1, "clusters": 2, "kmeans_iters": 2,
                 "batch_size": 64}
    p = Pipeline(out=str(tmp_path / "run"), config={"tokenizer": tokenizer}, source={}, device="cpu", log=lambda _: None)
    p.outputs = {"prepare": {"dataset": str(data)}, "embed": {"text_embeddings": str(data / TEXT)},
                 "cf": {"cf_embeddings": str(data / CF)}}
    report = _tokenizer(p, str(tmp_path / "run" / "tokenizer"))
    stage = tmp_path / "run" / "tokenizer"
    assert report["run"] == str(stage) and (stage / "manifest.json").exists()
    assert "level1_category_agreement" in json.loads((stage / "report.json").read_text())
    write_json(sidecar_path(str(data / CF)), sidecar_record(str(data / CF), {"dataset": "another dataset's hash"}))
    with pytest.raises(LetterError, match="not the dataset the CF embedding Synth.cf-test4.npy was made from"):
        _tokenizer(p, str(tmp_path / "run" / "again"))


def test_train_tokenizer_names_the_options_of_a_cf_width_mismatch(data, tmp_path):
    args = ["train-tokenizer", "--data", str(data), "--layers", "16", "--e-dim", "8", "--codebook-sizes", "4,4",
            "--epochs", "1", "--clusters", "2", "--kmeans-iters", "2", "--batch-size", "64", "--out", str(tmp_path / "t")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Error: CF embedding dim 4 != --e-dim 8: set --e-dim to 4 or enable --cf-projection" in result.output


def test_a_scalar_npy_on_a_cold_split_is_one_error(data, tmp_path):
    """A 0-d array as embeddings of a cold split: the shape error, not an IndexError from the row count."""
    from letter.data import load_dataset

    split = tmp_path / "split"
    write_cold_split(load_dataset(str(data)), str(split), fraction=0.25, seed=3, embeddings=[str(data / TEXT)])
    scalar = tmp_path / "scalar.npy"
    np.save(scalar, np.float32(1.0))
    with pytest.raises(LetterError, match=r"expected a \[num_items, dim\] matrix, got shape \(\)"):
        prepare_tokenizer_inputs(str(split), TokenizerConfig(method="rqkmeans"), text_emb=str(scalar)).train(
            str(tmp_path / "t"))


def test_train_tokenizer_names_the_option_of_a_pca_dim_past_the_input(data, tmp_path):
    result = CliRunner().invoke(main, ["train-tokenizer", "--data", str(data), "--method", "rqkmeans", "--pca-dim", "99",
                                       "--codebook-sizes", "4,4", "--out", str(tmp_path / "t")])
    assert result.exit_code == 1, result.output
    assert "Error: rqkmeans: --pca-dim must be in [1, 8] (the input dim), got 99" in result.output


def test_the_cli_keeps_a_path_spelled_like_an_option_name():
    """A relative path the user gave that is spelled like one of the parameters the message names
    (a run folder called `data`, an output folder called `resume`) is shown as given, not as that
    option; the parameter words after it are still shown as options."""
    from letter.cli.errors import letter_message
    from letter.cli.main import main
    from letter.errors import input_error
    from letter.runs.rec_run import recorded_data

    evaluate = main.get_command(None, "evaluate")
    with pytest.raises(LetterError) as gone:
        recorded_data({"data": "/gone/Synth"}, "data")  # `letter evaluate --model data`, its dataset moved
    assert letter_message(gone.value, evaluate) == (
        "--model data: its dataset /gone/Synth is gone (was the run moved?); pass --data PATH")
    held = input_error("out", "resume", "already holds a finished tokenizer run; pass resume to continue it",
                       "resume")
    assert letter_message(held, main.get_command(None, "train-tokenizer")) == (
        "--out resume: already holds a finished tokenizer run; pass --resume to continue it")
    worded = input_error("the dataset", "overwrite", "not the dataset it was made from; pass overwrite", "overwrite")
    assert letter_message(worded, main.get_command(None, "train-cf")) == (
        "the dataset overwrite: not the dataset it was made from; pass --overwrite")
