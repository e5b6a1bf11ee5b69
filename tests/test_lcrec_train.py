"""LC-Rec behind the shared recommender trainer, evaluation and CLI (train_rec(RecConfig(model="lcrec")))
on a tiny random Llama (tests/conftest.py) and a small synthetic dataset."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import torchrun_train_rec  # noqa: E402
from letter.cli.main import main as cli  # noqa: E402
from letter.config import default_config, effective_config, merge, validate_config  # noqa: E402
from letter.data import make_synthetic, write_letter  # noqa: E402
from letter.errors import LetterError  # noqa: E402
from letter.rec import RecConfig, evaluate, generate, load_run, recommend, train_rec  # noqa: E402
from letter.rec.lcrec import LCRec  # noqa: E402

NUM_ITEMS = 60


def lcrec_config(base, **overrides) -> RecConfig:
    values = dict(model="lcrec", base_model=base, max_history=4, epochs=2, batch_size=64, lr=1e-2, warmup_ratio=0.1,
                  eval_every=1, valid_users=40, eval_beams=10, eval_batch_size=64, seed=5, temperature=1.0)
    return RecConfig(**{**values, **overrides})


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: run the whole module single-threaded (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """~100 users / 60 items on disk; codes: random distinct identifiers of 2 levels x 8."""
    ds = make_synthetic(num_users=100, num_items=NUM_ITEMS, num_categories=6, min_length=4, max_length=7, seed=1)
    folder = str(tmp_path_factory.mktemp("synth"))
    write_letter(ds, folder)
    g = np.random.default_rng(0)
    pairs = g.permutation(64)[:NUM_ITEMS]
    codes = np.stack([pairs // 8, pairs % 8], 1).astype(np.int64)
    assert codes.max(0).tolist() == [7, 7]  # level sizes 8 x 8
    codes_path = os.path.join(folder, "codes.npy")
    np.save(codes_path, codes)
    return folder, codes_path, codes, ds


@pytest.fixture(scope="module")
def run(tiny_llama, synth, tmp_path_factory):
    folder, codes_path, _, _ = synth
    out = str(tmp_path_factory.mktemp("lcrec") / "run")
    summary = train_rec(lcrec_config(tiny_llama), folder, codes_path, out)
    return out, summary


def _strip(history):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "valid_s")} for r in history]  # not the wall times


def test_trains_and_saves_the_adapter(run, tiny_llama):
    out, summary = run
    assert summary["epochs_trained"] == 2 and summary["finished"] and summary["best_epoch"] >= 1
    history = json.loads(open(os.path.join(out, "history.json")).read())
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[1]["valid_loss"] < history[0]["valid_loss"]
    info = json.loads(open(os.path.join(out, "run.json")).read())
    assert info["config"]["model"] == "lcrec" and info["config"]["base_model"] == tiny_llama
    # the best model: LCRec.save's adapter folder; the checkpoint: the adapter, not the base model
    assert sorted(os.listdir(os.path.join(out, "model"))) == ["adapter_config.json", "adapter_model.safetensors",
                                                              "lcrec.json"]
    assert not os.path.exists(os.path.join(out, "model.pt"))
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert all("lora_" in k or "trainable_tokens" in k for k in ckpt["model"])
    assert info["vocab_offsets"] == json.loads(open(os.path.join(out, "model", "lcrec.json")).read())["vocab_offsets"]


def test_evaluate_and_recommend_an_lcrec_run(run, synth):
    out, _ = run
    _, _, codes, ds = synth
    model, rec, config = load_run(out)
    assert isinstance(model, LCRec) and config.model == "lcrec"
    # every recommended identifier is a real item, no identifier twice per user
    from letter.rec.evaluation import prefix_index

    index = prefix_index(rec, "cpu", model)
    assert index.vocab_offsets == list(model.vocab_offsets)
    histories, _ = rec.eval_histories("test", 30, 0)
    leaves, scores = generate(model, index, histories, 10, 16, "cpu")
    assert (leaves >= 0).all() and torch.isfinite(scores).all()
    real = {tuple(c) for c in codes.tolist()}
    assert all(tuple(c) in real for c in index.leaf_codes()[leaves.reshape(-1)].tolist())
    assert all(len(set(row)) == 10 for row in leaves.tolist())
    # the same report as TIGER's
    path = os.path.join(out, "test.json")
    result = CliRunner().invoke(cli, ["evaluate", "--model", out, "--beams", "10", "--max-users", "30",
                                      "--device", "cpu", "--out", path])
    assert result.exit_code == 0, result.output
    saved = json.loads(open(path).read())
    assert set(saved["metrics"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert saved["users"] == 30 and saved["beams"] == 10 and saved["targets_in_collision_groups"] == 0
    assert saved["index"]["leaves"] == NUM_ITEMS
    assert evaluate(out, "test", num_beams=10, max_users=30)["metrics"] == saved["metrics"]
    items = recommend(out, [ds.item_ids[i] for i in ds.sequences[0][:3]], k=5)
    assert len(items) == 5 and all(r["item_id"] in ds.item_ids for r in items)
    assert all(list(codes[ds.item_ids.index(r["item_id"])]) == r["code"] for r in items)
    # exclusion works through the LC-Rec decoder too: the history's items are never returned
    history = [ds.item_ids[i] for i in ds.sequences[0][:3]]
    plain = recommend(out, history, k=10)
    excluded = recommend(out, history, k=10, exclude_history=True)
    assert len(excluded) == 10 and not {r["item_id"] for r in excluded} & set(history)
    plain_scores = {r["item_id"]: r["score"] for r in plain}
    assert all(r["score"] == pytest.approx(plain_scores[r["item_id"]], abs=1e-5)
               for r in excluded if r["item_id"] in plain_scores)


def test_resume_equals_uninterrupted_run(run, tiny_llama, synth, tmp_path):
    out, _ = run
    folder, codes_path, _, _ = synth
    resumed = str(tmp_path / "resumed")
    first = train_rec(lcrec_config(tiny_llama), folder, codes_path, resumed, stop_after=1)
    assert first["epochs_trained"] == 1 and not first["finished"]
    train_rec(lcrec_config(tiny_llama), folder, codes_path, resumed, resume=True)
    a = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(resumed, "checkpoint.pt"), weights_only=False)
    assert _strip(a["history"]) == _strip(b["history"])
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    # the saved best models give the same logits
    ma, mb = LCRec.load(os.path.join(out, "model")).eval(), LCRec.load(os.path.join(resumed, "model")).eval()
    prompts = ma.encode_examples([[1, 2, 3], [4]], ma.item_tokens(np.load(codes_path)), None)
    with torch.no_grad():
        la, lb = (m.logits(m.hidden_states(prompts["input_ids"], prompts["attention_mask"])) for m in (ma, mb))
    assert torch.equal(la, lb)


def test_per_sample_templates(tiny_llama, synth):
    _, _, codes, _ = synth
    model = LCRec.from_base(tiny_llama, (8, 8))
    tokens = model.item_tokens(codes)
    histories = [[1, 2], [3], [4, 5, 6]]
    mixed = model.encode_examples(histories, tokens, [0, 1, 2], template=torch.tensor([0, 2, 4]))
    for i, t in enumerate((0, 2, 4)):
        alone = model.encode_examples(histories[i:i + 1], tokens, [i], template=t)
        row, mask = mixed["input_ids"][i], mixed["attention_mask"][i].bool()
        assert torch.equal(row[mask], alone["input_ids"][0][alone["attention_mask"][0].bool()])
    with pytest.raises(LetterError, match="templates"):
        model.encode_examples(histories, tokens, None, template=[0, 1])


def test_bad_base_model_is_one_line_before_training(synth, tmp_path):
    folder, codes_path, _, _ = synth
    runner = CliRunner()
    cases = [(["--model", "lcrec"], "Error: --base-model is required with model lcrec"),
             (["--model", "lcrec", "--base-model", str(tmp_path / "missing")], "no such folder")]
    from transformers import T5Config

    T5Config(vocab_size=10, d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8).save_pretrained(tmp_path / "t5")
    cases.append((["--model", "lcrec", "--base-model", str(tmp_path / "t5")], "not a causal language model"))
    for extra, message in cases:
        out = tmp_path / "run"
        result = runner.invoke(cli, ["train-rec", "--data", folder, "--index", codes_path, "--out", str(out), *extra])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()


def test_pipeline_rec_section_takes_lcrec(tiny_llama):
    cfg = merge(default_config(), {"rec": {"model": "lcrec", "base_model": tiny_llama}})
    assert validate_config(cfg)["rec"]["model"] == "lcrec"
    with pytest.raises(LetterError, match="base_model is required"):
        validate_config(merge(default_config(), {"rec": {"model": "lcrec"}}))
    assert effective_config()["rec"]["model"] == "tiger"


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny_llama, synth, tmp_path):
    folder, codes_path, _, _ = synth
    config = lcrec_config(tiny_llama, epochs=1, lora_dropout=0.0)
    single = train_rec(config, folder, codes_path, str(tmp_path / "one"))
    double = torchrun_train_rec(config, folder, codes_path, tmp_path / "two", timeout=300)
    assert double["world_size"] == 2
    for key in ("train_loss", "valid_loss"):
        assert double["last"][key] == pytest.approx(single["last"][key], rel=1e-4), key
    assert double["last"]["valid_ndcg@10"] == pytest.approx(single["last"]["valid_ndcg@10"], abs=1e-6)
