"""`letter bench serve`: a bounded loopback load test of a real `letter serve` process.

For each server setting (dynamic batching with --max-batch N, and --max-batch 1 = one search per
request) a fresh server is started; then for exclusion off and on, and each concurrency level, a
fixed number of POST /recommend requests is sent by that many concurrent keep-alive clients (each
sends its next request when the previous one is answered), and the level ends when all are
answered or its time limit passes. Histories are the dataset's test histories (a seeded sample).
Per level: requests/s, p50/p95/p99 latency, errors (non-200 answers, failed connections, and
requests left unanswered at the time limit). Before the servers start, the same run is loaded in
this process to measure what batching gains for the search alone: N single-user searches one after
another against one search of N users (N = the batched server's --max-batch, the server's thread
count, no HTTP). It is not a bound on the servers' ratio: a search inside a server also pays for the
thread hand-off and shares the interpreter with the event loop, which costs the unbatched server
once per request (the summary sets one search in each place side by side).
"""
from __future__ import annotations

import asyncio
import datetime
import os
import platform
import random
import time
from urllib.parse import urlparse

import numpy as np
import torch

from letter_ext.bench.common import cpu_model, interleaved_medians

from letter.data import load_dataset
from letter.rec.recommend import Query, RunRecommender
from letter.runs import check_output_path, check_rec_run, read_rec_run_info, write_json
from letter.serve.process import Connection, get_json, running_server

CONCURRENCY = (1, 8, 32, 128)


def sample_histories(run_dir: str, count: int, seed: int = 0) -> list[list[str]]:
    """`count` test-split histories (original item ids, everything before each user's last item)."""
    dataset = load_dataset(os.fspath(check_rec_run(run_dir, read_rec_run_info(run_dir))[0]))
    users = [u for u, seq in enumerate(dataset.sequences) if len(seq) >= 3]
    rng = random.Random(seed)
    picked = [users[rng.randrange(len(users))] for _ in range(count)]
    return [[dataset.item_ids[i] for i in dataset.sequences[u][:-1]] for u in picked]


async def load_level(url: str, payloads: list[dict], concurrency: int, time_limit_s: float) -> dict:
    """Send every payload once with `concurrency` clients; latency statistics in milliseconds."""
    parsed = urlparse(url)
    queue = list(reversed(payloads))
    latencies, errors = [], {"status": {}, "failed": 0, "unanswered": 0}

    async def client():
        conn = Connection(parsed.hostname, parsed.port)
        try:
            while queue:
                payload = queue.pop()
                started = time.perf_counter()
                try:
                    status, _ = await conn.post("/recommend", payload)
                except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError):
                    errors["failed"] += 1
                    await conn.close()
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors["status"][str(status)] = errors["status"].get(str(status), 0) + 1
        finally:
            await conn.close()

    started = time.perf_counter()
    tasks = [asyncio.create_task(client()) for _ in range(min(concurrency, len(payloads)))]
    pending = (await asyncio.wait(tasks, timeout=time_limit_s))[1] if tasks else ()  # no requests: none to wait for
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - started
    answered = len(latencies) + sum(errors["status"].values()) + errors["failed"]
    errors["unanswered"] = len(payloads) - answered
    ms = np.array(latencies) * 1000.0
    pct = (lambda q: round(float(np.percentile(ms, q)), 2)) if ms.size else (lambda q: None)
    return {"concurrency": concurrency, "requests": len(payloads), "ok": len(latencies),
            "errors": sum(errors["status"].values()) + errors["failed"] + errors["unanswered"],
            "error_detail": errors, "wall_s": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "mean_ms": round(float(ms.mean()), 2) if ms.size else None}


def in_process_batching(run_dir: str, histories: list[list[str]], *, batch: int, k: int, threads: int,
                     repeat: int = 7) -> dict:
    """In process, per exclusion setting: seconds of `batch` single-user searches one after another
    (what a server without batching does) and of one search of the same `batch` users, as
    interleaved medians; `gain_x` = their ratio, what batching gains for the search alone."""
    run = RunRecommender(run_dir)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {}
        for exclude in (False, True):
            # `batch` users even when fewer histories were sampled (--requests below --max-batch): repeated
            queries = [Query(tuple(run.positions(histories[i % len(histories)])), k, exclude) for i in range(batch)]
            times = interleaved_medians({
                "singles": lambda: [run.recommend([q]) for q in queries],
                "batch": lambda: run.recommend(queries),
            }, torch.device("cpu"), repeat=repeat)
            out["exclude_history" if exclude else "plain"] = {
                "users": len(queries), "singles_ms": round(times["singles"] * 1e3, 2),
                "batch_ms": round(times["batch"] * 1e3, 2), "gain_x": round(times["singles"] / times["batch"], 2)}
        return out
    finally:
        torch.set_num_threads(previous_threads)


def run_serve_bench(run_dir: str, *, out: str | None = None, requests: int = 256, concurrency=CONCURRENCY,
                    batched_max_batch: int = 32, max_delay_ms: float = 2.0, k: int = 10, threads: int = 1,
                    level_time_limit_s: float = 120.0, warmup: int = 16, seed: int = 0, label: str | None = None,
                    log=print) -> dict:
    """Both server settings x exclusion off/on x each concurrency level; returns (and writes) the JSON."""
    if out:
        check_output_path(out, {"run_dir": run_dir})  # before the servers run: never onto a run's or a dataset's file
    histories = sample_histories(run_dir, requests, seed)
    result = {
        "benchmark": "serve",
        "label": label or os.path.basename(os.path.abspath(run_dir)),
        "run": os.path.abspath(run_dir),
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "server_torch_threads": threads,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "settings": {"requests_per_level": requests, "k": k, "max_delay_ms": max_delay_ms,
                     "level_time_limit_s": level_time_limit_s, "warmup_requests": warmup,
                     "histories": "test-split histories of the run's dataset, seeded sample", "seed": seed},
        "servers": [],
    }
    log(f"== batching in process ({batched_max_batch} single searches / one batch of {batched_max_batch})")
    result["in_process_batching"] = in_process_batching(run_dir, histories, batch=batched_max_batch, k=k,
                                                        threads=threads)
    for setting, row in result["in_process_batching"].items():
        log(f"  {setting:15} singles {row['singles_ms']} ms  batch {row['batch_ms']} ms  gain {row['gain_x']}x")
    for name, max_batch in (("batched", batched_max_batch), ("unbatched", 1)):
        args = ["--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms)]
        log(f"== server {name} (--max-batch {max_batch})")
        with running_server(run_dir, *args, threads=threads) as url:
            _, meta = get_json(url + "/metadata")
            entry = {"name": name, "max_batch": max_batch, "metadata": {k_: meta[k_] for k_ in
                                                                       ("model", "dataset", "items", "beams", "index")},
                     "levels": []}
            for exclude in (False, True):
                payloads = [{"history": h, "k": k, "exclude_history": exclude} for h in histories]
                asyncio.run(load_level(url, payloads[:warmup], min(8, warmup), level_time_limit_s))
                for c in concurrency:
                    level = asyncio.run(load_level(url, payloads, c, level_time_limit_s))
                    level["exclude_history"] = exclude
                    entry["levels"].append(level)
                    log(f"  exclude_history={exclude!s:5} concurrency {c:3d}: {level['requests_per_s']:8.1f} req/s  "
                        f"p50 {level['p50_ms']} ms  p95 {level['p95_ms']} ms  p99 {level['p99_ms']} ms  "
                        f"errors {level['errors']}")
            entry["server_stats"] = get_json(url + "/metadata")[1]["stats"]
        result["servers"].append(entry)
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]  # shared machines: context
    result["summary"] = summarize(result)
    if out:
        write_json(out, result)
    return result


def summarize(result: dict) -> dict:
    """The targets' numbers: batched / unbatched throughput per concurrency, what batching gains in
    process, one search's milliseconds in process and inside the unbatched server, p99 at concurrency
    1, total errors, and the cost of exclusion (requests/s with it / without it)."""
    levels = {(s["name"], lv["exclude_history"], lv["concurrency"]): lv for s in result["servers"] for lv in s["levels"]}
    out = {"errors": sum(lv["errors"] for lv in levels.values()), "speedup_batched_over_unbatched": {},
           "exclusion_throughput_ratio": {}}
    for (name, exclude, c), lv in levels.items():
        if name == "batched":
            other = levels.get(("unbatched", exclude, c))
            if other and other["requests_per_s"]:
                key = f"c{c}" + ("_exclude_history" if exclude else "")
                out["speedup_batched_over_unbatched"][key] = round(lv["requests_per_s"] / other["requests_per_s"], 2)
        if exclude:
            plain = levels.get((name, False, c))
            if plain and plain["requests_per_s"]:
                out["exclusion_throughput_ratio"][f"{name}_c{c}"] = round(lv["requests_per_s"] / plain["requests_per_s"], 3)
    batching = result["in_process_batching"]
    out["in_process_batching_gain"] = {setting: row["gain_x"] for setting, row in batching.items()}
    unbatched = next(s["server_stats"] for s in result["servers"] if s["name"] == "unbatched")
    out["one_search_ms"] = {"in_process": round(batching["plain"]["singles_ms"] / batching["plain"]["users"], 2),
                            "unbatched_server": round(1e3 * unbatched["search_s"] / max(unbatched["batches"], 1), 2)}
    single = levels.get(("batched", False, 1))
    out["p99_ms_concurrency1_batched"] = single["p99_ms"] if single else None
    return out
