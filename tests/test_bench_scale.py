"""`wanps bench scale --quick` runs end to end against a real server process and reports
every figure; it asserts structure, never speed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from wanps.bench.cli import main
from wanps.bench.scale import STEP_PARTS, floor_bytes, parse_count
from wanps.server.cli import parse_config

pytestmark = pytest.mark.timeout(240)


def test_bench_scale_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scale.json"
    assert main(["scale", "--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "memory-traffic floor" in printed and "server peak RSS MiB" in printed
    result = json.loads(out.read_text())
    assert result["benchmark"] == "scale" and result["copy_gb_per_s"] > 0
    (row,) = result["rows"]
    assert (row["params"], row["workers"], row["delta"]) == (1_000_000, 2, 0.01)
    assert row["rounds"] == result["config"]["rounds"] == 5
    assert row["pushed_pairs"] == 10_000 and row["delta_elements"] > 0
    assert set(row["split_seconds"]) == set(STEP_PARTS)
    assert all(v >= 0 for v in row["split_seconds"].values())
    assert row["join_seconds"] > 0 and row["step_seconds"] > 0 and row["step_cpu_seconds"] > 0
    assert 0 < row["seed_seconds"] <= row["join_seconds"] and 0 < row["pull_seconds"] <= row["join_seconds"]
    assert row["server_peak_rss_mib"] >= row["server_rss_after_leave_mib"] > 0
    assert row["floor_seconds"] > 0 and row["cpu_over_floor"] > 0


def test_the_floor_formula_and_sizes():
    assert floor_bytes(1000, 10, 30) == 16 * 1000 + 20 * 10 + 16 * 30
    assert [parse_count(t) for t in ("10M", "124M", "1.5k", "50000")] == [10_000_000, 124_000_000, 1500, 50000]


def test_history_budget_flag_and_its_environment_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config([]).history_mb == 256 and parse_config([]).history_rounds == 64
    assert parse_config(["--history-mb", "64"]).history_mb == 64
    monkeypatch.setenv("WANPS_HISTORY_MB", "32")
    assert parse_config([]).history_mb == 32
    with pytest.raises(SystemExit):
        parse_config(["--history-mb", "-1"])
