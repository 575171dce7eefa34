"""Tests of `wanps linkem`, the user-space WAN link emulator.

All traffic stays on 127.0.0.1 with ports picked by the kernel (port 0). Coroutines run on
the production event loop (uvloop, via `wanps.rpc.config.run_async`), each under a time bound.

Timing assertions here are lower bounds only (a byte cannot arrive before the link lets it),
which a loaded machine cannot break; what the link does per second of wall clock is counted
by the emulator itself (bytes forwarded and queued, transmission time reserved). How close
goodput and RTT come to the set values is a figure of `wanps bench linkem`
(docs/benchmarks.md), not an assertion.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import TypeVar

import pytest

from wanps.bench.linkem import Sink, push_bytes
from wanps.linkem.cli import main
from wanps.linkem.proxy import TIMER_SLACK_S, LinkEmulator
from wanps.linkem.shaper import DEFAULT_QUEUE_MS, SEGMENT_BYTES
from wanps.linkem.trace import LinkTrace, TracePoint
from wanps.rpc.config import run_async

T = TypeVar("T")
LOCALHOST = "127.0.0.1"
CHUNK = 64 * 1024


def run(coro: Awaitable[T], timeout_s: float) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return run_async(bounded())


# --------------------------------------------------------------------------- LinkTrace

TRACE_TEXT = """
# a comment line
time_s,bandwidth_mbit,delay_ms

0,10,50     # trailing comment
5,20,40
7.5,5,0
"""


def test_trace_parse_and_lookup() -> None:
    trace = LinkTrace.parse(TRACE_TEXT, loop=False)
    assert trace.points == (TracePoint(0, 10, 50), TracePoint(5, 20, 40), TracePoint(7.5, 5, 0))
    assert trace.at(0) == TracePoint(0, 10, 50)
    assert trace.at(4.999) == TracePoint(0, 10, 50)
    assert trace.at(5.0) == TracePoint(5, 20, 40)
    assert trace.at(7.49) == TracePoint(5, 20, 40)
    assert trace.at(-1) == TracePoint(0, 10, 50)
    assert trace.bandwidth_bps(6) == pytest.approx(20e6)
    assert trace.delay_s(6) == pytest.approx(0.040)
    # Not looping: the last row holds forever.
    assert trace.at(1000) == TracePoint(7.5, 5, 0)


def test_trace_loops_with_last_gap_as_hold() -> None:
    trace = LinkTrace.parse(TRACE_TEXT)  # loop=True is the default
    # Period = last time 7.5 + the gap before it (2.5) = 10 s.
    assert trace.period_s == pytest.approx(10.0)
    assert trace.at(9.99) == TracePoint(7.5, 5, 0)
    assert trace.at(10.0) == TracePoint(0, 10, 50)
    assert trace.at(15.0) == TracePoint(5, 20, 40)
    assert trace.at(10 * 7 + 8) == TracePoint(7.5, 5, 0)


def test_trace_fixed_and_from_csv(tmp_path) -> None:
    fixed = LinkTrace.fixed(40, 80)
    for t in (0, 1.5, 1e6):
        assert fixed.bandwidth_bps(t) == pytest.approx(40e6)
        assert fixed.delay_s(t) == pytest.approx(0.080)
    path = tmp_path / "t.csv"
    path.write_text(TRACE_TEXT)
    assert LinkTrace.from_csv(path).points == LinkTrace.parse(TRACE_TEXT).points


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty trace"),
        ("# only a comment\n", "empty trace"),
        ("time_s,bandwidth_mbit,delay_ms\n", "no rows"),
        ("time,bw,delay\n0,1,1\n", "expected header"),
        ("0,10,50\n", "expected header"),
        ("time_s,bandwidth_mbit,delay_ms\n1,10,50\n", "first row must have time_s 0"),
        ("time_s,bandwidth_mbit,delay_ms\n0,10,50\n5,10,50\n5,10,50\n", "increase strictly"),
        ("time_s,bandwidth_mbit,delay_ms\n0,10,50\n5,10,50\n3,10,50\n", "increase strictly"),
        ("time_s,bandwidth_mbit,delay_ms\n0,0,50\n", "bandwidth_mbit must be > 0"),
        ("time_s,bandwidth_mbit,delay_ms\n0,-3,50\n", "bandwidth_mbit must be > 0"),
        ("time_s,bandwidth_mbit,delay_ms\n0,10,-1\n", "delay_ms must be >= 0"),
        ("time_s,bandwidth_mbit,delay_ms\n0,ten,50\n", "must be numbers"),
        ("time_s,bandwidth_mbit,delay_ms\n0,10\n", "expected 3 fields"),
        ("time_s,bandwidth_mbit,delay_ms\n0,nan,50\n", "finite"),
    ],
)
def test_trace_validation_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LinkTrace.parse(text, source="bad.csv")


def test_trace_validation_names_the_line() -> None:
    with pytest.raises(ValueError, match=r"bad\.csv:4: .*bandwidth_mbit must be > 0"):
        LinkTrace.parse("time_s,bandwidth_mbit,delay_ms\n0,1,1\n# gap\n2,0,1\n", source="bad.csv")


def test_trace_fixed_validates() -> None:
    with pytest.raises(ValueError, match="bandwidth_mbit must be > 0"):
        LinkTrace.fixed(0, 10)
    with pytest.raises(ValueError, match="delay_ms must be >= 0"):
        LinkTrace.fixed(10, -5)


def test_shipped_wan_varying_trace() -> None:
    text = resources.files("wanps.linkem").joinpath("traces/wan-varying.csv").read_text()
    trace = LinkTrace.parse(text, source="wan-varying.csv")
    assert trace.period_s is not None and 60 <= trace.period_s <= 120
    bandwidths = [p.bandwidth_mbit for p in trace.points]
    assert min(bandwidths) >= 8 and max(bandwidths) <= 40
    assert len(set(bandwidths)) > 5, "the bandwidth should vary"
    assert {p.delay_ms for p in trace.points} == {50}
    times = [p.time_s for p in trace.points] + [trace.period_s]
    mean = sum((times[i + 1] - times[i]) * p.bandwidth_mbit for i, p in enumerate(trace.points)) / trace.period_s
    assert 17 <= mean <= 23


# --------------------------------------------------------------------------- helpers


async def start_echo_server(
    on_connect: Callable[[int], str] = lambda n: "echo",
) -> tuple[asyncio.Server, int]:
    """Echo until EOF, then close. `on_connect(n)` may return "reset" to reset connection n instead."""
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        behaviour = on_connect(count)
        try:
            while data := await reader.read(CHUNK):
                if behaviour == "reset":
                    sock = writer.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, LOCALHOST, 0)
    return server, server.sockets[0].getsockname()[1]


@asynccontextmanager
async def echo_through_link(trace: LinkTrace, on_connect: Callable[[int], str] = lambda n: "echo",
                            ) -> AsyncIterator[tuple[LinkEmulator, int]]:
    """An echo server behind a started LinkEmulator: yields (emulator, the link's port); closes both."""
    server, target_port = await start_echo_server(on_connect)
    emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, target_port, trace)
    port = await emulator.start()
    try:
        yield emulator, port
    finally:
        await emulator.close()
        server.close()
        await server.wait_closed()


def most_bytes_by(trace: LinkTrace, t: float) -> float:
    """The most bytes a link following `trace` (not looping) can have transmitted `t` seconds
    after it started: the integral of its bandwidth, plus one segment (a segment started just
    before a step down is charged at the old, faster rate)."""
    assert not trace.loop
    total = 0.0
    points = trace.points
    for i, point in enumerate(points):
        start = point.time_s
        end = points[i + 1].time_s if i + 1 < len(points) else float("inf")
        if t > start:
            total += (min(t, end) - start) * point.bandwidth_mbit * 1e6 / 8
    return total + SEGMENT_BYTES


def assert_never_faster(reads: list[tuple[float, int]], epoch: float, trace: LinkTrace, delay_s: float) -> None:
    """Every read at the destination: the bytes received so far are no more than the link
    could have transmitted by then (a read is never earlier than its delivery, so load can
    only make the bound looser)."""
    received = 0
    for at, size in reads:
        received += size
        transmitted_by = at - epoch - delay_s + TIMER_SLACK_S
        assert received <= most_bytes_by(trace, transmitted_by), (
            f"{received} bytes received {at - epoch:.3f} s after the link started: more than "
            f"{most_bytes_by(trace, transmitted_by):.0f} the trace lets through by then")


# --------------------------------------------------------------------------- emulator


@pytest.mark.timeout(90)
def test_throughput_never_exceeds_the_fixed_bandwidth_and_every_byte_is_charged_at_it() -> None:
    bandwidth_mbit, delay_ms = 40.0, 2.0
    trace = LinkTrace([TracePoint(0, bandwidth_mbit, delay_ms)], loop=False)
    total = 5_000_000  # 1 s at 40 Mbit/s

    async def scenario() -> tuple[list[tuple[float, int]], float, LinkEmulator]:
        sink = Sink()
        sink.expected = total
        sink_port = await sink.start()
        emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, sink_port, trace)
        port = await emulator.start()
        try:
            sent = await push_bytes(port, total)
            assert sent == total
            await sink.done.wait()
            return list(sink.reads), emulator.epoch, emulator
        finally:
            await emulator.close()
            await sink.close()

    reads, epoch, emulator = run(scenario(), timeout_s=60)
    assert sum(n for _, n in reads) == total
    assert_never_faster(reads, epoch, trace, delay_ms / 1e3)
    # The serializer's own account: every byte reserved size * 8 / 40 Mbit/s of transmission.
    assert emulator._uplink.serializer_s == pytest.approx(total * 8 / (bandwidth_mbit * 1e6))
    assert emulator.bytes_client_to_target == total
    assert emulator.bytes_target_to_client == 0


@pytest.mark.timeout(90)
def test_connections_share_one_link() -> None:
    bandwidth_mbit, delay_ms = 40.0, 2.0
    trace = LinkTrace([TracePoint(0, bandwidth_mbit, delay_ms)], loop=False)
    per_connection = 2_500_000  # two together: 1 s at 40 Mbit/s

    async def scenario() -> tuple[list[tuple[float, int]], float, LinkEmulator]:
        sink = Sink()
        sink.expected = 2 * per_connection
        sink_port = await sink.start()
        emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, sink_port, trace)
        port = await emulator.start()
        try:
            sent = await asyncio.gather(push_bytes(port, per_connection), push_bytes(port, per_connection))
            assert sent == [per_connection, per_connection]
            await sink.done.wait()
            return list(sink.reads), emulator.epoch, emulator
        finally:
            await emulator.close()
            await sink.close()

    reads, epoch, emulator = run(scenario(), timeout_s=60)
    # Per-connection links would let twice as many bytes through by any moment; one shared
    # link keeps the aggregate under the set bandwidth.
    assert_never_faster(reads, epoch, trace, delay_ms / 1e3)
    assert emulator.connections_accepted == 2
    assert emulator.bytes_client_to_target == 2 * per_connection
    assert emulator._uplink.serializer_s == pytest.approx(2 * per_connection * 8 / (bandwidth_mbit * 1e6))


@pytest.mark.timeout(60)
def test_round_trip_time_is_at_least_twice_the_delay() -> None:
    delay_ms = 80.0

    messages = [f"ping {i:04d}".encode() * 10 for i in range(5)]

    async def scenario() -> tuple[list[float], LinkEmulator]:
        async with echo_through_link(LinkTrace.fixed(1000, delay_ms)) as (emulator, port):
            reader, writer = await asyncio.open_connection(LOCALHOST, port)
            rtts = []
            for message in messages:
                started = time.monotonic()
                writer.write(message)
                await writer.drain()
                assert await reader.readexactly(len(message)) == message
                rtts.append((time.monotonic() - started) * 1e3)
            writer.close()
            return rtts, emulator

    rtts, emulator = run(scenario(), timeout_s=30)
    # Each way is held for the delay (a timer may fire TIMER_SLACK_S early); how little more
    # it takes is `wanps bench linkem`'s figure.
    assert min(rtts) >= 2 * (delay_ms - TIMER_SLACK_S * 1e3), rtts
    echoed = sum(len(m) for m in messages)
    assert emulator.bytes_client_to_target == emulator.bytes_target_to_client == echoed


@pytest.mark.timeout(90)
def test_bandwidth_step_mid_transfer_is_followed() -> None:
    delay_ms = 2.0
    trace = LinkTrace([TracePoint(0, 40, delay_ms), TracePoint(1.0, 10, delay_ms)], loop=False)
    first_second_bytes = 40e6 / 8  # what the link can carry before the step
    target = 6_000_000  # past that: the last MB must go at 10 Mbit/s

    async def scenario() -> tuple[list[tuple[float, int]], float, int, float]:
        sink = Sink()
        sink.expected = target
        sink_port = await sink.start()
        emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, sink_port, trace)
        port = await emulator.start()
        try:
            sender = asyncio.create_task(push_bytes(port, 50_000_000, stop=sink.done.is_set))
            await sink.done.wait()
            sender.cancel()
            # One synchronous read of the counters (no await in between): bytes admitted onto
            # the link are those forwarded plus those still queued.
            admitted = emulator.bytes_client_to_target + emulator.bytes_queued
            return list(sink.reads), emulator.epoch, admitted, emulator._uplink.serializer_s
        finally:
            await emulator.close()
            await sink.close()

    reads, epoch, admitted, serializer_s = run(scenario(), timeout_s=60)
    assert_never_faster(reads, epoch, trace, delay_ms / 1e3)
    # The serializer's account splits the admitted bytes by the rate they were charged at:
    # serializer_s = fast * 8 / 40e6 + slow * 8 / 10e6, fast + slow = admitted.
    slow = (serializer_s - admitted * 8 / 40e6) / (8 / 10e6 - 8 / 40e6)
    fast = admitted - slow
    assert fast <= first_second_bytes + SEGMENT_BYTES + 1, (fast, slow)
    assert slow >= target - first_second_bytes - SEGMENT_BYTES - 1, (fast, slow)


@pytest.mark.timeout(60)
def test_half_close_carries_all_data_both_ways() -> None:
    payload = os.urandom(1_000_000 + 123)

    async def scenario() -> tuple[bytes, LinkEmulator]:
        async with echo_through_link(LinkTrace.fixed(400, 5)) as (emulator, port):
            reader, writer = await asyncio.open_connection(LOCALHOST, port)

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()  # the echo server answers EOF only after this half-close

            sending = asyncio.create_task(send())
            echoed = await reader.read()  # until EOF
            await sending
            writer.close()
            return echoed, emulator

    echoed, emulator = run(scenario(), timeout_s=30)
    assert echoed == payload
    assert emulator.bytes_client_to_target == len(payload)
    assert emulator.bytes_target_to_client == len(payload)


@pytest.mark.timeout(60)
def test_failing_connections_do_not_kill_the_emulator() -> None:
    async def expect_closed(port: int) -> None:
        reader, writer = await asyncio.open_connection(LOCALHOST, port)
        try:
            writer.write(b"hello")
            await writer.drain()
            assert await reader.read(100) == b""
        except ConnectionError:
            pass  # a reset is the expected outcome too
        finally:
            writer.close()

    async def scenario() -> bytes:
        # A bound socket that is not listening refuses connections: an unreachable target.
        refusing = socket.socket()
        refusing.bind((LOCALHOST, 0))
        dead_port = refusing.getsockname()[1]
        try:
            emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, dead_port, LinkTrace.fixed(100, 1))
            port = await emulator.start()
            try:
                for _ in range(3):
                    await expect_closed(port)
            finally:
                await emulator.close()
        finally:
            refusing.close()

        # A target that resets the first connection mid-stream, then echoes.
        reset_first = lambda n: "reset" if n == 1 else "echo"  # noqa: E731
        async with echo_through_link(LinkTrace.fixed(100, 1), reset_first) as (_, port):
            await expect_closed(port)
            reader, writer = await asyncio.open_connection(LOCALHOST, port)
            writer.write(b"still alive")
            writer.write_eof()
            answer = await reader.read()
            writer.close()
            return answer

    assert run(scenario(), timeout_s=30) == b"still alive"


@pytest.mark.timeout(90)
def test_stalled_receiver_bounds_memory_and_backpressures_the_sender() -> None:
    bandwidth_mbit, delay_ms = 200.0, 10.0
    # The emulator's per-connection bound: what the link holds (bandwidth * (queue + delay)),
    # a few segments of slack, plus the one segment admitted when just under the bound.
    bound = bandwidth_mbit * 1e6 / 8 * (DEFAULT_QUEUE_MS + delay_ms) / 1e3 + 5 * SEGMENT_BYTES
    offered = 64_000_000

    async def scenario() -> tuple[bool, int, int, int]:
        release = asyncio.Event()

        async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await release.wait()
            writer.close()

        server = await asyncio.start_server(never_read, LOCALHOST, 0)
        emulator = LinkEmulator(
            LOCALHOST, 0, LOCALHOST, server.sockets[0].getsockname()[1], LinkTrace.fixed(bandwidth_mbit, delay_ms)
        )
        port = await emulator.start()
        _, writer = await asyncio.open_connection(LOCALHOST, port)
        chunk = os.urandom(CHUNK)
        sent = 0

        async def send() -> None:
            nonlocal sent
            while sent < offered:
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()

        sender = asyncio.create_task(send())
        high_water = writer.transport.get_write_buffer_limits()[1]

        def held_back() -> bool:
            # The emulator reads no more from the sender (its connection's undelivered bytes
            # reached their bound) and the sender's own buffer is over its high-water mark, so
            # its drain() waits: TCP backpressure reached it.
            return emulator.pipes_held_back == 1 and writer.transport.get_write_buffer_size() > high_water

        most_queued = 0
        try:
            # Polls the counters; bounded by the scenario's timeout. Without the bound the
            # emulator would take the sender's 64 MB into memory instead.
            while not sender.done() and not held_back() and most_queued <= bound:
                most_queued = max(most_queued, emulator.bytes_queued)
                await asyncio.sleep(0.01)
            most_queued = max(most_queued, emulator.bytes_queued)
            return sender.done(), sent, emulator.bytes_queued, most_queued
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            writer.transport.abort()
            release.set()
            await emulator.close()
            server.close()
            await server.wait_closed()

    sender_finished, sent, queued, most_queued = run(scenario(), timeout_s=60)
    print(f"stalled receiver: sender wrote {sent / 1e6:.1f} MB, emulator holds {queued / 1e6:.2f} MB "
          f"(most {most_queued / 1e6:.2f}, bound {bound / 1e6:.2f} MB)")
    assert not sender_finished and sent < offered
    assert bound / 2 <= queued <= most_queued <= bound


# --------------------------------------------------------------------------- CLI


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_subprocess_forwards_and_exits_cleanly(stop_signal: signal.Signals, tmp_path) -> None:
    payload = os.urandom(300_000)
    # A glacial trace in the environment that the --bandwidth-mbit/--delay-ms flags must
    # override: through it the echo would take hours (1 kbit/s, 10 minutes each way), so it
    # cannot finish within this test's bound; the log names the trace in use.
    slow_trace = tmp_path / "slow.csv"
    slow_trace.write_text("time_s,bandwidth_mbit,delay_ms\n0,0.001,600000\n")

    async def scenario() -> tuple[int | None, bytes, bytes]:
        server, target_port = await start_echo_server()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANPS_LINKEM_")}
        env["WANPS_LINKEM_TARGET"] = f"{LOCALHOST}:{target_port}"  # the env fallback of --target
        env["WANPS_LINKEM_TRACE"] = str(slow_trace)
        env["WANPS_LOG_LEVEL"] = "INFO"  # the startup line names the trace
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wanps.linkem.cli",
            "--listen", f"{LOCALHOST}:0", "--bandwidth-mbit", "200", "--delay-ms", "5",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()  # Python's start-up, loaded
            assert line.startswith("LISTENING "), line
            host, _, port = line.split()[1].rpartition(":")
            assert host == LOCALHOST and int(port) > 0
            reader, writer = await asyncio.open_connection(LOCALHOST, int(port))
            writer.write(payload)
            writer.write_eof()
            try:  # a bound on a hang (the glacial trace), not a speed: seconds against hours
                echoed = await asyncio.wait_for(reader.read(), 30)
            except asyncio.TimeoutError:
                raise AssertionError("no echo: the env trace was used instead of the flags") from None
            writer.close()
            proc.send_signal(stop_signal)  # by PID: only the process this test started
            rest_of_stdout, stderr = await asyncio.wait_for(proc.communicate(), 10)
            assert rest_of_stdout == b"", "only the LISTENING line goes to stdout"
            return proc.returncode, echoed, stderr
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            server.close()
            await server.wait_closed()

    returncode, echoed, stderr = run(scenario(), timeout_s=100)
    assert echoed == payload
    assert returncode == 0, stderr.decode()
    assert "trace=LinkTrace.fixed(bandwidth_mbit=200.0, delay_ms=5.0)" in stderr.decode(), stderr.decode()


def test_cli_rejects_bad_arguments(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in list(os.environ):
        if name.startswith("WANPS_LINKEM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANPS_LINKEM_DELAY_MS", "10")
    monkeypatch.setenv("WANPS_LINKEM_TRACE", "/nonexistent/from-env.csv")
    with pytest.raises(SystemExit) as exc_info:
        main(["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1"])
    assert exc_info.value.code == 2
    assert "both a trace and a fixed link" in capsys.readouterr().err
    monkeypatch.delenv("WANPS_LINKEM_DELAY_MS")
    monkeypatch.delenv("WANPS_LINKEM_TRACE")
    cases = [
        (["--target", "127.0.0.1:1", "--bandwidth-mbit", "1", "--delay-ms", "1"], "--listen and --target"),
        (["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1"], "give --trace FILE"),
        (["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--bandwidth-mbit", "1"], "give --trace FILE"),
        (["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--trace", "x.csv", "--delay-ms", "1"], "not both"),
        (["--listen", "127.0.0.1:0", "--target", "nohostport", "--bandwidth-mbit", "1", "--delay-ms", "1"], "HOST:PORT"),
        (["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--bandwidth-mbit", "0", "--delay-ms", "1"], "> 0"),
        (["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--trace", "/nonexistent/trace.csv"], "bad --trace"),
        # a name that is neither a file nor a shipped trace: the error lists the shipped ones
        (["--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--trace", "wan-congestd"], "wan-congested.csv"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc_info:
            main(argv)
        assert exc_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_asymmetric_link_gives_each_direction_its_own_trace() -> None:
    up, down = LinkTrace.fixed(5, 20), LinkTrace.fixed(50, 10)
    asymmetric = LinkEmulator(LOCALHOST, 0, LOCALHOST, 1, up, downlink_trace=down)
    symmetric = LinkEmulator(LOCALHOST, 0, LOCALHOST, 1, up)
    assert asymmetric.downlink_trace is down and symmetric.downlink_trace is up

    async def admitted(emulator: LinkEmulator) -> tuple[float, float]:
        # The serializer's own accounting (no clock in the assertion): one segment admitted
        # at once in each direction reserves size * 8 / bandwidth of transmit time.
        before_up, before_down = emulator._uplink.tx_end, emulator._downlink.tx_end
        await emulator._uplink.admit(SEGMENT_BYTES)
        await emulator._downlink.admit(SEGMENT_BYTES)
        return emulator._uplink.tx_end - before_up, emulator._downlink.tx_end - before_down

    up_s, down_s = run(admitted(asymmetric), timeout_s=5)
    assert up_s >= SEGMENT_BYTES * 8 / 5e6 and down_s < up_s
    assert SEGMENT_BYTES * 8 / 50e6 <= down_s < SEGMENT_BYTES * 8 / 5e6


def test_cli_downlink_flags(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from wanps.linkem.cli import _downlink_trace_from_args, _trace_from_args, build_parser

    for name in list(os.environ):
        if name.startswith("WANPS_LINKEM_"):
            monkeypatch.delenv(name)
    parser = build_parser()

    def traces(*argv: str) -> tuple[LinkTrace, LinkTrace | None]:
        args = parser.parse_args(list(argv))
        uplink = _trace_from_args(parser, args, list(argv))
        return uplink, _downlink_trace_from_args(parser, args, uplink)

    up, down = traces("--bandwidth-mbit", "5", "--delay-ms", "20")
    assert down is None  # symmetric: the downlink follows the link
    up, down = traces("--bandwidth-mbit", "5", "--delay-ms", "20", "--down-bandwidth-mbit", "50")
    assert (up.bandwidth_bps(0), down.bandwidth_bps(0), down.delay_s(0)) == (5e6, 50e6, 0.020)
    path = tmp_path / "down.csv"
    path.write_text("time_s,bandwidth_mbit,delay_ms\n0,40,10\n5,20,10\n")
    up, down = traces("--bandwidth-mbit", "5", "--delay-ms", "20", "--down-trace", str(path))
    assert down.period_s == 10 and down.bandwidth_bps(6) == 20e6
    monkeypatch.setenv("WANPS_LINKEM_DOWN_BANDWIDTH_MBIT", "30")
    up, down = traces("--bandwidth-mbit", "5", "--delay-ms", "20")
    assert down.bandwidth_bps(0) == 30e6  # the environment fallback
    monkeypatch.delenv("WANPS_LINKEM_DOWN_BANDWIDTH_MBIT")
    uplink_trace = tmp_path / "up.csv"
    uplink_trace.write_text("time_s,bandwidth_mbit,delay_ms\n0,10,10\n5,20,10\n")
    cases = [
        (["--bandwidth-mbit", "5", "--delay-ms", "1", "--down-trace", str(path), "--down-delay-ms", "3"], "not both"),
        (["--trace", str(uplink_trace), "--down-bandwidth-mbit", "50"], "needs both --down-bandwidth-mbit"),
        (["--bandwidth-mbit", "5", "--delay-ms", "1", "--down-bandwidth-mbit", "0"],
         "argument --down-bandwidth-mbit: must be > 0"),
        (["--bandwidth-mbit", "5", "--delay-ms", "1", "--down-trace", "/nonexistent/d.csv"], "bad --down-trace"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc_info:
            traces(*argv)
        assert exc_info.value.code == 2
        assert message in capsys.readouterr().err, argv


# --------------------------------------------------------------------------- gRPC over the link


@pytest.mark.timeout(120)
def test_grpc_crosses_the_cli_link_intact() -> None:
    """gRPC (HTTP/2) crosses the proxy intact, every byte accounted for. Its throughput at a
    high bandwidth setting is `wanps bench linkem`'s figure (docs/benchmarks.md)."""
    grpc = pytest.importorskip("grpc")
    message_bytes = 2 * 1024 * 1024
    calls = 4

    async def scenario() -> int:
        async def echo(request: bytes, context: object) -> bytes:
            return request

        handler = grpc.method_handlers_generic_handler(
            "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        options = [("grpc.max_receive_message_length", 8 * message_bytes), ("grpc.max_send_message_length", 8 * message_bytes)]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((handler,))
        target_port = server.add_insecure_port(f"{LOCALHOST}:0")
        await server.start()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wanps.linkem.cli",
            "--listen", f"{LOCALHOST}:0", "--target", f"{LOCALHOST}:{target_port}",
            "--bandwidth-mbit", "10000", "--delay-ms", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()  # Python's start-up, loaded
            assert line.startswith("LISTENING "), line
            address = line.split()[1]
            answered = 0
            async with grpc.aio.insecure_channel(address, options=options) as channel:
                call = channel.unary_unary("/test.Echo/Echo")
                for i in range(calls):
                    payload = os.urandom(message_bytes)
                    assert await call(payload, timeout=20) == payload, f"call {i} came back different"
                    answered += 1
            return answered
        finally:
            proc.terminate()  # by PID: only the process this test started
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
            await server.stop(None)

    # grpc.aio runs on the standard asyncio loop.
    assert asyncio.run(asyncio.wait_for(scenario(), 100)) == calls


def test_a_shipped_trace_is_found_by_its_name(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wanps.linkem.trace import shipped_traces

    shipped = shipped_traces()
    assert {"wan-varying.csv", "wan-congested.csv"} <= set(shipped)
    by_path = LinkTrace.from_csv(shipped["wan-congested.csv"])
    for name in ("wan-congested", "wan-congested.csv"):
        assert [by_path.at(t) for t in (0, 31, 77)] == [LinkTrace.from_csv(name).at(t) for t in (0, 31, 77)]
    # A file of that name in the working directory is the user's and wins.
    (tmp_path / "wan-congested.csv").write_text("time_s,bandwidth_mbit,delay_ms\n0,7,1\n")
    monkeypatch.chdir(tmp_path)
    assert LinkTrace.from_csv("wan-congested.csv").at(0).bandwidth_mbit == 7
    with pytest.raises(FileNotFoundError, match="wan-varying.csv"):
        LinkTrace.from_csv("elsewhere/wan-congested.csv")  # a path with a folder is never a shipped name
