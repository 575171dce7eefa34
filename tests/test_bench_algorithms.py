"""`wanps bench algorithms` end to end on a tiny budget: the JSON has every key and row field."""
from __future__ import annotations

import json

import pytest

from wanps.bench.algorithms import main

pytestmark = pytest.mark.timeout(300)


def test_bench_algorithms_writes_every_study(tmp_path) -> None:
    out = tmp_path / "algorithms.json"
    code = main(["--out", str(out), "--sasg-workers", "2", "--sasg-max-rounds", "50", "--sasg-target", "0.5",
                 "--sasg-max-delay", "3", "--def-workers", "2", "--def-rounds", "10", "--def-ratios", "16",
                 "--sizes", "20000", "--repeats", "1", "--eval-limit", "1000",
                 "--sasg-eval-every", "10"])
    assert code == 0
    report = json.loads(out.read_text())
    sasg = {row["method"]: row for row in report["sasg"]}
    assert set(sasg) == {"sgd", "sparse", "lasg", "sasg"}
    for row in sasg.values():
        assert {"method", "rounds_to_target", "bits_to_target", "final_accuracy"} <= set(row)
        assert row["reached_target"]  # 50% on MNIST comes within 50 rounds
        # rounds count uploads: at most one per worker per iteration, fewer when skipping
        assert row["rounds_to_target"] <= 2 * row["iterations_to_target"]
    # Top-k at 1% sends ~1% of the dense bits per upload (8 bytes per element instead of 4).
    per_upload = {m: sasg[m]["bits_to_target"] / sasg[m]["rounds_to_target"] for m in ("sgd", "sparse")}
    assert per_upload["sparse"] < 0.05 * per_upload["sgd"]
    assert {(row["method"], row["ratio"]) for row in report["def"]} == {
        ("sgd", 1), ("ef", 16), ("def", 16), ("def-a", 16)}
    assert all(0.0 <= row["final_accuracy"] <= 1.0 for row in report["def"])
    compressors = report["compressors"]
    assert {row["method"] for row in compressors} == {"topk", "topk-sampled", "random-block"}
    for row in compressors:
        assert {"method", "elements", "ratio", "ms_median", "selected_over_k"} <= set(row)
        assert row["elements"] == 20000 and row["ms_median"] > 0


def test_bench_algorithms_refuses_an_unknown_study(tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x.json"), "--studies", "nope"])
