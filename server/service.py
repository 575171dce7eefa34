"""The gRPC edge of the parameter server: decode, validate, call the core, encode.

Every call into `ServerCore` runs on one dedicated thread (`_core_thread`), which keeps
heavy tensor work off the event loop and makes the core's rules sequential without locks;
the event loop reads only the immutable `CoreView` the core thread publishes after each
call (membership, version, member secret digests). Every call naming a member must carry
its member secret (`CoreView.authenticate`, docs/security.md).
Refusals are mapped to gRPC status codes in one place for every servicer (wanps.rpc.status).
Closed rounds go to the broadcast history (server/history.py) and, when due, to a
checkpoint (server/checkpoint.py, `CheckpointScheduler`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import secrets
import threading
import time
from contextlib import ExitStack, aclosing
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
from wanps.proto.shards import shard_range
from wanps.proto.wire import CHUNK_ELEMENTS, MAX_PROBE_BYTES, WireError
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.server.checkpoint import CheckpointScheduler, core_state, read_checkpoint, restore_core
from wanps.rpc.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from wanps.rpc.limits import Limits, StreamLimiter, TokenBucket
from wanps.rpc.member_secrets import member_secret_digest, new_member_secret
from wanps.rpc.status import REFUSALS, mapped_errors, status_for
from wanps.server.core import ClosedRound, CoreConfig, CoreView, PushResult, ServerCore
from wanps.server.downlink import DownlinkResidual, check_fraction
from wanps.server.history import (DEFAULT_HISTORY_MB, FollowerBatch, FollowerRounds, RoundHistory,
                                  encode_follower_round, encode_round, stamp_sent)
from wanps.server.memory import release_free_memory
from wanps.server.metrics import ServerMetrics
from wanps.server import shard as shards
from wanps.server.shard import ShardSpec

log = logging.getLogger("wanps.server")
T = TypeVar("T")

MAX_PING_PADDING = MAX_PROBE_BYTES
# A Ping naming no worker: an RTT or liveness probe that renews no lease and needs no secret.
ANONYMOUS_PING_ID = 0

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
    # Threads for a round's tensor work (aggregate, apply, checksum): 2 = the core thread and
    # a helper, each on half of the index space; 1 = the core thread alone. The result is the
    # same to the bit. One by default: on 2 cores the helper competes with the event loop and
    # slowed `wanps bench push` down; 2 pays where a core is free for it (docs/benchmarks.md,
    # `wanps bench aggregate`, the "auto x2" column).
    core_threads: int = 1
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
    # Debug: raise (CoreThreadViolation) when the servicer touches its core off the core thread.
    check_core_thread: bool = False
    # Key-range shards (server/shard.py, `--shard I/N`): this server owns shard `shard_index` of
    # `shard_count`; 0 of 1 is the single server.
    shard_index: int = 0
    shard_count: int = 1
    # Updates streams with their own downlink compression (UpdatesRequest.downlink_delta,
    # server/downlink.py) held at once; each costs 4 bytes per parameter on the server (its
    # downlink residual) and O(d) core-thread work per round. Above it: RESOURCE_EXHAUSTED.
    max_compressed_followers: int = 4

    def core_config(self) -> CoreConfig:
        return CoreConfig(tau_max=self.tau_max, min_workers=self.min_workers, checksum_every=self.checksum_every,
                          lease_s=self.lease_s, round_deadline_s=self.round_deadline_s, audit=self.audit,
                          shard_index=self.shard_index, shard_count=self.shard_count)

    def sweep_interval_s(self) -> float:
        """How often leases and the round deadline are checked: a tenth of the shorter one."""
        periods = [p for p in (self.lease_s, self.round_deadline_s) if p > 0]
        return min(1.0, max(0.01, min(periods) / 10)) if periods else 1.0


class CoreThreadViolation(AssertionError):
    """The servicer touched its core from a thread other than the core thread (a bug)."""


class CoreThreadGuard:
    """Debug mode (`ServerConfig.check_core_thread`, `--check-core-thread`; on in the tests):
    the servicer's handle on its core, which raises `CoreThreadViolation` (and records it in
    `violations`) when used from any thread but the core thread. The core is not thread-safe
    on purpose; the event loop reads only the `CoreView` published after each core call."""

    def __init__(self, core: ServerCore, owner_thread: int) -> None:
        self._target = core
        self._owner_thread = owner_thread
        self.violations: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if threading.get_ident() != self._owner_thread:
            message = f"ServerCore.{name} used on thread {threading.current_thread().name!r}, not the core thread"
            self.violations.append(message)
            raise CoreThreadViolation(message)
        return getattr(self._target, name)


class ParameterServerService(pb_grpc.ParameterServerServicer):
    """Every use of the core runs on `_core_thread` (through `_on_core`, or a task submitted
    there); the event loop reads `view`, the immutable CoreView the core thread publishes after
    each call. `core` is the core itself, for tests and tools that read it between calls."""

    def __init__(self, core: ServerCore, metrics: ServerMetrics, history_rounds: int,
                 limits: Limits | None = None, *, checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 sweep_interval_s: float = 1.0, history_mb: float | None = None,
                 check_core_thread: bool = False, core_threads: int = 1, max_compressed_followers: int = 4) -> None:
        if core_threads not in (1, 2):
            raise ValueError(f"core_threads must be 1 or 2, got {core_threads}")
        self.core = core
        self.shard = ShardSpec(core.config.shard_index, core.config.shard_count)
        self.limits = limits or Limits()
        self._joins = TokenBucket(self.limits.join_rate_per_s, self.limits.join_burst)
        self._streams = StreamLimiter(self.limits.max_streams_per_worker)
        self.metrics = metrics
        self.view: CoreView = core.view()  # replaced (never changed) by the core thread after each call
        budget = None if history_mb is None else int(history_mb * 2**20)
        self.history = RoundHistory(history_rounds, budget, pin_rounds=core.config.tau_max + 1)
        self._history_rounds = history_rounds  # also the most rounds a compressed follower may lag
        # A resumed core starts at its checkpoint's version: older rounds are not in the history.
        self.history.published_through = core.version - 1
        self._core_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanps-core")
        # Takes half of a large round's tensor work while the core thread does the other half.
        self._core_helper = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanps-core-helper")
                             if core_threads == 2 else None)
        core.helper = self._core_helper
        self._decode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="wanps-decode")
        self._core: ServerCore | CoreThreadGuard = core
        if check_core_thread:
            self._core = CoreThreadGuard(core, self._core_thread.submit(threading.get_ident).result())
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
        self._serving = False  # start_background ran: a final checkpoint is due at close
        self._closing = False
        # Compressed followers (server/downlink.py): stream id -> its residual, touched on the
        # core thread only, and its queue of encoded rounds, touched on the event loop only.
        self.max_compressed_followers = max_compressed_followers
        self._downlinks: dict[int, DownlinkResidual] = {}
        self._downlink_rounds: dict[int, FollowerRounds] = {}  # may hold a stream the core refused, briefly
        self._downlink_ids = itertools.count(1)
        # Streams SetDownlink may change: (worker id, UpdatesRequest.stream_key) -> (stream id,
        # its queue); on the event loop only.
        self._keyed_streams: dict[tuple[int, int], tuple[int, FollowerRounds]] = {}
        # Which process a worker's replica was synced with (see ResumeReply.incarnation).
        self.incarnation = secrets.randbits(63) or 1
        self._refresh_events()

    @property
    def core_thread_violations(self) -> list[str]:
        """Uses of the core off its thread seen so far (debug mode only; always empty otherwise)."""
        return self._core.violations if isinstance(self._core, CoreThreadGuard) else []

    def start_background(self) -> None:
        """Start the lease and deadline sweeper (on the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._serving = True
        self._sweeper = asyncio.ensure_future(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        """Bounded by the server's life: cancelled by begin_shutdown. A failed sweep is logged
        with its exception and counted, and the next one runs: a sweeper that died quietly
        would stop every lease expiry and round deadline for good."""
        while not self._closing:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                result = await self._on_core(lambda: self._sweep_on_core_thread())
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._closing:
                    return  # the core thread is shutting down
                self._background_failed("sweep", "sweep failed (leases and round deadlines are checked again in "
                                                 "%.2f s)", self._sweep_interval_s)
                continue
            for worker_id in result.expired:
                self.metrics.members_expired.inc()
                log.warning("worker %d silent for more than its lease: removed from round %d on",
                            worker_id, self.view.version)
            if result.overdue is not None:
                self.metrics.rounds_overdue.inc()
                log.info("round %d closed at its deadline without its stragglers", result.overdue)

    def _background_failed(self, task: str, message: str, *args: Any) -> None:
        """Call in an `except` block: the exception is logged with its traceback and counted."""
        log.exception(message, *args)
        self.metrics.background_errors.labels(task=task).inc()

    def _sweep_on_core_thread(self):
        result = self._core.sweep()
        self._publish(result.closed)
        if result.expired and not self._core.members:
            self._release_when_published()
        return result

    async def _on_core(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on the core thread, then publish the core's view (after refused calls too).
        `fn` reaches the core itself (`lambda: self._core.join(...)`): even looking up a core
        method belongs on the core thread."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        return await loop.run_in_executor(self._core_thread, self._then_publish_view, fn)

    def _then_publish_view(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        finally:
            self.view = self._core.view()

    def _touch_soon(self, worker_id: int) -> None:
        """Renew a lease on the core thread without waiting for it: a ping's reply (an RTT
        sample) must not queue behind a round's aggregation. Queued work runs in order, so a
        renewal sent before a sweep is seen by it."""
        try:
            future = self._core_thread.submit(lambda: self._core.touch(worker_id))
        except RuntimeError:  # shutting down
            return
        future.add_done_callback(self._report_background_failure("touch"))

    def _report_background_failure(self, task: str) -> Callable[[concurrent.futures.Future], None]:
        def report(future: concurrent.futures.Future) -> None:
            if future.cancelled() or future.exception() is None:
                return
            exc = future.exception()
            log.error("%s failed", task, exc_info=(type(exc), exc, exc.__traceback__))
            self.metrics.background_errors.labels(task=task).inc()

        return report

    def _refresh_events(self) -> None:
        view = self.view
        if view.seeded:
            self._seeded.set()
        if view.started:
            self._started.set()

    def begin_shutdown(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.history.close()
        for rounds in self._downlink_rounds.values():
            rounds.close()

    def close(self) -> None:
        """After the gRPC server stopped (or failed to start): write the final checkpoint of a
        server that served, release the threads."""
        self._closing = True
        try:
            if self.checkpoints is not None and self._serving:
                state = self._core_thread.submit(lambda: core_state(self.core) if self.core.seeded else None).result()
                if state is not None:
                    self.checkpoints.write_final(state)
        finally:
            self._core_thread.shutdown(wait=True, cancel_futures=True)
            if self._core_helper is not None:
                self._core_helper.shutdown(wait=True, cancel_futures=True)
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
            secret = new_member_secret()
            view = shards.view_of(request.shard_index, request.shard_count, request.total_params, request.num_params)
            shards.check_view(self.shard, view, request.num_params)
            structure = structures.from_messages(request.structure)
            total_params = view.total if self.shard.sharded else None
            result = await self._on_core(lambda: self._core.join(
                request.num_params, bytes(request.model_fingerprint), request.name,
                request.role == pb.ROLE_OBSERVER, structure, member_secret_digest(secret), total_params))
            self._refresh_events()
            self.metrics.members.set(self.view.expected_now)
            # The name passed the core's check: at most 64 printable characters, one log line.
            log.info("join: id %d (%s) role %s first round %d", result.worker_id, request.name,
                     pb.Role.Name(request.role), result.first_round)
            return pb.JoinReply(
                worker_id=result.worker_id,
                rank=max(result.rank, 0),
                world_size=result.world_size,
                version=result.version,
                must_seed=result.must_seed,
                tau_max=self.view.tau_max,
                first_round=result.first_round,
                incarnation=self.incarnation,
                member_secret=secret,
                **self._shard_fields(),
            )

    def _shard_fields(self) -> dict[str, int]:
        """The JoinReply's shard fields: this shard and the range of the whole vector it owns."""
        total = self.view.total_params or 0
        start, stop = shard_range(total, self.shard.index, self.shard.count)
        return dict(shard_index=self.shard.index, shard_count=self.shard.count, range_start=start, range_stop=stop,
                    total_params=total)

    async def SeedModel(self, request_iterator: AsyncIterator[pb.ModelChunk], context) -> pb.SeedModelReply:
        async with mapped_errors(context):
            num_params = self.view.num_params
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
                    view = self.view
                    if view.seeded:
                        raise FailedPrecondition("the model is already seeded")
                    if worker_id not in view.members:
                        raise NotFound(f"worker {worker_id} is not a member of this cluster (join first)")
                    view.authenticate(worker_id, chunk.member_secret)
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
            checksum = await self._on_core(lambda: self._core.seed(worker_id, model, False))
            self._refresh_events()
            self.metrics.received_bytes.inc(filled)
            log.info("model seeded by worker %d: %d parameters, checksum %08x", worker_id, num_params, checksum)
            return pb.SeedModelReply(version=self.view.version, model_checksum=checksum)

    async def PullModel(self, request: pb.PullModelRequest, context) -> AsyncIterator[pb.ModelChunk]:
        async with mapped_errors(context):
            worker_id = request.worker_id
            self.view.authenticate(worker_id, request.member_secret)
            with self._streams.open(worker_id, "PullModel"):
                await self._pull_model(worker_id, context)
        return
        yield  # noqa: an async generator for gRPC and the interceptors; the chunks go out by write_message

    async def _pull_model(self, worker_id: int, context) -> None:
        self._touch_soon(worker_id)
        await self._seeded.wait()
        if worker_id in self.view.members:
            await self._started.wait()
        snapshot = await self._open_snapshot()
        try:
            version, model, checksum = snapshot[0], snapshot[1], snapshot[2]
            rank, world_size, first_round = await self._on_core(lambda: self._core.placement(worker_id))
            values = model.numpy()
            num_params = values.size
            for offset in range(0, max(num_params, 1), CHUNK_ELEMENTS):
                chunk = pb.ModelChunk(version=version, num_params=num_params, offset=offset,
                                      values=values[offset : offset + CHUNK_ELEMENTS].tobytes())
                if offset == 0:
                    chunk.model_checksum = checksum
                    chunk.rank = max(rank, 0)
                    chunk.world_size = world_size
                    chunk.first_round = version if first_round is None else first_round
                self.metrics.sent_bytes.inc(len(chunk.values))
                await write_message(context, chunk)
        finally:
            self._close_snapshot(snapshot)

    async def _open_snapshot(self) -> list[Any]:
        """The model at the current version for a pull: shared with the pulls streaming the
        same version, so N workers pulling at the start cost one copy of the model, not N."""
        async with self._snapshot_lock:  # pulls that start together wait for one copy
            snapshot = self._snapshot
            if snapshot is None or snapshot[0] != self.view.version:
                version, model, checksum = await self._on_core(lambda: self._core.snapshot_tensor())
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
            received_ns = time.monotonic_ns()  # the last message is in: the uplink's part is over
            view = self.view
            view.authenticate(header.worker_id, header.member_secret)
            # Decode and validate on a pool thread, in parallel with the core thread's work;
            # the core thread then checks the round rules again on the current state and stores the update.
            loop = asyncio.get_running_loop()
            update = None
            if not header.skip and not view.check_push(header.worker_id, header.round, header.computed_at_version):
                update = await loop.run_in_executor(self._decode_pool, decode_push, header, index_raw, value_raw,
                                                    view.num_params or 0,
                                                    shards.push_context(self.shard, view.total_params))
            del index_raw, value_raw  # the update views them; a duplicate's bytes go now
            result = await self._on_core(lambda: self._push_on_core_thread(header, update))
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
                            durable_version=durable, snapshot_version=snapshot, received_ns=received_ns)

    async def _receive_push(self, request_iterator, open_stream: ExitStack
                            ) -> tuple[pb.PushHeader, bytearray, bytearray]:
        """The header and the payload, each chunk appended to one buffer as it arrives: a
        push costs its own size once (plus one chunk), not its chunks and then their join."""
        header: pb.PushHeader | None = None
        index_raw = bytearray()
        value_raw = bytearray()
        received = 0
        # A push can never legitimately exceed 8 bytes per parameter (+ one empty chunk).
        limit = 8 * (self.view.num_params or 0)
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
        result = self._core.push(header.worker_id, header.round, header.computed_at_version, update)
        self._publish(result.closed)
        return result

    def _publish(self, closed: tuple[ClosedRound, ...]) -> None:
        """On the core thread: encode closed rounds here (off the loop) and hand them to the loop in order."""
        if not closed:
            return
        # The view first: a follower that receives the round's delta may ask for the next
        # version at once, and the loop must already know it.
        self.view = self._core.view()
        if self.checkpoints is not None:
            self.checkpoints.after_close(closed)
        encoded = [(c, encode_round(c)) for c in closed]
        followers = self._encode_for_compressed_followers(closed)
        assert self._loop is not None
        # Two hops: the acknowledgement of the push that closed the round goes out before the
        # round's delta. Otherwise a worker's push time includes downloading the delta, and
        # the controller reads half the link's bandwidth (measured by `wanps bench estimate`).
        # Publications stay in order: each hop is FIFO.
        self._loop.call_soon_threadsafe(self._loop.call_soon, self._after_close, encoded, followers)

    def _encode_for_compressed_followers(self, closed: tuple[ClosedRound, ...]) -> dict[int, FollowerBatch]:
        """On the core thread, after the rounds were applied: each compressed follower's own
        rounds. The model is at the last round's version, so that round carries the follower's
        top-k of its residual and the earlier ones of the batch (several rounds close in one
        call only when pushes ran ahead) carry nothing: their deltas stay in the residual.
        A draining residual that the round left equal to the model is dropped here, and its
        stream handed back to the shared rounds from the next one."""
        if not self._downlinks:
            return {}
        model = self._core.model
        last = closed[-1]
        empty = codec.Update(values=torch.empty(0), indices=torch.empty(0, dtype=torch.int32))
        encoded: dict[int, FollowerBatch] = {}
        for stream_id, residual in list(self._downlinks.items()):
            fraction = residual.fraction
            rounds = [(c.round, encode_follower_round(c, empty, None, fraction)) for c in closed[:-1]]
            update = residual.step(model)
            checksum = residual.checksum() if last.model_checksum is not None else None
            rounds.append((last.round, encode_follower_round(last, update, checksum, fraction)))
            hand_back = None
            if residual.drained(model):
                del self._downlinks[stream_id]
                self._report_downlinks()
                hand_back = last.version
                log.info("a drained downlink residual went: its stream follows the shared rounds from round %d",
                         hand_back)
            encoded[stream_id] = FollowerBatch(rounds, hand_back)
        return encoded

    def _open_downlink(self, stream_id: int, rounds: FollowerRounds, fraction: float) -> int:
        """On the core thread: a compressed follower's residual, zero (its replica is the model
        at the core's version now: it followed the shared rounds up to here). Its stream
        switches to its own rounds from that version. Returns it."""
        if len(self._downlinks) >= self.max_compressed_followers:
            raise ResourceExhausted(f"this server already holds {len(self._downlinks)} compressed downlinks, its "
                                    f"limit (--max-compressed-followers {self.max_compressed_followers}; each "
                                    "costs 4 bytes per parameter)")
        model = self._core.model
        if model is None:
            raise FailedPrecondition("the model is not seeded yet: pull it before asking for a compressed downlink")
        if rounds.ended:
            raise FailedPrecondition("the Updates stream ended")
        self._downlinks[stream_id] = DownlinkResidual(model, fraction)
        version = self._core.version
        # The same two FIFO hops as the rounds (_publish): the start sits before the round that closes next.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.call_soon, rounds.start, version)
        self._report_downlinks()
        return version

    def _set_downlink(self, stream_id: int, rounds: FollowerRounds, fraction: float) -> tuple[int, str]:
        """On the core thread (SetDownlink): open, retune or drain the stream's residual from
        the next round that closes. Returns the version it holds after, and what changed."""
        residual = self._downlinks.get(stream_id)
        if residual is not None:
            residual.retune(fraction or None)  # 0: drain
            return self._core.version, f"fraction {fraction:g}" if fraction else "uncompressed (draining its residual)"
        if fraction:
            return self._open_downlink(stream_id, rounds, fraction), f"fraction {fraction:g}"
        return self._core.version, "uncompressed already"

    def downlink_mirrors(self) -> dict[int, torch.Tensor]:
        """For tests and tools, from any thread but the event loop (it waits for the core
        thread): a copy of each compressed follower's replica as the server mirrors it."""
        return self._core_thread.submit(lambda: {i: r.mirror.clone() for i, r in self._downlinks.items()}).result()

    def _close_downlink(self, stream_id: int) -> None:
        """On the core thread: the stream ended; its residual goes (a new stream pulls first)."""
        if self._downlinks.pop(stream_id, None) is not None:
            self._report_downlinks()

    def _after_close(self, encoded: list[tuple[ClosedRound, tuple[pb.DeltaChunk, ...]]],
                     followers: dict[int, FollowerBatch]) -> None:
        # The moment the rounds go to the streams, stamped on every chunk (DeltaChunk.sent_ns):
        # followers time their downlink from it (worker/one_way.py).
        sent_ns = time.monotonic_ns()
        for stream_id, batch in followers.items():
            queue = self._downlink_rounds.get(stream_id)
            if queue is not None:
                for round_, chunks in batch.rounds:
                    stamp_sent(chunks, sent_ns)
                    queue.publish(round_, chunks)
                if batch.hand_back is not None:
                    queue.hand_back(batch.hand_back)
        now = time.monotonic()
        for closed, chunks in encoded:
            stamp_sent(chunks, sent_ns)
            self.history.publish(closed.round, chunks)
            self.metrics.rounds_closed.inc()
            for staleness in closed.staleness:
                self.metrics.staleness.observe(staleness)
            self.metrics.delta_elements.set(closed.delta.count)
            if self._last_close_time is not None:
                self.metrics.round_duration.observe(now - self._last_close_time)
            self._last_close_time = now
        self.metrics.history_bytes.set(self.history.bytes)
        self.metrics.model_version.set(encoded[-1][0].version)
        self.metrics.members.set(self.view.expected_now)

    async def Updates(self, request: pb.UpdatesRequest, context) -> AsyncIterator[pb.DeltaChunk]:
        async with mapped_errors(context):
            view = self.view
            view.authenticate(request.worker_id, request.member_secret)
            self._touch_soon(request.worker_id)
            if request.from_version > view.version:
                raise FailedPrecondition(
                    f"from_version {request.from_version} is ahead of the server's version {view.version}"
                )
            member = request.worker_id in view.members  # a worker's stream pins what it has yet to send
            with self._streams.open(request.worker_id, "Updates"):
                if request.downlink_delta or request.stream_key:
                    await self._follow_compressed(request, member, context)
                    return
                async for chunk in self.history.follow(request.from_version, pin=member):
                    self.metrics.sent_bytes.inc(len(chunk.indices) + len(chunk.values))
                    await write_message(context, chunk)
        return
        yield  # noqa: an async generator for gRPC and the interceptors; the chunks go out by write_message

    async def _follow_compressed(self, request: pb.UpdatesRequest, member: bool, context) -> None:
        """A stream that is compressed, or may become so (`stream_key`, SetDownlink), alternates
        between the shared history's rounds and its own (server/downlink.py). Shared until its
        residual opens at version v (the follower's replica is the model there exactly), then
        its own rounds, encoded on the core thread as they close, until a drained residual
        hands it back to the shared rounds (the replica is the model again), and so on. Each
        switch reaches the stream's queue in order with the rounds (FollowerRounds)."""
        fraction = request.downlink_delta
        if fraction:
            try:
                check_fraction(fraction)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
        # The queue is in place before the core thread knows the stream: a round that closes
        # right after the residual is made finds it; the `finally` drops both, however it ends.
        stream_id = next(self._downlink_ids)
        rounds = self._downlink_rounds[stream_id] = FollowerRounds(self._history_rounds)
        key = (request.worker_id, request.stream_key)
        if request.stream_key:
            self._keyed_streams[key] = (stream_id, rounds)
        try:
            if fraction:
                await self._on_core(lambda: self._open_downlink(stream_id, rounds, fraction))
            next_round = request.from_version
            while not rounds.closed:
                async with aclosing(self.history.follow(next_round, pin=member, until=rounds.own_from)) as shared:
                    async for chunk in shared:
                        own_from = rounds.own_from
                        if own_from is not None and chunk.round >= own_from:
                            break  # the stream's own rounds start here
                        self.metrics.sent_bytes.inc(len(chunk.indices) + len(chunk.values))
                        await write_message(context, chunk)
                        next_round = chunk.round + 1 if chunk.last else next_round
                if rounds.own_from is None:
                    return  # the history closed: the server is shutting down
                async for chunk in rounds.follow():
                    nbytes = len(chunk.indices) + len(chunk.values)
                    self.metrics.sent_bytes.inc(nbytes)
                    self.metrics.compressed_downlink_bytes.inc(nbytes)
                    await write_message(context, chunk)
                if rounds.handed_back_at is None:
                    return  # closed
                next_round = rounds.handed_back_at
        finally:
            rounds.ended = True
            self._downlink_rounds.pop(stream_id, None)
            if self._keyed_streams.get(key, (None,))[0] == stream_id:
                del self._keyed_streams[key]
            try:  # not awaited: a cancelled stream's handler ends now; the core thread drops the residual next
                self._core_thread.submit(lambda: self._close_downlink(stream_id))
            except RuntimeError:  # shutting down: the residuals go with the process
                pass

    async def SetDownlink(self, request: pb.SetDownlinkRequest, context) -> pb.SetDownlinkReply:
        """Change the downlink compression of one of the caller's open streams from the next
        round that closes (0: off, drained first); see `_follow_compressed`."""
        async with mapped_errors(context):
            self.view.authenticate(request.worker_id, request.member_secret)
            fraction = request.downlink_delta
            if fraction:  # 0 is off; NaN and anything outside [0, 1] are refused
                try:
                    check_fraction(fraction)
                except ValueError as exc:
                    raise InvalidArgument(f"{exc} (or 0: off)") from None
            found = self._keyed_streams.get((request.worker_id, request.stream_key)) if request.stream_key else None
            if found is None:
                raise FailedPrecondition(f"worker {request.worker_id} has no Updates stream open under stream_key "
                                         f"{request.stream_key}")
            stream_id, rounds = found
            version, change = await self._on_core(lambda: self._set_downlink(stream_id, rounds, fraction))
            log.info("worker %d: downlink %s from version %d", request.worker_id, change, version)
            return pb.SetDownlinkReply(version=version)

    def _report_downlinks(self) -> None:
        """On the core thread, after a residual came or went."""
        self.metrics.compressed_followers.set(len(self._downlinks))
        self.metrics.downlink_residual_bytes.set(sum(r.nbytes for r in self._downlinks.values()))

    async def Ping(self, request: pb.PingRequest, context) -> pb.PingReply:
        # Padding lets workers probe bandwidth (the request's: the uplink; the reply's, of
        # `reply_bytes`: the downlink); both are bounded so a ping stays cheap.
        received_ns = time.monotonic_ns()  # one-way timing (PingReply.received_ns)
        async with mapped_errors(context):
            if len(request.padding) > MAX_PING_PADDING:
                raise ResourceExhausted(f"ping padding is limited to {MAX_PING_PADDING} bytes")
            if request.reply_bytes > MAX_PROBE_BYTES:
                raise InvalidArgument(f"reply_bytes {request.reply_bytes} is above the limit of {MAX_PROBE_BYTES} "
                                      "bytes of a downlink probe")
            if request.worker_id != ANONYMOUS_PING_ID:
                # A member's heartbeat: NOT_FOUND tells a forgotten worker to join again.
                self.view.authenticate(request.worker_id, request.member_secret)
                self._touch_soon(request.worker_id)
        if request.padding:
            self.metrics.received_bytes.inc(len(request.padding))
            self.metrics.probe_bytes.labels(direction="up").inc(len(request.padding))
        if request.reply_bytes:
            self.metrics.sent_bytes.inc(request.reply_bytes)
            self.metrics.probe_bytes.labels(direction="down").inc(request.reply_bytes)
        return pb.PingReply(sent_unix_ns=request.sent_unix_ns, version=self.view.version,
                            padding=bytes(request.reply_bytes), shard_index=self.shard.index,
                            shard_count=self.shard.count, received_ns=received_ns)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveReply:
        async with mapped_errors(context):
            self.view.authenticate(request.worker_id, request.member_secret)
            last_round, closed = await self._on_core(lambda: self._leave_on_core_thread(request.worker_id))
            self.metrics.members.set(self.view.expected_now)
            log.info("leave: worker %d after round %d", request.worker_id, last_round)
            return pb.LeaveReply(last_round=max(last_round, 0))

    async def Resume(self, request: pb.ResumeRequest, context) -> pb.ResumeReply:
        async with mapped_errors(context):
            view = self.view
            if view.is_known(request.worker_id):  # an unknown id is told member = false: it joins again
                view.authenticate(request.worker_id, request.member_secret)
            info = await self._on_core(lambda: self._core.resume_info(request.worker_id))
            self.metrics.resumes.labels(outcome="member" if info.member else "gone").inc()
            log.info("resume: worker %d %s at version %d, holding rounds %s", request.worker_id,
                     "is a member" if info.member else "is no longer a member", info.version, list(info.held_rounds))
            return pb.ResumeReply(member=info.member, version=info.version, model_checksum=info.model_checksum,
                                  held_rounds=info.held_rounds, first_round=info.first_round,
                                  incarnation=self.incarnation)

    def _leave_on_core_thread(self, worker_id: int) -> tuple[int, tuple[ClosedRound, ...]]:
        last_round, closed = self._core.leave(worker_id)
        self._publish(closed)
        if not self._core.members:
            self._release_when_published()
        return last_round, closed

    def _release_when_published(self) -> None:
        """On the core thread, once no member is left: after what is being published, drop
        the history (nobody follows it: a worker that joins pulls the model) and hand freed
        memory back to the system, so an idle server holds its model and little else."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.call_soon, self._release_if_idle)

    def _release_if_idle(self) -> None:
        if self.view.members:
            return  # someone joined meanwhile
        self.metrics.members.set(0)
        self.history.release()
        self.metrics.history_bytes.set(0)
        if self._snapshot is not None and self._snapshot[3] == 0:
            self._snapshot = None
        try:
            future = self._core_thread.submit(release_free_memory)
        except RuntimeError:  # shutting down: the process is about to end anyway
            return
        future.add_done_callback(self._report_background_failure("release"))


def decode_push(header: pb.PushHeader, index_raw: bytes | bytearray, value_raw: bytes | bytearray, num_params: int,
                context: str = "") -> codec.Update:
    """Validate and decode a received push (zero-copy: the update's tensors view the buffers).
    `context` is said after a refusal's reason (on a shard: the range the indices are local to)."""
    try:
        return codec.decode_update(header.codec, header.value_dtype, header.count, index_raw, value_raw, num_params,
                                   block_start=header.block_start)
    except WireError as exc:
        if not context:
            raise
        raise WireError(f"{exc} ({context})") from None


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
    core = restore_core(state, config.core_config(), where=config.resume_dir)
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
                                     sweep_interval_s=config.sweep_interval_s(), history_mb=config.history_mb,
                                     check_core_thread=config.check_core_thread,
                                     core_threads=config.core_threads,
                                     max_compressed_followers=config.max_compressed_followers)
    running = await start_grpc_service(
        service, pb_grpc.add_ParameterServerServicer_to_server, pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name,
        config, registry)
    service.start_background()
    service.metrics.model_version.set(service.view.version)
    service.metrics.shard_index.set(config.shard_index)
    service.metrics.shard_count.set(config.shard_count)
    log.info("parameter server on %s:%d (metrics %s), %stau_max %d, min workers %d, %s",
             config.host, running.port, running.metrics_port,
             f"shard {config.shard_index}/{config.shard_count}, " if config.shard_count > 1 else "",
             config.tau_max, config.min_workers, config.security.describe())
    return running
