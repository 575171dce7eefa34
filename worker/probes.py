"""When a worker sends a bandwidth probe, and how big. Pure: no network, no clock.

The controller estimates each direction of a worker's link from (bytes, seconds) points
(controller/estimator.py). Pushes and multi-chunk deltas are such points, but at a small
delta their transfer is a few milliseconds, lost in the round trip's jitter, and an
estimate built on them follows the decisions instead of the link (a small delta made the
estimate low, which made the next delta smaller). Probes are points whose size comes
from the link, not from the decision:

- *Only when traffic cannot measure.* A direction is probed when the median transfer of
  its recent traffic (push seconds minus the base RTT; a delta's first-to-last-chunk
  time) is below the target transfer time.
- *Sized to the link.* The target transfer time is `jitter_multiple` times the RTT
  jitter (the 90th minus the 10th percentile of recent unpadded pings), at least
  `min_transfer_s`. The size is the recent measured rate (upper quantile of the points
  whose transfer was long enough to read) times that target; with no such point yet, or
  when the last probe was lost in the jitter, it doubles (from `start_bytes`) until one
  is readable. Bounded by [min_bytes, max_bytes].
- *At most `max_share` of the link.* After a probe whose transfer took t seconds (its
  seconds minus the base RTT: what it occupied the link for, queueing included), the
  next probe of that direction waits t / max_share. The link can only have been slower
  than the probe measured, so probes take at most that share of its capacity. A link too
  fast to read with `max_bytes` (loopback, a LAN) is probed every `saturated_interval_s`.

Uplink probes are Pings with padding the server discards; downlink probes are Pings whose
reply carries `reply_bytes` of padding. Both are bounded by the server
(proto/wire.MAX_PROBE_BYTES) and counted in `wanps_server_probe_bytes_total{direction}`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from wanps.proto.wire import MAX_PROBE_BYTES

UP = "up"
DOWN = "down"


@dataclass(frozen=True)
class ProbeConfig:
    jitter_multiple: float = 4.0  # a probe's transfer should be this many RTT jitters
    min_transfer_s: float = 0.01  # ... and at least this (a jitter-free link still needs a readable transfer)
    max_share: float = 0.05  # of the link's capacity, per direction
    start_bytes: int = 32 * 1024
    min_bytes: int = 4 * 1024
    max_bytes: int = MAX_PROBE_BYTES
    window_s: float = 10.0  # observations older than this are forgotten
    rate_quantile: float = 0.8  # queueing only ever makes a transfer look slower
    recent_rates: int = 5  # a probe is sized from this many newest readable rates
    # A probe of max_bytes still lost in the jitter: the link is faster than probes can read
    # (loopback, a LAN), and DeCo is compute-bound on it; probe again only this much later.
    saturated_interval_s: float = 5.0
    history: int = 64  # observations kept per kind and direction

    def __post_init__(self) -> None:
        if not (self.jitter_multiple > 0 and self.min_transfer_s > 0 and 0 < self.max_share <= 1
                and 0 < self.min_bytes <= self.start_bytes <= self.max_bytes <= MAX_PROBE_BYTES
                and self.window_s > 0 and 0 <= self.rate_quantile <= 1 and self.history >= 1
                and self.recent_rates >= 1 and self.saturated_interval_s >= 0):
            raise ValueError(f"invalid probe configuration: {self}")


@dataclass(frozen=True)
class _Transfer:
    at_s: float
    nbytes: int
    transfer_s: float  # the part of the measured time the bytes spent crossing the link
    probe: bool


class ProbePlanner:
    """One worker's probe plan for both directions of its link to the server."""

    def __init__(self, config: ProbeConfig | None = None) -> None:
        self.config = config or ProbeConfig()
        self._rtts: deque[tuple[float, float]] = deque(maxlen=self.config.history)
        self._transfers: dict[str, deque[_Transfer]] = {d: deque(maxlen=self.config.history) for d in (UP, DOWN)}
        self._next_at: dict[str, float] = {UP: 0.0, DOWN: 0.0}
        self._last_size: dict[str, int] = {UP: 0, DOWN: 0}

    # ------------------------------------------------------------------ observations

    def rtt(self, seconds: float, at_s: float) -> None:
        """An unpadded ping's round trip."""
        self._rtts.append((at_s, seconds))

    def traffic(self, direction: str, nbytes: int, seconds: float, at_s: float, round_trip: bool) -> None:
        """A push (`round_trip`: seconds from send to acknowledgement) or a delta's timed
        bytes (seconds from its first chunk to its last)."""
        if nbytes > 0:
            self._add(direction, nbytes, seconds, at_s, round_trip, probe=False)

    def probe_done(self, direction: str, nbytes: int, seconds: float, at_s: float, round_trip: bool = True,
                   readable: bool = True) -> None:
        """A probe's round trip (`round_trip`; else its transfer alone: it waited behind the
        worker's own traffic and the time from that traffic's end is its own): record it and
        hold the next one back to keep within max_share. An unreadable probe (it queued
        where its time means nothing) only holds the next one back."""
        c = self.config
        if not readable:
            base = self.base_rtt(at_s) or 0.0
            self._next_at[direction] = at_s + max(0.0, seconds - base) / c.max_share
            return
        transfer = self._add(direction, nbytes, seconds, at_s, round_trip=round_trip, probe=True)
        self._last_size[direction] = nbytes
        self._next_at[direction] = at_s + transfer / c.max_share
        if nbytes >= c.max_bytes and transfer < self.target_transfer_s(at_s) / 2:
            self._next_at[direction] = max(self._next_at[direction], at_s + c.saturated_interval_s)

    def _add(self, direction: str, nbytes: int, seconds: float, at_s: float, round_trip: bool, probe: bool) -> float:
        base = self.base_rtt(at_s) if round_trip else 0.0
        transfer = max(0.0, seconds - (base or 0.0))
        self._transfers[direction].append(_Transfer(at_s, nbytes, transfer, probe))
        return transfer

    # ------------------------------------------------------------------ reads

    def _recent_rtts(self, now_s: float) -> list[float]:
        return [s for at, s in self._rtts if at >= now_s - self.config.window_s]

    def base_rtt(self, now_s: float) -> float | None:
        rtts = self._recent_rtts(now_s)
        return min(rtts) if rtts else None

    def target_transfer_s(self, now_s: float) -> float:
        """How long a probe's transfer should take to stand out of the RTT jitter."""
        rtts = self._recent_rtts(now_s)
        jitter = float(np.quantile(rtts, 0.9) - np.quantile(rtts, 0.1)) if len(rtts) >= 3 else 0.0
        return max(self.config.min_transfer_s, self.config.jitter_multiple * jitter)

    def plan(self, direction: str, now_s: float) -> int:
        """Bytes of the probe to send in `direction` now; 0: none is due."""
        c = self.config
        if now_s < self._next_at[direction] or self.base_rtt(now_s) is None:
            return 0
        target = self.target_transfer_s(now_s)
        recent = [t for t in self._transfers[direction] if t.at_s >= now_s - c.window_s]
        traffic = [t.transfer_s for t in recent if not t.probe]
        if traffic and float(np.median(traffic)) >= target:
            return 0  # the traffic itself measures the link
        probes = [t for t in recent if t.probe]
        readable = [8.0 * t.nbytes / t.transfer_s for t in recent if t.transfer_s >= target / 2]
        if probes and probes[-1].transfer_s < target / 2:
            size = 2 * probes[-1].nbytes  # the last probe was lost in the jitter (the link got faster?)
        elif readable:
            # The newest readable rates: after a change the link is what they say, not the window.
            size = float(np.quantile(readable[-c.recent_rates:], c.rate_quantile)) * target / 8.0
        else:
            last = self._last_size[direction]
            size = 2 * last if last else c.start_bytes
        return int(min(max(size, c.min_bytes), c.max_bytes))
