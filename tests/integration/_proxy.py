"""A cuttable TCP proxy for integration tests that take a real dependency away and bring it back."""

from __future__ import annotations

import asyncio

__all__ = ["TcpProxy"]


class TcpProxy:
    """A TCP proxy to a real server (Redis, PostgreSQL) that a test can cut and restore: the way to take
    a dependency away and bring it back without stopping the shared service."""

    def __init__(self, host: str, port: int, *, unix_path: str = "") -> None:
        """Forwards to `host`:`port`, or to the Unix socket `unix_path` when given."""
        self.target = (host, port)
        self.unix_path = unix_path
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.unix_path:
            up_reader, up_writer = await asyncio.open_unix_connection(self.unix_path)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
