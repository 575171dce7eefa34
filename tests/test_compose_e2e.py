"""`make compose-test`: the shipped docker-compose.yml started for real on a Docker engine.

Builds every image without a registry, brings the cluster up on its internal network, waits for
health, checks that rounds advance and that the compose Prometheus scrapes every target, lets a
worker outside compose join through the published port, scales the workers by one (the new one
behind its own emulated WAN link) and sees it join, then tears everything down and puts the
host back as it was.
WANPS_COMPOSE_SHARDS=N (default 1) runs N server shards (WANPS_SHARDS): every shard must be
healthy, scraped, advancing and counting every worker, and the outside worker dials them all.
Skipped unless WANPS_COMPOSE_TEST=1 (the make target sets it); the default run skips it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compose_harness import (
    CACHE_DIR, DEPLOY, REPO, ComposeProject, build_images, docker_engine, image_size_bytes, log, wait_until,
)

pytestmark = [
    pytest.mark.compose,
    pytest.mark.skipif(os.environ.get("WANPS_COMPOSE_TEST") != "1",
                       reason="starts a Docker engine and builds images: `make compose-test`"),
]

WORKERS = 2
SHARDS = int(os.environ.get("WANPS_COMPOSE_SHARDS") or "1")
RESULTS = REPO / "results" / "compose-test.json"


def prometheus_config() -> Path:
    shipped = DEPLOY / "prometheus" / "prometheus.yml"
    if shipped.is_file():
        return shipped
    log(f"{shipped} is missing: using the test's placeholder tests/compose/prometheus.yml")
    return REPO / "tests" / "compose" / "prometheus.yml"


def health_by_container(project: ComposeProject) -> dict[str, str]:
    return {c["Name"]: c.get("Health") or c.get("State", "") for c in project.containers()}


def scraped_targets(project: ComposeProject) -> dict[int, list[str]]:
    """Active targets by port (9100 server, 9101 controller, 9102 workers): their health."""
    by_port: dict[int, list[str]] = {}
    for target in project.prometheus_api("/api/v1/targets?state=active")["activeTargets"]:
        port = int(target["labels"]["instance"].rsplit(":", 1)[1])
        by_port.setdefault(port, []).append(target["health"])
    return by_port


def all_scraped(project: ComposeProject, workers: int) -> dict[int, list[str]] | None:
    targets = scraped_targets(project)
    wanted = {9100: SHARDS, 9101: 1, 9102: workers}
    ok = all(targets.get(port, []).count("up") == n and len(targets.get(port, [])) == n for port, n in wanted.items())
    others_up = all(h == "up" for port, healths in targets.items() if port not in wanted for h in healths)
    return targets if ok and others_up else None


def query(project: ComposeProject, expr: str) -> list[dict]:
    from urllib.parse import quote

    return project.prometheus_api(f"/api/v1/query?query={quote(expr)}")["result"]


def per_shard(project: ComposeProject, expr: str) -> dict[str, float] | None:
    """A server metric's value on each shard (by instance), None until every shard has it."""
    values = {r["metric"]["instance"]: float(r["value"][1]) for r in query(project, expr)}
    return values if len(values) == SHARDS else None


@pytest.mark.timeout(3600)
def test_compose_cluster_end_to_end() -> None:
    started = time.monotonic()
    figures: dict[str, object] = {}
    tag = f"t{os.getpid()}"
    with docker_engine() as engine:
        images = None
        project = None
        try:
            t0 = time.monotonic()
            images = build_images(engine, REPO, tag)
            figures["images_build_s"] = round(time.monotonic() - t0, 1)
            figures["wanps_image_bytes"] = image_size_bytes(engine, images.wanps)
            figures["base_image_bytes"] = image_size_bytes(engine, images.base)
            log(f"images built in {figures['images_build_s']} s; wanps image "
                f"{figures['wanps_image_bytes'] / 1e6:.0f} MB (base {figures['base_image_bytes'] / 1e6:.0f} MB)")

            project = ComposeProject(engine, name=f"wanps-e2e-{os.getpid()}", env={
                "WANPS_IMAGE": images.wanps,
                "PROMETHEUS_IMAGE": images.prometheus,
                "PROMETHEUS_CONFIG": str(prometheus_config()),
                "WANPS_WORKERS": str(WORKERS),
                "WANPS_SHARDS": str(SHARDS),
                # Any free host port, on 127.0.0.1 only: nothing outside this machine sees the cluster.
                "WANPS_PUBLISH_ADDRESS": "127.0.0.1",
                "WANPS_SERVER_PORT": "", "WANPS_CONTROLLER_PORT": "", "PROMETHEUS_PORT": "",
            })
            project.compose("config", "-q")
            services = ["server", "controller", "worker", "prometheus"]  # Grafana's image needs a registry
            t0 = time.monotonic()
            project.compose("up", "--detach", "--no-build", "--pull", "never", *services, timeout=600)
            health = wait_until(
                lambda: (h := health_by_container(project)) and len(h) == 2 + SHARDS + WORKERS
                and all(v == "healthy" for v in h.values()) and h,
                180, "every container to be healthy")
            figures["cold_start_s"] = round(time.monotonic() - t0, 1)
            log(f"cluster healthy {figures['cold_start_s']} s after `up`: {sorted(health)}")

            targets = wait_until(lambda: all_scraped(project, WORKERS), 120, "Prometheus to scrape every target")
            log(f"Prometheus scrapes {targets}")
            first = wait_until(lambda: (v := per_shard(project, "wanps_server_rounds_closed_total"))
                               and all(n > 0 for n in v.values()) and v, 120, "a first closed round on every shard")
            later = wait_until(lambda: (v := per_shard(project, "wanps_server_rounds_closed_total"))
                               and all(v[i] > n for i, n in first.items()) and v, 120, "rounds to advance on every shard")
            log(f"rounds advance: {first} -> {later}")
            assert sorted(per_shard(project, "wanps_server_members").values()) == [WORKERS] * SHARDS

            # A worker outside compose, on the host, joins through the published ports.
            servers = ",".join(f"127.0.0.1:{project.published_port('server', 50051, index=k)}"
                               for k in range(1, SHARDS + 1))
            controller_port = project.published_port("controller", 50052)
            t0 = time.monotonic()
            outside = subprocess.run(
                [sys.executable, "-m", "wanps.deploy.cli", "worker", "--server", servers,
                 "--controller", f"127.0.0.1:{controller_port}", "--max-rounds", "20", "--name", "outside"],
                capture_output=True, text=True, timeout=300)
            assert outside.returncode == 0, outside.stderr[-3000:]
            assert "20 rounds" in outside.stderr, outside.stderr[-3000:]
            figures["outside_worker_s"] = round(time.monotonic() - t0, 1)
            log(f"a worker on the host trained 20 rounds through {servers} "
                f"in {figures['outside_worker_s']} s")

            # One more compose worker: it asks the server for its rank and Prometheus finds it. It
            # reaches the server through an emulated WAN link of its own (WANPS_WAN_TRACE; the
            # running workers are not recreated, so only the new one has it).
            t0 = time.monotonic()
            project.env["WANPS_WAN_TRACE"] = "/opt/wanps/traces/wan-varying.csv"
            project.compose("up", "--detach", "--no-build", "--pull", "never", "--no-recreate",
                            "--scale", f"worker={WORKERS + 1}", *services, timeout=600)
            wait_until(lambda: all_scraped(project, WORKERS + 1), 180, "the new worker to be scraped")
            wait_until(lambda: (v := per_shard(project, "wanps_server_members")) and set(v.values()) == {WORKERS + 1},
                       180, "every shard to count the new worker as a member")
            # ...and every compose worker reports the id it joined with (-1 until it has).
            worker_ids = wait_until(
                lambda: (ids := sorted(int(float(r["value"][1])) for r in query(project, "wanps_worker_id")))
                and len(ids) == WORKERS + 1 and min(ids) >= 0 and ids, 120, "every worker to report its id")
            assert len(set(worker_ids)) == WORKERS + 1
            figures["scale_up_s"] = round(time.monotonic() - t0, 1)
            log(f"scaled to {WORKERS + 1} workers in {figures['scale_up_s']} s (worker ids {worker_ids})")
            new_worker_log = project.compose("logs", "--no-color", "--no-log-prefix", "--index", str(WORKERS + 1),
                                             "worker").stdout
            assert "LISTENING 127.0.0.1:15051" in new_worker_log, new_worker_log[-2000:]
            old_worker_log = project.compose("logs", "--no-color", "--no-log-prefix", "--index", "1", "worker").stdout
            assert "15051" not in old_worker_log
            before = per_shard(project, "wanps_server_rounds_closed_total") or {}
            wait_until(lambda: (v := per_shard(project, "wanps_server_rounds_closed_total"))
                       and all(v[i] > n for i, n in before.items()) and v, 120, "rounds to advance with the new worker")
        except BaseException:
            if project is not None:
                log("compose logs (tail):\n" + project.logs())
            raise
        finally:
            if project is not None:
                t0 = time.monotonic()
                project.down()
                figures["down_s"] = round(time.monotonic() - t0, 1)
                left = engine.docker("ps", "--all", "--quiet", "--filter", f"label=com.docker.compose.project={project.name}")
                assert left.stdout.strip() == "", f"containers left behind: {left.stdout}"
            if images is not None and not engine.private:
                engine.docker("image", "rm", *images.built, check=False)  # a shared engine keeps nothing of ours
    figures["total_s"] = round(time.monotonic() - started, 1)
    figures["cache_dir"] = str(CACHE_DIR)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    log(f"figures: {json.dumps(figures)} (also in {RESULTS})")
