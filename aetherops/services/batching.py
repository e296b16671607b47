"""Group commit: concurrent callers share one transaction.

Callers `submit` items and await their results; one worker takes everything
queued (up to `max_batch`), hands the batch to `process`, and resolves every
caller's future when the batch committed. While a transaction is in flight the
next batch accumulates, so durability costs one commit per batch, not per item.
A full queue refuses new work with ResourceExhaustedError instead of growing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from aetherops.errors import ResourceExhaustedError, UnavailableError

__all__ = ["GroupCommitter"]

Item = TypeVar("Item")
Result = TypeVar("Result")

log = logging.getLogger("aetherops.batching")


@dataclass
class _Request(Generic[Item, Result]):
    """One caller's items (at most `max_batch`) and the future of their results: a stream's chunk of
    a thousand alerts costs one future, not a thousand."""

    items: Sequence[Item]
    future: asyncio.Future[list[Result]]


class GroupCommitter(Generic[Item, Result]):
    """Batches items from concurrent callers into calls of `process` (one transaction each).

    `process(items)` returns one result per item, in order, or raises: then every
    caller in that batch gets the exception.
    """

    def __init__(
        self,
        process: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch: int = 2000,
        max_queue: int = 50_000,
        name: str = "group-commit",
    ) -> None:
        self._process = process
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._name = name
        self._queue: list[_Request[Item, Result]] = []
        self._queued = 0  # items in the queue
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.items = 0

    @property
    def utilisation(self) -> float:
        """Queued items over capacity, 0..1 (drives adaptive rate limits)."""
        return self._queued / self._max_queue

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for request in self._queue:
            if not request.future.done():
                request.future.set_exception(UnavailableError("server is shutting down"))
        self._queue.clear()
        self._queued = 0

    def _enqueue(self, items: Sequence[Item]) -> list[asyncio.Future[list[Result]]]:
        if self._task is None:
            raise UnavailableError(f"{self._name} is not running")
        if self._queued + len(items) > self._max_queue:
            raise ResourceExhaustedError(f"{self._name}: ingest queue is full", retry_after_s=0.5)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[list[Result]]] = []
        step = self._max_batch
        for start in range(0, len(items), step):
            future: asyncio.Future[list[Result]] = loop.create_future()
            self._queue.append(_Request(items[start : start + step], future))
            futures.append(future)
        self._queued += len(items)
        self._wakeup.set()
        return futures

    async def submit(self, item: Item) -> Result:
        (future,) = self._enqueue([item])
        return (await future)[0]

    async def submit_many(self, items: Sequence[Item]) -> list[Result]:
        """All items in order; they may span several batches. Raises the first batch error."""
        futures = self._enqueue(items)
        if len(futures) == 1:
            return await futures[0]
        return [r for part in await asyncio.gather(*futures) for r in part]

    def _take(self) -> list[_Request[Item, Result]]:
        """Whole requests from the head of the queue, up to `max_batch` items (at least one request)."""
        queue, total, n = self._queue, 0, 0
        while n < len(queue) and (n == 0 or total + len(queue[n].items) <= self._max_batch):
            total += len(queue[n].items)
            n += 1
        taken = queue[:n]
        del queue[:n]
        self._queued -= total
        return taken

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._take()
            items = [item for request in batch for item in request.items]
            try:
                results = await self._process(items)
                if len(results) != len(items):
                    raise RuntimeError(f"{len(results)} results for {len(items)} items")
            except asyncio.CancelledError:
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(UnavailableError("server is shutting down"))
                raise
            except Exception as exc:
                log.warning("%s: batch of %d failed: %s", self._name, len(items), exc)
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(items)
            start = 0
            for request in batch:
                end = start + len(request.items)
                if not request.future.done():
                    request.future.set_result(list(results[start:end]))
                start = end
