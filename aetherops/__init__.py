"""AetherOps core: pure domain logic shared by the correlation, runbook and capacity services.

Domain modules here never import grpc, asyncpg or nats; persistence lives in
`aetherops.db`, the event bus in `aetherops.bus`, and the servers in `servers/`.
"""
