"""What the services really export: their registries, and the series names Prometheus sees."""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from wanps.worker.metrics import WorkerMetrics

# Series Prometheus makes itself for every target; dashboards may use them too.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def service_registries(cluster) -> dict[str, CollectorRegistry]:
    """A started test cluster's server and controller registries, and a worker's."""
    worker = CollectorRegistry()
    WorkerMetrics(worker)  # what Optimizer(registry=...) and `wanps worker --metrics-port` register
    return {"server": cluster.server_registry, "controller": cluster.controller_registry, "worker": worker}


def series_names(registry: CollectorRegistry) -> set[str]:
    """Names as scraped: counters `_total`, histograms `_bucket`, `_sum`, `_count`, gauges as is.
    (prometheus_client also exposes `_created` timestamps; dashboards have no use for them.)"""
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names
