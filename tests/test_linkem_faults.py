"""`wanps linkem` faults: connection resets, stalls, the fault schedule and its parser.

Times are checked as lower bounds only (a stall holds bytes at least as long as it lasts, a
scheduled fault runs no earlier than its time): load can delay an event, never advance it.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from wanps.linkem.faults import Fault, parse_faults
from wanps.linkem.proxy import TIMER_SLACK_S
from wanps.linkem.trace import LinkTrace

from test_linkem import LOCALHOST, echo_through_link, run


async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes) -> float:
    started = time.monotonic()
    writer.write(message)
    await writer.drain()
    assert await reader.readexactly(len(message)) == message
    return time.monotonic() - started


def test_reset_aborts_every_connection_and_new_ones_work() -> None:
    async def scenario() -> None:
        async with echo_through_link(LinkTrace.fixed(1000, 1)) as (emulator, port):
            connections = [await asyncio.open_connection(LOCALHOST, port) for _ in range(2)]
            for reader, writer in connections:
                await echo_once(reader, writer, b"hello")
            assert emulator.reset_connections() == 2
            for reader, writer in connections:
                try:  # the client sees the connection end: a reset, or EOF if it raced the RST
                    assert await reader.read(100) == b""
                except ConnectionError:
                    pass
                writer.close()
            reader, writer = await asyncio.open_connection(LOCALHOST, port)
            await echo_once(reader, writer, b"after the reset")
            writer.close()

    run(scenario(), timeout_s=30)


def test_stall_holds_every_byte_for_its_duration() -> None:
    stall_s = 0.5

    async def scenario() -> tuple[float, int]:
        async with echo_through_link(LinkTrace.fixed(1000, 1)) as (emulator, port):
            reader, writer = await asyncio.open_connection(LOCALHOST, port)
            await echo_once(reader, writer, b"x" * 100)
            stalled_at = time.monotonic()
            emulator.stall(stall_s)
            await echo_once(reader, writer, b"y" * 100)
            held_s = time.monotonic() - stalled_at
            writer.close()
            return held_s, emulator.stalls

    held_s, stalls = run(scenario(), timeout_s=30)
    assert stalls == 1
    # No byte is admitted before the stall ends; then each way takes its 1 ms delay (a timer
    # may fire TIMER_SLACK_S early). Load can only make it longer.
    assert held_s >= stall_s + 2 * (0.001 - TIMER_SLACK_S), held_s


def test_scheduled_faults_run_at_their_times() -> None:
    reset_at, stall_at, stall_s = 0.05, 0.1, 0.2

    async def scenario() -> tuple[int, int, float, float]:
        async with echo_through_link(LinkTrace.fixed(1000, 1)) as (emulator, port):
            reader, writer = await asyncio.open_connection(LOCALHOST, port)
            await echo_once(reader, writer, b"connected")
            emulator.schedule_faults(parse_faults(f"reset@{reset_at},stall@{stall_at}:{stall_s}"))
            try:  # the reset ends this connection: a reset, or EOF if it raced the RST
                assert await reader.read(100) == b""
            except ConnectionError:
                pass
            reset_seen_at = emulator.trace_time()
            writer.close()
            # Wait for the schedule's own counters (bounded by the scenario's timeout).
            while emulator.stalls < 1:
                await asyncio.sleep(0.01)
            stalled_until = emulator._uplink.stalled_until - emulator.epoch
            return emulator.resets, emulator.stalls, reset_seen_at, stalled_until

    resets, stalls, reset_seen_at, stalled_until = run(scenario(), timeout_s=30)
    assert (resets, stalls) == (1, 1)
    # Seen after it ran, and it ran no earlier than due (uvloop's timers may fire up to
    # TIMER_SLACK_S early).
    assert reset_seen_at >= reset_at - TIMER_SLACK_S
    # A stall that ran at trace time T holds until T + its duration: it ran no earlier than due.
    assert stalled_until >= stall_at + stall_s - TIMER_SLACK_S


def test_fault_schedule_parsing() -> None:
    assert parse_faults("stall@8:3, reset@5") == (Fault("reset", 5.0), Fault("stall", 8.0, 3.0))
    assert parse_faults("") == ()
    for bad in ("explode@1", "reset", "stall@2", "reset@-1", "stall@1:x", "reset@nan"):
        with pytest.raises(ValueError):
            parse_faults(bad)
