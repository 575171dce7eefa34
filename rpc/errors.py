"""The kinds of refusal every wanps service uses, as plain exceptions (no gRPC here).

Cores (pure, no network code) and limits raise them; `wanps.rpc.status` maps each kind to
its gRPC status in one place for every servicer. The message says what was refused and
why; a refused request changes nothing.
"""
from __future__ import annotations


class RequestError(Exception):
    """A refused request. The subclass names the gRPC status it travels as."""


class InvalidArgument(RequestError):
    """The request itself is malformed or out of range, whatever the state."""


class FailedPrecondition(RequestError):
    """The request is well formed but does not fit the current state (wrong round, model, order)."""


class NotFound(RequestError):
    """The request names a member (worker id) the service does not know."""


class PermissionDenied(RequestError):
    """The request names a member but does not carry that member's secret (one token holder
    acting as another member)."""


class ResourceExhausted(RequestError):
    """Over one of the configured limits; retrying later or a smaller request may pass."""


class OutOfRange(RequestError):
    """A number past what the service will ever hold (a round beyond the wire's range)."""
