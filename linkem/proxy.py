"""`wanps linkem`: a user-space WAN link emulator (a shaping TCP proxy).

The kernel we run on has no netem, so tests, the demo and the benchmarks get their WAN from
this proxy: clients connect to it, it connects to the target, and every byte in each direction
goes through a model of one WAN link whose bandwidth and one-way delay follow a `LinkTrace`.

Shaping model, per direction (client->target and target->client are independent, full duplex):

* Data read from the source is cut into segments of at most `SEGMENT_BYTES`.
* One serializer per direction per emulator (the link is shared by all connections through
  it): a segment admitted at `now` finishes transmission at
  `tx_end = max(now, previous_tx_end) + size * 8 / bandwidth_bps(start)` and is delivered to
  the destination at `tx_end + delay(tx_end)`. Rates are looked up when the segment starts
  transmitting (not when it was read), so a trace step is followed even with a queue.
* The link queue is bounded in time (`queue_ms`, a router buffer): a reader waits before
  admitting while the serializer backlog exceeds it. Each connection also bounds its own
  undelivered bytes (bandwidth * (queue + delay) + a few segments), which covers a
  destination that stops reading. Waiting reads stop reading the socket, so TCP
  backpressure reaches the sender and memory stays bounded.
* A writer task per connection and direction delivers segments in order at their delivery
  times; EOF (half-close) and resets travel the same path, in order, after the data.

Faults (for fault tests and drills, docs/operations.md): `reset_connections()` aborts every
proxied connection with a TCP RST on both sides; `stall(seconds)` lets no new byte onto the
link in either direction for that long (bytes already on the wire still arrive), i.e. the
bandwidth drops to zero. From the command line, `--faults "reset@5,stall@8:3"` schedules them
(seconds after start), and SIGUSR1 resets / SIGUSR2 stalls for `--stall-s` at any moment.
A link that only slows down to near zero is a trace row with a tiny bandwidth.

Not modelled: packet loss, the TCP handshake RTT (the client's connect completes at once),
header overhead (the trace bandwidth is goodput).
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import enum
import logging
import math
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wanps.rpc.config import EnvDefaultsParser, run_async, setup_logging, split_host_port

log = logging.getLogger(__name__)

TRACE_HEADER = ("time_s", "bandwidth_mbit", "delay_ms")
SEGMENT_BYTES = 16 * 1024
# One read takes a few segments at once: fewer read calls, still a small bounded buffer.
READ_BYTES = 4 * SEGMENT_BYTES
DEFAULT_QUEUE_MS = 50.0
# asyncio/uvloop timers fire up to ~1 ms early or late; a segment this close to due goes out
# now instead of arming another sub-millisecond timer (which would spin).
TIMER_SLACK_S = 0.001


# --------------------------------------------------------------------------- traces


@dataclass(frozen=True)
class TracePoint:
    """One trace row: from `time_s` on (until the next row) the link has these properties."""

    time_s: float
    bandwidth_mbit: float
    delay_ms: float


class LinkTrace:
    """Step-wise link properties over time: the row with the greatest `time_s <= t` holds.

    With `loop=True` the trace repeats with period `last time_s + (last time_s - previous
    time_s)`, i.e. the last row holds as long as the gap before it. A one-row trace is
    constant. With `loop=False` the last row holds forever.
    """

    def __init__(self, points: Sequence[TracePoint], loop: bool = True) -> None:
        points = list(points)
        _validate_points(points, source="trace")
        self._points = points
        self._times = [p.time_s for p in points]
        self.loop = loop
        if len(points) >= 2:
            self.period_s: float | None = points[-1].time_s + (points[-1].time_s - points[-2].time_s)
        else:
            self.period_s = None

    @classmethod
    def fixed(cls, bandwidth_mbit: float, delay_ms: float) -> LinkTrace:
        """A constant link."""
        return cls([TracePoint(0.0, float(bandwidth_mbit), float(delay_ms))])

    @classmethod
    def from_csv(cls, path: str | Path, loop: bool = True) -> LinkTrace:
        path = Path(path)
        return cls.parse(path.read_text(encoding="utf-8"), loop=loop, source=str(path))

    @classmethod
    def parse(cls, text: str, loop: bool = True, source: str = "<trace>") -> LinkTrace:
        """Parse CSV text: header `time_s,bandwidth_mbit,delay_ms`, then one row per step.

        Blank lines and `#` comments (whole-line or trailing) are ignored.
        """
        header_seen = False
        points: list[TracePoint] = []
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = tuple(f.strip() for f in line.split(","))
            where = f"{source}:{lineno}"
            if not header_seen:
                if fields != TRACE_HEADER:
                    raise ValueError(f"{where}: expected header {','.join(TRACE_HEADER)!r}, got {line!r}")
                header_seen = True
                continue
            if len(fields) != 3:
                raise ValueError(f"{where}: expected 3 fields (time_s,bandwidth_mbit,delay_ms), got {len(fields)}: {line!r}")
            try:
                values = [float(f) for f in fields]
            except ValueError:
                raise ValueError(f"{where}: fields must be numbers, got {line!r}") from None
            points.append(TracePoint(*values))
            _validate_points(points, source=where, last_only=True)
        if not header_seen:
            raise ValueError(f"{source}: empty trace (no header {','.join(TRACE_HEADER)!r})")
        if not points:
            raise ValueError(f"{source}: trace has a header but no rows")
        return cls(points, loop=loop)

    @property
    def points(self) -> tuple[TracePoint, ...]:
        return tuple(self._points)

    def at(self, t: float) -> TracePoint:
        """The row in force `t` seconds after the trace started (t < 0 counts as 0)."""
        t = max(0.0, t)
        if self.loop and self.period_s is not None:
            t = math.fmod(t, self.period_s)
        index = bisect.bisect_right(self._times, t) - 1
        return self._points[max(index, 0)]

    def bandwidth_bps(self, t: float) -> float:
        return self.at(t).bandwidth_mbit * 1e6

    def delay_s(self, t: float) -> float:
        return self.at(t).delay_ms / 1e3

    def __repr__(self) -> str:
        if len(self._points) == 1:
            p = self._points[0]
            return f"LinkTrace.fixed(bandwidth_mbit={p.bandwidth_mbit}, delay_ms={p.delay_ms})"
        return f"LinkTrace({len(self._points)} rows, period_s={self.period_s}, loop={self.loop})"


def _validate_points(points: Sequence[TracePoint], source: str, last_only: bool = False) -> None:
    if not points:
        raise ValueError(f"{source}: a trace needs at least one row")
    checked: Iterable[int] = [len(points) - 1] if last_only else range(len(points))
    for i in checked:
        p = points[i]
        where = source if last_only else f"{source} row {i}"
        if not all(math.isfinite(v) for v in (p.time_s, p.bandwidth_mbit, p.delay_ms)):
            raise ValueError(f"{where}: values must be finite numbers, got {p}")
        if i == 0 and p.time_s != 0:
            raise ValueError(f"{where}: the first row must have time_s 0, got {p.time_s}")
        if i > 0 and p.time_s <= points[i - 1].time_s:
            raise ValueError(f"{where}: time_s must increase strictly, got {p.time_s} after {points[i - 1].time_s}")
        if p.bandwidth_mbit <= 0:
            raise ValueError(f"{where}: bandwidth_mbit must be > 0, got {p.bandwidth_mbit}")
        if p.delay_ms < 0:
            raise ValueError(f"{where}: delay_ms must be >= 0, got {p.delay_ms}")


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    kind: str  # "reset" or "stall"
    at_s: float  # seconds after the emulator started
    duration_s: float = 0.0  # stall only


FAULT_KINDS = ("reset", "stall")


def parse_faults(text: str) -> tuple[Fault, ...]:
    """`reset@5,stall@8:3` -> a reset 5 s after start, a 3 s stall 8 s after start."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, at, rest = item.partition("@")
        if kind not in FAULT_KINDS or not at:
            raise ValueError(f"fault {item!r}: expected reset@SECONDS or stall@SECONDS:DURATION")
        at_text, _, duration_text = rest.partition(":")
        try:
            at_s = float(at_text)
            duration_s = float(duration_text) if duration_text else 0.0
        except ValueError:
            raise ValueError(f"fault {item!r}: times must be numbers") from None
        if not (math.isfinite(at_s) and at_s >= 0 and math.isfinite(duration_s) and duration_s >= 0):
            raise ValueError(f"fault {item!r}: times must be finite and >= 0")
        if kind == "stall" and duration_s <= 0:
            raise ValueError(f"fault {item!r}: a stall needs a duration (stall@SECONDS:DURATION)")
        faults.append(Fault(kind, at_s, duration_s))
    return tuple(sorted(faults, key=lambda f: f.at_s))


# --------------------------------------------------------------------------- shaping


class _LinkDirection:
    """The serializer of one direction of the link, shared by every connection using it."""

    def __init__(self, trace: LinkTrace, epoch: float, queue_s: float) -> None:
        self.trace = trace
        self.epoch = epoch
        self.queue_s = queue_s
        self.tx_end = epoch
        self.bytes_forwarded = 0
        self.stalled_until = 0.0  # monotonic time; no byte is admitted before it

    async def admit(self, size: int) -> float:
        """Reserve serializer time for `size` bytes; return the delivery time (monotonic)."""
        while True:
            now = time.monotonic()
            if now < self.stalled_until:
                await asyncio.sleep(self.stalled_until - now)
                continue
            backlog_s = self.tx_end - now
            if backlog_s <= self.queue_s:
                break
            # Time-based wait: it cannot deadlock on a stalled peer of another connection.
            await asyncio.sleep(backlog_s - self.queue_s)
        start = max(now, self.tx_end)
        self.tx_end = start + size * 8 / self.trace.bandwidth_bps(start - self.epoch)
        return self.tx_end + self.trace.delay_s(self.tx_end - self.epoch)

    def inflight_limit(self) -> int:
        """Per-connection bound on undelivered bytes: what the link can legitimately hold."""
        t = time.monotonic() - self.epoch
        point = self.trace.at(t)
        holding_s = self.queue_s + point.delay_ms / 1e3
        return int(point.bandwidth_mbit * 1e6 / 8 * holding_s) + 4 * SEGMENT_BYTES


class _End(enum.Enum):
    EOF = "eof"
    RESET = "reset"


@dataclass(slots=True)
class _Segment:
    deliver_at: float
    data: bytes | _End


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP RST (SO_LINGER 0), as a real reset would."""
    transport = writer.transport
    if transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    # Nagle on the proxy's own sockets would add delay the trace does not ask for.
    sock = writer.transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class _Pipe:
    """One direction of one proxied connection: `pump` reads and schedules, `deliver` writes."""

    def __init__(
        self,
        link: _LinkDirection,
        source: asyncio.StreamReader,
        source_writer: asyncio.StreamWriter,
        destination: asyncio.StreamWriter,
    ) -> None:
        self.link = link
        self.source = source
        self.source_writer = source_writer
        self.destination = destination
        self.queue: collections.deque[_Segment] = collections.deque()
        self.inflight = 0
        self.last_deliver_at = 0.0
        self.stopped = False
        self.delivered_eof = False
        self._has_segments = asyncio.Event()
        self._has_space = asyncio.Event()

    def _enqueue(self, deliver_at: float, data: bytes | _End) -> None:
        # In order on this connection even if the trace's delay drops.
        self.last_deliver_at = max(self.last_deliver_at, deliver_at)
        self.queue.append(_Segment(self.last_deliver_at, data))
        self._has_segments.set()

    def _enqueue_end(self, end: _End) -> None:
        now = time.monotonic()
        self._enqueue(now + self.link.trace.delay_s(now - self.link.epoch), end)

    async def pump(self) -> None:
        try:
            while not self.stopped:
                data = await self.source.read(READ_BYTES)
                if not data:
                    self._enqueue_end(_End.EOF)
                    return
                for offset in range(0, len(data), SEGMENT_BYTES):
                    segment = data if len(data) <= SEGMENT_BYTES else data[offset : offset + SEGMENT_BYTES]
                    while self.inflight >= self.link.inflight_limit() and not self.stopped:
                        self._has_space.clear()
                        await self._has_space.wait()
                    if self.stopped:
                        return
                    deliver_at = await self.link.admit(len(segment))
                    self.inflight += len(segment)
                    self._enqueue(deliver_at, segment)
        except (ConnectionError, OSError):
            self._enqueue_end(_End.RESET)

    async def deliver(self) -> None:
        try:
            while True:
                while not self.queue:
                    self._has_segments.clear()
                    await self._has_segments.wait()
                wait_s = self.queue[0].deliver_at - time.monotonic()
                if wait_s > TIMER_SLACK_S:
                    await asyncio.sleep(wait_s)
                    continue
                due_before = time.monotonic() + TIMER_SLACK_S
                batch: list[bytes] = []
                end: _End | None = None
                while self.queue and self.queue[0].deliver_at <= due_before:
                    data = self.queue.popleft().data
                    if isinstance(data, _End):
                        end = data
                        break
                    batch.append(data)
                if batch:
                    size = sum(len(b) for b in batch)
                    self.destination.writelines(batch)
                    await self.destination.drain()
                    self.link.bytes_forwarded += size
                    self.inflight -= size
                    self._has_space.set()
                if end is _End.EOF:
                    if self.destination.can_write_eof():
                        self.destination.write_eof()
                    self.delivered_eof = True
                    return
                if end is _End.RESET:
                    _abort_with_reset(self.destination)
                    return
        except (ConnectionError, OSError, RuntimeError):
            # The destination is gone: the sender learns by a reset, and reading stops.
            self.stopped = True
            self._has_space.set()
            _abort_with_reset(self.source_writer)


class LinkEmulator:
    """A TCP proxy from `listen_host:listen_port` to `target_host:target_port` shaped by `trace`.

    The trace clock starts at `start()`. Both directions use the same trace, each with its own
    serializer shared by all connections (one full-duplex link).
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        target_host: str,
        target_port: int,
        trace: LinkTrace,
        *,
        queue_ms: float = DEFAULT_QUEUE_MS,
    ) -> None:
        if queue_ms < 0:
            raise ValueError(f"queue_ms must be >= 0, got {queue_ms}")
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.trace = trace
        self.queue_s = queue_ms / 1e3
        self.connections_accepted = 0
        self._server: asyncio.Server | None = None
        self._bound_port: int | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._pipes: set[_Pipe] = set()
        self._connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._fault_task: asyncio.Task | None = None
        self.resets = 0
        self.stalls = 0
        self._closing = False
        self.epoch = time.monotonic()
        self._uplink = _LinkDirection(trace, self.epoch, self.queue_s)
        self._downlink = _LinkDirection(trace, self.epoch, self.queue_s)

    @property
    def bound_port(self) -> int:
        if self._bound_port is None:
            raise RuntimeError("LinkEmulator is not started")
        return self._bound_port

    @property
    def bytes_client_to_target(self) -> int:
        return self._uplink.bytes_forwarded

    @property
    def bytes_target_to_client(self) -> int:
        return self._downlink.bytes_forwarded

    @property
    def bytes_queued(self) -> int:
        """Bytes read from a source but not yet delivered, over all connections and directions."""
        return sum(pipe.inflight for pipe in self._pipes)

    @property
    def active_connections(self) -> int:
        return len(self._handlers)

    def trace_time(self) -> float:
        """Seconds on the trace clock (since `start()`)."""
        return time.monotonic() - self.epoch

    async def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("LinkEmulator already started")
        self.epoch = time.monotonic()
        self._uplink = _LinkDirection(self.trace, self.epoch, self.queue_s)
        self._downlink = _LinkDirection(self.trace, self.epoch, self.queue_s)
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        # A name resolving to several addresses binds several sockets; report the first.
        self._bound_port = self._server.sockets[0].getsockname()[1]
        log.info(
            "linkem %s:%d -> %s:%d trace=%r",
            self.listen_host, self._bound_port, self.target_host, self.target_port, self.trace,
        )
        return self._bound_port

    # ---------------------------------------------------------------- faults

    def reset_connections(self) -> int:
        """Abort every proxied connection with a TCP RST on both sides. Returns how many."""
        connections = list(self._connections)
        for client_writer, target_writer in connections:
            _abort_with_reset(client_writer)
            _abort_with_reset(target_writer)
        self.resets += 1
        log.warning("linkem: reset %d connections", len(connections))
        return len(connections)

    def stall(self, seconds: float) -> None:
        """Admit no byte in either direction for `seconds` (the link's bandwidth drops to zero)."""
        until = time.monotonic() + seconds
        for direction in (self._uplink, self._downlink):
            direction.stalled_until = max(direction.stalled_until, until)
        self.stalls += 1
        log.warning("linkem: stalled for %.1f s", seconds)

    def schedule_faults(self, faults: Sequence[Fault]) -> None:
        """Run `faults` at their times after `start()` (on the running loop)."""
        async def run() -> None:
            for fault in faults:
                await asyncio.sleep(max(0.0, self.epoch + fault.at_s - time.monotonic()))
                if fault.kind == "reset":
                    self.reset_connections()
                else:
                    self.stall(fault.duration_s)

        self._fault_task = asyncio.ensure_future(run())

    async def close(self) -> None:
        if self._fault_task is not None:
            self._fault_task.cancel()
        self._closing = True
        if self._server is not None:
            self._server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> LinkEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._closing:
            _abort_with_reset(client_writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections_accepted += 1
        target_writer: asyncio.StreamWriter | None = None
        pipes: tuple[_Pipe, ...] = ()
        try:
            try:
                target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError as exc:
                log.warning("linkem: cannot reach target %s:%d: %s", self.target_host, self.target_port, exc)
                _abort_with_reset(client_writer)
                return
            _set_nodelay(client_writer)
            _set_nodelay(target_writer)
            connection = (client_writer, target_writer)
            self._connections.add(connection)
            up = _Pipe(self._uplink, client_reader, client_writer, target_writer)
            down = _Pipe(self._downlink, target_reader, target_writer, client_writer)
            pipes = (up, down)
            self._pipes.update(pipes)
            results = await asyncio.gather(
                up.pump(), up.deliver(), down.pump(), down.deliver(), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    log.error("linkem: connection failed unexpectedly", exc_info=result)
            if up.delivered_eof and down.delivered_eof:
                # Both sides half-closed and all data delivered: an orderly close.
                for writer in (client_writer, target_writer):
                    writer.close()
                for writer in (client_writer, target_writer):
                    try:
                        await writer.wait_closed()
                    except (ConnectionError, OSError):
                        pass
        finally:
            self._handlers.discard(task)
            self._pipes.difference_update(pipes)
            if target_writer is not None:
                self._connections.discard((client_writer, target_writer))
            for writer in (client_writer, target_writer):
                if writer is not None and not writer.transport.is_closing():
                    writer.transport.abort()


# --------------------------------------------------------------------------- CLI


def build_parser() -> EnvDefaultsParser:
    parser = EnvDefaultsParser(
        prog="wanps linkem",
        allow_abbrev=False,  # flags are matched literally to tell them from env fallbacks
        description="User-space WAN link emulator: a TCP proxy adding delay and a bandwidth limit "
        "that follow a trace. Prints 'LISTENING HOST:PORT' once ready.",
    )
    parser.add_argument("--listen", env="WANPS_LINKEM_LISTEN", help="HOST:PORT to listen on (port 0 picks one)")
    parser.add_argument("--target", env="WANPS_LINKEM_TARGET", help="HOST:PORT to forward to")
    parser.add_argument("--trace", env="WANPS_LINKEM_TRACE", help="CSV trace file (time_s,bandwidth_mbit,delay_ms)")
    parser.add_argument("--bandwidth-mbit", env="WANPS_LINKEM_BANDWIDTH_MBIT", type=float, help="fixed link bandwidth, Mbit/s")
    parser.add_argument("--delay-ms", env="WANPS_LINKEM_DELAY_MS", type=float, help="fixed one-way delay, ms")
    parser.add_argument("--no-loop", action="store_true", help="play the trace once, then hold its last row")
    parser.add_argument("--queue-ms", env="WANPS_LINKEM_QUEUE_MS", type=float, default=DEFAULT_QUEUE_MS,
                        help="link queue (router buffer) in ms of transmit time")
    parser.add_argument("--faults", env="WANPS_LINKEM_FAULTS", default="",
                        help="fault schedule, seconds after start: 'reset@5,stall@8:3' (a reset at 5 s, "
                             "a 3 s stall at 8 s); SIGUSR1 also resets and SIGUSR2 stalls for --stall-s")
    parser.add_argument("--stall-s", env="WANPS_LINKEM_STALL_S", type=float, default=3.0,
                        help="length of a stall triggered by SIGUSR2")
    parser.add_argument("--log-level", env="WANPS_LOG_LEVEL", default="INFO")
    return parser


def _trace_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> LinkTrace:
    def on_command_line(*flags: str) -> bool:
        return any(arg == flag or arg.startswith(flag + "=") for arg in argv for flag in flags)

    # A flag beats the environment: a fixed link on the command line overrides a trace from
    # WANPS_LINKEM_TRACE, and --trace overrides WANPS_LINKEM_BANDWIDTH_MBIT/_DELAY_MS.
    trace_flag = on_command_line("--trace")
    fixed_flag = on_command_line("--bandwidth-mbit", "--delay-ms")
    if trace_flag and fixed_flag:
        parser.error("give either --trace or --bandwidth-mbit/--delay-ms, not both")
    trace_path = None if fixed_flag else args.trace
    if trace_path is not None and not trace_flag and (args.bandwidth_mbit is not None or args.delay_ms is not None):
        parser.error("both a trace and a fixed link are set (flags or WANPS_LINKEM_* variables); give one")
    if trace_path is not None:
        try:
            return LinkTrace.from_csv(trace_path, loop=not args.no_loop)
        except (OSError, ValueError) as exc:
            parser.error(f"bad --trace: {exc}")
    if args.bandwidth_mbit is None or args.delay_ms is None:
        parser.error("give --trace FILE, or both --bandwidth-mbit and --delay-ms")
    try:
        return LinkTrace.fixed(args.bandwidth_mbit, args.delay_ms)
    except ValueError as exc:
        parser.error(str(exc))
    raise AssertionError("unreachable")  # parser.error exits


def _format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _serve(listen: tuple[str, int], target: tuple[str, int], trace: LinkTrace, queue_ms: float,
                 faults: Sequence[Fault] = (), stall_s: float = 3.0) -> int:
    emulator = LinkEmulator(listen[0], listen[1], target[0], target[1], trace, queue_ms=queue_ms)
    try:
        port = await emulator.start()
    except OSError as exc:
        log.error("linkem: cannot listen on %s: %s", _format_host_port(*listen), exc)
        return 1
    if faults:
        emulator.schedule_faults(faults)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    for sig in signals[:2]:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, emulator.reset_connections)
    loop.add_signal_handler(signal.SIGUSR2, emulator.stall, stall_s)
    print(f"LISTENING {_format_host_port(listen[0], port)}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await emulator.close()
    log.info(
        "linkem stopped: %d connections, %d bytes client->target, %d bytes target->client",
        emulator.connections_accepted, emulator.bytes_client_to_target, emulator.bytes_target_to_client,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.listen is None or args.target is None:
        parser.error("--listen and --target are required")
    try:
        listen = split_host_port(args.listen)
        target = split_host_port(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    if args.queue_ms < 0:
        parser.error("--queue-ms must be >= 0")
    trace = _trace_from_args(parser, args, argv)
    try:
        faults = parse_faults(args.faults)
    except ValueError as exc:
        parser.error(f"bad --faults: {exc}")
    if not (math.isfinite(args.stall_s) and args.stall_s > 0):
        parser.error("--stall-s must be > 0")
    setup_logging(args.log_level)
    return run_async(_serve(listen, target, trace, args.queue_ms, faults, args.stall_s))


if __name__ == "__main__":
    sys.exit(main())
