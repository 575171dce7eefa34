"""The controller sets a worker's downlink fraction, and the worker follows it without a pull.

Real servers (one, or two shards) and a real controller on port 0; decisions are made by hand
while the workers wait at a round, so every worker hears of them before it reaches them (no
margin here is a time). Three workers train the synthetic task:
- "full": no decision gives it a fraction: its replica stays the server's model, to the bit;
- "slow": decisions take it off -> 0.05 -> 0.2 -> off; its stream switches each time from
  the next round, on the same stream, with no pull (SetDownlink);
- "fixed": asked for 0.3 itself: the user's fraction wins over the decisions'.
Nothing is lost across the switches: every round carries a checksum (checksum_every is 1 for
a model this small), each compressed round the follower's own (its replica is the server's
mirror of it, to the bit), each shared round the model's; after "off" the residual drains and
the slow worker's replica is the model again, to the bit.
"""
from __future__ import annotations

import itertools
import math
import threading

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from conftest import join_threads, wait_until
from wanps.controller.policy import PolicyConfig
from wanps.controller.service import ControllerConfig, start_controller
from wanps.proto import wanps_pb2 as pb
from wanps.worker import Optimizer
from wanps.worker.tasks import get_task
from tests.test_shards import start_shards
from tests.wire import RawClient

pytestmark = pytest.mark.timeout(180)

PAUSE_AT, ROUNDS = 5, 40
# (from round, slow's fraction) of the decisions made by hand; "fixed" is given 0.05 in each.
SWITCHES = ((10, 0.05), (20, 0.2), (30, None))


def fractions_in_order(applied) -> list[float]:
    """The downlink fractions of the rounds a replica applied, consecutive repeats folded."""
    return [fraction for fraction, _ in itertools.groupby(item.downlink_delta for item in applied)]


def run_switching(server_address: str, controller_service, loop_thread) -> dict:
    """Train the three workers to ROUNDS through the decisions of SWITCHES; what each ended with."""
    task = get_task("synthetic")
    finals: dict[str, dict] = {}
    errors: list[BaseException] = []
    optimizers: dict[str, Optimizer] = {}
    paused = {name: threading.Event() for name in ("full", "slow", "fixed")}
    resume = threading.Event()
    trained = threading.Barrier(4, timeout=120)  # the three workers and this thread
    checked = threading.Barrier(4, timeout=120)

    def train(name: str, seed: int, downlink_delta: float | None) -> None:
        try:
            model = task.build_model(seed)
            opt = Optimizer(model.parameters(), server=server_address, controller=controller_address, lr=0.2,
                            name=name, downlink_delta=downlink_delta)
            parts = getattr(opt._replica, "shards", [opt._replica])  # a sharded replica's per-shard parts
            for part in parts:
                part.applied = []
            optimizers[name] = opt
            try:
                batches = task.batches(opt.rank, opt.world_size, 32, seed)
                for _ in range(ROUNDS):  # bounded: one step per round
                    if opt.round >= ROUNDS:
                        break
                    if opt.round == PAUSE_AT and not resume.is_set():
                        paused[name].set()
                        assert resume.wait(60)
                    x, y = next(batches)
                    opt.zero_grad()
                    task.loss(model, x, y).backward()
                    opt.step()
                assert opt.wait_for_version(ROUNDS, timeout_s=60) == ROUNDS
                finals[name] = dict(replica=opt.replica.clone(), recoveries=opt.session.recoveries,
                                    applied=[list(part.applied) for part in parts])
                trained.wait()
                checked.wait()  # the server's mirrors were read with every stream still open
            finally:
                opt.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            trained.abort()
            checked.abort()

    controller_address = f"127.0.0.1:{controller_service.port}"
    threads = [threading.Thread(target=train, args=args)
               for args in (("full", 1, None), ("slow", 2, None), ("fixed", 3, 0.3))]
    for thread in threads:
        thread.start()
    try:
        for event in paused.values():
            assert event.wait(60), errors
        slow, fixed = optimizers["slow"].worker_id, optimizers["fixed"].worker_id
        made = []
        for from_round, fraction in SWITCHES:
            downlinks = {fixed: 0.05, **({slow: fraction} if fraction else {})}
            made.append(loop_thread.run(controller_service.service.decide(
                from_round=from_round, tau=1, delta=0.1, policy="static", reason="test downlink switch",
                worker_downlink_delta=downlinks)))

        def heard() -> bool:
            return all({d.decision_id for d in made} <= {d.decision_id for d in opt.session.decisions()}
                       for opt in optimizers.values())

        wait_until(heard, "every worker to hear of the decisions")
        resume.set()
        trained.wait()  # every worker at ROUNDS, its stream still open: the caller reads the mirrors
        return dict(finals=finals, errors=errors, threads=threads, checked=checked)
    except BaseException:
        resume.set()
        trained.abort()
        checked.abort()
        join_threads(threads, 120, errors)
        raise


def finish(run: dict, mirrors: list[dict]) -> dict:
    """Let the workers close (after the mirrors were read), join them, and return what they ended with."""
    run["checked"].wait()
    join_threads(run["threads"], 120, run["errors"])
    assert not run["errors"], run["errors"]
    run["finals"]["mirrors"] = mirrors
    return run["finals"]


def check_switches(finals: dict, model: torch.Tensor, shard_sizes: list[int]) -> None:
    full, slow, fixed = finals["full"], finals["slow"], finals["fixed"]
    # Replicas of uncompressed followers are the server's model, to the bit; the slow worker's
    # too, after its residual drained: nothing was lost across off -> 0.05 -> 0.2 -> off.
    assert torch.equal(full["replica"], model)
    assert torch.equal(slow["replica"], model)
    # No pull at any switch: no recovery ran (a pull happens at the first join and in recovery only).
    assert slow["recoveries"] == full["recoveries"] == fixed["recoveries"] == 0
    for size, applied in zip(shard_sizes, slow["applied"]):
        # Each shard's stream went shared -> 0.05 -> 0.2 -> draining (1.0) -> shared, in order.
        assert fractions_in_order(applied) == [0.0, 0.05, 0.2, 1.0, 0.0]
        for index, item in enumerate(applied):
            if item.model_checksum is None:
                # Several rounds closed in one call (pushes ran ahead): a compressed follower's
                # earlier ones carry nothing (their deltas stay in its residual) and no
                # checksum; the batch's last round carries both (server/service.py).
                assert 0 < item.downlink_delta and item.delta.count == 0, item
                assert any(later.model_checksum is not None for later in applied[index + 1:])
            # every other round was checked against the server
            if 0 < item.downlink_delta < 1:
                assert item.delta.count <= math.ceil(item.downlink_delta * size)
        assert any(0 < item.downlink_delta < 1 and item.delta.count > 0 for item in applied)
    # The decision without the field (or one that does not name the worker) changes nothing.
    for applied in full["applied"]:
        assert {item.downlink_delta for item in applied} == {0.0}
    # The user's own fraction wins over the decisions' 0.05.
    for applied in fixed["applied"]:
        assert set(fractions_in_order(applied)) <= {0.0, 0.3} and applied[-1].downlink_delta == 0.3
    # The server mirrors the fixed worker's replica alone (the slow one's residual drained and went).
    mirrors = finals["mirrors"]
    assert [len(m) for m in mirrors] == [1] * len(mirrors)
    assert torch.equal(fixed["replica"], torch.cat([next(iter(m.values())) for m in mirrors]))


def test_the_controller_switches_a_workers_downlink_and_nothing_is_lost(make_cluster):
    cluster = make_cluster(min_workers=3, tau_max=2, policy="static", tau=1, delta=0.1)
    service = cluster.server.service
    run = run_switching(cluster.server_address, cluster.controller, cluster.loop)
    finals = finish(run, [service.downlink_mirrors()])
    check_switches(finals, cluster.core.model, [cluster.core.model.numel()])
    pulls = cluster.server_registry.get_sample_value(
        "wanps_grpc_server_handled_total", {"service": "wanps.v1.ParameterServer", "method": "PullModel",
                                            "code": "OK"})
    assert pulls == 3  # each worker's first pull, and no other
    wait_until(lambda: not service.downlink_mirrors(), "the closed workers' residuals to go")
    assert service.metrics.compressed_followers._value.get() == 0


def test_over_two_shards_each_shard_switches_its_ranges_residual(loop_thread):
    servers = start_shards(loop_thread, 2, min_workers=3, tau_max=2, check_core_thread=True)
    controller = loop_thread.run(start_controller(
        ControllerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                         policy=PolicyConfig(name="static", tau=1, delta=0.1)), CollectorRegistry()))
    try:
        address = ",".join(f"127.0.0.1:{server.port}" for server in servers)
        run = run_switching(address, controller, loop_thread)
        finals = finish(run, [server.service.downlink_mirrors() for server in servers])
        whole = torch.cat([server.service.core.model for server in servers])
        check_switches(finals, whole, [server.service.core.model.numel() for server in servers])
    finally:
        loop_thread.run(controller.stop(0))
        for server in servers:
            loop_thread.run(server.stop(0))
    assert all(server.service.core_thread_violations == [] for server in servers)


def test_set_downlink_refuses_bad_requests_and_changes_nothing(make_cluster):
    cluster = make_cluster(policy=None)
    service = cluster.server.service
    client = RawClient(cluster.server_address)
    try:
        worker_id = client.join().worker_id
        client.seed(worker_id, torch.zeros(16))
        secret = client.secret(worker_id)
        stream = client.stub.Updates(pb.UpdatesRequest(worker_id=worker_id, from_version=0, stream_key=7,
                                                       member_secret=secret), timeout=30)

        def set_downlink(fraction: float, key: int = 7, member_secret: bytes = secret):
            return client.stub.SetDownlink(pb.SetDownlinkRequest(
                worker_id=worker_id, member_secret=member_secret, stream_key=key, downlink_delta=fraction), timeout=10)

        # The stream registers when its handler runs: wait for it with a harmless "off".
        def registered() -> bool:
            try:
                set_downlink(0.0)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                return False
            return True

        wait_until(registered, "the keyed stream to open")
        for bad in (-0.1, 1.5, math.nan, math.inf):
            with pytest.raises(grpc.RpcError) as caught:
                set_downlink(bad)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "downlink_delta must be a fraction of elements in (0, 1]" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            set_downlink(0.5, key=8)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no Updates stream open under stream_key 8" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            set_downlink(0.5, member_secret=b"x" * 16)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert service.downlink_mirrors() == {}
        # A good one opens the residual from the next round: its first round is its own.
        assert set_downlink(0.5).version == 0
        assert len(service.downlink_mirrors()) == 1
        client.push(worker_id, 0, [1, 2, 3], [0.5, 0.25, 1.0])
        first = next(stream)
        assert (first.round, first.last, first.downlink_delta) == (0, True, 0.5)
        assert first.has_follower_checksum and not first.has_model_checksum
        stream.cancel()
    finally:
        client.close()
