"""CF embeddings (SASRec, LightGCN): learning on synthetic data, export, resume, DDP equivalence."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from letter.cf import CFConfig, SASRec, train_cf
from letter.cf.sasrec import training_windows
from letter.cf.train import output_paths
from letter.data import Dataset, leave_one_out, make_synthetic, write_letter
from letter.errors import LetterError


def _quiet(_msg):
    pass


def test_training_windows_cover_every_prefix():
    ds = Dataset("w", ["u"], [[0, 1, 2, 3, 4, 5, 6]], [str(i) for i in range(7)])
    split = leave_one_out(ds)
    inputs, targets = training_windows(split, ds, max_len=2)
    # items[:-2] = 0..4 -> targets 1..4 in windows of 2 cut from the end; model ids are item + 1
    assert inputs.tolist() == [[3, 4], [1, 2]] and targets.tolist() == [[4, 5], [2, 3]]
    pairs = {(int(i), int(t)) for i, t in zip(inputs.flatten(), targets.flatten()) if t > 0}
    assert {(h[-1] + 1, t + 1) for h, t in split.train} == pairs


def test_model_is_causal():
    model = SASRec(num_items=10, dim=8, blocks=1, heads=2, dropout=0.0, max_len=5).eval()
    seq = torch.tensor([[0, 1, 2, 3, 4]])
    changed = seq.clone()
    changed[0, -1] = 7
    a, b = model(seq), model(changed)
    assert torch.allclose(a[:, :-1], b[:, :-1]) and not torch.allclose(a[:, -1], b[:, -1])
    # extra left padding changes nothing at the real positions (batches are trimmed to save work)
    padded = model(torch.tensor([[0, 0, 1, 2, 3]]))
    assert torch.allclose(padded[:, 2:], model(torch.tensor([[1, 2, 3]])), atol=1e-6)
    assert not torch.isnan(padded).any()


def test_every_epoch_records_the_arithmetic_it_ran_in(tmp_path):
    """history names each epoch's precision; bf16 really changes the arithmetic (another loss)."""
    ds = make_synthetic(num_users=120, num_items=60, num_categories=4, seed=1)
    runs = {p: train_cf(ds, str(tmp_path / p), CFConfig(dim=16, max_len=10, epochs=2, precision=p), log=_quiet)
            for p in ("fp32", "bf16")}
    assert [r["precision"] for r in runs["fp32"]["history"]] == ["float32"] * 2
    assert [r["precision"] for r in runs["bf16"]["history"]] == ["bf16-autocast"] * 2
    assert runs["bf16"]["history"][0]["loss"] != runs["fp32"]["history"][0]["loss"]
    lightgcn = train_cf(ds, str(tmp_path / "lightgcn"), CFConfig(**{**LIGHTGCN, "epochs": 1}), log=_quiet)
    assert [r["precision"] for r in lightgcn["history"]] == ["float32"]


@pytest.mark.parametrize("loss", [dict(loss="ce"), dict(loss="sampled", negatives=32)])
def test_sasrec_learns_on_synthetic_and_exports(tmp_path, loss):
    ds = make_synthetic(num_users=400, num_items=160, num_categories=8, seed=1)
    cfg = CFConfig(dim=16, dropout=0.2, max_len=20, epochs=4, patience=3, **loss)
    result = train_cf(ds, str(tmp_path), cfg, log=_quiet)
    paths = output_paths(str(tmp_path), ds.name, 16)
    emb = np.load(paths["embeddings"])
    assert emb.shape == (160, 16) and emb.dtype == np.float32
    written = json.load(open(paths["metrics"]))
    assert written["test"] == pytest.approx(result["test"])
    # well above the popularity baseline (the synthetic histories follow item successors)
    assert result["test"]["ndcg@10"] > 2 * result["popularity_test"]["ndcg@10"]
    assert result["test"]["ndcg@10"] > 0.1
    # both protocols side by side: the config's (history kept) is "test", the masked one differs
    assert result["test_history_kept"] == pytest.approx(result["test"])
    assert result["test_history_masked"] != pytest.approx(result["test_history_kept"])
    assert result["popularity_test_history_masked"] != pytest.approx(result["popularity_test"])


def test_resume_continues_identically(tmp_path):
    ds = make_synthetic(num_users=120, num_items=60, num_categories=3, seed=2)
    cfg = dict(dim=8, blocks=1, dropout=0.3, max_len=10, batch_size=64, patience=10)
    straight = train_cf(ds, str(tmp_path / "a"), CFConfig(epochs=3, **cfg), log=_quiet)
    train_cf(ds, str(tmp_path / "b"), CFConfig(epochs=2, **cfg), log=_quiet)
    resumed = train_cf(ds, str(tmp_path / "b"), CFConfig(epochs=3, **cfg), resume=True, log=_quiet)
    assert resumed["epochs_run"] == 3
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]])
    a = np.load(output_paths(str(tmp_path / "a"), ds.name, 8)["embeddings"])
    b = np.load(output_paths(str(tmp_path / "b"), ds.name, 8)["embeddings"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(LetterError, match="blocks was 1, now 2"):
        train_cf(ds, str(tmp_path / "b"), CFConfig(epochs=4, **{**cfg, "blocks": 2}), resume=True, log=_quiet)
    # early stopping reads the masked or the unmasked NDCG@10: one run never mixes the two
    with pytest.raises(LetterError, match="mask_history was False, now True"):
        train_cf(ds, str(tmp_path / "b"), CFConfig(epochs=4, **{**cfg, "mask_history": True}), resume=True, log=_quiet)


def test_ddp_two_processes_match_one(tmp_path):
    ds = make_synthetic(num_users=100, num_items=40, num_categories=4, seed=5)
    data = tmp_path / "data"
    write_letter(ds, str(data))
    args = ["train-cf", str(data), "--dim", "8", "--blocks", "1", "--dropout", "0", "--max-len", "10", "--epochs", "2",
            "--batch-size", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LETTER_PROGRESS": "0"}
    train_cf(ds, str(tmp_path / "one"), CFConfig(dim=8, blocks=1, dropout=0.0, max_len=10, epochs=2, batch_size=32),
             log=_quiet)
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "letter.cli.main", *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = np.load(output_paths(str(tmp_path / "one"), ds.name, 8)["embeddings"])
    b = np.load(output_paths(str(tmp_path / "two"), ds.name, 8)["embeddings"])
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    m1 = json.load(open(output_paths(str(tmp_path / "one"), ds.name, 8)["metrics"]))
    m2 = json.load(open(output_paths(str(tmp_path / "two"), ds.name, 8)["metrics"]))
    assert m2["world_size"] == 2 and m1["test"] == pytest.approx(m2["test"], abs=1e-6)
    assert [h["loss"] for h in m1["history"]] == pytest.approx([h["loss"] for h in m2["history"]], rel=1e-4)


def test_popularity_with_history_masked_skips_the_users_items():
    from letter.cf.train import popularity_metrics

    # one user: training head [0, 1] makes 0 and 1 the most popular; test history [0, 1, 2] -> 3
    ds = Dataset("Tiny", ["u"], [[0, 1, 2, 3]], [str(i) for i in range(12)])
    split = leave_one_out(ds)
    kept = popularity_metrics(split, ds, "test")
    masked = popularity_metrics(split, ds, "test", mask_history=True)
    assert kept["ndcg@5"] == pytest.approx(1 / np.log2(5))  # ranked 0, 1, 2, 3: the target 4th
    assert masked["ndcg@5"] == pytest.approx(1.0)  # 0, 1, 2 ruled out: the target first
    assert kept["recall@5"] == masked["recall@5"] == 1.0


def test_masked_full_ranking_never_counts_a_history_item_on_a_small_catalog():
    # 10 items, 9 of them in the history (the target among them): the top 10 holds 9 masked items;
    # a masked item is an empty slot, never a hit (as popularity's masked ranking)
    from letter.cf.train import ranking_metrics
    from letter.training import DistContext

    cfg = CFConfig(max_len=20, eval_batch_size=4, device="cpu")
    samples = [(list(range(9)), 3), (list(range(9)), 9)]
    scores = lambda hist, users: torch.arange(10, dtype=torch.float).expand(len(users), -1).clone()
    masked = ranking_metrics(scores, samples, [0, 1], 10, DistContext(), cfg, mask_history=True,
                             seen=[h for h, _ in samples])
    assert masked["recall@10"] == 0.5 and masked["ndcg@10"] == pytest.approx(0.5)  # only item 9, ranked first
    kept = ranking_metrics(scores, samples, [0, 1], 10, DistContext(), cfg, mask_history=False)
    assert kept["recall@10"] == 1.0


def test_masking_rules_out_the_whole_history_not_only_the_models_window():
    # histories longer than the window the model reads (max_len / max_history): the masked protocol
    # rules out every item the user had, as TIGER's exclude_history does (Split.seen_items)
    from letter.cf.train import popularity_metrics, ranking_metrics
    from letter.training import DistContext

    ds = Dataset("Tiny", ["u"], [[0, 1, 2, 3]], [str(i) for i in range(12)])
    split = leave_one_out(ds, max_history=1)
    assert split.test == [([2], 3)] and split.seen_items(ds, "test", [0]) == [[0, 1, 2]]
    assert split.seen_items(ds, "valid", [0]) == [[0, 1]]
    # popularity (training head [0, 1]): 0, 1 and 2 ruled out, the target first
    assert popularity_metrics(split, ds, "test", mask_history=True)["ndcg@5"] == pytest.approx(1.0)
    cfg = CFConfig(max_len=1, eval_batch_size=4, device="cpu")
    scores = lambda hist, users: torch.arange(10, 0, -1, dtype=torch.float).expand(len(users), -1).clone()
    masked = ranking_metrics(scores, split.test, [0], 10, DistContext(), cfg, mask_history=True,
                             seen=split.seen_items(ds, "test", [0]))
    assert masked["ndcg@10"] == pytest.approx(1.0)  # ranked 0, 1, 2, 3, ...: 0-2 ruled out
    with pytest.raises(ValueError, match="seen items"):
        ranking_metrics(scores, split.test, [0], 10, DistContext(), cfg, mask_history=True)


def test_sasrec_bf16_autocast_step_matches_fp32():
    # One SASRec CE step on a fixed batch under CPU bf16 autocast against fp32; tolerance as TIGER's
    # (tests/test_rec_speed.py): loss to 1%, all gradients to 3% of their norm, each tensor to 10%.
    from letter.cf.sasrec import step_loss

    torch.manual_seed(0)
    model = SASRec(200, 32, 2, 2, 0.0, 20).train()
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(1, 201, (16, 20), generator=gen)
    inputs[:4, :10] = 0  # left padding
    targets = torch.randint(1, 201, (16, 20), generator=gen) * (inputs > 0)
    results = {}
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = step_loss(model, inputs, targets, 200, "ce", int((targets > 0).sum()), 1)
        loss.backward()
        results[amp] = (loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert abs(float(results[True][0] - results[False][0])) < 0.01 * float(results[False][0])
    def relative_error(got, want):
        return float((got - want).norm() / want.norm().clamp_min(1e-12))

    flat = {amp: torch.cat([g.flatten() for g in grads.values()]) for amp, (_, grads) in results.items()}
    assert relative_error(flat[True], flat[False]) < 0.03
    for n, grad in results[False][1].items():
        assert relative_error(results[True][1][n], grad) < 0.10, n


# -- LightGCN ----------------------------------------------------------------------------------------

LIGHTGCN = dict(model="lightgcn", dim=16, graph_layers=2, batch_size=256, lr=1e-2, max_len=20, patience=5)


def test_lightgcn_normalized_adjacency():
    from letter.cf.lightgcn import normalized_adjacency

    # users 0, 1; items 0, 1, 2: user 0 - items 0, 1; user 1 - item 1 (item 2 has no edge)
    adj = normalized_adjacency(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 2, 3).to_dense()
    assert torch.equal(adj, adj.T) and adj[:2, :2].abs().sum() == 0 and adj[2:, 2:].abs().sum() == 0
    degree = {"u0": 2, "u1": 1, "i0": 1, "i1": 2}
    assert adj[0, 2].item() == pytest.approx(1 / np.sqrt(degree["u0"] * degree["i0"]))
    assert adj[0, 3].item() == pytest.approx(1 / np.sqrt(degree["u0"] * degree["i1"]))
    assert adj[1, 3].item() == pytest.approx(1 / np.sqrt(degree["u1"] * degree["i1"]))
    assert adj[4].abs().sum() == 0 and adj[1, 2] == 0


@pytest.mark.parametrize("loss", ["ce", "bpr"])
def test_lightgcn_learns_far_above_popularity_and_exports(tmp_path, loss):
    ds = make_synthetic(num_users=400, num_items=160, num_categories=8, seed=1)
    result = train_cf(ds, str(tmp_path), CFConfig(**LIGHTGCN, loss=loss, epochs=15), log=_quiet)
    paths = output_paths(str(tmp_path), ds.name, 16, "lightgcn")
    assert paths["embeddings"].endswith("Synth.cf-lightgcn16.npy")
    emb = np.load(paths["embeddings"])
    assert emb.shape == (160, 16) and emb.dtype == np.float32 and np.isfinite(emb).all()
    written = json.load(open(paths["metrics"]))
    assert written["test"] == pytest.approx(result["test"]) and written["config"]["model"] == "lightgcn"
    assert result["test"]["ndcg@10"] > 2 * result["popularity_test"]["ndcg@10"]
    assert result["test_history_masked"] != pytest.approx(result["test_history_kept"])


def test_lightgcn_resume_continues_identically(tmp_path):
    ds = make_synthetic(num_users=120, num_items=60, num_categories=3, seed=2)
    cfg = dict(LIGHTGCN, loss="bpr", batch_size=64, patience=10)
    straight = train_cf(ds, str(tmp_path / "a"), CFConfig(epochs=3, **cfg), log=_quiet)
    train_cf(ds, str(tmp_path / "b"), CFConfig(epochs=2, **cfg), log=_quiet)
    resumed = train_cf(ds, str(tmp_path / "b"), CFConfig(epochs=3, **cfg), resume=True, log=_quiet)
    assert resumed["epochs_run"] == 3
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert resumed["test"] == straight["test"]
    a = np.load(output_paths(str(tmp_path / "a"), ds.name, 16, "lightgcn")["embeddings"])
    b = np.load(output_paths(str(tmp_path / "b"), ds.name, 16, "lightgcn")["embeddings"])
    assert np.array_equal(a, b)
    with pytest.raises(LetterError, match="graph_layers was 2, now 3"):
        train_cf(ds, str(tmp_path / "b"), CFConfig(epochs=4, **{**cfg, "graph_layers": 3}), resume=True, log=_quiet)


@pytest.mark.parametrize("model,loss", [("sasrec", "ce"), ("sasrec", "sampled"), ("sasrec", "bce"),
                                        ("lightgcn", "ce"), ("lightgcn", "bpr")])
def test_divergence_is_a_clean_error_and_writes_no_embeddings(tmp_path, model, loss):
    # lr 1e30 overflows the weights at the first step; the fused ce loss would stop on its NaN input
    # with a bare ValueError, the others would export NaN embeddings
    ds = make_synthetic(num_users=60, num_items=30, num_categories=3, seed=2)
    extra = {"negatives": 8} if loss == "sampled" else {}
    cfg = CFConfig(model=model, loss=loss, dim=8, blocks=1, epochs=2, batch_size=16, lr=1e30, **extra)
    with pytest.raises(LetterError, match="training diverged: .*; lower lr"):
        train_cf(ds, str(tmp_path), cfg, log=_quiet)
    assert not os.path.exists(output_paths(str(tmp_path), ds.name, 8, model)["embeddings"])


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    ds = make_synthetic(num_users=60, num_items=30, num_categories=3, seed=2)
    with pytest.raises(LetterError, match="cannot resume: no checkpoint at .*Synth.cf-sasrec8.ckpt.pt"):
        train_cf(ds, str(tmp_path), CFConfig(dim=8, blocks=1, epochs=1), resume=True, log=_quiet)
    assert not os.path.exists(output_paths(str(tmp_path), ds.name, 8)["embeddings"])


def test_lightgcn_export_feeds_train_tokenizer(tmp_path):
    from click.testing import CliRunner

    from letter.cli.main import main as cli

    data = str(tmp_path / "data")
    write_letter(make_synthetic(num_users=150, num_items=60, num_categories=3, seed=4), data)
    runner = CliRunner()
    result = runner.invoke(cli, ["train-cf", data, "--model", "lightgcn", "--dim", "8", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert os.path.exists(os.path.join(data, "Synth.cf-lightgcn8.npy"))
    result = runner.invoke(cli, ["embed", data, "--model", "hash", "--mode", "hash", "--dim", "16"])
    assert result.exit_code == 0, result.output
    out = str(tmp_path / "tok")
    result = runner.invoke(cli, ["train-tokenizer", "--data", data, "--out", out, "--layers", "16", "--e-dim", "8",
                                 "--codebook-sizes", "8,8", "--clusters", "2", "--epochs", "2", "--batch-size", "32",
                                 "--kmeans-iters", "2"])
    assert result.exit_code == 0, result.output
    report = json.load(open(os.path.join(out, "report.json")))
    # the CF term was trained against the LightGCN embeddings (found as the one <Name>.cf-*.npy)
    assert report["items"] == 60 and report["config"]["alpha"] > 0 and report["final_losses"]["cf"] > 0


@pytest.mark.parametrize("args, message", [
    (["--model", "lightgcn", "--loss", "bce"], "cf: loss bce is not a lightgcn loss (one of ce, bpr)"),
    (["--model", "sasrec", "--loss", "bpr"], "cf: loss bpr is not a sasrec loss (one of ce, sampled, bce)"),
    (["--model", "lightgcn", "--loss", "sampled"], "cf: loss sampled is not a lightgcn loss (one of ce, bpr)"),
    (["--model", "lightgcn", "--graph-layers", "0"], "cf: graph_layers must be >= 1, got 0"),
    (["--model", "gcn"], "'gcn' is not one of 'sasrec', 'lightgcn'"),
])
def test_bad_cf_options_are_one_line_errors(tmp_path, args, message):
    from click.testing import CliRunner

    from letter.cli.main import main as cli

    data = str(tmp_path / "data")
    write_letter(make_synthetic(num_users=60, num_items=30, num_categories=3, seed=4), data)
    result = CliRunner().invoke(cli, ["train-cf", data, "--epochs", "1", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not [f for f in os.listdir(data) if ".cf-" in f]


def test_bad_input_with_overwrite_keeps_the_earlier_outputs(tmp_path):
    """--overwrite with a bad --device, or on data without a training sample, is refused before
    the outputs already there are removed (they were deleted first, then the input was refused)."""
    from click.testing import CliRunner

    from letter.cli.main import main as cli

    data = tmp_path / "data"
    write_letter(make_synthetic(num_users=60, num_items=30, num_categories=3, seed=4), str(data))
    earlier = {path: f"earlier {key}".encode() for key, path in output_paths(str(data), "Synth", 8).items()}
    for path, content in earlier.items():
        with open(path, "wb") as f:
            f.write(content)
    for args, message in ((["--device", "tpu"], "--device 'tpu': not a device name"),
                          ([], "no training samples (one needs a user with at least 4 interactions: the last two "
                                "are the validation and test targets)")):
        if not args:  # histories of 3 items: nothing to train on
            write_letter(make_synthetic(num_users=60, num_items=30, num_categories=3, min_length=3, max_length=3),
                         str(data))
        result = CliRunner().invoke(cli, ["train-cf", str(data), "--dim", "8", "--epochs", "1", "--overwrite", *args])
        assert result.exit_code == 1 and message in result.output, result.output
        assert {path: open(path, "rb").read() for path in earlier} == earlier
