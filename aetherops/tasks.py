"""Stopping background tasks: cancel them and wait until they have ended, without swallowing a
cancellation of the caller; and letting go of tasks that nobody will await.

The usual idiom, ``task.cancel()`` then ``with suppress(CancelledError): await task``, also swallows
the CancelledError meant for the caller when the caller itself is cancelled while it waits (a
shutdown that is being cancelled would carry on as if nothing happened). `cancel_and_wait` never
catches a CancelledError at all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["abandon", "cancel_and_wait"]

log = logging.getLogger(__name__)


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
