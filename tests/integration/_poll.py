"""The one bounded poll the integration tests use.

Only for conditions that live outside the test's event loop (PostgreSQL, NATS, another server's
consumer), where there is nothing in-process to await; it fails with what it waited for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(check: Callable[[], Awaitable[Any]], *, timeout_s: float = 15.0, what: str = "condition") -> Any:
    """Calls `check` until it returns something truthy, and returns that; AssertionError after timeout_s."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)  # bounded poll of an external system
