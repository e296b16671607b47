"""TLS and mTLS through the real server (`Application` from the settings), the CLI and the SDK.

The server is configured as an operator would: AETHEROPS_TLS_CERT_FILE / _KEY_FILE and, for mTLS,
AETHEROPS_TLS_CLIENT_CA_FILE (here the `app_factory` settings of the same names). Certificates are
generated for the test (`_pki.make_pki`). A refused handshake is UNAVAILABLE on the client side: the
server never sees the call. The CLI runs as a subprocess, as an operator runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from _pki import Pki, make_pki
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.sdk import AetherOpsClient, Unavailable
from gen.aetherops.correlation.v1 import correlation_pb2, correlation_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
LIST = correlation_pb2.ListActiveClustersRequest(page_size=10)
TLS_ENV = ("AETHEROPS_CA_FILE", "AETHEROPS_CLIENT_CERT_FILE", "AETHEROPS_CLIENT_KEY_FILE")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: Pki, **changes: Any) -> dict[str, Any]:
    return {"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key), **changes}


async def _answers(credentials: grpc.ChannelCredentials | None, port: int, token: str) -> grpc.StatusCode:
    """The status of a business RPC and of a health check over these credentials (None: plaintext).

    Both must agree: TLS is below every service, health included.
    """
    target = f"127.0.0.1:{port}"
    codes = []
    async with (
        grpc.aio.insecure_channel(target) if credentials is None else grpc.aio.secure_channel(target, credentials)
    ) as channel:
        calls: list[Awaitable[Any]] = [
            correlation_pb2_grpc.CorrelationServiceStub(channel).ListActiveClusters(
                LIST, metadata=(("authorization", f"Bearer {token}"),), timeout=5
            ),
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5),
        ]
        for call in calls:
            try:
                reply = await call
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
            else:
                if isinstance(reply, health_pb2.HealthCheckResponse):
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                codes.append(grpc.StatusCode.OK)
    assert codes[0] == codes[1], codes
    return codes[0]


@pytest.fixture
def cli(tokens: dict[str, str]) -> Callable[..., Awaitable[tuple[int, str, str]]]:
    """Runs `aetherops ARGS` as a subprocess with AETHEROPS_TOKEN set and the given extra environment."""

    async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        base = {k: v for k, v in os.environ.items() if k not in TLS_ENV}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "clients.cli",
            *args,
            cwd=ROOT,
            env={**base, "AETHEROPS_TOKEN": tokens["viewer"], **(env or {})},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    return run


async def test_tls_server(app_factory: Any, tokens: dict[str, str], pki: Pki, cli: Any) -> None:
    app = await app_factory(**_tls(pki))
    port, token = app.port, tokens["viewer"]
    assert await _answers(grpc.ssl_channel_credentials(pki.ca), port, token) == grpc.StatusCode.OK
    assert await _answers(None, port, token) == grpc.StatusCode.UNAVAILABLE  # plaintext gets nowhere
    # A client that does not trust the server's CA (the system roots do not know it) is refused too.
    assert await _answers(grpc.ssl_channel_credentials(), port, token) == grpc.StatusCode.UNAVAILABLE

    async with AetherOpsClient(f"localhost:{port}", token=token, root_certificates=pki.ca) as sdk:
        assert len((await sdk.list_active_clusters()).clusters) == 0
    async with AetherOpsClient(f"127.0.0.1:{port}", token=token, retry=None, timeout=5) as plaintext:
        with pytest.raises(Unavailable):
            await plaintext.list_active_clusters()

    address = f"127.0.0.1:{port}"
    code, out, err = await cli("health", "--address", address, "--ca-file", str(pki.ca_file))
    assert (code, out.strip()) == (0, "SERVING"), err
    code, out, err = await cli("health", "--address", address)
    assert code == 1 and "UNAVAILABLE" in err
    # Operator commands: the flag, or the variable (what a deployment sets once).
    code, out, err = await cli("clusters", "list", "--json", "--address", address, "--ca-file", str(pki.ca_file))
    assert code == 0 and json.loads(out) == {"clusters": []}, err
    code, out, err = await cli("fleet", "risk", "--address", address, env={"AETHEROPS_CA_FILE": str(pki.ca_file)})
    assert code == 0 and "satellites" in out, err
    code, out, err = await cli("clusters", "list", "--address", address, "--ca-file", str(pki.ca_file) + ".missing")
    assert code == 2 and "cannot read" in err


async def test_mtls_server(app_factory: Any, tokens: dict[str, str], pki: Pki, cli: Any) -> None:
    app = await app_factory(**_tls(pki, tls_client_ca_file=str(pki.ca_file)))
    port, token = app.port, tokens["viewer"]
    with_cert = grpc.ssl_channel_credentials(pki.ca, pki.client_key, pki.client_cert)
    assert await _answers(with_cert, port, token) == grpc.StatusCode.OK
    no_cert = grpc.ssl_channel_credentials(pki.ca)
    assert await _answers(no_cert, port, token) == grpc.StatusCode.UNAVAILABLE
    other_ca = grpc.ssl_channel_credentials(pki.ca, pki.stranger_key, pki.stranger_cert)
    assert await _answers(other_ca, port, token) == grpc.StatusCode.UNAVAILABLE
    assert await _answers(None, port, token) == grpc.StatusCode.UNAVAILABLE
    # The certificate opens the connection, not the services: the bearer credential is still checked.
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", with_cert) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await correlation_pb2_grpc.CorrelationServiceStub(channel).ListActiveClusters(LIST, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    address = f"localhost:{port}"
    async with AetherOpsClient(
        address, token=token, root_certificates=pki.ca, certificate_chain=pki.client_cert, private_key=pki.client_key
    ) as sdk:
        assert len((await sdk.list_active_clusters()).clusters) == 0
    async with AetherOpsClient(address, token=token, root_certificates=pki.ca, retry=None, timeout=5) as no_cert_sdk:
        with pytest.raises(Unavailable):
            await no_cert_sdk.list_active_clusters()

    ca = ["--ca-file", str(pki.ca_file)]
    client = ["--cert-file", str(pki.client_cert_file), "--key-file", str(pki.client_key_file)]
    code, out, err = await cli("health", "--address", address, *ca, *client)
    assert (code, out.strip()) == (0, "SERVING"), err
    code, out, err = await cli("health", "--address", address, *ca)
    assert code == 1 and "UNAVAILABLE" in err
    stranger = ["--cert-file", str(pki.stranger_cert_file), "--key-file", str(pki.stranger_key_file)]
    code, out, err = await cli("clusters", "list", "--address", address, *ca, *stranger)
    assert code == 1 and "UNAVAILABLE" in err
    env = {
        "AETHEROPS_CA_FILE": str(pki.ca_file),
        "AETHEROPS_CLIENT_CERT_FILE": str(pki.client_cert_file),
        "AETHEROPS_CLIENT_KEY_FILE": str(pki.client_key_file),
    }
    code, out, err = await cli("clusters", "list", "--json", "--address", address, env=env)
    assert code == 0 and json.loads(out) == {"clusters": []}, err
    code, out, err = await cli("clusters", "list", "--address", address, *ca, "--cert-file", str(pki.client_cert_file))
    assert code == 2 and "go together" in err
