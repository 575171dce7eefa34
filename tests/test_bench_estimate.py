"""Smoke test of `wanps bench estimate` at tiny durations, and its pure helpers.

The run checks structure and that the controller produced estimates through a real link
emulator; it asserts nothing about accuracy (that is what the benchmark reports), only
loose sanity (an RTT cannot be shorter than the emulated delay).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from wanps.bench.estimate import SETUP_BANDWIDTH_MBIT, DeferredTrace, Poll, main, settle_time
from wanps.linkem.trace import LinkTrace, TracePoint


def _poll(t: float, mbit: float | None) -> Poll:
    return Poll(t=t, bandwidth_mbit=mbit, latency_ms=100.0, t_comp_ms=None, push_samples=0, ping_samples=0,
                method=None, true_mbit=10.0, true_rtt_ms=100.0, up_mbit=0.0, down_mbit=0.0)


def test_settle_time_needs_the_estimate_to_stay_within_tolerance() -> None:
    estimates = [40, 40, 30, 10.5, 14, 10.2, 9.5, 10.0, 9.8, 10.1]  # polls at t = 9.0, 9.5, ... after a step at 10
    polls = [_poll(9.0 + 0.5 * i, m) for i, m in enumerate(estimates)]
    # 10.5 at t = 10.5 is within 10%, but 14 at t = 11 is not: settled from t = 11.5 on.
    assert settle_time(polls, 10.0, 10.0, 0.1, stable_s=1.0) == pytest.approx(1.5)
    # Settled for only 2 s at the end of the run: not long enough to count.
    assert settle_time(polls, 10.0, 10.0, 0.1, stable_s=3.0) is None
    assert settle_time([_poll(10.5, None), _poll(11.0, 20.0)], 10.0, 10.0, 0.1, stable_s=0.0) is None


def test_deferred_trace_runs_fast_until_begun_then_plays_the_inner_trace() -> None:
    inner = LinkTrace([TracePoint(0.0, 40.0, 50.0), TracePoint(10.0, 10.0, 50.0)], loop=False)
    trace = DeferredTrace(inner)
    assert trace.at(100.0).bandwidth_mbit == SETUP_BANDWIDTH_MBIT
    assert trace.delay_s(100.0) == pytest.approx(0.05)
    trace.begin(3.0)
    assert trace.at(2.9).bandwidth_mbit == SETUP_BANDWIDTH_MBIT
    assert trace.at(3.0 + 9.9).bandwidth_mbit == 40.0
    assert trace.bandwidth_bps(3.0 + 10.0) == 10e6


def test_bench_estimate_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "estimate.json"
    assert main(["--quick", "--repeat", "1", "--conditions", "fixed,step", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fixed links" in printed and "step change" in printed and "all targets met" in printed

    result = json.loads(out.read_text())
    assert result["benchmark"] == "estimate"
    assert result["config"]["params"] == 200_000  # --quick
    runs = result["runs"]
    assert [(r["condition"], r["repeat"]) for r in runs] == [("fixed", 1), ("step", 1)]
    delay_ms = result["config"]["delay_ms"]
    for run in runs:
        assert run["worker"]["pushes"] > 0 and run["worker"]["final_version"] > 0
        series = run["series"]
        times = [p["t"] for p in series]
        assert times == sorted(times) and times[-1] <= run["duration_s"] + 1.0
        estimated = [p for p in series if p["bandwidth_mbit"] is not None]
        assert estimated, f"no estimate in the {run['condition']} run"
        for p in estimated:
            assert 0.1 < p["bandwidth_mbit"] < 1000
            # The estimate is an RTT through a link that adds delay_ms each way.
            assert 2 * delay_ms * 0.9 <= p["latency_ms"] < 5000
            assert p["push_samples"] >= 3 and p["ping_samples"] >= 1
        assert any(p["up_mbit"] > 0 for p in series) and any(p["down_mbit"] > 0 for p in series)
        assert isinstance(run["summary"]["met"], bool)
    fixed, step = runs
    assert {p["true_mbit"] for p in fixed["series"]} == {result["config"]["fixed_mbit"]}
    step_at = step["step_at_s"]
    # Times are rounded to 1 ms in the series; a poll within 1 ms of the step may show either side.
    assert all(p["true_mbit"] == (40.0 if p["t"] < step_at else 10.0)
               for p in step["series"] if abs(p["t"] - step_at) > 0.001)
    for key in ("bandwidth_mbit", "bandwidth_error_pct", "latency_ms", "latency_error_ms", "met"):
        assert key in fixed["summary"]
    for key in ("before_step_mbit", "first_within_s", "settle_s", "final_bandwidth_mbit", "met"):
        assert key in step["summary"]
    assert result["all_met"] == all(r["summary"]["met"] for r in runs)


def test_bench_estimate_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--conditions", "fixed,nope"])
    assert exc.value.code == 2
    assert "--conditions" in capsys.readouterr().err


def test_bench_estimate_deco_step_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """deco decides and the worker pushes what it decides; both directions are judged after the step."""
    out = tmp_path / "estimate.json"
    assert main(["--quick", "--repeat", "1", "--conditions", "deco-step", "--json", str(out)]) == 0
    assert "deco-step" in capsys.readouterr().out
    run = json.loads(out.read_text())["runs"][0]
    assert run["condition"] == "deco-step" and run["worker"]["pushes"] > 0
    summary = run["summary"]
    for key in ("bandwidth_mbit", "down_bandwidth_mbit", "down_estimated_apart", "check_at_s", "met"):
        assert key in summary
    assert summary["check_at_s"] == run["step_at_s"] + 2.5  # --quick's change_check_s
    # The worker pushed what the decisions said: once deco decided, pushes follow its delta.
    decided = [p for p in run["series"] if p["delta"] is not None]
    assert decided and all(0 < p["delta"] <= 1 for p in decided)
    assert any(p["down_bandwidth_mbit"] is not None or p["bandwidth_mbit"] is not None for p in run["series"])
