"""DeCo (Algorithm 1) and Theorem 3 against hand-computed cases and every edge."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess

import pytest

from wanps.controller.deco import (DecoInput, deco, delta_at, delta_for_tau, overhead_sample, phi, predicted_for,
                                   predicted_iteration_time, rounds_factor, sent_delta, tau_range)
from wanps.controller.policy import PolicyConfig
from wanps.deploy.processes import wanps_command


def test_phi_matches_the_formula_and_vanishes_without_compression():
    assert phi(0, 0.5) == pytest.approx(0.5 / 0.5)
    assert phi(2, 0.02) == pytest.approx(0.98 / (0.02 * 0.99**2))
    assert phi(7, 1.0) == 0.0
    with pytest.raises(ValueError):
        phi(1, 0.0)


def test_theorem3_takes_the_largest_of_its_three_terms():
    assert predicted_iteration_time(0.1, 0.3, 0.05, tau=1) == pytest.approx((0.1 + 0.3 + 0.05) / 2)
    assert predicted_iteration_time(0.1, 0.3, 0.05, tau=9) == pytest.approx(0.1)  # compute-bound
    assert predicted_iteration_time(0.1, 0.0, 0.5, tau=9) == pytest.approx(0.5)  # bandwidth-bound


def test_paper_table3_gpt_case():
    """GPT-2 (124M, 32-bit elements as in the paper), a = 0.1 Gbit/s, b = 0.1 s.

    With T_comp = 0.79 s: delta*(tau) = min{(0.79 tau - 0.1) * 0.0252, 0.79 * 0.0252, 1}:
    tau 1 -> 0.0174, phi 56.97; tau 2 -> 0.0199 (the T_comp term binds), phi 50.2;
    tau 3 -> same delta, larger phi. The paper's Table 3 reports (2, 0.02).
    """
    x = DecoInput(num_params=124_000_000, bandwidth_bps=0.1e9, latency_s=0.1, t_comp_s=0.79, bits_per_element=32,
                  tau_max=64, time_model="paper")
    scale = 0.1e9 / (124e6 * 32)
    assert delta_for_tau(x, 1) == pytest.approx((0.79 - 0.1) * scale)
    assert delta_for_tau(x, 2) == pytest.approx(0.79 * scale)
    decision = deco(x)
    assert decision.tau == 2
    assert decision.delta == pytest.approx(0.79 * scale)
    assert round(decision.delta, 2) == 0.02
    assert decision.phi == pytest.approx(phi(2, 0.79 * scale))
    assert decision.tau_range == (1, math.ceil((0.1 + 124e6 * 32 / 0.1e9) / 0.79))
    transfer = decision.delta * 124e6 * 32 / 0.1e9
    assert decision.predicted_iter_s == pytest.approx(max((0.79 + 0.1 + transfer) / 3, transfer, 0.79))
    assert decision.predicted_iter_s == pytest.approx(0.79)  # communication fully hidden


# The paper's Table 3: (model, d, a Gbit/s, b s) -> (tau*, delta*) as printed (two digits).
# The paper does not give T_comp; 0.79 s (GPT-2) and 0.77 s (ViT-B) reproduce every row.
TABLE3 = [("GPT", 124_000_000, 0.79, 0.1, 0.1, 2, 0.02), ("GPT", 124_000_000, 0.79, 0.5, 0.1, 2, 0.10),
          ("GPT", 124_000_000, 0.79, 0.1, 1.0, 3, 0.02), ("GPT", 124_000_000, 0.79, 0.5, 1.0, 3, 0.10),
          ("ViT", 86_000_000, 0.77, 0.1, 0.1, 2, 0.03), ("ViT", 86_000_000, 0.77, 0.5, 0.1, 2, 0.14),
          ("ViT", 86_000_000, 0.77, 0.1, 1.0, 3, 0.03), ("ViT", 86_000_000, 0.77, 0.5, 1.0, 3, 0.14)]


@pytest.mark.parametrize("model, params, t_comp, gbit, latency, tau, delta", TABLE3)
def test_the_paper_form_reproduces_table3(model, params, t_comp, gbit, latency, tau, delta):
    x = DecoInput(num_params=params, bandwidth_bps=gbit * 1e9, latency_s=latency, t_comp_s=t_comp,
                  bits_per_element=32, tau_max=64, time_model="paper")
    decision = deco(x)
    assert (decision.tau, round(decision.delta, 2)) == (tau, delta)
    assert decision.predicted_iter_s == pytest.approx(t_comp)  # communication hidden: T_avg = T_comp
    assert decision.time_model == "paper"


def test_the_ps_form_puts_upload_and_download_in_series_and_each_direction_on_its_own_link():
    """20 Mbit/s up, 40 down, the union 3x a push: c_up = S_g/a_up = 3.2 s, c_down = 3 * 64e6 / 40e6 = 4.8 s."""
    x = DecoInput(num_params=1_000_000, bandwidth_bps=20e6, down_bandwidth_bps=40e6, download_factor=3.0,
                  latency_s=0.1, t_comp_s=0.05)
    c_up, c_down = 64e6 / 20e6, 3 * 64e6 / 40e6
    assert x.transfer_s(0.01) == pytest.approx((0.01 * c_up, 0.01 * c_down))
    assert x.costs_s() == pytest.approx((c_up + c_down, c_down))
    # Serial chain in tau + 1 steps, the busier link (down) within one step.
    assert delta_for_tau(x, 4) == pytest.approx(min((4 * 0.05 - 0.1) / (c_up + c_down), 0.05 / c_down))
    assert tau_range(x) == (2, math.ceil((0.1 + c_up + c_down) / 0.05))
    assert predicted_for(x, 2, 0.01) == pytest.approx(max((0.05 + 0.1 + 0.01 * (c_up + c_down)) / 3, 0.01 * c_down,
                                                          0.05))
    # D-SGD: everything in series, once per round.
    assert predicted_for(x, 0, 1.0) == pytest.approx(0.05 + 0.1 + c_up + c_down)
    decision = deco(x)
    assert decision.time_model == "ps"
    assert decision.delta == pytest.approx(delta_for_tau(x, decision.tau))
    assert decision.predicted_iter_s == pytest.approx(0.05)
    # The paper's form on the same link counts one transfer (the larger): it sends more.
    paper = deco(DecoInput(**{**x.__dict__, "time_model": "paper"}))
    assert paper.delta >= decision.delta
    assert predicted_for(DecoInput(**{**x.__dict__, "time_model": "paper"}), 0, 1.0) == pytest.approx(0.05 + 0.1 + c_down)


def test_the_two_forms_agree_when_the_download_costs_nothing():
    common = dict(num_params=1_000_000, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.04, download_factor=1e-9)
    ps, paper = deco(DecoInput(**common)), deco(DecoInput(**common, time_model="paper"))
    assert (ps.tau, ps.delta, ps.predicted_iter_s) == (paper.tau, pytest.approx(paper.delta),
                                                       pytest.approx(paper.predicted_iter_s))


def test_overhead_is_read_through_the_ps_serial_term():
    x = DecoInput(num_params=1_000_000, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.04)  # symmetric, factor 1
    # tau 0, delta 0.01: serial = T + b + 2 * 32 ms = 0.204 s; measured 0.25 s -> o = 46 ms.
    assert overhead_sample(0.25, x, 0, 0.01) == pytest.approx(0.25 - 0.04 - 0.1 - 0.064)
    # The paper's form would have read 78 ms: the download it leaves out lands in o.
    paper = DecoInput(**{**x.__dict__, "time_model": "paper"})
    assert overhead_sample(0.25, paper, 0, 0.01) == pytest.approx(0.25 - 0.04 - 0.1 - 0.032)


def test_dense_rounds_are_priced_at_their_values_only():
    assert sent_delta(0.01, 64) == 0.01
    assert sent_delta(0.5, 64) == sent_delta(1.0, 64) == 0.5  # 32 of 64 bits per element
    assert sent_delta(1.0, 32) == 1.0


def test_smallest_tau_wins_ties():
    # Huge bandwidth: delta = 1 (phi = 0) for every tau >= ceil(b / T_comp); the smallest is chosen.
    x = DecoInput(num_params=1000, bandwidth_bps=1e12, latency_s=0.25, t_comp_s=0.1)
    decision = deco(x)
    assert (decision.tau, decision.delta, decision.phi) == (3, 1.0, 0.0)


def test_zero_latency_starts_at_tau_one_because_tau_zero_sends_nothing():
    x = DecoInput(num_params=1_000_000, bandwidth_bps=10e6, latency_s=0.0, t_comp_s=0.05)
    assert tau_range(x)[0] == 0
    assert delta_for_tau(x, 0) == 0.0
    decision = deco(x)
    assert decision.tau >= 1 and 0 < decision.delta <= 1
    assert decision.feasible


def test_latency_exactly_a_multiple_of_compute_skips_the_zero_delta_tau():
    x = DecoInput(num_params=1_000_000, bandwidth_bps=20e6, latency_s=0.2, t_comp_s=0.1)
    assert delta_for_tau(x, 2) == 0.0  # 2 * 0.1 - 0.2 = 0
    assert deco(x).tau >= 3


def test_tiny_bandwidth_is_capped_at_tau_max_and_one_element():
    x = DecoInput(num_params=10_000_000, bandwidth_bps=1.0, latency_s=0.05, t_comp_s=0.01, tau_max=8)
    decision = deco(x)
    assert decision.tau <= 8
    assert decision.delta == pytest.approx(1 / 10_000_000)  # at least one element per round
    assert decision.tau_range[1] > 8


def test_tiny_compute_time_beyond_tau_max_falls_back_explicitly():
    x = DecoInput(num_params=100_000, bandwidth_bps=1e7, latency_s=1.0, t_comp_s=1e-4, tau_max=8)
    decision = deco(x)
    assert not decision.feasible
    assert decision.tau == 8
    assert decision.delta == pytest.approx(max(1e-5, 1e-4 * 1e7 / (100_000 * 64)))
    assert "fallback" in decision.reason


def test_tiny_model_sends_everything():
    decision = deco(DecoInput(num_params=1, bandwidth_bps=1e6, latency_s=0.1, t_comp_s=0.05))
    assert decision.delta == 1.0


def test_wire_bits_make_delta_smaller_than_the_papers_32():
    common = dict(num_params=10_000_000, bandwidth_bps=50e6, latency_s=0.1, t_comp_s=0.2)
    assert deco(DecoInput(**common, bits_per_element=64)).delta < deco(DecoInput(**common, bits_per_element=32)).delta


@pytest.mark.parametrize("field, value", [("num_params", 0), ("bandwidth_bps", 0.0), ("latency_s", -1.0),
                                          ("t_comp_s", 0.0), ("bits_per_element", 0.0), ("tau_max", -1),
                                          ("bandwidth_bps", float("inf")), ("overhead_s", -0.001),
                                          ("overhead_s", float("nan")), ("down_bandwidth_bps", 0.0),
                                          ("download_factor", 0.0), ("time_model", "nope")])
def test_invalid_inputs_are_refused(field, value):
    args = dict(num_params=1000, bandwidth_bps=1e6, latency_s=0.1, t_comp_s=0.1)
    args[field] = value
    with pytest.raises(ValueError):
        DecoInput(**args)


def test_decide_cli_prints_both_forms_as_json():
    gpt = ("--params", "124000000", "--bandwidth-mbit", "100", "--latency-ms", "100", "--t-comp-ms", "790",
           "--bits-per-element", "32", "--tau-max", "64")
    done = subprocess.run(wanps_command("controller", "decide", *gpt, "--time-model", "paper"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["tau"] == 2 and round(result["delta"], 2) == 0.02 and result["time_model"] == "paper"
    assert result["predicted_iter_s"] == pytest.approx(0.79)
    # Both forms, whichever is on top; the default is the PS form.
    default = json.loads(subprocess.run(wanps_command("controller", "decide", *gpt), capture_output=True, text=True,
                                        timeout=60).stdout)
    assert default["time_model"] == "ps" and default["forms"] == result["forms"]
    ps = deco(DecoInput(num_params=124_000_000, bandwidth_bps=100e6, latency_s=0.1, t_comp_s=0.79, bits_per_element=32,
                        tau_max=64, staleness_weight=PolicyConfig().staleness_weight))
    assert (default["tau"], default["delta"]) == (ps.tau, pytest.approx(ps.delta))
    # With the paper's phi in both (weight 0), the PS form needs one more tau for the download.
    plain = json.loads(subprocess.run(wanps_command("controller", "decide", *gpt, "--staleness-weight", "0"),
                                      capture_output=True, text=True, timeout=60).stdout)
    assert plain["forms"]["paper"] == result["forms"]["paper"]  # the paper's form never takes the weight
    assert (plain["forms"]["paper"]["tau"], plain["forms"]["ps"]["tau"]) == (2, 3)
    asymmetric = json.loads(subprocess.run(wanps_command("controller", "decide", *gpt, "--down-bandwidth-mbit", "25",
                                                         "--download-factor", "4"),
                                           capture_output=True, text=True, timeout=60).stdout)
    assert asymmetric["delta"] < default["delta"]
    floored = json.loads(subprocess.run(wanps_command("controller", "decide", *gpt, "--round-floor-ms", "1600"),
                                        capture_output=True, text=True, timeout=60).stdout)
    assert floored["forms"]["ps"]["tau"] < default["forms"]["ps"]["tau"]  # rounds twice as long hide b sooner
    cnn = ("--params", "600000", "--bandwidth-mbit", "5", "--download-factor", "3", "--latency-ms", "100",
           "--t-comp-ms", "92", "--overhead-ms", "17")
    taus = [json.loads(subprocess.run(wanps_command("controller", "decide", *cnn, "--staleness-weight", weight),
                                      capture_output=True, text=True, timeout=60).stdout)["tau"] for weight in ("0", "1")]
    assert taus == [3, 2]
    bad = subprocess.run(wanps_command("controller", "decide", "--params", "0", "--bandwidth-mbit", "1",
                                       "--latency-ms", "1", "--t-comp-ms", "1"), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "argument --params: must be >= 1, got 0" in bad.stderr


def test_overhead_is_part_of_the_step_in_theorem3_and_in_algorithm1():
    """o = 10 ms on a 40 ms step: T_step = 50 ms everywhere T_comp was; o = 0 is the paper."""
    common = dict(num_params=1_000_000, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.04, time_model="paper")
    plain, loaded = DecoInput(**common), DecoInput(**common, overhead_s=0.01)
    same = DecoInput(**{**common, "t_comp_s": 0.05})
    assert loaded.step_s == pytest.approx(0.05)
    scale = 20e6 / 64e6
    assert delta_for_tau(loaded, 3) == pytest.approx(min((3 * 0.05 - 0.1) * scale, 0.05 * scale))
    assert tau_range(loaded) == tau_range(same) == (2, math.ceil((0.1 + 3.2) / 0.05))
    assert tau_range(plain) == (3, math.ceil((0.1 + 3.2) / 0.04))
    decision = deco(loaded)
    assert (decision.tau, decision.delta) == (deco(same).tau, pytest.approx(deco(same).delta))
    assert decision.delta > deco(plain).delta  # a longer step hides more bytes
    assert decision.predicted_iter_s == pytest.approx(0.05)  # compute-bound at T_step, not T_comp
    assert deco(plain).predicted_iter_s == pytest.approx(0.04)


def test_prediction_for_any_decision_uses_the_step_and_the_transfer():
    x = DecoInput(num_params=1_000_000, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.04, overhead_s=0.01,
                  time_model="paper")
    # D-SGD: (0.05 + 0.1 + 3.2) / 1; tau 2 delta 0.01: max{(0.05 + 0.1 + 0.032)/3, 0.032, 0.05}.
    assert predicted_for(x, 0, 1.0) == pytest.approx(0.05 + 0.1 + 3.2)
    assert predicted_for(x, 2, 0.01) == pytest.approx((0.05 + 0.1 + 0.032) / 3)
    assert predicted_for(x, 8, 0.01) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        predicted_for(x, 1, 0.0)


def test_overhead_is_read_from_the_serial_term_and_not_from_link_bound_rounds():
    x = DecoInput(num_params=1_000_000, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.04, time_model="paper")
    # tau 8, delta 0.01 (transfer 32 ms): compute-bound, serial term 40 ms; measured 50 ms -> o = 10 ms.
    assert overhead_sample(0.05, x, 8, 0.01) == pytest.approx(0.01)
    # D-SGD: serial term T_comp + b + S_g/a = 3.34 s; measured 3.4 s -> 60 ms.
    assert overhead_sample(3.4, x, 0, 1.0) == pytest.approx(0.06)
    # Faster than the model: no negative overhead.
    assert overhead_sample(0.03, x, 8, 0.01) == 0.0
    # tau 8, delta 0.1 (transfer 320 ms >> 40 ms step): the round waits on the link, o is not visible.
    assert overhead_sample(0.33, x, 8, 0.1) is None
    # DeCo's boundary with o known: transfer = T_comp + o is still an observation.
    known = DecoInput(num_params=1_000_000, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.04, overhead_s=0.01,
                      time_model="paper")
    assert overhead_sample(0.05, known, 8, 0.05 * 20e6 / 64e6) == pytest.approx(0.01)


def test_a_measured_round_floor_hides_latency_with_fewer_rounds_and_keeps_the_throughput_cap():
    base = DecoInput(num_params=1_000_000, bandwidth_bps=20e6, latency_s=0.1, t_comp_s=0.007, overhead_s=0.007,
                     tau_max=8)
    plain = deco(base)
    # No floor, or one at T_step, is Algorithm 1 as before.
    for same in (dataclasses.replace(base, round_floor_s=None), dataclasses.replace(base, round_floor_s=base.step_s)):
        decision = deco(same)
        assert (decision.tau, decision.delta, decision.tau_range) == (plain.tau, plain.delta, plain.tau_range)
    floored = dataclasses.replace(base, round_floor_s=0.025)
    decision = deco(floored)
    # The chain T_step + b + delta*c_s fits in tau + 1 rounds of 25 ms ...
    serial, throughput = floored.costs_s()
    assert (decision.tau + 1) * 0.025 >= base.step_s + 0.1 + decision.delta * serial - 1e-12
    assert decision.tau < plain.tau and decision.feasible
    assert tau_range(floored)[0] == 4  # (tau + 1) 25 ms > 114 ms from tau 4 on
    # ... and the busiest link still carries a round within T_step, not within the longer round.
    assert decision.delta * throughput <= base.step_s + 1e-12
    # Rounds are never predicted shorter than the floor.
    assert predicted_for(floored, decision.tau, decision.delta) >= 0.025
    # A floor below T_step changes nothing: T_step is the shortest round.
    assert deco(dataclasses.replace(base, round_floor_s=0.001)).tau == plain.tau
    with pytest.raises(ValueError, match="round_floor_s"):
        dataclasses.replace(base, round_floor_s=0.0)


def test_a_staleness_weight_prices_tau_that_phi_leaves_free_at_small_delta():
    """The CNN on a 10 Mbit/s link planned on half of it: phi takes tau 3 for its 25% larger
    delta; with each round of staleness priced at (1 + w tau), w = 1, tau 2 wins."""
    x = DecoInput(num_params=600_000, bandwidth_bps=5e6, latency_s=0.1, t_comp_s=0.092, overhead_s=0.017,
                  download_factor=3.0)
    plain = deco(x)
    weighted = deco(dataclasses.replace(x, staleness_weight=1.0))
    assert (plain.tau, weighted.tau) == (3, 2)
    assert weighted.delta == pytest.approx(delta_for_tau(x, 2)) and weighted.delta < plain.delta
    assert weighted.phi == pytest.approx(phi(2, weighted.delta) * 3)
    assert deco(dataclasses.replace(x, staleness_weight=0.0)) == plain  # 0: the paper's phi
    paper = dataclasses.replace(x, time_model="paper")
    assert deco(dataclasses.replace(paper, staleness_weight=1.0)) == deco(paper)  # the paper's form ignores it
    with pytest.raises(ValueError, match="staleness_weight"):
        dataclasses.replace(x, staleness_weight=-1.0)


def test_the_link_share_is_headroom_for_the_throughput_term_not_for_one_rounds_chain():
    """GPT-2 tiny on 8 Mbit/s, b 21 ms, rounds of 33 ms: on a quarter share of the whole
    link, tau 1's chain T_step + b + delta c_s fits two rounds at the delta the busiest link
    carries within its quarter. Planning the chain on the quarter too (the link scaled down)
    left tau 1 room for a quarter of that delta, and DeCo took tau 2."""
    x = DecoInput(num_params=120_576, bandwidth_bps=8e6, latency_s=0.021, t_comp_s=0.021, overhead_s=0.005,
                  round_floor_s=0.033, download_factor=3.0, tau_max=4, staleness_weight=1.0, link_share=0.25)
    split = deco(x)
    scaled = deco(dataclasses.replace(x, bandwidth_bps=2e6, link_share=1.0))
    assert (split.tau, scaled.tau) == (1, 2)
    serial, throughput = x.costs_s()
    assert split.delta == pytest.approx(x.step_s / throughput)  # the quarter binds, not the chain
    assert split.delta * serial < 2 * x.round_s - x.step_s - x.latency_s  # tau 1's chain has room for it
    assert throughput == pytest.approx(dataclasses.replace(x, link_share=1.0).costs_s()[1] * 4)
    assert serial == pytest.approx(dataclasses.replace(x, link_share=1.0).costs_s()[0])
    with pytest.raises(ValueError, match="link_share"):
        dataclasses.replace(x, link_share=0.0)


# ------------------------------------------------------------------ the "time" objective

# GPT-2 tiny as deco measured it on `gpt2-varying` (bench.json's link track): about 9 Mbit/s
# each way, b 22 ms, T_comp 21 ms + 3.6 ms, the union 3.1x a push.
GPT2_TINY_LINK = dict(num_params=120_576, bandwidth_bps=9.2e6, down_bandwidth_bps=9.4e6, latency_s=0.022,
                      t_comp_s=0.0208, overhead_s=0.0036, download_factor=3.1, tau_max=4, link_share=0.25)


def test_the_time_objective_trades_a_slower_round_for_less_staleness_when_staleness_costs_rounds():
    """Algorithm 1 only ever picks a tau that hides communication (here tau 2, rounds at
    T_step). Where a round of staleness costs as many rounds as GPT-2 tiny's did (w ~ 1),
    synchronous rounds (tau 0), more than twice as long, reach the target sooner; where it
    costs little (w 0.05) the time objective agrees with Algorithm 1's tau."""
    phi_choice = deco(DecoInput(**GPT2_TINY_LINK, staleness_weight=1.0))
    assert phi_choice.tau == 2
    costly = deco(DecoInput(**GPT2_TINY_LINK, staleness_weight=1.0, objective="time", compression_knee=150))
    assert costly.tau == 0 and costly.feasible
    x = DecoInput(**GPT2_TINY_LINK, staleness_weight=1.0, objective="time", compression_knee=150)
    assert costly.predicted_iter_s == pytest.approx(predicted_for(x, 0, costly.delta))
    assert costly.predicted_iter_s > 2 * x.step_s  # it waits on the latency, on purpose
    assert costly.phi == pytest.approx(rounds_factor(x, 0, costly.delta) * costly.predicted_iter_s)
    cheap = deco(dataclasses.replace(x, staleness_weight=0.05))
    assert cheap.tau == phi_choice.tau
    assert "time to target" in costly.reason and "w 1" in costly.reason


def test_the_time_objective_is_the_least_rounds_times_seconds_over_every_tau_and_delta():
    x = DecoInput(**GPT2_TINY_LINK, staleness_weight=0.4, objective="time", compression_knee=150)
    chosen = deco(x)
    for tau in range(x.tau_max + 1):
        for delta in (x.min_delta, 1e-4, 3e-4, 1e-3, 2.2e-3, 4e-3, 1e-2, 0.05, 0.3, 1.0):
            probe = rounds_factor(x, tau, delta) * predicted_for(x, tau, sent_delta(delta, x.bits_per_element))
            assert chosen.phi <= probe * (1.0 + 1e-12)


def test_without_a_knee_the_time_objective_sends_the_most_a_round_carries_without_waiting():
    """k0 0, w 0: every delta a round carries in T_step reaches the target as fast; the time
    objective then sends the most of them (as Algorithm 1 does), never one element."""
    x = DecoInput(**GPT2_TINY_LINK, objective="time")
    chosen = deco(x)
    assert chosen.predicted_iter_s == pytest.approx(x.round_s)
    assert chosen.delta == pytest.approx(delta_for_tau(x, chosen.tau), rel=1e-6)
    assert delta_at(x, chosen.tau) == chosen.delta
    # Algorithm 1's delta_at is delta*(tau), one element at least.
    paper = dataclasses.replace(x, objective="phi")
    assert delta_at(paper, 2) == delta_for_tau(paper, 2)
    assert delta_at(paper, 0) == paper.min_delta  # tau 0 hides nothing: one element


@pytest.mark.parametrize("field, value", [("objective", "fastest"), ("compression_knee", -1.0),
                                          ("compression_knee", float("inf"))])
def test_the_objective_and_its_knee_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        DecoInput(**{**GPT2_TINY_LINK, field: value})
    with pytest.raises(ValueError, match=field):
        PolicyConfig(**{field: value})


def test_decide_cli_takes_the_time_objective_and_refuses_a_bad_knee_in_one_line():
    gpt2_tiny = ("--params", "120576", "--bandwidth-mbit", "9.2", "--download-factor", "3.1", "--latency-ms", "22",
                 "--t-comp-ms", "20.8", "--overhead-ms", "3.6", "--tau-max", "4")
    timed = json.loads(subprocess.run(wanps_command("controller", "decide", *gpt2_tiny, "--objective", "time",
                                                    "--staleness-weight", "1.23", "--compression-knee", "51"),
                                      capture_output=True, text=True, timeout=60, check=True).stdout)
    plain = json.loads(subprocess.run(wanps_command("controller", "decide", *gpt2_tiny), capture_output=True,
                                      text=True, timeout=60, check=True).stdout)
    assert (timed["tau"], plain["tau"]) == (0, 2)
    assert "time to target" in timed["reason"] and "min phi" in plain["reason"]
    bad = subprocess.run(wanps_command("controller", "decide", *gpt2_tiny, "--compression-knee", "-1"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].endswith("argument --compression-knee: must be >= 0, got -1")
