"""How a service holds its port and lets go of it (issue 13): a second server or controller on
a busy port fails to start with one line, and a drain says NOT_SERVING before it begins."""
from __future__ import annotations

import asyncio
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wanps.controller.service import ControllerConfig, start_controller
from wanps.deploy.processes import start_process, wanps_command
from wanps.rpc.serving import ServiceStartError
from wanps.server.checkpoint import checkpoint_path
from wanps.server.service import ServerConfig, start_server

pytestmark = pytest.mark.timeout(120)

SERVICES = {
    "server": (start_server, ServerConfig, "wanps.v1.ParameterServer"),
    "controller": (start_controller, ControllerConfig, "wanps.v1.Controller"),
}


@pytest.mark.parametrize("first, second", [("server", "server"), ("controller", "controller"),
                                           ("server", "controller")])
def test_a_second_service_on_a_busy_port_fails_with_one_line(tmp_path, first, second):
    """Observed before: both printed LISTENING on the same port (gRPC's SO_REUSEPORT) and
    shared its connections."""
    running = start_process(first, wanps_command(first, "--listen", "127.0.0.1:0", "--metrics-listen", "off"),
                            tmp_path)
    try:
        address = running.wait_ready(60).split()[1]
        try:
            late = subprocess.run(wanps_command(second, "--listen", address, "--metrics-listen", "off"),
                                  capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:  # it started and served (subprocess.run killed it)
            pytest.fail(f"the second {second} on {address} started: {exc.stdout!r}")
        assert late.returncode == 1 and "LISTENING" not in late.stdout
        lines = [line for line in late.stderr.splitlines() if line.strip()]
        assert lines == [f"wanps: cannot listen on {address}: the port is already in use "
                         f"(another wanps server or controller?)"]
        assert running.running()
    finally:
        assert running.stop() == 0


def test_a_server_that_cannot_bind_writes_no_checkpoint(loop_thread, tmp_path):
    """A second server sharing the first one's checkpoint directory must not write into it
    when it fails to start (a final checkpoint of its state would replace the first's)."""
    config = dict(host="127.0.0.1", metrics_port=-1, checkpoint_dir=str(tmp_path), check_core_thread=True)
    first = loop_thread.run(start_server(ServerConfig(port=0, **config)))
    try:
        with pytest.raises(ServiceStartError, match=f"cannot listen on 127.0.0.1:{first.port}: the port is already"):
            loop_thread.run(start_server(ServerConfig(port=first.port, **config)))
        assert not checkpoint_path(tmp_path).exists()
    finally:
        loop_thread.run(first.stop(0.5))


@pytest.mark.parametrize("kind", SERVICES)
def test_health_says_not_serving_as_soon_as_a_drain_starts(loop_thread, kind):
    start, config_type, service_name = SERVICES[kind]
    running = loop_thread.run(start(config_type(host="127.0.0.1", port=0, metrics_port=-1)))
    stopping = None
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel)
            for name in (service_name, ""):  # the service and the server as a whole
                assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(service=service_name), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.run_coroutine_threadsafe(running.stop(grace=2.0), loop_thread.loop)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            if stopping is None:
                loop_thread.run(running.stop(0.5))
            else:
                stopping.result(30)
