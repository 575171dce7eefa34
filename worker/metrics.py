"""Prometheus metrics of a worker, registered on an injected registry.

Library users opt in: `Optimizer(..., registry=CollectorRegistry())` counts, `registry=None`
(the default) creates nothing and costs nothing. `wanps worker --metrics-port` serves them.
Each worker process is its own scrape target, so series need no worker label: Prometheus's
`instance` tells workers apart, and `wanps_worker_id` maps an instance to the worker id the
server and the controller use.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Send-to-acknowledgement of one push: LAN (ms) to a congested WAN with a dense model (tens of s).
_PUSH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pushes = Counter("wanps_worker_pushes",
                              "Rounds pushed, by kind: update (a sparse or dense update) or skip (a skip record).",
                              ["kind"], registry=registry)
        self.sent_bytes = Counter("wanps_worker_sent_bytes",
                                  "Tensor payload bytes sent: pushes, the seed, bandwidth probes.", registry=registry)
        self.received_bytes = Counter("wanps_worker_received_bytes",
                                      "Tensor payload bytes received: deltas and model pulls.", registry=registry)
        self.push_seconds = Histogram("wanps_worker_push_duration_seconds",
                                      "Round trip of a push, from sending to the server's acknowledgement.",
                                      buckets=_PUSH_SECONDS_BUCKETS, registry=registry)
        self.staleness = Histogram("wanps_worker_update_staleness_rounds",
                                   "Staleness of pushed updates: round minus the replica version it was computed at.",
                                   buckets=_STALENESS_BUCKETS, registry=registry)
        self.compression_ratio = Gauge("wanps_worker_compression_ratio",
                                       "Elements sent in the last update divided by the model's parameters.",
                                       registry=registry)
        self.tau = Gauge("wanps_worker_tau", "Staleness bound tau in force (after clamping to the server's tau_max).",
                         registry=registry)
        self.delta = Gauge("wanps_worker_delta", "Compression ratio delta in force for this worker.",
                           registry=registry)
        self.decisions_applied = Counter("wanps_worker_decisions_applied",
                                         "Controller decisions that came into force on this worker.",
                                         registry=registry)
        self.round = Gauge("wanps_worker_round", "The round this worker computes next.", registry=registry)
        self.worker_id = Gauge("wanps_worker_id", "The worker id the server gave this worker (-1 before joining).",
                               registry=registry)
        self.worker_id.set(-1)
        self._decision_id: int | None = None
        for kind in ("update", "skip"):  # both series exist from the start, so rate() is 0, not absent
            self.pushes.labels(kind=kind)

    def record_push(self, round_: int, computed_at_version: int, elements: int | None, num_params: int) -> None:
        """One push of `elements` elements (None: a skip record)."""
        if elements is None:
            self.pushes.labels(kind="skip").inc()
            return
        self.pushes.labels(kind="update").inc()
        self.staleness.observe(round_ - computed_at_version)
        if num_params:
            self.compression_ratio.set(elements / num_params)

    def record_decision(self, decision_id: int, tau: int, delta: float, next_round: int) -> None:
        """The decision in force for the round about to be computed (id 0: the local fallback,
        not a controller decision)."""
        if decision_id != self._decision_id:
            self._decision_id = decision_id
            if decision_id > 0:
                self.decisions_applied.inc()
        self.tau.set(tau)
        self.delta.set(delta)
        self.round.set(next_round)
