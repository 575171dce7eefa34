"""`wanps bench convergence`: the simulation's staleness, the rounds model's fit, the command."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from wanps.bench.convergence import fit_rounds, main
from wanps.bench.simulate import SimulationConfig, simulate
from wanps.worker.tasks import get_task


def delayed_sgd(task, tau: int, rounds: int, lr: float, batch_size: int) -> torch.Tensor:
    """Plain SGD by hand, each round's gradient taken at the model after round r - tau - 1."""
    model = task.build_model(0)
    params = list(model.parameters())
    models = [torch.cat([p.detach().reshape(-1) for p in params])]  # models[j]: after j rounds
    batches = task.batches(0, 1, batch_size, 0)
    for round_ in range(rounds):
        point = models[max(0, round_ - tau)]
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(point[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        model.zero_grad()
        x, y = next(batches)
        task.loss(model, x, y).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        models.append(models[-1] - lr * grad)
    return models[-1]


@pytest.mark.parametrize("tau", [0, 2])
def test_simulated_rounds_take_their_gradients_at_the_model_tau_rounds_old(tau: int) -> None:
    task = get_task("synthetic")
    config = SimulationConfig(num_workers=1, batch_size=16, lr=0.1, rounds=8, eval_every=8, delta=1.0, staleness=tau)
    simulated = simulate(task, config).model
    assert torch.allclose(simulated, delayed_sgd(task, tau, 8, 0.1, 16), atol=1e-6)
    # The other staleness gives another model: the comparison can tell them apart.
    assert not torch.allclose(simulated, delayed_sgd(task, 2 - tau, 8, 0.1, 16), atol=1e-4)


def test_a_simulation_refuses_what_it_cannot_model() -> None:
    with pytest.raises(ValueError, match="staleness"):
        SimulationConfig(staleness=-1)
    with pytest.raises(ValueError, match="synchronous"):
        SimulationConfig(staleness=1, skip_alphas=(1.0,))
    with pytest.raises(ValueError, match="delta"):
        SimulationConfig(delta=0.0)


def test_the_rounds_fit_recovers_the_model_its_points_came_from() -> None:
    d, r0, w, k0 = 100_000, 200.0, 0.3, 150.0
    points = [(tau, delta, r0 * (1 + w * tau) * (1 + k0 / (delta * d)))
              for tau in range(4) for delta in (0.0005, 0.001, 0.005, 0.02)]
    fit = fit_rounds(*zip(*points), num_params=d)
    assert fit.w == pytest.approx(w, abs=0.006)
    assert fit.k0 == pytest.approx(k0, rel=0.05)
    assert fit.r0 == pytest.approx(r0, rel=0.05)
    assert fit.rms_log_error < 0.01
    assert fit.rounds(2, 0.001, d) == pytest.approx(points[2 * 4 + 1][2], rel=0.05)


def test_the_rounds_fit_prices_nothing_it_has_no_points_for() -> None:
    # One tau: staleness cannot be told apart, and w stays 0 rather than a guess.
    fit = fit_rounds([1, 1, 1], [0.001, 0.002, 0.004], [300.0, 250.0, 225.0], num_params=100_000)
    assert fit.w == 0.0 and fit.k0 > 0
    with pytest.raises(ValueError):
        fit_rounds([1], [0.001], [300.0], num_params=100_000)


def test_the_command_prints_rounds_per_point_and_writes_them(tmp_path, capsys) -> None:
    out = tmp_path / "convergence.json"
    code = main(["--condition", "smoke", "--taus", "0,3", "--deltas", "0.05,1", "--seeds", "1", "--max-rounds", "60",
                 "--target", "0.9", "--eval-every", "5", "--jobs", "2", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"] == "synthetic" and len(result["runs"]) == 4
    reached = {(r["tau"], r["delta"]): r["rounds_to_target"] for r in result["runs"]}
    assert all(rounds is not None and rounds % 5 == 0 for rounds in reached.values())
    assert result["fit"] is not None and math.isfinite(result["fit"]["w"])
    printed = capsys.readouterr().out
    assert "fit: rounds =" in printed and "--staleness-weight" in printed


def test_the_command_refuses_bad_grids_in_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--deltas", "0,0.1"])
    assert exit_info.value.code == 2
    assert "--deltas" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--taus", "one"])
    assert "--taus" in capsys.readouterr().err


def test_summarize_reprints_a_written_result_with_a_missed_seed_as_infinitely_slow(tmp_path, capsys) -> None:
    runs = [{"tau": 0, "delta": 0.01, "seed": s, "rounds_to_target": r} for s, r in enumerate((100, 120, 110))]
    runs += [{"tau": 2, "delta": 0.01, "seed": s, "rounds_to_target": r} for s, r in enumerate((300, None, 200))]
    runs += [{"tau": 3, "delta": 0.01, "seed": s, "rounds_to_target": r} for s, r in enumerate((None, None, 200))]
    written = tmp_path / "convergence.json"
    written.write_text(json.dumps({"task": "t", "lr": 0.1, "target_accuracy": 0.9, "num_params": 1000, "runs": runs}))
    assert main(["--summarize", str(written)]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line[:1].strip().isdigit() or
            line.strip()[:1].isdigit()}
    assert rows["2"][-1] == "300"  # median of 300, inf, 200
    assert rows["3"][-1] == "-"  # two of three missed
    assert "(1 + 0.86 tau)" in printed  # 110 -> 300 at tau 2: 1 + 2w = 2.73 (the missed tau 3 is left out)
    with pytest.raises(SystemExit):
        main(["--summarize", str(tmp_path / "missing.json")])
    assert "not a convergence.json" in capsys.readouterr().err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_run_ends_its_simulations_at_once_without_a_traceback(stop_signal) -> None:
    """Ctrl-C reaches the whole process group; a supervisor's SIGTERM only the command. Either
    way the simulations end with it (a pool that waited for them took minutes)."""
    from wanps.deploy.processes import wanps_command

    # tau 4 at one element in a thousand: thousands of rounds, far more than the wait below.
    proc = subprocess.Popen(wanps_command("bench", "convergence", "--condition", "gpt2-varying", "--taus", "4",
                                          "--deltas", "0.001", "--seeds", "2", "--jobs", "2", "--out", os.devnull),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("[convergence] gpt2-tiny")  # the pool is starting
        children = wait_for_children(proc.pid, 2)
        if stop_signal == signal.SIGINT:
            os.killpg(proc.pid, stop_signal)
        else:
            proc.send_signal(stop_signal)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (130 if stop_signal == signal.SIGINT else 143)
    assert "Traceback" not in stderr
    for child in children:
        assert not still_running(child)


def wait_for_children(pid: int, count: int, timeout_s: float = 60.0) -> list[int]:
    """The pids of `pid`'s children once it has `count` of them (the simulation processes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        simulations = [int(c) for c in listed if "spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes().decode(
            errors="replace")] if listed else []
        if len(simulations) >= count:
            return simulations
        time.sleep(0.1)
    raise AssertionError(f"no {count} simulation processes under {pid} within {timeout_s} s")


def still_running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie does not: it has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
