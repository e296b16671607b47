"""The incident events behind every WatchClusters stream of one server: one NATS subscription,
each event parsed once and offered to the watchers whose filters it passes.

A watch that gives a start time first reads the incident events JetStream keeps (`history`), then
joins the live feed: see `CorrelationServicer.WatchClusters` for how nothing is missed or repeated.

Each stream used to subscribe on its own and parse every incident event, wanted or not: with a
few dashboards watching, the server parsed each event once per watcher, on the event loop that also
ingests alerts (8 watchers added 10-30 us per alert to a stream of new incidents). Filtering before
queueing also means a watcher's bounded queue holds only what it asked for, and `dropped` counts
only events it wanted and lost by falling behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy

from aetherops.bus import Bus
from aetherops.errors import WATCH_ENDED_BY_SHUTDOWN, UnavailableError
from gen.aetherops.correlation.v1 import correlation_pb2 as pb
from gen.aetherops.events.v1 import events_pb2

__all__ = ["IncidentFeed", "WatchItem", "Watcher"]

log = logging.getLogger("aetherops.correlation")

WatchItem = tuple["pb.ClusterEventType.ValueType", "pb.ClusterStatus.ValueType", events_pb2.Event]
"""(event type, cluster status, the event) as queued for a watcher."""

_KINDS: dict[str, tuple[pb.ClusterEventType.ValueType, pb.ClusterStatus.ValueType]] = {
    "incident_opened": (pb.CLUSTER_EVENT_TYPE_OPENED, pb.CLUSTER_STATUS_OPEN),
    "incident_updated": (pb.CLUSTER_EVENT_TYPE_UPDATED, pb.CLUSTER_STATUS_OPEN),
    "incident_acknowledged": (pb.CLUSTER_EVENT_TYPE_ACKNOWLEDGED, pb.CLUSTER_STATUS_OPEN),
    "incident_closed": (pb.CLUSTER_EVENT_TYPE_CLOSED, pb.CLUSTER_STATUS_CLOSED),
}


def incident_of(event: events_pb2.Event) -> events_pb2.Incident:
    """The incident an incident event carries, whichever kind it is."""
    kind = event.WhichOneof("payload")
    if kind == "incident_opened":
        return event.incident_opened.incident
    if kind == "incident_updated":
        return event.incident_updated.incident
    if kind == "incident_acknowledged":
        return event.incident_acknowledged.incident
    return event.incident_closed.incident


@dataclass(eq=False)
class Watcher:
    """One stream's filters and its bounded queue (a slow watcher loses events; ingestion never waits)."""

    event_types: frozenset[int]
    satellite_ids: frozenset[str]
    min_severity: int
    # None: the server is shutting down (see `IncidentFeed.end_streams`).
    queue: asyncio.Queue[WatchItem | None] = field(default_factory=lambda: asyncio.Queue(maxsize=1024))
    dropped: int = 0  # wanted events lost since the last one delivered

    def end(self) -> None:
        """Tell the stream the server is shutting down (ahead of one queued event, if the queue is full:
        the stream ends anyway, and that news matters more)."""
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    def wants(self, event_type: int, incident: events_pb2.Incident) -> bool:
        if self.event_types and event_type not in self.event_types:
            return False
        if (
            self.satellite_ids
            and self.satellite_ids.isdisjoint(incident.satellite_ids)
            # An event lists only the first satellites of an incident over thousands (see
            # events.Incident.satellite_count): a watched one may be further on, so it is delivered
            # rather than missed.
            and incident.satellite_count <= len(incident.satellite_ids)
        ):
            return False
        return not (self.min_severity and incident.max_severity < self.min_severity)


class IncidentFeed:
    """Subscribed while at least one watcher is registered."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._watchers: set[Watcher] = set()
        self._sub: Subscription | None = None
        self._lock = asyncio.Lock()  # subscribing and unsubscribing await: one at a time
        self._ending = False

    def _check_not_ending(self) -> None:
        if self._ending:
            raise UnavailableError(WATCH_ENDED_BY_SHUTDOWN)

    async def add(self, watcher: Watcher) -> None:
        self._check_not_ending()
        async with self._lock:
            if self._sub is None:
                self._sub = await self._bus.nc.subscribe(self._bus.subjects.incidents("*"), cb=self._on_message)
            self._watchers.add(watcher)

    async def remove(self, watcher: Watcher) -> None:
        # Forgotten at once, before any await: a stream cancelled again while it waits for the lock
        # must not stay registered.
        self._watchers.discard(watcher)
        async with self._lock:
            if not self._watchers and self._sub is not None:
                sub, self._sub = self._sub, None
                with contextlib.suppress(Exception):  # the connection may be closing already
                    await sub.unsubscribe()

    def end_streams(self) -> None:
        """Shutdown has begun: every watcher is told, and no new one is taken."""
        self._ending = True
        for watcher in self._watchers:
            watcher.end()

    async def close(self) -> None:
        async with self._lock:
            self._watchers.clear()
            if self._sub is not None:
                sub, self._sub = self._sub, None
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def history(
        self, watcher: Watcher, *, since: datetime | None = None, after_seq: int = 0
    ) -> AsyncIterator[tuple[int, WatchItem | None]]:
        """The incident events JetStream stored from `since` (or after stream sequence `after_seq`) up
        to the end of the stream as it is read, oldest first, as (stream sequence, the item if the
        watcher wants it). The first sequence yielded is the stream's last one when reading begins,
        with no item: where a later `history` may start even when nothing was read.

        Ends with UNAVAILABLE (`WATCH_ENDED_BY_SHUTDOWN`) at the next event once shutdown has begun: a
        replay of a day of events is not yet a registered watcher, and would otherwise hold the
        shutdown for its whole grace period."""
        self._check_not_ending()
        js = self._bus.js
        subject = self._bus.subjects.incidents("*")
        last = (await js.stream_info(self._bus.subjects.stream_for(subject))).state.last_seq
        yield max(last, after_seq), None
        if since is not None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1)
        sub = await js.subscribe(subject, ordered_consumer=True, config=config)
        try:
            # The consumer pushes at once: by now some (or all) may be delivered, and no longer pending.
            info = await sub.consumer_info()
            pending = (info.num_pending or 0) + (info.delivered.consumer_seq if info.delivered else 0)
            while pending:
                try:
                    msg = await sub.next_msg(timeout=10)
                except TimeoutError:  # nats-py's is one too: what was pending expired (max age) meanwhile
                    return
                self._check_not_ending()
                pending = msg.metadata.num_pending  # after this one, as the message left the server
                item = _item(msg)
                wanted = item is not None and watcher.wants(item[0], incident_of(item[2]))
                yield msg.metadata.sequence.stream, item if wanted else None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_message(self, msg: Msg) -> None:
        item = _item(msg)
        if item is None:
            return
        incident = incident_of(item[2])
        for watcher in self._watchers:
            if not watcher.wants(item[0], incident):
                continue
            try:
                watcher.queue.put_nowait(item)
            except asyncio.QueueFull:
                watcher.dropped += 1


def _item(msg: Msg) -> WatchItem | None:
    """The watch item an incident event message makes (None for anything else)."""
    event = events_pb2.Event()
    try:
        event.ParseFromString(msg.data)
    except DecodeError:
        log.warning("ignoring an undecodable message on %s", msg.subject)
        return None
    kinds = _KINDS.get(event.WhichOneof("payload") or "")
    if kinds is None:
        return None
    return kinds[0], kinds[1], event
