"""The training benchmark's bookkeeping: speed-ups, Theorem 3 predictions, trace files."""
from __future__ import annotations

import pytest

from wanps.bench.train import (CONDITIONS, QUICK, BenchPlan, deco_ratios, median_time, num_params_of,
                                      predicted_iter_s, predicted_ps_iter_s, summarize, write_traces)
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


def test_prediction_for_dense_rounds_counts_values_only():
    result = {"per_round": [[0, 0.1, 0, 1.0, None]],
              "controller_state": {"traffic_factor": 1.0, "links": [{"bandwidth_bps": 10e6, "latency_s": 0.1,
                                                                     "t_comp_s": 0.02}]}}
    transfer = 1000 * 32 / 10e6
    assert predicted_iter_s(result, 1000) == pytest.approx(0.02 + 0.1 + transfer, abs=1e-5)
    # The parameter-server form: the push goes up and the delta comes down, in series at tau 0.
    assert predicted_ps_iter_s(result, 1000) == pytest.approx(0.02 + 0.1 + 2 * transfer, abs=1e-5)


def test_the_parameter_server_form_counts_both_directions_and_only_replaces_final_estimate_predictions():
    links = [{"bandwidth_bps": 10e6, "latency_s": 0.1, "t_comp_s": 0.03}]
    result = {"per_round": [[0, 0.1, 2, 0.01, None]], "decisions": [],
              "controller_state": {"traffic_factor": 3.0, "bits_per_element": 48.0, "links": links}}
    upload = 0.01 * 1000 * 48 / 10e6  # the measured wire cost, not the 64-bit default
    download = 3.0 * upload
    assert predicted_ps_iter_s(result, 1000) == pytest.approx(max((0.03 + 0.1 + upload + download) / 3, download, 0.03),
                                                              abs=1e-5)
    adaptive = dict(result, decisions=[{"id": 1, "from_round": 0, "tau": 2, "delta": 0.01, "predicted_iter_s": 0.05}])
    assert predicted_ps_iter_s(adaptive, 1000) is None  # its decisions carry their own prediction


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
