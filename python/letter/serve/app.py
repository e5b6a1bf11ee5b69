"""The HTTP API of `letter serve` (FastAPI; OpenAPI docs at /docs and /openapi.json).

  POST /recommend        {"history": [item ids], "k": 10, "exclude_history": true, "exclude": [item ids]}
                         -> {"items": [{"item_id", "title" (when the data has titles), "score", "rank", "code"}], ...}
  POST /recommend/batch  {"requests": [<as /recommend>, ...]} -> {"results": [<as /recommend>, ...]}
  GET  /healthz          liveness and queue length
  GET  /metadata         model, dataset, item count, identifier index version, server settings, counters
  POST /items            {"embeddings": [[...], ...]} rows of the served dataset's next items lacking
                         an identifier (catalog order) -> a new index version, served from then on
                         (needs --tokenizer; letter.rec.index_versions.add_items: never other data)

Errors are JSON {"error": "<field>: <what is wrong>", "field": "<field>"} with status 400 (malformed
JSON, an empty body, a body that is not UTF-8), 404 (unknown path), 405 (wrong method), 413 (a body over
--max-body-bytes, refused before it is parsed), 415 (a body not sent as application/json), 422
(a field's value: unknown item id, empty history, k out of range, wrong type, unknown field, a
batch longer than the queue) or 503 (the request queue is full; retry later),
never a stack trace.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from letter.errors import LetterError, SettingError
from letter.rec.recommend import Query, RunRecommender

from .batching import DynamicBatcher, QueueFullError

MAX_LIST = 10_000  # longest history / exclude list accepted (the model reads the last max_history items)
MAX_BATCH_REQUESTS = 1024
DEFAULT_K = 10  # a request's k when it gives none (or --beams, when smaller)
MIN_BODY_LIMIT = 1 << 20  # the default body limit never goes below 1 MiB (long single histories)
FLOAT_JSON_BYTES = 25  # the longest JSON text of a float32 value as Python writes it, with ", "
REQUEST_JSON_BYTES = 128  # the keys, k and flags of one request, with generous whitespace


def _id_as_text(value):
    """Item ids are strings as in the dataset files; JSON integers are accepted as their text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


ItemId = Annotated[str, BeforeValidator(_id_as_text)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[ItemId] = Field(min_length=1, max_length=MAX_LIST,
                                  description="Item ids the user interacted with, oldest first.")
    # strict: JSON true is not k 1, nor "yes" a boolean
    # no default value here: a k not given is min(10, --beams), which only the server knows
    k: StrictInt = Field(None, description=f"Number of identifiers to return (1 .. the server's --beams; "
                                           f"default {DEFAULT_K}, or --beams when smaller).")
    exclude_history: StrictBool = Field(True, description="Never return an item of the history.")
    exclude: list[ItemId] = Field(default_factory=list, max_length=MAX_LIST,
                                  description="Further item ids never to return.")


class AddItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # strict: JSON true or "0.5" is no embedding value (lax floats would code them into a new version)
    embeddings: list[list[StrictFloat]] = Field(min_length=1, max_length=MAX_LIST,
                                                description="Text embeddings of the next items to add, one row per item.")


class AddItemsResponse(BaseModel):
    version: int = Field(description="The index version now served.")
    added: int = Field(description="Items added (0: every item of the dataset already had an identifier).")
    items: list[str]
    indexed_items: int


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[RecommendRequest] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)


class RecommendedItem(BaseModel):
    item_id: str
    title: str | None = None
    score: float = Field(description="Sum of the identifier's token log-probabilities.")
    rank: int = Field(description="Rank of the item's identifier (items sharing one share its rank).")
    code: list[int]


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    k: int
    excluded: int = Field(description="Distinct items excluded (history and exclude).")


class BatchResponse(BaseModel):
    results: list[RecommendResponse]


class FieldError(Exception):
    """A request field with a bad value (-> 422 naming the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _is_json(content_type: str) -> bool:
    """Whether FastAPI reads a body of this Content-Type as JSON: application/json or application/*+json."""
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _field_name(loc) -> str:
    """('body', 'requests', 2, 'history', 0) -> 'requests[2].history[0]'."""
    name = ""
    for part in loc:
        if part == "body" and not name:
            continue
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


def _error(status: int, field: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": f"{field}: {message}", "field": field}, status_code=status, headers=headers)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read by then: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _answer_unless_gone(request: Request, work):
    """Await the coroutine `work`, cancelled when the client disconnects first: its queued rows are
    then dropped from their batch (the batcher skips cancelled requests). The server does not cancel
    a handler whose client left, so without this a gone client's request would still be searched."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client left (or this handler was cancelled)
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


class BodyTooLarge(HTTPException):
    """A request body over the server's limit (-> 413), raised while the body is read."""

    def __init__(self, limit: int):
        super().__init__(413, f"larger than the server's limit of {limit} bytes (--max-body-bytes)")


class BodyLimit:
    """ASGI middleware refusing a request body over `max_bytes` before anything parses it: at its
    first read when its Content-Length says so (nothing of it is read), else (a chunked body) as
    soon as the bytes read pass the limit, so at most the limit plus one received chunk is held.
    The BodyTooLarge raised from `receive` reaches the app's HTTPException handler (413 JSON)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        over = declared.isdigit() and int(declared) > self.max_bytes
        read = 0

        async def limited_receive():
            nonlocal read
            if over:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


def largest_request_bytes(run: RunRecommender, queue_size: int, embedding_dim: int | None = None) -> int:
    """Bytes of the largest legitimate request body: a /recommend/batch of min(queue_size,
    MAX_BATCH_REQUESTS) requests whose history and exclude lists each hold max_history (what the
    model reads) of the catalog's longest id, or, when items can be added (`embedding_dim`), a
    POST /items of every catalog item's row (the whole-catalog form; at most MAX_LIST rows)."""
    id_bytes = max(len(json.dumps(i)) for i in run.rec.dataset.item_ids) + 2  # with ", "
    request = 2 * run.config.max_history * id_bytes + REQUEST_JSON_BYTES
    batch = min(queue_size, MAX_BATCH_REQUESTS) * request
    items = min(run.num_items, MAX_LIST) * embedding_dim * FLOAT_JSON_BYTES if embedding_dim else 0
    return max(batch, items)


def default_max_body_bytes(run: RunRecommender, queue_size: int, tokenizer: str | None = None) -> int:
    """Twice the largest legitimate request (largest_request_bytes; the tokenizer's input width for
    POST /items, read from its model record without loading it), at least MIN_BODY_LIMIT."""
    from letter.tokenizer.inference import tokenizer_input_dim

    dim = tokenizer_input_dim(tokenizer) if tokenizer is not None else None
    return max(MIN_BODY_LIMIT, 2 * largest_request_bytes(run, queue_size, dim))


def create_app(run: RunRecommender, *, max_batch: int = 32, max_delay_ms: float = 2.0,
               queue_size: int = 1024, tokenizer: str | None = None, max_body_bytes: int | None = None) -> FastAPI:
    """The app serving `run` (already loaded); the batcher starts and stops with the app.
    `tokenizer`: the run's tokenizer folder, which POST /items needs. `max_body_bytes`: larger
    request bodies are answered 413 before they are parsed (default: default_max_body_bytes)."""
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(run, queue_size, tokenizer)
    if max_body_bytes < 1:
        raise SettingError("max_body_bytes", f"must be >= 1, got {max_body_bytes}")
    batcher = DynamicBatcher(run.recommend, max_batch, max_delay_ms / 1000.0, queue_size)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="LETTER recommender", version="1", lifespan=lifespan,
                  description=f"Serving {run.config.model} run {run.run_dir} on {run.rec.dataset.name}.")
    app.state.run, app.state.batcher, app.state.max_body_bytes = run, batcher, max_body_bytes
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        field = _field_name(first.get("loc", ()))
        if not _is_json(request.headers.get("content-type", "")):
            return _error(415, "body", "send the request as JSON with the header Content-Type: application/json")
        if first.get("type") == "json_invalid":
            return _error(400, "body", f"malformed JSON ({first.get('ctx', {}).get('error', first.get('msg'))})")
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):  # no bytes at all
            return _error(400, "body", "malformed JSON (the body is empty)")
        return _error(422, field, first.get("msg", "invalid value"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):  # raised by the framework itself
        field = {400: "body", 404: "path", 405: "method", 413: "body"}.get(exc.status_code, "request")
        return _error(exc.status_code, field, str(exc.detail), headers=exc.headers)

    @app.exception_handler(FieldError)
    async def bad_field(request: Request, exc: FieldError):
        return _error(422, exc.field, exc.message)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError):
        return _error(503, "queue", f"server busy: {exc}; retry later", headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a bug, not the client's: one line, no trace
        return _error(500, "server", f"internal error ({type(exc).__name__})")

    def to_query(req: RecommendRequest, prefix: str = "") -> Query:
        k = min(DEFAULT_K, run.beams) if req.k is None else req.k  # None: not given (null is refused)
        if not 1 <= k <= run.beams:
            raise FieldError(f"{prefix}k", f"must be in [1, {run.beams}] (the server's --beams), got {k}")
        for name, ids in (("history", req.history), ("exclude", req.exclude)):
            problem = run.unknown_ids(ids)
            if problem:
                raise FieldError(prefix + name, problem)
        problem = run.unindexed_ids(req.history)
        if problem:
            raise FieldError(prefix + "history", problem)
        return Query(tuple(run.positions(req.history)), k, req.exclude_history, tuple(run.positions(req.exclude)))

    def response(query: Query, items: list[dict]) -> RecommendResponse:
        return RecommendResponse(items=items, k=query.k, excluded=len(query.banned()))

    @app.post("/recommend", response_model=RecommendResponse, response_model_exclude_none=True)
    async def recommend(req: RecommendRequest, request: Request):
        query = to_query(req)
        results = await _answer_unless_gone(request, batcher.submit([query]))
        if results is None:  # nobody to answer
            return _error(499, "client", "disconnected before the answer")
        return response(query, results[0])

    @app.post("/recommend/batch", response_model=BatchResponse, response_model_exclude_none=True)
    async def recommend_batch(req: BatchRequest, request: Request):
        if len(req.requests) > batcher.queue_size:  # it could never fit: a 503 "retry later" would loop forever
            raise FieldError("requests", f"at most {batcher.queue_size} requests per batch (the server's "
                                         f"--queue-size), got {len(req.requests)}")
        queries = [to_query(r, f"requests[{i}].") for i, r in enumerate(req.requests)]
        results = await _answer_unless_gone(request, batcher.submit(queries))
        if results is None:
            return _error(499, "client", "disconnected before the answer")
        return BatchResponse(results=[response(q, items) for q, items in zip(queries, results)])

    @app.post("/items", response_model=AddItemsResponse)
    async def add_items(req: AddItemsRequest):
        if tokenizer is None:
            raise FieldError("body", "this server was started without --tokenizer, so it cannot add items")
        if len({len(row) for row in req.embeddings}) != 1:
            raise FieldError("embeddings", "rows must all have the same length")
        try:  # the tokenizer and the index write run in a worker thread; searches go on meanwhile
            record = await asyncio.to_thread(run.add_items, tokenizer, np.asarray(req.embeddings, dtype=np.float32))
        except LetterError as e:
            raise FieldError("embeddings", str(e)) from None
        return AddItemsResponse(version=record["version"], added=record["added"], items=record["items"],
                                indexed_items=record["indexed_items"])

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "waiting": batcher.waiting}

    @app.get("/metadata")
    async def metadata():
        return {**run.metadata(),
                "server": {"max_batch": batcher.max_batch, "max_delay_ms": batcher.max_delay_s * 1000.0,
                           "queue_size": batcher.queue_size, "max_body_bytes": max_body_bytes},
                "stats": dict(batcher.stats)}

    return app
