"""The worker's push log (wanps.worker.push_log) on its own: byte cap, durability, replacement."""
from __future__ import annotations

from wanps.worker.push_log import LoggedPush, PushLog


def logged(round_: int, nbytes: int) -> LoggedPush:
    return LoggedPush(round=round_, computed_at_version=round_, update=None, messages=[], nbytes=nbytes)


def test_the_byte_cap_drops_the_oldest_pushes_first() -> None:
    log = PushLog(max_bytes=100)
    for round_ in range(5):
        log.append(logged(round_, 30))
    assert [log.get(r) is not None for r in range(5)] == [False, False, True, True, True]
    assert log.nbytes == 90 and len(log) == 3


def test_the_newest_push_stays_even_when_it_alone_is_over_the_cap() -> None:
    log = PushLog(max_bytes=100)
    log.append(logged(0, 30))
    log.append(logged(1, 150))
    assert log.get(0) is None and log.get(1) is not None
    assert log.nbytes == 150 and len(log) == 1


def test_rounds_below_the_durable_version_are_forgotten_and_it_never_goes_back() -> None:
    log = PushLog()
    for round_ in range(5):
        log.append(logged(round_, 10))
    log.forget_below(3)
    assert [log.get(r) is not None for r in range(5)] == [False, False, False, True, True]
    assert log.durable_version == 3 and log.nbytes == 20
    log.forget_below(1)  # an older reply arriving late
    assert log.durable_version == 3 and len(log) == 2


def test_a_push_of_the_same_round_replaces_the_logged_one_and_its_bytes() -> None:
    log = PushLog()
    log.append(logged(2, 40))
    replacement = logged(2, 10)
    log.append(replacement)
    assert log.get(2) is replacement
    assert log.nbytes == 10 and len(log) == 1


def test_clear_forgets_the_pushes_and_the_durable_version() -> None:
    log = PushLog()
    log.append(logged(4, 10))
    log.forget_below(2)
    log.clear()
    assert log.get(4) is None and len(log) == 0 and log.nbytes == 0 and log.durable_version == 0
