"""Cold start: the cold split and its guards, add-items index versions, the share control inside the
constrained search, and `letter evaluate --cold` (small synthetic data, CPU)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import letter_ext
from letter.cli.main import main as cli
from letter.data import Dataset, leave_one_out, load_dataset, make_synthetic, write_letter
from letter.data.cold import cold_split, read_cold_split
from letter.decoding import PrefixIndex
from letter.errors import LetterError
from letter.decoding.search import quota_last_step
from letter.rec import evaluate, generate, load_run, recommend
from letter.rec.evaluation import added_leaves
from letter.rec.index_versions import add_items, index_versions, load_index_codes

NUM_ITEMS, NUM_CATEGORIES, FRACTION = 120, 6, 0.1
REC = {"d_model": 32, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "d_kv": 16, "d_ff": 64,
       "max_history": 5, "epochs": 4, "batch_size": 64, "lr": 3e-3, "eval_every": 2, "valid_users": 100, "seed": 3}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: single-threaded (see conftest.one_thread)."""


def run_cli(*args, ok=True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A synthetic dataset with category-shaped text embeddings (items of a category are close)."""
    ds = make_synthetic(num_users=400, num_items=NUM_ITEMS, num_categories=NUM_CATEGORIES, min_length=5, max_length=10, seed=0)
    folder = str(tmp_path_factory.mktemp("source"))
    write_letter(ds, folder)
    category = np.array([t["category"] for t in ds.item_text])
    rng = np.random.default_rng(0)
    emb = (np.eye(NUM_CATEGORIES)[category] * 3 + rng.normal(size=(NUM_ITEMS, NUM_CATEGORIES))).astype(np.float32)
    emb = np.concatenate([emb, rng.normal(size=(NUM_ITEMS, 10)).astype(np.float32)], 1)
    emb_path = os.path.join(folder, "Synth.emb-test.npy")
    np.save(emb_path, emb)
    return folder, emb_path, ds, emb


@pytest.fixture(scope="module")
def chain(source, tmp_path_factory):
    """cold-split -> rqkmeans tokenizer (--unique) -> tiny TIGER, through the CLI."""
    folder, emb_path, _, _ = source
    root = tmp_path_factory.mktemp("chain")
    split, tok, rec = root / "split", root / "tok", root / "rec"
    run_cli("data", "cold-split", folder, "--fraction", FRACTION, "--seed", 7, "--out", split, "--embeddings", emb_path)
    run_cli("train-tokenizer", "--data", split, "--method", "rqkmeans", "--levels", 2, "--codebook-size", 16,
            "--unique", "--out", tok)
    config = root / "rec.json"
    config.write_text(json.dumps(REC))
    run_cli("train-rec", "--data", split, "--index", tok, "--out", rec, "--config", config)
    return str(split), str(tok), str(rec), str(split / "Synth.emb-test.npy")


@pytest.fixture
def added(chain, tmp_path):
    """A copy of the trained run with the cold items added (version 1)."""
    split, tok, rec, emb = chain
    run = str(tmp_path / "rec")
    shutil.copytree(rec, run)
    record = add_items(run, tok, emb)
    return run, record


# ------------------------------------------------------------------------------------- the split

def test_split_is_seeded_and_follows_the_protocol(source):
    _, _, ds, _ = source
    a, rec_a = cold_split(ds, FRACTION, seed=1)
    b, rec_b = cold_split(ds, FRACTION, seed=1)
    c, rec_c = cold_split(ds, FRACTION, seed=2)
    assert a == b and rec_a == rec_b
    assert rec_a["original_ids"] != rec_c["original_ids"]
    warm = rec_a["warm_items"]
    assert warm == NUM_ITEMS - round(FRACTION * NUM_ITEMS) and rec_a["cold_items"] == list(range(warm, NUM_ITEMS))
    original = {u: s for u, s in zip(ds.user_ids, ds.sequences)}
    position = {item: i for i, item in enumerate(ds.item_ids)}
    old_of_new = [position[i] for i in rec_a["original_ids"]]
    cold_old = set(old_of_new[warm:])
    # item i of the split is item original_ids[i] of the source (same text)
    assert all(a.item_text[i] == ds.item_text[old_of_new[i]] for i in range(NUM_ITEMS))
    for user, seq in zip(a.user_ids, a.sequences):
        assert all(i < warm for i in seq[:-1])  # cold items only as the last (test) item
        assert old_of_new[seq[-1]] == original[user][-1]  # the test target is the user's own last item
        assert [old_of_new[i] for i in seq[:-1]] == [i for i in original[user][:-1] if i not in cold_old]
    users = rec_a["users"]
    assert users["cold_target"] == sum(s[-1] >= warm for s in a.sequences) > 0
    assert users["cold_target"] + users["warm_target"] + users["dropped"] == ds.num_users


def test_split_refuses_embeddings_of_another_dataset(source, tmp_path):
    """--embeddings whose sidecar records other items (or that changed since it was written) are
    refused as every reader refuses them: the split would otherwise write them a new sidecar
    recording the split's items, and train-tokenizer would take them."""
    from letter.embed import embed_dataset

    folder, _, ds, _ = source
    other = Dataset("Synth", ds.user_ids, ds.sequences, [f"x{i}" for i in ds.item_ids], ds.item_text)  # other ids
    foreign, _ = embed_dataset(other, str(tmp_path / "other"), model="hash", dim=8)
    result = run_cli("data", "cold-split", folder, "--out", tmp_path / "split", "--embeddings", foreign, ok=False)
    assert result.exit_code == 1 and "not the items the embeddings Synth.emb-hash8.npy was made from" in result.output
    assert not (tmp_path / "split").exists()
    np.save(foreign, np.zeros((NUM_ITEMS, 8), np.float32))  # replaced after its sidecar was written
    result = run_cli("data", "cold-split", folder, "--out", tmp_path / "split", "--embeddings", foreign, ok=False)
    assert result.exit_code == 1 and "since Synth.emb-hash8.json was written" in result.output
    assert not (tmp_path / "split").exists()


def test_split_overwrite_with_bad_embeddings_keeps_the_earlier_split(source, tmp_path):
    """--overwrite with --embeddings of the wrong shape is refused before the split already there is
    removed (it was deleted first, then the embeddings were refused)."""
    folder, _, _, _ = source
    run_cli("data", "cold-split", folder, "--out", tmp_path / "split")
    before = {name: (tmp_path / "split" / name).read_bytes() for name in os.listdir(tmp_path / "split")}
    np.save(tmp_path / "bad.npy", np.zeros((3, 2), np.float32))
    result = run_cli("data", "cold-split", folder, "--out", tmp_path / "split", "--seed", 1, "--embeddings",
                     tmp_path / "bad.npy", "--overwrite", ok=False)
    assert result.exit_code == 1 and f"expected [{NUM_ITEMS}, dim] rows" in result.output, result.output
    assert {name: (tmp_path / "split" / name).read_bytes() for name in os.listdir(tmp_path / "split")} == before


def test_split_refuses_two_embeddings_of_one_name(source, tmp_path):
    """Two --embeddings of one file name would be written to the same file of the split (the
    second silently replacing the first): refused, nothing written."""
    folder, emb_path, _, emb = source
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b" / os.path.basename(emb_path), emb[:, ::-1])
    result = run_cli("data", "cold-split", folder, "--out", tmp_path / "split", "--embeddings", emb_path,
                     "--embeddings", tmp_path / "b" / os.path.basename(emb_path), ok=False)
    assert result.exit_code == 1 and "--embeddings" in result.output and "Synth.emb-test.npy" in result.output
    assert "twice" in result.output, result.output
    assert not (tmp_path / "split").exists()


@pytest.mark.parametrize("failing", ["cold_split.json", "Synth.emb-test.json", "Synth.item.json"])
def test_a_split_cut_short_is_no_dataset(source, tmp_path, monkeypatch, failing):
    """A split that fails before its last file (disk full, killed) must not leave a dataset the
    stages read: one without cold_split.json would be taken for an ordinary dataset, its cold
    items trained on. A rerun calls what is there unfinished."""
    import letter.data.cold as cold_module
    import letter.data.readers as readers

    folder, emb_path, _, _ = source

    def full_disk(real):
        def write(path, obj, *args, **kwargs):
            if os.path.basename(path) == failing:
                raise OSError(28, "No space left on device", path)
            return real(path, obj, *args, **kwargs)
        return write

    monkeypatch.setattr(cold_module, "write_json", full_disk(cold_module.write_json))
    monkeypatch.setattr(readers, "write_json", full_disk(readers.write_json))
    out = tmp_path / "split"
    result = run_cli("data", "cold-split", folder, "--out", out, "--embeddings", emb_path, ok=False)
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert not (out / "Synth.inter.json").exists()
    monkeypatch.undo()
    if failing != "cold_split.json":  # the first file: nothing was left
        again = run_cli("data", "cold-split", folder, "--out", out, "--embeddings", emb_path, ok=False)
        assert again.exit_code == 1 and "an unfinished (or another tool's) cold-split output" in again.output, \
            again.output
    run_cli("data", "cold-split", folder, "--out", out, "--embeddings", emb_path, "--overwrite")
    assert read_cold_split(str(out))["embeddings"] == ["Synth.emb-test.npy"]
    assert load_dataset(str(out)).num_items == NUM_ITEMS


def test_a_split_is_not_split_again(source, tmp_path):
    """Splitting a split would make its cold items, never trained on, warm items of the new split
    (and its record is not carried over): refused as `letter data convert` refuses a split."""
    folder, _, _, _ = source
    run_cli("data", "cold-split", folder, "--out", tmp_path / "split")
    result = run_cli("data", "cold-split", tmp_path / "split", "--out", tmp_path / "again", ok=False)
    assert result.exit_code == 1 and "already a cold split" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "again").exists()


@pytest.mark.parametrize("change", [{"num_items": None}, {"num_items": "120"}, {"warm_items": True},
                                    {"warm_items": 200}])
def test_a_corrupt_split_record_is_one_line(source, tmp_path, change):
    """A cold_split.json without num_items, or with counts that are no item counts, was a KeyError
    or TypeError traceback in the stages that read it."""
    folder, _, _, _ = source
    run_cli("data", "cold-split", folder, "--out", tmp_path / "split")
    record = json.loads((tmp_path / "split" / "cold_split.json").read_text())
    record.update(change)
    record = {key: value for key, value in record.items() if value is not None}
    (tmp_path / "split" / "cold_split.json").write_text(json.dumps(record))
    result = run_cli("train-cf", tmp_path / "split", "--dim", "8", "--epochs", "1", ok=False)
    assert result.exit_code == 1 and "cold_split.json: corrupt cold split record" in result.output, result.output
    assert not [f for f in os.listdir(tmp_path / "split") if ".cf-" in f]


def test_no_cold_item_reaches_training_validation_cf_or_tokenizer(chain, source, tmp_path):
    split, tok, rec, emb = chain
    record = read_cold_split(split)
    warm = record["warm_items"]
    # what train-cf and train-rec read: the split's leave-one-out parts
    parts = leave_one_out(load_dataset(split), max_history=50)
    for samples in (parts.train, parts.valid):
        assert all(t < warm and all(i < warm for i in h) for h, t in samples)
    assert any(t >= warm for _, t in parts.test)
    assert all(all(i < warm for i in h) for h, _ in parts.test)
    # the tokenizer trained on the warm rows only: its codes cover them, and cold rows are never read
    codes = np.load(os.path.join(tok, "codes.npy"))
    assert codes.shape[0] == warm and np.load(os.path.join(rec, "codes.npy")).shape[0] == warm
    changed = tmp_path / "split"
    shutil.copytree(split, changed)
    arr = np.load(emb)
    arr[warm:] = 1e3
    np.save(changed / "Synth.emb-test.npy", arr)
    os.remove(changed / "Synth.emb-test.json")  # its sidecar would (rightly) flag the edit
    run_cli("train-tokenizer", "--data", changed, "--method", "rqkmeans", "--levels", 2, "--codebook-size", 16,
            "--unique", "--out", tmp_path / "tok2")
    assert np.array_equal(np.load(tmp_path / "tok2" / "codes.npy"), codes)


def test_stages_refuse_cold_items_in_training_data(chain, tmp_path):
    split, tok, rec, emb = chain
    bad = tmp_path / "bad"
    shutil.copytree(split, bad)
    inter = bad / "Synth.inter.json"
    data = json.loads(inter.read_text())
    warm = read_cold_split(split)["warm_items"]
    user = next(iter(data))
    data[user].insert(0, warm)  # a cold item in a training history
    inter.write_text(json.dumps(data))
    for args in (["train-cf", bad, "--epochs", 1, "--out", tmp_path / "cf"],
                 ["train-rec", "--data", bad, "--index", tok, "--out", tmp_path / "r", "--epochs", 1]):
        result = run_cli(*args, ok=False)
        assert result.exit_code != 0 and "cold item" in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "cf").exists() and not (tmp_path / "r").exists()
    # codes that cover the cold items (a tokenizer trained on the whole catalog) are refused too
    full = tmp_path / "full.npy"
    np.save(full, np.zeros((NUM_ITEMS, 2), dtype=np.int64) + np.arange(NUM_ITEMS)[:, None] % 16)
    result = run_cli("train-rec", "--data", split, "--index", full, "--out", tmp_path / "r2", ok=False)
    assert result.exit_code != 0 and "warm items" in result.output
    # the pipeline would copy the data without its record: it refuses a split
    result = run_cli("pipeline", "--data", split, "--out", tmp_path / "pipe", ok=False)
    assert result.exit_code != 0 and "is a cold split" in result.output



def test_a_cold_split_record_without_its_item_count_is_one_line(chain, tmp_path):
    """A cold_split.json whose num_items is missing or not an integer: every reader of the split
    (evaluate, add-items) says the record is corrupt, in one line, instead of a KeyError traceback."""
    split, tok, rec, emb = chain
    for value in (None, "120"):
        bad = tmp_path / f"bad-{value}"
        shutil.copytree(split, bad)
        record = json.loads((bad / "cold_split.json").read_text())
        if value is None:
            del record["num_items"]
        else:
            record["num_items"] = value
        (bad / "cold_split.json").write_text(json.dumps(record))
        for args in (["evaluate", "--model", rec, "--data", bad],
                     ["add-items", "--model", rec, "--tokenizer", tok, "--embeddings", emb, "--data", bad]):
            result = run_cli(*args, ok=False)
            assert result.exit_code == 1 and "corrupt cold split record" in result.output, result.output
            assert "Traceback" not in result.output and not isinstance(result.exception, KeyError)
    assert index_versions(rec) == [0]


# ------------------------------------------------------------------------------------ add-items

def test_added_items_get_distinct_identifiers_and_can_be_recommended(chain, added):
    split, _, rec, _ = chain
    run, record = added
    warm = read_cold_split(split)["warm_items"]
    codes, version, _ = load_index_codes(run)
    assert version == 1 and index_versions(run) == [0, 1] and record["added"] == NUM_ITEMS - warm
    assert np.array_equal(codes[:warm], np.load(os.path.join(rec, "codes.npy")))
    assert len({tuple(c) for c in codes.tolist()}) == NUM_ITEMS  # --unique: all distinct, none shared
    assert record["identifiers_shared_with_catalog"] == 0
    model, data, _ = load_run(run)
    assert data.index_version == 1 and len(data.codes) == NUM_ITEMS
    index = PrefixIndex.from_codes(data.codes, data.layout.level_sizes, data.layout.offsets)
    enc, _ = data.eval_tensors("test")
    leaves, _ = generate(model, index, enc, 20, 128, "cpu")
    live = leaves >= 0
    assert live.all()  # 20 of 120 identifiers always exist
    items = index.first_item_of_leaf[leaves]
    assert (items >= warm).any()  # an added item is returned
    # never an identifier outside the index: each returned leaf's codes are an indexed item's codes
    assert np.array_equal(index.leaf_codes()[leaves[live]].numpy(), codes[items[live].numpy()])
    # before adding, no cold item can come out
    model0, data0, _ = load_run(run, index_version=0)
    index0 = PrefixIndex.from_codes(data0.codes, data0.layout.level_sizes, data0.layout.offsets)
    leaves0, _ = generate(model0, index0, enc, 20, 128, "cpu")
    assert (index0.first_item_of_leaf[leaves0] < warm).all()


def test_training_version_still_evaluates_to_the_old_metrics(chain, added):
    _, _, rec, _ = chain
    run, _ = added
    before = evaluate(rec)
    assert before["index_version"] == 0
    after_v0 = evaluate(run, index_version=0)
    after = evaluate(run)
    assert after_v0["metrics"] == before["metrics"] and after["index_version"] == 1
    result = run_cli("evaluate", "--model", run, "--index-version", 0)
    assert json.loads(result.output[result.output.index("{"):])["metrics"] == before["metrics"]
    result = run_cli("evaluate", "--model", run, "--index-version", 5, ok=False)
    assert result.exit_code != 0 and "index versions 0, 1" in result.output


def test_adding_twice_is_a_no_op(chain, added):
    _, tok, _, emb = chain
    run, _ = added
    codes_before = load_index_codes(run)[0]
    second = add_items(run, tok, emb)
    assert second["added"] == 0 and second["version"] == 1
    result = run_cli("add-items", "--model", run, "--tokenizer", tok, "--embeddings", emb)
    assert "nothing added" in result.output
    assert index_versions(run) == [0, 1] and np.array_equal(load_index_codes(run)[0], codes_before)


def test_add_items_refuses_a_foreign_tokenizer(chain, tmp_path, source):
    split, _, rec, emb = chain
    run = tmp_path / "rec"
    shutil.copytree(rec, run)
    run_cli("train-tokenizer", "--data", split, "--method", "rqkmeans", "--levels", 2, "--codebook-size", 16,
            "--unique", "--seed", 99, "--out", tmp_path / "other")
    if np.array_equal(np.load(tmp_path / "other" / "codes.npy"), np.load(run / "codes.npy")):
        pytest.skip("seed 99 gave the same codes")
    result = run_cli("add-items", "--model", run, "--tokenizer", tmp_path / "other", "--embeddings", emb, ok=False)
    assert result.exit_code != 0 and "not the identifiers" in result.output
    assert index_versions(str(run)) == [0]


def test_embeddings_of_other_items_are_refused_by_add_items_and_cold_knn(chain, source, tmp_path):
    """The source catalog's embeddings (as `letter embed` writes them, with their sidecar) have as
    many rows as the split, but in the source's item order: their cold rows are other items' text.
    add-items (whole-catalog rows) and evaluate --cold --text-emb refuse them by the sidecar's item
    fingerprint instead of coding the cold items from other items' rows."""
    from letter.runs import sidecar_path, sidecar_record, write_json

    split, tok, rec, _ = chain
    folder, emb_path, _, _ = source
    stale = str(tmp_path / "Synth.emb-source.npy")
    shutil.copyfile(emb_path, stale)
    write_json(sidecar_path(stale), sidecar_record(stale, {"items": load_dataset(folder).items_fingerprint()}))
    run = tmp_path / "rec"
    shutil.copytree(rec, run)
    result = run_cli("add-items", "--model", run, "--tokenizer", tok, "--embeddings", stale, ok=False)
    assert result.exit_code == 1 and "not the items" in result.output and "Traceback" not in result.output, \
        result.output
    assert index_versions(str(run)) == [0]
    result = run_cli("evaluate", "--model", rec, "--cold", "--text-emb", stale, ok=False)
    assert result.exit_code == 1 and "not the items" in result.output, result.output


def test_a_failed_add_leaves_the_previous_version(chain, tmp_path, monkeypatch):
    _, tok, rec, emb = chain
    run = str(tmp_path / "rec")
    shutil.copytree(rec, run)
    import letter.rec.index_versions as iv

    def broken_save(path, array):
        with open(path, "wb") as f:
            f.write(b"\x93NUMPY half")
        raise OSError("disk full")

    monkeypatch.setattr(iv.np, "save", broken_save)
    with pytest.raises(OSError):
        add_items(run, tok, emb)
    monkeypatch.undo()
    assert index_versions(run) == [0] and load_index_codes(run)[1] == 0
    assert os.listdir(os.path.join(run, "index-versions")) == []  # the temporary folder went too
    assert add_items(run, tok, emb)["version"] == 1


def test_a_killed_add_leaves_the_previous_version(chain, added):
    """SIGKILL just before the version folder is renamed into place: nothing visible changes."""
    _, tok, _, emb = chain
    run, _ = added
    script = f"""
import os, signal
import letter.rec.index_versions as iv
def killing_rename(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)
iv.os.rename = killing_rename
iv.add_items({run!r}, {tok!r}, {emb!r})
"""
    # version 1 holds every item; remove it so that the add has work to do, then kill it mid-write
    shutil.rmtree(os.path.join(run, "index-versions", "v1"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = os.listdir(os.path.join(run, "index-versions"))
    assert leftovers and all(name.startswith(".tmp-") for name in leftovers)  # the killed add's temp folder
    assert index_versions(run) == [0]
    assert evaluate(run)["index_version"] == 0
    assert add_items(run, tok, emb)["version"] == 1 and index_versions(run) == [0, 1]


# -------------------------------------------------------------------------------- share control

def brute_force_quota(logits, beam_scores, nodes, trie, num_beams, new_leaves, max_new, banned=None):
    """Every expansion enumerated in Python, ranked by (-score, k, t), taken greedily under the quota
    (max_new: an int or one per row; banned: per row, leaves that may not be taken)."""
    level = trie.num_levels - 1
    logp = torch.log_softmax(logits.double(), -1)
    batch, k_in = beam_scores.shape
    out = []
    for b in range(batch):
        cands = []
        for k in range(k_in):
            if beam_scores[b, k] == float("-inf"):
                continue
            node = int(nodes[b, k])
            for e in range(int(trie.row_ptr[level][node]), int(trie.row_ptr[level][node + 1])):
                t = int(trie.child_token[level][e])
                cands.append((-(float(beam_scores[b, k]) + float(logp[b * k_in + k, t])), k, t, e))
        cands.sort()
        chosen, used = [], 0
        quota = int(max_new[b]) if isinstance(max_new, torch.Tensor) else max_new
        for c in cands:
            if len(chosen) == num_beams:
                break
            if banned is not None and c[3] in banned[b]:
                continue
            if new_leaves[c[3]]:
                if used == quota:
                    continue
                used += 1
            chosen.append(c)
        out.append([(-c[0], c[1], c[2], c[3]) for c in chosen])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_quota_last_step_equals_the_brute_force_quota_top_k(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [5, 7, 4]
    codes = torch.stack([torch.randint(0, s, (90,), generator=gen) for s in sizes], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = PrefixIndex.from_codes(codes, sizes)
    trie = index.trie
    level = trie.num_levels - 1
    batch, k_in, num_beams = 3, 4, 6
    depth_nodes = trie.row_ptr[level].numel() - 1
    nodes = torch.randint(0, depth_nodes, (batch, k_in), generator=gen)
    beam_scores = -torch.rand(batch, k_in, generator=gen).double() * 3
    beam_scores[0, 3] = float("-inf")  # a dead beam
    logits = torch.randn(batch * k_in, trie.vocab_size + 2, generator=gen).double()
    if seed % 2:
        logits = logits.round()  # many ties: the lowest (k, t) must win, as in the fused op
    new_leaves = torch.rand(index.num_leaves, generator=gen) < 0.4
    banned = [set(torch.randint(0, index.num_leaves, (8,), generator=gen).tolist()) for _ in range(batch)]
    ptr = torch.tensor([0] + np.cumsum([len(r) for r in banned]).tolist())
    node = torch.tensor([leaf for r in banned for leaf in sorted(r)], dtype=torch.long)
    cases = [(m, None) for m in (0, 1, 2, num_beams)] + [(torch.tensor([0, 2, 1]), None), (1, banned)]
    for max_new, bans in cases:
        extra = {"banned_ptr": ptr, "banned_node": node} if bans is not None else {}
        scores, parent, token, leaf = quota_last_step(logits, beam_scores, nodes, trie, num_beams, new_leaves,
                                                      max_new, **extra)
        expected = brute_force_quota(logits, beam_scores, nodes, trie, num_beams, new_leaves, max_new, bans)
        for b in range(batch):
            quota = int(max_new[b]) if isinstance(max_new, torch.Tensor) else max_new
            got = [(float(s), int(p), int(t), int(f)) for s, p, t, f in zip(scores[b], parent[b], token[b], leaf[b])
                   if s > float("-inf")]
            assert [g[1:] for g in got] == [e[1:] for e in expected[b]]
            assert np.allclose([g[0] for g in got], [e[0] for e in expected[b]])
            assert int(new_leaves[leaf[b][leaf[b] >= 0]].sum()) <= quota
        if isinstance(max_new, int) and max_new == num_beams:  # no quota left to bind: exactly the fused op's step
            ref = letter_ext.constrained_beam_step(logits, beam_scores, nodes, trie, level, num_beams,
                                                   backend="reference")
            assert torch.equal(leaf, ref[3]) and torch.equal(parent[scores > float("-inf")],
                                                              ref[1][scores > float("-inf")])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quota_last_step_refuses_nan_logits_of_a_live_beam_as_the_fused_step_does(bad):
    """NaN/+inf in a live beam's logits: a ValueError naming the row, as letter_ext.constrained_beam_step
    (not -inf slots ahead of live ones, a list silently short and no longer best first); a dead
    beam's logits are never read."""
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]])
    index = PrefixIndex.from_codes(codes, [2, 3])
    new_leaves = torch.zeros(index.num_leaves, dtype=torch.bool)
    new_leaves[4] = True
    logits = torch.randn(2, index.trie.vocab_size, generator=torch.Generator().manual_seed(0))
    logits[0, 2] = bad
    nodes = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match=r"of a live beam contains NaN or \+inf"):
        letter_ext.constrained_beam_step(logits, torch.tensor([[0.0, -1.0]]), nodes, index.trie, 1, 4)
    with pytest.raises(ValueError, match=r"logits row 0 \(batch row 0, beam 0\) of a live beam contains NaN or \+inf"):
        quota_last_step(logits, torch.tensor([[0.0, -1.0]]), nodes, index.trie, 4, new_leaves, 0)
    scores = quota_last_step(logits, torch.tensor([[float("-inf"), -1.0]]), nodes, index.trie, 4, new_leaves, 0)[0]
    assert torch.isfinite(scores[0, :2]).all() and (scores[0, 2:] == float("-inf")).all()  # beam 1's children only


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quota_last_step_refuses_nan_or_inf_beam_scores_as_the_fused_step_does(bad):
    """A NaN beam score used to pass as a dead beam and a +inf one as live; -inf stays a dead beam."""
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]])
    index = PrefixIndex.from_codes(codes, [2, 3])
    new_leaves = torch.zeros(index.num_leaves, dtype=torch.bool)
    logits = torch.randn(2, index.trie.vocab_size, generator=torch.Generator().manual_seed(0))
    nodes = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match=r"beam_scores contains NaN or \+inf"):
        letter_ext.constrained_beam_step(logits, torch.tensor([[bad, -1.0]]), nodes, index.trie, 1, 4)
    with pytest.raises(ValueError, match=r"beam_scores contains NaN or \+inf"):
        quota_last_step(logits, torch.tensor([[bad, -1.0]]), nodes, index.trie, 4, new_leaves, 0)
    scores = quota_last_step(logits, torch.tensor([[float("-inf"), -1.0]]), nodes, index.trie, 4, new_leaves, 0)[0]
    assert torch.isfinite(scores[0, :3]).all() and (scores[0, 3:] == float("-inf")).all()  # beam 1's 3 children only


def test_share_holds_on_every_list(chain, added):
    split, _, _, _ = chain
    run, _ = added
    warm = read_cold_split(split)["warm_items"]
    model, data, _ = load_run(run)
    index = PrefixIndex.from_codes(data.codes, data.layout.level_sizes, data.layout.offsets)
    enc, _ = data.eval_tensors("test")
    new = added_leaves(index, warm)
    free, _ = generate(model, index, enc, 20, 64, "cpu")
    most = int(new[free].sum(1).max())
    assert most >= 1  # without the control, added items do come out
    for max_new in sorted({0, most - 1}):
        leaves, scores = generate(model, index, enc, 20, 64, "cpu", new_leaves=new, max_new=max_new)
        assert (new[leaves].sum(1) <= max_new).all() and (leaves >= 0).all()
        assert (scores[:, :-1] >= scores[:, 1:]).all()  # still best first
        assert not torch.equal(leaves, free)  # the quota bound somewhere
        # lists that were within the quota are unchanged: the control never reorders them
        within = new[free].sum(1) <= max_new
        assert torch.equal(leaves[within], free[within])
    result = run_cli("recommend", "--model", run, "--history", "1,2,3", "-k", 10, "--max-new-share", 0.2)
    ids = [int(line.split()[1]) for line in result.output.strip().splitlines()]
    assert len(ids) == 10 and sum(i >= warm for i in ids) <= 2
    top = recommend(run, ["1", "2", "3"], k=10, max_new_share=0.0)
    assert all(int(r["item_id"]) < warm for r in top)


def test_evaluate_cold_report(chain, added, tmp_path):
    split, _, _, emb = chain
    run, _ = added
    record = read_cold_split(split)
    out = tmp_path / "cold.json"
    result = run_cli("evaluate", "--model", run, "--cold", "--text-emb", emb, "--max-new-share", 0.1, "--out", out)
    assert "| content KNN | cold-target |" in result.output
    report = json.loads(out.read_text())
    assert report["users"]["cold"] == record["users"]["cold_target"]
    assert report["users"]["warm"] == record["users"]["warm_target"]
    rows = {row["method"]: row for row in report["rows"]}
    before = rows["recommender, training index (before adding)"]
    assert before["index_version"] == 0 and before["cold"]["recall@10"] == 0.0
    assert rows["recommender + added items"]["index_version"] == 1
    assert rows["popularity"]["cold"]["recall@10"] == 0.0  # cold items never occur in training
    assert rows["content KNN"]["cold"]["recall@10"] > 0  # the embeddings group items by category
    assert set(rows) >= {"recommender + added items, share <= 0.1", "content KNN", "popularity"}
    # the before-adding warm metrics are those of an evaluation with the training index
    plain = evaluate(run, index_version=0)
    n = report["users"]
    mixed = (before["warm"]["recall@10"] * n["warm"] + before["cold"]["recall@10"] * n["cold"]) / n["all"]
    assert mixed == pytest.approx(plain["metrics"]["recall@10"])
    result = run_cli("evaluate", "--model", run, "--cold", "--split", "valid", ok=False)
    assert result.exit_code != 0 and "--cold" in result.output


# ---------------------------------------------------------------------------------- serve

def _post(url: str, path: str, payload: dict) -> tuple[int, dict]:
    import http.client
    from urllib.parse import urlparse

    where = urlparse(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture
def served_copy(chain, tmp_path):
    """(a copy of the trained run to serve, its warm item count); skips without the serve extra."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    split, _, rec, _ = chain
    run = str(tmp_path / "rec")
    shutil.copytree(rec, run)
    return run, read_cold_split(split)["warm_items"]


def test_serve_adds_items_without_retraining(chain, served_copy):
    from letter.serve.process import get_json, running_server

    _, tok, _, emb = chain
    run, warm = served_copy
    rows = np.load(emb)[warm:].tolist()
    history = {"history": ["1", "2", "3"], "k": 20, "exclude_history": False}
    with running_server(run, threads=1) as url:  # without --tokenizer: no adding
        status, body = _post(url, "/items", {"embeddings": rows})
        assert status == 422 and "--tokenizer" in body["error"]
    with running_server(run, "--tokenizer", tok, "--max-new-share", "0.1", threads=1) as url:
        status, body = _post(url, "/recommend", history)
        assert status == 200 and all(int(i["item_id"]) < warm for i in body["items"])
        status, body = _post(url, "/items", {"embeddings": [r[:-1] for r in rows]})
        assert status == 422 and body["field"] == "embeddings"  # wrong dimension: one line, nothing written
        for wrong in (True, "0.5"):  # JSON true or text is no number (as k's true is no 1): refused, not coded
            status, body = _post(url, "/items", {"embeddings": [[wrong] * len(r) for r in rows]})
            assert status == 422 and body["field"] == "embeddings[0][0]", body
        assert index_versions(run) == [0]
        status, body = _post(url, "/items", {"embeddings": rows})
        assert status == 200 and body["version"] == 1 and body["added"] == len(rows)
        assert get_json(url + "/metadata")[1]["index"]["index_version"] == 1
        status, body = _post(url, "/recommend", history)
        added = [int(i["item_id"]) >= warm for i in body["items"]]
        assert status == 200 and sum(added) <= 2  # floor(0.1 * 20) under the share control
        status, again = _post(url, "/items", {"embeddings": rows})
        assert status == 200 and again["added"] == 0 and again["version"] == 1
        cold_history = {"history": [str(warm)], "k": 5}
        assert _post(url, "/recommend", cold_history)[0] == 200  # an added item may now be a history item
    assert index_versions(run) == [0, 1]
    with running_server(run, "--index-version", "0", threads=1) as url:
        status, body = _post(url, "/recommend", {"history": [str(warm)], "k": 5})
        assert status == 422 and body["field"] == "history" and "no identifier" in body["error"]


def test_serve_items_serves_a_version_another_add_wrote(chain, served_copy):
    """`letter add-items` ran while the server was up: POST /items then adds nothing, and the
    version it answers must be the one served, or the added items can never be served."""
    from letter.serve.process import get_json, running_server

    _, tok, _, emb = chain
    run, warm = served_copy
    with running_server(run, "--tokenizer", tok, threads=1) as url:
        assert add_items(run, tok, emb)["version"] == 1  # another process adds meanwhile
        status, body = _post(url, "/items", {"embeddings": np.load(emb)[warm:].tolist()})
        assert status == 200 and body["added"] == 0 and body["version"] == 1
        assert get_json(url + "/metadata")[1]["index"]["index_version"] == 1
        assert _post(url, "/recommend", {"history": [str(warm)], "k": 5})[0] == 200


def test_recommend_histories_names_the_line_of_an_item_without_identifier(chain, tmp_path):
    """--histories / --users: a history item the index version lacks is named with its line, as
    an unknown item is (one of thousands of lines is otherwise impossible to find)."""
    split, _, rec, _ = chain
    warm = read_cold_split(split)["warm_items"]
    histories = tmp_path / "histories.txt"
    histories.write_text(f"1,2\n3,{warm}\n")
    result = run_cli("recommend", "--model", rec, "--histories", histories, "--out", tmp_path / "out.jsonl", ok=False)
    assert result.exit_code != 0 and not (tmp_path / "out.jsonl").exists()
    assert '{"line": 2}' in result.output and "no identifier" in result.output, result.output


# ------------------------------------------------------------------ a catalog that grew by appending


def _grown(split: str, emb: str, folder, new_ids: list[str], reorder: bool = False) -> tuple[str, str]:
    """A copy of the split folder with items `new_ids` appended to its item file (no interactions),
    and [N + len(new_ids), d] embeddings (the new rows: the first cold rows plus a shift). reorder:
    also swap the first two history items of the first user (other interactions: other data)."""
    shutil.copytree(split, folder)
    items_path, inter_path = os.path.join(folder, "Synth.item.json"), os.path.join(folder, "Synth.inter.json")
    with open(items_path) as f:
        items = json.load(f)
    for i, item in enumerate(new_ids):
        items[item] = {**items["0"], "title": f"new item {i}"}
    with open(items_path, "w") as f:
        json.dump(items, f)
    if reorder:
        with open(inter_path) as f:
            inter = json.load(f)
        first = next(iter(inter))
        inter[first][:2] = inter[first][1::-1]
        with open(inter_path, "w") as f:
            json.dump(inter, f)
    rows = np.load(emb)
    grown_emb = os.path.join(folder, "grown-emb.npy")
    np.save(grown_emb, np.concatenate([rows, rows[-len(new_ids):] + 0.5]).astype(np.float32))
    return str(folder), grown_emb


def test_items_appended_to_the_catalog_are_added_served_and_decoded(chain, tmp_path):
    """The dataset grew by appending items: add-items gives identifiers to the cold items and the
    new ones (no --allow-other-data), every reader takes the grown catalog, the version 0 stays as it
    was, and the catalog as it was before it grew no longer fits the newest version."""
    split, tok, rec, emb = chain
    warm = read_cold_split(split)["warm_items"]
    run = str(tmp_path / "rec")
    shutil.copytree(rec, run)
    new = ["9001", "9002", "9003"]
    grown, grown_emb = _grown(split, emb, tmp_path / "grown", new)
    record = add_items(run, tok, grown_emb, data=grown)
    assert record["version"] == 1 and record["indexed_items"] == NUM_ITEMS + 3
    assert record["items"] == [str(i) for i in range(warm, NUM_ITEMS)] + new
    codes, version, _ = load_index_codes(run)
    training = np.load(os.path.join(rec, "codes.npy"))
    assert version == 1 and np.array_equal(codes[:warm], training) and len(codes) == NUM_ITEMS + 3
    assert np.array_equal(load_index_codes(run, 0)[0], training)
    assert len({tuple(c) for c in codes.tolist()}) == NUM_ITEMS + 3  # --unique

    from letter.rec import Query, RunRecommender

    served = RunRecommender(run, data=grown, beams=NUM_ITEMS + 3)  # every identifier fits the beam
    assert served.metadata()["index"]["index_version"] == 1 and served.num_items == NUM_ITEMS + 3
    with torch.no_grad():
        listed = served.recommend([Query(tuple(served.positions(["1", "2"])), NUM_ITEMS + 3)])[0]
    by_id = {i["item_id"]: i for i in listed}
    assert set(new) <= set(by_id)  # an exhaustive search decodes every added item...
    for i, item in enumerate(new):  # ...to the identifier the add gave it
        assert by_id[item]["code"] == codes[NUM_ITEMS + i].tolist()
    result = run_cli("recommend", "--model", run, "--data", grown, "--history", "9001,1", "-k", 5)
    assert len(result.output.strip().splitlines()) >= 5
    before = evaluate(rec)
    assert evaluate(run, data=grown, index_version=0)["metrics"] == before["metrics"]  # same users, same codes

    with pytest.raises(LetterError, match=r"index version 1 of .* gave identifiers to items up to 123.*version 0"):
        RunRecommender(run)  # the run's recorded dataset: the catalog before it grew
    assert RunRecommender(run, index_version=0).metadata()["index"]["index_version"] == 0
    again = add_items(run, tok, grown_emb, data=grown)
    assert again["added"] == 0 and index_versions(run) == [0, 1]


def test_adding_from_other_data_is_refused_and_the_versions_stay(chain, tmp_path):
    """Other interactions (even with --allow-other-data), or a catalog that grew differently from
    the one an add used: refused with a line that says why; the versions on disk are unchanged."""
    from letter.rec import RunRecommender

    split, tok, rec, emb = chain
    run = str(tmp_path / "rec")
    shutil.copytree(rec, run)
    other, other_emb = _grown(split, emb, tmp_path / "other", ["9001"], reorder=True)
    with pytest.raises(LetterError, match="not the dataset .* grown by appending items"):
        add_items(run, tok, other_emb, data=other)
    served = RunRecommender(run, data=other, allow_other_data=True)  # served as other data ...
    with pytest.raises(LetterError, match="can be served but not added to"):  # ... not added to
        served.add_items(tok, other_emb)
    result = run_cli("add-items", "--model", run, "--tokenizer", tok, "--embeddings", other_emb, "--data", other,
                     ok=False)
    assert result.exit_code == 1 and "grown by appending items" in result.output and "Traceback" not in result.output
    assert index_versions(run) == [0]

    grown, grown_emb = _grown(split, emb, tmp_path / "grown", ["9001", "9002"])
    assert add_items(run, tok, grown_emb, data=grown)["version"] == 1
    codes = load_index_codes(run)[0]
    elsewhere, elsewhere_emb = _grown(split, emb, tmp_path / "elsewhere", ["9001", "9005"])
    with pytest.raises(LetterError, match=r"item 121 is '9005', but index version 1 .* item '9002' \(the catalog grew"):
        add_items(run, tok, elsewhere_emb, data=elsewhere)
    with pytest.raises(LetterError, match="grew differently"):
        RunRecommender(run, data=elsewhere)
    assert index_versions(run) == [0, 1] and np.array_equal(load_index_codes(run)[0], codes)


def test_evaluating_other_data_with_unindexed_items_in_histories_is_one_line(chain, tmp_path):
    """--allow-other-data with a catalog whose appended item is in a history: evaluate (and
    evaluate --cold) refuse it naming the item and the index version, instead of an IndexError
    traceback while encoding the histories (the model cannot read an item without identifier)."""
    split, tok, rec, emb = chain
    other, _ = _grown(split, emb, tmp_path / "other", ["9001"])
    inter_path = os.path.join(other, "Synth.inter.json")
    with open(inter_path) as f:
        inter = json.load(f)
    first = next(iter(inter))
    inter[first].insert(1, "9001")
    with open(inter_path, "w") as f:
        json.dump(inter, f)
    with pytest.raises(LetterError, match="item 9001 is in a history to evaluate but has no identifier in index "
                                          "version 0"):
        evaluate(rec, data=other, allow_other_data=True)
    for extra in ([], ["--cold"]):
        result = run_cli("evaluate", "--model", rec, "--data", other, "--allow-other-data", *extra, ok=False)
        assert result.exit_code == 1 and "item 9001" in result.output, result.output
        assert not isinstance(result.exception, IndexError) and "Traceback" not in result.output


def test_evaluate_cold_refuses_a_newest_version_the_catalog_does_not_hold(chain, tmp_path):
    """evaluate --cold reads version 0 and the newest one: the newest, added from the grown catalog,
    is refused with the catalog before it grew (as evaluate/recommend/serve refuse it), naming
    the version, instead of searching identifiers of items the catalog does not have."""
    split, tok, rec, emb = chain
    run = str(tmp_path / "rec")
    shutil.copytree(rec, run)
    grown, grown_emb = _grown(split, emb, tmp_path / "grown", ["9001", "9002"])
    add_items(run, tok, grown_emb, data=grown)
    with pytest.raises(LetterError, match=r"index version 1 of .* gave identifiers to items up to 122"):
        evaluate(run)
    result = run_cli("evaluate", "--model", run, "--cold", ok=False)
    assert result.exit_code == 1 and "index version 1" in result.output and "up to 122" in result.output, \
        result.output
    report = run_cli("evaluate", "--model", run, "--cold", "--data", grown, "--out", tmp_path / "cold.json")
    rows = json.loads((tmp_path / "cold.json").read_text())["rows"]
    assert [r["indexed_items"] for r in rows if "indexed_items" in r] == [read_cold_split(split)["warm_items"], NUM_ITEMS + 2], report.output


@pytest.mark.parametrize("damage", ["no items", "items not a list", "no indexed_items"])
def test_a_corrupt_index_version_record_is_one_line(chain, added, damage):
    """A version.json missing the fields the version check reads (hand-edited, truncated): every
    reader names the file as corrupt in one line, instead of a KeyError traceback."""
    run, _ = added
    path = os.path.join(run, "index-versions", "v1", "version.json")
    with open(path) as f:
        record = json.load(f)
    if damage == "no items":
        del record["items"]
    elif damage == "items not a list":
        record["items"] = 5
    else:
        del record["indexed_items"]
    with open(path, "w") as f:
        json.dump(record, f)
    with pytest.raises(LetterError, match="corrupt index version record"):
        evaluate(run)
    result = run_cli("recommend", "--model", run, "--history", "1,2", ok=False)
    assert result.exit_code == 1 and "corrupt index version record" in result.output, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (KeyError, TypeError))


def test_an_allow_other_data_server_adds_the_items_of_a_grown_catalog(chain, served_copy, tmp_path):
    """`letter serve --allow-other-data --tokenizer`: POST /items adds to a catalog that grew by
    appending (served, decodable), and answers other data (other interactions) with a 422 that
    says why, its versions and its answers unchanged."""
    from letter.serve.process import get_json, running_server

    split, tok, _, emb = chain
    run, warm = served_copy
    grown, grown_emb = _grown(split, emb, tmp_path / "grown", ["9001", "9002"])
    other, other_emb = _grown(split, emb, tmp_path / "other", ["9001"], reorder=True)
    with running_server(run, "--data", other, "--allow-other-data", "--tokenizer", tok, threads=1) as url:
        status, body = _post(url, "/items", {"embeddings": np.load(other_emb)[warm:].tolist()})
        assert status == 422 and body["field"] == "embeddings" and "can be served but not added to" in body["error"]
        assert _post(url, "/recommend", {"history": ["1", "2"], "k": 5})[0] == 200
    assert index_versions(run) == [0]
    with running_server(run, "--data", grown, "--allow-other-data", "--tokenizer", tok, threads=1) as url:
        status, body = _post(url, "/items", {"embeddings": np.load(grown_emb)[warm:].tolist()})
        assert status == 200 and body["version"] == 1 and body["items"][-2:] == ["9001", "9002"], body
        meta = get_json(url + "/metadata")[1]
        assert meta["items"] == NUM_ITEMS + 2 and meta["index"]["index_version"] == 1
        status, body = _post(url, "/recommend", {"history": ["9002", "9001"], "k": 5})
        assert status == 200 and len(body["items"]) >= 5
    codes = load_index_codes(run)[0]
    assert index_versions(run) == [0, 1] and len(codes) == NUM_ITEMS + 2
    with running_server(run, "--data", grown, "--beams", str(NUM_ITEMS + 2), threads=1) as url:  # no flag needed
        status, body = _post(url, "/recommend", {"history": ["1", "2"], "k": NUM_ITEMS + 2})
    listed = {i["item_id"]: i["code"] for i in body["items"]}
    assert status == 200 and [listed["9001"], listed["9002"]] == codes[NUM_ITEMS:].tolist()


def test_evaluate_cold_ranks_a_grown_catalog_with_the_cf_baseline_of_its_training_items(chain, source, tmp_path):
    """evaluate --cold --cf on the catalog grown by appending items (taken by every other reader):
    the SASRec baseline, trained on the split before it grew, ranks the items it was trained on (the
    appended ones have no CF vector, no interactions, and are never a target), so its row is the
    one on the split itself; a train-cf run on other interactions is still refused."""
    split, _, rec, emb = chain
    cf = tmp_path / "cf"
    run_cli("train-cf", split, "--dim", 8, "--blocks", 1, "--max-len", 5, "--epochs", 1, "--out", cf)
    grown, _ = _grown(split, emb, tmp_path / "grown", ["9001", "9002"])
    rows = {}
    for data in (split, grown):
        out = tmp_path / f"cold-{os.path.basename(data)}.json"
        run_cli("evaluate", "--model", rec, "--cold", "--data", data, "--cf", cf, "--out", out)
        rows[data] = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows[grown]["SASRec"] == rows[split]["SASRec"]
    other_cf = tmp_path / "other-cf"  # on the dataset before the split: other interactions
    run_cli("train-cf", source[0], "--dim", 8, "--blocks", 1, "--max-len", 5, "--epochs", 1, "--out", other_cf)
    result = run_cli("evaluate", "--model", rec, "--cold", "--data", grown, "--cf", other_cf, ok=False)
    assert result.exit_code == 1 and "trained on other data" in result.output and "Traceback" not in result.output


def test_other_data_never_swaps_a_whole_catalog_for_its_cold_split(chain, source, tmp_path):
    """--allow-other-data serves other interactions of the run's items, never another numbering of
    them: a cold split renumbers the catalog (warm items first), so a run trained on the whole
    catalog is refused its cold split, and a run trained on the split the whole catalog (serve,
    evaluate, recommend), where each identifier would go to another item."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from letter.rec import RunRecommender

    split, _, split_run, _ = chain
    folder, emb_path, _, _ = source
    whole = tmp_path / "whole"  # the tokenizer and recommender of the whole catalog
    run_cli("train-tokenizer", "--data", folder, "--text-emb", emb_path, "--method", "rqkmeans", "--levels", 2,
            "--codebook-size", 16, "--unique", "--out", whole / "tok")
    config = tmp_path / "rec.json"
    config.write_text(json.dumps(REC))
    run_cli("train-rec", "--data", folder, "--index", whole / "tok", "--out", whole / "rec", "--config", config)
    for run, data, why in ((str(whole / "rec"), split, "the run's training index covers 120 items"),
                           (split_run, folder, "the run was trained on the cold split")):
        with pytest.raises(LetterError, match=why):
            RunRecommender(run, data=data, allow_other_data=True)
        for command in (["serve", "--port", 0], ["evaluate"], ["recommend", "--history", "1"]):
            result = run_cli(command[0], "--model", run, "--data", data, "--allow-other-data", *command[1:], ok=False)
            assert result.exit_code == 1 and why in result.output and "Traceback" not in result.output, result.output


def test_cold_content_knn_excludes_the_whole_history_as_exclude_history_does(chain, tmp_path):
    """evaluate --cold's content KNN rules out every item the user had before the target (the whole
    history, as `evaluate --exclude-history` and the masked SASRec do), not only the max_history
    items of the window its user vector is the mean of: its row equals a brute force doing so."""
    split, _, rec, emb = chain
    out = tmp_path / "cold.json"
    run_cli("evaluate", "--model", rec, "--cold", "--text-emb", emb, "--out", out)
    row = {r["method"]: r for r in json.loads(out.read_text())["rows"]}["content KNN"]
    dataset = load_dataset(split)
    samples = leave_one_out(dataset, REC["max_history"])
    vectors = np.load(emb).astype(np.float64)
    items = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def recall_ndcg_at_10(excluded):
        recall = ndcg = 0.0
        for (window, target), user in zip(samples.test, samples.eval_users):
            scores = items @ vectors[window].mean(0)
            scores[excluded(window, user)] = -np.inf
            top = np.argsort(-scores, kind="stable")[:10].tolist()
            if target in top:
                recall, ndcg = recall + 1, ndcg + 1 / np.log2(top.index(target) + 2)
        return recall / len(samples.test), ndcg / len(samples.test)

    whole = recall_ndcg_at_10(lambda window, user: dataset.sequences[user][:-1])
    assert whole != recall_ndcg_at_10(lambda window, user: window)  # this data tells the two apart
    assert (row["all"]["recall@10"], row["all"]["ndcg@10"]) == pytest.approx(whole)


def test_the_default_body_limit_reads_the_tokenizer_width_without_loading_it(chain, monkeypatch):
    """A server started with --tokenizer sizes its default body limit by the tokenizer's input
    width, read from the run's model.pt record (memory-mapped) instead of loading the tokenizer."""
    pytest.importorskip("fastapi")
    from letter.rec import RunRecommender
    from letter.serve.app import create_app, default_max_body_bytes
    from letter.tokenizer import load_tokenizer
    from letter.tokenizer.inference import tokenizer_input_dim

    _, tok, rec, _ = chain
    run = RunRecommender(rec)
    width = load_tokenizer(tok).model.in_dim
    expected = default_max_body_bytes(run, 8, tok)

    def no_load(run_dir):
        raise AssertionError(f"the tokenizer {run_dir} was loaded")

    monkeypatch.setattr("letter.tokenizer.load_tokenizer", no_load)
    monkeypatch.setattr("letter.tokenizer.inference.load_tokenizer", no_load)
    assert tokenizer_input_dim(tok) == width
    assert create_app(run, queue_size=8, tokenizer=tok).state.max_body_bytes == expected
