"""Prometheus metrics of the parameter server, registered on an injected registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Round times span LAN (ms) to badly congested WAN (tens of seconds).
_ROUND_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rounds_closed = Counter(
            "wanps_server_rounds_closed", "Rounds aggregated and applied to the model.", registry=registry
        )
        self.pushes = Counter(
            "wanps_server_pushes",
            "Pushes accepted, by kind: update (a sparse or dense update), skip (reuse the stored update), "
            "duplicate (a replay, acknowledged and ignored), late (for a round closed at its deadline without it).",
            ["kind"],
            registry=registry,
        )
        self.push_rejected = Counter(
            "wanps_server_push_rejected", "Pushes refused, by gRPC status code.", ["code"], registry=registry
        )
        self.received_bytes = Counter(
            "wanps_server_received_bytes", "Tensor payload bytes received in pushes and seeds.", registry=registry
        )
        self.sent_bytes = Counter(
            "wanps_server_sent_bytes", "Tensor payload bytes sent in deltas and model pulls (and downlink probes).",
            registry=registry
        )
        self.probe_bytes = Counter(
            "wanps_server_probe_bytes",
            "Bandwidth-probe padding in pings, by direction: up (the worker's padding, received), "
            "down (the reply's, sent). Also counted in received_bytes and sent_bytes.",
            ["direction"], registry=registry,
        )
        self.round_duration = Histogram(
            "wanps_server_round_duration_seconds",
            "Wall time between successive round closures.",
            buckets=_ROUND_SECONDS_BUCKETS,
            registry=registry,
        )
        self.staleness = Histogram(
            "wanps_server_update_staleness_rounds",
            "Staleness of applied updates: round minus the model version it was computed at.",
            buckets=_STALENESS_BUCKETS,
            registry=registry,
        )
        self.members = Gauge("wanps_server_members", "Workers expected in the current round.", registry=registry)
        self.model_version = Gauge("wanps_server_model_version", "Rounds applied to the model.", registry=registry)
        self.delta_elements = Gauge(
            "wanps_server_delta_elements", "Elements in the last broadcast delta.", registry=registry
        )
        self.history_bytes = Gauge(
            "wanps_server_history_bytes",
            "Payload bytes of the closed rounds kept for Updates followers (bounded by --history-mb).",
            registry=registry,
        )
        self.members_expired = Counter(
            "wanps_server_members_expired", "Workers removed because their lease ran out.", registry=registry
        )
        self.rounds_overdue = Counter(
            "wanps_server_rounds_overdue", "Rounds closed at their deadline without their stragglers.",
            registry=registry,
        )
        self.resumes = Counter(
            "wanps_server_resumes", "Resume calls from reconnecting workers, by outcome (member, gone).",
            ["outcome"], registry=registry,
        )
        self.checkpoints = Counter(
            "wanps_server_checkpoints", "Checkpoints written.", registry=registry
        )
        self.checkpoint_duration = Histogram(
            "wanps_server_checkpoint_duration_seconds", "Time to write one checkpoint (serialize, fsync, rename).",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30), registry=registry,
        )
        self.background_errors = Counter(
            "wanps_server_background_errors",
            "Failures of the server's background work, by task: sweep (leases, round deadlines), checkpoint "
            "(snapshot or write), release (returning memory), touch (a lease renewal). Each is logged with its "
            "exception; the task keeps running.",
            ["task"], registry=registry,
        )
        self.checkpoint_version = Gauge(
            "wanps_server_checkpoint_version", "Model version of the last checkpoint written.", registry=registry
        )
        # Per-follower downlink compression (server/downlink.py, UpdatesRequest.downlink_delta).
        self.compressed_followers = Gauge(
            "wanps_server_compressed_followers",
            "Updates streams with their own downlink compression (bounded by --max-compressed-followers).",
            registry=registry,
        )
        self.downlink_residual_bytes = Gauge(
            "wanps_server_downlink_residual_bytes",
            "Memory held for compressed followers' downlink residuals: 4 bytes per parameter each.",
            registry=registry,
        )
        self.compressed_downlink_bytes = Counter(
            "wanps_server_compressed_downlink_bytes",
            "Tensor payload bytes of compressed followers' own rounds (also counted in sent_bytes).",
            registry=registry,
        )
        # Which key-range shard this server is (0 of 1: the single server); every other series is this shard's.
        self.shard_index = Gauge("wanps_server_shard_index", "This server's shard index (--shard I/N: I).",
                                 registry=registry)
        self.shard_count = Gauge("wanps_server_shard_count", "Shards of the cluster (--shard I/N: N).",
                                 registry=registry)
