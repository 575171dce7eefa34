"""ONE mapping of refusals to gRPC status codes, for every wanps servicer.

    async with mapped_errors(context):     # in a servicer method
        ...                                # raise InvalidArgument("...") anywhere below

A `RequestError` (wanps.rpc.errors) or a `WireError` (a payload that breaks the wire
rules, wanps.proto.wire) becomes its status with the exception's message; anything else
propagates (gRPC answers UNKNOWN, and the servicer's own log shows the bug).
"""
from __future__ import annotations

import grpc

from wanps.proto.wire import WireError
from wanps.rpc.errors import (FailedPrecondition, InvalidArgument, NotFound, OutOfRange, PermissionDenied,
                              RequestError, ResourceExhausted)

_STATUS_FOR: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    WireError: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
}

#: What `mapped_errors` turns into a status: every refusal, nothing else.
REFUSALS: tuple[type[Exception], ...] = (RequestError, WireError)


def status_for(exc: Exception) -> grpc.StatusCode:
    for kind, code in _STATUS_FOR.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class mapped_errors:
    """`async with mapped_errors(context)`: a refused request becomes its gRPC status."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, REFUSALS):
            await self._context.abort(status_for(exc), str(exc))
        return False
