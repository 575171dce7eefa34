"""deco-hetero's downlink fractions (controller/policy.py, `hetero_proposal`): pure, no network.

The condition the policy is for: four workers on 20 Mbit/s uplinks, three with 20 Mbit/s
downlinks and one with 3 Mbit/s. Each uncompressed follower downloads the union of all
selections; the slow one gets its own downlink fraction instead of dragging every delta down.
"""
from __future__ import annotations

import dataclasses

import pytest

from wanps.controller.deco import deco
from wanps.controller.engine import ControllerCore
from wanps.controller.estimator import LinkEstimate
from wanps.controller.policy import (ClusterView, PolicyConfig, Proposal, deco_input, differs_enough,
                                     pricing_downlink, propose, slow_downlinks)
from wanps.proto.decisions import Decision, decision_from_message, decision_to_message
from tests.test_controller_engine import run

D = 1_100_000  # about the CNN's trainable size
HETERO = PolicyConfig(name="deco-hetero")


def link(up_mbit: float, down_mbit: float | None, rtt_s: float = 0.1, t_comp_s: float = 0.05) -> LinkEstimate:
    return LinkEstimate(bandwidth_bps=up_mbit * 1e6, latency_s=rtt_s, t_comp_s=t_comp_s, push_samples=10,
                        ping_samples=10, method="theil-sen", window_start_s=0.0,
                        down_bandwidth_bps=None if down_mbit is None else down_mbit * 1e6)


def view_of(links: dict[int, LinkEstimate], traffic_factor: float = 3.0) -> ClusterView:
    return ClusterView(round=100, num_params=D, estimates=links, traffic_factor=traffic_factor)


SLOW_DOWN = {1: link(20, 20), 2: link(20, 20), 3: link(20, 20), 4: link(20, 3)}


def test_a_follower_whose_downlink_cannot_carry_the_union_gets_what_it_carries_in_the_round_time():
    view = view_of(SLOW_DOWN)
    proposal = propose(HETERO, view)
    assert set(proposal.worker_downlink_delta) == {4}
    # The decision is DeCo's as if the slow downlink were not there: 20 up, 20 down.
    x = deco_input(view, 20e6, 0.1, 0.05, HETERO, 20e6)
    expected = deco(x)
    assert (proposal.tau, proposal.delta) == (expected.tau, pytest.approx(expected.delta))
    assert proposal.predicted_iter_s == pytest.approx(expected.predicted_iter_s)
    # The union (traffic_factor * delta * S_g) does not fit 3 Mbit/s in the round time; the
    # fraction is what 3 Mbit/s carries in it (on its link share, as DeCo plans every link),
    # at the wire's bits per element.
    union_bits = 3.0 * expected.delta * D * 64
    assert union_bits / 3e6 > expected.predicted_iter_s
    planned_down = 3e6 * HETERO.link_share
    assert proposal.worker_downlink_delta[4] == pytest.approx(expected.predicted_iter_s * planned_down / (D * 64))
    assert proposal.worker_downlink_delta[4] < 3.0 * expected.delta  # less than the union it would get
    # The uplink deltas only fit the uncompressed followers: within n * delta, equal uplinks alike.
    assert sum(proposal.worker_delta.values()) == pytest.approx(4 * proposal.delta)
    assert len({round(d, 12) for d in proposal.worker_delta.values()}) == 1
    assert "downlink fractions: worker 4 " in proposal.reason and "(3.0 Mbit/s down)" in proposal.reason


def test_deco_on_the_same_links_is_bound_by_the_slow_downlink_and_hetero_sends_more():
    view = view_of(SLOW_DOWN)
    plain = propose(PolicyConfig(name="deco"), view)
    hetero = propose(HETERO, view)
    assert not plain.worker_downlink_delta
    assert hetero.delta > 2 * plain.delta  # the 3 Mbit/s downlink no longer sets everybody's delta
    assert "3.0 down" in plain.reason and "20.0 down" in hetero.reason


@pytest.mark.parametrize("links", [
    {1: link(20, 20), 2: link(20, 20), 3: link(20, 20), 4: link(20, 20)},  # symmetric
    {1: link(20, None), 2: link(20, None), 3: link(20, None), 4: link(20, None)},  # no downlink estimate yet
    {1: link(20, 50), 2: link(5, 50), 3: link(20, 40), 4: link(20, 30)},  # heterogeneous uplinks, fast downlinks
])
def test_no_follower_is_compressed_when_every_downlink_keeps_up_with_the_uplinks(links):
    proposal = propose(HETERO, view_of(links))
    assert proposal.worker_downlink_delta == {}
    assert proposal.reason.endswith("downlink fractions: none")


def test_a_missing_downlink_estimate_falls_back_to_the_uplink():
    # Worker 4 has no downlink estimate: its 3 Mbit/s uplink stands for it, well below the
    # others' downlinks, so it is a slow downlink too (a slow worker on a symmetric line
    # downloads the union like the rest): it gets a fraction, and the others price the round.
    links = {1: link(20, 20), 2: link(20, 20), 3: link(20, 20), 4: link(3, None)}
    assert set(propose(HETERO, view_of(links)).worker_downlink_delta) == {4}
    assert pricing_downlink(HETERO, links) == 20e6
    # Alike links, none measured downwards: nobody is slow.
    alike = {1: link(20, None), 2: link(18, None), 3: link(22, None)}
    assert propose(HETERO, view_of(alike)).worker_downlink_delta == {}
    assert pricing_downlink(HETERO, alike) == 18e6
    # A measured slow downlink next to fast ones is one, whatever the uplinks read (a congested
    # downlink holds back its own uplink's acknowledgements: that estimate collapses too).
    links[4] = link(0.2, 3)
    assert slow_downlinks(links) == {4}
    assert pricing_downlink(HETERO, links) == 20e6
    assert pricing_downlink(PolicyConfig(name="deco"), links) == 3e6


def test_a_slow_downlink_that_still_carries_the_union_in_the_round_time_stays_uncompressed():
    # 1.9 Gbit/s down is slower than every uplink, but a dense round (delta 1) takes a tenth
    # of the 0.5 s step on it: DeCo's delta is clamped at 1, the round is compute-bound.
    links = {1: link(2000, 2000, t_comp_s=0.5), 2: link(2000, 1900, t_comp_s=0.5)}
    proposal = propose(HETERO, view_of(links, traffic_factor=1.0))
    assert proposal.delta == 1.0
    assert proposal.worker_downlink_delta == {}


def test_a_downlink_fraction_counts_in_the_hysteresis_like_a_delta():
    config = PolicyConfig(name="deco-hetero", delta_hysteresis=0.2)
    base = Proposal(2, 0.01, "", worker_delta={1: 0.01, 4: 0.01}, worker_downlink_delta={4: 0.004})
    same = dataclasses.replace(base, worker_downlink_delta={4: 0.0044})  # +10%: noise
    moved = dataclasses.replace(base, worker_downlink_delta={4: 0.006})  # +50%
    off = dataclasses.replace(base, worker_downlink_delta={})
    another = dataclasses.replace(base, worker_downlink_delta={4: 0.004, 1: 0.004})
    assert not differs_enough(base, same, config)
    assert differs_enough(base, moved, config)
    assert differs_enough(base, off, config) and differs_enough(off, base, config)
    assert differs_enough(base, another, config)


def test_the_controller_publishes_the_fractions_on_the_decision_and_its_wire_form():
    core = ControllerCore(HETERO)
    core.maybe_decide(0.0)
    run(core, {w: (20e6, 0.1, 0.05) for w in SLOW_DOWN}, 6)  # reports: the training speed is known
    # The estimates as the estimator would read the slow downlink, and a decision that is due.
    core.estimates = dict(SLOW_DOWN)
    core.reported_round += HETERO.every_rounds
    decision = core.maybe_decide(7.0)
    assert decision is not None and set(decision.worker_downlink_delta) == {4}
    assert decision.downlink_delta_for(4) == decision.worker_downlink_delta[4]
    assert decision.downlink_delta_for(1) is None and decision.downlink_delta_for(None) is None
    back = decision_from_message(decision_to_message(decision))
    assert back.worker_downlink_delta == decision.worker_downlink_delta


def test_a_decision_without_the_field_gives_nobody_a_fraction_and_a_bad_fraction_is_refused():
    message = decision_to_message(Decision(1, 0, 2, 0.01, "deco", "", {1: 0.02}))
    assert not message.worker_downlink_delta
    assert decision_from_message(message).downlink_delta_for(1) is None
    message.worker_downlink_delta[1] = 0.0  # 0 on the wire: uncompressed, as if absent
    assert decision_from_message(message).downlink_delta_for(1) is None
    for bad in (1.5, -0.1, float("nan")):
        message.worker_downlink_delta[1] = bad
        with pytest.raises(ValueError, match="downlink delta of worker 1 must be in"):
            decision_from_message(message)


def test_under_the_time_objective_each_worker_sends_what_that_objective_pairs_with_the_shared_tau():
    """At a tau that hides nothing (tau 0, where staleness costs many rounds), delta*(tau) is
    negative: the per-worker deltas come from the objective (`deco.delta_at`), not one element."""
    timed = dataclasses.replace(HETERO, objective="time", staleness_weight=3.0, compression_knee=150.0)
    view = view_of({1: link(20, 20), 2: link(20, 20), 3: link(20, 20), 4: link(5, 20)})
    proposal = propose(timed, view)
    assert proposal.tau == 0
    floor = 1.0 / D
    assert all(delta > 100 * floor for delta in proposal.worker_delta.values())
    assert proposal.worker_delta[4] < proposal.worker_delta[1]  # the slow uplink sends less
    assert sum(proposal.worker_delta.values()) <= 4 * proposal.delta * (1 + 1e-9)
