"""PostgreSQL persistence: the pool, versioned migrations, the outbox and one repository per domain."""

from aetherops.db.migrations import apply_migrations
from aetherops.db.pool import Database

__all__ = ["Database", "apply_migrations"]
