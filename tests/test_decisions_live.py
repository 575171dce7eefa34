"""Decisions over real gRPC: every worker switches at the decision's round; losing the
controller keeps the last decision, and workers reconnect when it comes back."""
from __future__ import annotations

import threading

import pytest

from wanps.controller.service import ControllerConfig, start_controller
from wanps.worker import Optimizer
from wanps.worker.tasks import get_task

pytestmark = pytest.mark.timeout(120)


def train(cluster, rounds: int, per_round: dict, errors: list, seed: int, controller: str,
          pause_at: int | None = None, resume: threading.Event | None = None, paused: threading.Event | None = None):
    try:
        task = get_task("synthetic")
        model = task.build_model(seed)
        opt = Optimizer(model.parameters(), server=cluster.server_address, controller=controller, lr=0.1)
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


def test_all_workers_switch_at_the_decisions_round(make_cluster):
    cluster = make_cluster(min_workers=2, tau_max=3, policy="static", tau=1, delta=0.2)
    per_round: dict = {}
    errors: list = []
    paused = [threading.Event(), threading.Event()]
    resume = threading.Event()
    threads = [threading.Thread(target=train, args=(cluster, 40, per_round, errors, seed, cluster.controller_address,
                                                    10, resume, paused[seed])) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for event in paused:
        assert event.wait(60)
    service = cluster.controller.service

    async def decide():
        return service.decide(from_round=25, tau=0, delta=0.5, policy="static", reason="test switch")

    cluster.loop.run(decide())
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
        config = ControllerConfig(host="127.0.0.1", port=port, metrics_port=-1, policy="dsgd")
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
