"""The gRPC edge of the parameter server: decode, validate, call the core, encode.

Every call into `ServerCore` runs on one dedicated thread (`_core_thread`), which keeps
heavy tensor work off the event loop and makes the core's rules sequential without locks.
Refusals are mapped to gRPC status codes in one place for every servicer (wanps.rpc.status).
Closed rounds go to the broadcast history (server/history.py) and, when due, to a
checkpoint (server/checkpoint.py, `CheckpointScheduler`).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from contextlib import ExitStack
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from prometheus_client import CollectorRegistry

from wanps.rpc.serving import RunningService, ServeConfig, start_grpc_service

from wanps.proto import codec
from wanps.proto import structure as structures
from wanps.proto import wanps_pb2 as pb
from wanps.proto.wire import CHUNK_ELEMENTS
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.server.checkpoint import CheckpointScheduler, core_state, read_checkpoint, restore_core
from wanps.rpc.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from wanps.rpc.limits import Limits, StreamLimiter, TokenBucket
from wanps.rpc.status import REFUSALS, mapped_errors, status_for
from wanps.server.core import ClosedRound, CoreConfig, PushResult, ServerCore
from wanps.server.history import DEFAULT_HISTORY_MB, RoundHistory, encode_round
from wanps.server.memory import release_free_memory
from wanps.server.metrics import ServerMetrics

log = logging.getLogger("wanps.server")
T = TypeVar("T")

MAX_PING_PADDING = 1024 * 1024

@dataclass(frozen=True)
class ServerConfig(ServeConfig):
    """The parameter server's settings: how it serves (ServeConfig) and what it holds and decides."""

    port: int = 50051
    metrics_port: int = 9100
    tau_max: int = 8
    min_workers: int = 1
    checksum_every: int | None = None  # None: automatic, see CoreConfig
    # torch intra-op threads for the core's tensor work. One: the gRPC and event-loop threads
    # need the other core(s), and a second torch thread competes with them for it under load
    # (docs/benchmarks.md, `wanps bench push --torch-threads`).
    torch_threads: int = 1
    # Closed rounds kept for Updates replays (a reconnecting or slow follower catches up from
    # them): as many of the newest as fit in `history_mb` MiB of payload, at most
    # `history_rounds`, always the newest (server/history.py).
    history_rounds: int = 64
    history_mb: float = DEFAULT_HISTORY_MB
    limits: Limits = Limits()
    # Faults (docs/operations.md). A worker silent this long leaves at the next round boundary (0: never).
    lease_s: float = 30.0
    # Close a round without its stragglers this long after its first push (0: wait for everyone).
    round_deadline_s: float = 0.0
    # Checkpoint into this directory every `checkpoint_every` rounds (0: only at shutdown).
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    # Continue from the checkpoint in this directory.
    resume_dir: str | None = None
    # Keep the audit record (initial model, sum of applied deltas, applied round ids) in the core.
    audit: bool = False

    def core_config(self) -> CoreConfig:
        return CoreConfig(tau_max=self.tau_max, min_workers=self.min_workers, checksum_every=self.checksum_every,
                          lease_s=self.lease_s, round_deadline_s=self.round_deadline_s, audit=self.audit)

    def sweep_interval_s(self) -> float:
        """How often leases and the round deadline are checked: a tenth of the shorter one."""
        periods = [p for p in (self.lease_s, self.round_deadline_s) if p > 0]
        return min(1.0, max(0.01, min(periods) / 10)) if periods else 1.0


class ParameterServerService(pb_grpc.ParameterServerServicer):
    def __init__(self, core: ServerCore, metrics: ServerMetrics, history_rounds: int,
                 limits: Limits | None = None, *, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 sweep_interval_s: float = 1.0, history_mb: float | None = None) -> None:
        self.core = core
        self.limits = limits or Limits()
        self._joins = TokenBucket(self.limits.join_rate_per_s, self.limits.join_burst)
        self._streams = StreamLimiter(self.limits.max_streams_per_worker)
        self.metrics = metrics
        budget = None if history_mb is None else int(history_mb * 2**20)
        self.history = RoundHistory(history_rounds, budget, pin_rounds=core.config.tau_max + 1)
        # A resumed core starts at its checkpoint's version: older rounds are not in the history.
        self.history.published_through = core.version - 1
        self._core_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanps-core")
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="wanps-decode")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seeded = asyncio.Event()
        self._started = asyncio.Event()
        self._last_close_time: float | None = None
        # One model snapshot shared by the pulls that stream it at once (they start together
        # when a cluster starts): [version, model, checksum, open pulls], or None.
        self._snapshot: list[Any] | None = None
        self._snapshot_lock = asyncio.Lock()
        self.checkpoints = (CheckpointScheduler(core, checkpoint_dir, checkpoint_every, metrics)
                            if checkpoint_dir is not None else None)
        self._sweep_interval_s = sweep_interval_s
        self._sweeper: asyncio.Task | None = None
        # Which process a worker's replica was synced with (see ResumeReply.incarnation).
        self.incarnation = secrets.randbits(63) or 1
        self._refresh_events()

    def start_background(self) -> None:
        """Start the lease and deadline sweeper (on the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._sweeper = asyncio.ensure_future(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                result = await self._on_core(self._sweep_on_core_thread)
            except RuntimeError:  # the core thread is shutting down
                return
            except Exception:
                log.exception("sweep failed")
                continue
            for worker_id in result.expired:
                self.metrics.members_expired.inc()
                log.warning("worker %d silent for more than its lease: removed from round %d on",
                            worker_id, self.core.version)
            if result.overdue is not None:
                self.metrics.rounds_overdue.inc()
                log.info("round %d closed at its deadline without its stragglers", result.overdue)

    def _sweep_on_core_thread(self):
        result = self.core.sweep()
        self._publish(result.closed)
        if result.expired and not self.core.members:
            self._release_when_published()
        return result

    async def _on_core(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        self._loop = loop
        return await loop.run_in_executor(self._core_thread, functools.partial(fn, *args))

    def _refresh_events(self) -> None:
        if self.core.seeded:
            self._seeded.set()
        if self.core.started:
            self._started.set()

    def begin_shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.history.close()

    def close(self) -> None:
        """After the gRPC server stopped: write the final checkpoint, release the threads."""
        try:
            if self.checkpoints is not None and self.core.seeded:
                self.checkpoints.write_final(self._core_thread.submit(core_state, self.core).result())
        finally:
            self._core_thread.shutdown(wait=True, cancel_futures=True)
            self._decode_pool.shutdown(wait=True, cancel_futures=True)
            if self.checkpoints is not None:
                self.checkpoints.close()

    # ------------------------------------------------------------------ RPCs

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        async with mapped_errors(context):
            self._joins.take("join")  # before any other work: a join flood costs next to nothing
            if request.role not in (pb.ROLE_WORKER, pb.ROLE_OBSERVER):
                raise InvalidArgument("role must be ROLE_WORKER or ROLE_OBSERVER")
            self.limits.check_elements("model", request.num_params)
            result = await self._on_core(
                self.core.join,
                request.num_params,
                bytes(request.model_fingerprint),
                request.name,
                request.role == pb.ROLE_OBSERVER,
                structures.from_messages(request.structure),
            )
            self._refresh_events()
            self.metrics.members.set(len(self.core.expected_workers(self.core.version)))
            log.info("join: id %d (%s) role %s first round %d", result.worker_id, request.name,
                     pb.Role.Name(request.role), result.first_round)
            return pb.JoinReply(
                worker_id=result.worker_id,
                rank=max(result.rank, 0),
                world_size=result.world_size,
                version=result.version,
                must_seed=result.must_seed,
                tau_max=self.core.config.tau_max,
                first_round=result.first_round,
                incarnation=self.incarnation,
            )

    async def SeedModel(self, request_iterator: AsyncIterator[pb.ModelChunk], context) -> pb.SeedModelReply:
        async with mapped_errors(context):
            num_params = self.core.num_params
            if num_params is None:
                raise FailedPrecondition("join before seeding")
            model: torch.Tensor | None = None
            target = memoryview(b"")
            filled = 0  # bytes
            worker_id = None
            async for chunk in request_iterator:
                if worker_id is None:
                    # Who may seed is settled before the model-sized buffer is allocated: a
                    # stranger's or a late SeedModel must not cost the server 4 bytes per parameter.
                    worker_id = chunk.worker_id
                    if self.core.seeded:
                        raise FailedPrecondition("the model is already seeded")
                    if worker_id not in self.core.members:
                        raise NotFound(f"worker {worker_id} is not a member of this cluster (join first)")
                    # Chunks go straight into the tensor the core keeps: one copy of the model.
                    model = torch.empty(num_params, dtype=torch.float32)
                    target = memoryview(model.numpy()).cast("B")
                if chunk.offset != filled // 4:
                    raise InvalidArgument(f"seed chunk at offset {chunk.offset}, expected {filled // 4}")
                values = chunk.values
                end = filled + len(values)
                if len(values) % 4 or end > len(target):
                    raise InvalidArgument("seed chunks exceed the model size or split a float")
                target[filled:end] = values
                filled = end
            if worker_id is None or model is None or filled != len(target):
                raise InvalidArgument(f"seed carried {filled // 4} of {num_params} parameters")
            target.release()
            checksum = await self._on_core(self.core.seed, worker_id, model, False)
            self._refresh_events()
            self.metrics.received_bytes.inc(filled)
            log.info("model seeded by worker %d: %d parameters, checksum %08x", worker_id, num_params, checksum)
            return pb.SeedModelReply(version=self.core.version, model_checksum=checksum)

    async def PullModel(self, request: pb.PullModelRequest, context) -> AsyncIterator[pb.ModelChunk]:
        async with mapped_errors(context):
            worker_id = request.worker_id
            if not self.core.is_known(worker_id):
                raise NotFound(f"worker {worker_id} is not a member of this cluster (join first)")
            with self._streams.open(worker_id, "PullModel"):
                await self._pull_model(worker_id, context)
        return
        yield  # noqa: an async generator for gRPC and the interceptors; the chunks go out by write_message

    async def _pull_model(self, worker_id: int, context) -> None:
        self.core.touch(worker_id)
        await self._seeded.wait()
        if worker_id in self.core.members:
            await self._started.wait()
        snapshot = await self._open_snapshot()
        try:
            version, model, checksum = snapshot[0], snapshot[1], snapshot[2]
            values = model.numpy()
            num_params = values.size
            member = self.core.members.get(worker_id)
            for offset in range(0, max(num_params, 1), CHUNK_ELEMENTS):
                chunk = pb.ModelChunk(version=version, num_params=num_params, offset=offset,
                                      values=values[offset : offset + CHUNK_ELEMENTS].tobytes())
                if offset == 0:
                    chunk.model_checksum = checksum
                    chunk.rank = max(self.core.rank_of(worker_id), 0)
                    chunk.world_size = len(self.core.active_workers())
                    chunk.first_round = member.first_round if member else version
                self.metrics.sent_bytes.inc(len(chunk.values))
                await write_message(context, chunk)
        finally:
            self._close_snapshot(snapshot)

    async def _open_snapshot(self) -> list[Any]:
        """The model at the current version for a pull: shared with the pulls streaming the
        same version, so N workers pulling at the start cost one copy of the model, not N."""
        async with self._snapshot_lock:  # pulls that start together wait for one copy
            snapshot = self._snapshot
            if snapshot is None or snapshot[0] != self.core.version:
                version, model, checksum = await self._on_core(self.core.snapshot_tensor)
                snapshot = self._snapshot = [version, model, checksum, 0]
            snapshot[3] += 1
            return snapshot

    def _close_snapshot(self, snapshot: list[Any]) -> None:
        snapshot[3] -= 1
        if snapshot[3] == 0 and self._snapshot is snapshot:
            self._snapshot = None  # the last pull of it is done: free the copy

    async def Push(self, request_iterator: AsyncIterator[pb.PushMessage], context) -> pb.PushReply:
        open_stream = ExitStack()  # counts against its worker's stream limit from the header on
        try:
            header, index_raw, value_raw = await self._receive_push(request_iterator, open_stream)
            # Decode and validate on a pool thread, in parallel with the core thread's work;
            # the core thread then only checks the round rules again and stores the update.
            loop = asyncio.get_running_loop()
            update = None
            if not header.skip and not self.core.check_push(header.worker_id, header.round, header.computed_at_version):
                update = await loop.run_in_executor(self._decode_pool, decode_push, header, index_raw, value_raw,
                                                    self.core.num_params or 0)
            del index_raw, value_raw  # the update views them; a duplicate's bytes go now
            result = await self._on_core(self._push_on_core_thread, header, update)
        except REFUSALS as exc:
            code = status_for(exc)
            self.metrics.push_rejected.labels(code=code.name).inc()
            await context.abort(code, str(exc))
        finally:
            open_stream.close()
        kind = "late" if result.late else "duplicate" if result.duplicate else ("skip" if header.skip else "update")
        self.metrics.pushes.labels(kind=kind).inc()
        durable = self.checkpoints.durable_version if self.checkpoints is not None else result.version
        snapshot = self.checkpoints.snapshot_version if self.checkpoints is not None else result.version
        return pb.PushReply(duplicate=result.duplicate, version=result.version, late=result.late,
                            durable_version=durable, snapshot_version=snapshot)

    async def _receive_push(self, request_iterator, open_stream: ExitStack
                            ) -> tuple[pb.PushHeader, bytearray, bytearray]:
        """The header and the payload, each chunk appended to one buffer as it arrives: a
        push costs its own size once (plus one chunk), not its chunks and then their join."""
        header: pb.PushHeader | None = None
        index_raw = bytearray()
        value_raw = bytearray()
        received = 0
        # A push can never legitimately exceed 8 bytes per parameter (+ one empty chunk).
        limit = 8 * (self.core.num_params or 0)
        async for message in request_iterator:
            part = message.WhichOneof("part")
            if part == "header":
                if header is not None:
                    raise InvalidArgument("a push carries exactly one header, first")
                header = message.header
                open_stream.enter_context(self._streams.open(header.worker_id, "Push"))
                self.limits.check_elements("push", header.count)
            elif part == "chunk":
                if header is None:
                    raise InvalidArgument("a push starts with its header")
                if header.skip:
                    raise InvalidArgument("a skip record carries no chunks")
                indices, values = message.chunk.indices, message.chunk.values
                received += len(indices) + len(values)
                if received > limit:
                    raise ResourceExhausted(f"push payload exceeds {limit} bytes, the most a push can "
                                            f"need for this model (8 bytes per parameter)")
                index_raw += indices
                value_raw += values
            else:
                raise InvalidArgument("empty push message")
        if header is None:
            raise InvalidArgument("a push needs a header")
        self.metrics.received_bytes.inc(received)
        return header, index_raw, value_raw

    def _push_on_core_thread(self, header: pb.PushHeader, update: codec.Update | None) -> PushResult:
        """Runs on the core thread: `core.push` applies the round rules to the current state
        (the pre-check on the event loop may be stale), stores, and closes what is complete."""
        result = self.core.push(header.worker_id, header.round, header.computed_at_version, update)
        self._publish(result.closed)
        return result

    def _publish(self, closed: tuple[ClosedRound, ...]) -> None:
        """Encode closed rounds here (off the loop) and hand them to the loop in order."""
        if not closed:
            return
        if self.checkpoints is not None:
            self.checkpoints.after_close(closed)
        encoded = [(c, encode_round(c)) for c in closed]
        assert self._loop is not None
        # Two hops: the acknowledgement of the push that closed the round goes out before the
        # round's delta. Otherwise a worker's push time includes downloading the delta, and
        # the controller reads half the link's bandwidth (measured by `wanps bench estimate`).
        # Publications stay in order: each hop is FIFO.
        self._loop.call_soon_threadsafe(self._loop.call_soon, self._after_close, encoded)

    def _after_close(self, encoded: list[tuple[ClosedRound, tuple[pb.DeltaChunk, ...]]]) -> None:
        now = time.monotonic()
        for closed, chunks in encoded:
            self.history.publish(closed.round, chunks)
            self.metrics.rounds_closed.inc()
            for staleness in closed.staleness:
                self.metrics.staleness.observe(staleness)
            self.metrics.delta_elements.set(closed.delta.count)
            if self._last_close_time is not None:
                self.metrics.round_duration.observe(now - self._last_close_time)
            self._last_close_time = now
        self.metrics.history_bytes.set(self.history.bytes)
        self.metrics.model_version.set(self.core.version)
        self.metrics.members.set(len(self.core.expected_workers(self.core.version)))

    async def Updates(self, request: pb.UpdatesRequest, context) -> AsyncIterator[pb.DeltaChunk]:
        async with mapped_errors(context):
            self.core.touch(request.worker_id)
            if not self.core.is_known(request.worker_id):
                raise NotFound(f"worker {request.worker_id} is not a member of this cluster (join first)")
            if request.from_version > self.core.version:
                raise FailedPrecondition(
                    f"from_version {request.from_version} is ahead of the server's version {self.core.version}"
                )
            member = request.worker_id in self.core.members  # a worker's stream pins what it has yet to send
            with self._streams.open(request.worker_id, "Updates"):
                async for chunk in self.history.follow(request.from_version, pin=member):
                    self.metrics.sent_bytes.inc(len(chunk.indices) + len(chunk.values))
                    await write_message(context, chunk)
        return
        yield  # noqa: an async generator for gRPC and the interceptors; the chunks go out by write_message

    async def Ping(self, request: pb.PingRequest, context) -> pb.PingReply:
        # Padding lets workers probe bandwidth; it is bounded so a ping stays cheap.
        async with mapped_errors(context):
            if len(request.padding) > MAX_PING_PADDING:
                raise ResourceExhausted(f"ping padding is limited to {MAX_PING_PADDING} bytes")
        self.metrics.received_bytes.inc(len(request.padding))
        # The heartbeat: renewing a lease is one float store, safe off the core thread, and
        # keeps pings (RTT samples) from queueing behind a round's aggregation.
        self.core.touch(request.worker_id)
        return pb.PingReply(sent_unix_ns=request.sent_unix_ns, version=self.core.version)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveReply:
        async with mapped_errors(context):
            last_round, closed = await self._on_core(self._leave_on_core_thread, request.worker_id)
            self.metrics.members.set(len(self.core.expected_workers(self.core.version)))
            log.info("leave: worker %d after round %d", request.worker_id, last_round)
            return pb.LeaveReply(last_round=max(last_round, 0))

    async def Resume(self, request: pb.ResumeRequest, context) -> pb.ResumeReply:
        async with mapped_errors(context):
            info = await self._on_core(self.core.resume_info, request.worker_id)
            self.metrics.resumes.labels(outcome="member" if info.member else "gone").inc()
            log.info("resume: worker %d %s at version %d, holding rounds %s", request.worker_id,
                     "is a member" if info.member else "is no longer a member", info.version, list(info.held_rounds))
            return pb.ResumeReply(member=info.member, version=info.version, model_checksum=info.model_checksum,
                                  held_rounds=info.held_rounds, first_round=info.first_round,
                                  incarnation=self.incarnation)

    def _leave_on_core_thread(self, worker_id: int) -> tuple[int, tuple[ClosedRound, ...]]:
        last_round, closed = self.core.leave(worker_id)
        self._publish(closed)
        if not self.core.members:
            self._release_when_published()
        return last_round, closed

    def _release_when_published(self) -> None:
        """On the core thread, once no member is left: after what is being published, drop
        the history (nobody follows it: a worker that joins pulls the model) and hand freed
        memory back to the system, so an idle server holds its model and little else."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.call_soon, self._release_if_idle)

    def _release_if_idle(self) -> None:
        if self.core.members:
            return  # someone joined meanwhile
        self.metrics.members.set(0)
        self.history.release()
        self.metrics.history_bytes.set(0)
        if self._snapshot is not None and self._snapshot[3] == 0:
            self._snapshot = None
        try:
            self._core_thread.submit(release_free_memory)
        except RuntimeError:  # shutting down: the process is about to end anyway
            pass


def decode_push(header: pb.PushHeader, index_raw: bytes | bytearray, value_raw: bytes | bytearray, num_params: int
                ) -> codec.Update:
    """Validate and decode a received push (zero-copy: the update's tensors view the buffers)."""
    return codec.decode_update(header.codec, header.value_dtype, header.count, index_raw, value_raw, num_params,
                               block_start=header.block_start)


# How long a stream whose write failed waits for gRPC to cancel it (below).
CANCEL_WAIT_S = 10.0


async def write_message(context: grpc.aio.ServicerContext, message: Any) -> None:
    """Send one message of a server stream, quietly ending the call when the client has gone.

    When a client cancels or drops a stream (a worker leaving, a follower restarting its
    stream) while a large delta or model is being written, the write fails in gRPC's core
    (ExecuteBatchError, a grpc.aio.InternalError). gRPC learns that the client closed from a
    separate completion, which then cancels this handler; until it does, every further send
    (the next write, or the final status gRPC sends when the handler returns) fails again
    and is logged as an `ExecuteBatchError raised in core` traceback. So wait for that
    cancellation here; if it never comes, the failure was not a closed client: raise it.
    """
    try:
        await context.write(message)
    except grpc.aio.InternalError:
        await asyncio.sleep(CANCEL_WAIT_S)
        raise


# ---------------------------------------------------------------------------- process


RunningServer = RunningService[ParameterServerService]


def build_core(config: ServerConfig) -> ServerCore:
    """A fresh core, or one continuing from `config.resume_dir`'s checkpoint."""
    if config.resume_dir is None:
        return ServerCore(config.core_config())
    state = read_checkpoint(config.resume_dir)
    core = restore_core(state, config.core_config())
    log.info("resumed from %s: version %d, %d members, %d open rounds", config.resume_dir, core.version,
             len(core.members), len(core.open_rounds))
    return core


async def start_server(config: ServerConfig, registry: CollectorRegistry | None = None) -> RunningServer:
    registry = registry if registry is not None else CollectorRegistry()
    checkpoint_dir = config.checkpoint_dir or config.resume_dir
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)  # fail at start, not at the first checkpoint
    service = ParameterServerService(build_core(config), ServerMetrics(registry), config.history_rounds,
                                     config.limits, checkpoint_dir=checkpoint_dir,
                                     checkpoint_every=config.checkpoint_every,
                                     sweep_interval_s=config.sweep_interval_s(), history_mb=config.history_mb)
    running = await start_grpc_service(
        service, pb_grpc.add_ParameterServerServicer_to_server, pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name,
        config, registry)
    service.start_background()
    service.metrics.model_version.set(service.core.version)
    log.info("parameter server on %s:%d (metrics %s), tau_max %d, min workers %d, %s",
             config.host, running.port, running.metrics_port, config.tau_max, config.min_workers,
             config.security.describe())
    return running
