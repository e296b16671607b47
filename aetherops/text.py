"""What text the services accept for storage: identifiers and free text that PostgreSQL can hold.

PostgreSQL's `text` and `jsonb` cannot hold the NUL character (U+0000), which protobuf strings,
JSON and NATS headers carry happily; nor can UTF-8 encode an unpaired surrogate, which JSON's
escapes can produce. Found only when written, such a value fails the whole statement; in a group
commit that is every caller's batch, and a NATS redelivery repeats it. So the validators of what is
written in batches (alerts, snapshots, missions) and of JSON kept in executions refuse it up front,
with the field named, and `aetherops.db.pool` turns a NUL that still reaches the database into a
validation error. Identifiers are also bounded: they are keys of B-tree indexes.
"""

from __future__ import annotations

from collections.abc import Mapping

from aetherops.errors import FieldViolation

__all__ = [
    "ID_WHITESPACE_PROBLEM",
    "MAX_ID_LEN",
    "NUL_PROBLEM",
    "SURROGATE_PROBLEM",
    "chars_problem",
    "filter_problems",
    "id_problem",
    "labels_problems",
    "text_problem",
    "utf8_len",
]

MAX_ID_LEN = 256
"""Longest identifier (alert, satellite, subsystem, mission id) in characters."""

NUL_PROBLEM = "must not contain NUL (U+0000) characters"
SURROGATE_PROBLEM = "must be valid Unicode (no unpaired surrogates)"


def utf8_len(value: str) -> int:
    """Bytes of `value` in UTF-8, as protobuf and NATS carry it (ASCII, the common case, is not encoded)."""
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))


def chars_problem(value: str) -> str | None:
    """Why PostgreSQL cannot store these characters (None when it can): NUL, or an unpaired
    surrogate (JSON's "\\ud800" escape decodes to one; UTF-8 cannot encode it)."""
    if "\x00" in value:
        return NUL_PROBLEM
    if value.isascii():  # the common case, and a flag CPython keeps: no encoding needed
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE_PROBLEM
    return None


ID_WHITESPACE_PROBLEM = "must not start or end with whitespace"


def id_problem(value: object) -> str | None:
    """Why `value` is not a usable identifier (None when it is): a non-blank string of at most
    MAX_ID_LEN characters, with no whitespace at either end, that PostgreSQL can store (see
    `chars_problem`).

    Whitespace at an end is refused, not stripped: " SAT-001" from a hand-edited file would otherwise
    be a satellite of its own, whose alerts never correlate with SAT-001's and whose forecasts are
    apart; and stripping would store an id other than the one its sender keeps (an alert id is the
    sender's idempotency key)."""
    if not isinstance(value, str) or not value.strip():
        return "required: must not be empty"
    if len(value) > MAX_ID_LEN:
        return f"at most {MAX_ID_LEN} characters allowed, got {len(value)}"
    if value[0].isspace() or value[-1].isspace():
        return ID_WHITESPACE_PROBLEM
    return chars_problem(value)


def filter_problems(**filters: str) -> list[FieldViolation]:
    """What is wrong with a listing's identifier filters, one violation per field (keyword = field
    name). Empty means "any"; anything else must be a usable identifier (`id_problem`). Checked
    before the query: a NUL would otherwise fail the statement and be reported against the whole
    request, and an id no row can have (too long, padded) is a mistake to name, not an empty page."""
    problems = []
    for name, value in filters.items():
        if value and (problem := id_problem(value)) is not None:
            problems.append(FieldViolation(name, problem))
    return problems


def text_problem(value: str, max_len: int) -> str | None:
    """Why free text (which may be empty) cannot be stored (None when it can)."""
    if len(value) > max_len:
        return f"at most {max_len} characters allowed, got {len(value)}"
    return chars_problem(value)


def labels_problems(
    labels: Mapping[str, str], field: str, *, max_labels: int = 64, max_len: int = 256
) -> list[FieldViolation]:
    """Every problem with a label map (alert labels, a silence's label matchers), each under `field`:
    at most `max_labels` entries; keys non-empty; keys and values at most `max_len` characters that
    PostgreSQL can store."""
    out: list[FieldViolation] = []
    if len(labels) > max_labels:
        out.append(FieldViolation(field, f"at most {max_labels} labels allowed, got {len(labels)}"))
    for key, value in labels.items():
        if not key:
            out.append(FieldViolation(field, "label keys must not be empty"))
        elif len(key) > max_len:
            out.append(FieldViolation(field, f"label key {key[:32]!r}… longer than {max_len} characters"))
        elif (problem := chars_problem(key)) is not None:
            out.append(FieldViolation(field, f"label key {key[:32]!r} {problem}"))
        if len(value) > max_len:
            out.append(FieldViolation(field, f"value of label {key[:32]!r} longer than {max_len} characters"))
        elif (problem := chars_problem(value)) is not None:
            out.append(FieldViolation(field, f"value of label {key[:32]!r} {problem}"))
    return out
