"""Every RPC answers hostile input with a precise status: generated requests, never INTERNAL.

Requests are built from the services' descriptors, field by field, with values chosen to break
things: empty, blank, NUL-bearing and oversized strings, extreme and negative numbers, NaN and
infinities, unknown enum numbers, Timestamps and Durations at and beyond their ranges, deep and odd
Structs, empty and repeated lists. Each request has a hostility: the share of its values drawn from
those. The rest are plausible (a real satellite, subsystem, runbook or action name, a recent time,
a valid enum number), so that requests also get past validation into the services and PostgreSQL.
Generation is seeded: a failure names the method and the request, and reproduces.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, duration_pb2, message, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

from gen.aetherops.capacity.v1 import capacity_pb2
from gen.aetherops.correlation.v1 import correlation_pb2
from gen.aetherops.runbook.v1 import runbook_pb2
from servers.app import Application

SERVICES = [
    correlation_pb2.DESCRIPTOR.services_by_name["CorrelationService"],
    runbook_pb2.DESCRIPTOR.services_by_name["RunbookService"],
    capacity_pb2.DESCRIPTOR.services_by_name["CapacityService"],
]
CASES_PER_METHOD = 60
HOSTILITIES = (0.05, 0.2, 0.6)
# Statuses that mean "the server did not know what to make of it": never the answer to input.
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}

_HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "SAT-1\x00",
    "é" * 300,
    "x" * 5000,
    "'; DROP TABLE alerts; --",
    "%s%n{}${",
    "\ud7ff\U0010ffff",
]
_PLAUSIBLE_STRINGS = ["SAT-1", "SAT-2", "power", "thermal", "adcs", "rb", "log", "wait", "kg", "one", "two", "eps"]
_HOSTILE_INTS = [0, -1, 6, 501, 2**31 - 1, -(2**31)]
_HOSTILE_FLOATS = [-0.0, -1.0, 1e308, -1e308, 5e-324, math.nan, math.inf, -math.inf]
_HOSTILE_TS_SECONDS = [0, -62_135_596_800, 253_402_300_799, 253_402_300_800, -62_135_596_801, 2**62]
_HOSTILE_DURATION_SECONDS = [0, -1, 315_576_000_000, 315_576_000_001, -(2**62)]


class _Draw:
    """The values of one request: hostile with probability `hostility`, else plausible."""

    def __init__(self, rng: random.Random, hostility: float) -> None:
        self.rng = rng
        self.hostility = hostility
        self.now = int(time.time())

    def hostile(self) -> bool:
        return self.rng.random() < self.hostility

    def count(self, *, few: int) -> int:
        """How many entries a repeated or map field gets: a few, or now and then (when hostile) a
        couple of hundred, each with its own problem: an answer listing them all once outgrew what
        a client accepts in trailing metadata (RESOURCE_EXHAUSTED "received metadata size exceeds")."""
        return 200 if self.hostile() and self.rng.random() < 0.1 else self.rng.randrange(few)

    def string(self) -> str:
        return self.rng.choice(_HOSTILE_STRINGS if self.hostile() else _PLAUSIBLE_STRINGS)

    def scalar(self, field: Any) -> Any:  # a FieldDescriptor (upb's or the pure-Python one)
        rng, t = self.rng, field.type
        if t == FieldDescriptor.TYPE_STRING:
            return self.string()
        if t == FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return rng.choice(_HOSTILE_FLOATS) if self.hostile() else rng.uniform(0.0, 100.0)
        if t == FieldDescriptor.TYPE_ENUM:
            count = len(field.enum_type.values)
            return rng.choice([0, count, 999]) if self.hostile() else rng.randrange(1, count)
        if t == FieldDescriptor.TYPE_BYTES:
            return rng.choice([b"", b"\x00", b"x" * 100])
        return rng.choice(_HOSTILE_INTS) if self.hostile() else rng.randrange(1, 6)

    def fill(self, msg: message.Message, depth: int = 0) -> None:
        rng, name = self.rng, msg.DESCRIPTOR.full_name
        if name == "google.protobuf.Timestamp":
            assert isinstance(msg, timestamp_pb2.Timestamp)
            if self.hostile():
                msg.seconds, msg.nanos = rng.choice(_HOSTILE_TS_SECONDS), rng.choice([0, -1, 1_000_000_000])
            else:
                msg.seconds, msg.nanos = self.now + rng.randrange(-86_400, 3_600), rng.randrange(1_000_000_000)
            return
        if name == "google.protobuf.Duration":
            assert isinstance(msg, duration_pb2.Duration)
            if self.hostile():
                msg.seconds, msg.nanos = rng.choice(_HOSTILE_DURATION_SECONDS), rng.choice([0, 5, -5])
            else:
                msg.seconds = rng.randrange(1, 600)
            return
        if name == "google.protobuf.Struct":
            assert isinstance(msg, struct_pb2.Struct)
            for _ in range(rng.randrange(4)):
                key = rng.choice(["severity", "satellite_id", "subsystems", "sat", "message", "$and", "$gt"])
                msg.update({self.string() if self.hostile() else key: self.struct_value(0)})
            return
        for field in msg.DESCRIPTOR.fields:
            if rng.random() < 0.25:  # some fields stay unset
                continue
            target = getattr(msg, field.name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                value_field = field.message_type.fields_by_name["value"]
                for _ in range(self.count(few=3)):
                    key = self.scalar(field.message_type.fields_by_name["key"])
                    if value_field.message_type is None:
                        target[key] = self.scalar(value_field)
                    elif depth < 3:
                        self.fill(target[key], depth + 1)
            elif field.is_repeated:
                for _ in range(self.count(few=4) if field.message_type is None else rng.randrange(4)):
                    if field.message_type is None:
                        target.append(self.scalar(field))
                    elif depth < 3:
                        self.fill(target.add(), depth + 1)
            elif field.message_type is not None:
                if depth < 3:
                    self.fill(target, depth + 1)
            else:
                setattr(msg, field.name, self.scalar(field))

    def struct_value(self, depth: int) -> Any:
        rng = self.rng
        kind = rng.randrange(7 if depth < 4 else 5)
        if kind == 0:
            return None
        if kind == 1:
            return rng.random() < 0.5
        if kind == 2:
            return rng.choice([0, -1, 1e308, 3.5, 2**53 + 1]) if self.hostile() else rng.randrange(1, 6)
        if kind == 3:
            return self.string()
        if kind == 4:
            return rng.choice(["${sat}", "${", "$$", "${nope}"])
        if kind == 5:
            return [self.struct_value(depth + 1) for _ in range(rng.randrange(3))]
        return {self.string(): self.struct_value(depth + 1) for _ in range(rng.randrange(3))}


def _class(desc: descriptor.Descriptor) -> type[message.Message]:
    return message_factory.GetMessageClass(desc)


async def _call(channel: grpc.aio.Channel, method: descriptor.MethodDescriptor, request: message.Message) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    serialize, deserialize = _class(method.input_type).SerializeToString, _class(method.output_type).FromString
    if method.client_streaming:

        async def requests() -> AsyncIterator[message.Message]:
            yield request
            yield request

        await channel.stream_unary(path, serialize, deserialize)(requests(), timeout=10)
    elif method.server_streaming:
        call = channel.unary_stream(path, serialize, deserialize)(request, timeout=10)
        try:
            # A watch that accepted its request streams on: a bad request fails at once.
            async with asyncio.timeout(0.2):
                await call.read()
        except TimeoutError:
            pass
        finally:
            call.cancel()
    else:
        await channel.unary_unary(path, serialize, deserialize)(request, timeout=10)


@pytest.fixture
async def unlimited(app_factory: Any, channel_for: Any) -> grpc.aio.Channel:
    """An admin channel to a server whose rate limits this test cannot reach."""
    app: Application = await app_factory(rate_limit_burst=1e6, rate_limit_per_s=1e6)
    channel: grpc.aio.Channel = channel_for("admin", app.port)
    return channel


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
async def test_generated_requests_never_get_internal(unlimited: grpc.aio.Channel, service: Any) -> None:
    failures: list[str] = []
    codes: dict[grpc.StatusCode | None, int] = {}
    for method in service.methods:
        rng = random.Random(f"{service.full_name}/{method.name}")
        for case in range(CASES_PER_METHOD if not method.server_streaming else 9):
            draw = _Draw(rng, HOSTILITIES[case % len(HOSTILITIES)])
            request = _class(method.input_type)()
            draw.fill(request)
            code = None
            try:
                await _call(unlimited, method, request)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                # RESOURCE_EXHAUSTED is an answer (a rate limit, a full queue), but not when the
                # client had to refuse the answer itself.
                if code in FORBIDDEN or "metadata size" in (err.details() or ""):
                    failures.append(f"{method.name}: {code.name} {err.details()!r} for {request!r:.800}")
            codes[code] = codes.get(code, 0) + 1
    assert not failures, "\n".join(failures)
    # The generator is worth something only if requests also get through.
    assert codes.get(None, 0) > len(service.methods), codes


# Bytes no message of any method parses: a field 1 of wire type 2 whose length runs past the end.
_GARBAGE = b"\x0a\xff\xff\xff\x0f"


def _raw(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
async def test_bytes_that_are_no_request_message_get_invalid_argument(
    unlimited: grpc.aio.Channel, service: Any
) -> None:
    # grpc itself answered these UNKNOWN ("Unexpected <class DecodeError>"), with a traceback in the log.
    wrong: dict[str, str] = {}
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        try:
            if method.client_streaming:

                async def requests() -> AsyncIterator[bytes]:
                    yield _GARBAGE

                if method.server_streaming:
                    call = unlimited.stream_stream(path, _raw, _raw)(requests(), timeout=10)
                    await call.read()
                else:
                    await unlimited.stream_unary(path, _raw, _raw)(requests(), timeout=10)
            elif method.server_streaming:
                await unlimited.unary_stream(path, _raw, _raw)(_GARBAGE, timeout=10).read()
            else:
                await unlimited.unary_unary(path, _raw, _raw)(_GARBAGE, timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT or "not a valid request message" not in (
                exc.details() or ""
            ):
                wrong[method.name] = f"{exc.code().name}: {exc.details()}"
        else:
            wrong[method.name] = "answered"
    assert not wrong, wrong
