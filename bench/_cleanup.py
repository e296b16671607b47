"""Benchmarks that create a schema and JetStream streams must drop them even when killed.

`asyncio.run` already turns Ctrl-C into a cancellation of the main task, so its `finally` blocks
run; a SIGTERM (`kill`, a CI job's timeout) would end the process without them and leave the
bench's schema and streams behind on a shared PostgreSQL and NATS.
"""

from __future__ import annotations

import asyncio
import signal

__all__ = ["cancel_on_sigterm"]


def cancel_on_sigterm() -> None:
    """Makes SIGTERM cancel the calling task (call it first thing in the bench's async main)."""
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("cancel_on_sigterm() must be called from a task")
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
