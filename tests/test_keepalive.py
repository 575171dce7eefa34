"""Keepalive: a connection that dies silently (a WAN blackhole) ends the RPCs on it, and a
server accepts the pings our channels send (no GOAWAY "too_many_pings").

The real defaults ping after 30 s and wait 20 s; the same option set with sub-second times
keeps these tests short. The blackhole is a `wanps linkem` stall: it holds every byte.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from wanps.linkem.proxy import LinkEmulator
from wanps.linkem.trace import LinkTrace
from wanps.rpc.options import DEFAULT_MAX_MESSAGE_BYTES, Keepalive, grpc_channel_options

from test_linkem import LOCALHOST, run

pytestmark = pytest.mark.timeout(60)

FAST = Keepalive(time_s=0.2, timeout_s=0.5, min_recv_interval_s=0.1)


async def watch_through_link(stall_s: float, watch_s: float) -> tuple[str, float]:
    """A health Watch stream through linkem; stall the link; how and when the stream ends."""
    options = grpc_channel_options(DEFAULT_MAX_MESSAGE_BYTES, FAST)
    server = grpc.aio.server(options=options)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(f"{LOCALHOST}:0")
    await server.start()
    emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, port, LinkTrace.fixed(1000, 1))
    link_port = await emulator.start()
    channel = grpc.aio.insecure_channel(f"{LOCALHOST}:{link_port}", options=options)
    try:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await stream.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        if stall_s > 0:
            emulator.stall(stall_s)
        started = time.monotonic()
        try:
            message = await asyncio.wait_for(stream.read(), watch_s)
            return f"message {message}", time.monotonic() - started
        except asyncio.TimeoutError:
            return "open", time.monotonic() - started
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, time.monotonic() - started
    finally:
        await channel.close()
        await emulator.close()
        await server.stop(0)


def test_a_silently_dead_link_ends_the_stream_unavailable():
    outcome, seconds = run(watch_through_link(stall_s=30.0, watch_s=15.0), timeout_s=40)
    assert outcome == "UNAVAILABLE", outcome
    assert seconds < 5.0  # FAST: ping after 0.2 s idle, dropped 0.5 s later; not the 15 s the test waits


def test_the_server_accepts_our_pings_on_a_quiet_stream():
    # Pings every 0.2 s for 3 s on a stream that carries no data: a server that counted them
    # as abuse would end it with GOAWAY (UNAVAILABLE "too_many_pings") well within that.
    outcome, seconds = run(watch_through_link(stall_s=0.0, watch_s=3.0), timeout_s=20)
    assert outcome == "open", outcome


def test_the_defaults_ping_within_a_minute_and_let_clients_ping():
    options = dict(grpc_channel_options(DEFAULT_MAX_MESSAGE_BYTES))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 20_000
    # A server must accept at least the rate its clients ping at.
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= options["grpc.keepalive_time_ms"]
