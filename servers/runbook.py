"""The RunbookService servicer (contract only for now: every RPC answers UNIMPLEMENTED)."""

from __future__ import annotations

import grpc

from aetherops.config import Settings
from gen.aetherops.runbook.v1 import runbook_pb2_grpc
from servers.component import Infra

__all__ = ["RunbookComponent"]


class RunbookComponent:
    name = "runbook"
    service_name = "aetherops.runbook.v1.RunbookService"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.servicer = runbook_pb2_grpc.RunbookServiceServicer()  # type: ignore[abstract]  # contract only until the service lands

    def add_to_server(self, server: grpc.aio.Server) -> None:
        runbook_pb2_grpc.add_RunbookServiceServicer_to_server(self.servicer, server)

    async def start(self, infra: Infra) -> None:
        self._infra = infra

    async def stop(self) -> None:
        return None
