"""`make swarm-test`: the shipped deploy/docker-stack.yml deployed for real on Docker Swarm.

A one-node swarm on the Docker engine that `make compose-test` starts (loopback only), images
built without a registry, `docker stack deploy` of the stack with WANPS_SHARDS server shards,
then: every task healthy, each shard named by its task slot (server-1..N), Prometheus scraping
every shard, the controller and every worker, rounds advancing on every shard with every worker
a member, the cluster token enforced; then `docker stack rm`, `docker swarm leave` and the host
put back as it was (the engine stopped, its bridges, docker_gwbridge and iptables chains gone).
Grafana is left out of the deployed copy: its image needs a registry (as in the compose test).
Skipped unless WANPS_SWARM_TEST=1 (the make target sets it).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from compose_harness import (
    CACHE_DIR, DEPLOY, REPO, HostState, SwarmStack, build_images, docker_engine, log, swarm_mode, wait_until,
)

pytestmark = [
    pytest.mark.swarm,
    pytest.mark.skipif(os.environ.get("WANPS_SWARM_TEST") != "1",
                       reason="starts a Docker engine in swarm mode and builds images: `make swarm-test`"),
]

WORKERS = 2
RESULTS = REPO / "results" / "swarm-test.json"


def server_takes_shards() -> bool:
    """Whether `wanps server` has --shard (issue 14): until it has, a second shard would be a
    whole second server that workers cannot use, so the test deploys one."""
    from wanps.server.cli import parse_config

    try:
        parse_config(["--shard", "0/1"])
    except SystemExit:
        return False
    return True


def shard_count() -> int:
    wanted = os.environ.get("WANPS_SWARM_SHARDS")
    if wanted:
        return int(wanted)
    return 2 if server_takes_shards() else 1


def deployable_copy(directory: Path) -> Path:
    """deploy/docker-stack.yml without Grafana, its relative files made absolute (it moves)."""
    stack = yaml.safe_load((DEPLOY / "docker-stack.yml").read_text())
    del stack["services"]["grafana"]
    stack["volumes"].pop("grafana-data")
    stack["configs"] = {name: spec for name, spec in stack["configs"].items() if not name.startswith("grafana")}
    for spec in [*stack["configs"].values(), *stack["secrets"].values()]:
        if spec["file"].startswith("./"):
            spec["file"] = str(DEPLOY / spec["file"][2:])
    path = directory / "docker-stack.yml"
    path.write_text(yaml.safe_dump(stack, sort_keys=False))
    return path


def scraped(stack: SwarmStack) -> dict[str, list[str]]:
    """Active targets' health by job."""
    by_job: dict[str, list[str]] = {}
    for target in stack.prometheus_api("/api/v1/targets?state=active")["activeTargets"]:
        by_job.setdefault(target["labels"]["job"], []).append(target["health"])
    return by_job


def all_scraped(stack: SwarmStack, shards: int) -> dict[str, list[str]] | None:
    targets = scraped(stack)
    wanted = {"wanps-server": shards, "wanps-controller": 1, "wanps-worker": WORKERS, "prometheus": 1}
    ok = all(targets.get(job, []) == ["up"] * n for job, n in wanted.items())
    return targets if ok else None


def per_instance(stack: SwarmStack, expr: str) -> dict[str, float]:
    result = stack.prometheus_api(f"/api/v1/query?query={quote(expr)}")["result"]
    return {r["metric"]["instance"]: float(r["value"][1]) for r in result}


@pytest.mark.timeout(3600)
def test_swarm_stack_end_to_end() -> None:
    started = time.monotonic()
    shards = shard_count()
    figures: dict[str, object] = {"shards": shards, "workers": WORKERS}
    log(f"{shards} shard(s), {WORKERS} workers" + ("" if server_takes_shards() else
                                                   " (wanps server has no --shard yet: one shard)"))
    tag = f"s{os.getpid()}"
    host_before = HostState.snapshot()
    with docker_engine() as engine, tempfile.TemporaryDirectory(prefix="wanps-swarm-test-") as tmp:
        private_engine = engine.private
        workdir = Path(tmp)
        token_file = workdir / "token"
        token_file.write_text(os.urandom(32).hex() + "\n")
        token_file.chmod(0o600)
        images = None
        stack = None
        try:
            t0 = time.monotonic()
            images = build_images(engine, REPO, tag)
            figures["images_build_s"] = round(time.monotonic() - t0, 1)
            with swarm_mode(engine):
                stack = SwarmStack(engine, name=f"wanps{os.getpid()}", stack_file=deployable_copy(workdir), env={
                    "WANPS_IMAGE": images.wanps,
                    "PROMETHEUS_IMAGE": images.prometheus,
                    "WANPS_SHARDS": str(shards),
                    "WANPS_WORKERS": str(WORKERS),
                    "WANPS_TOKEN_SECRET_FILE": str(token_file),
                    "PROMETHEUS_CONFIG": str(DEPLOY / "prometheus" / "prometheus.yml"),
                })
                try:
                    # The shipped file as the CLI reads it (Grafana included): interpolated and valid.
                    shipped = SwarmStack(engine, stack.name, DEPLOY / "docker-stack.yml", stack.env)
                    rendered = yaml.safe_load(shipped.docker("stack", "config", "--compose-file",
                                                             str(DEPLOY / "docker-stack.yml")).stdout)
                    assert rendered["services"]["server"]["deploy"]["replicas"] == shards
                    assert rendered["services"]["server"]["hostname"] == "server-{{.Task.Slot}}"
                    t0 = time.monotonic()
                    stack.deploy()
                    expected = shards + 1 + WORKERS + 1  # servers, controller, workers, Prometheus
                    health = wait_until(
                        lambda: (h := stack.health()) and len(h) == expected and all(
                            v == "healthy" for v in h.values()) and h,
                        300, "every task to be healthy")
                    figures["healthy_s"] = round(time.monotonic() - t0, 1)
                    log(f"stack healthy {figures['healthy_s']} s after deploy: {sorted(health)}")

                    # Slot k is shard k - 1: its host name (a DNS name for the others) and WANPS_SHARD.
                    hostnames = sorted(stack.docker("exec", c, "hostname").stdout.strip()
                                       for c in stack.running("server"))
                    assert hostnames == [f"server-{k}" for k in range(1, shards + 1)]
                    addresses = stack.exec("worker", "python3", "-c", (
                        "import socket, sys; print(' '.join(socket.gethostbyname(f'server-{k}') "
                        "for k in range(1, int(sys.argv[1]) + 1)))"), str(shards)).stdout.split()
                    assert len(set(addresses)) == shards
                    env = stack.exec("server", "sh", "-c", "tr '\\0' '\\n' < /proc/1/environ").stdout.splitlines()
                    assert f"WANPS_SHARD=host/{shards}" in env and "WANPS_SHARD_ORDINAL_BASE=1" in env

                    targets = wait_until(lambda: all_scraped(stack, shards), 180,
                                         "Prometheus to scrape every shard, the controller and every worker")
                    log(f"Prometheus scrapes {targets}")
                    first = wait_until(
                        lambda: (r := per_instance(stack, "wanps_server_rounds_closed_total")) and len(r) == shards
                        and all(v > 0 for v in r.values()) and r,
                        240, "a closed round on every shard")
                    later = wait_until(
                        lambda: (r := per_instance(stack, "wanps_server_rounds_closed_total")) and all(
                            r.get(i, 0) > v for i, v in first.items()) and r,
                        180, "rounds to advance on every shard")
                    log(f"rounds advance on every shard: {first} -> {later}")
                    figures["rounds_closed"] = later
                    members = per_instance(stack, "wanps_server_members")
                    assert sorted(members.values()) == [WORKERS] * shards, members

                    # The token is the stack's secret: a call without it is refused, with it answered.
                    status = ["wanps", "controller", "status", "--controller", "controller:50052"]
                    refused = stack.exec("worker", *status, check=False, env={"WANPS_TOKEN_FILE": ""})
                    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr, refused.stderr[-2000:]
                    answered = stack.exec("worker", *status)
                    assert json.loads(answered.stdout)["policy"] == "deco"
                except BaseException:
                    if stack is not None:
                        log("stack logs (tail):\n" + stack.logs())
                    raise
                finally:
                    if stack is not None:
                        t0 = time.monotonic()
                        left = stack.remove()
                        figures["remove_s"] = round(time.monotonic() - t0, 1)
                        assert not left, f"left behind by `docker stack rm`: {left}"
        finally:
            if images is not None and not engine.private:
                engine.docker("image", "rm", *images.built, check=False)  # a shared engine keeps nothing of ours
    if private_engine:
        # The engine we started is gone, and with it everything it and the swarm made on the host.
        host_after = HostState.snapshot()
        assert host_after.links == host_before.links, host_after.links ^ host_before.links
        assert host_after.rules == host_before.rules and host_after.chains == host_before.chains
        assert host_after.ip_forward == host_before.ip_forward
    figures["total_s"] = round(time.monotonic() - started, 1)
    figures["cache_dir"] = str(CACHE_DIR)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    log(f"figures: {json.dumps(figures)} (also in {RESULTS})")
