"""`letter compare`: two identifier sets x two seeds end to end on a tiny TIGER, resume/skip, the
per-user ranks against evaluate(), the paired bootstrap, and bad sets failing before training."""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import letter.compare as compare_mod
from letter.cli.compare import compare_cmd
from letter.cli.main import LetterGroup
from letter.compare import compare, identifier_diagnostics, item_categories, paired_bootstrap, per_user_metric
from letter.data import make_synthetic, write_index_json, write_letter
from letter.embed import embed_items
from letter.errors import LetterError, SettingError
from letter.metrics import metrics_from_hits
from letter.rec import RecConfig, evaluate
from letter.tokenizer.rqkmeans import fit_rqkmeans

NUM_ITEMS, SIZES = 100, [10, 4, 4]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: run the whole module single-threaded (see conftest.one_thread)."""


def tiny_config(**overrides) -> RecConfig:
    base = dict(d_model=16, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8, d_ff=32, max_history=5,
                epochs=1, batch_size=128, valid_users=20, eval_beams=10, seed=5, device="cpu")
    return RecConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    data = str(root / "data")
    ds = make_synthetic(num_users=200, num_items=NUM_ITEMS, num_categories=10, min_length=5, max_length=8, seed=0)
    write_letter(ds, data)
    text, _ = embed_items(ds, mode="hash", dim=64)
    model = fit_rqkmeans(text, SIZES, iters=20, standardize=True, seed=0)
    codes = model.encode(torch.from_numpy(text))[0].numpy()
    rqk = str(root / "rqk.npy")
    np.save(rqk, codes)
    rng = np.random.default_rng(0)
    rand = str(root / "random.index.json")  # an authors'-format index: the other accepted kind
    write_index_json(rand, np.stack([rng.integers(0, n, NUM_ITEMS) for n in SIZES], 1))
    return {"root": root, "data": data, "ds": ds, "rqk": rqk, "random": rand, "codes": codes}


@pytest.fixture(scope="module")
def compared(setup):
    out = str(setup["root"] / "out")
    logs = []
    report = compare(setup["data"], [f"rqk={setup['rqk']}", f"random={setup['random']}"], out, tiny_config(),
                     seeds=2, num_beams=10, bootstrap=500, log=logs.append)
    return out, report, logs


def test_end_to_end_writes_the_table_with_intervals(compared, setup):
    out, report, logs = compared
    for name in ("compare.md", "compare.json"):
        assert os.path.isfile(os.path.join(out, name))
    assert json.load(open(os.path.join(out, "compare.json"))) == json.loads(json.dumps(report))
    assert report["seeds"] == [5, 6]
    users = report["evaluation"]["users"]
    assert users == 200  # every test user
    rqk, rnd = report["sets"]
    assert [rqk["label"], rnd["label"]] == ["rqk", "random"]
    for s in (rqk, rnd):
        for m in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
            v = s["metrics"][m]
            assert len(v["per_seed"]) == 2 and v["mean"] == pytest.approx(np.mean(v["per_seed"]))
            assert v["std"] == pytest.approx(np.std(v["per_seed"], ddof=1))
        for seed in (5, 6):
            run = os.path.join(out, "runs", s["label"], f"seed-{seed}")
            assert os.path.isfile(os.path.join(run, "rec", "model.pt"))
            assert os.path.isfile(os.path.join(run, "result.json"))
    assert "difference_to_first" not in rqk
    for m, d in rnd["difference_to_first"].items():
        assert d["low"] <= d["mean"] <= d["high"], m
        expected = np.mean(rnd["metrics"][m]["per_seed"]) - np.mean(rqk["metrics"][m]["per_seed"])
        assert d["mean"] == pytest.approx(expected)
    # Diagnostics: RQ-KMeans level 1 follows the synthetic categories, random codes do not.
    dq, dr = rqk["diagnostics"], rnd["diagnostics"]
    assert dq["category_field"] == "category" and dq["categories"] == 10
    assert dq["level1_nmi"] > dr["level1_nmi"] + 0.2 and dq["level1_purity"] > dr["level1_purity"]
    assert dq["codes_used"] == [len(np.unique(setup["codes"][:, l])) for l in range(3)]
    assert 0 <= dq["collision_rate"] < 1
    md = open(os.path.join(out, "compare.md")).read()
    assert "| rqk |" in md and "| random |" in md and "±" in md and "## Difference to rqk" in md
    assert md.count("[") >= 4  # one interval per metric
    assert sum("training" in line for line in logs) == 4
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert os.path.isfile(os.path.join(out, "compare.png")) == has_mpl and (report["plot"] is not None) == has_mpl


def test_per_user_ranks_match_evaluate(compared):
    out, report, _ = compared
    run = os.path.join(out, "runs", "random", "seed-6")
    ranks = np.load(os.path.join(run, "test_ranks.npz"))["ranks"]
    ours = report["sets"][1]["metrics"]
    theirs = evaluate(os.path.join(run, "rec"), "test", num_beams=10)["metrics"]
    for m in theirs:
        assert per_user_metric(ranks, m).mean() == pytest.approx(theirs[m])
        assert ours[m]["per_seed"][1] == pytest.approx(theirs[m])


def test_a_run_whose_ranks_changed_is_evaluated_again(compared, setup, tmp_path):
    """result.json is the run's manifest (written last, the state of test_ranks.npz): a same-size
    swap of the ranks is seen, that run alone is evaluated again and the table is the original's."""
    out, report, _ = compared
    copy = str(tmp_path / "out")
    shutil.copytree(out, copy)
    run = os.path.join(copy, "runs", "random", "seed-6")
    manifest = json.load(open(os.path.join(run, "result.json")))
    assert manifest["kind"] == "compare-run" and set(manifest["outputs"]) == {"test_ranks.npz"}
    assert manifest["inputs"]["fingerprint"]
    assert manifest["metrics"]["recall@10"] == report["sets"][1]["metrics"]["recall@10"]["per_seed"][1]
    ranks = os.path.join(run, "test_ranks.npz")
    size = os.path.getsize(ranks)
    with np.load(ranks) as saved:
        arrays = {key: saved[key][::-1].copy() for key in saved.files}
    with open(ranks, "wb") as f:
        np.savez(f, **arrays)
    assert os.path.getsize(ranks) == size
    logs = []
    again = compare(setup["data"], [f"rqk={setup['rqk']}", f"random={setup['random']}"], copy, tiny_config(),
                    seeds=2, num_beams=10, bootstrap=500, log=logs.append)
    assert any("[random seed 6] rerunning: output test_ranks.npz changed" in line for line in logs), logs
    assert sum("skipped" in line for line in logs) == 3
    assert again["sets"] == report["sets"]


def test_rerun_skips_finished_runs_and_resumes_interrupted_ones(compared, setup, monkeypatch):
    out, report, _ = compared
    calls = []
    real = compare_mod.train_rec

    def spy(config, data, codes, out_dir, *, resume=False, stop_after=None):
        calls.append((out_dir, resume))
        return real(config, data, codes, out_dir, resume=resume, stop_after=stop_after)

    monkeypatch.setattr(compare_mod, "train_rec", spy)
    logs = []
    again = compare(setup["data"], [f"rqk={setup['rqk']}", f"random={setup['random']}"], out, tiny_config(),
                    seeds=2, num_beams=10, bootstrap=500, log=logs.append)
    assert calls == [] and sum("skipped" in line for line in logs) == 4
    assert again["sets"] == report["sets"]
    # An interrupted training (checkpoint, no manifest yet) resumes from its checkpoint.
    run, rec = os.path.join(out, "runs", "rqk", "seed-5"), os.path.join(out, "runs", "rqk", "seed-5", "rec")
    trained = json.load(open(os.path.join(rec, "summary.json")))
    os.remove(os.path.join(run, "result.json"))
    os.remove(os.path.join(rec, "manifest.json"))
    compare(setup["data"], [f"rqk={setup['rqk']}"], out, tiny_config(), seeds=1, num_beams=10, bootstrap=10,
            log=logs.append)
    assert calls == [(rec, True)]
    calls.clear()
    # Only the evaluation changed (here: the test sample): the trained run is kept and evaluated again.
    model_bytes = open(os.path.join(rec, "model.pt"), "rb").read()
    logs.clear()
    compare(setup["data"], [f"rqk={setup['rqk']}"], out, tiny_config(), seeds=1, num_beams=10, bootstrap=10,
            test_users=50, log=logs.append)
    assert calls == [] and any("trained run kept" in line for line in logs)
    assert open(os.path.join(rec, "model.pt"), "rb").read() == model_bytes
    result = json.load(open(os.path.join(run, "result.json")))
    assert result["users"] == 50 and result["epochs_trained"] == trained["epochs_trained"]
    assert json.load(open(os.path.join(out, "compare.json")))["evaluation"]["users"] == 50
    # The same evaluation as a fresh compare would give on the same trained model.
    direct = compare_mod.user_ranks(rec, "test", data=setup["data"], max_users=50, num_beams=10)
    assert result["metrics"] == direct["metrics"]
    # A training setting changed: the run starts afresh.
    compare(setup["data"], [f"rqk={setup['rqk']}"], out, tiny_config(lr=1e-3), seeds=1, num_beams=10, bootstrap=10,
            test_users=50, log=logs.append)
    assert calls == [(rec, False)]


def test_bad_sets_fail_before_any_training(setup, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(compare_mod, "train_rec", no_training)
    short = tmp_path / "short.npy"
    np.save(short, np.zeros((NUM_ITEMS - 1, 3), np.int64))
    broken = tmp_path / "broken.index.json"
    broken.write_text("{not json")
    cases = {
        "missing": [f"a={setup['rqk']}", f"b={tmp_path / 'nope.npy'}"],
        "item": [f"a={setup['rqk']}", f"b={short}"],
        "cannot read": [f"a={setup['rqk']}", f"b={broken}"],
        "used twice": [f"a={setup['rqk']}", f"a={setup['random']}"],
        "LABEL=PATH": [setup["rqk"]],
    }
    messages = {"missing": "no such file", "item": "cover 99 items", "cannot read": "cannot read",
                "used twice": "used twice", "LABEL=PATH": "LABEL=PATH"}
    for key, sets in cases.items():
        out = tmp_path / key.replace(" ", "_")
        with pytest.raises(LetterError, match=messages[key]) as err:
            compare(setup["data"], sets, str(out), tiny_config(), seeds=1)
        assert "\n" not in str(err.value)
        assert not (out / "runs").exists()
    # All problems in one line, through the CLI (as `letter compare` once registered).
    cli = LetterGroup(commands={"compare": compare_cmd})
    result = CliRunner().invoke(cli, ["compare", "--data", setup["data"], "--set", f"a={tmp_path / 'x.npy'}",
                                      "--set", f"b={short}", "--out", str(tmp_path / "cli"), "--epochs", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--set a=" in lines[0] and "--set b=" in lines[0], result.output


def test_cli_runs_resumes_and_reads_a_config_file(setup, tmp_path):
    """The CLI: options override the config file; a second call skips every finished run."""
    cfg = tmp_path / "rec.yaml"
    cfg.write_text("d_model: 16\nnum_layers: 1\nnum_decoder_layers: 1\nnum_heads: 2\nd_kv: 8\nd_ff: 32\n"
                   "max_history: 5\nepochs: 3\nbatch_size: 128\nvalid_users: 20\neval_beams: 10\n")
    out = str(tmp_path / "cli")
    args = ["compare", "--data", setup["data"], "--set", f"rqk={setup['rqk']}", "--set", f"random={setup['random']}",
            "--out", out, "--config", str(cfg), "--epochs", "1", "--seed", "9", "--device", "cpu", "--seeds", "1",
            "--beams", "10", "--bootstrap", "100", "--test-users", "60"]
    cli = LetterGroup(commands={"compare": compare_cmd})
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert first.output.count("training") == 2 and "| random |" in first.output
    report = json.load(open(os.path.join(out, "compare.json")))
    assert report["rec_config"]["epochs"] == 1 and report["rec_config"]["d_model"] == 16
    assert report["seeds"] == [9] and report["evaluation"]["users"] == 60
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert second.output.count("skipped") == 2 and "training" not in second.output


def test_paired_bootstrap_and_helpers():
    rng = np.random.default_rng(0)
    diff = rng.normal(0.1, 1.0, (3, 2000))
    d = paired_bootstrap(diff, 1000, seed=0)
    se = diff.mean(0).std() / np.sqrt(2000)
    assert d["mean"] == pytest.approx(diff.mean())
    assert d["high"] - d["low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert paired_bootstrap(np.zeros((2, 50)), 100)["low"] == 0.0
    ranks = np.array([0, 3, 7, -1])
    assert per_user_metric(ranks, "recall@5").tolist() == [1, 1, 0, 0]
    assert per_user_metric(ranks, "ndcg@10") == pytest.approx([1, 1 / np.log2(5), 1 / np.log2(9), 0])
    hits = np.zeros((4, 10), bool)
    hits[[0, 1, 2], [0, 3, 7]] = True
    for m, v in metrics_from_hits(torch.from_numpy(hits)).items():
        assert per_user_metric(ranks, m).mean() == pytest.approx(v)
    codes = np.array([[0, 0], [0, 0], [1, 1], [1, 0]])
    diag = identifier_diagnostics(codes, ("category", np.array([0, 0, 1, 1])))
    assert diag["collision_rate"] == 0.25 and diag["codes_used"] == [2, 2]
    assert diag["level1_purity"] == 1.0 and diag["level1_nmi"] == pytest.approx(1.0)


def test_item_categories_fall_back_to_categories_strings(setup):
    ds = setup["ds"]
    field, labels = item_categories(ds)
    assert field == "category" and labels.max() == 9
    stripped = type(ds)(ds.name, ds.user_ids, ds.sequences, ds.item_ids,
                        [{k: v for k, v in t.items() if k != "category"} for t in ds.item_text])
    field, labels2 = item_categories(stripped)
    assert field == "categories"
    assert len(np.unique(labels2)) == 10
    assert item_categories(type(ds)(ds.name, ds.user_ids, ds.sequences, ds.item_ids, None)) is None


def test_a_set_per_seed_repeats_the_tokenizer_chain(tmp_path):
    """A path with {seed} names one identifier set per seed (one tokenizer run per seed); each seed
    gets its own codes, and a missing seed is reported before any training."""
    from letter.compare import load_sets

    ds = make_synthetic(num_users=60, num_items=40, num_categories=4, seed=2)
    rng = np.random.default_rng(0)
    for seed in (5, 6):
        np.save(tmp_path / f"codes-{seed}.npy", rng.integers(0, 8, size=(40, 2)))
    sets = load_sets(ds, ["tok=" + str(tmp_path / "codes-{seed}.npy")], [5, 6])
    assert set(sets[0].members) == {5, 6}
    assert not np.array_equal(sets[0].for_seed(5).codes, sets[0].for_seed(6).codes)
    with pytest.raises(LetterError, match="codes-7.npy"):
        load_sets(ds, ["tok=" + str(tmp_path / "codes-{seed}.npy")], [5, 6, 7])


def test_exclude_history_reports_both_protocols(setup):
    out = str(setup["root"] / "out-excluded")
    report = compare(setup["data"], [f"rqk={setup['rqk']}"], out, tiny_config(), seeds=1, num_beams=10,
                     bootstrap=10, exclude_history=True, log=lambda line: None)
    entry = report["sets"][0]
    run = os.path.join(out, "runs", "rqk", "seed-5")
    both = evaluate(os.path.join(run, "rec"), "test", num_beams=10, exclude_history=True)
    for m in both["metrics"]:
        assert entry["metrics"][m]["mean"] == pytest.approx(both["metrics"][m])
        assert entry["metrics_exclude_history"][m]["mean"] == pytest.approx(both["metrics_exclude_history"][m])
    saved = np.load(os.path.join(run, "test_ranks.npz"))
    assert per_user_metric(saved["ranks_exclude_history"], "recall@10").mean() == \
        pytest.approx(both["metrics_exclude_history"]["recall@10"])
    md = open(os.path.join(out, "compare.md")).read()
    assert "## Both protocols" in md and "| rqk | history excluded |" in md
    assert report["evaluation"]["exclude_history"] is True


def test_the_table_names_the_recommender_that_was_trained(compared):
    # compare trains whatever RecConfig.model says; an LC-Rec comparison must not be described as
    # a TIGER of d_model/layers LC-Rec never reads.
    _, report, _ = compared
    assert "TIGER (d_model 16, 1+1 layers" in compare_mod.compare_markdown(report)
    lcrec = {**report, "rec_config": RecConfig(model="lcrec", base_model="/models/tiny-llama", lora_r=4).to_dict()}
    md = compare_mod.compare_markdown(lcrec)
    assert "TIGER" not in md and "LC-Rec (LoRA r 4 on tiny-llama" in md


def test_seeds_past_the_last_valid_seed_fail_before_any_training(setup, tmp_path, monkeypatch):
    # Run i uses --seed + i: a first seed near the top of the range leaves later runs without a
    # valid seed. That is a usage error up front, not a failure after the first runs trained.
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(compare_mod, "train_rec", no_training)
    out = tmp_path / "top"
    with pytest.raises(SettingError, match="seeds") as err:
        compare(setup["data"], [f"a={setup['rqk']}"], str(out), tiny_config(seed=2**32 - 2), seeds=3)
    assert "4294967295" in str(err.value) and not out.exists()


def test_a_missing_lcrec_base_model_fails_before_any_folder(setup, tmp_path):
    out = tmp_path / "lc"
    config = RecConfig(model="lcrec", base_model=str(tmp_path / "missing"), epochs=1, valid_users=20, eval_beams=10)
    with pytest.raises(LetterError, match="no such folder"):
        compare(setup["data"], [f"a={setup['rqk']}"], str(out), config, seeds=1)
    assert not out.exists()


def test_data_without_training_samples_fails_before_any_folder(tmp_path):
    # Users of 3 items give validation and test targets but no training sample: refused like
    # train-rec refuses it, before the output folder is made (not after the first run's folder).
    data = tmp_path / "data"
    ds = make_synthetic(num_users=5, num_items=8, num_categories=2, min_length=3, max_length=3, seed=0)
    write_letter(ds, str(data))
    codes = tmp_path / "codes.npy"
    np.save(codes, np.stack([np.arange(8) % 4, np.arange(8) // 4], 1).astype(np.int64))
    out = tmp_path / "out"
    with pytest.raises(LetterError, match="no training samples") as err:
        compare(str(data), [f"a={codes}"], str(out), tiny_config(), seeds=1)
    assert "\n" not in str(err.value) and not out.exists()


def test_a_cold_split_compares_its_warm_items_codes(tmp_path):
    # train-rec on a cold split reads codes of the warm items only: compare checks the sets the
    # same way (full-catalog codes refused before any folder) and its level-1 diagnostics use the
    # warm items' categories.
    from letter.data.cold import write_cold_split

    ds = make_synthetic(num_users=60, num_items=20, num_categories=4, min_length=5, max_length=8, seed=0)
    data = tmp_path / "split"
    record = write_cold_split(ds, str(data), fraction=0.2, seed=0)
    warm = record["warm_items"]
    full, warm_codes = tmp_path / "full.npy", tmp_path / "warm.npy"
    np.save(full, np.stack([np.arange(20) % 4, np.arange(20) // 4], 1).astype(np.int64))
    np.save(warm_codes, np.stack([np.arange(warm) % 4, np.arange(warm) // 4], 1).astype(np.int64))
    out = tmp_path / "out"
    with pytest.raises(LetterError, match=f"{warm} warm items"):
        compare(str(data), [f"a={full}"], str(out), tiny_config(), seeds=1)
    assert not out.exists()
    report = compare(str(data), [f"a={warm_codes}"], str(out), tiny_config(), seeds=1, num_beams=10, bootstrap=10,
                     log=lambda line: None)
    diagnostics = report["sets"][0]["diagnostics"]
    assert diagnostics["items"] == warm and 0 <= diagnostics["level1_purity"] <= 1


def test_a_device_this_torch_lacks_fails_before_any_folder(setup, tmp_path):
    out = tmp_path / "dev"
    with pytest.raises(SettingError, match="^device cuda:99: "):
        compare(setup["data"], [f"a={setup['rqk']}"], str(out), tiny_config(device="cuda:99"), seeds=1)
    assert not out.exists()


def test_the_report_names_the_codes_each_run_trained_on(compared, setup):
    # a set is named by its path, whose file may change later: the report keeps the codes' hash
    from letter.rec.data import codes_sha

    _, report, _ = compared
    rqk, rnd = report["sets"]
    assert rqk["codes_sha256"] == [codes_sha(setup["codes"])] * 2
    assert len(set(rnd["codes_sha256"])) == 1 and rnd["codes_sha256"] != rqk["codes_sha256"]
