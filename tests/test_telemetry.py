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


def test_a_session_without_a_controller_keeps_no_samples() -> None:
    session = WorkerSession("127.0.0.1:1")  # never dialled: channels connect lazily
    try:
        for round_ in range(3 * MAX_SAMPLES_PER_REPORT):
            session.record_compute(0.01, round_)
        session._io.call(settled)
        assert len(session.telemetry.samples) == 0
    finally:
        session.close()
