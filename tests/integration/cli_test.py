"""The `aetherops` operator CLI end to end: a real process against a running server.

Each command runs as `python -m clients.cli` in a subprocess (awaited without
blocking the event loop the server runs on), so exit codes, stdout and stderr
are what an operator sees. Runbook commands are tested against the contract and
pass once the runbook service is implemented.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        try:
            return json.loads(self.out)
        except json.JSONDecodeError:  # say why, not only that the output was not JSON
            raise AssertionError(f"not JSON (exit {self.code}): {self.out!r}; stderr: {self.err}") from None


async def run_cli(address: str, token: str, *args: str) -> Result:
    """`aetherops ARGS...` as a process (awaited without blocking the server's event loop)."""
    env = {**os.environ, "AETHEROPS_ADDRESS": address, "AETHEROPS_TOKEN": token}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.cli",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def cli(server: Any, tokens: dict[str, str]) -> Any:
    async def run(*args: str, address: str | None = None) -> Result:
        return await run_cli(address or f"127.0.0.1:{server.port}", tokens["admin"], *args)

    return run


def _alert_lines(prefix: str, count: int, satellite: str) -> list[str]:
    now = datetime.now(UTC)
    return [
        json.dumps(
            {
                "alert_id": f"{prefix}-{i}",
                "satellite_id": satellite,
                "subsystem": ["power", "thermal", "comms"][i % 3],
                "severity": 1 + i % 5,
                "timestamp": (now - timedelta(seconds=count - i)).isoformat(),
                "message": f"alert {i}",
                "labels": {"source": "cli-test"},
            }
        )
        for i in range(count)
    ]


async def test_alerts_ingest_jsonl_reports_bad_lines_and_progress(cli: Any, tmp_path: Path) -> None:
    prefix = uuid.uuid4().hex[:8]
    lines = _alert_lines(prefix, 30, "SAT-CLI")
    lines.insert(4, "{this is not json")  # line 5: unparseable
    bad_severity = {**json.loads(lines[0]), "alert_id": f"{prefix}-sev", "severity": 9}
    lines.insert(9, json.dumps(bad_severity))  # line 10: the server rejects it
    lines.insert(12, "")  # blank lines are skipped, but still counted as lines
    path = tmp_path / "alerts.jsonl"
    path.write_text("\n".join(lines) + "\n")

    result = await cli("alerts", "ingest", str(path), "--json")
    assert result.code == 1, result.err
    summary = result.json()
    assert summary["sent"] == 31
    assert summary["accepted"] + summary["duplicates"] == 30
    assert summary["rejected"] == 1
    assert [(b["line"], b["source"]) for b in summary["bad_lines"]] == [(5, "parse"), (10, "server")]
    assert "severity" in summary["bad_lines"][1]["reason"]
    assert summary["tracking_id"]
    # Progress on stderr: count and rate.
    last = [line for line in result.err.splitlines() if "alerts sent" in line][-1]
    count, _, rest = last.partition(" alerts sent, ")
    assert int(count) == 31 and rest.split("/s")[0].isdigit()

    # Loaded again: every good line is already stored, and says so instead of "accepted".
    table = await cli("alerts", "ingest", str(path))
    assert table.code == 1
    assert "0 accepted, 0 duplicates, 30 already stored, 1 rejected" in table.out
    assert "LINE" in table.out and "REASON" in table.out
    assert any(line.split()[:2] == ["5", "parse"] for line in table.out.splitlines())


async def test_alerts_ingest_csv(cli: Any, tmp_path: Path) -> None:
    now = datetime.now(UTC).isoformat()
    path = tmp_path / "alerts.csv"
    path.write_text(
        "alert_id,satellite_id,subsystem,severity,timestamp,message,labels\n"
        f"{uuid.uuid4().hex},SAT-CSV,power,4,{now},bus undervoltage,site=kiruna;pass=12\n"
        f"{uuid.uuid4().hex},SAT-CSV,power,high,{now},bad severity,\n"
    )
    result = await cli("alerts", "ingest", str(path), "--json")
    summary = result.json()
    assert summary["accepted"] == 1
    assert summary["bad_lines"][0]["line"] == 3
    assert "severity" in summary["bad_lines"][0]["reason"]


async def test_alerts_ingest_null_fields_are_absent(cli: Any, tmp_path: Path) -> None:
    prefix = uuid.uuid4().hex[:8]
    good, unrated = (json.loads(line) for line in _alert_lines(prefix, 2, "SAT-NULL"))
    path = tmp_path / "nulls.jsonl"
    path.write_text(
        json.dumps({**good, "message": None, "labels": None})
        + "\n"
        + json.dumps({**unrated, "severity": None})  # no severity: the server says why, as when it is missing
        + "\n"
    )
    summary = (await cli("alerts", "ingest", str(path), "--json")).json()
    assert (summary["accepted"], summary["rejected"], summary["unparsed"]) == (1, 1, 0)
    ((bad,),) = [summary["bad_lines"]]
    assert (bad["line"], bad["source"]) == (2, "server") and "severity" in bad["reason"]
    (stored,) = (await cli("alerts", "list", "--tracking", summary["tracking_id"], "--json")).json()["alerts"]
    assert stored["alert"]["alert_id"] == good["alert_id"] and "message" not in stored["alert"]  # not "None"


async def test_alerts_ingest_reads_a_byte_order_mark_and_reports_lines_not_utf8(cli: Any, tmp_path: Path) -> None:
    lines = [line.encode() for line in _alert_lines(uuid.uuid4().hex[:8], 3, "SAT-UTF8")]
    lines[1] = lines[1].replace(b'"message": "alert 1"', b'"message": "caf\xe9"')  # Latin-1: not UTF-8
    path = tmp_path / "excel.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    result = await cli("alerts", "ingest", str(path), "--json")
    assert result.code == 1 and "Traceback" not in result.err, result.err
    summary = result.json()
    assert (summary["sent"], summary["accepted"]) == (2, 2)
    assert [(b["line"], b["source"]) for b in summary["bad_lines"]] == [(2, "parse")]
    assert summary["bad_lines"][0]["reason"].startswith("not valid UTF-8")


async def test_clusters_merge(cli: Any, tmp_path: Path) -> None:
    now = datetime.now(UTC) - timedelta(seconds=30)
    prefix = uuid.uuid4().hex[:8]
    # Unknown units on two satellites: time alone never correlates, so two incidents.
    lines = [
        json.dumps(
            {
                "alert_id": f"{prefix}-{k}",
                "satellite_id": f"SAT-MRG{k}",
                "subsystem": f"unit-{k}",
                "severity": 3,
                "timestamp": now.isoformat(),
            }
        )
        for k in range(2)
    ]
    path = tmp_path / "alerts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert (await cli("alerts", "ingest", str(path))).code == 0
    ids = [
        (await cli("clusters", "list", "--satellite", f"SAT-MRG{k}", "--json")).json()["clusters"][0]["cluster_id"]
        for k in range(2)
    ]
    merged = await cli("clusters", "merge", ids[0], ids[1], "--note", "one harness fault")
    assert merged.code == 0 and f"merged {ids[1]} into {ids[0]}" in merged.out and "SAT-MRG1" in merged.out
    shown = await cli("clusters", "show", ids[1])
    assert f"merged into {ids[0]}: one harness fault" in shown.out and f"its alerts are in {ids[0]}" in shown.out
    again = await cli("clusters", "merge", ids[0], ids[1])
    assert again.code == 1 and "FAILED_PRECONDITION" in again.err and "was merged into" in again.err
    itself = await cli("clusters", "merge", ids[0], ids[0])
    assert itself.code == 1 and "INVALID_ARGUMENT" in itself.err and "source_cluster_ids[0]" in itself.err


async def test_clusters_list_show_close(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    path.write_text("\n".join(_alert_lines(uuid.uuid4().hex[:8], 3, "SAT-CLU")) + "\n")
    assert (await cli("alerts", "ingest", str(path))).code == 0

    listed = await cli("clusters", "list", "--satellite", "SAT-CLU", "--json")
    assert listed.code == 0
    (cluster,) = listed.json()["clusters"]
    table = await cli("clusters", "list")
    assert "CLUSTER" in table.out and cluster["cluster_id"] in table.out

    shown = await cli("clusters", "show", cluster["cluster_id"])
    assert shown.code == 0 and "ALERT" in shown.out and "SAT-CLU" in shown.out

    # Every stored alert of the incident, duplicates included and marked.
    alerts = (await cli("alerts", "list", "--cluster", cluster["cluster_id"], "--json")).json()["alerts"]
    assert len(alerts) == 3 and {a["cluster_id"] for a in alerts} == {cluster["cluster_id"]}
    table = await cli("alerts", "list", "--cluster", cluster["cluster_id"], "--satellite", "SAT-CLU", "--limit", "2")
    assert table.code == 0 and len([line for line in table.out.splitlines() if "SAT-CLU" in line]) == 2
    assert "... more alerts not shown (raise --limit" in table.err  # on stderr: stdout is only the table
    cut = await cli("alerts", "list", "--cluster", cluster["cluster_id"], "--limit", "2", "--json")
    assert len(cut.json()["alerts"]) == 2 and "more alerts not shown" in cut.err
    exact = await cli("alerts", "list", "--cluster", cluster["cluster_id"], "--limit", "3")
    assert exact.code == 0 and "not shown" not in exact.err
    unfiltered = await cli("alerts", "list")
    assert unfiltered.code == 2 and "--cluster, --tracking or --silence" in unfiltered.err

    acked = await cli("clusters", "ack", cluster["cluster_id"], "--note", "resetting the bus", "--json")
    assert acked.code == 0 and acked.json()["acknowledge_note"] == "resetting the bus"
    shown = await cli("clusters", "show", cluster["cluster_id"])
    assert f"by {acked.json()['acknowledged_by']}: resetting the bus" in shown.out
    again = await cli("clusters", "ack", cluster["cluster_id"])
    assert again.code == 1 and "FAILED_PRECONDITION" in again.err and "acknowledged by" in again.err
    handover = await cli("clusters", "ack", cluster["cluster_id"], "--take-over", "--note", "night shift", "--json")
    assert handover.code == 0 and handover.json()["acknowledge_note"] == "night shift"
    unattended = await cli("clusters", "list", "--satellite", "SAT-CLU", "--unacknowledged")
    assert unattended.out.strip() == "no active clusters"
    taken = await cli("clusters", "list", "--satellite", "SAT-CLU", "--status", "open", "--acknowledged", "--json")
    assert [c["cluster_id"] for c in taken.json()["clusters"]] == [cluster["cluster_id"]]

    closed = await cli("clusters", "close", cluster["cluster_id"], "--reason", "fixed", "--json")
    assert closed.code == 0 and closed.json()["status"] == "CLUSTER_STATUS_CLOSED"
    again = await cli("clusters", "close", cluster["cluster_id"])
    assert again.code == 1
    assert "FAILED_PRECONDITION" in again.err and "tracking id" in again.err

    # Closed: no longer active, but in the history, and in no list of open ones.
    assert (await cli("clusters", "list", "--satellite", "SAT-CLU")).out.strip() == "no active clusters"
    history = await cli("clusters", "list", "--satellite", "SAT-CLU", "--status", "closed", "--json")
    assert [c["cluster_id"] for c in history.json()["clusters"]] == [cluster["cluster_id"]]
    since = cluster["first_alert_time"]
    every = await cli("clusters", "list", "--satellite", "SAT-CLU", "--status", "all", "--since", since)
    assert every.code == 0 and cluster["cluster_id"] in every.out
    assert (await cli("clusters", "list", "--satellite", "SAT-CLU", "--status", "open")).out.strip() == "no clusters"
    before = await cli("clusters", "list", "--satellite", "SAT-CLU", "--status", "all", "--until", since, "--json")
    assert before.json()["clusters"] == []
    mixed = await cli("clusters", "list", "--since", since)
    assert mixed.code == 2 and "--status" in mixed.err


async def test_clusters_list_cut_by_limit_says_so_on_stderr(cli: Any, tmp_path: Path) -> None:
    now = datetime.now(UTC).isoformat()
    # Each on a satellite and unit of its own, so none joins another: three incidents.
    path = tmp_path / "three.jsonl"
    path.write_text(
        "".join(
            json.dumps({"alert_id": uuid.uuid4().hex, "satellite_id": f"SAT-LIM-{i}", "subsystem": f"unit-{i}",
                        "severity": 3, "timestamp": now}) + "\n"
            for i in range(3)
        )
    )  # fmt: skip
    assert (await cli("alerts", "ingest", str(path))).code == 0
    cut = await cli("clusters", "list", "--limit", "2", "--json")
    assert cut.code == 0 and len(cut.json()["clusters"]) == 2  # stdout as before: only the JSON
    assert cut.err.strip() == "... more clusters not shown (raise --limit; --limit 0 shows all)"
    table = await cli("clusters", "list", "--limit", "2")
    assert "more clusters not shown" in table.err and "more" not in table.out
    for limit in ("3", "0"):
        every = await cli("clusters", "list", "--limit", limit)
        assert every.code == 0 and every.err == "" and every.out.count("SAT-LIM-") == 3


async def test_clusters_watch_follows_incidents_until_interrupted(
    server: Any, tokens: dict[str, str], channel_for: Any
) -> None:
    from gen.aetherops.correlation.v1 import correlation_pb2 as cpb
    from gen.aetherops.correlation.v1 import correlation_pb2_grpc

    env = {**os.environ, "AETHEROPS_ADDRESS": f"127.0.0.1:{server.port}", "AETHEROPS_TOKEN": tokens["viewer"]}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "clients.cli", "clusters", "watch", "--json", "--event", "opened"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        stub = correlation_pb2_grpc.CorrelationServiceStub(channel_for("operator", server.port))
        # Nothing says when the watch is registered: open incidents (each on a satellite and unit of its
        # own, so none joins another) until one is shown, a bounded number of times.
        line, opened = b"", []
        for n in range(40):
            alert = cpb.Alert(
                alert_id=uuid.uuid4().hex, satellite_id=f"SAT-WATCH-{n}", subsystem=f"unit-{n}", severity=4
            )
            alert.timestamp.FromDatetime(datetime.now(UTC))
            opened.append((await stub.IngestAlert(cpb.IngestAlertRequest(alert=alert))).cluster_id)
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 0.5)
                break
            except TimeoutError:
                continue
        shown = json.loads(line)
        assert shown["event_type"] == "CLUSTER_EVENT_TYPE_OPENED"
        assert shown["cluster"]["cluster_id"] in opened and shown["cluster"]["max_severity"] == 4
        # Ctrl-C ends it: the shell's code for SIGINT, and no traceback.
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 20)
        err = (await proc.stderr.read()).decode()
        assert code == 130 and "Traceback" not in err, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_silences_create_list_expire_and_what_they_covered(cli: Any, tmp_path: Path) -> None:
    # A burn that is over: its alerts come down at the next pass, so it can still be silenced.
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    made = await cli(
        "silences", "create", "--satellite", "SAT-SIL", "--subsystem", "power", "--label", "source=cli-test",
        "--start", start.isoformat(), "--for", "1h", "--comment", "bus test", "--json",
    )  # fmt: skip
    assert made.code == 0, made.err
    silence = made.json()
    assert silence["end_time"] == (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert silence["created_by"] == "admin"
    now = await cli("silences", "create", "--label", "mode=burn", "--for", "2h", "--comment", "burn 7")
    assert now.code == 0 and "until" in now.out
    past = await cli("silences", "create", "--satellite", "S", "--end", "2020-01-01T00:00Z", "--comment", "typo")
    assert past.code == 1 and "INVALID_ARGUMENT" in past.err and "could cover none" in past.err

    # Observed in and after the first silence's window, downlinked now: power in the window is covered.
    lines = [
        json.dumps({**json.loads(line), "timestamp": (start + timedelta(minutes=50 * i)).isoformat()})
        for i, line in enumerate(_alert_lines(uuid.uuid4().hex[:8], 3, "SAT-SIL"))
    ]  # power at +0 (covered), thermal at +50 min (another subsystem), comms at +100 min (after the end)
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = await cli("alerts", "ingest", str(path))
    assert loaded.code == 0 and "2 accepted, 0 duplicates, 1 silenced, 0 already stored" in loaded.out
    covered = await cli("alerts", "list", "--silence", silence["silence_id"])
    assert covered.code == 0 and f"(silenced: {silence['silence_id']})" in covered.out

    listed = await cli("silences", "list", "--json")
    assert len(listed.json()["silences"]) == 1  # the first one has ended
    every = await cli("silences", "list", "--all")
    assert every.code == 0 and "bus test" in every.out and "SAT-SIL,power,source=cli-test" in every.out
    current = listed.json()["silences"][0]["silence_id"]
    assert (await cli("silences", "expire", current)).code == 0
    assert (await cli("silences", "list")).out.strip() == "no silences"
    ended = await cli("silences", "expire", current)
    assert ended.code == 1 and "FAILED_PRECONDITION" in ended.err

    for args in (
        ("silences", "create", "--for", "1h", "--comment", "everything"),  # no matcher
        ("silences", "create", "--satellite", "S", "--comment", "no end"),
        ("silences", "create", "--satellite", "S", "--for", "soon", "--comment", "c"),
        ("silences", "create", "--satellite", "S", "--for", "1h", "--end", "2026-01-01T00:00Z", "--comment", "c"),
        ("silences", "create", "--label", "novalue", "--for", "1h", "--comment", "c"),
    ):
        assert (await cli(*args)).code == 2, args


async def test_rpc_errors_exit_1_with_tracking_id(cli: Any) -> None:
    result = await cli("clusters", "show", "no-such-cluster")
    assert result.code == 1
    assert "NOT_FOUND" in result.err
    tracking = [line for line in result.err.splitlines() if "tracking id:" in line]
    assert tracking and len(tracking[0].split("tracking id:")[1].strip()) == 32
    as_json = await cli("clusters", "show", "no-such-cluster", "--json")
    assert as_json.json()["error"]["code"] == "NOT_FOUND"


async def test_usage_errors_exit_2(cli: Any, tmp_path: Path) -> None:
    assert (await cli("clusters")).code == 2
    assert (await cli("alerts", "ingest", str(tmp_path / "missing.jsonl"))).code == 2
    assert (await cli("capacity", "forecast", "SAT-1", "antimatter")).code == 2
    assert (await cli("runbooks", "start", "rb", "--var", "novalue")).code == 2


async def test_unreachable_server_exits_1(cli: Any) -> None:
    result = await cli("fleet", "risk", "--timeout", "1", address="127.0.0.1:1")
    assert result.code == 1
    assert "UNAVAILABLE" in result.err or "DEADLINE_EXCEEDED" in result.err


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _add_mission(address: str, token: str, mission: Any) -> None:
    from clients.sdk import SyncAetherOpsClient

    with SyncAetherOpsClient(address, token=token) as client:
        client.add_scheduled_mission(mission)


async def test_capacity_ingest_says_how_many_rejections_were_not_listed(cli: Any, tmp_path: Path) -> None:
    # The server lists the first 1,000 rejections; the rest must not vanish from the report.
    now = datetime.now(UTC)
    rows = ["satellite_id,resource,timestamp,value,unit"]
    rows += [f"SAT-NEG,fuel,{(now - timedelta(seconds=i)).isoformat()},-1,kg" for i in range(1005)]
    path = tmp_path / "negative.csv"
    path.write_text("\n".join(rows) + "\n")
    text = await cli("capacity", "ingest", str(path))
    assert text.code == 1, text.err
    assert "1005 rejected by the server" in text.out
    assert "... and 5 more rejected by the server, not listed" in text.out
    as_json = await cli("capacity", "ingest", str(path), "--json")
    summary = json.loads(as_json.out)
    assert (summary["rejected"], summary["unlisted"], len(summary["bad_lines"])) == (1005, 5, 1000)


async def test_capacity_ingest_forecast_plot_and_fleet_risk(
    cli: Any, tmp_path: Path, server: Any, tokens: dict[str, str]
) -> None:
    now = datetime.now(UTC)
    rows = ["satellite_id,resource,timestamp,value,unit"]
    rows += [f"SAT-PLT,fuel,{(now - timedelta(days=30 - d)).isoformat()},{120 - 3 * d + (d % 3)},kg" for d in range(30)]
    rows.append(f"SAT-PLT,antimatter,{now.isoformat()},1,kg")  # line 32: unknown resource
    rows.append(f"SAT-PLT,fuel,{now.isoformat()},-4,kg")  # line 33: the server rejects it
    path = tmp_path / "snapshots.csv"
    path.write_text("\n".join(rows) + "\n")
    ingested = await cli("capacity", "ingest", str(path), "--json")
    summary = ingested.json()
    assert summary["accepted"] == 30
    assert [(b["line"], b["source"]) for b in summary["bad_lines"]] == [(32, "parse"), (33, "server")]
    assert "snapshots sent" in ingested.err

    plot = tmp_path / "out" / "fuel.png"
    forecast = await cli("capacity", "forecast", "SAT-PLT", "fuel", "--plot", str(plot))
    assert forecast.code == 0, forecast.err
    assert "days remaining" in forecast.out and "P10 / P50 / P90" in forecast.out
    # The chart draws the stored history (ListSnapshots): all 30 accepted snapshots.
    assert f"plot written to {plot} (30 history points)" in forecast.out
    width, height = _png_size(plot)
    assert 600 <= width <= 3000 and 400 <= height <= 2000
    assert 20_000 < plot.stat().st_size < 2_000_000

    as_json = (await cli("capacity", "forecast", "SAT-PLT", "fuel", "--json")).json()
    assert as_json["satellite_id"] == "SAT-PLT" and as_json["rate_per_day"] > 0
    # Only the last --history-days of the series are fetched and drawn.
    recent = tmp_path / "recent.png"
    short = await cli(
        "capacity", "forecast", "SAT-PLT", "fuel", "--plot", str(recent), "--history-days", "10.5", "--json"
    )
    assert short.json()["plot_history_points"] == 10 and _png_size(recent)[0] >= 600
    assert short.json()["plot_missions"] == []

    # A scheduled burn is fetched (ListScheduledMissions) and drawn at its time.
    from gen.aetherops.capacity.v1 import capacity_pb2

    burn = capacity_pb2.ScheduledMission(
        mission_id="BURN-PLT",
        satellite_id="SAT-PLT",
        resource_impacts=[capacity_pb2.ResourceImpact(resource_type=capacity_pb2.RESOURCE_TYPE_FUEL, amount=8.0)],
    )
    burn.start_time.FromDatetime(now + timedelta(days=2))
    burn.end_time.FromDatetime(now + timedelta(days=2, hours=3))
    # The sync SDK blocks: off the event loop that runs the server.
    await asyncio.to_thread(_add_mission, f"127.0.0.1:{server.port}", tokens["admin"], burn)
    with_burn = await cli("capacity", "forecast", "SAT-PLT", "fuel", "--plot", str(recent), "--json")
    assert with_burn.json()["plot_missions"] == ["BURN-PLT"] and _png_size(recent)[0] >= 600

    risk = await cli("fleet", "risk")
    assert risk.code == 0 and "RISK" in risk.out and "SAT-PLT" in risk.out
    groups = (await cli("fleet", "risk", "--json")).json()["groups"]
    assert any("SAT-PLT" in g.get("satellite_ids", []) for g in groups)


async def test_runbooks_register_list_start_status(cli: Any, tmp_path: Path) -> None:
    runbook_id = f"rb-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "runbook.yaml"
    path.write_text(
        f"runbook_id: {runbook_id}\n"
        "name: Announce a bus switch\n"
        "steps:\n"
        "  - step_id: announce\n"
        "    action: log\n"
        "    parameters:\n"
        '      message: "switching to bus ${bus}"\n'
        "    timeout: 30s\n"
    )
    registered = await cli("runbooks", "register", str(path))
    assert registered.code == 0, registered.err
    assert runbook_id in registered.out and "version 1" in registered.out
    assert runbook_id in (await cli("runbooks", "list")).out

    # Shown as register takes it: the same text registers as it stands (nothing new), and edited as a
    # new version.
    shown = await cli("runbooks", "show", runbook_id)
    assert shown.code == 0, shown.err
    assert "switching to bus ${bus}" in shown.out and "timeout: 30s" in shown.out
    path.write_text(shown.out)
    assert "unchanged" in (await cli("runbooks", "register", str(path))).out
    path.write_text(shown.out.replace("switching to bus", "now switching to bus"))
    assert "version 2" in (await cli("runbooks", "register", str(path))).out
    first = (await cli("runbooks", "show", runbook_id, "--version", "1", "--json")).json()
    assert first["version"] == 1 and first["steps"][0]["parameters"]["message"] == "switching to bus ${bus}"
    assert (await cli("runbooks", "show", "no-such-runbook")).code == 1

    dry = await cli("runbooks", "start", runbook_id, "--var", "bus=B", "--dry-run")
    assert dry.code == 0 and "switching to bus B" in dry.out

    started = await cli("runbooks", "start", runbook_id, "--var", "bus=B", "--json")
    assert started.code == 0, started.err
    execution_id = started.json()["execution"]["execution_id"]
    status = await cli("runbooks", "status", execution_id)
    assert status.code == 0 and execution_id in status.out and "announce" in status.out
    missing = await cli("runbooks", "approve", execution_id, "no-such-step")
    assert missing.code == 1 and "tracking id" in missing.err


async def test_runbooks_start_for_an_incident(cli: Any, tmp_path: Path) -> None:
    # Started by hand for an incident: listed under it, as an incident-started execution is.
    alerts = tmp_path / "alerts.jsonl"
    alerts.write_text("\n".join(_alert_lines(uuid.uuid4().hex[:8], 2, "SAT-RBI")) + "\n")
    assert (await cli("alerts", "ingest", str(alerts))).code == 0
    (cluster,) = (await cli("clusters", "list", "--satellite", "SAT-RBI", "--json")).json()["clusters"]
    incident = cluster["cluster_id"]
    runbook_id = f"rb-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "runbook.yaml"
    path.write_text(
        f"runbook_id: {runbook_id}\nname: Note the incident\nsteps:\n"
        "  - {step_id: note, action: log, parameters: {message: on it}}\n"
    )
    assert (await cli("runbooks", "register", str(path))).code == 0

    started = await cli("runbooks", "start", runbook_id, "--incident", incident)
    assert started.code == 0, started.err
    assert f"; incident {incident};" in started.out.splitlines()[0]
    listed = (await cli("runbooks", "executions", "--incident", incident, "--json")).json()["executions"]
    assert [(e["runbook_id"], e["incident_id"]) for e in listed] == [(runbook_id, incident)]

    # A mistyped id would link the execution to nothing: refused, nothing started.
    missing = await cli("runbooks", "start", runbook_id, "--incident", "no-such-incident", "--json")
    assert missing.code == 1 and missing.json()["error"]["code"] == "NOT_FOUND"
    assert len((await cli("runbooks", "executions", "--runbook", runbook_id, "--json")).json()["executions"]) == 1


async def test_runbooks_step_and_rollback(cli: Any, tmp_path: Path) -> None:
    # A manual execution advances only through ExecuteNextStep: `runbooks step` is how the CLI gets it going.
    runbook_id = f"rb-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "runbook.yaml"
    path.write_text(
        f"runbook_id: {runbook_id}\n"
        "name: Switch the bus, then confirm\n"
        "steps:\n"
        "  - step_id: switch\n"
        "    action: log\n"
        "    parameters: {message: switching to bus B}\n"
        "    rollback_action: log\n"
        "    rollback_parameters: {message: back to bus A}\n"
        "  - step_id: confirm\n"
        "    action: log\n"
        "    parameters: {message: confirmed}\n"
        "    requires_approval: true\n"
    )
    assert (await cli("runbooks", "register", str(path))).code == 0
    started = await cli("runbooks", "start", runbook_id, "--json")
    assert started.code == 0, started.err
    execution_id = started.json()["execution"]["execution_id"]

    first = await cli("runbooks", "step", execution_id)
    assert first.code == 0, first.err
    assert first.out.splitlines()[0] == "step switch: COMPLETED"
    assert f"execution {execution_id}: RUNNING" in first.out
    rows = {
        line.split()[0]: line.split()[2] for line in first.out.splitlines() if line.startswith(("switch", "confirm"))
    }
    assert rows == {"switch": "COMPLETED", "confirm": "PENDING"}

    second = await cli("runbooks", "step", execution_id, "--json")
    assert second.code == 0, second.err
    body = second.json()
    assert (body["step_status"], body["step_id"]) == ("STEP_STATUS_AWAITING_APPROVAL", "confirm")
    assert body["execution"]["status"] == "RUNBOOK_STATUS_RUNNING"

    rolled = await cli("runbooks", "rollback", execution_id)
    assert rolled.code == 0, rolled.err
    assert rolled.out.splitlines()[0] == "rolled back 1 step(s)"
    assert f"execution {execution_id}: ROLLED_BACK" in rolled.out
    status = (await cli("runbooks", "status", execution_id, "--json")).json()
    assert status["status"] == "RUNBOOK_STATUS_ROLLED_BACK"
    assert {s["step_id"]: s["status"] for s in status["steps"]}["switch"] == "STEP_STATUS_ROLLED_BACK"

    again = await cli("runbooks", "rollback", execution_id, "--json")
    assert again.code == 1 and "FAILED_PRECONDITION" in again.err
    assert again.json()["error"]["code"] == "FAILED_PRECONDITION"
    finished = await cli("runbooks", "step", execution_id)
    assert finished.code == 1 and "FAILED_PRECONDITION" in finished.err and "tracking id" in finished.err


async def _started(cli: Any, tmp_path: Path, name: str, steps: str) -> tuple[str, str]:
    """A runbook (its steps as YAML lines) registered and started by hand: (runbook id, execution id)."""
    runbook_id = f"rb-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "runbook.yaml"
    path.write_text(f"runbook_id: {runbook_id}\nname: {name}\nsteps:\n{steps}")
    assert (await cli("runbooks", "register", str(path))).code == 0
    started = await cli("runbooks", "start", runbook_id, "--json")
    return runbook_id, started.json()["execution"]["execution_id"]


async def test_runbooks_that_do_not_complete_exit_3(cli: Any, tmp_path: Path) -> None:
    # The call worked but the remediation did not: a script must see it (`step && step` stops).
    _, execution_id = await _started(
        cli,
        tmp_path,
        "A step that runs out of time",
        "  - {step_id: slow, action: wait, parameters: {seconds: 30}, timeout: 0.2s}\n",
    )
    failed = await cli("runbooks", "step", execution_id)
    assert failed.code == 3, failed.err
    assert failed.out.splitlines()[0] == "step slow: FAILED"
    watched = await cli("runbooks", "watch", execution_id)  # it has finished: the watch ends at once
    assert watched.code == 3 and "FAILED" in watched.out
    rolled = await cli("runbooks", "rollback", execution_id)  # nothing to undo: that is a complete rollback
    assert rolled.code == 0 and "ROLLED_BACK" in rolled.out


async def test_runbooks_reject(cli: Any, tmp_path: Path) -> None:
    runbook_id, execution_id = await _started(
        cli,
        tmp_path,
        "Switch the bus after a second look",
        "  - {step_id: switch, action: log, parameters: {message: switching to bus B}, requires_approval: true}\n",
    )
    assert (await cli("runbooks", "step", execution_id)).code == 0  # now awaiting approval

    # The approver's queue: running executions, with the step each waits at.
    queue = await cli("runbooks", "executions", "--status", "running", "--runbook", runbook_id)
    assert queue.code == 0, queue.err
    (row,) = [line for line in queue.out.splitlines() if line.startswith(execution_id)]
    assert "RUNNING" in row and "switch (awaiting approval" in row
    as_json = (await cli("runbooks", "executions", "--runbook", runbook_id, "--json")).json()
    (listed,) = as_json["executions"]
    assert listed["execution_id"] == execution_id and listed["steps"][0]["status"] == "STEP_STATUS_AWAITING_APPROVAL"

    rejected = await cli("runbooks", "reject", execution_id, "switch", "--reason", "bus B is in eclipse")
    assert rejected.code == 0, rejected.err
    assert f"execution {execution_id}: FAILED" in rejected.out and "bus B is in eclipse" in rejected.out
    none_left = await cli("runbooks", "executions", "--status", "running", "--runbook", runbook_id)
    assert none_left.out.strip() == "no executions"
    failed = await cli("runbooks", "executions", "--status", "failed", "--runbook", runbook_id)
    assert execution_id in failed.out and "FAILED" in failed.out
    again = await cli("runbooks", "reject", execution_id, "switch", "--json")
    assert again.code == 1 and again.json()["error"]["code"] == "FAILED_PRECONDITION"


async def test_runbooks_cancel(cli: Any, tmp_path: Path) -> None:
    runbook_id, execution_id = await _started(
        cli,
        tmp_path,
        "Switch the bus, unless the fault clears",
        "  - {step_id: switch, action: log, parameters: {message: switching}, requires_approval: true}\n",
    )
    assert (await cli("runbooks", "step", execution_id)).code == 0  # awaiting approval

    cancelled = await cli("runbooks", "cancel", execution_id, "--reason", "the fault cleared")
    assert cancelled.code == 0, cancelled.err
    assert f"execution {execution_id}: CANCELLED" in cancelled.out and "the fault cleared" in cancelled.out
    listed = await cli("runbooks", "executions", "--status", "cancelled", "--runbook", runbook_id)
    assert execution_id in listed.out and "CANCELLED" in listed.out
    again = await cli("runbooks", "cancel", execution_id, "--json")
    assert again.code == 1 and again.json()["error"]["code"] == "FAILED_PRECONDITION"


async def test_capacity_missions_add_list_delete(cli: Any) -> None:
    sat = f"SAT-M-{uuid.uuid4().hex[:6]}"
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    window = ("--start", start.isoformat(), "--end", (start + timedelta(hours=1)).isoformat())
    added = await cli(
        *("capacity", "add-mission", "burn-1", sat, *window),
        *("--impact", "fuel=-2.5", "--impact", "power=-10", "--description", "orbit raise"),
    )
    assert added.code == 0, added.err
    assert "burn-1" in added.out and "fuel -2.5, power -10" in added.out and "orbit raise" in added.out
    listed = (await cli("capacity", "missions", sat, "--resource", "fuel", "--json")).json()
    (mission,) = listed["missions"]
    assert mission["mission_id"] == "burn-1" and len(mission["resource_impacts"]) == 2
    # The server's checks come back as field violations; the CLI's own as usage errors.
    backwards = await cli("capacity", "add-mission", "burn-2", sat, "--start", window[3], "--end", window[1])
    assert backwards.code == 1 and "mission.end_time" in backwards.err
    for bad in (("--impact", "fule=-1"), ("--impact", "fuel"), ("--impact", "fuel=lots")):
        assert (await cli("capacity", "add-mission", "burn-3", sat, *window, *bad)).code == 2
    assert (await cli("capacity", "missions", sat, "--resource", "fule")).code == 2

    deleted = await cli("capacity", "delete-mission", "burn-1")
    assert deleted.code == 0 and "deleted burn-1" in deleted.out
    assert (await cli("capacity", "missions", sat)).out.strip() == f"no scheduled missions for {sat}"
    again = await cli("capacity", "delete-mission", "burn-1")
    assert again.code == 1 and "NOT_FOUND" in again.err


async def test_numeric_options_out_of_range_are_usage_errors(cli: Any) -> None:
    for args in (
        ("clusters", "list", "--limit", "-1"),
        ("clusters", "list", "--min-severity", "-1"),
        ("clusters", "list", "--min-severity", "6"),
        ("fleet", "risk", "--timeout", "0"),
        ("fleet", "risk", "--timeout", "nan"),
        ("health", "--timeout", "-1"),
        ("capacity", "forecast", "SAT-1", "fuel", "--history-days", "0"),
    ):
        result = await cli(*args)
        assert result.code == 2, (args, result.out, result.err)
        assert result.out == "" and "error: argument --" in result.err, args
    assert (await cli("clusters", "list", "--limit", "0")).code == 0  # 0: all
    # An option that only shapes the chart is refused without it, not silently ignored.
    unplotted = await cli("capacity", "forecast", "SAT-1", "fuel", "--history-days", "30")
    assert unplotted.code == 2 and "needs --plot" in unplotted.err


async def test_output_closed_early_exits_quietly(cli: Any, server: Any, tokens: dict[str, str], tmp_path: Path) -> None:
    # Clusters list with their alerts: far more JSON than a pipe buffers (64 KiB), so the CLI is still
    # writing when the reader goes away.
    prefix = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    lines = [
        json.dumps(
            {
                "alert_id": f"{prefix}-{i}",
                "satellite_id": f"SAT-PIPE-{i}",
                "subsystem": "power",
                "severity": 3,
                "timestamp": now.isoformat(),
                "message": "bus undervoltage",
            }
        )
        for i in range(800)
    ]
    path = tmp_path / "alerts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert (await cli("alerts", "ingest", str(path))).code == 0
    listed = await cli("clusters", "list", "--json", "--limit", "0")
    assert listed.code == 0 and len(listed.out) > 4 * 64 * 1024

    read_end, write_end = os.pipe()
    env = {**os.environ, "AETHEROPS_ADDRESS": f"127.0.0.1:{server.port}", "AETHEROPS_TOKEN": tokens["admin"]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "clients.cli", "clusters", "list", "--json", "--limit", "0"),
        cwd=ROOT,
        env=env,
        stdout=write_end,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:  # closing it is `| head -1` going away
        first = await asyncio.to_thread(reader.readline)
    assert first == b"{\n"
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert "Traceback" not in err.decode() and "BrokenPipeError" not in err.decode(), err.decode()
    assert err.decode() == ""
    assert proc.returncode == 141  # 128 + SIGPIPE, as a process ended by SIGPIPE reports


async def test_health_still_works(cli: Any, server: Any) -> None:
    healthy = await cli("health", "--address", f"127.0.0.1:{server.port}")
    assert healthy.code == 0 and healthy.out.strip() == "SERVING"


async def test_health_probes_the_server_aetherops_address_names(cli: Any, server: Any) -> None:
    # Like every other command: an operator who exported AETHEROPS_ADDRESS probes that server.
    healthy = await cli("health", address=f"127.0.0.1:{server.port}")
    assert healthy.code == 0 and healthy.out.strip() == "SERVING"
    # Not the default 127.0.0.1:50051 (where some other server may well answer SERVING).
    down = await cli("health", address="127.0.0.1:1")
    assert down.code == 1 and down.err.startswith("127.0.0.1:1: UNAVAILABLE"), down.err


async def test_runbooks_output_prints_a_steps_output_whole(cli: Any, tmp_path: Path) -> None:
    steps = "  - step_id: pick\n    action: set_variable\n    parameters: {name: bus, value: B}\n"
    _, execution_id = await _started(cli, tmp_path, "Pick a bus", steps)
    before = await cli("runbooks", "output", execution_id, "pick")
    assert before.code == 0 and before.json() is None  # not run yet: no output
    assert (await cli("runbooks", "step", execution_id)).code == 0
    after = await cli("runbooks", "output", execution_id, "pick")
    assert after.code == 0 and after.json() == {"bus": "B"}
    missing = await cli("runbooks", "output", execution_id, "nope")
    assert missing.code == 1 and "NOT_FOUND" in missing.err
