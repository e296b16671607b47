"""NATS JetStream: subjects, streams, the outbox relay and durable consumers.

Subjects are `aetherops.<area>.<event>` (prefixed by the namespace, when one
is set, so tests and tenants do not see each other). Streams are created
idempotently at start. Events leave only through the outbox relay, which
publishes committed rows in order with `Nats-Msg-Id` = event id, so a
re-publication after a crash or a NATS outage is dropped by JetStream's
duplicate window and consumers see each event once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError

from aetherops.db import outbox
from aetherops.db.pool import Connection, Database
from aetherops.errors import ResourceExhaustedError, UnavailableError
from aetherops.tracking import new_tracking_id, reset_tracking_id, set_tracking_id

__all__ = ["Bus", "DurableConsumer", "OutboxRelay", "Publication", "Subjects", "redelivery_delay"]

log = logging.getLogger("aetherops.bus")

HEADER_TRACKING_ID = "Aetherops-Tracking-Id"
HEADER_EVENT_TYPE = "Aetherops-Event-Type"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: list[str]
    max_age_s: float


class Subjects:
    """Subject and stream names under one namespace."""

    def __init__(self, namespace: str = "") -> None:
        self.namespace = namespace
        self.prefix = f"{namespace}.aetherops." if namespace else "aetherops."
        self._stream_prefix = f"{namespace.upper()}_" if namespace else ""

    def subject(self, *parts: str) -> str:
        return self.prefix + ".".join(parts)

    def event_type(self, subject: str) -> str:
        """The envelope's `type`: the subject without the prefix."""
        return subject.removeprefix(self.prefix)

    # Subjects named by the design.
    @property
    def alerts_ingest(self) -> str:
        return self.subject("alerts", "ingest")

    def incidents(self, event: str) -> str:
        return self.subject("incidents", event)

    def telemetry(self, satellite_id: str = "*", resource: str = "*") -> str:
        return self.subject("telemetry", satellite_id, resource)

    def action(self, name: str) -> str:
        return self.subject("actions", name)

    def runbook(self, event: str) -> str:
        return self.subject("runbook", event)

    def capacity(self, event: str) -> str:
        return self.subject("capacity", event)

    def streams(self) -> list[StreamSpec]:
        """Every stream AetherOps uses. `actions.>` is deliberately not captured:
        it is request/reply, and a stream would answer the requests itself."""
        day = 86400.0
        return [
            StreamSpec(self._stream_prefix + "INCIDENTS", [self.subject("incidents", ">")], 30 * day),
            StreamSpec(self._stream_prefix + "RUNBOOK", [self.subject("runbook", ">")], 30 * day),
            StreamSpec(self._stream_prefix + "CAPACITY", [self.subject("capacity", ">")], 30 * day),
            StreamSpec(self._stream_prefix + "ALERTS", [self.subject("alerts", ">")], 7 * day),
            StreamSpec(self._stream_prefix + "TELEMETRY", [self.subject("telemetry", ">")], 1 * day),
        ]

    def stream_for(self, subject: str) -> str:
        for spec in self.streams():
            if subject.startswith(spec.subjects[0][:-1]):
                return spec.name
        raise ValueError(f"no stream captures {subject}")


Publication = tuple[str, bytes, dict[str, str]]
"""(subject, payload, headers) of one message for `Bus.publish_all`."""


class _PendingAcks:
    """The acks one `publish_all` call waits for: `done` resolves when each index was acked once,
    or fails with the first refusal."""

    def __init__(self, key: str, prefix: str, count: int) -> None:
        self.key = key
        self._prefix = prefix
        self._unacked = set(range(count))
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def reply_to(self, index: int) -> str:
        return f"{self._prefix}{index}"

    def ack(self, index: int, msg: Msg) -> None:
        if self.done.done() or index not in self._unacked:
            return  # after a refusal, or a second reply to the same message
        if not msg.data and msg.headers and msg.headers.get(js_api.Header.STATUS) == "503":
            self.done.set_exception(NoStreamResponseError())
            return
        # A PubAck is small JSON ({"stream": .., "seq": ..}); only one that mentions an error is parsed.
        if b'"error"' in msg.data:
            refusal = _refusal(msg.data)
            if refusal is not None:
                self.done.set_exception(refusal)
                return
        self._unacked.discard(index)
        if not self._unacked:
            self.done.set_result(None)


def _refusal(data: bytes) -> Exception | None:
    """The error a JetStream reply carries, if it carries one."""
    try:
        reply = json.loads(data)
    except ValueError as exc:
        return APIError(description=f"unreadable JetStream reply: {exc}")
    if not isinstance(reply, dict) or "error" not in reply:
        return None
    try:
        APIError.from_error(reply["error"])  # raises the matching subclass (and only raises)
    except APIError as exc:
        return exc
    return APIError(description=str(reply["error"]))


class _AckInbox:
    """One subscription that receives the JetStream acks of every `publish_all` on a connection.

    nats-py's `publish_async` costs a semaphore, a fresh token (a system call for random bytes), a
    future with a callback, and a JSON parse into a PubAck per message: about 35 us of CPU each,
    against 20 us this way (20,000 messages in batches of 25). The relay publishes every event the
    services write, on the same core as the RPCs they serve.
    """

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._pending: dict[str, _PendingAcks] = {}
        self._sequence = 0

    @classmethod
    async def open(cls, nc: NatsClient) -> _AckInbox:
        inbox = cls(nc.new_inbox() + ".")
        # Reply subjects are <inbox>.<batch>.<index>; nats-py subscribes again after a reconnect.
        await nc.subscribe(inbox._prefix + "*.*", cb=inbox._on_reply)
        return inbox

    def expect(self, count: int) -> _PendingAcks:
        self._sequence += 1
        key = str(self._sequence)
        pending = self._pending[key] = _PendingAcks(key, f"{self._prefix}{key}.", count)
        return pending

    def forget(self, pending: _PendingAcks) -> None:
        # Late replies to a batch that timed out or failed find nothing and are dropped.
        self._pending.pop(pending.key, None)

    async def _on_reply(self, msg: Msg) -> None:
        key, _, index = msg.subject[len(self._prefix) :].partition(".")
        pending = self._pending.get(key)
        if pending is not None and index.isdigit():
            pending.ack(int(index), msg)


class Bus:
    """One NATS connection with JetStream, reconnecting for as long as the process lives."""

    def __init__(self, nc: NatsClient, subjects: Subjects) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.subjects = subjects
        self._acks: _AckInbox | None = None
        self.consumers: list[DurableConsumer] = []  # this connection's, for metrics

    @classmethod
    async def connect(cls, url: str, namespace: str = "", *, name: str = "aetherops", timeout_s: float = 5.0) -> Bus:
        async def on_error(exc: Exception) -> None:
            log.warning("NATS error: %s", exc)

        nc: NatsClient | None = None

        async def on_disconnect() -> None:
            # nats-py calls this on our own close too; that one is no news.
            if nc is None or not nc.is_closed:
                log.warning("NATS disconnected; reconnecting")

        async def on_reconnect() -> None:
            log.info("NATS reconnected")

        try:
            nc = await asyncio.wait_for(
                nats.connect(
                    url,
                    name=name,
                    connect_timeout=2,
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                ),
                timeout_s,
            )
        except (TimeoutError, OSError, NatsError) as exc:
            raise UnavailableError(f"NATS unreachable at {url}: {exc}") from exc
        return cls(nc, Subjects(namespace))

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def ensure_streams(self) -> None:
        """Creates or updates every stream; safe to run from several processes at once."""
        for spec in self.subjects.streams():
            config = js_api.StreamConfig(
                name=spec.name,
                subjects=spec.subjects,
                storage=js_api.StorageType.FILE,
                max_age=spec.max_age_s,
                duplicate_window=120.0,
            )
            try:
                await self.js.add_stream(config)
            except BadRequestError:
                # Exists with another config (a newer release changed it): update in place.
                await self.js.update_stream(config)

    async def publish_all(self, messages: Sequence[Publication], *, timeout_s: float = 10.0) -> None:
        """Publishes to JetStream in order, pipelined, and returns once every message is stored.

        Raises on the first refusal (an APIError, NoStreamResponseError when no stream captures a
        subject) or after `timeout_s`; then any of them may or may not be stored, and publishing them
        again with the same Nats-Msg-Id is how to finish (JetStream drops what it has).
        """
        if not messages:
            return
        if self._acks is None:
            self._acks = await _AckInbox.open(self.nc)
        batch = self._acks.expect(len(messages))
        try:
            for index, (subject, payload, headers) in enumerate(messages):
                await self.nc.publish(subject, payload, reply=batch.reply_to(index), headers=headers)
            async with asyncio.timeout(timeout_s):
                await batch.done
        finally:
            self._acks.forget(batch)

    async def close(self, drain_timeout_s: float = 2.0) -> None:
        """Drains (bounded: a stuck subscription must not hold shutdown for nats-py's 30 s) and closes."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(drain_timeout_s):
                await self.nc.drain()
        if not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()


class OutboxRelay:
    """Publishes committed outbox rows to JetStream, in order, exactly once per event id.

    One relay at a time holds the leader lock (a session advisory lock), so
    events stay in commit order across replicas. Writers call `wake()` after a
    commit so events leave at once instead of at the next poll.
    """

    LEADER_LOCK = "aetherops.outbox.relay"

    PRUNE_INTERVAL_S = 60.0
    PRUNE_CHUNK = 10_000

    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        batch_size: int = 1000,
        poll_interval_s: float = 0.5,
        retention_s: float = 7 * 86400.0,
        scan_floor: outbox.ScanFloor | None = None,
    ) -> None:
        """`scan_floor`: where claims start (see `outbox.ScanFloor`). It stays right when another relay
        leads for a while: rows below it are published, and published rows stay published."""
        self._db = db
        self._bus = bus
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._retention_s = retention_s
        self._prune_time = -math.inf
        self.pruned_total = 0
        self._wakeup = asyncio.Event()
        self.published_total = 0
        self.dead_lettered = 0  # events too large for NATS: marked published without being sent
        self.failures = 0
        # Events the full scan found below the floor: their transactions committed more than the
        # floor's lag after taking their ids, so they went out up to `full_scan_s` late.
        self.late_found = 0
        # Refreshed about once a second by the leader, read by the metrics scrape.
        self.backlog = 0
        self.oldest_age_s = 0.0
        self._stats_time = 0.0
        self._floor = scan_floor or outbox.ScanFloor()

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                # Its own connection, not a pooled one: the leader lock is session state and ends
                # with it. Every relay statement runs on it in autocommit (see `aetherops.db.outbox`).
                async with self._db.dedicated(outbox.RELAY_SETTINGS) as conn:
                    await self._lead(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep relaying through database or NATS outages
                self.failures += 1
                log.warning("outbox relay: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.1

    async def _lead(self, conn: Connection) -> None:
        key = f"{self.LEADER_LOCK}.{self._db.schema}"
        while not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
            await self._wait(self._poll_interval_s * 4)
        backoff = 0.1
        while True:
            try:
                sent = await self.drain_once(conn)
            except (TimeoutError, NatsError, NatsTimeoutError, OSError) as exc:
                self.failures += 1
                log.warning("outbox relay: NATS publish failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            await self._refresh_stats(conn)
            if sent < self._batch_size:
                await self._prune(conn)
                await self._wait(self._poll_interval_s)

    async def _refresh_stats(self, conn: Connection) -> None:
        now = time.monotonic()
        if now - self._stats_time < 1.0:
            return
        self._stats_time = now
        count, oldest = await outbox.backlog(conn, self._floor.value)
        self.backlog = count
        self.oldest_age_s = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0

    async def _prune(self, conn: Connection) -> int:
        """Deletes events published longer than the retention ago, at most once a minute and only
        when the backlog is drained (publishing comes first); returns how many went."""
        now = time.monotonic()
        if now - self._prune_time < self.PRUNE_INTERVAL_S:
            return 0
        self._prune_time = now
        pruned = 0
        while True:  # bounded chunks, each its own short transaction (autocommit)
            n = await outbox.prune_published(conn, self._retention_s, self.PRUNE_CHUNK)
            pruned += n
            if n < self.PRUNE_CHUNK:
                break
        if pruned:
            self.pruned_total += pruned
            log.info("outbox relay: pruned %d events published more than %.0fs ago", pruned, self._retention_s)
        return pruned

    async def _wait(self, timeout_s: float) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
        # arrives as the awaited event fires, and the relay would then never stop at shutdown.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wakeup.wait()
        self._wakeup.clear()

    def _late(self, rows: Sequence[outbox.OutboxRow], passed: int) -> None:
        """Counts and logs the rows a full scan found below the floor: a transaction that held its ids
        for longer than the floor's lag (see `outbox.ScanFloor`). Their events go out now, up to
        `full_scan_s` after they committed; a count that keeps growing means the lag is too short for
        some writer, or a writer holds its transaction open."""
        late = [row.id for row in rows if row.id < passed]
        self.late_found += len(late)
        log.warning(
            "outbox relay: %d event(s) (ids %s) committed more than %.0fs after taking their ids;"
            " found by the full scan, published late",
            len(late),
            ", ".join(map(str, late[:10])) + (", ..." if len(late) > 10 else ""),
            self._floor.lag_s,
        )

    async def drain_once(self, conn: Connection) -> int:
        """Publishes one batch; returns how many rows it published. Raises on a NATS failure
        (nothing is marked, the same rows go again later; JetStream drops what it already has by
        event id). `conn` is the leader's connection."""
        floor, now = self._floor, time.monotonic()
        if floor.mark_due(now):
            floor.mark(now, await outbox.last_id(conn))
        start, passed = floor.start(now), floor.value
        rows = await outbox.fetch_unpublished(conn, self._batch_size, start)
        floor.claimed(rows[0].id if rows else None)
        if rows and rows[0].id < passed:
            self._late(rows, passed)
        if not rows:
            return 0
        max_payload = self._bus.nc.max_payload
        sendable: list[Publication] = []
        for row in rows:
            headers = _headers(self._bus.subjects, row)
            size = len(row.payload) + _header_bytes(headers)
            if size > max_payload:
                # NATS refuses it, every time: retried, it would hold back every later event of
                # every service forever. It is marked published with the rest and stays in the
                # outbox table (until pruning) for whoever needs to look at it.
                self.dead_lettered += 1
                log.error(
                    "outbox relay: event %s on %s is %d bytes, over the NATS server's max_payload of %d;"
                    " not published (kept in the outbox table)",
                    row.event_id,
                    row.subject,
                    size,
                    max_payload,
                )
                continue
            sendable.append((row.subject, row.payload, headers))
        await self._bus.publish_all(sendable)
        await outbox.mark_published(conn, rows)
        self.published_total += len(sendable)
        return len(rows)


def _header_bytes(headers: dict[str, str]) -> int:
    """Size of the headers block on the wire ("NATS/1.0\r\n", "Key: Value\r\n" each, "\r\n"),
    which counts against max_payload together with the payload."""
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def _headers(subjects: Subjects, row: outbox.OutboxRow) -> dict[str, str]:
    headers = {"Nats-Msg-Id": row.event_id, HEADER_EVENT_TYPE: subjects.event_type(row.subject)}
    if row.tracking_id:
        headers[HEADER_TRACKING_ID] = row.tracking_id
    return headers


MessageHandler = Callable[[Msg], Awaitable[None]]


def _tracking_of(msg: Msg) -> str:
    value = (msg.headers or {}).get(HEADER_TRACKING_ID, "")
    # The same bounds the edge applies to x-tracking-id (gRPC itself admits only printable ASCII
    # in metadata); anything else is replaced, as a missing one is: it is stored with every row.
    return value if 0 < len(value) <= 128 and value.isascii() and value.isprintable() else new_tracking_id()


class DurableConsumer:
    """A durable pull consumer: messages are acknowledged only after the handler returns
    (that is, after its transaction committed); a failing handler leaves the message for
    redelivery, so handlers must be idempotent. Each message is handled under its tracking id
    (the Aetherops-Tracking-Id header, or a fresh one), as an RPC is under x-tracking-id: what the
    handler stores, publishes and logs carries it."""

    def __init__(
        self,
        bus: Bus,
        subject: str,
        durable: str,
        handler: MessageHandler,
        *,
        batch: int = 256,
        ack_wait_s: float = 30.0,
        max_deliver: int = 20,
        concurrent: bool = False,
        start_time: datetime | None = None,
    ) -> None:
        """`concurrent`: handle the messages of one fetch at the same time (each still acknowledged
        only after its own handler returned). For handlers whose messages are independent and that
        batch internally (alert ingest shares group commits): one at a time, every message would
        wait for its own commit. Off where order between messages matters.

        `start_time`: a durable created now starts with the messages published from then on, not
        with the stream's whole history (an existing durable keeps its place either way). For a
        consumer added to a running deployment whose old messages must not be acted on."""
        self._concurrent = concurrent
        self._start_time = start_time
        self._bus = bus
        self._subject = subject
        self._durable = durable
        self._handler = handler
        self._batch = batch
        self._ack_wait_s = ack_wait_s
        self._max_deliver = max_deliver
        self.handled = 0
        self.dropped = 0  # messages JetStream gave up on after `max_deliver` deliveries
        bus.consumers.append(self)

    @property
    def durable(self) -> str:
        return self._durable

    async def run(self) -> None:
        stream = self._bus.subjects.stream_for(self._subject)
        while True:
            try:
                sub = await self._bus.js.pull_subscribe(
                    self._subject,
                    durable=self._durable,
                    stream=stream,
                    config=js_api.ConsumerConfig(
                        ack_wait=self._ack_wait_s,
                        max_deliver=self._max_deliver,
                        deliver_policy=(
                            js_api.DeliverPolicy.ALL if self._start_time is None else js_api.DeliverPolicy.BY_START_TIME
                        ),
                        opt_start_time=self._start_time,
                    ),
                )
                # JetStream drops a message after `max_deliver` deliveries and says so only in an
                # advisory: without listening to it, a message lost that way would leave no trace here.
                advisories = await self._bus.nc.subscribe(
                    f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{self._durable}", cb=self._on_max_deliveries
                )
                break
            except asyncio.CancelledError:
                raise
            except (TimeoutError, NatsError, NotFoundError) as exc:
                log.warning("consumer %s: cannot subscribe yet (%s)", self._durable, exc)
                await asyncio.sleep(1.0)
        try:
            await self._consume(sub)
        finally:
            # Unsubscribed here, a cancelled consumer does not hold the connection's drain at shutdown.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await advisories.unsubscribe()

    async def _on_max_deliveries(self, msg: Msg) -> None:
        self.dropped += 1
        try:
            advisory = json.loads(msg.data)
            where = f"stream {advisory['stream']} sequence {advisory['stream_seq']}"
            deliveries = advisory.get("deliveries", self._max_deliver)
        except (ValueError, KeyError, TypeError):
            where, deliveries = "(unreadable advisory)", self._max_deliver
        log.error(
            "consumer %s: JetStream gave up on the message at %s after %s deliveries; it stays in the stream",
            self._durable,
            where,
            deliveries,
        )

    async def _consume(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                msgs = await sub.fetch(self._batch, timeout=1.0)
            except TimeoutError:
                # nats-py raises its own TimeoutError, and also a plain asyncio.TimeoutError when the
                # deadline ran out between its two pull requests (a busy loop); both mean "nothing
                # yet". It also turns a cancellation into a timeout, so a pending cancel wins here.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from None
                continue
            except asyncio.CancelledError:
                raise
            except NatsError as exc:
                log.warning("consumer %s: fetch failed (%s)", self._durable, exc)
                await asyncio.sleep(0.5)
                continue
            if self._concurrent:
                # Each handler runs in its own task (so under its own tracking id), started in order.
                outcomes = await asyncio.gather(*(self._handle(msg) for msg in msgs))
            else:
                outcomes = [await self._handle(msg) for msg in msgs]
            refusals = [exc for exc in outcomes if exc is not None]
            if refusals:
                # The service is full or its database unreachable: more messages now would only fail
                # too, each failure a delivery attempt used up, and the work falls on a server that
                # is already struggling. Fetching resumes once trying again makes sense.
                pause = max(_retry_after(exc) for exc in refusals)
                log.warning(
                    "consumer %s: %d of %d messages refused for now (%s); redelivered later, next fetch in %.1f s",
                    self._durable,
                    len(refusals),
                    len(msgs),
                    refusals[0],
                    pause,
                )
                await asyncio.sleep(pause)

    async def _handle(self, msg: Msg) -> ResourceExhaustedError | UnavailableError | None:
        """Runs the handler under the message's tracking id; ack after it returned, nak if it failed.

        Returns the error if the service could not take the message for now (its queue is full, its
        database unreachable). The caller logs those once per fetch: they are conditions, not faults,
        and a traceback per message would bury the log. Any failure is redelivered later and later
        again (`redelivery_delay`), so neither an overload nor a database failover uses up
        `max_deliver` in seconds."""
        tracking = set_tracking_id(_tracking_of(msg))
        try:
            await self._handler(msg)
        except asyncio.CancelledError:
            raise
        except (ResourceExhaustedError, UnavailableError) as exc:
            await self._nak(msg, _retry_after(exc))
            return exc
        except Exception:
            log.exception("consumer %s: handler failed; message will be redelivered", self._durable)
            await self._nak(msg, 1.0)
            return None
        finally:
            reset_tracking_id(tracking)
        await msg.ack()
        self.handled += 1
        return None

    @staticmethod
    async def _nak(msg: Msg, retry_after_s: float) -> None:
        with contextlib.suppress(Exception):  # not acknowledged either way: it comes back after ack_wait
            await msg.nak(delay=redelivery_delay(retry_after_s, _deliveries(msg)))


def _retry_after(exc: ResourceExhaustedError | UnavailableError) -> float:
    """When trying again makes sense: the service's hint, or a second for an unreachable dependency."""
    return exc.retry_after_s if isinstance(exc, ResourceExhaustedError) else 1.0


_MAX_REDELIVERY_DELAY_S = 30.0


def redelivery_delay(retry_after_s: float, deliveries: int) -> float:
    """Delay before a message that failed comes back: `retry_after_s`, doubled with each earlier
    delivery of it, at most 30 s. With the consumer's 20 deliveries a message outlasts about seven
    minutes of overload (the ingest queue's 0.5 s) or of an unreachable database (1 s); at a fixed
    1 s delay it was dropped after about 20 seconds."""
    return min(_MAX_REDELIVERY_DELAY_S, retry_after_s * 2.0 ** max(0, deliveries - 1))


def _deliveries(msg: Msg) -> int:
    """How many times this message was delivered, this time included (1 if NATS did not say)."""
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:  # not a JetStream message, or metadata nats-py cannot parse
        return 1
