"""docs/metrics.md and the metrics the services really register agree, both ways."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from exported import service_registries as registries_of

CATALOGUE = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
SERVICES = ("server", "controller", "worker")

# (exposed name, type, label names)
Entry = tuple[str, str, frozenset[str]]


def catalogue() -> dict[str, set[Entry]]:
    """Per service, the metrics its sections of docs/metrics.md list."""
    listed: dict[str, set[Entry]] = {service: set() for service in SERVICES}
    exporters: tuple[str, ...] = ()
    for line in CATALOGUE.read_text().splitlines():
        if line.startswith("## "):
            exporters = tuple(re.findall(r"wanps (server|controller|worker)\b", line))
        elif line.startswith("| `wanps_"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            name, kind, unit, labels, meaning = cells[0].strip("`"), cells[1], cells[2], cells[3], cells[4]
            assert unit and meaning, f"{name}: every metric needs its unit and meaning"
            label_names = frozenset(re.findall(r"`(\w+)`", labels))
            assert exporters, f"{name} is listed under no service's section"
            for service in exporters:
                listed[service].add((name, kind, label_names))
    return listed


def registered(registry: CollectorRegistry) -> set[Entry]:
    entries = set()
    # prometheus_client has no public way to read the label names of a metric that has no
    # children yet, so this reads the collectors the registry holds.
    for collector in registry._collector_to_names:  # noqa: SLF001
        for family in collector.describe():
            name = family.name + "_total" if family.type == "counter" else family.name
            entries.add((name, family.type, frozenset(getattr(collector, "_labelnames", ()))))
    return entries


@pytest.fixture
def service_registries(make_cluster) -> dict[str, CollectorRegistry]:
    """The registries of a real server and controller (as started), and a worker's."""
    return registries_of(make_cluster(policy="static"))


@pytest.mark.parametrize("service", SERVICES)
def test_catalogue_lists_exactly_what_each_service_registers(service, service_registries):
    documented = catalogue()[service]
    actual = registered(service_registries[service])
    assert actual - documented == set(), f"registered by {service} but not (or differently) in docs/metrics.md"
    assert documented - actual == set(), f"in docs/metrics.md for {service} but not registered (or differently)"


def test_catalogue_follows_the_naming_conventions():
    for service, entries in catalogue().items():
        for name, kind, labels in entries:
            assert name.startswith("wanps_"), name
            assert kind in ("counter", "gauge", "histogram"), (name, kind)
            assert name.endswith("_total") == (kind == "counter"), f"{name}: only counters end in _total"
            assert not re.search(r"_(milliseconds|ms|kb|kib|mb|mib|mbit)(_|$)", name), f"{name}: use base units"
            assert "le" not in labels and "instance" not in labels and "job" not in labels, name
