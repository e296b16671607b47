"""Authentication, roles and the security gate: tokens, JWTs, the full role matrix, the bootstrap file."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aetherops.auth import (
    ANONYMOUS,
    TOKENS_FILENAME,
    Authenticator,
    JwtVerifier,
    Principal,
    Role,
    SecurityConfig,
    TokenStore,
    authorize,
    bootstrap_admin_token,
    hash_token,
    write_token_file,
)
from aetherops.clock import ManualClock
from aetherops.errors import ConfigError, PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError
from aetherops.ratelimit import AdaptiveLimiter, TokenBucket
from aetherops.ratelimit_redis import RedisTokenBucket
from gen.aetherops.capacity.v1 import capacity_pb2
from gen.aetherops.correlation.v1 import correlation_pb2
from gen.aetherops.runbook.v1 import runbook_pb2
from servers.security import (
    MAX_RETRY_AFTER_S,
    RPC_ROLES,
    InProcessRateLimiter,
    SecurityGate,
    current_principal,
    require_principal,
)

ISSUER = "https://idp.example"
AUDIENCE = "aetherops"
HS_SECRET = b"0123456789abcdef0123456789abcdef-test-only"


def _all_rpcs() -> list[str]:
    """Every RPC of the three services, from the generated descriptors (never listed by hand)."""
    methods: list[str] = []
    for module in (correlation_pb2, runbook_pb2, capacity_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            methods.extend(f"/{service.full_name}/{m.name}" for m in service.methods)
    return methods


ALL_RPCS = _all_rpcs()

# The policy, stated independently of RPC_ROLES: read RPCs by name, the rest by list.
_VIEWER_PREFIXES = ("Get", "List", "Watch", "Find", "Score", "Identify", "Compute", "Forecast", "Recommend")
_OPERATOR_RPCS = {
    "IngestAlert",
    "IngestAlerts",
    "CloseCluster",
    "AcknowledgeCluster",
    "MergeClusters",
    "CreateSilence",
    "ExpireSilence",
    "IngestSnapshot",
    "IngestSnapshots",
    "AddScheduledMission",
    "DeleteScheduledMission",
    "StartExecution",
    "ExecuteNextStep",
    "RollbackExecution",
    "CancelExecution",
}
_HIERARCHY = {
    "viewer": {"viewer"},
    "operator": {"viewer", "operator"},
    "approver": {"viewer", "approver"},
    "admin": {"viewer", "operator", "approver", "admin"},
}


def _policy_role(method: str) -> str:
    rpc = method.rsplit("/", 1)[1]
    if rpc in ("ApproveStep", "RejectStep"):
        return "approver"
    if rpc == "RegisterRunbook":
        return "admin"
    if rpc in _OPERATOR_RPCS:
        return "operator"
    assert rpc.startswith(_VIEWER_PREFIXES), f"{rpc}: the policy does not say which role it needs"
    return "viewer"


@pytest.fixture
def token_file(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    path = tmp_path / "tokens.json"
    tokens = write_token_file(path, {role: [role] for role in _HIERARCHY})
    yield path, tokens


@pytest.fixture
def rsa_keys() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "carol",
        "roles": ["operator", "not-ours"],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _refused(auth: Authenticator, header: str | None) -> str:
    with pytest.raises(UnauthenticatedError) as err:
        auth.authenticate(header)
    return str(err.value)


# --- static tokens --------------------------------------------------------------------------------


def test_good_token_names_its_principal_and_roles(token_file: tuple[Path, dict[str, str]]) -> None:
    path, tokens = token_file
    auth = Authenticator(TokenStore.load(path))
    principal = auth.authenticate(f"Bearer {tokens['operator']}")
    assert principal == Principal("operator", frozenset({Role.OPERATOR}), "token")
    assert auth.authenticate(f"bearer   {tokens['viewer']}  ").name == "viewer"  # scheme is case-insensitive


def test_file_holds_digests_only(token_file: tuple[Path, dict[str, str]]) -> None:
    path, tokens = token_file
    text = path.read_text()
    assert all(token not in text for token in tokens.values())
    assert hash_token(tokens["admin"]) in text


@pytest.mark.parametrize(
    "header",
    [None, "", "   ", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "Bearer two words", "aop_x"],
)
def test_missing_or_malformed_header_is_unauthenticated(
    token_file: tuple[Path, dict[str, str]], header: str | None
) -> None:
    auth = Authenticator(TokenStore.load(token_file[0]))
    message = _refused(auth, header)
    secrets = [word for word in (header or "").split() if word.lower() != "bearer"]
    assert all(secret not in message for secret in secrets)


def test_unknown_token_is_refused_without_echoing_it(
    token_file: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    auth = Authenticator(TokenStore.load(token_file[0]))
    secret = token_file[1]["admin"] + "x"
    with caplog.at_level(logging.DEBUG):
        message = _refused(auth, f"Bearer {secret}")
    assert message == "unknown or revoked token"
    assert secret not in message and secret not in caplog.text


def test_yaml_token_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"tokens:\n  - principal: alice\n    roles: [approver]\n    sha256: {hash_token('s3cret')}\n")
    assert Authenticator(TokenStore.load(path)).authenticate("Bearer s3cret").roles == {Role.APPROVER}


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ([], "'tokens' list"),
        ({"tokens": ["x"]}, "tokens[0]: expected a mapping"),
        ({"tokens": [{"principal": "", "roles": ["viewer"], "sha256": "0" * 64}]}, "tokens[0].principal"),
        ({"tokens": [{"principal": "a|b", "roles": ["viewer"], "sha256": "0" * 64}]}, "must not contain '|'"),
        ({"tokens": [{"principal": "a", "roles": ["root"], "sha256": "0" * 64}]}, "unknown ['root']"),
        ({"tokens": [{"principal": "a", "roles": [], "sha256": "0" * 64}]}, "tokens[0].roles"),
        ({"tokens": [{"principal": "a", "roles": ["viewer"], "sha256": "xyz"}]}, "tokens[0].sha256"),
        (
            {
                "tokens": [
                    {"principal": "a", "roles": ["viewer"], "sha256": "0" * 64},
                    {"principal": "b", "roles": ["viewer"], "sha256": "0" * 64},
                ]
            },
            "listed twice",
        ),
    ],
)
def test_bad_token_files_name_the_problem(document: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        TokenStore.from_document(document, source="t.json")
    assert problem in str(err.value)


def test_unreadable_token_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        TokenStore.load(tmp_path / "absent.json")


# --- JWTs -----------------------------------------------------------------------------------------


def _hs256() -> Authenticator:
    return Authenticator(jwt_verifier=JwtVerifier(HS_SECRET, "HS256", ISSUER, AUDIENCE))


def test_hs256_jwt_gives_sub_and_known_roles() -> None:
    token = jwt.encode(_claims(), HS_SECRET, algorithm="HS256")
    assert _hs256().authenticate(f"Bearer {token}") == Principal("carol", frozenset({Role.OPERATOR}), "jwt")


def test_rs256_jwt_verifies_with_the_public_key(rsa_keys: tuple[bytes, bytes]) -> None:
    private, public = rsa_keys
    auth = Authenticator(jwt_verifier=JwtVerifier(public, "RS256", ISSUER, AUDIENCE))
    token = jwt.encode(_claims(roles=["approver"]), private, algorithm="RS256")
    assert auth.authenticate(f"Bearer {token}").roles == {Role.APPROVER}


def test_expiry_has_30_seconds_leeway() -> None:
    now = int(time.time())
    within = jwt.encode(_claims(exp=now - 10), HS_SECRET, algorithm="HS256")
    assert _hs256().authenticate(f"Bearer {within}").name == "carol"
    expired = jwt.encode(_claims(exp=now - 120), HS_SECRET, algorithm="HS256")
    assert _refused(_hs256(), f"Bearer {expired}") == "token expired"


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: jwt.encode(_claims(iss="https://evil.example"), HS_SECRET, algorithm="HS256"), "wrong issuer"),
        (lambda: jwt.encode(_claims(aud="someone-else"), HS_SECRET, algorithm="HS256"), "wrong audience"),
        (lambda: jwt.encode(_claims(exp=None), HS_SECRET, algorithm="HS256"), "lacks a required claim"),
        (lambda: jwt.encode(_claims(sub=None), HS_SECRET, algorithm="HS256"), "lacks a required claim"),
        (lambda: jwt.encode(_claims(), b"another-secret-of-32-bytes-or-more!!", algorithm="HS256"), "signature"),
        (lambda: jwt.encode(_claims(), HS_SECRET * 2, algorithm="HS512"), "algorithm"),
        (lambda: jwt.encode(_claims(), "", algorithm="none"), "algorithm"),
        (lambda: jwt.encode(_claims(roles="admin"), HS_SECRET, algorithm="HS256"), "'roles' claim must be a list"),
        (lambda: jwt.encode(_claims(sub="a|b"), HS_SECRET, algorithm="HS256"), "subject must not contain"),
        (lambda: "abc.def.ghi", "malformed token"),
    ],
)
def test_bad_jwts_are_unauthenticated_and_never_echoed(make: Any, problem: str) -> None:
    token = make()
    message = _refused(_hs256(), f"Bearer {token}")
    assert problem in message
    assert token not in message and token.split(".")[1] not in message


def test_tampered_payload_fails_the_signature(rsa_keys: tuple[bytes, bytes]) -> None:
    private, public = rsa_keys
    auth = Authenticator(jwt_verifier=JwtVerifier(public, "RS256", ISSUER, AUDIENCE))
    header, _, signature = jwt.encode(_claims(roles=["viewer"]), private, algorithm="RS256").split(".")
    forged_payload = jwt.utils.base64url_encode(json.dumps(_claims(roles=["admin"])).encode()).decode()
    assert "signature" in _refused(auth, f"Bearer {header}.{forged_payload}.{signature}")


def test_rs256_verifier_refuses_hs256_signed_with_the_public_key(rsa_keys: tuple[bytes, bytes]) -> None:
    """The classic algorithm confusion: the public key (known to all) used as an HMAC secret."""
    _, public = rsa_keys
    auth = Authenticator(jwt_verifier=JwtVerifier(public, "RS256", ISSUER, AUDIENCE))
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(_claims(roles=["admin"])).encode())
    signature = jwt.utils.base64url_encode(hmac.new(public, header + b"." + payload, hashlib.sha256).digest())
    assert "algorithm" in _refused(auth, f"Bearer {(header + b'.' + payload + b'.' + signature).decode()}")


def test_tokens_and_jwts_together(token_file: tuple[Path, dict[str, str]]) -> None:
    path, tokens = token_file
    auth = Authenticator(TokenStore.load(path), JwtVerifier(HS_SECRET, "HS256", ISSUER, AUDIENCE))
    assert auth.authenticate(f"Bearer {tokens['admin']}").via == "token"
    assert auth.authenticate(f"Bearer {jwt.encode(_claims(), HS_SECRET, algorithm='HS256')}").via == "jwt"


def test_authenticator_from_config_reads_the_files(tmp_path: Path, rsa_keys: tuple[bytes, bytes]) -> None:
    (tmp_path / "pub.pem").write_bytes(rsa_keys[1])
    write_token_file(tmp_path / "t.json", {"ops": ["operator"]})
    config = SecurityConfig(
        tokens_file=tmp_path / "t.json",
        jwt_rs256_public_key_file=tmp_path / "pub.pem",
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
    )
    auth = Authenticator.from_config(config)
    assert auth.configured and config.auth_configured
    token = jwt.encode(_claims(), rsa_keys[0], algorithm="RS256")
    assert auth.authenticate(f"Bearer {token}").name == "carol"
    (tmp_path / "hs.key").write_bytes(HS_SECRET + b"\n")  # written with echo: the newline is not the secret
    hs = Authenticator.from_config(
        SecurityConfig(jwt_hs256_secret_file=tmp_path / "hs.key", jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    )
    assert hs.authenticate(f"Bearer {jwt.encode(_claims(), HS_SECRET, algorithm='HS256')}").name == "carol"
    assert not Authenticator.from_config(SecurityConfig()).configured


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"jwt_hs256_secret_file": Path("a"), "jwt_rs256_public_key_file": Path("b")}, "not both"),
        ({"jwt_hs256_secret_file": Path("a")}, "AETHEROPS_JWT_ISSUER"),
        ({"tls_cert_file": Path("c")}, "AETHEROPS_TLS_KEY_FILE"),
        ({"tls_client_ca_file": Path("ca")}, "AETHEROPS_TLS_CLIENT_CA_FILE"),
        ({"rate_limit_burst": 0.5}, "AETHEROPS_RATE_LIMIT_BURST"),
        ({"rate_limit_per_s": math.inf}, "AETHEROPS_RATE_LIMIT_PER_S"),
        ({"redis_url": "http://x"}, "AETHEROPS_REDIS_URL"),
    ],
)
def test_invalid_security_config_names_the_setting(changes: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        SecurityConfig(**changes)


def test_unreadable_or_empty_key_file_is_a_config_error(tmp_path: Path) -> None:
    config = SecurityConfig(jwt_hs256_secret_file=tmp_path / "none", jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    with pytest.raises(ConfigError, match="AETHEROPS_JWT_HS256_SECRET_FILE: cannot read"):
        Authenticator.from_config(config)
    (tmp_path / "none").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        Authenticator.from_config(config)


# --- roles ----------------------------------------------------------------------------------------


def test_every_rpc_has_a_role_and_the_table_has_no_strays() -> None:
    assert len(ALL_RPCS) == len(set(ALL_RPCS)) > 20
    assert set(ALL_RPCS) - set(RPC_ROLES) == set(), "RPCs missing from servers.security.RPC_ROLES"
    assert set(RPC_ROLES) - set(ALL_RPCS) == set(), "RPC_ROLES names RPCs that do not exist"


@pytest.mark.parametrize("method", ALL_RPCS)
def test_rpc_roles_follow_the_policy(method: str) -> None:
    assert RPC_ROLES.get(method) == Role(_policy_role(method))


@pytest.mark.parametrize("role", sorted(_HIERARCHY))
@pytest.mark.parametrize("method", ALL_RPCS)
async def test_role_matrix(token_file: tuple[Path, dict[str, str]], role: str, method: str) -> None:
    path, tokens = token_file
    gate = SecurityGate(Authenticator(TokenStore.load(path)))
    metadata = [("authorization", f"Bearer {tokens[role]}")]
    if _policy_role(method) in _HIERARCHY[role]:
        assert (await gate.check(method, metadata)).name == role
    else:
        with pytest.raises(PermissionDeniedError, match=f"lacks the {_policy_role(method)} role"):
            await gate.check(method, metadata)


def test_admin_implies_every_role_and_operator_is_not_an_approver() -> None:
    admin = Principal("root", frozenset({Role.ADMIN}), "token")
    operator = Principal("olga", frozenset({Role.OPERATOR}), "token")
    for role in Role:
        authorize(admin, role)
    with pytest.raises(PermissionDeniedError):
        authorize(operator, Role.APPROVER)
    with pytest.raises(PermissionDeniedError, match="anonymous caller"):
        authorize(ANONYMOUS, Role.VIEWER)


# --- the gate -------------------------------------------------------------------------------------


async def test_gate_refuses_unknown_methods_and_passes_health_without_credential(
    token_file: tuple[Path, dict[str, str]],
) -> None:
    path, tokens = token_file
    gate = SecurityGate(Authenticator(TokenStore.load(path)))
    assert await gate.check("/grpc.health.v1.Health/Check", None) is ANONYMOUS
    assert await gate.check("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", []) is ANONYMOUS
    with pytest.raises(PermissionDeniedError, match="no role assigned"):
        await gate.check("/aetherops.x.v1.New/Thing", [("authorization", f"Bearer {tokens['admin']}")])
    with pytest.raises(UnauthenticatedError, match="no credential"):
        await gate.check(ALL_RPCS[0], [("x-tracking-id", "t")])
    with pytest.raises(UnauthenticatedError, match="more than one"):
        await gate.check(ALL_RPCS[0], [("authorization", f"Bearer {tokens['admin']}")] * 2)


async def test_gate_sets_the_current_principal(token_file: tuple[Path, dict[str, str]]) -> None:
    path, tokens = token_file
    gate = SecurityGate(Authenticator(TokenStore.load(path)))
    with pytest.raises(UnauthenticatedError):
        require_principal()
    await gate.check(ALL_RPCS[0], [("authorization", f"Bearer {tokens['operator']}".encode())])
    assert current_principal() is not None and require_principal().name == "operator"


async def test_gate_rate_limits_per_principal_and_service(token_file: tuple[Path, dict[str, str]]) -> None:
    path, tokens = token_file
    clock = ManualClock()
    adaptive = AdaptiveLimiter(TokenBucket(2, 0.5, clock))
    gate = SecurityGate(Authenticator(TokenStore.load(path)), InProcessRateLimiter(adaptive), adaptive=adaptive)
    viewer = [("authorization", f"Bearer {tokens['viewer']}")]
    get_cluster = "/aetherops.correlation.v1.CorrelationService/GetCluster"
    list_runbooks = "/aetherops.runbook.v1.RunbookService/ListRunbooks"
    await gate.check(get_cluster, viewer)
    await gate.check(get_cluster, viewer)
    with pytest.raises(ResourceExhaustedError) as err:
        await gate.check(get_cluster, viewer)
    assert err.value.retry_after_s == pytest.approx(2.0)
    await gate.check(list_runbooks, viewer)  # another service: its own bucket
    await gate.check(get_cluster, [("authorization", f"Bearer {tokens['admin']}")])  # another principal
    assert not gate.rate_limit_degraded

    # Ingest queue under pressure: the limits halve; a 2-token burst now holds one call.
    clock.advance(10)
    assert gate.observe_ingest_utilisation(0.9)
    await gate.check(get_cluster, viewer)
    with pytest.raises(ResourceExhaustedError):
        await gate.check(get_cluster, viewer)


async def test_a_call_that_can_never_fit_gets_a_finite_retry_delay(token_file: tuple[Path, dict[str, str]]) -> None:
    path, tokens = token_file
    adaptive = AdaptiveLimiter(TokenBucket(1, 1, ManualClock()))
    adaptive.observe_utilisation(1.0)  # tightened: one call costs two tokens, the burst is one
    gate = SecurityGate(Authenticator(TokenStore.load(path)), InProcessRateLimiter(adaptive), adaptive=adaptive)
    with pytest.raises(ResourceExhaustedError) as err:
        await gate.check(ALL_RPCS[2], [("authorization", f"Bearer {tokens['viewer']}")])
    assert err.value.retry_after_s == MAX_RETRY_AFTER_S
    assert math.isfinite(err.value.retry_after_s)


async def test_gate_from_config_picks_the_limiter(token_file: tuple[Path, dict[str, str]]) -> None:
    gate = SecurityGate.from_config(SecurityConfig(tokens_file=token_file[0], rate_limit_burst=3))
    assert isinstance(gate.limiter, InProcessRateLimiter)
    assert not gate.rate_limit_degraded
    await gate.close()
    # With a Redis URL the limits are shared; this one points at a closed port, so they fall back.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    config = SecurityConfig(tokens_file=token_file[0], redis_url=f"redis://127.0.0.1:{closed_port}/0")
    gate = SecurityGate.from_config(config)
    assert isinstance(gate.limiter, RedisTokenBucket)
    await gate.check(ALL_RPCS[2], [("authorization", f"Bearer {token_file[1]['viewer']}")])
    assert gate.rate_limit_degraded
    await gate.close()


# --- bootstrap ------------------------------------------------------------------------------------


def test_bootstrap_creates_a_0600_file_and_shows_the_token_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    path, token = bootstrap_admin_token(data_dir)
    assert path == data_dir / TOKENS_FILENAME
    assert token is not None and token.startswith("aop_")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text()
    principal = Authenticator(TokenStore.load(path)).authenticate(f"Bearer {token}")
    assert principal.name == "admin" and principal.has_role(Role.ADMIN)
    again_path, again = bootstrap_admin_token(data_dir)
    assert (again_path, again) == (path, None)
    assert Authenticator(TokenStore.load(path)).authenticate(f"Bearer {token}").name == "admin"  # unchanged


def test_bootstrap_ignores_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path, _ = bootstrap_admin_token(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
