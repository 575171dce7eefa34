"""A decision (tau, delta) from a round on, and which decision holds at a round.

The controller makes decisions and every worker follows them; both must read them the same
way, so the type, its wire form and `decision_for_round` live here, with the contract.
A decision holds from its `from_round` until a later decision's `from_round`, so every
worker switches at the same round whatever the moment it hears of the decision.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from wanps.proto import wanps_pb2 as pb
from wanps.proto.wire import MAX_TAU


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
    # deco-hetero: per-worker downlink fractions (a compressed downlink, server/downlink.py);
    # a worker not listed follows every round uncompressed.
    worker_downlink_delta: dict[int, float] = field(default_factory=dict, compare=False)

    def delta_for(self, worker_id: int | None) -> float:
        return self.worker_delta.get(worker_id, self.delta) if worker_id is not None else self.delta

    def downlink_delta_for(self, worker_id: int | None) -> float | None:
        """The downlink fraction this decision gives `worker_id`; None: uncompressed."""
        return self.worker_downlink_delta.get(worker_id) if worker_id is not None else None

    def __post_init__(self) -> None:
        if not 0 <= self.tau <= MAX_TAU:
            raise ValueError(f"tau must be in [0, {MAX_TAU}], got {self.tau}")
        if not 0.0 < self.delta <= 1.0:
            raise ValueError(f"delta must be in (0, 1], got {self.delta}")
        if self.from_round < 0:
            raise ValueError(f"from_round must be >= 0, got {self.from_round}")
        for worker_id, delta in self.worker_delta.items():
            if not 0.0 < delta <= 1.0:
                raise ValueError(f"delta of worker {worker_id} must be in (0, 1], got {delta}")
        for worker_id, fraction in self.worker_downlink_delta.items():
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"downlink delta of worker {worker_id} must be in (0, 1], got {fraction}")


def decision_for_round(decisions: Iterable[Decision], round_: int) -> Decision | None:
    """The decision in force at `round_`: the latest from_round <= round_ (newest id on ties)."""
    best: Decision | None = None
    for decision in decisions:
        if decision.from_round <= round_ and (
            best is None or (decision.from_round, decision.decision_id) > (best.from_round, best.decision_id)
        ):
            best = decision
    return best


def decision_to_message(decision: Decision) -> pb.Decision:
    return pb.Decision(decision_id=decision.decision_id, from_round=decision.from_round, tau=decision.tau,
                       delta=decision.delta, policy=decision.policy, reason=decision.reason,
                       worker_delta=decision.worker_delta, predicted_iter_s=decision.predicted_iter_s,
                       worker_downlink_delta=decision.worker_downlink_delta)


def decision_from_message(message: pb.Decision) -> Decision:
    """Raises ValueError for a decision that breaks the rules (tau < 0, delta outside (0, 1]).
    A worker's downlink fraction of 0 on the wire is the same as none (uncompressed)."""
    downlink = {w: f for w, f in message.worker_downlink_delta.items() if f != 0.0}
    return Decision(message.decision_id, message.from_round, message.tau, message.delta, message.policy,
                    message.reason, dict(message.worker_delta), message.predicted_iter_s, downlink)
