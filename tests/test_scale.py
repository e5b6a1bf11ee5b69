"""Large catalogs (issue 23): the streamed generator, the memory-mapped tokenizer path, the linear
collision grouping, SASRec's sampled softmax and bounded validation, TIGER's compact training
samples, and a 100k-item smoke run of the cheap stages under a memory bound. Costs are measured
by `python -m letter.bench scale`, not here."""
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from letter.cf.config import CFConfig
from letter.cf.sasrec import SASRecTrainable
from letter.cf.train import loss_choice, ranking_metrics, train_cf
from letter.cli.main import main
from letter.data import leave_one_out, load_dataset, make_synthetic
from letter.data.catalog import write_catalog
from letter.data.stats import dataset_stats
from letter.rec.config import RecConfig
from letter.rec.data import load_rec_data
from letter.rec.model import EOS, PAD
from letter.rec.recommender import recommender_class
from letter.tokenizer import TokenizerConfig, train_tokenizer
from letter.tokenizer.codes import colliding_groups
from letter.training import DistContext, RandomStreams, seed_everything


def _files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_catalog_is_seeded_and_amazon_like(tmp_path):
    a = write_catalog(str(tmp_path / "a"), 2000, 3000, seed=3)
    write_catalog(str(tmp_path / "b"), 2000, 3000, seed=3)
    write_catalog(str(tmp_path / "c"), 2000, 3000, seed=4)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # same seed: byte-identical
    assert _files(tmp_path / "a") != _files(tmp_path / "c")
    ds = load_dataset(str(tmp_path / "a"))
    stats = dataset_stats(ds)
    assert (stats["users"], stats["items"], stats["interactions"]) == (3000, 2000, a["interactions"])
    lengths = np.array([len(s) for s in ds.sequences])
    assert lengths.min() == 5 and 7.5 < lengths.mean() < 9.5  # 5-core minimum, Amazon-like mean
    assert all(s[i] != s[i + 1] for s in ds.sequences for i in range(len(s) - 1))  # no immediate repeats
    counts = np.sort(np.bincount(np.concatenate(ds.sequences), minlength=2000))[::-1]
    assert counts[:20].sum() > 0.1 * counts.sum()  # Zipf-like: the top 1% of items take > 10%
    text = ds.item_text[7]
    assert set(text) == {"title", "description", "brand", "categories", "category"} and text["category"] == 0
    assert text["title"].endswith("model 7")


def test_a_catalog_whose_item_text_cannot_be_put_in_place_is_no_dataset(tmp_path, monkeypatch):
    """<Name>.inter.json makes a folder a dataset, so it is put in place after the item text (as
    write_letter does): a failure in between left interactions without their text."""
    real_replace = os.replace

    def fail_for_item_text(src, dst):
        if str(dst).endswith(".item.json"):
            raise OSError(28, "No space left on device", dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_for_item_text)
    with pytest.raises(OSError, match="No space left"):
        write_catalog(str(tmp_path), 1000, 5, seed=0)
    assert os.listdir(tmp_path) == []


def _peak_traced(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_catalog_memory_does_not_grow_with_the_users(tmp_path):
    # numpy and Python allocations are traced: users come in chunks of 8192 whose arrays are
    # [chunk, longest history in it <= 100], so 5x the users needs no more than one chunk's
    # worst case (the longest history of a chunk varies: hence not equality)
    few = _peak_traced(lambda: write_catalog(str(tmp_path / "few"), 4000, 10_000, seed=0))
    many = _peak_traced(lambda: write_catalog(str(tmp_path / "many"), 4000, 50_000, seed=0))
    assert many < 2 * few and many < 40 * 2**20


def test_cli_synth_catalog(tmp_path):
    r = CliRunner().invoke(main, ["data", "synth-catalog", str(tmp_path / "d"), "--items", "1000", "--users", "50",
                                  "--seed", "1", "--name", "Big"])
    assert r.exit_code == 0, r.output
    ds = load_dataset(str(tmp_path / "d"))
    assert (ds.name, ds.num_users, ds.num_items) == ("Big", 50, 1000)
    assert f"{ds.num_interactions} interactions" in r.output


def test_colliding_groups_match_brute_force():
    codes = np.random.default_rng(0).integers(0, 3, size=(400, 3))
    groups = colliding_groups(codes)
    keys = [tuple(c) for c in codes.tolist()]
    expected = sorted((np.array([i for i, k in enumerate(keys) if k == key]) for key in set(keys)
                       if keys.count(key) > 1), key=lambda g: g[0])
    assert len(groups) == len(expected) and all(np.array_equal(g, e) for g, e in zip(groups, expected))
    assert colliding_groups(np.arange(12).reshape(4, 3)) == []


def test_tokenizer_memory_mapped_equals_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    text = rng.standard_normal((300, 24)).astype(np.float32)
    np.save(tmp_path / "text.npy", text)
    config = TokenizerConfig(layers=[16], e_dim=4, codebook_sizes=[4, 4, 32], clusters=2, epochs=3, batch_size=64,
                             kmeans_iters=5, alpha=0.0, unique=True, device="cpu")
    in_memory = train_tokenizer(config, text, None, str(tmp_path / "a"), name="T")
    mapped = np.load(tmp_path / "text.npy", mmap_mode="r")
    streamed = train_tokenizer(config, mapped, None, str(tmp_path / "b"), name="T")
    assert np.array_equal(np.load(tmp_path / "a" / "codes.npy"), np.load(tmp_path / "b" / "codes.npy"))
    assert in_memory["recon_mse"] == streamed["recon_mse"]
    a = torch.load(tmp_path / "a" / "model.pt")["model"]
    b = torch.load(tmp_path / "b" / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampled_softmax_with_every_item_is_the_full_softmax():
    from letter.cf.sasrec import sampled_softmax_loss

    gen = torch.Generator().manual_seed(0)
    h, emb = torch.randn(6, 8, generator=gen), torch.randn(30, 8, generator=gen)
    t = torch.tensor([0, 5, 29, 7, 7, 12])
    full = F.cross_entropy(h @ emb.T, t, reduction="sum")
    assert torch.allclose(sampled_softmax_loss(h, emb, t, torch.arange(30)), full, atol=1e-5)
    # fewer negatives: the target is always in, so the loss is smaller than the full softmax's
    assert sampled_softmax_loss(h, emb, t, torch.arange(10)) < full



def test_sampled_loss_with_negatives_covering_the_catalog_is_the_full_softmax():
    # --loss sampled with --negatives >= items: the training step's loss is the exact full softmax
    # (as the run's first line says)
    from letter.cf.model import SASRec
    from letter.cf.sasrec import step_loss

    torch.manual_seed(0)
    model = SASRec(40, 8, 1, 1, 0.0, 6).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(1, 41, (5, 6), generator=gen)
    targets = torch.randint(1, 41, (5, 6), generator=gen)
    full = step_loss(model, inputs, targets, 40, "ce", 30, 1)
    for negatives in (40, 1000):
        assert torch.allclose(step_loss(model, inputs, targets, 40, "sampled", 30, 1, negatives), full, atol=1e-5)

SMOKE = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from letter.cf.config import CFConfig
    from letter.cf.model import SASRec
    from letter.cf.sasrec import sasrec_scorer
    from letter.cf.train import loss_choice, ranking_metrics, train_cf
    from letter.data import load_dataset
    from letter.decoding import PrefixIndex
    from letter.rec.data import load_rec_data
    from letter.rec.evaluation import generate, prefix_index
    from letter.rec.config import RecConfig
    from letter.rec.recommender import recommender_class
    from letter.tokenizer import TokenizerConfig
    from letter.tokenizer.inference import Tokenizer
    from letter.tokenizer.rqkmeans import fit_rqkmeans
    from letter.training import distributed
    from letter_ext.bench.common import peak_rss_bytes

    torch.manual_seed(0)
    folder = sys.argv[1]
    text = np.load(folder + "/text.npy", mmap_mode="r")  # 100k x 64, streamed
    # residual k-means fitted on a sample: codes spread like a trained tokenizer's
    config = TokenizerConfig(method="rqkmeans", codebook_sizes=[64, 64, 64], unique=True)
    tok = Tokenizer(fit_rqkmeans(np.array(text[:4000]), config.codebook_sizes, iters=5), config, "Catalog")
    raw, z = tok.raw_codes(text)
    codes, info = tok.resolve(raw, z)
    index = PrefixIndex.from_codes(torch.from_numpy(codes), config.codebook_sizes)
    ds = load_dataset(folder + "/data")
    rec = load_rec_data(ds, codes, 20)
    rm = recommender_class("tiger").build(RecConfig(d_model=16, num_layers=1, num_decoder_layers=1, num_heads=2,
                                                    d_kv=8, d_ff=32), rec, torch.device("cpu"))
    samples = rec.split.test[:32]
    leaves, _ = generate(rm.model, prefix_index(rec, "cpu"), rec.encode([h for h, _ in samples]), 10, 32, "cpu")
    cfg = CFConfig(dim=16, blocks=1, heads=1)
    with distributed("cpu") as ctx:
        sasrec = SASRec(ds.num_items, 16, 1, 1, 0.0, cfg.max_len).eval()
        ranking = ranking_metrics(sasrec_scorer(sasrec), samples, [0] * len(samples), ds.num_items, ctx, cfg)
    print(json.dumps({"moves": info["unique_moves"], "unique": bool(len(np.unique(codes, axis=0)) == len(codes)), "leaves": index.num_leaves,
                      "found": int((leaves >= 0).sum()), "recall": ranking["recall@10"],
                      "peak_rss_mib": peak_rss_bytes() / 2**20}))
""")


def test_100k_items_cheap_stages_stay_within_memory(tmp_path):
    items = 100_000
    write_catalog(str(tmp_path / "data"), items, 20_000, seed=0)
    text = np.lib.format.open_memmap(str(tmp_path / "text.npy"), "w+", np.float32, (items, 64))
    for start in range(0, items, 25_000):
        text[start:start + 25_000] = np.random.default_rng(start).standard_normal((25_000, 64), dtype=np.float32)
    text.flush()
    del text
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SMOKE, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["unique"] and result["leaves"] == items  # --unique: one identifier per item
    assert result["found"] == 32 * 10  # every user got a full constrained list
    assert 0 <= result["recall"] <= 1
    # The process holds torch, the dataset and 100k-row arrays: a stage that held the catalog
    # quadratically (a [users, items] or [items, items] matrix) or the embedding matrix several
    # times in dense float64 would go far past this.
    assert result["peak_rss_mib"] < 1200, result


def _reference_encode(rec, histories):
    """The per-row int64 encoder input the training samples were built as before they were held
    compact: each history's last max_history items' tokens, then EOS, right-padded."""
    out = torch.full((len(histories), rec.split.max_history * rec.num_levels + 1), PAD, dtype=torch.long)
    for row, history in enumerate(histories):
        tokens = rec.item_tokens[list(history)[-rec.split.max_history:]].reshape(-1)
        out[row, : tokens.numel()] = tokens
        out[row, tokens.numel()] = EOS
    return out


def test_compact_tiger_samples_equal_the_int64_ones(tmp_path):
    write_catalog(str(tmp_path / "data"), 300, 400, seed=2, category_size=50)
    ds = load_dataset(str(tmp_path / "data"))
    codes = np.random.default_rng(0).integers(0, 256, size=(300, 3))
    rec = load_rec_data(ds, codes, 6)  # histories longer than 6 are cut: the cut is covered too
    enc, labels = rec.train_tensors()
    assert enc.dtype == labels.dtype == torch.int16  # 3 + 3 x 256 tokens
    reference = _reference_encode(rec, [h for h, _ in rec.split.train])
    assert torch.equal(enc.long(), reference)
    assert torch.equal(labels.long(), rec.item_tokens[torch.tensor([t for _, t in rec.split.train])])
    assert max(len(h) for h, _ in rec.split.train) == 6 and (enc == 0).any()  # full and padded rows
    # evaluation inputs (int64), a history of one item and an empty one
    histories = [h for h, _ in rec.split.valid] + [[5], []]
    assert torch.equal(rec.encode(histories), _reference_encode(rec, histories))
    # the trainer's batches are widened back to int64, equal to the reference rows
    rm = recommender_class("tiger").build(RecConfig(d_model=16, num_layers=1, num_decoder_layers=1, num_heads=2,
                                                    d_kv=8, d_ff=32, max_history=6), rec, torch.device("cpu"))
    rm.prepare_training(RandomStreams(torch.device("cpu")))
    rows = torch.tensor([0, 7, len(reference) - 1])
    batch_enc, _, batch_labels = rm.batch(rows)
    assert batch_enc.dtype == batch_labels.dtype == torch.long
    assert torch.equal(batch_enc, reference[rows][:, : batch_enc.shape[1]])
    assert (reference[rows][:, batch_enc.shape[1]:] == 0).all()
    # a vocabulary past int16 is held as int32
    wide = load_rec_data(ds, np.random.default_rng(1).integers(0, 20_000, size=(300, 2)), 6)
    wide_enc, _ = wide.train_tensors()
    assert wide_enc.dtype == torch.int32 and wide_enc.max() > 2**15
    assert torch.equal(wide_enc.long(), _reference_encode(wide, [h for h, _ in wide.split.train]))


def _sasrec_trainable(ds, split, **changes):
    cfg = CFConfig(dim=8, blocks=1, heads=1, max_len=10, eval_batch_size=16, device="cpu", **changes)
    seed_everything(cfg.seed)
    return cfg, SASRecTrainable.build(ds, split, cfg, DistContext(), RandomStreams(torch.device("cpu")))


def test_bounded_sasrec_validation_is_seeded_and_full_when_it_covers_everyone():
    ds = make_synthetic(num_users=150, num_items=60, num_categories=4, seed=0)
    split = leave_one_out(ds, 10)
    users = len(split.valid)
    _, everyone = _sasrec_trainable(ds, split)
    full = everyone.validate(1, {}, True)
    record = {}
    _, covering = _sasrec_trainable(ds, split, valid_users=users + 5)
    assert covering.validate(1, record, True).record == full.record and record["valid_users"] == users
    # a sample: the same users for the same seed, its metrics those of exactly these users
    record = {}
    cfg, sampled = _sasrec_trainable(ds, split, valid_users=40)
    first = sampled.validate(1, record, True)
    assert sampled.validate(2, {}, True).record == first.record and record["valid_users"] == 40
    rows = split.sample_rows("valid", 40, cfg.seed)
    assert len(set(rows)) == 40 and rows == sorted(rows) and rows != split.sample_rows("valid", 40, cfg.seed + 1)
    sampled.model.eval()
    expected = ranking_metrics(sampled.scorer(), [split.valid[i] for i in rows], [split.eval_users[i] for i in rows],
                               ds.num_items, DistContext(), cfg)
    assert first.record == {f"valid_{k}": v for k, v in expected.items()}
    assert first.record != full.record


def test_train_cf_says_which_loss_and_validates_the_sample(tmp_path):
    big, small = loss_choice(CFConfig(), 1_000_000), loss_choice(CFConfig(), 5_000)
    assert "full softmax over all 1,000,000 items" in big and "the sampled loss" in big
    assert "full softmax over all 5,000 items" in small and "sampled" not in small
    assert "sampled" not in loss_choice(CFConfig(model="lightgcn"), 1_000_000)  # not a LightGCN loss
    assert "1,024 uniform negatives of 1,000,000 items" in loss_choice(CFConfig(loss="sampled"), 1_000_000)
    assert "every item is one (the exact full softmax)" in loss_choice(CFConfig(loss="sampled"), 1_024)
    ds = make_synthetic(num_users=150, num_items=60, num_categories=4, seed=0)
    lines = []
    result = train_cf(ds, str(tmp_path), CFConfig(dim=8, blocks=1, heads=1, max_len=10, epochs=2, valid_users=40,
                                                  device="cpu"), log=lines.append)
    assert lines[0] == loss_choice(CFConfig(), 60)
    assert [h["valid_users"] for h in result["history"]] == [40, 40]
    assert result["valid"]["ndcg@10"] == result["history"][result["best_epoch"] - 1]["valid_ndcg@10"]


def test_scale_bench_records_the_cpu_model_every_benchmark_records(tmp_path, monkeypatch):
    """The scale result's cpu_model is the one CPU-model helper's (letter_ext.bench.common): with
    lscpu missing it still names the CPU, as the benchmark JSON's machine.cpu beside it does."""
    from letter.bench.__main__ import main as bench_main
    from letter_ext.bench.common import cpu_model

    monkeypatch.setenv("PATH", str(tmp_path))  # no lscpu on the PATH
    results = bench_main(["scale", "--scale-items", "10", "--scale-stages", "", "--scale-dir", str(tmp_path)])
    assert results["scale"]["cpu_model"] == results["machine"]["cpu"] == cpu_model()


def test_scale_plot_is_written_atomically(tmp_path, full_disk_savefig):
    # savefig wrote into OUT.png itself: a failed write left a partial plot in place of the earlier one
    from letter.bench.scale import plot

    result = {"stages": {"embed": {"1000": {"per_unit_cpu_s": 1e-3}, "10000": {"per_unit_cpu_s": 2e-3}}},
              "growth_exponent": {"embed": 0.3}, "cpu_model": "test CPU"}
    path = tmp_path / "scale.png"
    assert plot(result, str(path))
    earlier = path.read_bytes()
    assert earlier.startswith(b"\x89PNG")
    full_disk_savefig()
    with pytest.raises(OSError, match="No space left"):
        plot(result, str(path))
    assert os.listdir(tmp_path) == ["scale.png"] and path.read_bytes() == earlier
