"""Serving a wanps gRPC service: bind, interceptors, health and reflection, metrics endpoint,
readiness line, graceful stop on SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from wanps.rpc.config import run_async
from wanps.rpc.guard import MalformedRequestGuard
from wanps.rpc.metrics import GrpcServerMetrics
from wanps.rpc.options import grpc_channel_options


async def serve_until_signalled(start: Callable[[], Any], ready_line: Callable[[Any], str]) -> None:
    """Start a service, print its readiness line, stop gracefully on SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a supervisor may send SIGTERM as soon as it reads the readiness line.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = await start()
    print(ready_line(running), flush=True)
    await stop.wait()
    await running.stop()



def start_metrics_endpoint(host: str, port: int, registry: CollectorRegistry) -> tuple[Any, int | None]:
    if port < 0:
        return None, None
    httpd, _thread = start_http_server(port, addr=host, registry=registry)
    return httpd, httpd.server_address[1]


async def add_health_and_reflection(server: grpc.aio.Server, service_full_name: str) -> health_aio.HealthServicer:
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set(service_full_name, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (service_full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return health


class Service(Protocol):
    def begin_shutdown(self) -> None: ...  # end long-lived streams, so stop() need not wait out the grace

    def close(self) -> None: ...  # release what the service holds (threads), after the server stopped


S = TypeVar("S", bound=Service)


@dataclass
class RunningService(Generic[S]):
    server: grpc.aio.Server
    service: S
    port: int
    metrics_port: int | None
    metrics_httpd: Any = None

    async def stop(self, grace: float = 2.0) -> None:
        self.service.begin_shutdown()
        await self.server.stop(grace)
        self.service.close()
        if self.metrics_httpd is not None:
            self.metrics_httpd.shutdown()
            self.metrics_httpd.server_close()


async def start_grpc_service(
    service: S,
    add_to_server: Callable[[S, grpc.aio.Server], None],
    service_full_name: str,
    *,
    host: str,
    port: int,
    max_message_bytes: int,
    metrics_host: str,
    metrics_port: int,
    registry: CollectorRegistry,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> RunningService[S]:
    """Bind, add health and reflection, start, and serve metrics: the common start of every service.

    Every RPC first meets the gRPC metrics interceptor (on `registry`, so calls a later
    interceptor refuses are counted), then `interceptors` in order (authentication), then
    the malformed-message guard. `credentials`: serve TLS (wanps.rpc.auth).
    """
    server = grpc.aio.server(options=grpc_channel_options(max_message_bytes),
                             interceptors=[GrpcServerMetrics(registry), *interceptors, MalformedRequestGuard()])
    add_to_server(service, server)
    await add_health_and_reflection(server, service_full_name)
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    await server.start()
    httpd, bound_metrics = start_metrics_endpoint(metrics_host, metrics_port, registry)
    return RunningService(server=server, service=service, port=bound, metrics_port=bound_metrics, metrics_httpd=httpd)


def serve_main(start: Callable[[], Any], host: str, use_uvloop: bool) -> int:
    """Run a service until SIGINT/SIGTERM, announcing `LISTENING host:port METRICS port`."""
    run_async(
        serve_until_signalled(start, lambda running: f"LISTENING {host}:{running.port} METRICS {running.metrics_port}"),
        use_uvloop=use_uvloop,
    )
    return 0
