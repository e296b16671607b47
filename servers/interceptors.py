"""The edge: every RPC passes here for its tracking id and for error mapping.

`Edge` wraps each business method handler, whatever its streaming shape: the
wrapper refuses calls (UNAVAILABLE) until the service's component started, takes
`x-tracking-id` from the metadata (or makes one), returns it in the trailing
metadata, runs the security gate (authenticate, authorize, rate limit) inside
the call, and turns domain errors into statuses via servers.status.

The handlers are wrapped once, when a servicer registers (`Edge.registrar`), not
per call: a grpc.aio ServerInterceptor would run a coroutine and build a new
handler for every RPC, which costs the ingest path a measurable share of its
rate. Health and reflection register on the server itself and pass untouched:
probes carry no credential.
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

__all__ = ["TRACKING_HEADER", "Edge"]

TRACKING_HEADER = "x-tracking-id"
_STARTING = "service is starting: database or NATS not reachable yet"
log = logging.getLogger("aetherops.rpc")


def _tracking_from(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == TRACKING_HEADER and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return new_tracking_id()


def _begin(context: grpc.aio.ServicerContext) -> str:
    tracking_id = _tracking_from(context)
    set_tracking_id(tracking_id)
    # Trailing, not initial, metadata: it leaves with the status in the call's last batch. Sending
    # initial metadata on its own is one more operation per call through grpc's completion queue and
    # the event loop, which measured 15-25% of an IngestAlert's server CPU.
    context.set_trailing_metadata(((TRACKING_HEADER, tracking_id),))
    return tracking_id


async def _fail(context: grpc.aio.ServicerContext, method: str, exc: BaseException, tracking_id: str) -> None:
    if isinstance(exc, errors.AetherOpsError):
        status = status_for(exc)
        # An explicit trailing metadata replaces what the call set: keep the tracking id beside the details.
        await context.abort(status.code, status.details, (*status.trailing_metadata, (TRACKING_HEADER, tracking_id)))
    if isinstance(exc, NotImplementedError):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
    log.error("unexpected error in %s (tracking id %s)", method, tracking_id, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error; tracking id {tracking_id}")


class _Undecodable:
    """What a request's bytes became when they are not the method's message (see `_tolerant`)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, turning bytes it cannot parse into an `_Undecodable`.

    grpc answers a deserializer's exception with UNKNOWN ("Unexpected <class DecodeError>") and logs
    a traceback, before any of our code runs: the caller's malformed bytes would look like our fault.
    The wrapper below answers INVALID_ARGUMENT instead, after authentication.
    """
    if deserialize is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or invalid UTF-8 in a string field
            return _Undecodable(str(exc) or type(exc).__name__)

    return tolerant


def _undecodable(method: str, request: _Undecodable) -> errors.ValidationError:
    return errors.ValidationError.single("request", f"not a valid request message for {method}: {request.error}")


async def _decoded(method: str, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream that fails (INVALID_ARGUMENT, at that message) on a message it could not parse."""
    async for request in requests:
        if type(request) is _Undecodable:
            raise _undecodable(method, request)
        yield request


class Edge:
    """Tracking ids, readiness, the security gate and domain-error mapping around every business RPC.

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

    def registrar(self, server: grpc.aio.Server) -> _Registrar:
        """Stands in for `server` in a generated `add_*Servicer_to_server`: registers wrapped handlers."""
        return _Registrar(server, self)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler of `method` ("/pkg.Service/Rpc") with the edge around it."""
        service = method.split("/")[1]
        ready, metrics, gate = self._is_ready, self._metrics, self._gate
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, service, handler.unary_unary, ready, metrics, gate, streaming_request=False),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(method, service, handler.stream_unary, ready, metrics, gate, streaming_request=True),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, service, handler.unary_stream, ready, metrics, gate, streaming_request=False),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(method, service, handler.stream_stream, ready, metrics, gate, streaming_request=True),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


class _Registrar:
    """What a generated `add_*Servicer_to_server` sees instead of the server.

    Generated code registers each service twice: a generic handler, then the same method handlers
    by name (grpc's fast lookup path). Both registrations get the wrapped handlers; the unwrapped
    generic handler never reaches the server.
    """

    def __init__(self, server: grpc.aio.Server, edge: Edge) -> None:
        self._server = server
        self._edge = edge
        self._pending: tuple[grpc.GenericRpcHandler, ...] = ()

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self._pending = handlers  # replaced by the wrapped handlers registered by name, next

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        if len(self._pending) != 1:
            raise RuntimeError(f"{service}: expected one generic handler before the method handlers")
        self._pending = ()
        wrapped = {name: self._edge.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self._server.add_registered_method_handlers(service, wrapped)


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
    method: str,
    service: str,
    behavior: Callable[..., Awaitable[Any]],
    is_ready: Callable[[str], bool],
    metrics: Metrics | None,
    gate: SecurityGate | None,
    *,
    streaming_request: bool,
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        tracking_id = _begin(context)
        if not is_ready(service):
            await context.abort(grpc.StatusCode.UNAVAILABLE, _STARTING)
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            # Here, in the call's own task, so the principal it records is visible to the handler.
            if gate is not None:
                await gate.check(method, context.invocation_metadata())
            if streaming_request:
                request = _decoded(method, request)
            elif type(request) is _Undecodable:
                raise _undecodable(method, request)
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
    method: str,
    service: str,
    behavior: Callable[..., AsyncIterator[Any]],
    is_ready: Callable[[str], bool],
    metrics: Metrics | None,
    gate: SecurityGate | None,
    *,
    streaming_request: bool,
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        tracking_id = _begin(context)
        if not is_ready(service):
            await context.abort(grpc.StatusCode.UNAVAILABLE, _STARTING)
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            if gate is not None:
                await gate.check(method, context.invocation_metadata())
            if streaming_request:
                request = _decoded(method, request)
            elif type(request) is _Undecodable:
                raise _undecodable(method, request)
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
