"""The `aetherops` command line: `aetherops serve` runs the system; the operator commands talk to it.

`serve` takes its settings from AETHEROPS_* variables (flags override them) and
exits 0 after a clean shutdown, 1 when it cannot listen, 2 for invalid settings. The operator commands
(`alerts`, `clusters`, `silences`, `runbooks`, `capacity`, `fleet`, `trace`) use the sync SDK
with `--address` / AETHEROPS_ADDRESS and `--token` / AETHEROPS_TOKEN, print
readable tables (or JSON with `--json`) and exit 0 when all went well, 1 when a
call failed (message and tracking id on stderr), input lines were bad or
`trace` found nothing, 2 for usage errors. When the reader of stdout goes away
early (`aetherops clusters list | head -1`) a command stops quietly with 141, the
code of a process ended by SIGPIPE.

Manual runbook executions advance one step per `aetherops runbooks step EXECUTION_ID`
(ExecuteNextStep); `aetherops runbooks rollback EXECUTION_ID` rolls one back.

`aetherops trace TRACKING_ID` follows one request through the system: the alerts
ingested under it (ListAlerts), their incidents (GetCluster), the runbook
executions of those incidents and those started or acted on under the id
(ListExecutions), and each execution's steps (GetExecutionStatus), as a tree.

`health` and the operator commands connect over TLS when given `--ca-file`
(AETHEROPS_CA_FILE), adding a client certificate for mTLS with `--cert-file` and
`--key-file` (AETHEROPS_CLIENT_CERT_FILE, AETHEROPS_CLIENT_KEY_FILE).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import ipaddress
import itertools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from aetherops.auth import Role, bootstrap_admin_token, write_token_file
from aetherops.config import Settings
from aetherops.errors import ConfigError, UnavailableError
from aetherops.gctune import settle_long_lived_state
from aetherops.logs import configure_logging

__all__ = ["PlotSeries", "main", "plot_series"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aetherops", description="Operations backbone for a satellite fleet.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC services (embedded PostgreSQL and NATS unless URLs are set)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--services", help="comma-separated subset of correlation,runbook,capacity")
    serve.add_argument("--data-dir", type=Path, help="where embedded PostgreSQL and NATS keep data")
    serve.add_argument("--database-url", help="PostgreSQL DSN (default: embedded)")
    serve.add_argument("--nats-url", help="NATS URL (default: embedded)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    check = sub.add_parser("health", help="gRPC health check; exit 0 when SERVING (container health checks)")
    check.add_argument(
        "--address",
        default=os.environ.get("AETHEROPS_ADDRESS") or "127.0.0.1:50051",
        help="server address (default AETHEROPS_ADDRESS or 127.0.0.1:50051)",
    )
    check.add_argument(
        "--service",
        default="",
        help="a service name (e.g. aetherops.correlation.v1.CorrelationService, or aetherops.ratelimit: "
        "rate limits shared through Redis); empty = the whole server",
    )
    check.add_argument(
        "--timeout", type=_positive_float, default=3.0, help="seconds to wait for the answer (default 3)"
    )
    _add_tls_flags(check)
    tokens = sub.add_parser("create-tokens", help="write a new token file (stored hashed) and print the tokens once")
    tokens.add_argument("file", type=Path, help="the file to create (refused if it exists)")
    tokens.add_argument("grants", nargs="+", metavar="NAME=ROLE[,ROLE]", help=f"roles: {', '.join(Role)}")
    _add_operator_commands(sub)
    return parser


# Flag -> environment variable of the client-side TLS files (the server's own are AETHEROPS_TLS_*).
_TLS_FILES = {
    "ca_file": "AETHEROPS_CA_FILE",
    "cert_file": "AETHEROPS_CLIENT_CERT_FILE",
    "key_file": "AETHEROPS_CLIENT_KEY_FILE",
}


class _UsageError(Exception):
    """Bad input from the operator (missing file, bad --var): exit 2."""


# Types of the numeric options: argparse turns their ArgumentTypeError into a usage error (exit 2), so a
# negative --limit or a zero --timeout is refused before anything is sent.


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _rfc3339(text: str) -> datetime:
    """An RFC 3339 time (no offset means UTC), as `alerts ingest` and `capacity ingest` read them."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


_SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def _span(text: str) -> timedelta:
    """A positive length of time: a number and a unit (s, m, h, d), e.g. 90m or 1.5h."""
    unit = _SPAN_UNITS.get(text[-1:].lower())
    try:
        value = float(text[:-1]) if unit else math.nan
    except ValueError:
        value = math.nan
    if unit is None or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"not a length of time such as 90m, 2h or 1d: {text!r}")
    return timedelta(seconds=value * unit)


def _impact(text: str) -> tuple[str, float]:
    """RESOURCE=AMOUNT, e.g. fuel=2.5 (the amount in the series' unit; positive uses, negative gains)."""
    resource, sep, amount = text.partition("=")
    try:
        value = float(amount)
    except ValueError:
        value = math.nan
    if not sep or not resource or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected RESOURCE=AMOUNT (e.g. fuel=2.5), got {text!r}")
    return resource, value


def _int_between(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (no upper bound when high is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            expected = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return parse


def _add_tls_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca-file", type=Path, help="PEM CA of the server certificate: connect over TLS (env AETHEROPS_CA_FILE)"
    )
    parser.add_argument(
        "--cert-file", type=Path, help="client certificate, for mTLS servers (env AETHEROPS_CLIENT_CERT_FILE)"
    )
    parser.add_argument("--key-file", type=Path, help="key of --cert-file (env AETHEROPS_CLIENT_KEY_FILE)")


def _tls_files(args: argparse.Namespace) -> tuple[bytes | None, bytes | None, bytes | None] | None:
    """(CA, client certificate, client key) from the flags or their variables; None: plaintext.

    Any one of them means TLS; without a CA the system's trusted roots verify the server.
    """
    paths: dict[str, Path | None] = {}
    for name, var in _TLS_FILES.items():
        flag: Path | None = getattr(args, name)
        paths[name] = flag if flag is not None else (Path(os.environ[var]) if os.environ.get(var) else None)
    if all(path is None for path in paths.values()):
        return None
    if (paths["cert_file"] is None) != (paths["key_file"] is None):
        raise _UsageError("--cert-file and --key-file go together (the client certificate for mTLS)")
    pem: dict[str, bytes | None] = {}
    for name, path in paths.items():
        try:
            pem[name] = path.expanduser().read_bytes() if path is not None else None
        except OSError as exc:
            raise _UsageError(f"cannot read {path}: {exc.strerror}") from None
    return pem["ca_file"], pem["cert_file"], pem["key_file"]


def _health_channel(args: argparse.Namespace) -> Any:
    import grpc

    tls = _tls_files(args)
    if tls is None:
        return grpc.aio.insecure_channel(args.address)
    ca, cert, key = tls
    return grpc.aio.secure_channel(args.address, grpc.ssl_channel_credentials(ca, key, cert))


async def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address, service, timeout_s = args.address, args.service, args.timeout
    try:
        channel = _health_channel(args)
    except _UsageError as exc:
        print(f"aetherops: {exc}", file=sys.stderr)
        return 2
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            print(f"{address}: {exc.code().name} {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _settings(args: argparse.Namespace) -> Settings:
    services = tuple(s.strip() for s in args.services.split(",") if s.strip()) if args.services else None
    return Settings.from_env(
        host=args.host,
        port=args.port,
        services=services,
        data_dir=args.data_dir,
        database_url=args.database_url,
        nats_url=args.nats_url,
        log_level=args.log_level,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve anywhere


def _with_auth(settings: Settings) -> Settings:
    """Authentication for `serve`: the configured one, or a bootstrapped admin token on loopback only."""
    if settings.security().auth_configured:
        return settings
    if not _is_loopback(settings.host):
        raise ConfigError(
            f"AETHEROPS_HOST: refusing to listen on {settings.host} without authentication; set "
            "AETHEROPS_AUTH_TOKENS_FILE (see `aetherops create-tokens`) or AETHEROPS_JWT_*"
        )
    path, token = bootstrap_admin_token(settings.data_dir)
    if token is not None:
        # Printed, never logged: this is the only time the plaintext exists outside the caller's hands.
        print(
            f"aetherops: created an admin token (shown once; only its hash is kept in {path}):\n{token}",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(f"aetherops: authentication: tokens from {path}", file=sys.stderr, flush=True)
    return settings.with_overrides(auth_tokens_file=str(path))


def _create_tokens(file: Path, grants: list[str]) -> int:
    parsed: dict[str, list[str]] = {}
    for grant in grants:
        name, _, roles = grant.partition("=")
        if not name or not roles or name in parsed:
            print(f"aetherops: expected distinct NAME=ROLE[,ROLE] grants, got {grant!r}", file=sys.stderr)
            return 2
        parsed[name] = [r.strip() for r in roles.split(",") if r.strip()]
    try:
        tokens = write_token_file(file, parsed)
    except (ConfigError, ValueError) as exc:
        print(f"aetherops: {exc}", file=sys.stderr)
        return 2
    except FileExistsError:
        print(f"aetherops: {file} exists; tokens are never replaced silently", file=sys.stderr)
        return 2
    for name, token in tokens.items():
        print(f"{name}\t{token}")
    return 0


async def _serve(settings: Settings) -> int:
    from servers.app import Application

    started = time.monotonic()
    app = Application(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await app.start()
    except UnavailableError as exc:  # the port is taken (another aetherops?): say so, no traceback
        print(f"aetherops: {exc}", file=sys.stderr)
        await app.stop()
        return 1
    print(
        f"aetherops: listening on {settings.host}:{port}; bringing up dependencies",
        file=sys.stderr,
        flush=True,
    )
    ready = asyncio.create_task(app.wait_ready(timeout_s=None))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        # Not a dependency still coming up (those are retried): waiting on would never serve.
        print(f"aetherops: {ready.exception()}", file=sys.stderr, flush=True)
        stopping.cancel()
        await app.stop()
        return 1
    if ready.done():
        # Restored clusters, forecasts and executions live as long as the process.
        settle_long_lived_state()
        print(
            f"aetherops: serving {','.join(settings.services)} on {settings.host}:{port} "
            f"(ready in {time.monotonic() - started:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    await stopping
    ready.cancel()
    t0 = time.monotonic()
    await app.stop()
    print(f"aetherops: stopped in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
    return 0


# -- operator commands ----------------------------------------------------------------------------
#
# Everything below talks to a running server through the sync SDK. Imports of the SDK,
# protobuf and matplotlib stay inside functions so `serve` and `health` start as fast as before.

EXIT_OK, EXIT_RPC, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 128 + 2  # SIGINT, as a shell reports a process it interrupted
# The call worked, but what it ran did not: a step that failed, a rollback left incomplete, a watched
# execution that ended other than COMPLETED. Apart from 1 so a script can tell "the server refused"
# from "the remediation failed", and stop a chain of steps (`step && step`) at the failure.
EXIT_NOT_COMPLETED = 3


def _add_operator_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="server address (default AETHEROPS_ADDRESS or 127.0.0.1:50051)")
    common.add_argument("--token", help="bearer token (default AETHEROPS_TOKEN)")
    common.add_argument(
        "--timeout", type=_positive_float, help="deadline of each call in seconds (default 10; ingest: none)"
    )
    common.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    _add_tls_flags(common)

    alerts = sub.add_parser("alerts", help="ingest and list alerts").add_subparsers(dest="action", required=True)
    ingest = alerts.add_parser(
        "ingest",
        parents=[common],
        help="bulk-ingest a JSONL or CSV file of alerts",
        description="Bulk-ingest alerts (IngestAlerts), one JSON object per line (JSONL; blank lines and lines "
        "starting with # are skipped) or one CSV row per alert under a header line. Fields read: alert_id, "
        "satellite_id, subsystem, severity (an integer, 1-5), timestamp (RFC 3339, e.g. "
        "2025-01-01T12:00:00Z; no offset means UTC), message, labels (a JSON object, or k=v;k2=v2). "
        "Other fields are ignored. The file is UTF-8 (a byte order mark is skipped). Bad lines, and lines that "
        "are not UTF-8, are reported by line number (exit 1).",
    )
    ingest.add_argument("file", type=Path, help="the alerts file (.csv is read as CSV, anything else as JSONL)")
    ingest.add_argument("--format", choices=("jsonl", "csv"), help="default: from the file extension")
    stored = alerts.add_parser(
        "list",
        parents=[common],
        help="stored alerts of an incident or a tracking id, oldest first (duplicates marked)",
    )
    stored.add_argument("--cluster", default="", metavar="CLUSTER_ID", help="the alerts of this incident")
    stored.add_argument("--tracking", default="", metavar="TRACKING_ID", help="the alerts ingested under this id")
    stored.add_argument("--silence", default="", metavar="SILENCE_ID", help="the alerts this silence covered")
    stored.add_argument("--satellite", default="", metavar="SATELLITE_ID", help="only this satellite's alerts")
    stored.add_argument(
        "--limit", type=_int_between(0), default=100, help="at most this many alerts (default 100; 0: all)"
    )

    clusters = sub.add_parser("clusters", help="incident clusters").add_subparsers(dest="action", required=True)
    listing = clusters.add_parser(
        "list", parents=[common], help="active clusters, newest activity first (--status: every open one, history)"
    )
    listing.add_argument("--satellite", default="", metavar="SATELLITE_ID", help="only clusters of this satellite")
    listing.add_argument(
        "--status",
        choices=("active", "open", "closed", "all"),
        default="active",
        help="active (default): open, with an alert within the correlation window; open: every open incident,"
        " quiet ones too; closed; all. All but active list the most recently opened first",
    )
    listing.add_argument(
        "--since", type=_rfc3339, help="only clusters with an alert at or after this RFC 3339 time (not with active)"
    )
    listing.add_argument(
        "--until", type=_rfc3339, help="only clusters with an alert before this RFC 3339 time (not with active)"
    )
    listing.add_argument(
        "--limit", type=_int_between(0), default=100, help="at most this many clusters (default 100; 0: all)"
    )
    attended = listing.add_mutually_exclusive_group()
    attended.add_argument(
        "--unacknowledged",
        dest="acknowledged",
        action="store_false",
        default=None,
        help="only clusters nobody acknowledged yet (what is unattended)",
    )
    attended.add_argument("--acknowledged", dest="acknowledged", action="store_true", help="only acknowledged clusters")
    show = clusters.add_parser("show", parents=[common], help="one cluster with its alerts")
    show.add_argument("cluster_id", help="the cluster (incident) id, as `clusters list` shows it")
    watching = clusters.add_parser(
        "watch", parents=[common], help="follow incidents as they open, grow and close (Ctrl-C stops)"
    )
    watching.add_argument(
        "--satellite",
        action="append",
        default=[],
        metavar="SATELLITE_ID",
        help="only incidents involving this satellite (repeatable)",
    )
    watching.add_argument(
        "--event",
        action="append",
        default=[],
        choices=("opened", "updated", "acknowledged", "closed"),
        help="only these events (repeatable; default: all)",
    )
    watching.add_argument(
        "--since",
        type=_rfc3339,
        help="first the events published since this RFC 3339 time (e.g. the last one seen), then live",
    )
    for parser in (listing, watching):
        parser.add_argument(
            "--min-severity",
            type=_int_between(0, 5),
            default=0,
            help="only clusters whose highest severity is at least this, 1-5 (default 0: any)",
        )
    close = clusters.add_parser("close", parents=[common], help="close a cluster")
    close.add_argument("cluster_id", help="the cluster (incident) id, as `clusters list` shows it")
    close.add_argument("--reason", default="", help="why it is closed (kept with the cluster)")
    ack = clusters.add_parser("ack", parents=[common], help="acknowledge a cluster: you are working on it")
    ack.add_argument("cluster_id", help="the cluster (incident) id, as `clusters list` shows it")
    ack.add_argument("--note", default="", help="what you are doing about it (kept with the cluster)")
    ack.add_argument(
        "--take-over",
        action="store_true",
        help="take over the acknowledgement someone else holds (a shift handover)",
    )
    merge = clusters.add_parser(
        "merge",
        parents=[common],
        help="merge clusters the engine kept apart into one: one fault behind them (MergeClusters)",
        description="Merge clusters into CLUSTER_ID: their alerts move to it, its root cause is ranked anew,"
        " and each source closes, pointing at it. Later alerts that would have joined a source join it.",
    )
    merge.add_argument("cluster_id", help="the cluster that stays, as `clusters list` shows it")
    merge.add_argument("source_cluster_ids", nargs="+", metavar="SOURCE_ID", help="the clusters merged into it")
    merge.add_argument("--note", default="", help="why they are one incident (kept in each source's close reason)")

    silences = sub.add_parser(
        "silences", help="keep expected alerts (a burn, a test) out of incidents for a while"
    ).add_subparsers(dest="action", required=True)
    silence = silences.add_parser(
        "create", parents=[common], help="silence the alerts that match every matcher given, observed in a window"
    )
    silence.add_argument("--satellite", action="append", default=[], metavar="SATELLITE_ID", help="(repeatable)")
    silence.add_argument("--subsystem", action="append", default=[], metavar="NAME", help="(repeatable)")
    silence.add_argument("--label", action="append", default=[], metavar="K=V", help="(repeatable; all must match)")
    silence.add_argument("--start", type=_rfc3339, help="RFC 3339 time (default: now)")
    until = silence.add_mutually_exclusive_group(required=True)
    until.add_argument("--end", type=_rfc3339, help="RFC 3339 time")
    until.add_argument("--for", dest="span", type=_span, metavar="SPAN", help="from the start, e.g. 90m, 2h, 1d")
    silence.add_argument("--comment", required=True, help="why: the manoeuvre, the test, the ticket")
    listed_silences = silences.add_parser("list", parents=[common], help="silences not yet ended, newest first")
    listed_silences.add_argument("--all", action="store_true", help="ended ones too")
    listed_silences.add_argument(
        "--satellite", default="", metavar="SATELLITE_ID", help="only those that apply to it: naming it or no satellite"
    )
    expire = silences.add_parser("expire", parents=[common], help="end a silence now")
    expire.add_argument("silence_id")

    runbooks = sub.add_parser("runbooks", help="remediation runbooks").add_subparsers(dest="action", required=True)
    register = runbooks.add_parser("register", parents=[common], help="register (or version) a runbook from YAML")
    register.add_argument("file", type=Path, help="a Runbook in its JSON form, written as YAML")
    runbooks.add_parser("list", parents=[common], help="latest version of every runbook")
    show_runbook = runbooks.add_parser(
        "show",
        parents=[common],
        help="a runbook's definition as YAML, the form `register` takes (edit it and register it again)",
    )
    show_runbook.add_argument("runbook_id", help="the runbook, as `runbooks list` shows it")
    show_runbook.add_argument("--version", type=_int_between(0), default=0, help="a past version (default: latest)")
    start = runbooks.add_parser("start", parents=[common], help="start an execution")
    start.add_argument("runbook_id", help="the runbook to run (its latest version)")
    start.add_argument("--var", action="append", default=[], metavar="K=V", help="execution variable (repeatable)")
    start.add_argument("--dry-run", action="store_true", help="only show what would run")
    start.add_argument(
        "--incident",
        default="",
        metavar="CLUSTER_ID",
        help="the incident it is started for: listed under it (`runbooks executions --incident`, `trace`),"
        " with the incident's fields as variables (${satellite_ids}, ...; a --var of the same name wins)",
    )
    approve = runbooks.add_parser("approve", parents=[common], help="approve a step awaiting approval")
    approve.add_argument("execution_id", help="the execution, as `runbooks start` printed it")
    approve.add_argument("step_id", help="the step awaiting approval")
    approve.add_argument("--approver", default="", help="who approves (the authenticated principal wins)")
    reject = runbooks.add_parser(
        "reject",
        parents=[common],
        help="refuse a step awaiting approval: the execution fails (and rolls back with auto_rollback)",
    )
    reject.add_argument("execution_id", help="the execution, as `runbooks start` printed it")
    reject.add_argument("step_id", help="the step awaiting approval")
    reject.add_argument("--reason", default="", help="why, for the audit trail")
    reject.add_argument("--approver", default="", help="who rejects (the authenticated principal wins)")
    status = runbooks.add_parser("status", parents=[common], help="an execution's state and steps")
    status.add_argument("execution_id", help="the execution, as `runbooks start` printed it")
    output = runbooks.add_parser(
        "output", parents=[common], help="a step's output, whole, as JSON (status leaves big ones out)"
    )
    output.add_argument("execution_id")
    output.add_argument("step_id")
    step = runbooks.add_parser(
        "step",
        parents=[common],
        help="run the next step of an execution (ExecuteNextStep)",
        description="Run the next step of an execution once (ExecuteNextStep): executions started by hand "
        "advance only this way. Prints the step's status (AWAITING_APPROVAL for a step that needs "
        "`runbooks approve` first) and the execution, as `runbooks status` does.",
    )
    step.add_argument("execution_id", help="the execution, as `runbooks start` printed it")
    cancel = runbooks.add_parser(
        "cancel",
        parents=[common],
        help="stop a running execution where it is, without rolling back (CancelExecution)",
    )
    cancel.add_argument("execution_id", help="the execution, as `runbooks start` printed it")
    cancel.add_argument("--reason", default="", help="why (kept in the audit trail)")
    rollback = runbooks.add_parser(
        "rollback",
        parents=[common],
        help="roll an execution back (RollbackExecution)",
        description="Roll an execution back (RollbackExecution): the rollback actions of its completed steps "
        "(and of a step that timed out, which may have acted) run in reverse order; a running execution is "
        "stopped first. Prints how many steps were rolled "
        "back and the execution.",
    )
    rollback.add_argument("execution_id", help="the execution, as `runbooks start` printed it")
    executions = runbooks.add_parser(
        "executions", parents=[common], help="executions, newest first, with the step each running one is at"
    )
    executions.add_argument(
        "--status", choices=("running", "completed", "failed", "rolled_back", "cancelled"), default=""
    )
    executions.add_argument("--incident", default="", metavar="CLUSTER_ID", help="only those of this incident")
    executions.add_argument("--runbook", default="", metavar="RUNBOOK_ID", help="only those of this runbook")
    executions.add_argument(
        "--limit", type=_int_between(0), default=50, help="at most this many executions (default 50; 0: all)"
    )
    watch = runbooks.add_parser("watch", parents=[common], help="follow an execution until it finishes")
    watch.add_argument("execution_id", help="the execution, as `runbooks start` printed it")

    capacity = sub.add_parser("capacity", help="resource telemetry and forecasts").add_subparsers(
        dest="action", required=True
    )
    snapshots = capacity.add_parser(
        "ingest",
        parents=[common],
        help="bulk-ingest a JSONL or CSV file of snapshots",
        description="Bulk-ingest resource snapshots (IngestSnapshots), one JSON object per line (JSONL) or one "
        "CSV row per snapshot under a header line. Fields read: satellite_id, resource_type or resource "
        "(fuel, power, storage or bandwidth; in JSONL also the enum number), value (a number), unit, "
        "timestamp (RFC 3339; no offset means UTC). Other fields are ignored. The file is UTF-8 (a byte order "
        "mark is skipped). Bad lines, and lines that are not UTF-8, are reported by line number (exit 1).",
    )
    snapshots.add_argument("file", type=Path, help="the snapshots file (.csv is read as CSV, anything else as JSONL)")
    snapshots.add_argument("--format", choices=("jsonl", "csv"), help="default: from the file extension")
    forecast = capacity.add_parser("forecast", parents=[common], help="when a resource runs out")
    forecast.add_argument("satellite_id", help="the satellite, e.g. SAT-001")
    forecast.add_argument("resource", help="fuel, power, storage or bandwidth")
    forecast.add_argument("--plot", type=Path, metavar="OUT.png", help="write a chart of the forecast")
    forecast.add_argument(
        "--history-days",
        type=_positive_float,
        help="days of stored history the chart shows (default 90; only with --plot)",
    )

    missions = capacity.add_parser(
        "missions", parents=[common], help="a satellite's scheduled missions, earliest first"
    )
    missions.add_argument("satellite_id", help="the satellite, e.g. SAT-001")
    missions.add_argument("--resource", help="only missions with an impact on this resource")
    plan = capacity.add_parser(
        "add-mission",
        parents=[common],
        help="schedule a mission (or replace the one with its id); forecasts count its impacts",
    )
    plan.add_argument("mission_id", help="the mission's id (adding it again replaces it)")
    plan.add_argument("satellite_id", help="the satellite, e.g. SAT-001")
    plan.add_argument("--start", type=_rfc3339, required=True, help="RFC 3339 start time (no offset: UTC)")
    plan.add_argument("--end", type=_rfc3339, required=True, help="RFC 3339 end time, after --start")
    plan.add_argument(
        "--impact",
        type=_impact,
        action="append",
        default=[],
        metavar="RESOURCE=AMOUNT",
        help="what it does to a resource, in the series' unit: use (+) or gain (-), e.g. fuel=2.5 (repeatable)",
    )
    plan.add_argument("--description", default="", help="what the mission is")
    unplan = capacity.add_parser("delete-mission", parents=[common], help="remove a scheduled mission")
    unplan.add_argument("mission_id", help="the mission's id, as `capacity missions` shows it")

    fleet = sub.add_parser("fleet", help="the fleet as a whole").add_subparsers(dest="action", required=True)
    fleet.add_parser("risk", parents=[common], help="satellites grouped by risk level")

    trace = sub.add_parser(
        "trace", parents=[common], help="follow a tracking id: alerts -> incident -> runbook executions and steps"
    )
    trace.add_argument("tracking_id", help="an x-tracking-id (of IngestAlert, StartExecution, ApproveStep ...)")


def _run_operator_command(args: argparse.Namespace) -> int:
    from clients.sdk import AetherOpsError, ClientConfig, SyncAetherOpsClient

    handler = _HANDLERS[(args.command, getattr(args, "action", None))]
    try:
        tls = _tls_files(args)
        ca, cert, key = tls or (None, None, None)
        config = ClientConfig.from_env(
            address=args.address,
            token=args.token,
            tls=True if tls is not None else None,
            root_certificates=ca,
            certificate_chain=cert,
            private_key=key,
        )
        if args.timeout is not None:
            config = ClientConfig(**{**config.__dict__, "timeout_s": args.timeout})
        with SyncAetherOpsClient(config=config) as client:
            return handler(client, args)
    except _UsageError as exc:
        print(f"aetherops: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AetherOpsError as exc:
        _report_error(exc, as_json=args.json)
        return EXIT_RPC
    except KeyboardInterrupt:
        # Ctrl-C is how a watch ends: no traceback, and the shell's usual code for SIGINT.
        return EXIT_INTERRUPTED


def _report_error(exc: Any, *, as_json: bool) -> None:
    print(f"aetherops: {exc.code.name}: {exc.message}", file=sys.stderr)
    for violation in exc.field_violations:
        print(f"  {violation.field}: {violation.description}", file=sys.stderr)
    if exc.retry_after is not None:
        print(f"  retry after {exc.retry_after:.1f}s", file=sys.stderr)
    print(f"  tracking id: {exc.tracking_id}", file=sys.stderr)
    if as_json:
        error = {
            "code": exc.code.name,
            "message": exc.message,
            "tracking_id": exc.tracking_id,
            "field_violations": [{"field": v.field, "description": v.description} for v in exc.field_violations],
        }
        _emit({"error": error})


# -- output helpers


def _emit(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _to_dict(message: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table; empty cells show as '-'."""
    cells = [[str(c) if c not in ("", None) else "-" for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _when(ts: Any) -> str:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return ""
    return str(ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%SZ"))


def _enum(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


T = TypeVar("T")


def _up_to(items: Iterable[T], limit: int) -> tuple[list[T], bool]:
    """The first `limit` items (0: all), and whether more were left out.

    Whether there are more is known by asking for one more: from the page at hand, or the next page's
    first item when the limit falls on a page's end (a next page token need not mean another item).
    """
    iterator = iter(items)
    found = list(itertools.islice(iterator, limit) if limit else iterator)
    return found, bool(limit) and len(found) == limit and next(iterator, None) is not None


def _say_cut(more: bool, noun: str) -> None:
    """On stderr, so a listing cut by --limit says so and stdout (table or JSON) stays what scripts read."""
    if more:
        print(f"... more {noun} not shown (raise --limit; --limit 0 shows all)", file=sys.stderr)


# -- bulk input files


def _not_utf8(text: str) -> str | None:
    """Why text read with errors="surrogateescape" was not valid UTF-8 (its first bad byte), or None.

    That handler turns each byte that does not decode into a lone surrogate U+DC80-U+DCFF, which
    valid UTF-8 never decodes to, so a bad line is found (and reported) on its own.
    """
    for column, char in enumerate(text, start=1):
        if "\udc80" <= char <= "\udcff":
            return f"not valid UTF-8 (byte 0x{ord(char) - 0xDC00:02x} at character {column})"
    return None


def _records(path: Path, fmt: str | None) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, record or parse error) for each record of a JSONL or CSV file."""
    if not path.is_file():
        raise _UsageError(f"no such file: {path}")
    kind = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    # utf-8-sig: a byte order mark (Excel, Notepad) is not part of the first field name or JSON object.
    # surrogateescape: a line that is not UTF-8 is a bad line, not a UnicodeDecodeError ending the load.
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        if kind == "csv":
            reader = csv.DictReader(handle)
            header_problem = _not_utf8(",".join(reader.fieldnames or ()))
            if header_problem is not None:
                # Field names that cannot be read match nothing: every row would be wrong.
                yield reader.line_num, f"header: {header_problem}; no row read"
                return
            for row in reader:
                if None in row:
                    yield reader.line_num, "more fields than the header has"
                    continue
                problem = next(
                    (f"{k}: {p}" for k, v in row.items() if isinstance(v, str) and (p := _not_utf8(v))), None
                )
                if problem is not None:
                    yield reader.line_num, problem
                    continue
                yield reader.line_num, {k.strip(): v for k, v in row.items() if k is not None and v not in ("", None)}
            return
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            problem = _not_utf8(line)  # its column as in the file
            if problem is not None:
                yield number, problem
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, f"not valid JSON: {exc.msg} (column {exc.colno})"
                continue
            if not isinstance(record, dict):
                yield number, "not a JSON object"
                continue
            # A null field is an absent one (as in CSV, where an empty cell is left out): never the text
            # "None" sent as an id, nor a null severity reported as "not an integer".
            yield number, {k: v for k, v in record.items() if v is not None}


def _labels(value: Any) -> dict[str, str]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = json.loads(text)
        else:
            pairs = [item.split("=", 1) for item in text.split(";") if item.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("labels: expected k=v;k2=v2 or a JSON object")
            return {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, dict):
        raise ValueError("labels: expected an object")
    return {str(k): str(v) for k, v in value.items() if v is not None}  # a null label is no label


_INT32 = range(-(2**31), 2**31)  # what Alert.severity (int32) can carry


def _severity(value: Any) -> int:
    """An alert's severity: an integer, as a JSON number (3 or 3.0) or text (a CSV cell, "3").

    int() alone would truncate 3.7 to 3 and take a JSON true as 1: a typo sent as another severity.
    """
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = int(value) if value.is_integer() else None
    elif isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            number = None
    else:
        number = None
    if number is None:
        raise ValueError(f"severity: not an integer: {value!r}")
    if number not in _INT32:  # the server judges 1-5; this could not even be sent
        raise ValueError(f"severity: out of range: {value!r}")
    return number


def _alert_from(record: dict[str, Any]) -> Any:
    from clients.sdk import alert

    severity = _severity(record.get("severity", 0))
    timestamp = record.get("timestamp")
    try:
        message = alert(
            alert_id=str(record.get("alert_id", "")),
            satellite_id=str(record.get("satellite_id", "")),
            subsystem=str(record.get("subsystem", "")),
            severity=severity,
            timestamp_=str(timestamp) if timestamp else None,
            message=str(record.get("message", "")),
            labels=_labels(record.get("labels")),
        )
    except ValueError as exc:
        if "labels" in str(exc):
            raise
        raise ValueError(f"timestamp: not an RFC 3339 time: {timestamp!r}") from None
    if not timestamp:
        # Sent unset rather than "now": the server rejects it with its own reason.
        message.ClearField("timestamp")
    return message


def _snapshot_from(record: dict[str, Any]) -> Any:
    from clients.sdk import snapshot

    resource = record.get("resource_type", record.get("resource", ""))
    try:
        if isinstance(record.get("value"), bool):  # float(true) would be 1.0
            raise TypeError
        value = float(record.get("value", "nan"))
    except (TypeError, ValueError):
        raise ValueError(f"value: not a number: {record.get('value')!r}") from None
    timestamp = record.get("timestamp")
    try:
        parsed = snapshot(
            satellite_id=str(record.get("satellite_id", "")),
            # A JSON true is no enum number (it would read as 1, fuel): as text it is an unknown name.
            resource=resource if isinstance(resource, int) and not isinstance(resource, bool) else str(resource),
            value=value,
            unit=str(record.get("unit", "")),
            timestamp_=str(timestamp) if timestamp else None,
        )
    except ValueError as exc:
        if "resource type" in str(exc):
            raise ValueError(f"resource_type: {exc}") from None
        raise ValueError(f"timestamp: not an RFC 3339 time: {timestamp!r}") from None
    if not timestamp:
        parsed.ClearField("timestamp")  # as for alerts: the server names the missing field
    return parsed


class _Progress:
    """Count and rate on stderr: redrawn in place on a terminal, a line every second otherwise."""

    def __init__(self, noun: str) -> None:
        self.noun = noun
        self.count = 0
        self.started = time.monotonic()
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def tick(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= (0.2 if self._tty else 1.0):
            self._last = now
            self._draw(final=False)

    def _draw(self, *, final: bool) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        text = f"{self.count} {self.noun} sent, {self.count / elapsed:.0f}/s, {elapsed:.1f}s"
        if self._tty:
            print("\r" + text + ("\n" if final else ""), end="", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def done(self) -> None:
        self._draw(final=True)


def _bulk(client: Any, args: argparse.Namespace, noun: str, parse: Callable[[dict[str, Any]], Any], send: str) -> int:
    """Parse a file, stream the good records, and report bad lines by line number."""
    bad: list[dict[str, Any]] = []
    sent_lines: list[int] = []  # stream position -> line number, to place the server's rejections
    progress = _Progress(noun)

    def stream() -> Iterator[Any]:
        for number, record in _records(args.file, args.format):
            if isinstance(record, str):
                bad.append({"line": number, "reason": record, "source": "parse"})
                continue
            try:
                message = parse(record)
            except ValueError as exc:
                bad.append({"line": number, "reason": str(exc), "source": "parse"})
                continue
            sent_lines.append(number)
            progress.tick()
            yield message

    if not args.file.is_file():
        raise _UsageError(f"no such file: {args.file}")
    reply = getattr(client, send)(stream(), timeout=args.timeout)  # none unless given: see the SDK
    progress.done()
    for rejection in reply.rejections:
        line = sent_lines[rejection.index] if 0 <= rejection.index < len(sent_lines) else None
        bad.append(
            {
                "line": line,
                "reason": rejection.reason,
                "source": "server",
                "problems": [{"field": p.field, "description": p.description} for p in rejection.problems],
            }
        )
    bad.sort(key=lambda b: (b["line"] is None, b["line"] or 0))
    # Alerts count records stored by an earlier load apart; a snapshot's duplicate is such a record.
    replays = reply.replays if "replays" in reply.DESCRIPTOR.fields_by_name else None
    silenced = reply.silenced if "silenced" in reply.DESCRIPTOR.fields_by_name else None
    summary = {
        "file": str(args.file),
        "sent": len(sent_lines),
        "accepted": reply.accepted,
        "duplicates": reply.duplicates,
        **({} if replays is None else {"replays": replays}),
        **({} if silenced is None else {"silenced": silenced}),
        "rejected": reply.rejected,
        # The server lists only the first rejections of a big load (rejected counts them all).
        "unlisted": reply.rejected - len(reply.rejections),
        "unparsed": sum(1 for b in bad if b["source"] == "parse"),
        "bad_lines": bad,
        "tracking_id": client.last_tracking_id,
    }
    if args.json:
        _emit(summary)
    else:
        stored = "" if replays is None else f"{replays} already stored, "
        if silenced:  # said only when a silence covered some: most loads have none
            stored = f"{silenced} silenced, {stored}"
        print(
            f"{args.file}: {reply.accepted} accepted, {reply.duplicates} duplicates, {stored}{reply.rejected} "
            f"rejected by the server, {summary['unparsed']} unreadable (tracking id {client.last_tracking_id})"
        )
        if bad:
            print(_table(["LINE", "FROM", "REASON"], [[b["line"], b["source"], b["reason"]] for b in bad]))
        if summary["unlisted"]:
            print(f"... and {summary['unlisted']} more rejected by the server, not listed (it lists the first ones)")
    return EXIT_RPC if bad else EXIT_OK


def _alerts_ingest(client: Any, args: argparse.Namespace) -> int:
    return _bulk(client, args, "alerts", _alert_from, "ingest_alerts")


def _capacity_ingest(client: Any, args: argparse.Namespace) -> int:
    return _bulk(client, args, "snapshots", _snapshot_from, "ingest_snapshots")


def _alerts_list(client: Any, args: argparse.Namespace) -> int:
    if not (args.cluster or args.tracking or args.silence):
        raise _UsageError(
            "alerts list: give --cluster, --tracking or --silence (every alert ever stored is not a query)"
        )
    found, more = _up_to(
        client.iter_alerts(
            by_tracking_id=args.tracking, cluster_id=args.cluster, satellite_id=args.satellite, silence_id=args.silence
        ),
        args.limit,
    )
    if args.json:
        _emit({"alerts": [_to_dict(a) for a in found]})
    elif not found:
        print("no alerts")
    else:
        rows = [
            [
                a.alert.alert_id,
                a.alert.satellite_id,
                a.alert.subsystem,
                a.alert.severity,
                _when(a.alert.timestamp),
                a.cluster_id or f"(silenced: {a.silence_id})",
                f"duplicate of {a.duplicate_of_alert_id}" if a.duplicate_of_alert_id else "",
                a.alert.message,
            ]
            for a in found
        ]
        print(_table(["ALERT", "SATELLITE", "SUBSYSTEM", "SEV", "TIME", "CLUSTER", "DUPLICATE", "MESSAGE"], rows))
    _say_cut(more, "alerts")
    return EXIT_OK


# -- clusters


# Satellites named in a cluster's line of a table: a fleet-wide incident lists thousands, and its line
# would be as wide. The rest are counted; --json (and `alerts list --cluster`) has them all.
_SATELLITES_SHOWN = 8


def _satellites(satellite_ids: Sequence[str]) -> str:
    """The first satellites of a cluster, then "+N more"."""
    shown = ",".join(satellite_ids[:_SATELLITES_SHOWN])
    rest = len(satellite_ids) - _SATELLITES_SHOWN
    return f"{shown} +{rest} more" if rest > 0 else shown


def _cluster_row(cluster: Any) -> list[Any]:
    from gen.aetherops.correlation.v1 import correlation_pb2

    return [
        cluster.cluster_id,
        _enum(correlation_pb2.ClusterStatus, cluster.status, "CLUSTER_STATUS_"),
        cluster.acknowledged_by or "-",
        cluster.max_severity,
        cluster.alert_count,
        _satellites(cluster.satellite_ids),
        ",".join(cluster.subsystems),
        cluster.root_cause_alert_id,
        _when(cluster.last_alert_time),
    ]


_CLUSTER_HEADERS = [
    "CLUSTER",
    "STATUS",
    "ACK BY",
    "SEV",
    "ALERTS",
    "SATELLITES",
    "SUBSYSTEMS",
    "ROOT CAUSE",
    "LAST ALERT",
]


def _clusters_list(client: Any, args: argparse.Namespace) -> int:
    if args.status == "active":
        if args.since or args.until:
            raise _UsageError("--since and --until need --status open, closed or all (active means: now)")
        found = client.iter_active_clusters(
            satellite_id=args.satellite,
            min_severity=args.min_severity,
            acknowledged=args.acknowledged,
            with_alerts=args.json,  # the table shows none: not reading them keeps polling a storm cheap
        )
    else:
        found = client.iter_clusters(
            status=0 if args.status == "all" else args.status,
            satellite_id=args.satellite,
            min_severity=args.min_severity,
            start=args.since,
            end=args.until,
            acknowledged=args.acknowledged,
            with_alerts=args.json,
        )
    clusters, more = _up_to(found, args.limit)
    if args.json:
        _emit({"clusters": [_to_dict(c) for c in clusters]})
    elif clusters:
        print(_table(_CLUSTER_HEADERS, [_cluster_row(c) for c in clusters]))
    else:
        print("no active clusters" if args.status == "active" else "no clusters")
    _say_cut(more, "clusters")
    return EXIT_OK


def _print_cluster(cluster: Any) -> None:
    print(_table(_CLUSTER_HEADERS, [_cluster_row(cluster)]))
    print(
        f"\nroot cause: {cluster.root_cause_alert_id or '-'} (confidence {cluster.root_cause_confidence:.2f}); "
        f"duplicates dropped: {cluster.duplicate_count}; tracking id: {cluster.tracking_id or '-'}"
    )
    if cluster.acknowledged_by:
        print(
            f"acknowledged {_when(cluster.acknowledge_time)} by {cluster.acknowledged_by}:"
            f" {cluster.acknowledge_note or '-'}"
        )
    if cluster.closed_by:
        print(f"closed {_when(cluster.close_time)} by {cluster.closed_by}: {cluster.close_reason or '-'}")
    if cluster.merged_into_cluster_id:
        print(f"its alerts are in {cluster.merged_into_cluster_id} now (`aetherops clusters show` that)")
    if cluster.alerts:
        rows = [
            [a.alert_id, a.satellite_id, a.subsystem, a.severity, _when(a.timestamp), a.message] for a in cluster.alerts
        ]
        print()
        print(_table(["ALERT", "SATELLITE", "SUBSYSTEM", "SEV", "TIME", "MESSAGE"], rows))
        if len(cluster.alerts) < cluster.alert_count:  # a large incident: the server sends the oldest
            print(
                f"(the oldest {len(cluster.alerts)} of {cluster.alert_count} alerts;"
                f" `aetherops alerts list --cluster {cluster.cluster_id}` has them all)"
            )


def _clusters_show(client: Any, args: argparse.Namespace) -> int:
    cluster = client.get_cluster(args.cluster_id).cluster
    if args.json:
        _emit(_to_dict(cluster))
    else:
        _print_cluster(cluster)
    return EXIT_OK


WATCH_PATIENCE_S = 60.0
"""How long `clusters watch` keeps trying to resume a watch the server ended or lost before it gives up."""


def _clusters_watch(client: Any, args: argparse.Namespace) -> int:
    """Prints cluster events until Ctrl-C. A watch the server ends ("watch again": a restart) or
    loses resumes from the last event printed (WatchClusters start_time), through another replica or
    this one once it is back; the replayed last event is not printed twice. After WATCH_PATIENCE_S of
    failed attempts the error stands (exit 1)."""
    from clients.sdk import Unavailable
    from gen.aetherops.correlation.v1 import correlation_pb2

    types = [correlation_pb2.ClusterEventType.Value(f"CLUSTER_EVENT_TYPE_{e.upper()}") for e in args.event]
    since: datetime | None = args.since
    resume_from = since or datetime.now(UTC)
    # The latest events printed: a resume replays from the last one's time, and may repeat a few.
    printed: collections.deque[tuple[int, bytes, bytes]] = collections.deque(maxlen=1000)
    failing_since: float | None = None
    delay = 0.5
    while True:
        try:
            updates = client.watch_clusters(
                satellite_ids=args.satellite, min_severity=args.min_severity, event_types=types, since=since
            )
            for update in updates:
                failing_since, delay = None, 0.5
                key = (
                    update.event_type,
                    update.event_time.SerializeToString(),
                    update.cluster.SerializeToString(deterministic=True),
                )
                if key in printed:
                    continue  # replayed by a resume: printed before it
                printed.append(key)
                resume_from = max(resume_from, update.event_time.ToDatetime(tzinfo=UTC))
                _print_watch_update(update, args)
            return EXIT_OK
        except Unavailable as exc:
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since > WATCH_PATIENCE_S:
                raise
            print(f"(watch interrupted: {exc.message}; resuming in {delay:g} s)", file=sys.stderr, flush=True)
            time.sleep(delay)  # a pause before reconnecting, not synchronisation
            delay = min(delay * 2, 5.0)
            since = resume_from


def _print_watch_update(update: Any, args: argparse.Namespace) -> None:
    from gen.aetherops.correlation.v1 import correlation_pb2

    if args.json:
        print(json.dumps(_to_dict(update), sort_keys=True), flush=True)  # one JSON object per line
        return
    if update.dropped_events:
        print(f"({update.dropped_events} events missed: this watch fell behind)", flush=True)
    c = update.cluster
    event = _enum(correlation_pb2.ClusterEventType, update.event_type, "CLUSTER_EVENT_TYPE_")
    acknowledged = ""
    if update.event_type == correlation_pb2.CLUSTER_EVENT_TYPE_ACKNOWLEDGED:
        acknowledged = f"  by {c.acknowledged_by}: {c.acknowledge_note or '-'}"
        if update.taken_over_from:
            acknowledged += f"  (taken over from {update.taken_over_from})"
    elif update.escalated_from_severity:  # news even when someone acknowledged it: say so first
        event = "ESCALATED"
        acknowledged = f"  from sev {update.escalated_from_severity}" + (
            f"  (acknowledged by {c.acknowledged_by})" if c.acknowledged_by else ""
        )
    print(
        f"{_when(update.event_time)}  {event:<12}  {c.cluster_id}  sev {c.max_severity}  {c.alert_count} alerts"
        f"  {_satellites(c.satellite_ids)}  {','.join(c.subsystems)}  root cause {c.root_cause_alert_id or '-'}"
        f"{acknowledged}",
        flush=True,
    )


def _clusters_ack(client: Any, args: argparse.Namespace) -> int:
    cluster = client.acknowledge_cluster(args.cluster_id, note=args.note, take_over=args.take_over).cluster
    if args.json:
        _emit(_to_dict(cluster))
    else:
        print(f"acknowledged {cluster.cluster_id} at {_when(cluster.acknowledge_time)} as {cluster.acknowledged_by}")
    return EXIT_OK


def _clusters_merge(client: Any, args: argparse.Namespace) -> int:
    cluster = client.merge_clusters(args.cluster_id, args.source_cluster_ids, note=args.note).cluster
    if args.json:
        _emit(_to_dict(cluster))
    else:
        print(f"merged {', '.join(args.source_cluster_ids)} into {cluster.cluster_id}:")
        _print_cluster(cluster)
    return EXIT_OK


def _clusters_close(client: Any, args: argparse.Namespace) -> int:
    cluster = client.close_cluster(args.cluster_id, reason=args.reason).cluster
    if args.json:
        _emit(_to_dict(cluster))
    else:
        print(f"closed {cluster.cluster_id} at {_when(cluster.close_time)}")
    return EXIT_OK


# -- silences


def _silence_row(s: Any) -> list[Any]:
    matchers = [*s.satellite_ids, *s.subsystems, *(f"{k}={v}" for k, v in sorted(s.labels.items()))]
    return [s.silence_id, _when(s.start_time), _when(s.end_time), ",".join(matchers), s.created_by, s.comment]


def _silences_create(client: Any, args: argparse.Namespace) -> int:
    labels: dict[str, str] = {}
    for pair in args.label:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _UsageError(f"--label {pair!r}: expected K=V")
        labels[key] = value
    if not (args.satellite or args.subsystem or labels):
        raise _UsageError(
            "silences create: give --satellite, --subsystem or --label (a silence of everything hides every fault)"
        )
    start = args.start
    end = args.end if args.end is not None else (start or datetime.now(UTC)) + args.span
    silence = client.create_silence(
        end=end,
        comment=args.comment,
        satellite_ids=args.satellite,
        subsystems=args.subsystem,
        labels=labels,
        start=start,
    ).silence
    if args.json:
        _emit(_to_dict(silence))
    else:
        print(f"silence {silence.silence_id}: {_when(silence.start_time)} until {_when(silence.end_time)}")
    return EXIT_OK


def _silences_list(client: Any, args: argparse.Namespace) -> int:
    found = list(client.iter_silences(include_ended=args.all, satellite_id=args.satellite))
    if args.json:
        _emit({"silences": [_to_dict(s) for s in found]})
    elif found:
        print(_table(["SILENCE", "FROM", "UNTIL", "MATCHERS", "BY", "COMMENT"], [_silence_row(s) for s in found]))
    else:
        print("no silences")
    return EXIT_OK


def _silences_expire(client: Any, args: argparse.Namespace) -> int:
    silence = client.expire_silence(args.silence_id).silence
    if args.json:
        _emit(_to_dict(silence))
    else:
        print(f"silence {silence.silence_id} ended at {_when(silence.end_time)}")
    return EXIT_OK


# -- runbooks


def _runbooks_register(client: Any, args: argparse.Namespace) -> int:
    import yaml

    if not args.file.is_file():
        raise _UsageError(f"no such file: {args.file}")
    try:
        definition = yaml.safe_load(args.file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise _UsageError(f"{args.file}: not valid YAML: {exc}") from None
    if not isinstance(definition, dict):
        raise _UsageError(f"{args.file}: expected a mapping (a Runbook in its JSON form)")
    from google.protobuf import json_format

    try:
        reply = client.register_runbook(definition)
    except json_format.ParseError as exc:
        raise _UsageError(f"{args.file}: {exc}") from None
    if args.json:
        _emit(_to_dict(reply))
    else:
        verb = "registered" if reply.created else "unchanged"
        print(f"{verb}: {reply.runbook.runbook_id} version {reply.runbook.version} ({len(reply.runbook.steps)} steps)")
    return EXIT_OK


# Kept by the server, not part of what one registers: left out of `runbooks show`, so that its output
# registers as it stands (as a new version once edited).
_RUNBOOK_OUTPUT_FIELDS = ("version", "status", "create_time")


def _runbooks_show(client: Any, args: argparse.Namespace) -> int:
    import yaml

    runbook = client.get_runbook(args.runbook_id, version=args.version).runbook
    if args.json:
        _emit(_to_dict(runbook))
        return EXIT_OK
    definition = {k: v for k, v in _to_dict(runbook).items() if k not in _RUNBOOK_OUTPUT_FIELDS}
    print(f"# {runbook.runbook_id} version {runbook.version}, registered {_when(runbook.create_time)}")
    print(yaml.safe_dump(definition, sort_keys=False, allow_unicode=True), end="")
    return EXIT_OK


def _runbooks_list(client: Any, args: argparse.Namespace) -> int:
    from gen.aetherops.runbook.v1 import runbook_pb2

    runbooks, token = [], ""
    while True:
        page = client.list_runbooks(page_token=token)
        runbooks.extend(page.runbooks)
        token = page.next_page_token
        if not token:
            break
    if args.json:
        _emit({"runbooks": [_to_dict(r) for r in runbooks]})
    elif runbooks:
        rows = [
            [
                r.runbook_id,
                r.version,
                _enum(runbook_pb2.RunbookStatus, r.status, "RUNBOOK_STATUS_"),
                len(r.steps),
                "yes" if r.auto_start else "no",
                r.name,
            ]
            for r in runbooks
        ]
        print(_table(["RUNBOOK", "VERSION", "STATUS", "STEPS", "AUTO", "NAME"], rows))
    else:
        print("no runbooks")
    return EXIT_OK


def _variables(pairs: Sequence[str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise _UsageError(f"--var {pair!r}: expected K=V")
        try:
            value: Any = json.loads(raw)  # numbers, booleans and JSON stay typed
        except json.JSONDecodeError:
            value = raw
        result[key.strip()] = value
    return result


def _print_execution(execution: Any) -> None:
    from gen.aetherops.runbook.v1 import runbook_pb2

    status = _enum(runbook_pb2.RunbookStatus, execution.status, "RUNBOOK_STATUS_")
    incident = f"incident {execution.incident_id}; " if execution.incident_id else ""
    print(
        f"execution {execution.execution_id}: {status}; runbook {execution.runbook_id} v{execution.runbook_version}; "
        f"triggered by {execution.triggered_by or '-'}; {incident}tracking id {execution.tracking_id or '-'}"
    )
    if execution.error:
        print(f"error: {execution.error}")
    rows = [
        [
            step.step_id,
            step.action,
            _enum(runbook_pb2.StepStatus, step.status, "STEP_STATUS_"),
            step.attempts,
            step.approved_by,
            _when(step.finish_time) or _when(step.start_time),
            step.error,
        ]
        for step in execution.steps
    ]
    if rows:
        print(_table(["STEP", "ACTION", "STATUS", "TRIES", "APPROVED BY", "TIME", "ERROR"], rows))


def _runbooks_start(client: Any, args: argparse.Namespace) -> int:
    reply = client.start_execution(
        args.runbook_id, variables=_variables(args.var), dry_run=args.dry_run, incident_id=args.incident
    )
    if args.json:
        _emit(_to_dict(reply))
    elif args.dry_run:
        print(f"dry run of {args.runbook_id}: nothing was stored or called")
        rows = [
            [p.step_id, p.action, "yes" if p.requires_approval else "no", json.dumps(_to_dict(p.rendered_parameters))]
            for p in reply.plan
        ]
        print(_table(["STEP", "ACTION", "APPROVAL", "PARAMETERS"], rows))
    else:
        _print_execution(reply.execution)
    return EXIT_OK


def _runbooks_approve(client: Any, args: argparse.Namespace) -> int:
    return _show_execution(client.approve_step(args.execution_id, args.step_id, approver=args.approver), args)


def _runbooks_reject(client: Any, args: argparse.Namespace) -> int:
    reply = client.reject_step(args.execution_id, args.step_id, reason=args.reason, approver=args.approver)
    return _show_execution(reply, args)


def _show_execution(reply: Any, args: argparse.Namespace) -> int:
    """Prints the execution a command answered with (as JSON with --json)."""
    if args.json:
        _emit(_to_dict(reply.execution))
    else:
        _print_execution(reply.execution)
    return EXIT_OK


def _stepped(execution: Any, step_status: int) -> Any:
    """The step ExecuteNextStep acted on: the last step, in runbook order, that has the status it answered.

    The answer carries only the status. Steps run in order, so the step just run is the last with its
    status (steps after it are still PENDING); a step awaiting approval or failed is the only one so.
    """
    matching = [step for step in execution.steps if step.status == step_status]
    return matching[-1] if matching else None


def _runbooks_step(client: Any, args: argparse.Namespace) -> int:
    from gen.aetherops.runbook.v1 import runbook_pb2

    reply = client.execute_next_step(args.execution_id)
    step = _stepped(reply.execution, reply.step_status)
    if args.json:
        body = _to_dict(reply)
        body["step_id"] = step.step_id if step is not None else None
        _emit(body)
        return EXIT_NOT_COMPLETED if reply.step_status == runbook_pb2.STEP_STATUS_FAILED else EXIT_OK
    status = _enum(runbook_pb2.StepStatus, reply.step_status, "STEP_STATUS_")
    print(f"step {step.step_id}: {status}" if step is not None else f"step: {status}")
    _print_execution(reply.execution)
    return EXIT_NOT_COMPLETED if reply.step_status == runbook_pb2.STEP_STATUS_FAILED else EXIT_OK


def _runbooks_cancel(client: Any, args: argparse.Namespace) -> int:
    execution = client.cancel_execution(args.execution_id, reason=args.reason).execution
    if args.json:
        _emit(_to_dict(execution))
    else:
        _print_execution(execution)
    return EXIT_OK


def _runbooks_rollback(client: Any, args: argparse.Namespace) -> int:
    from gen.aetherops.runbook.v1 import runbook_pb2

    reply = client.rollback_execution(args.execution_id)
    # A rollback action that failed leaves the execution FAILED ("rollback incomplete").
    code = EXIT_OK if reply.execution.status == runbook_pb2.RUNBOOK_STATUS_ROLLED_BACK else EXIT_NOT_COMPLETED
    if args.json:
        body = _to_dict(reply)
        body.setdefault("rolled_back_count", 0)  # proto3 JSON leaves a zero out
        _emit(body)
        return code
    print(f"rolled back {reply.rolled_back_count} step(s)")
    _print_execution(reply.execution)
    return code


def _runbooks_status(client: Any, args: argparse.Namespace) -> int:
    execution = client.get_execution_status(args.execution_id).execution
    if args.json:
        _emit(_to_dict(execution))
    else:
        _print_execution(execution)
    return EXIT_OK


def _runbooks_output(client: Any, args: argparse.Namespace) -> int:
    reply = client.get_step_output(args.execution_id, args.step_id)
    # JSON either way: an output is data for a script or a person to read as it is.
    _emit(_to_dict(reply.output) if reply.HasField("output") else None)
    return EXIT_OK


def _runbooks_executions(client: Any, args: argparse.Namespace) -> int:
    from gen.aetherops.runbook.v1 import runbook_pb2

    running = runbook_pb2.RUNBOOK_STATUS_RUNNING
    status = args.status or runbook_pb2.RUNBOOK_STATUS_UNSPECIFIED
    found, more = _up_to(
        client.iter_executions(incident_id=args.incident, runbook_id=args.runbook, status=status), args.limit
    )
    # The listing is the index (no steps): a running execution's state says where it is, and whether
    # that step waits for an approver - the question this listing is asked most.
    shown = [client.get_execution_status(e.execution_id).execution if e.status == running else e for e in found]
    if args.json:
        _emit({"executions": [_to_dict(e) for e in shown]})
        _say_cut(more, "executions")
        return EXIT_OK
    if not shown:
        print("no executions")
        return EXIT_OK
    rows = []
    for e in shown:
        at = "-"
        if e.status == running and e.current_step_index < len(e.steps):
            step = e.steps[e.current_step_index]
            at = step.step_id
            if step.status == runbook_pb2.STEP_STATUS_AWAITING_APPROVAL:
                expires = _when(step.approval_expire_time)
                at += " (awaiting approval" + (f" until {expires})" if expires else ")")
        rows.append(
            [
                e.execution_id,
                f"{e.runbook_id} v{e.runbook_version}",
                _enum(runbook_pb2.RunbookStatus, e.status, "RUNBOOK_STATUS_"),
                at,
                e.incident_id or "-",
                e.triggered_by or "-",
                _when(e.start_time),
            ]
        )
    print(_table(["EXECUTION", "RUNBOOK", "STATUS", "AT STEP", "INCIDENT", "TRIGGERED BY", "STARTED"], rows))
    _say_cut(more, "executions")
    return EXIT_OK


def _runbooks_watch(client: Any, args: argparse.Namespace) -> int:
    from gen.aetherops.runbook.v1 import runbook_pb2

    last = None
    for update in client.watch_execution(args.execution_id):
        execution = last = update.execution
        if args.json:
            print(json.dumps(_to_dict(update), sort_keys=True), flush=True)  # one JSON object per line
            continue
        step = (
            execution.steps[execution.current_step_index]
            if execution.current_step_index < len(execution.steps)
            else None
        )
        status = _enum(runbook_pb2.RunbookStatus, execution.status, "RUNBOOK_STATUS_")
        print(f"{update.transition:<20} {status:<12} next step: {step.step_id if step else '-'}", flush=True)
    return EXIT_NOT_COMPLETED if last is not None and last.status != runbook_pb2.RUNBOOK_STATUS_COMPLETED else EXIT_OK


# -- trace


def _unless_unimplemented(
    pages: Callable[..., Iterator[Any]], service: str, notes: list[str], **filters: Any
) -> list[Any]:
    """Every item of a paged query; a server that does not run that service (--services) gives a note,
    not a failure."""
    from clients.sdk import Unimplemented

    try:
        return list(pages(page_size=500, **filters))
    except Unimplemented:
        notes.append(f"{service} is not served at this address; its part of the trace is missing")
        return []


def _trace(client: Any, args: argparse.Namespace) -> int:
    """alert -> incident -> runbook executions and their steps, for one tracking id."""
    tracking_id = args.tracking_id.strip()
    if not tracking_id:
        raise _UsageError("the tracking id must not be empty")
    notes: list[str] = []
    alerts = _unless_unimplemented(client.iter_alerts, "the correlation service", notes, by_tracking_id=tracking_id)
    incident_ids = list(dict.fromkeys(a.cluster_id for a in alerts))
    executions: dict[str, Any] = {}  # execution id -> ListExecutions entry, in discovery order
    for incident_id in incident_ids:
        for entry in _unless_unimplemented(
            client.iter_executions, "the runbook service", notes, incident_id=incident_id
        ):
            executions.setdefault(entry.execution_id, entry)
    for entry in _unless_unimplemented(
        client.iter_executions, "the runbook service", notes, by_tracking_id=tracking_id
    ):
        executions.setdefault(entry.execution_id, entry)
        # Started (or acted on) under this id for an incident whose alerts came under other ids.
        if entry.incident_id and entry.incident_id not in incident_ids:
            incident_ids.append(entry.incident_id)
    if not alerts and not executions:
        message = f"nothing found for tracking id {tracking_id}: no alert ingested and no execution run under it"
        print(f"aetherops: {message}", file=sys.stderr)
        for note in dict.fromkeys(notes):
            print(f"  {note}", file=sys.stderr)
        if args.json:
            _emit({"error": {"code": "NOT_FOUND", "message": message, "tracking_id": tracking_id}})
        return EXIT_RPC
    from clients.sdk import NotFound, Unimplemented

    clusters = {}
    for incident_id in incident_ids:
        try:
            clusters[incident_id] = client.get_cluster(incident_id).cluster
        except (NotFound, Unimplemented) as exc:  # e.g. a manual start naming an incident never ingested here
            notes.append(f"incident {incident_id}: {exc.message}")
    states = {eid: client.get_execution_status(eid).execution for eid in executions}
    # Oldest first: the order things happened in (ListExecutions pages newest first).
    executions = dict(sorted(executions.items(), key=lambda item: _started(states[item[0]])))
    incidents = [
        {
            "incident_id": incident_id,
            "cluster": clusters.get(incident_id),
            "alerts": [a for a in alerts if a.cluster_id == incident_id],
            "executions": [states[eid] for eid, e in executions.items() if e.incident_id == incident_id],
        }
        for incident_id in incident_ids
    ]
    loose = [states[eid] for eid, e in executions.items() if e.incident_id not in incident_ids]
    if args.json:
        _emit(
            {
                "tracking_id": tracking_id,
                "incidents": [
                    {
                        "incident_id": i["incident_id"],
                        "cluster": _to_dict(i["cluster"]) if i["cluster"] is not None else None,
                        "alerts": [_to_dict(a) for a in i["alerts"]],
                        "executions": [_to_dict(e) for e in i["executions"]],
                    }
                    for i in incidents
                ],
                "executions": [_to_dict(e) for e in loose],
                "notes": list(dict.fromkeys(notes)),
            }
        )
        return EXIT_OK
    _print_trace(tracking_id, incidents, loose, len(alerts), len(executions))
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    return EXIT_OK


def _started(execution: Any) -> tuple[int, int, str]:
    return execution.start_time.seconds, execution.start_time.nanos, execution.execution_id


def _tree(lines: list[str], items: Sequence[tuple[str, list[Any]]], prefix: str) -> None:
    """Append `items` (label, children) as tree lines; children are (label, children) too."""
    for index, (label, children) in enumerate(items):
        last = index == len(items) - 1
        lines.append(f"{prefix}{'└── ' if last else '├── '}{label}")
        _tree(lines, children, prefix + ("    " if last else "│   "))


def _execution_node(execution: Any, tracking_id: str) -> tuple[str, list[Any]]:
    from gen.aetherops.runbook.v1 import runbook_pb2

    status = _enum(runbook_pb2.RunbookStatus, execution.status, "RUNBOOK_STATUS_")
    label = (
        f"execution {execution.execution_id}  runbook {execution.runbook_id} v{execution.runbook_version}  "
        f"{status}  triggered by {execution.triggered_by or '-'}  started {_when(execution.start_time)}"
    )
    if execution.tracking_id and execution.tracking_id != tracking_id:
        label += f"  (tracking id {execution.tracking_id})"
    if execution.error:
        label += f"  error: {execution.error}"
    # Which requests acted on each step (the incident, an approval, a manual ExecuteNextStep ...).
    acted: dict[str, list[str]] = {}
    for entry in execution.audit_log:
        if entry.step_id and entry.tracking_id:
            ids = acted.setdefault(entry.step_id, [])
            if entry.tracking_id not in ids:
                ids.append(entry.tracking_id)
    width = max((len(s.step_id) for s in execution.steps), default=0)
    action_width = max((len(s.action) for s in execution.steps), default=0)
    steps: list[tuple[str, list[Any]]] = []
    for step in execution.steps:
        parts = [
            f"step {step.step_id.ljust(width)}  {step.action.ljust(action_width)}  "
            f"{_enum(runbook_pb2.StepStatus, step.status, 'STEP_STATUS_')}"
        ]
        when = _when(step.finish_time) or _when(step.start_time)
        if when:
            parts.append(when)
        if step.approved_by:
            parts.append(f"approved by {step.approved_by}")
        if step.error:
            parts.append(f"error: {step.error}")
        ids = acted.get(step.step_id, [])
        others = [i for i in ids if i != tracking_id]
        if others:
            parts.append(f"{'also ' if tracking_id in ids else ''}under tracking id {', '.join(others)}")
        steps.append(("  ".join(parts), []))
    return label, steps


def _print_trace(
    tracking_id: str, incidents: Sequence[dict[str, Any]], loose: Sequence[Any], alert_count: int, runs: int
) -> None:
    lines = [f"tracking id {tracking_id}: {alert_count} alert(s), {len(incidents)} incident(s), {runs} execution(s)"]
    nodes: list[tuple[str, list[Any]]] = []
    for incident in incidents:
        cluster = incident["cluster"]
        if cluster is None:
            label = f"incident {incident['incident_id']}  (not found)"
        else:
            from gen.aetherops.correlation.v1 import correlation_pb2

            status = _enum(correlation_pb2.ClusterStatus, cluster.status, "CLUSTER_STATUS_")
            label = (
                f"incident {cluster.cluster_id}  {status}  severity {cluster.max_severity}  "
                f"{cluster.alert_count} alert(s)  {_satellites(cluster.satellite_ids)}  "
                f"{','.join(cluster.subsystems)}  root cause {cluster.root_cause_alert_id or '-'}"
            )
        children: list[tuple[str, list[Any]]] = []
        for stored in incident["alerts"]:
            a = stored.alert
            text = f"alert {a.alert_id}  {a.satellite_id} {a.subsystem}  severity {a.severity}  {_when(a.timestamp)}"
            if stored.duplicate_of_alert_id:
                text += f"  duplicate of {stored.duplicate_of_alert_id}"
            children.append((text, []))
        children.extend(_execution_node(e, tracking_id) for e in incident["executions"])
        if not incident["executions"]:
            children.append(("no runbook execution", []))
        nodes.append((label, children))
    nodes.extend(_execution_node(e, tracking_id) for e in loose)
    _tree(lines, nodes, "")
    print("\n".join(lines))


# -- capacity and fleet


def _mission_row(mission: Any) -> list[Any]:
    from gen.aetherops.capacity.v1 import capacity_pb2

    impacts = ", ".join(
        f"{_enum(capacity_pb2.ResourceType, i.resource_type, 'RESOURCE_TYPE_').lower()} {i.amount:+g}"
        for i in mission.resource_impacts
    )
    return [mission.mission_id, _when(mission.start_time), _when(mission.end_time), impacts, mission.description]


_MISSION_HEADERS = ["MISSION", "START", "END", "IMPACTS", "DESCRIPTION"]


def _capacity_missions(client: Any, args: argparse.Namespace) -> int:
    try:
        found = list(client.iter_scheduled_missions(args.satellite_id, args.resource))
    except ValueError as exc:  # an unknown --resource name
        raise _UsageError(str(exc)) from None
    if args.json:
        _emit({"missions": [_to_dict(m) for m in found]})
    elif found:
        print(_table(_MISSION_HEADERS, [_mission_row(m) for m in found]))
    else:
        print(f"no scheduled missions for {args.satellite_id}")
    return EXIT_OK


def _capacity_add_mission(client: Any, args: argparse.Namespace) -> int:
    from clients.sdk import resource_type
    from gen.aetherops.capacity.v1 import capacity_pb2

    mission = capacity_pb2.ScheduledMission(
        mission_id=args.mission_id, satellite_id=args.satellite_id, description=args.description
    )
    mission.start_time.FromDatetime(args.start.astimezone(UTC))
    mission.end_time.FromDatetime(args.end.astimezone(UTC))
    try:
        for resource, amount in args.impact:
            mission.resource_impacts.add(resource_type=resource_type(resource), amount=amount)
    except ValueError as exc:
        raise _UsageError(f"--impact: {exc}") from None
    stored = client.add_scheduled_mission(mission).mission
    if args.json:
        _emit(_to_dict(stored))
    else:
        print(_table(_MISSION_HEADERS, [_mission_row(stored)]))
    return EXIT_OK


def _capacity_delete_mission(client: Any, args: argparse.Namespace) -> int:
    deleted = client.delete_scheduled_mission(args.mission_id).mission
    if args.json:
        _emit(_to_dict(deleted))
    else:
        print(f"deleted {deleted.mission_id} ({deleted.satellite_id}, {_when(deleted.start_time)})")
    return EXIT_OK


def _capacity_forecast(client: Any, args: argparse.Namespace) -> int:
    from gen.aetherops.capacity.v1 import capacity_pb2

    if args.history_days is not None and args.plot is None:
        raise _UsageError("--history-days sets what the chart shows: it needs --plot")
    try:
        reply = client.forecast_exhaustion(args.satellite_id, args.resource)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    if not reply.HasField("forecast"):
        if args.json:
            _emit({"forecast": None, "reason": reply.reason})
        else:
            print(f"no forecast for {args.satellite_id} {args.resource}: {reply.reason}")
        return EXIT_OK
    forecast = reply.forecast
    history: list[tuple[datetime, float]] = []
    missions: list[MissionSpan] = []
    if args.plot is not None:
        history = _fetch_history(client, forecast, days=args.history_days or 90.0)
        missions = _fetch_missions(client, forecast, since=history[0][0] if history else datetime.now(UTC))
        _plot_forecast(plot_series(forecast, history, datetime.now(UTC), missions), forecast, args.plot)
    if args.json:
        body = _to_dict(forecast)
        if args.plot is not None:
            body["plot"] = str(args.plot)
            body["plot_history_points"] = len(history)
            body["plot_missions"] = [m.mission_id for m in missions]
        _emit(body)
        return EXIT_OK

    def days(name: str) -> str:
        return f"{getattr(forecast, name):.1f}" if forecast.HasField(name) else "-"

    rows = [
        ["satellite", forecast.satellite_id],
        ["resource", _enum(capacity_pb2.ResourceType, forecast.resource_type, "RESOURCE_TYPE_").lower()],
        ["current value", f"{forecast.current_value:g} {forecast.unit}"],
        ["rate per day", f"{forecast.rate_per_day:g} {forecast.unit}"],
        ["scheduled missions", f"{forecast.scheduled_impact:g} {forecast.unit}"],
        ["days remaining", days("days_remaining")],
        [
            "P10 / P50 / P90",
            f"{days('days_remaining_p10')} / {days('days_remaining_p50')} / {days('days_remaining_p90')}",
        ],
        ["exhaustion", _when(forecast.predicted_exhaustion_time) or "not depleting"],
        ["risk", _enum(capacity_pb2.RiskLevel, forecast.risk_level, "RISK_LEVEL_")],
        ["confidence", f"{forecast.confidence:.2f}"],
        ["recommended", forecast.recommended_action],
    ]
    print(_table(["FIELD", "VALUE"], rows))
    if args.plot is not None:
        print(f"plot written to {args.plot} ({len(history)} history points)")
    return EXIT_OK


# At most this many snapshots are drawn: a year of one-minute buckets, far more than a chart shows.
_MAX_HISTORY_POINTS = 600_000


def _fetch_history(client: Any, forecast: Any, *, days: float) -> list[tuple[datetime, float]]:
    """The series' stored snapshots of the last `days` (ListSnapshots, page by page)."""
    from datetime import timedelta

    start = datetime.now(UTC) - timedelta(days=days)
    history: list[tuple[datetime, float]] = []
    for snapshot in client.iter_snapshots(
        forecast.satellite_id, int(forecast.resource_type), start=start, page_size=10_000
    ):
        history.append((snapshot.timestamp.ToDatetime(tzinfo=UTC), snapshot.value))
        if len(history) >= _MAX_HISTORY_POINTS:
            break
    return history


@dataclass(frozen=True)
class MissionSpan:
    """A scheduled mission as the chart draws it: its window and its impact on the charted resource."""

    mission_id: str
    start: datetime
    end: datetime
    impact: float


def _fetch_missions(client: Any, forecast: Any, *, since: datetime) -> list[MissionSpan]:
    """The satellite's missions with an impact on the charted resource that end after `since`."""
    spans: list[MissionSpan] = []
    missions = client.iter_scheduled_missions(
        forecast.satellite_id, int(forecast.resource_type), start=since, page_size=1000
    )
    for m in missions:
        impact = sum(i.amount for i in m.resource_impacts if i.resource_type == forecast.resource_type)
        spans.append(
            MissionSpan(m.mission_id, m.start_time.ToDatetime(tzinfo=UTC), m.end_time.ToDatetime(tzinfo=UTC), impact)
        )
    return spans


@dataclass(frozen=True)
class PlotSeries:
    """What the forecast chart draws, computed apart from matplotlib (so it can be tested).

    `history` is the stored series; `trend` the fitted consumption rate through the current value (over
    the history and on until the level is reached); `with_missions` the trend with the scheduled missions'
    impact, ending at the exhaustion level at the predicted time; `band` the P10-P90 dates of exhaustion;
    `missions` the scheduled missions in the chart's range, drawn as spans where they happen.
    """

    history: list[tuple[datetime, float]]
    current: tuple[datetime, float]
    now: datetime
    trend: list[tuple[datetime, float]]
    with_missions: list[tuple[datetime, float]]
    band: tuple[datetime, datetime] | None
    exhaustion: datetime | None
    level: float
    end: datetime
    missions: list[MissionSpan] = field(default_factory=list)


def plot_series(
    forecast: Any,
    history: Sequence[tuple[datetime, float]],
    local_now: datetime,
    missions: Sequence[MissionSpan] = (),
) -> PlotSeries:
    """The chart's series from a ForecastExhaustion answer and the stored history (ListSnapshots).

    Days remaining are counted from the server's clock, so "now" is the predicted exhaustion time minus
    the days remaining (our clock when not depleting). The line with missions follows the trend and
    takes each future mission's impact during its window (ListScheduledMissions), ending where the
    server predicts exhaustion.
    """
    from datetime import timedelta

    from gen.aetherops.capacity.v1 import capacity_pb2

    fills = forecast.resource_type == capacity_pb2.RESOURCE_TYPE_STORAGE  # storage fills up, the rest depletes
    sign = 1.0 if fills else -1.0
    rate = forecast.rate_per_day
    impact = forecast.scheduled_impact
    depleting = forecast.HasField("days_remaining") and forecast.HasField("predicted_exhaustion_time")
    now = local_now
    exhaustion: datetime | None = None
    if depleting:
        exhaustion = forecast.predicted_exhaustion_time.ToDatetime(tzinfo=UTC)
        now = exhaustion - timedelta(days=forecast.days_remaining)
    # The exhaustion level: empty for depleting resources; for storage the capacity, which the contract
    # does not carry: 100 for "%", otherwise what the forecast implies.
    if not fills:
        level = 0.0
    elif forecast.unit == "%":
        level = 100.0
    else:
        level = forecast.current_value + rate * (forecast.days_remaining if depleting else 0.0) + impact
    if history:
        current_at = history[-1][0]  # the current value is the latest snapshot
    else:
        # No history: place the current value on the trend that reaches the level at exhaustion.
        current_at = now
        if exhaustion is not None and rate > 0:
            lead = max(abs(level - forecast.current_value) - impact, 0.0) / rate
            current_at = min(now, max(exhaustion - timedelta(days=lead), now - timedelta(days=365)))

    def days_after_now(name: str) -> datetime | None:
        return now + timedelta(days=getattr(forecast, name)) if forecast.HasField(name) else None

    p10, p90 = days_after_now("days_remaining_p10"), days_after_now("days_remaining_p90")
    if exhaustion is not None:
        end = max(filter(None, [p90, exhaustion, now + timedelta(days=7)]))
        end = end + (end - min(current_at, history[0][0] if history else current_at)) * 0.1
    else:
        end = now + timedelta(days=30)

    def on_trend(moment: datetime) -> float:
        return float(forecast.current_value + sign * rate * (moment - current_at).total_seconds() / 86400)

    trend_start = history[0][0] if history else current_at
    trend_end = end
    if rate > 0:  # the fitted trend stops where the resource runs out
        reach = current_at + timedelta(days=abs(level - forecast.current_value) / rate)
        trend_end = min(trend_end, reach)
    trend = [(trend_start, on_trend(trend_start)), (trend_end, on_trend(trend_end))]
    with_missions: list[tuple[datetime, float]] = []
    if exhaustion is not None:
        upcoming = sorted((m for m in missions if current_at < m.end and m.start < exhaustion), key=lambda m: m.start)

        def with_impacts(moment: datetime) -> float:
            # Each mission's impact accrues evenly over its window, from where the trend is then.
            taken = 0.0
            for m in upcoming:
                length = (m.end - m.start).total_seconds()
                done = min(max((moment - max(m.start, current_at)).total_seconds(), 0.0), length)
                taken += m.impact * (done / length if length > 0 else 1.0)
            return on_trend(moment) + sign * taken

        moments = sorted({t for m in upcoming for t in (m.start, m.end) if current_at < t < exhaustion})
        with_missions = [(current_at, forecast.current_value), *((t, with_impacts(t)) for t in moments)]
        with_missions.append((exhaustion, level))
    band = (p10, p90) if exhaustion is not None and p10 is not None and p90 is not None else None
    return PlotSeries(
        history=list(history),
        current=(current_at, forecast.current_value),
        now=now,
        trend=trend,
        with_missions=with_missions,
        band=band,
        exhaustion=exhaustion,
        level=level,
        end=end,
        missions=[m for m in missions if m.end > (history[0][0] if history else current_at) and m.start < end],
    )


def _plot_forecast(series: PlotSeries, forecast: Any, out: Path) -> None:
    """The forecast as a chart: history, fitted trend, scheduled missions, P10-P90 band, exhaustion date."""
    try:
        import matplotlib
    except ImportError:
        raise _UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    from gen.aetherops.capacity.v1 import capacity_pb2

    resource = _enum(capacity_pb2.ResourceType, forecast.resource_type, "RESOURCE_TYPE_").lower()
    unit = forecast.unit

    def num(moment: datetime) -> float:
        return float(mdates.date2num(moment))  # type: ignore[no-untyped-call]

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    if series.history:
        ax.plot(
            [num(t) for t, _ in series.history],
            [v for _, v in series.history],
            ".-" if len(series.history) < 200 else "-",
            color="tab:gray",
            markersize=3,
            linewidth=1,
            label=f"history: {len(series.history)} snapshots",
        )
    current_at, current = series.current
    ax.plot([num(current_at)], [current], "o", color="black", zorder=5, label=f"current: {current:.4g} {unit}")
    (t0, v0), (t1, v1) = series.trend
    ax.plot(
        [num(t0), num(t1)],
        [v0, v1],
        "--",
        color="tab:blue",
        label=f"fitted trend: {forecast.rate_per_day:.4g} {unit}/day",
    )
    if series.with_missions and series.exhaustion is not None:
        ax.plot(
            [num(t) for t, _ in series.with_missions],
            [v for _, v in series.with_missions],
            color="tab:orange",
            linewidth=2,
            label=f"with scheduled missions ({forecast.scheduled_impact:.4g} {unit})",
        )
        if series.band is not None:
            p10, p90 = series.band
            ax.fill(
                [num(current_at), num(p10), num(p90)],
                [current, series.level, series.level],
                color="tab:orange",
                alpha=0.2,
                label=f"P10–P90: {p10:%Y-%m-%d} – {p90:%Y-%m-%d}",
            )
            ax.axvspan(num(p10), num(p90), color="tab:red", alpha=0.08)
        exhaustion = series.exhaustion
        ax.axvline(num(exhaustion), color="tab:red", linewidth=1.5, label=f"exhaustion: {exhaustion:%Y-%m-%d %H:%M}Z")
        ax.annotate(
            f"{exhaustion:%Y-%m-%d}",
            xy=(num(exhaustion), series.level),
            xytext=(8, 12),
            textcoords="offset points",
            color="tab:red",
        )
    for i, mission in enumerate(series.missions):
        ax.axvspan(
            num(mission.start),
            num(mission.end),
            color="tab:purple",
            alpha=0.15,
            label="scheduled missions" if i == 0 else None,
        )
        ax.annotate(
            f"{mission.mission_id} ({mission.impact:+.4g} {unit})",
            xy=(num(mission.start), 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -12 - 11 * (i % 3)),
            textcoords="offset points",
            fontsize="x-small",
            color="tab:purple",
        )
    ax.axvline(num(series.now), color="grey", linewidth=0.8, linestyle="-.", label="now")
    ax.axhline(series.level, color="grey", linewidth=0.8, linestyle=":")
    risk = _enum(capacity_pb2.RiskLevel, forecast.risk_level, "RISK_LEVEL_")
    ax.set_title(f"{forecast.satellite_id} {resource}: {risk} (confidence {forecast.confidence:.2f})")
    ax.set_ylabel(f"{resource} ({unit})" if unit else resource)
    ax.xaxis_date()
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))  # type: ignore[no-untyped-call]
    fig.autofmt_xdate()
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


def _fleet_risk(client: Any, args: argparse.Namespace) -> int:
    from gen.aetherops.capacity.v1 import capacity_pb2

    reply = client.get_fleet_risk_summary()
    if args.json:
        _emit(_to_dict(reply))
        return EXIT_OK
    rows = [
        [_enum(capacity_pb2.RiskLevel, g.risk_level, "RISK_LEVEL_"), len(g.satellite_ids), ", ".join(g.satellite_ids)]
        for g in reply.groups
    ]
    if reply.unforecast_satellite_ids:
        unforecast = reply.unforecast_satellite_ids
        rows.append(["(no forecast yet)", len(unforecast), ", ".join(unforecast)])
    print(_table(["RISK", "COUNT", "SATELLITES"], rows))
    print(f"\n{reply.satellite_count} satellites forecast, computed {_when(reply.compute_time)}")
    return EXIT_OK


_HANDLERS: dict[tuple[str, str | None], Callable[[Any, argparse.Namespace], int]] = {
    ("alerts", "ingest"): _alerts_ingest,
    ("alerts", "list"): _alerts_list,
    ("clusters", "list"): _clusters_list,
    ("clusters", "show"): _clusters_show,
    ("clusters", "close"): _clusters_close,
    ("clusters", "ack"): _clusters_ack,
    ("clusters", "merge"): _clusters_merge,
    ("clusters", "watch"): _clusters_watch,
    ("silences", "create"): _silences_create,
    ("silences", "list"): _silences_list,
    ("silences", "expire"): _silences_expire,
    ("runbooks", "register"): _runbooks_register,
    ("runbooks", "list"): _runbooks_list,
    ("runbooks", "show"): _runbooks_show,
    ("runbooks", "start"): _runbooks_start,
    ("runbooks", "output"): _runbooks_output,
    ("runbooks", "approve"): _runbooks_approve,
    ("runbooks", "reject"): _runbooks_reject,
    ("runbooks", "status"): _runbooks_status,
    ("runbooks", "step"): _runbooks_step,
    ("runbooks", "cancel"): _runbooks_cancel,
    ("runbooks", "rollback"): _runbooks_rollback,
    ("runbooks", "executions"): _runbooks_executions,
    ("runbooks", "watch"): _runbooks_watch,
    ("capacity", "ingest"): _capacity_ingest,
    ("capacity", "forecast"): _capacity_forecast,
    ("capacity", "missions"): _capacity_missions,
    ("capacity", "add-mission"): _capacity_add_mission,
    ("capacity", "delete-mission"): _capacity_delete_mission,
    ("fleet", "risk"): _fleet_risk,
    ("trace", None): _trace,
}


# Exit code when the reader of stdout went away (`aetherops clusters list | head -1`): what a process
# killed by SIGPIPE reports in a shell (128 + 13), so pipelines see the usual outcome and 1 keeps its
# meaning of a failed call.
EXIT_BROKEN_PIPE = 128 + 13


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            # Output still in the buffer meets the closed pipe here rather than at interpreter exit;
            # this also covers --help and other argparse exits (SystemExit).
            sys.stdout.flush()
    except BrokenPipeError:
        # The recipe of https://docs.python.org/3/library/signal.html#note-on-sigpipe: the rest of the
        # output goes to devnull, so Python's own flush at exit does not fail (and print) a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    # The embedded servers are child processes started after gRPC is running; gRPC's fork
    # handlers are not needed for that (we exec at once) and only print warnings.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    args = _parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = _with_auth(_settings(args))
        except ConfigError as exc:
            print(f"aetherops: invalid setting: {exc}", file=sys.stderr)
            return 2
        configure_logging(settings.log_level)
        try:
            return asyncio.run(_serve(settings))
        except ConfigError as exc:  # a settings file (dependency graph, capacity facts) read at build time
            print(f"aetherops: invalid setting: {exc}", file=sys.stderr)
            return 2
    if args.command == "health":
        return asyncio.run(_health(args))
    if args.command == "create-tokens":
        return _create_tokens(args.file, args.grants)
    return _run_operator_command(args)


if __name__ == "__main__":
    raise SystemExit(main())
