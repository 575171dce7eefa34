"""A worker's connections to the server and the controller, on a background event loop.

`WorkerSession` is the façade the optimizer and the observer use. It owns one I/O thread
(worker/io_loop.py) running an asyncio (uvloop) loop with grpc.aio channels; the training
thread calls its blocking methods, and pushes return futures, so up to tau pushes stay in
flight while the next gradients are computed. Deltas of closed rounds arrive on `deltas`
(a thread-safe queue) and are applied by the training thread only at step boundaries.
Beside it: link samples and reports to the controller (worker/telemetry.py), the pushes
kept for a replay (worker/push_log.py), and what `recover()` does after a lost connection
(worker/recovery.py).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import torch

from wanps.proto import codec
from wanps.proto import structure as structures
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.proto.decisions import Decision, decision_from_message
from wanps.proto.structure import TensorSpec
from wanps.proto.wire import CHUNK_ELEMENTS
from wanps.rpc.auth import ClientSecurity, aio_channel
from wanps.rpc.options import DEFAULT_MAX_MESSAGE_BYTES
from wanps.worker import recovery
from wanps.worker.layout import ModelMismatch
from wanps.worker.io_loop import Interrupted, IoLoop
from wanps.worker.metrics import WorkerMetrics
from wanps.worker.push_log import LoggedPush, PushLog
from wanps.worker.recovery import (FORGOTTEN_CODES, RECONNECT_CODES, RECONNECT_OPTIONS, ConnectionLost, Recovery,
                                   backoff_delays, connection_cause, describe)
from wanps.worker.telemetry import PING_TIMEOUT_S, Telemetry

if TYPE_CHECKING:
    from wanps.worker.replica import Replica

log = logging.getLogger("wanps.worker")

# While the first join or pull waits for an unreachable server: a line at most this often (and when the cause changes).
WAIT_LOG_INTERVAL_S = 10.0
# One SetDownlink call (a later step tries again; the call is idempotent). Its reply may queue
# behind the deltas on a slow downlink (a residual draining at 3 Mbit/s takes seconds).
SET_DOWNLINK_TIMEOUT_S = 60.0


def check_downlink_delta(downlink_delta: float | None) -> None:
    """None (off) or a fraction of elements in (0, 1]; a ValueError naming the option otherwise."""
    if downlink_delta is None:
        return
    if not (isinstance(downlink_delta, (int, float)) and math.isfinite(downlink_delta) and 0 < downlink_delta <= 1):
        raise ValueError(f"downlink_delta must be a fraction of elements in (0, 1] (or None: off), "
                         f"got {downlink_delta!r}")


class ReplicaDiverged(RuntimeError):
    """The replica's checksum differs from the server's at the same version."""


@dataclass(frozen=True)
class ReceivedDelta:
    round: int
    version: int
    delta: codec.Update  # on the host, as decoded (Replica moves it to the model's device)
    model_checksum: int | None
    nbytes: int
    members: int = 0  # workers counted in the round (pushed + skipped); 0 = unknown
    # The fraction this round was cut to for this follower (its own round of a compressed
    # downlink: after it the replica may differ from the model); 0: the round every follower gets.
    downlink_delta: float = 0.0


@dataclass(frozen=True)
class PulledModel:
    version: int
    values: torch.Tensor  # on the host
    model_checksum: int
    rank: int
    world_size: int
    first_round: int


class WorkerSession:
    def __init__(
        self,
        server: str,
        controller: str | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        use_uvloop: bool = True,
        security: ClientSecurity | None = None,
        metrics: WorkerMetrics | None = None,
        downlink_delta: float | None = None,
    ) -> None:
        """`downlink_delta`: ask the server for this follower's own downlink compression
        (UpdatesRequest.downlink_delta, server/downlink.py): each round the top fraction of what
        the replica lacks, the rest kept on the server. The replica is then the server's model
        minus that residual, checked by the server's follower checksum; recovery pulls when
        a compressed round was applied. None: the full aggregated delta of every round (replicas
        bit-identical to the model). `follow_downlink` changes it while the stream is open."""
        check_downlink_delta(downlink_delta)
        self.downlink_delta = downlink_delta  # what this session's update stream uses (asks for)
        # Each update stream is named by a new key, so SetDownlink changes the stream it means.
        self._stream_keys = itertools.count(1)
        self._stream_key = 0  # the current stream's (0: none yet); set on the I/O loop
        self._downlink_pending = False  # a SetDownlink call is in flight
        self._downlink_refused: float | None = None  # a fraction the server refused (not asked again)
        self.server_address = server
        self.metrics = metrics  # None: count nothing (library users who do not scrape)
        self.controller_address = controller
        self.deltas: queue.Queue[ReceivedDelta | BaseException] = queue.Queue()
        self.worker_id: int | None = None
        # The secret the server handed this member at Join: every call naming worker_id carries it.
        self.member_secret = b""
        self.num_params: int | None = None
        # Single writer: only the I/O loop's thread adds to them (_count_sent, _count_received),
        # so += needs no lock; any thread may read them.
        self.bytes_up = 0
        self.bytes_down = 0
        self.delta_bytes = 0  # of bytes_down: the rounds' deltas (not pulls or probes)
        self._decisions: dict[int, Decision] = {}
        self._decision_event = threading.Event()
        self._decisions_lock = threading.Lock()
        self._updates_task: asyncio.Task | None = None
        self._closed = False
        # Fault handling: pushes kept for a replay, the server process the replica was synced
        # with, whether the connection is known lost, and updates returned `late`.
        self.push_log = PushLog()
        self.incarnation: int | None = None
        self._lost = False
        self._leaving = False  # leave() was called: the server forgetting us is expected
        self._generation = 0
        self.late_updates: deque[codec.Update] = deque()
        self.recoveries = 0
        self._join_args: tuple | None = None  # join()'s arguments, for rejoin()
        self.trainable_params: int | None = None
        # One shard of a sharded cluster (worker/shards.py sets it): (shard index, shard count,
        # whole vector's size), sent with every Join; num_params is then the shard's range.
        self.shard_view: tuple[int, int, int] | None = None
        self._io = IoLoop(use_uvloop)
        # Set by interrupt() (on the loop): wakes the training thread's sleeps and waits.
        self._interrupt_event = threading.Event()
        self._io.on_interrupt(self._wake_on_interrupt)
        self._security, self._max_message_bytes = security, max_message_bytes
        self._server_channel = self._io.call(lambda: self._make_channel(server, RECONNECT_OPTIONS))
        self._server = pb_grpc.ParameterServerStub(self._server_channel)
        self._controller_channel = None
        self._controller = None
        if controller:
            self._controller_channel = self._io.call(lambda: self._make_channel(controller, RECONNECT_OPTIONS))
            self._controller = pb_grpc.ControllerStub(self._controller_channel)
        self.telemetry = Telemetry(self._io, self._controller)

    async def _make_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        # Token and TLS as configured (wanps.rpc.auth); called on the I/O loop.
        return aio_channel(address, self._security, max_message_bytes=self._max_message_bytes, options=options)

    # ------------------------------------------------------------------ membership and model

    def join(self, num_params: int, fingerprint: bytes, name: str = "", observer: bool = False,
             timeout: float = 60.0, *, structure: Sequence[TensorSpec] = (),
             trainable_params: int | None = None, wait_for_ready: bool = True) -> pb.JoinReply:
        """`num_params`: the replicated vector's size; `structure`: its tensors (so a refusal
        names the first that differs); `trainable_params`: the pushed prefix [0, T), the
        model size reported to the controller (DeCo's S_g); default num_params."""
        request = pb.JoinRequest(role=pb.ROLE_OBSERVER if observer else pb.ROLE_WORKER, num_params=num_params,
                                 model_fingerprint=fingerprint, name=name,
                                 structure=structures.to_messages(structure))
        if self.shard_view is not None:
            request.shard_index, request.shard_count, request.total_params = self.shard_view
        reply = self._io.call(lambda: self._server.Join(request, wait_for_ready=wait_for_ready, timeout=timeout))
        self.worker_id, self.member_secret, self.num_params = reply.worker_id, reply.member_secret, num_params
        self.trainable_params = num_params if trainable_params is None else trainable_params
        self.push_log.trainable = self.trainable_params
        if self.metrics is not None:
            self.metrics.worker_id.set(reply.worker_id)
        self.incarnation = reply.incarnation
        self._join_args = (num_params, fingerprint, name, observer, tuple(structure), trainable_params)
        self.telemetry.joined(reply.worker_id, self.trainable_params, reply.first_round)
        return reply

    def first_join(self, num_params: int, fingerprint: bytes, name: str, timeout: float, *, observer: bool = False,
                   structure: Sequence[TensorSpec] = (), trainable_params: int | None = None) -> pb.JoinReply:
        """`join` as a person's script meets it. A server that cannot be reached is tried again
        with backoff, with a line logged while waiting that names the cause (nothing listening,
        TLS, a name that does not resolve); still unreachable after `timeout`: a ConnectionError
        naming the address and the cause. A refused token is a ConnectionError at once (waiting
        would not change it); a different model is `ModelMismatch`; a request the server calls
        malformed (a name too long or with control characters) a ValueError."""
        deadline = time.monotonic() + timeout
        delays = backoff_delays()
        waiting = _WaitingLine(f"waiting for the wanps server at {self.server_address}", deadline)
        while True:
            try:
                return self.join(num_params, fingerprint, name, observer=observer,
                                 timeout=max(0.1, deadline - time.monotonic()), structure=structure,
                                 trainable_params=trainable_params, wait_for_ready=False)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # Join refuses only a different model so
                    raise ModelMismatch(f"the cluster refused this model: {exc.details()}") from exc
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ValueError(f"the server at {self.server_address} refused to join: {exc.details()}") from None
                cause = connection_cause(exc, self.server_address)
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise ConnectionError(cause) from None
                if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    raise
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"no wanps server answered at {self.server_address} within {timeout:g} s: "
                                          f"{cause}") from None
                waiting.note(cause)
                self.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))

    def first_pull(self, timeout: float) -> PulledModel:
        """The first pull after joining, as a person's script meets it. It waits for the cluster
        to start (the server's --min-workers); a connection that breaks meanwhile (a link reset)
        is tried again with backoff, as a later reconnect would be, within `timeout`."""
        deadline = time.monotonic() + timeout
        delays = backoff_delays()
        waiting = _WaitingLine(f"the model pull from {self.server_address} broke", deadline)
        while True:
            try:
                return self.pull(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                raise TimeoutError(f"no model from {self.server_address} within {timeout:g} s: the cluster has "
                                   "not started (fewer workers joined than the server's --min-workers?) or the "
                                   "link is too slow for the model") from None
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                if time.monotonic() >= deadline:
                    raise ConnectionError(f"the model pull from {self.server_address} kept failing for "
                                          f"{timeout:g} s: {connection_cause(exc, self.server_address)}") from None
                waiting.note(connection_cause(exc, self.server_address))
                self.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))

    def probe(self, timeout: float) -> pb.PingReply:
        """One Ping, waiting up to `timeout` for the server: its version and which shard it is."""
        request = pb.PingRequest(sent_unix_ns=time.time_ns())
        return self._io.call(lambda: self._server.Ping(request, wait_for_ready=True, timeout=timeout))

    def rejoin(self, timeout: float) -> pb.JoinReply:
        """Join again as the last `join` did (recovery, when the server no longer knows this worker)."""
        assert self._join_args is not None
        num_params, fingerprint, name, observer, structure, trainable_params = self._join_args
        return self.join(num_params, fingerprint, name, observer=observer, timeout=timeout, structure=structure,
                         trainable_params=trainable_params)

    def seed(self, model: torch.Tensor) -> pb.SeedModelReply:
        """Upload the initial model, chunk by chunk from the tensor itself (no copy of a float32
        CPU model: each chunk is read as gRPC asks for the next message; a model on another
        device is copied to the host once, here)."""
        values = model.detach().reshape(-1)
        if values.dtype != torch.float32 or not values.is_contiguous() or values.device.type != "cpu":
            values = values.to(device="cpu", dtype=torch.float32).contiguous()
        array = values.numpy()
        num_params = array.size

        def chunks() -> Iterator[pb.ModelChunk]:
            for offset in range(0, max(num_params, 1), CHUNK_ELEMENTS):
                yield pb.ModelChunk(worker_id=self.worker_id, num_params=num_params, offset=offset,
                                    values=array[offset : offset + CHUNK_ELEMENTS].tobytes(),
                                    member_secret=self.member_secret)

        async def seed_model() -> pb.SeedModelReply:
            self._count_sent(4 * num_params)  # on the loop: the counters' single writer
            return await self._server.SeedModel(chunks())

        return self._io.call(seed_model)

    def pull(self, timeout: float | None = None) -> PulledModel:
        """The model at the server's current version; waits until the cluster has started.
        A pull still running after `timeout` is cancelled (TimeoutError)."""
        return self._io.call(self._pull, timeout)

    async def _pull(self) -> PulledModel:
        """Chunks are copied straight into the tensor returned (one copy of the model)."""
        values: torch.Tensor | None = None
        target = memoryview(b"")
        header: pb.ModelChunk | None = None
        filled = 0  # bytes
        request = pb.PullModelRequest(worker_id=self.worker_id, member_secret=self.member_secret)
        call = self._server.PullModel(request, wait_for_ready=True)
        try:
            async for chunk in call:
                if header is None:
                    header = chunk
                    values = torch.empty(chunk.num_params, dtype=torch.float32)
                    target = memoryview(values.numpy()).cast("B")
                raw = chunk.values
                if chunk.offset * 4 != filled or filled + len(raw) > len(target):
                    raise ReplicaDiverged(f"model chunk at offset {chunk.offset} out of order")
                target[filled : filled + len(raw)] = raw
                filled += len(raw)
        finally:
            call.cancel()  # a no-op once it ended; otherwise (cancelled, an error above) it must not go on
        if header is None or values is None or filled != len(target):
            raise ReplicaDiverged("model pull ended early")
        target.release()
        self._count_received(filled)
        if codec.model_checksum(values) != header.model_checksum:
            raise ReplicaDiverged("pulled model does not match the server's checksum")
        return PulledModel(version=header.version, values=values, model_checksum=header.model_checksum,
                           rank=header.rank, world_size=header.world_size, first_round=header.first_round)

    def leave(self, timeout: float = 30.0, *, interruptible: bool = True) -> int:
        """Leave at a round boundary. -1 when the server no longer knows this worker (or knows
        its id as another member's: a server restarted without --resume).
        `interruptible=False`: a stopping worker's last call (it still says goodbye)."""
        self._leaving = True
        try:
            request = pb.LeaveRequest(worker_id=self.worker_id, member_secret=self.member_secret)
            reply = self._io.call(lambda: self._server.Leave(request, timeout=timeout), timeout + 1.0,
                                  interruptible=interruptible)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in FORGOTTEN_CODES:
                return -1
            raise
        return reply.last_round

    # ------------------------------------------------------------------ background streams

    def follow_updates(self, from_version: int) -> None:
        """Start receiving closed rounds' deltas after `from_version` into `self.deltas`
        (replacing the stream a previous call started)."""

        async def restart() -> None:
            await self._stop_updates()
            self._updates_task = self._io.start_task(self._follow_updates(from_version))

        self._io.call(restart)

    def stop_updates(self) -> None:
        """Stop the update stream, then forget what it queued: the next stream restarts from
        the replica's version, so nothing is lost or applied twice."""
        self._io.call(self._stop_updates)
        while True:
            try:
                self.deltas.get_nowait()
            except queue.Empty:
                break

    async def _stop_updates(self) -> None:
        if self._updates_task is not None:
            self._updates_task.cancel()
            await asyncio.gather(self._updates_task, return_exceptions=True)
            self._updates_task = None

    def _mark_lost(self, exc: BaseException, generation: int | None = None) -> None:
        """On the I/O loop: tell the training thread once per connection generation."""
        if self._closed or self._lost or (generation is not None and generation != self._generation):
            return
        self._lost = True
        log.warning("connection to the server at %s lost (%s); reconnecting", self.server_address, describe(exc))
        self.deltas.put(ConnectionLost(describe(exc)))

    async def _follow_updates(self, from_version: int) -> None:
        self._stream_key = next(self._stream_keys)
        request = pb.UpdatesRequest(worker_id=self.worker_id, from_version=from_version,
                                    member_secret=self.member_secret, downlink_delta=self.downlink_delta or 0.0,
                                    stream_key=self._stream_key)
        generation = self._generation
        index_parts: list[bytes] = []
        value_parts: list[bytes] = []
        started = 0.0
        first_chunk_bytes = 0
        call = self._server.Updates(request, wait_for_ready=True)
        try:
            async for chunk in call:
                if not index_parts and not value_parts:
                    # The worker cannot see when the server sent a delta (no shared clock), and
                    # the first chunk's arrival includes waiting for the round to close: only
                    # the chunks after it, sent back to back, time the downlink.
                    started = time.monotonic()
                    first_chunk_bytes = len(chunk.indices) + len(chunk.values)
                index_parts.append(chunk.indices)
                value_parts.append(chunk.values)
                if not chunk.last:
                    continue
                arrived = time.monotonic()  # before decoding: the link's part is over
                index_raw, value_raw = codec.join_chunks(index_parts), codec.join_chunks(value_parts)
                index_parts, value_parts = [], []
                assert self.num_params is not None
                delta = codec.decode_delta(index_raw, value_raw, chunk.total_count, self.num_params, chunk.dense)
                nbytes = len(index_raw) + len(value_raw)
                self._count_received(nbytes)
                self.delta_bytes += nbytes
                self.telemetry.delta_received(nbytes, nbytes - first_chunk_bytes, started, arrived, chunk.round,
                                              chunk.sent_ns)
                # A compressed follower's own round carries its own checksum (the model's minus
                # its downlink residual) and never the model's; a shared round, the model's (the
                # replica is the model at its rounds, the stream switches only where it is).
                checksum = (chunk.follower_checksum if chunk.has_follower_checksum
                            else chunk.model_checksum if chunk.has_model_checksum
                            else None)
                self.deltas.put(ReceivedDelta(chunk.round, chunk.version, delta, checksum, nbytes,
                                              chunk.pushed + chunk.skipped, chunk.downlink_delta))
            # The server ended the stream: it is shutting down.
            self._mark_lost(ConnectionError("the server ended the update stream"), generation)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() in RECONNECT_CODES or exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # FAILED_PRECONDITION: fell out of the server's history; recovery pulls the model.
                self._mark_lost(exc, generation)
            elif not self._closed:
                self.deltas.put(exc)
        except BaseException as exc:  # handed to the training thread, which raises it
            if not self._closed:
                self.deltas.put(exc)
        finally:
            call.cancel()  # a no-op once it ended; after a bad delta it must not stream on

    def follow_downlink(self, downlink_delta: float | None) -> None:
        """Ask the server to change this session's update stream to `downlink_delta` (None: off)
        from its next round, without a pull (SetDownlink). Returns at once; does nothing while
        the stream already uses it, a call is in flight, or the server refused that fraction
        (too many compressed followers on it: logged once). A call that fails otherwise (the
        stream not open yet, a lost connection) is simply made again at a later call."""
        check_downlink_delta(downlink_delta)
        if (downlink_delta == self.downlink_delta or self._downlink_pending or self.worker_id is None
                or (downlink_delta is not None and downlink_delta == self._downlink_refused)):
            return
        self._downlink_pending = True
        self._io.submit(lambda: self._set_downlink(downlink_delta))

    async def _set_downlink(self, downlink_delta: float | None) -> None:
        key = self._stream_key
        request = pb.SetDownlinkRequest(worker_id=self.worker_id, member_secret=self.member_secret, stream_key=key,
                                        downlink_delta=downlink_delta or 0.0)
        try:
            try:
                await self._server.SetDownlink(request, timeout=SET_DOWNLINK_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT):
                    self._downlink_refused = downlink_delta
                    log.warning("the server at %s refused downlink fraction %s: %s", self.server_address,
                                downlink_delta, exc.details())
                else:  # the stream is not open yet, or the connection broke: asked again at a later step
                    log.debug("SetDownlink %s: %s", downlink_delta, describe(exc))
                return
            if key == self._stream_key:  # (a stream opened since asked for self.downlink_delta itself)
                self.downlink_delta = downlink_delta
                self._downlink_refused = None
                log.info("worker %s: downlink %s from the next round", self.worker_id,
                         f"fraction {downlink_delta:g}" if downlink_delta else "uncompressed (draining)")
        finally:
            self._downlink_pending = False

    def follow_decisions(self, report_samples: bool = True) -> None:
        """Follow the controller's decisions; workers also ping the server and report samples."""
        if self._controller is not None:
            self._io.spawn(self._follow_decisions)
            if report_samples:
                self._io.spawn(self.telemetry.report_loop)
        if report_samples:
            self._io.spawn(lambda: self.telemetry.ping_loop(self._ping))
        else:
            self.telemetry.stop_collecting()

    async def _follow_decisions(self) -> None:
        """Keep the decision stream open; on loss keep the last decisions and reconnect with backoff."""
        assert self._controller is not None
        delays = backoff_delays()
        while not self._closed:
            stream = self._controller.Decisions(pb.DecisionsRequest(worker_id=self.worker_id or 0),
                                                wait_for_ready=True)
            try:
                async for message in stream:
                    delays = backoff_delays()
                    decision = decision_from_message(message)
                    with self._decisions_lock:
                        self._decisions[decision.decision_id] = decision
                    self._decision_event.set()
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, ValueError) as exc:
                # One line a person can act on (the RPC error's repr spans several).
                log.warning("controller stream from %s lost (%s); keeping the last decision",
                            self.controller_address, describe(exc))
            finally:
                stream.cancel()  # after a refused decision (ValueError) the stream would go on otherwise
            await asyncio.sleep(next(delays))

    async def _ping(self, padding: bytes, reply_bytes: int = 0) -> pb.PingReply:
        generation, worker_id = self._generation, self.worker_id
        try:
            reply = await self._server.Ping(
                pb.PingRequest(worker_id=worker_id or 0, sent_unix_ns=time.time_ns(), padding=padding,
                               reply_bytes=reply_bytes, member_secret=self.member_secret),
                timeout=PING_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            # The server does not know this worker (its lease ran out, or the server restarted
            # without it): recover at the next step boundary, which joins again.
            if exc.code() in FORGOTTEN_CODES and worker_id == self.worker_id and not self._leaving:
                self._mark_lost(exc, generation)
            raise
        self._count_sent(len(padding))
        if reply.padding:
            self._count_received(len(reply.padding))
        return reply

    def record_compute(self, seconds: float, round_: int, grad_norm: float = 0.0, overhead_s: float = 0.0) -> None:
        self.telemetry.record_compute(seconds, round_, grad_norm, overhead_s)

    # ------------------------------------------------------------------ decisions

    def decisions(self) -> list[Decision]:
        with self._decisions_lock:
            return list(self._decisions.values())

    def wait_for_decision(self, timeout: float) -> bool:
        return self._decision_event.wait(timeout)

    # ------------------------------------------------------------------ pushes

    def push(self, round_: int, computed_at_version: int, update: codec.Update | None
             ) -> concurrent.futures.Future[pb.PushReply]:
        """Send one round's update (None = skip record). Encoding happens on the calling thread.

        The push is logged until its round is durable on the server; while the connection is
        known lost it is only logged (recover() sends it)."""
        if self.metrics is not None:
            self.metrics.record_push(round_, computed_at_version, None if update is None else update.count,
                                     self.trainable_params or 0)
        logged = self.log_push(round_, computed_at_version, update)
        if self._lost:
            done: concurrent.futures.Future[pb.PushReply] = concurrent.futures.Future()
            done.set_result(pb.PushReply())
            return done
        return self.send(logged)

    def log_push(self, round_: int, computed_at_version: int, update: codec.Update | None) -> LoggedPush:
        """Encode one round's push and keep it in the push log, without sending it."""
        header = pb.PushHeader(worker_id=self.worker_id, round=round_, computed_at_version=computed_at_version,
                               member_secret=self.member_secret)
        messages, nbytes = codec.push_messages(header, update)
        logged = LoggedPush(round_, computed_at_version, update, messages, nbytes)
        self.push_log.append(logged)
        return logged

    def send(self, logged: LoggedPush) -> concurrent.futures.Future[pb.PushReply]:
        """Send a logged push on the current connection."""
        generation = self._generation
        return self._io.submit(lambda: self._push(logged, generation))

    async def _push(self, logged: LoggedPush, generation: int) -> pb.PushReply:
        self._count_sent(logged.nbytes)  # on the loop: the counters' single writer
        started = time.monotonic()
        try:
            # Not wait_for_ready: a push must not wait out a server restart and then reach a
            # server that resumed from an older checkpoint; recover() re-sends it instead.
            reply = await self._server.Push(iter(logged.messages))
        except grpc.aio.AioRpcError as exc:
            # Refusals that reach a server restarted under us, before we noticed, are not ours
            # to raise: recover() reconciles and re-sends.
            if exc.code() in RECONNECT_CODES or generation != self._generation or self._lost:
                self._mark_lost(exc, generation)
                return pb.PushReply()
            raise
        acked = time.monotonic()
        seconds = acked - started
        elements = 0 if logged.update is None else logged.update.count
        self.telemetry.push_acknowledged(logged.nbytes, started, acked, logged.round, elements, reply.received_ns)
        if self.metrics is not None:
            self.metrics.push_seconds.observe(seconds)
        self.push_log.note_reply(reply.version, reply.durable_version, reply.snapshot_version)
        if reply.late and logged.update is not None:
            self.late_updates.append(logged.update)
        return reply

    def _count_sent(self, nbytes: int) -> None:
        """On the I/O loop only (see bytes_up)."""
        self.bytes_up += nbytes
        if self.metrics is not None:
            self.metrics.sent_bytes.inc(nbytes)

    def _count_received(self, nbytes: int) -> None:
        """On the I/O loop only (see bytes_up)."""
        self.bytes_down += nbytes
        if self.metrics is not None:
            self.metrics.received_bytes.inc(nbytes)

    def take_late_updates(self) -> list[codec.Update]:
        """Updates the server acknowledged as late (their round closed at its deadline)."""
        taken = []
        while self.late_updates:
            taken.append(self.late_updates.popleft())
        return taken

    # ------------------------------------------------------------------ recovery

    def recover(self, replica: Replica, wait_for_version: Callable[[int], None], tau_max: int,
                next_round: int, timeout: float = 600.0) -> Recovery:
        """Reconnect after `ConnectionLost` and bring replica and server back in step
        (worker/recovery.py).

        `replica` has `values` and `version` (wanps.worker.replica.Replica); `wait_for_version(v)`
        blocks until the replica reaches v (it may raise ConnectionLost again, and the caller
        then calls recover() again). `next_round` is the first round this worker has not pushed.
        """
        self.recoveries += 1
        return recovery.recover(self, replica, wait_for_version, tau_max, next_round, timeout)

    def resume(self, timeout: float) -> pb.ResumeReply:
        """One Resume call; it waits up to `timeout` for the server to be reachable."""
        request = pb.ResumeRequest(worker_id=self.worker_id, member_secret=self.member_secret)
        return self._io.call(lambda: self._server.Resume(request, wait_for_ready=True, timeout=timeout))

    def reconnected(self) -> None:
        """A new connection generation: calls that fail from before it do not report a loss again."""
        self._generation += 1
        self._lost = False

    @property
    def lost(self) -> bool:
        """The connection is known lost (recover() has not run since)."""
        return self._lost

    # ------------------------------------------------------------------ stopping

    def interrupt(self) -> None:
        """Give up whatever the session waits for (joining, pulling, reconnecting, a round):
        every blocking method raises `Interrupted` from now on. Safe from any thread and from a
        signal handler."""
        self._io.interrupt()

    @property
    def interrupted(self) -> bool:
        return self._io.interrupted

    def raise_if_interrupted(self) -> None:
        self._io.raise_if_interrupted()

    def _wake_on_interrupt(self) -> None:
        """On the loop, after interrupt(): wake the training thread wherever it waits."""
        self._interrupt_event.set()
        self._decision_event.set()
        self.deltas.put(Interrupted("the worker is stopping"))

    def sleep(self, seconds: float) -> None:
        """time.sleep that interrupt() cuts short (with `Interrupted`)."""
        self._interrupt_event.wait(seconds)
        self.raise_if_interrupted()

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stopping = self.interrupted

        async def shutdown() -> None:
            if not stopping:  # a stopping worker does not wait on a controller that may be gone
                await self.telemetry.report_remaining()
            await self._io.cancel_tasks()
            await self._server_channel.close()
            if self._controller_channel is not None:
                await self._controller_channel.close()

        try:
            self._io.call(shutdown, timeout=10.0, interruptible=False)
        finally:
            self._io.stop()


class _WaitingLine:
    """The line a person sees while a first join or pull waits: at once, then at most every
    WAIT_LOG_INTERVAL_S, and whenever the cause changes."""

    def __init__(self, what: str, deadline: float) -> None:
        self.what, self.deadline = what, deadline
        self._logged_at: float | None = None
        self._cause = ""

    def note(self, cause: str) -> None:
        now = time.monotonic()
        if self._logged_at is None or cause != self._cause or now - self._logged_at >= WAIT_LOG_INTERVAL_S:
            log.warning("%s: %s; trying again for up to %.0f s more", self.what, cause, max(0.0, self.deadline - now))
            self._logged_at, self._cause = now, cause
