"""The domain error hierarchy.

Every error the core or the persistence layer raises on purpose is one of
these types. `servers/status.py` maps them to gRPC status codes in one place,
so a domain module never needs to know about gRPC.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One problem with one input field (mapped to google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class AetherOpsError(Exception):
    """Base of every deliberate AetherOps error."""


class ValidationError(AetherOpsError):
    """Input is malformed; carries one violation per problem found (all of them, not the first)."""

    def __init__(self, violations: Iterable[FieldViolation] | FieldViolation, message: str = "") -> None:
        if isinstance(violations, FieldViolation):
            violations = [violations]
        self.violations: list[FieldViolation] = list(violations)
        text = message or "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(text or "invalid argument")

    @classmethod
    def single(cls, field: str, description: str) -> ValidationError:
        """Shorthand for an error with exactly one violation."""
        return cls([FieldViolation(field, description)])


class NotFoundError(AetherOpsError):
    """The named entity does not exist."""


class AlreadyExistsError(AetherOpsError):
    """An entity with that identity exists already."""


class FailedPreconditionError(AetherOpsError):
    """The entity is not in a state that allows the operation."""


class ConflictError(FailedPreconditionError):
    """A concurrent writer advanced the entity first (optimistic concurrency lost)."""


class PermissionDeniedError(AetherOpsError):
    """The caller is known but not allowed to do this."""


class UnauthenticatedError(AetherOpsError):
    """The caller presented no valid credential."""


class ResourceExhaustedError(AetherOpsError):
    """A limit was hit; `retry_after_s` says when trying again makes sense."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(AetherOpsError):
    """A dependency (database, NATS, an agent) cannot be reached right now."""


WATCH_ENDED_BY_SHUTDOWN = "the server is shutting down: watch again (another replica, or this one once it is back)"
"""The UnavailableError a watch stream ends with when the server stops (see `Component.end_streams`)."""


class ConfigError(AetherOpsError):
    """A setting has an invalid value; the message names the setting."""
