"""Decisions (tau, delta) and the policies that make them. Pure: no network code.

A decision holds from its `from_round` until a later decision's `from_round`, so every
worker switches at the same round whatever the moment it hears of the decision.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decision:
    decision_id: int
    from_round: int
    tau: int
    delta: float
    policy: str
    reason: str
    # deco-hetero: per-worker deltas; a worker not listed uses `delta`.
    worker_delta: dict[int, float] = field(default_factory=dict, compare=False)
    predicted_iter_s: float = 0.0

    def delta_for(self, worker_id: int | None) -> float:
        return self.worker_delta.get(worker_id, self.delta) if worker_id is not None else self.delta

    def __post_init__(self) -> None:
        if self.tau < 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        if not 0.0 < self.delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], got {self.delta}")
        if self.from_round < 0:
            raise ValueError(f"from_round must be >= 0, got {self.from_round}")
        for worker_id, delta in self.worker_delta.items():
            if not 0.0 < delta <= 1.0:
                raise ValueError(f"delta of worker {worker_id} must be in (0, 1], got {delta}")


def decision_for_round(decisions: Iterable[Decision], round_: int) -> Decision | None:
    """The decision in force at `round_`: the latest from_round <= round_ (newest id on ties)."""
    best: Decision | None = None
    for decision in decisions:
        if decision.from_round <= round_ and (
            best is None or (decision.from_round, decision.decision_id) > (best.from_round, best.decision_id)
        ):
            best = decision
    return best


class DecisionBook:
    """The decisions a controller has made, pruned to those that still matter."""

    def __init__(self, first_id: int = 1) -> None:
        self._decisions: list[Decision] = []
        self._next_id = first_id

    def add(self, from_round: int, tau: int, delta: float, policy: str, reason: str,
            worker_delta: dict[int, float] | None = None, predicted_iter_s: float = 0.0) -> Decision:
        decision = Decision(self._next_id, from_round, tau, delta, policy, reason, dict(worker_delta or {}),
                            predicted_iter_s)
        self._next_id += 1
        self._decisions.append(decision)
        return decision

    def relevant(self, round_: int) -> list[Decision]:
        """The decision in force at `round_` and every later one, in id order."""
        current = decision_for_round(self._decisions, round_)
        return [d for d in self._decisions if d is current or d.from_round > round_]

    def prune(self, round_: int) -> None:
        self._decisions = self.relevant(round_)

    @property
    def latest(self) -> Decision | None:
        return self._decisions[-1] if self._decisions else None

