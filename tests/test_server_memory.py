"""The server's memory is bounded in bytes and released when the workers leave; large
streams end quietly when their client goes away; seeds and pulls of the whole model."""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from wanps.proto import wanps_pb2 as pb
from wanps.proto.codec import Update, fingerprint_of
from wanps.proto.wire import CHUNK_ELEMENTS
from wanps.rpc.errors import FailedPrecondition
from wanps.server.aggregate import aggregate, blocked_mean
from wanps.server.history import RoundHistory

from conftest import join_threads
from wire import RawClient

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------------------- the history


def round_chunks(round_: int, nbytes: int) -> tuple[pb.DeltaChunk, ...]:
    """One round of `nbytes` payload bytes (half indices, half values), in one chunk."""
    return (pb.DeltaChunk(round=round_, version=round_ + 1, indices=bytes(nbytes // 2), values=bytes(nbytes // 2),
                          last=True),)


def test_history_keeps_what_fits_its_byte_budget_and_always_the_newest_round():
    history = RoundHistory(keep=64, budget_bytes=1000)
    for round_ in range(5):
        history.publish(round_, round_chunks(round_, 300))
    assert history.rounds == [2, 3, 4] and history.bytes == 900
    history.publish(5, round_chunks(5, 5000))  # larger than the whole budget: kept alone
    assert history.rounds == [5] and history.bytes == 5000
    history.publish(6, round_chunks(6, 100))
    assert history.rounds == [6] and history.bytes == 100


def test_history_rounds_stay_an_upper_bound():
    history = RoundHistory(keep=2, budget_bytes=10**9)
    for round_ in range(4):
        history.publish(round_, round_chunks(round_, 10))
    assert history.rounds == [2, 3]


def test_a_member_stream_pins_the_rounds_it_has_yet_to_send_up_to_tau_max_plus_one():
    async def scenario() -> None:
        history = RoundHistory(keep=64, budget_bytes=100, pin_rounds=3)
        history.publish(0, round_chunks(0, 80))
        member = history.follow(0, pin=True)
        first = await member.__anext__()  # the member's stream is sending round 0
        assert first.round == 0
        for round_ in (1, 2):
            history.publish(round_, round_chunks(round_, 80))
        assert history.rounds == [0, 1, 2]  # over the budget, but the member still needs them
        history.publish(3, round_chunks(3, 80))
        assert history.rounds == [1, 2, 3]  # round 0 is older than tau_max + 1 rounds: it goes anyway
        observer = history.follow(1)  # an observer pins nothing
        assert (await observer.__anext__()).round == 1
        await member.aclose()  # the member's stream ends: its pin goes with it
        history.publish(4, round_chunks(4, 80))
        assert history.rounds == [4]
        with pytest.raises(FailedPrecondition, match="pull the model again"):
            await observer.__anext__()
        history.release()
        assert history.rounds == [] and history.bytes == 0 and history.published_through == 4

    asyncio.run(scenario())


def test_a_caught_up_member_releases_what_it_held():
    async def scenario() -> None:
        history = RoundHistory(keep=64, budget_bytes=100, pin_rounds=8)
        member = history.follow(0, pin=True)
        waiting = asyncio.ensure_future(member.__anext__())
        await asyncio.sleep(0)  # the stream waits for round 0
        for round_ in range(3):
            history.publish(round_, round_chunks(round_, 80))
        assert (await waiting).round == 0
        assert history.rounds == [0, 1, 2]
        assert [(await member.__anext__()).round for _ in range(2)] == [1, 2]
        caught_up = asyncio.ensure_future(member.__anext__())
        await asyncio.sleep(0)  # it has sent everything and waits: nothing is pinned any more
        assert history.rounds == [2]
        caught_up.cancel()
        await asyncio.gather(caught_up, return_exceptions=True)

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- aggregation


def random_sparse(d: int, k: int, rng: np.random.Generator, zeros: bool = False) -> Update:
    indices = np.sort(rng.choice(d, size=k, replace=False)).astype(np.int32)
    values = rng.standard_normal(k).astype(np.float32)
    if zeros:
        values[::3] = 0.0  # explicit zeros stay in the union
    return Update(values=torch.from_numpy(values), indices=torch.from_numpy(indices))


@pytest.mark.parametrize("d, ks, block", [
    (1000, (100, 300, 7), 64),  # several blocks, uneven pairs
    (1000, (1000, 1000), 1000),  # every element, one block
    (1003, (1, 2, 1003), 100),  # a last partial block; an update in one block only
    (50, (0, 5), 16),  # an empty update
])
def test_the_blocked_mean_is_the_sort_paths_mean_to_the_bit(d, ks, block):
    rng = np.random.default_rng(d + sum(ks))
    updates = [random_sparse(d, k, rng, zeros=True) for k in ks]
    expected = aggregate(updates, divisor=len(ks) + 1)
    got = blocked_mean(updates, len(ks) + 1, d, block=block)
    assert torch.equal(got.indices, expected.indices)
    assert torch.equal(got.values.view(torch.int32), expected.values.view(torch.int32))
    assert got.indices.dtype == torch.int32 and got.values.dtype == torch.float32


def test_large_rounds_take_the_blocked_path_with_the_same_result():
    d = 1 << 21
    rng = np.random.default_rng(5)
    updates = [random_sparse(d, d // 8, rng) for _ in range(3)]
    by_sort, blocked = aggregate(updates, 3), aggregate(updates, 3, num_params=d)
    assert torch.equal(by_sort.indices, blocked.indices)
    assert torch.equal(by_sort.values, blocked.values)


# ---------------------------------------------------------------------------- a live server


def join_and_seed(client: RawClient, d: int, workers: int) -> tuple[list[int], torch.Tensor]:
    fingerprint = fingerprint_of([("w", (d,), "torch.float32")])
    ids = [client.join(d, fingerprint).worker_id for _ in range(workers)]
    model = torch.from_numpy(np.random.default_rng(0).standard_normal(d).astype(np.float32))
    client.seed(ids[0], model)
    return ids, model


def push_pairs(client: RawClient, worker: int, round_: int, indices: np.ndarray, value: float) -> pb.PushReply:
    header = pb.PushHeader(worker_id=worker, round=round_, computed_at_version=round_, codec=pb.CODEC_SPARSE,
                           value_dtype=pb.VALUE_DTYPE_FLOAT32, count=indices.size, member_secret=client.secret(worker))
    values = np.full(indices.size, value, dtype="<f4")
    chunks = [pb.SparseChunk(indices=indices[s : s + CHUNK_ELEMENTS].astype("<u4").tobytes(),
                             values=values[s : s + CHUNK_ELEMENTS].tobytes())
              for s in range(0, indices.size, CHUNK_ELEMENTS)]
    return client.push_raw(header, chunks)


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll a condition (a count, a state), never a fixed sleep; `timeout` only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_when_every_worker_leaves_only_the_model_stays(make_cluster):
    cluster = make_cluster(min_workers=2, policy=None, history_rounds=64)
    service = cluster.server.service
    client = RawClient(cluster.server_address)
    d = 300_000
    try:
        (a, b), _ = join_and_seed(client, d, 2)
        rng = np.random.default_rng(1)
        for round_ in range(3):
            for worker in (a, b):
                push_pairs(client, worker, round_, np.sort(rng.choice(d, 30_000, replace=False)), 0.5)
        push_pairs(client, a, 3, np.arange(10), 1.0)  # an open round, waiting for b
        wait_until(lambda: service.history.published_through == 2, "three rounds published")
        assert len(service.history) == 3 and service.history.bytes > 0
        gauge = cluster.server_registry.get_sample_value("wanps_server_history_bytes")
        assert gauge == service.history.bytes
        assert all(m.last_update is not None for m in cluster.core.members.values())
        client.leave(b)
        client.leave(a)  # round 3 closes without b first
        wait_until(lambda: not cluster.core.members and service.history.bytes == 0, "the release")
        assert len(service.history) == 0 and cluster.core.open_rounds == {}
        assert cluster.server_registry.get_sample_value("wanps_server_history_bytes") == 0
        assert cluster.server_registry.get_sample_value("wanps_server_members") == 0
        assert cluster.core.model is not None and cluster.core.version == 4
        # A worker joining later pulls the model, then follows from there.
        late = client.join(d, fingerprint_of([("w", (d,), "torch.float32")])).worker_id
        version, model = client.pull(late)
        assert version == 4 and torch.equal(model, cluster.core.model)
    finally:
        client.close()


def test_concurrent_pulls_share_one_snapshot_and_get_the_exact_model(make_cluster):
    cluster = make_cluster(min_workers=4, policy=None)
    service = cluster.server.service
    client = RawClient(cluster.server_address)
    d = 3 * CHUNK_ELEMENTS + 5  # a partial last chunk
    snapshots = []
    original = cluster.core.snapshot_tensor

    def counted():
        snapshots.append(1)
        return original()

    cluster.core.snapshot_tensor = counted
    try:
        ids, model = join_and_seed(client, d, 3)
        pulled: dict[int, tuple[int, torch.Tensor]] = {}
        threads = [threading.Thread(target=lambda w=w: pulled.__setitem__(w, client.pull(w))) for w in ids]
        for thread in threads:
            thread.start()
        started = lambda: cluster.server_registry.get_sample_value(  # noqa: E731
            "wanps_grpc_server_started_total", {"service": "wanps.v1.ParameterServer", "method": "PullModel"}) or 0
        wait_until(lambda: started() == 3, "three pulls waiting for the start")
        client.join(d, fingerprint_of([("w", (d,), "torch.float32")]))  # the 4th member: the cluster starts
        join_threads(threads, 60)
        assert len(snapshots) == 1
        assert all(version == 0 and torch.equal(values, model) for version, values in pulled.values())
        wait_until(lambda: service._snapshot is None, "the snapshot to be freed after the last pull")
    finally:
        client.close()


def test_a_client_leaving_a_large_stream_leaves_no_traceback(make_cluster, caplog):
    """Workers that leave (or restart their stream) while a large delta is being written:
    gRPC used to log `ExecuteBatchError raised in core` tracebacks for some of them."""
    cluster = make_cluster(min_workers=1, policy=None, tau_max=1)
    client = RawClient(cluster.server_address)
    d = 2_000_000
    streams = 40
    try:
        (worker,), _ = join_and_seed(client, d, 1)
        push_pairs(client, worker, 0, np.arange(d), 1e-3)  # a 16 MB delta in 16 chunks
        caplog.set_level(logging.INFO)

        def handled(code: str) -> float:
            return cluster.server_registry.get_sample_value(
                "wanps_grpc_server_handled_total",
                {"service": "wanps.v1.ParameterServer", "method": "Updates", "code": code}) or 0

        for i in range(streams):
            stream = client.updates(worker, 0, timeout=30)
            for _ in range(1 + i % 4):
                assert next(stream).round == 0
            stream.cancel()
        wait_until(lambda: handled("CANCELLED") + handled("UNKNOWN") == streams, "every stream to end", timeout=60)
        logged = [r for r in caplog.records if "ExecuteBatchError" in r.getMessage()
                  or (r.exc_info and "ExecuteBatchError" in type(r.exc_info[1]).__name__)]
        assert logged == [] and handled("UNKNOWN") == 0
    finally:
        client.close()


def test_a_slow_member_gets_its_rounds_from_a_zero_byte_history(make_cluster):
    """With --history-mb 0 the history keeps only the newest round, and the rounds a member's
    stream has yet to send: a worker whose stream is still on a large round while the next
    two close (tau_max 2) receives all three, instead of being told to pull the model."""
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None, history_mb=0)
    service = cluster.server.service
    client = RawClient(cluster.server_address)
    d = 4_000_000
    try:
        (a, b), _ = join_and_seed(client, d, 2)
        stream = client.updates(b, 0, timeout=60)
        everything = np.arange(d)
        push_pairs(client, a, 0, everything, 1e-3)
        push_pairs(client, b, 0, everything, 1e-3)  # round 0: a 32 MB delta that b does not read yet
        assert next(stream).round == 0  # b's stream is on round 0 (gRPC buffers hold far less than 32 MB)
        for round_ in (1, 2):
            push_pairs(client, a, round_, np.arange(5), 1.0)
            push_pairs(client, b, round_, np.arange(5), 1.0)
        wait_until(lambda: service.history.published_through == 2, "rounds 1 and 2 published")
        assert service.history.rounds == [0, 1, 2]  # over the budget: the member still needs them
        finished = []  # rounds whose last chunk b received
        for chunk in stream:
            if chunk.last:
                finished.append(chunk.round)
                if chunk.round == 2:
                    break
        assert finished == [0, 1, 2]
        stream.cancel()
    finally:
        client.close()
