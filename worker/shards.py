"""A worker over a key-range sharded cluster: one `WorkerSession` per shard behind one façade.

`Optimizer(model, server="A,B,C")` and `Observer(..., server=[A, B, C])` take the shards'
addresses in shard order (docs/architecture.md, "Beyond one server"). With one address
nothing here is used: `open_session` returns the plain `WorkerSession`, and the wire is
exactly the single server's.

With N addresses, `ShardedSession` holds one `WorkerSession` per shard, each an ordinary
worker of an ordinary server for the model of its range (proto/shards.py):
- joining: first a Ping to every shard (it says which shard it is), so a list in the wrong
  order or of another length is refused (`ShardOrderError`) before any shard is joined;
  then a Join to every shard in parallel, carrying the worker's view (index, N, whole
  size); a refusal by one shard leaves the shards already joined. Each shard gives its own
  member id; the worker's identity (what the controller, the decisions and the logs know)
  is its id on shard 0, the lead;
- seeding and pulling go shard by shard in parallel; the replica is one flat vector and each
  shard's part of it a view (`ShardedReplica`), advanced by that shard's deltas alone;
- a push is split by range (one searchsorted, indices made local); a shard with nothing of
  it gets an empty push, not a skip (a skip means "reuse my last update"); a random block
  that crosses a boundary is split into two blocks; a skip is a skip on every shard;
- every shard's update stream is followed; the worker's version is the least of the shards'
  versions (tau gating and `computed_at_version` use it); round numbers are the same on
  every shard (every worker pushes every round to every shard), so decisions, buffer syncs
  and DEF's final round fall in the same round everywhere;
- a worker joining late may be expected from different rounds by different shards (each
  starts it at the first round nobody has pushed there): it starts at the earliest, and a
  shard's part of a push for a round before that shard's first is put back into error
  feedback (as a late push is), never sent;
- a lost shard is recovered alone, exactly as a single server (worker/recovery.py, on that
  shard's session and replica); if it no longer knows the worker (its lease ran out, or it
  resumed from a checkpoint older than the join) the worker joins it again and sends it
  empty pushes for the rounds it now expects but were pushed before, so that shard's rounds
  stay aligned with the others';
- the controller hears one worker: pushes and downloads of a round are summed over the
  shards (bytes, elements) and timed by the slowest shard; pings to each shard are samples of
  the worker's link.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from wanps.proto import wanps_pb2 as pb
from wanps.proto.checksum import checksum_part, combine_checksums
from wanps.proto.codec import Update
from wanps.proto.decisions import Decision
from wanps.proto.shards import describe_shard, shard_ranges
from wanps.proto.structure import TensorSpec
from wanps.rpc.auth import ClientSecurity
from wanps.rpc.options import DEFAULT_MAX_MESSAGE_BYTES
from wanps.worker.metrics import WorkerMetrics
from wanps.worker.recovery import ConnectionLost, Recovery
from wanps.worker.replica import Replica, apply_until
from wanps.worker.session import PulledModel, ReceivedDelta, WorkerSession
from wanps.worker.telemetry import Telemetry

log = logging.getLogger("wanps.worker")
T = TypeVar("T")

# Rounds whose per-shard push or download samples may wait for their other shards at once;
# beyond that the oldest is dropped (a shard that never reports a round, e.g. one pulled past it).
PENDING_SAMPLE_ROUNDS = 64


class ShardOrderError(ValueError):
    """The addresses given are not every shard of the cluster, in shard order."""


def server_addresses(server: str | Sequence[str]) -> list[str]:
    """`HOST:PORT`, `A,B,C` or a list -> the addresses, in shard order."""
    items = server.split(",") if isinstance(server, str) else list(server)
    addresses = [str(item).strip() for item in items]
    if not addresses or not all(addresses):
        raise ValueError(f"server {server!r}: expected HOST:PORT, or every shard's HOST:PORT in shard order, "
                         "separated by commas")
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        raise ValueError(f"server {server!r} lists {', '.join(repeated)} more than once: "
                         "each shard has its own address")
    return addresses


def open_session(server: str | Sequence[str], controller: str | None = None, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, use_uvloop: bool = True,
                 security: ClientSecurity | None = None, metrics: WorkerMetrics | None = None,
                 downlink_delta: float | None = None) -> WorkerSession | ShardedSession:
    """The session for one server (a `WorkerSession`, as ever) or for N shards. `downlink_delta`
    (WorkerSession's) goes to every shard's stream: each shard keeps its own range's residual."""
    addresses = server_addresses(server)
    if len(addresses) == 1:
        return WorkerSession(addresses[0], controller, max_message_bytes=max_message_bytes, use_uvloop=use_uvloop,
                             security=security, metrics=metrics, downlink_delta=downlink_delta)
    return ShardedSession(addresses, controller, max_message_bytes=max_message_bytes, use_uvloop=use_uvloop,
                          security=security, metrics=metrics, downlink_delta=downlink_delta)


def replica_for(session: WorkerSession | ShardedSession, values: torch.Tensor, pulled: PulledModel
                ) -> Replica | ShardedReplica:
    """The replica over `values` (just filled from `pulled`) that `session`'s deltas advance."""
    if isinstance(session, ShardedSession):
        return session.bind_replica(values, pulled)
    return Replica(values, pulled.version)


# ---------------------------------------------------------------------------- updates over ranges


def _empty_like(update: Update) -> Update:
    return Update(values=update.values[:0], indices=torch.empty(0, dtype=torch.int32, device=update.values.device))


def split_update(update: Update | None, ranges: Sequence[tuple[int, int]]) -> list[Update | None]:
    """One push over the whole vector as one push per shard, indices local to each range.

    A skip (None) is a skip on every shard; a shard with none of the update's elements gets an
    empty update (a push of nothing, not a skip). Sparse: one searchsorted of the range starts
    over the sorted indices, then slices (the values are not copied; the indices of every
    shard but the first are shifted, a k-sized operation on the update's device). Random block:
    the block's part in each range, a block again. Dense: each range's slice."""
    if update is None:
        return [None] * len(ranges)
    if update.indices is None:
        return [Update(values=update.values[start:stop], indices=None) for start, stop in ranges]
    if update.block_start is not None:
        block_start, block_stop = update.block_start, update.block_start + update.count
        pieces: list[Update | None] = []
        for start, stop in ranges:
            low, high = max(start, block_start), min(stop, block_stop)
            if low >= high:
                pieces.append(_empty_like(update))
                continue
            a, b = low - block_start, high - block_start
            pieces.append(Update(values=update.values[a:b], indices=update.indices[a:b] - start,
                                 block_start=low - start))
        return pieces
    indices = update.indices
    starts = torch.tensor([start for start, _ in ranges[1:]], dtype=indices.dtype, device=indices.device)
    cuts = [0, *torch.searchsorted(indices, starts).tolist(), update.count]
    return [Update(values=update.values[a:b], indices=indices[a:b] - start if start else indices[a:b])
            for (start, _), a, b in zip(ranges, cuts, cuts[1:])]


def to_global(update: Update, start: int) -> Update:
    """A shard's update or delta (indices local to a range starting at `start`) over the whole
    vector; a dense one becomes sparse over its range."""
    if update.indices is None:
        indices = torch.arange(start, start + update.count, dtype=torch.int32, device=update.values.device)
        return Update(values=update.values, indices=indices)
    if start == 0:
        return update
    block = None if update.block_start is None else update.block_start + start
    return Update(values=update.values, indices=update.indices + start, block_start=block)


def join_pieces(pieces: Sequence[tuple[int, Update]], total: int) -> Update:
    """Shard deltas of one round, (range start, delta) in shard order, as one delta of the vector."""
    if sum(u.count for _, u in pieces) == total and all(u.indices is None for _, u in pieces):
        return Update(values=torch.cat([u.values for _, u in pieces]), indices=None)
    parts = [to_global(u, start) for start, u in pieces]
    return Update(values=torch.cat([u.values for u in parts]),
                  indices=torch.cat([u.indices.to(torch.int32) for u in parts]))  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- deltas of every shard


class _ShardQueue(queue.Queue):
    """One shard's received deltas (a WorkerSession's `deltas`); a put wakes the reader of all of them."""

    def __init__(self, wake: threading.Condition) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with self._wake:
            self._wake.notify_all()


class ShardDeltas:
    """What every shard's stream received, read as `(shard index, item)`: each shard's items in
    their order (shards interleave in any order). One reader: the training thread."""

    def __init__(self, count: int) -> None:
        self._wake = threading.Condition()
        self.queues = [_ShardQueue(self._wake) for _ in range(count)]
        self._next = 0  # round robin, so no shard's deltas wait behind another's

    def get_nowait(self) -> tuple[int, Any]:
        count = len(self.queues)
        for step in range(count):
            index = (self._next + step) % count
            try:
                item = self.queues[index].get_nowait()
            except queue.Empty:
                continue
            self._next = (index + 1) % count
            return index, item
        raise queue.Empty

    def get(self, block: bool = True, timeout: float | None = None) -> tuple[int, Any]:
        if not block:
            return self.get_nowait()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake:  # a put notifies under this lock after queueing: no wake-up is missed
            while True:
                try:
                    return self.get_nowait()
                except queue.Empty:
                    pass
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                self._wake.wait(remaining)

    def clear(self) -> None:
        for shard_queue in self.queues:
            while True:
                try:
                    shard_queue.get_nowait()
                except queue.Empty:
                    break


class ShardedReplica:
    """The flat replica of a sharded cluster: one `Replica` per shard over its range (a view of
    `values`), each advanced only by that shard's deltas, in order, checked by that shard's
    checksum. The worker's `version` is the least of the shards' versions.

    `on_apply` and `applied` (as on `Replica`) see each round once, when every shard has
    applied it: its deltas joined into one delta of the whole vector (global indices)."""

    def __init__(self, values: torch.Tensor, ranges: Sequence[tuple[int, int]], versions: Sequence[int]) -> None:
        self.values = values
        self.ranges = list(ranges)
        self.shards = [Replica(values[start:stop], version) for (start, stop), version in zip(ranges, versions)]
        self.applied: list[ReceivedDelta] | None = None
        self.on_apply: Callable[[ReceivedDelta], None] | None = None
        # Shards whose connection broke (a ConnectionLost came from their stream) and are not
        # recovered yet: ShardedSession.recover recovers these.
        self.lost: set[int] = set()
        # Shards' deltas of rounds not yet applied by every shard, for on_apply/applied (at
        # most tau_max + 1 rounds: no shard gets further ahead of the slowest one).
        self._pieces: dict[int, dict[int, ReceivedDelta]] = {}
        self._announced = self.version  # rounds below it went to on_apply
        self.blocked_s = 0.0  # as Replica.blocked_s

    @property
    def version(self) -> int:
        return min(shard.version for shard in self.shards)

    def apply(self, tagged: tuple[int, ReceivedDelta | BaseException]) -> None:
        index, item = tagged
        if isinstance(item, ConnectionLost):
            self.lost.add(index)
            raise item  # the owner recovers that shard (ShardedSession.recover) and waits again
        self.shards[index].apply(item)
        if self.on_apply is None and self.applied is None:
            return
        assert isinstance(item, ReceivedDelta)
        if item.round >= self._announced:
            self._pieces.setdefault(item.round, {})[index] = item
        self._announce()

    def _announce(self) -> None:
        version = self.version
        while self._announced < version:
            round_ = self._announced
            pieces = self._pieces.pop(round_, {})
            self._announced += 1
            if not pieces:
                continue  # every shard's part of this round came in a pull
            joined = ReceivedDelta(
                round=round_, version=round_ + 1,
                delta=join_pieces([(self.ranges[i][0], pieces[i].delta) for i in sorted(pieces)], self.values.numel()),
                model_checksum=None, nbytes=sum(p.nbytes for p in pieces.values()),
                members=max(p.members for p in pieces.values()))
            if self.applied is not None:
                self.applied.append(joined)
            if self.on_apply is not None:
                self.on_apply(joined)

    def catch_up(self, deltas: ShardDeltas, min_version: int, deadline: float | None = None,
                 on_idle: Callable[[], None] | None = None) -> int:
        """Apply every delta already received; block (until `deadline`) while below min_version."""
        self._catch_up(deltas, lambda: self.version >= min_version, deadline, on_idle)
        return self.version

    def catch_up_shard(self, deltas: ShardDeltas, index: int, min_version: int) -> None:
        """Apply deltas (of every shard, as they come) until shard `index`'s part reaches min_version."""
        self._catch_up(deltas, lambda: self.shards[index].version >= min_version, None, None)

    def _catch_up(self, deltas: ShardDeltas, reached: Callable[[], bool], deadline: float | None,
                  on_idle: Callable[[], None] | None) -> None:
        self.blocked_s += apply_until(deltas, reached, self.apply, deadline, on_idle)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- what the controller hears


def _summed(total: pb.LinkSample | None, sample: pb.LinkSample) -> pb.LinkSample:
    """One shard's transfer added to a round's: bytes, elements and timed bytes summed; the
    time (and its queued part) of the slowest shard, since the round's transfer over the
    worker's link ends with its last shard."""
    if total is None:
        return sample
    slowest = sample if sample.seconds > total.seconds else total
    return pb.LinkSample(kind=total.kind, round=total.round, unix_ns=max(total.unix_ns, sample.unix_ns),
                         bytes=total.bytes + sample.bytes, elements=total.elements + sample.elements,
                         timed_bytes=total.timed_bytes + sample.timed_bytes, direction=total.direction,
                         seconds=slowest.seconds, queued_s=slowest.queued_s,
                         # one-way times too: the round's transfer is over when its slowest part is
                         transfer_s=max(total.transfer_s, sample.transfer_s) if total.transfer_s and sample.transfer_s
                         else 0.0)


class _RoundSamples:
    """Push and download samples of a round, from every shard, reported as one sample of the
    worker's link: bytes and elements summed, seconds of the slowest shard (the round's
    transfer over the worker's link ends with its last shard). Other samples pass through.
    Shards call `add` from their I/O threads."""

    def __init__(self, reporter: Telemetry, shards: int, metrics: WorkerMetrics | None) -> None:
        self._reporter = reporter
        self._shards = shards
        self._metrics = metrics
        self._lock = threading.Lock()
        # (kind, round) -> [shards still to report, bytes, seconds, elements]
        self._pending: OrderedDict[tuple[int, int], list] = OrderedDict()

    def expect(self, kind: int, round_: int, shards: int) -> None:
        with self._lock:
            self._pending[(kind, round_)] = [shards, None]
            self._bound()

    def add(self, sample: pb.LinkSample) -> None:
        kind, round_ = sample.kind, sample.round
        if kind not in (pb.LinkSample.KIND_PUSH, pb.LinkSample.KIND_DOWNLOAD):
            if kind == pb.LinkSample.KIND_PING:  # each shard's ping or probe: a sample of the worker's link, now
                sample.round = self._reporter.reported_round
            self._reporter.keep_soon(sample)
            return
        with self._lock:
            entry = self._pending.get((kind, round_))
            if entry is None:
                if kind == pb.LinkSample.KIND_PUSH:
                    entry = None  # a push replayed to one shard after a recovery: a sample of its own
                else:
                    entry = self._pending[(kind, round_)] = [self._shards, None]
                    self._bound()
            if entry is not None:
                entry[0] -= 1
                entry[1] = _summed(entry[1], sample)
                if entry[0] > 0:
                    return
                del self._pending[(kind, round_)]
                sample = entry[1]
        if kind == pb.LinkSample.KIND_PUSH and self._metrics is not None:
            self._metrics.push_seconds.observe(sample.seconds)
        sample.grad_norm = 0.0
        self._reporter.keep_soon(sample)

    def _bound(self) -> None:
        while len(self._pending) > 2 * PENDING_SAMPLE_ROUNDS:
            self._pending.popitem(last=False)


class _Uncounted:
    def set(self, *_: Any) -> None:
        pass

    def observe(self, *_: Any) -> None:
        pass


class _ShardMetrics:
    """What one shard's session counts into the worker's metrics: the bytes it moves. The push
    itself (once per round, whole), its round trip (the slowest shard's) and the worker id are
    the ShardedSession's to record."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.sent_bytes = metrics.sent_bytes
        self.received_bytes = metrics.received_bytes
        self.push_seconds = _Uncounted()
        self.worker_id = _Uncounted()

    def record_push(self, *_: Any) -> None:
        pass


# ---------------------------------------------------------------------------- the session


@dataclass(frozen=True)
class ShardedPull(PulledModel):
    """A model pulled shard by shard: `values` is the whole vector, each range at its shard's
    version (`versions`); `version` is the least of them; `model_checksum` is the checksum of
    `values` as assembled (from each range's checksum_part at its offset)."""

    versions: tuple[int, ...] = ()
    first_rounds: tuple[int, ...] = ()


class ShardedSession:
    """The `WorkerSession` façade over N shards (see the module)."""

    def __init__(self, servers: Sequence[str], controller: str | None = None, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, use_uvloop: bool = True,
                 security: ClientSecurity | None = None, metrics: WorkerMetrics | None = None,
                 downlink_delta: float | None = None) -> None:
        self.addresses = list(servers)
        self.server_address = ",".join(self.addresses)
        self.controller_address = controller
        self.metrics = metrics
        self.deltas = ShardDeltas(len(self.addresses))
        self.shards: list[WorkerSession] = []
        shard_metrics = _ShardMetrics(metrics) if metrics is not None else None
        try:
            for index, address in enumerate(self.addresses):
                # Only the lead (shard 0) talks to the controller: one worker, one identity.
                self.shards.append(WorkerSession(address, controller if index == 0 else None,
                                                 max_message_bytes=max_message_bytes, use_uvloop=use_uvloop,
                                                 security=security, metrics=shard_metrics,
                                                 downlink_delta=downlink_delta))
        except BaseException:
            for shard in self.shards:
                shard.close()
            raise
        self.telemetry = self.shards[0].telemetry  # the one that reports
        self._samples = _RoundSamples(self.telemetry, len(self.shards), metrics)
        for shard, shard_queue in zip(self.shards, self.deltas.queues):
            shard.deltas = shard_queue
            shard.telemetry.forward = self._samples.add
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self.shards), thread_name_prefix="wanps-shards")
        self.ranges: list[tuple[int, int]] = []
        self.num_params: int | None = None
        self.trainable_params: int | None = None
        self.first_rounds: list[int] = []  # the first round each shard expects from this worker
        self.replica: ShardedReplica | None = None
        self._must_seed: list[bool] = []
        self._observer = False
        self._unsent: list[Update] = []  # parts of pushes for rounds before their shard's first
        self._closed = False

    @property
    def lead(self) -> WorkerSession:
        return self.shards[0]

    @property
    def worker_id(self) -> int | None:
        return self.lead.worker_id

    @property
    def bytes_up(self) -> int:
        return sum(shard.bytes_up for shard in self.shards)

    @property
    def bytes_down(self) -> int:
        return sum(shard.bytes_down for shard in self.shards)

    @property
    def delta_bytes(self) -> int:
        return sum(shard.delta_bytes for shard in self.shards)

    @property
    def recoveries(self) -> int:
        return sum(shard.recoveries for shard in self.shards)

    def _each(self, call: Callable[[int, WorkerSession], T]) -> list[T]:
        """`call(index, shard)` for every shard at once; the results in shard order, or the
        first shard's error once every call has ended."""
        futures = [self._pool.submit(call, index, shard) for index, shard in enumerate(self.shards)]
        concurrent.futures.wait(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
        return [future.result() for future in futures]

    # ------------------------------------------------------------------ membership and model

    def first_join(self, num_params: int, fingerprint: bytes, name: str, timeout: float, *, observer: bool = False,
                   structure: Sequence[TensorSpec] = (), trainable_params: int | None = None) -> pb.JoinReply:
        """Join every shard (see the module); a JoinReply that speaks for the whole cluster:
        the lead's id, rank and world size, the least version, tau_max and first round."""
        count = len(self.shards)
        if num_params < count:
            raise ValueError(f"the model has {num_params} elements, fewer than the {count} shards it would be cut into")
        self.ranges = shard_ranges(num_params, count)
        self.num_params = num_params
        self.trainable_params = num_params if trainable_params is None else trainable_params
        self._observer = observer
        self._check_order(self._each(lambda _, shard: self._probe(shard, timeout)))
        for index, shard in enumerate(self.shards):
            shard.shard_view = (index, count, num_params)
        try:
            replies = self._each(lambda index, shard: shard.first_join(
                self.ranges[index][1] - self.ranges[index][0], fingerprint, name, timeout, observer=observer,
                structure=structure, trainable_params=self.trainable_params))
            for index, (reply, (start, stop)) in enumerate(zip(replies, self.ranges)):
                said = (reply.shard_index, reply.shard_count, reply.range_start, reply.range_stop)
                if said != (index, count, start, stop):
                    raise ShardOrderError(
                        f"{self.addresses[index]} joined this worker as shard {reply.shard_index}/{reply.shard_count} "
                        f"[{reply.range_start}, {reply.range_stop}), expected "
                        f"{describe_shard(index, count, num_params)}")
        except BaseException:
            self._leave_joined()
            raise
        self._must_seed = [reply.must_seed for reply in replies]
        self.first_rounds = [reply.first_round for reply in replies]
        lead = replies[0]
        self._show_worker_id()
        return pb.JoinReply(worker_id=lead.worker_id, rank=lead.rank, world_size=lead.world_size,
                            version=min(r.version for r in replies), must_seed=any(self._must_seed),
                            tau_max=min(r.tau_max for r in replies), first_round=min(self.first_rounds),
                            incarnation=lead.incarnation, shard_index=0, shard_count=count, range_start=0,
                            range_stop=num_params, total_params=num_params)

    def _show_worker_id(self) -> None:
        if self.metrics is not None and self.worker_id is not None:
            self.metrics.worker_id.set(self.worker_id)  # the lead's: the id the controller knows

    def _probe(self, shard: WorkerSession, timeout: float) -> pb.PingReply:
        try:
            return shard.probe(timeout)
        except grpc.aio.AioRpcError as exc:
            raise ConnectionError(f"no wanps server answered at {shard.server_address} within {timeout:g} s "
                                  f"({exc.code().name}: {exc.details()})") from None

    def _check_order(self, probes: Sequence[pb.PingReply]) -> None:
        count = len(self.shards)
        for position, (address, probe) in enumerate(zip(self.addresses, probes)):
            found = (probe.shard_index, max(probe.shard_count, 1))  # an unset count: a single server
            if found != (position, count):
                raise ShardOrderError(
                    f"the server at {address} is shard {found[0]}/{found[1]}, but it is listed as shard "
                    f"{position}/{count} (--server {self.server_address}): give every shard's address, "
                    f"in shard order")

    def _leave_joined(self) -> None:
        """After a failed join: leave the shards that accepted it, so nothing waits for this worker."""
        for shard in self.shards:
            if shard.worker_id is not None:
                try:
                    shard.leave(timeout=5.0)
                except grpc.aio.AioRpcError as exc:
                    log.warning("could not leave %s after a failed join: %s", shard.server_address, exc.code().name)

    def seed(self, model: torch.Tensor) -> pb.SeedModelReply:
        """Seed the shards that asked this worker to, each with its range, in parallel."""
        values = model.detach().reshape(-1)

        def seed_one(index: int, shard: WorkerSession) -> pb.SeedModelReply | None:
            if not self._must_seed[index]:
                return None
            start, stop = self.ranges[index]
            return shard.seed(values[start:stop])

        replies = self._each(seed_one)
        self._must_seed = [False] * len(self.shards)
        return next((reply for reply in replies if reply is not None), pb.SeedModelReply())

    def first_pull(self, timeout: float) -> ShardedPull:
        """The first pull of every shard, each retried as WorkerSession.first_pull retries it."""
        return self.pull(timeout, first=True)

    def pull(self, timeout: float | None = None, *, first: bool = False) -> ShardedPull:
        """Every shard's model, in parallel, into one vector on the host."""
        assert self.num_params is not None
        values = torch.empty(self.num_params, dtype=torch.float32)

        def pull_one(index: int, shard: WorkerSession) -> tuple[PulledModel, int]:
            pulled = shard.first_pull(timeout) if first else shard.pull(timeout)
            start, stop = self.ranges[index]
            values[start:stop].copy_(pulled.values)
            checksum = checksum_part(values[start:stop], start)
            return PulledModel(pulled.version, values[:0], pulled.model_checksum, pulled.rank, pulled.world_size,
                               pulled.first_round), checksum

        results = self._each(pull_one)
        pulls = [pulled for pulled, _ in results]
        self.first_rounds = [pulled.first_round for pulled in pulls]
        lead = pulls[0]
        return ShardedPull(version=min(p.version for p in pulls), values=values,
                           model_checksum=combine_checksums(checksum for _, checksum in results), rank=lead.rank,
                           world_size=lead.world_size, first_round=min(self.first_rounds),
                           versions=tuple(p.version for p in pulls), first_rounds=tuple(self.first_rounds))

    def bind_replica(self, values: torch.Tensor, pulled: PulledModel) -> ShardedReplica:
        """The replica over `values` (filled from `pulled`, a ShardedPull) that this session's
        streams advance."""
        assert isinstance(pulled, ShardedPull)
        self.replica = ShardedReplica(values, self.ranges, pulled.versions)
        return self.replica

    def leave(self, timeout: float = 30.0, *, interruptible: bool = True) -> int:
        """Leave every shard at a round boundary; the lead's last round (-1: it no longer knew us)."""
        return self._each(lambda _, shard: shard.leave(timeout, interruptible=interruptible))[0]

    # ------------------------------------------------------------------ stopping (WorkerSession's, on every shard)

    @property
    def lost(self) -> bool:
        return any(shard.lost for shard in self.shards)

    def interrupt(self) -> None:
        for shard in self.shards:
            shard.interrupt()

    @property
    def interrupted(self) -> bool:
        return any(shard.interrupted for shard in self.shards)

    def raise_if_interrupted(self) -> None:
        for shard in self.shards:
            shard.raise_if_interrupted()

    # ------------------------------------------------------------------ background streams

    def follow_updates(self, from_version: int) -> None:
        """Follow every shard's stream from the version of its range of the replica (the
        worker's `from_version` is the least of them)."""
        assert self.replica is not None, "bind_replica first"
        for shard, part in zip(self.shards, self.replica.shards):
            shard.follow_updates(part.version)

    def stop_updates(self) -> None:
        for shard in self.shards:
            shard.stop_updates()

    def follow_decisions(self, report_samples: bool = True) -> None:
        for shard in self.shards:  # the lead follows the controller; every shard is pinged (its lease)
            shard.follow_decisions(report_samples)

    def decisions(self) -> list[Decision]:
        return self.lead.decisions()

    def follow_downlink(self, downlink_delta: float | None) -> None:
        """Every shard's stream to `downlink_delta` (WorkerSession.follow_downlink): each shard
        keeps, retunes or drains the residual of its own range."""
        for shard in self.shards:
            shard.follow_downlink(downlink_delta)

    @property
    def downlink_delta(self) -> float | None:
        """The lead's stream's fraction (every shard follows the same; one may lag a call behind)."""
        return self.lead.downlink_delta

    def wait_for_decision(self, timeout: float) -> bool:
        return self.lead.wait_for_decision(timeout)

    def record_compute(self, seconds: float, round_: int, grad_norm: float = 0.0, overhead_s: float = 0.0) -> None:
        self.lead.record_compute(seconds, round_, grad_norm, overhead_s)

    # ------------------------------------------------------------------ pushes

    def push(self, round_: int, computed_at_version: int, update: Update | None
             ) -> concurrent.futures.Future[pb.PushReply]:
        """Split one round's push by range and send each part to its shard (see the module)."""
        if self.metrics is not None:
            self.metrics.record_push(round_, computed_at_version, None if update is None else update.count,
                                     self.trainable_params or 0)
        pieces = split_update(update, self.ranges)
        expected = [round_ >= first for first in self.first_rounds]
        self._samples.expect(pb.LinkSample.KIND_PUSH, round_, sum(expected))
        futures = []
        for index, (shard, piece) in enumerate(zip(self.shards, pieces)):
            if expected[index]:
                futures.append(shard.push(round_, computed_at_version, piece))
            elif piece is not None and piece.count:
                # This shard expects this worker from a later round: its part goes back into error feedback.
                self._unsent.append(to_global(piece, self.ranges[index][0]))
        return _gathered(futures)

    def take_late_updates(self) -> list[Update]:
        """Parts of pushes a shard acknowledged as late or never got, over the whole vector."""
        taken, self._unsent = self._unsent, []
        for shard, (start, _) in zip(self.shards, self.ranges):
            taken.extend(to_global(late, start) for late in shard.take_late_updates())
        return taken

    # ------------------------------------------------------------------ recovery

    def recover(self, replica: ShardedReplica, wait_for_version: Callable[[int], None], tau_max: int,
                next_round: int, timeout: float = 600.0) -> Recovery:
        """Recover every shard whose connection broke, one at a time, each exactly as a single
        server is (worker/recovery.py). `wait_for_version` (the worker's) is not needed: each
        shard's replays wait for that shard's part of the replica. The worker's round does not
        move: a shard that took it back as a new member gets empty pushes for the rounds it
        now expects that were pushed before (`rejoined` is then True, so the skip rule uploads)."""
        deadline = time.monotonic() + timeout
        rejoined = pulled = False
        resent = 0
        futures: list[concurrent.futures.Future] = []
        for index in sorted(replica.lost):
            shard = self.shards[index]

            def wait_for(version: int, index: int = index) -> None:
                replica.catch_up_shard(self.deltas, index, version)

            result = shard.recover(replica.shards[index], wait_for, tau_max, next_round,
                                   timeout=max(1.0, deadline - time.monotonic()))
            futures.extend(result.futures)
            resent += result.resent
            pulled = pulled or result.pulled
            if result.rejoined:
                rejoined = True
                self.first_rounds[index] = result.first_round
                self._show_worker_id()
                if not self._observer:
                    futures.extend(self._fill(replica, index, result.first_round, next_round, tau_max))
            replica.lost.discard(index)
        return Recovery(rejoined=rejoined, first_round=next_round, resent=resent, pulled=pulled,
                        futures=tuple(futures))

    def _fill(self, replica: ShardedReplica, index: int, first_round: int, next_round: int, tau_max: int
              ) -> list[concurrent.futures.Future]:
        """Empty pushes to shard `index` for rounds [first_round, next_round): it now expects
        them from this worker, which pushed them before (to the shard's earlier self)."""
        shard = self.shards[index]
        futures = []
        for round_ in range(first_round, next_round):
            replica.catch_up_shard(self.deltas, index, round_ - tau_max)  # the round is in the shard's window
            empty = Update(values=torch.empty(0), indices=torch.empty(0, dtype=torch.int32))
            futures.append(shard.send(shard.log_push(round_, replica.shards[index].version, empty)))
        if futures:
            log.info("worker %s: %d empty pushes to %s for rounds %d..%d, expected from it again",
                     self.worker_id, len(futures), shard.server_address, first_round, next_round - 1)
        return futures

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for shard in reversed(self.shards):  # the lead last: it reports what the others forwarded
                shard.close()
        finally:
            self._pool.shutdown(wait=False)


def _gathered(futures: Sequence[concurrent.futures.Future[pb.PushReply]]) -> concurrent.futures.Future[pb.PushReply]:
    """One future for a round's pushes to its shards: the first refusal, or one reply (duplicate
    when every shard said so, late when any did, the least versions)."""
    gathered: concurrent.futures.Future[pb.PushReply] = concurrent.futures.Future()
    if not futures:
        gathered.set_result(pb.PushReply())
        return gathered
    remaining = [len(futures)]
    lock = threading.Lock()

    def done(_: concurrent.futures.Future) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        try:
            replies = [future.result() for future in futures]
        except BaseException as exc:  # noqa: BLE001 - the refusal is the caller's to raise
            gathered.set_exception(exc)
            return
        gathered.set_result(pb.PushReply(duplicate=all(r.duplicate for r in replies),
                                         version=min(r.version for r in replies),
                                         late=any(r.late for r in replies),
                                         durable_version=min(r.durable_version for r in replies)))

    for future in futures:
        future.add_done_callback(done)
    return gathered
