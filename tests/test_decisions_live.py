"""Decisions over real gRPC: every worker switches at the decision's round; losing the
controller keeps the last decision, and workers reconnect when it comes back."""
from __future__ import annotations

import threading

import pytest

from wanps.controller.policy import PolicyConfig
from wanps.controller.service import ControllerConfig, start_controller
from wanps.worker import Optimizer
from wanps.worker.tasks import get_task

pytestmark = pytest.mark.timeout(120)


def train(cluster, rounds: int, per_round: dict, errors: list, seed: int, controller: str,
          pause_at: int | None = None, resume: threading.Event | None = None, paused: threading.Event | None = None,
          value_dtype: str = "float32", compressor: str = "topk"):
    try:
        task = get_task("synthetic")
        model = task.build_model(seed)
        opt = Optimizer(model.parameters(), server=cluster.server_address, controller=controller, lr=0.1,
                        value_dtype=value_dtype, compressor=compressor)
        batches = task.batches(opt.rank, opt.world_size, 16, seed)
        for _ in range(rounds):
            if pause_at is not None and opt.round == pause_at:
                paused.set()
                assert resume.wait(60)
            x, y = next(batches)
            opt.zero_grad()
            task.loss(model, x, y).backward()
            round_ = opt.round
            opt.step()
            per_round.setdefault(opt.worker_id, {})[round_] = (opt.last_decision.tau, opt.last_decision.delta)
        opt.close()
    except BaseException as exc:
        errors.append(exc)


def run_paused_workers(cluster, rounds: int, pause_at: int):
    """Two workers that stop at round `pause_at` until `resume` is set; returns once both wait."""
    per_round: dict = {}
    errors: list = []
    paused = [threading.Event(), threading.Event()]
    resume = threading.Event()
    threads = [threading.Thread(target=train, args=(cluster, rounds, per_round, errors, seed,
                                                    cluster.controller_address, pause_at, resume, paused[seed]))
               for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for event in paused:
        assert event.wait(60)
    return threads, per_round, errors, resume


def test_all_workers_switch_at_the_decisions_round(make_cluster):
    cluster = make_cluster(min_workers=2, tau_max=3, policy="static", tau=1, delta=0.2)
    threads, per_round, errors, resume = run_paused_workers(cluster, 40, 10)
    service = cluster.controller.service

    cluster.loop.run(service.decide(from_round=25, tau=0, delta=0.5, policy="static", reason="test switch"))
    resume.set()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(per_round) == 2
    for rounds in per_round.values():
        assert all(rounds[r] == (1, 0.2) for r in range(0, 25))
        assert all(rounds[r] == (0, 0.5) for r in range(25, 40))


def test_losing_the_controller_keeps_the_decision_and_reconnects(make_cluster, loop_thread):
    cluster = make_cluster(min_workers=1, policy="static", tau=2, delta=0.3)
    port = cluster.controller.port
    address = cluster.controller_address
    task = get_task("synthetic")
    model = task.build_model(0)
    opt = Optimizer(model.parameters(), server=cluster.server_address, controller=address, lr=0.1)
    batches = task.batches(0, 1, 16)

    def steps(n: int) -> None:
        for _ in range(n):
            x, y = next(batches)
            opt.zero_grad()
            task.loss(model, x, y).backward()
            opt.step()

    try:
        steps(5)
        assert (opt.last_decision.tau, opt.last_decision.delta) == (2, 0.3)
        loop_thread.run(cluster.controller.stop(0.1))
        cluster.controller = None
        steps(10)  # training goes on with the last decision
        assert (opt.last_decision.tau, opt.last_decision.delta) == (2, 0.3)
        # A new controller on the same port with another policy: the worker reconnects and follows it.
        config = ControllerConfig(host="127.0.0.1", port=port, metrics_port=-1, policy=PolicyConfig(name="dsgd"))
        cluster.controller = loop_thread.run(start_controller(config))
        reconnected = threading.Event()
        for _ in range(400):  # bounded: backoff tops out at 8 s
            steps(1)
            if opt.last_decision.delta == 1.0:
                reconnected.set()
                break
            reconnected.wait(0.05)
        assert reconnected.is_set(), "the worker never picked up the new controller's decision"
        assert opt.last_decision.tau == 0
    finally:
        opt.close()


def run_workers(cluster, rounds: int, seeds=(0, 1)):
    per_round: dict = {}
    errors: list = []
    threads = [threading.Thread(target=train, args=(cluster, rounds, per_round, errors, seed,
                                                    cluster.controller_address)) for seed in seeds]
    for thread in threads:
        thread.start()
    return threads, per_round, errors


def assert_common_switches(per_round: dict, rounds: int) -> list[tuple[int, tuple]]:
    """Every worker used the same (tau, delta) at every round; returns the switch points."""
    assert len(per_round) == 2
    first, second = per_round.values()
    assert all(first[r] == second[r] for r in range(rounds))
    return [(r, first[r]) for r in range(rounds) if r == 0 or first[r] != first[r - 1]]


def test_deco_switches_every_worker_at_the_same_round(make_cluster):
    # A decision holds from a round scheduled switch_margin_s of measured rounds ahead; rounds on
    # loopback take milliseconds, so a short margin and enough rounds keep the switch inside the run
    # however fast this machine makes them.
    cluster = make_cluster(min_workers=2, tau_max=4, policy="deco", tau=1, delta=0.1, switch_margin_s=0.25,
                           switch_margin_rounds_cold=50)
    rounds = 1200
    threads, per_round, errors = run_workers(cluster, rounds)
    for thread in threads:
        thread.join(100)
        assert not thread.is_alive()
    assert not errors, errors
    switches = assert_common_switches(per_round, rounds)
    assert switches[0] == (0, (1, 0.1))  # the bootstrap decision
    assert len(switches) >= 2, "DeCo never took over from the bootstrap decision"
    assert switches[1][0] > 0


def test_set_policy_and_status_through_the_cli(make_cluster):
    cluster = make_cluster(min_workers=2, tau_max=4, policy="static", tau=2, delta=0.2, switch_margin_s=1.0,
                           switch_margin_rounds_cold=50)
    import json
    import subprocess

    from wanps.deploy.processes import wanps_command

    # Workers wait at round 20 while the CLI (a new Python process) switches the policy, so the
    # switch round lands within their 400 rounds however slowly the CLI starts.
    threads, per_round, errors, resume = run_paused_workers(cluster, 400, 20)
    try:
        done = subprocess.run(wanps_command("controller", "set-policy", "--controller", cluster.controller_address,
                                            "--policy", "dsgd"), capture_output=True, text=True, timeout=60)
    finally:
        resume.set()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["decision"]["tau"] == 0
    for thread in threads:
        thread.join(100)
    assert not errors, errors
    switches = assert_common_switches(per_round, 400)
    assert switches[0] == (0, (2, 0.2))
    assert switches[-1][1] == (0, 1.0)
    status = subprocess.run(wanps_command("controller", "status", "--controller", cluster.controller_address),
                            capture_output=True, text=True, timeout=60)
    state = json.loads(status.stdout)
    assert state["policy"] == "dsgd" and state["reported_round"] > 0


# 64 bits (uint32 index + float32 value) is what the controller assumes before any push.
@pytest.mark.parametrize(("value_dtype", "compressor", "bits"),
                         [("float16", "topk", 48), ("float32", "random-block", 32), ("float16", "random-block", 16)])
def test_the_controller_prices_a_sent_element_at_the_workers_wire_cost(make_cluster, value_dtype, compressor, bits):
    cluster = make_cluster(min_workers=2, tau_max=2, policy="static", tau=1, delta=0.2)
    per_round: dict = {}
    errors: list = []
    threads = [threading.Thread(target=train, args=(cluster, 30, per_round, errors, seed, cluster.controller_address),
                                kwargs={"value_dtype": value_dtype, "compressor": compressor}) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(100)
    assert not errors, errors
    # The push sample's bytes are the payload (indices + values), so the cost is exact.
    assert cluster.controller.service.core.bits_per_element() == pytest.approx(bits)
