"""Data layer: readers, leave-one-out split, index files, synthetic data, ranking metrics."""
import gzip
import json
import os
import re

import numpy as np
import pytest
import torch

from letter.data import (
    Dataset,
    leave_one_out,
    load_dataset,
    make_synthetic,
    read_index_json,
    write_index_json,
    write_letter,
)
from letter.errors import DataError, SettingError
from letter.metrics import hits_from_topk, metrics_from_hits, ranking_metrics, standard_errors


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------- split


def test_leave_one_out_matches_paper_code():
    ds = Dataset("t", ["u0", "u1", "u2"], [[0, 1, 2, 3, 4], [5, 6, 7], [1, 2]], [str(i) for i in range(8)])
    with pytest.warns(UserWarning, match="1 user"):
        split = leave_one_out(ds, max_history=2)
    assert split.train == [([0], 1), ([0, 1], 2)]  # prefixes of items[:-2]; u1 has one item there
    assert split.valid == [([1, 2], 3), ([5], 6)]
    assert split.test == [([2, 3], 4), ([5, 6], 7)]
    assert split.eval_users == [0, 1]
    hist, tgt = split.tensors("test", pad=-1)
    assert hist.tolist() == [[2, 3], [5, 6]] and tgt.tolist() == [4, 7]
    hist, _ = split.tensors("valid", pad=-1)
    assert hist.tolist() == [[1, 2], [-1, 5]]  # left padded: last column = most recent


def test_leave_one_out_default_history_20():
    ds = Dataset("t", ["u"], [list(range(30))], [str(i) for i in range(30)])
    split = leave_one_out(ds)
    assert split.test == [(list(range(9, 29)), 29)]
    assert split.train[-1] == (list(range(7, 27)), 27)
    assert len(split.train) == 27


@pytest.mark.parametrize("max_history", [0, -3])
def test_leave_one_out_refuses_a_history_window_below_one(max_history):
    """A library error the CLI shows as one line (it was a plain ValueError)."""
    ds = Dataset("t", ["u"], [list(range(6))], [str(i) for i in range(6)])
    with pytest.raises(SettingError, match=f"^max_history must be >= 1, got {max_history}$"):
        leave_one_out(ds, max_history=max_history)


# ---------------------------------------------------------------- LETTER folder


def test_letter_folder_roundtrip_and_id_order(tmp_path):
    _write(tmp_path / "Toy.inter.json", json.dumps({"a": [10, 2, 3], "b": [3, 10, 2, 5]}))
    ds = load_dataset(str(tmp_path))
    assert ds.name == "Toy" and ds.item_text is None
    assert ds.item_ids == ["2", "3", "5", "10"]  # numeric order
    assert ds.sequences == [[3, 0, 1], [1, 3, 0, 2]]
    out = tmp_path / "out"
    write_letter(ds, str(out))
    again = load_dataset(str(out / "Toy.inter.json"))
    assert again.sequences == ds.sequences


def test_item_order_is_the_same_in_every_process(tmp_path):
    """Ids of equal value ("007" and "7") still have one order, not the order of a set of strings
    (which changes with the process's hash seed); ids that only look numeric to str.isdigit ("--5")
    sort as text instead of raising."""
    import subprocess
    import sys

    _write(tmp_path / "Z.inter.json", json.dumps({"u": ["007", "7", "1", "07"], "v": ["7", "1"]}))
    code = f"from letter.data import load_dataset; print(load_dataset({str(tmp_path)!r}).item_ids)"
    orders = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                             capture_output=True, text=True, check=True).stdout for seed in range(4)}
    assert orders == {"['1', '007', '07', '7']\n"}
    _write(tmp_path / "Z.inter.json", json.dumps({"u": ["--5", "1", "-2"]}))
    assert load_dataset(str(tmp_path)).item_ids == ["--5", "-2", "1"]


def test_letter_format_needs_an_inter_json_file(tmp_path):
    """--format letter on a file not named <Name>.inter.json is refused: its name was cut from the
    file name by the suffix's length ("interactions_of_x.json" -> dataset "interaction")."""
    _write(tmp_path / "interactions_of_x.json", json.dumps({"u": [1, 2, 3]}))
    with pytest.raises(DataError, match=r"interactions_of_x.json: not a <Name>.inter.json file"):
        load_dataset(str(tmp_path / "interactions_of_x.json"), format="letter")


def test_a_failed_item_text_write_leaves_no_dataset(tmp_path, monkeypatch):
    """write_letter writes <Name>.inter.json, which makes the folder a dataset, after the item text:
    a failed item.json write (disk full) left a dataset without text that every stage read."""
    import letter.data.readers as readers

    def full_disk(path, obj, indent=2):
        if path.endswith(".item.json"):
            raise OSError(28, "No space left on device", path)
        real_write_json(path, obj, indent)

    real_write_json = readers.write_json
    monkeypatch.setattr(readers, "write_json", full_disk)
    with pytest.raises(OSError):
        write_letter(make_synthetic(num_users=5, num_items=8, num_categories=2), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_write_interrupted_before_the_interactions_is_an_unfinished_output(tmp_path):
    """A crash between write_letter's two files leaves the item text only: a rerun must call that an
    unfinished output (the interactions file is the one written last), not a finished dataset."""
    from click.testing import CliRunner

    from letter.cli.main import main

    write_letter(make_synthetic(num_users=5, num_items=8, num_categories=2), str(tmp_path))
    os.remove(tmp_path / "Synth.inter.json")
    result = CliRunner().invoke(main, ["data", "synth", str(tmp_path), "--items", "8", "--users", "5",
                                       "--categories", "2"])
    assert result.exit_code == 1
    assert "Synth.item.json: an unfinished (or another tool's) dataset output is already there" in result.output
    again = CliRunner().invoke(main, ["data", "synth", str(tmp_path), "--items", "8", "--users", "5",
                                      "--categories", "2", "--overwrite"])
    assert again.exit_code == 0 and sorted(os.listdir(tmp_path)) == ["Synth.inter.json", "Synth.item.json"]


def test_letter_folder_with_item_text(tmp_path):
    _write(tmp_path / "T.inter.json", json.dumps({"u": ["x", "y", "x"]}))
    _write(tmp_path / "T.item.json", json.dumps({"y": {"title": "Y"}, "x": {"title": "X"}, "z": {"title": "Z"}}))
    ds = load_dataset(str(tmp_path))
    assert ds.item_ids == ["x", "y", "z"] and [t["title"] for t in ds.item_text] == ["X", "Y", "Z"]
    assert ds.sequences == [[0, 1, 0]]


@pytest.mark.parametrize(
    "inter, item, match",
    [
        ('{"u": [1, 2], "u": [3]}', None, "duplicate key 'u'"),
        ('{"u": [1, 2', None, "malformed json"),
        ('{"u": []}', None, "key 'u': expected a non-empty list"),
        ('{"u": [1, 2.5]}', None, "item id 2.5"),
        ('{"u": [1, 2]}', '{"1": {"title": "a"}}', "user 'u' has item '2' that is missing"),
    ],
)
def test_letter_folder_errors_name_file_and_key(tmp_path, inter, item, match):
    _write(tmp_path / "B.inter.json", inter)
    if item:
        _write(tmp_path / "B.item.json", item)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(str(tmp_path))
    assert "B." in str(e.value)


def test_unknown_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "missing"))
    (tmp_path / "x.csv").write_text("")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_dataset(str(tmp_path / "x.csv"))


# ---------------------------------------------------------------- P5


def test_p5_reader(tmp_path):
    folder = tmp_path / "beauty"
    folder.mkdir()
    _write(folder / "sequential_data.txt", "1 1 2 3\n2 3 4 1 2\n\n")
    ds = load_dataset(str(folder))
    assert ds.name == "beauty" and ds.user_ids == ["1", "2"]
    assert ds.item_ids == ["1", "2", "3", "4"] and ds.sequences == [[0, 1, 2], [2, 3, 0, 1]]
    _write(folder / "sequential_data.txt", "1 1 2\n2 3 x\n")
    with pytest.raises(DataError, match="line 2: id 'x'"):
        load_dataset(str(folder))
    _write(folder / "sequential_data.txt", "1 1 2\n2 3 \u00b2\n")  # str.isdigit, but not an integer
    with pytest.raises(DataError, match="line 2: id '\u00b2' is not a positive integer"):
        load_dataset(str(folder))
    _write(folder / "sequential_data.txt", "1 1 2\n1 3 4\n")
    with pytest.raises(DataError, match="duplicate user '1'"):
        load_dataset(str(folder))


def test_p5_and_amazon_files_with_a_byte_order_mark(tmp_path):
    """UTF-8 with a byte order mark (Windows editors) reads as the JSON files do; the first id
    ('\ufeff1') or the first record was refused."""
    (tmp_path / "p5").mkdir()
    (tmp_path / "p5" / "sequential_data.txt").write_bytes(b"\xef\xbb\xbf1 1 2 3\n2 3 4 1\n")
    assert load_dataset(str(tmp_path / "p5")).user_ids == ["1", "2"]
    records = [{"reviewerID": u, "asin": i, "unixReviewTime": 1} for u in "AB" for i in ("x", "y")]
    text = "\ufeff" + "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "Toys.json").write_bytes(text.encode())
    with gzip.open(tmp_path / "Toys.json.gz", "wb") as f:
        f.write(text.encode())
    for name in ("Toys.json", "Toys.json.gz"):
        assert load_dataset(str(tmp_path / name), k=2).user_ids == ["A", "B"]


# ---------------------------------------------------------------- raw Amazon


def _gz_lines(path, records, literal=False):
    with gzip.open(path, "wt") as f:
        for r in records:
            f.write((repr(r) if literal else json.dumps(r)) + "\n")


def test_amazon_reader_kcore_time_order_and_text(tmp_path):
    reviews = []
    # users A, B, C each review items i1..i3 at decreasing times (so time order reverses file order);
    # D reviews only i4 (dropped by the 2-core), A repeats i1 (kept once)
    for u in "ABC":
        for t, item in enumerate(["i3", "i2", "i1"]):
            reviews.append({"reviewerID": u, "asin": item, "unixReviewTime": 100 - t})
    reviews.append({"reviewerID": "A", "asin": "i1", "unixReviewTime": 500})
    reviews.append({"reviewerID": "D", "asin": "i4", "unixReviewTime": 1})
    _gz_lines(tmp_path / "Toys_5.json.gz", reviews)
    meta = [
        {"asin": "i1", "title": "One &amp; <b>only</b>", "description": ["first", "line"], "category": ["Toys", "Cars"]},
        {"asin": "i2", "title": "Two", "categories": [["Toys", "Dolls"]], "brand": "Acme"},
        {"asin": "i4", "title": "Four"},
    ]
    _gz_lines(tmp_path / "meta_Toys.json.gz", meta, literal=True)  # 2014 dumps are Python literals
    with pytest.warns(UserWarning, match="1 item"):  # i3 has no meta record
        ds = load_dataset(str(tmp_path), k=2)
    assert ds.name == "Toys" and ds.user_ids == ["A", "B", "C"]
    assert ds.item_ids == ["i1", "i2", "i3"]
    assert ds.sequences == [[0, 1, 2]] * 3  # i1 (t=98), i2 (99), i3 (100)
    assert ds.item_text[0] == {"title": "One & only", "description": "first line", "brand": "", "categories": "Toys,Cars"}
    assert ds.item_text[1]["categories"] == "Toys,Dolls" and ds.item_text[1]["brand"] == "Acme"
    assert ds.item_text[2]["title"] == ""


def test_amazon_reader_errors(tmp_path):
    _gz_lines(tmp_path / "r.json.gz", [{"reviewerID": "A", "asin": "x"}])
    with pytest.raises(DataError, match="r.json.gz: line 1: needs reviewerID"):
        load_dataset(str(tmp_path / "r.json.gz"))
    _gz_lines(tmp_path / "r.json.gz", [{"reviewerID": "A", "asin": "x", "unixReviewTime": 1}])
    with pytest.raises(DataError, match="no user is left after 5-core"):
        load_dataset(str(tmp_path / "r.json.gz"))


@pytest.mark.parametrize("key,value", [("reviewerID", None), ("reviewerID", ""), ("asin", None), ("asin", [1])])
def test_amazon_reader_refuses_a_null_or_empty_id(tmp_path, key, value):
    """Refused as a line without the key is (a null reviewerID became the user "None")."""
    good = {"reviewerID": "A", "asin": "x", "unixReviewTime": 1}
    _gz_lines(tmp_path / "r.json.gz", [good, {**good, key: value}])
    message = f"{tmp_path}/r.json.gz: line 2: {key} {value!r} is not an integer or non-empty string"
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        load_dataset(str(tmp_path / "r.json.gz"), k=1)


def test_amazon_meta_with_one_category_as_a_string_or_number(tmp_path):
    # some dumps give a single category as a string (not split into letters) or a number (no crash)
    reviews = [{"reviewerID": u, "asin": i, "unixReviewTime": 1} for u in "AB" for i in ("i1", "i2")]
    _gz_lines(tmp_path / "Toys_5.json.gz", reviews)
    meta = [{"asin": "i1", "category": "Toys &amp; Games"}, {"asin": "i2", "categories": 7}]
    _gz_lines(tmp_path / "meta_Toys.json.gz", meta)
    ds = load_dataset(str(tmp_path), k=1)
    assert [t["categories"] for t in ds.item_text] == ["Toys & Games", "7"]


# ---------------------------------------------------------------- index files


def test_index_json_roundtrip_and_errors(tmp_path):
    codes = np.array([[3, 0, 255], [1, 2, 7]])
    path = str(tmp_path / "X.index.json")
    write_index_json(path, codes)
    assert json.load(open(path))["1"] == ["<a_1>", "<b_2>", "<c_7>"]
    out = read_index_json(path, num_items=2)
    assert out.dtype == np.int64 and (out == codes).all()
    with pytest.raises(DataError, match="missing item id"):
        read_index_json(path, num_items=3)
    _write(tmp_path / "bad.json", json.dumps({"0": ["<a_1>", "<c_2>"]}))
    with pytest.raises(DataError, match="key '0': token '<c_2>' at level 1"):
        read_index_json(str(tmp_path / "bad.json"))
    _write(tmp_path / "bad.json", json.dumps({"0": ["<a_1>"], "1": ["<a_1>", "<b_1>"]}))
    with pytest.raises(DataError, match="key '1' has 2 tokens"):
        read_index_json(str(tmp_path / "bad.json"))
    # a key is an id written as the writer writes it: "01" would silently replace item 1's codes,
    # a non-ASCII digit is no id either
    for key in ("01", "\u00b2", "\u0661"):
        _write(tmp_path / "bad.json", json.dumps({"0": ["<a_1>"], "1": ["<a_2>"], key: ["<a_3>"]}))
        with pytest.raises(DataError, match="is not a non-negative integer item id"):
            read_index_json(str(tmp_path / "bad.json"))
    _write(tmp_path / "bad.json", json.dumps({"0": [f"<{chr(97 + i)}_0>" for i in range(26)] + ["<a_0>"]}))  # past level z
    with pytest.raises(DataError, match="27 tokens, at most 26"):
        read_index_json(str(tmp_path / "bad.json"))
    # a code past int64 was an OverflowError traceback
    _write(tmp_path / "bad.json", json.dumps({"0": ["<a_1>", f"<b_{2 ** 63}>"]}))
    with pytest.raises(DataError, match=r"key '0': token '<b_9223372036854775808>' at level 1 is not '<b_N>'"):
        read_index_json(str(tmp_path / "bad.json"))


def test_authors_index_files(shared_data):
    codes = read_index_json(os.path.join(shared_data, "instruments", "Instruments.index.json"), 9922)
    assert codes.shape == (9922, 4) and codes.max() < 256


# ---------------------------------------------------------------- synthetic data


def test_synthetic_is_deterministic_and_structured():
    a = make_synthetic(num_users=200, num_items=120, num_categories=6, seed=3)
    b = make_synthetic(num_users=200, num_items=120, num_categories=6, seed=3)
    c = make_synthetic(num_users=200, num_items=120, num_categories=6, seed=4)
    assert a == b and a.sequences != c.sequences
    assert a.num_items == 120 and len(a.sequences) == 200
    assert all(5 <= len(s) <= 20 for s in a.sequences)
    cats = np.array([t["category"] for t in a.item_text])
    assert set(cats) == set(range(6))
    # sequential structure: consecutive items share a category far more often than chance (1/6)
    same = np.mean([cats[x] == cats[y] for s in a.sequences for x, y in zip(s, s[1:])])
    assert same > 0.6


def test_synthetic_p_follow_of_one_is_refused():
    """p_follow 1 never leaves a cycle of successors (an item whose successors are all among the
    last three) and the generator hung; it must be below 1 (pipeline data.synthetic.p_follow)."""
    from letter.errors import SettingError

    with pytest.raises(SettingError, match=r"data.synthetic: p_follow must be >= 0 and < 1, got 1.0"):
        make_synthetic(num_users=5, num_items=40, num_categories=2, p_follow=1.0)
    assert make_synthetic(num_users=5, num_items=40, num_categories=2, p_follow=0.99).num_users == 5


def test_synthetic_roundtrip(tmp_path):
    ds = make_synthetic(num_users=50, num_items=40, num_categories=4)
    write_letter(ds, str(tmp_path))
    again = load_dataset(str(tmp_path))
    assert again.sequences == ds.sequences and again.item_text == ds.item_text


# ---------------------------------------------------------------- metrics


def test_ranking_metrics_by_hand():
    topk = torch.tensor([[5, 1, 2, -1, -1, -1], [7, 8, 9, 3, 4, 6], [0, 1, 2, 3, 4, 5]])
    targets = torch.tensor([1, 6, 9])
    m = ranking_metrics(topk, targets, ks=(1, 5, 6))
    assert m["recall@1"] == 0 and m["recall@5"] == pytest.approx(1 / 3) and m["recall@6"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1 / np.log2(3)) / 3)
    assert m["ndcg@6"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(7)) / 3)
    # -1 slots never hit, even for a target of -1
    assert not hits_from_topk(torch.tensor([[-1]]), torch.tensor([-1])).any()


def test_metrics_from_hits_counts_first_hit_only():
    hits = torch.tensor([[False, True, True], [False, False, False]])
    m = metrics_from_hits(hits, ks=(1, 3))
    assert m["recall@3"] == 0.5 and m["ndcg@3"] == pytest.approx(0.5 / np.log2(3))
    with pytest.raises(ValueError, match="at least 10"):
        metrics_from_hits(hits)



def test_standard_errors_by_hand():
    # ranks of the first hit: 0, 1, none, 3 -> per-user NDCG@5 1, 1/log2(3), 0, 1/log2(5)
    hits = torch.zeros(4, 5, dtype=torch.bool)
    hits[0, 0] = hits[1, 1] = hits[3, 3] = hits[3, 4] = True
    gains = np.array([1.0, 1 / np.log2(3), 0.0, 1 / np.log2(5)])
    se = standard_errors(hits, ks=(5,))
    assert se["ndcg@5"] == pytest.approx(gains.std(ddof=1) / 2)
    assert se["recall@5"] == pytest.approx(np.array([1.0, 1, 0, 1]).std(ddof=1) / 2)
    assert standard_errors(hits[:1], ks=(5,)) == {"recall@5": None, "ndcg@5": None}  # one user: no spread


# ---------------------------------------------------------------- CLI


def test_cli_synth_stats_convert(tmp_path):
    from click.testing import CliRunner

    from letter.cli.main import main

    runner = CliRunner()
    out = tmp_path / "synth"
    r = runner.invoke(main, ["data", "synth", str(out), "--users", "30", "--items", "20", "--categories", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["data", "stats", str(out), "--json"])
    stats = json.loads(r.output)
    assert stats["users"] == 30 and stats["items"] == 20 and stats["has_item_text"]
    _write(tmp_path / "sequential_data.txt", "1 2 3 4\n")
    r = runner.invoke(main, ["data", "convert", str(tmp_path / "sequential_data.txt"), str(tmp_path / "p5"), "--name", "P"])
    assert r.exit_code == 0 and load_dataset(str(tmp_path / "p5")).sequences == [[0, 1, 2]]
    r = runner.invoke(main, ["data", "stats", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "no such file" in r.output and "Traceback" not in r.output


def test_an_empty_name_is_refused_by_every_reader(tmp_path):
    """--name "" used to fall back to the default name silently; now one line naming --name, nothing written."""
    from click.testing import CliRunner

    from letter.cli.main import main

    _write(tmp_path / "Old.inter.json", json.dumps({"u": [1, 2, 3], "v": [3, 1, 2]}))
    _write(tmp_path / "sequential_data.txt", "1 2 3 4\n")
    _gz_lines(tmp_path / "r.json.gz", [{"reviewerID": "A", "asin": "x", "unixReviewTime": 1}])
    message = "name '': not usable in a file name (no '/', '\\', leading '.' or empty name)"
    for src in ("Old.inter.json", "sequential_data.txt", "r.json.gz"):
        with pytest.raises(SettingError, match=f"^{re.escape(message)}$"):
            load_dataset(str(tmp_path / src), name="")
        r = CliRunner().invoke(main, ["data", "convert", str(tmp_path / src), str(tmp_path / "out"), "--name", ""])
        assert r.exit_code == 1 and r.output == f"Error: --{message}\n", r.output
        assert not (tmp_path / "out").exists()


def test_cli_convert_names_a_letter_folder_by_name(tmp_path):
    """--name renames every format's dataset, a LETTER folder's too (its files and Dataset.name)."""
    from click.testing import CliRunner

    from letter.cli.main import main

    _write(tmp_path / "Old.inter.json", json.dumps({"u": [1, 2, 3], "v": [3, 1, 2]}))
    r = CliRunner().invoke(main, ["data", "convert", str(tmp_path), str(tmp_path / "new"), "--name", "New"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / "new")) == ["New.inter.json"]
    renamed = load_dataset(str(tmp_path / "new"))
    assert renamed.name == "New" and renamed.sequences == load_dataset(str(tmp_path)).sequences


def test_cli_shows_data_warnings_as_one_line(tmp_path):
    """Warnings about the user's data (items without a meta record, users too short for the split)
    are one "warning: ..." line, not Python's warning with the library's file, line and source."""
    from click.testing import CliRunner

    from letter.cli.main import main

    reviews = [{"reviewerID": u, "asin": i, "unixReviewTime": t} for u in "ABC" for t, i in enumerate(["i1", "i2", "i3"])]
    _gz_lines(tmp_path / "Toys_5.json.gz", reviews)
    _gz_lines(tmp_path / "meta_Toys.json.gz", [{"asin": "i1", "title": "One"}])
    r = CliRunner().invoke(main, ["data", "convert", str(tmp_path), str(tmp_path / "out"), "--kcore", "2"])
    assert r.exit_code == 0, r.output
    assert r.stderr == f"warning: {tmp_path / 'meta_Toys.json.gz'}: 2 item(s) have no meta record; their text is empty\n"
    data = tmp_path / "short"
    write_letter(Dataset("S", ["u", "v"], [list(range(12)), [0, 1]], [str(i) for i in range(12)]), str(data))
    r = CliRunner().invoke(main, ["train-cf", str(data), "--dim", "8", "--blocks", "1", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert r.stderr == "warning: S: skipped 1 user(s) with fewer than 3 interactions in the leave-one-out split\n"


def test_cli_convert_refuses_kcore_for_a_format_without_it(tmp_path):
    """--kcore filters raw Amazon dumps only: given with another format it would be ignored, so it is
    a usage error naming it (as every option a combination ignores), and nothing is written."""
    from click.testing import CliRunner

    from letter.cli.main import main

    _write(tmp_path / "sequential_data.txt", "1 2 3 4\n2 3 4\n")
    for fmt in ("auto", "p5"):
        r = CliRunner().invoke(main, ["data", "convert", str(tmp_path), str(tmp_path / "out"), "--kcore", "3",
                                      "--format", fmt])
        assert r.exit_code == 2 and "--kcore applies to raw Amazon dumps only (SRC is a p5 dataset)" in r.output, r.output
        assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(main, ["data", "convert", str(tmp_path), str(tmp_path / "out")])
    assert r.exit_code == 0 and load_dataset(str(tmp_path / "out")).num_users == 2
