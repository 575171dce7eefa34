"""A worker's connections to the server and the controller, on a background event loop.

`WorkerSession` owns one thread running an asyncio (uvloop) loop with grpc.aio channels.
The training thread calls its blocking methods; pushes return futures, so up to tau
pushes stay in flight while the next gradients are computed. Deltas of closed rounds
arrive on `deltas` (a thread-safe queue) and are applied by the training thread only at
step boundaries. Link samples (push bytes and times, ping RTTs, compute times) are
batched to the controller once a second.
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
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from wanps.controller.decisions import Decision
from wanps.deploy.auth import ClientSecurity, aio_channel
from wanps.deploy.runtime import event_loop_factory
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


class ReplicaDiverged(RuntimeError):
    """The replica's checksum differs from the server's at the same version."""


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
        self._closed = False
        self._loop = event_loop_factory(use_uvloop)()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wanps-worker-io", daemon=True)
        self._thread.start()
        self._security, self._max_message_bytes = security, max_message_bytes
        self._server_channel = self._call(lambda: self._make_channel(server))
        self._server = pb_grpc.ParameterServerStub(self._server_channel)
        self._controller_channel = None
        self._controller = None
        if controller:
            self._controller_channel = self._call(lambda: self._make_channel(controller))
            self._controller = pb_grpc.ControllerStub(self._controller_channel)

    # ------------------------------------------------------------------ plumbing

    async def _make_channel(self, address: str) -> grpc.aio.Channel:
        # Token and TLS as configured (deploy/auth.py); called on the I/O loop.
        return aio_channel(address, self._security, max_message_bytes=self._max_message_bytes)

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
        reply = self._call(lambda: self._server.Leave(pb.LeaveRequest(worker_id=self.worker_id), timeout=timeout))
        return reply.last_round

    # ------------------------------------------------------------------ background streams

    def follow_updates(self, from_version: int) -> None:
        """Start receiving closed rounds' deltas after `from_version` into `self.deltas`."""
        self._spawn(lambda: self._follow_updates(from_version))

    async def _follow_updates(self, from_version: int) -> None:
        request = pb.UpdatesRequest(worker_id=self.worker_id, from_version=from_version)
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
        except asyncio.CancelledError:
            raise
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
                    decision = Decision(message.decision_id, message.from_round, message.tau, message.delta,
                                        message.policy, message.reason, dict(message.worker_delta),
                                        message.predicted_iter_s)
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
            await asyncio.sleep(REPORT_INTERVAL_S)
            await self._flush_samples()

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

    def _sample(self, kind: int, nbytes: int, seconds: float, round_: int, grad_norm: float = 0.0) -> None:
        self._samples.append(pb.LinkSample(kind=kind, bytes=nbytes, seconds=seconds, round=round_,
                                           unix_ns=time.time_ns(), grad_norm=grad_norm))

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
        """Send one round's update (None = skip record). Encoding happens on the calling thread."""
        header = pb.PushHeader(worker_id=self.worker_id, round=round_, computed_at_version=computed_at_version)
        messages, nbytes = codec.push_messages(header, update)
        self._count_sent(nbytes)
        if self.metrics is not None:
            self.metrics.record_push(round_, computed_at_version, None if update is None else update.count,
                                     self.num_params or 0)
        return self._submit(lambda: self._push(messages, nbytes, round_))

    async def _push(self, messages: list[pb.PushMessage], nbytes: int, round_: int) -> pb.PushReply:
        started = time.monotonic()
        reply = await self._server.Push(iter(messages), wait_for_ready=True)
        seconds = time.monotonic() - started
        self._sample(pb.LinkSample.KIND_PUSH, nbytes, seconds, round_)
        if self.metrics is not None:
            self.metrics.push_seconds.observe(seconds)
        return reply

    def _count_sent(self, nbytes: int) -> None:
        self.bytes_up += nbytes
        if self.metrics is not None:
            self.metrics.sent_bytes.inc(nbytes)

    def _count_received(self, nbytes: int) -> None:
        self.bytes_down += nbytes
        if self.metrics is not None:
            self.metrics.received_bytes.inc(nbytes)

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
