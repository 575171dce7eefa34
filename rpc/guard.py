"""Malformed request bytes get INVALID_ARGUMENT, not UNKNOWN.

gRPC Python parses a request before the servicer runs; bytes that are not a valid protobuf
message (truncated, corrupt) make it fail the call with UNKNOWN ("Unexpected DecodeError"),
which reads like a server crash. This interceptor, the last of every wanps service, takes
over parsing for the project's own services (`/wanps.`) and refuses such a request with
INVALID_ARGUMENT and the message type that failed. Valid requests see no difference.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

GUARDED_PREFIX = "/wanps."


class MalformedRequest(Exception):
    pass


def _parse(deserialize: Callable[[bytes], Any], raw: bytes) -> Any:
    try:
        return deserialize(raw)
    except Exception as exc:  # DecodeError, or anything protobuf raises on garbage
        name = getattr(getattr(deserialize, "__self__", None), "__name__", "request")
        raise MalformedRequest(f"malformed {name} message ({len(raw)} bytes): {type(exc).__name__}") from None


async def _parsed_stream(deserialize: Callable[[bytes], Any], raw_messages: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    async for raw in raw_messages:
        yield _parse(deserialize, raw)


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if (handler is None or handler.request_deserializer is None
                or not handler_call_details.method.startswith(GUARDED_PREFIX)):
            return handler
        deserialize, serialize = handler.request_deserializer, handler.response_serializer

        if handler.unary_unary:
            behaviour = handler.unary_unary

            async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                try:
                    request = _parse(deserialize, raw)
                except MalformedRequest as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                return await behaviour(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)

        if handler.unary_stream:
            stream_behaviour = handler.unary_stream

            async def unary_stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    request = _parse(deserialize, raw)
                except MalformedRequest as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                async for response in stream_behaviour(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)

        if handler.stream_unary:
            client_stream_behaviour = handler.stream_unary

            async def stream_unary(raw_messages: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await client_stream_behaviour(_parsed_stream(deserialize, raw_messages), context)
                except MalformedRequest as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, serialize)

        return handler  # no bidirectional streams in wanps.v1
