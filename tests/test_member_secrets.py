"""Per-member secrets, names and Ping's answers (issue 13), on real servers over loopback.

A token holder may join, but cannot act as another member: every call naming a member must
carry the secret its Join returned, else PERMISSION_DENIED and nothing changes. Secrets
survive a restart from a checkpoint. Names are bounded one-line text. A Ping for an id the
server does not know is NOT_FOUND, and a worker that hears it joins again.
"""
from __future__ import annotations

import hashlib
import logging
import time

import grpc
import pytest
import torch

from wanps.proto import wanps_pb2 as pb
from wanps.proto.wire import MAX_NAME_CHARS
from wanps.server.checkpoint import CHECKPOINT_FORMAT, checkpoint_path, core_state, read_checkpoint, restore_core
from wanps.server.core import CoreConfig, ServerCore
from wanps.server.service import ServerConfig, start_server
from wanps.rpc.errors import PermissionDenied
from wanps.rpc.member_secrets import member_secret_digest
from wanps.worker.layout import ModelMismatch
from wanps.worker.recovery import ConnectionLost
from wanps.worker.replica import Replica
from wanps.worker.session import WorkerSession

from wire import FINGERPRINT, RawClient

pytestmark = pytest.mark.timeout(120)

DENIED = grpc.StatusCode.PERMISSION_DENIED


def server_state(core):
    return (core.model.clone(), core.version, sorted(core.members), sorted(core.observers),
            {r: (sorted(o.updates), sorted(o.skips)) for r, o in core.open_rounds.items()})


def assert_unchanged(before, after):
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code()


def wait_until(condition, what: str, timeout: float = 10.0, step=lambda: time.sleep(0.02)) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        step()


@pytest.fixture
def victim_and_attacker(make_cluster):
    """Workers a and b joined by one process (the victim), an observer joined by another token
    holder (the attacker); round 0 is open, holding a's push and waiting for b's."""
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None)
    victim = RawClient(cluster.server_address)
    attacker = RawClient(cluster.server_address)
    a, b = victim.join().worker_id, victim.join().worker_id
    eve = attacker.join(observer=True).worker_id
    victim.seed(a, torch.arange(16, dtype=torch.float32))
    victim.push(a, 0, [1], [2.0])
    yield cluster, victim, attacker, a, b, eve
    victim.close()
    attacker.close()


def test_calls_under_another_members_id_are_refused_and_change_nothing(victim_and_attacker):
    cluster, victim, attacker, a, b, eve = victim_and_attacker
    core = cluster.core
    before = server_state(core)
    b_seen = core.members[b].last_seen
    wrong_secrets = [(b"", b""), (b"wrong secret ...",) * 2, (attacker.secret(eve),) * 2,
                     (victim.secret(b), victim.secret(a))]  # each other's
    for attacker.secrets[a], attacker.secrets[b] in wrong_secrets:  # what the impersonator sends for a and b
        assert code_of(lambda: attacker.push(b, 0, [3], [1000.0])) == DENIED
        assert code_of(lambda: attacker.skip(b, 0)) == DENIED
        assert code_of(lambda: attacker.leave(b)) == DENIED
        assert code_of(lambda: attacker.ping(b)) == DENIED
        assert code_of(lambda: next(iter(attacker.updates(a, 0)))) == DENIED
        assert code_of(lambda: attacker.pull(a)) == DENIED
        assert code_of(lambda: attacker.resume(b)) == DENIED
    victim.resume(a)  # a call on the core thread: any lease renewal queued before it has run
    assert_unchanged(before, server_state(core))
    assert core.members[b].last_seen == b_seen, "an impersonated call renewed the victim's lease"
    rejected = cluster.server_registry.get_sample_value("wanps_server_push_rejected_total",
                                                        {"code": "PERMISSION_DENIED"})
    assert rejected == 8.0  # 4 pushes and 4 skips
    # The legitimate members are unaffected: b's own push closes round 0 with the mean.
    assert victim.push(b, 0, [3], [4.0]).version == 1
    version, model = victim.pull(a)
    expected = torch.arange(16, dtype=torch.float32)
    expected[1] -= 1.0
    expected[3] -= 2.0
    assert version == 1 and torch.equal(model, expected)
    assert victim.ping(b).version == 1 and victim.leave(b).last_round >= 0


def test_seeding_as_the_seeder_needs_its_secret(make_cluster):
    cluster = make_cluster(min_workers=1, policy=None)
    victim, attacker = RawClient(cluster.server_address), RawClient(cluster.server_address)
    try:
        seeder = victim.join()
        assert seeder.must_seed
        assert code_of(lambda: attacker.seed(seeder.worker_id, torch.full((16,), 7.0))) == DENIED
        assert not cluster.core.seeded
        victim.seed(seeder.worker_id, torch.zeros(16))
        assert cluster.core.seeded and float(cluster.core.model.sum()) == 0.0
    finally:
        victim.close()
        attacker.close()


def test_pings_under_a_killed_workers_id_do_not_keep_it_alive(make_cluster):
    """Observed before member secrets: pinging a killed worker's id renewed its lease, and
    the cluster waited for it forever."""
    cluster = make_cluster(min_workers=2, tau_max=2, policy=None, lease_s=0.5)
    victim, attacker = RawClient(cluster.server_address), RawClient(cluster.server_address)
    try:
        a, b = victim.join().worker_id, victim.join().worker_id
        victim.seed(a, torch.zeros(16))
        victim.push(a, 0, [1], [1.0])  # b is "killed": it never calls again

        def both_ping() -> None:
            victim.ping(a)  # a is alive
            with pytest.raises(grpc.RpcError):
                attacker.ping(b)  # refused: renews nothing
            time.sleep(0.05)

        expired = lambda: cluster.server_registry.get_sample_value("wanps_server_members_expired_total") == 1.0
        wait_until(expired, "b's lease to run out", step=both_ping)
        wait_until(lambda: cluster.core.version == 1, "round 0 to close without b", step=both_ping)
        assert sorted(cluster.core.members) == [a]
    finally:
        victim.close()
        attacker.close()


def test_secrets_survive_a_restart_from_a_checkpoint(loop_thread, tmp_path):
    config = dict(host="127.0.0.1", port=0, metrics_port=-1, min_workers=2, tau_max=2, check_core_thread=True)
    server = loop_thread.run(start_server(ServerConfig(checkpoint_dir=str(tmp_path), **config)))
    client = RawClient(f"127.0.0.1:{server.port}")
    a, b = client.join().worker_id, client.join().worker_id
    client.seed(a, torch.zeros(16))
    client.push(a, 0, [1], [1.0])
    client.push(b, 0, [2], [1.0])
    client.push(a, 1, [3], [1.0])  # round 1 open, waiting for b
    client.close()
    loop_thread.run(server.stop(0.5))  # writes the final checkpoint
    # The checkpoint holds each member's digest, never the secret itself.
    state = read_checkpoint(tmp_path)
    assert state["format"] == CHECKPOINT_FORMAT == 2
    digests = {m["worker_id"]: m["secret_digest"] for m in state["members"]}
    assert digests == {w: hashlib.sha256(client.secrets[w]).hexdigest() for w in (a, b)}
    raw = checkpoint_path(tmp_path).read_bytes()
    assert not any(client.secrets[w] in raw for w in (a, b))

    server = loop_thread.run(start_server(ServerConfig(resume_dir=str(tmp_path), **config)))
    member, attacker = RawClient(f"127.0.0.1:{server.port}"), RawClient(f"127.0.0.1:{server.port}")
    try:
        member.secrets = dict(client.secrets)  # the same processes, reconnecting
        before = server_state(server.service.core)
        assert code_of(lambda: attacker.push(b, 1, [4], [1.0])) == DENIED
        assert code_of(lambda: attacker.resume(a)) == DENIED
        assert_unchanged(before, server_state(server.service.core))
        resumed = member.resume(a)
        assert resumed.member and list(resumed.held_rounds) == [1]
        assert member.push(b, 1, [4], [1.0]).version == 2
    finally:
        member.close()
        attacker.close()
        loop_thread.run(server.stop(0.5))


def test_a_format_1_checkpoint_restores_its_members_by_id_alone(caplog):
    """Checkpoints from before member secrets still resume (their members present no secret),
    with a warning naming them; an unknown format is refused."""
    core = ServerCore(CoreConfig(min_workers=1))
    joined = core.join(16, FINGERPRINT, secret_digest=member_secret_digest(b"s" * 16))
    core.seed(joined.worker_id, torch.zeros(16))
    state = core_state(core)
    with pytest.raises(PermissionDenied):
        restore_core(state, CoreConfig()).view().authenticate(joined.worker_id, b"")
    state["format"] = 1
    for member in state["members"]:
        del member["secret_digest"]
    with caplog.at_level(logging.WARNING, logger="wanps.server"):
        legacy = restore_core(state, CoreConfig())
    legacy.view().authenticate(joined.worker_id, b"")  # identified by its id, as format 1 was
    assert f"members [{joined.worker_id}] have no member secret" in caplog.text
    state["format"] = 3
    with pytest.raises(ValueError, match="unsupported checkpoint format 3"):
        restore_core(state, CoreConfig())


# ---------------------------------------------------------------------------- Ping


def test_ping_for_an_unknown_id_is_not_found(victim_and_attacker):
    cluster, victim, attacker, a, b, eve = victim_and_attacker
    assert code_of(lambda: attacker.ping(999)) == grpc.StatusCode.NOT_FOUND
    assert attacker.ping(eve).version == 0  # an observer pings with its own secret
    assert victim.stub.Ping(pb.PingRequest(sent_unix_ns=5), timeout=10).sent_unix_ns == 5  # anonymous probe: id 0
    victim.leave(b)
    wait_until(lambda: b not in cluster.core.members, "b to leave", step=lambda: victim.ping(a))
    assert code_of(lambda: victim.ping(b)) == grpc.StatusCode.NOT_FOUND


def test_a_worker_the_server_forgot_hears_it_from_its_ping_and_joins_again(make_cluster):
    cluster = make_cluster(min_workers=1, policy=None)
    session = WorkerSession(cluster.server_address)
    forget = RawClient(cluster.server_address)
    try:
        reply = session.join(16, FINGERPRINT, "forgotten")
        session.seed(torch.zeros(16))
        pulled = session.pull(timeout=10)
        replica = Replica(pulled.values.clone(), pulled.version)
        session.follow_updates(replica.version)
        session.follow_decisions()  # starts the heartbeat pings
        # The server forgets the worker (as after a lease expiry): only its pings can tell it.
        forget.stub.Leave(pb.LeaveRequest(worker_id=reply.worker_id, member_secret=session.member_secret),
                          timeout=10)
        lost = session.deltas.get(timeout=10)
        assert isinstance(lost, ConnectionLost) and "NOT_FOUND" in str(lost)
        recovery = session.recover(replica, lambda version: None, tau_max=0, next_round=0, timeout=30)
        assert recovery.rejoined and session.worker_id != reply.worker_id
        assert session.worker_id in cluster.core.members
    finally:
        forget.close()
        session.close()


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, words", [
    ("w1\n2024-01-01 00:00:00 INFO wanps.server: forged", "U+000A"),
    ("x" * 1_000_000, "1000000 characters; at most 64"),
    ("x" * (MAX_NAME_CHARS + 1), "65 characters"),
    ("invoice\u202efdp.exe", "U+202E"),
    ("bell\x07", "U+0007"),
])
def test_names_are_bounded_one_line_text(make_cluster, caplog, name, words):
    cluster = make_cluster(min_workers=1, policy=None)
    client = RawClient(cluster.server_address)
    try:
        with caplog.at_level(logging.INFO, logger="wanps.server"):
            with pytest.raises(grpc.RpcError) as refused:
                client.join(name=name)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in refused.value.details() and len(refused.value.details()) < 200
            assert not cluster.core.members and not cluster.core.observers
            accepted = client.join(name="w" * MAX_NAME_CHARS)
        assert "forged" not in caplog.text and "x" * 100 not in caplog.text
        assert f"join: id {accepted.worker_id} ({'w' * MAX_NAME_CHARS})" in caplog.text
    finally:
        client.close()


def test_a_workers_bad_name_is_a_value_error_before_anything_changes(make_cluster):
    cluster = make_cluster(min_workers=1, policy=None)
    session = WorkerSession(cluster.server_address)
    try:
        with pytest.raises(ValueError, match=r"refused to join: name has a control .* \(U\+000A\) at position 4$"):
            session.first_join(16, FINGERPRINT, "evil\nname", timeout=10)
        assert not cluster.core.members
    finally:
        session.close()


def test_a_different_model_size_at_join_is_failed_precondition_and_model_mismatch(make_cluster):
    """One rule (docs/architecture.md): well formed, but not this cluster's model."""
    cluster = make_cluster(min_workers=1, policy=None)
    client = RawClient(cluster.server_address)
    session = WorkerSession(cluster.server_address)
    try:
        client.join()
        assert code_of(lambda: client.join(num_params=17)) == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(ModelMismatch, match="model has 17 parameters; this cluster trains 16") as refused:
            session.first_join(17, FINGERPRINT, "other", timeout=10)
        assert refused.value.__cause__.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert len(cluster.core.members) == 1
    finally:
        client.close()
        session.close()


def test_secrets_are_random_per_member(make_cluster):
    cluster = make_cluster(min_workers=1, policy=None)
    client = RawClient(cluster.server_address)
    try:
        secrets = [client.join().member_secret for _ in range(4)] + [client.join(observer=True).member_secret]
        assert len(set(secrets)) == 5 and all(len(s) == 16 for s in secrets)
        assert len({cluster.core.members[w].secret_digest for w in cluster.core.members}) == 4
    finally:
        client.close()
