"""Clients of AetherOps: the `aetherops` CLI and (later) the Python SDK."""
