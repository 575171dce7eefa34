"""`wanps linkem` faults: connection resets, stalls, the fault schedule and its parser."""
from __future__ import annotations

import asyncio
import time

import pytest

from wanps.linkem.faults import Fault, parse_faults
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

    run(scenario(), timeout_s=10)


def test_stall_holds_every_byte_for_its_duration() -> None:
    async def scenario() -> tuple[float, float]:
        async with echo_through_link(LinkTrace.fixed(1000, 1)) as (emulator, port):
            reader, writer = await asyncio.open_connection(LOCALHOST, port)
            before = await echo_once(reader, writer, b"x" * 100)
            emulator.stall(0.5)
            during = await echo_once(reader, writer, b"y" * 100)
            writer.close()
            return before, during

    before, during = run(scenario(), timeout_s=10)
    assert before < 0.1
    assert 0.45 <= during < 1.5


def test_scheduled_faults_run_at_their_times() -> None:
    async def scenario() -> tuple[int, int]:
        async with echo_through_link(LinkTrace.fixed(1000, 1)) as (emulator, _):
            emulator.schedule_faults(parse_faults("reset@0.05,stall@0.1:0.2"))
            await asyncio.sleep(0.5)  # the schedule's own clock: the faults are due by then
            return emulator.resets, emulator.stalls

    assert run(scenario(), timeout_s=10) == (1, 1)


def test_fault_schedule_parsing() -> None:
    assert parse_faults("stall@8:3, reset@5") == (Fault("reset", 5.0), Fault("stall", 8.0, 3.0))
    assert parse_faults("") == ()
    for bad in ("explode@1", "reset", "stall@2", "reset@-1", "stall@1:x", "reset@nan"):
        with pytest.raises(ValueError):
            parse_faults(bad)
