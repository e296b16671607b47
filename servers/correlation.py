"""The CorrelationService servicer (contract only for now: every RPC answers UNIMPLEMENTED)."""

from __future__ import annotations

import grpc

from aetherops.config import Settings
from gen.aetherops.correlation.v1 import correlation_pb2_grpc
from servers.component import Infra

__all__ = ["CorrelationComponent"]


class CorrelationComponent:
    name = "correlation"
    service_name = "aetherops.correlation.v1.CorrelationService"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.servicer = correlation_pb2_grpc.CorrelationServiceServicer()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        correlation_pb2_grpc.add_CorrelationServiceServicer_to_server(self.servicer, server)

    async def start(self, infra: Infra) -> None:
        self._infra = infra

    async def stop(self) -> None:
        return None
