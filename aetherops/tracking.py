"""Request context: the tracking id that follows a request through RPCs, rows, NATS headers
and logs, and the authenticated principal's name (for logs and audit)."""

from __future__ import annotations

import contextvars
import time

from aetherops.ids import sortable_id

__all__ = [
    "current_principal_name",
    "current_tracking_id",
    "new_tracking_id",
    "reset_tracking_id",
    "set_principal_name",
    "set_tracking_id",
]

_tracking_id: contextvars.ContextVar[str] = contextvars.ContextVar("aetherops_tracking_id", default="")
_principal: contextvars.ContextVar[str] = contextvars.ContextVar("aetherops_principal", default="")


def new_tracking_id() -> str:
    """32 hex digits, time-ordered (`aetherops.ids`): tracking ids are indexed with every alert."""
    return sortable_id(time.time())


def current_tracking_id() -> str:
    """The tracking id of the request being served ('' outside a request)."""
    return _tracking_id.get()


def set_tracking_id(value: str) -> contextvars.Token[str]:
    return _tracking_id.set(value)


def reset_tracking_id(token: contextvars.Token[str]) -> None:
    """Undo the `set_tracking_id` that returned `token` (for work that borrows a tracking id for a while)."""
    _tracking_id.reset(token)


def current_principal_name() -> str:
    """The authenticated caller of the request being served ('' when anonymous)."""
    return _principal.get()


def set_principal_name(value: str) -> contextvars.Token[str]:
    return _principal.set(value)
