"""Unit tests of decisions and the decision book (wanps.controller.decisions): pure, no network."""
from __future__ import annotations

import pytest

from wanps.proto.decisions import Decision, decision_for_round
from wanps.controller.decisions import DecisionBook


def dec(decision_id: int, from_round: int, tau: int = 1, delta: float = 0.1) -> Decision:
    return Decision(decision_id, from_round, tau, delta, "static", f"d{decision_id}")


# ------------------------------------------------------------------------------ Decision


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": -1}, r"tau must be in \[0, 1024\]"),
        ({"tau": 1025}, r"tau must be in \[0, 1024\], got 1025"),
        ({"delta": 0.0}, "delta must be in"),
        ({"delta": -0.5}, "delta must be in"),
        ({"delta": 1.5}, "delta must be in"),
        ({"delta": float("nan")}, "delta must be in"),
        ({"from_round": -1}, "from_round must be >= 0"),
    ],
)
def test_decision_validation(kwargs: dict, match: str) -> None:
    fields = {"decision_id": 1, "from_round": 0, "tau": 0, "delta": 1.0, "policy": "dsgd", "reason": "r"} | kwargs
    with pytest.raises(ValueError, match=match):
        Decision(**fields)


def test_decision_edges_accepted() -> None:
    d = Decision(1, 0, 0, 1.0, "dsgd", "edge")
    assert (d.from_round, d.tau, d.delta) == (0, 0, 1.0)
    tiny = Decision(2, 5, 100, 1e-9, "static", "tiny")
    assert tiny.delta == 1e-9
    with pytest.raises(AttributeError):
        d.tau = 3  # type: ignore[misc]  # frozen


# ------------------------------------------------------------------------------ decision_for_round


def test_decision_for_round_latest_from_round_wins() -> None:
    decisions = [dec(1, 0), dec(2, 10), dec(3, 5)]
    assert decision_for_round(decisions, 0).decision_id == 1
    assert decision_for_round(decisions, 4).decision_id == 1
    assert decision_for_round(decisions, 5).decision_id == 3
    assert decision_for_round(decisions, 9).decision_id == 3
    assert decision_for_round(decisions, 10).decision_id == 2
    assert decision_for_round(decisions, 1000).decision_id == 2


def test_decision_for_round_ties_go_to_the_newest_id() -> None:
    decisions = [dec(4, 3), dec(2, 3), dec(7, 3), dec(5, 1)]
    assert decision_for_round(decisions, 3).decision_id == 7
    assert decision_for_round(decisions, 2).decision_id == 5
    assert decision_for_round(list(reversed(decisions)), 3).decision_id == 7


def test_decision_for_round_ignores_future_decisions() -> None:
    assert decision_for_round([dec(1, 5), dec(2, 8)], 4) is None
    assert decision_for_round([], 0) is None
    assert decision_for_round([dec(1, 2), dec(2, 8)], 7).decision_id == 1
    # Works on any iterable, once.
    assert decision_for_round(iter([dec(1, 0), dec(2, 1)]), 1).decision_id == 2


# ------------------------------------------------------------------------------ DecisionBook


def test_book_assigns_increasing_ids_and_tracks_latest() -> None:
    book = DecisionBook()
    assert book.latest is None
    first = book.add(0, 0, 1.0, "dsgd", "start")
    second = book.add(10, 2, 0.25, "static", "later")
    assert (first.decision_id, second.decision_id) == (1, 2)
    assert (second.from_round, second.tau, second.delta, second.policy, second.reason) == (10, 2, 0.25, "static", "later")
    assert book.latest is second


def test_book_add_validates_without_consuming_an_id() -> None:
    book = DecisionBook()
    with pytest.raises(ValueError):
        book.add(0, -1, 0.5, "static", "bad")
    assert book.latest is None
    assert book.add(0, 1, 0.5, "static", "ok").decision_id == 1


def test_book_relevant_is_current_plus_future_in_id_order() -> None:
    book = DecisionBook()
    d1 = book.add(0, 0, 1.0, "dsgd", "a")
    d2 = book.add(5, 1, 0.5, "static", "b")
    d3 = book.add(5, 2, 0.25, "static", "c")  # same round as d2, newer: replaces it
    d4 = book.add(20, 3, 0.1, "static", "d")
    assert book.relevant(0) == [d1, d2, d3, d4]
    assert book.relevant(4) == [d1, d2, d3, d4]
    assert book.relevant(5) == [d3, d4]
    assert book.relevant(19) == [d3, d4]
    assert book.relevant(20) == [d4]
    assert book.relevant(100) == [d4]


def test_book_relevant_keeps_id_order_when_rounds_are_out_of_order() -> None:
    book = DecisionBook()
    late = book.add(10, 1, 0.5, "static", "far")
    early = book.add(3, 2, 0.5, "static", "near")
    assert book.relevant(0) == [late, early]  # both in the future, id order
    assert book.relevant(4) == [late, early]  # early is current, late still ahead
    assert book.relevant(10) == [late]


def test_book_relevant_with_nothing_in_force() -> None:
    book = DecisionBook()
    d1 = book.add(5, 1, 0.5, "static", "x")
    assert book.relevant(2) == [d1]
    assert DecisionBook().relevant(3) == []


def test_book_prune_drops_superseded_decisions() -> None:
    book = DecisionBook()
    d1 = book.add(0, 0, 1.0, "dsgd", "a")
    d2 = book.add(5, 1, 0.5, "static", "b")
    d3 = book.add(9, 2, 0.25, "static", "c")
    book.prune(4)
    assert book.relevant(0) == [d1, d2, d3]
    book.prune(6)
    assert book.relevant(0) == [d2, d3]  # d1 is gone for good
    assert decision_for_round(book.relevant(0), 7) is d2
    book.prune(9)
    assert book.relevant(0) == [d3]
    assert book.latest is d3
    d4 = book.add(12, 3, 0.1, "static", "d")
    assert d4.decision_id == 4  # ids keep counting after a prune
    assert book.relevant(9) == [d3, d4]
