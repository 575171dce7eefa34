"""`wanps bench scrape`: what serving /metrics costs the parameter server, per round.

A real `wanps server` process (metrics on a free port) gets real traffic first, so its
registry holds what a running cluster's does: W workers join, one seeds a model of d
parameters, and every worker pushes a sparse update of delta*d elements for R rounds
(plus a refused push, a ping, a health check and a model pull each, so the gRPC metrics
have the methods and status codes a cluster shows). Then, with no traffic, this process
scrapes the server's /metrics N times and reads the server process's CPU time from
/proc before and after (minus its idle CPU over as long a quiet period): the server's CPU
per scrape, whichever thread (HTTP handler, exposition) spent it.

A scrape every I seconds costs the server cpu_per_scrape / I of its time, whatever the
round time: rounds of T seconds see T / I scrapes each, which cost (T / I) * cpu_per_scrape,
the same fraction of T. Reported for I = 1 s (the tests' interval) and 15 s (Prometheus's
default), against the target of 1%. A single round that a scrape lands in shares the CPU
with up to cpu_per_scrape of scrape work; that is shown against the round time measured here.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wanps.bench.payload import random_update
from wanps.bench.report import load_summary, machine_info, text_table, write_json
from wanps.deploy.processes import ManagedProcess, start_process, wanps_command
from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.proto.codec import fingerprint_of
from wanps.rpc.config import EnvDefaultsParser, fraction, int_at_least

INTERVALS_S = (1.0, 15.0)
TARGET_FRACTION = 0.01


def build_parser() -> EnvDefaultsParser:
    parser = EnvDefaultsParser(prog="wanps bench scrape", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int_at_least(1), default=8, help="Simulated workers W.")
    parser.add_argument("--params", type=int_at_least(1), default=1_000_000, help="Model parameters d.")
    parser.add_argument("--delta", type=fraction, default=0.01, help="Elements per push / d.")
    parser.add_argument("--rounds", type=int_at_least(1), default=100, help="Rounds R of traffic before scraping.")
    parser.add_argument("--scrapes", type=int_at_least(1), default=300, help="Scrapes N measured.")
    parser.add_argument("--json", default="", help="Also write the results to this file.")
    return parser


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive_traffic(address: str, workers: int, params: int, delta: float, rounds: int) -> float:
    """Real traffic through every kind of call; returns the median round time (seconds)."""
    fingerprint = fingerprint_of([("w", (params,), "torch.float32")])
    k = max(1, int(delta * params))
    generator = np.random.default_rng(0)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        joined = [stub.Join(pb.JoinRequest(role=pb.ROLE_WORKER, num_params=params, model_fingerprint=fingerprint),
                            timeout=30) for _ in range(workers)]
        ids = [reply.worker_id for reply in joined]
        secret = {reply.worker_id: reply.member_secret for reply in joined}  # every call naming a worker carries it
        raw = torch.zeros(params).numpy().tobytes()
        stub.SeedModel(iter([pb.ModelChunk(worker_id=ids[0], num_params=params, offset=o, values=v,
                                           member_secret=secret[ids[0]])
                             for o, v in codec.iter_model_chunks(raw)]), timeout=60)
        # One update per worker, encoded once: scraping cost does not depend on the values.
        updates = [random_update(params, k, generator) for _ in ids]
        round_times = []
        for round_ in range(rounds):
            started = time.perf_counter()
            for worker_id, update in zip(ids, updates):
                header = pb.PushHeader(worker_id=worker_id, round=round_, computed_at_version=round_,
                                       member_secret=secret[worker_id])
                messages, _ = codec.push_messages(header, update)
                stub.Push(iter(messages), timeout=30)
            round_times.append(time.perf_counter() - started)
        for worker_id in ids:  # the calls and codes a running cluster also shows
            stub.Ping(pb.PingRequest(worker_id=worker_id, member_secret=secret[worker_id]), timeout=10)
            try:
                stub.Push(iter([pb.PushMessage(header=pb.PushHeader(worker_id=worker_id, round=0,
                                                                    member_secret=secret[worker_id]))]),
                          timeout=10)
            except grpc.RpcError:
                pass  # refused: the round is long closed (FAILED_PRECONDITION), which is the point
            for _ in stub.PullModel(pb.PullModelRequest(worker_id=worker_id, member_secret=secret[worker_id]),
                                    timeout=60):
                pass
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return statistics.median(round_times)


def measure_scrapes(server: ManagedProcess, scrapes: int) -> dict:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read()  # warm-up, and the size
    latencies = []
    cpu_before = process_cpu_seconds(server.pid)
    started = time.perf_counter()
    for _ in range(scrapes):
        one = time.perf_counter()
        urllib.request.urlopen(url, timeout=10).read()
        latencies.append(time.perf_counter() - one)
    wall = time.perf_counter() - started
    cpu = process_cpu_seconds(server.pid) - cpu_before
    # The server's own idle CPU, over a quiet period (a measurement window, not a wait).
    quiet = min(max(wall, 1.0), 5.0)
    idle_before = process_cpu_seconds(server.pid)
    time.sleep(quiet)
    idle_cpu_rate = (process_cpu_seconds(server.pid) - idle_before) / quiet
    cpu_per_scrape = max(0.0, cpu - idle_cpu_rate * wall) / scrapes
    samples = [line for line in body.decode().splitlines() if line and not line.startswith("#")]
    return {
        "exposition_bytes": len(body),
        "samples": len(samples),
        "scrapes": scrapes,
        "latency_ms_median": 1000 * statistics.median(latencies),
        "latency_ms_p95": 1000 * sorted(latencies)[int(0.95 * (len(latencies) - 1))],
        "server_cpu_ms_per_scrape": 1000 * cpu_per_scrape,
        "server_idle_cpu_fraction": idle_cpu_rate,
    }


def summarize(scrape: dict, round_s: float) -> list[dict]:
    cpu_s = scrape["server_cpu_ms_per_scrape"] / 1000
    return [{"interval_s": interval, "scrapes_per_round": round_s / interval,
             "server_cpu_ms_per_round": 1000 * cpu_s * round_s / interval,
             "fraction_of_round": cpu_s / interval, "target_met": cpu_s / interval < TARGET_FRACTION}
            for interval in INTERVALS_S]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wanps-bench-scrape-") as logs:
        server = start_process("server", wanps_command(
            "server", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
            "--min-workers", str(args.workers), "--log-level", "WARNING"), Path(logs))
        try:
            server.wait_ready(120)
            round_s = drive_traffic(server.address, args.workers, args.params, args.delta, args.rounds)
            scrape = measure_scrapes(server, args.scrapes)
        finally:
            server.stop()
    rows = summarize(scrape, round_s)
    machine = machine_info()
    print(f"server registry after {args.rounds} rounds of {args.workers} workers (d {args.params:,}, "
          f"delta {args.delta:g}): {scrape['samples']} samples, {scrape['exposition_bytes']:,} bytes")
    print(f"scrape latency median {scrape['latency_ms_median']:.2f} ms, p95 {scrape['latency_ms_p95']:.2f} ms; "
          f"server CPU per scrape {scrape['server_cpu_ms_per_scrape']:.2f} ms "
          f"(idle CPU {100 * scrape['server_idle_cpu_fraction']:.2f}% subtracted)")
    print(f"round time here (loopback, sequential pushes) {1000 * round_s:.1f} ms; a round a scrape lands in "
          f"shares the server's CPU with {scrape['server_cpu_ms_per_scrape']:.2f} ms of scrape work "
          f"(at most {100 * scrape['server_cpu_ms_per_scrape'] / 1000 / round_s:.1f}% longer)")
    target = f"target < {TARGET_FRACTION:.0%}"
    print(text_table(("interval", "scrapes/round", "server CPU/round", "of round time", target),
                     [(f"{row['interval_s']:.0f}s", f"{row['scrapes_per_round']:.4f}",
                       f"{row['server_cpu_ms_per_round']:.4f} ms", f"{100 * row['fraction_of_round']:.3f}%",
                       "met" if row["target_met"] else "NOT met") for row in rows]))
    print(load_summary(machine))
    if args.json:
        write_json(args.json, {"benchmark": "scrape", "config": vars(args), "round_s": round_s, "scrape": scrape,
                               "intervals": rows, "machine": machine})
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
