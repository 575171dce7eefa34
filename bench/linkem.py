"""`wanps bench linkem`: how closely the link emulator follows what it is set to.

The emulator's tests (tests/test_linkem.py) assert only what load cannot break: no byte
arrives before the link lets it, every byte is charged at its rate. How close the measured
link comes to the set one is a matter of spare CPU, so it is measured here, on loopback,
all in one process on the production event loop (uvloop):

* goodput of one connection, and of two sharing one link, at fixed bandwidths: a sink
  timestamps every read; goodput counts from the first read to the last;
* round-trip time of small echoes at fixed delays (the set RTT is twice the delay);
* a bandwidth step (40 -> 10 Mbit/s at 1 s) mid-transfer: goodput in a window before and
  after it;
* a stall: how long an echo is held against the stall's duration;
* gRPC (HTTP/2) echoes of 2 MiB through a `wanps linkem` process set to 10 Gbit/s: MB/s,
  both directions counted (the proxy's own cost when the link is not the bottleneck).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from wanps.bench.report import load_summary, machine_info, text_table, write_json
from wanps.linkem.proxy import LinkEmulator
from wanps.linkem.trace import LinkTrace, TracePoint
from wanps.rpc.config import run_async

LOCALHOST = "127.0.0.1"
CHUNK = 64 * 1024
SCENARIO_TIMEOUT_S = 120.0


class Sink:
    """A TCP server that reads and discards, timestamping each read; `done` once `expected` bytes came."""

    def __init__(self, expected: int = 0) -> None:
        self.reads: list[tuple[float, int]] = []
        self.total = 0
        self.expected = expected
        self.done = asyncio.Event()
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
                    self.done.set()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def push_bytes(port: int, total: int, stop: Callable[[], bool] = lambda: False) -> int:
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
    finally:
        writer.close()  # also when cancelled: the link sees the end and closes in order
    return sent


async def _close(emulator: LinkEmulator) -> None:
    """Let connections end in order (EOF both ways) before closing: cancelling live ones
    makes asyncio's stream callbacks print CancelledError tracebacks."""
    for _ in range(200):  # bounded: 2 s
        if emulator.active_connections == 0:
            break
        await asyncio.sleep(0.01)
    await emulator.close()


def _goodput_mbit(reads: list[tuple[float, int]]) -> float:
    """From the first read to the last, not counting the first read's bytes."""
    duration = reads[-1][0] - reads[0][0]
    return sum(n for _, n in reads[1:]) * 8 / duration / 1e6 if duration > 0 else 0.0


def _window_mbit(reads: list[tuple[float, int]], epoch: float, start: float, end: float) -> float:
    return sum(n for t, n in reads if start <= t - epoch < end) * 8 / (end - start) / 1e6


async def goodput(bandwidth_mbit: float, seconds: float, connections: int) -> dict[str, Any]:
    total = int(bandwidth_mbit * 1e6 / 8 * seconds)
    per_connection = total // connections
    sink = Sink(per_connection * connections)
    emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, await sink.start(), LinkTrace.fixed(bandwidth_mbit, 2))
    port = await emulator.start()
    try:
        await asyncio.gather(*(push_bytes(port, per_connection) for _ in range(connections)))
        await sink.done.wait()
        measured = _goodput_mbit(sink.reads)
    finally:
        await _close(emulator)
        await sink.close()
    return {"case": f"goodput, {connections} connection{'s' if connections > 1 else ''}",
            "set": f"{bandwidth_mbit:g} Mbit/s", "measured": f"{measured:.2f} Mbit/s",
            "error_pct": round(100 * (measured - bandwidth_mbit) / bandwidth_mbit, 2)}


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, LOCALHOST, 0)
    return server, server.sockets[0].getsockname()[1]


async def round_trip(delay_ms: float, pings: int) -> dict[str, Any]:
    server, target = await _echo_server()
    emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, target, LinkTrace.fixed(1000, delay_ms))
    port = await emulator.start()
    rtts = []
    try:
        reader, writer = await asyncio.open_connection(LOCALHOST, port)
        for i in range(pings):
            message = f"ping {i:06d}".encode() * 10
            started = time.monotonic()
            writer.write(message)
            await writer.drain()
            await reader.readexactly(len(message))
            rtts.append((time.monotonic() - started) * 1e3)
        writer.close()
    finally:
        await _close(emulator)
        server.close()
        await server.wait_closed()
    expected = 2 * delay_ms
    median, worst = statistics.median(rtts), max(rtts)
    return {"case": f"RTT, {pings} echoes (median / max)", "set": f"{expected:g} ms",
            "measured": f"{median:.1f} / {worst:.1f} ms", "error_pct": round(100 * (median - expected) / expected, 2)}


async def bandwidth_step() -> list[dict[str, Any]]:
    trace = LinkTrace([TracePoint(0, 40, 2), TracePoint(1.0, 10, 2)], loop=False)
    end_s = 2.0
    sink = Sink()
    emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, await sink.start(), trace)
    port = await emulator.start()
    try:
        sender = asyncio.create_task(push_bytes(port, 50_000_000, stop=lambda: emulator.trace_time() > end_s))
        for _ in range(int(end_s / 0.05) + 100):  # polls the trace clock, bounded
            if emulator.trace_time() >= end_s:
                break
            await asyncio.sleep(0.05)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        before = _window_mbit(sink.reads, emulator.epoch, 0.25, 0.95)
        after = _window_mbit(sink.reads, emulator.epoch, 1.25, 1.95)
    finally:
        await _close(emulator)
        await sink.close()
    return [{"case": "step 40 -> 10 Mbit/s at 1 s: before", "set": "40 Mbit/s", "measured": f"{before:.2f} Mbit/s",
             "error_pct": round(100 * (before - 40) / 40, 2)},
            {"case": "step 40 -> 10 Mbit/s at 1 s: after", "set": "10 Mbit/s", "measured": f"{after:.2f} Mbit/s",
             "error_pct": round(100 * (after - 10) / 10, 2)}]


async def stall(seconds: float) -> dict[str, Any]:
    server, target = await _echo_server()
    emulator = LinkEmulator(LOCALHOST, 0, LOCALHOST, target, LinkTrace.fixed(1000, 1))
    port = await emulator.start()
    try:
        reader, writer = await asyncio.open_connection(LOCALHOST, port)
        started = time.monotonic()
        emulator.stall(seconds)
        writer.write(b"held")
        await writer.drain()
        await reader.readexactly(4)
        held = time.monotonic() - started
        writer.close()
    finally:
        await _close(emulator)
        server.close()
        await server.wait_closed()
    return {"case": "stall, one echo held", "set": f"{seconds:g} s (+2 ms delay)", "measured": f"{held:.3f} s",
            "error_pct": round(100 * (held - seconds - 0.002) / seconds, 2)}


async def grpc_through_cli(calls: int, message_bytes: int = 2 * 1024 * 1024) -> dict[str, Any]:
    import grpc

    async def echo(request: bytes, context: object) -> bytes:
        return request

    options = [("grpc.max_receive_message_length", 8 * message_bytes),
               ("grpc.max_send_message_length", 8 * message_bytes)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    target = server.add_insecure_port(f"{LOCALHOST}:0")
    await server.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wanps.linkem.cli", "--listen", f"{LOCALHOST}:0", "--target", f"{LOCALHOST}:{target}",
        "--bandwidth-mbit", "10000", "--delay-ms", "1", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"wanps linkem did not start: {line!r}")
        async with grpc.aio.insecure_channel(line.split()[1], options=options) as channel:
            call = channel.unary_unary("/bench.Echo/Echo")
            payload = os.urandom(message_bytes)
            await call(payload, timeout=30)  # warm-up: connect, HTTP/2 windows
            started = time.monotonic()
            for _ in range(calls):
                await call(payload, timeout=30)
            elapsed = time.monotonic() - started
    finally:
        proc.terminate()  # by PID: the process this benchmark started
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        await server.stop(None)
    mbyte_s = 2 * calls * message_bytes / elapsed / 1e6
    return {"case": f"gRPC echo of 2 MiB through `wanps linkem`, {calls} calls", "set": "10 Gbit/s, 1 ms",
            "measured": f"{mbyte_s:.1f} MB/s", "error_pct": None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanps bench linkem", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="Length of each goodput transfer at its rate.")
    parser.add_argument("--bandwidths", type=float, nargs="+", default=[10.0, 40.0, 200.0], help="Mbit/s.")
    parser.add_argument("--delays", type=float, nargs="+", default=[20.0, 80.0], help="One-way delays, ms.")
    parser.add_argument("--pings", type=int, default=20, help="Echoes per delay.")
    parser.add_argument("--grpc-calls", type=int, default=12, help="gRPC echoes through the CLI (0: skip).")
    parser.add_argument("--no-step", action="store_true", help="Skip the 2 s bandwidth step.")
    parser.add_argument("--json", default="", help="Also write the rows (and the machine's load) here.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0 or args.pings < 1 or args.grpc_calls < 0 or min(args.bandwidths) <= 0:
        print("wanps bench linkem: --seconds, --pings and --bandwidths must be positive", file=sys.stderr)
        return 2

    async def emulator_cases() -> list[dict[str, Any]]:
        rows = []
        for bandwidth in args.bandwidths:
            rows.append(await goodput(bandwidth, args.seconds, 1))
        rows.append(await goodput(args.bandwidths[0], args.seconds, 2))
        for delay in args.delays:
            rows.append(await round_trip(delay, args.pings))
        if not args.no_step:
            rows += await bandwidth_step()
        rows.append(await stall(0.5))
        return rows

    async def bounded(coro: Any) -> Any:
        return await asyncio.wait_for(coro, SCENARIO_TIMEOUT_S)

    rows = run_async(bounded(emulator_cases()))
    if args.grpc_calls:
        rows.append(asyncio.run(bounded(grpc_through_cli(args.grpc_calls))))  # grpc.aio: the standard loop
    print(text_table(["case", "set", "measured", "error %"],
                     [[r["case"], r["set"], r["measured"], "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}"]
                      for r in rows], left_aligned=True))
    machine = machine_info()
    print(load_summary(machine))
    if args.json:
        write_json(args.json, {"benchmark": "linkem", "machine": machine, "rows": rows})
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
