"""Smoke tests of `wanps bench push` (with shards), `aggregate`, `wire`, `scrape` and `linkem` at tiny sizes.

They check that the benchmarks run end to end against real servers and report a sane
structure; they assert nothing about speed (timings on a shared machine are not stable),
except that a scrape every 15 s costs the server under 1% (measured: ~0.02%, a 50x margin).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from wanps.bench.cli import main
from wanps.bench.payload import PAYLOAD_BYTES_PER_ELEMENT, random_update
from wanps.bench.push import _split_by_shard, shard_targets
from wanps.bench.wire import serialized_push
from wanps.proto.codec import CHUNK_ELEMENTS


def test_bench_push_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "push.json"
    argv = ["push", "--params", "50000", "--clients", "2", "--pairs", "500", "--rounds", "3", "--echo-rounds", "4",
            "--warmup-rounds", "1", "--repeat", "1", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "full/echo" in printed and "target >= 0.50" in printed

    result = json.loads(out.read_text())
    assert result["benchmark"] == "push"
    assert result["config"]["clients"] == 2
    phases = result["phases"]
    assert [(p["phase"], p["repeat"], p["rounds"]) for p in phases] == [
        ("echo", 0, 1), ("full", 0, 1), ("echo", 1, 4), ("full", 1, 3)]
    for phase in phases:
        assert phase["seconds"] > 0 and phase["pairs_per_s"] > 0 and phase["rounds_per_s"] > 0
        assert phase["duplicates"] == 0
    summary = result["summary"]
    assert summary["full_pairs_per_s"] > 0 and summary["echo_pairs_per_s"] > 0
    assert summary["ratio_full_over_echo"] == pytest.approx(summary["full_pairs_per_s"] / summary["echo_pairs_per_s"])
    assert summary["target_met"] == (summary["ratio_full_over_echo"] >= 0.5)
    assert result["machine"]["cpus"] >= 1


def test_bench_push_with_shards_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1 and 2 real shard processes, the clients splitting every push by range (servers with a helper thread)."""
    out = tmp_path / "push.json"
    argv = ["push", "--params", "50001", "--clients", "2", "--pairs", "500", "--rounds", "2", "--echo-rounds", "2",
            "--warmup-rounds", "1", "--repeat", "1", "--shards", "1,2", "--core-threads", "2", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "machine rates: memory copy" in printed and "torch.sort of 800K int64" in printed
    assert "full/echo" in printed and "sharded ingest" in printed and "core-s/Mpair" in printed

    result = json.loads(out.read_text())
    assert result["config"]["core_threads"] == 2
    assert result["rates"]["copy_gb_per_s"] > 0 and result["rates"]["sort_800k_int64_ms"] > 0
    runs = result["shards"]
    assert [run["shards"] for run in runs] == [1, 2]
    for run in runs:
        assert len(run["shard_pairs"]) == run["shards"]
        assert sum(run["shard_pairs"]) == 2 * 500  # every pair of every push went to exactly one shard
        assert [(p["repeat"], p["rounds"]) for p in run["phases"]] == [(0, 1), (1, 2)]
        assert run["pairs_per_s"] > 0 and run["client_cpu_cores"] >= 0
        # CPU comes in clock ticks: a tiny phase may read as 0, never as negative.
        assert len(run["shard_core_s_per_mpairs"]) == run["shards"]
        assert min(run["shard_core_s_per_mpairs"]) >= 0


def test_bench_push_refuses_bad_shard_counts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["push", "--shards", "1,0"])
    assert refused.value.code == 2
    assert "--shards: shard counts >= 1" in capsys.readouterr().err


def test_pushes_split_by_the_contracts_ranges() -> None:
    """Shard i owns [floor(i*P/N), floor((i+1)*P/N)); a push's parts carry the shard's indices."""
    targets = shard_targets(10, 3)
    assert [(t.start, t.stop) for t in targets] == [(0, 3), (3, 6), (6, 10)]
    update = random_update(10, 7, 0)
    parts = _split_by_shard(update, targets)
    for target, part in zip(targets, parts):
        assert part.count == 0 or 0 <= int(part.indices.min()) and int(part.indices.max()) < target.join_params
    rebuilt = [int(i) + t.index_offset for t, part in zip(targets, parts) for i in part.indices]
    assert rebuilt == update.indices.tolist()
    assert [float(v) for part in parts for v in part.values] == update.values.tolist()


def test_bench_aggregate_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every path of the mean at a model of 1.1M (the blocked path's size), checked against each other."""
    out = tmp_path / "aggregate.json"
    assert main(["aggregate", "--params", "1.1M", "--workers", "2", "--deltas", "0.01,0.1", "--repeat", "1",
                 "--json", str(out)]) == 0
    assert "ns/pair" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [(row["params"], row["delta"]) for row in result["rows"]] == [(1_100_000, 0.01), (1_100_000, 0.1)]
    for row in result["rows"]:
        assert row["pairs"] == 2 * int(row["delta"] * 1_100_000)
        assert 0 < row["union"] <= row["pairs"]
        assert set(row["ms"]) == {"sort", "pieces", "blocked", "auto", "auto x2"}


def test_bench_wire_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "wire.json"
    assert main(["wire", "--sizes", "100,1000", "--params", "5000", "--pushes", "2", "--json", str(out)]) == 0
    assert "worst overhead" in capsys.readouterr().out

    result = json.loads(out.read_text())
    assert result["connection"]["connections"] == 1
    rows = result["sizes"]
    assert [r["elements"] for r in rows] == [100, 1000]
    for row in rows:
        payload = row["elements"] * PAYLOAD_BYTES_PER_ELEMENT
        assert row["messages"] == 2  # header + one chunk
        assert payload < row["protobuf_bytes"] < row["estimated_stream_bytes"]
        # The socket carries at least the framed messages (HEADERS, DATA headers on top).
        assert row["socket_up_bytes_per_push"] >= row["protobuf_bytes"] + 2 * 5
        assert row["socket_up_frames_per_push"]["HEADERS"] >= 1
    # The fixed per-push overhead weighs less on a bigger push.
    assert rows[1]["protobuf_overhead_pct"] < rows[0]["protobuf_overhead_pct"]


def test_serialized_push_splits_into_chunks() -> None:
    row = serialized_push(CHUNK_ELEMENTS + 1, params=2 * CHUNK_ELEMENTS, seed=0)
    assert row["messages"] == 3  # header + a full chunk + a one-element chunk
    assert row["payload_bytes"] == (CHUNK_ELEMENTS + 1) * PAYLOAD_BYTES_PER_ELEMENT
    assert row["protobuf_bytes_per_element"] < 8.001


def test_bench_scrape_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real server process, real traffic, real scrapes; the cost is far below 1% at 15 s."""
    out = tmp_path / "scrape.json"
    argv = ["scrape", "--workers", "2", "--params", "20000", "--rounds", "5", "--scrapes", "20", "--json", str(out)]
    assert main(argv) == 0
    assert "target < 1%" in capsys.readouterr().out
    result = json.loads(out.read_text())
    scrape = result["scrape"]
    assert scrape["scrapes"] == 20 and scrape["samples"] > 50 and scrape["exposition_bytes"] > 5000
    assert scrape["server_cpu_ms_per_scrape"] >= 0 and scrape["latency_ms_median"] > 0
    assert result["round_s"] > 0
    by_interval = {row["interval_s"]: row for row in result["intervals"]}
    assert by_interval[15.0]["fraction_of_round"] == pytest.approx(scrape["server_cpu_ms_per_scrape"] / 1000 / 15)
    assert by_interval[15.0]["target_met"]


def test_bench_linkem_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every case runs and reports; how close the figures come to the settings is the
    benchmark's to print (docs/benchmarks.md), not this test's to assert."""
    out = tmp_path / "linkem.json"
    argv = ["linkem", "--seconds", "0.2", "--bandwidths", "40", "--delays", "5", "--pings", "3", "--grpc-calls", "1",
            "--no-step", "--json", str(out)]
    assert main(argv) == 0
    assert "goodput, 2 connections" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"].split(",")[0] for r in rows] == [
        "goodput", "goodput", "RTT", "stall", "gRPC echo of 2 MiB through `wanps linkem`"]
    assert all(r["measured"] for r in rows)
