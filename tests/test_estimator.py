"""Link estimation on synthetic samples: exact recovery, noise, equal sizes, step change."""
from __future__ import annotations

import numpy as np
import pytest

from wanps.controller.estimator import (
    DIRECTION_DOWN,
    DIRECTION_UP,
    KIND_COMPUTE,
    KIND_DOWNLOAD,
    KIND_PING,
    KIND_PUSH,
    EstimatorConfig,
    LinkEstimator,
    Sample,
    theil_sen,
)

MBIT = 1e6


def feed(estimator, *, bandwidth, rtt, t0, t1, sizes, rng=None, noise=0.0, queue=0.0, compute=0.02, rate_hz=20):
    """Pushes every 1/rate_hz s (cycling through sizes), a ping and a compute sample each second."""
    times = np.arange(t0, t1, 1 / rate_hz)
    for i, t in enumerate(times):
        size = sizes[i % len(sizes)]
        jitter = rng.normal(0, noise) if rng is not None and noise else 0.0
        extra = queue * rng.random() if rng is not None and queue else 0.0
        estimator.add(Sample(KIND_PUSH, size, rtt + 8 * size / bandwidth + abs(jitter) + extra, t))
        if i % rate_hz == 0:
            estimator.add(Sample(KIND_PING, 0, rtt + (abs(rng.normal(0, noise)) if rng is not None and noise else 0), t))
            estimator.add(Sample(KIND_COMPUTE, 0, compute, t))


def test_theil_sen_recovers_a_line_despite_outliers():
    x = np.arange(20, dtype=float)
    y = 3.0 + 2.0 * x
    y[[3, 11]] += 50
    slope, intercept = theil_sen(x, y, min_dx=0.5)
    assert slope == pytest.approx(2.0) and intercept == pytest.approx(3.0)
    assert theil_sen(np.ones(5), np.ones(5), min_dx=0.5) is None


def test_exact_recovery_with_varying_sizes():
    est = LinkEstimator()
    feed(est, bandwidth=20 * MBIT, rtt=0.1, t0=0, t1=5, sizes=[20_000, 60_000, 120_000])
    e = est.estimate(5.0)
    assert e.method == "theil-sen"
    assert e.bandwidth_bps == pytest.approx(20 * MBIT, rel=1e-6)
    assert e.latency_s == pytest.approx(0.1)
    assert e.t_comp_s == pytest.approx(0.02)


def test_equal_sizes_use_per_push_rates():
    est = LinkEstimator()
    feed(est, bandwidth=50 * MBIT, rtt=0.08, t0=0, t1=5, sizes=[100_000])
    e = est.estimate(5.0)
    assert e.method == "per-push-rate"
    assert e.bandwidth_bps == pytest.approx(50 * MBIT, rel=1e-6)


def test_noise_and_queueing_stay_within_ten_percent():
    rng = np.random.default_rng(0)
    est = LinkEstimator()
    feed(est, bandwidth=20 * MBIT, rtt=0.1, t0=0, t1=10, sizes=[40_000, 80_000, 160_000], rng=rng, noise=0.003,
         queue=0.01)
    e = est.estimate(10.0)
    assert e.bandwidth_bps == pytest.approx(20 * MBIT, rel=0.10)
    assert abs(e.latency_s - 0.1) < 0.01


def test_a_step_change_is_followed_within_the_window():
    est = LinkEstimator(EstimatorConfig(window_s=4.0))
    feed(est, bandwidth=40 * MBIT, rtt=0.05, t0=0, t1=20, sizes=[50_000, 100_000, 200_000])
    assert est.estimate(20.0).bandwidth_bps == pytest.approx(40 * MBIT, rel=0.01)
    feed(est, bandwidth=10 * MBIT, rtt=0.05, t0=20, t1=25, sizes=[50_000, 100_000, 200_000])
    assert est.estimate(25.0).bandwidth_bps == pytest.approx(10 * MBIT, rel=0.05)


def test_estimate_changes_no_sample_and_forget_before_drops_what_a_change_left_behind():
    config = EstimatorConfig(window_s=10.0, change_window_s=3.0)
    est = LinkEstimator(config)
    feed(est, bandwidth=40 * MBIT, rtt=0.05, t0=0, t1=20, sizes=[50_000, 100_000, 200_000])
    steady = est.estimate(20.0)
    assert steady.window_start_s == 20.0 - config.window_s
    feed(est, bandwidth=10 * MBIT, rtt=0.05, t0=20, t1=25, sizes=[50_000, 100_000, 200_000])
    samples = list(est._samples)
    changed = est.estimate(25.0)
    assert changed.bandwidth_bps == pytest.approx(10 * MBIT, rel=0.05)
    assert changed.window_start_s == 25.0 - config.change_window_s
    assert list(est._samples) == samples and est.estimate(25.0) == changed  # nothing was dropped
    est.forget_before(changed.window_start_s)
    assert est._samples and all(s.at_s >= changed.window_start_s for s in est._samples)
    assert len(est._samples) == sum(s.at_s >= changed.window_start_s for s in samples)
    assert est.estimate(25.0).bandwidth_bps == pytest.approx(10 * MBIT, rel=0.05)


def test_too_few_samples_give_no_estimate():
    est = LinkEstimator()
    assert est.estimate(0.0) is None
    est.add(Sample(KIND_PUSH, 1000, 0.1, 0.0))
    est.add(Sample(KIND_PING, 0, 0.05, 0.0))
    assert est.estimate(0.0) is None  # min_pushes = 3
    with pytest.raises(ValueError):
        est.add(Sample(KIND_PUSH, 10, -1.0, 0.0))


def feed_probes(estimator, *, up, down, rtt, t0, t1, rng, jitter=0.01, push_bytes=300, probe_s=0.04):
    """Deco at a small delta: tiny pushes every 50 ms, a ping every 0.5 s, probes sized to
    `probe_s` of transfer in each direction every second (as worker/probes.py plans them)."""
    for i, t in enumerate(np.arange(t0, t1, 0.05)):
        estimator.add(Sample(KIND_PUSH, push_bytes, rtt + jitter * rng.random() + 8 * push_bytes / up, t))
        if i % 10 == 0:
            estimator.add(Sample(KIND_PING, 0, rtt + jitter * rng.random(), t))
            estimator.add(Sample(KIND_COMPUTE, 0, 0.02, t))
        if i % 20 == 5:
            size = int(up * probe_s * rng.uniform(0.8, 1.2) / 8)
            estimator.add(Sample(KIND_PING, size, rtt + jitter * rng.random() + 8 * size / up, t,
                                 direction=DIRECTION_UP))
        if i % 20 == 15:
            size = int(down * probe_s * rng.uniform(0.8, 1.2) / 8)
            estimator.add(Sample(KIND_PING, size, rtt + jitter * rng.random() + 8 * size / down, t,
                                 direction=DIRECTION_DOWN))


def test_each_direction_is_estimated_apart_from_its_own_probes_whatever_the_pushes():
    rng = np.random.default_rng(1)
    est = LinkEstimator()
    feed_probes(est, up=5 * MBIT, down=40 * MBIT, rtt=0.1, t0=0, t1=10, rng=rng)
    e = est.estimate(10.0)
    assert e.bandwidth_bps == pytest.approx(5 * MBIT, rel=0.15)  # tiny pushes do not drag it down
    assert e.down_bandwidth_bps == pytest.approx(40 * MBIT, rel=0.15)
    assert e.down_samples >= 3 and e.down_method is not None
    assert e.latency_s == pytest.approx(0.1, abs=0.005)


def test_without_downlink_points_there_is_no_downlink_estimate():
    est = LinkEstimator()
    feed(est, bandwidth=20 * MBIT, rtt=0.1, t0=0, t1=5, sizes=[20_000, 60_000, 120_000])
    for t in range(5):  # one-chunk deltas: nothing timed
        est.add(Sample(KIND_DOWNLOAD, 50_000, 0.0, float(t)))
    e = est.estimate(5.0)
    assert e.bandwidth_bps == pytest.approx(20 * MBIT, rel=1e-6)
    assert e.down_bandwidth_bps is None and e.down_samples == 0


def test_multi_chunk_deltas_time_the_downlink():
    """A delta's bytes after its first chunk arrive at the link's rate; the round trip is added back."""
    est = LinkEstimator()
    feed(est, bandwidth=20 * MBIT, rtt=0.1, t0=0, t1=5, sizes=[20_000, 60_000, 120_000])
    for i, timed in enumerate([1_000_000, 2_000_000, 3_000_000] * 3):
        est.add(Sample(KIND_DOWNLOAD, timed + 1_048_576, 8 * timed / (50 * MBIT), i * 0.5, timed_bytes=timed))
    e = est.estimate(5.0)
    assert e.down_bandwidth_bps == pytest.approx(50 * MBIT, rel=1e-6)
    assert e.bandwidth_bps == pytest.approx(20 * MBIT, rel=1e-6)


def test_a_downlink_change_alone_is_followed():
    rng = np.random.default_rng(2)
    est = LinkEstimator(EstimatorConfig(window_s=10.0, change_window_s=3.0))
    feed_probes(est, up=10 * MBIT, down=40 * MBIT, rtt=0.1, t0=0, t1=20, rng=rng, jitter=0.002)
    assert est.estimate(20.0).down_bandwidth_bps == pytest.approx(40 * MBIT, rel=0.15)
    feed_probes(est, up=10 * MBIT, down=10 * MBIT, rtt=0.1, t0=20, t1=25, rng=rng, jitter=0.002)
    changed = est.estimate(25.0)
    assert changed.down_bandwidth_bps == pytest.approx(10 * MBIT, rel=0.15)
    assert changed.bandwidth_bps == pytest.approx(10 * MBIT, rel=0.15)


def test_a_standing_queue_of_a_few_seconds_is_not_read_as_the_paths_latency():
    """After a link drop the workers' own traffic can keep a queue standing for seconds;
    every ping then waits in it. b stays the path's delay (it is read over 30 s of pings);
    read as latency, DeCo raised tau and sent more, which kept the queue standing."""
    estimator = LinkEstimator()
    for i in range(40):  # 20 s of a 100 ms path
        estimator.add(Sample(KIND_PING, 0, 0.1, i * 0.5))
        estimator.add(Sample(KIND_PUSH, 40_000 * (1 + i % 3), 0.1 + 8 * 40_000 * (1 + i % 3) / 10e6, i * 0.5))
    for i in range(40, 64):  # then 12 s in which every ping waited 0.9 s in a queue
        estimator.add(Sample(KIND_PING, 0, 1.0, i * 0.5))
        estimator.add(Sample(KIND_PUSH, 40_000 * (1 + i % 3), 1.0 + 8 * 40_000 * (1 + i % 3) / 10e6, i * 0.5))
    estimate = estimator.estimate(32.0)
    assert estimate is not None and estimate.latency_s == pytest.approx(0.1)
    # a delay that stays for longer than the latency window is the path's
    for i in range(64, 140):
        estimator.add(Sample(KIND_PING, 0, 1.0, i * 0.5))
        estimator.add(Sample(KIND_PUSH, 40_000, 1.0 + 8 * 40_000 / 10e6, i * 0.5))
    assert estimator.estimate(70.0).latency_s == pytest.approx(1.0)


def test_a_change_of_one_direction_keeps_the_others_estimate():
    """The downlink steps; the uplink's estimate stays the whole window's, not its recent few points'."""
    rng = np.random.default_rng(5)
    est = LinkEstimator()
    feed_probes(est, up=10 * MBIT, down=40 * MBIT, rtt=0.1, t0=0, t1=20, rng=rng, jitter=0.002)
    before = est.estimate(20.0)
    feed_probes(est, up=10 * MBIT, down=10 * MBIT, rtt=0.1, t0=20, t1=25, rng=rng, jitter=0.002)
    after = est.estimate(25.0)
    assert after.down_bandwidth_bps == pytest.approx(10 * MBIT, rel=0.15)
    assert after.push_samples > est.config.change_window_s / 0.05 + 5  # the up estimate read the whole window
    assert after.bandwidth_bps == pytest.approx(before.bandwidth_bps, rel=0.15)


def test_rounds_longer_than_the_window_still_give_an_estimate_from_the_newest_pushes():
    """Dense 8 MB pushes on a 10 Mbit/s link: one every 7-8 s, fewer than min_pushes per 10 s
    window. The window stretches back to the newest three (within max_window_s) and the
    estimate follows the link; a fast start (the first estimate) does not stay."""
    est = LinkEstimator()
    for t in np.arange(0.0, 1.0, 0.2):  # the start: small probes on a fast path
        est.add(Sample(KIND_PUSH, 20_000 + int(t * 1e4), 0.05 + 8 * 20_000 / 80e6, t))
        est.add(Sample(KIND_PING, 0, 0.05, t))
    first = est.estimate(1.0)
    assert first is not None and first.bandwidth_bps > 50 * MBIT
    est.forget_before(first.window_start_s)
    t = 1.0
    for i in range(8):
        size = 8_000_000 + 400_000 * (i % 3)
        seconds = 0.05 + 8 * size / (10 * MBIT)
        t += seconds + 0.5
        est.add(Sample(KIND_PUSH, size, seconds, t))
        est.add(Sample(KIND_PING, 0, 0.05, t))
        estimate = est.estimate(t)
        if i >= 2:  # three dense pushes seen: the last 10 s hold one or two of them
            assert estimate is not None and estimate.bandwidth_bps == pytest.approx(10 * MBIT, rel=0.05)
            assert t - estimate.window_start_s > 10.0
            est.forget_before(estimate.window_start_s)
    # Stretching stops at max_window_s: with no uplink point in that long, no estimate.
    assert est.estimate(t + 61.0) is None


def test_transfers_timed_near_zero_do_not_read_as_a_link_near_infinity():
    """Deltas of 8-80 KB whose one-way transfer came out at microseconds (timed from a base
    delay read while the path was queued, at the start): the line through them and the
    pings has a slope near 0, which read as Tbit/s. Unreadable: no Theil-Sen estimate."""
    rng = np.random.default_rng(3)
    est = LinkEstimator()
    for i in range(40):
        t = i * 0.25
        size = int(rng.integers(8_000, 80_000))
        est.add(Sample(KIND_DOWNLOAD, size, 0.0, t, transfer_s=float(rng.uniform(1e-6, 2e-5)) + size * 1e-12))
        est.add(Sample(KIND_PUSH, 40_000 + 1000 * (i % 5), 0.05 + 8 * 40_000 / 20e6, t))
        est.add(Sample(KIND_PING, 0, 0.05, t, one_way_up_s=0.025))
    estimate = est.estimate(10.0)
    assert estimate is not None and estimate.bandwidth_bps == pytest.approx(20e6, rel=0.1)
    assert estimate.down_method != "theil-sen"
    assert estimate.down_bandwidth_bps is None or estimate.down_bandwidth_bps < 1e9
