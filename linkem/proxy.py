"""The link emulator's TCP proxy: `LinkEmulator`.

The kernel we run on has no netem, so tests, the demo and the benchmarks get their WAN from
this proxy: clients connect to it, it connects to the target, and every byte in each direction
goes through a model of one WAN link whose bandwidth and one-way delay follow a `LinkTrace`
(`wanps.linkem.trace`); the model of one direction is `wanps.linkem.shaper`.

Per connection and direction, a pump reads the source, cuts the data into segments and has
the link admit each one; a writer task delivers segments in order at their delivery times.
EOF (half-close) and resets travel the same path, in order, after the data.

Faults (for fault tests and drills, docs/operations.md): `reset_connections()` aborts every
proxied connection with a TCP RST on both sides; `stall(seconds)` lets no new byte onto the
link in either direction for that long (bytes already on the wire still arrive), i.e. the
bandwidth drops to zero; `schedule_faults` runs a schedule (`wanps.linkem.faults`). A link
that only slows down to near zero is a trace row with a tiny bandwidth.

Not modelled: packet loss, the TCP handshake RTT (the client's connect completes at once),
header overhead (the trace bandwidth is goodput).
"""
from __future__ import annotations

import asyncio
import collections
import enum
import logging
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from wanps.linkem.faults import Fault
from wanps.linkem.shaper import DEFAULT_QUEUE_MS, SEGMENT_BYTES, LinkDirection
from wanps.linkem.trace import LinkTrace

log = logging.getLogger(__name__)

# One read takes a few segments at once: fewer read calls, still a small bounded buffer.
READ_BYTES = 4 * SEGMENT_BYTES
# uvloop's timers have millisecond resolution (libuv's), so one fires up to a millisecond
# early or late; a segment this close to due goes out now instead of arming another
# sub-millisecond timer (which would spin).
TIMER_SLACK_S = 0.001


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
        link: LinkDirection,
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
        self.held_back = False  # the pump waits: this connection's undelivered bytes are at their bound
        self._has_segments = asyncio.Event()
        self._has_space = asyncio.Event()

    def _enqueue(self, deliver_at: float, data: bytes | _End) -> None:
        # In order on this connection even if the trace's delay drops.
        self.last_deliver_at = max(self.last_deliver_at, deliver_at)
        self.queue.append(_Segment(self.last_deliver_at, data))
        self._has_segments.set()

    def _enqueue_end(self, end: _End) -> None:
        self._enqueue(self.link.delivery_time(time.monotonic()), end)

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
                        self.held_back = True
                        await self._has_space.wait()
                    self.held_back = False
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

    The trace clock starts at `start()`. The uplink (client -> target) follows `trace`, the
    downlink (target -> client) `downlink_trace` when given (an asymmetric line: a consumer
    line or an egress-limited site), else the same trace. Each direction has its own
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
        downlink_trace: LinkTrace | None = None,
        queue_ms: float = DEFAULT_QUEUE_MS,
    ) -> None:
        if queue_ms < 0:
            raise ValueError(f"queue_ms must be >= 0, got {queue_ms}")
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.trace = trace
        self.downlink_trace = downlink_trace if downlink_trace is not None else trace
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
        self._uplink = LinkDirection(self.trace, self.epoch, self.queue_s)
        self._downlink = LinkDirection(self.downlink_trace, self.epoch, self.queue_s)

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
    def pipes_held_back(self) -> int:
        """Directions of connections that read no more: their undelivered bytes reached the bound."""
        return sum(pipe.held_back for pipe in self._pipes)

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
        self._uplink = LinkDirection(self.trace, self.epoch, self.queue_s)
        self._downlink = LinkDirection(self.downlink_trace, self.epoch, self.queue_s)
        self._server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port)
        # A name resolving to several addresses binds several sockets; report the first.
        self._bound_port = self._server.sockets[0].getsockname()[1]
        log.info(
            "linkem %s:%d -> %s:%d trace=%r downlink=%r",
            self.listen_host, self._bound_port, self.target_host, self.target_port, self.trace, self.downlink_trace,
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
