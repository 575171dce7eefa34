"""What a worker tells the controller about its link: samples, pings that make some, reports.

Samples (push, ping, download and compute times) are kept only when a controller will
receive them, in a bounded queue, and sent once a second. Pings go to the server whether
or not anyone reports them (they are also the worker's heartbeat); every PROBE_EVERY-th
carries padding, so the controller sees the link's bandwidth even when pushes are tiny.
"""
from __future__ import annotations

import asyncio
import functools
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

log = logging.getLogger("wanps.worker")

REPORT_INTERVAL_S = 1.0
REPORT_TIMEOUT_S = 5.0
# The sample queue holds at most one report's worth (MAX_SAMPLES_PER_REPORT, the contract's
# limit): a report sends the newest samples, so older ones beyond it would never be sent, and
# a worker whose reports fail or have not started yet keeps no more than that.
# A ping every PING_INTERVAL_S (enough unqueued RTTs for a low quantile in a few seconds);
# every PROBE_EVERY-th carries PROBE_BYTES of padding, so the controller sees the link's
# bandwidth even when pushes are tiny (a small delta): 32 KiB every 4 s is 64 kbit/s,
# about 0.3% of a 20 Mbit/s link.
PING_INTERVAL_S = 0.5
PING_TIMEOUT_S = 10.0
PROBE_EVERY = 8
PROBE_BYTES = 32 * 1024


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
        # One shard's session of a sharded worker (worker/shards.py): its samples go to
        # forward(kind, bytes, seconds, round, grad_norm, elements), which sums a round's
        # transfers over the shards, instead of into this queue.
        self.forward: Callable[[int, int, float, int, float, int], None] | None = None

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
               elements: int = 0) -> None:
        if self.forward is not None:
            self.forward(kind, nbytes, seconds, round_, grad_norm, elements)
        else:
            self.keep(kind, nbytes, seconds, round_, grad_norm, elements)

    def keep(self, kind: int, nbytes: int, seconds: float, round_: int, grad_norm: float = 0.0,
             elements: int = 0) -> None:
        """Queue one sample for the next report (on the I/O loop)."""
        if self.collecting:
            self.samples.append(pb.LinkSample(kind=kind, bytes=nbytes, seconds=seconds, round=round_,
                                              unix_ns=time.time_ns(), grad_norm=grad_norm, elements=elements))

    def keep_soon(self, kind: int, nbytes: int, seconds: float, round_: int, grad_norm: float = 0.0,
                  elements: int = 0) -> None:
        """`keep`, from any thread: it runs on the I/O loop, where reports take the samples."""
        self._io.call_soon(functools.partial(self.keep, kind, nbytes, seconds, round_, grad_norm, elements))

    def record_compute(self, seconds: float, round_: int, grad_norm: float = 0.0) -> None:
        self._io.call_soon(self.sample, pb.LinkSample.KIND_COMPUTE, 0, seconds, round_, grad_norm)
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

    async def ping_loop(self, ping: Callable[[bytes], Awaitable[None]]) -> None:
        """`ping(padding)` sends one Ping to the server (raising AioRpcError if it fails)."""
        probe = bytes(PROBE_BYTES)
        for count in itertools.count():
            await asyncio.sleep(PING_INTERVAL_S)
            padding = probe if count % PROBE_EVERY == PROBE_EVERY - 1 else b""
            started = time.monotonic()
            try:
                await ping(padding)
            except grpc.aio.AioRpcError:
                continue
            self.sample(pb.LinkSample.KIND_PING, len(padding), time.monotonic() - started, self.reported_round)
