"""Keepalive: a connection that dies silently (a WAN blackhole) ends the RPCs on it, and a
server accepts the pings our channels send (no GOAWAY "too_many_pings").

The real defaults ping after 30 s and wait 20 s; the same option set with sub-second times
keeps these tests short. The blackhole is a `wanps linkem` stall: it holds every byte.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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


# An HTTP/2 PING frame (or its ACK) is 9 bytes of header and 8 of payload.
PING_FRAME_BYTES = 17


@asynccontextmanager
async def watch_through_link() -> AsyncIterator[tuple[LinkEmulator, grpc.aio.UnaryStreamCall]]:
    """A health Watch stream through linkem, past its first message; closes everything."""
    options = grpc_channel_options(DEFAULT_MAX_MESSAGE_BYTES, FAST)
    server = grpc.aio.server(options=options)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(f"{LOCALHOST}:0")
    await server.start()
    emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, port, LinkTrace.fixed(1000, 1))
    await emulator.start()
    channel = grpc.aio.insecure_channel(f"{LOCALHOST}:{emulator.bound_port}", options=options)
    try:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        first = await stream.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        yield emulator, stream
    finally:
        await channel.close()
        await emulator.close()
        await server.stop(0)


async def how_the_stream_ends(stream: grpc.aio.UnaryStreamCall, within_s: float) -> str:
    try:
        message = await asyncio.wait_for(stream.read(), within_s)
        return f"message {message}"
    except asyncio.TimeoutError:
        return "open"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


def test_a_silently_dead_link_ends_the_stream_unavailable():
    async def scenario() -> str:
        async with watch_through_link() as (emulator, stream):
            # Longer than the test waits: only keepalive can end the stream (FAST: a ping after
            # 0.2 s idle, dropped 0.5 s later). The 20 s bound is a hang bound, not a speed.
            emulator.stall(600.0)
            return await how_the_stream_ends(stream, within_s=20.0)

    assert run(scenario(), timeout_s=40) == "UNAVAILABLE"


def test_the_server_accepts_our_pings_on_a_quiet_stream():
    # A stream that carries no data: a server that counted our pings as abuse would end it
    # with GOAWAY (UNAVAILABLE "too_many_pings") after its second strike. Counted, not timed:
    # wait until the link has carried a dozen of our pings, then the stream must still be open.
    pings = 12

    async def scenario() -> tuple[str, int]:
        async with watch_through_link() as (emulator, stream):
            quiet_from = emulator.bytes_client_to_target
            ended = asyncio.ensure_future(how_the_stream_ends(stream, within_s=60.0))
            # Polls the emulator's byte count; bounded by the scenario's timeout.
            while not ended.done() and emulator.bytes_client_to_target - quiet_from < pings * PING_FRAME_BYTES:
                await asyncio.sleep(0.05)
            carried = emulator.bytes_client_to_target - quiet_from
            outcome = ended.result() if ended.done() else "open"
            ended.cancel()
            await asyncio.gather(ended, return_exceptions=True)
            return outcome, carried

    outcome, carried = run(scenario(), timeout_s=40)
    assert outcome == "open", f"{outcome} after {carried} bytes of pings"
    assert carried >= pings * PING_FRAME_BYTES


def test_the_defaults_ping_within_a_minute_and_let_clients_ping():
    options = dict(grpc_channel_options(DEFAULT_MAX_MESSAGE_BYTES))
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 20_000
    # A server must accept at least the rate its clients ping at.
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= options["grpc.keepalive_time_ms"]
