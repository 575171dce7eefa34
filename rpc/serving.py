"""Serving a wanps gRPC service: its typed config (`ServeConfig`, shared by the server and the
controller) and the flags that fill it; bind, interceptors, health and reflection, metrics
endpoint, readiness line, graceful stop on SIGINT/SIGTERM.

A port is a service's own: gRPC's SO_REUSEPORT is off, so a second server or controller on a
busy port fails to start (`ServiceStartError`, one line from `serve_main`) instead of sharing
it. A stop drains: health says NOT_SERVING first, then long-lived streams end, then the
server stops within its grace.
"""
from __future__ import annotations

import asyncio
import errno
import socket
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from wanps.rpc.auth import ServerSecurity, add_server_security_flags, server_security_from_args
from wanps.rpc.config import (EnvDefaultsParser, event_loop_factory, host_port, int_at_least, run_async, setup_logging,
                              split_host_port)
from wanps.rpc.guard import MalformedRequestGuard
from wanps.rpc.metrics import GrpcServerMetrics
from wanps.rpc.options import DEFAULT_MAX_MESSAGE_BYTES, grpc_channel_options

# --metrics-listen's value that serves no metrics endpoint (metrics_port -1).
METRICS_OFF = "off"


class ServiceStartError(RuntimeError):
    """A service could not start (its port is taken, its address does not bind). The message
    is one line that names the address."""


@dataclass(frozen=True)
class ServeConfig:
    """How a wanps service serves, as one typed object (uvicorn's `Config` is the model).

    `ServerConfig` and `ControllerConfig` extend it with their own settings; the flags that
    fill it (`add_serve_flags`) read environment-variable fallbacks when parsing, never at
    import. Ports: 0 = any free port; metrics_port -1 = no metrics endpoint.
    """

    host: str = "127.0.0.1"
    port: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = -1
    # Limits set on purpose, on the server and on every channel: tensors travel in chunks well below them.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    use_uvloop: bool = True
    log_level: str = "INFO"
    security: ServerSecurity = field(default_factory=ServerSecurity)  # token and TLS; default: neither

    def loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop]:
        return event_loop_factory(self.use_uvloop)


def add_serve_flags(parser: EnvDefaultsParser, defaults: ServeConfig, *, env_prefix: str,
                    max_message_env: str) -> None:
    """The flags every service takes: --listen, --metrics-listen, --max-message-mb, token and
    TLS, --no-uvloop, --log-level. `env_prefix` names the address variables
    (WANPS_SERVER -> WANPS_SERVER_LISTEN, WANPS_SERVER_METRICS_LISTEN)."""
    parser.add_argument("--listen", env=f"{env_prefix}_LISTEN", type=host_port, default=f"{defaults.host}:{defaults.port}",
                        help="HOST:PORT for gRPC (port 0 = any free port).")
    metrics_default = (METRICS_OFF if defaults.metrics_port < 0
                       else f"{defaults.metrics_host}:{defaults.metrics_port}")
    parser.add_argument("--metrics-listen", env=f"{env_prefix}_METRICS_LISTEN", default=metrics_default,
                        help=f"HOST:PORT for Prometheus metrics (port 0 = any free port, '{METRICS_OFF}' = none).")
    parser.add_argument("--max-message-mb", env=max_message_env, type=int_at_least(1),
                        default=defaults.max_message_bytes // 2**20, help="gRPC message size limit (MiB).")
    add_server_security_flags(parser)
    parser.add_argument("--no-uvloop", action="store_true", env="WANPS_NO_UVLOOP",
                        help="Use the default asyncio loop.")
    parser.add_argument("--log-level", env="WANPS_LOG_LEVEL", default=defaults.log_level,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), type=str.upper)


def serve_settings_from_args(parser: EnvDefaultsParser, args: Any) -> dict[str, Any]:
    """`ServeConfig`'s fields from parsed `add_serve_flags` flags; a bad value is a one-line
    usage error (parser.error), never a traceback."""
    try:
        host, port = split_host_port(args.listen)
        if args.metrics_listen == METRICS_OFF:
            metrics_host, metrics_port = "127.0.0.1", -1
        else:
            metrics_host, metrics_port = split_host_port(args.metrics_listen)
        security = server_security_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_message_mb < 1:
        parser.error(f"--max-message-mb must be >= 1, got {args.max_message_mb}")
    return dict(host=host, port=port, metrics_host=metrics_host, metrics_port=metrics_port,
                max_message_bytes=args.max_message_mb * 2**20, use_uvloop=not args.no_uvloop,
                log_level=args.log_level, security=security)


async def serve_until_signalled(start: Callable[[], Any], ready_line: Callable[[Any], str]) -> None:
    """Start a service, print its readiness line, stop gracefully on SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a supervisor may send SIGTERM as soon as it reads the readiness line.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = await start()  # ServiceStartError: serve_main says it in one line
    print(ready_line(running), flush=True)
    await stop.wait()
    await running.stop()



def start_metrics_endpoint(host: str, port: int, registry: CollectorRegistry) -> tuple[Any, int | None]:
    if port < 0:
        return None, None
    try:
        httpd, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ServiceStartError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return httpd, httpd.server_address[1]


def check_port_free(host: str, port: int) -> None:
    """Raise ServiceStartError when something already listens on host:port.

    gRPC would say so too (with SO_REUSEPORT off), but only as a generic RuntimeError after
    its own log line; this probe binds the same addresses first (with SO_REUSEADDR, as gRPC
    does, so a port left in TIME_WAIT by a stopped server counts as free)."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # gRPC reports an address it cannot resolve
    for family, kind, proto, _name, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ServiceStartError(f"cannot listen on {host}:{port}: the port is already in use "
                                            f"(another wanps server or controller?)") from None


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
    health: health_aio.HealthServicer | None = None

    async def stop(self, grace: float = 2.0) -> None:
        # NOT_SERVING first (health watchers and probes hear it before anything drains), then
        # long-lived streams end, then gRPC stops taking calls and waits out the grace.
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
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
    config: ServeConfig,
    registry: CollectorRegistry,
) -> RunningService[S]:
    """Bind, add health and reflection, start, and serve metrics: the common start of every service.

    Every RPC first meets the gRPC metrics interceptor (on `registry`, so calls a later
    interceptor refuses are counted), then the token check of `config.security`, then the
    malformed-message guard. TLS when `config.security` has a certificate (wanps.rpc.auth).

    If the service cannot start (ServiceStartError: a port in use, an address that does not
    bind), `service.close()` releases what it holds before the error propagates.
    """
    try:
        return await _start_grpc_service(service, add_to_server, service_full_name, config, registry)
    except BaseException:
        service.close()
        raise


async def _start_grpc_service(service: S, add_to_server: Callable[[S, grpc.aio.Server], None],
                              service_full_name: str, config: ServeConfig,
                              registry: CollectorRegistry) -> RunningService[S]:
    credentials = config.security.credentials()
    address = f"{config.host}:{config.port}"
    check_port_free(config.host, config.port)
    # SO_REUSEPORT off: a second server on this port must fail, not share its connections.
    server = grpc.aio.server(options=[*grpc_channel_options(config.max_message_bytes), ("grpc.so_reuseport", 0)],
                             interceptors=[GrpcServerMetrics(registry), *config.security.interceptors(),
                                           MalformedRequestGuard()])
    add_to_server(service, server)
    health = await add_health_and_reflection(server, service_full_name)
    try:
        bound = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
    except RuntimeError:  # gRPC's "Failed to bind to address ..." (a race past check_port_free, a bad host)
        bound = 0
    if bound == 0 or (config.port != 0 and bound != config.port):
        raise ServiceStartError(f"cannot listen on {address}: gRPC could not bind it")
    await server.start()
    try:
        httpd, bound_metrics = start_metrics_endpoint(config.metrics_host, config.metrics_port, registry)
    except ServiceStartError:
        await server.stop(0)
        raise
    return RunningService(server=server, service=service, port=bound, metrics_port=bound_metrics,
                          metrics_httpd=httpd, health=health)


def serve_main(start: Callable[[], Any], config: ServeConfig) -> int:
    """Run a service until SIGINT/SIGTERM, announcing `LISTENING host:port METRICS port`.
    A service that cannot start says why in one line on stderr and returns 1."""
    setup_logging(config.log_level)
    try:
        run_async(
            serve_until_signalled(start, lambda running: f"LISTENING {config.host}:{running.port} "
                                                         f"METRICS {running.metrics_port}"),
            use_uvloop=config.use_uvloop,
        )
    except ServiceStartError as exc:
        print(f"wanps: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
