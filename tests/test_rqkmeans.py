"""RQ-KMeans tokenizer: category capture on clustered data, seeding, collision rules of Tokenizer,
cold start (with and without `unique`) and state-dict round trip."""
import numpy as np
import pytest
import torch

from letter.errors import LetterError
from letter.metrics import normalized_mutual_info
from letter.tokenizer import TokenizerConfig
from letter.tokenizer.codes import collision_rate
from letter.tokenizer.report import build_report, category_agreement
from letter.tokenizer.rqkmeans import RQKMeans, fit_rqkmeans
from letter.tokenizer.train import Tokenizer

CATEGORIES, PER_CATEGORY, DIM = 20, 40, 32
SIZES = [20, 8, 8]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Small tensors: single-threaded (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def blobs():
    """Gaussian blobs around 20 random centers (the latent categories), shuffled."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 1.0, (CATEGORIES, DIM)) * 3.0
    labels = np.repeat(np.arange(CATEGORIES), PER_CATEGORY)
    x = centers[labels] + rng.normal(0.0, 0.7, (len(labels), DIM))
    order = rng.permutation(len(labels))
    return (x[order] + 5.0).astype(np.float32), labels[order]  # offset: standardization has work to do


def _chance_nmi(codes: np.ndarray, labels: np.ndarray, repeats: int = 20) -> float:
    """The NMI of the same code-size distribution against shuffled categories (chance level)."""
    rng = np.random.default_rng(1)
    return max(normalized_mutual_info(codes, rng.permutation(labels)) for _ in range(repeats))


@pytest.mark.parametrize("standardize, pca_dim", [(False, None), (True, 8)])
def test_level1_codes_recover_latent_categories(blobs, standardize, pca_dim):
    x, labels = blobs
    model = fit_rqkmeans(x, SIZES, iters=50, standardize=standardize, pca_dim=pca_dim, seed=0)
    codes, z = model.encode(torch.from_numpy(x))
    codes = codes.numpy()
    assert codes.shape == (len(x), 3) and z.shape == (len(x), pca_dim or DIM)
    nmi, chance = normalized_mutual_info(codes[:, 0], labels), _chance_nmi(codes[:, 0], labels)
    purity = category_agreement(codes[:, 0], labels)["purity"]
    chance_purity = category_agreement(codes[:, 0], np.random.default_rng(2).permutation(labels))["purity"]
    assert chance < 0.15 and nmi > 0.85, (nmi, chance)
    assert chance_purity < 0.3 and purity > 0.8, (purity, chance_purity)
    # Every level splits its residuals; deeper levels use most of their codes.
    used = [len(np.unique(codes[:, l])) for l in range(3)]
    assert all(u >= need for u, need in zip(used, [15, 6, 6])), used
    stats = model.fit_stats
    assert len(stats["init_stats"]) == 3 and stats["seconds"] >= 0
    if pca_dim:
        assert 0.5 < stats["pca_explained_variance"] <= 1.0
        assert model.x_scale.item() != 1.0


def test_encode_is_the_residual_nearest_code_search(blobs):
    x, _ = blobs
    model = fit_rqkmeans(x[:200], [6, 5], iters=10, standardize=True, pca_dim=4, seed=1)
    codes, z = model.encode(torch.from_numpy(x[:200]))
    expected_z = ((torch.from_numpy(x[:200]) - model.x_mean) / model.x_scale) @ model.components
    torch.testing.assert_close(z, expected_z)
    r = z.clone()
    for l, cb in enumerate(model.codebooks):
        d = torch.cdist(r.double(), cb.double())
        assert torch.equal(codes[:, l], d.argmin(1))
        r = r - cb[codes[:, l]]


def test_same_seed_same_codes_other_seed_different(blobs):
    x, _ = blobs
    a = fit_rqkmeans(x, SIZES, iters=20, seed=7).encode(torch.from_numpy(x))[0]
    b = fit_rqkmeans(x, SIZES, iters=20, seed=7).encode(torch.from_numpy(x))[0]
    c = fit_rqkmeans(x, SIZES, iters=20, seed=8).encode(torch.from_numpy(x))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_tokenizer_rules_apply_unchanged(blobs):
    """Tokenizer.resolve (Sinkhorn + unique), cold-start encode and build_report on an RQ-KMeans model."""
    x, labels = blobs
    model = fit_rqkmeans(x, SIZES, iters=20, standardize=True, seed=0)
    config = TokenizerConfig(codebook_sizes=SIZES, unique=True)
    tok = Tokenizer(model, config, "blobs")
    raw, z = tok.raw_codes(x)
    assert collision_rate(raw) > 0  # 8 x 8 codes under each of 20 prefixes: some items share one
    codes, info = tok.resolve(raw, z)
    assert info["collision_after"] == 0.0 and collision_rate(codes) == 0.0
    assert len(np.unique(codes, axis=0)) == len(x)
    # Cold start: new items avoid every catalog identifier.
    cold = Tokenizer(model, config, "blobs", catalog_codes=codes).encode(x[:5] + 0.01)
    taken = {tuple(c) for c in codes.tolist()}
    assert cold.shape == (5, 3) and not taken & {tuple(c) for c in cold.tolist()}
    with pytest.raises(LetterError, match="dim"):
        tok.encode(x[:2, :5])
    # The RQ-VAE report works on it (decoder = identity here, so recon MSE = quantization MSE).
    report = build_report(tok, x, None, raw, codes, z, info, [], {"epoch": 0, "collision": info["collision_before"]},
                          model.fit_stats["init_stats"], {"kmeans_init_s": model.fit_stats["seconds"],
                                                          "cluster_refresh_s": [], "epoch_s": []}, labels)
    assert report["collision_rate_after"] == 0.0
    assert report["recon_mse"] == pytest.approx(report["quantization_mse"], rel=1e-5)
    assert report["level1_category_agreement"]["purity"] > 0.8


def test_cold_start_without_unique_may_share_catalog_identifiers(blobs):
    """What `letter tokenize` --help says: the catalog's identifiers stay taken only with `unique`;
    without it a new item colliding with catalog items alone keeps the shared identifier."""
    x, _ = blobs
    model = fit_rqkmeans(x, SIZES, iters=20, standardize=True, seed=0)
    config = TokenizerConfig(codebook_sizes=SIZES, unique=False)
    tok = Tokenizer(model, config, "blobs")
    catalog = tok.resolve(*tok.raw_codes(x))[0]
    taken = {tuple(c) for c in catalog.tolist()}
    shared = Tokenizer(model, config, "blobs", catalog_codes=catalog).encode(x[:1])
    assert tuple(shared[0]) in taken
    unique = Tokenizer(model, TokenizerConfig(codebook_sizes=SIZES, unique=True), "blobs", catalog_codes=catalog).encode(x[:1])
    assert tuple(unique[0]) not in taken


def test_cold_start_help_says_when_catalog_identifiers_stay_taken():
    from click.testing import CliRunner

    from letter.cli.main import main

    for command in ("tokenize", "add-items"):
        text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        assert "--unique" in text and "may share" in text, command



def test_state_dict_round_trip(blobs, tmp_path):
    x, _ = blobs
    model = fit_rqkmeans(x, SIZES, iters=10, standardize=True, pca_dim=8, seed=3)
    path = tmp_path / "rqk.pt"
    torch.save({"hparams": model.hparams, "state": model.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    loaded = RQKMeans.from_state(blob["hparams"], blob["state"])
    assert loaded.in_dim == DIM and loaded.hparams == model.hparams
    a, za = model.encode(torch.from_numpy(x))
    b, zb = loaded.encode(torch.from_numpy(x))
    assert torch.equal(a, b) and torch.equal(za, zb)
    plain = fit_rqkmeans(x, [4], iters=5, seed=0)  # no PCA: no components entry
    assert "components" not in plain.state_dict()
    again = RQKMeans.from_state(plain.hparams, plain.state_dict())
    assert torch.equal(again.encode(torch.from_numpy(x))[0], plain.encode(torch.from_numpy(x))[0])


def test_bad_arguments():
    x = np.ones((10, 4), np.float32)
    with pytest.raises(LetterError, match="pca_dim"):
        fit_rqkmeans(x, [2], pca_dim=5)
    with pytest.raises(LetterError, match="NaN"):
        fit_rqkmeans(np.full((3, 4), np.nan, np.float32), [2])
    with pytest.raises(LetterError, match="shape"):
        fit_rqkmeans(np.ones(5, np.float32), [2])


def test_nmi_by_hand():
    assert normalized_mutual_info([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert normalized_mutual_info([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(0.0)
    # [0,0,1,1] vs [0,0,0,1]: I = H(B) - H(B|A) = 0.5623 - 0.5*0.6931 nats; H(A) = 0.6931
    hb = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    mi = hb - 0.5 * np.log(2)
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(2 * mi / (np.log(2) + hb))


def test_report_of_a_run_says_nothing_was_trained(blobs, tmp_path):
    # rqkmeans trains no epochs (--epochs is refused with it): its report must not claim the
    # default 200 epochs and a best checkpoint.
    from letter.tokenizer import train_tokenizer

    x, _ = blobs
    report = train_tokenizer(TokenizerConfig(method="rqkmeans", codebook_sizes=SIZES), x, None, str(tmp_path / "run"))
    assert report["epochs"] == 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert "epochs" not in md.splitlines()[2] and "residual k-means, no training" in md


def test_a_fresh_run_drops_an_unfinished_runs_index_of_another_dataset_name(blobs, tmp_path):
    # an unfinished run (no manifest) of another dataset name left its index file: the new run
    # must not finish beside it (a reader of the folder's single <Name>.index.json would take it)
    from letter.tokenizer import train_tokenizer

    x, _ = blobs
    out = tmp_path / "run"
    train_tokenizer(TokenizerConfig(method="rqkmeans", codebook_sizes=SIZES), x, None, str(out), name="Old")
    (out / "manifest.json").unlink()
    assert (out / "Old.index.json").exists()
    train_tokenizer(TokenizerConfig(method="rqkmeans", codebook_sizes=SIZES), x, None, str(out), name="New")
    assert sorted(p.name for p in out.glob("*.index.json")) == ["New.index.json"]
