"""The client-streaming bulk ingest both IngestAlerts and IngestSnapshots run: read the stream,
convert each item (a bad one becomes a rejection at its stream index), and commit the good ones in
chunks while the stream is still arriving.

At most `in_flight` chunks are committing per stream: beyond that the reader stops reading, and
HTTP/2 flow control slows the sender down, so one fast loader cannot queue an unbounded backlog in
the server. When the call fails or ends early, the chunks already submitted commit (or are refused)
all the same; the failure is what the caller is told.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from aetherops.errors import ValidationError
from aetherops.tasks import abandon
from gen.aetherops.common.v1 import common_pb2
from servers.convert import rejection

__all__ = ["MAX_LISTED_BYTES", "MAX_LISTED_REJECTIONS", "StreamResult", "ingest_stream", "listed"]

Request = TypeVar("Request")
Message = TypeVar("Message")
Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

MAX_LISTED_REJECTIONS = 1000
"""A bulk reply lists at most this many rejections (the first, by index); its `rejected` counts them all.
Each can take a kilobyte or two (reasons name ids and units), and a reply listing every one of a big
bad load outgrew the 4 MiB message limit: the caller got RESOURCE_EXHAUSTED instead of its counts,
after the good items had been stored, and again on every retry."""

StreamResult = tuple[list[tuple[int, Outcome]], list[common_pb2.Rejection]]
"""The outcome of each committed item with its stream index (in stream order), and the rejections of
items that could not be converted."""


async def ingest_stream(
    requests: AsyncIterator[Request],
    messages_of: Callable[[Request], Iterable[Message]],
    convert: Callable[[Message], Item],
    commit: Callable[[Sequence[Item]], Awaitable[list[Outcome]]],
    *,
    chunk_size: int,
    in_flight: int,
) -> StreamResult[Outcome]:
    """Runs one bulk stream: `messages_of` each request's items (they take consecutive indexes),
    `convert` each (ValidationError: rejected at its index), `commit` them `chunk_size` at a time."""
    rejections: list[common_pb2.Rejection] = []
    pending: collections.deque[tuple[list[int], asyncio.Future[list[Outcome]]]] = collections.deque()
    outcomes: list[tuple[int, Outcome]] = []
    chunk: list[Item] = []
    indexes: list[int] = []
    index = 0

    async def collect() -> None:
        taken, future = pending.popleft()
        outcomes.extend(zip(taken, await future, strict=True))

    try:
        async for request in requests:
            for message in messages_of(request):
                try:
                    item = convert(message)
                except ValidationError as exc:
                    rejections.append(rejection(index, exc))
                else:
                    chunk.append(item)
                    indexes.append(index)
                    if len(chunk) >= chunk_size:
                        pending.append((indexes, asyncio.ensure_future(commit(chunk))))
                        chunk, indexes = [], []
                        while len(pending) >= in_flight:
                            await collect()
                index += 1
        if chunk:
            pending.append((indexes, asyncio.ensure_future(commit(chunk))))
        while pending:
            await collect()
    finally:
        abandon(*(future for _, future in pending))
    return outcomes, rejections


MAX_LISTED_BYTES = 1 << 20
"""... and at most this many bytes of them: each lists up to `servers.status.DETAIL_BYTES` of problems,
and a thousand of those would come close to the 4 MiB limit."""


def listed(rejections: list[common_pb2.Rejection]) -> list[common_pb2.Rejection]:
    """The rejections a reply lists: the first by stream index, `MAX_LISTED_REJECTIONS` and
    `MAX_LISTED_BYTES` at most (at least one)."""
    rejections.sort(key=lambda r: r.index)
    used = 0
    for i, r in enumerate(rejections[:MAX_LISTED_REJECTIONS]):
        used += r.ByteSize()
        if used > MAX_LISTED_BYTES and i > 0:
            return rejections[:i]
    return rejections[:MAX_LISTED_REJECTIONS]
