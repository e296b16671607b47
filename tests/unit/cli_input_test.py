"""The `aetherops` CLI's own logic, without a server: reading bulk input files, cutting listings and tables.

End-to-end runs against a server are in tests/integration/cli_test.py.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from clients.cli import (
    _CLUSTER_HEADERS,
    _alert_from,
    _cluster_row,
    _clusters_list,
    _clusters_watch,
    _print_watch_update,
    _records,
    _snapshot_from,
    _up_to,
)

TIME = "2026-03-01T12:00:00Z"


def _jsonl(tmp_path: Path, *records: dict[str, Any]) -> Path:
    path = tmp_path / "input.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# -- JSON null is an absent field


def test_null_fields_are_absent_fields(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path,
        {
            "alert_id": None,
            "satellite_id": None,
            "subsystem": None,
            "severity": None,
            "timestamp": None,
            "message": None,
            "labels": None,
            "unit": None,
        },
    )
    ((number, record),) = list(_records(path, None))
    assert (number, record) == (1, {})
    message = _alert_from(record)  # not "severity: not an integer: None"
    assert (message.alert_id, message.satellite_id, message.subsystem, message.message) == ("", "", "", "")
    assert message.severity == 0  # absent: the server rejects it with its own reason
    assert not message.HasField("timestamp") and not message.labels


def test_null_alert_fields_are_not_sent_as_the_text_none(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path,
        {"alert_id": "a-1", "satellite_id": "SAT-1", "subsystem": "power", "severity": 3, "timestamp": TIME,
         "message": None, "labels": {"site": "kiruna", "pass": None}},
    )  # fmt: skip
    ((_, record),) = list(_records(path, None))
    assert isinstance(record, dict)
    message = _alert_from(record)
    assert message.message == "" and dict(message.labels) == {"site": "kiruna"}


def test_null_snapshot_fields_are_absent_fields(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path,
        {"satellite_id": "SAT-1", "resource_type": None, "resource": "fuel", "value": 3.5, "unit": None,
         "timestamp": TIME},
    )  # fmt: skip
    ((_, record),) = list(_records(path, None))
    assert isinstance(record, dict)
    snapshot = _snapshot_from(record)
    assert snapshot.unit == "" and snapshot.value == 3.5 and snapshot.resource_type == 1  # fuel
    assert snapshot.satellite_id == "SAT-1"


def test_a_null_record_is_still_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "input.jsonl"
    path.write_text("null\n[1]\n", encoding="utf-8")
    assert list(_records(path, None)) == [(1, "not a JSON object"), (2, "not a JSON object")]


@pytest.mark.parametrize("field", ["alert_id", "satellite_id", "subsystem", "message"])
def test_a_null_text_field_is_empty(tmp_path: Path, field: str) -> None:
    record = {"alert_id": "a-1", "satellite_id": "SAT-1", "subsystem": "power", "severity": 2, "message": "m"}
    ((_, read),) = list(_records(_jsonl(tmp_path, {**record, field: None}), None))
    assert isinstance(read, dict)
    assert getattr(_alert_from(read), field) == ""


# -- severity is an integer, a value a number


def _alert_record(**changes: Any) -> dict[str, Any]:
    return {"alert_id": "a-1", "satellite_id": "SAT-1", "subsystem": "power", "timestamp": TIME, **changes}


@pytest.mark.parametrize("severity", [3, 3.0, "3", " 3 "])
def test_severity_integral_numbers_and_text(severity: Any) -> None:
    assert _alert_from(_alert_record(severity=severity)).severity == 3


@pytest.mark.parametrize(
    ("severity", "shown"),
    [(3.7, "3.7"), (True, "True"), (False, "False"), ("3.0", "'3.0'"), ("high", "'high'"), ([3], "[3]"),
     (float("nan"), "nan"), (float("inf"), "inf")],
)  # fmt: skip
def test_severity_that_is_not_an_integer_is_a_bad_line(severity: Any, shown: str) -> None:
    with pytest.raises(ValueError) as caught:
        _alert_from(_alert_record(severity=severity))
    assert str(caught.value) == f"severity: not an integer: {shown}"


@pytest.mark.parametrize("severity", [2**31, -(2**31) - 1, 1e20])
def test_severity_beyond_int32_is_a_bad_line_not_a_timestamp_error(severity: Any) -> None:
    with pytest.raises(ValueError, match=r"^severity: out of range"):
        _alert_from(_alert_record(severity=severity))


def test_severity_from_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "input.jsonl"
    path.write_text('{"severity": 3.0}\n{"severity": 3.7}\n{"severity": true}\n', encoding="utf-8")
    results = []
    for _, record in _records(path, None):
        assert isinstance(record, dict)
        try:
            results.append(_alert_from(_alert_record(**record)).severity)
        except ValueError as exc:
            results.append(str(exc))
    assert results == [3, "severity: not an integer: 3.7", "severity: not an integer: True"]


def _snapshot_record(**changes: Any) -> dict[str, Any]:
    return {"satellite_id": "SAT-1", "resource": "fuel", "value": 2.5, "unit": "kg", "timestamp": TIME, **changes}


@pytest.mark.parametrize("value", [True, False])
def test_snapshot_value_boolean_is_a_bad_line(value: bool) -> None:
    with pytest.raises(ValueError, match=f"^value: not a number: {value}$"):
        _snapshot_from(_snapshot_record(value=value))


@pytest.mark.parametrize(("value", "expected"), [(2, 2.0), (2.5, 2.5), ("2.5", 2.5)])
def test_snapshot_value_numbers(value: Any, expected: float) -> None:
    assert _snapshot_from(_snapshot_record(value=value)).value == expected


def test_snapshot_resource_boolean_is_no_enum_number() -> None:
    assert _snapshot_from(_snapshot_record(resource_type=1)).resource_type == 1
    with pytest.raises(ValueError, match=r"^resource_type: unknown resource type 'True'"):
        _snapshot_from(_snapshot_record(resource_type=True))


# -- encoding: a byte order mark is read, a line that is not UTF-8 is a bad line

BOM = b"\xef\xbb\xbf"


def test_jsonl_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "input.jsonl"
    path.write_bytes(BOM + b'{"alert_id": "a-1"}\r\n{"alert_id": "a-2"}\r\n')
    assert list(_records(path, None)) == [(1, {"alert_id": "a-1"}), (2, {"alert_id": "a-2"})]


def test_jsonl_line_not_utf8_is_a_bad_line_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "input.jsonl"
    path.write_bytes(
        b'{"message": "ok"}\n'
        b'{"message": "caf\xe9"}\n'  # Latin-1
        b"# a comment in Latin-1 is still a comment: \xe9\n"
        b'{"message": "caf\xc3\xa9 \xe2\x82"}\n' + '{"message": "café ✓"}\n'.encode()  # a sequence cut short
    )
    assert list(_records(path, None)) == [
        (1, {"message": "ok"}),
        (2, "not valid UTF-8 (byte 0xe9 at character 17)"),
        (4, "not valid UTF-8 (byte 0xe2 at character 19)"),
        (5, {"message": "café ✓"}),
    ]


def test_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "input.csv"
    path.write_bytes(BOM + b"alert_id,severity\r\na-1,3\r\n")
    assert list(_records(path, None)) == [(2, {"alert_id": "a-1", "severity": "3"})]


def test_csv_row_not_utf8_is_a_bad_line_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "input.csv"
    path.write_bytes(b"alert_id,message\na-1,ok\na-2,caf\xe9\n" + "a-3,café\n".encode())
    assert list(_records(path, None)) == [
        (2, {"alert_id": "a-1", "message": "ok"}),
        (3, "message: not valid UTF-8 (byte 0xe9 at character 4)"),
        (4, {"alert_id": "a-3", "message": "café"}),
    ]


def test_csv_header_not_utf8_refuses_the_file_as_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "input.csv"
    path.write_bytes(b"alert_id,m\xe9ssage\na-1,ok\n")
    assert list(_records(path, None)) == [
        (1, "header: not valid UTF-8 (byte 0xe9 at character 11); no row read"),
    ]


# -- listings cut by --limit know whether more were left out


def _pages(*pages: list[int]) -> tuple[Any, list[int]]:
    """Items page by page as the SDK's iter_* yields them; `fetched` records each page asked for."""
    fetched: list[int] = []

    def items() -> Any:
        for number, page in enumerate(pages):
            fetched.append(number)
            yield from page

    return items(), fetched


@pytest.mark.parametrize(
    ("limit", "expected", "more", "fetched"),
    [
        (2, [1, 2], True, [0]),  # more on the page at hand: no other call
        (3, [1, 2, 3], True, [0, 1]),  # the limit on a page's end: the next page has more
        (4, [1, 2, 3, 4], False, [0, 1, 2]),  # everything, though a next page was there (empty)
        (9, [1, 2, 3, 4], False, [0, 1, 2]),
        (0, [1, 2, 3, 4], False, [0, 1, 2]),  # 0: all
    ],
)
def test_up_to_says_whether_more_were_left_out(limit: int, expected: list[int], more: bool, fetched: list[int]) -> None:
    items, pages = _pages([1, 2, 3], [4], [])
    assert _up_to(items, limit) == (expected, more)
    assert pages == fetched


# -- a cluster's satellites in a table: the first few, then a count


def _cluster(satellites: int) -> Any:
    from gen.aetherops.correlation.v1 import correlation_pb2

    return correlation_pb2.Cluster(
        cluster_id="c-1", satellite_ids=[f"SAT-{i:04d}" for i in range(satellites)], subsystems=["power"]
    )


@pytest.mark.parametrize(
    ("satellites", "shown"),
    [
        (1, "SAT-0000"),
        (8, ",".join(f"SAT-{i:04d}" for i in range(8))),
        (9, ",".join(f"SAT-{i:04d}" for i in range(8)) + " +1 more"),
        (3000, ",".join(f"SAT-{i:04d}" for i in range(8)) + " +2992 more"),
    ],
)
def test_cluster_row_shows_eight_satellites_then_a_count(satellites: int, shown: str) -> None:
    assert _cluster_row(_cluster(satellites))[_CLUSTER_HEADERS.index("SATELLITES")] == shown


class _Clusters:
    """The one SDK call `clusters list` makes."""

    def __init__(self, *clusters: Any) -> None:
        self.clusters = clusters

    def iter_active_clusters(self, **_: Any) -> Any:
        return iter(self.clusters)


def _list_clusters(capsys: pytest.CaptureFixture[str], *, as_json: bool) -> str:
    args = argparse.Namespace(
        status="active", since=None, until=None, satellite="", min_severity=0, limit=100, acknowledged=None
    )
    args.json = as_json
    assert _clusters_list(_Clusters(_cluster(3000)), args) == 0
    return capsys.readouterr().out


def test_fleet_wide_incident_is_one_short_line_in_the_table_and_whole_in_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    table = _list_clusters(capsys, as_json=False)
    assert max(len(line) for line in table.splitlines()) < 200 and "+2992 more" in table
    (cluster,) = json.loads(_list_clusters(capsys, as_json=True))["clusters"]
    assert len(cluster["satellite_ids"]) == 3000


def test_watch_line_of_a_fleet_wide_incident_is_short(capsys: pytest.CaptureFixture[str]) -> None:
    from gen.aetherops.correlation.v1 import correlation_pb2

    class Watch:
        def watch_clusters(self, **_: Any) -> Any:
            yield correlation_pb2.WatchClustersResponse(
                event_type=correlation_pb2.CLUSTER_EVENT_TYPE_OPENED, cluster=_cluster(3000)
            )

    args = argparse.Namespace(event=[], satellite=[], min_severity=0, since=None, json=False)
    assert _clusters_watch(Watch(), args) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert len(line) < 200 and "SAT-0007 +2992 more" in line


def test_watch_line_of_an_acknowledgement_says_who_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    from gen.aetherops.correlation.v1 import correlation_pb2

    cluster = correlation_pb2.Cluster(cluster_id="c-1", acknowledged_by="ops-jane", acknowledge_note="on the B bus")

    class Watch:
        def watch_clusters(self, **_: Any) -> Any:
            yield correlation_pb2.WatchClustersResponse(
                event_type=correlation_pb2.CLUSTER_EVENT_TYPE_ACKNOWLEDGED, cluster=cluster
            )

    args = argparse.Namespace(event=[], satellite=[], min_severity=0, since=None, json=False)
    assert _clusters_watch(Watch(), args) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "ACKNOWLEDGED" in line and line.endswith("by ops-jane: on the B bus")


def test_a_watch_the_server_ends_resumes_from_the_last_event_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from clients import cli
    from clients.sdk import Unavailable
    from gen.aetherops.correlation.v1 import correlation_pb2

    def update(cluster_id: str, second: int) -> Any:
        reply = correlation_pb2.WatchClustersResponse(
            event_type=correlation_pb2.CLUSTER_EVENT_TYPE_OPENED, cluster=correlation_pb2.Cluster(cluster_id=cluster_id)
        )
        reply.event_time.FromSeconds(1_800_000_000 + second)
        return reply

    class Restarting:
        def __init__(self) -> None:
            self.since: list[Any] = []

        def watch_clusters(self, **kwargs: Any) -> Any:
            self.since.append(kwargs["since"])
            if len(self.since) == 1:
                yield update("c-1", 0)
                raise Unavailable("the server is shutting down: watch again")
            if len(self.since) == 2:
                raise Unavailable("failed to connect to all addresses")  # not back yet
            yield update("c-1", 0)  # replayed: the resume starts at the last event's time
            yield update("c-2", 1)

    monkeypatch.setattr(cli.time, "sleep", lambda _: None)
    client = Restarting()
    args = argparse.Namespace(event=[], satellite=[], min_severity=0, since=None, json=False)
    assert _clusters_watch(client, args) == 0
    out, err = capsys.readouterr()
    assert [word for line in out.splitlines() for word in line.split() if word.startswith("c-")] == ["c-1", "c-2"]
    assert client.since[0] is None and client.since[1] == client.since[2] == update("c-1", 0).event_time.ToDatetime(
        tzinfo=UTC
    )
    assert err.count("resuming") == 2 and "watch again" in err


def test_a_watch_that_cannot_resume_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from clients import cli
    from clients.sdk import Unavailable

    class Gone:
        def watch_clusters(self, **_: Any) -> Any:
            raise Unavailable("failed to connect to all addresses")
            yield  # a generator, as the SDK's

    clock = iter(range(0, 1000, 30))
    monkeypatch.setattr(cli.time, "sleep", lambda _: None)
    monkeypatch.setattr(cli.time, "monotonic", lambda: float(next(clock)))
    args = argparse.Namespace(event=[], satellite=[], min_severity=0, since=None, json=False)
    with pytest.raises(Unavailable):
        _clusters_watch(Gone(), args)


def test_watch_says_an_escalation_even_of_an_acknowledged_incident(capsys: pytest.CaptureFixture[str]) -> None:
    from gen.aetherops.correlation.v1 import correlation_pb2 as pb

    cluster = pb.Cluster(cluster_id="C-9", max_severity=5, alert_count=3, acknowledged_by="ops-anna")
    args = argparse.Namespace(json=False)
    _print_watch_update(
        pb.WatchClustersResponse(event_type=pb.CLUSTER_EVENT_TYPE_UPDATED, cluster=cluster, escalated_from_severity=2),
        args,
    )
    _print_watch_update(pb.WatchClustersResponse(event_type=pb.CLUSTER_EVENT_TYPE_UPDATED, cluster=cluster), args)
    escalated, updated = capsys.readouterr().out.splitlines()
    assert "ESCALATED" in escalated and "from sev 2  (acknowledged by ops-anna)" in escalated
    assert "UPDATED" in updated and "ESCALATED" not in updated


def test_watch_says_whom_an_acknowledgement_was_taken_over_from(capsys: pytest.CaptureFixture[str]) -> None:
    from gen.aetherops.correlation.v1 import correlation_pb2 as pb

    cluster = pb.Cluster(cluster_id="C-9", max_severity=4, acknowledged_by="ops-kim", acknowledge_note="night shift")
    args = argparse.Namespace(json=False)
    acked = pb.CLUSTER_EVENT_TYPE_ACKNOWLEDGED
    _print_watch_update(pb.WatchClustersResponse(event_type=acked, cluster=cluster, taken_over_from="ops-anna"), args)
    _print_watch_update(pb.WatchClustersResponse(event_type=acked, cluster=cluster), args)
    handover, first = capsys.readouterr().out.splitlines()
    assert "by ops-kim: night shift  (taken over from ops-anna)" in handover
    assert first.endswith("by ops-kim: night shift")
