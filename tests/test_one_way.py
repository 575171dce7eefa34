"""One-way timing (worker/one_way.py) and the estimates it feeds (controller/estimator.py).

A simulated link with its own clock offset: the uplink's transfers are recovered from the
server's stamps whatever queueing the acknowledgements meet on the way back, which is what
made round-trip-timed pushes read a 10 Mbit/s link as 3-5 (docs/benchmarks.md).
"""
from __future__ import annotations

import random

import pytest

from wanps.controller.estimator import KIND_DOWNLOAD, KIND_PING, KIND_PUSH, LinkEstimator, Sample
from wanps.worker.one_way import MIN_TRANSFER_S, OneWayClock

MBIT = 1e6
OFFSET_S = 1234.5  # the server's clock minus the worker's
UP_DELAY_S = DOWN_DELAY_S = 0.05


def ns(server_seconds: float) -> int:
    return int(round(server_seconds * 1e9))


def ping(clock: OneWayClock, at: float, up_queue: float = 0.0, down_queue: float = 0.0) -> tuple[float, float]:
    """An unpadded ping sent at `at` (worker clock): (its one-way-up reading, its RTT)."""
    received = at + UP_DELAY_S + up_queue + OFFSET_S
    arrived = at + UP_DELAY_S + up_queue + DOWN_DELAY_S + down_queue
    one_way_up = clock.ping(at, ns(received), arrived)
    assert one_way_up == pytest.approx(UP_DELAY_S + up_queue + OFFSET_S)
    return one_way_up, arrived - at


def test_uploads_are_timed_without_the_way_back() -> None:
    clock = OneWayClock()
    rng = random.Random(3)
    for i in range(5):
        ping(clock, i * 0.1, down_queue=rng.uniform(0, 0.2))
    ping(clock, 0.55)  # one ping found both ways idle: the bases
    rate, t, link_free = 10 * MBIT, 1.0, 0.0
    for size in (20_000, 60_000, 5_000, 120_000, 40_000):
        start = max(t + UP_DELAY_S, link_free)  # on the link: after the previous push's last byte
        link_free = start + 8 * size / rate
        acked = link_free + DOWN_DELAY_S + rng.uniform(0, 0.3)  # the acknowledgement queues behind deltas
        transfer = clock.up_transfer(t, ns(link_free + OFFSET_S), acked)
        assert transfer == pytest.approx(8 * size / rate, abs=1e-6), size
        t += 0.004  # sent back to back: the next push queues behind this one
    assert acked - t > 0.3  # the round trips would have read far slower


def test_downloads_queue_behind_their_own_predecessor() -> None:
    clock = OneWayClock()
    ping(clock, 0.0, up_queue=0.3)  # the way up was busy: the down base is still right
    ping(clock, 0.2)
    rate = 5 * MBIT
    sent, link_free = 1.0, 0.0
    for size in (100_000, 30_000, 250_000):
        start = max(sent + DOWN_DELAY_S, link_free)
        link_free = start + 8 * size / rate
        assert clock.down_transfer(ns(sent + OFFSET_S), link_free, link_free) == pytest.approx(8 * size / rate, abs=1e-6)
        sent += 0.01


def test_replies_handled_out_of_order_still_time_each_transfer() -> None:
    clock = OneWayClock()
    ping(clock, 0.0)
    first_end, second_end = 1.0 + UP_DELAY_S + 0.04, 1.0 + UP_DELAY_S + 0.04 + 0.02
    # the second push's reply is handled first; it still starts after the first's arrival
    assert clock.up_transfer(1.001, ns(second_end + OFFSET_S), 2.0) == pytest.approx(second_end - (1.001 + UP_DELAY_S))
    assert clock.up_transfer(1.0, ns(first_end + OFFSET_S), 2.0) == pytest.approx(0.04)


def test_no_stamp_or_no_ping_yet_measures_nothing() -> None:
    clock = OneWayClock()
    assert clock.ping(0.0, 0, 0.1) is None  # an old server: no stamps
    assert clock.up_transfer(0.0, 0, 0.1) is None
    assert clock.down_transfer(0, 0.1, 0.1) is None
    assert clock.up_transfer(0.0, ns(OFFSET_S + 0.1), 0.2) is None  # no base yet
    ping(clock, 1.0)
    # a transfer below the clocks' jitter is reported, never as 0 ("not measured")
    assert clock.up_transfer(2.0, ns(2.0 + UP_DELAY_S + OFFSET_S - 1e-5), 2.2) == MIN_TRANSFER_S


def test_bases_forget_the_window() -> None:
    clock = OneWayClock(window_s=2.0)
    ping(clock, 0.0)
    # later pings are all 30 ms slower on the way up (the path changed): the old base goes
    for i in range(3):
        received = 5.0 + i * 0.1 + UP_DELAY_S + 0.03 + OFFSET_S
        clock.ping(5.0 + i * 0.1, ns(received), 5.0 + i * 0.1 + UP_DELAY_S + 0.03 + DOWN_DELAY_S)
    transfer = clock.up_transfer(6.0, ns(6.0 + UP_DELAY_S + 0.03 + 0.01 + OFFSET_S), 6.2)
    assert transfer == pytest.approx(0.01)


def test_estimator_reads_the_link_from_one_way_samples_under_queued_acknowledgements() -> None:
    """The failure it fixes: pushes whose round trips wait behind the worker's deltas."""
    rng = random.Random(7)
    rate = 10 * MBIT
    estimator = LinkEstimator()
    naive = LinkEstimator()
    for i in range(40):
        at = i * 0.2
        up_q, down_q = rng.uniform(0, 0.15), rng.uniform(0, 0.15)
        if i % 5 == 0:  # now and then one direction is idle, never both for long
            up_q = 0.0
        if i % 5 == 2:
            down_q = 0.0
        rtt = 2 * UP_DELAY_S + up_q + down_q
        for est in (estimator, naive):
            est.add(Sample(KIND_PING, 0, rtt, at, one_way_up_s=(UP_DELAY_S + up_q + OFFSET_S) if est is estimator else None))
        size = rng.choice((10_000, 40_000, 80_000))
        transfer = 8 * size / rate
        seconds = 2 * UP_DELAY_S + transfer + rng.uniform(0.05, 0.25)  # the ack queued behind deltas
        estimator.add(Sample(KIND_PUSH, size, seconds, at + 0.01, transfer_s=transfer))
        naive.add(Sample(KIND_PUSH, size, seconds, at + 0.01))
        down_size = 4 * size
        estimator.add(Sample(KIND_DOWNLOAD, down_size, 0.0, at + 0.02, transfer_s=8 * down_size / (3 * rate)))
    estimate = estimator.estimate(8.0)
    assert estimate is not None
    assert estimate.bandwidth_bps == pytest.approx(rate, rel=0.05)
    assert estimate.down_bandwidth_bps == pytest.approx(3 * rate, rel=0.05)
    # each direction's quantile: the round trip without queueing, though few pings saw it
    assert estimate.latency_s == pytest.approx(2 * UP_DELAY_S, abs=0.01)
    naive_estimate = naive.estimate(8.0)
    assert naive_estimate is not None and naive_estimate.latency_s > 2 * UP_DELAY_S + 0.02
