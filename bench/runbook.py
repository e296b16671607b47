"""Benchmark: 1,000 concurrent executions of a five-step runbook with built-in actions, against PostgreSQL.

Drives `aetherops.services.runbook.RunbookService` directly (no gRPC) with a real Database in a
throwaway schema (dropped at the end). The outbox relay is not run: outbox rows are written with every
commit, as in production, but nothing publishes them (NATS is not needed).

Reports executions/s over the whole run and, per step:

* engine overhead - time inside RunbookEngine.execute_next_step minus the action's own time and minus
  the pre-action checkpoint commit (target: p95 <= 5 ms);
* commit - the transaction after the step (events, index row, outbox);
* step latency - the whole ExecuteNextStep call: lock, staleness check, checkpoint, action, engine, commit.

    python bench/runbook.py            # 1,000 executions
    python bench/runbook.py --quick    # 50 executions

AETHEROPS_TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test) names the database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import asyncpg
from _cleanup import cancel_on_sigterm  # sibling module: scripts run as python bench/<name>.py

from aetherops.bus import Subjects
from aetherops.clock import SystemClock
from aetherops.db import Database, apply_migrations
from aetherops.runbook import Runbook, RunbookStep, StepStatus
from aetherops.services.runbook import RunbookService, StepTiming
from servers.runbook import encode_message, incident_from_record

TARGET_P95_MS = 5.0


class _NoRelay:
    """Stands in for the outbox relay: the benchmark measures the write path only."""

    def wake(self) -> None:
        return None


def _runbook() -> Runbook:
    return Runbook(
        runbook_id="bench",
        name="Five built-in steps",
        steps=[
            RunbookStep("announce", "log", {"message": "safing ${satellite}"}),
            RunbookStep("mark", "set_variable", {"name": "phase", "value": "safing"}),
            RunbookStep("pause", "wait", {"seconds": 0}),
            RunbookStep("mark2", "set_variable", {"name": "phase", "value": "safe"}),
            RunbookStep("report", "log", {"message": "${satellite} is ${phase}"}),
        ],
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _run_one(service: RunbookService, index: int, timings: list[StepTiming]) -> None:
    state = await service.start_execution(
        "bench", f"bench-{index % 7}", {"satellite": f"SAT-{index}", "phase": "nominal"}
    )
    while True:
        timing = StepTiming()
        status, state = await service.execute_next_step(state.execution_id, timing=timing)
        timings.append(timing)
        if status is not StepStatus.COMPLETED:
            raise RuntimeError(f"step ended {status}: {state.error}")
        if state.finished:
            return


async def main(executions: int) -> None:
    cancel_on_sigterm()
    url = os.environ.get("AETHEROPS_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = "bench_runbook_" + uuid.uuid4().hex[:8]
    db = await Database.connect(url, schema, min_size=10, max_size=20)
    try:
        await apply_migrations(db)
        service = RunbookService(
            db, _NoRelay(), Subjects("bench"), encode_message, SystemClock(), incident_data=incident_from_record
        )
        await service.start()
        try:
            await service.register_runbook(_runbook())
            timings: list[StepTiming] = []
            started = time.perf_counter()
            await asyncio.gather(*[_run_one(service, i, timings) for i in range(executions)])
            elapsed = time.perf_counter() - started
        finally:
            await service.stop()
        stored = await db.fetchval("SELECT count(*) FROM executions WHERE status = 'COMPLETED'")
        events = await db.fetchval("SELECT count(*) FROM execution_events")
    finally:
        await db.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    overhead = [t.engine_s for t in timings]
    commit = [t.commit_s for t in timings]
    total = [t.total_s for t in timings]
    p95 = _pct(overhead, 0.95)
    print(f"executions: {executions} concurrent x 5 steps ({len(timings)} steps, {events} events stored)")
    print(f"completed and committed: {stored}")
    print(
        f"wall time: {elapsed:.2f} s -> {executions / elapsed:.0f} executions/s, {len(timings) / elapsed:.0f} steps/s"
    )
    print(
        f"engine overhead per step (excl. action and commits): p50 {_pct(overhead, 0.5):.3f} ms, "
        f"p95 {p95:.3f} ms, mean {statistics.fmean(overhead) * 1000:.3f} ms "
        f"[target p95 <= {TARGET_P95_MS} ms: {'met' if p95 <= TARGET_P95_MS else 'MISSED'}]"
    )
    print(f"commit after the step: p50 {_pct(commit, 0.5):.2f} ms, p95 {_pct(commit, 0.95):.2f} ms")
    print(f"step latency incl. commits: p50 {_pct(total, 0.5):.2f} ms, p95 {_pct(total, 0.95):.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 executions instead of 1,000")
    parser.add_argument("--executions", type=int, default=0, help="override the number of executions")
    args = parser.parse_args()
    asyncio.run(main(args.executions or (50 if args.quick else 1000)))
