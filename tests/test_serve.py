"""Serving: excluding items inside the search (evaluation and recommend), batched offline scoring,
the dynamic batcher, and a real `letter serve` process on a loopback port (same lists as `letter
recommend`, every bad request a 4xx naming the field, the server still answering afterwards)."""
import asyncio
import http.client
import json
import os
import socket
import threading
import time
from urllib.parse import urlparse

import pytest
import torch
from click.testing import CliRunner

from conftest import NUM_ITEMS
from letter.cli.main import main as cli
from letter.rec import Query, RunRecommender, evaluate, generate, load_run
from letter.rec.evaluation import evaluate_model, prefix_index
from letter.serve.batching import DynamicBatcher, QueueFullError
from letter.serve.process import Connection, get_json, running_server


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: single-threaded (see conftest.one_thread)."""


def _test_users(synth, count):
    """(user index, test history as original ids) of the first `count` users."""
    _, _, _, ds = synth
    return [(u, [ds.item_ids[i] for i in ds.sequences[u][:-1]]) for u in range(count)]


# ------------------------------------------------------------------------- exclusion in the search


def test_exclusion_never_returns_a_banned_item_and_changes_only_what_it_must(trained, synth):
    out, _ = trained
    model, rec, _ = load_run(out)
    index = prefix_index(rec, "cpu", model)
    enc, _ = rec.eval_tensors("test")
    seen = rec.eval_seen_items("test")
    seen[0] = []  # a user with nothing banned gets exactly the unbanned list
    plain, plain_scores = generate(model, index, enc, 20, 64, "cpu")
    leaves, scores = generate(model, index, enc, 20, 64, "cpu", banned_items=seen)
    item_of_leaf = index.first_item_of_leaf  # codes are unique here: one item per identifier
    for row, banned in enumerate(seen):
        got = item_of_leaf[leaves[row][leaves[row] >= 0]].tolist()
        assert not set(got) & set(banned), row
        assert len(got) == min(20, NUM_ITEMS - len(set(banned)))  # still K allowed identifiers
        assert torch.all(scores[row][:-1] >= scores[row][1:])
        # an identifier found by both searches has the same score in both
        common = {int(f): s for f, s in zip(plain[row], plain_scores[row]) if f >= 0}
        for f, s in zip(leaves[row].tolist(), scores[row].tolist()):
            if f in common:
                assert s == pytest.approx(common[f], abs=1e-5)
    assert torch.equal(leaves[0], plain[0]) and torch.allclose(scores[0], plain_scores[0])

    # an exhaustive search (every identifier fits in the beam): exclusion = the plain list minus the banned items
    full, full_scores = generate(model, index, enc[:40], NUM_ITEMS, 64, "cpu")
    cut, cut_scores = generate(model, index, enc[:40], NUM_ITEMS, 64, "cpu", banned_items=seen[:40])
    for row, banned in enumerate(seen[:40]):
        keep = ~torch.isin(item_of_leaf[full[row]], torch.tensor(banned, dtype=torch.long))
        n = int(keep.sum())
        assert torch.equal(cut[row][:n], full[row][keep]) and bool((cut[row][n:] == -1).all())
        assert torch.allclose(cut_scores[row][:n], full_scores[row][keep], atol=1e-5)


def test_evaluate_with_exclusion_never_counts_a_history_item(trained):
    out, _ = trained
    model, rec, _ = load_run(out)
    enc, _ = rec.eval_tensors("test")
    seen = rec.eval_seen_items("test")
    # every target made an item of its user's history: only a recommended history item can hit
    targets = torch.tensor([h[-1] for h in seen])
    kept = evaluate_model(model, rec, enc, targets, 20, 64, "cpu")["metrics"]
    excluded = evaluate_model(model, rec, enc, targets, 20, 64, "cpu", banned_items=seen)["metrics"]
    assert kept["recall@10"] > 0
    assert all(v == 0.0 for v in excluded.values()), excluded

    result = evaluate(out, "test", exclude_history=True)
    assert result["metrics"] == evaluate(out, "test")["metrics"]  # the authors' protocol is unchanged
    _, real_targets = rec.eval_tensors("test")
    assert result["targets_in_history"] == sum(int(t) in set(h) for t, h in zip(real_targets.tolist(), seen))
    assert set(result["metrics_exclude_history"]) == set(result["metrics"])
    assert result["data"] == rec.source  # the result names the data it measured (--data may be another's)
    with pytest.raises(Exception, match="fused decoder"):
        generate(model, prefix_index(rec, "cpu", model), enc[:2], 20, 2, "cpu", decoder="hf", banned_items=seen[:2])


def test_recommend_users_all_writes_jsonl_like_single_queries(trained, synth, tmp_path):
    out, _ = trained
    _, _, _, ds = synth
    path = tmp_path / "all.jsonl"
    result = CliRunner().invoke(cli, ["recommend", "--model", out, "--users", "all", "--exclude-history", "-k", "5",
                                      "--batch-size", "64", "--out", str(path)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["user"] for line in lines] == ds.user_ids
    run = RunRecommender(out)
    for u in (0, 7, len(ds.user_ids) - 1):
        sequence = ds.sequences[u]
        assert not {item["item_id"] for item in lines[u]["items"]} & {ds.item_ids[i] for i in sequence}
        single = run.recommend([Query(tuple(sequence), 5, exclude_history=True)])[0]
        assert [i["item_id"] for i in lines[u]["items"]] == [i["item_id"] for i in single]
        assert [i["score"] for i in lines[u]["items"]] == pytest.approx([i["score"] for i in single], abs=1e-5)


# ------------------------------------------------------------------------------------ the batcher


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_batcher_gathers_up_to_max_batch_and_keeps_order():
    sizes = []

    def run_batch(queries):
        sizes.append(len(queries))
        return [q * 10 for q in queries]

    async def main():
        batcher = DynamicBatcher(run_batch, max_batch=4, max_delay_s=0.05, queue_size=16)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
            many = await batcher.submit([20, 21, 22])
        finally:
            await batcher.stop()
        return results, many, batcher.stats

    results, many, stats = _run(main())
    assert results == [[i * 10] for i in range(10)] and many == [200, 210, 220]
    assert sizes[:3] == [4, 4, 2] and stats["requests"] == 13 and stats["largest_batch"] == 4


def test_batcher_queue_full_cancelled_callers_and_failures():
    release, seen = threading.Event(), []

    def run_batch(queries):
        seen.append(list(queries))
        if "boom" in queries:
            raise RuntimeError("boom")
        release.wait(10)
        return queries

    async def main():
        batcher = DynamicBatcher(run_batch, max_batch=1, max_delay_s=0.0, queue_size=2)
        await batcher.start()
        try:
            first = asyncio.create_task(batcher.submit(["a"]))
            while not seen:  # the worker holds "a" in its search
                await asyncio.sleep(0.005)
            gone = asyncio.create_task(batcher.submit(["b"]))
            waiting = asyncio.create_task(batcher.submit(["c"]))
            await asyncio.sleep(0.01)
            with pytest.raises(QueueFullError, match="queue is full"):
                await batcher.submit(["d"])
            with pytest.raises(QueueFullError):
                await batcher.submit(["x", "y", "z"])  # all or nothing
            gone.cancel()  # its client went away: "b" is never searched
            release.set()
            assert await first == ["a"] and await waiting == ["c"]
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.submit(["boom"])
            assert await batcher.submit(["e"]) == ["e"]  # still serving
        finally:
            await batcher.stop()
        return batcher.stats

    stats = _run(main())
    assert seen == [["a"], ["c"], ["boom"], ["e"]] and stats["dropped"] == 1


# ------------------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def server(trained):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    out, _ = trained
    with running_server(out, "--max-batch", "8", "--max-delay-ms", "5", "--queue-size", "64", threads=1,
                        start_timeout=120) as url:
        yield url


def _post_concurrently(url: str, path: str, payloads: list, concurrency: int) -> list:
    parsed = urlparse(url)
    results = [None] * len(payloads)
    todo = list(enumerate(payloads))

    async def client():
        conn = Connection(parsed.hostname, parsed.port)
        try:
            while todo:
                i, payload = todo.pop(0)
                results[i] = await conn.post(path, payload)
        finally:
            await conn.close()

    async def main():
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(concurrency))), 60)

    asyncio.run(main())
    return results


def _raw(url: str, method: str, path: str, body: bytes = b"", content_type: str = "application/json"):
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={} if method == "GET" else {"Content-Type": content_type})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _ids(items):
    return [i["item_id"] for i in items]


def test_server_answers_concurrent_requests_like_letter_recommend(server, trained, synth, tmp_path):
    out, _ = trained
    users = _test_users(synth, 16)
    histories = tmp_path / "histories.txt"
    histories.write_text("\n".join(",".join(h) for _, h in users) + "\n")
    expected = {}
    for exclude in (False, True):
        path = tmp_path / f"expected-{exclude}.jsonl"
        args = ["recommend", "--model", out, "--histories", str(histories), "-k", "5", "--out", str(path)]
        result = CliRunner().invoke(cli, args + (["--exclude-history"] if exclude else []))
        assert result.exit_code == 0, result.output
        expected[exclude] = [json.loads(line)["items"] for line in path.read_text().splitlines()]

    payloads = [{"history": h, "k": 5, "exclude_history": exclude} for exclude in (False, True) for _, h in users]
    answers = _post_concurrently(server, "/recommend", payloads, concurrency=16)
    for payload, (status, body) in zip(payloads, answers):
        assert status == 200, body
        want = expected[payload["exclude_history"]][[h for _, h in users].index(payload["history"])]
        assert _ids(body["items"]) == _ids(want)
        assert [i["score"] for i in body["items"]] == pytest.approx([i["score"] for i in want], abs=1e-4)
        assert all(i["title"] for i in body["items"])  # the synthetic data has titles
        if payload["exclude_history"]:
            assert not set(_ids(body["items"])) & set(payload["history"])
            assert body["excluded"] == len(set(payload["history"]))

    # one history through `letter recommend --history` (the CLI's printed list) and the batch endpoint
    cli_out = CliRunner().invoke(cli, ["recommend", "--model", out, "--history", ",".join(users[3][1]), "-k", "5"])
    assert [line.split()[1] for line in cli_out.output.strip().splitlines()] == _ids(expected[False][3])
    status, body = _post_concurrently(server, "/recommend/batch", [{"requests": payloads}], 1)[0]
    assert status == 200 and [_ids(r["items"]) for r in body["results"]] == [_ids(b["items"]) for _, b in answers]
    status, meta = get_json(server + "/metadata")
    assert status == 200 and meta["items"] == NUM_ITEMS and meta["model"] == "tiger"
    assert meta["index"]["items"] == NUM_ITEMS and len(meta["index"]["version"]) == 16
    # the batch endpoint queued 32 requests at once: the worker took them 8 (--max-batch) at a time
    assert meta["stats"]["largest_batch"] == 8 and meta["stats"]["batches"] < meta["stats"]["requests"]


BAD_REQUESTS = [
    # (name, path, body (bytes: sent as is), content type, status, field)
    ("malformed JSON", "/recommend", b'{"history": ["1",', "application/json", 400, "body"),
    ("not JSON", "/recommend", b"history=1", "application/x-www-form-urlencoded", 415, "body"),
    ("empty body", "/recommend", b"", "application/json", 400, "body"),
    ("a type that only contains json", "/recommend", {"history": ["{item}"]}, "application/jsonx", 415, "body"),
    ("body a list", "/recommend", [1, 2], "application/json", 422, "body"),
    ("missing history", "/recommend", {"k": 3}, "application/json", 422, "history"),
    ("empty history", "/recommend", {"history": []}, "application/json", 422, "history"),
    ("history a string", "/recommend", {"history": "1,2"}, "application/json", 422, "history"),
    ("unknown item", "/recommend", {"history": ["{item}", "nosuchitem"]}, "application/json", 422, "history"),
    ("unknown excluded item", "/recommend", {"history": ["{item}"], "exclude": ["zz"]}, "application/json", 422,
     "exclude"),
    ("k zero", "/recommend", {"history": ["{item}"], "k": 0}, "application/json", 422, "k"),
    ("k above beams", "/recommend", {"history": ["{item}"], "k": 21}, "application/json", 422, "k"),
    ("k text", "/recommend", {"history": ["{item}"], "k": "ten"}, "application/json", 422, "k"),
    ("exclude_history text", "/recommend", {"history": ["{item}"], "exclude_history": "maybe"}, "application/json",
     422, "exclude_history"),
    ("k a boolean", "/recommend", {"history": ["{item}"], "k": True}, "application/json", 422, "k"),
    ("k a numeric string", "/recommend", {"history": ["{item}"], "k": "5"}, "application/json", 422, "k"),
    ("exclude_history a number", "/recommend", {"history": ["{item}"], "exclude_history": 1}, "application/json",
     422, "exclude_history"),
    ("unknown field", "/recommend", {"history": ["{item}"], "user": 3}, "application/json", 422, "user"),
    ("batch empty", "/recommend/batch", {"requests": []}, "application/json", 422, "requests"),
    ("batch unknown item", "/recommend/batch", {"requests": [{"history": ["{item}"]}, {"history": ["x"]}]},
     "application/json", 422, "requests[1].history"),
    ("batch k", "/recommend/batch", {"requests": [{"history": ["{item}"], "k": 99}]}, "application/json", 422,
     "requests[0].k"),
    ("not UTF-8", "/recommend", b'{"history": ["\xe9"]}', "application/json", 400, "body"),
    ("unknown path", "/recommend/one", {"history": ["{item}"]}, "application/json", 404, "path"),
]


@pytest.mark.parametrize("name,path,body,content_type,status,field", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(server, synth, name, path, body, content_type,
                                                               status, field):
    _, _, _, ds = synth
    item = ds.item_ids[1]
    if not isinstance(body, bytes):
        body = json.dumps(body).replace("{item}", item).encode()
    got, text = _raw(server, "POST", path, body, content_type)
    assert got == status, text
    answer = json.loads(text)
    assert answer["field"] == field and answer["error"].startswith(f"{field}: "), answer
    assert "Traceback" not in text and "File \"" not in text
    got, text = _raw(server, "POST", "/recommend", json.dumps({"history": [item], "k": 3}).encode())
    assert got == 200 and len(json.loads(text)["items"]) == 3


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON",
                                          "application/vnd.api+json"])
def test_json_with_parameters_or_a_json_suffix_is_served(server, synth, content_type):
    item = synth[3].item_ids[1]
    got, text = _raw(server, "POST", "/recommend", json.dumps({"history": [item], "k": 2}).encode(), content_type)
    assert got == 200 and len(json.loads(text)["items"]) == 2, text


def test_clients_that_disconnect_cost_the_others_nothing(server, synth):
    users = _test_users(synth, 4)
    parsed = urlparse(server)
    good = [{"history": h, "k": 5} for _, h in users]
    before = _post_concurrently(server, "/recommend", good, 4)
    for payload in good:  # a full request, then gone before the answer; a request cut off mid-body
        body = json.dumps(payload).encode()
        head = (f"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        for data in (head + body, head + body[: len(body) // 2]):
            with socket.create_connection((parsed.hostname, parsed.port), timeout=5) as s:
                s.sendall(data)
    time.sleep(0.3)
    after = _post_concurrently(server, "/recommend", good, 4)
    assert [s for s, _ in after] == [200] * 4
    assert [_ids(b["items"]) for _, b in after] == [_ids(b["items"]) for _, b in before]
    assert _raw(server, "GET", "/healthz")[0] == 200


def test_bench_serve_measures_every_level_both_servers_and_batching_in_process(trained, tmp_path):
    """`letter bench serve` (bounded): every request of every level answered by both servers, the
    batched one really batching and the other never, summary ratios computed from the levels, and
    the in-process gain a ratio of the times it records."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    out, _ = trained
    report = tmp_path / "serve.json"
    result = CliRunner().invoke(cli, ["bench", "serve", "--model", out, "--requests", "12", "--concurrency", "1,4",
                                      "--max-batch", "4", "--max-delay-ms", "20", "--out", str(report)])
    assert result.exit_code == 0, result.output
    bench = json.loads(report.read_text())
    assert bench["machine"]["cpu"] and bench["machine"]["server_torch_threads"] == 1
    by_name = {s["name"]: s for s in bench["servers"]}
    assert {n: s["max_batch"] for n, s in by_name.items()} == {"batched": 4, "unbatched": 1}
    for server in by_name.values():
        assert [(lv["exclude_history"], lv["concurrency"]) for lv in server["levels"]] == [
            (False, 1), (False, 4), (True, 1), (True, 4)]
        assert all(lv["ok"] == 12 and lv["errors"] == 0 for lv in server["levels"])
        assert server["server_stats"]["requests"] == 2 * (12 + 2 * 12)  # per exclusion: warm-up + 2 levels
    assert by_name["unbatched"]["server_stats"]["largest_batch"] == 1
    assert 1 < by_name["batched"]["server_stats"]["largest_batch"] <= 4
    summary = bench["summary"]
    assert summary["errors"] == 0
    levels = {(s["name"], lv["exclude_history"], lv["concurrency"]): lv["requests_per_s"]
              for s in bench["servers"] for lv in s["levels"]}
    for key, (exclude, c) in {"c1": (False, 1), "c4": (False, 4), "c1_exclude_history": (True, 1),
                              "c4_exclude_history": (True, 4)}.items():
        # rounded to 2 decimals: at concurrency 1 (batched slower, ~0.24) that is more than 1 % off
        expected = round(levels[("batched", exclude, c)] / levels[("unbatched", exclude, c)], 2)
        assert summary["speedup_batched_over_unbatched"][key] == expected
    batching = bench["in_process_batching"]
    assert set(batching) == {"plain", "exclude_history"}
    for setting, row in batching.items():
        assert row["users"] == 4 and row["singles_ms"] > 0 and row["batch_ms"] > 0
        assert row["gain_x"] == pytest.approx(row["singles_ms"] / row["batch_ms"], rel=0.01)
        assert summary["in_process_batching_gain"][setting] == row["gain_x"]
    stats = by_name["unbatched"]["server_stats"]
    assert summary["one_search_ms"] == {"in_process": round(batching["plain"]["singles_ms"] / 4, 2),
                                        "unbatched_server": round(1e3 * stats["search_s"] / stats["batches"], 2)}


def test_bench_serve_never_writes_its_json_onto_a_run_file(trained, tmp_path):
    """`letter bench serve --out RUN/manifest.json`: refused before any server starts (as `bench
    kernels --out`), naming --out; the run's manifest stays as it was."""
    out, _ = trained
    manifest = os.path.join(out, "manifest.json")
    before = open(manifest, "rb").read()
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["bench", "serve", "--model", out, "--requests", "2", "--concurrency", "1",
                                      "--max-batch", "2", "--out", manifest])
    assert result.exit_code != 0 and "--out" in result.output and "run folder" in result.output, result.output
    assert "== server" not in result.output and time.perf_counter() - started < 30
    assert open(manifest, "rb").read() == before


def test_bench_serve_refuses_a_k_its_servers_would_refuse(trained, tmp_path):
    """The bench's servers run with the default --beams (20): -k 21 is a usage error naming -k, given
    before the run is loaded, not an error about a --beams option the bench does not have."""
    out, _ = trained
    result = CliRunner().invoke(cli, ["bench", "serve", "--model", out, "--requests", "2", "--concurrency", "1",
                                      "-k", "21", "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "-k" in result.output and "beams" not in result.output, result.output
    assert "== batching" not in result.output and not (tmp_path / "b.json").exists()


def test_batching_in_process_measures_a_full_batch_with_fewer_sampled_histories(trained):
    """`letter bench serve --requests 2 --max-batch 4`: batching in process still times 4 single
    searches against one batch of 4 (the histories repeat), as its log line and the JSON say."""
    from letter.bench.serve_load import in_process_batching, sample_histories

    out, _ = trained
    batching = in_process_batching(out, sample_histories(out, 2), batch=4, k=5, threads=1, repeat=1)
    assert {setting: row["users"] for setting, row in batching.items()} == {"plain": 4, "exclude_history": 4}


def test_a_level_of_no_requests_is_measured_as_empty():
    """run_serve_bench(warmup=0): the warm-up level has no requests and sends none (no server needed)."""
    from letter.bench.serve_load import load_level

    level = asyncio.run(load_level("http://127.0.0.1:1", [], 0, 1.0))
    assert level["requests"] == level["ok"] == level["errors"] == 0 and level["p99_ms"] is None


def test_a_batch_larger_than_the_queue_is_a_422_not_a_503_forever(server, synth):
    """A batch can never fit a queue shorter than itself: retrying (503 Retry-After) cannot help."""
    _, _, _, ds = synth
    status, meta = get_json(server + "/metadata")
    size = meta["server"]["queue_size"]
    body = json.dumps({"requests": [{"history": [ds.item_ids[1]], "k": 3}] * (size + 1)}).encode()
    got, text = _raw(server, "POST", "/recommend/batch", body)
    answer = json.loads(text)
    assert got == 422 and answer["field"] == "requests" and str(size) in answer["error"], text
    body = json.dumps({"requests": [{"history": [ds.item_ids[1]], "k": 3}] * size}).encode()
    assert _raw(server, "POST", "/recommend/batch", body)[0] == 200


def test_a_request_whose_client_left_before_its_batch_is_dropped(trained, synth):
    """README: a request whose client disconnected before its batch starts is dropped from it."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    out, _ = trained
    users = _test_users(synth, 1)
    with running_server(out, "--max-delay-ms", "1500", threads=1) as url:
        parsed = urlparse(url)
        body = json.dumps({"history": users[0][1], "k": 5}).encode()
        head = (f"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection((parsed.hostname, parsed.port), timeout=5) as s:
            s.sendall(head + body)  # then gone at once, while the batch still waits for company
        time.sleep(3.0)
        stats = get_json(url + "/metadata")[1]["stats"]
    assert stats["dropped"] == 1 and stats["requests"] == 0, stats


def _limited_post(url: str, body: bytes, chunks: int = 0):
    """POST /recommend with `body` sent whole with its Content-Length, or (chunks > 0) in that many
    chunks of a chunked transfer without one -> (status, JSON answer)."""
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        if chunks:
            size = -(-len(body) // chunks)
            parts = [body[i:i + size] for i in range(0, len(body), size)]
            conn.request("POST", "/recommend", body=iter(parts), encode_chunked=True,
                         headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        else:
            conn.request("POST", "/recommend", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_body_over_max_body_bytes_is_a_413_before_it_is_parsed(trained, synth):
    """--max-body-bytes: a body one byte over the limit is refused (with a Content-Length, and
    chunked without one), a body exactly at the limit is served; the server keeps serving."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    out, _ = trained
    _, history = _test_users(synth, 1)[0]
    body = json.dumps({"history": history, "k": 3}).encode()
    limit = len(body) + 40
    at_limit = body[:-1] + b" " * (limit - len(body)) + b"}"  # whitespace: the same request, exactly `limit` bytes
    over = at_limit[:-1] + b" }"
    assert len(at_limit) == limit and len(over) == limit + 1
    with running_server(out, "--max-body-bytes", str(limit), threads=1) as url:
        for data, chunks, status in ((over, 0, 413), (over, 3, 413), (at_limit, 0, 200), (at_limit, 3, 200)):
            got, answer = _limited_post(url, data, chunks)
            assert got == status, (chunks, answer)
            if status == 413:
                assert answer == {"error": f"body: larger than the server's limit of {limit} bytes (--max-body-bytes)",
                                  "field": "body"}
            else:
                assert len(answer["items"]) == 3
        # a huge declared body is refused at once, without the server reading it
        parsed = urlparse(url)
        with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as s:
            s.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 10000000000\r\n\r\n{")
            reply = b""
            while b"}" not in reply and (chunk := s.recv(65536)):  # the head and the body may come apart
                reply += chunk
            reply = reply.decode()
        assert reply.startswith("HTTP/1.1 413") and '"field":"body"' in reply, reply
        assert get_json(url + "/metadata")[1]["server"]["max_body_bytes"] == limit
        assert _limited_post(url, body)[0] == 200


def test_the_default_body_limit_fits_the_largest_legitimate_batch(server, synth):
    """Without --max-body-bytes: a batch of --queue-size requests with max_history-long history and
    exclude lists (the largest legitimate request) is served."""
    _, _, _, ds = synth
    status, meta = get_json(server + "/metadata")
    limit, size = meta["server"]["max_body_bytes"], meta["server"]["queue_size"]
    longest = max(ds.item_ids, key=len)
    request = {"history": [longest] * 20, "k": 3, "exclude_history": False, "exclude": [ds.item_ids[0]] * 20}
    body = json.dumps({"requests": [request] * size}, indent=1).encode()  # indented: more bytes than compact
    assert limit >= 1 << 20 and len(body) < limit
    status, text = _raw(server, "POST", "/recommend/batch", body)
    assert status == 200 and len(json.loads(text)["results"]) == size


def test_k_defaults_to_10_or_the_beam_width_when_smaller(server, trained, synth):
    """A request without k gets min(10, --beams) items; an explicit k above --beams stays a 422."""
    out, _ = trained
    _, history = _test_users(synth, 1)[0]
    status, text = _raw(server, "POST", "/recommend", json.dumps({"history": history}).encode())  # --beams 20
    assert status == 200 and json.loads(text)["k"] == 10
    with running_server(out, "--beams", "5", threads=1) as url:
        status, text = _raw(url, "POST", "/recommend", json.dumps({"history": history}).encode())
        answer = json.loads(text)
        assert status == 200 and answer["k"] == 5 and len({i["rank"] for i in answer["items"]}) == 5, answer
        run = RunRecommender(out, beams=5)
        expected = run.recommend([Query(tuple(run.positions(history)), 5, True)])[0]
        assert _ids(answer["items"]) == _ids(expected)
        status, text = _raw(url, "POST", "/recommend", json.dumps({"history": history, "k": 6}).encode())
        answer = json.loads(text)
        assert status == 422 and answer["field"] == "k" and "[1, 5]" in answer["error"], answer
        status, text = _raw(url, "POST", "/recommend", json.dumps({"history": history, "k": None}).encode())
        assert status == 422 and json.loads(text)["field"] == "k"  # null is not "not given"


def test_serve_freezes_what_it_loaded_out_of_the_cyclic_gc(trained, monkeypatch):
    """`serve` moves the modules and the loaded run out of the collector's reach before serving, so
    no full collection scans them (each such scan paused the server ~300 ms on the synthetic TIGER)."""
    import gc

    import uvicorn

    from letter.serve import serve

    out, _ = trained
    served = []

    def run(app, **kw):  # while serving, the loaded run is in no generation: no collection scans it
        sequences = app.state.run.rec.dataset.sequences
        served.append((gc.get_freeze_count(), any(o is sequences for o in gc.get_objects())))

    def serving(server, sockets=None):
        run(server.config.app)
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", serving)
    before = gc.get_freeze_count()
    try:
        serve(out, log=lambda message: None)
        frozen, tracked = served[0]
        assert frozen > before and not tracked
        assert gc.get_freeze_count() == 0  # thawed once served: collected at exit (see the test below)
    finally:
        gc.unfreeze()


def test_a_taken_port_is_one_line_before_the_run_loads_and_port_0_names_the_real_one(trained, monkeypatch):
    """A port in use: one line naming --port, exit 1, before the run is loaded (uvicorn found it
    only after the 'serving ... on' line, then exited 3 with its own log line); --port 0: the
    serving line names the port taken, not 0."""
    import uvicorn

    from letter.serve.process import free_port

    def no_load(self, *args, **kwargs):
        raise AssertionError("the run was loaded")

    out, _ = trained
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        port = taken.getsockname()[1]
        monkeypatch.setattr(RunRecommender, "__init__", no_load)
        result = CliRunner().invoke(cli, ["serve", "--model", out, "--port", str(port)])
        assert result.exit_code == 1, (result.output, result.exception)
        assert result.output.strip().splitlines() == [
            f"Error: --port {port}: cannot listen on --host 127.0.0.1 (Address already in use)"]
    monkeypatch.undo()
    listening = []

    def run(server, sockets=None):
        listening.append(sockets[0].getsockname()[1])
        server.started = True

    monkeypatch.setattr(uvicorn.Server, "run", run)
    result = CliRunner().invoke(cli, ["serve", "--model", out, "--port", "0"])
    port = listening[0]
    assert result.exit_code == 0 and port != 0 and f"on http://127.0.0.1:{port} " in result.output, result.output


def test_a_server_stopped_with_ctrl_c_prints_nothing_but_its_serving_line(trained):
    """Objects left frozen at exit are never collected: the extension bindings then dumped a
    30-line "nanobind: leaked ..." report on every Ctrl-C stop of `letter serve`."""
    import signal
    import subprocess
    import sys

    from letter.serve.process import free_port

    out, _ = trained
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "letter.cli.main", "serve", "--model", out, "--port", str(port),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LETTER_PROGRESS": "0"})
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if get_json(f"http://127.0.0.1:{port}/healthz", timeout=1.0)[0] == 200:
                    break
            except (OSError, ValueError):
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("serving tiger run"), lines[:5]


def test_the_serve_beam_default_is_the_library_constant():
    """letter.rec.recommend.DEFAULT_BEAMS is the one beam default: serve() and `letter serve --beams`
    (and `letter bench serve -k`'s bound) follow it (changed here before they are imported)."""
    import subprocess
    import sys

    code = """
import importlib, inspect
importlib.import_module("letter.rec.recommend").DEFAULT_BEAMS = 7  # the module (letter.rec.recommend is a function)
from letter.serve import serve
from letter.cli.serve import bench_serve_cmd, serve_cmd
beams = next(p for p in serve_cmd.params if p.name == "beams")
k = next(p for p in bench_serve_cmd.params if p.name == "k")
print(inspect.signature(serve).parameters["beams"].default, beams.default, k.type.max)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["7", "7", "7"]
