"""What a worker tells the controller about its link: samples, pings that make some, reports.

Samples (push, ping, download and compute times) are kept only when a controller will
receive them, in a bounded queue, and sent once a second. Pings go to the server whether
or not anyone reports them (they are also the worker's heartbeat); while a controller
receives samples, bandwidth probes follow them when the traffic is too small to measure
a direction of the link (worker/probes.py says when and how big).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import grpc

from wanps.proto import wanps_pb2 as pb
from wanps.proto.wire import MAX_SAMPLES_PER_REPORT
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.worker.io_loop import IoLoop
from wanps.worker.one_way import OneWayClock
from wanps.worker.probes import DOWN, UP, ProbePlanner

# ping(padding, reply_bytes): one Ping to the server, its reply, or AioRpcError if it fails.
Ping = Callable[[bytes, int], Awaitable[pb.PingReply]]
_DIRECTION = {UP: pb.LinkSample.DIRECTION_UP, DOWN: pb.LinkSample.DIRECTION_DOWN}

log = logging.getLogger("wanps.worker")

REPORT_INTERVAL_S = 1.0
REPORT_TIMEOUT_S = 5.0
# The sample queue holds at most one report's worth (MAX_SAMPLES_PER_REPORT, the contract's
# limit): a report sends the newest samples, so older ones beyond it would never be sent, and
# a worker whose reports fail or have not started yet keeps no more than that.
# A ping every PING_INTERVAL_S (enough unqueued RTTs for a low quantile in a few seconds);
# probes, when due, go right after it, one direction at a time, so none overlaps another.
PING_INTERVAL_S = 0.5
PING_TIMEOUT_S = 10.0
# A push that queued behind this worker's earlier pushes is timed over the train of up to
# this many acknowledgements the link was busy for (one gap alone suffers ack compression:
# acknowledgements handled in one loop turn arrive "at once").
TRAIN_ACKS = 4


class Telemetry:
    """One worker's link samples and the loops that make and send them.

    `sample` runs on the I/O loop (the push, download and ping code calls it there);
    `record_compute` may be called from any thread.
    """

    def __init__(self, io: IoLoop, controller: pb_grpc.ControllerStub | None) -> None:
        self._io = io
        self._controller = controller
        # Without a controller nothing would ever send them: keep none.
        self.collecting = controller is not None
        self.samples: deque[pb.LinkSample] = deque(maxlen=MAX_SAMPLES_PER_REPORT)
        self.worker_id = 0
        self.num_params = 0
        self.reported_round = 0
        self.probes = ProbePlanner()
        # Each direction timed on its own from the server's stamps (worker/one_way.py); the
        # send-to-acknowledgement times below remain for a server that sends no stamps.
        self.one_way = OneWayClock()
        # When this worker's link was last seen busy with its own traffic, each way: the
        # newest push acknowledgement, and the newest delta's last chunk (time.monotonic()).
        self._uplink_busy_until = 0.0
        self._downlink_busy_until = 0.0
        # The newest push acknowledgements: (time, bytes, whether that push had queued).
        self._acks: deque[tuple[float, int, bool]] = deque(maxlen=TRAIN_ACKS + 1)
        # One shard's session of a sharded worker (worker/shards.py): its samples go to
        # forward(sample), which sums a round's transfers over the shards, instead of into
        # this queue. The probe plan above stays this shard's own (its own connection).
        self.forward: Callable[[pb.LinkSample], None] | None = None

    def joined(self, worker_id: int, num_params: int, first_round: int) -> None:
        """Report as this member, from the round it starts at, not 0 (a restarted controller
        schedules from it)."""
        self.worker_id, self.num_params = worker_id, num_params
        self.reported_round = max(self.reported_round, first_round)

    def stop_collecting(self) -> None:
        """Nobody will report (an observer): keep no samples from now on."""
        self.collecting = False
        self._io.call_soon(self.samples.clear)

    def sample(self, kind: int, nbytes: int, seconds: float, round_: int, grad_norm: float = 0.0,
               elements: int = 0, timed_bytes: int = 0, direction: int = pb.LinkSample.DIRECTION_UNSPECIFIED,
               queued_s: float = 0.0, transfer_s: float | None = None, one_way_up_s: float | None = None,
               overhead_s: float = 0.0) -> None:
        link_sample = pb.LinkSample(kind=kind, bytes=nbytes, seconds=seconds, round=round_,
                                    unix_ns=time.time_ns(), grad_norm=grad_norm, elements=elements,
                                    timed_bytes=timed_bytes, direction=direction, queued_s=queued_s,
                                    transfer_s=transfer_s or 0.0, has_one_way=one_way_up_s is not None,
                                    one_way_up_s=one_way_up_s or 0.0, overhead_s=overhead_s)
        if self.forward is not None:
            self.forward(link_sample)
        else:
            self.keep(link_sample)
        # What the traffic tells the probe plan (probes report themselves in _probe).
        now = time.monotonic()
        if kind == pb.LinkSample.KIND_PING and nbytes == 0:
            self.probes.rtt(seconds, now)
        elif kind == pb.LinkSample.KIND_PUSH and transfer_s:
            self.probes.traffic(UP, nbytes, transfer_s, now, round_trip=False)
        elif kind == pb.LinkSample.KIND_DOWNLOAD and transfer_s:
            self.probes.traffic(DOWN, nbytes, transfer_s, now, round_trip=False)
        elif kind == pb.LinkSample.KIND_PUSH:
            if queued_s > 0:  # the transfer alone: from the link freeing up to the acknowledgement
                self.probes.traffic(UP, nbytes, seconds - queued_s, now, round_trip=False)
            else:
                self.probes.traffic(UP, nbytes, seconds, now, round_trip=True)
        elif kind == pb.LinkSample.KIND_DOWNLOAD:
            self.probes.traffic(DOWN, timed_bytes, seconds, now, round_trip=False)

    def keep(self, link_sample: pb.LinkSample) -> None:
        """Queue one sample for the next report (on the I/O loop)."""
        if self.collecting:
            self.samples.append(link_sample)

    def push_acknowledged(self, nbytes: int, sent_at: float, acked_at: float, round_: int, elements: int,
                          received_ns: int = 0) -> None:
        """A push's sample: its uplink transfer from the server's stamp of its arrival
        (`received_ns`), and, for the controllers that read only round trips, the time it
        waited behind this worker's earlier pushes."""
        transfer = self.one_way.up_transfer(sent_at, received_ns, acked_at)
        queued = self._queued_s(sent_at, acked_at, self._uplink_busy_until)
        self._uplink_busy_until = max(self._uplink_busy_until, acked_at)
        if queued > 0 and nbytes > 0 and self._acks:
            # Its own transfer at the rate of the busy train it ends (TRAIN_ACKS): the link was
            # busy since the previous acknowledgement, and before it as long as those queued too.
            train = list(self._acks)
            carried, start, k = nbytes, train[-1][0], len(train) - 1
            while k >= 1 and train[k][2]:
                carried += train[k][1]
                start = train[k - 1][0]
                k -= 1
            # A name of its own: the one-way `transfer` from the server's stamp stays what is
            # reported (the train's acks also wait on the downlink; one that overwrote it read
            # a transfer longer than the push's own round trip).
            train_transfer = nbytes * (acked_at - start) / carried
            if train_transfer < acked_at - sent_at:
                queued = acked_at - sent_at - train_transfer
        self._acks.append((acked_at, nbytes, queued > 0))
        self.sample(pb.LinkSample.KIND_PUSH, nbytes, acked_at - sent_at, round_, elements=elements, queued_s=queued,
                    transfer_s=transfer)

    def delta_received(self, nbytes: int, timed_bytes: int, first_chunk_at: float, last_chunk_at: float,
                       round_: int, sent_ns: int = 0) -> None:
        """A delta's sample: its downlink transfer from the server's stamp of when it went out
        (`sent_ns`), and its first-to-last-chunk time."""
        transfer = self.one_way.down_transfer(sent_ns, last_chunk_at, last_chunk_at)
        self._downlink_busy_until = max(self._downlink_busy_until, last_chunk_at)
        self.sample(pb.LinkSample.KIND_DOWNLOAD, nbytes, last_chunk_at - first_chunk_at, round_,
                    timed_bytes=timed_bytes, transfer_s=transfer)

    def _queued_s(self, sent_at: float, done_at: float, busy_until: float) -> float:
        """How long a transfer sent at `sent_at` waited for the link behind this worker's own
        earlier traffic; 0 when it did not.

        With tau > 0 several pushes are in flight on one link, and a push's bytes cannot
        start crossing before the previous push's have: that one's acknowledgement arrived
        at `busy_until`. If it arrived more than a base RTT after `sent_at`, the link was
        still busy when this push was sent, and this push's own transfer is the time
        between the two acknowledgements (packet-train dispersion, as BBR's delivery rate):
        it waited `busy_until - sent_at`. Without this a link kept busy by the worker's own
        pushes reads as slower than it is, the more so the larger tau, and the round trips
        of a standing queue do not help (they grow with it).
        """
        base = self.probes.base_rtt(done_at)
        if base is None or busy_until - sent_at <= base:
            return 0.0
        return min(busy_until, done_at) - sent_at

    def keep_soon(self, link_sample: pb.LinkSample) -> None:
        """`keep`, from any thread: it runs on the I/O loop, where reports take the samples."""
        self._io.call_soon(self.keep, link_sample)

    def record_compute(self, seconds: float, round_: int, grad_norm: float = 0.0, overhead_s: float = 0.0) -> None:
        """One step's compute time, with the previous round's overhead (0: not measured)."""
        self._io.call_soon(lambda: self.sample(pb.LinkSample.KIND_COMPUTE, 0, seconds, round_, grad_norm,
                                               overhead_s=overhead_s))
        self.reported_round = max(self.reported_round, round_)

    async def report_loop(self) -> None:
        while True:
            await self.report()  # at once first: the controller decides on a first report
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def report(self) -> None:
        """Send the round and the samples kept so far (the round matters even with no samples)."""
        assert self._controller is not None
        samples = list(self.samples)
        self.samples.clear()
        try:
            await self._controller.Report(
                pb.ReportRequest(worker_id=self.worker_id, round=self.reported_round, samples=samples,
                                 num_params=self.num_params),
                timeout=REPORT_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("report to controller failed: %s", exc.code())

    async def report_remaining(self) -> None:
        """At close: send the samples not reported yet, if there are any."""
        if self._controller is not None and self.samples:
            await self.report()

    async def ping_loop(self, ping: Ping) -> None:
        """A ping at once, then one every PING_INTERVAL_S (the heartbeat and the RTT samples),
        each followed by the probes due.

        The first goes out as training starts, before this worker's first push and delta: the
        only ping sure to find the path idle. b is each direction's minimum over 30 s, and
        when every ping of the first seconds queued behind the start's deltas, the first
        decisions read b as 0.4 s on a 100 ms path and took tau_max.
        """
        await self._timed_ping(ping, b"", 0)
        for _ in itertools.count():
            await asyncio.sleep(PING_INTERVAL_S)
            if await self._timed_ping(ping, b"", 0) is None or not self.collecting:
                continue
            for direction in (UP, DOWN):
                size = self.probes.plan(direction, time.monotonic())
                if size:
                    await self._probe(ping, direction, size)

    async def _timed_ping(self, ping: Ping, padding: bytes, reply_bytes: int) -> tuple[float, float, int] | None:
        """(sent at, arrived at, the server's stamp) of one ping; None if it failed. An unpadded
        one is an RTT sample (and sets the one-way clocks' bases)."""
        started = time.monotonic()
        try:
            reply = await ping(padding, reply_bytes)
        except grpc.aio.AioRpcError:
            return None
        arrived = time.monotonic()
        received_ns = reply.received_ns if reply is not None else 0
        if not padding and not reply_bytes:
            one_way_up = self.one_way.ping(started, received_ns, arrived)
            self.sample(pb.LinkSample.KIND_PING, 0, arrived - started, self.reported_round, one_way_up_s=one_way_up)
        return started, arrived, received_ns

    async def _probe(self, ping: Ping, direction: str, size: int) -> None:
        """One probe of `size` bytes: padding up, or a reply that carries them down. A probe
        queues behind this worker's pushes (up) or deltas (down) like any of its traffic."""
        timed = await self._timed_ping(ping, bytes(size) if direction == UP else b"", size if direction == DOWN else 0)
        if timed is None:
            return
        sent_at, done_at, received_ns = timed
        seconds = done_at - sent_at
        transfer = (self.one_way.up_transfer(sent_at, received_ns, done_at) if direction == UP
                    else self.one_way.down_transfer(received_ns, done_at, done_at))
        busy_until = self._uplink_busy_until if direction == UP else self._downlink_busy_until
        queued = self._queued_s(sent_at, done_at, busy_until)
        if queued and direction == DOWN:
            # The reply came down behind the worker's own deltas, and the server interleaves
            # the two on one connection: neither its round trip nor its spacing from the
            # delta reads the link. No sample (the next probe still waits out its share).
            self.probes.probe_done(direction, size, seconds, done_at, round_trip=True, readable=False)
            return
        if transfer:
            self.probes.probe_done(direction, size, transfer, done_at, round_trip=False)
        else:
            self.probes.probe_done(direction, size, seconds - queued, done_at, round_trip=queued == 0)
        self.sample(pb.LinkSample.KIND_PING, size, seconds, self.reported_round, direction=_DIRECTION[direction],
                    queued_s=queued, transfer_s=transfer)
