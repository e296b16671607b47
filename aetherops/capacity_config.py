"""The fleet's capacity facts from a file: storage capacities and the downlink budget period.

Storage fills towards a capacity and bandwidth is a budget that resets every period; neither can
be read off telemetry, so an operator states them once, in JSON (``.json``) or YAML::

    storage:
      default_capacity: 512          # every satellite, in the unit it reports storage in (e.g. GB)
      satellites:                    # per-satellite capacities override the default
        SAT-7: 1024
    bandwidth:
      period_days: 1                 # the downlink budget resets every day ...
      anchor: "2026-01-01T00:00:00Z" # ... at this boundary (UTC; default the Unix epoch)

`load_capacity_config` returns the keyword arguments of `CapacityPlanner` that the file sets.
Storage reported in "%" needs no capacity; without one, other units get no storage forecast (the
forecast says so). Without a period, bandwidth is an allowance that never resets.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from aetherops.errors import ConfigError

__all__ = ["load_capacity_config", "parse_capacity_config"]

_SETTING = "capacity_config_file"


def load_capacity_config(path: str | Path) -> dict[str, Any]:
    """Planner options from a ``.json`` file or a YAML file (any other suffix); ConfigError if unusable."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{_SETTING}: cannot read {p}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{_SETTING}: {p} is not valid {p.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    return parse_capacity_config(data, source=str(p))


def parse_capacity_config(data: Any, *, source: str = "") -> dict[str, Any]:
    """Planner options from parsed content; every problem is reported at once, by its path."""
    problems: list[str] = []
    options: dict[str, Any] = {}
    root = _mapping(data, "the file", problems, {"storage", "bandwidth"})
    storage = _mapping(root.get("storage", {}), "storage", problems, {"default_capacity", "satellites"})
    if "default_capacity" in storage:
        cap = _positive(storage["default_capacity"], "storage.default_capacity", problems)
        if cap is not None:
            options["default_storage_capacity"] = cap
    satellites = _mapping(storage.get("satellites", {}), "storage.satellites", problems, None)
    capacities: dict[str, float] = {}
    for sat, value in satellites.items():
        if not isinstance(sat, str) or not sat.strip():
            problems.append(f"storage.satellites: satellite ids must be non-empty strings, got {sat!r}")
            continue
        cap = _positive(value, f"storage.satellites.{sat}", problems)
        if cap is not None:
            capacities[sat] = cap
    if capacities:
        options["storage_capacity"] = capacities
    bandwidth = _mapping(root.get("bandwidth", {}), "bandwidth", problems, {"period_days", "anchor"})
    if "period_days" in bandwidth:
        period = _positive(bandwidth["period_days"], "bandwidth.period_days", problems)
        if period is not None:
            options["bandwidth_period_days"] = period
    if "anchor" in bandwidth:
        anchor = _utc_time(bandwidth["anchor"], "bandwidth.anchor", problems)
        if anchor is not None:
            options["bandwidth_period_anchor"] = anchor
        if "period_days" not in bandwidth:
            problems.append("bandwidth.anchor: needs bandwidth.period_days")
    if problems:
        raise ConfigError(f"{_SETTING}: {source + ': ' if source else ''}" + "; ".join(problems))
    return options


def _mapping(value: Any, where: str, problems: list[str], allowed: set[str] | None) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be a mapping, got {type(value).__name__}")
        return {}
    if allowed is not None:
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return value


def _positive(value: Any, where: str, problems: list[str]) -> float | None:
    # bool is an int to Python, never a capacity or a period.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        problems.append(f"{where}: must be a positive number, got {value!r}")
        return None
    return float(value)


def _utc_time(value: Any, where: str, problems: list[str]) -> datetime | None:
    # YAML reads an unquoted timestamp as a datetime already; JSON gives a string.
    when: datetime | None = value if isinstance(value, datetime) else None
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            when = None
    if when is None or when.tzinfo is None:
        problems.append(f"{where}: must be an ISO 8601 time with a zone (e.g. 2026-01-01T00:00:00Z), got {value!r}")
        return None
    return when
