"""The parameter server's state and rules, with no network code.

One `ServerCore` holds the flat float32 model, its version (rounds applied), the
membership, and the open rounds. It is not thread-safe on purpose: the gRPC servicer
runs every call into it on one dedicated thread, so the rules below read sequentially.

Rounds and versions (docs/architecture.md has the full story):
- version v = number of rounds applied. Round r, once closed, moves the model from v = r to r + 1.
- A worker may push round r when v <= r <= v + tau_max (its stale-gradient queue holds up
  to tau_max + 1 rounds); the update must have been computed at a version >= r - tau_max.
- Round r closes, in order, when every worker expected in r has pushed or skipped it.
  A skip reuses that worker's last applied sparse update (SASG); with none yet, it adds zero.
  The model moves by x -= sum(updates) / (number of workers expected in r).
- Membership changes only at round boundaries: a worker is expected in the rounds
  [first_round, last_round]; a join after the start gets the first round nobody has
  pushed yet, a leave ends after the last round the worker pushed.
- Each member and observer is bound to the digest of a secret handed out at its join
  (wanps.rpc.member_secrets); `CoreView.authenticate` refuses a call naming it without it.

Faults (docs/operations.md):
- Liveness by lease: any call from a worker renews it (`touch`); `sweep()` removes a
  member silent for longer than `lease_s` at the next round boundary (it is not expected
  from the current round on) and drops its queued pushes, so rounds keep closing.
- Stragglers: with `round_deadline_s` > 0, the current round closes with the pushes it has
  once it has waited that long after its first push; the missing workers are not counted
  in its mean. A late push for such a round is acknowledged as `late` and changes nothing
  (the worker puts it back into its error-feedback residual, so no gradient is lost).
- Checkpoints: `core_state()` / `restore_core()` in server/checkpoint.py hold everything
  above (model, version, membership, stored updates, open rounds), so a resumed server
  continues exactly where the checkpoint was taken.

The mean over a round is `aggregate()` (server/aggregate.py); the core decides what it counts.

Time comes from an injected clock (`clock`, monotonic seconds), so the rules stay testable.

What other threads may read: `view()`, an immutable `CoreView` (version, membership, secret
digests, each member's held rounds) that the servicer takes on the core thread after every
call and reads on the event loop. Nothing else of a core is read off its thread.

Memory: the model (d floats), at most tau_max + 1 open rounds each holding one sparse
update per worker, one stored update per worker, and while a round closes, its delta.
With no member left, nothing but the model (docs/operations.md, "Server memory").
With `audit` on, also the initial model (4d) and the float64 sum of applied deltas (8d).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import torch

from wanps.proto.codec import Update, apply_delta, checksum_part, combine_checksums, model_checksum
from wanps.proto import structure as structures
from wanps.proto.structure import TensorSpec
from wanps.proto.wire import MAX_PARAMS, name_problem
# Refusals are the rpc layer's plain exceptions (no gRPC in them); the servicer maps them to status codes.
from wanps.rpc.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from wanps.rpc.member_secrets import member_secret_matches
from wanps.server.aggregate import aggregate

# Rounds a member remembers having missed at a deadline (to answer a very late push `late`).
MISSED_ROUNDS_KEPT = 4096
# Deltas and models with fewer elements are applied and checksummed on the core thread alone.
SPLIT_FROM_ELEMENTS = 1 << 17


# ------------------------------------------------------------------------------- state


def all_finite(values: torch.Tensor, block: int = 1 << 22) -> bool:
    """No NaN or infinity, checked a block at a time: torch.isfinite over the whole model
    allocates ~7 bytes per parameter of temporaries (|x| and two masks), 830 MiB for 124M."""
    flat = values.reshape(-1)
    return all(bool(torch.isfinite(flat[start : start + block]).all()) for start in range(0, flat.numel(), block))

CHECKSUM_AUTO_PARAMS = 1_000_000


@dataclass(frozen=True)
class CoreConfig:
    # Widest stale window accepted; bounds the open rounds (and memory) to tau_max + 1.
    tau_max: int = 8
    # Round 0 starts once this many workers have joined (and the model is seeded).
    min_workers: int = 1
    # Send the model checksum every this many rounds (0: never); replicas compare against it.
    # None: every ceil(d / 1M) rounds. The checksum reads the whole model, so spacing it out in
    # proportion to the model's size keeps its cost per round about the same for any model.
    checksum_every: int | None = None
    # A member silent (no call at all) for this long leaves at the next round boundary; 0: never.
    lease_s: float = 30.0
    # Close the current round without its stragglers this long after its first push; 0: wait forever.
    round_deadline_s: float = 0.0
    # Keep the initial model, the float64 sum of every applied delta and the applied round ids
    # (tests and audits check conservation with them; costs 12 bytes per parameter).
    audit: bool = False
    # Key-range shards (server/shard.py): this core holds shard `shard_index` of `shard_count`,
    # the model of its range; 0 of 1 is the whole model.
    shard_index: int = 0
    shard_count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard {self.shard_index}/{self.shard_count} names no shard")
        if self.tau_max < 0:
            raise ValueError("tau_max must be >= 0")
        if self.min_workers < 1:
            raise ValueError("min_workers must be >= 1")
        if self.checksum_every is not None and self.checksum_every < 0:
            raise ValueError("checksum_every must be >= 0 (or None for automatic)")
        if not self.lease_s >= 0 or not self.round_deadline_s >= 0:
            raise ValueError("lease_s and round_deadline_s must be >= 0")

    def checksum_period(self, num_params: int) -> int:
        """Rounds between model checksums (0: never)."""
        if self.checksum_every is not None:
            return self.checksum_every
        return max(1, math.ceil(num_params / CHECKSUM_AUTO_PARAMS))


@dataclass
class Member:
    worker_id: int
    name: str
    first_round: int
    last_round: int | None = None  # set by a leave
    # The last update of this worker that was applied: what a skip reuses.
    last_update: Update | None = None
    highest_round_sent: int = -1
    last_seen: float = 0.0  # clock time of the last call from this worker (the lease)
    missed_rounds: set[int] = field(default_factory=set)  # closed at a deadline without it
    # SHA-256 of the secret handed out at its join. None only for a member restored from a
    # checkpoint older than member secrets (format 1): identified by its id alone, as then.
    secret_digest: bytes | None = None

    def expected_in(self, round_: int) -> bool:
        return self.first_round <= round_ and (self.last_round is None or round_ <= self.last_round)


@dataclass
class OpenRound:
    updates: dict[int, Update] = field(default_factory=dict)
    computed_at: dict[int, int] = field(default_factory=dict)
    skips: set[int] = field(default_factory=set)
    first_push_at: float | None = None  # clock time; the round deadline counts from here

    def has(self, worker_id: int) -> bool:
        return worker_id in self.updates or worker_id in self.skips


@dataclass(frozen=True)
class JoinResult:
    worker_id: int
    rank: int
    world_size: int
    version: int
    must_seed: bool
    first_round: int


@dataclass(frozen=True)
class ClosedRound:
    round: int
    version: int  # after applying
    delta: Update  # the mean that was subtracted
    pushed: int
    skipped: int
    members: int
    staleness: tuple[int, ...]  # round - computed_at_version of each applied push
    model_checksum: int | None


@dataclass(frozen=True)
class PushResult:
    duplicate: bool
    version: int
    closed: tuple[ClosedRound, ...]
    # The round had closed at its deadline without this worker: nothing was applied.
    late: bool = False


@dataclass(frozen=True)
class SweepResult:
    expired: tuple[int, ...]  # members whose lease ran out
    overdue: int | None  # the round closed at its deadline without its stragglers
    closed: tuple[ClosedRound, ...]


class MemberView(NamedTuple):  # a tuple: one is built per member for every published view
    first_round: int
    last_round: int | None
    held_rounds: frozenset[int]  # open rounds that hold its push or skip


def push_rule(worker_id: int, member: MemberView | None, round_: int, computed_at_version: int, *,
              version: int, started: bool, tau_max: int) -> bool:
    """Everything about a push but its payload, against a member's state. True = duplicate
    (acknowledge, change nothing). One rule for the core and for the event loop's pre-check."""
    if member is None:
        raise NotFound(f"worker {worker_id} is not a member of this cluster (join first)")
    if not started:
        raise FailedPrecondition("the cluster has not started (waiting for the model seed or --min-workers)")
    if round_ < member.first_round:
        raise FailedPrecondition(f"round {round_} is before this worker's first round {member.first_round}")
    if member.last_round is not None and round_ > member.last_round:
        raise FailedPrecondition(f"worker {worker_id} left after round {member.last_round}")
    if round_ < version:
        return True  # already applied with this worker counted: a replay
    window_end = version + tau_max
    if round_ > window_end:
        raise FailedPrecondition(
            f"round {round_} is outside the open window [{version}, {window_end}] (tau_max {tau_max})"
        )
    if round_ in member.held_rounds:
        return True
    if computed_at_version > version:
        raise InvalidArgument(f"computed_at_version {computed_at_version} is ahead of the server's version {version}")
    if computed_at_version + tau_max < round_:
        raise FailedPrecondition(
            f"update for round {round_} computed at version {computed_at_version} is staler than tau_max {tau_max}"
        )
    return False


@dataclass(frozen=True)
class CoreView:
    """An immutable snapshot of what the event loop needs of a core (`ServerCore.view()`),
    taken on the core thread: the loop reads this, never the core itself."""

    version: int
    tau_max: int
    num_params: int | None
    total_params: int | None  # on a shard, the whole vector's size
    seeded: bool
    started: bool
    members: Mapping[int, MemberView]  # read-only
    expected_now: int  # workers expected in round `version`
    secret_digests: Mapping[int, bytes | None]  # members and observers; read-only

    def is_known(self, worker_id: int) -> bool:
        return worker_id in self.secret_digests

    def authenticate(self, worker_id: int, secret: bytes) -> None:
        """NotFound for an id nobody holds, PermissionDenied without the id's secret. Ids are
        never reused and a member's secret never changes, so a snapshot answers for good."""
        if worker_id not in self.secret_digests:
            raise NotFound(f"worker {worker_id} is not a member of this cluster (join first)")
        digest = self.secret_digests[worker_id]
        if digest is not None and not member_secret_matches(digest, secret):
            raise PermissionDenied(f"worker {worker_id}: missing or wrong member secret (calls naming a member "
                                   "must carry the secret its Join returned)")

    def check_push(self, worker_id: int, round_: int, computed_at_version: int) -> bool:
        return push_rule(worker_id, self.members.get(worker_id), round_, computed_at_version,
                         version=self.version, started=self.started, tau_max=self.tau_max)


@dataclass(frozen=True)
class ResumeInfo:
    """What a reconnecting worker needs to reconcile: is it still a member, the model's
    version and checksum, and which open rounds already hold its push (not to be sent again)."""

    member: bool
    version: int
    model_checksum: int
    held_rounds: tuple[int, ...]
    first_round: int


class ServerCore:
    def __init__(self, config: CoreConfig, clock: Callable[[], float] = time.monotonic,
                 helper: Executor | None = None) -> None:
        """`helper`: a thread that takes half of a large round's tensor work (aggregate,
        apply, checksum: torch and numpy release the GIL), the same result to the bit."""
        self.config = config
        self.clock = clock
        self.helper = helper
        self.model: torch.Tensor | None = None
        self.version = 0
        self.num_params: int | None = None
        # The whole vector's size: num_params itself, or on a shard the size its range is cut from.
        self.total_params: int | None = None
        self.fingerprint: bytes | None = None
        # The model's structure (one TensorSpec per tensor, layout order), when a member sent it.
        self.structure: tuple[TensorSpec, ...] | None = None
        self.started = False
        self.members: dict[int, Member] = {}
        self.observers: dict[int, bytes | None] = {}  # id -> secret digest
        self.open_rounds: dict[int, OpenRound] = {}
        self.seeder_id: int | None = None  # the member asked to seed the model, until it is seeded
        self.next_worker_id = 1
        self._current_since = clock()  # clock time at which round `version` became the current one
        # audit (config.audit): initial model, float64 sum of applied deltas, applied round ids.
        self.initial_model: torch.Tensor | None = None
        self.applied_sum: torch.Tensor | None = None
        self.applied_rounds: list[int] = []

    # ------------------------------------------------------------------ membership

    @property
    def seeded(self) -> bool:
        return self.model is not None

    def active_workers(self) -> list[int]:
        """Workers still expected in some round from the current one on, by id."""
        return sorted(w for w, m in self.members.items() if m.last_round is None or m.last_round >= self.version)

    def rank_of(self, worker_id: int) -> int:
        active = self.active_workers()
        return active.index(worker_id) if worker_id in active else -1

    def join(self, num_params: int, fingerprint: bytes, name: str = "", observer: bool = False,
             structure: Sequence[TensorSpec] = (), secret_digest: bytes | None = None,
             total_params: int | None = None) -> JoinResult:
        """`structure`: the joining model's tensors (wanps.proto.structure), optional. When both
        the cluster's and the joiner's are known, they are compared entry by entry (unnamed
        entries match any name) and a refusal names the first tensor that differs; otherwise
        the fingerprints must be equal. `secret_digest`: of the secret the caller hands the
        new member (wanps.rpc.member_secrets); None binds none (tests of the rules alone).
        `total_params`: on a shard, the whole vector's size (the structure describes the whole
        model; `num_params` is the range's length, which the servicer checked against it,
        server/shard.py); None: num_params."""
        problem = name_problem(name)
        if problem is not None:
            raise InvalidArgument(problem)
        if not 0 < num_params <= MAX_PARAMS:
            raise InvalidArgument(f"num_params must be in [1, {MAX_PARAMS}], got {num_params}")
        if not fingerprint:
            raise InvalidArgument("model_fingerprint is empty")
        total = num_params if total_params is None else total_params
        structure = tuple(structure)
        if structure:
            problem = structures.problem_with(structure, total, fingerprint)
            if problem is not None:
                raise InvalidArgument(problem)
            if self.structure is not None:
                difference = structures.first_difference(self.structure, structure)
                if difference is not None:
                    raise FailedPrecondition(f"model structure differs from the cluster's model: {difference}")
        if total_params is not None and self.total_params is not None and total_params != self.total_params:
            raise FailedPrecondition(f"this worker's model has {total_params} elements in all; the cluster's shards "
                                     f"cut a model of {self.total_params}")
        if self.num_params is not None and num_params != self.num_params:
            raise FailedPrecondition(f"model has {num_params} parameters; this cluster trains {self.num_params}")
        compared = bool(structure) and self.structure is not None
        if self.fingerprint is not None and fingerprint != self.fingerprint and not compared:
            raise FailedPrecondition("model structure (fingerprint) differs from the cluster's model")
        worker_id = self.next_worker_id
        self.next_worker_id += 1
        if self.num_params is None:
            self.num_params, self.fingerprint, self.total_params = num_params, fingerprint, total
        if self.structure is None and structure and fingerprint == self.fingerprint:
            self.structure = structure  # the first member that sent it (or a checkpoint without one)
        must_seed = False
        if observer:
            self.observers[worker_id] = secret_digest
            first_round = self.version
        else:
            first_round = self._next_unpushed_round() if self.started else 0
            self.members[worker_id] = Member(worker_id=worker_id, name=name, first_round=first_round,
                                             last_seen=self.clock(), secret_digest=secret_digest)
            if self.seeder_id is None and not self.seeded:
                self.seeder_id, must_seed = worker_id, True
            self._maybe_start()
        return JoinResult(
            worker_id=worker_id,
            rank=self.rank_of(worker_id) if not observer else -1,
            world_size=len(self.active_workers()),
            version=self.version,
            must_seed=must_seed,
            first_round=first_round,
        )

    def seed(self, worker_id: int, model: torch.Tensor, copy: bool = True) -> int:
        """Install the initial parameters uploaded by the worker told to seed (`copy` False:
        the core takes `model` itself, which the caller must no longer use)."""
        if worker_id != self.seeder_id:
            raise FailedPrecondition(f"worker {worker_id} was not asked to seed the model")
        if self.seeded:
            raise FailedPrecondition("the model is already seeded")
        if model.dtype != torch.float32 or model.dim() != 1 or model.numel() != self.num_params:
            raise InvalidArgument(f"seed must be {self.num_params} float32 values, got {model.numel()}")
        if not all_finite(model):
            raise InvalidArgument("seed contains NaN or infinite values")
        self.model = model.clone() if copy else model
        if self.config.audit:
            self.initial_model = model.clone()
            self.applied_sum = torch.zeros(model.numel(), dtype=torch.float64)
        self._maybe_start()
        return model_checksum(self.model)

    def _maybe_start(self) -> None:
        if not self.started and self.seeded and len(self.members) >= self.config.min_workers:
            self.started = True
            # Nobody is late before rounds run: every lease and round 0's wait start now.
            self._current_since = now = self.clock()
            for member in self.members.values():
                member.last_seen = now

    def _next_unpushed_round(self) -> int:
        pushed = [r for r, open_round in self.open_rounds.items() if open_round.updates or open_round.skips]
        return max([self.version, *(r + 1 for r in pushed)])

    def leave(self, worker_id: int) -> tuple[int, tuple[ClosedRound, ...]]:
        """Stop expecting a worker after the last round it sent. Returns (last_round, closed rounds)."""
        if worker_id in self.observers:
            del self.observers[worker_id]
            return self.version - 1, ()
        member = self._member(worker_id)
        if member.last_round is None:
            member.last_round = max(self.version - 1, member.highest_round_sent, member.first_round - 1)
        if member.last_round < self.version:
            del self.members[worker_id]
        if self.seeder_id == worker_id and not self.seeded:
            self.seeder_id = None  # the next joiner seeds instead
        closed = self._close_ready_rounds()
        self._forget_open_rounds_if_idle()
        return member.last_round, closed

    def _member(self, worker_id: int) -> Member:
        member = self.members.get(worker_id)
        if member is None:
            raise NotFound(f"worker {worker_id} is not a member of this cluster (join first)")
        return member

    def is_known(self, worker_id: int) -> bool:
        return worker_id in self.members or worker_id in self.observers

    # ------------------------------------------------------------------ liveness

    def touch(self, worker_id: int) -> None:
        """Renew a member's lease (any call from it does)."""
        member = self.members.get(worker_id)
        if member is not None:
            member.last_seen = self.clock()

    def expire(self, worker_id: int) -> tuple[ClosedRound, ...]:
        """Remove a member at the next round boundary: it is not expected from round `version`
        on, and its queued pushes for those rounds are dropped. Returns the rounds this closes."""
        member = self._member(worker_id)
        for open_round in self.open_rounds.values():
            open_round.updates.pop(worker_id, None)
            open_round.computed_at.pop(worker_id, None)
            open_round.skips.discard(worker_id)
        del self.members[worker_id]  # its stored update goes with it
        if self.seeder_id == worker_id and not self.seeded:
            self.seeder_id = None
        closed = self._close_ready_rounds()
        self._forget_open_rounds_if_idle()
        return closed

    def _forget_open_rounds_if_idle(self) -> None:
        """With no member left nothing can be pending: drop the (empty) open rounds too."""
        if not self.members:
            self.open_rounds.clear()

    def sweep(self) -> SweepResult:
        """Expire silent members and close an overdue round. Call periodically."""
        if not self.started:
            return SweepResult((), None, ())
        now = self.clock()
        expired: list[int] = []
        closed: list[ClosedRound] = []
        if self.config.lease_s > 0:
            for worker_id in sorted(self.members):
                member = self.members.get(worker_id)
                if member is not None and member.last_round is None and now - member.last_seen > self.config.lease_s:
                    expired.append(worker_id)
                    closed.extend(self.expire(worker_id))
        overdue = None
        if self.config.round_deadline_s > 0:
            round_ = self.version
            open_round = self.open_rounds.get(round_)
            if open_round is not None and open_round.first_push_at is not None:
                waiting_since = max(self._current_since, open_round.first_push_at)
                if now - waiting_since >= self.config.round_deadline_s:
                    overdue = round_
                    closed.extend(self._close_overdue(round_, open_round))
        return SweepResult(tuple(expired), overdue, tuple(closed))

    def _close_overdue(self, round_: int, open_round: OpenRound) -> tuple[ClosedRound, ...]:
        present = sorted(w for w in self.expected_workers(round_) if open_round.has(w))
        if not present:
            return ()
        for worker_id in self.expected_workers(round_):
            if worker_id not in present:
                missed = self.members[worker_id].missed_rounds
                missed.add(round_)
                if len(missed) > MISSED_ROUNDS_KEPT:
                    missed.discard(min(missed))
        closed = self._close(round_, present, open_round)
        return (closed, *self._close_ready_rounds())

    def resume_info(self, worker_id: int) -> ResumeInfo:
        """For a worker reconnecting after a lost connection or a server restart.

        A server that has no model (restarted without --resume) knows nobody: the worker
        joins again and, being first, seeds the model with its replica."""
        if self.model is None:
            return ResumeInfo(member=False, version=0, model_checksum=0, held_rounds=(), first_round=0)
        member = self.members.get(worker_id)
        if member is not None:
            member.last_seen = self.clock()
        held = tuple(sorted(r for r, o in self.open_rounds.items() if member is not None and o.has(worker_id)))
        return ResumeInfo(member=member is not None and (member.last_round is None or member.last_round >= self.version),
                          version=self.version, model_checksum=model_checksum(self.model), held_rounds=held,
                          first_round=member.first_round if member is not None else self.version)

    # ------------------------------------------------------------------ pushes

    def check_push(self, worker_id: int, round_: int, computed_at_version: int) -> bool:
        """Everything about a push but its payload. True = duplicate (acknowledge, change nothing)."""
        member = self.members.get(worker_id)
        held = None if member is None else self._member_view(member)
        return push_rule(worker_id, held, round_, computed_at_version, version=self.version, started=self.started,
                         tau_max=self.config.tau_max)

    def _member_view(self, member: Member) -> MemberView:
        held = frozenset(r for r, o in self.open_rounds.items() if o.has(member.worker_id))
        return MemberView(first_round=member.first_round, last_round=member.last_round, held_rounds=held)

    def push(self, worker_id: int, round_: int, computed_at_version: int, update: Update | None) -> PushResult:
        """Store one worker's update (None = skip) for a round and close what is complete."""
        if self.check_push(worker_id, round_, computed_at_version):
            member = self.members[worker_id]
            member.last_seen = self.clock()
            late = round_ < self.version and round_ in member.missed_rounds
            return PushResult(duplicate=not late, version=self.version, closed=(), late=late)
        if update is not None:
            expected = self.num_params
            if update.indices is None and update.count != expected:
                raise InvalidArgument(f"dense update has {update.count} values, model has {expected}")
        open_round = self.open_rounds.setdefault(round_, OpenRound())
        if open_round.first_push_at is None:
            open_round.first_push_at = self.clock()
        if update is None:
            open_round.skips.add(worker_id)
        else:
            open_round.updates[worker_id] = update
            open_round.computed_at[worker_id] = computed_at_version
        member = self.members[worker_id]
        member.highest_round_sent = max(member.highest_round_sent, round_)
        member.last_seen = self.clock()
        closed = self._close_ready_rounds()
        return PushResult(duplicate=False, version=self.version, closed=closed)

    # ------------------------------------------------------------------ closing rounds

    def expected_workers(self, round_: int) -> list[int]:
        return sorted(w for w, m in self.members.items() if m.expected_in(round_))

    def _close_ready_rounds(self) -> tuple[ClosedRound, ...]:
        closed = []
        while self.started:
            round_ = self.version
            expected = self.expected_workers(round_)
            open_round = self.open_rounds.get(round_, OpenRound())
            if not expected or not all(open_round.has(w) for w in expected):
                break
            closed.append(self._close(round_, expected, open_round))
        return tuple(closed)

    def _close(self, round_: int, expected: list[int], open_round: OpenRound) -> ClosedRound:
        assert self.model is not None
        contributions: list[Update] = []
        for worker_id in expected:  # sorted by id: a deterministic summation order
            member = self.members[worker_id]
            if worker_id in open_round.updates:
                member.last_update = open_round.updates[worker_id]
            if member.last_update is not None:
                contributions.append(member.last_update)
        delta = aggregate(contributions, len(expected), self.model.numel(), executor=self.helper)
        self._apply(delta)
        if self.applied_sum is not None:
            if delta.indices is None:
                self.applied_sum.add_(delta.values.double())
            else:
                self.applied_sum.index_add_(0, delta.indices.long(), delta.values.double())
            self.applied_rounds.append(round_)
        self.version = round_ + 1
        self._current_since = self.clock()
        self.open_rounds.pop(round_, None)
        # Members that left after this round are no longer needed.
        for worker_id in [w for w, m in self.members.items() if m.last_round is not None and m.last_round < self.version]:
            del self.members[worker_id]
        every = self.config.checksum_period(self.model.numel())
        checksum = self._model_checksum() if every and self.version % every == 0 else None
        return ClosedRound(
            round=round_,
            version=self.version,
            delta=delta,
            pushed=len(open_round.updates),
            skipped=len(open_round.skips),
            members=len(expected),
            staleness=tuple(round_ - open_round.computed_at[w] for w in sorted(open_round.updates)),
            model_checksum=checksum,
        )

    def _apply(self, delta: Update) -> None:
        """`apply_delta` of the round's delta; with a helper, the two halves of a large sparse
        delta at once (disjoint elements, each changed by the same one operation)."""
        if self.helper is None or delta.indices is None or delta.count < SPLIT_FROM_ELEMENTS:
            apply_delta(self.model, delta)
            return
        half = delta.count // 2
        upper = self.helper.submit(apply_delta, self.model, Update(values=delta.values[half:],
                                                                   indices=delta.indices[half:]))
        try:
            apply_delta(self.model, Update(values=delta.values[:half], indices=delta.indices[:half]))
        finally:
            upper.result()

    def _model_checksum(self) -> int:
        """`model_checksum`; with a helper, its two halves at once (the checksum is additive)."""
        assert self.model is not None
        n = self.model.numel()
        if self.helper is None or n < SPLIT_FROM_ELEMENTS:
            return model_checksum(self.model)
        half = n // 2
        upper = self.helper.submit(checksum_part, self.model[half:], half)
        try:
            lower = checksum_part(self.model[:half], 0)
        finally:
            upper_part = upper.result()
        return combine_checksums((lower, upper_part))

    # ------------------------------------------------------------------ reads

    def view(self) -> CoreView:
        """An immutable snapshot for other threads (see the module); O(members + open rounds)."""
        held: dict[int, list[int]] = {}
        for round_, open_round in self.open_rounds.items():
            for worker_id in (*open_round.updates, *open_round.skips):
                held.setdefault(worker_id, []).append(round_)
        nothing: frozenset[int] = frozenset()
        members = {w: MemberView(m.first_round, m.last_round, frozenset(held[w]) if w in held else nothing)
                   for w, m in self.members.items()}
        digests = {w: m.secret_digest for w, m in self.members.items()}
        digests.update(self.observers)
        return CoreView(version=self.version, tau_max=self.config.tau_max, num_params=self.num_params,
                        total_params=self.total_params, seeded=self.seeded, started=self.started, members=MappingProxyType(members),
                        expected_now=len(self.expected_workers(self.version)),
                        secret_digests=MappingProxyType(digests))

    def placement(self, worker_id: int) -> tuple[int, int, int | None]:
        """(rank among the active workers or -1, their number, first round or None for a
        non-member) for a pull's first chunk."""
        member = self.members.get(worker_id)
        return self.rank_of(worker_id), len(self.active_workers()), member.first_round if member is not None else None

    def snapshot(self) -> tuple[int, bytes, int]:
        """(version, model bytes, model checksum) at one instant, for PullModel."""
        if self.model is None:
            raise FailedPrecondition("the model has not been seeded yet")
        raw = self.model.numpy().tobytes()
        return self.version, raw, model_checksum(self.model)

    def snapshot_tensor(self) -> tuple[int, torch.Tensor, int]:
        """(version, a copy of the model, checksum) at one instant, for PullModel."""
        if self.model is None:
            raise FailedPrecondition("the model has not been seeded yet")
        return self.version, self.model.clone(), model_checksum(self.model)
