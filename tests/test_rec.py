"""TIGER recommender: model pieces, learning on synthetic data, constrained generation, resume, DDP, CLI."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import NUM_CATEGORIES, NUM_ITEMS, small_config, torchrun_train_rec
from letter.cli.main import main as cli
from letter.data import leave_one_out
from letter.errors import LetterError
from letter.rec import RecConfig, evaluate, generate, load_run, recommend, train_rec
from letter.rec.data import load_rec_data
from letter.rec.evaluation import evaluate_model, prefix_index
from letter.rec.model import BOS, EOS, PAD, Tiger, relative_position_bucket



@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: run the whole module single-threaded (see conftest.one_thread)."""


# ---------------------------------------------------------------------------------------- model


def test_token_layout_and_encoder_input(synth):
    _, _, codes, ds = synth
    rec = load_rec_data(ds, codes, max_history=3)
    layout = rec.layout
    assert layout.level_sizes == (NUM_CATEGORIES, int(codes[:, 1].max()) + 1)
    assert layout.offsets == (3, 3 + NUM_CATEGORIES)
    assert layout.vocab_size == 3 + sum(layout.level_sizes)
    enc = rec.encode([[5, 6, 7, 8], [9]])
    # only the last 3 items, their tokens in time order, then EOS, then PAD
    expected = np.concatenate([layout.item_tokens(codes[[6, 7, 8]]).reshape(-1), [EOS]])
    assert enc[0].tolist() == expected.tolist()
    assert enc[1, :3].tolist() == layout.item_tokens(codes[[9]])[0].tolist() + [EOS]
    assert (enc[1, 3:] == PAD).all()
    labels = rec.item_tokens[torch.tensor([4])]
    assert rec.decoder_inputs(labels).tolist() == [[BOS, labels[0, 0].item()]]


def test_relative_position_buckets_follow_t5():
    rel = torch.tensor([0, -1, 1, -7, 7, -8, -127, -1000])
    buckets = relative_position_bucket(rel, True, 32, 128).tolist()
    # a key behind the query (rel < 0) uses buckets 0..15, ahead 16..31; exact up to distance 7
    assert buckets[:5] == [0, 1, 17, 7, 23]
    assert 8 <= buckets[5] <= 15 and buckets[6] == 15 and buckets[7] == 15
    causal = relative_position_bucket(torch.tensor([0, -3, 4]), False, 32, 128).tolist()
    assert causal == [0, 3, 0]


def test_kv_cache_decoding_equals_teacher_forcing():
    torch.manual_seed(0)
    model = Tiger(30, d_model=32, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16, d_ff=64,
                  temperature=0.7).eval()
    enc = torch.randint(3, 30, (3, 9))
    enc[0, 6:] = PAD
    dec = torch.cat([torch.full((3, 1), BOS), torch.randint(3, 30, (3, 3))], 1)
    full = model(enc, dec) @ model.embed.weight.T / 0.7  # [B, T, V]
    beams = 4
    state = model.start_decoding(enc, beams)
    logits, state = model.decode_step(None, state)
    torch.testing.assert_close(logits, full[:, 0], atol=1e-5, rtol=1e-5)
    # expand each user to 4 beams, then reverse beam order each step: all beams follow the same tokens
    state = model.reorder_state(state, torch.arange(3).repeat_interleave(beams))
    flip = torch.arange(3 * beams).view(3, beams).flip(1).reshape(-1)
    for t in range(1, 4):
        logits, state = model.decode_step(dec[:, t].repeat_interleave(beams), state)
        torch.testing.assert_close(logits, full[:, t].repeat_interleave(beams, 0), atol=1e-5, rtol=1e-5)
        state = model.reorder_state(state, flip)


def test_ranking_guided_loss_equals_materialized_cross_entropy():
    torch.manual_seed(1)
    model = Tiger(25, d_model=16, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8, d_ff=32, dropout=0.0,
                  temperature=0.7)
    enc, labels = torch.randint(3, 25, (4, 7)), torch.randint(3, 25, (4, 3))
    dec = torch.cat([torch.full((4, 1), BOS), labels[:, :-1]], 1)
    loss = model.loss(enc, dec, labels)
    loss.backward()
    fused_grad = model.embed.weight.grad.clone()
    model.zero_grad()
    hidden = model(enc, dec)
    expected = F.cross_entropy((hidden @ model.embed.weight.T / 0.7).reshape(-1, 25), labels.reshape(-1))
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_grad, model.embed.weight.grad, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- learning


def test_training_learns_far_above_popularity(trained, synth):
    out, summary = trained
    _, _, _, ds = synth
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    assert len(history) == summary["epochs_trained"] == 6 and summary["finished"]
    assert history[-1]["valid_loss"] < 0.8 * history[0]["valid_loss"]
    split = leave_one_out(ds, 5)
    popular = np.argsort(-np.bincount([t for _, t in split.train], minlength=NUM_ITEMS), kind="stable")[:10]
    popularity_recall = np.mean([t in popular for _, t in split.test])
    result = evaluate(out, "test", out=os.path.join(out, "test.json"))
    assert result["metrics"]["recall@10"] > max(0.5, 2 * popularity_recall)
    assert result["metrics"]["ndcg@10"] <= result["metrics"]["recall@10"]
    with open(os.path.join(out, "test.json")) as f:
        saved = json.load(f)
    assert saved["users"] == len(split.test) and saved["beams"] == 20
    assert saved["wall_s"] > 0 and saved["users_per_s"] > 0
    assert saved["targets_in_collision_groups"] == 0


def test_every_generated_identifier_is_a_real_item(trained, synth):
    out, _ = trained
    _, _, codes, _ = synth
    model, rec, _ = load_run(out)
    enc, _ = rec.eval_tensors("test")
    index = prefix_index(rec, "cpu")
    leaves, scores = generate(model, index, enc, 20, 64, "cpu")
    assert (leaves >= 0).all() and torch.isfinite(scores).all()
    real = {tuple(c) for c in codes.tolist()}
    generated = index.leaf_codes()[leaves.reshape(-1)].tolist()
    assert all(tuple(c) in real for c in generated)
    assert all(len(set(row)) == 20 for row in leaves.tolist())  # no identifier twice per user
    # the HF-style baseline decodes the same model to the same ranking
    hf_leaves, hf_scores = generate(model, index, enc[:16], 20, 8, "cpu", decoder="hf")
    assert torch.equal(hf_leaves, leaves[:16])
    torch.testing.assert_close(hf_scores, scores[:16], atol=1e-4, rtol=1e-4)


def test_collision_rule_counts_shared_identifiers(trained, synth):
    """Two items sharing an identifier: generating it is a hit for either target."""
    out, _ = trained
    folder, _, codes, ds = synth
    model, _, config = load_run(out)
    collided = codes.copy()
    collided[1] = collided[0]
    rec = load_rec_data(ds, collided, config.max_history)
    enc, targets = rec.eval_tensors("test")
    with pytest.warns(UserWarning, match="share"):
        result = evaluate_model(model, rec, enc, targets, 20, 64, "cpu")
    assert result["targets_in_collision_groups"] == int(np.isin(targets.numpy(), [0, 1]).sum())
    assert result["index"]["shared_leaves"] == 1
    # every user's target set to item 0 or to item 1 scores the same: both have one identifier
    as_item = {}
    for item in (0, 1):
        with pytest.warns(UserWarning, match="share"):
            as_item[item] = evaluate_model(model, rec, enc, torch.full_like(targets, item), 20, 64, "cpu")["metrics"]
    assert as_item[0] == as_item[1] and as_item[0]["recall@10"] > 0


def test_recommend_cli_prints_items_with_titles(trained, synth):
    out, _ = trained
    _, _, _, ds = synth
    history = ds.sequences[0][:4]
    result = CliRunner().invoke(cli, ["recommend", "--model", out, "--history", ",".join(ds.item_ids[i] for i in history),
                                      "-k", "5"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 5
    titles = {t["title"] for t in ds.item_text}
    for line in lines:
        rank, item_id, score, title = line.split(maxsplit=3)
        assert item_id in ds.item_ids and title in titles
        assert ds.item_text[ds.item_ids.index(item_id)]["title"] == title
    items = recommend(out, [ds.item_ids[i] for i in history], k=5)
    assert [r["item_id"] for r in items] == [line.split()[1] for line in lines]


def test_evaluate_cli_writes_json(trained, tmp_path):
    out, _ = trained
    path = tmp_path / "valid.json"
    result = CliRunner().invoke(cli, ["evaluate", "--model", out, "--split", "valid", "--max-users", "50",
                                      "--device", "cpu", "--out", str(path)])
    assert result.exit_code == 0, result.output
    saved = json.loads(path.read_text())
    assert saved["split"] == "valid" and saved["users"] == 50 and saved["beams"] == 20
    assert set(saved["metrics"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}


def test_model_selection_uses_every_validation_user_by_default(trained):
    out, summary = trained
    assert RecConfig().valid_users == 0
    everyone = evaluate(out, "valid", device="cpu")
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    validated = [r for r in history if "valid_ndcg@10" in r]
    assert [r["epoch"] for r in validated] == [2, 4, 6]
    assert all(r["valid_users"] == everyone["users"] and r["valid_s"] > 0 for r in history)
    assert summary["selection"]["valid_users"] == everyone["users"] and summary["schedule_completed"]
    best = next(r for r in validated if r["epoch"] == summary["best_epoch"])
    assert best["selected"] and best["valid_ndcg@10"] == pytest.approx(everyone["metrics"]["ndcg@10"])
    assert everyone["standard_errors"]["ndcg@10"] == pytest.approx(best["valid_ndcg@10_se"])


def test_a_validation_sample_prints_and_stores_its_standard_error(synth, tmp_path, capsys):
    folder, codes_path, _, _ = synth
    out = str(tmp_path / "sample")
    summary = train_rec(small_config(epochs=2, eval_every=1, valid_users=50), folder, codes_path, out)
    sample = evaluate(out, "valid", max_users=50, device="cpu")  # the same fixed sample, the best weights
    assert sample["users"] == 50 and summary["last"]["valid_users"] == 50
    best = summary["best_epoch"]
    ckpt = _weights(os.path.join(out, "checkpoint.pt"))
    with open(os.path.join(out, "history.json")) as f:
        for history in (json.load(f), ckpt["history"]):
            record = history[best - 1]
            for name, se in sample["standard_errors"].items():
                assert record[f"valid_{name}_se"] == pytest.approx(se), name
    assert sample["standard_errors"]["recall@10"] > 0
    threshold = history[best - 1]["valid_threshold"]
    assert threshold == pytest.approx(sample["standard_errors"]["ndcg@10"])  # min_delta_se 1 by default
    printed = capsys.readouterr().out
    assert printed.count("valid_ndcg@10_se=") == 2 and "valid_s=" in printed


def test_every_epoch_records_the_arithmetic_it_ran_in(synth, tmp_path):
    """history names each epoch's precision; bf16 really changes the arithmetic (another loss)."""
    folder, codes_path, _, _ = synth
    runs = {p: train_rec(small_config(epochs=2, precision=p), folder, codes_path, str(tmp_path / p))
            for p in ("fp32", "bf16")}
    history = {p: json.load(open(os.path.join(str(tmp_path / p), "history.json"))) for p in runs}
    assert [r["precision"] for r in history["fp32"]] == ["float32"] * 2
    assert [r["precision"] for r in history["bf16"]] == ["bf16-autocast"] * 2
    assert runs["bf16"]["last"]["precision"] == "bf16-autocast"
    assert history["bf16"][0]["train_loss"] != history["fp32"][0]["train_loss"]


def test_one_evaluated_user_writes_strict_json(trained, tmp_path):
    """One user has no spread to measure: its standard errors are null, and the file parses under
    a strict reader (NaN is not JSON)."""
    out, _ = trained
    written = tmp_path / "one.json"
    result = evaluate(out, "test", max_users=1, device="cpu", out=str(written))

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    strict = json.loads(written.read_text(), parse_constant=refuse)
    assert result["users"] == strict["users"] == 1
    assert set(strict["standard_errors"].values()) == {None}


# ------------------------------------------------------------------------------ resume and DDP


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_equals_uninterrupted_run(trained, synth, tmp_path):
    out, _ = trained
    folder, codes_path, _, _ = synth
    resumed = str(tmp_path / "resumed")
    first = train_rec(small_config(), folder, codes_path, resumed, stop_after=3)
    assert first["epochs_trained"] == 3 and not first["finished"]
    train_rec(small_config(), folder, codes_path, resumed, resume=True)
    a, b = _weights(os.path.join(out, "checkpoint.pt")), _weights(os.path.join(resumed, "checkpoint.pt"))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("wall_s", "valid_s")} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert _weights(os.path.join(out, "model.pt"))["epoch"] == _weights(os.path.join(resumed, "model.pt"))["epoch"]


class _Killed(BaseException):
    """The process dies (no handler on the way catches it)."""


def test_resume_inside_an_epoch_equals_uninterrupted_run(trained, synth, tmp_path, monkeypatch):
    """`letter train-rec --checkpoint-minutes`: a run killed in the 3rd step of epoch 2 resumes from the
    checkpoint written inside that epoch and ends with the uninterrupted run's weights and history."""
    from letter.rec.train import RecTrainable

    out, _ = trained
    folder, codes_path, _, _ = synth
    settings = tmp_path / "rec.json"
    settings.write_text(json.dumps(small_config().to_dict()))
    run = tmp_path / "run"
    args = ["train-rec", "--data", folder, "--index", codes_path, "--out", str(run), "--config", str(settings)]
    start_epoch, step = RecTrainable.start_epoch, RecTrainable.step
    epochs, steps = [], []

    def starting(self, epoch):
        epochs.append(epoch)
        start_epoch(self, epoch)

    def dying(self, batch):
        steps.append(epochs[-1])
        if steps.count(2) == 3:
            raise _Killed
        return step(self, batch)

    monkeypatch.setattr(RecTrainable, "start_epoch", starting)
    monkeypatch.setattr(RecTrainable, "step", dying)
    with pytest.raises(_Killed):
        CliRunner().invoke(cli, [*args, "--checkpoint-minutes", "1e-9"])
    ckpt = _weights(os.path.join(run, "checkpoint.pt"))
    assert ckpt["epoch"] == 1 and ckpt["within_epoch"]["steps"] == 2
    monkeypatch.setattr(RecTrainable, "step", step)
    resumed = CliRunner().invoke(cli, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output and "step 2 of epoch 2" in resumed.output
    a, b = _weights(os.path.join(out, "checkpoint.pt")), _weights(os.path.join(run, "checkpoint.pt"))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("wall_s", "valid_s")} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


def test_ddp_two_processes_match_one(synth, tmp_path):
    folder, codes_path, _, _ = synth
    config = small_config(dropout=0.0, epochs=1, valid_users=100, eval_every=1)
    single = train_rec(config, folder, codes_path, str(tmp_path / "one"))
    double = torchrun_train_rec(config, folder, codes_path, tmp_path / "two", timeout=240)
    assert double["world_size"] == 2
    for key in ("train_loss", "valid_loss", "valid_ndcg@10"):
        assert double["last"][key] == pytest.approx(single["last"][key], rel=1e-3, abs=1e-4), key


# ---------------------------------------------------------------------------------- bad input


def test_bad_inputs_give_clear_errors(trained, synth, tmp_path):
    out, _ = trained
    folder, codes_path, codes, _ = synth
    with pytest.raises(LetterError, match="codes cover 79 items"):
        train_rec(small_config(), folder, codes[:-1], str(tmp_path / "x"))
    with pytest.raises(LetterError, match="already holds a finished train-rec run"):
        train_rec(small_config(), folder, codes_path, out)
    with pytest.raises(LetterError, match="cannot resume .*: lr was 0.003, now 0.001"):
        train_rec(small_config(lr=1e-3), folder, codes_path, out, resume=True)
    with pytest.raises(LetterError, match="temperature"):
        train_rec(small_config(temperature=0), folder, codes_path, str(tmp_path / "y"))
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "not a train-rec run folder" in result.output
    result = runner.invoke(cli, ["recommend", "--model", out, "--history", "1,not-an-item"])
    assert result.exit_code == 1 and "unknown item id(s) not-an-item" in result.output
    result = runner.invoke(cli, ["train-rec", "--data", folder, "--index", str(tmp_path / "none.json"),
                                 "--out", str(tmp_path / "z")])
    assert result.exit_code == 1 and "none.json" in result.output
    assert not os.path.exists(tmp_path / "z")


def test_resume_refuses_a_changed_dataset(synth, tmp_path):
    """The dataset's content is part of the run's identity: resuming on edited data (same items,
    other sequences) is refused naming it (main compared a key that was never written)."""
    from letter.data import Dataset, write_letter

    folder, codes_path, _, ds = synth
    out = str(tmp_path / "run")
    train_rec(small_config(epochs=2), folder, codes_path, out, stop_after=1)
    sequences = [list(s) for s in ds.sequences]
    sequences[0][0], sequences[0][1] = sequences[0][1], sequences[0][0]
    edited = str(tmp_path / "edited")
    write_letter(Dataset(ds.name, ds.user_ids, sequences, ds.item_ids, ds.item_text), edited)
    with pytest.raises(LetterError, match="cannot resume .*: inputs.dataset was"):
        train_rec(small_config(epochs=2), edited, codes_path, out, resume=True)
    summary = train_rec(small_config(epochs=2), folder, codes_path, out, resume=True)  # the same data resumes
    assert summary["finished"] and summary["epochs_trained"] == 2


def test_resume_without_a_checkpoint_is_an_error(synth, tmp_path):
    folder, codes_path, _, _ = synth
    with pytest.raises(LetterError, match="cannot resume: no checkpoint at .*checkpoint.pt"):
        train_rec(small_config(), folder, codes_path, str(tmp_path / "none"), resume=True)


def test_exclusion_never_counts_a_history_target_that_shares_its_identifier():
    # items 0 and 1 share an identifier; with 0 excluded it stays (1 is allowed) and then stands for
    # item 1 only, so a user whose target 0 is in the history can never hit (targets_in_history)
    from letter.data import Dataset

    torch.manual_seed(0)
    items = [str(i) for i in range(11)]
    ds = Dataset("Shared", ["a", "b"], [[0, 5, 6, 0], [2, 3, 4, 1]], items)
    codes = np.array([[0, 0], [0, 0]] + [[i // 4, i % 4 + 1] for i in range(2, 11)])
    rec = load_rec_data(ds, codes, max_history=5)
    model = Tiger(rec.layout.vocab_size, d_model=16, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8,
                  d_ff=32).eval()
    enc, targets = rec.eval_tensors("test")
    seen = rec.eval_seen_items("test")
    assert targets.tolist() == [0, 1] and 0 in seen[0] and 1 not in seen[1]
    # 20 beams over 10 identifiers: every allowed identifier is in the top 10, the shared one included
    kept = evaluate_model(model, rec, enc, targets, 20, 8, "cpu")
    hits = []
    excluded = evaluate_model(model, rec, enc, targets, 20, 8, "cpu", banned_items=seen, hits_out=hits)
    assert kept["metrics"]["recall@10"] == 1.0 and excluded["metrics"]["recall@10"] == 0.5
    assert hits[0][0].sum() == 0 and hits[0][1].sum() == 1  # user b's target 1 is not in its history


def test_no_training_samples_names_the_four_interactions_needed(tmp_path):
    # 3 interactions give a validation and a test target but no training sample (items[:-2] has one item)
    from letter.data import Dataset, write_letter

    ds = Dataset("Three", ["a", "b"], [[0, 1, 2], [3, 4, 5]], [str(i) for i in range(6)])
    write_letter(ds, str(tmp_path / "data"))
    codes = np.arange(6)[:, None]
    with pytest.raises(LetterError, match="at least 4 interactions"):
        train_rec(small_config(), str(tmp_path / "data"), codes, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")  # no started run left behind


def test_recommend_prints_the_identifier_rank_that_shared_items_share(tmp_path, monkeypatch):
    # items 7 and 9 share the first identifier: both are rank 1 (as in the JSON lists), the next is rank 2
    import importlib

    recommend_module = importlib.import_module("letter.rec.recommend")  # the module (letter.rec exports the function)

    listed = [{"item_id": "7", "title": "a", "score": -0.5, "rank": 1, "code": [0, 1]},
              {"item_id": "9", "title": "b", "score": -0.5, "rank": 1, "code": [0, 1]},
              {"item_id": "3", "title": None, "score": -1.25, "rank": 2, "code": [1, 2]}]
    monkeypatch.setattr(recommend_module, "recommend", lambda *args, **kwargs: listed)
    result = CliRunner().invoke(cli, ["recommend", "--model", str(tmp_path), "--history", "1,2", "-k", "2"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    assert [(r[0], r[1], r[2]) for r in rows] == [("1", "7", "-0.5000"), ("1", "9", "-0.5000"), ("2", "3", "-1.2500")]


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf")])
def test_tiger_refuses_a_temperature_that_is_not_finite_and_positive(temperature):
    # RecConfig checks it for train-rec; the model itself (built directly, or from a run's hparams) did not
    with pytest.raises(LetterError, match=r"temperature must be a finite number > 0"):
        Tiger(20, d_model=16, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=8, d_ff=32, temperature=temperature)
