"""The controller's decision loop (ControllerCore) on synthetic reports: pure, no network."""
from __future__ import annotations

import dataclasses

import pytest

from wanps.controller.deco import DecoInput, deco
from wanps.controller.engine import ControllerCore, Report, with_policy
from wanps.controller.estimator import KIND_COMPUTE, KIND_DOWNLOAD, KIND_PING, KIND_PUSH, LinkEstimator, Sample
from wanps.controller.policy import PolicyConfig

D = 1_000_000


def link_samples(t: float, bandwidth: float, rtt: float, t_comp: float, sizes=(20_000, 40_000, 80_000),
                 download_factor: float = 1.0) -> tuple[Sample, ...]:
    samples = [Sample(KIND_PING, 0, rtt, t), Sample(KIND_COMPUTE, 0, t_comp, t)]
    for size in sizes:
        samples.append(Sample(KIND_PUSH, size, rtt + 8 * size / bandwidth, t))
        # The union comes down as fast as the push went up (a downlink the estimator can read).
        samples.append(Sample(KIND_DOWNLOAD, int(size * download_factor), 0.0, t,
                              transfer_s=8 * size * download_factor / bandwidth))
    return tuple(samples)


def run(core: ControllerCore, links: dict[int, tuple[float, float, float]], seconds: int, start_round: int = 0,
        rounds_per_s: int = 10, t0: float = 0.0, download_factor: float = 1.0):
    decisions = []
    for s in range(seconds):
        t = t0 + s
        for worker_id, (bandwidth, rtt, t_comp) in links.items():
            report = Report(worker_id, start_round + s * rounds_per_s, D,
                            link_samples(t, bandwidth, rtt, t_comp, download_factor=download_factor))
            decision = core.report(report, t)
            if decision is not None:
                decisions.append(decision)
    return decisions


def test_static_and_dsgd_decide_once_at_round_zero():
    core = ControllerCore(PolicyConfig(name="static", tau=3, delta=0.05))
    first = core.maybe_decide(0.0)
    assert (first.from_round, first.tau, first.delta) == (0, 3, 0.05)
    assert run(core, {1: (10e6, 0.1, 0.02)}, 5) == []
    dsgd = ControllerCore(PolicyConfig(name="dsgd")).maybe_decide(0.0)
    assert (dsgd.tau, dsgd.delta) == (0, 1.0)


def test_deco_bootstraps_then_decides_from_the_slowest_link_ahead_of_the_reported_round():
    core = ControllerCore(PolicyConfig(name="deco", tau=1, delta=0.1, every_rounds=20, switch_margin_rounds=10, link_share=1.0,
                                       switch_margin_s=3.0))
    bootstrap = core.maybe_decide(0.0)
    assert (bootstrap.from_round, bootstrap.tau, bootstrap.delta) == (0, 1, 0.1)
    assert "bootstrap" in bootstrap.reason
    links = {1: (20e6, 0.1, 0.02), 2: (80e6, 0.05, 0.01)}
    decisions = run(core, links, 6)
    assert decisions, "no decision once estimates exist"
    decision = decisions[0]
    expected = deco(DecoInput(num_params=D, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.02, tau_max=8))
    assert (decision.tau, decision.delta) == (expected.tau, pytest.approx(expected.delta, rel=1e-6))
    assert decision.predicted_iter_s == pytest.approx(expected.predicted_iter_s, rel=1e-6)
    # Far enough ahead: at least 3 s of rounds at the measured 10 rounds/s.
    reported_then = core.reported_round
    assert decision.from_round >= 30
    assert decision.from_round <= reported_then + 40


def test_noise_does_not_flap_and_a_real_change_does():
    # No overhead term: the synthetic 10 rounds/s against a 20 ms T_comp would add one.
    policy = PolicyConfig(name="deco", every_rounds=10, delta_hysteresis=0.2, change_threshold=0.2,
                          overhead_max_ratio=0.0)
    core = ControllerCore(policy)
    core.maybe_decide(0.0)
    first = run(core, {1: (20e6, 0.1, 0.02)}, 12)
    assert len(first) == 1  # steady link: one decision, then none despite recomputing every 10 rounds
    changed = run(core, {1: (5e6, 0.1, 0.02)}, 15, start_round=120, t0=12.0)
    assert changed and changed[-1].delta < first[0].delta


def test_after_a_link_change_the_estimator_keeps_only_the_samples_its_estimate_reads():
    core = ControllerCore(PolicyConfig(name="static", tau=1, delta=0.1))
    run(core, {1: (20e6, 0.1, 0.02)}, 12)
    run(core, {1: (5e6, 0.1, 0.02)}, 3, start_round=120, t0=12.0)  # the change shows at t = 14
    estimate = core.estimates[1]
    assert estimate.bandwidth_bps == pytest.approx(5e6, rel=1e-3)
    assert estimate.window_start_s == 14.0 - core.estimator_config.change_window_s
    assert min(s.at_s for s in core.estimators[1]._samples) >= estimate.window_start_s


def test_a_moved_estimate_does_not_replace_a_decision_before_it_takes_effect():
    core = ControllerCore(PolicyConfig(name="deco", every_rounds=1000, change_threshold=0.2, switch_margin_rounds=50,
                                       switch_margin_s=0.0, overhead_max_ratio=0.0))
    core.maybe_decide(0.0)
    first = run(core, {1: (20e6, 0.1, 0.02)}, 4)  # rounds 0-30: the decision holds from round >= 50
    assert len(first) == 1 and first[0].from_round > core.reported_round
    # The link halves while that decision is pending: no new decision yet.
    assert run(core, {1: (5e6, 0.1, 0.02)}, 2, start_round=40, t0=4.0) == []
    # Once the rounds pass its from_round, the move is acted on.
    later = run(core, {1: (5e6, 0.1, 0.02)}, 3, start_round=first[0].from_round, t0=6.0)
    assert later and later[0].delta < first[0].delta


@pytest.mark.parametrize("time_model", ["ps", "paper"])
def test_traffic_factor_prices_the_download(time_model):
    # No overhead term: the synthetic 10 rounds/s against a 20 ms T_comp would otherwise add one.
    core = ControllerCore(PolicyConfig(name="deco", overhead_max_ratio=0.0, time_model=time_model, link_share=1.0))
    core.maybe_decide(0.0)
    decisions = run(core, {1: (20e6, 0.1, 0.02), 2: (20e6, 0.1, 0.02)}, 6, download_factor=2.0)
    assert core.traffic_factor() == pytest.approx(2.0)
    expected = deco(DecoInput(num_params=D, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.02, download_factor=2.0,
                              tau_max=8, time_model=time_model))
    assert decisions[-1].delta == pytest.approx(expected.delta, rel=1e-6)
    if time_model == "paper":  # as before the PS form: the download folded into S_g, one transfer per round
        folded = deco(DecoInput(num_params=D, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.02,
                                bits_per_element=64 * 2.0, tau_max=8, time_model="paper"))
        assert (decisions[-1].tau, decisions[-1].delta) == (folded.tau, pytest.approx(folded.delta, rel=1e-6))


def test_deco_hetero_gives_faster_links_more_delta_and_shares_tau():
    core = ControllerCore(PolicyConfig(name="deco-hetero"))
    core.maybe_decide(0.0)
    decision = run(core, {1: (10e6, 0.1, 0.02), 2: (50e6, 0.1, 0.02)}, 6)[-1]
    assert set(decision.worker_delta) == {1, 2}
    assert decision.worker_delta[2] == pytest.approx(5 * decision.worker_delta[1])  # in proportion to uplinks
    # Within the download budget of the slowest link: the union is what everybody downloads.
    assert sum(decision.worker_delta.values()) == pytest.approx(2 * decision.delta)
    assert decision.delta_for(1) == decision.worker_delta[1]
    assert decision.delta_for(99) == decision.delta


def test_policy_switch_at_run_time_holds_from_a_round_ahead():
    core = ControllerCore(PolicyConfig(name="static", tau=2, delta=0.01))
    core.maybe_decide(0.0)
    run(core, {1: (20e6, 0.1, 0.02)}, 3)
    switched = core.set_policy(with_policy(core.policy, "dsgd"), 3.0)
    assert (switched.tau, switched.delta, switched.policy) == (0, 1.0, "dsgd")
    assert switched.from_round > core.reported_round
    with pytest.raises(ValueError):
        with_policy(core.policy, "nope")


def test_e_infinite_decides_once_on_the_first_estimates():
    core = ControllerCore(PolicyConfig(name="deco", every_rounds=0))
    core.maybe_decide(0.0)
    first = run(core, {1: (20e6, 0.1, 0.02)}, 4)
    assert len(first) == 1 and first[0].policy == "deco"
    assert run(core, {1: (2e6, 0.3, 0.02)}, 10, start_round=40, t0=4.0) == []  # the link changed: no new decision


def test_measured_overhead_joins_t_comp_in_the_decision_and_its_prediction():
    """25 rounds/s (40 ms) against a 20 ms T_comp on hidden links: o = 20 ms, T_step = 40 ms."""
    policy = PolicyConfig(name="deco", tau=2, delta=0.001, every_rounds=20, link_share=1.0, staleness_weight=0.0)
    core = ControllerCore(policy)
    core.maybe_decide(0.0)
    decisions = run(core, {1: (20e6, 0.02, 0.02)}, 30, rounds_per_s=25)
    assert core.overhead_s() == pytest.approx(0.02, rel=0.05)
    expected = deco(DecoInput(num_params=D, bandwidth_bps=20e6, latency_s=0.02, t_comp_s=0.02, tau_max=8,
                              overhead_s=core.overhead_s()))
    last = decisions[-1]
    assert (last.tau, last.delta) == (expected.tau, pytest.approx(expected.delta, rel=0.2))
    assert last.predicted_iter_s == pytest.approx(0.04, rel=0.05)  # the measured 40 ms, not T_comp's 20
    assert "overhead 2" in last.reason
    # The paper's model (no overhead term) decides on T_comp alone.
    plain = ControllerCore(dataclasses.replace(policy, overhead_max_ratio=0.0))
    plain.maybe_decide(0.0)
    assert plain.overhead_s() == 0.0
    assert run(plain, {1: (20e6, 0.02, 0.02)}, 30, rounds_per_s=25)[-1].predicted_iter_s == pytest.approx(0.02)


def test_overhead_is_capped_in_the_paper_form_and_not_read_from_link_bound_rounds():
    # 2 rounds/s against a 20 ms step: in the paper's form the cap (one T_comp) holds the overhead at 20 ms.
    core = ControllerCore(PolicyConfig(name="deco", tau=2, delta=0.001, overhead_min_samples=5, time_model="paper"))
    core.maybe_decide(0.0)
    run(core, {1: (20e6, 0.02, 0.02)}, 4, rounds_per_s=2)
    assert 0 < len(core._overhead_samples) < 5 and core.overhead_s() == 0.0  # too few observations yet
    run(core, {1: (20e6, 0.02, 0.02)}, 16, rounds_per_s=2, start_round=8, t0=4.0)
    assert core.overhead_s() == pytest.approx(0.02)
    # The PS form takes the overhead as measured: 500 ms rounds on hidden links, o = 480 ms.
    ps = ControllerCore(PolicyConfig(name="deco", tau=2, delta=0.001, overhead_min_samples=5))
    ps.maybe_decide(0.0)
    run(ps, {1: (20e6, 0.02, 0.02)}, 20, rounds_per_s=2)
    assert ps.overhead_s() == pytest.approx(0.48)
    # ... unless a cap is set.
    capped = ControllerCore(PolicyConfig(name="deco", tau=2, delta=0.001, overhead_min_samples=5,
                                         overhead_max_ratio=2.0))
    capped.maybe_decide(0.0)
    run(capped, {1: (20e6, 0.02, 0.02)}, 20, rounds_per_s=2)
    assert capped.overhead_s() == pytest.approx(0.04)
    # static with a delta the link cannot carry in a step: the rounds wait on the link, no observation.
    static = ControllerCore(PolicyConfig(name="static", tau=2, delta=0.4))
    static.maybe_decide(0.0)
    run(static, {1: (20e6, 0.02, 0.02)}, 20, rounds_per_s=2)
    assert static.overhead_s() == 0.0 and not static._overhead_samples



def test_overhead_is_read_on_the_link_as_measured_not_on_the_share_deco_keeps_busy():
    """delta 0.004 on a 20 Mbit/s link carries a round in 13 ms, under the 20 ms step; on the
    quarter DeCo keeps busy it would take 51 ms. The rounds (40 ms) do not wait on the link,
    so they are overhead observations: 20 ms."""
    core = ControllerCore(PolicyConfig(name="static", tau=2, delta=0.004, link_share=0.25, overhead_min_samples=3))
    core.maybe_decide(0.0)
    run(core, {1: (20e6, 0.02, 0.02)}, 12, rounds_per_s=25)
    assert len(core._overhead_samples) >= 3
    assert core.overhead_s() == pytest.approx(0.02, rel=0.05)

def test_overhead_observations_span_decision_switches_weighted_by_rounds():
    """Decisions switching every 20 rounds (as on a noisy link) still give observations."""
    core = ControllerCore(PolicyConfig(name="deco", tau=2, delta=0.001))
    core.maybe_decide(0.0)
    core.num_params = D
    for t in range(20):
        round_ = 25 * t  # 40 ms per round against a 20 ms T_comp: o = 20 ms
        core._history.append(core.book.add(round_, 4, 0.001 * (1 + t % 2), "deco", "test"))
        for sample in link_samples(float(t), 20e6, 0.02, 0.02):
            core.estimators.setdefault(1, LinkEstimator()).add(sample)
        core.estimates[1] = core.estimators[1].estimate(float(t))
        core._progress.append((float(t), round_))
        core.sample_overhead(float(t))
    assert len(core._overhead_samples) >= 15
    assert core.overhead_s() == pytest.approx(0.02, rel=0.05)
    spans = core._decisions_over(30, 80)
    assert [rounds for _, rounds in spans] == [20, 25, 5] and sum(r for _, r in spans) == 50


def norm_report(worker_id: int, round_: int, norm: float, t: float) -> Report:
    samples = tuple(Sample(KIND_COMPUTE, 0, 0.02, t, round=r, grad_norm=norm) for r in range(round_ - 9, round_ + 1))
    return Report(worker_id, round_, D, samples)


def test_accordion_uses_light_compression_only_in_critical_regimes():
    core = ControllerCore(PolicyConfig(name="accordion", every_rounds=10, accordion_deltas=(0.01, 0.1),
                                       accordion_eta=0.5))
    assert core.maybe_decide(0.0).tau == 2  # bootstrap
    decisions = []
    # Rounds 0-29: the norm halves between intervals 0 and 1 (critical), then stays (not critical).
    for step, norm in enumerate([4.0, 1.0, 1.0, 1.0]):
        decision = core.report(norm_report(1, 10 * step + 9, norm, float(step)), float(step))
        decisions.append(decision)
    assert core.grad_norm_change() == pytest.approx(0.0)
    made = [d for d in decisions if d is not None]
    assert [(d.tau, d.delta) for d in made] == [(0, 0.1), (0, 0.01)]
    assert "critical" in made[0].reason


def test_grad_norm_buckets_behind_the_window_are_pruned_before_use():
    """Found by fuzzing: samples of an old and a recent round in one report made accordion's
    view read a bucket it had just pruned (KeyError -> the RPC failed with UNKNOWN)."""
    core = ControllerCore(PolicyConfig(name="accordion", every_rounds=1))
    core.report(Report(1, 30, 100, ()), 0.0)
    norm = lambda r: Sample(kind=KIND_COMPUTE, nbytes=0, seconds=0.01, at_s=0.0, round=r, grad_norm=1.0)  # noqa: E731
    core.report(Report(1, 30, 100, (norm(0), norm(20), norm(10**6))), 1.0)
    assert core.grad_norm_change() is None
    assert all(b >= 28 for b in core._norms)  # older ones pruned
    assert 10**6 not in core._norms  # far ahead of every reported round: not counted


def pushes_of(t: float, bandwidth: float, rtt: float, t_comp: float, bytes_per_element: float,
              elements=(2_000, 5_000, 10_000)) -> tuple[Sample, ...]:
    """A round's samples whose pushes carry `elements` at `bytes_per_element` (payload bytes, as workers report)."""
    samples = [Sample(KIND_PING, 0, rtt, t), Sample(KIND_COMPUTE, 0, t_comp, t)]
    for count in elements:
        size = int(count * bytes_per_element)
        samples.append(Sample(KIND_PUSH, size, rtt + 8 * size / bandwidth, t, elements=count))
    return tuple(samples)


def test_deco_prices_a_sent_element_at_its_measured_wire_cost():
    # float16 values with uint32 indices: 6 bytes, 48 bits per element.
    core = ControllerCore(PolicyConfig(name="deco", overhead_max_ratio=0.0, link_share=1.0))
    core.maybe_decide(0.0)
    assert core.bits_per_element() == 64  # nothing pushed yet: uint32 index + float32 value
    decisions = []
    for s in range(6):
        decision = core.report(Report(1, s * 10, D, pushes_of(float(s), 20e6, 0.1, 0.02, 6.0)), float(s))
        decisions += [decision] if decision else []
    assert core.bits_per_element() == pytest.approx(48)
    expected = deco(DecoInput(num_params=D, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.02,
                              bits_per_element=core.bits_per_element(), tau_max=8))
    assert decisions[-1].delta == pytest.approx(expected.delta, rel=1e-6)
    assert f"{core.bits_per_element():.1f} bits/element" in decisions[-1].reason
    # A cheaper codec lets the same link carry more elements per round.
    fp32 = deco(DecoInput(num_params=D, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.02, tau_max=8))
    assert decisions[-1].delta > fp32.delta


def test_dense_pushes_and_skips_do_not_count_as_the_sparse_wire_cost():
    core = ControllerCore(PolicyConfig(name="deco"))
    dense = Sample(KIND_PUSH, 4 * D, 1.0, 0.0, elements=D)  # every element, no index: 32 bits
    skip = Sample(KIND_PUSH, 40, 0.1, 0.0, elements=0)
    core.report(Report(1, 0, D, (dense, skip)), 0.0)
    assert core.bits_per_element() == 64
    core.report(Report(1, 1, D, (Sample(KIND_PUSH, 4 * 1000, 0.1, 1.0, elements=1000),)), 1.0)  # a random block
    assert core.bits_per_element() == pytest.approx(32)


def test_a_configured_wire_cost_overrides_the_measured_one():
    core = ControllerCore(PolicyConfig(name="deco", bits_per_element=32))
    core.report(Report(1, 0, D, pushes_of(0.0, 20e6, 0.1, 0.02, 6.0)), 0.0)
    assert core.bits_per_element() == 32
    with pytest.raises(ValueError):
        PolicyConfig(name="deco", bits_per_element=0.0)


def test_deco_plans_on_the_link_share_of_each_estimate():
    """Headroom: DeCo's choice fills the link it plans on, so it plans on `link_share` of it."""
    decisions = {}
    for share in (1.0, 0.8):
        core = ControllerCore(PolicyConfig(name="deco", overhead_max_ratio=0.0, link_share=share))
        core.maybe_decide(0.0)
        decisions[share] = run(core, {1: (20e6, 0.1, 0.02)}, 6)[0]
    # the download, priced on the uplink's estimate until measured, shares the same scale
    expected = deco(DecoInput(num_params=D, bandwidth_bps=0.8 * 20e6, latency_s=0.1, t_comp_s=0.02, tau_max=8,
                              download_factor=1.0, down_bandwidth_bps=0.8 * 20e6))
    assert decisions[0.8].delta == pytest.approx(expected.delta, rel=1e-6)
    assert decisions[0.8].delta < decisions[1.0].delta
    with pytest.raises(ValueError, match="link_share"):
        PolicyConfig(link_share=0.0)


def test_a_switch_after_a_slowdown_is_scheduled_at_the_new_speed():
    """After training slows (a link drop), the margin counts rounds at the recent speed: at
    the last 10 s's (mostly fast) speed the switch would land many seconds late."""
    core = ControllerCore(PolicyConfig(name="deco", switch_margin_rounds=1, switch_margin_s=2.0))
    t, round_ = 0.0, 0
    for _ in range(8):  # 8 s at 50 rounds/s
        core.report(Report(1, round_, D, ()), t)
        t, round_ = t + 1.0, round_ + 50
    for _ in range(4):  # then 4 s at 5 rounds/s
        core.report(Report(1, round_, D, ()), t)
        t, round_ = t + 1.0, round_ + 5
    margin = core.switch_round() - core.reported_round
    assert margin == 10  # 2 s at 5 rounds/s, not 2 s at the 10 s window's ~20 rounds/s


def test_a_downlink_without_points_in_the_window_keeps_its_last_measurement():
    """On a congested downlink the deltas are what is stuck: no point in the window must not
    make DeCo take the uplink's speed for it."""
    core = ControllerCore(PolicyConfig(name="deco"))
    core.maybe_decide(0.0)
    for s in range(4):
        samples = list(link_samples(float(s), 20e6, 0.1, 0.02))
        samples += [Sample(KIND_PING, size, 0.1 + 8 * size / 3e6, float(s), direction="down")
                    for size in (30_000, 60_000, 90_000)]
        core.report(Report(1, s * 10, D, tuple(samples)), float(s))
    assert core.estimates[1].down_bandwidth_bps == pytest.approx(3e6, rel=0.05)
    for s in range(4, 20):  # the window then holds no downlink point
        core.report(Report(1, s * 10, D, tuple(x for x in link_samples(float(s), 20e6, 0.1, 0.02)
                                               if x.kind != KIND_DOWNLOAD)), float(s))
    held = core.estimates[1]
    assert held.down_bandwidth_bps == pytest.approx(3e6, rel=0.05) and held.down_method == "held"
    assert held.bandwidth_bps == pytest.approx(20e6, rel=0.05)


def test_the_overhead_the_workers_measured_is_taken_over_the_one_inferred_from_round_times():
    """Inferred from round times, a link that binds reads as overhead (and DeCo, planning on
    it, then fills the link: the reading sustains itself). Measured by the workers, it cannot."""
    core = ControllerCore(PolicyConfig(name="deco"))
    core.maybe_decide(0.0)
    for s in range(6):
        for worker_id, overhead in ((1, 0.004), (2, 0.007)):
            samples = link_samples(float(s), 20e6, 0.1, 0.02) + (
                Sample(KIND_COMPUTE, 0, 0.02, float(s), overhead_s=overhead),)
            core.report(Report(worker_id, s * 10, D, samples), float(s))
    assert core.estimates[1].overhead_s == pytest.approx(0.004) and core.overhead_s() == pytest.approx(0.007)
    # a worker that does not measure it: back to the inferred overhead
    core.report(Report(3, 60, D, link_samples(6.0, 20e6, 0.1, 0.02)), 6.0)
    assert core.estimates[3].overhead_s is None and core.overhead_s() != pytest.approx(0.007)


def test_rounds_longer_than_the_workers_own_step_hide_the_latency_with_fewer_rounds_in_flight():
    """The workers measure 7 ms of overhead on a 7 ms T_comp, but the cluster runs 40 rounds/s
    (25 ms: shared cores, the server waiting on the slowest push) with the links far from
    busy. The latency (100 ms) then hides behind 25 ms rounds: tau 4-5, not tau_max."""
    core = ControllerCore(PolicyConfig(name="deco", every_rounds=20, overhead_min_samples=5))
    core.maybe_decide(0.0)
    for s in range(20):
        for worker_id in (1, 2):
            samples = link_samples(float(s), 20e6, 0.1, 0.007) + (
                Sample(KIND_COMPUTE, 0, 0.007, float(s), overhead_s=0.007),)
            core.report(Report(worker_id, s * 40, D, samples), float(s))
    assert core.overhead_s() == pytest.approx(0.007)  # the workers' own: T_step 14 ms
    floor = core.round_floor_s()
    # T_comp + the median overhead seen in round times: the whole round once tau hides the
    # latency (25 ms), less while a small tau made the chain what bound them.
    assert 0.014 < floor <= 0.025 + 1e-9
    view = core.view()
    assert view.round_floor_s == floor
    last = core.book.relevant(0)[-1]
    without = deco(DecoInput(num_params=D, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.007, tau_max=8,
                             overhead_s=0.007))
    assert without.tau == 8  # hiding 100 ms behind 14 ms rounds
    assert last.tau < without.tau
    assert "ms measured)" in last.reason
    # The paper's model (no overhead term) has no floor either.
    plain = ControllerCore(PolicyConfig(name="deco", overhead_max_ratio=0.0))
    assert plain.round_floor_s() is None


def test_rounds_bound_by_a_slow_downlink_deco_hetero_leaves_out_are_not_read_as_a_round_floor():
    """deco-hetero prices its decision without the slow downlink (it may get its own
    fraction); while that downlink carries the union it binds the rounds, and inferring the
    overhead on the faster ones read 0.5 s rounds as overhead: a floor of 0.5 s took tau to 0."""
    core = ControllerCore(PolicyConfig(name="deco-hetero", overhead_min_samples=5))
    core.maybe_decide(0.0)
    for s in range(30):
        t = float(s)
        for worker_id in (1, 2, 3, 4):
            down = 1e6 if worker_id == 4 else 20e6
            samples = [Sample(KIND_PING, 0, 0.1, t, one_way_up_s=0.05), Sample(KIND_COMPUTE, 0, 0.06, t, overhead_s=0.01)]
            for size in (20_000, 40_000, 80_000):
                samples.append(Sample(KIND_PUSH, size, 0.1 + 8 * size / 20e6, t, transfer_s=8 * size / 20e6))
                samples.append(Sample(KIND_DOWNLOAD, 3 * size, 0.0, t, transfer_s=8 * 3 * size / down))
            core.report(Report(worker_id, s * 2, D, tuple(samples)), t)  # 2 rounds a second: 0.5 s rounds
    assert core.estimates[4].down_bandwidth_bps == pytest.approx(1e6, rel=0.1)
    assert core.round_floor_s() is None or core.round_floor_s() < 0.2
    assert all(d.tau >= 1 for d in core.book.relevant(0))


def test_no_overhead_is_inferred_while_a_downlink_is_not_measured():
    """Until a downlink has points of its own it is taken as fast as its uplink; rounds that
    waited on it (a slow one) would read as overhead, and as a round floor that put tau at 0."""
    core = ControllerCore(PolicyConfig(name="deco", delta=0.0001, overhead_min_samples=1))
    core.maybe_decide(0.0)
    for s in range(12):
        t = float(s)
        for worker_id in (1, 2):
            samples = [Sample(KIND_PING, 0, 0.1, t), Sample(KIND_COMPUTE, 0, 0.06, t, overhead_s=0.01)]
            for size in (20_000, 40_000, 80_000):
                samples.append(Sample(KIND_PUSH, size, 0.1 + 8 * size / 20e6, t))
                # worker 2's deltas carry no timing yet: its downlink has no estimate
                samples.append(Sample(KIND_DOWNLOAD, 2 * size, 0.0, t,
                                      transfer_s=8 * 2 * size / 20e6 if worker_id == 1 else 0.0))
            core.report(Report(worker_id, s * 2, D, tuple(samples)), t)  # 0.5 s rounds
    assert core.estimates[2].down_bandwidth_bps is None
    assert not core._overhead_samples and core.round_floor_s() is None
    # Measured both ways, the same rounds are observations again.
    for s in range(12, 16):
        t = float(s)
        for worker_id in (1, 2):
            core.report(Report(worker_id, s * 2, D, link_samples(t, 20e6, 0.1, 0.06, download_factor=2.0)), t)
    assert core.estimates[2].down_bandwidth_bps is not None and core._overhead_samples


def test_rounds_that_waited_on_a_worker_not_reporting_yet_are_no_overhead():
    """Three workers report 2 rounds/s on fast links (a 20 ms step), waiting on a fourth that is
    still pulling the model: 0.48 s of overhead as far as the three can tell. Once the fourth
    reports, those observations go, and the round floor comes from the rounds after it."""
    policy = PolicyConfig(name="deco", tau=2, delta=0.001, overhead_min_samples=3)
    core = ControllerCore(policy)
    core.maybe_decide(0.0)
    fast = (20e6, 0.02, 0.02)
    run(core, {1: fast, 2: fast, 3: fast}, 12, rounds_per_s=2)
    assert core.round_floor_s() == pytest.approx(0.5, rel=0.05)  # the wait, read as overhead
    run(core, {1: fast, 2: fast, 3: fast, 4: fast}, 8, start_round=24, rounds_per_s=25, t0=12.0)
    assert core.round_floor_s() is None and not core._overhead_samples  # no window after the join yet
    run(core, {1: fast, 2: fast, 3: fast, 4: fast}, 12, start_round=224, rounds_per_s=25, t0=20.0)
    assert core.round_floor_s() == pytest.approx(0.04, rel=0.05)  # 25 rounds/s
    # A worker that leaves takes its share of the rounds with it: the observations start again.
    core.forget(4, 32.0)
    assert not core._overhead_samples and core.round_floor_s() is None
