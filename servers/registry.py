"""Which components exist, by the names `--services` accepts."""

from __future__ import annotations

from collections.abc import Callable

from aetherops.config import Settings
from servers.component import Component

__all__ = ["build_components"]


def _factories() -> dict[str, Callable[[Settings], Component]]:
    from servers.capacity import CapacityComponent
    from servers.correlation import CorrelationComponent
    from servers.runbook import RunbookComponent

    return {
        "correlation": CorrelationComponent,
        "runbook": RunbookComponent,
        "capacity": CapacityComponent,
    }


def build_components(settings: Settings) -> list[Component]:
    factories = _factories()
    return [factories[name](settings) for name in settings.services]
