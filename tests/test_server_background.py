"""The server's threads (issue 13): one thread owns the core, and background work that fails
says so (a log line with the exception, a counter) and keeps running.

Real servers on 127.0.0.1:0. Failures are injected into one step (the sweep, a checkpoint
write or snapshot); everything else is the real thing.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from wanps.server import checkpoint as checkpoints
from wanps.server.core import CoreConfig, ServerCore
from wanps.server.service import CoreThreadGuard, CoreThreadViolation, ServerConfig, start_server

from wire import RawClient

pytestmark = pytest.mark.timeout(120)


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def background_errors(registry, task: str) -> float:
    return registry.get_sample_value("wanps_server_background_errors_total", {"task": task}) or 0.0


# ---------------------------------------------------------------------------- one thread owns the core


def test_the_guard_refuses_the_core_off_its_owner_thread():
    core = ServerCore(CoreConfig())
    owner = threading.Thread(target=lambda: None)
    owner.start()
    owner.join()
    guard = CoreThreadGuard(core, owner.ident)
    with pytest.raises(CoreThreadViolation, match="ServerCore.members used on thread 'MainThread'"):
        guard.members
    assert guard.violations == ["ServerCore.members used on thread 'MainThread', not the core thread"]
    own = CoreThreadGuard(core, threading.get_ident())
    assert own.version == 0 and own.view().version == 0 and own.violations == []


def test_every_rpc_leaves_the_core_to_its_thread(make_cluster):
    """With the guard on (make_cluster turns it on), every RPC and the sweeper run without
    touching the core from the event loop: the loop reads only the published view. (Before
    the fix, Join's and Leave's member gauges iterated `core.members` on the loop while the
    core thread deleted from it: "dictionary changed size during iteration".)"""
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None, lease_s=0.5)
    service = cluster.server.service
    client = RawClient(cluster.server_address)
    try:
        a, b = client.join().worker_id, client.join().worker_id
        observer = client.join(observer=True).worker_id
        client.seed(a, torch.zeros(16))
        for round_ in range(3):
            client.push(a, round_, [1], [1.0])
            if round_ == 0:
                client.push(b, round_, [2], [1.0])
            else:
                client.skip(b, round_)
        assert client.pull(observer)[0] == 3
        assert next(iter(client.updates(b, 2))).version == 3
        assert client.ping(a).version == 3 and client.resume(b).member
        assert client.leave(observer).last_round == 2
        client.push(a, 3, [1], [1.0])
        client.leave(a)
        # b goes silent: the sweeper expires it, which closes nothing more and empties the cluster.
        wait_until(lambda: cluster.server_registry.get_sample_value("wanps_server_members_expired_total") == 1.0,
                   "b's lease to run out")
        wait_until(lambda: service.view.expected_now == 0 and not service.view.members, "an empty view")
        assert service.view.version == 4
        assert cluster.server_registry.get_sample_value("wanps_server_members") == 0
        assert service.core_thread_violations == []
    finally:
        client.close()


# ---------------------------------------------------------------------------- the sweeper


def test_a_failing_sweep_is_logged_counted_and_the_sweeper_goes_on(make_cluster, caplog):
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None, lease_s=0.3)
    core = cluster.core
    real_sweep = core.sweep
    failed = threading.Event()

    def sweep_failing_once():
        if not failed.is_set():
            failed.set()
            raise RuntimeError("injected: a tensor op failed inside the sweep")
        return real_sweep()

    core.sweep = sweep_failing_once  # the next sweep fails once (a RuntimeError, as torch raises)
    client = RawClient(cluster.server_address)
    try:
        with caplog.at_level(logging.ERROR, logger="wanps.server"):
            a, b = client.join().worker_id, client.join().worker_id
            client.seed(a, torch.zeros(16))
            # Neither worker calls again: both leases run out, if the sweeper still runs.
            wait_until(lambda: cluster.server_registry.get_sample_value("wanps_server_members_expired_total") == 2,
                       "both leases to run out")
        assert failed.is_set() and background_errors(cluster.server_registry, "sweep") == 1.0
        [record] = [r for r in caplog.records if r.getMessage().startswith("sweep failed")]
        assert record.exc_info is not None and "injected" in str(record.exc_info[1])
        assert not core.members
    finally:
        client.close()


# ---------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpointing_server(loop_thread, tmp_path):
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, min_workers=1, checkpoint_dir=str(tmp_path),
                          checkpoint_every=1, check_core_thread=True)
    registry = CollectorRegistry()
    server = loop_thread.run(start_server(config, registry))
    client = RawClient(f"127.0.0.1:{server.port}")
    worker = client.join().worker_id
    client.seed(worker, torch.zeros(16))
    yield server, registry, client, worker
    client.close()
    loop_thread.run(server.stop(0.5))
    assert server.service.core_thread_violations == []


def test_a_failing_checkpoint_write_is_logged_and_counted(checkpointing_server, monkeypatch, caplog):
    server, registry, client, worker = checkpointing_server

    def write_fails(directory, state):
        raise ValueError("injected: a checkpoint that cannot be serialized")

    monkeypatch.setattr(checkpoints, "write_checkpoint", write_fails)
    with caplog.at_level(logging.ERROR, logger="wanps.server"):
        assert client.push(worker, 0, [1], [1.0]).version == 1
        wait_until(lambda: background_errors(registry, "checkpoint") == 1.0, "the failed write to be counted")
        assert client.push(worker, 1, [1], [1.0]).version == 2  # rounds keep closing
    [record] = [r for r in caplog.records if r.getMessage() == "checkpoint at version 1 failed"]
    assert isinstance(record.exc_info[1], ValueError)
    assert client.push(worker, 1, [1], [1.0]).durable_version == 0  # nothing became durable


def test_a_failing_checkpoint_snapshot_does_not_lose_the_round(checkpointing_server, monkeypatch, caplog):
    """The snapshot is taken on the core thread after a round closed: its failure used to
    propagate into the push (UNKNOWN), and the closed round was never published."""
    server, registry, client, worker = checkpointing_server

    def snapshot_fails(core):
        raise TypeError("injected: a member that cannot be snapshotted")

    monkeypatch.setattr(checkpoints, "core_state", snapshot_fails)
    with caplog.at_level(logging.ERROR, logger="wanps.server"):
        assert client.push(worker, 0, [1], [1.0]).version == 1
    delta = next(iter(client.updates(worker, 0)))
    assert (delta.round, delta.version) == (0, 1)
    assert background_errors(registry, "checkpoint") == 1.0
    assert any(r.getMessage() == "checkpoint snapshot at version 1 failed" and r.exc_info for r in caplog.records)
    with pytest.raises(grpc.RpcError) as ahead:  # the loop's view knows version 1 (and no more)
        next(iter(client.updates(worker, 2)))
    assert ahead.value.code() == grpc.StatusCode.FAILED_PRECONDITION
