"""Decisions over real gRPC: every worker switches at the decision's round; losing the
controller keeps the last decision, and workers reconnect when it comes back.

No margin here is a time: a decision made by hand reaches every (paused) worker before any
goes on, and runs end a counted number of rounds after the switch they wait for."""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from conftest import join_threads, wait_until
from wanps.controller.policy import PolicyConfig
from wanps.controller.service import ControllerConfig, start_controller
from wanps.worker import Optimizer
from wanps.worker.tasks import get_task

pytestmark = pytest.mark.timeout(120)

# Bounds every training loop whose length is decided while it runs.
MAX_TRAIN_ROUNDS = 20_000


def train(cluster, rounds: int | Callable[[], int], per_round: dict, errors: list, seed: int, controller: str,
          pause_at: int | None = None, resume: threading.Event | None = None, paused: threading.Event | None = None,
          value_dtype: str = "float32", compressor: str = "topk", optimizers: dict | None = None):
    """Train until round `rounds` (or `rounds()`, read at every step: a target set while training)."""
    until = rounds if callable(rounds) else (lambda: rounds)
    try:
        task = get_task("synthetic")
        model = task.build_model(seed)
        opt = Optimizer(model.parameters(), server=cluster.server_address, controller=controller, lr=0.1,
                        value_dtype=value_dtype, compressor=compressor)
        if optimizers is not None:
            optimizers[seed] = opt
        batches = task.batches(opt.rank, opt.world_size, 16, seed)
        for _ in range(MAX_TRAIN_ROUNDS):
            if opt.round >= until():
                break
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


def run_paused_workers(cluster, rounds: int | Callable[[], int], pause_at: int):
    """Two workers that stop at round `pause_at` until `resume` is set; returns once both wait."""
    per_round: dict = {}
    errors: list = []
    optimizers: dict = {}
    paused = [threading.Event(), threading.Event()]
    resume = threading.Event()
    threads = [threading.Thread(target=train, args=(cluster, rounds, per_round, errors, seed,
                                                    cluster.controller_address, pause_at, resume, paused[seed]),
                                kwargs={"optimizers": optimizers})
               for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for event in paused:
        assert event.wait(60)
    return threads, per_round, errors, resume, list(optimizers.values())


def wait_until_heard(optimizers: list, tau: int, delta: float, from_round: int) -> None:
    """Every worker's session holds the decision: once resumed, none can reach its round first."""
    def heard() -> bool:
        return all(any((d.from_round, d.tau, d.delta) == (from_round, tau, delta) for d in opt.session.decisions())
                   for opt in optimizers)

    wait_until(heard, f"every worker to hear of the decision (tau {tau}, delta {delta}) from round {from_round}")


def test_all_workers_switch_at_the_decisions_round(make_cluster):
    cluster = make_cluster(min_workers=2, tau_max=3, policy="static", tau=1, delta=0.2)
    threads, per_round, errors, resume, optimizers = run_paused_workers(cluster, 40, 10)
    service = cluster.controller.service

    cluster.loop.run(service.decide(from_round=25, tau=0, delta=0.5, policy="static", reason="test switch"))
    try:
        wait_until_heard(optimizers, 0, 0.5, 25)
    finally:
        resume.set()
    join_threads(threads, 60, errors)
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
        # A new controller on the same port with another policy: the worker reconnects (its
        # backoff tops out at 8 s) and hears its decision, which holds from a round ahead.
        config = ControllerConfig(host="127.0.0.1", port=port, metrics_port=-1, policy=PolicyConfig(name="dsgd"))
        cluster.controller = loop_thread.run(start_controller(config))
        wait_until(lambda: any(d.policy == "dsgd" for d in opt.session.decisions()),
                   "the worker to pick up the new controller's decision", poll_s=0.05)
        switch = next(d for d in opt.session.decisions() if d.policy == "dsgd")
        steps(max(0, switch.from_round + 1 - opt.round))
        assert (opt.last_decision.tau, opt.last_decision.delta) == (0, 1.0)
    finally:
        opt.close()


def run_workers(cluster, rounds: int | Callable[[], int], seeds=(0, 1)):
    per_round: dict = {}
    errors: list = []
    threads = [threading.Thread(target=train, args=(cluster, rounds, per_round, errors, seed,
                                                    cluster.controller_address)) for seed in seeds]
    for thread in threads:
        thread.start()
    return threads, per_round, errors


def assert_common_switches(per_round: dict) -> list[tuple[int, tuple]]:
    """Every worker used the same (tau, delta) at every round both trained; returns the switch points."""
    assert len(per_round) == 2
    first, second = per_round.values()
    rounds = min(len(first), len(second))
    assert all(first[r] == second[r] for r in range(rounds)), \
        [(r, first[r], second[r]) for r in range(rounds) if first[r] != second[r]][:5]
    return [(r, first[r]) for r in range(rounds) if r == 0 or first[r] != first[r - 1]]


def test_deco_switches_every_worker_at_the_same_round(make_cluster):
    # A decision holds from a round switch_margin_s of measured rounds ahead (the production
    # default, 3 s): that is what lets every worker hear of it first. The workers train until
    # 10 rounds past DeCo's first own decision, however many rounds that takes.
    cluster = make_cluster(min_workers=2, tau_max=4, policy="deco", tau=1, delta=0.1, switch_margin_rounds_cold=50)
    stop_at = [MAX_TRAIN_ROUNDS]
    threads, per_round, errors = run_workers(cluster, lambda: stop_at[0])
    core = cluster.controller.service.core

    async def deco_decisions():  # read on the controller's loop
        return [d for d in core.book.relevant(0) if d.from_round > 0]

    found: list = []

    def deco_decided() -> bool:
        found[:] = cluster.loop.run(deco_decisions())
        return bool(found) or bool(errors) or not all(t.is_alive() for t in threads)

    try:
        wait_until(deco_decided, "DeCo to take over from the bootstrap decision", timeout_s=80, poll_s=0.05)
    finally:
        # 10 rounds past DeCo's first decision; whatever failed above: end the workers.
        stop_at[0] = found[0].from_round + 10 if found else 0
    join_threads(threads, 100, errors)
    assert not errors, errors
    switches = assert_common_switches(per_round)
    assert switches[0] == (0, (1, 0.1))  # the bootstrap decision
    assert found, "DeCo never took over from the bootstrap decision"
    assert len(switches) >= 2 and switches[1] == (found[0].from_round, (found[0].tau, found[0].delta)), switches


def test_set_policy_and_status_through_the_cli(make_cluster):
    cluster = make_cluster(min_workers=2, tau_max=4, policy="static", tau=2, delta=0.2, switch_margin_s=0.1,
                           switch_margin_rounds_cold=50)
    import json
    import subprocess

    from wanps.deploy.processes import wanps_command

    # Workers wait at round 20 while the CLI (a new Python process) switches the policy and
    # until both have heard of the switch; then they train 20 rounds past it.
    stop_at = [MAX_TRAIN_ROUNDS]
    threads, per_round, errors, resume, optimizers = run_paused_workers(cluster, lambda: stop_at[0], 20)
    try:
        done = subprocess.run(wanps_command("controller", "set-policy", "--controller", cluster.controller_address,
                                            "--policy", "dsgd"), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        decision = json.loads(done.stdout)["decision"]
        assert (decision["tau"], decision["delta"]) == (0, 1.0)
        stop_at[0] = decision["from_round"] + 20
        wait_until_heard(optimizers, 0, 1.0, decision["from_round"])
    finally:
        if stop_at[0] == MAX_TRAIN_ROUNDS:
            stop_at[0] = 0  # the switch failed: end the workers
        resume.set()
    join_threads(threads, 100, errors)
    assert not errors, errors
    switches = assert_common_switches(per_round)
    assert switches == [(0, (2, 0.2)), (decision["from_round"], (0, 1.0))]
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
    join_threads(threads, 100, errors)
    assert not errors, errors
    # The push sample's bytes are the payload (indices + values), so the cost is exact.
    assert cluster.controller.service.core.bits_per_element() == pytest.approx(bits)


def test_workers_report_one_way_transfers_and_their_own_overhead(make_cluster):
    """The server's time stamps reach the controller as one-way transfers and pings timed
    each way; each compute sample carries the worker's own overhead of a round."""
    cluster = make_cluster(min_workers=2, tau_max=2, policy="static", tau=1, delta=0.2)
    per_round: dict = {}
    errors: list = []
    threads = [threading.Thread(target=train, args=(cluster, 150, per_round, errors, seed, cluster.controller_address))
               for seed in (0, 1)]
    for thread in threads:
        thread.start()
    join_threads(threads, 100, errors)
    assert not errors, errors
    core = cluster.controller.service.core
    assert len(core.estimators) == 2
    for estimator in core.estimators.values():
        samples = list(estimator._samples)
        pushes = [s for s in samples if s.kind == "push" and s.nbytes > 0]
        downloads = [s for s in samples if s.kind == "download"]
        pings = [s for s in samples if s.kind == "ping" and s.nbytes == 0]
        computes = [s for s in samples if s.kind == "compute"]
        # those before the worker's first ping have no base to time from yet
        assert pushes and any(s.transfer_s > 0 for s in pushes)
        assert downloads and any(s.transfer_s > 0 for s in downloads)
        assert pings and all(s.one_way_up_s is not None for s in pings)
        # a one-way transfer never holds the round trip it is part of
        assert all(s.transfer_s <= s.seconds for s in pushes)
        measured = [s.overhead_s for s in computes if s.overhead_s > 0]
        assert measured and all(o < 5.0 for o in measured)
