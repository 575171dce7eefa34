"""The controller's gRPC edge: streams decisions, takes link samples from workers.

The walking skeleton's policies (`dsgd`, `static`) decide once, at round 0. Samples are
kept per worker in a bounded window for the estimators that adaptive policies use.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from wanps.controller.decisions import POLICIES, Decision, DecisionBook, dsgd_decision, static_decision
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.deploy.runtime import add_health_and_reflection, grpc_channel_options, start_metrics_endpoint

log = logging.getLogger("wanps.controller")


@dataclass(frozen=True)
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 50052
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9101
    policy: str = "static"
    tau: int = 2
    delta: float = 0.01
    # Link samples kept per worker.
    sample_window: int = 512
    max_message_bytes: int = 4 * 1024 * 1024
    use_uvloop: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if self.tau < 0 or not 0.0 < self.delta <= 1.0:
            raise ValueError(f"need tau >= 0 and delta in (0, 1]; got tau {self.tau}, delta {self.delta}")


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.samples = Counter("wanps_controller_samples", "Link samples received, by kind.", ["kind"], registry=registry)
        self.decisions = Counter("wanps_controller_decisions", "Decisions made, by policy.", ["policy"], registry=registry)
        self.tau = Gauge("wanps_controller_tau", "Staleness tau of the newest decision.", registry=registry)
        self.delta = Gauge("wanps_controller_delta", "Compression ratio delta of the newest decision.", registry=registry)
        self.max_round = Gauge("wanps_controller_reported_round", "Newest round any worker reported.", registry=registry)
        self.subscribers = Gauge("wanps_controller_subscribers", "Open decision streams.", registry=registry)


def decision_message(decision: Decision) -> pb.Decision:
    return pb.Decision(
        decision_id=decision.decision_id,
        from_round=decision.from_round,
        tau=decision.tau,
        delta=decision.delta,
        policy=decision.policy,
        reason=decision.reason,
    )


class ControllerService(pb_grpc.ControllerServicer):
    def __init__(self, config: ControllerConfig, metrics: ControllerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.book = DecisionBook()
        self.samples: dict[int, deque[pb.LinkSample]] = {}
        self.reported_round = 0
        self._changed = asyncio.Event()
        self._closing = False
        self._decide_initial()

    def _decide_initial(self) -> None:
        if self.config.policy == "dsgd":
            tau, delta, reason = dsgd_decision()
        else:
            tau, delta, reason = static_decision(self.config.tau, self.config.delta)
        self.decide(0, tau, delta, self.config.policy, reason)

    def decide(self, from_round: int, tau: int, delta: float, policy: str, reason: str) -> Decision:
        """Record a decision and stream it to every subscriber. Call on the event loop."""
        decision = self.book.add(from_round, tau, delta, policy, reason)
        self._publish(decision)
        return decision

    def _publish(self, decision: Decision) -> None:
        self.metrics.decisions.labels(policy=decision.policy).inc()
        self.metrics.tau.set(decision.tau)
        self.metrics.delta.set(decision.delta)
        log.info("decision %d from round %d: tau %d delta %g (%s)", decision.decision_id, decision.from_round,
                 decision.tau, decision.delta, decision.reason)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        self._closing = True
        self._changed.set()

    async def Decisions(self, request: pb.DecisionsRequest, context) -> AsyncIterator[pb.Decision]:
        sent: set[int] = set()
        self.metrics.subscribers.inc()
        try:
            while not self._closing:
                changed = self._changed
                for decision in self.book.relevant(self.reported_round):
                    if decision.decision_id not in sent:
                        sent.add(decision.decision_id)
                        yield decision_message(decision)
                await changed.wait()
        finally:
            self.metrics.subscribers.dec()

    async def Report(self, request: pb.ReportRequest, context) -> pb.ReportReply:
        if len(request.samples) > self.config.sample_window:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"at most {self.config.sample_window} samples per report")
        window = self.samples.setdefault(request.worker_id, deque(maxlen=self.config.sample_window))
        for sample in request.samples:
            if sample.seconds < 0 or sample.kind == pb.LinkSample.KIND_UNSPECIFIED:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sample with no kind or negative seconds")
        for sample in request.samples:
            window.append(sample)
            self.metrics.samples.labels(kind=pb.LinkSample.Kind.Name(sample.kind)).inc()
        if request.round > self.reported_round:
            self.reported_round = request.round
            self.metrics.max_round.set(request.round)
        return pb.ReportReply()


@dataclass
class RunningController:
    server: grpc.aio.Server
    service: ControllerService
    port: int
    metrics_port: int | None
    _metrics_httpd: Any = None

    async def stop(self, grace: float = 2.0) -> None:
        self.service.close()
        await self.server.stop(grace)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()


async def start_controller(config: ControllerConfig, registry: CollectorRegistry | None = None) -> RunningController:
    registry = registry if registry is not None else CollectorRegistry()
    service = ControllerService(config, ControllerMetrics(registry))
    server = grpc.aio.server(options=grpc_channel_options(config.max_message_bytes))
    pb_grpc.add_ControllerServicer_to_server(service, server)
    await add_health_and_reflection(server, pb.DESCRIPTOR.services_by_name["Controller"].full_name)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise RuntimeError(f"could not bind {config.host}:{config.port}")
    await server.start()
    httpd, metrics_port = start_metrics_endpoint(config.metrics_host, config.metrics_port, registry)
    log.info("controller on %s:%d (metrics %s), policy %s", config.host, port, metrics_port, config.policy)
    return RunningController(server=server, service=service, port=port, metrics_port=metrics_port, _metrics_httpd=httpd)
