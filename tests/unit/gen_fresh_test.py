"""gen/ must be exactly what proto/generate.py makes from proto/, and the contracts lint clean."""

from __future__ import annotations

import filecmp
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(base: Path) -> dict[str, Path]:
    return {str(p.relative_to(base)): p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_gen_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    _load_generator().generate(out)
    fresh, committed = _files(out), _files(ROOT / "gen")
    assert sorted(fresh) == sorted(committed), "gen/ has missing or extra files: run python proto/generate.py"
    stale = [name for name in fresh if not filecmp.cmp(fresh[name], committed[name], shallow=False)]
    assert not stale, f"gen/ is stale ({stale}): run python proto/generate.py"


def test_buf_lint_clean() -> None:
    buf = shutil.which("buf")
    if buf is None:
        pytest.fail("buf not installed: pip install -e '.[dev]' provides it (buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_contract_rpc_is_generated() -> None:
    from gen.aetherops.capacity.v1 import capacity_pb2
    from gen.aetherops.correlation.v1 import correlation_pb2
    from gen.aetherops.runbook.v1 import runbook_pb2

    expected = {
        (correlation_pb2, "CorrelationService"): {
            "IngestAlert", "IngestAlerts", "GetCluster", "ListActiveClusters", "CloseCluster",
            "AcknowledgeCluster", "MergeClusters",
            "IdentifyRootCause", "ScoreAlerts", "WatchClusters", "ListAlerts", "ListClusters",
            "CreateSilence", "ListSilences", "ExpireSilence",
        },
        (runbook_pb2, "RunbookService"): {
            "ListActions", "RegisterRunbook", "GetRunbook", "ListRunbooks", "FindMatchingRunbooks",
            "StartExecution", "ExecuteNextStep", "ApproveStep", "RejectStep", "RollbackExecution", "GetExecutionStatus",
            "GetStepOutput",
            "WatchExecution", "ListExecutions", "CancelExecution",
        },
        (capacity_pb2, "CapacityService"): {
            "IngestSnapshot", "IngestSnapshots", "AddScheduledMission", "DeleteScheduledMission",
            "ComputeConsumptionRate",
            "ForecastExhaustion", "GetFleetRiskSummary", "GetCriticalForecasts", "RecommendInterventions",
            "ListSnapshots",
            "ListScheduledMissions",
        },
    }  # fmt: skip
    for (module, service), rpcs in expected.items():
        methods = {m.name for m in module.DESCRIPTOR.services_by_name[service].methods}
        assert methods == rpcs
