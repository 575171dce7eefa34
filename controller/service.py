"""The controller's gRPC edge: streams decisions, takes link samples, admin calls.

The state and the decision loop live in `ControllerCore` (controller/engine.py); this
module decodes reports, streams the decision book, and exports metrics.

Single writer: every call into the core (reports with their estimators and Theil-Sen fits,
policy switches, reads of the book and the estimates) runs on one dedicated thread, so the
core needs no locks and its work never stalls the event loop that serves every worker's
streams. A report refreshes only its own worker's gauges (and the cluster's), so the
gauge work per second is O(workers), not O(workers^2).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from wanps.proto.decisions import Decision, decision_to_message
from wanps.controller.engine import ControllerCore, Report, TooManyPendingDecisions, with_policy
from wanps.controller.estimator import (DIRECTION_DOWN, DIRECTION_UP, KIND_COMPUTE, KIND_DOWNLOAD, KIND_PING, KIND_PUSH,
                                       EstimatorConfig, Sample)
from wanps.controller.policy import PolicyConfig
from wanps.proto import wanps_pb2 as pb
from wanps.proto.wire import MAX_PARAMS, MAX_SAMPLES_PER_REPORT
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.rpc.serving import RunningService, ServeConfig, start_grpc_service
from wanps.rpc.errors import InvalidArgument, OutOfRange, ResourceExhausted
from wanps.rpc.limits import StreamLimiter
from wanps.rpc.status import mapped_errors

log = logging.getLogger("wanps.controller")

T = TypeVar("T")

# Rounds beyond this are refused (OUT_OF_RANGE): decisions are scheduled rounds ahead of the
# newest reported round and must still fit the wire's uint64 (2**62 rounds is ~146 years at 1 GHz).
MAX_ROUND = 2**62
# One-way transfer times (LinkSample.transfer_s) and overheads above an hour are no link's or step's.
MAX_TRANSFER_S = 3600.0


@dataclass(frozen=True)
class ControllerConfig(ServeConfig):
    """The controller's settings: how it serves (ServeConfig) and how it estimates and decides."""

    port: int = 50052
    metrics_port: int = 9101
    # Reports and decisions are small; the largest message is a report of max_samples_per_report samples.
    max_message_bytes: int = 4 * 1024 * 1024
    policy: PolicyConfig = PolicyConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    max_samples_per_report: int = MAX_SAMPLES_PER_REPORT
    # Open Decisions streams per worker id (a worker needs one; reconnects briefly overlap).
    max_streams_per_worker: int = 8
    # Workers with link estimates at once; a new id past it evicts ids silent for window_s, or is refused.
    max_workers: int = 1024


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples = Counter("wanps_controller_samples", "Link samples received, by kind.", ["kind"], registry=registry)
        self.decisions = Counter("wanps_controller_decisions", "Decisions made, by policy.", ["policy"],
                                 registry=registry)
        self.tau = Gauge("wanps_controller_tau", "Staleness tau of the newest decision.", registry=registry)
        self.delta = Gauge("wanps_controller_delta", "Compression ratio delta of the newest decision.",
                           registry=registry)
        self.max_round = Gauge("wanps_controller_reported_round", "Newest round any worker reported.",
                               registry=registry)
        self.subscribers = Gauge("wanps_controller_subscribers", "Open decision streams.", registry=registry)
        # Worker ids as labels: membership is small and bounded (docs/metrics.md).
        self.bandwidth = Gauge("wanps_controller_link_bandwidth_bits_per_second",
                               "Estimated (uplink) bandwidth of each worker's link.", ["worker"], registry=registry)
        self.down_bandwidth = Gauge("wanps_controller_link_down_bandwidth_bits_per_second",
                                    "Estimated downlink bandwidth of each worker's link (estimated apart from the uplink).",
                                    ["worker"], registry=registry)
        self.latency = Gauge("wanps_controller_link_latency_seconds", "Estimated latency (RTT) of each worker's link.",
                             ["worker"], registry=registry)
        self.t_comp = Gauge("wanps_controller_compute_seconds", "Median compute time per step of each worker.",
                            ["worker"], registry=registry)
        self.predicted_iteration = Gauge("wanps_controller_predicted_iteration_seconds",
                                         "Theorem 3's average iteration time for the newest decision.",
                                         registry=registry)
        self.measured_iteration = Gauge("wanps_controller_measured_iteration_seconds",
                                        "Seconds per round over the recent reports.", registry=registry)
        self.bits_per_element = Gauge("wanps_controller_bits_per_element",
                                      "Wire bits per sent element DeCo prices a push at (measured or configured).",
                                      registry=registry)


_SAMPLE_KINDS = {
    pb.LinkSample.KIND_PUSH: KIND_PUSH,
    pb.LinkSample.KIND_PING: KIND_PING,
    pb.LinkSample.KIND_COMPUTE: KIND_COMPUTE,
    pb.LinkSample.KIND_DOWNLOAD: KIND_DOWNLOAD,
}
_DIRECTIONS = {
    pb.LinkSample.DIRECTION_UNSPECIFIED: "",
    pb.LinkSample.DIRECTION_UP: DIRECTION_UP,
    pb.LinkSample.DIRECTION_DOWN: DIRECTION_DOWN,
}


class ControllerService(pb_grpc.ControllerServicer):
    def __init__(self, config: ControllerConfig, metrics: ControllerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        # Decision ids start at the wall clock in ms: above any id a previous controller gave out.
        self.core = ControllerCore(config.policy, config.estimator, first_decision_id=time.time_ns() // 1_000_000)
        # The core's one thread (see the module): every call into it goes through _on_core.
        self._core_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanps-controller-core")
        self._changed = asyncio.Event()
        self._closing = False
        self._streams = StreamLimiter(config.max_streams_per_worker)
        self._last_report: dict[int, float] = {}  # worker id -> when it last reported (for max_workers)
        # No decision before the first report: a restarted controller must learn the round the
        # workers are at before it schedules anything (workers report as soon as they connect).

    async def _on_core(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._core_thread, function, *args)

    async def decide(self, from_round: int, tau: int, delta: float, policy: str, reason: str,
                     worker_downlink_delta: dict[int, float] | None = None) -> Decision:
        """Record a decision by hand and stream it to every subscriber (tests, drills)."""
        decision = await self._on_core(self.core.decide, from_round, tau, delta, policy, reason,
                                       worker_downlink_delta)
        self._publish(decision)
        return decision

    def _publish(self, decision: Decision | None) -> None:
        if decision is None:
            return
        self.metrics.decisions.labels(policy=decision.policy).inc()
        self.metrics.tau.set(decision.tau)
        self.metrics.delta.set(decision.delta)
        self.metrics.predicted_iteration.set(decision.predicted_iter_s)
        log.info("decision %d from round %d: tau %d delta %g (%s)", decision.decision_id, decision.from_round,
                 decision.tau, decision.delta, decision.reason)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def begin_shutdown(self) -> None:
        self._closing = True
        self._changed.set()

    def close(self) -> None:
        self.begin_shutdown()
        self._core_thread.shutdown(wait=True, cancel_futures=True)

    async def Decisions(self, request: pb.DecisionsRequest, context) -> AsyncIterator[pb.Decision]:
        sent: set[int] = set()
        async with mapped_errors(context):
            self._streams.acquire(request.worker_id, "Decisions")
        self.metrics.subscribers.inc()
        try:
            while not self._closing:
                changed = self._changed
                relevant = await self._on_core(self._relevant_decisions)
                for decision in relevant:
                    if decision.decision_id not in sent:
                        sent.add(decision.decision_id)
                        yield decision_to_message(decision)
                sent &= {decision.decision_id for decision in relevant}  # bounded like the book
                await changed.wait()
        finally:
            self.metrics.subscribers.dec()
            self._streams.release(request.worker_id)

    def _relevant_decisions(self) -> list[Decision]:
        return self.core.book.relevant(self.core.reported_round)

    async def Report(self, request: pb.ReportRequest, context) -> pb.ReportReply:
        now = time.monotonic()
        async with mapped_errors(context):
            decision = await self._on_core(self._report_on_core, request, now)
        self._publish(decision)
        return pb.ReportReply()

    def _report_on_core(self, request: pb.ReportRequest, now: float) -> Decision | None:
        samples = self._accept_report(request, now)
        for sample in samples:
            self.metrics.samples.labels(kind=sample.kind).inc()
        decision = self.core.report(Report(request.worker_id, request.round, request.num_params, tuple(samples)), now)
        self._refresh_gauges(request.worker_id)
        return decision

    def _accept_report(self, request: pb.ReportRequest, now: float) -> list[Sample]:
        """Validate a report whole (a refused one changes nothing) and decode its samples."""
        if len(request.samples) > self.config.max_samples_per_report:
            raise ResourceExhausted(f"at most {self.config.max_samples_per_report} samples per report")
        if request.round > MAX_ROUND or any(sample.round > MAX_ROUND for sample in request.samples):
            raise OutOfRange(f"rounds are limited to {MAX_ROUND}")
        if request.num_params > MAX_PARAMS:
            raise InvalidArgument(f"num_params must be <= {MAX_PARAMS}")
        samples = []
        for sample in request.samples:
            kind = _SAMPLE_KINDS.get(sample.kind)
            if kind is None or not sample.seconds >= 0 or not math.isfinite(sample.seconds):
                raise InvalidArgument("a sample needs a kind and seconds >= 0")
            if not math.isfinite(sample.grad_norm) or sample.grad_norm < 0:
                raise InvalidArgument("grad_norm must be finite and >= 0")
            if sample.elements > MAX_PARAMS:
                raise InvalidArgument(f"a push carries at most {MAX_PARAMS} elements")
            direction = _DIRECTIONS.get(sample.direction)
            if direction is None:
                raise InvalidArgument(f"unknown sample direction {sample.direction}")
            if sample.timed_bytes > sample.bytes:
                raise InvalidArgument(f"timed_bytes {sample.timed_bytes} exceeds the sample's bytes {sample.bytes}")
            if not 0 <= sample.queued_s <= sample.seconds:
                raise InvalidArgument(f"queued_s must be within [0, seconds]; got {sample.queued_s} of {sample.seconds}")
            # A download's one-way transfer may exceed its `seconds` (first to last chunk): only bounded.
            if not (math.isfinite(sample.transfer_s) and 0 <= sample.transfer_s <= MAX_TRANSFER_S):
                raise InvalidArgument(f"transfer_s must be within [0, {MAX_TRANSFER_S:g}] seconds; got {sample.transfer_s}")
            if sample.has_one_way and not math.isfinite(sample.one_way_up_s):
                raise InvalidArgument("one_way_up_s must be finite")
            if not (math.isfinite(sample.overhead_s) and 0 <= sample.overhead_s <= MAX_TRANSFER_S):
                raise InvalidArgument(f"overhead_s must be within [0, {MAX_TRANSFER_S:g}] seconds; got {sample.overhead_s}")
            samples.append(Sample(kind=kind, nbytes=sample.bytes, seconds=sample.seconds, at_s=now, round=sample.round,
                                  grad_norm=sample.grad_norm, elements=sample.elements, direction=direction,
                                  timed_bytes=sample.timed_bytes, queued_s=sample.queued_s,
                                  transfer_s=sample.transfer_s,
                                  one_way_up_s=sample.one_way_up_s if sample.has_one_way else None,
                                  overhead_s=sample.overhead_s))
        if request.worker_id not in self._last_report and not self._make_room(now):
            raise ResourceExhausted(f"the controller tracks at most {self.config.max_workers} workers' links "
                                    f"(--max-workers); none has been silent for {self.config.estimator.window_s:g} s")
        self._last_report[request.worker_id] = now
        return samples

    def _make_room(self, now: float) -> bool:
        """Room for one more worker's estimates: forget those silent for a whole window if full."""
        if len(self._last_report) < self.config.max_workers:
            return True
        for worker_id, last in list(self._last_report.items()):
            if now - last > self.config.estimator.window_s:
                del self._last_report[worker_id]
                self.core.forget(worker_id, now)
                for gauge in (self.metrics.bandwidth, self.metrics.down_bandwidth, self.metrics.latency,
                              self.metrics.t_comp):
                    try:
                        gauge.remove(str(worker_id))
                    except KeyError:
                        pass
        return len(self._last_report) < self.config.max_workers

    def _refresh_gauges(self, worker_id: int) -> None:
        """After `worker_id`'s report: its link gauges (only its estimate changed) and the cluster's."""
        self.metrics.max_round.set(self.core.reported_round)
        estimate = self.core.estimates.get(worker_id)
        if estimate is not None:
            self.metrics.bandwidth.labels(worker=str(worker_id)).set(estimate.bandwidth_bps)
            if estimate.down_bandwidth_bps is not None:
                self.metrics.down_bandwidth.labels(worker=str(worker_id)).set(estimate.down_bandwidth_bps)
            self.metrics.latency.labels(worker=str(worker_id)).set(estimate.latency_s)
            if estimate.t_comp_s is not None:
                self.metrics.t_comp.labels(worker=str(worker_id)).set(estimate.t_comp_s)
        self.metrics.bits_per_element.set(self.core.bits_per_element())
        measured = self.core.measured_iteration_s()
        if measured is not None:
            self.metrics.measured_iteration.set(measured)

    async def SetPolicy(self, request: pb.SetPolicyRequest, context) -> pb.SetPolicyReply:
        async with mapped_errors(context):
            decision, policy = await self._on_core(self._set_policy_on_core, request, time.monotonic())
        self._publish(decision)
        log.info("policy switched to %s", policy.name)
        return pb.SetPolicyReply(decision=decision_to_message(decision)) if decision else pb.SetPolicyReply()

    def _set_policy_on_core(self, request: pb.SetPolicyRequest, now: float) -> tuple[Decision | None, PolicyConfig]:
        try:
            policy = with_policy(self.core.policy, request.policy,
                                 request.tau if request.policy == "static" else None,
                                 request.delta if request.policy == "static" else None)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        try:
            return self.core.set_policy(policy, now), policy
        except TooManyPendingDecisions as exc:
            raise ResourceExhausted(str(exc)) from None

    async def GetState(self, request: pb.GetStateRequest, context) -> pb.ControllerState:
        return await self._on_core(self._state_on_core)

    def _state_on_core(self) -> pb.ControllerState:
        core = self.core
        links = [pb.WorkerLink(worker_id=w, bandwidth_bps=e.bandwidth_bps, latency_s=e.latency_s,
                               t_comp_s=e.t_comp_s or 0.0, push_samples=e.push_samples, ping_samples=e.ping_samples,
                               method=e.method, down_bandwidth_bps=e.down_bandwidth_bps or 0.0,
                               down_samples=e.down_samples, down_method=e.down_method or "")
                 for w, e in sorted(core.estimates.items())]
        return pb.ControllerState(policy=core.policy.name, reported_round=core.reported_round,
                                  decisions=[decision_to_message(d) for d in core.book.relevant(core.reported_round)],
                                  links=links, traffic_factor=core.traffic_factor(),
                                  bits_per_element=core.bits_per_element(), time_model=core.policy.time_model,
                                  overhead_s=core.overhead_s(), objective=core.policy.objective,
                                  staleness_weight=core.policy.staleness_weight,
                                  compression_knee=core.policy.compression_knee)


RunningController = RunningService[ControllerService]


async def start_controller(config: ControllerConfig, registry: CollectorRegistry | None = None) -> RunningController:
    registry = registry if registry is not None else CollectorRegistry()
    service = ControllerService(config, ControllerMetrics(registry))
    running = await start_grpc_service(
        service, pb_grpc.add_ControllerServicer_to_server, pb.DESCRIPTOR.services_by_name["Controller"].full_name,
        config, registry)
    log.info("controller on %s:%d (metrics %s), policy %s, %s", config.host, running.port, running.metrics_port,
             config.policy.name, config.security.describe())
    return running
