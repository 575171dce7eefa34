"""Resource limits on real services: each refusal is RESOURCE_EXHAUSTED with a clear message, nothing changed."""
from __future__ import annotations

import time

import grpc
import pytest
import torch

from wanps.rpc.auth import sync_channel
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.rpc.limits import Limits, ResourceExhausted, StreamLimiter, TokenBucket
from wanps.server.service import MAX_PING_PADDING

from wire import RawClient

pytestmark = pytest.mark.timeout(120)

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def started_cluster(make_cluster, num_params: int = 16, **options):
    cluster = make_cluster(policy=None, **options)
    client = RawClient(cluster.server_address)
    worker = client.join(num_params=num_params).worker_id
    client.seed(worker, torch.zeros(num_params))
    return cluster, client, worker


def test_server_refuses_messages_over_its_size_limit(make_cluster):
    cluster = make_cluster(policy=None, max_message_bytes=256 * 1024)
    # A client allowed to send more than the server takes: the server refuses on receipt.
    with sync_channel(cluster.server_address, max_message_bytes=4 * 2**20) as channel:
        error = refused(lambda: pb_grpc.ParameterServerStub(channel).Ping(pb.PingRequest(padding=bytes(300_000)),
                                                                          timeout=10))
    assert error.code() == EXHAUSTED and "larger than max" in error.details()


def test_clients_enforce_their_own_size_limits_too(make_cluster):
    """What a user sees when *their* limit is hit: RESOURCE_EXHAUSTED, sending or receiving."""
    cluster, client, worker = started_cluster(make_cluster, num_params=64 * 1024)  # 256 KiB model chunks
    with sync_channel(cluster.server_address, max_message_bytes=64 * 1024) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        sending = refused(lambda: stub.Ping(pb.PingRequest(padding=bytes(100_000)), timeout=10))
        assert sending.code() == EXHAUSTED and "Sent message larger than max" in sending.details()
        pull = pb.PullModelRequest(worker_id=worker, member_secret=client.secret(worker))
        receiving = refused(lambda: list(stub.PullModel(pull, timeout=10)))
        assert receiving.code() == EXHAUSTED and "Received message larger than max" in receiving.details()
    client.close()


def test_ping_padding_has_its_own_limit(make_cluster):
    cluster = make_cluster(policy=None, max_message_bytes=4 * 2**20)
    with sync_channel(cluster.server_address, max_message_bytes=4 * 2**20) as channel:
        error = refused(lambda: pb_grpc.ParameterServerStub(channel).Ping(
            pb.PingRequest(padding=bytes(MAX_PING_PADDING + 1)), timeout=10))
    assert error.code() == EXHAUSTED and "padding" in error.details()


def test_downlink_probes_are_bounded_and_counted(make_cluster):
    """A Ping's reply carries reply_bytes of padding (a downlink probe); above the limit it is
    INVALID_ARGUMENT and nothing is sent or counted. Both directions' probe bytes are counted."""
    cluster = make_cluster(policy=None, max_message_bytes=4 * 2**20)
    registry = cluster.server_registry
    probe = lambda direction: registry.get_sample_value("wanps_server_probe_bytes_total",  # noqa: E731
                                                        {"direction": direction}) or 0.0
    with sync_channel(cluster.server_address, max_message_bytes=4 * 2**20) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        reply = stub.Ping(pb.PingRequest(reply_bytes=50_000, padding=bytes(20_000)), timeout=10)
        assert len(reply.padding) == 50_000 and not any(reply.padding)
        assert (probe("up"), probe("down")) == (20_000, 50_000)
        sent = registry.get_sample_value("wanps_server_sent_bytes_total")
        error = refused(lambda: stub.Ping(pb.PingRequest(reply_bytes=MAX_PING_PADDING + 1), timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "reply_bytes" in error.details()
        assert probe("down") == 50_000 and registry.get_sample_value("wanps_server_sent_bytes_total") == sent
        assert len(stub.Ping(pb.PingRequest(reply_bytes=MAX_PING_PADDING), timeout=10).padding) == MAX_PING_PADDING


def test_models_and_pushes_over_the_element_limit_are_refused(make_cluster):
    cluster = make_cluster(policy=None, limits=Limits(max_payload_elements=1000))
    client = RawClient(cluster.server_address)
    error = refused(lambda: client.join(num_params=1001))
    assert error.code() == EXHAUSTED and "1001 elements exceeds the server's limit of 1000" in error.details()
    assert not cluster.core.members and cluster.core.num_params is None
    worker = client.join(num_params=1000).worker_id
    client.seed(worker, torch.zeros(1000))
    header = pb.PushHeader(worker_id=worker, round=0, computed_at_version=0, codec=pb.CODEC_SPARSE,
                           value_dtype=pb.VALUE_DTYPE_FLOAT32, count=1001, member_secret=client.secret(worker))
    error = refused(lambda: client.push_raw(header, []))
    assert error.code() == EXHAUSTED and "push: 1001 elements" in error.details()
    # A push streaming more bytes than any push of this model can need is cut off at that point.
    header.count = 1
    chunk = pb.SparseChunk(indices=bytes(4), values=bytes(4))
    error = refused(lambda: client.push_raw(header, [chunk] * 1001))
    assert error.code() == EXHAUSTED and "8 bytes per parameter" in error.details()
    assert cluster.core.version == 0 and not cluster.core.open_rounds
    client.close()


def test_open_streams_per_worker_are_limited(make_cluster):
    cluster, client, worker = started_cluster(make_cluster, limits=Limits(max_streams_per_worker=2))
    first = client.updates(worker, 0, timeout=30)
    second = client.updates(worker, 0, timeout=30)
    try:
        wait_for(lambda: cluster.server.service._streams.count(worker) == 2)
        error = refused(lambda: client.push(worker, 0, [1], [1.0]))
        assert error.code() == EXHAUSTED and f"worker {worker} already has 2 open streams (limit 2" in error.details()
        error = refused(lambda: client.pull(worker))
        assert error.code() == EXHAUSTED
        assert cluster.core.version == 0 and not cluster.core.open_rounds
        other = client.join().worker_id  # another worker's streams are its own
        client.ping(other)
        assert cluster.server.service._streams.count(other) == 0
    finally:
        first.cancel()
    wait_for(lambda: cluster.server.service._streams.count(worker) == 1)
    assert client.push(worker, 0, [1], [1.0]).version == 0  # a slot is free again
    second.cancel()
    wait_for(lambda: cluster.server.service._streams.count(worker) == 0)
    client.close()


def test_controller_limits_decision_streams_per_worker_and_samples_per_report(make_cluster):
    cluster = make_cluster(controller_streams=1)
    with sync_channel(cluster.controller_address) as channel:
        stub = pb_grpc.ControllerStub(channel)
        stub.Report(pb.ReportRequest(worker_id=9, round=0), timeout=10)  # no decision before a first report
        stream = stub.Decisions(pb.DecisionsRequest(worker_id=7), timeout=30)
        next(stream)  # the decision in force: the stream is open
        error = refused(lambda: next(stub.Decisions(pb.DecisionsRequest(worker_id=7), timeout=10)))
        assert error.code() == EXHAUSTED and "Decisions: worker 7 already has 1 open streams" in error.details()
        next(stub.Decisions(pb.DecisionsRequest(worker_id=8), timeout=10))
        stream.cancel()
        samples = [pb.LinkSample(kind=pb.LinkSample.KIND_PING, seconds=0.01)] * 513
        tracked = set(cluster.controller.service.core.estimators)
        error = refused(lambda: stub.Report(pb.ReportRequest(worker_id=7, samples=samples), timeout=10))
        assert error.code() == EXHAUSTED and "at most 512 samples" in error.details()
        assert set(cluster.controller.service.core.estimators) == tracked and 7 not in tracked


def test_joins_are_rate_limited(make_cluster):
    cluster = make_cluster(policy=None, limits=Limits(join_rate_per_s=0.01, join_burst=3))
    client = RawClient(cluster.server_address)
    for _ in range(3):
        client.join()
    error = refused(client.join)
    assert error.code() == EXHAUSTED and "join rate limit: at most 0.01/s (burst 3); retry in" in error.details()
    assert len(cluster.core.members) == 3
    client.close()


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        bucket.take("join")
    with pytest.raises(ResourceExhausted, match="retry in 0.50 s"):
        bucket.take("join")
    now[0] = 0.5
    bucket.take("join")
    now[0] = 100.0  # a long pause saves up only `burst`
    for _ in range(3):
        bucket.take("join")
    with pytest.raises(ResourceExhausted):
        bucket.take("join")


def test_stream_limiter_keeps_no_entry_for_closed_streams():
    limiter = StreamLimiter(1)
    with limiter.open(5, "Updates"):
        with pytest.raises(ResourceExhausted):
            limiter.acquire(5, "Updates")
    assert limiter.count(5) == 0 and not limiter._open


def test_limits_refuse_settings_that_cannot_work():
    for bad in (dict(max_payload_elements=0), dict(max_streams_per_worker=0), dict(join_rate_per_s=0),
                dict(join_burst=0)):
        with pytest.raises(ValueError):
            Limits(**bad)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)



def test_controller_tracks_a_bounded_number_of_workers(loop_thread):
    from prometheus_client import CollectorRegistry

    from wanps.controller.estimator import EstimatorConfig
    from wanps.controller.service import ControllerConfig, start_controller

    config = ControllerConfig(host="127.0.0.1", port=0, metrics_port=-1, max_workers=2,
                              estimator=EstimatorConfig(window_s=3600))
    running = loop_thread.run(start_controller(config, CollectorRegistry()))
    try:
        with sync_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.ControllerStub(channel)
            stub.Report(pb.ReportRequest(worker_id=1), timeout=10)
            stub.Report(pb.ReportRequest(worker_id=2), timeout=10)
            stub.Report(pb.ReportRequest(worker_id=1), timeout=10)  # known ids always report
            error = refused(lambda: stub.Report(pb.ReportRequest(worker_id=3), timeout=10))
            assert error.code() == EXHAUSTED and "at most 2 workers" in error.details()
            error = refused(lambda: stub.Report(pb.ReportRequest(worker_id=1, round=2**62 + 1), timeout=10))
            assert error.code() == grpc.StatusCode.OUT_OF_RANGE
        assert sorted(running.service.core.estimators) == [1, 2]
    finally:
        loop_thread.run(running.stop(0.5))
