"""`wanps bench soak`: many workers for many rounds on loopback; no deadlock, bounded memory.

A real `wanps server` process (with `--audit` and checkpoints) and N in-process workers, each
a `wanps.worker.Optimizer` with its own session (thread, event loop, gRPC channel) over a real
socket, training the synthetic task with tau 1 and delta 0.1 until a given round. The run is
bounded in time: past `--time-limit` it stops everything and reports a failure (a deadlock or
a stall shows up here). At the end it checks the invariants on the server's final checkpoint
(each round applied once, conservation, every replica equal to the model, accuracy) and
prints rounds/s and the peak RSS of the server and of the worker process, plus each one's
RSS after the first tenth of the run against its peak since (bounded memory: they stay close;
tests/test_soak.py holds the growth to the byte budgets the configuration sets).
"""
from __future__ import annotations

import os
import resource
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wanps.bench.report import write_json
from wanps.deploy.processes import start_process, wanps_command
from wanps.proto.codec import model_checksum
from wanps.rpc.config import EnvDefaultsParser, float_at_least, int_at_least
from wanps.server.checkpoint import read_checkpoint
from wanps.worker.optimizer import Optimizer, bind_to_flat
from wanps.worker.tasks import get_task


RSS_SAMPLE_S = 0.2  # how often the RSS of the server and of this process is read while training


@dataclass(frozen=True)
class SoakConfig:
    workers: int = 64
    rounds: int = 1000
    tau: int = 1
    delta: float = 0.1
    lr: float = 0.2
    batch_size: int = 32
    time_limit_s: float = 900.0
    target_accuracy: float = 0.8


@dataclass
class SoakResult:
    workers: int
    rounds: int
    join_seconds: float
    seconds: float
    rounds_per_s: float
    pushes_per_s: float
    server_peak_rss_mib: float
    server_rss_after_tenth_mib: float
    workers_peak_rss_mib: float
    # This process (the workers) after the first tenth of training, and the most sampled since.
    workers_rss_after_tenth_mib: float
    workers_rss_most_after_tenth_mib: float
    accuracy: float
    invariants: str  # "ok" or what failed
    recoveries: int


def _rss_mib(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_soak(config: SoakConfig, work_dir: Path) -> SoakResult:
    task = get_task("synthetic")
    task.data  # load once, before the workers start
    checkpoints = work_dir / "checkpoints"
    server = start_process("soak-server", wanps_command(
        "server", "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--min-workers", str(config.workers),
        "--tau-max", str(max(2, config.tau)), "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "100",
        "--audit", "--log-level", "WARNING"), work_dir / "logs")
    errors: list[BaseException] = []
    replicas: dict[int, tuple[int, torch.Tensor]] = {}
    recoveries = [0]
    stop = threading.Event()
    # Rounds/s counts from the moment every worker has joined and pulled the model.
    joined = threading.Barrier(config.workers + 1)
    try:
        server.wait_ready(120)

        def train(index: int) -> None:
            try:
                model = task.build_model(index)
                opt = Optimizer(model.parameters(), server=server.address, lr=config.lr, tau=config.tau,
                                delta=config.delta, name=f"soak-{index}", join_timeout_s=config.time_limit_s)
                try:
                    joined.wait(config.time_limit_s)
                    batches = task.batches(opt.rank, opt.world_size, config.batch_size, index)
                    while opt.round < config.rounds and not stop.is_set():
                        x, y = next(batches)
                        opt.zero_grad()
                        task.loss(model, x, y).backward()
                        opt.step()
                    opt.wait_for_version(config.rounds, timeout_s=config.time_limit_s)
                    replicas[index] = (opt.version, opt.replica.clone())
                    recoveries[0] += opt.session.recoveries
                finally:
                    opt.close()
            except BaseException as exc:  # reported below; the others are stopped
                errors.append(exc)
                stop.set()
                joined.abort()

        started = time.monotonic()
        threads = [threading.Thread(target=train, args=(i,), name=f"soak-worker-{i}", daemon=True)
                   for i in range(config.workers)]
        for thread in threads:
            thread.start()
        joined.wait(config.time_limit_s)
        join_seconds = time.monotonic() - started
        started = time.monotonic()
        # (seconds since start, server RSS MiB, this process's RSS MiB), every RSS_SAMPLE_S
        rss_samples: list[tuple[float, float, float]] = []
        deadline = started + config.time_limit_s
        while alive := [t for t in threads if t.is_alive()]:
            if time.monotonic() > deadline:
                stop.set()
                raise TimeoutError(f"soak did not finish {config.rounds} rounds within {config.time_limit_s:.0f} s "
                                   "(a deadlock or a stall)")
            rss_samples.append((time.monotonic() - started, _rss_mib(server.pid, "VmRSS"),
                                _rss_mib(os.getpid(), "VmRSS")))
            alive[0].join(RSS_SAMPLE_S)
        seconds = time.monotonic() - started
        after_tenth = [(server_rss, workers_rss) for t, server_rss, workers_rss in rss_samples if t >= seconds / 10]
        rss_after_tenth, workers_rss_after_tenth = after_tenth[0] if after_tenth else (0.0, 0.0)
        workers_rss_most = max((workers_rss for _, workers_rss in after_tenth), default=0.0)
        if errors:
            raise RuntimeError(f"{len(errors)} workers failed; first: {errors[0]!r}") from errors[0]
        server_peak = _rss_mib(server.pid, "VmHWM")
        server.stop()  # the final checkpoint
    finally:
        stop.set()
        server.stop()
    invariants = "ok"
    state = read_checkpoint(checkpoints)
    model, version, audit = state["model"], state["version"], state["audit"]
    try:
        assert audit["applied_rounds"] == list(range(version)), "a round was applied twice or skipped"
        assert version == config.rounds, f"server at version {version}"
        assert torch.allclose(audit["initial_model"].double() - audit["applied_sum"], model.double(), atol=1e-4), \
            "conservation broken"
        checksum = model_checksum(model)
        assert all(v == version and model_checksum(values) == checksum for v, values in replicas.values()), \
            "a replica differs from the server's model"
        assert len(replicas) == config.workers, "not every worker finished"
    except AssertionError as exc:
        invariants = str(exc)
    net = task.build_model(0)
    bind_to_flat(list(net.parameters())).copy_(model)
    accuracy = task.accuracy(net)
    if accuracy < config.target_accuracy and invariants == "ok":
        invariants = f"accuracy {accuracy:.3f} below {config.target_accuracy}"
    return SoakResult(
        workers=config.workers, rounds=version, join_seconds=join_seconds, seconds=seconds, rounds_per_s=version / seconds,
        pushes_per_s=version * config.workers / seconds, server_peak_rss_mib=server_peak,
        server_rss_after_tenth_mib=rss_after_tenth,
        workers_peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        workers_rss_after_tenth_mib=workers_rss_after_tenth, workers_rss_most_after_tenth_mib=workers_rss_most,
        accuracy=accuracy, invariants=invariants, recoveries=recoveries[0])


def print_soak(result: SoakResult) -> None:
    rows = [
        ("workers x rounds", f"{result.workers} x {result.rounds}"),
        ("joining (all workers)", f"{result.join_seconds:.1f} s"),
        ("training wall time", f"{result.seconds:.1f} s"),
        ("rounds/s", f"{result.rounds_per_s:.1f}"),
        ("pushes/s", f"{result.pushes_per_s:.0f}"),
        ("server peak RSS", f"{result.server_peak_rss_mib:.0f} MiB "
                            f"(RSS after a tenth of the run: {result.server_rss_after_tenth_mib:.0f} MiB)"),
        ("worker process peak RSS", f"{result.workers_peak_rss_mib:.0f} MiB ({result.workers} workers; "
                                    f"{result.workers_rss_after_tenth_mib:.0f} after a tenth, "
                                    f"{result.workers_rss_most_after_tenth_mib:.0f} at most since)"),
        ("final accuracy", f"{result.accuracy:.2%}"),
        ("recoveries", str(result.recoveries)),
        ("invariants", result.invariants),
    ]
    print("soak")
    for name, value in rows:
        print(f"  {name:<26}{value}")


def build_parser() -> EnvDefaultsParser:
    defaults = SoakConfig()
    parser = EnvDefaultsParser(prog="wanps bench soak", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int_at_least(1), default=defaults.workers)
    parser.add_argument("--rounds", type=int_at_least(1), default=defaults.rounds)
    parser.add_argument("--time-limit", type=float_at_least(0, above=True), default=defaults.time_limit_s,
                        help="Seconds before giving up.")
    parser.add_argument("--json", default="", help="Also write the figures here.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    config = SoakConfig(workers=args.workers, rounds=args.rounds, time_limit_s=args.time_limit)
    with tempfile.TemporaryDirectory(prefix="wanps-soak-") as work_dir:
        result = run_soak(config, Path(work_dir))
    print_soak(result)
    if args.json:
        write_json(args.json, result)
    return 0 if result.invariants == "ok" else 1
