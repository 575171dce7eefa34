"""Tests of `wanps linkem`, the user-space WAN link emulator.

All traffic stays on 127.0.0.1 with ports picked by the kernel (port 0). Coroutines run on
the production event loop (uvloop, via `wanps.rpc.config.run_async`), each under a time bound.
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

from wanps.linkem.cli import main
from wanps.linkem.proxy import LinkEmulator
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


class Sink:
    """A TCP server that reads and discards, recording (monotonic time, bytes) per read."""

    def __init__(self) -> None:
        self.reads: list[tuple[float, int]] = []
        self.total = 0
        self.got_bytes = asyncio.Event()
        self.expected = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, LOCALHOST, 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                self.reads.append((time.monotonic(), len(data)))
                self.total += len(data)
                if self.expected and self.total >= self.expected:
                    self.got_bytes.set()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


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


async def push(port: int, total: int, stop: Callable[[], bool] = lambda: False) -> int:
    """Send `total` bytes (or until `stop()`) to `port`, then half-close. Returns bytes sent."""
    _, writer = await asyncio.open_connection(LOCALHOST, port)
    chunk = os.urandom(CHUNK)
    sent = 0
    try:
        while sent < total and not stop():
            piece = chunk[: total - sent]
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
        writer.write_eof()
    except ConnectionError:
        pass
    return sent


def goodput_mbit(reads: list[tuple[float, int]]) -> float:
    """Goodput from the first read to the last, not counting the first read's bytes."""
    assert len(reads) >= 10, f"too few reads to measure: {len(reads)}"
    duration = reads[-1][0] - reads[0][0]
    return sum(n for _, n in reads[1:]) * 8 / duration / 1e6


def window_mbit(reads: list[tuple[float, int]], epoch: float, start: float, end: float) -> float:
    """Goodput of the reads whose trace time falls in [start, end)."""
    in_window = sum(n for t, n in reads if start <= t - epoch < end)
    return in_window * 8 / (end - start) / 1e6


# --------------------------------------------------------------------------- emulator


@pytest.mark.timeout(30)
def test_throughput_follows_fixed_bandwidth() -> None:
    bandwidth_mbit = 40.0
    total = 5_000_000  # 1 s at 40 Mbit/s

    async def scenario() -> tuple[float, LinkEmulator]:
        sink = Sink()
        sink.expected = total
        sink_port = await sink.start()
        emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, sink_port, LinkTrace.fixed(bandwidth_mbit, 2))
        port = await emulator.start()
        try:
            sent = await push(port, total)
            assert sent == total
            await sink.got_bytes.wait()
            return goodput_mbit(sink.reads), emulator
        finally:
            await emulator.close()
            await sink.close()

    measured, emulator = run(scenario(), timeout_s=20)
    print(f"goodput {measured:.2f} Mbit/s at {bandwidth_mbit} Mbit/s")
    assert measured == pytest.approx(bandwidth_mbit, rel=0.10)
    assert emulator.bytes_client_to_target == total
    assert emulator.bytes_target_to_client == 0


@pytest.mark.timeout(30)
def test_connections_share_one_link() -> None:
    bandwidth_mbit = 40.0
    per_connection = 2_500_000  # two together: 1 s at 40 Mbit/s

    async def scenario() -> tuple[float, int]:
        sink = Sink()
        sink.expected = 2 * per_connection
        sink_port = await sink.start()
        emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, sink_port, LinkTrace.fixed(bandwidth_mbit, 2))
        port = await emulator.start()
        try:
            sent = await asyncio.gather(push(port, per_connection), push(port, per_connection))
            assert sent == [per_connection, per_connection]
            await sink.got_bytes.wait()
            return goodput_mbit(sink.reads), emulator.bytes_client_to_target
        finally:
            await emulator.close()
            await sink.close()

    aggregate, forwarded = run(scenario(), timeout_s=20)
    print(f"aggregate goodput of 2 connections {aggregate:.2f} Mbit/s at {bandwidth_mbit} Mbit/s")
    # Per-connection links would give ~2x; one shared link gives the set bandwidth.
    assert aggregate == pytest.approx(bandwidth_mbit, rel=0.10)
    assert forwarded == 2 * per_connection


@pytest.mark.timeout(30)
def test_round_trip_time_is_twice_the_delay() -> None:
    delay_ms = 80.0

    async def scenario() -> list[float]:
        async with echo_through_link(LinkTrace.fixed(1000, delay_ms)) as (_, port):
            reader, writer = await asyncio.open_connection(LOCALHOST, port)
            rtts = []
            for i in range(5):
                message = f"ping {i:04d}".encode() * 10
                started = time.monotonic()
                writer.write(message)
                await writer.drain()
                assert await reader.readexactly(len(message)) == message
                rtts.append((time.monotonic() - started) * 1e3)
            writer.close()
            return rtts

    rtts = run(scenario(), timeout_s=10)
    print("RTTs ms:", ", ".join(f"{r:.1f}" for r in rtts))
    expected = 2 * delay_ms
    for rtt in rtts:
        assert abs(rtt - expected) <= 0.10 * expected + 3, rtts


@pytest.mark.timeout(30)
def test_bandwidth_step_mid_transfer_is_followed() -> None:
    trace = LinkTrace([TracePoint(0, 40, 2), TracePoint(1.0, 10, 2)], loop=False)
    end_s = 2.0

    async def scenario() -> tuple[float, float]:
        sink = Sink()
        sink_port = await sink.start()
        emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, sink_port, trace)
        port = await emulator.start()
        try:
            sender = asyncio.create_task(push(port, 50_000_000, stop=lambda: emulator.trace_time() > end_s))
            # Poll the trace clock: bounded by the end time and by the outer timeout.
            while emulator.trace_time() < end_s:
                await asyncio.sleep(0.05)
            sender.cancel()
            reads = list(sink.reads)
            before = window_mbit(reads, emulator.epoch, 0.25, 0.95)
            after = window_mbit(reads, emulator.epoch, 1.25, 1.95)
            return before, after
        finally:
            await emulator.close()
            await sink.close()

    before, after = run(scenario(), timeout_s=15)
    print(f"before step {before:.2f} Mbit/s (set 40), after step {after:.2f} Mbit/s (set 10)")
    assert before == pytest.approx(40, rel=0.10)
    assert after == pytest.approx(10, rel=0.10)


@pytest.mark.timeout(30)
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

    echoed, emulator = run(scenario(), timeout_s=10)
    assert echoed == payload
    assert emulator.bytes_client_to_target == len(payload)
    assert emulator.bytes_target_to_client == len(payload)


@pytest.mark.timeout(30)
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

    assert run(scenario(), timeout_s=10) == b"still alive"


@pytest.mark.timeout(30)
def test_stalled_receiver_bounds_memory_and_backpressures_the_sender() -> None:
    bandwidth_mbit, delay_ms = 200.0, 10.0
    # The emulator's per-connection bound: what the link holds (bandwidth * (queue + delay)),
    # a few segments of slack, plus the one segment admitted when just under the bound.
    bound = bandwidth_mbit * 1e6 / 8 * (DEFAULT_QUEUE_MS + delay_ms) / 1e3 + 5 * SEGMENT_BYTES
    offered = 64_000_000

    async def scenario() -> tuple[int, int]:
        release = asyncio.Event()

        async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await release.wait()
            writer.close()

        server = await asyncio.start_server(never_read, LOCALHOST, 0)
        emulator = LinkEmulator(
            LOCALHOST, 0, LOCALHOST, server.sockets[0].getsockname()[1], LinkTrace.fixed(bandwidth_mbit, delay_ms)
        )
        port = await emulator.start()
        writes = 0

        def count_write_and_go_on() -> bool:
            nonlocal writes
            writes += 1
            return False

        try:
            # The receiver never reads, so the sender must end up blocked: expect the timeout.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(push(port, offered, stop=count_write_and_go_on), 1.5)
            return writes * CHUNK, emulator.bytes_queued
        finally:
            release.set()
            await emulator.close()
            server.close()
            await server.wait_closed()

    sent, queued = run(scenario(), timeout_s=10)
    print(f"stalled receiver: sender wrote {sent / 1e6:.1f} MB, emulator holds {queued / 1e6:.2f} MB (bound {bound / 1e6:.2f} MB)")
    assert sent < offered
    assert bound / 2 <= queued <= bound


# --------------------------------------------------------------------------- CLI


@pytest.mark.timeout(30)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_subprocess_forwards_and_exits_cleanly(stop_signal: signal.Signals, tmp_path) -> None:
    payload = os.urandom(300_000)
    # A slow trace in the environment that the --bandwidth-mbit/--delay-ms flags must override:
    # through it the echo would take > 4 s instead of a few ms.
    slow_trace = tmp_path / "slow.csv"
    slow_trace.write_text("time_s,bandwidth_mbit,delay_ms\n0,1,300\n")

    async def scenario() -> tuple[int | None, bytes, bytes]:
        server, target_port = await start_echo_server()
        env = {k: v for k, v in os.environ.items() if not k.startswith("WANPS_LINKEM_")}
        env["WANPS_LINKEM_TARGET"] = f"{LOCALHOST}:{target_port}"  # the env fallback of --target
        env["WANPS_LINKEM_TRACE"] = str(slow_trace)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wanps.linkem.cli",
            "--listen", f"{LOCALHOST}:0", "--bandwidth-mbit", "200", "--delay-ms", "5",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
            assert line.startswith("LISTENING "), line
            host, _, port = line.split()[1].rpartition(":")
            assert host == LOCALHOST and int(port) > 0
            reader, writer = await asyncio.open_connection(LOCALHOST, int(port))
            started = time.monotonic()
            writer.write(payload)
            writer.write_eof()
            echoed = await reader.read()
            echo_s = time.monotonic() - started
            writer.close()
            assert echo_s < 1.0, f"echo took {echo_s:.2f} s: the env trace was used instead of the flags"
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

    returncode, echoed, stderr = run(scenario(), timeout_s=25)
    assert echoed == payload
    assert returncode == 0, stderr.decode()


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


@pytest.mark.timeout(60)
def test_grpc_through_cli_is_fast_on_a_fast_link() -> None:
    """gRPC (HTTP/2) crosses the proxy intact; at a high bandwidth setting it is not the bottleneck."""
    grpc = pytest.importorskip("grpc")
    message_bytes = 2 * 1024 * 1024
    calls = 12

    async def scenario() -> float:
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
            line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
            assert line.startswith("LISTENING "), line
            address = line.split()[1]
            async with grpc.aio.insecure_channel(address, options=options) as channel:
                call = channel.unary_unary("/test.Echo/Echo")
                payload = os.urandom(message_bytes)
                assert await call(payload, timeout=10) == payload  # warm-up: connect, HTTP/2 windows
                started = time.monotonic()
                for _ in range(calls):
                    assert await call(payload, timeout=10) == payload
                elapsed = time.monotonic() - started
            return 2 * calls * message_bytes / elapsed / 1e6
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
            await server.stop(None)

    # grpc.aio runs on the standard asyncio loop.
    mbyte_s = asyncio.run(asyncio.wait_for(scenario(), 45))
    print(f"gRPC echo through linkem: {mbyte_s:.1f} MB/s (both directions counted)")
    assert mbyte_s >= 20, f"gRPC through linkem only {mbyte_s:.1f} MB/s"
