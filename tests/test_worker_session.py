"""The worker's session on real services: calls that time out are cancelled, the byte counters
have one writer, interrupt() stops every wait, the first join names why a server cannot be
reached, and the first pull survives a link reset as later ones do."""
from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from wanps.linkem.proxy import LinkEmulator
from wanps.linkem.trace import LinkTrace
from wanps.proto import codec
from wanps.rpc.auth import ClientSecurity, ServerSecurity
from conftest import OptimizerInThread
from wanps.worker import Interrupted, Optimizer
from wanps.worker.optimizer import model_fingerprint
from wanps.worker.session import ReceivedDelta, WorkerSession

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
SERVICE = "wanps.v1.ParameterServer"


def handled(registry: CollectorRegistry, method: str, code: str) -> float:
    return registry.get_sample_value("wanps_grpc_server_handled_total",
                                     {"service": SERVICE, "method": method, "code": code}) or 0.0


def started(registry: CollectorRegistry, method: str) -> float:
    return registry.get_sample_value("wanps_grpc_server_started_total", {"service": SERVICE, "method": method}) or 0.0


def wait_until(condition, timeout_s: float, what: str) -> None:
    """Poll a counted event up to a generous bound (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.02)


def joined_session(address: str) -> WorkerSession:
    params = [torch.zeros(8)]
    session = WorkerSession(address)
    session.join(8, model_fingerprint(params))
    return session


def free_port() -> int:
    with socket.socket() as probe:  # a port nothing listens on once this socket is closed
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------ timed-out calls


def test_a_pull_that_times_out_is_cancelled_not_left_downloading(make_cluster):
    """min_workers 2 and one member: the pull waits for the cluster. Its caller gives up after
    its timeout; the call must end on the server then, not when the session closes."""
    cluster = make_cluster(min_workers=2, policy=None)
    session = joined_session(cluster.server_address)
    try:
        with pytest.raises(TimeoutError):
            session.pull(timeout=0.5)
        wait_until(lambda: handled(cluster.server_registry, "PullModel", "CANCELLED") == 1, 10,
                   "the timed-out PullModel ended on the server")
    finally:
        session.close()


# ------------------------------------------------------------------ byte counters


def test_bytes_up_and_down_are_counted_on_the_io_thread_only(make_cluster):
    """Single writer: the training thread (seed, pushes) hands its counts to the I/O loop,
    which also counts pings and deltas; so += needs no lock."""
    cluster = make_cluster(min_workers=1, policy=None)
    session = joined_session(cluster.server_address)
    writers: set[int] = set()
    count_sent, count_received = session._count_sent, session._count_received

    def record_sent(nbytes: int) -> None:
        writers.add(threading.get_ident())
        count_sent(nbytes)

    def record_received(nbytes: int) -> None:
        writers.add(threading.get_ident())
        count_received(nbytes)

    session._count_sent, session._count_received = record_sent, record_received
    try:
        session.seed(torch.zeros(8))
        pulled = session.pull(10)
        session.follow_updates(pulled.version)
        update = codec.Update(values=torch.tensor([0.5]), indices=torch.tensor([3], dtype=torch.int32))
        for round_ in range(3):
            session.push(round_, round_, update).result(10)
            assert isinstance(session.deltas.get(timeout=10), ReceivedDelta)
        assert session.bytes_up == 4 * 8 + 3 * 8  # the seed and three one-element pushes
        assert session.bytes_down == 4 * 8 + 3 * 8  # the pull and three one-element deltas
        session.follow_decisions()  # pings (and bandwidth probes, worker/probes.py), counted on the loop
        wait_until(lambda: started(cluster.server_registry, "Ping") >= 1, 10, "a ping")
        assert writers == {session._io.thread_id}
    finally:
        session.close()


# ------------------------------------------------------------------ interrupt()


def test_interrupt_stops_a_worker_waiting_for_a_cluster_that_never_starts(make_cluster):
    cluster = make_cluster(min_workers=2, policy=None)
    building = OptimizerInThread(nn.Linear(4, 2), server=cluster.server_address, lr=0.1, join_timeout_s=600)
    wait_until(lambda: started(cluster.server_registry, "PullModel") >= 1, 30, "the first pull waiting")
    building.optimizer.interrupt()
    building.thread.join(10)  # a generous bound: interrupt() cancels the waiting pull at once
    assert not building.thread.is_alive(), "interrupt() did not stop the waiting pull"
    assert len(building.errors) == 1 and isinstance(building.errors[0], Interrupted)


def test_interrupt_stops_a_worker_reconnecting_to_a_server_that_is_gone(make_cluster, loop_thread):
    """The worker lost its server and retries with backoff (for up to 10 minutes by default):
    interrupt() ends that at once, and close() then takes a few seconds at most."""
    cluster = make_cluster(min_workers=1, policy=None)
    model = nn.Linear(4, 2)
    opt = Optimizer(model, server=cluster.server_address, lr=0.1)
    failure: list[BaseException] = []

    def train() -> None:
        try:
            while True:
                opt.zero_grad()
                model(torch.ones(1, 4)).sum().backward()
                opt.step()
        except BaseException as exc:  # noqa: BLE001 - what the test checks
            failure.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    try:
        wait_until(lambda: opt.version >= 3, 30, "training")
        loop_thread.run(cluster.server.stop(0))
        cluster.stop = lambda: None  # stopped here; the fixture must not stop it again
        wait_until(lambda: opt.session.recoveries >= 1, 30, "the worker reconnecting")
        opt.interrupt()
        thread.join(10)
        assert not thread.is_alive(), "interrupt() did not stop the reconnecting worker"
        assert len(failure) == 1 and isinstance(failure[0], Interrupted)
        closing = time.monotonic()
        opt.close()
        assert time.monotonic() - closing < 10  # STOP_GRACE_S per step, not the 60 s of a normal close
    finally:
        opt.interrupt()
        thread.join(10)
        opt.close()


# ------------------------------------------------------------------ the first join and pull


def test_the_first_pull_survives_a_link_reset_as_later_ones_do(make_cluster, loop_thread):
    """A worker waits in its first pull (the cluster needs two); the link between it and the
    server is reset. It pulls again with backoff and joins the cluster when it starts."""
    cluster = make_cluster(min_workers=2, policy=None)
    link = LinkEmulator("127.0.0.1", 0, "127.0.0.1", cluster.server.port, LinkTrace.fixed(1000, 1))
    link_port = loop_thread.run(link.start())
    results: dict[str, object] = {}

    def construct(name: str, address: str) -> None:
        try:
            results[name] = Optimizer(nn.Linear(4, 2), server=address, lr=0.1, join_timeout_s=60)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[name] = exc

    behind_link = threading.Thread(target=construct, args=("behind link", f"127.0.0.1:{link_port}"))
    behind_link.start()
    try:
        wait_until(lambda: started(cluster.server_registry, "PullModel") >= 1, 30, "the first pull waiting")

        async def reset() -> int:
            return link.reset_connections()

        assert loop_thread.run(reset()) >= 1
        wait_until(lambda: handled(cluster.server_registry, "PullModel", "CANCELLED") >= 1, 30,
                   "the reset reaching the server")
        construct("direct", cluster.server_address)  # the second member: the cluster starts
        behind_link.join(60)
        for name in ("behind link", "direct"):
            assert isinstance(results[name], Optimizer), f"{name}: {results[name]!r}"
        assert started(cluster.server_registry, "PullModel") >= 3  # the worker behind the link pulled again
    finally:
        behind_link.join(60)
        for opt in results.values():
            if isinstance(opt, Optimizer):
                opt.close()
        loop_thread.run(link.close())


def test_a_refused_connection_is_named_and_a_line_is_logged_while_waiting(caplog):
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="wanps.worker"):
        with pytest.raises(ConnectionError) as raised:
            Optimizer(nn.Linear(4, 2), server=f"127.0.0.1:{port}", lr=0.1, join_timeout_s=1.5)
    message = str(raised.value)
    assert f"no wanps server answered at 127.0.0.1:{port} within 1.5 s" in message
    assert "connection refused: nothing listens at" in message
    assert f"waiting for the wanps server at 127.0.0.1:{port}: connection refused" in caplog.text


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    subprocess.run(["bash", str(REPO / "deploy" / "make-test-ca.sh"), str(directory)], check=True,
                   capture_output=True, timeout=60)
    return directory


def test_tls_failure_and_a_refused_token_get_their_own_messages(make_cluster, pki, tmp_path):
    tls = ServerSecurity(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), token="right-token")
    cluster = make_cluster(min_workers=1, policy=None, security=tls)
    address = cluster.server_address

    with pytest.raises(ConnectionError) as plaintext:  # a TLS server dialled without TLS
        Optimizer(nn.Linear(4, 2), server=address, lr=0.1, join_timeout_s=1, security=ClientSecurity(token="right-token"))
    assert "closed the connection (a TLS server dialled without TLS?" in str(plaintext.value)

    other = tmp_path / "other-ca"
    subprocess.run(["bash", str(REPO / "deploy" / "make-test-ca.sh"), str(other)], check=True, capture_output=True,
                   timeout=60)
    with pytest.raises(ConnectionError) as untrusted:  # a certificate signed by a CA we do not trust
        Optimizer(nn.Linear(4, 2), server=address, lr=0.1, join_timeout_s=1,
                  security=ClientSecurity(tls_ca=str(other / "ca.pem"), token="right-token"))
    assert "TLS handshake with" in str(untrusted.value) and "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)

    refusing = time.monotonic()
    with pytest.raises(ConnectionError) as refused:  # TLS fine, the token wrong: at once, no waiting
        Optimizer(nn.Linear(4, 2), server=address, lr=0.1, join_timeout_s=30,
                  security=ClientSecurity(tls_ca=str(pki / "ca.pem"), token="wrong-token"))
    assert f"the server at {address} refused the cluster token" in str(refused.value)
    assert time.monotonic() - refusing < 15  # not the 30 s join timeout
