"""Worker metrics on real services: what the optimizer and the session count, and opting out."""
from __future__ import annotations

import math

import pytest
import torch
from prometheus_client import CollectorRegistry

from wanps.worker import Optimizer
from wanps.worker.metrics import WorkerMetrics
from wanps.worker.optimizer import model_fingerprint
from wanps.worker.session import WorkerSession
from wanps.worker.tasks import get_task

pytestmark = pytest.mark.timeout(120)

STEPS = 12


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_an_optimizer_counts_pushes_bytes_decisions_and_staleness(make_cluster):
    cluster = make_cluster(min_workers=1, tau_max=3, policy="static", tau=1, delta=0.1)
    task = get_task("synthetic")
    model = task.build_model(1)
    registry = CollectorRegistry()
    opt = Optimizer(model.parameters(), server=cluster.server_address, controller=cluster.controller_address,
                    lr=0.2, registry=registry)
    try:
        assert value(registry, "wanps_worker_id") == opt.worker_id
        batches = task.batches(opt.rank, opt.world_size, 32, 1)
        for _ in range(STEPS):
            x, y = next(batches)
            opt.zero_grad()
            task.loss(model, x, y).backward()
            opt.step()
            assert value(registry, "wanps_worker_round") == opt.round - 1  # the round just computed
    finally:
        opt.close()
    assert value(registry, "wanps_worker_pushes_total", kind="update") == STEPS
    assert value(registry, "wanps_worker_pushes_total", kind="skip") == 0
    assert value(registry, "wanps_worker_sent_bytes_total") == opt.bytes_up > 0
    assert value(registry, "wanps_worker_received_bytes_total") == opt.bytes_down > 0
    # Every push was acknowledged (close waits for them) and timed.
    assert value(registry, "wanps_worker_push_duration_seconds_count") == STEPS
    assert value(registry, "wanps_worker_push_duration_seconds_sum") > 0
    assert value(registry, "wanps_worker_tau") == 1
    assert value(registry, "wanps_worker_delta") == pytest.approx(0.1)
    assert value(registry, "wanps_worker_decisions_applied_total") == 1
    assert value(registry, "wanps_worker_compression_ratio") == math.ceil(0.1 * opt.num_params) / opt.num_params
    # tau 1: each update was computed at most one round behind its round; the first at version 0.
    assert value(registry, "wanps_worker_update_staleness_rounds_count") == STEPS
    assert value(registry, "wanps_worker_update_staleness_rounds_bucket", le="1.0") == STEPS
    assert value(registry, "wanps_worker_update_staleness_rounds_bucket", le="0.0") >= 1


def test_a_skip_record_is_counted_as_a_skip(make_cluster):
    cluster = make_cluster(min_workers=1, policy=None)
    registry = CollectorRegistry()
    session = WorkerSession(cluster.server_address, metrics=WorkerMetrics(registry))
    try:
        params = [torch.zeros(16)]
        reply = session.join(16, model_fingerprint(params))
        session.seed(params[0])
        session.pull(10)
        assert session.push(0, 0, None).result(10).version == 1  # the only member skipped: round 0 closed
    finally:
        session.close()
    assert value(registry, "wanps_worker_pushes_total", kind="skip") == 1
    assert value(registry, "wanps_worker_pushes_total", kind="update") == 0
    assert value(registry, "wanps_worker_update_staleness_rounds_count") == 0  # a skip carries no update
    assert value(registry, "wanps_worker_id") == reply.worker_id
    assert cluster.server_registry.get_sample_value("wanps_server_pushes_total", {"kind": "skip"}) == 1


def test_without_a_registry_nothing_is_counted(make_cluster):
    cluster = make_cluster(min_workers=1, policy=None)
    model = torch.nn.Linear(4, 2)
    opt = Optimizer(model.parameters(), server=cluster.server_address, lr=0.1, tau=0, delta=0.5)
    try:
        assert opt.metrics is None and opt.session.metrics is None
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
    finally:
        opt.close()
    assert opt.bytes_up > 0


def test_worker_cli_metrics_port_flag_and_environment(monkeypatch):
    from wanps.worker.cli import build_parser

    assert build_parser().parse_args([]).metrics_port == -1  # off by default: workers share machines
    assert build_parser().parse_args(["--metrics-port", "off"]).metrics_port == -1
    assert build_parser().parse_args(["--metrics-port", "0"]).metrics_port == 0
    monkeypatch.setenv("WANPS_WORKER_METRICS_PORT", "9102")
    monkeypatch.setenv("WANPS_WORKER_METRICS_HOST", "0.0.0.0")
    args = build_parser().parse_args([])
    assert (args.metrics_host, args.metrics_port) == ("0.0.0.0", 9102)
    assert build_parser().parse_args(["--metrics-port", "0"]).metrics_port == 0  # the flag wins
    for bad in ("70000", "-2", "many"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--metrics-port", bad])
