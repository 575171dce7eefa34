"""`wanps bench push`: how fast the server ingests pushes, against a bare gRPC echo.

A real parameter server (10M float32 parameters by default) and a bare gRPC echo
service run in this process, on one event loop. Client processes (spawned, each with
one grpc.aio channel per simulated worker on a uvloop loop) join 8 workers, seed the
model, then push sparse updates of 100K pairs for a number of rounds, concurrently,
with the payload bytes encoded once up front. In the echo phases the same bytes, in the
same chunking and with the same concurrency, go to the echo service, which only reads
them and acknowledges. Echo and full phases alternate (after one untimed warm-up of
each), so both see the same machine state. Reported: pairs/s accepted end to end,
rounds/s, the CPU each side used, and full/echo.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc
import torch

from wanps.bench.payload import PAYLOAD_BYTES_PER_ELEMENT, random_update
from wanps.bench.report import machine_info, text_table, write_json
from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.proto.codec import fingerprint_of
from wanps.rpc.auth import aio_channel
from wanps.rpc.config import EnvDefaultsParser, run_async
from wanps.rpc.options import DEFAULT_MAX_MESSAGE_BYTES, grpc_channel_options
from wanps.server.cli import checksum_every
from wanps.server.service import ServerConfig, start_server

PUSH_METHOD = "/wanps.v1.ParameterServer/Push"
ECHO_SERVICE = "wanps.bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Push"
PHASE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class PushBenchConfig:
    params: int = 10_000_000
    clients: int = 8
    pairs: int = 100_000
    rounds: int = 30
    # The echo runs rounds much faster than the full path (docs/benchmarks.md): more rounds
    # keep its timed phases long enough to time.
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
    server_channels = [aio_channel(f"127.0.0.1:{spec.server_port}", max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                                   options=options)
                       for _ in spec.clients]
    echo_channels = [aio_channel(f"127.0.0.1:{spec.echo_port}", max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                                   options=options)
                     for _ in spec.clients]
    try:
        # The payload is encoded once per client: the benchmark measures the server, not encoding.
        # The chunks are those `WorkerSession.push` sends; each round gets its own header below.
        chunk_bytes = [
            [m.SerializeToString() for m in codec.push_messages(
                pb.PushHeader(), random_update(spec.params, spec.pairs, spec.seed + client))[0][1:]]
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
                proc.terminate()  # by PID: the client processes this benchmark started
                proc.join(5)
            if proc.is_alive():
                print(f"bench client {proc.pid} ignored SIGTERM: killing it", file=sys.stderr)
                proc.kill()
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
                                 history_rounds=4, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)
    server = await start_server(server_config)
    echo_server, echo_port = await _start_echo_server(DEFAULT_MAX_MESSAGE_BYTES)
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
          f"load {m['loadavg'][0]:.2f} before the run; python {m['python']}, grpcio {m['grpcio']}, "
          f"torch {m['torch']} ({m['torch_threads']} threads in the server)")
    rows = [
        (p["phase"], p["repeat"] or "warm-up", p["rounds"], f"{p['seconds']:.2f}", f"{p['rounds_per_s']:.2f}",
         f"{p['pairs_per_s'] / 1e6:.2f}", f"{p['payload_mb_per_s']:.0f}", f"{p['per_push_ms']:.1f}",
         f"{p['server_cpu_cores']:.2f}", f"{p['client_cpu_cores']:.2f}")
        for p in result["phases"]
    ]
    print(text_table(("phase", "rep", "rounds", "seconds", "rounds/s", "Mpairs/s", "MB/s", "ms/push",
                      "server cpu", "client cpu"), rows))
    verdict = "MET" if s["target_met"] else "NOT MET"
    print(f"median: full {s['full_pairs_per_s'] / 1e6:.2f} M pairs/s ({s['full_rounds_per_s']:.2f} rounds/s), "
          f"echo {s['echo_pairs_per_s'] / 1e6:.2f} M pairs/s; full/echo = {s['ratio_full_over_echo']:.2f} "
          f"(target >= {s['target_ratio']:.2f}: {verdict})")


def build_parser() -> EnvDefaultsParser:
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
                        help="server model checksum every N rounds (0: never; auto: the server default)")
    parser.add_argument("--torch-threads", type=int, default=d.torch_threads,
                        help="torch intra-op threads in the server process (0: torch's default, one per core)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
