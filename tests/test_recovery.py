"""Worker recovery in-process (real sockets): a server restarted without a checkpoint is
re-seeded from a worker's replica, and training goes on."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import join_threads, wait_until
from wanps.proto.codec import model_crc32
from wanps.server.service import ServerConfig, start_server
from wanps.worker import Optimizer
from wanps.worker.observer import Observer
from wanps.worker.tasks import get_task


@pytest.mark.timeout(120)
def test_a_server_restarted_empty_is_reseeded_by_the_workers(loop_thread):
    config = dict(host="127.0.0.1", metrics_port=-1, min_workers=2, tau_max=2, audit=True)
    server = loop_thread.run(start_server(ServerConfig(port=0, **config)))
    port = server.port
    task = get_task("synthetic")
    first_life = 20
    second_life = 30
    restarted = threading.Event()
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            model = task.build_model(seed)
            opt = Optimizer(model.parameters(), server=f"127.0.0.1:{port}", lr=0.2, tau=1, delta=0.1)
            batches = task.batches(opt.rank, 2, 32, seed)
            while not (restarted.is_set() and opt.session.recoveries and opt.round >= second_life):
                x, y = next(batches)
                opt.zero_grad()
                task.loss(model, x, y).backward()
                opt.step()
            opt.wait_for_version(opt.round, timeout_s=60)
            results[seed] = (opt.version, opt.replica.clone(), opt.worker_id)
            opt.close()
        except BaseException as exc:
            errors.append(exc)

    observers: list[Observer] = []

    def observe() -> None:  # joins once the cluster has started (its pull waits for that)
        try:
            observers.append(Observer(task.build_model(0), f"127.0.0.1:{port}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    observer_thread = threading.Thread(target=observe)
    observer_thread.start()
    try:
        join_threads([observer_thread], 60, errors)
        assert observers, errors
        observer = observers[0]
        wait_until(lambda: server.service.core.version >= first_life or errors, f"version {first_life}")
        observer.poll()
        loop_thread.run(server.stop(0))
        server = loop_thread.run(start_server(ServerConfig(port=port, **config)))
        restarted.set()
        join_threads(threads, 90, errors)
        assert not errors, errors
        core = server.service.core
        assert core.version >= second_life
        assert core.applied_rounds == list(range(core.version))
        assert torch.allclose(core.initial_model.double() - core.applied_sum, core.model.double(), atol=1e-5)
        for version, values, worker_id in results.values():
            assert version == core.version and model_crc32(values) == model_crc32(core.model)
            assert worker_id in (1, 2)  # the new server numbers its members from 1 again
        # The observer lost its server too: it rejoins as an observer (not a member) and follows again.
        assert observer.wait_for_version(core.version, timeout_s=30) == core.version
        assert model_crc32(observer.replica.values) == model_crc32(core.model)
        assert observer.session.recoveries >= 1
        assert observer.worker_id in core.observers and observer.worker_id not in core.members
    finally:
        for observer in observers:
            observer.close()
        loop_thread.run(server.stop(0))


@pytest.mark.timeout(120)
def test_a_straggler_past_the_round_deadline_loses_nothing(loop_thread):
    """Rounds close at the deadline without a slow worker; its late pushes go back into its
    error feedback, it moves on to the current round, and replicas stay equal."""
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, min_workers=2, tau_max=2, audit=True,
                          round_deadline_s=0.05, lease_s=0)
    server = loop_thread.run(start_server(config))
    task = get_task("synthetic")
    rounds = 40
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def work(seed: int, compute_s: float) -> None:
        try:
            model = task.build_model(seed)
            opt = Optimizer(model.parameters(), server=f"127.0.0.1:{server.port}", lr=0.2, tau=1, delta=0.1)
            batches = task.batches(opt.rank, 2, 32, seed)
            while max(opt.round, opt.version) < rounds:  # a straggler's next round is at least the version
                x, y = next(batches)
                opt.zero_grad()
                task.loss(model, x, y).backward()
                threading.Event().wait(compute_s)  # the straggler's slow compute
                opt.step()
            opt.wait_for_version(rounds, timeout_s=60)
            results[seed] = (opt.version, opt.replica.clone())
            opt.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(1, 0.0)), threading.Thread(target=work, args=(2, 0.2))]
    try:
        for thread in threads:
            thread.start()
        join_threads(threads, 90, errors)
        assert not errors, errors
        core = server.service.core
        metrics = server.service.metrics
        assert metrics.rounds_overdue._value.get() > 0, "no round closed at its deadline"
        assert metrics.pushes.labels(kind="late")._value.get() > 0, "the straggler was never late"
        assert core.applied_rounds == list(range(core.version))
        assert torch.allclose(core.initial_model.double() - core.applied_sum, core.model.double(), atol=1e-5)
        for version, values in results.values():
            assert version == core.version and torch.equal(values, core.model)
    finally:
        loop_thread.run(server.stop(0))
