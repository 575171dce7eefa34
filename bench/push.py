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

`--shards 1,2,4` adds the sharded ingest: for each N, N real `wanps server` processes
(deploy/processes.py), each owning a contiguous range of the flat model (the sharding
contract: shard i owns [floor(i*P/N), floor((i+1)*P/N))), and the same clients, each
splitting every push by range and pushing the parts to all shards at once (a round of a
client ends when every shard acknowledged its part). Reported per N: the aggregate pairs/s
over all shards, and each shard's CPU (utime + stime of its process, from /proc) per
million pairs it ingested: the cost of a pair on a shard, which must stay flat as shards
are added for ingest to scale as shards x the per-shard rate. The header prints the
machine's memory-copy and sort rates (bench/report.py), to read figures from other
machines against.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from wanps.bench.payload import PAYLOAD_BYTES_PER_ELEMENT, random_update
from wanps.bench.report import machine_info, machine_rates, rates_summary, text_table, write_json
from wanps.bench.scrape import process_cpu_seconds
from wanps.deploy.processes import ManagedProcess, start_process, stop_all, wanps_command
from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.proto.codec import fingerprint_of
from wanps.proto.shards import shard_range
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
    # Threads for a round's tensor work in the server, as `wanps server --core-threads`.
    core_threads: int = ServerConfig.core_threads
    seed: int = 0
    # Shard counts for the sharded-ingest rows (empty: none).
    shards: tuple[int, ...] = ()


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
    """Entry point of a spawned client process."""
    _run_reporting_failures(conn, lambda: _client_main(conn, spec))


def _run_reporting_failures(conn: Connection, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a client process's main coroutine; any failure goes to the parent over the pipe."""
    warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable")
    try:
        run_async(main())
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
        worker_ids, secrets = [], []
        fingerprint = fingerprint_of([("bench", (spec.params,), "float32")])
        for client, channel in zip(spec.clients, server_channels):
            stub = pb_grpc.ParameterServerStub(channel)
            reply = await stub.Join(pb.JoinRequest(role=pb.ROLE_WORKER, num_params=spec.params,
                                                   model_fingerprint=fingerprint, name=f"bench-{client}"),
                                    wait_for_ready=True, timeout=30)
            worker_ids.append(reply.worker_id)
            secrets.append(reply.member_secret)
            if reply.must_seed:
                await _seed(stub, reply.worker_id, reply.member_secret, spec.params)
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
                _push_rounds([_PushTarget(channel.stream_unary(method), worker_id, secret, chunks, spec.pairs)],
                             first_round, rounds, inflight)
                for channel, worker_id, secret, chunks in zip(channels, worker_ids, secrets, chunk_bytes)
            ))
            conn.send(("done", [asdict(t) for t in times], time.process_time() - cpu_before))
    finally:
        for channel in (*server_channels, *echo_channels):
            await channel.close()


async def _seed(stub: pb_grpc.ParameterServerStub, worker_id: int, secret: bytes, params: int) -> None:
    raw = torch.zeros(params, dtype=torch.float32).numpy().tobytes()
    chunks = [pb.ModelChunk(worker_id=worker_id, num_params=params, offset=offset, values=values,
                            member_secret=secret)
              for offset, values in codec.iter_model_chunks(raw)]
    await stub.SeedModel(iter(chunks), timeout=60)


@dataclass(frozen=True)
class _PushTarget:
    """Where one client's pushes of a round go: a server (or shard, or the echo) and what it gets."""

    call: grpc.aio.StreamUnaryMultiCallable
    worker_id: int
    secret: bytes  # the member secret its Join returned
    chunks: list[bytes]  # the pre-encoded chunk messages
    pairs: int


async def _push_rounds(targets: list[_PushTarget], first_round: int, rounds: int, inflight: int) -> ClientTimes:
    """Push rounds first_round.. in order, at most `inflight` unacknowledged at a time. A
    client's push of a round goes to every target at once (the shards' parts of it) and is
    done when every target acknowledged its part."""
    headers = [
        [pb.PushMessage(header=pb.PushHeader(worker_id=t.worker_id, round=r, computed_at_version=0,
                                             codec=pb.CODEC_SPARSE, value_dtype=pb.VALUE_DTYPE_FLOAT32,
                                             count=t.pairs, member_secret=t.secret)).SerializeToString() for t in targets]
        for r in range(first_round, first_round + rounds)
    ]
    window = asyncio.Semaphore(inflight)
    duplicates = 0

    async def part(target: _PushTarget, header: bytes) -> None:
        nonlocal duplicates
        # Raw bytes both ways (no serializer): the stream is exactly the pre-encoded messages.
        reply = await target.call(iter([header, *target.chunks]), timeout=PHASE_TIMEOUT_S)
        duplicates += pb.PushReply.FromString(reply).duplicate

    async def one(round_headers: list[bytes]) -> None:
        try:
            await asyncio.gather(*(part(t, h) for t, h in zip(targets, round_headers)))
        finally:
            window.release()

    started = time.monotonic()
    tasks = []
    for round_headers in headers:
        await window.acquire()
        tasks.append(asyncio.ensure_future(one(round_headers)))
    await asyncio.gather(*tasks)
    return ClientTimes(started=started, finished=time.monotonic(), pushes=len(headers), duplicates=duplicates)


# ------------------------------------------------------------------ shards


@dataclass(frozen=True)
class ShardTarget:
    """How the benchmark runs shard `index` of `count`: the one place that knows how a shard is
    started and addressed. Shard i is `wanps server --shard I/N` of a model of `total`
    parameters: it owns [start, stop), and pushes carry indices relative to `start`."""

    index: int
    count: int
    total: int
    start: int
    stop: int

    @property
    def server_flags(self) -> tuple[str, ...]:
        return ("--shard", f"{self.index}/{self.count}")

    @property
    def join_params(self) -> int:
        """The model size the shard's Join declares (and the shard's seed carries)."""
        return self.stop - self.start

    @property
    def index_offset(self) -> int:
        """Subtracted from the flat model's indices in this shard's pushes."""
        return self.start


def shard_targets(params: int, count: int) -> tuple[ShardTarget, ...]:
    return tuple(ShardTarget(i, count, params, *shard_range(params, i, count)) for i in range(count))


@dataclass(frozen=True)
class ShardClientSpec:
    """What one client process of the sharded rows needs (pickled to it)."""

    addresses: tuple[str, ...]  # shard i's address at position i
    targets: tuple[ShardTarget, ...]
    clients: tuple[int, ...]
    params: int
    pairs: int
    seed: int


def _shard_client_process(conn: Connection, spec: ShardClientSpec) -> None:
    _run_reporting_failures(conn, lambda: _shard_client_main(conn, spec))


def _split_by_shard(update: codec.Update, targets: tuple[ShardTarget, ...]) -> list[codec.Update]:
    """A push's pairs in each shard's range, with the shard's indices (as a sharded worker splits it)."""
    assert update.indices is not None
    bounds = np.searchsorted(update.indices.numpy(), [t.start for t in targets] + [targets[-1].stop]).tolist()
    return [codec.Update(values=update.values[lo:hi], indices=update.indices[lo:hi] - t.index_offset)
            for t, lo, hi in zip(targets, bounds, bounds[1:])]


async def _shard_client_main(conn: Connection, spec: ShardClientSpec) -> None:
    options = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per worker and shard
    channels = [[aio_channel(address, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES, options=options)
                 for address in spec.addresses] for _ in spec.clients]
    try:
        targets: list[list[_PushTarget]] = []
        shard_pairs = [0] * len(spec.targets)
        for client, client_channels in zip(spec.clients, channels):
            parts = _split_by_shard(random_update(spec.params, spec.pairs, spec.seed + client), spec.targets)
            client_targets = []
            for shard, (target, channel, part) in enumerate(zip(spec.targets, client_channels, parts)):
                stub = pb_grpc.ParameterServerStub(channel)
                fingerprint = fingerprint_of([("bench", (target.total,), "float32")])
                reply = await stub.Join(pb.JoinRequest(role=pb.ROLE_WORKER, num_params=target.join_params,
                                                       model_fingerprint=fingerprint, name=f"bench-{client}",
                                                       shard_index=target.index, shard_count=target.count,
                                                       total_params=target.total),
                                        wait_for_ready=True, timeout=30)
                if reply.must_seed:
                    await _seed(stub, reply.worker_id, reply.member_secret, target.join_params)
                chunks = [m.SerializeToString() for m in codec.push_messages(pb.PushHeader(), part)[0][1:]]
                client_targets.append(_PushTarget(channel.stream_unary(PUSH_METHOD), reply.worker_id, reply.member_secret, chunks,
                                                  part.count))
                shard_pairs[shard] += part.count
            targets.append(client_targets)
        conn.send(("ready", shard_pairs))
        while True:
            command = await _recv(conn)
            if command[0] == "stop":
                return
            _, _phase, first_round, rounds, inflight = command
            cpu_before = time.process_time()
            times = await asyncio.gather(*(_push_rounds(t, first_round, rounds, inflight) for t in targets))
            conn.send(("done", [asdict(t) for t in times], time.process_time() - cpu_before))
    finally:
        for client_channels in channels:
            for channel in client_channels:
                await channel.close()


@dataclass
class ShardPhase:
    repeat: int  # 0 = warm-up
    rounds: int
    seconds: float
    pairs_per_s: float  # all shards together
    server_cpu_cores: float  # all shard processes' CPU seconds / wall seconds
    client_cpu_cores: float
    shard_cpu_seconds: list[float] = field(default_factory=list)
    # Each shard's CPU seconds per million pairs it ingested in the phase.
    shard_core_s_per_mpairs: list[float] = field(default_factory=list)


@dataclass
class ShardRun:
    shards: int
    shard_pairs: list[int]  # pairs per round each shard receives (all clients)
    phases: list[ShardPhase] = field(default_factory=list)


async def _server_version(address: str) -> int:
    """A server's model version (rounds closed), from a Ping."""
    async with aio_channel(address) as channel:
        reply = await pb_grpc.ParameterServerStub(channel).Ping(pb.PingRequest(), timeout=30)
        return reply.version


def _shard_server_command(config: PushBenchConfig, target: ShardTarget, rounds: int) -> list[str]:
    every = "auto" if config.checksum_every is None else str(config.checksum_every)
    return wanps_command(
        "server", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--min-workers", str(config.clients),
        "--tau-max", str(rounds), "--history-rounds", "4", "--checksum-every", every,
        "--torch-threads", str(config.torch_threads), "--core-threads", str(config.core_threads),
        "--log-level", "WARNING", *target.server_flags)


async def run_shards(config: PushBenchConfig, count: int, log_dir: Path) -> ShardRun:
    """N shard processes, the clients pushing to all of them; warm-up then `repeat` timed phases."""
    targets = shard_targets(config.params, count)
    full_rounds = config.warmup_rounds + config.repeat * config.rounds
    servers: list[ManagedProcess] = []
    pool: _ClientPool | None = None
    try:
        for target in targets:  # all start at once, then each is waited for
            servers.append(start_process(f"push-shard-{target.index}-of-{count}",
                                         _shard_server_command(config, target, full_rounds), log_dir))
        for server in servers:
            await asyncio.to_thread(server.wait_ready, 120)
        procs = max(1, min(config.client_procs, config.clients))
        addresses = tuple(server.address for server in servers)
        specs = [ShardClientSpec(addresses=addresses, targets=targets, clients=tuple(range(p, config.clients, procs)),
                                 params=config.params, pairs=config.pairs, seed=config.seed) for p in range(procs)]
        pool = _ClientPool(specs, entry=_shard_client_process)
        ready = await pool.gather("ready", timeout=120)
        shard_pairs = [sum(reply[1][shard] for reply in ready) for shard in range(count)]
        run = ShardRun(shards=count, shard_pairs=shard_pairs)
        next_round = 0
        for rep, rounds in [(0, config.warmup_rounds), *((r, config.rounds) for r in range(1, config.repeat + 1))]:
            if rounds <= 0:
                continue
            cpu_before = [process_cpu_seconds(server.pid) for server in servers]
            pool.send(("phase", "full", next_round, rounds, config.inflight))
            replies = await pool.gather("done", timeout=PHASE_TIMEOUT_S)
            cpu = [process_cpu_seconds(server.pid) - before for server, before in zip(servers, cpu_before)]
            next_round += rounds
            versions = await asyncio.gather(*(_server_version(address) for address in addresses))
            if any(version != next_round for version in versions):
                raise RuntimeError(f"after the phase the shards are at versions {versions}, expected {next_round}")
            times = [ClientTimes(**t) for reply in replies for t in reply[1]]
            seconds = max(t.finished for t in times) - min(t.started for t in times)
            run.phases.append(ShardPhase(
                repeat=rep, rounds=rounds, seconds=seconds,
                pairs_per_s=sum(shard_pairs) * rounds / seconds,
                server_cpu_cores=sum(cpu) / seconds,
                client_cpu_cores=sum(reply[2] for reply in replies) / seconds,
                shard_cpu_seconds=cpu,
                shard_core_s_per_mpairs=[c / (p * rounds / 1e6) if p else 0.0 for c, p in zip(cpu, shard_pairs)],
            ))
        return run
    finally:
        if pool is not None:
            pool.close()
        stop_all(servers)


# ------------------------------------------------------------------ parent


class _ClientPool:
    """The spawned client processes and their pipes."""

    def __init__(self, specs: list[Any], entry: Any = None) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for spec in specs:
            parent, child = context.Pipe()
            proc = context.Process(target=entry or _client_process, args=(child, spec), name="wanps-bench-client",
                                   daemon=True)
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
    rates = machine_rates()
    # tau_max covers every round pushed, so a client running ahead is never refused; the
    # history is short because nothing follows the update stream here.
    full_rounds = config.warmup_rounds + config.repeat * config.rounds
    server_config = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, min_workers=config.clients,
                                 tau_max=full_rounds, checksum_every=config.checksum_every,
                                 history_rounds=4, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                                 core_threads=config.core_threads)
    server = await start_server(server_config)
    echo_server, echo_port = await _start_echo_server(DEFAULT_MAX_MESSAGE_BYTES)
    procs = max(1, min(config.client_procs, config.clients))
    specs = [ClientSpec(server_port=server.port, echo_port=echo_port, clients=tuple(range(p, config.clients, procs)),
                        params=config.params, pairs=config.pairs, seed=config.seed) for p in range(procs)]
    pool = _ClientPool(specs)
    phases: list[PhaseResult] = []
    try:
        await pool.gather("ready", timeout=120)
        if not server.service.view.started:
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
                if server.service.view.version != next_round:
                    raise RuntimeError(f"after the full phase the server is at version {server.service.view.version}, "
                                       f"expected {next_round}")
            phases.append(_phase_result(phase, rep, rounds, config, replies, server_cpu))
    finally:
        pool.close()
        await echo_server.stop(0.5)
        await server.stop(0.5)
    shard_runs = []
    if config.shards:
        with tempfile.TemporaryDirectory(prefix="wanps-bench-push-") as log_dir:
            for count in config.shards:
                shard_runs.append(await run_shards(config, count, Path(log_dir)))
    result = _push_summary(config, phases, machine)
    result["rates"] = rates
    result["shards"] = [_shard_summary(run) for run in shard_runs]
    return result


def _shard_summary(run: ShardRun) -> dict[str, Any]:
    timed = [p for p in run.phases if p.repeat > 0]
    per_shard = [statistics.median(p.shard_core_s_per_mpairs[i] for p in timed) for i in range(run.shards)]
    return {
        **asdict(run),
        "pairs_per_s": statistics.median(p.pairs_per_s for p in timed),
        "server_cpu_cores": statistics.median(p.server_cpu_cores for p in timed),
        "client_cpu_cores": statistics.median(p.client_cpu_cores for p in timed),
        # Median over the timed phases, per shard; and their mean: the cost of a pair on a shard.
        "shard_core_s_per_mpairs": per_shard,
        "core_s_per_mpairs": statistics.mean(per_shard),
    }


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
          f"torch {m['torch']} ({m['torch_threads']} threads in the server, {c['core_threads']} core thread(s))")
    if "rates" in result:
        print(f"machine rates: {rates_summary(result['rates'])}")
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
    if result.get("shards"):
        print_shards(result)


def print_shards(result: dict[str, Any]) -> None:
    c = result["config"]
    print(f"\nsharded ingest: {c['clients']} clients x {c['pairs']:,} pairs split by range over N `wanps server` "
          f"processes, {c['rounds']} rounds x{c['repeat']} (+{c['warmup_rounds']} warm-up) per N, medians of the "
          f"timed phases; core-s/Mpair = a shard process's CPU seconds per million pairs it ingested")
    rows = []
    for run in result["shards"]:
        per_shard = run["shard_core_s_per_mpairs"]
        rows.append((run["shards"], f"{run['pairs_per_s'] / 1e6:.2f}",
                     f"{run['pairs_per_s'] / run['shards'] / 1e6:.2f}", f"{run['server_cpu_cores']:.2f}",
                     f"{run['client_cpu_cores']:.2f}", f"{run['core_s_per_mpairs']:.3f}",
                     " ".join(f"{x:.3f}" for x in per_shard),
                     f"{1 / run['core_s_per_mpairs']:.1f}" if run["core_s_per_mpairs"] else "-"))
    print(text_table(("shards", "Mpairs/s", "per shard", "server cpu", "client cpu", "core-s/Mpair",
                      "each shard", "Mpairs per core-s"), rows))


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
    parser.add_argument("--core-threads", type=int, choices=(1, 2), default=d.core_threads,
                        help="threads for a round's aggregate, apply and checksum in the server(s), "
                             "as `wanps server --core-threads`")
    parser.add_argument("--shards", type=shard_counts, default=d.shards, metavar="N[,N...]",
                        help="also measure sharded ingest with N shard processes, for each N (e.g. 1,2,4)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser


def shard_counts(text: str | tuple[int, ...]) -> tuple[int, ...]:
    """`1,2,4` -> (1, 2, 4); every count >= 1."""
    if isinstance(text, tuple):
        return text
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard counts like 1,2,4, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"shard counts >= 1, got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = PushBenchConfig(params=args.params, clients=args.clients, pairs=args.pairs, rounds=args.rounds,
                             echo_rounds=args.echo_rounds, warmup_rounds=args.warmup_rounds, repeat=args.repeat,
                             client_procs=args.client_procs, inflight=args.inflight,
                             checksum_every=args.checksum_every, torch_threads=args.torch_threads,
                             core_threads=args.core_threads, seed=args.seed, shards=args.shards)
    counts = (config.params, config.clients, config.pairs, config.rounds, config.echo_rounds, config.repeat,
              config.inflight)
    if min(counts) < 1 or config.pairs > config.params:
        print("wanps bench push: sizes and counts must be >= 1, and --pairs <= --params", file=sys.stderr)
        return 2
    if config.shards and max(config.shards) > config.params:
        print("wanps bench push: --shards must not exceed --params (every shard owns at least one element)",
              file=sys.stderr)
        return 2
    result = run_async(run_push_bench(config))
    print_push(result)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
