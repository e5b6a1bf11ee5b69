"""`letter serve`: a train-rec run (TIGER or LC-Rec) loaded once behind a JSON HTTP API with
dynamic batching (needs the `serve` extra: pip install -e .[serve]).

  create_app(RunRecommender(run_dir), max_batch=32, max_delay_ms=2, queue_size=1024, tokenizer=None,
             max_body_bytes=None) -> FastAPI app
  serve(run_dir, host="127.0.0.1", port=8000, ...)     load the run and run uvicorn (blocking)
"""
import gc
import socket

from letter.errors import LetterError, SettingError
from letter.rec.recommend import DEFAULT_BEAMS


def require_serve_packages() -> None:
    """One clear line when the optional web stack is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LetterError(f"letter serve needs the serve extra ({e.name} is missing): pip install -e .[serve]") from None


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: a free one), or one SettingError naming port and
    host (a taken port, an unknown host)."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses the port at once
        sock.bind(address)
        return sock
    except OSError as e:
        if sock is not None:
            sock.close()
        raise SettingError("port", f"{port}: cannot listen on host {host} ({e.strerror or e})", "host") from None


def serve(run_dir: str, *, data=None, device: str = "cpu", beams: int = DEFAULT_BEAMS, host: str = "127.0.0.1",
          port: int = 8000, max_batch: int = 32, max_delay_ms: float = 2.0, queue_size: int = 1024,
          log_level: str = "warning", log=None, index_version: int | None = None, max_new_share: float | None = None,
          tokenizer: str | None = None, allow_other_data: bool = False, max_body_bytes: int | None = None) -> None:
    """Load `run_dir` once (its index version `index_version`, default the newest) and serve it
    until interrupted; with `tokenizer` (the run's tokenizer folder) POST /items adds items.
    allow_other_data: serve with a dataset whose content is not the one the run was trained on.
    max_body_bytes: larger request bodies are answered 413 (default: see app.default_max_body_bytes)."""
    require_serve_packages()
    import uvicorn

    from letter.rec.recommend import RunRecommender

    from .app import create_app

    sock = bound_socket(host, port)  # first: a taken port fails before the run is loaded
    port = sock.getsockname()[1]  # the one taken (for port 0)
    try:
        run = RunRecommender(run_dir, data=data, device=device, beams=beams, index_version=index_version,
                             max_new_share=max_new_share, allow_other_data=allow_other_data)
        app = create_app(run, max_batch=max_batch, max_delay_ms=max_delay_ms, queue_size=queue_size,
                         tokenizer=tokenizer, max_body_bytes=max_body_bytes)
        # Freeze what exists now (the imported modules and the loaded run: ~370k tracked objects for the
        # synthetic TIGER) out of the cyclic GC: else every full collection scans them all, a ~300 ms
        # pause of the event loop and the search thread together (the stall seen in `bench serve`).
        gc.collect()
        gc.freeze()
        meta = run.metadata()
        log = log or (lambda message: print(message, flush=True))
        log(f"serving {meta['model']} run {run.run_dir} ({meta['dataset']}, {meta['items']} items, index "
            f"{meta['index']['version']}) on http://{host}:{port} (API docs: /docs; bodies up "
            f"to {app.state.max_body_bytes} bytes)")
        server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # Ctrl-C: the server stopped cleanly (as uvicorn.run takes it)
            pass
        if not server.started:  # uvicorn logged why (e.g. the app's startup failed)
            raise LetterError(f"the server on port {port} did not start (see the log line above)")
    finally:
        gc.unfreeze()  # frozen objects are never collected at exit: the bindings would report them as leaks
        sock.close()
