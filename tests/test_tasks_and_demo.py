"""Built-in tasks load their data from packages; the demo runs a real cluster and reports."""
from __future__ import annotations

import json
import subprocess

import pytest

from wanps.deploy.demo import DemoConfig, link_series, plot, policy_label
from wanps.deploy.processes import wanps_command
from wanps.worker.tasks import get_task


def test_mnist_ships_in_a_package_and_the_mlp_has_the_papers_shape():
    task = get_task("mnist")
    data = task.data
    assert data.train_x.shape == (60000, 784) and data.test_x.shape == (10000, 784)
    assert set(data.train_y.unique().tolist()) == set(range(10))
    model = task.build_model(0)
    assert sum(p.numel() for p in model.parameters()) == 784 * 512 + 512 + 512 * 10 + 10
    assert 0.0 <= task.accuracy(model, limit=500) < 0.5  # untrained


def test_the_cnn_takes_the_mnist_data_and_is_the_larger_model():
    task = get_task("mnist-cnn")
    model = task.build_model(0)
    assert sum(p.numel() for p in model.parameters()) == 1_111_946
    x, y = next(task.batches(0, 4, batch_size=8))
    assert model(x).shape == (8, 10)  # flat 784-vectors go in unchanged
    task.loss(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert 0.0 <= task.accuracy(model, limit=500) < 0.5  # untrained


def test_shards_are_disjoint_and_cover_the_data():
    task = get_task("synthetic")
    seen = []
    for rank in range(3):
        x, _ = next(task.batches(rank, 3, batch_size=len(task.data.train_x) // 3))
        seen.append({tuple(row[:4].tolist()) for row in x})
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])
    with pytest.raises(ValueError, match="unknown task"):
        get_task("imagenet")


@pytest.mark.timeout(330)
def test_demo_reaches_its_target_and_writes_results(tmp_path):
    # The demo stops at its target (0.25 s of training on a quiet machine); --time-limit
    # only bounds a hang, as large as this test's own bound allows, so load cannot fail it.
    out = tmp_path / "results"
    done = subprocess.run(
        wanps_command("demo", "--task", "synthetic", "--workers", "2", "--policy", "static", "--tau", "2", "--target-accuracy", "0.9", "--lr", "0.2",
                      "--delta", "0.1", "--time-limit", "240", "--eval-every", "0.5", "--out", str(out),
                      "--no-progress"),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "demo.json").read_text())
    assert result["reached_target"] is True and result["final_accuracy"] >= 0.9
    for key in ("target_accuracy", "time_to_target_s", "rounds", "bytes_up", "bytes_down", "policy", "per_round"):
        assert key in result
    assert result["bytes_up"] > 0 and result["bytes_down"] > result["bytes_up"] / 2
    rounds = [r[0] for r in result["per_round"]]
    assert rounds == list(range(len(rounds))) and len(rounds) == result["rounds"]
    assert {(r[2], r[3]) for r in result["per_round"]} == {(2, 0.1)}
    assert any(r[4] is not None for r in result["per_round"])
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The PNG's second panel reads the controller's estimates over time.
    assert result["link_track"] and all("links" in t and "round" in t for t in result["link_track"])
    assert "time to target" in done.stdout


def test_the_legend_names_one_tau_and_delta_only_when_the_run_used_one():
    fixed = [[r, 0.1 * r, 2, 0.01, None] for r in range(5)]
    assert policy_label("static", fixed) == "static (tau 2, delta 0.01)"
    moving = fixed + [[5, 0.5, 4, 0.003, None]]
    assert "tau 2" not in policy_label("deco", moving) and "over time" in policy_label("deco", moving)
    assert policy_label("deco", []) == "deco"


def test_the_second_panel_shows_set_and_estimated_bandwidth_with_the_decisions_in_force(tmp_path):
    track = [{"time_s": 1.0, "round": 3, "links": [{"bandwidth_bps": 8e6, "down_bandwidth_bps": 9e6},
                                                   {"bandwidth_bps": 5e6}]},
             {"time_s": 3.0, "round": 9, "links": [{"bandwidth_bps": 6e6}]}]
    used = {2: (2, 0.01), 8: (4, 0.002)}
    series = link_series(track, used.get, lambda t: 10.0 if t < 4.5 else 20.0, offset_s=2.0)
    assert series.times == [1.0, 3.0] and series.set_mbit == [10.0, 20.0]  # trace time = offset + time
    assert series.up_mbit == [5.0, 6.0]  # the slowest link's
    assert series.down_mbit[0] == 9.0 and series.down_mbit[1] != series.down_mbit[1]  # nan: no estimate of its own
    assert (series.taus, series.deltas) == ([2, 4], [0.01, 0.002])
    per_round = [[r, 0.3 * r, *used.get(r, (2, 0.01)), None] for r in range(10)]
    path = tmp_path / "demo.png"
    plot([(1.0, 3, 0.5), (3.0, 9, 0.7)], DemoConfig(policy="deco", trace=""), path,
         {"link_track": track, "per_round": per_round, "trace_offset_s": 2.0})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
