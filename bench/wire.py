"""`wanps bench wire`: how many bytes a pushed element costs on the wire.

The PushMessage stream built exactly as `WorkerSession.push` builds it (header +
`codec.iter_chunks` chunks) is serialized and counted, gRPC/HTTP/2 framing is estimated on
top, and the real push (through a real `WorkerSession`) is routed through a byte-counting
TCP proxy in front of a real server, which counts everything on the TCP stream (HTTP/2
frames, HPACK headers, flow control, pings).
"""
from __future__ import annotations

import asyncio
import collections
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from wanps.bench.payload import PAYLOAD_BYTES_PER_ELEMENT, random_update
from wanps.bench.report import machine_info, text_table, write_json
from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.proto.codec import fingerprint_of
from wanps.rpc.config import EnvDefaultsParser, run_async
from wanps.rpc.member_secrets import MEMBER_SECRET_BYTES
from wanps.rpc.options import DEFAULT_MAX_MESSAGE_BYTES
from wanps.server.service import ServerConfig, start_server

# gRPC length-prefixed message: 1 byte compressed flag + 4 bytes length.
GRPC_PREFIX_BYTES = 5
# HTTP/2 frame header, and the default SETTINGS_MAX_FRAME_SIZE (RFC 9113 section 4.2). gRPC
# peers advertise larger frames, so an estimate with 16 KiB frames is an upper bound.
HTTP2_FRAME_HEADER_BYTES = 9
HTTP2_MAX_FRAME_BYTES = 16 * 1024


@dataclass(frozen=True)
class WireBenchConfig:
    sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    params: int = 2_000_000
    pushes: int = 5
    socket: bool = True
    seed: int = 0


def serialized_push(count: int, params: int, seed: int) -> dict[str, Any]:
    """Serialized protobuf bytes of one push of `count` pairs, and estimated gRPC/HTTP/2 framing."""
    # Realistic varint widths for the header's ids and rounds, and the member secret every push carries.
    header = pb.PushHeader(worker_id=3, round=1_000, computed_at_version=999,
                           member_secret=bytes(MEMBER_SECRET_BYTES))
    messages, _ = codec.push_messages(header, random_update(params, count, seed))
    sizes = [len(m.SerializeToString()) for m in messages]
    payload = count * PAYLOAD_BYTES_PER_ELEMENT
    grpc_prefix = GRPC_PREFIX_BYTES * len(messages)
    # Each length-prefixed message split into DATA frames of at most 16 KiB (an upper bound:
    # grpc may pack small messages into one frame, and may use larger frames if the peer allows).
    frames = sum(math.ceil((GRPC_PREFIX_BYTES + size) / HTTP2_MAX_FRAME_BYTES) for size in sizes)
    estimated = sum(sizes) + grpc_prefix + frames * HTTP2_FRAME_HEADER_BYTES
    return {
        "elements": count,
        "messages": len(messages),
        "payload_bytes": payload,
        "protobuf_bytes": sum(sizes),
        "protobuf_bytes_per_element": sum(sizes) / count,
        "protobuf_overhead_pct": 100 * (sum(sizes) - payload) / payload,
        "data_frames": frames,
        "estimated_stream_bytes": estimated,
        "estimated_bytes_per_element": estimated / count,
        "estimated_overhead_pct": 100 * (estimated - payload) / payload,
    }


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_FRAME_TYPES = {0: "DATA", 1: "HEADERS", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY",
                     8: "WINDOW_UPDATE"}


@dataclass
class Http2Tally:
    """What crossed one direction of the proxied connections: bytes, and HTTP/2 frames by type."""

    bytes: int = 0
    frames: collections.Counter = field(default_factory=collections.Counter)  # type name -> frames
    frame_bytes: collections.Counter = field(default_factory=collections.Counter)  # type -> bytes incl. header
    max_data_frame: int = 0  # largest DATA frame payload seen

    def snapshot(self) -> Http2Tally:
        return Http2Tally(self.bytes, collections.Counter(self.frames), collections.Counter(self.frame_bytes),
                          self.max_data_frame)


class _Http2FrameParser:
    """Splits one direction's byte stream into HTTP/2 frames (per frame, never per byte)."""

    def __init__(self, tally: Http2Tally, client_side: bool) -> None:
        self.tally = tally
        self._skip = len(HTTP2_PREFACE) if client_side else 0  # the client starts with the preface
        self._header = b""
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        self.tally.bytes += len(data)
        view, i = memoryview(data), 0
        while i < len(view):
            if self._skip or self._remaining:
                step = min(self._skip or self._remaining, len(view) - i)
                if self._skip:
                    self._skip -= step
                else:
                    self._remaining -= step
                i += step
                continue
            take = bytes(view[i : i + HTTP2_FRAME_HEADER_BYTES - len(self._header)])
            self._header += take
            i += len(take)
            if len(self._header) == HTTP2_FRAME_HEADER_BYTES:
                length, kind = int.from_bytes(self._header[:3], "big"), self._header[3]
                name = HTTP2_FRAME_TYPES.get(kind, f"type{kind}")
                self.tally.frames[name] += 1
                self.tally.frame_bytes[name] += HTTP2_FRAME_HEADER_BYTES + length
                if kind == 0:
                    self.tally.max_data_frame = max(self.tally.max_data_frame, length)
                self._remaining, self._header = length, b""


class CountingProxy:
    """A TCP proxy that counts what it forwards in each direction, by HTTP/2 frame type."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = Http2Tally()  # client -> server
        self.down = Http2Tally()  # server -> client
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        pumps = [
            asyncio.ensure_future(self._pump(client_reader, server_writer, _Http2FrameParser(self.up, True))),
            asyncio.ensure_future(self._pump(server_reader, client_writer, _Http2FrameParser(self.down, False))),
        ]
        self._tasks.update(pumps)
        await asyncio.gather(*pumps, return_exceptions=True)
        self._tasks.difference_update(pumps)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    parser: _Http2FrameParser) -> None:
        try:
            while data := await reader.read(256 * 1024):
                parser.feed(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def measure_socket_bytes(config: WireBenchConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Push each size `pushes` times through a real WorkerSession -> counting proxy -> real server.

    Returns one row per size (bytes per push, by direction and HTTP/2 frame type) and facts
    about the connection (how many were opened, the largest DATA frame seen).
    """
    from wanps.worker.session import WorkerSession  # its own I/O thread; only needed here

    server = await start_server(ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, min_workers=1,
                                             tau_max=1, history_rounds=2, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES))
    proxy = CountingProxy(server.port)
    proxy_port = await proxy.start()
    # WorkerSession's methods block on its own loop: call them from a thread so this loop,
    # which runs the server and the proxy, keeps serving.
    session = await asyncio.to_thread(WorkerSession, f"127.0.0.1:{proxy_port}")
    rows = []
    try:
        fingerprint = fingerprint_of([("bench", (config.params,), "float32")])
        await asyncio.to_thread(session.join, config.params, fingerprint, "wire-bench")
        await asyncio.to_thread(session.seed, torch.zeros(config.params))
        version = server.service.view.version
        for count in config.sizes:
            update = random_update(config.params, count, config.seed)
            up, down = proxy.up.snapshot(), proxy.down.snapshot()
            for _ in range(config.pushes):
                reply = await asyncio.to_thread(lambda: session.push(version, version, update).result(60))
                if reply.duplicate:
                    raise RuntimeError(f"push of round {version} was taken for a duplicate")
                version = server.service.view.version  # one worker: each push closes its round
            await asyncio.sleep(0.2)  # let trailing acks / window updates of the last push arrive
            payload = count * PAYLOAD_BYTES_PER_ELEMENT
            up_per_push = (proxy.up.bytes - up.bytes) / config.pushes
            rows.append({
                "elements": count,
                "socket_up_bytes_per_push": up_per_push,
                "socket_up_bytes_per_element": up_per_push / count,
                "socket_up_overhead_pct": 100 * (up_per_push - payload) / payload,
                "socket_down_bytes_per_push": (proxy.down.bytes - down.bytes) / config.pushes,
                "socket_up_frames_per_push": _per_push(proxy.up.frames - up.frames, config.pushes),
                "socket_up_frame_bytes_per_push": _per_push(proxy.up.frame_bytes - up.frame_bytes, config.pushes),
                "socket_down_frames_per_push": _per_push(proxy.down.frames - down.frames, config.pushes),
            })
    finally:
        await asyncio.to_thread(session.close)
        await proxy.stop()
        await server.stop(0.5)
    connection = {
        "connections": proxy.connections,
        "max_data_frame_up": proxy.up.max_data_frame,
        "max_data_frame_down": proxy.down.max_data_frame,
    }
    return rows, connection


def _per_push(counts: collections.Counter, pushes: int) -> dict[str, float]:
    return {name: n / pushes for name, n in sorted(counts.items())}


async def run_wire_bench(config: WireBenchConfig) -> dict[str, Any]:
    machine = machine_info()
    if max(config.sizes) > config.params:
        raise ValueError(f"--params {config.params} must be >= the largest size {max(config.sizes)}")
    rows = [serialized_push(count, config.params, config.seed) for count in config.sizes]
    connection: dict[str, Any] = {}
    if config.socket:
        measured, connection = await measure_socket_bytes(config)
        for row, extra in zip(rows, measured):
            row.update(extra)
    worst = max(r.get("socket_up_overhead_pct", r["estimated_overhead_pct"]) for r in rows)
    worst_payload = max(r["protobuf_bytes_per_element"] for r in rows)
    return {
        "benchmark": "wire",
        "config": asdict(config),
        "machine": machine,
        "assumptions": {
            "grpc_prefix_bytes_per_message": GRPC_PREFIX_BYTES,
            "http2_frame_header_bytes": HTTP2_FRAME_HEADER_BYTES,
            "http2_max_frame_bytes_assumed": HTTP2_MAX_FRAME_BYTES,
            "estimate_excludes": "HEADERS/trailers, WINDOW_UPDATE, PING, TCP/IP headers",
            "socket_counts": "all bytes on the TCP stream client->server (HTTP/2 frames incl. HEADERS, "
                             "flow control, pings); excludes TCP/IP headers",
            "chunk_elements": codec.CHUNK_ELEMENTS,
        },
        "connection": connection,
        "sizes": rows,
        "summary": {
            "max_protobuf_bytes_per_element": worst_payload,
            "max_overhead_pct": worst,
            "overhead_measured_on": "socket" if config.socket else "estimate",
            "target_bytes_per_element": PAYLOAD_BYTES_PER_ELEMENT,
            "target_overhead_pct": 3.0,
            "target_met": worst <= 3.0,
        },
    }


def print_wire(result: dict[str, Any]) -> None:
    c = result["config"]
    print(f"wanps bench wire: fp32 sparse pushes as WorkerSession.push builds them "
          f"({codec.CHUNK_ELEMENTS:,} elements per chunk); socket bytes averaged over {c['pushes']} pushes per size")
    rows = []
    for r in result["sizes"]:
        socket: tuple[str, ...] = ("-", "-", "-", "-")
        if "socket_up_bytes_per_push" in r:
            frames = " ".join(f"{name}:{n:g}" for name, n in r["socket_up_frames_per_push"].items())
            socket = (f"{r['socket_up_bytes_per_element']:.4f}", f"{r['socket_up_overhead_pct']:.2f}", frames,
                      f"{r['socket_down_bytes_per_push']:.0f}")
        rows.append((f"{r['elements']:,}", r["messages"], f"{r['protobuf_bytes']:,}",
                     f"{r['protobuf_bytes_per_element']:.4f}", f"{r['protobuf_overhead_pct']:.3f}",
                     f"{r['estimated_bytes_per_element']:.4f}", f"{r['estimated_overhead_pct']:.2f}", *socket))
    print(text_table(("elements", "msgs", "protobuf B", "pb B/elem", "pb ovh %", "est B/elem", "est ovh %",
                      "socket B/elem", "socket ovh %", "up frames/push", "down B/push"), rows))
    print(f"est = protobuf + {GRPC_PREFIX_BYTES} B gRPC prefix per message + {HTTP2_FRAME_HEADER_BYTES} B per HTTP/2 "
          f"DATA frame of <= {HTTP2_MAX_FRAME_BYTES // 1024} KiB; socket = every byte client->server on the TCP "
          f"stream (HEADERS, DATA, flow control), no TCP/IP headers")
    conn = result["connection"]
    if conn:
        print(f"socket: {conn['connections']} TCP connection(s); largest DATA frame seen: "
              f"{conn['max_data_frame_up']:,} B up, {conn['max_data_frame_down']:,} B down")
    s = result["summary"]
    verdict = "MET" if s["target_met"] else "NOT MET"
    print(f"payload {s['target_bytes_per_element']} B/element (uint32 index + float32 value); worst overhead "
          f"({s['overhead_measured_on']}) {s['max_overhead_pct']:.2f}% (target <= {s['target_overhead_pct']:.0f}%: "
          f"{verdict}); worst protobuf size {s['max_protobuf_bytes_per_element']:.4f} B/element")


def build_parser() -> EnvDefaultsParser:
    d = WireBenchConfig()
    parser = EnvDefaultsParser(prog="wanps bench wire", description="Bytes on the wire per pushed element (fp32).")
    parser.add_argument("--sizes", default=",".join(str(s) for s in d.sizes), help="comma-separated pair counts")
    parser.add_argument("--params", type=int, default=d.params, help="model size of the server pushed to")
    parser.add_argument("--pushes", type=int, default=d.pushes, help="pushes per size through the counting proxy")
    parser.add_argument("--no-socket", action="store_true", help="skip the counting-proxy measurement")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    if not sizes or min(sizes) < 1 or max(sizes) > args.params or args.pushes < 1:
        print("wanps bench wire: --sizes must list pair counts in [1, --params], --pushes >= 1", file=sys.stderr)
        return 2
    config = WireBenchConfig(sizes=sizes, params=args.params, pushes=args.pushes, socket=not args.no_socket,
                             seed=args.seed)
    result = run_async(run_wire_bench(config))
    print_wire(result)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
