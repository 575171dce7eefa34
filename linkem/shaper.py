"""One direction of the emulated link: its serializer, queue and delay.

Shaping model, per direction (client->target and target->client are independent, full duplex):

* Data read from the source is cut into segments of at most `SEGMENT_BYTES`.
* One serializer per direction per emulator (the link is shared by all connections through
  it): a segment admitted at `now` finishes transmission at
  `tx_end = max(now, previous_tx_end) + size * 8 / bandwidth_bps(start)` and is delivered to
  the destination at `tx_end + delay(tx_end)`. Rates are looked up when the segment starts
  transmitting (not when it was read), so a trace step is followed even with a queue.
* The link queue is bounded in time (`queue_ms`, a router buffer): a reader waits before
  admitting while the serializer backlog exceeds it. Each connection also bounds its own
  undelivered bytes (bandwidth * (queue + delay) + a few segments), which covers a
  destination that stops reading. Waiting reads stop reading the socket, so TCP
  backpressure reaches the sender and memory stays bounded.

The proxy (`wanps.linkem.proxy`) reads, admits segments here and delivers them in order at
the times this returns.
"""
from __future__ import annotations

import asyncio
import time

from wanps.linkem.trace import LinkTrace

SEGMENT_BYTES = 16 * 1024
DEFAULT_QUEUE_MS = 50.0


class LinkDirection:
    """The serializer of one direction of the link, shared by every connection using it."""

    def __init__(self, trace: LinkTrace, epoch: float, queue_s: float) -> None:
        self.trace = trace
        self.epoch = epoch
        self.queue_s = queue_s
        self.tx_end = epoch
        self.bytes_forwarded = 0
        # Transmission time reserved so far: each segment's size * 8 / the bandwidth it was
        # charged at. Tests read it (a count, not a clock) to see which rate bytes went at.
        self.serializer_s = 0.0
        self.stalled_until = 0.0  # monotonic time; no byte is admitted before it

    async def admit(self, size: int) -> float:
        """Reserve serializer time for `size` bytes; return the delivery time (monotonic)."""
        while True:
            now = time.monotonic()
            if now < self.stalled_until:
                await asyncio.sleep(self.stalled_until - now)
                continue
            backlog_s = self.tx_end - now
            if backlog_s <= self.queue_s:
                break
            # Time-based wait: it cannot deadlock on a stalled peer of another connection.
            await asyncio.sleep(backlog_s - self.queue_s)
        start = max(now, self.tx_end)
        transmit_s = size * 8 / self.trace.bandwidth_bps(start - self.epoch)
        self.serializer_s += transmit_s
        self.tx_end = start + transmit_s
        return self.delivery_time(self.tx_end)

    def delivery_time(self, now: float) -> float:
        """When what leaves the serializer at `now` (or needs none: EOF, a reset) arrives."""
        return now + self.trace.delay_s(now - self.epoch)

    def inflight_limit(self) -> int:
        """Per-connection bound on undelivered bytes: what the link can legitimately hold."""
        t = time.monotonic() - self.epoch
        point = self.trace.at(t)
        holding_s = self.queue_s + point.delay_ms / 1e3
        return int(point.bandwidth_mbit * 1e6 / 8 * holding_s) + 4 * SEGMENT_BYTES
