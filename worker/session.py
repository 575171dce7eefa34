"""A worker's connections to the server and the controller, on a background event loop.

`WorkerSession` owns one thread running an asyncio (uvloop) loop with grpc.aio channels.
The training thread calls its blocking methods; pushes return futures, so up to tau
pushes stay in flight while the next gradients are computed. Deltas of closed rounds
arrive on `deltas` (a thread-safe queue) and are applied by the training thread only at
step boundaries. Link samples (push bytes and times, ping RTTs, compute times) are
batched to the controller once a second.

Faults (docs/operations.md): a broken update stream or a push that cannot reach the server
puts one `ConnectionLost` on `deltas`; the training thread then calls `recover()`, which
reconnects with exponential backoff and jitter (`Resume`), reconciles the replica by
version, CRC and server incarnation (a full pull only when they differ), restarts the
update stream and re-sends the logged pushes the server does not hold, in order, each once
the replica has reached the version it was computed at. Pushes carry (worker, round), so a
replay the server already has is acknowledged as a duplicate. A worker that is no longer a
member (lease ran out, or the server resumed from a checkpoint taken before it joined)
joins again, seeding the model if the server has none. Error-feedback state lives in the
optimizer and is never touched by any of this.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from wanps.proto.decisions import Decision, decision_from_message
from wanps.rpc.auth import ClientSecurity, aio_channel
from wanps.rpc.config import event_loop_factory
from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.worker.metrics import WorkerMetrics

log = logging.getLogger("wanps.worker")
T = TypeVar("T")

REPORT_INTERVAL_S = 1.0
# A ping every PING_INTERVAL_S (enough unqueued RTTs for a low quantile in a few seconds);
# every PROBE_EVERY-th carries PROBE_BYTES of padding, so the controller sees the link's
# bandwidth even when pushes are tiny (a small delta): 32 KiB every 4 s is 64 kbit/s,
# about 0.3% of a 20 Mbit/s link.
PING_INTERVAL_S = 0.5
PROBE_EVERY = 8
PROBE_BYTES = 32 * 1024
MAX_BACKOFF_S = 8.0
# Logged pushes are kept until the server says their rounds are durable (checkpointed);
# this caps the log's payload bytes in any case (oldest dropped first).
PUSH_LOG_MAX_BYTES = 64 * 1024 * 1024
# Status codes that mean "the server is unreachable or restarted", not "your request is wrong".
# NOT_FOUND: the server no longer knows this worker (lease ran out, or it resumed without it).
# (UNKNOWN and INTERNAL are not among them: a server bug must surface, not loop in recovery.)
RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND})


# gRPC's own reconnect backoff (defaults: 1 s initial, 120 s max) would keep a worker away
# from a restarted server far longer than the restart; retry sooner, still backing off.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", int(MAX_BACKOFF_S * 1000)),
]


class ReplicaDiverged(RuntimeError):
    """The replica's checksum differs from the server's at the same version."""


class ConnectionLost(Exception):
    """The connection to the server broke (or the server forgot this worker): call `recover()`."""


@dataclass(frozen=True)
class LoggedPush:
    round: int
    computed_at_version: int
    update: codec.SparseUpdate | None
    messages: list[pb.PushMessage]
    nbytes: int


@dataclass(frozen=True)
class Recovery:
    rejoined: bool  # joined again as a new member (new worker id, round = first_round)
    first_round: int
    resent: int  # logged pushes sent again
    pulled: bool  # the replica was replaced by a full pull
    futures: tuple[concurrent.futures.Future, ...]


@dataclass(frozen=True)
class ReceivedDelta:
    round: int
    version: int
    delta: codec.SparseUpdate
    model_crc32: int | None
    nbytes: int
    members: int = 0  # workers counted in the round (pushed + skipped); 0 = unknown


@dataclass(frozen=True)
class PulledModel:
    version: int
    values: torch.Tensor
    model_crc32: int
    rank: int
    world_size: int
    first_round: int


def backoff_delays(initial: float = 0.25, maximum: float = MAX_BACKOFF_S) -> Iterator[float]:
    """Exponential backoff with full jitter."""
    delay = initial
    while True:
        yield random.uniform(0, delay)
        delay = min(maximum, delay * 2)


class WorkerSession:
    def __init__(
        self,
        server: str,
        controller: str | None = None,
        *,
        max_message_bytes: int = 8 * 1024 * 1024,
        use_uvloop: bool = True,
        security: ClientSecurity | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.server_address = server
        self.metrics = metrics  # None: count nothing (library users who do not scrape)
        self.controller_address = controller
        self.deltas: queue.Queue[ReceivedDelta | BaseException] = queue.Queue()
        self.worker_id: int | None = None
        self.num_params: int | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self._decisions: dict[int, Decision] = {}
        self._decision_event = threading.Event()
        self._decisions_lock = threading.Lock()
        self._samples: list[pb.LinkSample] = []
        self._reported_round = 0
        self._tasks: list[asyncio.Task] = []
        self._updates_task: asyncio.Task | None = None
        self._closed = False
        # Fault handling: pushes kept for a replay, the server process the replica was synced
        # with, whether the connection is known lost, and updates returned `late`.
        self._push_log: OrderedDict[int, LoggedPush] = OrderedDict()
        self._push_log_bytes = 0
        self._log_lock = threading.Lock()  # the training thread appends, the I/O loop forgets
        self.durable_version = 0
        self.incarnation: int | None = None
        self._lost = False
        self._generation = 0
        self.late_updates: deque[codec.SparseUpdate] = deque()
        self.recoveries = 0
        self._join_args: tuple[int, bytes, str, bool] | None = None  # (num_params, fingerprint, name, observer)
        self._loop = event_loop_factory(use_uvloop)()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wanps-worker-io", daemon=True)
        self._thread.start()
        self._security, self._max_message_bytes = security, max_message_bytes
        self._server_channel = self._call(lambda: self._make_channel(server, RECONNECT_OPTIONS))
        self._server = pb_grpc.ParameterServerStub(self._server_channel)
        self._controller_channel = None
        self._controller = None
        if controller:
            self._controller_channel = self._call(lambda: self._make_channel(controller, RECONNECT_OPTIONS))
            self._controller = pb_grpc.ControllerStub(self._controller_channel)

    # ------------------------------------------------------------------ plumbing

    async def _make_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        # Token and TLS as configured (wanps.rpc.auth); called on the I/O loop.
        return aio_channel(address, self._security, max_message_bytes=self._max_message_bytes, options=options)

    def _submit(self, make: Callable[[], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Run `make()` on the I/O loop (gRPC calls must be created there) and await it."""

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def _call(self, make: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        return self._submit(make).result(timeout)

    def _spawn(self, factory: Callable[[], Awaitable[Any]]) -> None:
        async def start() -> None:
            self._tasks.append(asyncio.ensure_future(factory()))

        self._call(start)

    # ------------------------------------------------------------------ membership and model

    def join(self, num_params: int, fingerprint: bytes, name: str = "", observer: bool = False,
             timeout: float = 60.0) -> pb.JoinReply:
        request = pb.JoinRequest(role=pb.ROLE_OBSERVER if observer else pb.ROLE_WORKER, num_params=num_params,
                                 model_fingerprint=fingerprint, name=name)
        reply = self._call(lambda: self._server.Join(request, wait_for_ready=True, timeout=timeout))
        self.worker_id, self.num_params = reply.worker_id, num_params
        if self.metrics is not None:
            self.metrics.worker_id.set(reply.worker_id)
        self.incarnation = reply.incarnation
        self._join_args = (num_params, fingerprint, name, observer)
        # Report the round this worker starts at, not 0: a restarted controller schedules from it.
        self._reported_round = max(self._reported_round, reply.first_round)
        return reply

    def seed(self, model: torch.Tensor) -> pb.SeedModelReply:
        raw = model.detach().to(torch.float32).contiguous().numpy().tobytes()

        def chunks() -> Iterator[pb.ModelChunk]:
            for offset, values in codec.iter_model_chunks(raw):
                yield pb.ModelChunk(worker_id=self.worker_id, num_params=model.numel(), offset=offset, values=values)

        self._count_sent(len(raw))
        return self._call(lambda: self._server.SeedModel(chunks()))

    def pull(self, timeout: float | None = None) -> PulledModel:
        """The model at the server's current version; waits until the cluster has started."""
        return self._call(self._pull, timeout)

    async def _pull(self) -> PulledModel:
        buffer: bytearray | None = None
        header: pb.ModelChunk | None = None
        filled = 0
        async for chunk in self._server.PullModel(pb.PullModelRequest(worker_id=self.worker_id), wait_for_ready=True):
            if header is None:
                header = chunk
                buffer = bytearray(chunk.num_params * 4)
            assert buffer is not None
            if chunk.offset * 4 != filled or filled + len(chunk.values) > len(buffer):
                raise ReplicaDiverged(f"model chunk at offset {chunk.offset} out of order")
            buffer[filled : filled + len(chunk.values)] = chunk.values
            filled += len(chunk.values)
        if header is None or buffer is None or filled != len(buffer):
            raise ReplicaDiverged("model pull ended early")
        self._count_received(filled)
        values = torch.frombuffer(buffer, dtype=torch.float32)
        if codec.model_crc32(values) != header.model_crc32:
            raise ReplicaDiverged("pulled model does not match the server's checksum")
        return PulledModel(version=header.version, values=values, model_crc32=header.model_crc32,
                           rank=header.rank, world_size=header.world_size, first_round=header.first_round)

    def leave(self, timeout: float = 30.0) -> int:
        """Leave at a round boundary. -1 when the server no longer knows this worker."""
        try:
            reply = self._call(lambda: self._server.Leave(pb.LeaveRequest(worker_id=self.worker_id), timeout=timeout))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return -1
            raise
        return reply.last_round

    # ------------------------------------------------------------------ background streams

    def follow_updates(self, from_version: int) -> None:
        """Start receiving closed rounds' deltas after `from_version` into `self.deltas`
        (replacing the stream a previous call started)."""

        async def start() -> None:
            if self._updates_task is not None:
                self._updates_task.cancel()
                await asyncio.gather(self._updates_task, return_exceptions=True)
            self._updates_task = asyncio.ensure_future(self._follow_updates(from_version))
            self._tasks.append(self._updates_task)

        self._call(start)

    def _mark_lost(self, exc: BaseException, generation: int | None = None) -> None:
        """On the I/O loop: tell the training thread once per connection generation."""
        if self._closed or self._lost or (generation is not None and generation != self._generation):
            return
        self._lost = True
        log.warning("connection to the server lost (%s); reconnecting", _describe(exc))
        self.deltas.put(ConnectionLost(_describe(exc)))

    async def _follow_updates(self, from_version: int) -> None:
        request = pb.UpdatesRequest(worker_id=self.worker_id, from_version=from_version)
        generation = self._generation
        index_parts: list[bytes] = []
        value_parts: list[bytes] = []
        started = 0.0
        try:
            async for chunk in self._server.Updates(request, wait_for_ready=True):
                if not index_parts and not value_parts:
                    started = time.monotonic()
                index_parts.append(chunk.indices)
                value_parts.append(chunk.values)
                if not chunk.last:
                    continue
                index_raw, value_raw = codec.join_chunks(index_parts), codec.join_chunks(value_parts)
                index_parts, value_parts = [], []
                assert self.num_params is not None
                delta = codec.decode_delta(index_raw, value_raw, chunk.total_count, self.num_params, chunk.dense)
                nbytes = len(index_raw) + len(value_raw)
                self._count_received(nbytes)
                self._sample(pb.LinkSample.KIND_DOWNLOAD, nbytes, time.monotonic() - started, chunk.round)
                self.deltas.put(ReceivedDelta(chunk.round, chunk.version, delta,
                                              chunk.model_crc32 if chunk.has_model_crc32 else None, nbytes,
                                              chunk.pushed + chunk.skipped))
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

    def follow_decisions(self, report_samples: bool = True) -> None:
        """Follow the controller's decisions; workers also ping the server and report samples."""
        if self._controller is not None:
            self._spawn(self._follow_decisions)
            if report_samples:
                self._spawn(self._report_loop)
        if report_samples:
            self._spawn(self._ping_loop)

    async def _follow_decisions(self) -> None:
        """Keep the decision stream open; on loss keep the last decisions and reconnect with backoff."""
        assert self._controller is not None
        delays = backoff_delays()
        while not self._closed:
            try:
                stream = self._controller.Decisions(pb.DecisionsRequest(worker_id=self.worker_id or 0),
                                                    wait_for_ready=True)
                async for message in stream:
                    delays = backoff_delays()
                    decision = decision_from_message(message)
                    with self._decisions_lock:
                        self._decisions[decision.decision_id] = decision
                    self._decision_event.set()
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, ValueError) as exc:
                log.warning("controller stream lost (%s); keeping the last decision", exc)
            await asyncio.sleep(next(delays))

    async def _report_loop(self) -> None:
        assert self._controller is not None
        while not self._closed:
            await self._flush_samples()  # at once first: the controller decides on a first report
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _flush_samples(self) -> None:
        samples, self._samples = self._samples, []
        try:
            await self._controller.Report(  # type: ignore[union-attr]
                pb.ReportRequest(worker_id=self.worker_id or 0, round=self._reported_round, samples=samples[-512:],
                                 num_params=self.num_params or 0),
                timeout=5.0,
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("report to controller failed: %s", exc.code())

    async def _ping_loop(self) -> None:
        probe = bytes(PROBE_BYTES)
        for count in itertools.count():
            if self._closed:
                return
            await asyncio.sleep(PING_INTERVAL_S)
            padding = probe if count % PROBE_EVERY == PROBE_EVERY - 1 else b""
            started = time.monotonic()
            try:
                await self._server.Ping(pb.PingRequest(worker_id=self.worker_id or 0, sent_unix_ns=time.time_ns(),
                                                       padding=padding), timeout=10.0)
            except grpc.aio.AioRpcError:
                continue
            self._count_sent(len(padding))
            self._sample(pb.LinkSample.KIND_PING, len(padding), time.monotonic() - started, self._reported_round)

    def _sample(self, kind: int, nbytes: int, seconds: float, round_: int, grad_norm: float = 0.0,
                elements: int = 0) -> None:
        self._samples.append(pb.LinkSample(kind=kind, bytes=nbytes, seconds=seconds, round=round_,
                                           unix_ns=time.time_ns(), grad_norm=grad_norm, elements=elements))

    def record_compute(self, seconds: float, round_: int, grad_norm: float = 0.0) -> None:
        self._loop.call_soon_threadsafe(self._sample, pb.LinkSample.KIND_COMPUTE, 0, seconds, round_, grad_norm)
        self._reported_round = max(self._reported_round, round_)

    # ------------------------------------------------------------------ decisions

    def decisions(self) -> list[Decision]:
        with self._decisions_lock:
            return list(self._decisions.values())

    def wait_for_decision(self, timeout: float) -> bool:
        return self._decision_event.wait(timeout)

    # ------------------------------------------------------------------ pushes

    def push(self, round_: int, computed_at_version: int, update: codec.SparseUpdate | None
             ) -> concurrent.futures.Future[pb.PushReply]:
        """Send one round's update (None = skip record). Encoding happens on the calling thread.

        The push is logged until its round is durable on the server; while the connection is
        known lost it is only logged (recover() sends it)."""
        header = pb.PushHeader(worker_id=self.worker_id, round=round_, computed_at_version=computed_at_version)
        messages, nbytes = codec.push_messages(header, update)
        if self.metrics is not None:
            self.metrics.record_push(round_, computed_at_version, None if update is None else update.count,
                                     self.num_params or 0)
        logged = LoggedPush(round_, computed_at_version, update, messages, nbytes)
        self._log_push(logged)
        if self._lost:
            done: concurrent.futures.Future[pb.PushReply] = concurrent.futures.Future()
            done.set_result(pb.PushReply())
            return done
        return self._send(logged)

    def _send(self, logged: LoggedPush) -> concurrent.futures.Future[pb.PushReply]:
        self._count_sent(logged.nbytes)
        generation = self._generation
        return self._submit(lambda: self._push(logged, generation))

    async def _push(self, logged: LoggedPush, generation: int) -> pb.PushReply:
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
        seconds = time.monotonic() - started
        elements = 0 if logged.update is None else logged.update.count
        self._sample(pb.LinkSample.KIND_PUSH, logged.nbytes, seconds, logged.round, elements=elements)
        if self.metrics is not None:
            self.metrics.push_seconds.observe(seconds)
        self._forget_durable(reply.durable_version)
        if reply.late and logged.update is not None:
            self.late_updates.append(logged.update)
        return reply

    def _count_sent(self, nbytes: int) -> None:
        self.bytes_up += nbytes
        if self.metrics is not None:
            self.metrics.sent_bytes.inc(nbytes)

    def _count_received(self, nbytes: int) -> None:
        self.bytes_down += nbytes
        if self.metrics is not None:
            self.metrics.received_bytes.inc(nbytes)

    def _log_push(self, logged: LoggedPush) -> None:
        with self._log_lock:
            self._log_push_locked(logged)

    def _log_push_locked(self, logged: LoggedPush) -> None:
        old = self._push_log.pop(logged.round, None)
        if old is not None:
            self._push_log_bytes -= old.nbytes
        self._push_log[logged.round] = logged
        self._push_log_bytes += logged.nbytes
        while self._push_log_bytes > PUSH_LOG_MAX_BYTES and len(self._push_log) > 1:
            _, dropped = self._push_log.popitem(last=False)
            self._push_log_bytes -= dropped.nbytes

    def _forget_durable(self, durable_version: int) -> None:
        """Drop logged pushes for rounds the server can no longer lose (runs on the I/O loop;
        the training thread only appends, and `recover()` reads after the loop settled)."""
        with self._log_lock:
            self._forget_durable_locked(durable_version)

    def _forget_durable_locked(self, durable_version: int) -> None:
        self.durable_version = max(self.durable_version, durable_version)
        while self._push_log:
            round_, logged = next(iter(self._push_log.items()))
            if round_ >= self.durable_version:
                break
            self._push_log.popitem(last=False)
            self._push_log_bytes -= logged.nbytes

    def take_late_updates(self) -> list[codec.SparseUpdate]:
        """Updates the server acknowledged as late (their round closed at its deadline)."""
        taken = []
        while self.late_updates:
            taken.append(self.late_updates.popleft())
        return taken

    # ------------------------------------------------------------------ recovery

    def recover(self, replica: Any, wait_for_version: Callable[[int], None], tau_max: int,
                next_round: int, timeout: float = 600.0) -> Recovery:
        """Reconnect after `ConnectionLost` and bring replica and server back in step.

        `replica` has `values` and `version` (wanps.worker.replica.Replica); `wait_for_version(v)`
        blocks until the replica reaches v (it may raise ConnectionLost again, and the caller
        then calls recover() again). `next_round` is the first round this worker has not pushed.
        """
        self.recoveries += 1
        deadline = time.monotonic() + timeout
        # Stop the old stream first, then forget what it queued: the new stream restarts
        # from the replica's version, so nothing is lost or applied twice.
        self._call(self._stop_updates)
        while True:
            try:
                self.deltas.get_nowait()
            except queue.Empty:
                break
        reply = self._resume_with_backoff(deadline)
        self._generation += 1
        self._lost = False
        if not reply.member:
            return self._rejoin(replica, deadline)
        crc = codec.model_crc32(replica.values)
        replica_was_at = replica.version
        same_process = reply.incarnation == self.incarnation
        in_step = replica.version == reply.version and crc == reply.model_crc32
        # The same server process and a replica behind it: the update stream catches it up
        # (or fails with FAILED_PRECONDITION when it fell out of the history, and we pull then).
        pulled = False
        if not in_step and not (same_process and replica.version < reply.version):
            self._pull_into(replica)
            pulled = True
        self.incarnation = reply.incarnation
        self.follow_updates(replica.version)
        log.info("worker %d reconnected: server at version %d, replica at %d%s", self.worker_id, reply.version,
                 replica_was_at, ", pulled the model" if pulled else "")
        # Send again, in order, every push the server has neither applied nor holds.
        held = set(reply.held_rounds)
        futures = []
        resent = 0
        for round_ in range(max(reply.version, reply.first_round), next_round):
            if round_ in held:
                continue
            with self._log_lock:
                logged = self._push_log.get(round_)
            if logged is None:
                # Not in the log (older than its cap): an empty update keeps the round closing.
                wait_for_version(round_ - tau_max)
                empty = codec.SparseUpdate(values=torch.empty(0), indices=torch.empty(0, dtype=torch.int32))
                header = pb.PushHeader(worker_id=self.worker_id, round=round_, computed_at_version=replica.version)
                messages, nbytes = codec.push_messages(header, empty)
                logged = LoggedPush(round_, replica.version, None, messages, nbytes)
                self._log_push(logged)
            else:
                wait_for_version(logged.computed_at_version)
            futures.append(self._send(logged))
            resent += 1
        return Recovery(rejoined=False, first_round=reply.first_round, resent=resent, pulled=pulled,
                        futures=tuple(futures))

    async def _stop_updates(self) -> None:
        if self._updates_task is not None:
            self._updates_task.cancel()
            await asyncio.gather(self._updates_task, return_exceptions=True)
            self._updates_task = None

    def _resume_with_backoff(self, deadline: float) -> pb.ResumeReply:
        delays = backoff_delays()
        while True:
            try:
                # wait_for_ready: connect as soon as the server is back (the channel reconnects
                # with its own short backoff, see RECONNECT_OPTIONS); Resume is safe to wait for.
                return self._call(lambda: self._server.Resume(pb.ResumeRequest(worker_id=self.worker_id),
                                                              wait_for_ready=True, timeout=5.0))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RECONNECT_CODES and exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                if time.monotonic() >= deadline:
                    raise ConnectionLost(f"server unreachable until the recovery deadline: {_describe(exc)}") from exc
                time.sleep(next(delays))

    def _pull_into(self, replica: Any) -> None:
        pulled = self.pull(timeout=600.0)
        replica.values.copy_(pulled.values)
        replica.version = pulled.version

    def _rejoin(self, replica: Any, deadline: float) -> Recovery:
        """Join again as a new member: seed the model if the server lost it, pull, follow."""
        assert self._join_args is not None
        old_id = self.worker_id
        num_params, fingerprint, name, observer = self._join_args
        reply = self.join(num_params, fingerprint, name, observer=observer,
                          timeout=max(1.0, deadline - time.monotonic()))
        if reply.must_seed:
            self.seed(replica.values)
        pulled = self.pull(timeout=max(1.0, deadline - time.monotonic()))
        replica.values.copy_(pulled.values)
        replica.version = pulled.version
        with self._log_lock:
            self._push_log.clear()
            self._push_log_bytes = 0
            self.durable_version = 0
        self.follow_updates(replica.version)
        log.warning("worker %d was no longer a member: joined again as worker %d, first round %d",
                    old_id, self.worker_id, pulled.first_round)
        return Recovery(rejoined=True, first_round=pulled.first_round, resent=0, pulled=True, futures=())

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            if self._controller is not None and self._samples:
                await self._flush_samples()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server_channel.close()
            if self._controller_channel is not None:
                await self._controller_channel.close()

        try:
            self._call(shutdown, timeout=10.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10.0)
            # Not closed: grpc's poller thread may still post to every loop it has seen,
            # which on a closed loop raises "Event loop is closed" (harmless, but noise).


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
