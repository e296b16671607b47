"""servers.status keeps a status within what a gRPC client accepts in trailing metadata."""

from __future__ import annotations

from typing import Any

from google.rpc import error_details_pb2, status_pb2

from aetherops.errors import FieldViolation, NotFoundError, ValidationError
from servers.status import DETAIL_BYTES, MESSAGE_BYTES, first_violations, status_for


def _wire_bytes(status: Any) -> int:
    # What travels: the message (percent-encoded: 3 bytes per non-ASCII byte, at worst) and the
    # details, a google.rpc.Status holding the message again (base64).
    message, details = status.details, dict(status.trailing_metadata)["grpc-status-details-bin"]
    return 3 * len(message.encode()) + len(details) * 4 // 3


def test_a_long_list_of_problems_is_cut_and_counted() -> None:
    problems = [FieldViolation("alert.labels", f"value of label 'é{i:03d}' must not contain NUL") for i in range(500)]
    status = status_for(ValidationError(problems))
    shown = first_violations(problems)
    assert 10 < len(shown) < 500
    assert status.details.endswith(f"(and {500 - len(shown)} more problems not listed)")
    assert _wire_bytes(status) < 7 * 1024  # under the client's 8 KiB soft limit, with room for the rest
    # The details list the problems that fit.
    bad = error_details_pb2.BadRequest()
    whole = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    whole.details[0].Unpack(bad)
    assert [v.description for v in bad.field_violations] == [v.description for v in shown]


def test_few_problems_are_listed_whole_and_one_is_always_listed() -> None:
    few = [FieldViolation("severity", "must be between 1 and 5"), FieldViolation("satellite_id", "required")]
    assert first_violations(few) == few
    assert status_for(ValidationError(few)).details == "severity: must be between 1 and 5; satellite_id: required"
    huge = [FieldViolation("message", "x" * (DETAIL_BYTES * 2)), FieldViolation("labels", "y")]
    assert first_violations(huge) == huge[:1]


def test_any_message_is_cut_to_its_budget_on_a_character_boundary() -> None:
    status = status_for(NotFoundError("cluster " + "é" * 5000 + " not found"))
    assert len(status.details.encode()) <= MESSAGE_BYTES + len("…".encode())
    assert status.details.endswith("é…")
