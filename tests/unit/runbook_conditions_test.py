"""Unit tests for the runbook trigger-condition language (aetherops/runbook_conditions.py)."""

from __future__ import annotations

from typing import Any

import pytest

from aetherops.errors import ValidationError
from aetherops.runbook_conditions import MISSING, match_conditions, resolve_path, validate_conditions

INCIDENT: dict[str, Any] = {
    "cluster_id": "c-17",
    "max_severity": 4,
    "subsystems": ["power", "thermal"],
    "satellites": ["SAT-1", "SAT-7"],
    "root_cause": {"subsystem": "power", "confidence": 0.82, "tags": ["bus", "battery"]},
    "acknowledged": False,
    "note": None,
    "alerts": [{"code": "BATT_LOW"}, {"code": "BUS_UV"}],
    "flat.key": "verbatim",
}


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({}, True),
        ({"max_severity": 4}, True),
        ({"max_severity": 5}, False),
        ({"cluster_id": "c-17", "max_severity": 4}, True),
        ({"cluster_id": "c-17", "max_severity": 3}, False),
        ({"missing": 1}, False),
        ({"note": None}, True),
        # Booleans are not numbers: False must not equal 0.
        ({"acknowledged": 0}, False),
        ({"acknowledged": False}, True),
        ({"max_severity": True}, False),
    ],
)
def test_exact_match(conditions: dict[str, Any], expected: bool) -> None:
    assert match_conditions(conditions, INCIDENT) is expected


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"subsystems": "power"}, True),  # data list contains the value
        ({"subsystems": "comms"}, False),
        ({"max_severity": [3, 4, 5]}, True),  # condition list contains the data value
        ({"max_severity": [1, 2]}, False),
        ({"subsystems": ["comms", "thermal"]}, True),  # both lists: they share an element
        ({"subsystems": ["comms", "adcs"]}, False),
        ({"subsystems": ["power", "thermal"]}, True),  # equal lists
    ],
)
def test_list_membership(conditions: dict[str, Any], expected: bool) -> None:
    assert match_conditions(conditions, INCIDENT) is expected


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"max_severity": {"$eq": 4}}, True),
        ({"max_severity": {"$eq": 3}}, False),
        ({"subsystems": {"$eq": "power"}}, True),
        ({"max_severity": {"$ne": 3}}, True),
        ({"max_severity": {"$ne": 4}}, False),
        ({"missing": {"$ne": 4}}, True),
        ({"max_severity": {"$lt": 5}}, True),
        ({"max_severity": {"$lt": 4}}, False),
        ({"max_severity": {"$lte": 4}}, True),
        ({"max_severity": {"$gt": 3}}, True),
        ({"max_severity": {"$gt": 4}}, False),
        ({"max_severity": {"$gte": 4}}, True),
        ({"max_severity": {"$gte": 3, "$lt": 5}}, True),  # several operators: all must hold
        ({"max_severity": {"$gte": 3, "$lt": 4}}, False),
        ({"root_cause.confidence": {"$gt": 0.8}}, True),
        ({"cluster_id": {"$gte": "c-10"}}, True),  # strings order lexicographically
        ({"missing": {"$gt": 1}}, False),
        ({"max_severity": {"$in": [4, 5]}}, True),
        ({"max_severity": {"$in": [1, 2]}}, False),
        ({"subsystems": {"$in": ["comms", "power"]}}, True),
        ({"missing": {"$in": [1]}}, False),
        ({"max_severity": {"$nin": [1, 2]}}, True),
        ({"max_severity": {"$nin": [4]}}, False),
        ({"subsystems": {"$nin": ["thermal"]}}, False),
        ({"missing": {"$nin": [1]}}, True),
        ({"note": {"$exists": True}}, True),  # present with a None value still exists
        ({"missing": {"$exists": True}}, False),
        ({"missing": {"$exists": False}}, True),
        ({"cluster_id": {"$regex": "^c-1"}}, True),
        ({"cluster_id": {"$regex": "^x"}}, False),
        ({"satellites": {"$regex": "-7$"}}, True),  # any list element
        ({"max_severity": {"$regex": "4"}}, False),  # not a string
        ({"missing": {"$regex": "."}}, False),
        ({"max_severity": {"$not": {"$gt": 4}}}, True),
        ({"max_severity": {"$not": {"$gte": 4}}}, False),
    ],
)
def test_comparison_operators(conditions: dict[str, Any], expected: bool) -> None:
    assert match_conditions(conditions, INCIDENT) is expected


@pytest.mark.parametrize(
    "conditions",
    [
        {"cluster_id": {"$lt": 3}},  # "c-17" < 3
        {"max_severity": {"$gt": "a"}},
        {"acknowledged": {"$lt": 1}},  # booleans are not ordered with numbers
        {"root_cause": {"$gt": 1}},
        {"note": {"$lte": 0}},
    ],
)
def test_type_mismatched_comparisons_are_false_not_errors(conditions: dict[str, Any]) -> None:
    assert match_conditions(conditions, INCIDENT) is False


def test_comparisons_against_a_list_match_any_element() -> None:
    data = {"temps": [10, 55, 20]}
    assert match_conditions({"temps": {"$gt": 50}}, data)
    assert not match_conditions({"temps": {"$gt": 60}}, data)


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        ({"$and": [{"max_severity": {"$gte": 4}}, {"subsystems": "power"}]}, True),
        ({"$and": [{"max_severity": {"$gte": 4}}, {"subsystems": "comms"}]}, False),
        ({"$or": [{"max_severity": 5}, {"subsystems": "thermal"}]}, True),
        ({"$or": [{"max_severity": 5}, {"subsystems": "comms"}]}, False),
        ({"$not": {"subsystems": "comms"}}, True),
        ({"$not": {"subsystems": "power"}}, False),
        (
            {
                "$or": [
                    {"$and": [{"max_severity": {"$gte": 5}}, {"satellites": "SAT-1"}]},
                    {"$and": [{"root_cause.subsystem": "power"}, {"$not": {"acknowledged": True}}]},
                ]
            },
            True,
        ),
        ({"max_severity": 4, "$or": [{"subsystems": "comms"}, {"satellites": "SAT-9"}]}, False),
    ],
)
def test_logical_operators(conditions: dict[str, Any], expected: bool) -> None:
    assert match_conditions(conditions, INCIDENT) is expected


def test_dotted_paths_into_nested_data_and_lists() -> None:
    assert match_conditions({"root_cause.subsystem": "power"}, INCIDENT)
    assert match_conditions({"root_cause.tags": "battery"}, INCIDENT)
    assert match_conditions({"alerts.1.code": "BUS_UV"}, INCIDENT)
    assert not match_conditions({"alerts.5.code": "BUS_UV"}, INCIDENT)
    assert not match_conditions({"root_cause.subsystem.deeper": "x"}, INCIDENT)
    assert match_conditions({"flat.key": "verbatim"}, INCIDENT)


def test_resolve_path() -> None:
    assert resolve_path(INCIDENT, "root_cause.confidence") == 0.82
    assert resolve_path(INCIDENT, "alerts.0.code") == "BATT_LOW"
    assert resolve_path(INCIDENT, "root_cause.nope") is MISSING
    assert resolve_path(INCIDENT, "max_severity.x") is MISSING
    assert resolve_path(INCIDENT, "alerts.x") is MISSING
    assert repr(MISSING) == "MISSING"


def test_unknown_operator_raises_validation_error_with_every_problem() -> None:
    conditions = {
        "$foo": 1,
        "max_severity": {"$gte": 4, "$between": [1, 2]},
        "$or": [{"x": {"$regexp": "a"}}],
    }
    with pytest.raises(ValidationError) as caught:
        match_conditions(conditions, INCIDENT)
    fields = [v.field for v in caught.value.violations]
    assert fields == [
        "trigger_conditions.$foo",
        "trigger_conditions.max_severity.$between",
        "trigger_conditions.$or[0].x.$regexp",
    ]


@pytest.mark.parametrize(
    ("conditions", "field", "fragment"),
    [
        ([1, 2], "tc", "must be an object"),
        ({"$and": []}, "tc.$and", "non-empty list"),
        ({"$or": {"a": 1}}, "tc.$or", "non-empty list"),
        ({"$and": [5]}, "tc.$and[0]", "must be an object"),
        ({"$not": 3}, "tc.$not", "must be an object"),
        ({"$gt": 3}, "tc.$gt", "must be applied to a field"),
        ({"a": {"$gt": 1, "b": 2}}, "tc.a", "cannot mix"),
        ({"a": {"$in": 3}}, "tc.a.$in", "needs a list"),
        ({"a": {"$nin": "x"}}, "tc.a.$nin", "needs a list"),
        ({"a": {"$exists": 1}}, "tc.a.$exists", "true or false"),
        ({"a": {"$regex": 5}}, "tc.a.$regex", "needs a string"),
        ({"a": {"$regex": "("}}, "tc.a.$regex", "invalid regular expression"),
        # RE2 (linear time) has no backreferences or lookaround: refused up front, not at match time.
        ({"a": {"$regex": r"(a)\1"}}, "tc.a.$regex", "RE2 syntax"),
        ({"a": {"$not": {"$regex": "x(?=y)"}}}, "tc.a.$not.$regex", "invalid perl operator: (?="),
        ({"a": {"$regex": "\ud800"}}, "tc.a.$regex", "unpaired surrogates"),
        ({"a": {"$not": 5}}, "tc.a.$not", "operator document"),
        ({"a": {"$not": {"$wat": 1}}}, "tc.a.$not.$wat", "unknown operator"),
        ({"a": {"$lt": [1]}}, "tc.a.$lt", "number or a string"),
        ({"a": {"$gte": True}}, "tc.a.$gte", "number or a string"),
        ({"a": {"$gte": float("nan")}}, "tc.a.$gte", "number or a string"),
        ({"": 1}, "tc.", "non-empty strings"),
    ],
)
def test_validate_conditions_reports_the_field(conditions: Any, field: str, fragment: str) -> None:
    violations = validate_conditions(conditions, "tc")
    assert len(violations) == 1, violations
    assert violations[0].field == field
    assert fragment in violations[0].description


def test_valid_documents_have_no_violations() -> None:
    assert validate_conditions({}) == []
    assert validate_conditions({"a": {"b": 1}}) == []  # a plain nested object is an exact-match literal
    assert match_conditions({"root_cause": {"subsystem": "power"}}, {"root_cause": {"subsystem": "power"}})
    assert validate_conditions({"a": {"$not": {"$in": [1]}}, "$not": {"b": 2}}) == []


def test_pathological_nesting_is_rejected() -> None:
    doc: dict[str, Any] = {"a": 1}
    for _ in range(40):
        doc = {"$not": doc}
    violations = validate_conditions(doc)
    assert any("deeper than" in v.description for v in violations)
    ops: dict[str, Any] = {"$eq": 1}
    for _ in range(40):
        ops = {"$not": ops}
    assert any("deeper than" in v.description for v in validate_conditions({"a": ops}))


def test_a_catastrophic_regex_runs_in_linear_time() -> None:
    # Python's backtracking `re` needs about 2**40 steps here (hours); it ran on the event loop and
    # froze every RPC of the server. RE2 answers at once, so this test returning at all is the check.
    conditions = {"msg": {"$regex": "^(a+)+$"}}
    assert validate_conditions(conditions) == []
    assert match_conditions(conditions, {"msg": "a" * 40 + "!"}) is False
    assert match_conditions(conditions, {"msg": ["b", "a" * 40 + "!", "a" * 40]}) is True


def test_lenient_regex_accepts_what_re2_cannot_compile_and_never_matches_it() -> None:
    # For definitions stored while $regex still used Python's re: they must load, and never match.
    conditions = {"a": {"$regex": r"(a)\1"}}
    assert validate_conditions(conditions, lenient_regex=True) == []
    assert match_conditions(conditions, {"a": "aa"}, lenient_regex=True) is False
    assert match_conditions({"a": {"$not": {"$regex": "(?=a)"}}}, {"a": "a"}, lenient_regex=True) is True
    with pytest.raises(ValidationError):
        match_conditions(conditions, {"a": "aa"})
    # Lenient only about regex syntax.
    assert [v.field for v in validate_conditions({"a": {"$regex": 5}}, lenient_regex=True)] == [
        "trigger_conditions.a.$regex"
    ]


def test_regex_on_text_with_an_unpaired_surrogate() -> None:
    # JSON escapes put these in incident data; UTF-8 cannot encode them, RE2 sees invalid bytes.
    assert match_conditions({"a": {"$regex": "^x.y$"}}, {"a": "x\ud800y"}) is True
    assert match_conditions({"a": {"$regex": "^xy$"}}, {"a": "x\ud800y"}) is False
