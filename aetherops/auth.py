"""Authentication and roles: who is calling, and may they do this.

Pure core (no gRPC): a caller presents `authorization: Bearer <credential>`; `Authenticator.authenticate`
turns that header value into a `Principal` or raises `UnauthenticatedError`, and `authorize` raises
`PermissionDeniedError` when the principal lacks a role. Two kinds of credential:

- static API tokens, listed in a YAML or JSON file by their SHA-256 only (the file never holds a secret):
  `{"tokens": [{"principal": "alice", "roles": ["operator"], "sha256": "<hex>"}]}`;
- JWTs (PyJWT), either HS256 with a shared secret or RS256 with the issuer's public key; exactly one
  algorithm is accepted, `iss`, `aud`, `sub` and `exp` are required and checked (30 s leeway), the
  principal is `sub` and the roles are the `roles` claim (names AetherOps does not know are ignored:
  an identity provider often issues roles for several systems).

Role hierarchy: admin ⊇ {operator, approver} ⊇ viewer. An admin may do everything; operator and approver
each include viewer but not each other, so the person who starts an execution is not, by role alone, the one
who approves it (four eyes).

Credentials never appear in error messages or logs: errors name the problem ("token expired"), never the token.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml

from aetherops.errors import ConfigError, PermissionDeniedError, UnauthenticatedError

__all__ = [
    "ANONYMOUS",
    "IMPLIED_ROLES",
    "JWT_LEEWAY_S",
    "TOKENS_FILENAME",
    "Authenticator",
    "JwtVerifier",
    "Principal",
    "Role",
    "SecurityConfig",
    "StoredToken",
    "TokenStore",
    "authorize",
    "bootstrap_admin_token",
    "hash_token",
    "new_token",
    "write_token_file",
]

JWT_LEEWAY_S = 30.0
TOKENS_FILENAME = "auth_tokens.json"
"""The token file `bootstrap_admin_token` creates in the data dir."""

# Principal names become rate limiter keys ("principal|service"), so "|" is refused at the source.
_FORBIDDEN_IN_NAMES = "|"
_BEARER = "bearer"


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    APPROVER = "approver"
    ADMIN = "admin"


IMPLIED_ROLES: Mapping[Role, frozenset[Role]] = {
    Role.VIEWER: frozenset({Role.VIEWER}),
    Role.OPERATOR: frozenset({Role.OPERATOR, Role.VIEWER}),
    Role.APPROVER: frozenset({Role.APPROVER, Role.VIEWER}),
    Role.ADMIN: frozenset(Role),
}
"""Each role -> every role it includes (itself too)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: `name` is what audit records and four-eyes checks compare."""

    name: str
    roles: frozenset[Role]
    via: str
    """How the caller proved it: "token", "jwt", or "anonymous" (health and reflection only)."""

    @property
    def effective_roles(self) -> frozenset[Role]:
        """The granted roles and every role they include."""
        return frozenset().union(*(IMPLIED_ROLES[r] for r in self.roles))

    def has_role(self, role: Role) -> bool:
        return role in self.effective_roles


ANONYMOUS = Principal("", frozenset(), "anonymous")


def authorize(principal: Principal, role: Role) -> None:
    """Raise PermissionDeniedError unless `principal` holds `role` (directly or through the hierarchy)."""
    if not principal.has_role(role):
        who = principal.name or "anonymous caller"
        raise PermissionDeniedError(f"{who} lacks the {role.value} role this call needs")


@dataclass(frozen=True)
class SecurityConfig:
    """The security settings, independent of `Settings` (the server maps one to the other).

    Authentication is configured when a token file or a JWT key is set. TLS is on when a certificate
    and key are set; a client CA on top turns on mTLS (client certificates required and verified).
    """

    tokens_file: Path | None = None
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_hs256_secret_file: Path | None = None
    jwt_rs256_public_key_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    rate_limit_burst: float = 100.0
    rate_limit_per_s: float = 50.0
    redis_url: str = ""

    def __post_init__(self) -> None:
        problems = []
        if self.jwt_hs256_secret_file is not None and self.jwt_rs256_public_key_file is not None:
            # One accepted algorithm: a verifier that takes either is open to algorithm confusion.
            problems.append("set AETHEROPS_JWT_HS256_SECRET_FILE or AETHEROPS_JWT_RS256_PUBLIC_KEY_FILE, not both")
        if self.jwt_configured and not (self.jwt_issuer and self.jwt_audience):
            problems.append("JWTs need AETHEROPS_JWT_ISSUER and AETHEROPS_JWT_AUDIENCE")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append("set both AETHEROPS_TLS_CERT_FILE and AETHEROPS_TLS_KEY_FILE, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            problems.append("AETHEROPS_TLS_CLIENT_CA_FILE (mTLS) needs AETHEROPS_TLS_CERT_FILE and _KEY_FILE")
        # A burst below one token would refuse every call (the limiter would say "never fits").
        if not (math.isfinite(self.rate_limit_burst) and self.rate_limit_burst >= 1):
            problems.append(f"AETHEROPS_RATE_LIMIT_BURST must be a number >= 1, got {self.rate_limit_burst!r}")
        if not (math.isfinite(self.rate_limit_per_s) and self.rate_limit_per_s > 0):
            problems.append(f"AETHEROPS_RATE_LIMIT_PER_S must be a positive number, got {self.rate_limit_per_s!r}")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            problems.append("AETHEROPS_REDIS_URL must start with redis://, rediss:// or unix://")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def jwt_configured(self) -> bool:
        return self.jwt_hs256_secret_file is not None or self.jwt_rs256_public_key_file is not None

    @property
    def auth_configured(self) -> bool:
        return self.tokens_file is not None or self.jwt_configured

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def mtls_enabled(self) -> bool:
        return self.tls_client_ca_file is not None


def hash_token(token: str) -> str:
    """The hex SHA-256 under which a static token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh static token: 256 random bits; the prefix lets secret scanners recognise leaked ones."""
    return "aop_" + secrets.token_urlsafe(32)


def _check_name(name: object) -> str | None:
    """The problem with a principal name, or None when it is usable."""
    if not isinstance(name, str) or not name.strip():
        return "must be a non-empty string"
    if _FORBIDDEN_IN_NAMES in name:
        return f"must not contain {_FORBIDDEN_IN_NAMES!r}"
    return None


@dataclass(frozen=True)
class StoredToken:
    principal: str
    roles: frozenset[Role]
    sha256: bytes


class TokenStore:
    """Static API tokens, held as SHA-256 digests only."""

    def __init__(self, entries: Iterable[StoredToken] = ()) -> None:
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        """Read a token file (YAML or JSON; JSON is YAML); every problem is one ConfigError naming the file."""
        try:
            document = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            # The file holds only digests, but the parser's excerpt is still left out: it is noise here.
            raise ConfigError(f"token file {path}: cannot read it ({type(exc).__name__})") from None
        return cls.from_document(document, source=str(path))

    @classmethod
    def from_document(cls, document: Any, source: str = "token file") -> TokenStore:
        if not isinstance(document, Mapping) or not isinstance(document.get("tokens"), list):
            raise ConfigError(f"{source}: expected a mapping with a 'tokens' list")
        problems: list[str] = []
        entries: list[StoredToken] = []
        seen: set[str] = set()
        known = {r.value for r in Role}
        for i, raw in enumerate(document["tokens"]):
            where = f"tokens[{i}]"
            if not isinstance(raw, Mapping):
                problems.append(f"{where}: expected a mapping")
                continue
            name, roles, digest = raw.get("principal"), raw.get("roles"), raw.get("sha256")
            found = len(problems)
            name_problem = _check_name(name)
            if name_problem:
                problems.append(f"{where}.principal: {name_problem}")
            if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
                problems.append(f"{where}.roles: a non-empty list of {sorted(known)}")
            elif unknown := sorted(set(roles) - known):
                problems.append(f"{where}.roles: unknown {unknown}; choose from {sorted(known)}")
            if not isinstance(digest, str) or len(digest) != 64 or not _is_hex(digest):
                problems.append(f"{where}.sha256: 64 hex digits of sha256(token)")
            elif digest.lower() in seen:
                problems.append(f"{where}.sha256: the same token is listed twice")
            else:
                seen.add(digest.lower())
            if len(problems) == found:  # this entry is sound (the checks above proved the types)
                assert isinstance(name, str) and isinstance(roles, list) and isinstance(digest, str)
                entries.append(StoredToken(name, frozenset(Role(r) for r in roles), bytes.fromhex(digest)))
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        return cls(entries)

    def lookup(self, token: str) -> Principal | None:
        """The principal a token belongs to, or None."""
        digest = hashlib.sha256(token.encode()).digest()
        found: StoredToken | None = None
        # Every entry is compared (no early exit) with compare_digest, so the time taken says nothing
        # about which entry, or how much of a digest, matched.
        for entry in self._entries:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return None if found is None else Principal(found.principal, found.roles, "token")


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


# PyJWT's exception types -> what the caller is told. Fixed texts, so nothing from the token is echoed.
_JWT_PROBLEMS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not valid yet"),
    (jwt.InvalidIssuerError, "token from the wrong issuer"),
    (jwt.InvalidAudienceError, "token for the wrong audience"),
    (jwt.InvalidAlgorithmError, "token signed with an algorithm that is not accepted"),
    (jwt.InvalidSignatureError, "token signature does not verify"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim (iss, aud, sub, exp)"),
    (jwt.DecodeError, "malformed token"),
)


class JwtVerifier:
    """Verifies JWTs signed with one algorithm (HS256 or RS256) for one issuer and audience."""

    ALGORITHMS = ("HS256", "RS256")

    def __init__(
        self, key: str | bytes, algorithm: str, issuer: str, audience: str, leeway_s: float = JWT_LEEWAY_S
    ) -> None:
        if algorithm not in self.ALGORITHMS:
            raise ConfigError(f"JWT algorithm must be one of {self.ALGORITHMS}, got {algorithm!r}")
        if not issuer or not audience:
            raise ConfigError("JWTs need an issuer and an audience")
        self._key = key
        self.algorithm = algorithm
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s

    @classmethod
    def from_config(cls, config: SecurityConfig) -> JwtVerifier | None:
        if config.jwt_hs256_secret_file is not None:
            secret = _read_key(config.jwt_hs256_secret_file, "AETHEROPS_JWT_HS256_SECRET_FILE")
            return cls(secret, "HS256", config.jwt_issuer, config.jwt_audience)
        if config.jwt_rs256_public_key_file is not None:
            public = _read_key(config.jwt_rs256_public_key_file, "AETHEROPS_JWT_RS256_PUBLIC_KEY_FILE")
            return cls(public, "RS256", config.jwt_issuer, config.jwt_audience)
        return None

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self.algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            message = next((text for kind, text in _JWT_PROBLEMS if isinstance(exc, kind)), "invalid token")
            raise UnauthenticatedError(message) from None
        name_problem = _check_name(claims.get("sub"))
        if name_problem:
            raise UnauthenticatedError(f"token subject {name_problem}")
        roles = claims.get("roles", [])
        if not isinstance(roles, list):
            raise UnauthenticatedError("token 'roles' claim must be a list")
        known = {r.value for r in Role}
        return Principal(claims["sub"], frozenset(Role(r) for r in roles if r in known), "jwt")


def _read_key(path: Path, var: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}: cannot read {path} ({exc.strerror})") from None
    # An HS256 secret file written with `echo` ends in a newline that is not part of the secret.
    data = data.strip()
    if not data:
        raise ConfigError(f"{var}: {path} is empty")
    return data


class Authenticator:
    """Bearer header value -> Principal, from static tokens and/or JWTs."""

    def __init__(self, tokens: TokenStore | None = None, jwt_verifier: JwtVerifier | None = None) -> None:
        self._tokens = tokens
        self._jwt = jwt_verifier

    @classmethod
    def from_config(cls, config: SecurityConfig) -> Authenticator:
        tokens = TokenStore.load(config.tokens_file) if config.tokens_file is not None else None
        return cls(tokens, JwtVerifier.from_config(config))

    @property
    def configured(self) -> bool:
        """False when there is no way to authenticate at all (every call would be refused)."""
        return self._tokens is not None or self._jwt is not None

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an `authorization` metadata value; UnauthenticatedError otherwise."""
        if not authorization or not authorization.strip():
            raise UnauthenticatedError("no credential: send the metadata 'authorization: Bearer <token>'")
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != _BEARER or not credential or " " in credential:
            raise UnauthenticatedError("malformed authorization metadata: expected 'Bearer <token>'")
        # A JWT is three dot-separated segments; static tokens never contain a dot.
        if self._jwt is not None and credential.count(".") == 2:
            return self._jwt.verify(credential)
        principal = self._tokens.lookup(credential) if self._tokens is not None else None
        if principal is None:
            raise UnauthenticatedError("unknown or revoked token")
        return principal


def write_token_file(path: Path, grants: Mapping[str, Iterable[Role | str]]) -> dict[str, str]:
    """Create a token file granting each principal its roles; returns principal -> plaintext token.

    The file is created exclusively with mode 0600 (it fails if `path` exists, so a token is never
    silently replaced); the plaintext tokens exist only in the returned dict.
    """
    tokens = {name: new_token() for name in grants}
    document = {
        "tokens": [
            {"principal": name, "roles": sorted(str(r) for r in roles), "sha256": hash_token(tokens[name])}
            for name, roles in grants.items()
        ]
    }
    TokenStore.from_document(document, source=str(path))  # refuse to write a file the server would reject
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # the mode passed to open() is subject to the umask
        json.dump(document, out, indent=2)
        out.write("\n")
    return tokens


def bootstrap_admin_token(data_dir: Path, principal: str = "admin") -> tuple[Path, str | None]:
    """First start on loopback: create `<data_dir>/auth_tokens.json` with one admin token.

    Returns the file and the plaintext token, which is shown this once; when the file exists already
    the token is None (it cannot be recovered: delete the file and start again for a new one).
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / TOKENS_FILENAME
    try:
        tokens = write_token_file(path, {principal: [Role.ADMIN]})
    except FileExistsError:
        return path, None
    return path, tokens[principal]
