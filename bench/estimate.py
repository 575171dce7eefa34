"""`wanps bench estimate`: how well the controller measures a worker's WAN link.

Everything runs in this process on 127.0.0.1, over real gRPC and real sockets:

* a parameter server (`start_server`, min_workers 1, metrics off) and a controller
  (`start_controller`, policy `static`, so no adaptive decision interferes; metrics off),
  both fresh for every run, on this process's event loop;
* one `LinkEmulator` between the worker and the server; the worker's controller
  connection goes direct, as in the demo;
* one worker, driven through `WorkerSession` on a thread the way a training worker is:
  each step "computes" (sleeps `--compute-ms`), records the compute time, pushes a sparse
  update of k elements (k drawn uniformly from `--push-elements` +- `--vary`, as top-k
  pushes of delta ~0.5%-2% of 1M parameters are), keeps up to tau pushes in flight, and
  tracks the model version from the deltas it receives.

Every `--poll-s` the controller's estimate for the worker (`ControllerCore.estimates`,
read on the controller's event loop) is recorded against the link's true bandwidth and
round trip. t = 0 is the worker's first push, which is also when the link's trace starts.

Conditions:

* `fixed`: 20 Mbit/s, 50 ms one-way (RTT 100 ms; the estimator's latency is an RTT).
  Target: at t = `--check-at-s` (5 s) the bandwidth estimate is within 10% of 20 Mbit/s
  and the latency within 10 ms of 100 ms.
* `step`: 40 Mbit/s for `--step-at-s` (10 s), then 10 Mbit/s (a trace that does not loop).
  Target: the bandwidth estimate is within 10% of 10 Mbit/s, and stays there for the rest
  of the run (at least `--stable-s`, 3 s), less than 5 s after the step.
* `high` (optional, `--conditions fixed,step,high`): 100 Mbit/s, where a push's transfer
  (3-13 ms for 40-160 KB) is no longer large against per-push processing and jitter, so the
  range of the regression shows; judged like `fixed`.
* `deco-step`: the case that failed in training (issue 15): the controller runs `deco`
  and the worker pushes what its decisions say, k = ceil(delta * params) elements (a
  top-k push: every push the same size) at the decision's tau, from a small bootstrap
  delta (`--deco-delta`). DeCo sizes a push to be carried in about one compute step, so
  the pushes are a few KB and their transfer is lost in the RTT jitter; the estimate must
  come from the probes. The link steps from `--deco-from-mbit` (20) to `--deco-to-mbit`
  (5) at `--step-at-s`. Target: `--change-check-s` (5 s) after the step, the uplink and the
  downlink estimates are both within `--change-tolerance` (15%) of the set link.

The seed and the pull (4 MB each for 1M parameters) go over the same emulated link but at
1 Gbit/s: the trace starts only at the first push, so every run begins on an idle link and
does not spend seconds on setup. Neither produces link samples.

Results, and what they say about the estimator: docs/benchmarks.md.
"""
from __future__ import annotations

import asyncio
import math
import queue
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from wanps.bench.payload import random_update
from wanps.bench.report import machine_info, text_table, write_json
from wanps.controller.estimator import EstimatorConfig, LinkEstimate
from wanps.controller.policy import PolicyConfig
from wanps.proto.decisions import decision_for_round
from wanps.controller.service import ControllerConfig, RunningController, start_controller
from wanps.linkem.proxy import LinkEmulator
from wanps.linkem.trace import LinkTrace, TracePoint
from wanps.rpc.config import EnvDefaultsParser, run_async
from wanps.proto.codec import fingerprint_of
from wanps.server.service import RunningServer, ServerConfig, start_server
from wanps.worker.session import ReceivedDelta, WorkerSession

CONDITIONS = ("fixed", "step", "high", "deco-step")
# The link during setup (join, seed, pull): fast, so a run starts measuring within a second.
SETUP_BANDWIDTH_MBIT = 1000.0
# The server's tau_max (a worker clamps the decision's tau to it, as the Optimizer does).
SERVER_TAU_MAX = 8
# Upper bounds on any single blocking wait, so a stuck run fails instead of hanging.
SETUP_TIMEOUT_S = 60.0
WAIT_STEP_S = 0.5
CLOSE_WAIT_S = 3.0


@dataclass(frozen=True)
class EstimateBenchConfig:
    conditions: tuple[str, ...] = ("fixed", "step", "deco-step")
    repeat: int = 2
    # Estimator windows to run every condition with; the controller's default is 10 s.
    windows_s: tuple[float, ...] = (EstimatorConfig().window_s,)
    params: int = 1_000_000
    push_elements: int = 12_500
    vary: float = 0.6  # k uniform in push_elements * [1 - vary, 1 + vary]: 5K-20K by default
    compute_ms: float = 20.0
    tau: int = 1
    delta: float = 0.05  # the static policy's delta (the bench chooses its own push sizes)
    delay_ms: float = 50.0
    fixed_mbit: float = 20.0
    fixed_duration_s: float = 10.0
    step_from_mbit: float = 40.0
    step_to_mbit: float = 10.0
    step_at_s: float = 10.0
    after_step_s: float = 10.0
    high_mbit: float = 100.0
    queue_ms: float = 50.0
    poll_s: float = 0.5
    check_at_s: float = 5.0
    bandwidth_tolerance: float = 0.10
    latency_tolerance_ms: float = 10.0
    settle_target_s: float = 5.0
    stable_s: float = 3.0
    seed: int = 0
    # deco-step: the link under deco's own (small) pushes, judged change_check_s after the step.
    deco_from_mbit: float = 20.0
    deco_to_mbit: float = 5.0
    deco_delta: float = 0.001
    change_check_s: float = 5.0
    change_tolerance: float = 0.15


def quick_config(**overrides: Any) -> EstimateBenchConfig:
    """Short runs for CI smoke use: numbers are indicative only."""
    base = dict(params=200_000, push_elements=5_000, fixed_duration_s=5.0, step_at_s=3.0, after_step_s=3.0,
                check_at_s=4.0, stable_s=1.0, change_check_s=2.5)
    base.update(overrides)
    return EstimateBenchConfig(**base)


@dataclass(frozen=True)
class Condition:
    name: str
    trace: LinkTrace
    duration_s: float
    final_mbit: float  # the bandwidth the run is judged against
    step_at_s: float | None = None
    # deco: the controller decides and the worker pushes delta * params elements at its tau.
    policy: str = "static"


def conditions_of(config: EstimateBenchConfig) -> list[Condition]:
    made = {
        "fixed": Condition("fixed", LinkTrace.fixed(config.fixed_mbit, config.delay_ms), config.fixed_duration_s,
                           config.fixed_mbit),
        "step": Condition("step", LinkTrace([TracePoint(0.0, config.step_from_mbit, config.delay_ms),
                                             TracePoint(config.step_at_s, config.step_to_mbit, config.delay_ms)],
                                            loop=False),
                          config.step_at_s + config.after_step_s, config.step_to_mbit, config.step_at_s),
        "high": Condition("high", LinkTrace.fixed(config.high_mbit, config.delay_ms), config.fixed_duration_s,
                          config.high_mbit),
        "deco-step": Condition("deco-step", LinkTrace([TracePoint(0.0, config.deco_from_mbit, config.delay_ms),
                                                       TracePoint(config.step_at_s, config.deco_to_mbit,
                                                                  config.delay_ms)], loop=False),
                               config.step_at_s + config.after_step_s, config.deco_to_mbit, config.step_at_s,
                               policy="deco"),
    }
    return [made[name] for name in config.conditions]


class DeferredTrace(LinkTrace):
    """`inner` from the moment `begin()` is called; a fast link with the same delay before."""

    def __init__(self, inner: LinkTrace) -> None:
        super().__init__(inner.points, loop=inner.loop)
        self.inner = inner
        self._setup = TracePoint(0.0, SETUP_BANDWIDTH_MBIT, inner.at(0.0).delay_ms)
        self._offset: float | None = None  # emulator trace time at which `inner` starts

    def begin(self, trace_time_s: float) -> None:
        self._offset = trace_time_s

    def at(self, t: float) -> TracePoint:
        offset = self._offset  # read once: begin() runs on another thread
        if offset is None or t < offset:
            return self._setup
        return self.inner.at(t - offset)


# ------------------------------------------------------------------ the worker


@dataclass
class WorkerStats:
    first_push_at: float | None = None  # time.monotonic()
    pushes: int = 0
    bytes_pushed: int = 0
    final_version: int = 0
    error: str | None = None


class BenchWorker:
    """One training-like worker on its own thread, for `duration_s` after its first push."""

    def __init__(self, config: EstimateBenchConfig, server: str, controller: str, duration_s: float,
                 on_first_push: Callable[[], None], seed: int, follow_decisions: bool = False) -> None:
        self.config = config
        self.follow_decisions = follow_decisions  # push delta * params elements at the decision's tau
        self.server = server
        self.controller = controller
        self.duration_s = duration_s
        self.on_first_push = on_first_push  # called right before the first push (starts the trace)
        self.rng = np.random.default_rng(seed)
        self.stats = WorkerStats()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="wanps-bench-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            self._train()
        except BaseException as exc:  # noqa: BLE001 - reported by the run, which fails loudly
            self.stats.error = f"{type(exc).__name__}: {exc}"

    def _train(self) -> None:
        c = self.config
        session = WorkerSession(self.server, self.controller)
        try:
            reply = session.join(c.params, fingerprint_of([("bench-estimate", (c.params,), "float32")]),
                                 name="bench-estimate", timeout=SETUP_TIMEOUT_S)
            if reply.must_seed:
                session.seed(torch.zeros(c.params))
            pulled = session.pull(timeout=SETUP_TIMEOUT_S)
            version, round_ = pulled.version, pulled.first_round
            session.follow_updates(version)
            # As `wanps.worker.Optimizer`: pings and reports start once the model is in place.
            session.follow_decisions()
            session.wait_for_decision(10.0)
            lo = max(1, round(c.push_elements * (1 - c.vary)))
            hi = min(c.params, max(lo, round(c.push_elements * (1 + c.vary))))
            in_flight: list[Any] = []
            started = time.monotonic()
            self.stats.first_push_at = started  # t = 0 of the run, read once on_first_push has run
            self.on_first_push()
            deadline = started + self.duration_s
            # Bounded in count as well as time: no more steps than the compute time allows.
            max_steps = int(self.duration_s / max(c.compute_ms / 1e3, 1e-3)) + 1
            for _ in range(max_steps):
                if time.monotonic() >= deadline or self.stop.is_set():
                    break
                step_started = time.monotonic()
                time.sleep(c.compute_ms / 1e3)  # the forward/backward pass this bench does not run
                tau, elements = c.tau, int(self.rng.integers(lo, hi + 1))
                decision = decision_for_round(session.decisions(), round_) if self.follow_decisions else None
                if decision is not None:
                    tau, elements = min(decision.tau, SERVER_TAU_MAX), min(c.params, math.ceil(decision.delta * c.params))
                update = random_update(c.params, elements, self.rng)
                session.record_compute(time.monotonic() - step_started, round_)
                in_flight.append(session.push(round_, version, update))
                self.stats.pushes += 1
                self.stats.bytes_pushed += update.nbytes
                round_ += 1
                # Staleness bound: round r may be computed on version >= r - tau.
                version = self._catch_up(session, version, round_ - tau, deadline)
                for future in [f for f in in_flight if f.done()]:
                    future.result()  # raises a refused push
                    in_flight.remove(future)
            for future in in_flight:
                future.result(SETUP_TIMEOUT_S)
            self.stats.final_version = version
            session.leave()
        finally:
            session.close()

    def _catch_up(self, session: WorkerSession, version: int, min_version: int, deadline: float) -> int:
        """Consume received deltas; block while below min_version (until the run's deadline)."""
        while True:
            block = version < min_version and time.monotonic() < deadline and not self.stop.is_set()
            try:
                item = session.deltas.get(timeout=WAIT_STEP_S) if block else session.deltas.get_nowait()
            except queue.Empty:
                if not block:
                    return version
                continue
            if isinstance(item, BaseException):
                raise RuntimeError("the update stream failed") from item
            assert isinstance(item, ReceivedDelta)
            if item.version != version + 1:
                raise RuntimeError(f"received version {item.version} while at {version}")
            version = item.version


# ------------------------------------------------------------------ one run


@dataclass
class Poll:
    t: float  # seconds since the first push
    bandwidth_mbit: float | None
    latency_ms: float | None
    t_comp_ms: float | None
    push_samples: int
    ping_samples: int
    method: str | None
    true_mbit: float
    true_rtt_ms: float
    up_mbit: float  # what the link carried towards the server since the previous poll
    down_mbit: float
    down_bandwidth_mbit: float | None = None  # the downlink's estimate (None: not yet)
    down_samples: int = 0
    tau: int | None = None  # the decision in force at the controller's newest reported round
    delta: float | None = None


def _estimate_fields(estimate: LinkEstimate | None) -> dict[str, Any]:
    if estimate is None:
        return dict(bandwidth_mbit=None, latency_ms=None, t_comp_ms=None, push_samples=0, ping_samples=0, method=None)
    return dict(bandwidth_mbit=estimate.bandwidth_bps / 1e6, latency_ms=estimate.latency_s * 1e3,
                t_comp_ms=None if estimate.t_comp_s is None else estimate.t_comp_s * 1e3,
                push_samples=estimate.push_samples, ping_samples=estimate.ping_samples, method=estimate.method,
                down_bandwidth_mbit=None if estimate.down_bandwidth_bps is None else estimate.down_bandwidth_bps / 1e6,
                down_samples=estimate.down_samples)


async def run_condition(config: EstimateBenchConfig, condition: Condition, window_s: float, repeat: int
                        ) -> dict[str, Any]:
    registry = CollectorRegistry()
    server: RunningServer = await start_server(
        ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, min_workers=1, tau_max=max(SERVER_TAU_MAX, config.tau)),
        registry)
    controller: RunningController | None = None
    link: LinkEmulator | None = None
    worker: BenchWorker | None = None
    try:
        deco = condition.policy == "deco"
        policy = PolicyConfig(name=condition.policy, tau=config.tau, delta=config.deco_delta if deco else config.delta,
                              tau_max=SERVER_TAU_MAX)
        controller = await start_controller(
            ControllerConfig(host="127.0.0.1", port=0, metrics_port=-1, policy=policy,
                             estimator=EstimatorConfig(window_s=window_s)), CollectorRegistry())
        trace = DeferredTrace(condition.trace)
        link = LinkEmulator("127.0.0.1", 0, "127.0.0.1", server.port, trace, queue_ms=config.queue_ms)
        await link.start()
        loop = asyncio.get_running_loop()
        begun = asyncio.Event()
        emulator = link

        def on_first_push() -> None:
            trace.begin(emulator.trace_time())
            loop.call_soon_threadsafe(begun.set)

        worker = BenchWorker(config, f"127.0.0.1:{link.bound_port}", f"127.0.0.1:{controller.port}",
                             condition.duration_s, on_first_push, seed=config.seed + 1000 * repeat,
                             follow_decisions=deco)
        worker.start()
        # Wait for setup to finish (or fail) without blocking the loop the services run on.
        setup_deadline = time.monotonic() + SETUP_TIMEOUT_S
        while not begun.is_set():
            if worker.stats.error or not worker.thread.is_alive() or time.monotonic() > setup_deadline:
                raise RuntimeError(f"bench worker did not start pushing: {worker.stats.error}")
            try:
                await asyncio.wait_for(begun.wait(), WAIT_STEP_S)
            except asyncio.TimeoutError:
                pass
        assert worker.stats.first_push_at is not None
        polls = await _poll(config, condition, controller, link, worker.stats.first_push_at)
        worker.stop.set()
        await asyncio.to_thread(worker.thread.join, SETUP_TIMEOUT_S)
        if worker.stats.error:
            raise RuntimeError(f"bench worker failed: {worker.stats.error}")
        if worker.thread.is_alive():
            raise RuntimeError(f"bench worker still running {SETUP_TIMEOUT_S:.0f} s after it was told to stop")
    finally:
        if worker is not None:
            worker.stop.set()
            if worker.thread.is_alive():
                await asyncio.to_thread(worker.thread.join, SETUP_TIMEOUT_S)
                if worker.thread.is_alive():  # a daemon thread: it goes with the process
                    print(f"bench worker still running {SETUP_TIMEOUT_S:.0f} s after it was told to stop",
                          file=sys.stderr)
        if controller is not None:
            await controller.stop(0.5)
        await server.stop(0.5)
        if link is not None:
            # The server has closed its end: let the connection through the link end in order
            # (EOF both ways) before cancelling whatever is left.
            for _ in range(int(CLOSE_WAIT_S / 0.05)):
                if link.active_connections == 0:
                    break
                await asyncio.sleep(0.05)
            await link.close()
    stats = worker.stats
    return {
        "condition": condition.name,
        "window_s": window_s,
        "repeat": repeat,
        "duration_s": condition.duration_s,
        "step_at_s": condition.step_at_s,
        "trace": [asdict(p) for p in condition.trace.points],
        "worker": {"pushes": stats.pushes, "bytes_pushed": stats.bytes_pushed, "final_version": stats.final_version,
                   "pushes_per_s": stats.pushes / condition.duration_s,
                   "mean_push_bytes": stats.bytes_pushed / max(1, stats.pushes)},
        "series": [asdict(p) for p in polls],
        "summary": summarize(config, condition, polls),
    }


async def _poll(config: EstimateBenchConfig, condition: Condition, controller: RunningController,
                link: LinkEmulator, started: float) -> list[Poll]:
    """Record the controller's estimate every poll_s from `started` (the first push) to the run's end."""
    core = controller.service.core
    polls: list[Poll] = []
    up_before, down_before, last = link.bytes_client_to_target, link.bytes_target_to_client, time.monotonic()
    for n in range(1, int(condition.duration_s / config.poll_s) + 1):
        await asyncio.sleep(max(0.0, started + n * config.poll_s - time.monotonic()))
        now = time.monotonic()
        t = now - started
        # One worker: its estimate is the only one (the bench worker's id is whatever it got).
        estimate = next(iter(core.estimates.values()), None)
        decision = core.current()
        true = condition.trace.at(t)
        up, down = link.bytes_client_to_target, link.bytes_target_to_client
        span = max(now - last, 1e-6)
        polls.append(Poll(t=round(t, 3), **_estimate_fields(estimate), true_mbit=true.bandwidth_mbit,
                          true_rtt_ms=2 * true.delay_ms, up_mbit=8 * (up - up_before) / span / 1e6,
                          down_mbit=8 * (down - down_before) / span / 1e6,
                          tau=None if decision is None else decision.tau,
                          delta=None if decision is None else decision.delta))
        up_before, down_before, last = up, down, now
    return polls


# ------------------------------------------------------------------ judging


def within(value: float | None, target: float, tolerance: float) -> bool:
    return value is not None and abs(value - target) <= tolerance * target


def summarize(config: EstimateBenchConfig, condition: Condition, polls: Sequence[Poll]) -> dict[str, Any]:
    first = next((p for p in polls if p.bandwidth_mbit is not None), None)
    summary: dict[str, Any] = {"first_estimate_s": first.t if first else None}
    true_rtt = 2 * condition.trace.at(condition.duration_s).delay_ms
    if condition.step_at_s is None:
        at = next((p for p in polls if p.t >= config.check_at_s - 1e-9), None)
        bandwidth = at.bandwidth_mbit if at else None
        latency = at.latency_ms if at else None
        late = [p.bandwidth_mbit for p in polls if p.t >= config.check_at_s and p.bandwidth_mbit is not None]
        summary.update({
            "check_at_s": config.check_at_s,
            "bandwidth_mbit": bandwidth,
            "bandwidth_error_pct": None if bandwidth is None else 100 * (bandwidth / condition.final_mbit - 1),
            "latency_ms": latency,
            "latency_error_ms": None if latency is None else latency - true_rtt,
            "bandwidth_met": within(bandwidth, condition.final_mbit, config.bandwidth_tolerance),
            "latency_met": latency is not None and abs(latency - true_rtt) <= config.latency_tolerance_ms,
            # How steady the estimate is after the check point.
            "bandwidth_min_mbit": min(late) if late else None,
            "bandwidth_max_mbit": max(late) if late else None,
            "bandwidth_median_mbit": statistics.median(late) if late else None,
        })
        summary["met"] = summary["bandwidth_met"] and summary["latency_met"]
        return summary
    step = condition.step_at_s
    if condition.policy == "deco":
        return summary | summarize_change(config, condition, polls)
    before = [p.bandwidth_mbit for p in polls if step - 2.0 <= p.t < step and p.bandwidth_mbit is not None]
    settle_s = settle_time(polls, step, condition.final_mbit, config.bandwidth_tolerance, config.stable_s)
    first_within = next((p.t - step for p in polls
                         if p.t >= step and within(p.bandwidth_mbit, condition.final_mbit, config.bandwidth_tolerance)),
                        None)
    # The end of the run, where a settled estimate should sit: its median and the RTT.
    end = [p for p in polls if p.t >= condition.duration_s - config.stable_s and p.bandwidth_mbit is not None]
    final_latency = statistics.median(p.latency_ms for p in end) if end else None
    summary.update({
        "step_at_s": step,
        "before_step_mbit": statistics.median(before) if before else None,
        "before_step_true_mbit": condition.trace.at(max(0.0, step - 1e-6)).bandwidth_mbit,
        "first_within_s": first_within,
        "settle_s": settle_s,
        "final_bandwidth_mbit": statistics.median(p.bandwidth_mbit for p in end) if end else None,
        "final_latency_ms": final_latency,
        "latency_error_ms": None if final_latency is None else final_latency - true_rtt,
        "met": settle_s is not None and settle_s < config.settle_target_s,
    })
    return summary


def summarize_change(config: EstimateBenchConfig, condition: Condition, polls: Sequence[Poll]) -> dict[str, Any]:
    """deco-step: both directions' estimates `change_check_s` after the step, against the set link."""
    assert condition.step_at_s is not None
    step = condition.step_at_s
    at = next((p for p in polls if p.t >= step + config.change_check_s - 1e-9), None)
    up = at.bandwidth_mbit if at else None
    # The downlink DeCo uses: its own estimate, or the uplink's while it has none (a downlink
    # kept busy by the worker's own deltas cannot be probed; docs/controller.md).
    own_down = at.down_bandwidth_mbit if at else None
    down = own_down if own_down is not None else up
    target = condition.final_mbit
    deltas = [p.delta for p in polls if p.delta is not None and p.t >= step]
    before = [p.bandwidth_mbit for p in polls if step - 2.0 <= p.t < step and p.bandwidth_mbit is not None]
    return {
        "step_at_s": step,
        "before_step_mbit": statistics.median(before) if before else None,
        "check_at_s": step + config.change_check_s,
        "bandwidth_mbit": up,
        "bandwidth_error_pct": None if up is None else 100 * (up / target - 1),
        "down_bandwidth_mbit": down,
        "down_estimated_apart": own_down is not None,
        "down_bandwidth_error_pct": None if down is None else 100 * (down / target - 1),
        "settle_s": settle_time(polls, step, target, config.change_tolerance, config.stable_s),
        "delta_min": min(deltas) if deltas else None,
        "delta_max": max(deltas) if deltas else None,
        "met": within(up, target, config.change_tolerance) and within(down, target, config.change_tolerance),
    }


def settle_time(polls: Sequence[Poll], step_at_s: float, target_mbit: float, tolerance: float,
                stable_s: float) -> float | None:
    """Seconds after the step until the estimate is within tolerance and stays so to the end.

    None when it never does, or does so too late to have been seen steady for `stable_s`.
    """
    after = [p for p in polls if p.t >= step_at_s]
    if not after:
        return None
    settled_from: Poll | None = None
    for p in after:
        if within(p.bandwidth_mbit, target_mbit, tolerance):
            settled_from = settled_from or p
        else:
            settled_from = None
    if settled_from is None or after[-1].t - settled_from.t < stable_s:
        return None
    return settled_from.t - step_at_s


# ------------------------------------------------------------------ the benchmark


async def run_estimate_bench(config: EstimateBenchConfig) -> dict[str, Any]:
    machine = machine_info()
    runs = []
    for condition in conditions_of(config):
        for window_s in config.windows_s:
            for repeat in range(1, config.repeat + 1):
                runs.append(await run_condition(config, condition, window_s, repeat))
    return {"benchmark": "estimate", "config": asdict(config), "machine": machine, "runs": runs,
            "all_met": all(run["summary"]["met"] for run in runs)}


def _fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{unit}"


def format_result(result: dict[str, Any], series: bool = False) -> str:
    c = result["config"]
    m = result["machine"]
    out = [f"wanps bench estimate: 1 worker, {c['params']:,} params, pushes of {c['push_elements']:,} "
           f"+-{c['vary']:.0%} elements, compute {c['compute_ms']:g} ms/step, tau {c['tau']}, "
           f"link queue {c['queue_ms']:g} ms, delay {c['delay_ms']:g} ms one way (RTT {2 * c['delay_ms']:g} ms)",
           f"machine: {m['cpus']} CPUs, load {m['loadavg'][0]:.2f} before the run"]
    fixed = [r for r in result["runs"] if r["step_at_s"] is None]
    if fixed:
        rows = []
        for r in fixed:
            s = r["summary"]
            true_mbit = r["trace"][0]["bandwidth_mbit"]
            rows.append([r["condition"], f"{true_mbit:g}", f"{r['window_s']:g}", r["repeat"],
                         _fmt(s["first_estimate_s"]), _fmt(s["bandwidth_mbit"], ".2f"),
                         _fmt(s["bandwidth_error_pct"], "+.1f", "%"), _fmt(s["latency_ms"], ".1f"),
                         _fmt(s["latency_error_ms"], "+.1f"),
                         f"{_fmt(s['bandwidth_min_mbit'], '.1f')}-{_fmt(s['bandwidth_max_mbit'], '.1f')}",
                         f"{r['worker']['pushes_per_s']:.1f}", "yes" if s["met"] else "NO"])
        out += ["", f"fixed links: estimate at t = {c['check_at_s']:g} s after the first push "
                f"(target: bandwidth within {c['bandwidth_tolerance']:.0%}, RTT within "
                f"{c['latency_tolerance_ms']:g} ms)",
                text_table(["cond", "Mbit/s", "window s", "rep", "first est s", "est Mbit/s", "err", "est RTT ms",
                            "err ms", "later Mbit/s", "pushes/s", "met"], rows)]
    steps = [r for r in result["runs"] if r["step_at_s"] is not None and r["condition"] != "deco-step"]
    if steps:
        rows = []
        for r in steps:
            s = r["summary"]
            rows.append([r["condition"], f"{r['trace'][0]['bandwidth_mbit']:g}->{r['trace'][-1]['bandwidth_mbit']:g}",
                         f"{r['window_s']:g}", r["repeat"], _fmt(s["before_step_mbit"], ".2f"),
                         _fmt(s["first_within_s"], ".1f", " s"),
                         _fmt(s["settle_s"], ".1f", " s") if s["settle_s"] is not None else "not settled",
                         _fmt(s["final_bandwidth_mbit"], ".2f"), _fmt(s["final_latency_ms"], ".1f"),
                         f"{r['worker']['pushes_per_s']:.1f}", "yes" if s["met"] else "NO"])
        out += ["", f"step change at t = {c['step_at_s']:g} s: time until the estimate is within "
                f"{c['bandwidth_tolerance']:.0%} of the new bandwidth and stays there (>= {c['stable_s']:g} s; "
                f"target < {c['settle_target_s']:g} s)",
                text_table(["cond", "Mbit/s", "window s", "rep", "before step", "first within", "settled after",
                            "end Mbit/s", "end RTT ms", "pushes/s", "met"], rows)]
    decos = [r for r in result["runs"] if r["condition"] == "deco-step"]
    if decos:
        rows = []
        for r in decos:
            s = r["summary"]
            rows.append([f"{r['trace'][0]['bandwidth_mbit']:g}->{r['trace'][-1]['bandwidth_mbit']:g}", f"{r['window_s']:g}",
                         r["repeat"], _fmt(s["before_step_mbit"], ".2f"), _fmt(s["bandwidth_mbit"], ".2f"),
                         _fmt(s["bandwidth_error_pct"], "+.1f", "%"),
                         _fmt(s["down_bandwidth_mbit"], ".2f") + ("" if s["down_estimated_apart"] else " (=up)"),
                         _fmt(s["down_bandwidth_error_pct"], "+.1f", "%"),
                         f"{_fmt(s['delta_min'], '.2g')}-{_fmt(s['delta_max'], '.2g')}",
                         f"{r['worker']['mean_push_bytes'] / 1e3:.1f}", "yes" if s["met"] else "NO"])
        out += ["", f"deco-step: deco decides, the worker pushes its delta; estimates {c['change_check_s']:g} s after "
                f"the step at t = {c['step_at_s']:g} s (target: up and down within {c['change_tolerance']:.0%}; "
                "(=up): no downlink estimate of its own, DeCo takes the uplink's)",
                text_table(["Mbit/s", "window s", "rep", "before step", "up est", "up err", "down est", "down err",
                            "delta", "push KB", "met"], rows)]
    if series:
        for r in result["runs"]:
            out += ["", f"{r['condition']} window {r['window_s']:g} s rep {r['repeat']}: t s, estimate up/down "
                    "Mbit/s (true), RTT ms, link up/down Mbit/s"]
            out += [f"  {p['t']:5.1f}  {_fmt(p['bandwidth_mbit'], '6.2f'):>6} "
                    f"/{_fmt(p.get('down_bandwidth_mbit'), '6.2f'):>6} ({p['true_mbit']:g})  "
                    f"{_fmt(p['latency_ms'], '6.1f'):>6}  {p['up_mbit']:5.1f}/{p['down_mbit']:5.1f}  "
                    f"{p['method'] or ''}" + (f"  tau {p['tau']} delta {p['delta']:.2g}" if p.get("delta") else "")
                    for p in r["series"]]
    out += ["", f"all targets met: {'yes' if result['all_met'] else 'NO'}"]
    return "\n".join(out)


def build_parser() -> EnvDefaultsParser:
    d = EstimateBenchConfig()
    parser = EnvDefaultsParser(prog="wanps bench estimate",
                               description="Link estimation accuracy through the link emulator: a fixed link and a "
                               "step change, one real worker, server and controller on 127.0.0.1.")
    parser.add_argument("--conditions", default=",".join(d.conditions),
                        help=f"comma-separated, from {', '.join(CONDITIONS)}")
    parser.add_argument("--repeat", type=int, default=d.repeat, help="runs per condition and window")
    parser.add_argument("--window-s", default=",".join(f"{w:g}" for w in d.windows_s),
                        help="comma-separated estimator windows (seconds) to run each condition with "
                        "(the controller's --window-s; default its default)")
    parser.add_argument("--params", type=int, default=d.params, help="model size (float32 parameters)")
    parser.add_argument("--push-elements", type=int, default=d.push_elements, help="mean elements per push")
    parser.add_argument("--vary", type=float, default=d.vary,
                        help="push sizes are uniform in push-elements * [1 - vary, 1 + vary]")
    parser.add_argument("--compute-ms", type=float, default=d.compute_ms, help="simulated compute per step")
    parser.add_argument("--tau", type=int, default=d.tau, help="pushes in flight beyond the current one")
    parser.add_argument("--delay-ms", type=float, default=d.delay_ms, help="one-way delay of every condition")
    parser.add_argument("--fixed-mbit", type=float, default=d.fixed_mbit)
    parser.add_argument("--fixed-duration-s", type=float, default=d.fixed_duration_s,
                        help="length of the fixed and high runs")
    parser.add_argument("--step-from-mbit", type=float, default=d.step_from_mbit)
    parser.add_argument("--step-to-mbit", type=float, default=d.step_to_mbit)
    parser.add_argument("--step-at-s", type=float, default=d.step_at_s)
    parser.add_argument("--after-step-s", type=float, default=d.after_step_s, help="run length after the step")
    parser.add_argument("--high-mbit", type=float, default=d.high_mbit)
    parser.add_argument("--queue-ms", type=float, default=d.queue_ms, help="the emulated link's queue")
    parser.add_argument("--poll-s", type=float, default=d.poll_s, help="how often the estimate is recorded")
    parser.add_argument("--check-at-s", type=float, default=d.check_at_s,
                        help="when fixed links are judged (seconds after the first push)")
    parser.add_argument("--deco-from-mbit", type=float, default=d.deco_from_mbit, help="deco-step: before the step")
    parser.add_argument("--deco-to-mbit", type=float, default=d.deco_to_mbit, help="deco-step: after the step")
    parser.add_argument("--deco-delta", type=float, default=d.deco_delta,
                        help="deco-step: deco's bootstrap delta (until the first measured decision)")
    parser.add_argument("--change-check-s", type=float, default=d.change_check_s,
                        help="deco-step: when after the step both directions are judged")
    parser.add_argument("--change-tolerance", type=float, default=d.change_tolerance,
                        help="deco-step: how close to the set link both estimates must be")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--quick", action="store_true",
                        help="short runs and a small model, for smoke tests (numbers are indicative only)")
    parser.add_argument("--series", action="store_true", help="also print every run's time series")
    parser.add_argument("--json", metavar="PATH", help="also write the full time series and summary as JSON")
    return parser


def config_from_args(parser: EnvDefaultsParser, args: Any, argv: Sequence[str]) -> EstimateBenchConfig:
    conditions = tuple(c.strip() for c in args.conditions.split(",") if c.strip())
    unknown = [c for c in conditions if c not in CONDITIONS]
    if not conditions or unknown:
        parser.error(f"--conditions takes {', '.join(CONDITIONS)}; got {args.conditions!r}")
    try:
        windows = tuple(float(w) for w in args.window_s.split(",") if w.strip())
    except ValueError:
        parser.error(f"--window-s takes comma-separated seconds; got {args.window_s!r}")
    values = dict(conditions=conditions, repeat=args.repeat, windows_s=windows, params=args.params,
                  push_elements=args.push_elements, vary=args.vary, compute_ms=args.compute_ms, tau=args.tau,
                  delay_ms=args.delay_ms, fixed_mbit=args.fixed_mbit, fixed_duration_s=args.fixed_duration_s,
                  step_from_mbit=args.step_from_mbit, step_to_mbit=args.step_to_mbit, step_at_s=args.step_at_s,
                  after_step_s=args.after_step_s, high_mbit=args.high_mbit, queue_ms=args.queue_ms,
                  poll_s=args.poll_s, check_at_s=args.check_at_s, seed=args.seed, deco_from_mbit=args.deco_from_mbit,
                  deco_to_mbit=args.deco_to_mbit, deco_delta=args.deco_delta, change_check_s=args.change_check_s,
                  change_tolerance=args.change_tolerance)
    if args.quick:
        # --quick shortens what the command line did not set explicitly.
        given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
        quick = quick_config()
        for name in ("params", "push_elements", "fixed_duration_s", "step_at_s", "after_step_s", "check_at_s",
                     "change_check_s"):
            if "--" + name.replace("_", "-") not in given:
                values[name] = getattr(quick, name)
        values["stable_s"] = quick.stable_s
    config = EstimateBenchConfig(**values)
    if (not windows or min(windows) <= 0 or config.repeat < 1 or config.params < 1 or config.push_elements < 1
            or not 0 <= config.vary < 1 or config.compute_ms < 0 or config.tau < 0 or config.poll_s <= 0
            or min(config.fixed_mbit, config.step_from_mbit, config.step_to_mbit, config.high_mbit) <= 0
            or config.delay_ms < 0 or config.step_at_s <= 0 or config.after_step_s <= 0
            or config.fixed_duration_s < config.check_at_s or config.queue_ms < 0
            or min(config.deco_from_mbit, config.deco_to_mbit) <= 0 or not 0 < config.deco_delta <= 1
            or config.change_check_s <= 0 or config.change_tolerance <= 0
            or ("deco-step" in config.conditions and config.after_step_s < config.change_check_s)):
        parser.error("sizes, counts, rates and durations must be positive, --vary in [0, 1), --deco-delta in (0, 1], "
                     "--fixed-duration-s >= --check-at-s, --after-step-s >= --change-check-s with deco-step")
    if round(config.push_elements * (1 + config.vary)) > config.params:
        parser.error("--push-elements * (1 + --vary) must not exceed --params")
    return config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Received tensors are zero-copy views of read-only bytes; torch warns about that once.
    warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable")
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(parser, args, argv)
    result = run_async(run_estimate_bench(config))
    print(format_result(result, series=args.series))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
