"""Bringing a worker back after its connection to the server broke (docs/operations.md).

A broken update stream or a push that cannot reach the server puts one `ConnectionLost` on
the session's `deltas`; the training thread then calls `WorkerSession.recover()`, which
runs `recover` here: reconnect with exponential backoff and jitter (`Resume`), reconcile
the replica by version, model checksum and server incarnation (a full pull only when they differ),
restart the update stream and re-send the logged pushes the server does not hold, in
order, each once the replica has reached the version it was computed at. Pushes carry
(worker, round), so a replay the server already has is acknowledged as a duplicate. A
worker that is no longer a member (lease ran out, or the server resumed from a checkpoint
taken before it joined) joins again, seeding the model if the server has none.
Error-feedback state lives in the optimizer; the one thing recovery hands it is the summed
update of rounds the push log had dropped over its cap and the server lost: it goes back
into the residual (as a late push's does), and those rounds are replayed empty.
"""
from __future__ import annotations

import concurrent.futures
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb

if TYPE_CHECKING:  # both import this module
    from wanps.worker.replica import Replica
    from wanps.worker.session import PulledModel, WorkerSession

log = logging.getLogger("wanps.worker")

MAX_BACKOFF_S = 8.0
RESUME_TIMEOUT_S = 5.0  # one Resume attempt
PULL_TIMEOUT_S = 600.0  # a full pull once the server answered Resume
# The server does not know this worker as this member: NOT_FOUND (lease ran out, or it resumed
# without it), PERMISSION_DENIED (a server restarted without --resume gave the id to another
# member, whose secret this worker does not hold). Either way: join again.
FORGOTTEN_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED})
# Status codes that mean "the server is unreachable, restarted or forgot us", not "your request is wrong".
# (UNKNOWN and INTERNAL are not among them: a server bug must surface, not loop in recovery.)
RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                             grpc.StatusCode.DEADLINE_EXCEEDED, *FORGOTTEN_CODES})
# gRPC's own reconnect backoff (defaults: 1 s initial, 120 s max) would keep a worker away
# from a restarted server far longer than the restart; retry sooner, still backing off.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000)),
]


class ConnectionLost(Exception):
    """The connection to the server broke (or the server forgot this worker): call `recover()`."""


@dataclass(frozen=True)
class Recovery:
    rejoined: bool  # joined again as a new member (new worker id, round = first_round)
    first_round: int
    resent: int  # logged pushes sent again
    pulled: bool  # the replica was replaced by a full pull
    futures: tuple[concurrent.futures.Future, ...]


def backoff_delays(initial: float = 0.25, maximum: float = MAX_BACKOFF_S) -> Iterator[float]:
    """Exponential backoff with full jitter."""
    delay = initial
    while True:
        yield random.uniform(0, delay)
        delay = min(maximum, delay * 2)


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


# What gRPC's UNAVAILABLE details say, per cause a person can act on (checked in this order).
_TLS_WORDS = ("tls handshake", "ssl", "certificate", "hostname verification")


def connection_cause(exc: grpc.aio.AioRpcError, address: str) -> str:
    """Why a call to `address` failed, in words that say what to check: nothing listening, a
    name that does not resolve, TLS, the token, or no answer in time."""
    code, details = exc.code(), exc.details() or ""
    lowered = details.lower()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the server at {address} refused the cluster token (check --token-file / WANPS_TOKEN)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from {address} in time"
    if "connection refused" in lowered:
        return f"connection refused: nothing listens at {address}"
    if "resolving" in lowered or "dns" in lowered or "name not found" in lowered:
        return f"cannot resolve the host of {address}"
    if any(word in lowered for word in _TLS_WORDS):
        return (f"TLS handshake with {address} failed (check --tls-ca, --tls-server-name and that the "
                f"server serves TLS): {details}")
    if "socket closed" in lowered:
        return (f"{address} closed the connection (a TLS server dialled without TLS? use --tls-ca or --tls)")
    return f"{code.name}: {details}"


def recover(session: WorkerSession, replica: Replica, wait_for_version: Callable[[int], None], tau_max: int,
            next_round: int, timeout: float) -> Recovery:
    """Reconnect `session` and bring `replica` and the server back in step (see the module)."""
    deadline = time.monotonic() + timeout
    session.stop_updates()
    reply = _resume_with_backoff(session, deadline)
    session.reconnected()
    if not reply.member:
        return _rejoin(session, replica, deadline)
    checksum = codec.model_checksum(replica.values)  # on the replica's device: one integer comes back
    replica_was_at = replica.version
    same_process = reply.incarnation == session.incarnation
    in_step = replica.version == reply.version and checksum == reply.model_checksum
    # The same server process and a replica behind it: the update stream catches it up
    # (or fails with FAILED_PRECONDITION when it fell out of the history, and we pull then).
    pulled = False
    # A replica that applied a compressed downlink's own round is the model minus a residual
    # the server dropped with the broken stream (server/downlink.py): only a pull puts it back
    # in step. One that applied only shared rounds is the model, whatever its stream asked.
    compressed = replica.compressed
    if compressed or (not in_step and not (same_process and replica.version < reply.version)):
        _pull_into(session, replica, PULL_TIMEOUT_S)
        pulled = True
    session.incarnation = reply.incarnation
    session.follow_updates(replica.version)
    log.info("worker %d reconnected: server at version %d, replica at %d%s", session.worker_id, reply.version,
             replica_was_at, ", pulled the model" if pulled else "")
    # Send again, in order, every push the server has neither applied nor holds.
    held = set(reply.held_rounds)
    session.push_log.restart_at(reply.version)
    lost = session.push_log.take_lost(reply.version, held)
    if lost is not None:
        # Rounds dropped from the log that the server lost: their mass goes out again through
        # error feedback (the optimizer restores it at its next step), the rounds close empty.
        session.late_updates.append(lost)
        log.info("worker %d: the summed update of rounds the push log had dropped goes back into error feedback",
                 session.worker_id)
    futures = []
    for round_ in range(max(reply.version, reply.first_round), next_round):
        if round_ in held:
            continue
        logged = session.push_log.get(round_)
        if logged is None:
            # Not in the log (dropped over its cap; its mass went back above): an empty update keeps the round closing.
            wait_for_version(round_ - tau_max)
            empty = codec.Update(values=torch.empty(0), indices=torch.empty(0, dtype=torch.int32))
            logged = session.log_push(round_, replica.version, empty)
        else:
            wait_for_version(logged.computed_at_version)
        futures.append(session.send(logged))
    return Recovery(rejoined=False, first_round=reply.first_round, resent=len(futures), pulled=pulled,
                    futures=tuple(futures))


def _resume_with_backoff(session: WorkerSession, deadline: float) -> pb.ResumeReply:
    delays = backoff_delays()
    while True:
        try:
            # wait_for_ready inside: connect as soon as the server is back (the channel reconnects
            # with its own short backoff, see RECONNECT_OPTIONS); Resume is safe to wait for.
            return session.resume(RESUME_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                # Our id is another member's now (a server restarted without --resume): not ours to resume.
                log.warning("worker %d: the server holds this id for another member (%s); joining again",
                            session.worker_id, describe(exc))
                return pb.ResumeReply(member=False)
            if exc.code() not in RECONNECT_CODES and exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            if time.monotonic() >= deadline:
                raise ConnectionLost(f"server unreachable until the recovery deadline: {describe(exc)}") from exc
            session.sleep(next(delays))  # cut short by interrupt() (a stopping worker)


def _pull_into(session: WorkerSession, replica: Replica, timeout: float) -> PulledModel:
    pulled = session.pull(timeout=timeout)
    replica.values.copy_(pulled.values)  # host -> the replica's device (a pull is a full copy anyway)
    replica.version = pulled.version
    replica.compressed = False
    return pulled


def _rejoin(session: WorkerSession, replica: Replica, deadline: float) -> Recovery:
    """Join again as a new member: seed the model if the server lost it, pull, follow."""
    old_id = session.worker_id
    reply = session.rejoin(timeout=max(1.0, deadline - time.monotonic()))
    if reply.must_seed:
        session.seed(replica.values)
    pulled = _pull_into(session, replica, max(1.0, deadline - time.monotonic()))
    session.push_log.clear()  # a new member: none of the old pushes can be replayed
    session.follow_updates(replica.version)
    log.warning("worker %d was no longer a member: joined again as worker %d, first round %d",
                old_id, session.worker_id, pulled.first_round)
    return Recovery(rejoined=True, first_round=pulled.first_round, resent=0, pulled=True, futures=())
