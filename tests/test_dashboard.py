"""The Grafana dashboard and its provisioning: every query parses and uses only exported metrics."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import promql_parser
import pytest
import yaml

from exported import PROMETHEUS_SERIES, series_names, service_registries

GRAFANA = Path(__file__).resolve().parents[1] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "wanps.json"
# Grafana's built-in interval variables, replaced by a duration so that Prometheus's parser reads the query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "15m"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, rows' panels included."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(dashboard["panels"])
    for panel in dashboard["panels"]:
        panels += panel.get("panels", [])
    return [(panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])]


def as_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(node) -> set[str]:
    """Every metric name a parsed PromQL expression selects (by name or by a __name__ matcher)."""
    if isinstance(node, promql_parser.VectorSelector):
        names = {node.name} if node.name else set()
        for matcher in node.matchers.matchers:
            if matcher.name == "__name__":
                assert matcher.op == promql_parser.MatchOp.Equal, "select metrics by exact name only"
                names.add(matcher.value)
        return names
    if isinstance(node, promql_parser.MatrixSelector):
        return metric_names(node.vector_selector)
    if isinstance(node, promql_parser.Call):
        return set().union(*(metric_names(arg) for arg in node.args))
    if isinstance(node, promql_parser.BinaryExpr):
        return metric_names(node.lhs) | metric_names(node.rhs)
    if isinstance(node, promql_parser.AggregateExpr):
        return metric_names(node.expr) | (metric_names(node.param) if node.param is not None else set())
    if isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        return metric_names(node.expr)
    if isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)):
        return set()
    raise AssertionError(f"unexpected PromQL node {type(node).__name__}")


def test_metric_names_follow_the_parse_tree():
    tree = promql_parser.parse('sum by (le) (rate(a_bucket{x="1"}[1m])) / on() group_left -b + {__name__="c"} '
                               'offset 5m + max_over_time(d[5m:1m])')
    assert metric_names(tree) == {"a_bucket", "b", "c", "d"}


def test_every_query_uses_only_metrics_the_services_export(make_cluster):
    exported = set(PROMETHEUS_SERIES)
    for registry in service_registries(make_cluster(policy="static")).values():
        exported |= series_names(registry)
    queries = dashboard_queries()
    assert len(queries) >= 20
    used: set[str] = set()
    for title, expr in queries:
        names = metric_names(promql_parser.parse(as_promql(expr)))
        assert names, f"panel {title!r}: {expr!r} selects no metric"
        assert names <= exported, f"panel {title!r} uses {sorted(names - exported)}, which nothing exports"
        used |= names
    # The panels issue 5 asks for, by the metrics they need.
    for needed in ("wanps_server_rounds_closed_total", "wanps_controller_predicted_iteration_seconds",
                   "wanps_server_round_duration_seconds_sum", "wanps_worker_sent_bytes_total",
                   "wanps_worker_received_bytes_total", "wanps_worker_compression_ratio",
                   "wanps_server_update_staleness_rounds_bucket", "wanps_controller_link_bandwidth_bits_per_second",
                   "wanps_controller_link_latency_seconds", "wanps_server_pushes_total",
                   "wanps_worker_pushes_total", "wanps_grpc_server_handled_total"):
        assert needed in used, f"no panel shows {needed}"


def test_histogram_quantiles_read_buckets_by_le():
    for title, expr in dashboard_queries():
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), f"panel {title!r}: {expr}"


def test_prometheus_itself_parses_every_query(tmp_path):
    """The queries as recording rules, checked by the promtool of the Prometheus we run."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (`make test` installs Debian's prometheus, which has it)")
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"wanps:dashboard:query{i}", "expr": as_promql(expr)}
        for i, (_title, expr) in enumerate(dashboard_queries())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_points_the_dashboard_at_the_compose_prometheus():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == source["uid"], panel["title"]
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "wanps.yml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"] and providers[0]["options"]["path"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
