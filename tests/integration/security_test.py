"""The security gate in front of a real grpc.aio server: status codes, RetryInfo, TLS and mTLS.

A tiny interceptor of this test's own calls `SecurityGate.check` before a trivial CorrelationService
(GetCluster for viewers, CloseCluster for operators) and maps domain errors with `servers.status`, as
the edge interceptor does. Certificates are generated for the test (`_pki.make_pki`): a CA, a server
certificate for 127.0.0.1/localhost and client certificates. `tls_test.py` runs TLS through the real server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from _pki import Pki, make_pki
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from aetherops import errors
from aetherops.auth import Authenticator, SecurityConfig, TokenStore, write_token_file
from aetherops.clock import ManualClock
from aetherops.ratelimit import TokenBucket
from gen.aetherops.correlation.v1 import correlation_pb2, correlation_pb2_grpc
from servers.security import InProcessRateLimiter, SecurityGate, require_principal, server_credentials
from servers.status import status_for

GET_CLUSTER = correlation_pb2.GetClusterRequest(cluster_id="c-1")


class _GateInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Runs the gate inside the call (so the principal contextvar reaches the handler)."""

    def __init__(self, gate: SecurityGate) -> None:
        self._gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # this test's servicer has unary RPCs only (health included)
        behavior, method = handler.unary_unary, details.method

        async def gated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                await self._gate.check(method, context.invocation_metadata())
            except errors.AetherOpsError as exc:
                await context.abort_with_status(status_for(exc))
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            gated,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _Correlation(correlation_pb2_grpc.CorrelationServiceServicer):
    """Answers with the authenticated principal's name, to show it reached the handler."""

    async def GetCluster(self, request: Any, context: Any) -> correlation_pb2.GetClusterResponse:
        return correlation_pb2.GetClusterResponse(cluster=correlation_pb2.Cluster(cluster_id=require_principal().name))

    async def CloseCluster(self, request: Any, context: Any) -> correlation_pb2.CloseClusterResponse:
        return correlation_pb2.CloseClusterResponse(cluster=correlation_pb2.Cluster(cluster_id=request.cluster_id))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, str]:
    return write_token_file(tmp_path / "tokens.json", {"vera": ["viewer"], "olga": ["operator"]})


@pytest.fixture
async def serve(tmp_path: Path, tokens: dict[str, str]) -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Starts a gated server (port 0) with an optional TLS config and rate limiter; stops them all after."""
    servers: list[grpc.aio.Server] = []

    async def start(tls: SecurityConfig | None = None, limiter: TokenBucket | None = None) -> int:
        gate = SecurityGate(
            Authenticator(TokenStore.load(tmp_path / "tokens.json")),
            InProcessRateLimiter(limiter) if limiter is not None else None,
        )
        server = grpc.aio.server(interceptors=[_GateInterceptor(gate)], options=[("grpc.so_reuseport", 0)])
        correlation_pb2_grpc.add_CorrelationServiceServicer_to_server(_Correlation(), server)  # type: ignore[abstract]
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        credentials = server_credentials(tls) if tls is not None else None
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        servers.append(server)
        return int(port)

    yield start
    for server in servers:
        await server.stop(None)


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _code(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_unauthenticated_denied_and_allowed(serve: Callable[..., Awaitable[int]], tokens: dict[str, str]) -> None:
    port = await serve()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetCluster(GET_CLUSTER)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        bad = tokens["vera"] + "-tampered"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetCluster(GET_CLUSTER, metadata=_bearer(bad))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert bad not in (err.value.details() or "") and tokens["vera"] not in (err.value.details() or "")

        close = correlation_pb2.CloseClusterRequest(cluster_id="c-1", reason="resolved")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CloseCluster(close, metadata=_bearer(tokens["vera"]))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

        reply = await stub.GetCluster(GET_CLUSTER, metadata=_bearer(tokens["vera"]))
        assert reply.cluster.cluster_id == "vera"  # the handler saw the authenticated principal
        assert (await stub.CloseCluster(close, metadata=_bearer(tokens["olga"]))).cluster.cluster_id == "c-1"

        # Health needs no credential: probes carry none.
        probe = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert probe.status == health_pb2.HealthCheckResponse.SERVING


async def test_over_the_limit_is_resource_exhausted_with_retry_info(
    serve: Callable[..., Awaitable[int]], tokens: dict[str, str]
) -> None:
    clock = ManualClock()
    port = await serve(limiter=TokenBucket(2, 0.5, clock))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
        for _ in range(2):
            await stub.GetCluster(GET_CLUSTER, metadata=_bearer(tokens["vera"]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetCluster(GET_CLUSTER, metadata=_bearer(tokens["vera"]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = dict(err.value.trailing_metadata() or ())["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(details)
        assert status.code == code_pb2.RESOURCE_EXHAUSTED
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry)
        assert retry.retry_delay.ToNanoseconds() == 2_000_000_000  # one token at 0.5 token/s

        # Another principal has its own bucket; the first one's refills with time.
        assert (await stub.GetCluster(GET_CLUSTER, metadata=_bearer(tokens["olga"]))).cluster.cluster_id == "olga"
        clock.advance(2)
        assert (await stub.GetCluster(GET_CLUSTER, metadata=_bearer(tokens["vera"]))).cluster.cluster_id == "vera"


async def test_tls(serve: Callable[..., Awaitable[int]], tokens: dict[str, str], pki: Pki) -> None:
    port = await serve(SecurityConfig(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key))
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=pki.ca),
        grpc.access_token_call_credentials(tokens["vera"]),  # sends "authorization: Bearer <token>"
    )
    for target in (f"127.0.0.1:{port}", f"localhost:{port}"):
        async with grpc.aio.secure_channel(target, credentials) as channel:
            reply = await correlation_pb2_grpc.CorrelationServiceStub(channel).GetCluster(GET_CLUSTER)
            assert reply.cluster.cluster_id == "vera"
    # Plaintext against a TLS port gets nowhere.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
        code = await _code(stub.GetCluster(GET_CLUSTER, metadata=_bearer(tokens["vera"]), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate_from_the_ca(
    serve: Callable[..., Awaitable[int]], tokens: dict[str, str], pki: Pki
) -> None:
    port = await serve(
        SecurityConfig(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca_file)
    )
    target = f"127.0.0.1:{port}"
    with_cert = grpc.ssl_channel_credentials(pki.ca, pki.client_key, pki.client_cert)
    async with grpc.aio.secure_channel(target, with_cert) as channel:
        stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
        assert (await stub.GetCluster(GET_CLUSTER, metadata=_bearer(tokens["olga"]))).cluster.cluster_id == "olga"
        # A certificate gets through TLS, not past authentication: the bearer token is still required.
        assert await _code(stub.GetCluster(GET_CLUSTER)) == grpc.StatusCode.UNAUTHENTICATED

    refused = [
        grpc.ssl_channel_credentials(root_certificates=pki.ca),  # no client certificate
        grpc.ssl_channel_credentials(pki.ca, pki.stranger_key, pki.stranger_cert),  # signed by another CA
    ]
    for credentials in refused:
        async with grpc.aio.secure_channel(target, credentials) as channel:
            stub = correlation_pb2_grpc.CorrelationServiceStub(channel)
            code = await _code(stub.GetCluster(GET_CLUSTER, metadata=_bearer(tokens["olga"]), timeout=5))
            assert code == grpc.StatusCode.UNAVAILABLE


def test_no_certificate_configured_means_plaintext(tmp_path: Path) -> None:
    assert server_credentials(SecurityConfig()) is None
    with pytest.raises(errors.ConfigError, match="AETHEROPS_TLS_CERT_FILE: cannot read"):
        server_credentials(SecurityConfig(tls_cert_file=tmp_path / "no.pem", tls_key_file=tmp_path / "no.key"))
