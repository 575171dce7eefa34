"""Process edges shared by every wanps service: event loop, logging, typed config, gRPC extras.

Nothing here runs at import time. Each service's `main` builds its config object from
CLI flags (with environment-variable fallbacks) and hands a coroutine to `run_async`.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from wanps.deploy.grpc_metrics import GrpcServerMetrics
from wanps.deploy.guard import MalformedRequestGuard

T = TypeVar("T")


def event_loop_factory(use_uvloop: bool = True) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop factory for `asyncio.Runner`: uvloop when asked for and importable."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a hard dependency; keep a clear fallback
            logging.getLogger(__name__).warning("uvloop not importable; using the default asyncio loop")
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_async(main: Coroutine[Any, Any, T], use_uvloop: bool = True) -> T:
    with asyncio.Runner(loop_factory=event_loop_factory(use_uvloop)) as runner:
        return runner.run(main)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class EnvDefaultsParser(argparse.ArgumentParser):
    """argparse with an environment-variable fallback for every flag that names one.

    `parser.add_argument("--port", env="WANPS_PORT", type=int, default=0)`: the flag wins,
    then the variable, then the default. The variable is read when parsing, never at import.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._env_names: dict[str, str] = {}
        self._env_only: dict[str, str] = {}

    def add_env_setting(self, dest: str, env: str, help: str) -> None:
        """A setting read from the environment only, never a flag: for secrets, which a flag
        would show in `ps` and in shell history. Listed at the end of `--help`."""
        self._env_only[dest] = env
        line = f"{env}: {help}"
        self.epilog = f"{self.epilog}\n{line}" if self.epilog else f"environment-only settings:\n{line}"
        self.formatter_class = argparse.RawDescriptionHelpFormatter

    def add_argument(self, *args: Any, env: str | None = None, **kwargs: Any):  # type: ignore[override]
        if env is not None:
            kwargs["help"] = (kwargs.get("help") or "") + f" [env {env}]"
        action = super().add_argument(*args, **kwargs)
        if env is not None:
            self._env_names[action.dest] = env
        return action

    def parse_args(self, args: Any = None, namespace: Any = None):  # type: ignore[override]
        # Environment values go into the namespace (not the parser's defaults), so they are
        # checked like flags (type, choices), never stick to the parser, and flags still win:
        # argparse fills only the attributes a namespace lacks, then flags overwrite them.
        namespace = argparse.Namespace() if namespace is None else namespace
        for dest, env_name in self._env_names.items():
            raw = os.environ.get(env_name)
            if raw is None or hasattr(namespace, dest):
                continue
            action = next(a for a in self._actions if a.dest == dest)
            if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
                truthy = raw.strip().lower() in ("1", "true", "yes", "on")
                value: Any = action.const if truthy else action.default
            else:
                try:
                    value = self._get_value(action, raw)
                    self._check_value(action, value)
                except argparse.ArgumentError as exc:
                    self.error(f"environment variable {env_name}: {exc}")
            setattr(namespace, dest, value)
        for dest, env_name in self._env_only.items():
            if not hasattr(namespace, dest):
                setattr(namespace, dest, os.environ.get(env_name) or None)
        return super().parse_args(args, namespace)


def split_host_port(address: str) -> tuple[str, int]:
    """'127.0.0.1:50051' or '[::1]:50051' -> (host, port). An IPv6 host needs its brackets."""
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not host or not port.isdigit() or int(port) > 65535 or (":" in host and not bracketed):
        raise ValueError(f"expected HOST:PORT (IPv6 as [HOST]:PORT, port 0-65535), got {address!r}")
    return (host[1:-1] if bracketed else host), int(port)


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


DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive pings, on every channel and server.

    Over a WAN, a connection can die without a FIN or RST: a NAT or firewall forgets an
    idle flow, a route goes away. Without pings a worker's decision and update streams
    would then wait forever. With them, a peer that does not answer a ping within
    `timeout_s` is dropped and the RPCs fail UNAVAILABLE, which the worker's recovery
    handles. Each side pings after `time_s` without traffic; a server accepts pings as
    often as every `min_recv_interval_s` (gRPC's default, 5 minutes, would answer a client
    pinging every 30 s with GOAWAY "too_many_pings").
    """

    time_s: float = 30.0
    timeout_s: float = 20.0
    min_recv_interval_s: float = 10.0

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_time_ms", int(self.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_s * 1000)),
            # This gRPC times an unanswered ping by this one (default 60 s), not by the above.
            ("grpc.http2.ping_timeout_ms", int(self.timeout_s * 1000)),
            # Keep pinging on a long stream that carries no data for minutes (a decision stream).
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_recv_interval_s * 1000)),
        ]


def grpc_channel_options(max_message_bytes: int, keepalive: Keepalive = Keepalive()) -> list[tuple[str, int]]:
    """Limits set on purpose (tensors are streamed in ~1 MiB chunks well below them), and keepalive."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *keepalive.options(),
    ]


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
    the malformed-message guard. `credentials`: serve TLS (deploy/auth.py).
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
