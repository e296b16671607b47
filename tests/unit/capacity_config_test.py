"""The capacity facts file: what it sets on the planner, what it refuses, and the README's example."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from aetherops.capacity import CapacityPlanner
from aetherops.capacity_config import load_capacity_config, parse_capacity_config
from aetherops.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_full_file_sets_every_planner_option(tmp_path: Path) -> None:
    path = tmp_path / "capacity.json"
    path.write_text(
        '{"storage": {"default_capacity": 512, "satellites": {"SAT-7": 1024.5}},'
        ' "bandwidth": {"period_days": 1, "anchor": "2026-01-01T06:00:00Z"}}'
    )
    options = load_capacity_config(path)
    assert options == {
        "default_storage_capacity": 512.0,
        "storage_capacity": {"SAT-7": 1024.5},
        "bandwidth_period_days": 1.0,
        "bandwidth_period_anchor": datetime(2026, 1, 1, 6, tzinfo=UTC),
    }
    CapacityPlanner(**options)  # the planner accepts exactly these


def test_yaml_and_empty_sections(tmp_path: Path) -> None:
    path = tmp_path / "capacity.yaml"
    path.write_text("storage:\n  satellites: {A: 10}\nbandwidth:\n")
    assert load_capacity_config(path) == {"storage_capacity": {"A": 10.0}}
    assert parse_capacity_config(None) == {}


def test_every_problem_is_reported_by_its_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse_capacity_config(
            {
                "storage": {"default_capacity": 0, "satellites": {"A": -1, "B": True, "": 5}, "size": 3},
                "bandwidth": {"period_days": "daily", "anchor": "2026-01-01T00:00:00"},
                "fuel": {},
            }
        )
    message = str(err.value)
    for expected in (
        "capacity_config_file",
        "the file: unknown key(s) fuel",
        "storage: unknown key(s) size",
        "storage.default_capacity: must be a positive number, got 0",
        "storage.satellites.A: must be a positive number, got -1",
        "storage.satellites.B: must be a positive number, got True",
        "satellite ids must be non-empty strings",
        "bandwidth.period_days: must be a positive number, got 'daily'",
        "bandwidth.anchor: must be an ISO 8601 time with a zone",
    ):
        assert expected in message, expected


def test_anchor_needs_a_period_and_sections_must_be_mappings() -> None:
    with pytest.raises(ConfigError, match=r"bandwidth\.anchor: needs bandwidth\.period_days"):
        parse_capacity_config({"bandwidth": {"anchor": "2026-01-01T00:00:00+00:00"}})
    with pytest.raises(ConfigError, match="storage: must be a mapping, got list"):
        parse_capacity_config({"storage": [1, 2]})


def test_unreadable_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_capacity_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid json"):
        load_capacity_config(bad)


def test_readme_example_is_valid() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Capacity facts", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None, "README: the Capacity facts section has a YAML example"
    options = parse_capacity_config(yaml.safe_load(block.group(1)))
    assert options["default_storage_capacity"] == 512.0
    assert options["bandwidth_period_days"] == 1.0
