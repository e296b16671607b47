"""GroupCommitter: concurrent callers share batches, results come back in order, failures reach
only the callers of the failed batch, and a full queue refuses work."""

from __future__ import annotations

import asyncio

import pytest

from aetherops.errors import ResourceExhaustedError, UnavailableError
from aetherops.services.batching import GroupCommitter


class Recorder:
    """A `process` that records its batches; holds each batch until released, or fails on `poison`."""

    def __init__(self, poison: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.poison = poison
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if self.poison is not None and self.poison in items:
            raise ValueError(f"bad item {self.poison}")
        return [i * 10 for i in items]


async def _let_tasks_start() -> None:
    # Tasks made with ensure_future run to their first await in the loop's next iteration, before
    # this coroutine resumes: by then each has queued its items.
    await asyncio.sleep(0)


async def test_callers_waiting_on_one_batch_share_the_next() -> None:
    rec = Recorder()
    committer: GroupCommitter[int, int] = GroupCommitter(rec, max_batch=100)
    committer.start()
    try:
        rec.gate.clear()
        first = asyncio.ensure_future(committer.submit(1))
        await asyncio.wait_for(rec.started.wait(), 5)
        # While batch 1 is "in the database", these queue up and go together.
        rest = [asyncio.ensure_future(committer.submit(i)) for i in range(2, 6)]
        many = asyncio.ensure_future(committer.submit_many([6, 7, 8]))
        await _let_tasks_start()
        assert committer.utilisation > 0 and not any(f.done() for f in rest)
        rec.gate.set()
        assert await first == 10
        assert [await f for f in rest] == [20, 30, 40, 50]
        assert await many == [60, 70, 80]
        assert rec.batches == [[1], [2, 3, 4, 5, 6, 7, 8]]
        assert committer.utilisation == 0
    finally:
        await committer.stop()


async def test_submit_many_larger_than_a_batch_spans_batches_in_order() -> None:
    rec = Recorder()
    committer: GroupCommitter[int, int] = GroupCommitter(rec, max_batch=4)
    committer.start()
    try:
        assert await committer.submit_many(list(range(10))) == [i * 10 for i in range(10)]
        assert [len(b) for b in rec.batches] == [4, 4, 2]
        assert [i for b in rec.batches for i in b] == list(range(10))
    finally:
        await committer.stop()


async def test_a_failed_batch_fails_its_callers_only_and_the_worker_goes_on() -> None:
    rec = Recorder(poison=3)
    committer: GroupCommitter[int, int] = GroupCommitter(rec, max_batch=2)
    committer.start()
    try:
        with pytest.raises(ValueError, match="bad item 3"):
            await committer.submit_many([1, 2, 3, 4])  # batches [1, 2] and [3, 4]: the second fails
        assert await committer.submit(5) == 50
    finally:
        await committer.stop()


async def test_a_full_queue_refuses_and_stop_fails_what_is_queued() -> None:
    rec = Recorder()
    committer: GroupCommitter[int, int] = GroupCommitter(rec, max_batch=10, max_queue=5)
    committer.start()
    rec.gate.clear()
    first = asyncio.ensure_future(committer.submit(0))
    await asyncio.wait_for(rec.started.wait(), 5)
    queued = asyncio.ensure_future(committer.submit_many([1, 2, 3, 4, 5]))
    await _let_tasks_start()
    assert committer.utilisation == 1.0
    with pytest.raises(ResourceExhaustedError):
        await committer.submit(6)
    await committer.stop()
    with pytest.raises(UnavailableError):
        await queued
    with pytest.raises(UnavailableError):
        await first
    with pytest.raises(UnavailableError):
        await committer.submit(7)
