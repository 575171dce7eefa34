"""The worker's push log (wanps.worker.push_log) on its own: what it holds and counts, the
byte cap, durability, replacement, and the dropped rounds' mass it gives back."""
from __future__ import annotations

import logging

import torch

from wanps.proto import codec
from wanps.proto import wanps_pb2 as pb
from wanps.worker.push_log import LoggedPush, PushLog

T = 64  # trainable elements of the pretend model


def logged(round_: int, indices: list[int] | None = None, values: list[float] | None = None) -> LoggedPush:
    """A push as the session logs it: a real update and its encoded messages."""
    indices = [round_ % T, (round_ + 1) % T] if indices is None else indices
    values = [1.0 + round_, -0.5] if values is None else values
    order = sorted(range(len(indices)), key=indices.__getitem__)
    update = codec.Update(values=torch.tensor([values[i] for i in order], dtype=torch.float32),
                          indices=torch.tensor([indices[i] for i in order], dtype=torch.int32))
    messages, nbytes = codec.push_messages(pb.PushHeader(worker_id=1, round=round_, computed_at_version=round_), update)
    return LoggedPush(round_, round_, update, messages, nbytes)


def skip(round_: int) -> LoggedPush:
    messages, nbytes = codec.push_messages(pb.PushHeader(worker_id=1, round=round_, computed_at_version=round_), None)
    return LoggedPush(round_, round_, None, messages, nbytes)


def test_a_logged_push_counts_its_messages_and_its_tensors_not_only_the_payload() -> None:
    push = logged(3, indices=list(range(16)), values=[0.25] * 16)
    encoded = sum(message.ByteSize() for message in push.messages)
    tensors = 16 * 4 + 16 * 4  # int32 indices + float32 values
    assert push.nbytes == 16 * 8  # the payload on the wire
    assert push.held == encoded + tensors and push.held > 2 * push.nbytes
    log = PushLog()
    log.append(push)
    log.append(logged(4))
    assert log.held_bytes == push.held + log.get(4).held


def test_the_byte_cap_drops_the_oldest_applied_pushes_first() -> None:
    pushes = [logged(round_) for round_ in range(5)]
    newest_three = sum(push.held for push in pushes[2:])
    log = PushLog(max_bytes=newest_three, trainable=T)
    log.note_reply(version=100, durable_version=0)
    for push in pushes:
        log.append(push)
    assert [log.get(r) is not None for r in range(5)] == [False, False, True, True, True]
    assert log.held_bytes == newest_three and len(log) == 3


def test_pushes_of_rounds_not_yet_closed_stay_over_the_cap() -> None:
    """A push in flight may come back late or need a replay: only rounds the server had closed
    when a reply left it are dropped."""
    size = logged(0).held
    log = PushLog(max_bytes=size, trainable=T)
    for round_ in range(3):
        log.append(logged(round_))
    assert len(log) == 3 and log.dropped == ()
    log.note_reply(version=2, durable_version=0)  # rounds 0 and 1 closed
    assert [log.get(r) is not None for r in range(3)] == [False, False, True]
    assert [(d.first, d.last) for d in log.dropped] == [(0, 1)]


def test_rounds_below_the_durable_version_are_forgotten_and_it_never_goes_back() -> None:
    log = PushLog()
    for round_ in range(5):
        log.append(logged(round_))
    log.forget_below(3)
    assert [log.get(r) is not None for r in range(5)] == [False, False, False, True, True]
    assert log.durable_version == 3 and log.held_bytes == log.get(3).held + log.get(4).held
    log.forget_below(1)  # an older reply arriving late
    assert log.durable_version == 3 and len(log) == 2


def test_a_push_of_the_same_round_replaces_the_logged_one_and_its_bytes() -> None:
    log = PushLog()
    log.append(logged(2, indices=list(range(10)), values=[1.0] * 10))
    replacement = logged(2)
    log.append(replacement)
    assert log.get(2) is replacement
    assert log.held_bytes == replacement.held and len(log) == 1


def test_clear_forgets_the_pushes_the_durable_version_and_the_dropped_rounds() -> None:
    log = PushLog(max_bytes=1, trainable=T)
    log.note_reply(version=10, durable_version=2)
    log.append(logged(4))
    log.append(logged(5))
    assert log.dropped != ()
    log.clear()
    assert log.get(5) is None and len(log) == 0 and log.held_bytes == 0 and log.durable_version == 0
    assert log.dropped == ()


def dropping_log() -> tuple[PushLog, torch.Tensor]:
    """Rounds 0-5 pushed and applied, a cap that keeps one: 0-4 dropped. Returns their summed update."""
    log = PushLog(max_bytes=1, trainable=T)
    expected = torch.zeros(T)
    for round_ in range(6):
        push = logged(round_, indices=[round_, 2 * round_ + 7], values=[0.5 * round_ + 1, -1.25])
        log.append(push)
        log.note_reply(version=round_ + 1, durable_version=0)
        if round_ < 5:
            expected.index_add_(0, push.update.indices.long(), push.update.values)
    log.append(skip(6))  # a skip record drops round 5 and adds nothing
    expected.index_add_(0, torch.tensor([5, 17]), torch.tensor([3.5, -1.25]))
    return log, expected


def test_dropped_rounds_the_server_lost_come_back_whole_for_error_feedback() -> None:
    log, expected = dropping_log()
    assert [(d.first, d.last) for d in log.dropped] == [(0, 5)]
    lost = log.take_lost(server_version=0, held_rounds=set())  # the server resumed from before round 0
    assert lost is not None and lost.indices is None
    assert torch.equal(lost.values, expected)
    assert log.dropped == () and log.take_lost(0, set()) is None  # handed back once


def test_dropped_rounds_the_server_kept_are_not_given_back() -> None:
    log, _ = dropping_log()
    assert log.take_lost(server_version=6, held_rounds=set()) is None  # all applied and kept
    log, _ = dropping_log()
    assert log.take_lost(server_version=3, held_rounds={3, 4, 5}) is None  # the rest held in open rounds


def test_dropped_rounds_become_durable_and_their_sum_is_freed() -> None:
    log, _ = dropping_log()
    log.forget_below(4)
    assert log.dropped != ()  # rounds 4 and 5 may still be lost
    log.forget_below(6)
    assert log.dropped == ()


def test_a_checkpoint_the_server_takes_splits_the_dropped_rounds_so_a_crash_after_it_loses_nothing() -> None:
    """The snapshot is reported before it is durable: rounds on each side are summed apart, and
    a server that resumes from it gives back exactly the rounds after it."""
    log = PushLog(max_bytes=1, trainable=T)
    after = torch.zeros(T)
    for round_ in range(8):
        push = logged(round_, indices=[round_], values=[1.0 + round_])
        log.append(push)
        # The server takes a checkpoint at version 4; its write finishes only later.
        log.note_reply(version=round_ + 1, durable_version=0, snapshot_version=4 if round_ >= 3 else 0)
        if 4 <= round_ < 7:
            after.index_add_(0, push.update.indices.long(), push.update.values)
    assert [(d.first, d.last) for d in log.dropped] == [(0, 3), (4, 6)]
    lost = log.take_lost(server_version=4, held_rounds=set())  # the crash: resumed from the checkpoint at 4
    assert lost is not None and torch.equal(lost.values, after)


def test_the_sum_before_a_checkpoint_is_freed_once_it_is_durable() -> None:
    log = PushLog(max_bytes=1, trainable=T)
    for round_ in range(8):
        log.append(logged(round_))
        log.note_reply(version=round_ + 1, durable_version=0, snapshot_version=4 if round_ >= 3 else 0)
    log.note_reply(version=8, durable_version=4, snapshot_version=4)
    assert [(d.first, d.last) for d in log.dropped] == [(4, 6)]


def test_a_server_that_kept_some_dropped_rounds_and_lost_others_gets_a_warning(caplog) -> None:
    """Not possible while the server reports its checkpoints; an older server (no snapshot
    version) resuming inside the dropped rounds is the case."""
    log, _ = dropping_log()
    with caplog.at_level(logging.WARNING, logger="wanps.worker"):
        assert log.take_lost(server_version=3, held_rounds=set()) is None
    assert "rounds 0-5 were dropped" in caplog.text and "lost 3 of them (from round 3)" in caplog.text

