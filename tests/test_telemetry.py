"""Link samples are bounded (wanps.worker.telemetry): none without a controller, one report's worth with."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from wanps.proto import wanps_pb2 as pb
from wanps.worker.io_loop import IoLoop
from wanps.worker.session import WorkerSession
from wanps.worker.telemetry import MAX_SAMPLES_PER_REPORT, Telemetry


@pytest.fixture
def io() -> Iterator[IoLoop]:
    io = IoLoop()
    yield io
    io.stop()


async def settled() -> None:
    """Awaited through IoLoop.call: every callback handed to the loop before it has run."""


def test_without_a_controller_no_sample_is_kept(io: IoLoop) -> None:
    telemetry = Telemetry(io, controller=None)
    for round_ in range(3 * MAX_SAMPLES_PER_REPORT):
        telemetry.sample(pb.LinkSample.KIND_PUSH, 100, 0.01, round_)
        telemetry.record_compute(0.01, round_)
    io.call(settled)
    assert len(telemetry.samples) == 0
    assert telemetry.reported_round == 3 * MAX_SAMPLES_PER_REPORT - 1  # the round is still tracked


def test_unreported_samples_stay_within_one_report_newest_kept(io: IoLoop) -> None:
    telemetry = Telemetry(io, controller=object())  # a controller that is never reached: no report loop runs
    for round_ in range(3 * MAX_SAMPLES_PER_REPORT):
        telemetry.sample(pb.LinkSample.KIND_PUSH, 100, 0.01, round_)
    assert len(telemetry.samples) == MAX_SAMPLES_PER_REPORT
    assert telemetry.samples[-1].round == 3 * MAX_SAMPLES_PER_REPORT - 1
    telemetry.stop_collecting()  # an observer: nobody will report
    telemetry.sample(pb.LinkSample.KIND_PING, 0, 0.01, 0)
    io.call(settled)
    assert len(telemetry.samples) == 0


def test_the_first_ping_goes_out_at_once_not_after_an_interval(io: IoLoop, monkeypatch) -> None:
    """Before the worker's first push (the path still idle): an interval this long would
    otherwise hold it back for the whole test."""
    import threading

    from wanps.worker import telemetry as telemetry_module
    monkeypatch.setattr(telemetry_module, "PING_INTERVAL_S", 3600.0)
    telemetry = Telemetry(io, controller=object())
    pinged = threading.Event()

    async def ping(padding: bytes, reply_bytes: int = 0) -> pb.PingReply:
        pinged.set()
        return pb.PingReply()

    io.spawn(lambda: telemetry.ping_loop(ping))
    assert pinged.wait(timeout=10)
    io.call(settled)
    pings = [s for s in telemetry.samples if s.kind == pb.LinkSample.KIND_PING]
    assert len(pings) == 1 and pings[0].bytes == 0  # an RTT sample, before any push


def test_a_session_without_a_controller_keeps_no_samples() -> None:
    session = WorkerSession("127.0.0.1:1")  # never dialled: channels connect lazily
    try:
        for round_ in range(3 * MAX_SAMPLES_PER_REPORT):
            session.record_compute(0.01, round_)
        session._io.call(settled)
        assert len(session.telemetry.samples) == 0
    finally:
        session.close()


@pytest.mark.timeout(120)
def test_probes_measure_each_direction_of_an_asymmetric_link_without_any_push(make_cluster, loop_thread) -> None:
    """A worker that never pushes (a tiny delta at its limit): probes alone give the controller
    both directions, through a real emulated link of 8 Mbit/s up and 2 down."""
    import time

    import torch

    from wanps.linkem.proxy import LinkEmulator
    from wanps.linkem.trace import LinkTrace
    from wanps.proto.codec import fingerprint_of

    cluster = make_cluster(policy="static")
    link = LinkEmulator("127.0.0.1", 0, "127.0.0.1", cluster.server.port, LinkTrace.fixed(8, 10),
                        downlink_trace=LinkTrace.fixed(2, 10))
    loop_thread.run(link.start())
    session = WorkerSession(f"127.0.0.1:{link.bound_port}", cluster.controller_address)
    try:
        reply = session.join(16, fingerprint_of([("w", (16,), "float32")]), name="probe-test", timeout=30)
        session.seed(torch.zeros(16))
        session.follow_decisions()
        core = cluster.controller.service.core
        deadline = time.monotonic() + 90
        estimate = None
        while time.monotonic() < deadline:  # bounded: the estimate needs three probes each way
            estimate = loop_thread.run(_estimate_of(core, reply.worker_id))
            if estimate is not None and estimate.down_samples >= 3 and estimate.down_bandwidth_bps is not None:
                break
            session.wait_for_decision(0.5)  # a bounded wait between polls
        assert estimate is not None and estimate.down_bandwidth_bps is not None, estimate
        assert estimate.down_bandwidth_bps < estimate.bandwidth_bps / 2  # 2 Mbit/s down against 8 up
        probes = cluster.server_registry.get_sample_value("wanps_server_probe_bytes_total", {"direction": "down"})
        assert probes and probes > 0
    finally:
        session.close()
        loop_thread.run(link.close())


async def _estimate_of(core, worker_id):
    """Read on the controller's loop."""
    return core.estimates.get(worker_id)


def test_pushes_queued_behind_the_workers_own_pushes_are_timed_by_their_dispersion(io: IoLoop) -> None:
    """Four 10 kB pushes sent 10 ms apart on a 1 Mbit/s link with a 100 ms RTT: each takes 80 ms
    on the link, so the acks come 80 ms apart; all but the first waited behind the one before."""
    from wanps.controller.estimator import KIND_PING, KIND_PUSH, LinkEstimator, Sample

    telemetry = Telemetry(io, controller=object())
    telemetry.probes.rtt(0.1, 0.0)
    for i in range(4):
        sent, acked = 0.01 * i, 0.1 + 0.08 * (i + 1)
        telemetry.push_acknowledged(10_000, sent, acked, i, 1250)
    samples = list(telemetry.samples)
    assert samples[0].queued_s == 0.0  # the link was idle
    for i, sample in enumerate(samples[1:], start=1):
        assert sample.seconds == pytest.approx(0.1 + 0.08 * (i + 1) - 0.01 * i)
        assert sample.seconds - sample.queued_s == pytest.approx(0.08)  # its own transfer
    # The controller reads 1 Mbit/s from them, not 10 kB over the whole wait.
    estimator = LinkEstimator()
    estimator.add(Sample(KIND_PING, 0, 0.1, 0.0))
    for s in samples:
        estimator.add(Sample(KIND_PUSH, s.bytes, s.seconds, 0.0, queued_s=s.queued_s))
    assert estimator.estimate(0.0).bandwidth_bps == pytest.approx(1e6, rel=1e-6)


def test_a_queued_push_reports_its_one_way_transfer_never_more_than_its_round_trip(io: IoLoop) -> None:
    """Two 100 B pushes, then a 10 kB one sent while the second still waited: the train's
    dispersion spans from the first push's ack, before the big push was sent, and reads a
    transfer longer than the push's own round trip. The server's stamps time it on its own."""
    telemetry = Telemetry(io, controller=object())
    telemetry.probes.rtt(0.001, 1.0)
    telemetry.one_way.ping(1.0, 1_000_500_000, 1.001)  # offset 0, 0.5 ms each way
    pushes = [(100, 1.0, 1.0052, 1.010), (100, 1.002, 1.0075, 1.012), (10_000, 1.0105, 1.012, 1.0135)]
    for i, (nbytes, sent, received, acked) in enumerate(pushes):
        telemetry.push_acknowledged(nbytes, sent, acked, i, nbytes // 8, received_ns=round(received * 1e9))
    samples = list(telemetry.samples)
    assert all(0 < s.transfer_s <= s.seconds for s in samples)
    # from the earliest arrival (sent + 0.5 ms; the uplink was free of its own pushes by then)
    assert samples[2].transfer_s == pytest.approx(0.001)
    assert samples[1].queued_s > 0 and samples[2].queued_s > 0  # both waited behind the pushes before them
