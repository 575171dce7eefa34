"""deploy/k8s rendered by kustomize, every object validated offline against the Kubernetes API.

No cluster is needed, nor any network:
- `kubectl kustomize` renders (kubectl's built-in kustomize; it never contacts a cluster);
- the PyPI package kubernetes-validate (a dev extra, Apache-2.0) holds the JSON schemas of the
  Kubernetes API (1.25 to 1.37, generated from its OpenAPI) and validates each built-in object
  with the "strict" schemas, which refuse unknown fields as the API server's strict field
  validation does; we check the oldest version the manifests claim (1.27: gRPC probes) and the
  newest bundled;
- the ServiceMonitor (a CRD, monitoring.coreos.com/v1) is validated against the openAPIV3Schema
  of prometheus-operator's own CRD, vendored in tests/k8s/, made strict the same way.
Then what a schema cannot see: one shard count everywhere, every reference resolved, ports and
probes where the processes listen, and every WANPS_* variable one that its command reads.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="a dev extra: `make install`")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
SERVICEMONITOR_SCHEMA = Path(__file__).resolve().parent / "k8s" / "servicemonitor-v1.schema.json"
VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
# Variables the deployment's own scripts read (deploy/compose-worker.sh), not `wanps worker`.
WORKER_SCRIPT_ENV = {"WANPS_SHARDS", "WANPS_SHARD_ADDRESS", "WANPS_SHARD_ORDINAL_BASE", "WANPS_WAN_TRACE"}
# The sharding contract of issue 14, read by `wanps server` (--shard, --shard-ordinal-base).
SHARD_CONTRACT_ENV = {"WANPS_SHARD", "WANPS_SHARD_ORDINAL_BASE"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its kustomize) renders deploy/k8s")


# --------------------------------------------------------------------------- rendering


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize(K8S)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> list[dict[str, Any]]:
    """overlays/example as its README says to use it: a token file and make-test-ca.sh's files."""
    root = tmp_path_factory.mktemp("deploy")
    shutil.copytree(K8S, root / "k8s")
    overlay = root / "k8s" / "overlays" / "example"
    (overlay / "token").write_text("0123456789abcdef0123456789abcdef\n")
    subprocess.run(["bash", str(REPO / "deploy" / "make-test-ca.sh"), str(overlay / "pki"), "*.wanps-server",
                    "wanps-controller"], check=True, capture_output=True, timeout=60)
    return kustomize(overlay)


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = find(objects, kind, name)
    return found


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("StatefulSet", "Deployment", "Job")]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --------------------------------------------------------------------------- schema validation


def strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields where the API server's strict field validation does:
    objects with declared properties and neither additionalProperties nor preserve-unknown-fields."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    node = {key: strict(value) if key not in ("enum", "required", "default", "example") else value
            for key, value in schema.items()}
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    return node


@pytest.fixture(scope="module")
def servicemonitor_validator() -> jsonschema.Validator:
    schema = strict(json.loads(SERVICEMONITOR_SCHEMA.read_text()))
    return jsonschema.Draft7Validator(schema)


def validate(obj: dict, servicemonitor_validator: jsonschema.Validator) -> None:
    """Raises for an object the API server would refuse (schema-wise)."""
    if obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["kind"] == "ServiceMonitor":
        servicemonitor_validator.validate(obj)
        return
    for version in VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_base_renders_and_every_object_is_valid(base, servicemonitor_validator) -> None:
    kinds = sorted(o["kind"] for o in base)
    assert kinds == sorted(["Namespace", "ConfigMap", "ConfigMap", "ConfigMap", "Service", "Service", "Service",
                            "StatefulSet", "Deployment", "Job"])
    for obj in base:
        validate(obj, servicemonitor_validator)


def test_the_example_overlay_renders_and_every_object_is_valid(example, servicemonitor_validator) -> None:
    kinds = {o["kind"] for o in example}
    assert {"Secret", "ServiceMonitor", "StatefulSet", "Deployment", "Job"} <= kinds
    for obj in example:
        validate(obj, servicemonitor_validator)
    assert all(o["metadata"].get("namespace") == "wanps" for o in example if o["kind"] != "Namespace")


def test_validation_refuses_broken_objects(base, example, servicemonitor_validator) -> None:
    """The validation can fail: a field of the wrong type, an unknown field, in both kinds of schema."""
    servers = copy.deepcopy(one(base, "StatefulSet", "wanps-server"))
    servers["spec"]["replicas"] = "three"
    with pytest.raises(jsonschema.ValidationError, match="three"):
        validate(servers, servicemonitor_validator)
    servers = copy.deepcopy(one(base, "StatefulSet", "wanps-server"))
    servers["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(jsonschema.ValidationError):
        validate(servers, servicemonitor_validator)
    workers = copy.deepcopy(one(base, "Job", "wanps-worker"))
    workers["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["nmae"] = "typo"
    with pytest.raises(jsonschema.ValidationError, match="nmae"):
        validate(workers, servicemonitor_validator)
    monitor = copy.deepcopy(one(example, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor, servicemonitor_validator)
    monitor = copy.deepcopy(one(example, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["scrapeEvery"] = "5s"
    with pytest.raises(jsonschema.ValidationError, match="scrapeEvery"):
        validate(monitor, servicemonitor_validator)


# --------------------------------------------------------------------------- what a schema cannot see


@pytest.mark.parametrize("render, shards, workers", [("base", 1, 2), ("example", 3, 4)])
def test_one_shard_count_and_stable_names_for_every_shard(render, shards, workers, request) -> None:
    objects = request.getfixturevalue(render)
    servers = one(objects, "StatefulSet", "wanps-server")
    headless = one(objects, "Service", servers["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= servers["spec"]["template"]["metadata"]["labels"].items()
    assert servers["spec"]["replicas"] == shards
    (server,) = servers["spec"]["template"]["spec"]["containers"]
    server_env = env_of(server)
    # Shard I is pod wanps-server-I: the index from the host name's ordinal, counted from 0.
    assert server_env["WANPS_SHARD"] == f"host/{shards}"
    assert server_env.get("WANPS_SHARD_ORDINAL_BASE", "0") == "0"
    job = one(objects, "Job", "wanps-worker")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == workers
    (worker,) = job["spec"]["template"]["spec"]["containers"]
    worker_env = env_of(worker)
    grpc_port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    assert worker_env["WANPS_SHARDS"] == str(shards)
    assert worker_env["WANPS_SHARD_ADDRESS"] == f"{servers['metadata']['name']}-{{}}.{headless['metadata']['name']}:{grpc_port}"
    assert worker_env.get("WANPS_SHARD_ORDINAL_BASE", "0") == "0"
    assert worker["command"] == ["wanps-compose-worker"]


def test_the_worker_script_turns_the_shard_settings_into_every_address(example, tmp_path) -> None:
    """The workers' WANPS_SERVER as deploy/compose-worker.sh makes it from the Job's variables."""
    (worker,) = one(example, "Job", "wanps-worker")["spec"]["template"]["spec"]["containers"]
    fake = tmp_path / "wanps"
    fake.write_text('#!/bin/sh\necho "$WANPS_SERVER"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", **{k: v for k, v in env_of(worker).items() if k.startswith("WANPS_SHARD")}}
    out = subprocess.run(["sh", str(REPO / "deploy" / "compose-worker.sh")], env=env, capture_output=True, text=True,
                         timeout=30, check=True).stdout.strip()
    assert out == ",".join(f"wanps-server-{i}.wanps-server:50051" for i in range(3))


@pytest.mark.parametrize("render", ["base", "example"])
def test_references_ports_and_probes_fit_together(render, request) -> None:
    objects = request.getfixturevalue(render)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for workload in workloads(objects):
        pod = workload["spec"]["template"]
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        (container,) = spec["containers"]
        for source in container.get("envFrom", []):
            assert ("ConfigMap", source["configMapRef"]["name"]) in names
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes.keys() | claims
        for volume in volumes.values():
            if "secret" in volume:
                # The base leaves the token to you (deploy/README.md); an overlay must make it.
                if render == "example" or volume["secret"]["secretName"] != "wanps-token":
                    assert ("Secret", volume["secret"]["secretName"]) in names, volume
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= requests.keys() and "memory" in limits
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        # Prometheus's annotations point at the port named metrics.
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(probe_name)
            if probe is None:
                continue
            handlers = {"exec", "grpc", "httpGet", "tcpSocket"} & probe.keys()
            assert len(handlers) == 1, (workload["metadata"]["name"], probe_name, probe)
            if "grpc" in probe:
                assert probe["grpc"]["port"] == ports["grpc"]
            if "exec" in probe:
                assert "wanps health" in " ".join(probe["exec"]["command"])
            if "httpGet" in probe:
                assert probe["httpGet"]["port"] in ports
        if workload["kind"] != "Job":
            assert "readinessProbe" in container, workload["metadata"]["name"]
    # The gRPC health probes ask for the service each workload serves.
    services = {"wanps-server": "wanps.v1.ParameterServer", "wanps-controller": "wanps.v1.Controller"}
    for name, service in services.items():
        (container,) = next(w for w in workloads(objects) if w["metadata"]["name"] == name)["spec"]["template"]["spec"]["containers"]
        probe = container["readinessProbe"]
        asked = probe["grpc"].get("service") if "grpc" in probe else probe["exec"]["command"][-1].split()[-1]
        assert asked == service
    # Every Service selects pods of some workload, on ports those pods name.
    for svc in find(objects, "Service"):
        selected = [w for w in workloads(objects)
                    if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, svc["metadata"]["name"]
        (container,) = selected[0]["spec"]["template"]["spec"]["containers"]
        named = {p["name"] for p in container["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= named


def test_tls_reaches_every_process_and_its_probes(example) -> None:
    server = one(example, "StatefulSet", "wanps-server")["spec"]["template"]["spec"]["containers"][0]
    controller = one(example, "Deployment", "wanps-controller")["spec"]["template"]["spec"]["containers"][0]
    worker = one(example, "Job", "wanps-worker")["spec"]["template"]["spec"]["containers"][0]
    for service in (server, controller):
        env = env_of(service)
        assert {"WANPS_TLS_CERT", "WANPS_TLS_KEY", "WANPS_TLS_CLIENT_CA", "WANPS_TLS_CA"} <= env.keys()
        assert all("exec" in service[p] for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert {"WANPS_TLS_CA", "WANPS_TLS_CLIENT_CERT", "WANPS_TLS_CLIENT_KEY"} <= env_of(worker).keys()
    tls = next(o for o in example if o["kind"] == "Secret" and o["metadata"]["name"].startswith("wanps-tls"))
    assert set(tls["data"]) == {"ca.pem", "server.pem", "server.key", "client.pem", "client.key"}
    token = one(example, "Secret", "wanps-token")
    assert set(token["data"]) == {"token"}


def help_env_names(*command: str) -> set[str]:
    """The WANPS_* variables a `wanps` command reads, from its --help."""
    from wanps.deploy.cli import main as wanps_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        wanps_main([*command, "--help"])
    text = out.getvalue()
    return set(re.findall(r"\[env\s+(WANPS_[A-Z0-9_]+)\]", text)) | set(re.findall(r"^(WANPS_[A-Z0-9_]+):", text, re.M))


@pytest.mark.parametrize("render", ["base", "example"])
def test_every_variable_is_one_its_command_reads(render, request) -> None:
    """A misspelt variable would be ignored without a word: each one set must be read."""
    objects = request.getfixturevalue(render)
    health = help_env_names("health")
    known = {"wanps-server": help_env_names("server") | health | SHARD_CONTRACT_ENV,
             "wanps-controller": help_env_names("controller") | health,
             "wanps-worker": help_env_names("worker") | WORKER_SCRIPT_ENV}
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in find(objects, "ConfigMap")}
    for workload in workloads(objects):
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        names = set(env_of(container))
        for source in container.get("envFrom", []):
            names |= set(config_maps[source["configMapRef"]["name"]])
        unknown = {n for n in names if n.startswith("WANPS_")} - known[workload["metadata"]["name"]]
        assert not unknown, (workload["metadata"]["name"], unknown)


def test_a_restarted_shard_resumes_from_its_own_checkpoint(base, tmp_path) -> None:
    """The server container's command, run with `wanps` replaced: --resume only when this
    shard's volume holds a checkpoint (a first start has none, and --resume would refuse)."""
    from wanps.server.checkpoint import CHECKPOINT_NAME

    (server,) = one(base, "StatefulSet", "wanps-server")["spec"]["template"]["spec"]["containers"]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "wanps").write_text('#!/bin/sh\necho "$* resume=${WANPS_RESUME:-}"\n')
    (fake / "wanps").chmod(0o755)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()

    def start() -> str:
        env = {"PATH": f"{fake}:/usr/bin:/bin", "WANPS_CHECKPOINT_DIR": str(checkpoints)}
        return subprocess.run([*server["command"], *server["args"]], env=env, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    assert env_of(server)["WANPS_CHECKPOINT_DIR"] == next(
        m["mountPath"] for m in server["volumeMounts"] if m["name"] == "checkpoints")
    assert start() == "server resume="
    (checkpoints / CHECKPOINT_NAME).write_bytes(b"")
    assert start() == f"server resume={checkpoints}"
