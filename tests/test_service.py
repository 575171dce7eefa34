"""In-process gRPC integration: real servers on 127.0.0.1:0, real clients, real status codes."""
from __future__ import annotations

import threading
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import join_threads
from wanps.proto import wanps_pb2 as pb
from wanps.server import service as service_module
from wanps.worker import Observer, Optimizer
from wanps.worker.tasks import get_task

from wire import RawClient, models_by_version

pytestmark = pytest.mark.timeout(120)


def server_state(cluster):
    core = cluster.core
    return (
        core.model.clone(),
        core.version,
        {r: (sorted(o.updates), sorted(o.skips)) for r, o in core.open_rounds.items()},
        sorted(core.members),
    )


def assert_unchanged(before, after):
    model_before, *rest_before = before
    model_after, *rest_after = after
    assert torch.equal(model_before, model_after)
    assert rest_before == rest_after


@pytest.fixture
def two_workers(make_cluster):
    """A started 2-worker cluster on a 16-parameter model, driven by a raw client."""
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None)
    client = RawClient(cluster.server_address)
    first = client.join()
    second = client.join()
    assert first.must_seed and not second.must_seed
    client.seed(first.worker_id, torch.arange(16, dtype=torch.float32))
    yield cluster, client, first.worker_id, second.worker_id
    client.close()


def test_rounds_close_with_the_mean_of_pushes(two_workers):
    cluster, client, a, b = two_workers
    assert client.push(a, 0, [1, 3], [2.0, 4.0]).version == 0
    assert cluster.core.version == 0  # waits for b
    reply = client.push(b, 0, [3, 5], [2.0, 6.0])
    assert not reply.duplicate
    version, model = client.pull(a)
    assert version == 1
    expected = torch.arange(16, dtype=torch.float32)
    expected[1] -= 1.0  # (2 + 0) / 2
    expected[3] -= 3.0  # (4 + 2) / 2
    expected[5] -= 3.0  # (0 + 6) / 2
    assert torch.equal(model, expected)


@pytest.mark.parametrize(
    "mutate, code, words",
    [
        (lambda h, c: c.__setattr__("indices", np.asarray([1, 16], "<u4").tobytes()), "INVALID_ARGUMENT", "out of range"),
        (lambda h, c: c.__setattr__("indices", np.asarray([1, 2**31 + 5], "<u4").tobytes()), "INVALID_ARGUMENT",
         "out of range"),
        (lambda h, c: c.__setattr__("values", np.asarray([1.0], "<f4").tobytes()), "INVALID_ARGUMENT", "values"),
        (lambda h, c: c.__setattr__("values", np.asarray([1.0, np.nan], "<f4").tobytes()), "INVALID_ARGUMENT", "NaN"),
        (lambda h, c: c.__setattr__("values", np.asarray([np.inf, 1.0], "<f4").tobytes()), "INVALID_ARGUMENT", "NaN"),
        (lambda h, c: c.__setattr__("indices", np.asarray([4, 2], "<u4").tobytes()), "INVALID_ARGUMENT", "increasing"),
        (lambda h, c: c.__setattr__("indices", np.asarray([2, 2], "<u4").tobytes()), "INVALID_ARGUMENT", "increasing"),
        (lambda h, c: h.__setattr__("codec", 99), "INVALID_ARGUMENT", "codec"),
        (lambda h, c: h.__setattr__("value_dtype", 42), "INVALID_ARGUMENT", "value_dtype"),
        # A random block carries no indices; a 16-bit dtype needs 2 bytes per value, not 4.
        (lambda h, c: h.__setattr__("codec", pb.CODEC_RANDOM_BLOCK), "INVALID_ARGUMENT", "no indices"),
        (lambda h, c: h.__setattr__("value_dtype", pb.VALUE_DTYPE_FLOAT16), "INVALID_ARGUMENT", "values: expected"),
        (lambda h, c: h.__setattr__("block_start", 3), "INVALID_ARGUMENT", "block_start"),
        (lambda h, c: h.__setattr__("worker_id", 999), "NOT_FOUND", "not a member"),
        (lambda h, c: h.__setattr__("round", 3), "FAILED_PRECONDITION", "outside the open window"),
        (lambda h, c: h.__setattr__("computed_at_version", 5), "INVALID_ARGUMENT", "ahead"),
    ],
)
def test_bad_pushes_are_refused_and_change_nothing(two_workers, mutate, code, words):
    cluster, client, a, b = two_workers
    client.push(a, 0, [0], [1.0])  # something open, so "nothing changed" is a real check
    before = server_state(cluster)
    header = pb.PushHeader(worker_id=b, round=0, computed_at_version=0, codec=pb.CODEC_SPARSE,
                           value_dtype=pb.VALUE_DTYPE_FLOAT32, count=2, member_secret=client.secret(b))
    chunk = pb.SparseChunk(indices=np.asarray([1, 2], "<u4").tobytes(), values=np.asarray([1.0, 2.0], "<f4").tobytes())
    mutate(header, chunk)
    with pytest.raises(grpc.RpcError) as refused:
        client.push_raw(header, [chunk])
    assert refused.value.code().name == code
    assert words in refused.value.details()
    assert_unchanged(before, server_state(cluster))
    rejected = cluster.server_registry.get_sample_value("wanps_server_push_rejected_total", {"code": code})
    assert rejected == 1.0


def test_malformed_push_streams_are_refused(two_workers):
    cluster, client, a, _ = two_workers
    before = server_state(cluster)
    header = pb.PushHeader(worker_id=a, round=0, computed_at_version=0, skip=True, member_secret=client.secret(a))
    chunk = pb.SparseChunk(indices=b"", values=b"")
    with pytest.raises(grpc.RpcError) as skip_with_data:
        client.push_raw(header, [chunk])
    assert skip_with_data.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as headless:
        client.stub.Push(iter([pb.PushMessage(chunk=chunk)]), timeout=10)
    assert headless.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_unchanged(before, server_state(cluster))


def test_duplicate_push_is_acknowledged_and_changes_nothing(two_workers):
    cluster, client, a, b = two_workers
    client.push(a, 0, [1], [2.0])
    before = server_state(cluster)
    reply = client.push(a, 0, [1, 2], [100.0, 100.0])  # same (worker, round), other content
    assert reply.duplicate
    assert_unchanged(before, server_state(cluster))
    client.push(b, 0, [1], [2.0])  # closes round 0
    after_close = server_state(cluster)
    assert client.push(b, 0, [7], [9.0]).duplicate  # replay of an applied round
    assert_unchanged(after_close, server_state(cluster))
    assert cluster.server_registry.get_sample_value("wanps_server_pushes_total", {"kind": "duplicate"}) == 2.0


def test_skip_reuses_the_last_applied_update(two_workers):
    cluster, client, a, b = two_workers
    client.push(a, 0, [2], [4.0])
    client.push(b, 0, [3], [2.0])
    client.skip(a, 1)  # reuse a's [2] -> 4.0
    client.push(b, 1, [3], [6.0])
    version, model = client.pull(a)
    assert version == 2
    assert model[2].item() == pytest.approx(2.0 - 2.0 - 2.0)
    assert model[3].item() == pytest.approx(3.0 - 1.0 - 3.0)


def test_updates_stream_replays_and_follows(two_workers):
    cluster, client, a, b = two_workers
    client.push(a, 0, [1], [2.0])
    client.push(b, 0, [1], [2.0])
    stream = client.updates(a, 0)
    first = next(stream)
    assert (first.round, first.version, first.last) == (0, 1, True)
    assert first.has_model_checksum
    client.push(a, 1, [4], [2.0])
    client.push(b, 1, [5], [2.0])
    second = next(stream)
    assert (second.round, second.version) == (1, 2)
    assert np.frombuffer(second.indices, "<u4").tolist() == [4, 5]
    stream.cancel()
    with pytest.raises(grpc.RpcError) as ahead:
        next(iter(client.updates(a, 9)))
    assert ahead.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_each_round_is_encoded_once_for_all_its_followers(two_workers, monkeypatch):
    """Three followers (both workers and an observer) receive every round, whose chunks the
    server encoded once, when it closed, not once per follower."""
    cluster, client, a, b = two_workers
    encoded_rounds = []
    encode_round = service_module.encode_round

    def counting_encode_round(closed):
        encoded_rounds.append(closed.round)
        return encode_round(closed)

    monkeypatch.setattr(service_module, "encode_round", counting_encode_round)
    observer = client.join(observer=True).worker_id
    streams = [client.updates(w, from_version=0, timeout=30) for w in (a, b, observer)]
    for round_ in range(3):
        client.push(a, round_, [1, round_ + 2], [2.0, 1.0])
        client.push(b, round_, [1], [4.0])
    received = [[next(stream) for _ in range(3)] for stream in streams]
    for stream in streams:
        stream.cancel()
    assert encoded_rounds == [0, 1, 2]
    assert [chunk.round for chunk in received[0]] == [0, 1, 2]
    assert received[0] == received[1] == received[2]


def test_join_refuses_a_different_model(two_workers):
    _, client, _, _ = two_workers
    with pytest.raises(grpc.RpcError) as other_size:
        client.join(num_params=17)
    assert other_size.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as other_shape:
        client.join(fingerprint=b"something else")
    assert other_shape.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as empty:
        client.join(num_params=0)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_reflection_and_metrics_endpoint(make_cluster):
    cluster = make_cluster()
    with grpc.insecure_channel(cluster.server_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="wanps.v1.ParameterServer"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert "wanps.v1.ParameterServer" in names
    with grpc.insecure_channel(cluster.controller_address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="wanps.v1.Controller"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    port = cluster.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "wanps_server_rounds_closed_total" in text


def test_optimizers_keep_identical_replicas_and_conserve_the_model(make_cluster):
    """Two library workers (tau 1, delta 0.1) and an observer that records every delta."""
    cluster = make_cluster(min_workers=2, tau_max=3, policy="static", tau=1, delta=0.1)
    task = get_task("synthetic")
    observer_model = task.build_model(0)
    finals: dict[int, tuple[int, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def train(seed: int) -> None:
        try:
            model = task.build_model(seed)
            opt = Optimizer(model.parameters(), server=cluster.server_address,
                            controller=cluster.controller_address, lr=0.2)
            batches = task.batches(opt.rank, opt.world_size, 32, seed)
            for _ in range(60):
                x, y = next(batches)
                opt.zero_grad()
                task.loss(model, x, y).backward()
                opt.step()
                assert opt.last_decision.tau == 1 and opt.last_decision.delta == 0.1
            finals[opt.worker_id] = (opt.version, opt.replica.clone())
            opt.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    observer = Observer(observer_model, cluster.server_address, keep_deltas=True)
    join_threads(threads, 90, errors)
    assert not errors, errors
    final_version = cluster.core.version
    assert final_version == 60
    observer.wait_for_version(final_version, timeout_s=30)
    assert observer.version == final_version
    # Every worker's replica equals the observer's replica at the same version, replayed exactly.
    history = models_by_version(observer)
    replay = history[final_version]
    for version, values in finals.values():
        assert torch.equal(values, history[version])
    # Server model == observer replica == initial - sum of the applied means.
    assert torch.equal(cluster.core.model, observer.replica.values)
    assert torch.equal(cluster.core.model, replay)
    total = torch.zeros_like(replay, dtype=torch.float64)
    for item in observer.replica.applied:
        dense = torch.zeros_like(total)
        if item.delta.indices is None:
            dense += item.delta.values.double()
        else:
            dense[item.delta.indices.long()] = item.delta.values.double()
        total += dense
    assert torch.allclose(observer.initial_values.double() - total, cluster.core.model.double(), atol=1e-5)
    # The model learned something.
    assert task.accuracy(observer_model) > 0.8
    observer.close()
