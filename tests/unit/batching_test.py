"""GroupCommitter: concurrent callers share batches, results come back in order, failures reach
only the callers of the failed batch, a full queue refuses work, and under bulk load the next batch
is prepared while the previous one is written (and prepared again if that write fails)."""

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


async def _as_is(items: list[int]) -> list[int]:
    return items


def _committer(write: Recorder, **kw: int) -> GroupCommitter[int, list[int], int]:
    return GroupCommitter(_as_is, write, **kw)


async def _let_tasks_start() -> None:
    # Tasks made with ensure_future run to their first await in the loop's next iteration, before
    # this coroutine resumes: by then each has queued its items.
    await asyncio.sleep(0)


async def test_callers_waiting_on_one_batch_share_the_next() -> None:
    rec = Recorder()
    committer = _committer(rec, max_batch=100)
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
    committer = _committer(rec, max_batch=4)
    committer.start()
    try:
        assert await committer.submit_many(list(range(10))) == [i * 10 for i in range(10)]
        assert [len(b) for b in rec.batches] == [4, 4, 2]
        assert [i for b in rec.batches for i in b] == list(range(10))
    finally:
        await committer.stop()


async def test_a_failed_batch_fails_its_callers_only_and_the_worker_goes_on() -> None:
    rec = Recorder(poison=3)
    committer = _committer(rec, max_batch=2)
    committer.start()
    try:
        with pytest.raises(ValueError, match="bad item 3"):
            await committer.submit_many([1, 2, 3, 4])  # batches [1, 2] and [3, 4]: the second fails
        assert await committer.submit(5) == 50
    finally:
        await committer.stop()


async def test_a_full_queue_refuses_and_stop_fails_what_is_queued() -> None:
    rec = Recorder()
    committer = _committer(rec, max_batch=10, max_queue=5)
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


async def test_a_byte_budget_refuses_what_would_overflow_it_but_lets_an_oversized_request_through_alone() -> None:
    rec = Recorder()
    committer: GroupCommitter[int, list[int], int] = GroupCommitter(
        _as_is, rec, max_batch=100, max_queue=100, max_queue_bytes=10, size_of=lambda item: item
    )
    committer.start()
    rec.gate.clear()
    try:
        first = asyncio.ensure_future(committer.submit(50))  # larger than the budget, but nothing is queued
        await asyncio.wait_for(rec.started.wait(), 5)
        queued = asyncio.ensure_future(committer.submit_many([4, 5]))
        await _let_tasks_start()
        assert committer.utilisation == 0.9  # by bytes; by items it is 0.02
        with pytest.raises(ResourceExhaustedError, match="9 bytes waiting"):
            await committer.submit(2)
        assert await asyncio.wait_for(asyncio.gather(committer.submit(1), _released(rec)), 5) == [10, None]
        assert await first == 500
        assert await queued == [40, 50]
        assert committer.utilisation == 0.0
        assert await committer.submit(10) == 100  # the budget is free again
    finally:
        await committer.stop()


async def _released(rec: Recorder) -> None:
    rec.gate.set()


def test_a_byte_budget_needs_a_size() -> None:
    with pytest.raises(ValueError, match="go together"):
        GroupCommitter(_as_is, Recorder(), max_queue_bytes=10)


async def _submit_after(committer: GroupCommitter[int, list[int], int], item: int, turns: int) -> int:
    """A caller that reaches the committer `turns` event-loop turns from now (as a gRPC call that
    grpc-core accepted reaches its handler a few turns later)."""
    for _ in range(turns):
        await asyncio.sleep(0)
    return await committer.submit(item)


@pytest.mark.parametrize("linger_turns", [0, 16])
async def test_after_a_batch_of_several_callers_the_next_waits_for_callers_on_their_way(linger_turns: int) -> None:
    rec = Recorder()
    committer = _committer(rec, max_batch=100, linger_turns=linger_turns)
    committer.start()
    try:
        assert await asyncio.gather(committer.submit(1), committer.submit(2)) == [10, 20]
        # Two callers made the last batch: the worker waits up to 16 turns for more before taking one.
        assert await asyncio.gather(committer.submit(3), _submit_after(committer, 4, 8)) == [30, 40]
        if linger_turns:
            assert rec.batches == [[1, 2], [3, 4]]
        else:
            assert rec.batches == [[1, 2], [3], [4]]
    finally:
        await committer.stop()


async def test_a_lone_caller_is_not_kept_waiting_and_lingering_ends_at_a_full_batch() -> None:
    rec = Recorder()
    committer = _committer(rec, max_batch=3, linger_turns=10**9)
    committer.start()
    try:
        async with asyncio.timeout(5):  # a worker that lingers here would wait for ever
            assert await committer.submit(1) == 10
            # The last batch had one caller: the next is taken at once, without the one 8 turns away.
            assert await asyncio.gather(committer.submit(2), _submit_after(committer, 3, 8)) == [20, 30]
            assert rec.batches == [[1], [2], [3]]
            await asyncio.gather(committer.submit(4), committer.submit(5))
            # After a batch of two the worker waits, but three items fill a batch.
            await asyncio.gather(committer.submit(6), _submit_after(committer, 7, 4), _submit_after(committer, 8, 8))
            assert rec.batches[-1] == [6, 7, 8]
    finally:
        await committer.stop()


class Pipeline:
    """A prepare and a write that log what they do; each write waits for its own release."""

    def __init__(self, fail_write: int | None = None) -> None:
        self.log: list[str] = []
        self.fail_write = fail_write
        self.releases: dict[int, asyncio.Event] = {}
        self.writing: dict[int, asyncio.Event] = {}

    async def prepare(self, items: list[int]) -> list[int]:
        self.log.append(f"prepare {items[0]}")
        return items

    def release(self, first: int) -> None:
        self.releases.setdefault(first, asyncio.Event()).set()

    async def wait_writing(self, first: int) -> None:
        await asyncio.wait_for(self.writing.setdefault(first, asyncio.Event()).wait(), 5)

    async def write(self, items: list[int]) -> list[int]:
        first = items[0]
        self.log.append(f"write {first}")
        self.writing.setdefault(first, asyncio.Event()).set()
        await self.releases.setdefault(first, asyncio.Event()).wait()
        if first == self.fail_write:
            self.fail_write = None
            raise ValueError(f"write {first} failed")
        self.log.append(f"committed {first}")
        return [i * 10 for i in items]


async def _bulk(p: Pipeline) -> tuple[GroupCommitter[int, list[int], int], asyncio.Future[list[int]]]:
    """A running committer (batches of 2) given 1..6 at once, once it writes batch 1."""
    committer: GroupCommitter[int, list[int], int] = GroupCommitter(p.prepare, p.write, max_batch=2)
    committer.start()
    results = asyncio.ensure_future(committer.submit_many([1, 2, 3, 4, 5, 6]))
    await p.wait_writing(1)
    await _let_tasks_start()
    return committer, results


async def test_under_bulk_load_the_next_batch_is_prepared_while_one_is_written() -> None:
    p = Pipeline()
    committer, results = await _bulk(p)
    try:
        assert "prepare 3" in p.log and "committed 1" not in p.log, "batch 2 prepared while batch 1 is written"
        p.release(1)
        await p.wait_writing(3)
        p.release(3)
        p.release(5)
        assert await results == [10, 20, 30, 40, 50, 60]
        assert [e for e in p.log if not e.startswith("prepare")] == [
            "write 1",
            "committed 1",
            "write 3",
            "committed 3",
            "write 5",
            "committed 5",
        ], "writes one at a time, in order"
    finally:
        await committer.stop()


async def test_a_batch_prepared_during_a_failed_write_is_prepared_again() -> None:
    p = Pipeline(fail_write=1)
    committer: GroupCommitter[int, list[int], int] = GroupCommitter(p.prepare, p.write, max_batch=2)
    committer.start()
    try:
        first = asyncio.ensure_future(committer.submit_many([1, 2]))
        second = asyncio.ensure_future(committer.submit_many([3, 4]))
        third = asyncio.ensure_future(committer.submit_many([5, 6]))
        await p.wait_writing(1)
        await _let_tasks_start()
        p.release(1)
        with pytest.raises(ValueError, match="write 1 failed"):
            await first
        p.release(3)
        p.release(5)
        assert await second == [30, 40] and await third == [50, 60]
        # Prepared once while batch 1 was written, and again after that write failed.
        again = p.log.index("prepare 3", p.log.index("write 1"))
        assert p.log.count("prepare 3") == 2 and again < p.log.index("write 3")
    finally:
        await committer.stop()


async def test_stop_during_a_pipelined_write_fails_its_callers() -> None:
    committer, results = await _bulk(Pipeline())
    await committer.stop()
    with pytest.raises(UnavailableError):
        await results


async def test_an_exclusive_section_waits_for_the_batches_in_hand_and_holds_new_ones() -> None:
    p = Pipeline()
    committer, results = await _bulk(p)
    try:
        assert "prepare 3" in p.log, "batch 3 is in hand: prepared while batch 1 is written"
        entered, leave = asyncio.Event(), asyncio.Event()

        async def section() -> None:
            async with committer.exclusive():
                p.log.append("exclusive")
                entered.set()
                await leave.wait()

        task = asyncio.ensure_future(section())
        p.release(1)
        await p.wait_writing(3)
        assert not entered.is_set()
        p.release(3)
        await asyncio.wait_for(entered.wait(), 5)
        assert p.log[-3:] == ["write 3", "committed 3", "exclusive"], "entered once the batches in hand committed"
        late = asyncio.ensure_future(committer.submit(7))
        for _ in range(50):  # turns in which a worker that ignored the section would prepare batch 5
            await asyncio.sleep(0)
        assert p.log[-1] == "exclusive" and committer.utilisation > 0, "queued, but no batch taken"
        leave.set()
        await task
        p.release(5)
        p.release(7)
        assert await results == [10, 20, 30, 40, 50, 60] and await late == 70
    finally:
        await committer.stop()


async def test_an_exclusive_section_runs_at_once_without_a_worker_and_fails_when_the_worker_stops() -> None:
    p = Pipeline()
    committer: GroupCommitter[int, list[int], int] = GroupCommitter(p.prepare, p.write, max_batch=2)
    async with committer.exclusive():
        p.log.append("exclusive")
    assert p.log == ["exclusive"]
    committer.start()
    results = asyncio.ensure_future(committer.submit(1))
    await p.wait_writing(1)
    section = asyncio.ensure_future(committer.exclusive().__aenter__())
    await _let_tasks_start()
    assert not section.done(), "waits for the write in hand"
    await committer.stop()
    with pytest.raises(UnavailableError):
        await asyncio.wait_for(section, 5)
    with pytest.raises(UnavailableError):
        await results
