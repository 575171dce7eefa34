"""gRPC channel and server options every wanps process sets: message limits and keepalive."""
from __future__ import annotations

from dataclasses import dataclass

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


