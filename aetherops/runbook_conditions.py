"""Trigger conditions for runbooks: a small, MongoDB-like query language over incident data.

A condition document is a mapping. Each key is either a *field path* (dotted, e.g. `"incident.severity"`)
or a logical operator (`$and`, `$or`, `$not`); all keys of one document must hold (implicit AND). The
value for a field path is either

* a literal: the field matches when it equals the literal, when the field is a list that contains the
  literal, when the literal is a list that contains the field, or - both lists - when they share an element;
* an operator document whose keys all start with `$`: `$eq $ne $lt $lte $gt $gte $in $nin $exists $regex`
  and `$not` (negates another operator document). Several operators in one document must all hold.

A missing field matches only `$ne`, `$nin`, `$exists: false` and negations. Ordering operators compare
numbers with numbers and strings with strings; any other pairing (`"a" < 3`) is simply False. Booleans
are not numbers here (`True` does not equal `1`). When the field holds a list, comparisons, `$in` and
`$regex` match if any element does (as in MongoDB).

`$regex` uses RE2 syntax (https://github.com/google/re2/wiki/Syntax), as Prometheus and Alertmanager do,
and is a search (unanchored unless the pattern says `^`/`$`). Patterns come from API callers and run
against incident data on the server's event loop, so they must not backtrack: Python's `re` takes
seconds on `^(a+)+$` against thirty characters, doubling with each one, and blocks every RPC meanwhile.
RE2 matches in time linear in the text; in exchange it has no backreferences or lookaround, and refuses
them at validation. Unlike Python's `re`, `\\d \\w \\s \\b` are ASCII-only and `$` matches only at the very
end (use `(?m)` for line ends).

Unknown operators are a validation error, never a silent False: `validate_conditions` reports every
problem as a `FieldViolation`, and `match_conditions` raises `ValidationError` before evaluating.
An empty condition document matches everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import re2

from aetherops.errors import FieldViolation, ValidationError
from aetherops.text import SURROGATE_PROBLEM

__all__ = [
    "FIELD_OPERATORS",
    "LOGICAL_OPERATORS",
    "MISSING",
    "match_conditions",
    "resolve_path",
    "validate_conditions",
]

FIELD_OPERATORS: Final = frozenset(
    {"$eq", "$ne", "$lt", "$lte", "$gt", "$gte", "$in", "$nin", "$exists", "$regex", "$not"}
)
LOGICAL_OPERATORS: Final = frozenset({"$and", "$or", "$not"})

# Guards against pathological condition documents (they come from API callers).
_MAX_DEPTH: Final = 32

_RE2_OPTIONS: Final = re2.Options()
_RE2_OPTIONS.log_errors = False  # a caller's bad pattern is a validation error, not a line on stderr
_RE2_OPTIONS.never_capture = True  # only "is there a match" is asked: no groups to track


def _regex_problem(pattern: str) -> str | None:
    """Why RE2 cannot compile `pattern` (None when it can)."""
    try:
        re2.compile(pattern, _RE2_OPTIONS)
    except UnicodeEncodeError:
        return f"invalid regular expression: {SURROGATE_PROBLEM}"
    except re2.error as exc:
        detail = exc.args[0] if exc.args else ""
        if isinstance(detail, bytes):  # the binding passes RE2's message through as bytes
            detail = detail.decode("utf-8", "replace")
        return f"invalid regular expression (RE2 syntax: no backreferences or lookaround): {detail}"
    return None


class _Missing:
    """Sentinel type for "the path does not exist in the data" (distinct from a stored None)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


def resolve_path(data: Any, path: str) -> Any:
    """The value at a dotted `path` in nested mappings (and lists, by numeric segment), or MISSING.

    A key that itself contains dots is found when it exists verbatim at the top level, so incident data
    with flat dotted keys still works.
    """
    if isinstance(data, Mapping) and path in data:
        return data[path]
    current: Any = data
    for segment in path.split("."):
        if isinstance(current, Mapping):
            if segment not in current:
                return MISSING
            current = current[segment]
        elif isinstance(current, list | tuple) and segment.isdigit():
            index = int(segment)
            if index >= len(current):
                return MISSING
            current = current[index]
        else:
            return MISSING
    return current


# --- validation -------------------------------------------------------------------------------------


def validate_conditions(
    conditions: Any, field: str = "trigger_conditions", *, lenient_regex: bool = False
) -> list[FieldViolation]:
    """Every problem in a condition document, each as a violation whose field is a path under `field`.

    With `lenient_regex`, a `$regex` string that RE2 cannot compile is not a problem (it never matches):
    for definitions stored before `$regex` moved from Python's `re` to RE2, which must still load.
    """
    violations: list[FieldViolation] = []
    _validate_document(conditions, field, violations, 0, lenient_regex)
    return violations


def _validate_document(doc: Any, field: str, out: list[FieldViolation], depth: int, lenient_regex: bool) -> None:
    if depth > _MAX_DEPTH:
        out.append(FieldViolation(field, f"conditions nest deeper than {_MAX_DEPTH} levels"))
        return
    if not isinstance(doc, Mapping):
        out.append(FieldViolation(field, "a condition document must be an object"))
        return
    for key, value in doc.items():
        path = f"{field}.{key}"
        if not isinstance(key, str) or not key:
            out.append(FieldViolation(f"{field}.{key!s}", "condition keys must be non-empty strings"))
        elif key in ("$and", "$or"):
            if not isinstance(value, list | tuple) or not value:
                out.append(FieldViolation(path, f"{key} needs a non-empty list of condition documents"))
                continue
            for i, sub in enumerate(value):
                _validate_document(sub, f"{path}[{i}]", out, depth + 1, lenient_regex)
        elif key == "$not":
            _validate_document(value, path, out, depth + 1, lenient_regex)
        elif key.startswith("$"):
            if key in FIELD_OPERATORS:
                out.append(FieldViolation(path, f"operator {key} must be applied to a field"))
            else:
                out.append(FieldViolation(path, f"unknown operator {key}"))
        else:
            _validate_field_value(value, path, out, depth + 1, lenient_regex)


def _is_operator_document(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and any(isinstance(k, str) and k.startswith("$") for k in value)


def _validate_field_value(value: Any, field: str, out: list[FieldViolation], depth: int, lenient_regex: bool) -> None:
    if not _is_operator_document(value):
        return  # a literal: anything JSON-able can be compared for equality
    if not all(isinstance(k, str) and k.startswith("$") for k in value):
        out.append(FieldViolation(field, "an operator document cannot mix $operators and plain keys"))
        return
    _validate_operators(value, field, out, depth, lenient_regex)


def _validate_operators(
    ops: Mapping[str, Any], field: str, out: list[FieldViolation], depth: int, lenient_regex: bool
) -> None:
    if depth > _MAX_DEPTH:
        out.append(FieldViolation(field, f"conditions nest deeper than {_MAX_DEPTH} levels"))
        return
    for op, arg in ops.items():
        path = f"{field}.{op}"
        if op not in FIELD_OPERATORS:
            out.append(FieldViolation(path, f"unknown operator {op}"))
        elif op in ("$in", "$nin"):
            if not isinstance(arg, list | tuple):
                out.append(FieldViolation(path, f"{op} needs a list"))
        elif op == "$exists":
            if not isinstance(arg, bool):
                out.append(FieldViolation(path, "$exists needs true or false"))
        elif op == "$regex":
            if not isinstance(arg, str):
                out.append(FieldViolation(path, "$regex needs a string"))
            elif not lenient_regex and (problem := _regex_problem(arg)) is not None:
                out.append(FieldViolation(path, problem))
        elif op == "$not":
            if not _is_operator_document(arg):
                out.append(FieldViolation(path, "$not on a field needs an operator document, e.g. {$gt: 3}"))
            else:
                _validate_field_value(arg, path, out, depth + 1, lenient_regex)
        elif op in ("$lt", "$lte", "$gt", "$gte") and not _orderable(arg):
            out.append(FieldViolation(path, f"{op} needs a number or a string"))


# --- evaluation -------------------------------------------------------------------------------------


def match_conditions(conditions: Mapping[str, Any], data: Mapping[str, Any], *, lenient_regex: bool = False) -> bool:
    """Whether `data` satisfies `conditions`; raises ValidationError (all problems) for an invalid document.

    `lenient_regex` as in `validate_conditions`: a `$regex` that RE2 cannot compile then never matches.
    """
    violations = validate_conditions(conditions, lenient_regex=lenient_regex)
    if violations:
        raise ValidationError(violations)
    return _match_document(conditions, data)


def _match_document(doc: Mapping[str, Any], data: Any) -> bool:
    for key, value in doc.items():
        if key == "$and":
            if not all(_match_document(sub, data) for sub in value):
                return False
        elif key == "$or":
            if not any(_match_document(sub, data) for sub in value):
                return False
        elif key == "$not":
            if _match_document(value, data):
                return False
        else:
            actual = resolve_path(data, key)
            if _is_operator_document(value):
                if not _match_operators(value, actual):
                    return False
            elif not _equals_or_contains(actual, value):
                return False
    return True


def _match_operators(ops: Mapping[str, Any], actual: Any) -> bool:
    return all(_match_operator(op, arg, actual) for op, arg in ops.items())


def _match_operator(op: str, arg: Any, actual: Any) -> bool:
    if op == "$exists":
        return (actual is not MISSING) == bool(arg)
    if op == "$not":
        return not _match_operators(arg, actual)
    if op == "$ne":
        return not _equals_or_contains(actual, arg)
    if op == "$nin":
        return not any(_equals_or_contains(actual, candidate) for candidate in arg)
    if actual is MISSING:
        return False
    if op == "$eq":
        return _equals_or_contains(actual, arg)
    if op == "$in":
        return any(_equals_or_contains(actual, candidate) for candidate in arg)
    candidates = actual if isinstance(actual, list | tuple) else [actual]
    if op == "$regex":
        try:
            pattern = re2.compile(arg, _RE2_OPTIONS)  # cached by re2 (LRU, keyed by pattern and options)
        except (re2.error, UnicodeEncodeError):  # only with lenient_regex: a stored pre-RE2 pattern
            return False
        # surrogatepass: JSON escapes can put an unpaired surrogate in incident data; strict UTF-8
        # encoding would raise, so RE2 sees those bytes as the invalid UTF-8 they are.
        return any(
            isinstance(c, str) and pattern.search(c.encode("utf-8", "surrogatepass")) is not None for c in candidates
        )
    return any(_compare(op, c, arg) for c in candidates)


def _strict_equal(a: Any, b: Any) -> bool:
    # Python says True == 1; incident data should not (severity 1 is not "true").
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    try:
        return bool(a == b)
    except Exception:  # pragma: no cover - exotic __eq__ in caller data; treat as "not equal"
        return False


def _equals_or_contains(actual: Any, expected: Any) -> bool:
    if actual is MISSING:
        return False
    actual_is_list = isinstance(actual, list | tuple)
    expected_is_list = isinstance(expected, list | tuple)
    if actual_is_list and expected_is_list:
        if _sequence_equal(actual, expected):
            return True
        return any(_strict_equal(a, e) for a in actual for e in expected)
    if actual_is_list:
        return any(_strict_equal(a, expected) for a in actual)
    if expected_is_list:
        return any(_strict_equal(actual, e) for e in expected)
    return _strict_equal(actual, expected)


def _sequence_equal(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(_strict_equal(x, y) for x, y in zip(a, b, strict=True))


def _orderable(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return not math.isnan(value)
    return isinstance(value, int | str)


def _compare(op: str, actual: Any, expected: Any) -> bool:
    # Only number/number and string/string pairs are ordered; everything else is "no match", not a crash.
    if not (_orderable(actual) and _orderable(expected)):
        return False
    if isinstance(actual, str) != isinstance(expected, str):
        return False
    if op == "$lt":
        return bool(actual < expected)
    if op == "$lte":
        return bool(actual <= expected)
    if op == "$gt":
        return bool(actual > expected)
    return bool(actual >= expected)
