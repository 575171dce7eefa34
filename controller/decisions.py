"""The decisions a controller has made (the type itself is the contract's: wanps.proto.decisions). Pure."""
from __future__ import annotations

from wanps.proto.decisions import Decision, decision_for_round


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

