"""Dynamic batching: concurrent requests gathered into one batched beam search.

Requests wait in a bounded asyncio queue. One worker task takes the first waiting request, then
keeps taking more until it holds `max_batch` or `max_delay_s` has passed since the first, and runs
the whole batch as ONE call of `run_batch` (one model forward per decode step for all of them) in
a single worker thread, so the event loop keeps accepting and answering requests meanwhile; what
arrives during a search is batched next. A request whose client went away before its batch starts
is dropped from the batch; one that goes away later costs only its own row.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable


class QueueFullError(Exception):
    """The request queue holds `queue_size` waiting requests."""


@dataclass
class _Waiting:
    query: Any
    future: asyncio.Future


class DynamicBatcher:
    """Gathers submitted queries into batches for `run_batch(queries) -> results` (same order)."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: int = 32, max_delay_s: float = 0.002,
                 queue_size: int = 1024):
        if max_batch < 1 or max_delay_s < 0 or queue_size < 1:
            raise ValueError(f"need max_batch >= 1, max_delay_s >= 0, queue_size >= 1; got {max_batch}, "
                             f"{max_delay_s}, {queue_size}")
        self.run_batch = run_batch
        self.max_batch, self.max_delay_s, self.queue_size = max_batch, max_delay_s, queue_size
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.stats = {"batches": 0, "requests": 0, "dropped": 0, "largest_batch": 0, "search_s": 0.0}

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="letter-search")
        self._worker = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, queries: list) -> list:
        """Queue `queries` (all or none) and wait for their results. Raises QueueFullError when they
        do not fit, and the exception of a failed batch."""
        if self.queue_size - self._queue.qsize() < len(queries):
            raise QueueFullError(f"the request queue is full ({self._queue.qsize()} of {self.queue_size} waiting)")
        loop = asyncio.get_running_loop()
        waiting = [_Waiting(q, loop.create_future()) for q in queries]
        for w in waiting:
            self._queue.put_nowait(w)
        try:
            return list(await asyncio.gather(*(w.future for w in waiting)))
        finally:
            for w in waiting:  # a cancelled caller (client gone): its rows are skipped if not started
                w.future.cancel()

    async def _gather(self) -> list[_Waiting]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_delay_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            live = [w for w in batch if not w.future.done()]
            self.stats["dropped"] += len(batch) - len(live)
            if not live:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [w.query for w in live])
            except Exception as e:  # handed to every caller of the batch; the worker keeps serving
                for w in live:
                    if not w.future.done():
                        w.future.set_exception(e)
                continue
            finally:
                self.stats["search_s"] += time.perf_counter() - started
            self.stats["batches"] += 1
            self.stats["requests"] += len(live)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(live))
            for w, result in zip(live, results):
                if not w.future.done():
                    w.future.set_result(result)
