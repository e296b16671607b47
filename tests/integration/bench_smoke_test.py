"""Every benchmark in bench/ still runs: each `--quick` mode end to end, against the suite's PostgreSQL and NATS.

The figures of a quick run mean nothing (tiny sizes, a shared machine), so only that the script
finishes and prints its headline lines is checked, plus the correctness checks the benchmarks make
themselves (the vectorised capacity summary equals the per-satellite loop). Without this, a change
to an API a benchmark calls is found only the next time someone measures.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# script -> lines its output must contain
EXPECTED: dict[str, tuple[str, ...]] = {
    "correlation_engine": ("100,000 target clusters", "ratio fastest/slowest"),
    "correlation_grpc": (
        "health Check (empty-RPC baseline)",
        "IngestAlert, mix new",
        "IngestAlert, mix storm",
        "ScoreAlerts (authenticated, stores nothing)",
        "IngestAlerts streaming, mix storm",
        "(one IngestAlert call each): p50",
    ),
    "capacity_compute": ("speed-up cold", "summaries identical: True"),
    "capacity": ("bulk ingest", "restart recovery", "summaries identical: True"),
    "runbook": ("completed and committed: 50", "engine overhead per step"),
    "telemetry": ("aggregator add_many", "equal: True"),
}


def test_every_benchmark_is_covered() -> None:
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_quick_mode_runs(script: str, pg_url: str, nats_url: str) -> None:
    env = {**os.environ, "AETHEROPS_TEST_DATABASE_URL": pg_url, "AETHEROPS_TEST_NATS_URL": nats_url}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{script}.py"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"bench/{script}.py --quick failed:\n{proc.stdout}\n{proc.stderr}"
    missing = [line for line in EXPECTED[script] if line not in proc.stdout]
    assert not missing, f"bench/{script}.py --quick printed no {missing}:\n{proc.stdout}"
