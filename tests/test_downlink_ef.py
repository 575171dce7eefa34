"""Per-follower downlink compression with a server-side residual (server/downlink.py).

Pure state first (no network): the follower's replica follows the server's mirror to the bit,
the top-k is the top-k, nothing is lost. Then real servers on port 0: one worker of three asks
for a compressed downlink, downloads less, still trains, and its replica is the server's
model minus its residual until a resync makes it the model again; bad requests change nothing.
"""
from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
import torch

from conftest import wait_until
from wanps.proto import wanps_pb2 as pb
from wanps.proto.checksum import model_checksum
from wanps.proto.codec import Update, apply_delta
from wanps.server.downlink import DownlinkResidual, check_fraction, elements_per_round
from wanps.server.service import ServerConfig, start_server
from wanps.worker import Optimizer
from wanps.worker.cli import main as worker_main
from wanps.worker.replica import Replica
from wanps.worker.session import WorkerSession
from wanps.worker.tasks import get_task
from tests.test_shards import start_shards
from tests.wire import FINGERPRINT, RawClient

def train_rounds(opt: Optimizer, model: torch.nn.Module, task, seed: int, rounds: int) -> None:
    """Train `model` through `opt` until its round `rounds`, then wait for that version."""
    batches = task.batches(opt.rank, opt.world_size, 32, seed)
    while opt.round < rounds:
        x, y = next(batches)
        opt.zero_grad()
        task.loss(model, x, y).backward()
        opt.step()
    opt.wait_for_version(rounds, timeout_s=60)


BAD_FRACTIONS = (-0.1, 1.5, math.nan, math.inf, -math.inf)


def random_round(generator: torch.Generator, num_params: int, count: int) -> Update:
    """A round's aggregated delta: `count` distinct sorted indices, values of mixed scale."""
    indices = torch.randperm(num_params, generator=generator)[:count].sort().values.to(torch.int32)
    values = torch.randn(count, generator=generator) * 10.0 ** torch.randint(-4, 1, (count,), generator=generator)
    return Update(values=values, indices=indices)


# ---------------------------------------------------------------------------- pure state


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
def test_the_follower_replica_is_the_server_mirror_bit_for_bit_and_the_model_minus_its_residual(fraction):
    generator = torch.Generator().manual_seed(7)
    num_params = 5000
    model = torch.randn(num_params, generator=generator)
    follower = model.clone()  # it just pulled
    state = DownlinkResidual(model, fraction)
    for round_ in range(60):
        count = [0, 1, 50, num_params][round_ % 4]  # empty, one element, sparse, dense-sized rounds
        apply_delta(model, random_round(generator, num_params, count))
        sent = state.step(model)
        assert sent.count <= elements_per_round(fraction, num_params)
        apply_delta(follower, sent)  # what the worker's Replica does with the chunks
        assert torch.equal(follower, state.mirror)  # bit for bit, every round
        assert model_checksum(follower) == state.checksum()
        residual = state.residual(model)
        # Conservation: replica + residual == model (float32 rounding of the one subtraction
        # that defines the residual, no drift), and exactly where nothing is pending.
        assert torch.allclose(follower + residual, model, rtol=0, atol=1e-6)
        assert torch.equal(follower[residual == 0], model[residual == 0])
    if fraction == 1.0:
        # Everything pending goes every round: no residual left (Sterbenz: an element within
        # a factor of two of the model's lands on it exactly).
        assert torch.count_nonzero(state.residual(model)) <= 1


def test_a_round_sends_the_top_k_of_the_residual_by_magnitude_sorted():
    model = torch.zeros(10)
    state = DownlinkResidual(model, 0.3)  # k = 3
    assert state.k == 3
    model -= torch.tensor([0.5, -4.0, 0.0, 3.0, 0.25, 0.0, -2.0, 1.0, 0.0, 0.0])  # the server applied a round
    sent = state.step(model)
    assert sent.indices.tolist() == [1, 3, 6]  # |4|, |3|, |2|, in index order
    assert sent.values.tolist() == [-4.0, 3.0, -2.0]  # replica[i] -= value lands on the model
    assert state.residual(model).tolist() == [-0.5, 0, 0, 0, -0.25, 0, 0, -1.0, 0, 0]
    # The next round: nothing new, the rest goes (the residual is fed back, never lost).
    sent = state.step(model)
    assert sent.indices.tolist() == [0, 4, 7] and sent.values.tolist() == [0.5, 0.25, 1.0]
    assert torch.equal(state.mirror, model)
    assert state.step(model).count == 0  # nothing pending: nothing sent, not k zeros


def test_a_new_residual_starts_at_zero_and_holds_its_own_copy():
    model = torch.arange(8, dtype=torch.float32)
    state = DownlinkResidual(model, 0.5)
    model[0] = 100.0
    assert state.mirror[0] == 0.0  # the mirror is the follower's replica, not a view of the model
    assert state.nbytes == 8 * 4
    assert torch.equal(DownlinkResidual(model, 0.5).residual(model), torch.zeros(8))


@pytest.mark.parametrize("fraction", [0.0, *BAD_FRACTIONS])
def test_a_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match=r"downlink_delta must be a fraction of elements in \(0, 1\]"):
        check_fraction(fraction)
    with pytest.raises(ValueError):
        DownlinkResidual(torch.zeros(4), fraction)


# ---------------------------------------------------------------------------- a real server


@pytest.mark.timeout(180)
def test_a_compressed_follower_downloads_less_trains_and_resyncs_to_the_model(make_cluster):
    """Three workers (tau 1, delta 0.1 up); worker 'slow' downloads at downlink_delta 0.1."""
    cluster = make_cluster(min_workers=3, tau_max=2, policy=None)
    service = cluster.server.service
    task = get_task("synthetic")
    rounds = 60
    finals: dict[str, dict] = {}
    errors: list[BaseException] = []
    trained = threading.Barrier(4, timeout=120)  # the three workers and this thread
    checked = threading.Barrier(4, timeout=120)

    def train(name: str, seed: int, downlink_delta: float | None) -> None:
        try:
            model = task.build_model(seed)
            opt = Optimizer(model.parameters(), server=cluster.server_address, lr=0.2, tau=1, delta=0.1,
                            name=name, downlink_delta=downlink_delta)
            try:
                initial_accuracy = task.accuracy(model)
                train_rounds(opt, model, task, seed, rounds)
                finals[name] = dict(version=opt.version, replica=opt.replica.clone(), delta_bytes=opt.delta_bytes,
                                    accuracy=task.accuracy(model), initial_accuracy=initial_accuracy)
                trained.wait()
                checked.wait()  # the server's mirror of this replica was read with the stream still open
                if downlink_delta is not None:
                    # A resync, as after a lost connection: recovery always pulls a compressed
                    # follower (its residual went with the stream) and opens a fresh one.
                    opt.session._mark_lost(ConnectionError("test: resync the compressed follower"))
                    assert opt.wait_for_version(rounds, timeout_s=60) == rounds
                    # The old stream ends and the new one opens on their own threads: wait until the
                    # server holds the new one alone, its residual zero (its mirror is the model).
                    model_now = cluster.core.model  # no round closes any more

                    def resynced() -> bool:
                        mirrors = service.downlink_mirrors()
                        return len(mirrors) == 1 and all(torch.equal(m, model_now) for m in mirrors.values())

                    wait_until(resynced, "one compressed stream, at the model, after the resync")
                    finals[name].update(resynced=opt.replica.clone(), recoveries=opt.session.recoveries)
            finally:
                opt.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            trained.abort()
            checked.abort()

    threads = [threading.Thread(target=train, args=args)
               for args in (("full-1", 1, None), ("full-2", 2, None), ("slow", 3, 0.1))]
    for thread in threads:
        thread.start()
    try:
        trained.wait()
        mirrors = service.downlink_mirrors()
        assert service.metrics.compressed_followers._value.get() == 1
        assert service.metrics.downlink_residual_bytes._value.get() == 4 * cluster.core.model.numel()
        checked.wait()
    finally:
        for thread in threads:
            thread.join(120)
    assert not errors, errors
    model = cluster.core.model
    assert cluster.core.version == rounds
    full_1, full_2, slow = finals["full-1"], finals["full-2"], finals["slow"]
    # Everywhere else replicas are bit-identical to the server's model.
    assert torch.equal(full_1["replica"], model) and torch.equal(full_2["replica"], model)
    # The compressed follower's replica: the server's mirror of it, to the bit; the model minus its residual.
    assert slow["version"] == rounds
    (mirror,) = mirrors.values()
    assert torch.equal(slow["replica"], mirror)
    residual = model - mirror
    assert torch.count_nonzero(residual) > 0, "the downlink compressed nothing"
    assert torch.allclose(slow["replica"] + residual, model, rtol=0, atol=1e-6)
    # It downloaded far less than the others (each got the union of three top-10% pushes).
    assert slow["delta_bytes"] < 0.6 * min(full_1["delta_bytes"], full_2["delta_bytes"]), finals
    # Training progressed on the compressed worker's replica.
    assert slow["accuracy"] > max(0.6, slow["initial_accuracy"] + 0.2), slow
    # After the resync its replica is the model, and its new residual is zero.
    assert slow["recoveries"] == 1
    assert torch.equal(slow["resynced"], model)
    # Every stream ends with its worker (the server hears of it on its own): nothing is held for them then.
    wait_until(lambda: not service.downlink_mirrors(), "the closed worker's residual to go")
    assert service.metrics.compressed_followers._value.get() == 0


def _joined_and_seeded(address: str) -> tuple[RawClient, int]:
    client = RawClient(address)
    worker_id = client.join().worker_id
    client.seed(worker_id, torch.zeros(16))
    return client, worker_id


def _first_message_code(client: RawClient, worker_id: int, downlink_delta: float) -> tuple[grpc.StatusCode, str]:
    stream = client.stub.Updates(pb.UpdatesRequest(worker_id=worker_id, from_version=0, downlink_delta=downlink_delta,
                                                   member_secret=client.secret(worker_id)), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    return caught.value.code(), caught.value.details()


def test_bad_downlink_fractions_are_invalid_argument_and_change_nothing(make_cluster):
    cluster = make_cluster(policy=None)
    service = cluster.server.service
    client, worker_id = _joined_and_seeded(cluster.server_address)
    try:
        for fraction in BAD_FRACTIONS:
            code, details = _first_message_code(client, worker_id, fraction)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (fraction, code, details)
            assert "downlink_delta must be a fraction of elements in (0, 1]" in details
        assert service.downlink_mirrors() == {}
        assert service.metrics.compressed_followers._value.get() == 0
        assert cluster.core.version == 0
    finally:
        client.close()


def test_compressed_followers_above_the_cap_are_resource_exhausted(loop_thread):
    server = loop_thread.run(start_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1,
                                                       max_compressed_followers=1, check_core_thread=True)))
    client, worker_id = _joined_and_seeded(f"127.0.0.1:{server.port}")
    held = None
    try:
        held = client.stub.Updates(pb.UpdatesRequest(worker_id=worker_id, from_version=0, downlink_delta=0.5,
                                                     member_secret=client.secret(worker_id)))
        # The first stream holds the one residual allowed: its first round proves it is open.
        client.push(worker_id, 0, [1], [0.5])
        first = next(held)
        assert first.version == 1 and first.last and not first.has_model_checksum
        (mirror,) = server.service.downlink_mirrors().values()
        assert first.has_follower_checksum and first.follower_checksum == model_checksum(mirror)
        code, details = _first_message_code(client, worker_id, 0.5)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "--max-compressed-followers 1" in details
        assert len(server.service.downlink_mirrors()) == 1  # the refusal changed nothing
    finally:
        if held is not None:
            held.cancel()
        client.close()
        loop_thread.run(server.stop(0))
        assert server.service.core_thread_violations == []


@pytest.mark.timeout(180)
def test_over_two_shards_each_shard_keeps_its_ranges_residual(loop_thread):
    """`downlink_delta` reaches every shard's stream: each shard mirrors its range of the
    compressed worker's replica; the other worker's replica is the whole model, to the bit."""
    servers = start_shards(loop_thread, 2, min_workers=2, tau_max=2, check_core_thread=True)
    address = ",".join(f"127.0.0.1:{server.port}" for server in servers)
    task = get_task("synthetic")
    rounds = 30
    finals: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []
    trained = threading.Barrier(3, timeout=120)
    checked = threading.Barrier(3, timeout=120)

    def train(name: str, seed: int, downlink_delta: float | None) -> None:
        try:
            model = task.build_model(seed)
            opt = Optimizer(model.parameters(), server=address, lr=0.2, tau=1, delta=0.1, name=name,
                            downlink_delta=downlink_delta)
            try:
                train_rounds(opt, model, task, seed, rounds)
                finals[name] = opt.replica.clone()
                trained.wait()
                checked.wait()
            finally:
                opt.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            trained.abort()
            checked.abort()

    threads = [threading.Thread(target=train, args=args) for args in (("full", 1, None), ("slow", 2, 0.1))]
    for thread in threads:
        thread.start()
    try:
        trained.wait()
        mirrors = [server.service.downlink_mirrors() for server in servers]
        checked.wait()
    finally:
        for thread in threads:
            thread.join(120)
        for server in servers:
            loop_thread.run(server.stop(0))
    assert not errors, errors
    whole = torch.cat([server.service.core.model for server in servers])
    assert torch.equal(finals["full"], whole)
    assert [len(m) for m in mirrors] == [1, 1]
    mirrored = torch.cat([next(iter(m.values())) for m in mirrors])
    assert torch.equal(finals["slow"], mirrored)
    assert not torch.equal(finals["slow"], whole), "the downlink compressed nothing"
    assert all(server.service.core_thread_violations == [] for server in servers)


@pytest.mark.timeout(120)
def test_recovery_pulls_a_compressed_member_even_when_it_is_only_behind(make_cluster):
    """A plain member behind the same server process catches up through the stream; a
    compressed one must pull: its residual went with its old stream, and a new stream's
    residual starts from the model. Driven round by round: member A pushes by hand, member B
    is a WorkerSession whose replica the test advances."""
    cluster = make_cluster(min_workers=2, tau_max=4, policy=None)
    service = cluster.server.service
    client = RawClient(cluster.server_address)
    session = WorkerSession(cluster.server_address, downlink_delta=0.25)
    generator = torch.Generator().manual_seed(3)
    try:
        a = client.join().worker_id
        b = session.join(16, FINGERPRINT).worker_id
        client.secrets[b] = session.member_secret  # so the test can push as B while its session is down
        client.seed(a, torch.randn(16, generator=generator))
        pulled = session.pull(timeout=10)
        replica = Replica(pulled.values.clone(), pulled.version)
        session.follow_updates(replica.version)

        def close_round(round_: int, computed_at: int) -> None:
            for worker_id in (a, b):
                indices = torch.randperm(16, generator=generator)[:8].sort().values.tolist()
                client.push(worker_id, round_, indices, torch.randn(8, generator=generator).tolist(), computed_at)

        for round_ in range(5):
            close_round(round_, replica.version)
            replica.catch_up(session.deltas, round_ + 1, deadline=time.monotonic() + 10)
        (mirror,) = service.downlink_mirrors().values()
        assert torch.equal(replica.values, mirror)
        assert not torch.equal(mirror, cluster.core.model), "nothing is pending: the test would prove nothing"
        # B's stream breaks at version 5; the cluster closes three more rounds meanwhile.
        session._mark_lost(ConnectionError("test: B's stream broke"))
        for round_ in range(5, 8):
            close_round(round_, 5)
        assert cluster.core.version == 8 and replica.version == 5
        recovery = session.recover(replica, lambda v: None, tau_max=4, next_round=8, timeout=30)
        # The same server process, ahead of the replica: a plain member would follow on; B pulls.
        assert not recovery.rejoined and recovery.pulled
        assert replica.version == 8 and torch.equal(replica.values, cluster.core.model)
        for round_ in range(8, 11):  # its new stream's rounds, each checked by its follower checksum
            close_round(round_, replica.version)
            replica.catch_up(session.deltas, round_ + 1, deadline=time.monotonic() + 10)
        wait_until(lambda: len(service.downlink_mirrors()) == 1, "the old stream's residual to go")
        (mirror,) = service.downlink_mirrors().values()
        assert torch.equal(replica.values, mirror)
    finally:
        session.close()
        client.close()


@pytest.mark.parametrize("fraction", [0.0, *BAD_FRACTIONS])
def test_a_worker_refuses_a_bad_downlink_fraction_before_it_joins(fraction, capsys):
    model = get_task("synthetic").build_model(0)
    # No server at this address: the refusal comes before any connection.
    with pytest.raises(ValueError, match=r"downlink_delta must be a fraction of elements in \(0, 1\]"):
        Optimizer(model, server="127.0.0.1:1", downlink_delta=fraction)
    with pytest.raises(SystemExit) as exited:
        worker_main(["--server", "127.0.0.1:1", f"--downlink-delta={fraction}"])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"wanps worker: error: argument --downlink-delta: must be in (0, 1], got {fraction}"


def test_rounds_that_close_together_reach_a_compressed_follower_as_one_step(make_cluster):
    """Two rounds closed by one push: the compressed stream gets the first empty and the
    second with the top-k of the whole residual, checked by the follower checksum."""
    cluster = make_cluster(min_workers=2, tau_max=4, policy=None)
    service = cluster.server.service
    client = RawClient(cluster.server_address)
    try:
        a, b = client.join().worker_id, client.join().worker_id
        observer = client.join(observer=True).worker_id
        client.seed(a, torch.arange(16, dtype=torch.float32))
        _, replica = client.pull(observer)
        stream = client.stub.Updates(pb.UpdatesRequest(worker_id=observer, from_version=0, downlink_delta=0.25,
                                                       member_secret=client.secret(observer)), timeout=30)
        client.push(a, 0, [0, 1, 2], [0.5, 0.25, 1.0])
        client.push(a, 1, [3, 4, 5], [2.0, -1.0, 0.125], computed_at=0)
        client.push(b, 1, [6, 7], [4.0, 8.0], computed_at=0)
        wait_until(lambda: len(service.downlink_mirrors()) == 1, "the compressed stream to open")
        client.push(b, 0, [8], [16.0])  # closes rounds 0 and 1 in one core call
        assert cluster.core.version == 2
        first, second = next(stream), next(stream)
        assert (first.round, first.version, first.total_count, first.last) == (0, 1, 0, True)
        assert (second.round, second.version, second.total_count, second.last) == (1, 2, 4, True)
        indices = torch.frombuffer(bytearray(second.indices), dtype=torch.int32)
        values = torch.frombuffer(bytearray(second.values), dtype=torch.float32)
        # The four largest of both rounds' means (each / 2 workers): 16/2, 8/2, 4/2, 2/2.
        assert indices.tolist() == [3, 6, 7, 8] and values.tolist() == [1.0, 2.0, 4.0, 8.0]
        apply_delta(replica, Update(values=values, indices=indices))
        assert second.has_follower_checksum and second.follower_checksum == model_checksum(replica)
        (mirror,) = service.downlink_mirrors().values()
        assert torch.equal(replica, mirror)
        stream.cancel()
    finally:
        client.close()
