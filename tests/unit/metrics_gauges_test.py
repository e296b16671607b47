"""Gauge sources are read on the event loop that owns the state they read, not on the scraper's thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

from prometheus_client import generate_latest

from servers.metrics import Metrics


async def test_gauges_are_read_on_the_event_loop_not_the_scrapers_thread() -> None:
    # The /metrics endpoint scrapes from a thread of its own; a source iterating the engine's clusters
    # there while the loop changed them failed with "dictionary changed size during iteration".
    metrics = Metrics()
    readers: list[int] = []

    def source() -> Iterator[tuple[str, str, dict[str, str], float]]:
        readers.append(threading.get_ident())
        yield ("aetherops_test_clusters", "clusters", {}, 3.0)

    metrics.add_gauge_source(source)
    text = await asyncio.to_thread(generate_latest, metrics.registry)
    assert b"aetherops_test_clusters 3.0" in text
    assert readers == [threading.get_ident()]
    # A scrape from the loop's own thread reads at once (waiting on the loop from it would deadlock).
    assert b"aetherops_test_clusters 3.0" in generate_latest(metrics.registry)
