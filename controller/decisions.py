"""The decisions a controller has made (the type itself is the contract's: wanps.proto.decisions). Pure."""
from __future__ import annotations

from wanps.proto.decisions import Decision, decision_for_round

# Decisions scheduled ahead of the newest reported round that the book keeps at most. A
# controller schedules a new one no earlier than the newest pending one (same round: it
# replaces it), so this is only reached by switches at ever later rounds faster than workers
# reach them (SetPolicy in a loop): further ones are refused until rounds catch up.
MAX_PENDING_DECISIONS = 64


class DecisionBook:
    """The decisions a controller has made, pruned to those a worker can still ask for."""

    def __init__(self, first_id: int = 1) -> None:
        self._decisions: list[Decision] = []
        self._next_id = first_id

    def __len__(self) -> int:
        return len(self._decisions)

    def add(self, from_round: int, tau: int, delta: float, policy: str, reason: str,
            worker_delta: dict[int, float] | None = None, predicted_iter_s: float = 0.0,
            worker_downlink_delta: dict[int, float] | None = None) -> Decision:
        decision = Decision(self._next_id, from_round, tau, delta, policy, reason, dict(worker_delta or {}),
                            predicted_iter_s, dict(worker_downlink_delta or {}))
        self._next_id += 1
        self._decisions.append(decision)
        return decision

    def relevant(self, round_: int) -> list[Decision]:
        """The decision in force at `round_` and every later one, in id order."""
        current = decision_for_round(self._decisions, round_)
        return [d for d in self._decisions if d is current or d.from_round > round_]

    def pending(self, round_: int) -> int:
        """How many decisions hold only from after `round_`."""
        return sum(1 for d in self._decisions if d.from_round > round_)

    def prune(self, round_: int) -> None:
        """Keep what a worker at `round_` or later can still ask for: the decision in force at
        `round_` and the later ones that hold at some round (one replaced by a newer decision
        from the same round never does)."""
        newest_at: dict[int, int] = {}
        for decision in self._decisions:
            newest_at[decision.from_round] = max(newest_at.get(decision.from_round, 0), decision.decision_id)
        self._decisions = [d for d in self.relevant(round_) if newest_at[d.from_round] == d.decision_id]

    @property
    def latest(self) -> Decision | None:
        return self._decisions[-1] if self._decisions else None
