"""`wanps bench`: how fast the server ingests pushes, and how many bytes a push costs.

`wanps bench push`
    A real parameter server (10M float32 parameters by default) and a bare gRPC echo
    service run in this process, on one event loop. Client processes (spawned, each with
    one grpc.aio channel per simulated worker on a uvloop loop) join 8 workers, seed the
    model, then push sparse updates of 100K pairs for a number of rounds, concurrently,
    with the payload bytes encoded once up front. In the echo phases the same bytes, in the
    same chunking and with the same concurrency, go to the echo service, which only reads
    them and acknowledges. Echo and full phases alternate (after one untimed warm-up of
    each), so both see the same machine state. Reported: pairs/s accepted end to end,
    rounds/s, the CPU each side used, and full/echo.

`wanps bench wire`
    Bytes per pushed element: the PushMessage stream built exactly as
    `WorkerSession.push` builds it (header + `codec.iter_chunks` chunks) is serialized and
    counted, gRPC/HTTP/2 framing is estimated on top, and the real push (through a real
    `WorkerSession`) is routed through a byte-counting TCP proxy in front of a real server,
    which counts everything on the TCP stream (HTTP/2 frames, HPACK headers, flow control,
    pings).
"""
from __future__ import annotations

import asyncio
import collections
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from wanps.rpc.auth import aio_channel
from wanps.rpc.config import EnvDefaultsParser, run_async
from wanps.rpc.options import grpc_channel_options
from wanps.proto import codec
from wanps.proto.codec import fingerprint_of
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.server.cli import checksum_every
from wanps.server.service import ServerConfig, start_server

PUSH_METHOD = "/wanps.v1.ParameterServer/Push"
ECHO_SERVICE = "wanps.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Push"
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Payload bytes per element at fp32: a uint32 index and a float32 value.
PAYLOAD_BYTES_PER_ELEMENT = 8
# gRPC length-prefixed message: 1 byte compressed flag + 4 bytes length.
GRPC_PREFIX_BYTES = 5
# HTTP/2 frame header, and the default SETTINGS_MAX_FRAME_SIZE (RFC 9113 section 4.2). gRPC
# peers advertise larger frames, so an estimate with 16 KiB frames is an upper bound.
HTTP2_FRAME_HEADER_BYTES = 9
HTTP2_MAX_FRAME_BYTES = 16 * 1024
PHASE_TIMEOUT_S = 300.0


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        # Other processes compete for the same cores; the load says how much they did.
        "loadavg_1m": os.getloadavg()[0],
    }


def random_update(num_params: int, pairs: int, seed: int) -> codec.SparseUpdate:
    """`pairs` sorted unique indices below `num_params`, small finite float32 values."""
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(num_params, size=pairs, replace=False)).astype(np.int32)
    values = (rng.standard_normal(pairs, dtype=np.float32) * 1e-3).astype(np.float32)
    return codec.SparseUpdate(values=torch.from_numpy(values), indices=torch.from_numpy(indices))


def push_messages(header: pb.PushHeader, update: codec.SparseUpdate | None) -> list[pb.PushMessage]:
    """The message stream of one push, exactly as `WorkerSession.push` sends it."""
    return codec.push_messages(header, update)[0]


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


# =============================================================================== push


@dataclass(frozen=True)
class PushBenchConfig:
    params: int = 10_000_000
    clients: int = 8
    pairs: int = 100_000
    rounds: int = 30
    # The echo is ~10x faster: more rounds keep its timed phases from being a few hundred ms.
    echo_rounds: int = 150
    warmup_rounds: int = 2
    repeat: int = 3
    client_procs: int = 1
    inflight: int = 1
    # None: the server's automatic default (every ceil(params / 1M) rounds).
    checksum_every: int | None = None
    # torch intra-op threads in the server process, as `wanps server --torch-threads` (default 1).
    torch_threads: int = ServerConfig.torch_threads
    seed: int = 0


@dataclass(frozen=True)
class ClientSpec:
    """What one client process needs; pickled to it (spawned, so no gRPC state is forked)."""

    server_port: int
    echo_port: int
    clients: tuple[int, ...]  # global client numbers simulated by this process
    params: int
    pairs: int
    seed: int


@dataclass
class ClientTimes:
    started: float  # time.monotonic() of the first send (CLOCK_MONOTONIC: comparable across processes)
    finished: float  # of the last acknowledgement
    pushes: int
    duplicates: int


@dataclass
class PhaseResult:
    phase: str  # "echo" or "full"
    repeat: int  # 0 = warm-up
    rounds: int
    seconds: float
    pairs_per_s: float
    rounds_per_s: float
    payload_mb_per_s: float
    server_cpu_cores: float  # CPU seconds of this (server) process / wall seconds
    client_cpu_cores: float  # CPU seconds of all client processes / wall seconds
    duplicates: int = 0
    per_push_ms: float = 0.0  # wall time / pushes, per client (its cadence), averaged


async def _start_echo_server(max_message_bytes: int) -> tuple[grpc.aio.Server, int]:
    """A proto-less client-stream service: reads every message as raw bytes, replies a tiny ack."""
    ack = pb.PushReply(version=1).SerializeToString()  # same size as the real reply

    async def push(request_iterator: Any, context: grpc.aio.ServicerContext) -> bytes:
        async for _message in request_iterator:
            pass
        return ack

    # No (de)serializers: the handler gets and returns bytes as they are on the wire.
    handler = grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Push": grpc.stream_unary_rpc_method_handler(push)})
    server = grpc.aio.server(options=grpc_channel_options(max_message_bytes))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


# ------------------------------------------------------------------ client process


def _client_process(conn: Connection, spec: ClientSpec) -> None:
    """Entry point of a spawned client process; reports any failure over the pipe."""
    warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable")
    try:
        run_async(_client_main(conn, spec))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


async def _recv(conn: Connection) -> Any:
    return await asyncio.to_thread(conn.recv)


async def _client_main(conn: Connection, spec: ClientSpec) -> None:
    # Own subchannel pool: one TCP connection (one HTTP/2 flow-control window) per worker,
    # as with real workers, instead of grpc sharing one connection between the channels.
    options = [("grpc.use_local_subchannel_pool", 1)]
    server_channels = [aio_channel(f"127.0.0.1:{spec.server_port}", max_message_bytes=MAX_MESSAGE_BYTES, options=options)
                       for _ in spec.clients]
    echo_channels = [aio_channel(f"127.0.0.1:{spec.echo_port}", max_message_bytes=MAX_MESSAGE_BYTES, options=options)
                     for _ in spec.clients]
    try:
        # The payload is encoded once per client: the benchmark measures the server, not encoding.
        chunk_bytes = [
            [m.SerializeToString() for m in push_messages(pb.PushHeader(), random_update(spec.params, spec.pairs,
                                                                                          spec.seed + client))[1:]]
            for client in spec.clients
        ]
        worker_ids = []
        fingerprint = fingerprint_of([("bench", (spec.params,), "float32")])
        for client, channel in zip(spec.clients, server_channels):
            stub = pb_grpc.ParameterServerStub(channel)
            reply = await stub.Join(pb.JoinRequest(role=pb.ROLE_WORKER, num_params=spec.params,
                                                   model_fingerprint=fingerprint, name=f"bench-{client}"),
                                    wait_for_ready=True, timeout=30)
            worker_ids.append(reply.worker_id)
            if reply.must_seed:
                await _seed(stub, reply.worker_id, spec.params)
        conn.send(("ready", worker_ids))
        while True:
            command = await _recv(conn)
            if command[0] == "stop":
                return
            _, phase, first_round, rounds, inflight = command
            channels = server_channels if phase == "full" else echo_channels
            method = PUSH_METHOD if phase == "full" else ECHO_METHOD
            cpu_before = time.process_time()
            times = await asyncio.gather(*(
                _push_rounds(channel.stream_unary(method), worker_id, first_round, rounds, chunks, spec.pairs,
                             inflight)
                for channel, worker_id, chunks in zip(channels, worker_ids, chunk_bytes)
            ))
            conn.send(("done", [asdict(t) for t in times], time.process_time() - cpu_before))
    finally:
        for channel in (*server_channels, *echo_channels):
            await channel.close()


async def _seed(stub: pb_grpc.ParameterServerStub, worker_id: int, params: int) -> None:
    raw = torch.zeros(params, dtype=torch.float32).numpy().tobytes()
    chunks = [pb.ModelChunk(worker_id=worker_id, num_params=params, offset=offset, values=values)
              for offset, values in codec.iter_model_chunks(raw)]
    await stub.SeedModel(iter(chunks), timeout=60)


async def _push_rounds(call: grpc.aio.StreamUnaryMultiCallable, worker_id: int, first_round: int, rounds: int,
                       chunks: list[bytes], pairs: int, inflight: int) -> ClientTimes:
    """Push rounds first_round.. in order, at most `inflight` unacknowledged at a time."""
    headers = [
        pb.PushMessage(header=pb.PushHeader(worker_id=worker_id, round=r, computed_at_version=0,
                                            codec=pb.CODEC_SPARSE, value_dtype=pb.VALUE_DTYPE_FLOAT32,
                                            count=pairs)).SerializeToString()
        for r in range(first_round, first_round + rounds)
    ]
    window = asyncio.Semaphore(inflight)
    duplicates = 0

    async def one(header: bytes) -> None:
        nonlocal duplicates
        try:
            # Raw bytes both ways (no serializer): the stream is exactly the pre-encoded messages.
            reply = await call(iter([header, *chunks]), timeout=PHASE_TIMEOUT_S)
            duplicates += pb.PushReply.FromString(reply).duplicate
        finally:
            window.release()

    started = time.monotonic()
    tasks = []
    for header in headers:
        await window.acquire()
        tasks.append(asyncio.ensure_future(one(header)))
    await asyncio.gather(*tasks)
    return ClientTimes(started=started, finished=time.monotonic(), pushes=len(headers), duplicates=duplicates)


# ------------------------------------------------------------------ parent


class _ClientPool:
    """The spawned client processes and their pipes."""

    def __init__(self, specs: list[ClientSpec]) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for spec in specs:
            parent, child = context.Pipe()
            proc = context.Process(target=_client_process, args=(child, spec), name="wanps-bench-client", daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    async def gather(self, expected: str, timeout: float) -> list[tuple[Any, ...]]:
        replies = await asyncio.wait_for(asyncio.gather(*(_recv(c) for c in self.conns)), timeout)
        for reply in replies:
            if reply[0] == "error":
                raise RuntimeError(f"bench client failed:\n{reply[1]}")
            if reply[0] != expected:
                raise RuntimeError(f"bench client sent {reply[0]!r}, expected {expected!r}")
        return replies

    def send(self, message: tuple[Any, ...]) -> None:
        for conn in self.conns:
            conn.send(message)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self.conns:
            conn.close()


async def run_push_bench(config: PushBenchConfig) -> dict[str, Any]:
    threads_before = torch.get_num_threads()
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    try:
        return await _run_push_bench(config)
    finally:
        torch.set_num_threads(threads_before)


async def _run_push_bench(config: PushBenchConfig) -> dict[str, Any]:
    machine = machine_info()
    # tau_max covers every round pushed, so a client running ahead is never refused; the
    # history is short because nothing follows the update stream here.
    full_rounds = config.warmup_rounds + config.repeat * config.rounds
    server_config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, min_workers=config.clients,
                                 tau_max=full_rounds, checksum_every=config.checksum_every,
                                 history_rounds=4, max_message_bytes=MAX_MESSAGE_BYTES)
    server = await start_server(server_config)
    echo_server, echo_port = await _start_echo_server(MAX_MESSAGE_BYTES)
    procs = max(1, min(config.client_procs, config.clients))
    specs = [ClientSpec(server_port=server.port, echo_port=echo_port, clients=tuple(range(p, config.clients, procs)),
                        params=config.params, pairs=config.pairs, seed=config.seed) for p in range(procs)]
    pool = _ClientPool(specs)
    phases: list[PhaseResult] = []
    try:
        await pool.gather("ready", timeout=120)
        core = server.service.core
        if not core.started:
            raise RuntimeError("the server did not start after every client joined and the model was seeded")
        plan = [("echo", 0, config.warmup_rounds), ("full", 0, config.warmup_rounds)]
        for rep in range(1, config.repeat + 1):
            plan += [("echo", rep, config.echo_rounds), ("full", rep, config.rounds)]
        next_round = 0
        for phase, rep, rounds in plan:
            if rounds <= 0:
                continue
            cpu_before = time.process_time()
            pool.send(("phase", phase, next_round, rounds, config.inflight))
            replies = await pool.gather("done", timeout=PHASE_TIMEOUT_S)
            server_cpu = time.process_time() - cpu_before
            if phase == "full":
                next_round += rounds
                if core.version != next_round:
                    raise RuntimeError(f"after the full phase the server is at version {core.version}, "
                                       f"expected {next_round}")
            phases.append(_phase_result(phase, rep, rounds, config, replies, server_cpu))
    finally:
        pool.close()
        await echo_server.stop(0.5)
        await server.stop(0.5)
    return _push_summary(config, phases, machine)


def _phase_result(phase: str, rep: int, rounds: int, config: PushBenchConfig,
                  replies: list[tuple[Any, ...]], server_cpu: float) -> PhaseResult:
    times = [ClientTimes(**t) for reply in replies for t in reply[1]]
    client_cpu = sum(reply[2] for reply in replies)
    seconds = max(t.finished for t in times) - min(t.started for t in times)
    pairs = config.clients * rounds * config.pairs
    return PhaseResult(
        phase=phase,
        repeat=rep,
        rounds=rounds,
        seconds=seconds,
        pairs_per_s=pairs / seconds,
        rounds_per_s=rounds / seconds,
        payload_mb_per_s=pairs * PAYLOAD_BYTES_PER_ELEMENT / seconds / 1e6,
        server_cpu_cores=server_cpu / seconds,
        client_cpu_cores=client_cpu / seconds,
        duplicates=sum(t.duplicates for t in times),
        per_push_ms=statistics.mean((t.finished - t.started) / t.pushes for t in times) * 1e3,
    )


def _push_summary(config: PushBenchConfig, phases: list[PhaseResult], machine: dict[str, Any]) -> dict[str, Any]:
    timed = [p for p in phases if p.repeat > 0]

    def median(phase: str, key: str) -> float:
        return statistics.median(getattr(p, key) for p in timed if p.phase == phase)

    full, echo = median("full", "pairs_per_s"), median("echo", "pairs_per_s")
    ratio = full / echo
    return {
        "benchmark": "push",
        "config": asdict(config),
        "machine": machine,
        "phases": [asdict(p) for p in phases],
        "summary": {
            "full_pairs_per_s": full,
            "full_rounds_per_s": median("full", "rounds_per_s"),
            "echo_pairs_per_s": echo,
            "echo_rounds_per_s": median("echo", "rounds_per_s"),
            "ratio_full_over_echo": ratio,
            "target_ratio": 0.5,
            "target_met": ratio >= 0.5,
        },
    }


def print_push(result: dict[str, Any]) -> None:
    c, m, s = result["config"], result["machine"], result["summary"]
    print(f"wanps bench push: {c['clients']} clients x {c['pairs']:,} pairs, {c['rounds']} full / "
          f"{c['echo_rounds']} echo rounds (x{c['repeat']}, +{c['warmup_rounds']} warm-up), model {c['params']:,} "
          f"float32, {c['client_procs']} client process(es), {c['inflight']} push(es) in flight per client, "
          f"checksum every {'auto' if c['checksum_every'] is None else c['checksum_every']} round(s)")
    print(f"machine: {m['cpus']} CPUs ({m['cpus_usable']} usable), server and clients share them, "
          f"load {m['loadavg_1m']:.2f} before the run; python {m['python']}, grpcio {m['grpcio']}, "
          f"torch {m['torch']} ({m['torch_threads']} threads in the server)")
    rows = [
        (p["phase"], p["repeat"] or "warm-up", p["rounds"], f"{p['seconds']:.2f}", f"{p['rounds_per_s']:.2f}",
         f"{p['pairs_per_s'] / 1e6:.2f}", f"{p['payload_mb_per_s']:.0f}", f"{p['per_push_ms']:.1f}",
         f"{p['server_cpu_cores']:.2f}", f"{p['client_cpu_cores']:.2f}")
        for p in result["phases"]
    ]
    print(_table(("phase", "rep", "rounds", "seconds", "rounds/s", "Mpairs/s", "MB/s", "ms/push",
                  "server cpu", "client cpu"), rows))
    verdict = "MET" if s["target_met"] else "NOT MET"
    print(f"median: full {s['full_pairs_per_s'] / 1e6:.2f} M pairs/s ({s['full_rounds_per_s']:.2f} rounds/s), "
          f"echo {s['echo_pairs_per_s'] / 1e6:.2f} M pairs/s; full/echo = {s['ratio_full_over_echo']:.2f} "
          f"(target >= {s['target_ratio']:.2f}: {verdict})")


# =============================================================================== wire


@dataclass(frozen=True)
class WireBenchConfig:
    sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    params: int = 2_000_000
    pushes: int = 5
    socket: bool = True
    seed: int = 0


def serialized_push(count: int, params: int, seed: int) -> dict[str, Any]:
    """Serialized protobuf bytes of one push of `count` pairs, and estimated gRPC/HTTP/2 framing."""
    # Realistic varint widths for the header's ids and rounds.
    header = pb.PushHeader(worker_id=3, round=1_000, computed_at_version=999)
    messages = push_messages(header, random_update(params, count, seed))
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
                                             tau_max=1, history_rounds=2, max_message_bytes=MAX_MESSAGE_BYTES))
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
        version = server.service.core.version
        for count in config.sizes:
            update = random_update(config.params, count, config.seed)
            up, down = proxy.up.snapshot(), proxy.down.snapshot()
            for _ in range(config.pushes):
                reply = await asyncio.to_thread(lambda: session.push(version, version, update).result(60))
                if reply.duplicate:
                    raise RuntimeError(f"push of round {version} was taken for a duplicate")
                version = server.service.core.version  # one worker: each push closes its round
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
    print(_table(("elements", "msgs", "protobuf B", "pb B/elem", "pb ovh %", "est B/elem", "est ovh %",
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


# =============================================================================== CLI


def _push_parser() -> EnvDefaultsParser:
    d = PushBenchConfig()
    parser = EnvDefaultsParser(prog="wanps bench push", description="Push ingest: full server path vs bare gRPC echo.")
    parser.add_argument("--params", type=int, default=d.params, help="model size (float32 parameters)")
    parser.add_argument("--clients", type=int, default=d.clients, help="simulated workers (= min_workers)")
    parser.add_argument("--pairs", type=int, default=d.pairs, help="(index, value) pairs per push")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="timed rounds per full phase")
    parser.add_argument("--echo-rounds", type=int, default=d.echo_rounds, help="timed rounds per echo phase")
    parser.add_argument("--warmup-rounds", type=int, default=d.warmup_rounds, help="untimed rounds of each phase first")
    parser.add_argument("--repeat", type=int, default=d.repeat, help="timed (echo, full) phase pairs, alternating")
    parser.add_argument("--client-procs", type=int, default=d.client_procs, env="WANPS_BENCH_CLIENT_PROCS",
                        help="client processes the clients are spread over")
    parser.add_argument("--inflight", type=int, default=d.inflight, help="unacknowledged pushes per client")
    parser.add_argument("--checksum-every", type=checksum_every, default="auto",
                        help="server model CRC-32 every N rounds (0: never; auto: the server default)")
    parser.add_argument("--torch-threads", type=int, default=d.torch_threads,
                        help="torch intra-op threads in the server process (0: torch's default, one per core)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser


def _wire_parser() -> EnvDefaultsParser:
    d = WireBenchConfig()
    parser = EnvDefaultsParser(prog="wanps bench wire", description="Bytes on the wire per pushed element (fp32).")
    parser.add_argument("--sizes", default=",".join(str(s) for s in d.sizes), help="comma-separated pair counts")
    parser.add_argument("--params", type=int, default=d.params, help="model size of the server pushed to")
    parser.add_argument("--pushes", type=int, default=d.pushes, help="pushes per size through the counting proxy")
    parser.add_argument("--no-socket", action="store_true", help="skip the counting-proxy measurement")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser


USAGE = """usage: wanps bench {push,wire,estimate,train,compressors,algorithms,scrape,soak} [options]

  push      push ingest: pairs/s through the full server path vs a bare gRPC echo
  wire      bytes on the wire per pushed element, serialized and on a real socket
  estimate  link estimation accuracy through the link emulator (fixed link, step change)
  train     time to accuracy of DeCo against D-SGD and static baselines over emulated WANs
  compressors  exact vs sampled top-k vs random block: selection time and count
  algorithms   SASG rounds/bits to target, DEF vs EF at high compression, compressor speed
  scrape    the server's CPU per Prometheus scrape, as a fraction of a round's time
  soak      many workers x many rounds on loopback: rounds/s, peak RSS, invariants

`wanps bench push --help` shows a benchmark's options."""


def _main_push(argv: list[str]) -> int:
    args = _push_parser().parse_args(argv)
    config = PushBenchConfig(params=args.params, clients=args.clients, pairs=args.pairs, rounds=args.rounds,
                             echo_rounds=args.echo_rounds, warmup_rounds=args.warmup_rounds, repeat=args.repeat,
                             client_procs=args.client_procs, inflight=args.inflight,
                             checksum_every=args.checksum_every, torch_threads=args.torch_threads, seed=args.seed)
    counts = (config.params, config.clients, config.pairs, config.rounds, config.echo_rounds, config.repeat,
              config.inflight)
    if min(counts) < 1 or config.pairs > config.params:
        print("wanps bench push: sizes and counts must be >= 1, and --pairs <= --params", file=sys.stderr)
        return 2
    result = run_async(run_push_bench(config))
    print_push(result)
    _write_json(args.json, result)
    return 0


def _main_wire(argv: list[str]) -> int:
    args = _wire_parser().parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    if not sizes or min(sizes) < 1 or max(sizes) > args.params or args.pushes < 1:
        print("wanps bench wire: --sizes must list pair counts in [1, --params], --pushes >= 1", file=sys.stderr)
        return 2
    config = WireBenchConfig(sizes=sizes, params=args.params, pushes=args.pushes, socket=not args.no_socket,
                             seed=args.seed)
    result = run_async(run_wire_bench(config))
    print_wire(result)
    _write_json(args.json, result)
    return 0


def _main_estimate(argv: list[str]) -> int:
    from wanps.bench.estimate import main as estimate_main

    return estimate_main(argv)


def _main_compressors(argv: list[str]) -> int:
    from wanps.bench.compressors import main as compressors_main

    return compressors_main(argv)


def _main_algorithms(argv: list[str]) -> int:
    from wanps.bench.algorithms import main as algorithms_main

    return algorithms_main(argv)


def _main_scrape(argv: list[str]) -> int:
    from wanps.bench.scrape import main as scrape_main

    return scrape_main(argv)


def _main_soak(argv: list[str]) -> int:
    from wanps.bench.soak import main as soak_main

    return soak_main(argv)


def _main_train(argv: list[str]) -> int:
    from wanps.bench.train import main as train_main

    return train_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    # Zero-copy decoding views read-only bytes; torch warns about that once per process.
    warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable")
    commands = {"push": _main_push, "wire": _main_wire, "estimate": _main_estimate, "train": _main_train,
                "compressors": _main_compressors, "algorithms": _main_algorithms, "scrape": _main_scrape,
                "soak": _main_soak}
    if argv[0] not in commands:
        print(f"wanps bench: unknown benchmark {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
