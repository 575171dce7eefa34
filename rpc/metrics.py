"""Standard gRPC server metrics for every wanps service, as a grpc.aio server interceptor.

    start_grpc_service(..., registry=registry)   # adds GrpcServerMetrics(registry) first

It counts started and handled RPCs by method and status code and times each call, for
all four RPC shapes (unary and streaming requests and responses), including the health
and reflection services. It runs first, so calls refused by a later interceptor
(authentication) are counted too. Only methods the server implements
get a label (unknown methods are passed on uncounted), so label cardinality is bounded
by the services' method count times the 17 status codes.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

# Unary calls take milliseconds; streams (Updates, Decisions, health Watch) stay open for the
# whole session, so the buckets reach hours.
HANDLING_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                            300, 3600)


def split_method(full_method: str) -> tuple[str, str]:
    """'/wanps.v1.ParameterServer/Push' -> ('wanps.v1.ParameterServer', 'Push')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def status_name(code: Any) -> str:
    """The status name for what `context.code()` returns (a StatusCode, an int, or None = OK)."""
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"


class GrpcServerMetrics(grpc.aio.ServerInterceptor):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter("wanps_grpc_server_started", "RPCs started on the server, by method.",
                               ["service", "method"], registry=registry)
        self.handled = Counter("wanps_grpc_server_handled",
                               "RPCs completed on the server, by method and gRPC status code.",
                               ["service", "method", "code"], registry=registry)
        self.handling_seconds = Histogram("wanps_grpc_server_handling_seconds",
                                          "Time from the start of an RPC to its end on the server, by method "
                                          "(for streams: how long the stream was open).",
                                          ["service", "method"], buckets=HANDLING_SECONDS_BUCKETS,
                                          registry=registry)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED; no label from a client's string
            return None
        service, method = split_method(handler_call_details.method)
        if handler.request_streaming and handler.response_streaming:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        return factory(self._wrap(behavior, service, method), request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _wrap(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        """A wrapper of the same shape: grpc.aio treats async generators (streamed responses)
        and coroutines (including reader/writer streams) differently, so keep which one it is."""
        if inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started = self._start(service, method)
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as exc:
                    self._finish(service, method, started, context, exc)
                    raise
                self._finish(service, method, started, context, None)

            return streaming
        if inspect.iscoroutinefunction(behavior):

            async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = self._start(service, method)
                try:
                    response = await behavior(request, context)
                except BaseException as exc:
                    self._finish(service, method, started, context, exc)
                    raise
                self._finish(service, method, started, context, None)
                return response

            return coroutine
        # Synchronous handlers run on gRPC's thread pool; wanps registers none, so they pass uncounted.
        return behavior

    def _start(self, service: str, method: str) -> float:
        self.started.labels(service=service, method=method).inc()
        return time.perf_counter()

    def _finish(self, service: str, method: str, started: float, context: Any, exc: BaseException | None) -> None:
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            code = "CANCELLED"  # the client went away or the server is stopping (a stream closed early)
        elif exc is None or isinstance(exc, grpc.aio.AbortError):
            code = status_name(context.code())  # abort() and set_code() leave their code on the context
        else:
            code = "UNKNOWN"  # what gRPC sends for an unexpected exception
        self.handled.labels(service=service, method=method, code=code).inc()
        self.handling_seconds.labels(service=service, method=method).observe(time.perf_counter() - started)
