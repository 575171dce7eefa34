"""`wanps bench scale`: the system's overhead at real model sizes (10M and 124M parameters).

For each (parameters, workers, delta): a real `wanps server` process (deploy/processes.py,
default settings but --min-workers) and N in-process workers, each a real
`wanps.worker.Optimizer` (own session, thread, gRPC channel; sampled top-k with error
feedback, tau 0) over loopback, pushing random gradients (the point is the system's
overhead, not model compute: the gradients are views into one shared random pool, so
producing them costs nothing). Reported per row:

- join: the wall time from starting the workers' `Optimizer` constructors (all at once)
  until every one has returned: joined, the first has seeded the model, all have pulled it;
  within it `seed` (the first worker's upload) and `pull` (the slowest download, from the
  later of its start and the seed's end);
- the worker's step, per worker and step, split into `select` (the compressor), `encode`
  (the push's wire messages), `push wait` (blocked until the round closed and its delta
  arrived, minus applying it), `apply` (applying deltas, with the CRC check when one is
  due) and `other` (gathering the gradient, error feedback, taking the selected values),
  plus the step's CPU time (thread CPU, which CPU sharing between the in-process workers
  does not inflate);
- the server: mean round time (between closures, from its metrics), CPU per round, peak
  RSS (VmHWM from /proc), RSS after every worker left;
- the memory-traffic floor of the machine, measured in the same run (a large float32
  copy, one thread), and the worker's step CPU against the floor of bytes a step must
  touch: 16 d + 20 k + 16 u bytes (d parameters, k pushed pairs, u pairs in the applied
  delta): read g and e and write e (12 d), read p = lr g + e once to select (4 d), take
  and zero the k selected values and write their 8-byte pairs (20 k), apply the round's
  delta (read its 8 u bytes, read and write u model entries: 16 u).

    wanps bench scale                          # 10M and 124M x 2, 4 workers x delta 0.001, 0.01, 0.1
    wanps bench scale --params 10M             # a subset
    wanps bench scale --quick                  # CI size: 1M parameters, 2 workers, delta 0.01
"""
from __future__ import annotations

import gc
import os
import re
import shlex
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from wanps.bench.report import copy_bandwidth, load_summary, machine_info, text_table, write_json
from wanps.deploy.processes import ManagedProcess, start_process, wanps_command
from wanps.worker.error_feedback import elements_for
from wanps.worker.optimizer import Optimizer
from wanps.worker.session import WorkerSession
from wanps.rpc.config import EnvDefaultsParser, int_at_least

DEFAULT_PARAMS = (10_000_000, 124_000_000)
DEFAULT_WORKERS = (2, 4)
DEFAULT_DELTAS = (0.001, 0.01, 0.1)
# Offsets into the shared gradient pool: each worker and step reads a different window.
POOL_SLACK = 4099
STEP_PARTS = ("select", "encode", "push_wait", "apply", "other")


@dataclass(frozen=True)
class ScaleConfig:
    params: tuple[int, ...] = DEFAULT_PARAMS
    workers: tuple[int, ...] = DEFAULT_WORKERS
    deltas: tuple[float, ...] = DEFAULT_DELTAS
    rounds: int = 50
    warmup_rounds: int = 2
    compressor: str = "topk-sampled"
    lr: float = 0.1
    time_limit_s: float = 1800.0
    server_flags: tuple[str, ...] = ()  # more `wanps server` flags (the defaults otherwise)


@dataclass
class Row:
    params: int
    workers: int
    delta: float
    rounds: int
    pushed_pairs: int  # k per push
    join_seconds: float  # all workers joined, seeded, pulled
    seed_seconds: float  # the first worker's SeedModel call
    pull_seconds: float  # the slowest pull, from the later of its start and the seed's end
    step_seconds: float  # wall, per worker and step
    step_cpu_seconds: float
    split_seconds: dict[str, float]  # per worker and step
    server_round_seconds: float
    server_cpu_per_round_seconds: float
    server_peak_rss_mib: float
    server_rss_after_leave_mib: float
    server_rss_before_join_mib: float
    delta_elements: float  # union size of the last round
    floor_seconds: float = 0.0  # the step's memory-traffic floor at the measured bandwidth
    cpu_over_floor: float = 0.0


@dataclass
class ScaleResult:
    benchmark: str
    config: dict[str, Any]
    machine: dict[str, Any]
    copy_gb_per_s: float
    rows: list[Row] = field(default_factory=list)


# ---------------------------------------------------------------------------- the floor


def floor_bytes(d: int, k: int, u: float) -> float:
    """The bytes a step must touch (module docstring): 16 d + 20 k + 16 u."""
    return 16 * d + 20 * k + 16 * u


# ---------------------------------------------------------------------------- the server


def _status_mib(pid: int, field_name: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^(wanps_server_[a-z_]+)\s+([-+0-9.eEinfa]+)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------- the workers


class StepTimer:
    """Per-part wall times of one worker's steps, by wrapping the optimizer's own methods
    on the instance (the code that runs is the library's; a part that a future layout of
    the optimizer no longer has is reported as 0 and lands in `other`)."""

    def __init__(self, opt: Optimizer) -> None:
        self.totals = dict.fromkeys(STEP_PARTS, 0.0)
        self.recording = False
        self._wrapped: list[tuple[Any, str]] = []
        self._in_wait = False
        self._apply_in_wait = 0.0
        compressor = getattr(getattr(getattr(opt, "rule", None), "ef", None), "compressor", None)
        if compressor is not None:
            self._wrap(compressor, "select", "select")
        self._wrap(opt.session, "log_push", "encode")
        replica = getattr(opt, "_replica", None)
        if replica is not None:
            self._wrap(replica, "apply", "apply")
        if hasattr(opt, "_wait_until_fresh"):
            self._wrap(opt, "_wait_until_fresh", "push_wait")

    def _wrap(self, owner: Any, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.recording:
                return original(*args, **kwargs)
            waiting = part == "push_wait"
            if waiting:
                self._in_wait, self._apply_in_wait = True, 0.0
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - started
                if waiting:
                    self._in_wait = False
                    seconds -= self._apply_in_wait  # applying is its own part
                elif part == "apply" and self._in_wait:
                    self._apply_in_wait += seconds
                self.totals[part] += seconds

        setattr(owner, name, timed)
        self._wrapped.append((owner, name))

    def unwrap(self) -> None:
        """Remove the wrappers: each one closes a reference cycle (the owner holds the wrapper,
        which holds the owner's bound method), which would keep a model-sized worker alive
        until the cyclic garbage collector happens to run."""
        for owner, name in self._wrapped:
            delattr(owner, name)
        self._wrapped.clear()


class SessionCalls:
    """Start and end of every WorkerSession.seed and .pull in this process while active (the
    class's methods, wrapped for the join phase of a row: the workers' sessions are created
    inside their Optimizer constructors)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = {"seed": [], "pull": []}
        self._lock = threading.Lock()
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> SessionCalls:
        for name in self.calls:
            original = self._originals[name] = getattr(WorkerSession, name)

            def timed(session: WorkerSession, *args: Any, _original: Any = original, _name: str = name,
                      **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return _original(session, *args, **kwargs)
                finally:
                    with self._lock:
                        self.calls[_name].append((started, time.perf_counter()))

            setattr(WorkerSession, name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(WorkerSession, name, original)

    def seed_seconds(self) -> float:
        return sum(end - start for start, end in self.calls["seed"])

    def pull_seconds(self) -> float:
        """The slowest pull, counted from the later of its start and the end of the seed
        (a pull waits for the seed and for every worker to join: that is not its own time)."""
        seeded = max((end for _, end in self.calls["seed"]), default=0.0)
        return max((end - max(start, seeded) for start, end in self.calls["pull"]), default=0.0)


def _build_pool(d: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(d + POOL_SLACK, generator=generator).mul_(1e-2)


def run_row(config: ScaleConfig, d: int, n: int, delta: float, pool: torch.Tensor, work_dir: Path,
            bandwidth: float) -> Row:
    server = start_process(f"scale-server-{d}-{n}-{delta}", wanps_command(
        "server", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--min-workers", str(n),
        "--log-level", "WARNING", *config.server_flags), work_dir / "logs")
    try:
        server.wait_ready(120)
        metrics_port = server.metrics_port
        assert metrics_port is not None
        return _run_row(config, server, metrics_port, d, n, delta, pool, bandwidth)
    finally:
        server.stop()


def _run_row(config: ScaleConfig, server: ManagedProcess, metrics_port: int, d: int, n: int, delta: float,
             pool: torch.Tensor, bandwidth: float) -> Row:
    rss_before = _status_mib(server.pid, "VmRSS")
    total_rounds = config.warmup_rounds + config.rounds
    timers: list[StepTimer | None] = [None] * n
    cpu = [0.0] * n
    wall = [0.0] * n
    errors: list[BaseException] = []
    prepared = threading.Barrier(n + 1)
    joined = threading.Barrier(n + 1)
    measuring = threading.Barrier(n + 1)
    finished = threading.Barrier(n + 1)

    def work(index: int) -> None:
        opt = None
        try:
            # The seeder's initial model is random, the others' zero (replaced by the pull anyway).
            param = torch.nn.Parameter(pool[:d].clone() if index == 0 else torch.zeros(d))
            prepared.wait(config.time_limit_s)
            opt = Optimizer([param], server=server.address, lr=config.lr, tau=0, delta=delta,
                            compressor=config.compressor, name=f"scale-{index}", join_timeout_s=config.time_limit_s)
            timers[index] = timer = StepTimer(opt)
            joined.wait(config.time_limit_s)
            for step in range(total_rounds):
                if step == config.warmup_rounds:
                    measuring.wait(config.time_limit_s)
                    timer.recording = True
                    cpu_started, wall_started = time.thread_time(), time.perf_counter()
                offset = (index * 1031 + step * 577) % POOL_SLACK
                param.grad = pool[offset : offset + d]
                opt.step()
            cpu[index] = time.thread_time() - cpu_started
            wall[index] = time.perf_counter() - wall_started
            timer.recording = False
            # Every round pushed is applied here too, so the rounds counted are closed rounds.
            opt.wait_for_version(total_rounds, timeout_s=config.time_limit_s)
            finished.wait(config.time_limit_s)
        except BaseException as exc:
            errors.append(exc)
            for barrier in (prepared, joined, measuring, finished):
                barrier.abort()
        finally:
            if timers[index] is not None:
                timers[index].unwrap()
            if opt is not None:
                opt.close()

    threads = [threading.Thread(target=work, args=(i,), name=f"scale-worker-{i}", daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    try:
        with SessionCalls() as session_calls:
            prepared.wait(config.time_limit_s)
            started = time.perf_counter()
            joined.wait(config.time_limit_s)
            join_seconds = time.perf_counter() - started
        measuring.wait(config.time_limit_s)
        before = _scrape(metrics_port)
        cpu_before = _cpu_seconds(server.pid)
        finished.wait(config.time_limit_s)
        after = _scrape(metrics_port)
        cpu_after = _cpu_seconds(server.pid)
    except threading.BrokenBarrierError:
        for thread in threads:
            thread.join(60)
        stuck = sum(thread.is_alive() for thread in threads)
        raise RuntimeError((f"a worker failed: {errors[0]!r}" if errors else "a worker failed")
                           + (f"; {stuck} still running after 60 s" if stuck else "")) from (
            errors[0] if errors else None)
    for thread in threads:
        thread.join(config.time_limit_s)
    if errors:
        raise RuntimeError(f"a worker failed: {errors[0]!r}") from errors[0]
    if stuck := [thread.name for thread in threads if thread.is_alive()]:
        raise RuntimeError(f"{', '.join(stuck)} still running after the time limit ({config.time_limit_s:.0f} s)")
    peak = _status_mib(server.pid, "VmHWM")
    # Every worker left: the server drops its history and hands freed memory back (members 0).
    _wait_for(lambda: _scrape(metrics_port).get("wanps_server_members", 1) == 0 and
              _scrape(metrics_port).get("wanps_server_history_bytes", 1) == 0, 60, "the server to see every worker leave")
    rss_after = min(_rss_settled(server.pid))
    rounds = config.rounds
    closed = after.get("wanps_server_rounds_closed_total", 0) - before.get("wanps_server_rounds_closed_total", 0)
    round_sum = (after.get("wanps_server_round_duration_seconds_sum", 0)
                 - before.get("wanps_server_round_duration_seconds_sum", 0))
    round_count = (after.get("wanps_server_round_duration_seconds_count", 0)
                   - before.get("wanps_server_round_duration_seconds_count", 0))
    steps = n * rounds
    split = {part: sum(t.totals[part] for t in timers if t is not None) / steps for part in STEP_PARTS}
    step_wall = sum(wall) / steps
    split["other"] = max(0.0, step_wall - sum(split[p] for p in STEP_PARTS if p != "other"))
    k = elements_for(delta, d)
    union = after.get("wanps_server_delta_elements", 0.0)
    floor_s = floor_bytes(d, k, union) / (bandwidth * 1e9)
    step_cpu = sum(cpu) / steps
    return Row(params=d, workers=n, delta=delta, rounds=int(closed), pushed_pairs=k, join_seconds=join_seconds,
               seed_seconds=session_calls.seed_seconds(), pull_seconds=session_calls.pull_seconds(),
               step_seconds=step_wall, step_cpu_seconds=step_cpu, split_seconds=split,
               server_round_seconds=round_sum / max(1.0, round_count),
               server_cpu_per_round_seconds=(cpu_after - cpu_before) / max(1.0, closed),
               server_peak_rss_mib=peak, server_rss_after_leave_mib=rss_after, server_rss_before_join_mib=rss_before,
               delta_elements=union, floor_seconds=floor_s, cpu_over_floor=step_cpu / floor_s if floor_s else 0.0)


def _rss_settled(pid: int, samples: int = 10) -> list[float]:
    """A few RSS samples 0.1 s apart (the release runs right after the last leave)."""
    values = []
    for _ in range(samples):
        values.append(_status_mib(pid, "VmRSS"))
        time.sleep(0.1)
    return values


# ---------------------------------------------------------------------------- one step, alone


def profile_step(d: int, delta: float, workers: int, compressor: str, steps: int = 5) -> dict[str, float]:
    """The worker's step parts on one thread with no server and no contention (ms per step):
    the same library calls an Optimizer step makes (gradient copy, UpdateRule.update with its
    compressor's select timed apart, codec.push_messages, codec.apply_delta of a delta the
    size of `workers` pushes' union), and the CRC a replica computes when one is due."""
    from wanps.proto import codec
    from wanps.proto import wanps_pb2 as pb
    from wanps.worker.update_rule import UpdateConfig, UpdateRule

    torch.set_num_threads(1)
    pool = _build_pool(d)
    rule = UpdateRule(d, UpdateConfig(compressor=compressor))
    totals = dict.fromkeys(("gather", "select", "error feedback", "encode", "apply", "checksum (when due)"), 0.0)
    select = rule.ef.compressor.select

    def timed_select(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return select(*args, **kwargs)
        finally:
            totals["select"] += time.perf_counter() - started

    rule.ef.compressor.select = timed_select
    grad, replica = torch.zeros(d), pool[:d].clone()
    k = elements_for(delta, d)
    generator = torch.Generator().manual_seed(7)
    union = min(d, workers * k)
    delta_indices = torch.randperm(d, generator=generator)[:union].sort().values.to(torch.int32)
    delta_values = torch.randn(union, generator=generator).mul_(1e-3)
    for step in range(steps + 1):
        if step == 1:
            totals = dict.fromkeys(totals, 0.0)
        offset = step * 577 % POOL_SLACK
        started = time.perf_counter()
        grad.copy_(pool[offset : offset + d])
        gathered = time.perf_counter()
        select_before = totals["select"]
        update = rule.update(grad, 0.1, delta, step)
        updated = time.perf_counter()
        codec.push_messages(pb.PushHeader(worker_id=1, round=step), update)
        encoded = time.perf_counter()
        codec.apply_delta(replica, codec.Update(values=delta_values, indices=delta_indices))
        applied = time.perf_counter()
        codec.model_checksum(replica)
        checked = time.perf_counter()
        totals["gather"] += gathered - started
        totals["error feedback"] += (updated - gathered) - (totals["select"] - select_before)
        totals["encode"] += encoded - updated
        totals["apply"] += applied - encoded
        totals["checksum (when due)"] += checked - applied
    del rule.ef.compressor.select
    return {part: seconds / steps * 1e3 for part, seconds in totals.items()}


# ---------------------------------------------------------------------------- run and print


def run_scale(config: ScaleConfig, on_row: Callable[[Row], None] | None = None,
              log_dir: str | None = None) -> ScaleResult:
    """`log_dir`: keep the server logs there (default: a temporary folder, removed)."""
    torch.set_num_threads(1)
    bandwidth = copy_bandwidth()
    result = ScaleResult(benchmark="scale", config=asdict(config), machine=machine_info(), copy_gb_per_s=bandwidth)
    with tempfile.TemporaryDirectory(prefix="wanps-scale-") as temp_dir:
        work_dir = log_dir or temp_dir
        for d in config.params:
            pool = _build_pool(d)
            for n in config.workers:
                for delta in config.deltas:
                    row = run_row(config, d, n, delta, pool, Path(work_dir), bandwidth)
                    gc.collect()  # the row's workers (model-sized buffers) are gone before the next one
                    result.rows.append(row)
                    if on_row is not None:
                        on_row(row)
            del pool
    result.machine["loadavg_end"] = os.getloadavg()
    return result


def _millis(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.1f}"


def _count(value: float) -> str:
    return f"{value / 1e6:g}M" if value >= 1e6 else f"{value / 1e3:g}K" if value >= 1e3 else f"{value:g}"


HEADERS = ("params", "workers", "delta", "join s", "seed s", "pull s", "step ms", "step CPU ms", "select", "encode", "push wait",
           "apply", "other", "server round ms", "server CPU/round ms", "server peak RSS MiB",
           "RSS after leave MiB", "CPU/floor")


def row_cells(row: Row) -> list[str]:
    split = row.split_seconds
    return [_count(row.params), str(row.workers), f"{row.delta:g}", f"{row.join_seconds:.2f}",
            f"{row.seed_seconds:.2f}", f"{row.pull_seconds:.2f}",
            _millis(row.step_seconds), _millis(row.step_cpu_seconds),
            *(_millis(split[p]) for p in STEP_PARTS), _millis(row.server_round_seconds),
            _millis(row.server_cpu_per_round_seconds), f"{row.server_peak_rss_mib:.0f}",
            f"{row.server_rss_after_leave_mib:.0f}", f"{row.cpu_over_floor:.2f}x"]


def print_scale(result: ScaleResult) -> None:
    flags = " ".join(result.config["server_flags"]) or "default settings"
    print(f"scale: server with {flags}; {result.config['rounds']} rounds per row (after {result.config['warmup_rounds']} warm-up), "
          f"{result.config['compressor']}, tau 0; step parts in ms per worker and step")
    print(text_table(HEADERS, [row_cells(r) for r in result.rows]))
    print(f"memory-traffic floor: {result.copy_gb_per_s:.1f} GB/s (float32 copy, one thread); floor of a step = "
          "(16 d + 20 k + 16 u) bytes / that bandwidth; CPU/floor = step CPU / floor")
    print(f"{load_summary(result.machine)} at the start; {result.machine['loadavg_end'][0]:.2f} at the end")


def parse_count(text: str) -> int:
    """10M, 124M, 1.5M, 50000 -> int."""
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "KMG" else text
    return int(float(number) * scale)


def build_parser() -> EnvDefaultsParser:
    defaults = ScaleConfig()
    parser = EnvDefaultsParser(prog="wanps bench scale", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=",".join(_count(p) for p in defaults.params),
                        help="Model sizes, comma-separated (10M, 124M, ...).")
    parser.add_argument("--workers", default=",".join(map(str, defaults.workers)), help="Worker counts.")
    parser.add_argument("--deltas", default=",".join(f"{x:g}" for x in defaults.deltas), help="Compression ratios.")
    parser.add_argument("--rounds", type=int_at_least(1), default=defaults.rounds, help="Measured rounds per row.")
    parser.add_argument("--warmup-rounds", type=int, default=defaults.warmup_rounds)
    parser.add_argument("--compressor", default=defaults.compressor)
    parser.add_argument("--server-flags", default="", help="More `wanps server` flags, e.g. '--history-mb 64'.")
    parser.add_argument("--quick", action="store_true",
                        help="CI size: 1M parameters, 2 workers, delta 0.01, 5 rounds (overrides the sizes).")
    parser.add_argument("--json", default="", help="Also write the results here.")
    parser.add_argument("--log-dir", default="", help="Keep the server logs in DIR/logs (default: not kept).")
    parser.add_argument("--profile-step", action="store_true",
                        help="Only profile one worker's step alone (first --params, --deltas and --workers: the "
                             "applied delta's size), on one thread, no server; against the floor.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = ScaleConfig(params=tuple(parse_count(p) for p in args.params.split(",")),
                             workers=tuple(int(w) for w in args.workers.split(",")),
                             deltas=tuple(float(x) for x in args.deltas.split(",")), rounds=args.rounds,
                             warmup_rounds=args.warmup_rounds, compressor=args.compressor,
                             server_flags=tuple(shlex.split(args.server_flags)))
    except ValueError as exc:
        print(f"wanps bench scale: {exc}")
        return 2
    if args.quick:
        config = ScaleConfig(params=(1_000_000,), workers=(2,), deltas=(0.01,), rounds=5, warmup_rounds=1,
                             compressor=args.compressor, server_flags=config.server_flags)
    if (min(config.params) < 1 or min(config.workers) < 1 or config.rounds < 1 or config.warmup_rounds < 0
            or not all(0 < x <= 1 for x in config.deltas)):
        print("wanps bench scale: sizes, workers and rounds must be positive and deltas in (0, 1]")
        return 2

    if args.profile_step:
        d, delta, n = config.params[0], config.deltas[0], config.workers[0]
        bandwidth = copy_bandwidth()
        parts = profile_step(d, delta, n, config.compressor)
        k = elements_for(delta, d)
        floor_ms = floor_bytes(d, k, min(d, n * k)) / (bandwidth * 1e9) * 1e3
        step_ms = sum(v for part, v in parts.items() if part != "checksum (when due)")
        print(f"one worker's step alone: {_count(d)} parameters, delta {delta:g}, a delta of {n} pushes' union, "
              f"{config.compressor}, one thread")
        print(text_table(("part", "ms"), [(part, f"{ms:.1f}") for part, ms in parts.items()], left_aligned=True))
        print(f"step (without the CRC) {step_ms:.0f} ms; floor (16 d + 20 k + 16 u) at {bandwidth:.1f} GB/s: "
              f"{floor_ms:.1f} ms; {step_ms / floor_ms:.2f}x")
        return 0

    def show(row: Row) -> None:
        print("  ".join(f"{h}={c}" for h, c in zip(HEADERS, row_cells(row))), flush=True)

    result = run_scale(config, on_row=show, log_dir=args.log_dir or None)
    print_scale(result)
    if args.json:
        write_json(args.json, result)
    return 0
