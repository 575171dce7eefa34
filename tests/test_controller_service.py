"""The controller's gRPC edge on a real controller: the core on its own thread (never the
event loop), gauges refreshed per report for the reporting worker only, a bounded decision
book, and SetPolicy's tau bound."""
from __future__ import annotations

import threading

import grpc
import pytest

from wanps.controller.decisions import MAX_PENDING_DECISIONS
from wanps.controller.engine import ControllerCore, TooManyPendingDecisions, with_policy
from wanps.controller.policy import PolicyConfig
from wanps.proto import wanps_pb2 as pb
from wanps.proto import wanps_pb2_grpc as pb_grpc
from wanps.proto.wire import MAX_TAU
from wanps.rpc.auth import sync_channel

from test_controller_engine import link_samples

pytestmark = pytest.mark.timeout(120)


def report(worker_id: int, round_: int, t: float = 0.0) -> pb.ReportRequest:
    samples = [pb.LinkSample(kind={"ping": pb.LinkSample.KIND_PING, "push": pb.LinkSample.KIND_PUSH,
                                   "compute": pb.LinkSample.KIND_COMPUTE,
                                   "download": pb.LinkSample.KIND_DOWNLOAD}[s.kind],
                             bytes=s.nbytes, seconds=s.seconds, round=round_)
               for s in link_samples(t, 20e6, 0.05, 0.02)]
    return pb.ReportRequest(worker_id=worker_id, round=round_, samples=samples, num_params=100_000)


def gauge(cluster, name: str, worker: int) -> float | None:
    return cluster.controller_registry.get_sample_value(name, {"worker": str(worker)})


def test_the_core_runs_on_one_thread_that_is_not_the_event_loop(make_cluster):
    cluster = make_cluster(policy="deco")
    core = cluster.controller.service.core
    threads: set[int] = set()
    for name in ("report", "set_policy", "maybe_decide"):
        original = getattr(core, name)

        def recorded(*args, _original=original, **kwargs):
            threads.add(threading.get_ident())
            return _original(*args, **kwargs)

        setattr(core, name, recorded)
    with sync_channel(cluster.controller_address) as channel:
        stub = pb_grpc.ControllerStub(channel)
        for round_ in range(3):
            stub.Report(report(1, round_), timeout=10)
        stub.SetPolicy(pb.SetPolicyRequest(policy="dsgd"), timeout=10)
        stub.GetState(pb.GetStateRequest(), timeout=10)
    assert len(threads) == 1, "the core was called from several threads"
    assert threads != {cluster.loop.thread.ident}, "the core ran on the event loop"


def test_a_report_refreshes_only_its_own_workers_gauges(make_cluster):
    cluster = make_cluster(policy="static")
    bandwidth = "wanps_controller_link_bandwidth_bits_per_second"
    with sync_channel(cluster.controller_address) as channel:
        stub = pb_grpc.ControllerStub(channel)
        for worker in (1, 2):
            stub.Report(report(worker, 0), timeout=10)
        assert gauge(cluster, bandwidth, 1) and gauge(cluster, bandwidth, 2)
        cluster.controller.service.metrics.bandwidth.labels(worker="2").set(-1.0)  # a mark on worker 2's gauge
        stub.Report(report(1, 1, t=1.0), timeout=10)
        assert gauge(cluster, bandwidth, 2) == -1.0, "worker 1's report rewrote worker 2's gauges"
        stub.Report(report(2, 1, t=1.0), timeout=10)
        assert gauge(cluster, bandwidth, 2) > 0


def test_set_policy_refuses_a_tau_beyond_the_documented_bound(make_cluster):
    cluster = make_cluster(policy="static", tau=1, delta=0.1)
    core = cluster.controller.service.core
    with sync_channel(cluster.controller_address) as channel:
        stub = pb_grpc.ControllerStub(channel)
        for tau in (2**32 - 1, MAX_TAU + 1):
            with pytest.raises(grpc.RpcError) as refused:
                stub.SetPolicy(pb.SetPolicyRequest(policy="static", tau=tau, delta=0.5), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"tau in [0, {MAX_TAU}]" in refused.value.details()
            assert (core.policy.tau, core.policy.delta) == (1, 0.1)  # nothing changed
        reply = stub.SetPolicy(pb.SetPolicyRequest(policy="static", tau=MAX_TAU, delta=0.5), timeout=10)
        assert reply.decision.tau == MAX_TAU


def test_policy_switches_at_one_round_replace_each_other_in_the_book(make_cluster):
    """Nobody reports: every switch is scheduled at the same round, the newest replaces the
    older one, and the book (and what a new subscriber is sent) stays small."""
    cluster = make_cluster(policy="static", tau=1, delta=0.1)
    core = cluster.controller.service.core
    with sync_channel(cluster.controller_address) as channel:
        stub = pb_grpc.ControllerStub(channel)
        stub.Report(report(1, 5), timeout=10)  # round 5: switches hold from ahead of it
        for i in range(200):
            stub.SetPolicy(pb.SetPolicyRequest(policy="dsgd" if i % 2 else "static", tau=1 + i % 3, delta=0.1),
                           timeout=10)
        state = stub.GetState(pb.GetStateRequest(), timeout=10)
    # Nothing is in force before round 105 (a first decision after round 0 holds from ahead of
    # it): the newest switch alone, at that round.
    assert len(core.book) == 1
    assert [(d.policy, d.from_round) for d in state.decisions] == [("dsgd", 105)]


def test_switches_at_ever_later_rounds_are_bounded_and_refused_past_the_bound():
    core = ControllerCore(PolicyConfig(name="static", tau=1, delta=0.1))
    core.maybe_decide(0.0)
    policies = ("dsgd", "static")
    with pytest.raises(TooManyPendingDecisions):
        for i in range(10 * MAX_PENDING_DECISIONS):
            core.reported_round = i  # the reported round creeps on while switches are scheduled ahead of it
            core.set_policy(with_policy(core.policy, policies[i % 2]), float(i))
    assert core.book.pending(core.reported_round) == MAX_PENDING_DECISIONS
    assert len(core.book) <= MAX_PENDING_DECISIONS + 1
    policy = core.policy
    with pytest.raises(TooManyPendingDecisions):  # refused: changes nothing
        core.set_policy(with_policy(core.policy, "dsgd" if policy.name == "static" else "static"), 1e6)
    assert core.policy == policy


def test_a_newer_switch_is_never_overtaken_by_an_older_one_scheduled_later():
    """The first switch is scheduled 100 rounds ahead (the speed is not known yet); a second one
    made once it is would hold from sooner, and the first would then take over again at its
    round. It holds from the first one's round instead, and replaces it."""
    core = ControllerCore(PolicyConfig(name="static", tau=1, delta=0.1, switch_margin_rounds=10,
                                       switch_margin_rounds_cold=100, switch_margin_s=0.0))
    core.maybe_decide(0.0)
    core.reported_round = 5
    first = core.set_policy(with_policy(core.policy, "dsgd"), 0.0)
    assert first.from_round == 105
    core._progress.extend([(0.0, 5), (1.0, 50)])  # now the speed is known: the margin is 10 rounds
    core.reported_round = 50
    second = core.set_policy(with_policy(core.policy, "static", tau=3, delta=0.2), 1.0)
    assert second.from_round == first.from_round
    assert [d.decision_id for d in core.book.relevant(50)] == [core.book.relevant(50)[0].decision_id,
                                                                second.decision_id]


def test_status_says_what_deco_minimises_and_with_which_rounds_model(make_cluster):
    import json
    import subprocess

    from wanps.deploy.processes import wanps_command

    cluster = make_cluster(policy="deco", objective="time", staleness_weight=1.34, compression_knee=56.0)
    status = subprocess.run(wanps_command("controller", "status", "--controller", cluster.controller_address),
                            capture_output=True, text=True, timeout=60, check=True)
    state = json.loads(status.stdout)
    assert (state["objective"], state["staleness_weight"], state["compression_knee"]) == ("time", 1.34, 56.0)
    default = make_cluster(policy="deco")
    with sync_channel(default.controller_address) as channel:
        state = pb_grpc.ControllerStub(channel).GetState(pb.GetStateRequest(), timeout=10)
    assert (state.objective, state.compression_knee) == ("phi", 0.0)
