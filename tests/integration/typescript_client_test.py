"""The generated TypeScript client (clients/typescript) against a running server.

Runs `node --test` on the client's test with the server's port in
AETHEROPS_TEST_PORT. Node and the npm dependencies (`npm ci` in
clients/typescript) are required: without them this test fails, it does not skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "typescript"


async def test_typescript_client_against_running_server(server: Any, tokens: dict[str, str]) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the TypeScript client test needs Node.js 20+ on PATH")
    if not (CLIENT / "node_modules" / "@connectrpc" / "connect-node").is_dir():
        pytest.fail(f"npm dependencies are missing: run `npm ci` in {CLIENT}")
    env = {**os.environ, "AETHEROPS_TEST_PORT": str(server.port), "AETHEROPS_TOKEN": tokens["admin"]}
    proc = await asyncio.create_subprocess_exec(
        node,
        "--test",
        "test/client.test.mjs",
        cwd=CLIENT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    report = out.decode()
    assert proc.returncode == 0, f"node --test failed:\n{report}"
    assert "# fail 0" in report and "# pass 3" in report, report
