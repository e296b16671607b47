"""Background tasks: running periodic work; stopping tasks (cancel them and wait until they have
ended, without swallowing a cancellation of the caller); letting go of tasks that nobody will await.

The usual idiom, ``task.cancel()`` then ``with suppress(CancelledError): await task``, also swallows
the CancelledError meant for the caller when the caller itself is cancelled while it waits (a
shutdown that is being cancelled would carry on as if nothing happened). `cancel_and_wait` never
catches a CancelledError at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["abandon", "cancel_and_wait", "periodically"]

log = logging.getLogger(__name__)


async def periodically(
    interval_s: float, work: Callable[[], Awaitable[object]], what: str, *, at_once: bool = False
) -> None:
    """Awaits `work()` every `interval_s` (the first time at once, or after one interval) until cancelled.

    A round that fails is logged as "`what` failed" and the next one tries again: periodic work must
    outlive a database that is away for a while. The pause is a period, not synchronisation.
    """
    if not at_once:
        await asyncio.sleep(interval_s)
    while True:
        try:
            await work()
        except Exception:  # CancelledError is not an Exception: cancelling stops the loop
            log.warning("%s failed; the next round, in %g s, tries again", what, interval_s, exc_info=True)
        await asyncio.sleep(interval_s)


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancels `tasks` and returns once every one has ended.

    If the caller is cancelled while waiting, that CancelledError propagates (the tasks stay
    cancelled). A task that ended with an exception other than its cancellation is logged, not
    raised: an owner that is stopping has nothing better to do with it.
    """
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task %s ended with an error while stopping", task.get_name(), exc_info=exc)


def abandon(*futures: asyncio.Future[Any]) -> None:
    """Lets go of futures nobody will await: they run to their end, and an error they end with is
    dropped instead of logged as "exception was never retrieved" when they are freed (the caller has
    already reported the failure that made it stop awaiting them)."""
    for future in futures:
        future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
