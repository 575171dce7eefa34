"""The training benchmark's bookkeeping: speed-ups, Theorem 3 predictions, trace files."""
from __future__ import annotations

import pytest

from wanps.bench.train import (BEST_STATIC, CONDITIONS, QUICK, BenchPlan, deco_ratios, grid_around, grid_text, limit_of,
                               median_time, method_label, num_params_of, predicted_iter_s, predicted_ps_iter_s,
                               run_best_static, rows_from_runs, summarize, used_center, write_down_traces,
                               write_traces)
from wanps.controller.deco import DecoInput, predicted_for
from wanps.linkem.trace import LinkTrace


def row(method, seed, time_s, reached=True):
    return {"condition": "varying", "method": method, "seed": seed, "reached_target": reached,
            "time_to_target_s": time_s if reached else None, "rounds": 100, "bytes_up": 2**20,
            "final_accuracy": 0.97, "measured_iter_s": 0.1, "predicted_iter_s": 0.1}


def test_speedups_use_medians_and_say_when_a_baseline_never_got_there():
    plan = BenchPlan(conditions=("varying",), methods=("dsgd", "static", "deco"), seeds=(0, 1, 2), time_limit_s=300,
                     target_accuracy=0.97, batch_size=64, lr=0.1, out_dir="x")
    rows = [row("deco", s, t) for s, t in enumerate((40, 50, 45))]
    rows += [row("static", s, t) for s, t in enumerate((90, 80, 100))]
    rows += [row("dsgd", s, 0, reached=False) for s in range(3)]
    table = {t["method"]: t for t in summarize(rows, plan)}
    assert table["deco"]["median_time_to_target_s"] == 45
    assert table["static"]["deco_speedup_over_method"] == "2.00x"
    assert table["dsgd"]["median_time_to_target_s"] is None
    assert table["dsgd"]["deco_speedup_over_method"] == "> 6.67x (did not reach)"
    assert (table["deco"]["reached"], table["dsgd"]["reached"]) == ("3/3", "0/3")


def test_prediction_uses_the_slowest_link_and_the_last_decision():
    result = {"per_round": [[0, 0.1, 2, 0.01, None], [1, 0.2, 4, 0.001, 0.9]],
              "controller_state": {"traffic_factor": 2.0, "links": [
                  {"bandwidth_bps": 20e6, "latency_s": 0.1, "t_comp_s": 0.02},
                  {"bandwidth_bps": 10e6, "latency_s": 0.05, "t_comp_s": 0.03}]}}
    transfer = 0.001 * 1000 * 64 * 2.0 / 10e6  # sparse: 64 bits per sent element
    assert predicted_iter_s(result, 1000) == pytest.approx(max((0.03 + 0.1 + transfer) / 5, transfer, 0.03), abs=1e-5)
    assert predicted_iter_s({"per_round": [], "controller_state": {}}, 1000) is None


def test_fixed_conditions_become_one_trace_file_per_worker(tmp_path):
    paths = write_traces(CONDITIONS["hetero"], tmp_path)
    assert len(paths) == 4
    assert LinkTrace.from_csv(paths[3]).at(5.0).bandwidth_mbit == 4
    assert write_traces(CONDITIONS["varying"], tmp_path) == ()
    assert set(QUICK.methods) <= {"dsgd", "static", "deco"}


def test_an_asymmetric_condition_gets_a_downlink_trace_for_the_workers_that_have_one(tmp_path):
    condition = CONDITIONS["cnn-slow-down"]
    up = write_traces(condition, tmp_path)
    down = write_down_traces(condition, tmp_path)
    assert [LinkTrace.from_csv(path).at(1.0).bandwidth_mbit for path in up] == [20, 20, 20, 20]
    assert down[:3] == ("", "", "") and LinkTrace.from_csv(down[3]).at(1.0).bandwidth_mbit == 3
    assert LinkTrace.from_csv(down[3]).at(1.0).delay_ms == 50  # the same delay both ways
    assert write_down_traces(CONDITIONS["hetero"], tmp_path) == ()  # symmetric links: the link's trace both ways


def test_prediction_for_dense_rounds_counts_values_only():
    result = {"per_round": [[0, 0.1, 0, 1.0, None]],
              "controller_state": {"traffic_factor": 1.0, "links": [{"bandwidth_bps": 10e6, "latency_s": 0.1,
                                                                     "t_comp_s": 0.02}]}}
    transfer = 1000 * 32 / 10e6
    assert predicted_iter_s(result, 1000) == pytest.approx(0.02 + 0.1 + transfer, abs=1e-5)
    # The parameter-server form: the push goes up and the delta comes down, in series at tau 0.
    assert predicted_ps_iter_s(result, 1000) == pytest.approx(0.02 + 0.1 + 2 * transfer, abs=1e-5)


def test_the_parameter_server_form_counts_both_directions_for_every_method():
    links = [{"bandwidth_bps": 10e6, "latency_s": 0.1, "t_comp_s": 0.03}]
    result = {"per_round": [[0, 0.1, 2, 0.01, None]], "decisions": [],
              "controller_state": {"traffic_factor": 3.0, "bits_per_element": 48.0, "links": links}}
    upload = 0.01 * 1000 * 48 / 10e6  # the measured wire cost, not the 64-bit default
    download = 3.0 * upload
    assert predicted_ps_iter_s(result, 1000) == pytest.approx(max((0.03 + 0.1 + upload + download) / 3, download, 0.03),
                                                              abs=1e-5)
    # Adaptive runs too (their decisions' own predictions are Theorem 3's column, not this one).
    adaptive = dict(result, decisions=[{"id": 1, "from_round": 0, "tau": 2, "delta": 0.01, "predicted_iter_s": 0.05}])
    assert predicted_ps_iter_s(adaptive, 1000) == predicted_ps_iter_s(result, 1000)


def test_the_ps_prediction_follows_the_estimates_and_decisions_round_by_round():
    """Rounds 0-99 at 0.1 s each; the estimates change at t = 5 s and deco switches at round 50.
    Each round is predicted with `predicted_for` (the controller's function) on the snapshot of
    its time: the slowest link each way, the measured overhead and traffic factor."""
    def snapshot(time_s, up, down):
        return {"time_s": time_s, "round": int(time_s * 10), "traffic_factor": 2.0, "bits_per_element": 64.0,
                "overhead_s": 0.005, "links": [{"bandwidth_bps": up, "down_bandwidth_bps": down, "latency_s": 0.1,
                                                 "t_comp_s": 0.02},
                                                {"bandwidth_bps": 4 * up, "latency_s": 0.05, "t_comp_s": 0.01}]}
    track = [snapshot(0.0, 20e6, 40e6), snapshot(5.0, 5e6, 10e6)]
    per_round = [[r, r * 0.1, 2 if r < 50 else 4, 0.01 if r < 50 else 0.002, None] for r in range(100)]
    result = {"per_round": per_round, "link_track": track, "decisions": []}
    def x(up, down):
        return DecoInput(num_params=1000, bandwidth_bps=up, down_bandwidth_bps=down, latency_s=0.1, t_comp_s=0.02,
                         overhead_s=0.005, download_factor=2.0)
    middle = per_round[10:91]
    expected = [predicted_for(x(20e6, 40e6) if r[1] < 5.0 else x(5e6, 10e6), r[2], r[3]) for r in middle]
    assert predicted_ps_iter_s(result, 1000) == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_the_ps_prediction_prices_a_compressed_followers_download_at_its_own_fraction():
    """deco-hetero: follower 2's downlink (1 Mbit/s) carries its own fraction of the model, not
    the union; the round is the slowest worker's own. Before, every follower was priced with
    the union on the slowest downlink, which no follower carried."""
    links = [{"worker_id": "1", "bandwidth_bps": 20e6, "down_bandwidth_bps": 20e6, "latency_s": 0.1, "t_comp_s": 0.02},
             {"worker_id": "2", "bandwidth_bps": 20e6, "down_bandwidth_bps": 1e6, "latency_s": 0.1, "t_comp_s": 0.02}]
    track = [{"time_s": 0.0, "round": 0, "traffic_factor": 2.0, "bits_per_element": 64.0, "overhead_s": 0.0,
              "links": links}]
    per_round = [[r, r * 0.1, 2, 0.01, None] for r in range(20)]
    hetero = [{"id": 1, "from_round": 0, "tau": 2, "delta": 0.01, "predicted_iter_s": 0.1,
               "worker_delta": {}, "worker_downlink_delta": {"2": 0.001}}]
    d = 100_000
    push = 0.01 * d * 64
    fast = max((0.02 + 0.1 + push / 20e6 + 2 * push / 20e6) / 3, 0.02)
    slow = max((0.02 + 0.1 + push / 20e6 + 0.001 * d * 64 / 1e6) / 3, 0.001 * d * 64 / 1e6, 0.02)
    result = {"per_round": per_round, "link_track": track, "decisions": hetero}
    assert predicted_ps_iter_s(result, d) == pytest.approx(max(fast, slow), abs=1e-6)
    # Without the fraction the slow follower downloads the union, as every follower does.
    shared = {"per_round": per_round, "link_track": track, "decisions": [dict(hetero[0], worker_downlink_delta={})]}
    union = max((0.02 + 0.1 + push / 20e6 + 2 * push / 1e6) / 3, 2 * push / 1e6, 0.02)
    assert predicted_ps_iter_s(shared, d) == pytest.approx(union, abs=1e-6)
    assert predicted_ps_iter_s(result, d) < predicted_ps_iter_s(shared, d) / 2


def test_summarize_rebuilds_rows_from_run_folders(tmp_path):
    import json

    from wanps.bench.train import rows_from_runs

    demo = {"reached_target": True, "time_to_target_s": 40.0, "rounds": 100, "bytes_up": 1, "bytes_down": 2,
            "final_accuracy": 0.97, "measured_iter_s": 0.02, "config": {"time_limit_s": 150},
            "per_round": [[r, r * 0.02, 2, 0.01, None] for r in range(20)],
            "decisions": [{"id": 1, "from_round": 0, "tau": 2, "delta": 0.01, "predicted_iter_s": 0.015,
                           "reason": "", "worker_delta": {}}],
            "controller_state": {}, "link_track": []}
    for name in ("fixed-20M-40ms-deco-hetero-1", "fixed-20M-40ms-dsgd-0", "not-a-run"):
        (tmp_path / "bench" / name).mkdir(parents=True)
        (tmp_path / "bench" / name / "demo.json").write_text(json.dumps(demo))
    (tmp_path / "bench" / "fixed-20M-40ms-dsgd-0" / "bench-extra.json").write_text(json.dumps({"load_1min_at_start": 3.5}))
    rows, plan = rows_from_runs(tmp_path)
    assert [r.get("load_1min_at_start") for r in rows] == [None, 3.5]
    assert sorted((r["condition"], r["method"], r["seed"]) for r in rows) == [
        ("fixed-20M-40ms", "deco-hetero", 1), ("fixed-20M-40ms", "dsgd", 0)]
    assert plan.time_limit_s == 150
    assert next(r for r in rows if r["method"] == "deco-hetero")["predicted_iter_s"] == pytest.approx(0.015)


def test_deco_ratios_are_medians_over_the_tracked_estimates():
    links = lambda bw, rtt, tc: [{"bandwidth_bps": bw, "latency_s": rtt, "t_comp_s": tc},
                                 {"bandwidth_bps": 2 * bw, "latency_s": rtt / 2, "t_comp_s": tc / 2}]
    result = {"link_track": [{"links": links(10e6, 0.1, 0.1)}, {"links": links(20e6, 0.1, 0.2)},
                             {"links": links(40e6, 0.1, 0.1)}, {"links": []}]}
    ratios = deco_ratios(result, 1_000_000)
    # b/T_comp: 1.0, 0.5, 1.0; S_g/(a T_comp) at 32 bits: 32, 8, 8.
    assert ratios == {"t_comp_s": 0.1, "b_over_t_comp": 1.0, "sg_over_a_t_comp": 8.0}
    assert deco_ratios({"link_track": [], "controller_state": {}}, 10) is None


def test_the_cnn_conditions_train_the_larger_model():
    assert {CONDITIONS["cnn-varying"].task, CONDITIONS["cnn-fixed-10M-50ms"].task} == {"mnist-cnn"}
    assert num_params_of("mnist-cnn") > 2 * num_params_of("mnist")


def test_a_seed_that_did_not_reach_counts_as_infinitely_slow_in_the_median():
    assert median_time([279.0, None, 118.7]) == 279.0  # not the median of the two that reached
    assert median_time([40.0, None, None]) is None
    assert median_time([40.0, 50.0]) == 45.0
    assert median_time([40.0, None]) is None
    assert median_time([]) is None


def test_best_static_centres_on_what_deco_used_and_grids_tau_and_delta_around_it():
    per_round = [[r, 0.1 * r, 2 if r < 30 else 4, 0.01 if r < 70 else 0.004, None] for r in range(100)]
    assert used_center(per_round) == (4, 0.01)  # round-weighted medians
    assert used_center([[0, 0.0, None, None, None]]) is None
    assert grid_around(3, 0.01, 3, 8, 10**6) == [(t, d) for t in (2, 3, 4) for d in (0.005, 0.01, 0.02)]
    assert [t for t, _ in grid_around(0, 0.01, 3, 8, 10**6)][::3] == [0, 1, 2]  # shifted, not cut, at the edges
    assert [t for t, _ in grid_around(8, 0.01, 3, 8, 10**6)][::3] == [6, 7, 8]
    assert sorted({d for _, d in grid_around(2, 0.8, 3, 8, 10**6)}) == [0.4, 0.8, 1.0]
    assert sorted({d for _, d in grid_around(2, 1e-6, 3, 8, 1000)}) == [1e-3]  # at least one element
    assert len(grid_around(2, 0.01, 2, 8, 10**6)) == 4


def demo_result(time_to_target, accuracy=0.97):
    reached = time_to_target is not None
    return {"reached_target": reached, "time_to_target_s": time_to_target, "rounds": 100, "bytes_up": 1,
            "bytes_down": 2, "final_accuracy": accuracy, "measured_iter_s": 0.02, "config": {"time_limit_s": 45},
            "per_round": [[r, r * 0.02, 2, 0.01, None] for r in range(20)], "decisions": [],
            "controller_state": {}, "link_track": []}


def test_best_static_reports_the_fastest_grid_point_as_an_oracle_and_summarize_rebuilds_it(tmp_path):
    import json

    plan = BenchPlan(conditions=("smoke",), methods=("deco", BEST_STATIC), seeds=(0,), time_limit_s=45,
                     target_accuracy=0.85, batch_size=64, lr=0.2, out_dir=str(tmp_path), grid=2)
    times = {(1, 0.005): 12.0, (1, 0.01): 8.0, (2, 0.005): None, (2, 0.01): 10.0}
    ran, cutoffs = [], []

    def run_point(out, tau, delta, time_limit_s):  # stands in for the cluster: writes what a run writes
        ran.append((tau, delta))
        cutoffs.append(time_limit_s)
        out.mkdir(parents=True)
        reached = times[(tau, delta)] is not None and (time_limit_s is None or times[(tau, delta)] <= time_limit_s)
        result = demo_result(times[(tau, delta)] if reached else None, accuracy=0.97 if reached else 0.6)
        (out / "demo.json").write_text(json.dumps(result))
        return result

    row = run_best_static(plan, CONDITIONS["smoke"], 0, tmp_path, (2, 0.01), "deco's run", run_point)
    assert sorted(ran) == sorted(times)
    # the centre runs first and uncut; the others stop a margin past the fastest so far
    assert ran[0] == (2, 0.01) and cutoffs[0] is None and cutoffs[1] == pytest.approx(10.0 * 1.25 + 5)
    assert min(c for c in cutoffs if c is not None) == pytest.approx(8.0 * 1.25 + 5)
    assert row["method"] == BEST_STATIC and row["oracle"] is True
    assert row["best"] == {"tau": 1, "delta": 0.01} and row["time_to_target_s"] == 8.0
    assert row["grid_center"] == {"tau": 2, "delta": 0.01, "from": "deco's run"}
    assert len(row["grid"]) == 4 and {g["reached_target"] for g in row["grid"]} == {True, False}
    rows, rebuilt = rows_from_runs(tmp_path)
    assert [(r["method"], r["best"]) for r in rows] == [(BEST_STATIC, {"tau": 1, "delta": 0.01})]
    assert method_label(BEST_STATIC) == "best-static (oracle)" and method_label("deco") == "deco"
    # Every point's time, as the docs cite them (--summarize prints it).
    assert grid_text(rows[0]).splitlines()[1:] == ["  tau 1, delta 0.005: 12.0", "  tau 1, delta 0.01: 8.0",
                                                   "  tau 2, delta 0.005: -", "  tau 2, delta 0.01: 10.0"]


def test_the_quick_plan_runs_the_cnn_in_the_papers_regime_for_minutes():
    assert QUICK.conditions == ("cnn-varying",) and CONDITIONS["cnn-varying"].task == "mnist-cnn"
    assert limit_of(QUICK, CONDITIONS["cnn-varying"]) == 240  # capped below the condition's 360 s
    assert limit_of(BenchPlan(conditions=(), methods=(), seeds=(), time_limit_s=300, target_accuracy=0.97,
                              batch_size=64, lr=0.1, out_dir="x"), CONDITIONS["cnn-varying"]) == 360


def test_later_seeds_run_the_point_the_searched_grids_found_fastest(tmp_path):
    """--grid-seeds: the grid is searched on the first seeds; the others run its best point only."""
    import json
    from dataclasses import replace

    from wanps.bench.train import searched_best

    def grid(times):
        return [{"tau": t, "delta": d, "reached_target": x is not None, "time_to_target_s": x}
                for (t, d), x in times.items()]

    searched = [{"seed": 0, "grid": grid({(1, 0.01): 20.0, (2, 0.01): 18.0, (2, 0.02): None})},
                {"seed": 1, "grid": grid({(1, 0.01): 21.0, (2, 0.01): 30.0, (2, 0.02): 10.0})}]
    # medians: (1, 0.01) 20.5, (2, 0.01) 24.0, (2, 0.02) inf (missed once)
    assert searched_best(searched) == (1, 0.01)
    plan = BenchPlan(conditions=("smoke",), methods=(BEST_STATIC,), seeds=(0, 1, 2), time_limit_s=45,
                     target_accuracy=0.85, batch_size=64, lr=0.2, out_dir=str(tmp_path), grid=3, grid_seeds=2)
    ran = []

    def run_point(out, tau, delta, time_limit_s):
        ran.append((tau, delta))
        out.mkdir(parents=True)
        result = demo_result(15.0, accuracy=0.97)
        (out / "demo.json").write_text(json.dumps(result))
        return result

    row = run_best_static(replace(plan, grid=1), CONDITIONS["smoke"], 2, tmp_path, (1, 0.01), "seed 0-1's grids",
                          run_point)
    assert ran == [(1, 0.01)] and row["best"] == {"tau": 1, "delta": 0.01}


def test_the_varying_trace_at_another_delay_keeps_its_bandwidths(tmp_path):
    from wanps.bench.train import reshaped_trace
    from wanps.deploy.demo import default_trace

    paths = write_traces(CONDITIONS["varying-10ms"], tmp_path)
    assert len(paths) == CONDITIONS["varying-10ms"].workers and len(set(paths)) == 1
    shipped, changed = LinkTrace.from_csv(default_trace()), LinkTrace.from_csv(paths[0])
    times = [0.0, 7.5, 31.0, 85.0]
    assert [changed.at(t).bandwidth_mbit for t in times] == [shipped.at(t).bandwidth_mbit for t in times]
    assert {changed.at(t).delay_ms for t in times} == {5.0}
    assert "# " in reshaped_trace("# note\ntime_s,bandwidth_mbit,delay_ms\n0,20,50\n", 5).splitlines()[0]


def test_a_condition_on_another_shipped_trace_gives_every_worker_that_trace(tmp_path):
    paths = write_traces(CONDITIONS["cnn-congested"], tmp_path)
    assert len(paths) == CONDITIONS["cnn-congested"].workers and len(set(paths)) == 1
    trace = LinkTrace.from_csv(paths[0])
    levels = [trace.at(t).bandwidth_mbit for t in range(0, 96)]
    assert min(levels) == 3 and max(levels) == 64  # the deep drops and the peaks
    assert 20 <= sum(levels) / len(levels) <= 35  # the mean keeps the CNN in the paper's regime
    assert {trace.at(t).delay_ms for t in range(0, 96)} == {50.0}


def test_a_scaled_trace_keeps_its_shape_at_a_fraction_of_its_bandwidth(tmp_path):
    from wanps.deploy.demo import default_trace

    condition = CONDITIONS["gpt2-varying"]
    paths = write_traces(condition, tmp_path)
    shipped, scaled = LinkTrace.from_csv(default_trace()), LinkTrace.from_csv(paths[0])
    for t in (0.0, 7.5, 31.0, 85.0):
        assert scaled.at(t).bandwidth_mbit == pytest.approx(condition.trace_bandwidth_scale * shipped.at(t).bandwidth_mbit)
        assert scaled.at(t).delay_ms == condition.trace_delay_ms


def test_rounds_per_tau_counts_how_long_each_decision_held():
    from wanps.bench.train import rounds_per_tau, tau_text

    row = {"rounds": 100, "decision_trace": [
        {"id": 1, "from_round": 0, "tau": 2, "delta": 0.01},
        {"id": 3, "from_round": 30, "tau": 0, "delta": 0.001},
        {"id": 2, "from_round": 30, "tau": 4, "delta": 0.001},  # the same round, an older id: replaced
        {"id": 4, "from_round": 80, "tau": 2, "delta": 0.002},
        {"id": 5, "from_round": 120, "tau": 1, "delta": 0.002},  # scheduled past the run's end
    ]}
    assert rounds_per_tau(row) == {2: 50, 0: 50}
    assert tau_text(rounds_per_tau(row)) in ("2:50 0:50", "0:50 2:50")
    assert rounds_per_tau({"rounds": 10, "decision_trace": []}) == {} and tau_text({}) == "-"


def test_deco_time_runs_with_the_rounds_model_measured_for_its_condition_and_nowhere_else(tmp_path, capsys):
    from dataclasses import replace

    from wanps.bench.train import TIME_OBJECTIVE, controller_args_of, main, run_bench

    measured = replace(CONDITIONS["smoke"], rounds_model=(0.85, 120.0))
    args = controller_args_of(TIME_OBJECTIVE, measured)
    assert args == ("--objective", "time", "--staleness-weight", "0.85", "--compression-knee", "120")
    assert controller_args_of("deco", measured) == ()  # deco keeps Algorithm 1
    with pytest.raises(ValueError, match="wanps bench convergence --condition smoke"):
        controller_args_of(TIME_OBJECTIVE, CONDITIONS["smoke"])
    # Where none was measured, the bench says so and runs nothing for it.
    plan = BenchPlan(conditions=("smoke",), methods=(TIME_OBJECTIVE,), seeds=(0,), time_limit_s=25,
                     target_accuracy=0.9, batch_size=64, lr=0.2, out_dir=str(tmp_path))
    result = run_bench(plan)
    assert result["rows"] == [] and not (tmp_path / "bench").exists()
    assert "smoke / deco-time: skipped, no rounds model" in capsys.readouterr().out
    # From the command line: one line that nothing ran, and a failing exit.
    assert main(["--conditions", "smoke", "--methods", TIME_OBJECTIVE, "--seeds", "2", "--out", str(tmp_path)]) == 2
    printed = capsys.readouterr()
    assert printed.out.count("skipped, no rounds model") == 1  # once per condition, not per seed
    assert printed.err.strip() == "wanps bench train: nothing ran (every method of the plan was skipped above)"
