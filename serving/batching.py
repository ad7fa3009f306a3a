"""Micro-batching: images of concurrent requests wait a few milliseconds in a bounded queue and go through the model in
one forward pass, on one model thread. A full queue refuses at once (the caller answers 503 with Retry-After) instead of
letting waits grow without limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """More images are waiting than --queue_size allows; ``retry_after_s`` estimates when there will be room."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the model queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class _Waiting:
    item: Any
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    refused: int = 0

    @property
    def mean_batch(self) -> float:
        return self.images / self.batches if self.batches else 0.0


class MicroBatcher:
    """``await submit(items)`` returns ``run_batch(items of several requests)``'s answers for these items, in order.

    ``run_batch`` is called on a single worker thread (the model is not shared between threads), with at most
    ``max_batch_size`` items, after the first item of the batch waited at most ``max_wait_s`` for others, and only
    while others are on their way (``expecting``): a lone request is not kept waiting for company that is not coming."""

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch_size: int, max_wait_s: float,
                 queue_size: int, executor: Optional[concurrent.futures.ThreadPoolExecutor] = None):
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self.executor = executor or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.stats = BatchStats()
        self._queue: Optional[asyncio.Queue[_Waiting]] = None
        self._worker: Optional[asyncio.Task] = None
        self._seconds_per_image = 0.05  # updated from measured batches; only used for Retry-After
        self._incoming = 0  # images of requests still being decoded, which will be submitted shortly
        self._batch_running = False  # a batch is on the model thread: stop() lets it finish

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue else 0

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="micro-batcher")

    async def stop(self) -> None:
        """Answer what is queued and the batch being run, then stop the worker (the server stops taking requests
        before this)."""
        if self._worker is None:
            return
        while (self._batch_running or (self._queue is not None and not self._queue.empty())) and self.running:
            await asyncio.sleep(0.01)
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        self._worker = None

    @contextlib.contextmanager
    def expecting(self, count: int):
        """Around a request's decoding: ``count`` images are coming, worth waiting for."""
        self._incoming += count
        try:
            yield
        finally:
            self._incoming -= count

    async def submit(self, items: list[Any]) -> list[Any]:
        """All of a request's items are queued or none (a half-queued request would waste the model's time)."""
        if self._queue is None or not self.running:
            raise RuntimeError("the micro-batcher is not running")
        if self._queue.maxsize - self._queue.qsize() < len(items):
            self.stats.refused += 1
            backlog = self._queue.qsize() + len(items)
            raise QueueFull(max(1, round(backlog * self._seconds_per_image + self.max_wait_s)))
        loop = asyncio.get_running_loop()
        waiting = [_Waiting(item, loop.create_future()) for item in items]
        for entry in waiting:
            self._queue.put_nowait(entry)
        try:
            return list(await asyncio.gather(*(entry.future for entry in waiting)))
        except BaseException:
            for entry in waiting:  # a timed-out or dropped request: its images are skipped if not yet run
                entry.future.cancel()
            raise

    async def _next_batch(self) -> list[_Waiting]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0 or self._incoming <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [entry for entry in batch if not entry.future.done()]  # cancelled: the client is gone

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            start = time.perf_counter()
            self._batch_running = True
            try:
                answers = await loop.run_in_executor(self.executor, self.run_batch, [entry.item for entry in batch])
            except Exception as err:  # noqa: BLE001 - the requests of this batch fail, the service goes on
                logger.exception("a batch of %d images failed", len(batch))
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(err)
                continue
            finally:
                self._batch_running = False
            seconds = time.perf_counter() - start
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / len(batch)
            self.stats.batches += 1
            self.stats.images += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            for entry, answer in zip(batch, answers):
                if not entry.future.done():
                    entry.future.set_result(answer)
