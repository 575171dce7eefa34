"""A real Prometheus scrapes a real cluster; the shipped config passes promtool.

`make test` installs Debian's `prometheus` (with `promtool`) when missing (`make system-deps`).
Run outside make without it, these tests skip and say so.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from wanps.deploy.processes import ManagedProcess, start_process, stop_all, wanps_command

from test_dashboard import as_promql, dashboard_queries

SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "prometheus.yml"
DELTA = 0.05


def need(command: str) -> str:
    path = shutil.which(command)
    if path is None:
        pytest.skip(f"{command} not installed (`make test` installs Debian's prometheus package, which has it)")
    return path


def test_shipped_config_passes_promtool():
    result = subprocess.run([need("promtool"), "check", "config", str(SHIPPED_CONFIG)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shipped_config_scrapes_every_compose_service():
    """The contract with deploy/docker-compose.yml: service names and metrics ports."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    [shards] = jobs["wanps-server"]["dns_sd_configs"]  # every server replica (WANPS_SHARDS of them)
    assert shards == {**shards, "names": ["server"], "type": "A", "port": 9100}
    assert jobs["wanps-controller"]["static_configs"][0]["targets"] == ["controller:9101"]
    [workers] = jobs["wanps-worker"]["dns_sd_configs"]  # every replica of the scaled service
    assert workers == {**workers, "names": ["worker"], "type": "A", "port": 9102}


def free_port() -> int:
    """A port free right now (Prometheus cannot report a port it picked itself)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrometheusApi:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read()) if path.startswith("/api/") else response.read()

    def query(self, expr: str) -> list[dict]:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def values(self, expr: str) -> list[float]:
        return [float(series["value"][1]) for series in self.query(expr)]

    def one(self, expr: str) -> float:
        values = self.values(expr)
        assert len(values) == 1, f"{expr}: expected one series, got {values}"
        return values[0]


def wait_for(what: str, check: Callable[[], Any], timeout: float, process: ManagedProcess) -> Any:
    """Poll `check` until it returns something truthy (bounded); errors count as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if not process.running():
            raise AssertionError(f"{process.name} exited while waiting for {what}:\n{process.tail()}")
        try:
            last = check()
            if last:
                return last
        except OSError as exc:  # not listening yet
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:.0f} s (last: {last!r}); log:\n{process.tail()}")


def scrape_config(server: ManagedProcess, controller: ManagedProcess, workers: list[ManagedProcess]) -> dict:
    def job(name: str, processes: list[ManagedProcess]) -> dict:
        return {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{p.metrics_port}" for p in processes]}]}

    return {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [job("wanps-server", [server]), job("wanps-controller", [controller]),
                               job("wanps-worker", workers)]}


@pytest.mark.timeout(180)
def test_a_real_prometheus_scrapes_server_controller_and_workers(tmp_path):
    prometheus_binary = need("prometheus")
    logs = tmp_path / "logs"
    storage = Path(tempfile.mkdtemp(prefix="wanps-prometheus-"))
    processes: list[ManagedProcess] = []
    try:
        server = start_process("server", wanps_command(
            "server", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--min-workers", "2",
            "--tau-max", "4"), logs)
        controller = start_process("controller", wanps_command(
            "controller", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--policy", "static",
            "--tau", "1", "--delta", str(DELTA)), logs)
        processes += [server, controller]
        server.wait_ready(60)
        controller.wait_ready(60)
        # --max-seconds bounds them even if this test dies between start and stop.
        workers = [start_process(f"worker-{i}", wanps_command(
            "worker", "--server", server.address, "--controller", controller.address, "--task", "synthetic",
            "--batch-size", "32", "--seed", str(i + 1), "--metrics-port", "0", "--max-seconds", "150"), logs)
            for i in range(2)]
        processes += workers
        for worker in workers:
            worker.wait_ready(60)  # its metrics endpoint is up
        assert all(p.metrics_port for p in (server, controller, *workers))

        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(scrape_config(server, controller, workers)))
        port = free_port()
        prometheus = start_process("prometheus", [
            prometheus_binary, f"--config.file={config_path}", f"--storage.tsdb.path={storage}",
            f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"], logs,
            wait_for_line=False)
        processes.append(prometheus)
        api = PrometheusApi(port)
        wait_for("readiness", lambda: api.get("/-/ready"), 60, prometheus)

        def all_targets_up() -> bool:
            targets = api.get("/api/v1/targets")["data"]["activeTargets"]
            return len(targets) == 4 and all(t["health"] == "up" for t in targets)

        wait_for("4 healthy targets", all_targets_up, 60, prometheus)
        assert sorted(api.values('up{job=~"wanps-.*"}')) == [1.0] * 4

        # Rounds advance between two queries (each answered from a later scrape).
        first = wait_for("a closed round", lambda: api.values("wanps_server_rounds_closed_total > 0"), 60,
                         prometheus)[0]
        later = wait_for("more rounds", lambda: [v for v in api.values("wanps_server_rounds_closed_total")
                                                 if v > first], 60, prometheus)[0]
        assert later > first

        # Every dashboard query runs on this Prometheus, and all but the ones about rare events
        # (errors, refused pushes, skips) show data from this healthy cluster once rate() has
        # two scrapes of every series (the controller's counters appear with the first reports).
        rare = ('code!="OK"', "push_rejected", 'kind="skip"')

        def queries_without_data() -> list[tuple[str, str]]:
            return [(title, expr) for title, expr in dashboard_queries()
                    if not api.query(as_promql(expr)) and not any(word in expr for word in rare)]

        try:
            wait_for("data in every dashboard panel", lambda: not queries_without_data(), 30, prometheus)
        except AssertionError:
            raise AssertionError(f"dashboard queries without data: {queries_without_data()}") from None

        # Server
        assert api.values("wanps_server_members") == [2.0]
        assert api.one("wanps_server_received_bytes_total") > 0
        assert api.one("wanps_server_sent_bytes_total") > 0
        assert api.one('wanps_grpc_server_handled_total{job="wanps-server",method="Push",code="OK"}') > 0
        # Controller
        assert api.values("wanps_controller_tau") == [1.0]
        assert api.values("wanps_controller_delta") == [DELTA]
        assert api.one("sum(wanps_controller_samples_total)") > 0
        assert api.one('wanps_grpc_server_handled_total{job="wanps-controller",method="Report",code="OK"}') > 0
        # Workers: both scraped, bytes both ways, tau and delta in force, ratio = ceil(delta d) / d
        for name in ("wanps_worker_sent_bytes_total", "wanps_worker_received_bytes_total",
                     'wanps_worker_pushes_total{kind="update"}'):
            values = api.values(name)
            assert len(values) == 2 and min(values) > 0, (name, values)
        assert api.values("wanps_worker_tau") == [1.0, 1.0]
        assert len(set(api.values("wanps_worker_id"))) == 2
        for ratio in api.values("wanps_worker_compression_ratio"):
            assert DELTA <= ratio < DELTA * 1.1, ratio  # ceil(delta * d) / d
    finally:
        stop_all(processes)
        shutil.rmtree(storage, ignore_errors=True)
