"""The CapacityService servicer (contract only for now: every RPC answers UNIMPLEMENTED)."""

from __future__ import annotations

import grpc

from aetherops.config import Settings
from gen.aetherops.capacity.v1 import capacity_pb2_grpc
from servers.component import Infra

__all__ = ["CapacityComponent"]


class CapacityComponent:
    name = "capacity"
    service_name = "aetherops.capacity.v1.CapacityService"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.servicer = capacity_pb2_grpc.CapacityServiceServicer()  # type: ignore[abstract]  # contract only until the service lands

    def add_to_server(self, server: grpc.aio.Server) -> None:
        capacity_pb2_grpc.add_CapacityServiceServicer_to_server(self.servicer, server)

    async def start(self, infra: Infra) -> None:
        self._infra = infra

    async def stop(self) -> None:
        return None
