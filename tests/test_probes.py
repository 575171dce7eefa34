"""The probe plan (wanps.worker.probes): when a direction is probed, how big, and how often. Pure."""
from __future__ import annotations

import numpy as np
import pytest

from wanps.worker.probes import DOWN, UP, ProbeConfig, ProbePlanner

MBIT = 1e6


def simulate(planner: ProbePlanner, *, rate_bps: float, rtt: float, jitter: float, seconds: float,
             push_bytes: int = 0, t0: float = 0.0, seed: int = 0) -> list[tuple[float, str, int, float]]:
    """The ping loop against a link: a ping every 0.5 s, a push per tick, then the probes due.

    Returns the probes sent as (time, direction, bytes, transfer seconds)."""
    rng = np.random.default_rng(seed)
    sent = []
    for tick in range(int(seconds / 0.5)):
        now = t0 + 0.5 * tick
        planner.rtt(rtt + jitter * rng.random(), now)
        if push_bytes:
            planner.traffic(UP, push_bytes, rtt + jitter * rng.random() + 8 * push_bytes / rate_bps, now,
                            round_trip=True)
        for direction in (UP, DOWN):
            size = planner.plan(direction, now)
            if size:
                transfer = 8 * size / rate_bps
                planner.probe_done(direction, size, rtt + jitter * rng.random() + transfer, now)
                sent.append((now, direction, size, transfer))
    return sent


def test_nothing_is_probed_before_a_round_trip_is_known():
    planner = ProbePlanner()
    assert planner.plan(UP, 0.0) == 0 and planner.plan(DOWN, 0.0) == 0
    planner.rtt(0.1, 0.0)
    assert planner.plan(UP, 0.0) == ProbeConfig().start_bytes


def test_the_target_transfer_is_several_rtt_jitters():
    planner = ProbePlanner(ProbeConfig(jitter_multiple=4.0, min_transfer_s=0.01))
    for i, rtt in enumerate([0.100, 0.105, 0.110, 0.115, 0.120] * 4):
        planner.rtt(rtt, float(i))
    spread = np.quantile([0.100, 0.105, 0.110, 0.115, 0.120] * 4, 0.9) - np.quantile([0.1, 0.105, 0.11, 0.115, 0.12] * 4, 0.1)
    assert planner.target_transfer_s(20.0) == pytest.approx(4 * spread)
    quiet = ProbePlanner(ProbeConfig(min_transfer_s=0.01))
    for i in range(5):
        quiet.rtt(0.1, float(i))
    assert quiet.target_transfer_s(5.0) == 0.01  # no jitter: the floor


def test_a_probe_lost_in_the_jitter_doubles_and_a_readable_one_sizes_the_next_to_the_link():
    planner = ProbePlanner(ProbeConfig(min_transfer_s=0.02, start_bytes=4096, min_bytes=1024))
    planner.rtt(0.1, 0.0)
    assert planner.plan(UP, 0.0) == 4096
    planner.probe_done(UP, 4096, 0.1005, 0.0)  # 0.5 ms of transfer: unreadable against a 20 ms target
    assert planner.plan(UP, 0.5) == 8192
    planner.probe_done(UP, 8192, 0.1 + 8 * 8192 / (2 * MBIT), 0.5)  # 33 ms at 2 Mbit/s: readable
    # Held back: 33 ms of link time at 5% is 0.66 s.
    assert planner.plan(UP, 1.0) == 0
    assert planner.plan(UP, 1.2) == pytest.approx(2 * MBIT * 0.02 / 8, rel=1e-6)  # 20 ms at 2 Mbit/s
    assert planner.plan(DOWN, 1.2) == 4096  # the other direction has its own plan


def test_traffic_that_measures_the_link_is_not_probed():
    planner = ProbePlanner(ProbeConfig(min_transfer_s=0.02))
    sent = simulate(planner, rate_bps=10 * MBIT, rtt=0.1, jitter=0.002, seconds=10, push_bytes=100_000)  # 80 ms each
    assert not [p for p in sent if p[1] == UP]
    assert [p for p in sent if p[1] == DOWN], "downloads were not timed: the downlink needs probes"
    # Timed downloads long enough stop the down probes too.
    fresh = ProbePlanner(ProbeConfig(min_transfer_s=0.02))
    fresh.rtt(0.1, 0.0)
    assert fresh.plan(DOWN, 0.0) > 0
    for i in range(5):
        fresh.traffic(DOWN, 100_000, 0.08, i * 0.1, round_trip=False)
    assert fresh.plan(DOWN, 0.5) == 0


@pytest.mark.parametrize("rate_mbit, jitter", [(5, 0.002), (5, 0.03), (50, 0.01), (1, 0.05)])
def test_probes_are_readable_and_take_at_most_five_percent_of_the_link(rate_mbit, jitter):
    config = ProbeConfig()
    planner = ProbePlanner(config)
    rate = rate_mbit * MBIT
    sent = simulate(planner, rate_bps=rate, rtt=0.1, jitter=jitter, seconds=60, push_bytes=200)  # tiny pushes
    for direction in (UP, DOWN):
        probes = [p for p in sent if p[1] == direction]
        assert len(probes) >= 10, f"too few {direction} probes to estimate from"
        # The link time the probes took, over the run (the first probes ramp up from start_bytes).
        assert sum(8 * size / rate for _, _, size, _ in probes) <= config.max_share * 60 * 1.05
        # Once ramped up, each transfer stands out of the jitter.
        target = max(config.min_transfer_s, config.jitter_multiple * jitter * 0.8)
        settled = probes[len(probes) // 2 :]
        assert all(transfer >= target / 2 for *_, transfer in settled)


def test_a_faster_link_is_followed_by_doubling():
    planner = ProbePlanner(ProbeConfig(min_transfer_s=0.02))
    simulate(planner, rate_bps=2 * MBIT, rtt=0.1, jitter=0.001, seconds=20, push_bytes=200)
    sent = simulate(planner, rate_bps=40 * MBIT, rtt=0.1, jitter=0.001, seconds=20, push_bytes=200, t0=20.0)
    ups = [p for p in sent if p[1] == UP]
    assert ups[-1][3] >= 0.01  # readable again at 20x the rate


def test_a_link_too_fast_to_read_is_probed_rarely():
    config = ProbeConfig(min_transfer_s=0.01, saturated_interval_s=5.0)
    planner = ProbePlanner(config)
    sent = simulate(planner, rate_bps=100_000 * MBIT, rtt=0.0002, jitter=0.0001, seconds=30)  # loopback
    ups = [p for p in sent if p[1] == UP]
    assert ups[-1][2] == config.max_bytes
    at_max = [t for t, _, size, _ in ups if size == config.max_bytes]
    assert len(at_max) <= 30 / 5.0 + 1 and all(b - a >= 5.0 for a, b in zip(at_max, at_max[1:]))


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError):
        ProbeConfig(max_share=0.0)
    with pytest.raises(ValueError):
        ProbeConfig(max_bytes=2**30)
