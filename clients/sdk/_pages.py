"""Following `next_page_token`: the one loop behind every `iter_*` method of both clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Protocol, TypeVar

__all__ = ["follow", "follow_async"]

P = TypeVar("P", bound="_Page")
T = TypeVar("T")


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


def follow(fetch: Callable[[str], P], items: Callable[[P], Iterable[T]]) -> Iterator[T]:
    """Every item of every page: `fetch(page_token)` from "" until a page has no next token."""
    token = ""
    while True:
        page = fetch(token)
        yield from items(page)
        token = page.next_page_token
        if not token:
            return


async def follow_async(fetch: Callable[[str], Awaitable[P]], items: Callable[[P], Iterable[T]]) -> AsyncIterator[T]:
    """`follow` for the asyncio client."""
    token = ""
    while True:
        page = await fetch(token)
        for item in items(page):
            yield item
        token = page.next_page_token
        if not token:
            return
