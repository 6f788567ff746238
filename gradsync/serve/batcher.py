"""Dynamic batching: requests that arrive close together are computed as one batch, split
across the replicas as training splits a batch across workers.

A batch closes when it holds ``max_batch`` rows or ``max_delay_s`` after its first request
arrived, whichever comes first (a request larger than ``max_batch`` is a batch alone). Its rows
(concatenated in arrival order) are cut into one contiguous piece per live replica, and each
request gets back exactly its own rows of the logits. At most ``PIPELINE_DEPTH`` batches are
in flight: while one computes the next is formed and queued, and requests arriving meanwhile
wait to join a bigger batch, which is what batching is for.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from ..split import chunk_bounds
from .metrics import ServeMetrics
from .replicas import ReplicaCrashed, ReplicaJobError, ReplicaPool

log = logging.getLogger(__name__)

# Two batches in flight: each replica has its next piece queued while it computes one.
PIPELINE_DEPTH = 2


def split_rows(rows: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``range(rows)`` into ``min(parts, rows)`` contiguous pieces whose sizes differ by
    at most one (the larger first), as ``(start, stop)``: no replica gets an empty piece."""
    return chunk_bounds(rows, max(1, min(parts, rows)))


@dataclass
class _Waiting:
    rows: np.ndarray  # (n, row_size), the model's input dtype
    future: asyncio.Future


class Batcher:
    """Collects requests into batches and computes them on ``pool``.

    Args:
        pool: the replicas.
        max_batch: rows at which a batch closes at once.
        max_delay_s: longest a batch waits for more requests after its first.
        metrics: where batch sizes go.
    """

    def __init__(self, pool: ReplicaPool, max_batch: int, max_delay_s: float,
                 metrics: ServeMetrics):
        self.pool = pool
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.metrics = metrics
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._carry: _Waiting | None = None  # did not fit the last batch: opens the next
        self._in_flight = asyncio.Semaphore(PIPELINE_DEPTH)
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        """Outputs ``(n, output row_size)`` for ``rows`` ``(n, row_size)``, computed in some
        batch.

        Raises:
            ReplicaLost, ReplicaJobError: the piece holding some of these rows failed.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Waiting(rows, future))
        return await future

    async def _next(self, timeout: float | None) -> _Waiting | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait() if not self._queue.empty() else None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._in_flight.acquire()
            first = await self._next(None)
            batch, count = [first], len(first.rows)
            deadline = loop.time() + self.max_delay_s
            while count < self.max_batch:
                item = await self._next(deadline - loop.time())
                if item is None:
                    break
                if count + len(item.rows) > self.max_batch:
                    self._carry = item
                    break
                batch.append(item)
                count += len(item.rows)
            task = loop.create_task(self._compute(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _compute(self, batch: list[_Waiting]) -> None:
        try:
            rows = np.concatenate([w.rows for w in batch]) if len(batch) > 1 else batch[0].rows
            self.metrics.batch_rows.labels(self.pool.source.name).observe(len(rows))
            pieces = split_rows(len(rows), max(1, self.pool.live))
            results = await asyncio.gather(
                *(self.pool.infer(rows[a:b]) for a, b in pieces), return_exceptions=True)
            if len(batch) > 1 and any(_model_failed(r) for r in results):
                await self._each_alone(batch)
                return
            start = 0
            for waiting in batch:
                stop = start + len(waiting.rows)
                if not waiting.future.done():  # (its client may have gone)
                    _answer(waiting, start, stop, pieces, results)
                start = stop
        finally:
            self._in_flight.release()

    async def _each_alone(self, batch: list[_Waiting]) -> None:
        """The model failed on a piece: one request's rows can do that to the rows batched
        with it (a token id past the vocabulary), so each request is computed alone and only
        the guilty one is answered with the error."""
        results = await asyncio.gather(*(self.pool.infer(w.rows) for w in batch),
                                       return_exceptions=True)
        for waiting, result in zip(batch, results):
            if waiting.future.done():
                continue
            if isinstance(result, BaseException):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)

    async def close(self) -> None:
        """Finish the batches in flight; then stop forming batches."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)


def _model_failed(result) -> bool:
    """Whether a piece's result is the model's error (not a lost or crashed replica)."""
    return isinstance(result, ReplicaJobError) and not isinstance(result, ReplicaCrashed)


def _answer(waiting: _Waiting, start: int, stop: int, pieces: list[tuple[int, int]],
            results: list) -> None:
    """Give one request rows ``start:stop`` of the batch, or the error of a piece it
    overlaps."""
    parts = []
    for (a, b), result in zip(pieces, results):
        if b <= start or a >= stop:
            continue
        if isinstance(result, BaseException):
            waiting.future.set_exception(result)
            return
        parts.append(result[max(start, a) - a:min(stop, b) - a])
    waiting.future.set_result(np.concatenate(parts) if len(parts) > 1 else parts[0])
