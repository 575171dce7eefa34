"""Link and compute estimation from the samples workers send. Pure: no network, no clock.

Per worker and per direction, over a sliding window of the newest samples (`window_s` seconds,
stretched back to hold `min_pushes` uplink points when rounds are longer than a third of it):

- latency b: a low quantile (default the 10th percentile) of ping round-trip times. The
  low end is the path's own delay; higher RTTs carry queueing behind bulk traffic. This is
  the min-RTT idea of BBR, made robust to a single lucky sample. Pings the server stamped
  (`one_way_up_s`) give it per direction: the minimum of the way up plus that of the
  way down (the clocks' offset cancels in the sum; a one-way time has no lucky samples). A ping seldom finds both directions
  idle when the downlink carries deltas most of a round, each direction alone more often.
  Pings are read over `latency_window_s` (30 s), longer than the bandwidth's window: a
  queue the worker's own traffic keeps standing for seconds is not the path's delay.
- one-way transfers (`transfer_s`, worker/one_way.py): a push, probe or delta the server
  stamped is timed in its own direction, without the round trip and without queueing on the
  other direction; it is put on the line as (bytes, transfer_s + b). The rules below for
  `queued_s` and `timed_bytes` are for samples without it.
- uplink bandwidth a: pushes, and pings padded as bandwidth probes, report (bytes, seconds from
  send to acknowledgement). A push that waited behind the worker's own earlier pushes (with
  tau pushes in flight the link is busy with them) reports that wait as `queued_s`; the
  rest of its seconds is its transfer alone, put on the line as (bytes, seconds - queued_s
  + b) like a download's timed part. Seconds are
  modelled as b + 8*bytes/a (+ queueing). When push sizes vary, a Theil-Sen regression of
  seconds on bytes (pings included as zero-byte points) gives 1/a as its slope, robust to
  outliers. When they do not vary (a static delta), the regression has no slope to see, and
  each push's own rate 8*bytes / (seconds - b) is used; the upper quantile (default 80th)
  of those rates is taken, because queueing only ever makes a push look slower.
- downlink bandwidth a_down, the same fit over the downlink's points: down probes (pings
  whose reply carries `bytes` of padding, seconds the round trip) and deltas of more than
  one chunk (`timed_bytes`, the bytes after the first chunk, over the seconds from the first
  chunk to the last, put on the same line as (timed_bytes, seconds + b): the first chunk's
  arrival is where the worker starts timing, the rest comes at the link's rate). None until
  the window holds `min_pushes` such points (the caller then takes the link as symmetric).
- T_comp: the median of the reported compute times per step; the overhead o, the median of
  the per-round overheads the worker measured itself (its work besides compute, not waiting).

Failure modes (documented in docs/controller.md): too few samples -> no estimate (the
controller keeps its last decision); pushes so small that the transfer is lost in RTT
jitter -> bandwidth is noisy (the estimate reports how many pushes it used and the
spread); bursts that queue behind each other -> bandwidth underestimated (the upper
quantile limits this); a link whose latency changes -> the window forgets in `window_s` (its latency in
`latency_window_s`).

`LinkEstimator.estimate` only reads the samples; the caller drops the ones an estimate no
longer needs with `forget_before(estimate.window_start_s)`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import numpy as np

KIND_PUSH = "push"
KIND_PING = "ping"
KIND_COMPUTE = "compute"
KIND_DOWNLOAD = "download"
DIRECTION_UP = "up"
DIRECTION_DOWN = "down"


@dataclass(frozen=True)
class Sample:
    kind: str
    nbytes: int
    seconds: float
    at_s: float  # the time the sample was taken, seconds on any monotonic clock
    round: int = 0
    grad_norm: float = 0.0  # KIND_COMPUTE: ||lr * g|| of that round
    elements: int = 0  # KIND_PUSH: elements the push carried (0: a skip, or not reported)
    # KIND_PING with bytes: which way the padding went (DIRECTION_DOWN: the server's reply
    # carried it); "" (unset) is an uplink probe, as pushes are.
    direction: str = ""
    timed_bytes: int = 0  # KIND_DOWNLOAD: the bytes `seconds` times (those after the first chunk)
    # KIND_PUSH and probes: of `seconds`, what the transfer waited for the link behind the
    # worker's own earlier traffic (a push behind the pushes in flight before it). When > 0,
    # the rest is the transfer alone (no round trip in it), as a download's timed part is.
    queued_s: float = 0.0
    # One-way timing (worker/one_way.py): the bytes' own time in their direction (0: not
    # measured), and an unpadded ping's server arrival - worker send (None: not stamped).
    transfer_s: float = 0.0
    one_way_up_s: float | None = None
    overhead_s: float = 0.0  # KIND_COMPUTE: the worker's own work per round besides compute (0: not measured)


@dataclass(frozen=True)
class LinkEstimate:
    bandwidth_bps: float
    latency_s: float
    t_comp_s: float | None
    push_samples: int
    ping_samples: int
    method: str  # "theil-sen" or "per-push-rate"
    # The oldest sample time this estimate reads: the window's start, or the recent window's
    # when the link changed. Older samples count for no later estimate either.
    window_start_s: float
    # The downlink, estimated apart (None: too few downlink points in the window).
    down_bandwidth_bps: float | None = None
    down_samples: int = 0
    down_method: str | None = None
    # The median overhead per round the worker measured itself (None: it reported none).
    overhead_s: float | None = None


@dataclass(frozen=True)
class EstimatorConfig:
    window_s: float = 10.0
    max_samples: int = 2048
    min_pushes: int = 3
    min_pings: int = 1
    latency_quantile: float = 0.1
    rate_quantile: float = 0.8
    # Pushes whose sizes differ by less than this fraction count as "all the same size".
    size_spread: float = 0.2
    # Pairs closer in size than this carry no usable slope (transfer lost in jitter).
    min_size_step_bytes: int = 8192
    # Theil-Sen looks at pairs among at most this many newest points (O(n^2)).
    regression_points: int = 256
    # Change detection: when the newest `change_window_s` disagree with the whole window by
    # more than `change_ratio` in bandwidth, older samples are dropped (a step change is
    # followed in seconds, not after the whole window has aged out).
    change_window_s: float = 3.0
    change_ratio: float = 0.3
    change_min_points: int = 3  # of that direction in the recent window
    # b is read over this longer window of pings: a queue the workers' own traffic keeps
    # standing for seconds (after a link drop, before the decisions catch up) is not the
    # path's delay, and reading it as one made DeCo raise tau and send more (BBR keeps its
    # minimum RTT over 10 s for the same reason). A path whose delay really grows is
    # followed this much later.
    latency_window_s: float = 30.0
    # A window holding fewer than `min_pushes` uplink points stretches back to the newest
    # `min_pushes` of them, up to this age: rounds longer than a third of `window_s` (D-SGD's
    # dense rounds on a slow link) left no estimate in any window, and the controller kept
    # its first one, read at the start, for the whole run.
    max_window_s: float = 60.0


def is_uplink_point(sample: Sample) -> bool:
    """A push with bytes, or a ping padded on the way up (a probe): a point on the uplink's line."""
    return sample.nbytes > 0 and (sample.kind == KIND_PUSH
                                  or (sample.kind == KIND_PING and sample.direction != DIRECTION_DOWN))


def on_line(sample: Sample, latency_s: float) -> float:
    """A push's or probe's seconds on the line b + 8 bytes/a: its one-way transfer plus b;
    without one, as measured, or, for a transfer that queued behind the worker's own
    traffic, its own transfer time plus b."""
    if sample.transfer_s > 0:
        return sample.transfer_s + latency_s
    if sample.queued_s > 0:
        return sample.seconds - sample.queued_s + latency_s
    return sample.seconds


def theil_sen(x: np.ndarray, y: np.ndarray, min_dx: float) -> tuple[float, float] | None:
    """Median of pairwise slopes among points at least min_dx apart in x, and the median intercept."""
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    keep = np.abs(dx) >= min_dx
    if not keep.any():
        return None
    slope = float(np.median((y[j] - y[i])[keep] / dx[keep]))
    intercept = float(np.median(y - slope * x))
    return slope, intercept


def lower_envelope_fit(x: np.ndarray, y: np.ndarray, min_dx: float) -> tuple[float, float] | None:
    """Theil-Sen, then again on the points at or below the first line.

    Queueing only ever adds delay, so the points above the line are the queued ones; the
    lower half is closer to the link itself.
    """
    fit = theil_sen(x, y, min_dx)
    if fit is None:
        return None
    residual = y - (fit[1] + fit[0] * x)
    lower = residual <= np.median(residual)
    refit = theil_sen(x[lower], y[lower], min_dx) if lower.sum() >= 3 else None
    return refit if refit is not None and refit[0] > 0 else fit


# A line must add at least this much time over the sizes seen to be read (the clocks and
# the event loops time nothing finer).
MIN_READABLE_S = 1e-3


def readable_slope(x: np.ndarray, y: np.ndarray, fit: tuple[float, float]) -> bool:
    """Whether the line's slope rises above the points' scatter: over the sizes seen it adds
    more time than the median absolute deviation of the residuals, and than MIN_READABLE_S.
    Transfers lost in jitter give a slope of noise, and transfers timed from a base delay
    read while queued (at the start) come out near 0: a slope near 0 is a bandwidth near
    infinity (a 40 Mbit/s downlink read as 4 Tbit/s, and DeCo then sent 0.037 of the
    model a round)."""
    slope, intercept = fit
    residual = y - (intercept + slope * x)
    scatter = float(np.median(np.abs(residual - np.median(residual))))
    return slope * float(x.max() - x.min()) > max(scatter, MIN_READABLE_S)


class LinkEstimator:
    """Samples of one worker's link, and the estimate they support."""

    def __init__(self, config: EstimatorConfig | None = None) -> None:
        self.config = config or EstimatorConfig()
        self._samples: deque[Sample] = deque(maxlen=self.config.max_samples)
        # Unpadded pings of the last `latency_window_s` (kept past `forget_before`: see b above).
        self._latency_pings: deque[Sample] = deque(maxlen=self.config.max_samples)

    def add(self, sample: Sample) -> None:
        if sample.seconds < 0 or sample.nbytes < 0 or not 0 <= sample.queued_s <= sample.seconds:
            raise ValueError("samples need seconds >= 0, bytes >= 0 and queued_s in [0, seconds]")
        self._samples.append(sample)
        if sample.kind == KIND_PING and sample.nbytes == 0:
            self._latency_pings.append(sample)
            while self._latency_pings[0].at_s < sample.at_s - self.config.latency_window_s:
                self._latency_pings.popleft()

    def _since(self, start_s: float) -> list[Sample]:
        return [s for s in self._samples if s.at_s >= start_s]

    def estimate(self, now_s: float) -> LinkEstimate | None:
        """The estimate from the samples of the last `window_s`; from the last `change_window_s`
        only when those disagree with the whole window (the link changed). Changes nothing."""
        c = self.config
        latency_pings = [p for p in self._latency_pings if p.at_s >= now_s - max(c.latency_window_s, c.window_s)]
        start = self._window_start(now_s)
        full = self._estimate(self._since(start), start, latency_pings)
        recent = self._estimate(self._since(now_s - c.change_window_s), now_s - c.change_window_s, latency_pings)
        if full is None or recent is None:
            return full
        # Each direction follows its own change: a change of one direction no longer swaps the
        # other's estimate for its few recent points, which swing widely at a step, and DeCo
        # takes the slowest of the workers' links, so one such swing set everyone's delta.
        up_changed = (recent.push_samples >= c.change_min_points
                      and abs(recent.bandwidth_bps / full.bandwidth_bps - 1.0) > c.change_ratio)
        down_changed = (full.down_bandwidth_bps is not None and recent.down_bandwidth_bps is not None
                        and recent.down_samples >= c.change_min_points
                        and abs(recent.down_bandwidth_bps / full.down_bandwidth_bps - 1.0) > c.change_ratio)
        if not (up_changed or down_changed):
            return full
        estimate = replace(full, window_start_s=recent.window_start_s)
        if up_changed:
            estimate = replace(estimate, bandwidth_bps=recent.bandwidth_bps, push_samples=recent.push_samples,
                               method=recent.method)
        if down_changed:
            estimate = replace(estimate, down_bandwidth_bps=recent.down_bandwidth_bps,
                               down_samples=recent.down_samples, down_method=recent.down_method)
        return estimate

    def _window_start(self, now_s: float) -> float:
        """now - window_s, or earlier, back to the `min_pushes`-th newest uplink point within
        `max_window_s`, when the window holds fewer (rounds longer than the window allows)."""
        c = self.config
        start = now_s - c.window_s
        ups = [s.at_s for s in self._samples if is_uplink_point(s) and s.at_s >= now_s - c.max_window_s]
        if len(ups) >= c.min_pushes and sum(t >= start for t in ups) < c.min_pushes:
            start = sorted(ups)[-c.min_pushes]
        return start

    def forget_before(self, start_s: float) -> None:
        """Drop the samples taken before `start_s`: after a change, what came before it must
        not pull later estimates back towards the old link."""
        self._samples = deque(self._since(start_s), maxlen=self.config.max_samples)

    def _estimate(self, samples: list[Sample], window_start_s: float, latency_pings: list[Sample]) -> LinkEstimate | None:
        # Padded pings (bandwidth probes) are points on the same line as pushes.
        ups = [s for s in samples if is_uplink_point(s)]
        pings = [s for s in samples if s.kind == KIND_PING and s.nbytes == 0]
        computes = [s.seconds for s in samples if s.kind == KIND_COMPUTE]
        overheads = [s.overhead_s for s in samples if s.kind == KIND_COMPUTE and s.overhead_s > 0]
        c = self.config
        if len(ups) < c.min_pushes or len(pings) < c.min_pings:
            return None
        latency = self._latency(latency_pings or pings)
        # The zero-byte end of the line: the pings' round trips, or, when the server stamped
        # them, b itself (one-way points hold no queueing of the other way, so the round
        # trips, which do, would pull the line's intercept up and flatten its slope).
        stamped = any(p.one_way_up_s is not None for p in pings)
        ping_times = [latency] * len(pings) if stamped else [p.seconds for p in pings]
        up = self._bandwidth(np.array([s.nbytes for s in ups], dtype=np.float64),
                             np.array([on_line(s, latency) for s in ups], dtype=np.float64), ping_times, latency)
        if up is None:
            return None
        # The downlink: down probes as they are; a multi-chunk delta's timed part lands on the
        # same line once the round trip its first chunk's arrival hides is added back.
        downs = [(s.nbytes, on_line(s, latency)) for s in samples
                 if s.kind == KIND_PING and s.direction == DIRECTION_DOWN and s.nbytes > 0]
        downs += [(s.nbytes, s.transfer_s + latency) if s.transfer_s > 0 else (s.timed_bytes, s.seconds + latency)
                  for s in samples if s.kind == KIND_DOWNLOAD and (s.transfer_s > 0 or s.timed_bytes > 0)]
        down = None
        if len(downs) >= c.min_pushes:
            down = self._bandwidth(np.array([n for n, _ in downs], dtype=np.float64),
                                   np.array([t for _, t in downs], dtype=np.float64), ping_times, latency)
        t_comp = float(np.median(computes)) if computes else None
        return LinkEstimate(bandwidth_bps=up[0], latency_s=latency, t_comp_s=t_comp,
                            push_samples=len(ups), ping_samples=len(pings), method=up[1],
                            window_start_s=window_start_s, down_bandwidth_bps=None if down is None else down[0],
                            down_samples=len(downs), down_method=None if down is None else down[1],
                            overhead_s=float(np.median(overheads)) if overheads else None)

    def _latency(self, pings: list[Sample]) -> float:
        """b: the low quantile of round trips, or, from stamped pings, the sum of each way's minimum."""
        q = self.config.latency_quantile
        stamped = [p for p in pings if p.one_way_up_s is not None]
        if len(stamped) >= self.config.min_pings:
            up = np.array([p.one_way_up_s for p in stamped])
            down = np.array([p.seconds for p in stamped]) - up
            # Neither minimum alone means anything (each holds the clocks' offset); their sum
            # is a round trip without queueing either way. The minimum, not a low quantile: a
            # one-way time cannot come out below the path's delay (no "lucky" sample), while
            # a downlink kept queued by the worker's own deltas may leave few pings unqueued.
            return max(0.0, float(np.min(up) + np.min(down)))
        return float(np.quantile([p.seconds for p in pings], q))

    def _bandwidth(self, sizes: np.ndarray, times: np.ndarray, ping_times: list[float],
                   latency: float) -> tuple[float, str] | None:
        """(bit/s, method) from one direction's (bytes, seconds) points, or None."""
        c = self.config
        if sizes.max() > sizes.min() * (1 + c.size_spread):
            # Varying sizes: regress seconds on bytes; pings anchor the zero-byte end.
            x = np.concatenate([sizes, np.zeros(len(ping_times))])[-c.regression_points :]
            y = np.concatenate([times, ping_times])[-c.regression_points :]
            fit = lower_envelope_fit(x, y, min_dx=max(c.size_spread * float(np.median(sizes)), c.min_size_step_bytes))
            if fit is not None and fit[0] > 0 and readable_slope(x, y, fit):
                return 8.0 / fit[0], "theil-sen"
        transfer = times - latency
        usable = transfer > 1e-4
        if not usable.any():
            return None
        rates = 8.0 * sizes[usable] / transfer[usable]
        return float(np.quantile(rates, c.rate_quantile)), "per-push-rate"
