"""Tracking ids: one id follows a request through RPCs, rows, NATS headers and logs."""

from __future__ import annotations

import contextvars
import uuid

__all__ = ["current_tracking_id", "new_tracking_id", "set_tracking_id"]

_tracking_id: contextvars.ContextVar[str] = contextvars.ContextVar("aetherops_tracking_id", default="")


def new_tracking_id() -> str:
    return uuid.uuid4().hex


def current_tracking_id() -> str:
    """The tracking id of the request being served ('' outside a request)."""
    return _tracking_id.get()


def set_tracking_id(value: str) -> contextvars.Token[str]:
    return _tracking_id.set(value)
