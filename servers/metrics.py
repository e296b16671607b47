"""Prometheus metrics for one server process, on their own port.

Each Application owns a CollectorRegistry (no module-level state, so several
servers can run in one process, as the tests do). Counters and histograms are
updated by the edge interceptor; gauges (active clusters, running executions,
outbox backlog, queue utilisation, fleet risk) are read from the components
at scrape time through `add_gauge_source`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["GaugeSource", "Metrics"]

log = logging.getLogger("aetherops.metrics")

GaugeSource = Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]
"""Yields (name, help, labels, value) at scrape time."""


GAUGE_READ_TIMEOUT_S = 2.0
"""How long a scrape waits for the event loop to read a gauge source (a loop busier than that leaves the
source out of that scrape, logged)."""


class _Gauges(Collector):  # type: ignore[misc]
    """Reads the gauge sources on the event loop they were registered on.

    The /metrics endpoint runs in its own thread, and the sources read the components' live state (the
    engine's clusters, the executions): iterated from that thread while the loop ingested, the
    engine's cluster map raised "dictionary changed size during iteration", so during an alert
    storm the correlation gauges went missing from scrapes, with a traceback logged for each.
    """

    def __init__(self) -> None:
        self.sources: list[tuple[asyncio.AbstractEventLoop | None, GaugeSource]] = []

    def collect(self) -> Iterable[Metric]:
        families: dict[str, GaugeMetricFamily] = {}
        for loop, source in self.sources:
            try:
                samples = _read(loop, source)
            except Exception:  # a failing source must not break the whole scrape
                log.exception("metrics source failed")
                continue
            for name, help_text, labels, value in samples:
                family = families.get(name)
                if family is None:
                    family = GaugeMetricFamily(name, help_text, labels=sorted(labels))
                    families[name] = family
                family.add_metric([labels[k] for k in sorted(labels)], value)
        return list(families.values())


def _read(loop: asyncio.AbstractEventLoop | None, source: GaugeSource) -> list[tuple[str, str, dict[str, str], float]]:
    """The source's samples, read on `loop` (at once when this is the loop's own thread, or no loop)."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is None or running is loop:
        return list(source())

    async def on_loop() -> list[tuple[str, str, dict[str, str], float]]:
        return list(source())

    return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(timeout=GAUGE_READ_TIMEOUT_S)


class Metrics:
    """The process's metrics and, once `serve` is called, their HTTP endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_total = Counter("aetherops_rpc_total", "RPCs handled", ["method", "code"], registry=self.registry)
        self.rpc_latency = Histogram(
            "aetherops_rpc_latency_seconds",
            "RPC latency",
            ["method", "code"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "aetherops_rate_limit_rejections_total", "Calls refused by rate limits", ["service"], registry=self.registry
        )
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._gauges = _Gauges()
        self.registry.register(self._gauges)
        self._server: WSGIServer | None = None
        self.port = 0

    def add_gauge_source(self, source: GaugeSource) -> None:
        """Reads `source` at every scrape, on the event loop running now (if any): see `_Gauges`."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._gauges.sources.append((loop, source))

    def observe(self, method: str, code: str, started: float) -> None:
        # labels() resolves and locks on every call; the children of a (method, code) pair never
        # change, so they are looked up once and kept: this sits on every RPC's path.
        children = self._children.get((method, code))
        if children is None:
            children = self._children[(method, code)] = (
                self.rpc_total.labels(method, code),
                self.rpc_latency.labels(method, code),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics endpoint (a daemon thread); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        self.port = int(server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
