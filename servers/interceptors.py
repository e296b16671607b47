"""The edge: every RPC passes here for its tracking id and for error mapping.

A grpc.aio interceptor that wraps each handler, whatever its streaming shape:
it takes `x-tracking-id` from the metadata (or makes one), returns it in the
initial metadata, runs the security gate (authenticate, authorize, rate limit)
inside the call, and turns domain errors into statuses via servers.status.
Health and reflection pass untouched: probes carry no credential.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from aetherops import errors
from aetherops.tracking import current_principal_name, new_tracking_id, set_tracking_id
from servers.metrics import Metrics
from servers.security import SecurityGate
from servers.status import status_for

__all__ = ["TRACKING_HEADER", "EdgeInterceptor"]

TRACKING_HEADER = "x-tracking-id"
log = logging.getLogger("aetherops.rpc")


def _tracking_from(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == TRACKING_HEADER and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return new_tracking_id()


async def _begin(context: grpc.aio.ServicerContext) -> str:
    tracking_id = _tracking_from(context)
    set_tracking_id(tracking_id)
    await context.send_initial_metadata(((TRACKING_HEADER, tracking_id),))
    return tracking_id


async def _fail(context: grpc.aio.ServicerContext, method: str, exc: BaseException, tracking_id: str) -> None:
    if isinstance(exc, errors.AetherOpsError):
        await context.abort_with_status(status_for(exc))
    if isinstance(exc, NotImplementedError):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
    log.error("unexpected error in %s (tracking id %s)", method, tracking_id, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error; tracking id {tracking_id}")


class EdgeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Tracking ids, readiness and domain-error mapping for every RPC.

    `is_ready(service_name)` says whether that service's component has started;
    until it has, its RPCs answer UNAVAILABLE (the database or NATS is not there yet).
    `gate` admits each call before its handler runs; None admits everyone (only for tests of the edge itself).
    """

    def __init__(
        self,
        is_ready: Callable[[str], bool] = lambda _service: True,
        metrics: Metrics | None = None,
        gate: SecurityGate | None = None,
    ) -> None:
        self._is_ready = is_ready
        self._metrics = metrics
        self._gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler  # infrastructure services: nothing to map, keep them lean
        service = method.split("/")[1]
        if not self._is_ready(service):
            return _unavailable(handler)
        metrics, gate = self._metrics, self._gate
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary, metrics, gate),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(method, handler.stream_unary, metrics, gate),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream, metrics, gate),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(method, handler.stream_stream, metrics, gate),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _finish(
    method: str, context: grpc.aio.ServicerContext, tracking_id: str, started: float, code: str, metrics: Metrics | None
) -> None:
    """One structured log line and the metrics for a finished RPC."""
    service, _, rpc = method.lstrip("/").partition("/")
    if metrics is not None:
        metrics.observe(method, code, started)
        if code == "RESOURCE_EXHAUSTED":  # rate limits and full ingest queues
            metrics.rate_limited.labels(service).inc()
    if not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "rpc %s %s",
        method,
        code,
        extra={
            "service": service,
            "rpc": rpc,
            "tracking_id": tracking_id,
            "principal": current_principal_name(),
            "code": code,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        },
    )


def _code_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, errors.AetherOpsError):
        return str(status_for(exc).code.name)
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"


def _wrap_unary(
    method: str, behavior: Callable[..., Awaitable[Any]], metrics: Metrics | None, gate: SecurityGate | None
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        tracking_id = await _begin(context)
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            # Here, in the call's own task, so the principal it records is visible to the handler.
            if gate is not None:
                await gate.check(method, context.invocation_metadata())
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError) as exc:
            failure = exc
            raise
        except Exception as exc:
            failure = exc
            await _fail(context, method, exc, tracking_id)
        finally:
            _finish(method, context, tracking_id, started, _code_of(context, failure), metrics)

    return wrapper


def _wrap_stream(
    method: str, behavior: Callable[..., AsyncIterator[Any]], metrics: Metrics | None, gate: SecurityGate | None
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        tracking_id = await _begin(context)
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            if gate is not None:
                await gate.check(method, context.invocation_metadata())
            async for item in behavior(request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError) as exc:
            failure = exc
            raise
        except Exception as exc:
            failure = exc
            await _fail(context, method, exc, tracking_id)
        finally:
            _finish(method, context, tracking_id, started, _code_of(context, failure), metrics)

    return wrapper


def _unavailable(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "service is starting: database or NATS not reachable yet")

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "service is starting: database or NATS not reachable yet")
        yield None  # pragma: no cover - abort raises

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)
