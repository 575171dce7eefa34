"""The gRPC server metrics interceptor on real services: every RPC shape, codes, unknown methods."""
from __future__ import annotations

import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from wanps.rpc.metrics import split_method, status_name
from wanps.rpc.auth import ServerSecurity
from wanps.rpc.serving import ServeConfig, start_grpc_service
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc

from wire import RawClient

pytestmark = pytest.mark.timeout(60)

SERVER = "wanps.v1.ParameterServer"


def handled(registry, method: str, code: str, service: str = SERVER, expect: float | None = None) -> float:
    """The count; with `expect`, wait (bounded) for it first: abort() sends the status to the
    client before the handler, and so the interceptor around it, has returned."""
    labels = {"service": service, "method": method, "code": code}
    if expect is not None:
        eventually(lambda: (registry.get_sample_value("wanps_grpc_server_handled_total", labels) or 0.0) >= expect)
    return registry.get_sample_value("wanps_grpc_server_handled_total", labels) or 0.0


def eventually(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def started(registry, method: str, service: str = SERVER) -> float:
    return registry.get_sample_value("wanps_grpc_server_started_total", {"service": service, "method": method}) or 0.0


def timed(registry, method: str, service: str = SERVER) -> float:
    return registry.get_sample_value("wanps_grpc_server_handling_seconds_count",
                                     {"service": service, "method": method}) or 0.0


def test_every_rpc_shape_is_counted_with_its_status(make_cluster):
    cluster = make_cluster(min_workers=1, policy="static")
    registry = cluster.server_registry
    client = RawClient(cluster.server_address)
    try:
        # unary-unary, OK and refused (abort with RESOURCE_EXHAUSTED: padding over the limit)
        client.stub.Ping(pb.PingRequest(), timeout=5)  # an anonymous probe
        with pytest.raises(grpc.RpcError):
            client.stub.Ping(pb.PingRequest(padding=bytes(2 * 1024 * 1024)), timeout=5)
        assert handled(registry, "Ping", "OK", expect=1) == 1
        assert handled(registry, "Ping", "RESOURCE_EXHAUSTED", expect=1) == 1
        assert started(registry, "Ping") == 2 and timed(registry, "Ping") == 2
        assert registry.get_sample_value("wanps_grpc_server_handling_seconds_sum",
                                         {"service": SERVER, "method": "Ping"}) > 0

        # stream-unary (SeedModel, Push): OK, and an unknown worker's push is NOT_FOUND
        joined = client.join()
        client.seed(joined.worker_id, torch.zeros(16))
        client.push(joined.worker_id, 0, [1], [1.0])
        with pytest.raises(grpc.RpcError) as refused:
            client.push(worker_id=99, round_=1, indices=[1], values=[1.0])
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert handled(registry, "Push", "NOT_FOUND", expect=1) == 1
        assert handled(registry, "Push", "OK", expect=1) == 1
        assert handled(registry, "SeedModel", "OK", expect=1) == 1

        # unary-stream (PullModel), OK and NOT_FOUND before the first message
        version, _ = client.pull(joined.worker_id)
        assert version == 1
        with pytest.raises(grpc.RpcError):
            client.pull(12345)
        assert handled(registry, "PullModel", "OK", expect=1) == 1
        assert handled(registry, "PullModel", "NOT_FOUND", expect=1) == 1

        # a long-lived stream the client cancels is counted when it ends
        updates = client.updates(joined.worker_id, 0, timeout=None)
        assert next(updates).round == 0
        assert started(registry, "Updates") == 1
        updates.cancel()
        assert handled(registry, "Updates", "CANCELLED", expect=1) == 1

        # health (a reader/writer coroutine service) and reflection (stream-stream)
        health = health_pb2_grpc.HealthStub(client.channel)
        health.Check(health_pb2.HealthCheckRequest(service=SERVER), timeout=5)
        assert handled(registry, "Check", "OK", service="grpc.health.v1.Health", expect=1) == 1
        reflect = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        reflection_service = "grpc.reflection.v1alpha.ServerReflection"
        assert handled(registry, "ServerReflectionInfo", "OK", service=reflection_service, expect=1) == 1

        # an unknown method gets UNIMPLEMENTED from gRPC and no label from the client's string
        bogus = client.channel.unary_unary("/wanps.v1.ParameterServer/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as unknown:
            bogus(b"", timeout=5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert started(registry, "NoSuchMethod") == 0
    finally:
        client.close()


def test_the_controller_counts_its_calls_in_its_own_registry(make_cluster):
    cluster = make_cluster(policy="static")
    with grpc.insecure_channel(cluster.controller_address) as channel:
        pb_grpc.ControllerStub(channel).GetState(pb.GetStateRequest(), timeout=5)
    assert handled(cluster.controller_registry, "GetState", "OK", service="wanps.v1.Controller", expect=1) == 1
    assert handled(cluster.server_registry, "GetState", "OK", service="wanps.v1.Controller") == 0


def test_names_and_codes():
    assert split_method("/wanps.v1.ParameterServer/Push") == ("wanps.v1.ParameterServer", "Push")
    assert split_method("") == ("unknown", "unknown")
    assert status_name(None) == "OK"
    assert status_name(grpc.StatusCode.NOT_FOUND) == "NOT_FOUND"
    assert status_name(5) == "NOT_FOUND"
    assert status_name(999) == "UNKNOWN"


class _NoService:
    def begin_shutdown(self) -> None: ...

    def close(self) -> None: ...


def test_calls_refused_by_a_later_interceptor_are_counted(loop_thread):
    registry = CollectorRegistry()
    running = loop_thread.run(start_grpc_service(
        _NoService(), lambda service, server: None, "test.Nothing",
        # The token check refuses every call (health checks are not exempt here); start_grpc_service
        # puts the metrics interceptor before it.
        ServeConfig(max_message_bytes=1 << 20, security=ServerSecurity(token="cluster-token", auth_exempt=())),
        registry))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert handled(registry, "Check", "UNAUTHENTICATED", service="grpc.health.v1.Health", expect=1) == 1
    finally:
        loop_thread.run(running.stop(0.5))
