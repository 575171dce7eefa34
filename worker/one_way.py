"""One-way transfer times from the server's time stamps. Pure: no network, no clock.

A push's time from send to acknowledgement holds the uplink transfer and the way back, and
the way back shares the downlink with the worker's own deltas, which carry the union of
every worker's selection (several times a push): an acknowledgement queued behind a delta
made a 10 Mbit/s uplink read 3-5 Mbit/s. Likewise a down probe's round trip holds the
uplink, busy with pushes. So each direction is timed on its own:

- The server stamps, on its monotonic clock, when a push's last message arrived
  (`PushReply.received_ns`), when a ping arrived (`PingReply.received_ns`; its reply,
  with a down probe's padding, leaves right after) and when a round's delta went to the
  streams (`DeltaChunk.sent_ns`).
- The two clocks differ by an unknown offset, which one-way times carry but differences of
  them do not. Over recent unpadded pings, the smallest (server arrival - worker send) is
  the offset plus the uplink's base delay, and the smallest (worker arrival - server stamp)
  is the downlink's base delay minus the offset: the earliest moment a transfer sent at t
  can arrive, on the other side's clock.
- A transfer's own time is from when its bytes could start arriving (that earliest
  moment, or the previous transfer's arrival that way if it came later: the link was busy
  with the worker's own traffic until then; packet-train dispersion) to when its last
  byte arrived. No round trip, no wait on the other direction.

The clocks' drift (parts per million) is nothing over the window (seconds).
"""
from __future__ import annotations

from collections import deque

NS = 1e-9
# A transfer too small to see comes out at about 0, or a little below it in the clocks'
# jitter; it is reported as this, never 0 (LinkSample.transfer_s = 0 means "not measured").
MIN_TRANSFER_S = 1e-6


class OneWayClock:
    """One worker's one-way timing against one server (one connection)."""

    def __init__(self, window_s: float = 10.0, history: int = 64) -> None:
        self.window_s = window_s
        # (at_s, value): server arrival - worker send; worker arrival - server stamp.
        self._up_offsets: deque[tuple[float, float]] = deque(maxlen=history)
        self._down_offsets: deque[tuple[float, float]] = deque(maxlen=history)
        # The newest arrivals of the worker's own transfers, each direction on the receiver's
        # clock (server seconds up, worker seconds down). Replies can be handled out of
        # order, so a transfer starts after the latest arrival *before* its own.
        self._up_arrivals: deque[float] = deque(maxlen=history)
        self._down_arrivals: deque[float] = deque(maxlen=history)

    def ping(self, sent_at: float, received_ns: int, arrived_at: float) -> float | None:
        """An unpadded ping (worker seconds sent and arrived, the server's stamp). Returns its
        one-way-up time (server arrival - worker send, offset included); None if unstamped."""
        if not received_ns:
            return None
        received = received_ns * NS
        self._up_offsets.append((arrived_at, received - sent_at))
        self._down_offsets.append((arrived_at, arrived_at - received))
        return received - sent_at

    def _base(self, offsets: deque[tuple[float, float]], now_s: float) -> float | None:
        recent = [value for at, value in offsets if at >= now_s - self.window_s]
        return min(recent) if recent else None

    @staticmethod
    def _previous(arrivals: deque[float], arrival: float) -> float | None:
        earlier = [a for a in arrivals if a < arrival]
        return max(earlier) if earlier else None

    def up_transfer(self, sent_at: float, received_ns: int, now_s: float) -> float | None:
        """Seconds an upload sent at `sent_at` (worker clock) took to cross the uplink, its last
        byte at the server at `received_ns`; None without a stamp or a ping yet."""
        if not received_ns:
            return None
        received = received_ns * NS
        base = self._base(self._up_offsets, now_s)
        previous = self._previous(self._up_arrivals, received)
        self._up_arrivals.append(received)
        if base is None:
            return None
        start = sent_at + base
        if previous is not None:
            start = max(start, previous)
        return max(MIN_TRANSFER_S, received - start)

    def down_transfer(self, sent_ns: int, arrived_at: float, now_s: float) -> float | None:
        """Seconds a download the server sent at `sent_ns` took to cross the downlink, its last
        byte here at `arrived_at` (worker clock); None without a stamp or a ping yet."""
        if not sent_ns:
            return None
        base = self._base(self._down_offsets, now_s)
        previous = self._previous(self._down_arrivals, arrived_at)
        self._down_arrivals.append(arrived_at)
        if base is None:
            return None
        start = sent_ns * NS + base
        if previous is not None:
            start = max(start, previous)
        return max(MIN_TRANSFER_S, arrived_at - start)
