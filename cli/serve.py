"""`letter serve`: a recommender run behind a local JSON HTTP API; `letter bench serve`: its load test."""
import json

import click

from letter.rec.recommend import DEFAULT_BEAMS  # `letter serve --beams` default, which `letter bench serve` runs with


@click.command("serve")
@click.option("--model", "run_dir", required=True, type=click.Path(file_okay=False),
              help="A train-rec run folder (TIGER or LC-Rec), loaded once.")
@click.option("--data", "data_path", default=None, type=click.Path(), help="Dataset path (default: the run's).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: a free one, named in the serving line); taken before the run is loaded.")
@click.option("--beams", default=DEFAULT_BEAMS, show_default=True, type=click.IntRange(min=1),
              help="Beam width of every search; a request's k (<= beams; default 10, or --beams when smaller) "
                   "takes its first k identifiers.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="Most requests gathered into one batched beam search (1 = no batching).")
@click.option("--max-delay-ms", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="Longest wait for more requests after the first of a batch.")
@click.option("--queue-size", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Requests that may wait; beyond it the server answers 503.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch intra-op threads (default: torch's).")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn's log level.")
@click.option("--index-version", type=click.IntRange(min=0), default=None,
              help="Index version of the run to serve (default: the newest; 0: the training index).")
@click.option("--max-new-share", type=click.FloatRange(0, 1), default=None,
              help="At most floor(share * k) of a request's k identifiers from items added after training.")
@click.option("--tokenizer", "tokenizer_dir", default=None, type=click.Path(file_okay=False),
              help="The run's tokenizer folder: enables POST /items (new items join without retraining).")
@click.option("--allow-other-data", is_flag=True,
              help="Serve with a dataset whose content differs from the one the run was trained on (refused otherwise; "
                   "the training dataset grown by appending items needs no flag; a cold split of the run's catalog, or the "
                   "catalog of its split, is refused: the items are numbered otherwise). POST /items never adds to "
                   "other data.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=None,
              help="Larger request bodies are answered 413 before they are read whole (default: twice the largest "
                   "legitimate request -- a --queue-size batch of max_history-long histories and exclude lists, or "
                   "with --tokenizer a POST /items of the whole catalog's rows -- and at least 1 MiB).")
def serve_cmd(run_dir, data_path, host, port, beams, max_batch, max_delay_ms, queue_size, device, threads, log_level,
              index_version, max_new_share, tokenizer_dir, allow_other_data, max_body_bytes):
    """Serve a trained recommender over HTTP (JSON): POST /recommend, POST /recommend/batch, GET /healthz,
    GET /metadata, POST /items (with --tokenizer); OpenAPI docs at /docs. Concurrent requests are batched into one constrained beam
    search (up to --max-batch, waiting at most --max-delay-ms). Needs pip install -e .[serve]."""
    import torch

    from letter.serve import serve

    if threads:
        torch.set_num_threads(threads)
    serve(run_dir, data=data_path, device=device, beams=beams, host=host, port=port, max_batch=max_batch,
          max_delay_ms=max_delay_ms, queue_size=queue_size, log_level=log_level, log=click.echo,
          index_version=index_version, max_new_share=max_new_share, tokenizer=tokenizer_dir,
          allow_other_data=allow_other_data, max_body_bytes=max_body_bytes)


@click.command("serve")
@click.option("--model", "run_dir", required=True, type=click.Path(file_okay=False), help="A train-rec run folder.")
@click.option("--requests", default=256, show_default=True, type=click.IntRange(min=1),
              help="Requests per (server, exclusion, concurrency) level.")
@click.option("--concurrency", default="1,8,32,128", show_default=True, help="Comma-separated concurrency levels.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=2),
              help="--max-batch of the batched server (the other server runs with 1).")
@click.option("--max-delay-ms", default=2.0, show_default=True, type=click.FloatRange(min=0))
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, DEFAULT_BEAMS),
              help=f"k of every request (at most {DEFAULT_BEAMS}, the servers' default --beams).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="The server's torch threads.")
@click.option("--level-time-limit", default=120.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds a level may take; requests unanswered by then count as errors.")
@click.option("--label", default=None, help="Name of the run in the results (default: the folder's name).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="JSON output file.")
def bench_serve_cmd(run_dir, requests, concurrency, max_batch, max_delay_ms, k, threads, level_time_limit, label, out):
    """Load-test a real `letter serve` process on loopback: requests/s, p50/p95/p99 latency and errors at
    each concurrency, with dynamic batching vs --max-batch 1 and with exclusion of the history vs none.
    Bounded: a fixed number of requests per level; it stops by itself."""
    from letter.bench.serve_load import run_serve_bench
    from letter.serve import require_serve_packages

    require_serve_packages()
    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise click.BadParameter(f"comma-separated integers, got {concurrency!r}", param_hint="--concurrency") from None
    if not levels or min(levels) < 1:
        raise click.BadParameter("give levels >= 1", param_hint="--concurrency")
    if len(set(levels)) != len(levels):  # the summary keys its ratios by level
        raise click.BadParameter(f"each level once, got {concurrency!r}", param_hint="--concurrency")
    result = run_serve_bench(run_dir, out=out, requests=requests, concurrency=levels, batched_max_batch=max_batch,
                             max_delay_ms=max_delay_ms, k=k, threads=threads, level_time_limit_s=level_time_limit,
                             label=label, log=click.echo)
    click.echo(json.dumps(result["summary"], indent=2))
