"""End-to-end tokenizer runs on the synthetic dataset: CLI outputs, category capture, determinism,
resume, --unique and cold start."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from letter.cli.main import main
from letter.decoding import PrefixIndex
from letter.data import make_synthetic, read_index_json, write_letter
from letter.embed import embed_items
from letter.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from letter.training import load_checkpoint

TEXT_DIM = 128
SMALL = dict(layers=[64], e_dim=8, codebook_sizes=[16, 16, 16], clusters=4, batch_size=256)


def cooccurrence_embedding(sequences, num_items: int, dim: int) -> np.ndarray:
    """Stand-in CF embedding: truncated SVD of the log item-item co-occurrence of neighbours."""
    c = np.zeros((num_items, num_items), np.float32)
    for seq in sequences:
        for a, b in zip(seq[:-1], seq[1:]):
            c[a, b] += 1
            c[b, a] += 1
    u, s, _ = np.linalg.svd(np.log1p(c))
    return (u[:, :dim] * np.sqrt(s[:dim])).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: run the whole module single-threaded (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    ds = make_synthetic(num_users=600, num_items=1000, seed=0)
    write_letter(ds, str(root))
    text, _ = embed_items(ds, mode="hash", dim=TEXT_DIM)
    np.save(root / "Synth.emb-hash128.npy", text)
    np.save(root / "Synth.cf-sasrec8.npy", cooccurrence_embedding(ds.sequences, ds.num_items, 8))
    return {"dir": str(root), "text": text, "categories": np.array([t["category"] for t in ds.item_text])}


@pytest.fixture(scope="module")
def cli_run(synth, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "tok")
    cfg = os.path.join(synth["dir"], "small.yaml")
    with open(cfg, "w") as f:
        f.write("layers: [64]\nbatch_size: 256\n")
    args = ["train-tokenizer", "--data", synth["dir"], "--config", cfg, "--epochs", "40", "--levels", "3",
            "--codebook-size", "16", "--e-dim", "8", "--clusters", "4", "--unique", "--out", out]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_cli_writes_every_output(cli_run, synth):
    out, stdout = cli_run
    assert "collision" in stdout
    for name in ("Synth.index.json", "codes.npy", "model.pt", "checkpoint.pt", "config.json", "report.json", "report.md"):
        assert os.path.isfile(os.path.join(out, name)), name
    codes = np.load(os.path.join(out, "codes.npy"))
    assert codes.shape == (1000, 3) and codes.min() >= 0 and codes.max() < 16
    assert np.array_equal(read_index_json(os.path.join(out, "Synth.index.json"), num_items=1000), codes)
    with open(os.path.join(out, "Synth.index.json")) as f:
        first = json.load(f)["0"]
    assert first == [f"<a_{codes[0, 0]}>", f"<b_{codes[0, 1]}>", f"<c_{codes[0, 2]}>"]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["config"]["alpha"] == 0.02 and report["config"]["e_dim"] == 8  # CF found in --data
    assert report["collision_rate_after"] == 0.0 and len(np.unique(codes, axis=0)) == 1000
    assert "nearest unused" in report["unique_method"]
    assert [s["used"] for s in report["level_stats"]] == [len(np.unique(codes[:, l])) for l in range(3)]
    assert report["timing"]["cluster_refreshes"] == 40 and report["timing"]["epoch_mean_s"] > 0
    assert -1 <= report["cf_alignment_cosine"] <= 1 and report["recon_mse"] > 0
    assert report["prefix_index"] == "prefix_index.pt"
    assert PrefixIndex.load(os.path.join(out, "prefix_index.pt")).num_items == 1000


def test_codes_capture_the_synthetic_categories(cli_run, synth):
    out, _ = cli_run
    agreement = json.load(open(os.path.join(out, "report.json")))["level1_category_agreement"]
    assert agreement["chance"] == pytest.approx(0.05, abs=0.01)  # 20 balanced categories
    assert agreement["same_code"] > 3 * agreement["chance"]


def test_cold_start_tokenize(cli_run, synth, tmp_path):
    out, _ = cli_run
    catalog = np.load(os.path.join(out, "codes.npy"))
    new = synth["text"][:40]  # the catalog's own texts: the same region, but every identifier is taken
    np.save(tmp_path / "new.npy", new)
    result = CliRunner().invoke(main, ["tokenize", "--tokenizer", out, "--embeddings", str(tmp_path / "new.npy")])
    assert result.exit_code == 0, result.output
    assert "0 shared with catalog items" in result.output
    codes = read_index_json(str(tmp_path / "new.index.json"), num_items=40)
    taken = {tuple(c) for c in catalog.tolist()}
    assert not any(tuple(c) in taken for c in codes.tolist()) and len(np.unique(codes, axis=0)) == 40
    assert (codes[:, 0] == catalog[:40, 0]).mean() >= 0.8  # moved within their prefix, mostly
    tok = load_tokenizer(out)
    assert np.array_equal(tok.encode(new), codes)
    with pytest.raises(Exception, match="trained on dim 128"):
        tok.encode(np.zeros((2, 5), np.float32))


def _train(synth, out, **kw):
    cfg = TokenizerConfig(**{**SMALL, "epochs": 6, "checkpoint_every": 3, **kw})
    text = synth["text"][:300]
    cf = np.load(os.path.join(synth["dir"], "Synth.cf-sasrec8.npy"))[:300]
    report = train_tokenizer(cfg, text, cf, str(out), name="Synth")
    return np.load(os.path.join(out, "codes.npy")), report


def test_seeded_runs_are_identical_and_resume_continues_exactly(synth, tmp_path):
    a, rep_a = _train(synth, tmp_path / "a")
    b, rep_b = _train(synth, tmp_path / "b")
    assert np.array_equal(a, b) and rep_a["final_losses"] == rep_b["final_losses"]
    _train(synth, tmp_path / "c", epochs=3)
    cfg = TokenizerConfig(**{**SMALL, "epochs": 6, "checkpoint_every": 3})
    cf = np.load(os.path.join(synth["dir"], "Synth.cf-sasrec8.npy"))[:300]
    rep_c = train_tokenizer(cfg, synth["text"][:300], cf, str(tmp_path / "c"), name="Synth", resume=True)
    assert np.array_equal(np.load(tmp_path / "c" / "codes.npy"), a)
    assert rep_c["final_losses"] == rep_a["final_losses"]
    other, _ = _train(synth, tmp_path / "d", seed=7)
    assert not np.array_equal(other, a)


def test_resume_with_more_epochs_picks_the_best_of_the_new_window(synth, tmp_path, monkeypatch):
    """Evaluated every 3 epochs; 4 epochs, then resumed to 10: the best checkpoint is chosen among
    epochs 6, 9 and 10 (the second half of 10), as in an uninterrupted 10-epoch run, never the
    first run's epoch 4 even where its collision rate is the lowest."""
    import letter.tokenizer.train as trainer

    def collision_rates(*rates):  # the evaluations' collision rates, in order
        it = iter(rates)
        monkeypatch.setattr(trainer, "collision_rate", lambda codes: next(it))

    collision_rates(0.5, 0.4, 0.3, 0.2)  # epochs 3, 6, 9, 10
    full, rep_full = _train(synth, tmp_path / "full", epochs=10, eval_every=3, checkpoint_every=4)
    collision_rates(0.5, 0.1)  # epochs 3, 4
    _train(synth, tmp_path / "r", epochs=4, eval_every=3, checkpoint_every=4)
    collision_rates(0.4, 0.3, 0.2)  # epochs 6, 9, 10
    cfg = TokenizerConfig(**{**SMALL, "epochs": 10, "eval_every": 3, "checkpoint_every": 4})
    cf = np.load(os.path.join(synth["dir"], "Synth.cf-sasrec8.npy"))[:300]
    rep = train_tokenizer(cfg, synth["text"][:300], cf, str(tmp_path / "r"), name="Synth", resume=True)
    history = load_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))["history"]
    assert [r["epoch"] for r in history if "collision" in r] == [3, 4, 6, 9, 10]
    assert rep["best_epoch"] == rep_full["best_epoch"] == 10
    assert np.array_equal(np.load(tmp_path / "r" / "codes.npy"), full)


def test_unique_on_a_tight_code_space(synth, tmp_path):
    codes, report = _train(synth, tmp_path / "u", codebook_sizes=[8, 8, 8], clusters=2, unique=True, epochs=2)
    assert report["collision_rate_before"] > 0 and report["collision_rate_after"] == 0.0
    assert len(np.unique(codes, axis=0)) == 300


def test_cli_bad_input_is_a_clean_error(synth, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((999, TEXT_DIM), np.float32))
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["train-tokenizer", "--data", synth["dir"], "--text-emb", str(bad), "--out", str(out)])
    assert result.exit_code == 1 and "has 999 rows but the dataset has 1000 items" in result.output
    assert "Traceback" not in result.output and not out.exists()
    result = CliRunner().invoke(main, ["train-tokenizer", "--data", synth["dir"], "--levels", "2", "--codebook-sizes", "32,64,32"])
    assert result.exit_code == 2 and "--levels is a shorthand for --codebook-sizes; give one of them" in result.output
    per_level = tmp_path / "sizes.yaml"  # per-level sizes from a config file: --levels cannot repeat one
    per_level.write_text("codebook_sizes: [32, 64, 32]\n")
    result = CliRunner().invoke(main, ["train-tokenizer", "--data", synth["dir"], "--config", str(per_level),
                                       "--levels", "2"])
    assert result.exit_code == 1 and "--levels with per-level --codebook-sizes" in result.output


def test_rqvae_ignores_the_dim_of_cf_embeddings_it_does_not_train_on(synth, tmp_path):
    # The plain RQ-VAE has no collaborative term: CF embeddings of another width than e_dim are no
    # reason to refuse it, and no untrained projection may produce a "CF alignment" for the report.
    cf16 = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    for projection in (False, True):
        cfg = TokenizerConfig(**{**SMALL, "epochs": 2, "method": "rqvae", "cf_projection": projection})
        out = tmp_path / f"rqvae-{projection}"
        report = train_tokenizer(cfg, synth["text"][:300], cf16, str(out), name="Synth")
        assert "cf_alignment_cosine" not in report
        assert load_checkpoint(str(out / "model.pt"))["cf_dim"] is None
    # with CF embeddings of e_dim's width the alignment is still reported
    cf8 = np.load(os.path.join(synth["dir"], "Synth.cf-sasrec8.npy"))[:300]
    _, report = _train(synth, tmp_path / "rqvae-8", method="rqvae", epochs=2)
    assert -1 <= report["cf_alignment_cosine"] <= 1 and cf8.shape[1] == SMALL["e_dim"]
