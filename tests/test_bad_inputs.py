"""Bad input to every command: one clear line (exit 1 for LetterError, 2 for click usage errors),
naming the argument or file, no traceback, and no output file created or changed.

Each case is (command, id, setup, args, exit code, message). `setup(world, case)` prepares broken
copies in the case's own folder before the snapshot; args may use {data}, {tok}, {rec}, {case}.
Cases that must succeed (exit 0) give a check(world, case, output) in place of the message: it
asserts the result (right data, right outputs); nothing outside the case folder may change.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import letter_ext
from letter.cli.main import main

# -- a tiny world of finished runs, built once -------------------------------------------------

TOK_ARGS = ["--layers", "32", "--e-dim", "16", "--codebook-sizes", "8,8,8", "--epochs", "2", "--clusters", "2",
            "--kmeans-iters", "3", "--batch-size", "64"]
REC_ARGS = ["--d-model", "16", "--num-layers", "1", "--num-decoder-layers", "1", "--num-heads", "2", "--d-kv", "8",
            "--d-ff", "32", "--epochs", "1", "--batch-size", "64", "--valid-users", "20", "--eval-beams", "10"]


def _ok(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    _ok(["data", "synth", data, "--users", 80, "--items", 40, "--categories", 4, "--min-length", 3,
         "--max-length", 8])
    _ok(["embed", data, "--model", "hash", "--mode", "hash", "--dim", 16])
    _ok(["train-cf", data, "--dim", 16, "--epochs", 1, "--blocks", 1, "--heads", 1])
    _ok(["train-tokenizer", "--data", data, "--out", root / "tok", *TOK_ARGS])
    _ok(["train-rec", "--data", data, "--index", root / "tok", "--out", root / "rec", *REC_ARGS])
    _ok(["evaluate", "--model", root / "rec", "--out", root / "reference-metrics.json"])
    (root / "cases").mkdir()
    return root


def snapshot(root) -> dict:
    """Every file under root with its size and mtime."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


# -- setups: broken copies ---------------------------------------------------------------------

def copy(what):
    def setup(world, case):
        shutil.copytree(world / what, case / what)
    return setup


def corrupt(what, name, kind):
    """A copy of run folder `what` whose `name` is 0-byte, truncated, garbage or a foreign pickle."""
    def setup(world, case):
        shutil.copytree(world / what, case / what)
        path = case / what / name
        good = (world / what / name).read_bytes() if (world / what / name).exists() else b"x" * 4000
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            path.write_bytes(good[: len(good) // 2])
        elif kind == "garbage":
            path.write_bytes(b"this is not a checkpoint\n" * 50)
        elif kind == "foreign":
            torch.save([1, 2, 3], path)
    return setup


def unfinished(what, remove):
    def setup(world, case):
        shutil.copytree(world / what, case / what)
        for name in remove:
            (case / what / name).unlink()
        summary = case / what / "summary.json"
        if summary.exists():
            summary.write_text(json.dumps({**json.loads(summary.read_text()), "finished": False}))
    return setup


def mixed(what, name):
    """A copy whose `name` holds other (valid) content than the run wrote."""
    def setup(world, case):
        shutil.copytree(world / what, case / what)
        path = case / what / name
        if name.endswith(".npy"):
            np.save(path, np.load(path)[::-1].copy())
        else:
            path.write_text(path.read_text().replace("}", " }", 1))
    return setup


def drop_marker(what):
    """A copy of run folder `what` with only its completion marker deleted (the damage a reader must
    see as an unfinished run; earlier versions called the marker complete.json)."""
    def setup(world, case):
        shutil.copytree(world / what, case / what)
        for marker in ("manifest.json", "complete.json"):
            if (case / what / marker).exists():
                (case / what / marker).unlink()
    return setup


def _reorder_one_history(data_dir):
    """Swap the last two items of one user (same users, items, sizes: only the content differs)."""
    inter = data_dir / "Synth.inter.json"
    raw = json.loads(inter.read_text())
    user = next(u for u, items in raw.items() if items[-1] != items[-2])
    raw[user] = raw[user][:-2] + raw[user][-2:][::-1]  # another test target for this user
    inter.write_text(json.dumps(raw))


def edited_data(*runs):
    """A copy of the dataset with one history reordered, and copies of the run folders `runs` beside
    it (their recorded relative dataset path finds this copy)."""
    def setup(world, case):
        shutil.copytree(world / "data", case / "data")
        _reorder_one_history(case / "data")
        for what in runs:
            shutil.copytree(world / what, case / what)
    return setup


def paused_rec(world, case):
    """A train-rec run on a copy of the dataset stopped after 1 of 2 epochs, then that dataset edited."""
    shutil.copytree(world / "data", case / "data")
    _ok(["train-rec", "--data", case / "data", "--index", world / "tok", "--out", case / "r", *REC_ARGS,
         "--epochs", "2", "--stop-after", "1"])
    _reorder_one_history(case / "data")


def write_bytes(name, data: bytes):
    def setup(world, case):
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_bytes(data)
    return setup


def both(*setups):
    def setup(world, case):
        for one in setups:
            one(world, case)
    return setup


def odd_categories(world, case):
    """A copy of the dataset whose item.json has a null and a list `category` (other items: strings),
    embedded again (embeddings are keyed by the items' text: the copied ones no longer fit)."""
    shutil.copytree(world / "data", case / "data")
    items = case / "data" / "Synth.item.json"
    raw = json.loads(items.read_text())
    first, second = list(raw)[:2]
    raw[first]["category"] = None
    raw[second]["category"] = ["a", "b"]
    items.write_text(json.dumps(raw))
    _ok(["embed", case / "data", "--model", "hash", "--mode", "hash", "--dim", 16, "--overwrite"])


# -- checks of cases that must succeed ---------------------------------------------------------

def same_metrics_as_reference(world, case, output):
    """The run evaluated on its own (moved) dataset gives the metrics of the original run."""
    reference = json.loads((world / "reference-metrics.json").read_text())["metrics"]
    assert json.loads(output[output.index("{"):])["metrics"] == reference


def codes_of_a_tokenizer(world, case, output):
    codes = np.load(case / "x.npy")
    assert codes.shape == (40, 3) and codes.min() >= 0 and codes.max() < 8


def same_codes_as_world(world, case, output):
    """--overwrite replaced the run by a new finished one: seeded, so the world's codes."""
    assert (case / "tok" / "manifest.json").exists()
    assert np.array_equal(np.load(case / "tok" / "codes.npy"), np.load(world / "tok" / "codes.npy"))


def report_without_categories(world, case, output):
    """Null and list categories: no category report (not one with None or a list as a category)."""
    report = json.loads((case / "t" / "report.json").read_text())
    assert "level1_category_agreement" not in report and report["items"] == 40


def ten_items_listed(world, case, output):
    """Ranks 1..10 listed (items sharing an identifier share its rank)."""
    ranks = {int(line.split()[0]) for line in output.splitlines() if line.strip()}
    assert ranks == set(range(1, 11)), output


def write(name, text):
    def setup(world, case):
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_text(text)
    return setup


def config_file(section, key, value):
    """A pipeline config file setting `section.key` (or the whole section when key is None)."""
    def setup(world, case):
        cfg = {section: value} if key is None else {section: {key: value}}
        (case / "bad.yaml").write_text(yaml.safe_dump(cfg))
    return setup


def none(world, case):
    pass


E, T, G, F = "empty", "truncated", "garbage", "foreign"
CORRUPT = "corrupt or truncated"

CASES = [
    # data synth
    ("data synth", "users 0", none, ["data", "synth", "{case}/out", "--users", "0"], 2, "--users"),
    ("data synth", "items 0", none, ["data", "synth", "{case}/out", "--items", "0"], 2, "--items"),
    ("data synth", "categories 0", none, ["data", "synth", "{case}/out", "--categories", "0"], 2, "--categories"),
    ("data synth", "categories > items/4", none, ["data", "synth", "{case}/out", "--items", "8", "--categories", "3"],
     1, "--categories: data.synthetic: num_categories <= num_items / 4 is required, got 3 and 8"),
    ("data synth", "min-length 1", none, ["data", "synth", "{case}/out", "--min-length", "1"], 2, "--min-length"),
    ("data synth", "max-length -5", none, ["data", "synth", "{case}/out", "--max-length", "-5"], 2, "--max-length"),
    ("data synth", "min > max", none, ["data", "synth", "{case}/out", "--min-length", "9", "--max-length", "4"],
     1, "--min-length: data.synthetic: min_length <= max_length is required, got 9 and 4"),
    ("data synth", "users not a number", none, ["data", "synth", "{case}/out", "--users", "many"], 2, "--users"),
    ("data synth", "into a train-rec run", copy("rec"), ["data", "synth", "{case}/rec"], 1,
     "a train-rec run folder; write the dataset output elsewhere"),
    # data synth-catalog
    ("data synth-catalog", "items below 1000", none, ["data", "synth-catalog", "{case}/out", "--items", "10"], 2,
     "--items"),
    ("data synth-catalog", "no --items", none, ["data", "synth-catalog", "{case}/out"], 2, "--items"),
    ("data synth-catalog", "mean-length 5", none,
     ["data", "synth-catalog", "{case}/out", "--items", "1000", "--mean-length", "5"], 2, "--mean-length"),
    ("data synth-catalog", "zipf -1", none, ["data", "synth-catalog", "{case}/out", "--items", "1000", "--zipf", "-1"],
     2, "--zipf"),
    # data convert
    ("data convert", "missing source", none, ["data", "convert", "{case}/nothing", "{case}/out"], 1, "nothing"),
    ("data convert", "malformed json", write("src/X.inter.json", "{not json"),
     ["data", "convert", "{case}/src", "{case}/out"], 1, "X.inter.json: malformed json"),
    ("data convert", "kcore 0", none, ["data", "convert", "{data}", "{case}/out", "--kcore", "0"], 2, "--kcore"),
    ("data convert", "bad format", none, ["data", "convert", "{data}", "{case}/out", "--format", "csv"], 2,
     "--format"),
    # data stats
    ("data stats", "missing", none, ["data", "stats", "{case}/nothing"], 1, "nothing: no such file"),
    ("data stats", "empty object", write("src/X.inter.json", "{}"), ["data", "stats", "{case}/src"], 1,
     "X.inter.json"),
    # embed
    ("embed", "unknown field", none, ["embed", "{data}", "--model", "hash", "--fields", "title,nosuchfield"], 1,
     "nosuchfield"),
    ("embed", "dim 0", none, ["embed", "{data}", "--model", "hash", "--dim", "0"], 2, "--dim"),
    ("embed", "dim negative", none, ["embed", "{data}", "--model", "hash", "--dim", "-4"], 2, "--dim"),
    ("embed", "batch-size 0", none, ["embed", "{data}", "--batch-size", "0"], 2, "--batch-size"),
    ("embed", "max-length 0", none, ["embed", "{data}", "--max-length", "0"], 2, "--max-length"),
    ("embed", "device unknown", none, ["embed", "{data}", "--model", "hash", "--device", "tpu"], 1, "--device"),
    ("embed", "device not here", none, ["embed", "{data}", "--model", "hash", "--device", "cuda:99"], 1, "--device"),
    ("embed", "model not local", none, ["embed", "{data}", "--model", "nosuch-org/nosuch-model-xyz"], 1,
     "not in the local Hugging Face cache"),
    ("embed", "model folder missing", none, ["embed", "{data}", "--model", "{case}/model", "--mode", "mean-pool"], 1,
     "not a local folder"),
    ("embed", "bad mode", none, ["embed", "{data}", "--mode", "fast"], 2, "--mode"),
    # train-cf
    ("train-cf", "negative lr", none, ["train-cf", "{data}", "--out", "{case}/o", "--lr", "-1"], 1,
     "--lr: cf: lr must be > 0, got -1.0"),
    ("train-cf", "nan dropout", none, ["train-cf", "{data}", "--out", "{case}/o", "--dropout", "nan"], 1,
     "--dropout: cf: dropout must be a finite number, got nan"),
    ("train-cf", "device", none, ["train-cf", "{data}", "--out", "{case}/o", "--device", "tpu"], 1, "--device"),
    ("train-cf", "missing data", none, ["train-cf", "{case}/nothing"], 1, "nothing"),
    ("train-cf", "config wrong type", write("c.yaml", "epochs: many\n"),
     ["train-cf", "{data}", "--out", "{case}/o", "--config", "{case}/c.yaml"], 1,
     "--config {case}/c.yaml: cf: epochs must be an integer, got 'many'"),
    *[("train-cf", f"resume {k} checkpoint", corrupt("data", "Synth.cf-sasrec16.ckpt.pt", k),
       ["train-cf", "{case}/data", "--dim", "16", "--epochs", "1", "--blocks", "1", "--heads", "1", "--resume"], 1,
       "Synth.cf-sasrec16.ckpt.pt: " + (CORRUPT if k != F else "not a LETTER checkpoint")) for k in (E, T, G, F)],
    # train-tokenizer
    ("train-tokenizer", "epochs 0", none, ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", "--epochs", "0"],
     1, "--epochs: tokenizer: epochs must be >= 1, got 0"),
    ("train-tokenizer", "nan alpha", none, ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", "--alpha", "nan"],
     1, "--alpha: tokenizer: alpha must be a finite number, got nan"),
    ("train-tokenizer", "levels 0", none, ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", "--levels", "0"],
     1, "--levels"),
    ("train-tokenizer", "codebook-size 1", none,
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", "--codebook-size", "1"], 1, "--codebook-size must be >= 2"),
    ("train-tokenizer", "garbage text-emb", write("e.npy", "garbage"),
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", "--text-emb", "{case}/e.npy"], 1, "--text-emb"),
    ("train-tokenizer", "mixed cf embeddings", mixed("data", "Synth.cf-sasrec16.npy"),
     ["train-tokenizer", "--data", "{case}/data", "--out", "{case}/t", *TOK_ARGS], 1,
     "Synth.cf-sasrec16.npy: changed"),
    ("train-tokenizer", "device", none,
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", *TOK_ARGS, "--device", "tpu"], 1, "--device"),
    *[("train-tokenizer", f"resume {k} checkpoint", corrupt("tok", "checkpoint.pt", k),
       ["train-tokenizer", "--data", "{data}", "--out", "{case}/tok", *TOK_ARGS, "--resume"], 1,
       "checkpoint.pt: " + (CORRUPT if k != F else "not a LETTER checkpoint")) for k in (E, T, G, F)],
    # tokenize
    ("tokenize", "recommender run folder", none,
     ["tokenize", "--tokenizer", "{rec}", "--embeddings", "{data}/Synth.emb-hash16.npy", "--out", "{case}/x.npy"],
     1, "--tokenizer {rec}: a train-rec run folder, not a tokenizer run folder"),
    ("tokenize", "unfinished run", unfinished("tok", ["report.json", "manifest.json"]),
     ["tokenize", "--tokenizer", "{case}/tok", "--embeddings", "{data}/Synth.emb-hash16.npy", "--out", "{case}/x.npy"],
     1, "--tokenizer {case}/tok: unfinished tokenizer run"),
    ("tokenize", "mixed run", mixed("tok", "codes.npy"),
     ["tokenize", "--tokenizer", "{case}/tok", "--embeddings", "{data}/Synth.emb-hash16.npy", "--out", "{case}/x.npy"],
     1, "--tokenizer {case}/tok: mixed tokenizer run folder: codes.npy changed"),
    *[("tokenize", f"{k} model.pt", corrupt("tok", "model.pt", k),
       ["tokenize", "--tokenizer", "{case}/tok", "--embeddings", "{data}/Synth.emb-hash16.npy", "--out",
        "{case}/x.npy"], 1, "model.pt: " + (CORRUPT if k != F else "not a LETTER checkpoint")) for k in (E, T, G, F)],
    ("tokenize", "wrong dim", none,
     ["tokenize", "--tokenizer", "{tok}", "--embeddings", "{data}/Synth.cf-sasrec16.npy", "--out", "{case}/x.npy"],
     0, codes_of_a_tokenizer),  # same dim (16): accepted; see the next case for a real mismatch
    ("tokenize", "garbage embeddings", write("e.npy", "garbage"),
     ["tokenize", "--tokenizer", "{tok}", "--embeddings", "{case}/e.npy"], 1, "--embeddings"),
    # train-rec
    ("train-rec", "index: unfinished tokenizer run", unfinished("tok", ["report.json", "manifest.json"]),
     ["train-rec", "--data", "{data}", "--index", "{case}/tok", "--out", "{case}/r", *REC_ARGS], 1,
     "--index {case}/tok: unfinished tokenizer run"),
    ("train-rec", "index: mixed tokenizer run", mixed("tok", "codes.npy"),
     ["train-rec", "--data", "{data}", "--index", "{case}/tok", "--out", "{case}/r", *REC_ARGS], 1,
     "--index {case}/tok: mixed tokenizer run folder: codes.npy changed"),
    ("train-rec", "index: recommender run", none,
     ["train-rec", "--data", "{data}", "--index", "{rec}", "--out", "{case}/r", *REC_ARGS], 1,
     "--index {rec}: a train-rec run folder, not a tokenizer run folder"),
    ("train-rec", "negative lr", none,
     ["train-rec", "--data", "{data}", "--index", "{tok}", "--out", "{case}/r", "--lr", "-1"], 1,
     "--lr: rec: lr must be > 0, got -1.0"),
    ("train-rec", "max-grad-norm 0", none,
     ["train-rec", "--data", "{data}", "--index", "{tok}", "--out", "{case}/r", "--max-grad-norm", "0"], 1,
     "--max-grad-norm: rec: max_grad_norm must be > 0, got 0.0"),
    ("train-rec", "inf warmup", none,
     ["train-rec", "--data", "{data}", "--index", "{tok}", "--out", "{case}/r", "--warmup-ratio", "inf"], 1,
     "--warmup-ratio: rec: warmup_ratio must be a finite number, got inf"),
    ("train-rec", "device", none,
     ["train-rec", "--data", "{data}", "--index", "{tok}", "--out", "{case}/r", "--device", "tpu"], 1, "--device"),
    ("train-rec", "missing index", none,
     ["train-rec", "--data", "{data}", "--index", "{case}/none.npy", "--out", "{case}/r"], 1, "none.npy"),
    # evaluate
    ("evaluate", "beams 0", none, ["evaluate", "--model", "{rec}", "--beams", "0"], 2, "--beams"),
    ("evaluate", "beams 5", none, ["evaluate", "--model", "{rec}", "--beams", "5"], 2, "--beams"),
    ("evaluate", "batch-size 0", none, ["evaluate", "--model", "{rec}", "--batch-size", "0"], 2, "--batch-size"),
    ("evaluate", "max-users -1", none, ["evaluate", "--model", "{rec}", "--max-users", "-1"], 2, "--max-users"),
    ("evaluate", "device unknown", none, ["evaluate", "--model", "{rec}", "--device", "tpu"], 1, "--device"),
    ("evaluate", "index version missing", none, ["evaluate", "--model", "{rec}", "--index-version", "3"], 1,
     "--index-version 3"),
    ("evaluate", "exclude-history with hf", none, ["evaluate", "--model", "{rec}", "--exclude-history", "--decoder", "hf"],
     1, "--decoder: evaluate: decoder hf: exclude_history needs the fused decoder"),
    ("evaluate", "max-new-share 2", none, ["evaluate", "--model", "{rec}", "--max-new-share", "2"], 2, "--max-new-share"),
    ("evaluate", "cold on an ordinary dataset", none, ["evaluate", "--model", "{rec}", "--cold"], 1,
     "--cold: {data} is not a cold split"),
    ("evaluate", "text-emb without cold", none, ["evaluate", "--model", "{rec}", "--text-emb", "{case}/e.npy"], 2,
     "--cold"),
    ("add-items", "tokenizer as model", none,
     ["add-items", "--model", "{tok}", "--tokenizer", "{tok}", "--embeddings", "{case}/e.npy"], 1,
     "--model {tok}: not a train-rec run folder"),
    ("data cold-split", "fraction 0", none, ["data", "cold-split", "{data}", "--fraction", "0", "--out", "{case}/s"], 2,
     "--fraction"),
    ("data cold-split", "missing data", none, ["data", "cold-split", "{case}/nothing", "--out", "{case}/s"], 1, "nothing"),
    ("evaluate", "device not here", none, ["evaluate", "--model", "{rec}", "--device", "cuda:99"], 1, "--device"),
    ("evaluate", "no such run", none, ["evaluate", "--model", "{case}/none"], 1,
     "not a train-rec run folder (no such folder)"),
    ("evaluate", "tokenizer folder", none, ["evaluate", "--model", "{tok}"], 1,
     "--model {tok}: not a train-rec run folder (missing run.json) (it looks like a tokenizer run folder)"),
    ("evaluate", "unfinished", unfinished("rec", ["manifest.json"]), ["evaluate", "--model", "{case}/rec"], 1,
     "--model {case}/rec: unfinished train-rec run"),
    ("evaluate", "mixed", mixed("rec", "history.json"), ["evaluate", "--model", "{case}/rec"], 1,
     "mixed train-rec run folder: history.json changed"),
    *[("evaluate", f"{k} run.json", corrupt("rec", "run.json", k), ["evaluate", "--model", "{case}/rec"], 1,
       "run.json: " + CORRUPT) for k in (E, T, G)],
    *[("evaluate", f"{k} model.pt", corrupt("rec", "model.pt", k), ["evaluate", "--model", "{case}/rec",
       "--out", "{case}/m.json"], 1, "model.pt: " + (CORRUPT if k != F else "not a LETTER checkpoint"))
      for k in (E, T, G, F)],
    *[("evaluate", f"{k} codes.npy", corrupt("rec", "codes.npy", k), ["evaluate", "--model", "{case}/rec"], 1,
       "codes.npy: " + CORRUPT) for k in (E, T, G)],
    # recommend
    ("recommend", "k 0", none, ["recommend", "--model", "{rec}", "--history", "1,2", "-k", "0"], 2, "-k"),
    ("recommend", "device", none, ["recommend", "--model", "{rec}", "--history", "1,2", "--device", "tpu"], 1,
     "--device"),
    ("recommend", "unknown item", none, ["recommend", "--model", "{rec}", "--history", "1,nosuchitem"], 1,
     "nosuchitem"),
    *[("recommend", f"{k} model.pt", corrupt("rec", "model.pt", k),
       ["recommend", "--model", "{case}/rec", "--history", "1,2"], 1,
       "model.pt: " + (CORRUPT if k != F else "not a LETTER checkpoint")) for k in (E, T, G, F)],
    ("recommend", "unfinished", unfinished("rec", ["manifest.json"]),
     ["recommend", "--model", "{case}/rec", "--history", "1,2"], 1, "--model {case}/rec: unfinished train-rec run"),
    ("recommend", "two sources", none, ["recommend", "--model", "{rec}", "--history", "1,2", "--users", "all"], 2,
     "exactly one of --history, --histories FILE, --users"),
    ("recommend", "users without out", none, ["recommend", "--model", "{rec}", "--users", "all"], 2, "--out"),
    ("recommend", "unknown user", none, ["recommend", "--model", "{rec}", "--users", "nobody",
                                         "--out", "{case}/r.jsonl"], 2, "unknown user id(s) nobody"),
    ("recommend", "missing histories file", none, ["recommend", "--model", "{rec}", "--histories", "{case}/none.txt",
                                                   "--out", "{case}/r.jsonl"], 1, "none.txt"),
    ("recommend", "empty history line", write("h.txt", "1,2\n\n3\n"),
     ["recommend", "--model", "{rec}", "--histories", "{case}/h.txt", "--out", "{case}/r.jsonl"], 1,
     "line 2 holds no item id"),
    ("recommend", "unknown item in file", write("h.txt", "1,2\nnosuchitem\n"),
     ["recommend", "--model", "{rec}", "--histories", "{case}/h.txt", "--out", "{case}/r.jsonl"], 1,
     "history of {\"line\": 2}: unknown item id(s) nosuchitem"),
    ("recommend", "beams below k", none, ["recommend", "--model", "{rec}", "--history", "1,2", "-k", "5",
                                          "--beams", "3"], 2, "--beams must be >= -k"),
    ("recommend", "unknown excluded item", none, ["recommend", "--model", "{rec}", "--history", "1,2",
                                                  "--exclude", "zz"], 1, "--exclude: unknown item id(s) zz"),
    # serve: the run is loaded (and refused) before anything listens (--port 0: whatever holds 8000)
    ("serve", "missing run", none, ["serve", "--model", "{case}/none", "--port", "0"], 1,
     "--model {case}/none: not a train-rec run folder"),
    ("serve", "unfinished", unfinished("rec", ["manifest.json"]), ["serve", "--model", "{case}/rec", "--port", "0"], 1,
     "--model {case}/rec: unfinished train-rec run"),
    ("serve", "port", none, ["serve", "--model", "{rec}", "--port", "70000"], 2, "--port"),
    # pipeline and config show: wrong types name the key
    *[(cmd, f"config {name}", config_file(section, key, value), [*args, "--config", "{case}/bad.yaml"], 1, message)
      for cmd, args in (("pipeline", ["pipeline", "--synthetic", "--out", "{case}/run"]),
                        ("config show", ["config", "show"]))
      for name, section, key, value, message in (
          ("num_beams text", "evaluate", "num_beams", "ten", "evaluate: num_beams must be an integer"),
          ("num_beams 0", "evaluate", "num_beams", 0, "evaluate: num_beams must be >= 10"),
          ("split", "evaluate", "split", "train", "evaluate: split must be one of"),
          ("max_history text", "data", "max_history", "x", "data: max_history must be an integer"),
          ("fields string", "embed", "fields", "title", "embed: fields must be a non-empty list"),
          ("embed batch 0", "embed", "batch_size", 0, "embed: batch_size must be >= 1"),
          ("embed dim 0", "embed", "dim", 0, "embed: dim must be >= 1"),
          ("decoder", "evaluate", "decoder", "greedy", "evaluate: decoder must be one of fused, hf"),
          ("exclude_history with hf", "evaluate", None, {"decoder": "hf", "exclude_history": True},
           "evaluate: decoder hf: exclude_history needs the fused decoder"),
          ("section scalar", "tokenizer", None, 5, "tokenizer must be a mapping"),
          ("lr text", "rec", "lr", "fast", "rec: lr must be a number"),
          ("unknown key", "cf", "nosuchkey", 1, "cf.nosuchkey"),
      )],
    ("pipeline", "missing data", none, ["pipeline", "--data", "{case}/none", "--out", "{case}/run"], 2, "--data"),
    ("pipeline", "device", none, ["pipeline", "--synthetic", "--out", "{case}/run", "--device", "tpu"], 1, "--device"),
    ("pipeline", "bad from", none, ["pipeline", "--synthetic", "--out", "{case}/run", "--from", "nope"], 2, "--from"),
    ("config show", "missing file", none, ["config", "show", "--config", "{case}/none.yaml"], 1, "none.yaml"),
    ("config show", "not yaml", write("bad.yaml", "a: [1,\n"), ["config", "show", "--config", "{case}/bad.yaml"], 1,
     "bad.yaml: not valid YAML"),
]

# -- issue 25: stale or overwritten state, the file system, bad data, strict parsing ----------------
LONG = "x" * 300
CASES += [
    # a missing completion marker: unfinished, for every reader
    ("evaluate", "marker deleted", drop_marker("rec"), ["evaluate", "--model", "{case}/rec"], 1,
     "--model {case}/rec: unfinished train-rec run"),
    ("recommend", "marker deleted", drop_marker("rec"), ["recommend", "--model", "{case}/rec", "--history", "1,2"], 1,
     "--model {case}/rec: unfinished train-rec run"),
    ("serve", "marker deleted", drop_marker("rec"), ["serve", "--model", "{case}/rec", "--port", "0"], 1, "--model {case}/rec: unfinished train-rec run"),
    ("add-items", "marker deleted", drop_marker("rec"),
     ["add-items", "--model", "{case}/rec", "--tokenizer", "{tok}", "--embeddings", "{data}/Synth.emb-hash16.npy"], 1,
     "--model {case}/rec: unfinished train-rec run"),
    ("tokenize", "marker deleted", drop_marker("tok"),
     ["tokenize", "--tokenizer", "{case}/tok", "--embeddings", "{data}/Synth.emb-hash16.npy", "--out", "{case}/x.npy"],
     1, "--tokenizer {case}/tok: unfinished tokenizer run"),
    ("train-rec", "index: marker deleted", drop_marker("tok"),
     ["train-rec", "--data", "{data}", "--index", "{case}/tok", "--out", "{case}/r", *REC_ARGS], 1,
     "--index {case}/tok: unfinished tokenizer run"),
    ("compare", "set: marker deleted", drop_marker("tok"),
     ["compare", "--data", "{data}", "--set", "A={case}/tok", "--out", "{case}/cmp", "--seeds", "1", *REC_ARGS], 1,
     "--set A={case}/tok: {case}/tok: unfinished tokenizer run"),
    # one file swapped for a same-size valid one
    ("evaluate", "codes swapped", mixed("rec", "codes.npy"), ["evaluate", "--model", "{case}/rec"], 1,
     "mixed train-rec run folder: codes.npy changed"),
    ("recommend", "codes swapped", mixed("rec", "codes.npy"),
     ["recommend", "--model", "{case}/rec", "--history", "1,2"], 1, "mixed train-rec run folder: codes.npy changed"),
    ("add-items", "codes swapped", mixed("rec", "codes.npy"),
     ["add-items", "--model", "{case}/rec", "--tokenizer", "{tok}", "--embeddings", "{data}/Synth.emb-hash16.npy"], 1,
     "mixed train-rec run folder: codes.npy changed"),
    # the data a run was trained on
    ("train-rec", "resume on edited data", paused_rec,
     ["train-rec", "--data", "{case}/data", "--index", "{tok}", "--out", "{case}/r", *REC_ARGS, "--epochs", "2",
      "--resume"], 1, "cannot resume from {case}/r/checkpoint.pt: inputs.dataset was"),
    ("evaluate", "recorded dataset edited", edited_data("rec"), ["evaluate", "--model", "{case}/rec"], 1,
     "the dataset {case}/data: not the dataset --model {case}/rec was made from"),
    ("evaluate", "--data another dataset", edited_data(), ["evaluate", "--model", "{rec}", "--data", "{case}/data"],
     1, "--data {case}/data: not the dataset"),
    ("recommend", "--data another dataset", edited_data(),
     ["recommend", "--model", "{rec}", "--history", "1,2", "--data", "{case}/data"], 1, "--allow-other-data"),
    ("recommend", "--data another dataset, allowed", edited_data(),
     ["recommend", "--model", "{rec}", "--history", "1,2", "--data", "{case}/data", "--allow-other-data"], 0,
     ten_items_listed),
    ("evaluate", "moved run", both(copy("rec"), copy("data")), ["evaluate", "--model", "{case}/rec"], 0,
     same_metrics_as_reference),
    ("add-items", "recorded dataset edited", edited_data("rec"),
     ["add-items", "--model", "{case}/rec", "--tokenizer", "{tok}", "--embeddings", "{data}/Synth.emb-hash16.npy"], 1,
     "not the dataset"),
    ("train-tokenizer", "embeddings of another dataset", edited_data(),
     ["train-tokenizer", "--data", "{case}/data", "--out", "{case}/t", *TOK_ARGS], 1,
     "--data {case}/data: not the dataset the CF embedding Synth.cf-sasrec16.npy was made from"),
    # no command writes onto its inputs, into another kind of run, or over a finished run
    ("evaluate", "out onto the model", copy("rec"), ["evaluate", "--model", "{case}/rec", "--out", "{case}/rec/model.pt"],
     1, "--out {case}/rec/model.pt: a file of the run folder --model"),
    ("evaluate", "out onto the run's summary", none, ["evaluate", "--model", "{rec}", "--out", "{rec}/summary.json"], 1,
     "--out {rec}/summary.json: a file of the run folder --model"),
    ("tokenize", "out onto the embeddings", both(copy("data")),
     ["tokenize", "--tokenizer", "{tok}", "--embeddings", "{case}/data/Synth.emb-hash16.npy", "--out",
      "{case}/data/Synth.emb-hash16.npy"], 1, "is the command's input --embeddings"),
    ("recommend", "out onto the histories", write("h.txt", "1,2\n"),
     ["recommend", "--model", "{rec}", "--histories", "{case}/h.txt", "--out", "{case}/h.txt"], 1,
     "is the command's input --histories"),
    ("train-tokenizer", "into a train-rec run", copy("rec"),
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/rec", *TOK_ARGS], 1,
     "--out {case}/rec: holds a train-rec run, not a tokenizer run"),
    ("train-tokenizer", "over a finished run", copy("tok"),
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/tok", *TOK_ARGS], 1,
     "--out {case}/tok: already holds a finished tokenizer run"),
    ("train-tokenizer", "over a finished run, --overwrite", copy("tok"),
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/tok", *TOK_ARGS, "--overwrite"], 0, same_codes_as_world),
    ("train-rec", "into a tokenizer run", copy("tok"),
     ["train-rec", "--data", "{data}", "--index", "{tok}", "--out", "{case}/tok", *REC_ARGS], 1,
     "--out {case}/tok: holds a tokenizer run, not a train-rec run"),
    ("train-rec", "over a finished run", copy("rec"),
     ["train-rec", "--data", "{data}", "--index", "{tok}", "--out", "{case}/rec", *REC_ARGS], 1,
     "--out {case}/rec: already holds a finished train-rec run"),
    ("train-cf", "over finished outputs", copy("data"),
     ["train-cf", "{case}/data", "--dim", "16", "--epochs", "1", "--blocks", "1", "--heads", "1"], 1,
     "Synth.cf-sasrec16.npy: a finished train-cf output"),
    ("train-rec", "resume and overwrite", copy("rec"),
     ["train-rec", "--data", "{data}", "--index", "{tok}", "--out", "{case}/rec", *REC_ARGS, "--resume", "--overwrite"],
     1, "--resume and --overwrite exclude each other"),
    # the file system: one line naming the path
    ("evaluate", "out name too long", none, ["evaluate", "--model", "{rec}", "--out", "{case}/" + LONG + ".json"], 1,
     LONG + ".json: File name too long"),
    ("evaluate", "out under a file", write("f.txt", "x"), ["evaluate", "--model", "{rec}", "--out", "{case}/f.txt/m.json"],
     1, "f.txt"),
    ("train-rec", "out under a file", write("f.txt", "x"),
     ["train-rec", "--data", "{data}", "--index", "{tok}", "--out", "{case}/f.txt/r", *REC_ARGS], 1, "f.txt"),
    ("data synth", "out name too long", none, ["data", "synth", "{case}/" + LONG], 1, "File name too long"),
    # undecodable or pathological data
    ("data convert", "UTF-16 data", write_bytes("src/X.inter.json", json.dumps({"u": ["1", "2", "3"]}).encode("utf-16")),
     ["data", "convert", "{case}/src", "{case}/out"], 1, "X.inter.json: not UTF-8"),
    ("data convert", "latin-1 item text", both(write("src/X.inter.json", json.dumps({"u": ["1", "2", "3"]})),
                                               write_bytes("src/X.item.json", '{"1": {"title": "caf\u00e9"}}'.encode("latin-1"))),
     ["data", "convert", "{case}/src", "{case}/out"], 1, "X.item.json: not UTF-8"),
    ("data convert", "nested deep", write("src/X.inter.json", "[" * 100000 + "]" * 100000),
     ["data", "convert", "{case}/src", "{case}/out"], 1, "X.inter.json: nested too deeply"),
    ("train-tokenizer", "null and list categories", odd_categories,
     ["train-tokenizer", "--data", "{case}/data", "--out", "{case}/t", *TOK_ARGS], 0, report_without_categories),
    ("train-cf", "seed beyond numpy", none, ["train-cf", "{data}", "--out", "{case}/o", "--seed", str(2**32)], 1,
     "--seed: cf: seed must be >= 0 and <= 4294967295, got 4294967296"),
    ("data synth", "seed negative", none, ["data", "synth", "{case}/out", "--seed", "-1"], 2, "--seed"),
    ("bench kernels", "unknown op", none, ["bench", "kernels", "--op", "nosuchop"], 2, "--op"),
    ("bench serve", "a concurrency level twice", none, ["bench", "serve", "--model", "{rec}", "--concurrency", "1,8,1"],
     2, "--concurrency: each level once, got '1,8,1'"),
    # strict parsing, names, ignored options
    ("train-rec", "index with a duplicate key", write("dup.index.json", '{"0": ["<a_1>"], "0": ["<a_2>"]}'),
     ["train-rec", "--data", "{data}", "--index", "{case}/dup.index.json", "--out", "{case}/r", *REC_ARGS], 1,
     "dup.index.json: duplicate key '0'"),
    ("config show", "YAML with a duplicate key", write("dup.yaml", "rec:\n  lr: 0.1\n  lr: 0.2\n"),
     ["config", "show", "--config", "{case}/dup.yaml"], 1, "dup.yaml: duplicate key 'lr'"),
    ("train-cf", "JSON config with a duplicate key", write("c.json", '{"epochs": 1, "epochs": 2}'),
     ["train-cf", "{data}", "--out", "{case}/o", "--config", "{case}/c.json"], 1, "c.json: duplicate key 'epochs'"),
    ("embed", "tag outside the folder", copy("data"),
     ["embed", "{case}/data", "--model", "hash", "--mode", "hash", "--dim", "16", "--tag", "../evil"], 1,
     "--tag '../evil'"),
    ("recommend", "--out with --history", none,
     ["recommend", "--model", "{rec}", "--history", "1,2", "--out", "{case}/r.jsonl"], 2,
     "--out and --batch-size apply to --histories / --users only"),
]


# -- issue 25, the remaining classes: every writer's policy, ignored options, messages naming the option --
def split_into(folder):
    def setup(world, case):
        _ok(["data", "cold-split", case / "data", "--out", case / folder])
    return setup


def same_embeddings_as_world(world, case, output):
    """--overwrite replaced the embeddings by new ones with their sidecar: seeded, so the world's."""
    assert np.array_equal(np.load(case / "data" / "Synth.emb-hash16.npy"), np.load(world / "data" / "Synth.emb-hash16.npy"))
    sidecar = json.loads((case / "data" / "Synth.emb-hash16.json").read_text())
    assert sidecar["files"]["Synth.emb-hash16.npy"]["size"] == (case / "data" / "Synth.emb-hash16.npy").stat().st_size


def other_split_written(world, case, output):
    """--overwrite: the split of seed 3, whole (its record last), not a mix with the seed-0 one."""
    record = json.loads((case / "s" / "cold_split.json").read_text())
    assert record["seed"] == 3 and f"{len(record['cold_items'])} cold items" in output


def renamed_items(world, case):
    """A copy of the dataset whose 40 items have other ids (same count, same histories)."""
    shutil.copytree(world / "data", case / "data")
    inter, items = case / "data" / "Synth.inter.json", case / "data" / "Synth.item.json"
    inter.write_text(json.dumps({u: [str(int(i) + 100) for i in seq] for u, seq in json.loads(inter.read_text()).items()}))
    items.write_text(json.dumps({str(int(i) + 100): v for i, v in json.loads(items.read_text()).items()}))


def npy(name, array):
    def setup(world, case):
        np.save(case / name, array)
    return setup


TOK_KMEANS = ["--method", "rqkmeans", "--codebook-sizes", "8,8"]
CASES += [
    # every writer: a finished output of its kind only with --overwrite, never onto an input
    ("embed", "same tag over finished embeddings", copy("data"),
     ["embed", "{case}/data", "--model", "hash", "--mode", "hash", "--dim", "16"], 1,
     "{case}/data/Synth.emb-hash16.npy: a finished embed output is already there; pass --overwrite"),
    ("embed", "same tag, --overwrite", copy("data"),
     ["embed", "{case}/data", "--model", "hash", "--mode", "hash", "--dim", "16", "--overwrite"], 0,
     same_embeddings_as_world),
    ("embed", "out into a train-rec run", copy("rec"),
     ["embed", "{data}", "--model", "hash", "--mode", "hash", "--dim", "16", "--out", "{case}/rec"], 1,
     "--tag or --out {case}/rec: a train-rec run folder"),
    ("data cold-split", "over a finished split", both(copy("data"), split_into("s")),
     ["data", "cold-split", "{case}/data", "--out", "{case}/s", "--seed", "3"], 1,
     "{case}/s/cold_split.json: a finished cold-split output is already there; pass --overwrite"),
    ("data cold-split", "over a finished split, --overwrite", both(copy("data"), split_into("s")),
     ["data", "cold-split", "{case}/data", "--out", "{case}/s", "--seed", "3", "--overwrite"], 0, other_split_written),
    ("data cold-split", "out onto its data, --overwrite", copy("data"),
     ["data", "cold-split", "{case}/data", "--out", "{case}/data", "--overwrite"], 1,
     "{case}/data/Synth.inter.json: is the command's input DATA_PATH"),
    ("data convert", "SRC a cold split", both(copy("data"), split_into("s")), ["data", "convert", "{case}/s", "{case}/c"],
     1, "SRC {case}/s: a cold split (cold_split.json); convert the dataset it was split from"),
    ("data convert", "OUT is SRC, --overwrite", copy("data"), ["data", "convert", "{case}/data", "{case}/data", "--overwrite"],
     1, "{case}/data/Synth.inter.json: is the command's input SRC"),
    ("data synth", "OUT holds another dataset", copy("data"), ["data", "synth", "{case}/data", "--name", "Other"], 1,
     "{case}/data: holds another dataset (Synth.inter.json"),
    ("data synth", "OUT holds the dataset", copy("data"), ["data", "synth", "{case}/data"], 1,
     "{case}/data/Synth.item.json: a finished dataset output is already there; pass --overwrite"),
    ("train-rec", "out into its data folder", copy("data"),
     ["train-rec", "--data", "{case}/data", "--index", "{tok}", "--out", "{case}/data", *REC_ARGS], 1,
     "--out {case}/data: holds the dataset Synth.inter.json, not a train-rec run"),
    ("evaluate", "out onto another run's codes", copy("tok"),
     ["evaluate", "--model", "{rec}", "--out", "{case}/tok/codes.npy"], 1,
     "--out {case}/tok/codes.npy: a file of the run folder {case}/tok"),
    ("evaluate", "out onto a dataset file", copy("data"), ["evaluate", "--model", "{rec}", "--out", "{case}/data/Synth.item.json"],
     1, "--out {case}/data/Synth.item.json: a dataset's file"),
    ("tokenize", "out onto the embeddings' sidecar", copy("data"),
     ["tokenize", "--tokenizer", "{tok}", "--embeddings", "{case}/data/Synth.emb-hash16.npy", "--out",
      "{case}/data/Synth.emb-hash16.json"], 1, "is the record of the command's input --embeddings"),
    # options that a combination would silently ignore
    ("train-tokenizer", "rqkmeans --resume", none,
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", *TOK_KMEANS, "--resume"], 2,
     "--resume does not apply to --method rqkmeans"),
    ("train-tokenizer", "rqkmeans --cf-emb", none,
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", *TOK_KMEANS, "--cf-emb",
      "{data}/Synth.cf-sasrec16.npy"], 2, "--cf-emb is not used by --method rqkmeans"),
    ("train-tokenizer", "rqkmeans --epochs", none,
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", *TOK_KMEANS, "--epochs", "5"], 2,
     "--epochs is not used with --method rqkmeans"),
    ("train-tokenizer", "rqvae --cf-projection", none,
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", "--method", "rqvae", "--codebook-sizes", "8,8",
      "--cf-projection"], 2,
     "--cf-projection is not used with --method rqvae"),
    ("train-tokenizer", "--levels with --codebook-sizes", none,
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/t", *TOK_ARGS, "--levels", "2"], 2,
     "--levels is a shorthand for --codebook-sizes"),
    ("train-rec", "tiger --lora-r", none,
     ["train-rec", "--data", "{data}", "--index", "{tok}", "--out", "{case}/r", *REC_ARGS, "--lora-r", "4"], 2,
     "--lora-r is not used with --model tiger"),
    ("train-cf", "lightgcn --heads", none, ["train-cf", "{data}", "--out", "{case}/o", "--model", "lightgcn", "--heads", "4"],
     2, "--heads is not used with --model lightgcn"),
    ("embed", "hash --max-length", none,
     ["embed", "{data}", "--model", "hash", "--mode", "hash", "--out", "{case}/o", "--max-length", "8"], 2,
     "--max-length is not used by the hash encoder"),
    # readers: every file of a run recorded and checked, also when resuming or when nothing is to do
    ("train-rec", "resume a finished run whose codes changed", mixed("rec", "codes.npy"),
     ["train-rec", "--data", "{data}", "--index", "{tok}", "--out", "{case}/rec", *REC_ARGS, "--resume"], 1,
     "--out {case}/rec: mixed train-rec run folder: codes.npy changed"),
    ("tokenize", "prefix index changed", corrupt("tok", "prefix_index.pt", T),
     ["tokenize", "--tokenizer", "{case}/tok", "--embeddings", "{data}/Synth.emb-hash16.npy", "--out", "{case}/x.npy"],
     1, "--tokenizer {case}/tok: mixed tokenizer run folder: prefix_index.pt changed"),
    ("add-items", "not a tokenizer run, nothing to add", none,
     ["add-items", "--model", "{rec}", "--tokenizer", "{rec}", "--embeddings", "{data}/Synth.emb-hash16.npy"], 1,
     "--tokenizer {rec}: a train-rec run folder, not a tokenizer run folder"),
    ("train-rec", "index of a tokenizer made for other items", renamed_items,
     ["train-rec", "--data", "{case}/data", "--index", "{tok}", "--out", "{case}/r", *REC_ARGS], 1,
     "the dataset {case}/data/Synth.inter.json: not the items the tokenizer run --index {tok} was made from"),
    ("tokenize", "embeddings of another width", npy("e.npy", np.zeros((3, 8), np.float32)),
     ["tokenize", "--tokenizer", "{tok}", "--embeddings", "{case}/e.npy", "--out", "{case}/x.npy"], 1,
     "--embeddings {case}/e.npy: embeddings have dim 8"),
    ("compare", "label too long", none,
     ["compare", "--data", "{data}", "--set", "x" * 300 + "={tok}", "--out", "{case}/c", "--seeds", "1", *REC_ARGS], 1,
     "the label must be at most 100"),
    ("pipeline", "unreadable data leaves no run folder", write_bytes("src/X.inter.json", json.dumps({"u": ["1"]}).encode("utf-16")),
     ["pipeline", "--data", "{case}/src", "--out", "{case}/run"], 1, "X.inter.json: not UTF-8"),
    ("train-cf", "catalog under 10 items", write("src/X.inter.json", json.dumps({"u": ["1", "2", "3", "4"],
                                                                                "v": ["2", "3", "4", "1"]})),
     ["train-cf", "{case}/src", "--out", "{case}/o"], 1, "{case}/src/X.inter.json: 4 items; train-cf ranks the top 10"),
    ("data cold-split", "no user left", write("src/X.inter.json", json.dumps({"u": ["1", "2", "3"]})),
     ["data", "cold-split", "{case}/src", "--out", "{case}/s", "--fraction", "0.5"], 1,
     "{case}/src/X.inter.json: no user keeps 3 items"),
    ("recommend", "UTF-16 histories", write_bytes("h.txt", "1,2\n".encode("utf-16")),
     ["recommend", "--model", "{rec}", "--histories", "{case}/h.txt", "--out", "{case}/r.jsonl"], 1,
     "--histories {case}/h.txt: not UTF-8 text"),
    ("data synth-catalog", "seed negative", none, ["data", "synth-catalog", "{case}/o", "--items", "1000", "--seed", "-1"],
     2, "--seed"),
    ("config show", "config error names the file", config_file("cf", "nosuchkey", 1),
     ["config", "show", "--config", "{case}/bad.yaml"], 1, "--config {case}/bad.yaml: config: unknown setting 'cf.nosuchkey'"),
    ("config show", "synthetic seed negative", write("bad.yaml", "data:\n  synthetic:\n    seed: -1\n"),
     ["config", "show", "--config", "{case}/bad.yaml"], 1,
     "bad.yaml: data.synthetic: seed must be >= 0 and <= 4294967295, got -1"),
    ("pipeline", "out into a tokenizer run", copy("tok"), ["pipeline", "--synthetic", "--out", "{case}/tok"], 1,
     "--out {case}/tok: holds a tokenizer run, not a pipeline run"),
    ("train-tokenizer", "over a finished run: how to go on", copy("tok"),
     ["train-tokenizer", "--data", "{data}", "--out", "{case}/tok", *TOK_ARGS], 1,
     "already holds a finished tokenizer run; pass --resume to continue it, --overwrite to replace it"),
    ("train-cf", "over finished outputs: how to go on", copy("data"),
     ["train-cf", "{case}/data", "--dim", "16", "--epochs", "1", "--blocks", "1", "--heads", "1"], 1,
     "pass --resume to continue its run, --overwrite to replace it, or choose another --out"),
    ("train-tokenizer", "no text embeddings", write("d/Synth.inter.json", json.dumps({"u": ["1", "2", "3"]})),
     ["train-tokenizer", "--data", "{case}/d", "--out", "{case}/t", *TOK_ARGS], 1,
     "no --text-emb given and no Synth.emb-*.npy in {case}/d (run `letter embed`)"),
    ("compare", "sample seed beyond numpy", none,
     ["compare", "--data", "{data}", "--set", "A={tok}", "--out", "{case}/c", "--sample-seed", str(2**32)], 2,
     "--sample-seed"),
]


@pytest.mark.parametrize("command,name,setup,args,code,message", CASES,
                         ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input(world, command, name, setup, args, code, message):
    case = world / "cases" / f"{command}-{name}".replace(" ", "_").replace(":", "").replace("/", "_")
    case.mkdir()
    setup(world, case)
    fill = dict(data=world / "data", tok=world / "tok", rec=world / "rec", case=case)
    argv = [a.format(**fill) for a in args]
    before = snapshot(world)
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == code, (argv, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "Aborted" not in result.output
    if code == 0:
        message(world, case, result.output)  # the result itself, not only the exit status
        outside = lambda snap: {k: v for k, v in snap.items() if not k.startswith(str(case.relative_to(world)))}
        assert outside(snapshot(world)) == outside(before), "a file outside the case folder was created or changed"
        return
    for key, path in fill.items():  # messages name the case's paths: {case}, {rec}, ...
        message = message.replace("{" + key + "}", str(path))
    assert message in result.output, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    assert snapshot(world) == before, "an output file was created or changed"


def test_files_respect_umask_and_stale_temps_go(tmp_path):
    from letter.runs import STALE_TEMP_SECONDS, write_json

    old = os.umask(0o027)
    try:
        write_json(str(tmp_path / "a.json"), {"x": 1})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o640
    stale, fresh = tmp_path / ".tmp-a.json-dead.json", tmp_path / ".tmp-a.json-live.json"
    stale.write_text("half")
    fresh.write_text("in progress")
    past = os.stat(stale).st_mtime - STALE_TEMP_SECONDS - 5
    os.utime(stale, (past, past))
    write_json(str(tmp_path / "a.json"), {"x": 2})
    assert not stale.exists() and fresh.exists()


def test_unknown_letter_backend_is_refused_before_any_output(tmp_path):
    # $LETTER_BACKEND is read by every op call: a bad value used to stop train-cf at its first
    # step with a traceback, after its output folder was prepared
    data = tmp_path / "data"
    _ok(["data", "synth", data, "--users", 30, "--items", 20, "--categories", 4, "--min-length", 4, "--max-length", 6])
    before = sorted(os.listdir(data))
    result = CliRunner().invoke(main, ["train-cf", str(data), "--dim", "8", "--epochs", "1"],
                                env={"LETTER_BACKEND": "tpu"})
    assert result.exit_code == 1, result.output
    assert result.output.strip() == ("Error: $LETTER_BACKEND must be one of ('reference', 'cpu', 'cuda', 'triton') "
                                     "or 'auto', got 'tpu'")
    assert sorted(os.listdir(data)) == before


@pytest.mark.skipif(letter_ext._backend._C is None, reason="$LETTER_ISA needs the compiled letter_ext._C")
def test_bad_letter_isa_is_refused_by_op_calls_and_commands(tmp_path):
    # $LETTER_ISA is applied when letter_ext is imported: a bad value used to raise there, so every
    # `letter` command (even --help) stopped with a traceback before the CLI could report it
    env = {**os.environ, "LETTER_ISA": "avx9"}
    message = "$LETTER_ISA: isa must be 'scalar', 'avx2' or 'avx512', got 'avx9'"
    out = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "letter.cli.main", "data", "synth", str(out), "--users", "30"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == f"Error: {message}", proc.stderr
    assert not out.exists()
    code = ("import torch, letter_ext\n"
            "try:\n"
            "    letter_ext.residual_quantize(torch.zeros(2, 4), torch.zeros(1, 3, 4))\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == message, proc.stdout + proc.stderr
