"""periodically: a failed round is logged and the next one runs; cancelling stops it.
cancel_and_wait: the tasks end, the caller's own cancellation is never swallowed, and a task's
error is logged rather than lost or raised. abandon: a task nobody awaits runs to its end, and its
error is not logged as never retrieved."""

from __future__ import annotations

import asyncio
import gc

import pytest

from aetherops.tasks import abandon, cancel_and_wait, periodically


async def test_periodic_work_survives_a_failed_round_and_stops_when_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rounds: list[int] = []
    third = asyncio.Event()

    async def work() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise ConnectionError("database away")
        if len(rounds) == 3:
            third.set()

    task = asyncio.create_task(periodically(0.001, work, "test work", at_once=True))
    await asyncio.wait_for(third.wait(), 5)
    await cancel_and_wait(task)
    assert task.cancelled()
    assert "test work failed" in caplog.text and "database away" in caplog.text


async def test_cancels_and_waits_until_every_task_has_ended() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    tasks = [asyncio.create_task(forever()) for _ in range(3)]
    await asyncio.wait_for(started.wait(), 5)
    await cancel_and_wait(*tasks)
    assert all(t.cancelled() for t in tasks)
    await cancel_and_wait()  # nothing to stop


async def test_a_caller_cancelled_while_it_waits_is_cancelled() -> None:
    # A task that takes its time to stop (a flush on cancellation): the caller is cancelled meanwhile.
    release, running, stopping = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            running.set()
            await asyncio.Event().wait()
        finally:
            stopping.set()
            await release.wait()

    task = asyncio.create_task(slow_to_stop())
    await asyncio.wait_for(running.wait(), 5)
    after = []

    async def owner() -> None:
        await cancel_and_wait(task)
        after.append("went on")  # what `suppress(CancelledError)` around `await task` would reach

    stopper = asyncio.create_task(owner())
    await asyncio.wait_for(stopping.wait(), 5)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert after == []
    release.set()
    await asyncio.wait_for(asyncio.wait([task]), 5)
    assert task.cancelled()


async def test_a_task_that_failed_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(broken(), name="broken-worker")
    await asyncio.wait([task])
    await cancel_and_wait(task)
    assert any("broken-worker" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_an_abandoned_task_runs_to_its_end_and_its_error_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()
    ran: list[str] = []

    async def fails(name: str) -> None:
        await release.wait()
        ran.append(name)
        raise ValueError(name)

    abandon(asyncio.ensure_future(fails("abandoned")))
    kept = asyncio.ensure_future(fails("kept"))  # the control: the same, not abandoned
    release.set()
    await asyncio.wait_for(asyncio.wait([kept]), 5)
    assert sorted(ran) == ["abandoned", "kept"]
    del kept
    gc.collect()
    logged = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert len(logged) == 1 and "kept" in logged[0]
