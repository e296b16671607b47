"""Settings parsing and validation, and the README table and docker-compose.yml kept in step with them."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from aetherops.config import ENV_VARS, MIN_INCIDENT_RETENTION_S, Settings
from aetherops.errors import ConfigError
from aetherops.silences import SilenceIndex

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_environment() -> None:
    s = Settings.from_env({"AETHEROPS_PORT": "6000", "AETHEROPS_SERVICES": "capacity, correlation"})
    assert s.port == 6000
    assert s.services == ("capacity", "correlation")
    assert s.host == "127.0.0.1"
    assert s.uses_embedded_postgres and s.uses_embedded_nats


def test_flags_override_environment() -> None:
    s = Settings.from_env({"AETHEROPS_PORT": "6000"}, port=7000, host=None)
    assert s.port == 7000


def test_every_setting_reads_its_variable() -> None:
    # Each variable set to its default as text gives the default back. A setting parsed by a list of
    # names kept by hand was once missed: AETHEROPS_OUTBOX_RETENTION_S stayed a string, and start-up
    # failed with a TypeError instead of using it.
    defaults = Settings()
    env: dict[str, str] = {}
    for f in fields(Settings):
        value = getattr(defaults, f.name)
        text = ",".join(value) if isinstance(value, tuple) else str(value)
        if text:
            env[ENV_VARS[f.name]] = text
    assert Settings.from_env(env) == defaults
    assert Settings.from_env({"AETHEROPS_OUTBOX_RETENTION_S": "86400"}).outbox_retention_s == 86400.0


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"AETHEROPS_PORT": "http"}, "AETHEROPS_PORT"),
        ({"AETHEROPS_PORT": "70000"}, "AETHEROPS_PORT"),
        ({"AETHEROPS_SERVICES": "correlation,billing"}, "AETHEROPS_SERVICES"),
        ({"AETHEROPS_DATABASE_URL": "mysql://x"}, "AETHEROPS_DATABASE_URL"),
        ({"AETHEROPS_NATS_URL": "http://x"}, "AETHEROPS_NATS_URL"),
        ({"AETHEROPS_REDIS_URL": "x"}, "AETHEROPS_REDIS_URL"),
        ({"AETHEROPS_NAMESPACE": "Bad-Name"}, "AETHEROPS_NAMESPACE"),
        ({"AETHEROPS_CORRELATION_WINDOW_S": "0"}, "AETHEROPS_CORRELATION_WINDOW_S"),
        # An incident that can still be joined is not quiet: resolving sooner than the window is refused.
        ({"AETHEROPS_INCIDENT_RESOLVE_AFTER_S": "120"}, "AETHEROPS_INCIDENT_RESOLVE_AFTER_S"),
        ({"AETHEROPS_LOG_LEVEL": "LOUD"}, "AETHEROPS_LOG_LEVEL"),
        # Deleting a silence while it still covers late alerts would let them open incidents.
        ({"AETHEROPS_INCIDENT_RETENTION_S": "86400"}, "AETHEROPS_INCIDENT_RETENTION_S"),
        ({"AETHEROPS_IDEMPOTENCY_RETENTION_S": "60"}, "AETHEROPS_IDEMPOTENCY_RETENTION_S"),
        (
            {
                "AETHEROPS_CORRELATION_WINDOW_S": "1000000",
                "AETHEROPS_INCIDENT_RESOLVE_AFTER_S": "0",
                "AETHEROPS_INCIDENT_RETENTION_S": "900000",
            },
            "AETHEROPS_INCIDENT_RETENTION_S",
        ),
    ],
)
def test_invalid_values_name_the_setting(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        Settings.from_env(env)


@pytest.mark.parametrize("name", [f.name for f in fields(Settings) if f.type == "float"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_number_setting_must_be_finite(name: str, value: str) -> None:
    # An infinite skew or retention once passed the checks and overflowed a timedelta later.
    with pytest.raises(ConfigError, match=ENV_VARS[name]):
        Settings.from_env({ENV_VARS[name]: value})


def test_readme_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(AETHEROPS_[A-Z0-9_]+)`", readme, re.MULTILINE))
    assert documented == set(ENV_VARS.values())


def test_docker_compose_matches_configuration() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "nats", "redis", "correlation", "runbook", "capacity"} <= set(services)
    assert "-js" in services["nats"]["command"], "JetStream must be on"
    known = set(ENV_VARS.values())
    for name in ("correlation", "runbook", "capacity"):
        svc = services[name]
        env = svc["environment"]
        assert set(env) <= known, f"{name}: unknown variables {set(env) - known}"
        assert env["AETHEROPS_SERVICES"] == name
        Settings.from_env({k: str(v) for k, v in env.items()})  # every value is valid
        assert svc["build"] == "."
        assert "aetherops" in svc["healthcheck"]["test"] and "health" in svc["healthcheck"]["test"]
        container_port = int(env["AETHEROPS_PORT"])
        assert any(str(p).endswith(f":{container_port}") for p in svc["ports"])
    assert (ROOT / "Dockerfile").exists()


def test_the_least_incident_retention_outlives_what_an_ended_silence_still_covers() -> None:
    assert MIN_INCIDENT_RETENTION_S > SilenceIndex.KEEP_AFTER_END_S
    assert Settings(incident_retention_s=0).incident_retention_s == 0  # kept for ever
