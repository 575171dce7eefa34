"""Cluster token, TLS and mutual TLS on real clusters (127.0.0.1, port 0), and what leaks where.

Certificates come from deploy/make-test-ca.sh, run into a temporary directory.
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wanps.controller import cli as controller_cli
from wanps.rpc.auth import (
    REFUSAL_MESSAGE,
    ClientSecurity,
    SecurityConfigError,
    ServerSecurity,
    TokenSource,
    parse_token_lines,
    sync_channel,
)
from wanps.deploy.processes import start_process, wanps_command
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.server import cli as server_cli
from wanps.worker import Optimizer

from wire import FINGERPRINT, RawClient

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
TOKEN = "wanps-test-token-3f9c2d7e5b1a4c6d8e0f"
OTHER_TOKEN = "wanps-wrong-token-000000000000000000"


def make_ca(directory: Path) -> Path:
    subprocess.run(["bash", str(REPO / "deploy" / "make-test-ca.sh"), str(directory)], check=True,
                   capture_output=True, timeout=60)
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_ca(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory) -> Path:
    """Another CA with certificates of the same names: trusted by nobody here."""
    return make_ca(tmp_path_factory.mktemp("rogue"))


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"# cluster token\n{TOKEN}\n")
    return path


def tls_server(pki: Path, token_file: Path | None, mutual: bool = False) -> ServerSecurity:
    return ServerSecurity(token_file=str(token_file) if token_file else None, tls_cert=str(pki / "server.pem"),
                          tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem") if mutual else None)


def tls_client(pki: Path, token: str | None = None, token_file: Path | None = None,
               client_cert: bool = False) -> ClientSecurity:
    return ClientSecurity(token=token, token_file=str(token_file) if token_file else None, tls_ca=str(pki / "ca.pem"),
                          tls_client_cert=str(pki / "client.pem") if client_cert else None,
                          tls_client_key=str(pki / "client.key") if client_cert else None)


def every_rpc(server: str, controller: str, security: ClientSecurity | None) -> dict[str, grpc.StatusCode | None]:
    """Call each RPC of both services once with a harmless request; the status each gets (None = OK)."""
    ps_channel, ctl_channel = sync_channel(server, security), sync_channel(controller, security)
    ps, ctl = pb_grpc.ParameterServerStub(ps_channel), pb_grpc.ControllerStub(ctl_channel)
    calls = {
        "Join": lambda: ps.Join(pb.JoinRequest(role=pb.ROLE_OBSERVER, num_params=16, model_fingerprint=FINGERPRINT),
                                timeout=10),
        "SeedModel": lambda: ps.SeedModel(iter([pb.ModelChunk(worker_id=999)]), timeout=10),
        "PullModel": lambda: list(ps.PullModel(pb.PullModelRequest(worker_id=999), timeout=10)),
        "Push": lambda: ps.Push(iter([pb.PushMessage(header=pb.PushHeader(worker_id=999, skip=True))]), timeout=10),
        "Updates": lambda: list(ps.Updates(pb.UpdatesRequest(worker_id=999), timeout=10)),
        "Ping": lambda: ps.Ping(pb.PingRequest(), timeout=10),
        "Leave": lambda: ps.Leave(pb.LeaveRequest(worker_id=999), timeout=10),
        "Decisions": lambda: next(iter(ctl.Decisions(pb.DecisionsRequest(worker_id=1), timeout=10))),
        "Report": lambda: ctl.Report(pb.ReportRequest(worker_id=1), timeout=10),
        "SetPolicy": lambda: ctl.SetPolicy(pb.SetPolicyRequest(policy="static", tau=1, delta=0.5), timeout=10),
        "GetState": lambda: ctl.GetState(pb.GetStateRequest(), timeout=10),
    }
    codes: dict[str, grpc.StatusCode | None] = {}
    try:
        for name, call in calls.items():
            try:
                call()
                codes[name] = None
            except grpc.RpcError as exc:
                codes[name] = exc.code()
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    assert exc.details() == REFUSAL_MESSAGE
    finally:
        ps_channel.close()
        ctl_channel.close()
    return codes


def health(address: str, security: ClientSecurity | None) -> int:
    with sync_channel(address, security) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def assert_unavailable(address: str, security: ClientSecurity | None) -> None:
    """The connection itself fails (handshake): UNAVAILABLE, nothing reaches a servicer."""
    with sync_channel(address, security) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ParameterServerStub(channel).Ping(pb.PingRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------- token


def test_every_rpc_refuses_a_missing_or_wrong_token_over_tls(make_cluster, pki, token_file, caplog):
    caplog.set_level(logging.DEBUG)
    cluster = make_cluster(security=tls_server(pki, token_file))
    members_before = sorted(cluster.core.members)
    for security in (tls_client(pki), tls_client(pki, token=OTHER_TOKEN), tls_client(pki, token=TOKEN[:-1])):
        codes = every_rpc(cluster.server_address, cluster.controller_address, security)
        assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    assert len(codes) == 11
    assert sorted(cluster.core.members) == members_before and cluster.core.num_params is None  # nothing happened
    # With the token every call reaches its servicer (which answers on its own terms).
    codes = every_rpc(cluster.server_address, cluster.controller_address, tls_client(pki, token_file=token_file))
    assert grpc.StatusCode.UNAUTHENTICATED not in codes.values(), codes
    assert codes["Join"] is None and codes["Ping"] is None and codes["GetState"] is None
    assert codes["Leave"] == grpc.StatusCode.NOT_FOUND
    # Health checks are exempt: liveness probes need no secret.
    assert health(cluster.server_address, tls_client(pki)) == health_pb2.HealthCheckResponse.SERVING
    assert health(cluster.controller_address, tls_client(pki)) == health_pb2.HealthCheckResponse.SERVING
    # Refusals were logged, without any token.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "without a valid cluster token" in logged
    assert TOKEN not in logged and OTHER_TOKEN not in logged and TOKEN[:-1] not in logged


def test_a_worker_trains_over_tls_with_a_token(make_cluster, pki, token_file):
    """The library path end to end: join, seed, pushes, the update stream and the controller's decisions."""
    cluster = make_cluster(security=tls_server(pki, token_file), tau=0, delta=0.5)
    model = torch.nn.Linear(4, 2)
    opt = Optimizer(model.parameters(), server=cluster.server_address, controller=cluster.controller_address,
                    lr=0.1, security=tls_client(pki, token_file=token_file), decision_timeout_s=10)
    try:
        for _ in range(5):
            opt.zero_grad()
            model(torch.ones(3, 4)).sum().backward()
            opt.step()
        assert opt.last_decision.policy == "static" and opt.last_decision.delta == 0.5
        assert opt.version == cluster.core.version == 5  # tau 0: each step waits for its round
        assert torch.equal(opt.replica, cluster.core.model)
    finally:
        opt.close()


def test_health_exemption_is_configurable(make_cluster, token_file):
    cluster = make_cluster(security=ServerSecurity(token_file=str(token_file), auth_exempt=()), policy=None)
    with pytest.raises(grpc.RpcError) as refused:
        health(cluster.server_address, None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert health(cluster.server_address, ClientSecurity(token=TOKEN)) == health_pb2.HealthCheckResponse.SERVING


def test_token_rotation_through_the_token_file(make_cluster, token_file):
    """Add the new token on the server, move clients to it, retire the old one: no restart."""
    cluster = make_cluster(security=ServerSecurity(token_file=str(token_file)), policy=None)
    old_client = RawClient(cluster.server_address, ClientSecurity(token=TOKEN))
    new_client = RawClient(cluster.server_address, ClientSecurity(token="rotated-token-abcdef0123456789"))
    ping = pb.PingRequest()
    try:
        old_client.stub.Ping(ping, timeout=5)
        token_file.write_text(f"{TOKEN}\nrotated-token-abcdef0123456789\n")  # step 1: both accepted
        wait_until(lambda: accepted(new_client))
        old_client.stub.Ping(ping, timeout=5)
        token_file.write_text("rotated-token-abcdef0123456789\n")  # step 3: the old one retired
        wait_until(lambda: not accepted(old_client))
        new_client.stub.Ping(ping, timeout=5)
        token_file.write_text("")  # a half-written file keeps the last good tokens
        deadline = time.monotonic() + 1.5  # past the re-read interval: it must hold at every moment
        while time.monotonic() < deadline:
            new_client.stub.Ping(ping, timeout=5)
    finally:
        old_client.close()
        new_client.close()


def accepted(client: RawClient) -> bool:
    try:
        client.stub.Ping(pb.PingRequest(), timeout=5)
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        return False


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_token_source_reloads_on_change_and_compares_whole_tokens(tmp_path):
    now = [0.0]
    path = tmp_path / "token"
    path.write_text("first-token\nsecond-token\n")
    source = TokenSource(path=str(path), clock=lambda: now[0], recheck_s=1.0)
    assert source.current() == "first-token"
    assert source.accepts("Bearer first-token") and source.accepts(b"Bearer second-token")
    for wrong in (None, "", "first-token", "Bearer first-toke", "Bearer first-tokenX", "bearer first-token"):
        assert not source.accepts(wrong)
    path.write_text("third-token\n")
    assert source.accepts("Bearer first-token")  # not re-read before recheck_s
    now[0] = 1.5
    assert source.accepts("Bearer third-token") and not source.accepts("Bearer first-token")
    assert "third-token" not in repr(source) and "TOKEN" not in repr(TokenSource(token="abc"))


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", "secretA secretB\n", "secretC\tsecretD\n",
                                  "secr\u00e9tE\n"])
def test_unusable_token_files_are_refused_without_echoing_them(text):
    with pytest.raises(SecurityConfigError) as refused:
        parse_token_lines(text, "token file x")
    for word in text.split():
        if not word.startswith("#"):
            assert word not in str(refused.value)


def test_the_token_stays_out_of_configs_and_help(monkeypatch, token_file, capsys):
    monkeypatch.setenv("WANPS_TOKEN", TOKEN)
    config = server_cli.parse_config(["--listen", "127.0.0.1:0"])
    assert config.security.token == TOKEN and config.security.has_token
    assert TOKEN not in repr(config) and TOKEN not in config.security.describe()
    with pytest.raises(SystemExit):
        server_cli.parse_config(["--help"])
    help_text = capsys.readouterr().out
    assert "WANPS_TOKEN" in help_text and TOKEN not in help_text and "--token " not in help_text
    monkeypatch.delenv("WANPS_TOKEN")
    with pytest.raises(SystemExit):  # a missing file is a clear start-up error
        server_cli.parse_config(["--token-file", str(token_file) + ".missing"])
    assert "token file" in capsys.readouterr().err


def test_controller_admin_commands_send_the_token(make_cluster, pki, token_file, monkeypatch, capsys):
    cluster = make_cluster(security=tls_server(pki, token_file))
    monkeypatch.setenv("WANPS_TLS_CA", str(pki / "ca.pem"))
    with pytest.raises(SystemExit) as refused:  # one line naming the controller and the refusal
        controller_cli.status_main(["--controller", cluster.controller_address])
    assert refused.value.code == 1
    assert f"{cluster.controller_address}: UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("WANPS_TOKEN_FILE", str(token_file))
    assert controller_cli.status_main(["--controller", cluster.controller_address]) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == "static"


# ---------------------------------------------------------------------------- TLS


def test_plaintext_and_untrusted_clients_cannot_reach_a_tls_server(make_cluster, pki, rogue_pki, token_file):
    cluster = make_cluster(security=tls_server(pki, token_file), policy=None)
    assert_unavailable(cluster.server_address, ClientSecurity(token=TOKEN))  # plaintext
    assert_unavailable(cluster.server_address, tls_client(rogue_pki, token=TOKEN))  # does not trust the server
    assert_unavailable(cluster.server_address, ClientSecurity(token=TOKEN, tls=True))  # system roots: no test CA
    with sync_channel(cluster.server_address, tls_client(pki, token=TOKEN)) as channel:
        assert pb_grpc.ParameterServerStub(channel).Ping(pb.PingRequest(sent_unix_ns=7), timeout=5).sent_unix_ns == 7


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_cluster_ca(make_cluster, pki, rogue_pki, token_file):
    cluster = make_cluster(security=tls_server(pki, token_file, mutual=True))
    assert_unavailable(cluster.server_address, tls_client(pki, token=TOKEN))  # no client certificate
    rogue_cert = ClientSecurity(token=TOKEN, tls_ca=str(pki / "ca.pem"), tls_client_cert=str(rogue_pki / "client.pem"),
                                tls_client_key=str(rogue_pki / "client.key"))
    assert_unavailable(cluster.server_address, rogue_cert)
    # The certificate alone is not enough either: the token is still checked.
    codes = every_rpc(cluster.server_address, cluster.controller_address, tls_client(pki, client_cert=True))
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}
    codes = every_rpc(cluster.server_address, cluster.controller_address,
                      tls_client(pki, token=TOKEN, client_cert=True))
    assert codes["Join"] is None and codes["GetState"] is None


def test_health_checks_a_mutual_tls_service_with_the_client_settings(make_cluster, pki, rogue_pki, token_file,
                                                                   monkeypatch, capsys):
    """`wanps health` is the probe of TLS deployments (deploy/k8s/components/tls): it takes the
    client's TLS flags and variables, and still needs no token (the health service is exempt)."""
    from wanps.deploy.cli import main as wanps_main
    from wanps.rpc import health

    cluster = make_cluster(security=tls_server(pki, token_file, mutual=True))
    service = ["--service", "wanps.v1.ParameterServer"]
    client = ["--tls-ca", str(pki / "ca.pem"), "--tls-client-cert", str(pki / "client.pem"),
              "--tls-client-key", str(pki / "client.key")]
    assert wanps_main(["health", cluster.server_address, *service, "--timeout", "2"]) == health.UNREACHABLE  # plaintext
    assert wanps_main(["health", cluster.server_address, *service, *client]) == 0
    assert "SERVING" in capsys.readouterr().out
    # The certificate names localhost and 127.0.0.1, not "elsewhere": the expected name is checked.
    assert wanps_main(["health", cluster.server_address, *service, *client, "--tls-server-name", "elsewhere",
                       "--timeout", "2", "--quiet"]) == health.UNREACHABLE
    rogue = ["--tls-ca", str(pki / "ca.pem"), "--tls-client-cert", str(rogue_pki / "client.pem"),
             "--tls-client-key", str(rogue_pki / "client.key")]
    assert wanps_main(["health", cluster.server_address, *service, *rogue, "--timeout", "2"]) == health.UNREACHABLE
    # The same settings from the environment, as a container's probe gets them.
    monkeypatch.setenv("WANPS_TLS_CA", str(pki / "ca.pem"))
    monkeypatch.setenv("WANPS_TLS_CLIENT_CERT", str(pki / "client.pem"))
    monkeypatch.setenv("WANPS_TLS_CLIENT_KEY", str(pki / "client.key"))
    assert wanps_main(["health", cluster.controller_address, "--service", "wanps.v1.Controller"]) == 0
    # A TLS file that is not there is a usage error naming it, not a traceback.
    with pytest.raises(SystemExit) as exited:
        wanps_main(["health", cluster.server_address, "--tls-ca", "/nonexistent/ca.pem"])
    assert exited.value.code == 2 and "/nonexistent/ca.pem" in capsys.readouterr().err


def test_tls_settings_that_cannot_work_are_refused(pki):
    with pytest.raises(SecurityConfigError, match="key"):
        ServerSecurity(tls_cert=str(pki / "server.pem"))
    with pytest.raises(SecurityConfigError, match="mutual TLS"):
        ServerSecurity(tls_client_ca=str(pki / "ca.pem"))
    with pytest.raises(SecurityConfigError, match="key"):
        ClientSecurity(tls_client_cert=str(pki / "client.pem"))
    with pytest.raises(SecurityConfigError, match="missing.pem"):
        ServerSecurity(tls_cert=str(pki / "missing.pem"), tls_key=str(pki / "server.key")).validate()


# ---------------------------------------------------------------------------- nothing leaks


def test_metrics_health_and_logs_of_a_real_server_process_leak_no_token(tmp_path, pki, token_file):
    """`wanps server` and `wanps controller` as processes with a known token: scrape, probe, refuse, read logs."""
    env = {"WANPS_TOKEN_FILE": str(token_file), "WANPS_TLS_CERT": str(pki / "server.pem"),
           "WANPS_TLS_KEY": str(pki / "server.key"), "WANPS_LOG_LEVEL": "DEBUG"}
    processes = [
        start_process("server", wanps_command("server", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"),
                      tmp_path, env=env),
        start_process("controller", wanps_command("controller", "--listen", "127.0.0.1:0",
                                                  "--metrics-listen", "127.0.0.1:0"), tmp_path, env=env),
    ]
    try:
        for process in processes:
            process.wait_ready(60)
        server, controller = processes
        for process in processes:
            assert health(process.address, tls_client(pki)) == health_pb2.HealthCheckResponse.SERVING
        every_rpc(server.address, controller.address, tls_client(pki, token=OTHER_TOKEN))  # refused, logged
        every_rpc(server.address, controller.address, tls_client(pki, token=TOKEN))  # accepted
        scraped = ""
        for process in processes:
            with urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=10) as response:
                scraped += response.read().decode()
        assert "wanps_server" in scraped and "wanps_controller" in scraped
    finally:
        for process in processes:
            process.stop()
    logs = "".join(p.log_path.read_text() for p in processes)
    assert "token on, TLS on" in logs and "without a valid cluster token" in logs
    for secret in (TOKEN, OTHER_TOKEN):
        assert secret not in scraped and secret not in logs


def test_wanps_health_checks_a_tls_service_with_its_ca(make_cluster, pki, token_file, monkeypatch, capsys):
    """The container health check of a TLS deployment: `wanps health` dials over TLS with
    --tls-ca (or WANPS_TLS_CA), a client certificate under mutual TLS; plaintext cannot tell."""
    from wanps.rpc import health as health_cli

    cluster = make_cluster(security=tls_server(pki, token_file, mutual=True))
    address = cluster.server_address
    ca, cert, key = str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")
    service = ["--service", "wanps.v1.ParameterServer"]
    assert health_cli.main([address, *service, "--tls-ca", ca, "--tls-client-cert", cert, "--tls-client-key", key]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert health_cli.main([cluster.controller_address, "--tls-ca", ca, "--tls-client-cert", cert,
                            "--tls-client-key", key, "--quiet"]) == 0
    assert health_cli.main([address, "--quiet", "--timeout", "1"]) == health_cli.UNREACHABLE  # plaintext to TLS
    # The environment fallbacks, as a container sets them.
    monkeypatch.setenv("WANPS_TLS_CA", ca)
    monkeypatch.setenv("WANPS_TLS_CLIENT_CERT", cert)
    monkeypatch.setenv("WANPS_TLS_CLIENT_KEY", key)
    assert health_cli.main([address, *service, "--quiet"]) == 0
    with pytest.raises(SystemExit) as bad:  # a file that does not exist: a usage error, one line
        health_cli.main([address, "--tls-ca", str(pki / "missing.pem")])
    assert bad.value.code == 2 and "missing.pem" in capsys.readouterr().err
